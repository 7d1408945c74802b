"""Pure machine tests of intermail.proto.pop3: the POP3 server machine.

Sessions run in memory through :class:`App`, a small maildrop app in front
of the machine (``app.cmd("STAT") == b"+OK 2 120\\r\\n"``); the split-feed
contract is checked with the shared helper on :class:`AutoApp`, which
answers every decision and reports each event together with the bytes its
answer produced.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import ssl
import textwrap
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.errors import ErrorKind, LocalProtocolError, MailError
from intermail.net.pump import Pump
from intermail.proto import NEED_DATA, pop3
from intermail.proto.pop3 import (
    AuthPlain,
    AutoReply,
    Challenge,
    ConnectionClosed,
    Dele,
    Err,
    Greeting,
    List,
    MultiLine,
    MultiLineData,
    MultiLineEnd,
    MultiLineStart,
    Noop,
    Ok,
    Pop3Server,
    Quit,
    Retr,
    Rset,
    StartTls,
    Stat,
    Top,
    Uidl,
    UserPass,
    err_for_error,
    stuff_body,
)
from intermail.testing.feed import assert_split_invariant, events_for_chunks, events_whole
from intermail.testing.loops import run_on

TRANSCRIPTS = Path(__file__).parent / "transcripts" / "pop3"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ONE = b"From: a@example.test\r\nSubject: one\r\n\r\nfirst line\r\n.dotted line\r\n..two dots\r\n.\r\nlast\r\n"
TWO = b"Subject: two\r\n\r\nhello\r\n"
MESSAGES = [("uid-one", ONE), ("uid-two", TWO)]


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def top_of(body: bytes, lines: int) -> bytes:
    head, blank, rest = body.partition(b"\r\n\r\n")
    return head + blank + b"".join(rest.splitlines(keepends=True)[:lines])


# ---------------------------------------------------------------------------
# helpers


class App:
    """A machine and a tiny maildrop app: greets, answers what it owes, records everything.

    Logs in alice/secret (authzid "" or "alice"); messages are numbered from 1;
    DELE marks, RSET unmarks, QUIT removes the marked ones (``removed``).
    With ``stream`` set, RETR and TOP answers are streamed in chunks of that size.
    """

    def __init__(self, greet: bool = True, messages=MESSAGES, stream: int | None = None, **limits):
        limits.setdefault("stls_available", False)
        self.machine = Pop3Server(**limits)
        self.messages = list(messages)
        self.deleted: set[int] = set()
        self.removed: list[str] | None = None
        self.events: list = []
        self.stream = stream
        self.closed = False
        self.banner = self.machine.send(Greeting()) if greet else b""

    def _message(self, msg: int) -> bytes | None:
        if 1 <= msg <= len(self.messages) and msg not in self.deleted:
            return self.messages[msg - 1][1]
        return None

    def _live(self) -> list[int]:
        return [n for n in range(1, len(self.messages) + 1) if n not in self.deleted]

    def decide(self, event) -> object:
        if isinstance(event, UserPass):
            ok = event.user == "alice" and event.password == "secret"
            return Ok("maildrop ready") if ok else Err("invalid user name or password", "AUTH")
        if isinstance(event, AuthPlain):
            ok = event.authcid == "alice" and event.password == "secret" and event.authzid in ("", "alice")
            return Ok("maildrop ready") if ok else Err("authentication failed", "AUTH")
        if isinstance(event, Stat):
            live = self._live()
            return Ok(f"{len(live)} {sum(len(self.messages[n - 1][1]) for n in live)}")
        if isinstance(event, (List, Uidl)):
            def entry(n: int) -> str:
                return f"{n} {len(self.messages[n - 1][1]) if isinstance(event, List) else self.messages[n - 1][0]}"
            if event.msg is None:
                return MultiLine(f"{len(self._live())} messages", [entry(n) for n in self._live()])
            return Ok(entry(event.msg)) if self._message(event.msg) is not None else Err("no such message")
        if isinstance(event, (Retr, Top)):
            body = self._message(event.msg)
            if body is None:
                return Err("no such message")
            if isinstance(event, Top):
                body = top_of(body, event.lines)
            return MultiLine(f"{len(body)} octets", body)
        if isinstance(event, Dele):
            if self._message(event.msg) is None:
                return Err("no such message")
            self.deleted.add(event.msg)
            return Ok(f"message {event.msg} deleted")
        if isinstance(event, Rset):
            self.deleted.clear()
            return Ok(f"maildrop has {len(self.messages)} messages")
        if isinstance(event, Noop):
            return Ok()
        if isinstance(event, Quit):
            self.removed = [self.messages[n - 1][0] for n in sorted(self.deleted)]
            self.messages = [m for n, m in enumerate(self.messages, 1) if n not in self.deleted]
            return Ok(f"bye ({len(self.messages)} messages left)")
        raise AssertionError(f"unexpected event {event!r}")

    def answer(self, event) -> bytes:
        reply = self.decide(event)
        if self.stream and isinstance(reply, MultiLine) and isinstance(event, (Retr, Top)):
            body = reply.body_bytes()
            out = self.machine.send(MultiLineStart(reply.first_line))
            for start in range(0, len(body), self.stream):
                out += self.machine.send(MultiLineData(body[start : start + self.stream]))
            return out + self.machine.send(MultiLineEnd())
        return self.machine.send(reply)

    def feed(self, data: bytes) -> bytes:
        """Bytes from the client in (b"" closes); the server's output back."""
        self.machine.receive_data(data)
        out = b""
        while (event := self.machine.next_event()) is not NEED_DATA:
            self.events.append(event)
            if isinstance(event, (AutoReply, StartTls)):
                out += self.machine.send(event)
            elif isinstance(event, ConnectionClosed):
                self.closed = True
                break
            else:
                out += self.answer(event)
        return out

    def cmd(self, line: str | bytes) -> bytes:
        raw = line.encode("utf-8") if isinstance(line, str) else line
        return self.feed(raw + b"\r\n")

    def err(self, line: str | bytes, text: str | None = None) -> None:
        out = self.cmd(line)
        assert out.startswith(b"-ERR") and out.count(b"\r\n") == 1, (line, out)
        if text is not None:
            assert out == f"-ERR {text}\r\n".encode(), (line, out)

    def login(self) -> None:
        assert self.cmd("USER alice") == b"+OK\r\n"
        assert self.cmd("PASS secret") == b"+OK maildrop ready\r\n"
        assert self.machine.state == "transaction"

    def of(self, kind) -> list:
        return [event for event in self.events if isinstance(event, kind)]


def session(**limits) -> App:
    app = App(**limits)
    app.login()
    return app


DEFAULT_ANSWERS = {
    Stat: Ok("2 20"),
    Dele: Ok("deleted"),
    Noop: Ok(),
    Rset: Ok("reset"),
    Quit: Ok("bye"),
}


def default_answer(event) -> object:
    if isinstance(event, (UserPass, AuthPlain)):
        return Ok("logged in") if event.password == "secret" else Err("invalid credentials", "AUTH")
    if isinstance(event, (List, Uidl)):
        if event.msg is None:
            return MultiLine("2 messages", ["1 10", "2 10"])
        return Ok(f"{event.msg} 10") if event.msg <= 2 else Err("no such message")
    if isinstance(event, (Retr, Top)):
        return MultiLine("10 octets", b".x\r\n..\r\nend") if event.msg <= 2 else Err("no such message")
    return DEFAULT_ANSWERS[type(event)]


class AutoApp:
    """A Machine for the split-feed helper: answers every event, returns (event, output bytes).

    ``answers`` (from a transcript) are used in order for the decision
    events; otherwise :func:`default_answer`.  After ConnectionClosed it
    reports NEED_DATA (the machine itself repeats ConnectionClosed forever).
    """

    def __init__(self, answers: list | None = None, **limits):
        limits.setdefault("stls_available", False)
        self.machine = Pop3Server(**limits)
        self.answers = list(answers) if answers is not None else None
        self.closed = False
        self.machine.send(Greeting())

    def receive_data(self, data: bytes) -> None:
        self.machine.receive_data(data)

    def next_event(self):
        if self.closed:
            return NEED_DATA
        event = self.machine.next_event()
        if event is NEED_DATA:
            return event
        self.closed = isinstance(event, ConnectionClosed)
        if isinstance(event, (AutoReply, StartTls)):
            out = self.machine.send(event)
        elif self.closed:
            out = b""
        elif self.answers is not None:
            assert self.answers, f"the transcript has no answer left for {event!r}"
            out = self.machine.send(self.answers.pop(0))
        else:
            out = self.machine.send(default_answer(event))
        return event, out

    def send(self, event) -> bytes:
        return self.machine.send(event)


def output_of(events: list) -> bytes:
    return b"".join(item[1] for item in events if isinstance(item, tuple) and isinstance(item[1], bytes))


def check_response(out: bytes) -> None:
    """One response as POP3 allows it: a status line, or a dot-stuffed multi-line body ending in ``.``."""
    if not out:
        return
    assert out.endswith(b"\r\n"), out[-40:]
    lines = out[:-2].split(b"\r\n")
    assert lines[0].startswith((b"+OK", b"-ERR", b"+ ")) and len(lines[0]) + 2 <= 512, lines[0]
    for line in lines:
        assert b"\r" not in line and b"\n" not in line
    if len(lines) > 1:
        assert lines[0].startswith(b"+OK") and lines[-1] == b"."
        assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines[1:-1])


# ---------------------------------------------------------------------------
# seed transcripts


def load_transcript(path: Path) -> tuple[dict, bytes, bytes, list]:
    """(constructor arguments, client bytes, expected server bytes, the app's answers) of a transcript."""
    limits: dict = {}
    client, server, answers = bytearray(), bytearray(), []
    body: bytearray | None = None
    first_line = ""

    def flush() -> None:
        nonlocal body
        if body is not None:
            answers.append(MultiLine(first_line, bytes(body)))
            body = None

    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line or line.startswith("#"):
            continue
        tag, text = line[:2], line[3:]
        raw = codecs.escape_decode(text.encode("utf-8"))[0]
        if tag in ("B:", "B+"):
            assert body is not None, f"{path.name}: body line outside a multi-line answer"
            body += raw + (b"\r\n" if tag == "B:" else b"")
            continue
        flush()
        if tag == "C:":
            client += raw + b"\r\n"
        elif tag == "C+":
            client += raw
        elif tag == "S:":
            server += raw + b"\r\n"
        elif tag in ("A:", "A!"):
            answers.append(parse_answer(raw.decode("utf-8"), close=tag == "A!"))
        elif tag == "M:":
            first_line, body = raw.decode("utf-8"), bytearray()
        elif tag == "L:":
            for item in text.split():
                key, value = item.split("=")
                limits[key] = {"true": True, "false": False}.get(value, None)
                if limits[key] is None:
                    limits[key] = int(value)
        else:
            raise AssertionError(f"{path.name}: bad line {line!r}")
    flush()
    return limits, bytes(client), bytes(server), answers


def parse_answer(text: str, close: bool) -> Ok | Err:
    status, _, rest = text.partition(" ")
    if status == "+OK":
        return Ok(rest)
    assert status == "-ERR", text
    code = None
    if rest.startswith("["):
        code, _, rest = rest[1:].partition("] ")
        code = code.rstrip("]")
    return Err(rest, code, close)


TRANSCRIPT_PATHS = sorted(TRANSCRIPTS.glob("*.txt"))
assert TRANSCRIPT_PATHS, "no seed transcripts found"


@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_replays_byte_exact(path):
    limits, client, server, answers = load_transcript(path)
    auto = AutoApp(answers, **limits)
    greeting = Pop3Server(**{"stls_available": False, **limits}).send(Greeting())
    events = events_whole(lambda: auto, client)
    assert greeting + output_of(events) == server
    assert auto.answers == [], "answers left over"
    assert not any(item[0] == "error" for item in events)
    for item in events:
        check_response(item[1])


@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_split_invariant(path):
    limits, client, _, answers = load_transcript(path)
    assert_split_invariant(lambda: AutoApp(answers, **limits), client)


def test_docstring_state_table_is_the_transitions_table():
    assert textwrap.indent(pop3.render_state_table(), "    ") in pop3.__doc__


# ---------------------------------------------------------------------------
# greeting, CAPA


def test_greeting_and_turning_the_client_away():
    assert App().banner == b"+OK POP3 server ready\r\n"
    machine = Pop3Server(stls_available=False)
    assert machine.send(Greeting("intermail POP3 <1896.697170952@pop1>")) == (
        b"+OK intermail POP3 <1896.697170952@pop1>\r\n"
    )
    machine = Pop3Server(stls_available=False)
    with pytest.raises(LocalProtocolError, match="Err\\(close=True\\)"):
        machine.send(Err("busy", "SYS/TEMP"))
    assert machine.send(Err("too many connections", "SYS/TEMP", close=True)) == (
        b"-ERR [SYS/TEMP] too many connections\r\n"
    )
    assert machine.next_event() == ConnectionClosed("closed by the app")


def test_before_the_greeting():
    machine = Pop3Server(stls_available=False)
    with pytest.raises(LocalProtocolError, match="send the Greeting"):
        machine.next_event()
    with pytest.raises(LocalProtocolError):
        machine.send(Ok())
    machine.send(Greeting())
    with pytest.raises(LocalProtocolError, match="once"):
        machine.send(Greeting())
    with pytest.raises(LocalProtocolError, match="control character"):
        Greeting("evil\r\n+OK fake")


CAPA_ALL = ["TOP", "UIDL", "USER", "SASL PLAIN", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "UTF8 USER",
            "STLS", "IMPLEMENTATION intermail"]


def capa_lines(out: bytes) -> list[str]:
    lines = out.decode().split("\r\n")
    assert lines[0] == "+OK Capability list follows" and lines[-2:] == [".", ""]
    return lines[1:-2]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(stls_available=True), CAPA_ALL),
        (dict(stls_available=False), [c for c in CAPA_ALL if c != "STLS"]),
        (dict(stls_available=False, user_command=False), ["TOP", "UIDL", "SASL PLAIN", "RESP-CODES",
                                                          "AUTH-RESP-CODE", "PIPELINING", "UTF8",
                                                          "IMPLEMENTATION intermail"]),
        (dict(stls_available=True, auth_mechanisms=(), implementation=None),
         ["TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "UTF8 USER", "STLS"]),
        (dict(stls_available=False, auth_mechanisms=["plain", "PLAIN"], implementation="intermail 0.1"),
         [c for c in CAPA_ALL if c != "STLS"][:-1] + ["IMPLEMENTATION intermail 0.1"]),
    ],
)
def test_capa_follows_the_configuration(kwargs, expected):
    app = App(**kwargs)
    assert capa_lines(app.cmd("CAPA")) == expected
    assert app.machine.capabilities == tuple(expected)


def test_capa_is_the_same_in_both_states():
    """RFC 2449 §5: what AUTHORIZATION offers is announced in both states."""
    app = App(stls_available=True)
    before = app.cmd("CAPA")
    app.login()
    assert app.cmd("capa") == before
    assert all(isinstance(e, (AutoReply, UserPass)) for e in app.events)  # CAPA never reaches the app


# ---------------------------------------------------------------------------
# full sessions


def test_user_pass_session_with_every_transaction_command():
    app = session()
    assert app.cmd("STAT") == b"+OK 2 %d\r\n" % (len(ONE) + len(TWO))
    assert app.cmd("LIST") == b"+OK 2 messages\r\n1 %d\r\n2 %d\r\n.\r\n" % (len(ONE), len(TWO))
    assert app.cmd("LIST 2") == b"+OK 2 %d\r\n" % len(TWO)
    assert app.cmd("UIDL") == b"+OK 2 messages\r\n1 uid-one\r\n2 uid-two\r\n.\r\n"
    assert app.cmd("UIDL 1") == b"+OK 1 uid-one\r\n"
    wire_one = ONE.replace(b"\r\n.", b"\r\n..")
    assert app.cmd("RETR 1") == b"+OK %d octets\r\n" % len(ONE) + wire_one + b".\r\n"
    assert app.cmd("TOP 1 0") == b"+OK 38 octets\r\nFrom: a@example.test\r\nSubject: one\r\n\r\n.\r\n"
    assert app.cmd("TOP 1 2") == (b"+OK %d octets\r\n" % len(top_of(ONE, 2))
                                  + b"From: a@example.test\r\nSubject: one\r\n\r\nfirst line\r\n..dotted line\r\n.\r\n")
    assert app.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
    app.err("RETR 1", "no such message")
    app.err("DELE 1", "no such message")
    assert app.cmd("STAT") == b"+OK 1 %d\r\n" % len(TWO)
    assert app.cmd("RSET") == b"+OK maildrop has 2 messages\r\n"
    assert app.cmd("NOOP") == b"+OK\r\n"
    assert app.cmd("DELE 2") == b"+OK message 2 deleted\r\n"
    assert app.machine.state == "transaction"
    assert app.cmd("QUIT") == b"+OK bye (1 messages left)\r\n"
    assert app.removed == ["uid-two"]
    assert app.closed and app.events[-1] == ConnectionClosed("quit")
    assert app.machine.state == "closed"
    kinds = [type(e).__name__ for e in app.events if not isinstance(e, AutoReply)]
    assert kinds == ["UserPass", "Stat", "List", "List", "Uidl", "Uidl", "Retr", "Top", "Top", "Dele", "Retr",
                     "Dele", "Stat", "Rset", "Noop", "Dele", "Quit", "ConnectionClosed"]
    assert app.of(Top) == [Top(1, 0), Top(1, 2)]


def test_quit_enters_update_and_the_answer_closes_even_when_negative():
    app = session()
    app.machine.receive_data(b"DELE 1\r\nQUIT\r\n")
    assert app.machine.next_event() == Dele(1)
    app.machine.send(Ok())
    assert app.machine.next_event() == Quit()
    assert app.machine.state == "update"
    assert app.machine.send(Err("some deleted messages not removed")) == b"-ERR some deleted messages not removed\r\n"
    assert app.machine.next_event() == ConnectionClosed("quit")


def test_quit_before_login_closes_without_update():
    app = App()
    app.cmd("USER alice")
    assert app.cmd("QUIT") == b"+OK Bye\r\n"
    assert app.closed and not app.of(Quit) and app.events[-1] == ConnectionClosed("quit")


def test_peer_close_in_transaction_never_reaches_update():
    app = session()
    app.cmd("DELE 1")
    assert app.feed(b"STAT\r\nQUI") == b"+OK 1 %d\r\n" % len(TWO)
    assert app.feed(b"") == b""
    assert app.events[-1] == ConnectionClosed("peer closed")
    assert not app.of(Quit) and app.removed is None  # RFC 1939 §6: nothing removed
    assert app.machine.next_event() == ConnectionClosed("peer closed")
    with pytest.raises(LocalProtocolError, match="after the end of the stream"):
        app.machine.receive_data(b"more")


def test_receive_after_our_close_is_ignored():
    app = App()
    app.cmd("QUIT")
    app.machine.receive_data(b"NOOP\r\n")
    assert app.machine.pending_bytes() == 0
    assert app.machine.next_event() == ConnectionClosed("quit")


def test_app_err_with_close_ends_the_session():
    app = App()
    app.decide = lambda event: Err("mailbox is locked by another session", "IN-USE", close=True)
    app.cmd("USER alice")
    assert app.cmd("PASS secret") == b"-ERR [IN-USE] mailbox is locked by another session\r\n"
    assert app.events[-1] == ConnectionClosed("closed by the app")
    assert app.feed(b"NOOP\r\n") == b""


def test_verbs_are_case_insensitive():
    app = App()
    assert app.cmd("user alice") == b"+OK\r\n"
    assert app.cmd("pAsS secret").startswith(b"+OK")
    assert app.cmd("Retr 2").startswith(b"+OK")
    assert app.cmd("top 2 0").startswith(b"+OK")


# ---------------------------------------------------------------------------
# USER / PASS


def test_wrong_password_then_retry():
    app = App()
    app.cmd("USER alice")
    assert app.cmd("PASS wrong") == b"-ERR [AUTH] invalid user name or password\r\n"
    assert app.machine.state == "authorization"
    app.err("PASS secret", "Send USER first")  # the failed PASS used up the USER
    app.login()


def test_pass_must_follow_user_immediately():
    app = App()
    app.cmd("USER alice")
    capa = app.cmd("CAPA")
    assert capa.startswith(b"+OK")
    app.err("PASS secret", "Send USER first")
    app.cmd("USER bob")
    app.cmd("USER alice")  # a second USER replaces the first
    assert app.cmd("PASS secret") == b"+OK maildrop ready\r\n"


def test_pass_keeps_spaces_and_utf8():
    app = App()
    app.decide = lambda event: Ok()
    app.cmd("USER j\xf6rg@example.test")
    app.cmd("PASS  two  spaces ")
    app.cmd("RSET")
    assert app.of(UserPass) == [UserPass("j\xf6rg@example.test", " two  spaces ")]


def test_passwords_stay_out_of_reprs():
    assert "hunter2" not in repr(UserPass("alice", "hunter2"))
    assert "hunter2" not in repr(AuthPlain("", "alice", "hunter2"))
    assert UserPass("alice", "a") != UserPass("alice", "b")


def test_user_command_disabled():
    app = App(user_command=False)
    app.err("USER alice", "USER/PASS not supported, use AUTH")
    app.err("PASS secret", "USER/PASS not supported, use AUTH")
    assert app.cmd(f"AUTH PLAIN {plain('', 'alice', 'secret')}") == b"+OK maildrop ready\r\n"


@pytest.mark.parametrize("line", ["USER", "USER ", "PASS", b"USER \xff", "USER a\tb"])
def test_user_pass_need_an_argument(line):
    app = App()
    app.cmd("USER alice")
    app.err(line)


# ---------------------------------------------------------------------------
# AUTH (RFC 5034, PLAIN RFC 4616)


def test_auth_plain_with_initial_response():
    app = App()
    assert app.cmd(f"AUTH PLAIN {plain('', 'alice', 'secret')}") == b"+OK maildrop ready\r\n"
    assert app.of(AuthPlain) == [AuthPlain("", "alice", "secret")]
    assert app.machine.state == "transaction"


def test_auth_plain_with_continuation_and_authzid():
    app = App()
    assert app.cmd("AUTH PLAIN") == b"+ \r\n"
    assert app.of(AutoReply) == [AutoReply(Challenge())]
    assert app.cmd(plain("alice", "alice", "secret")) == b"+OK maildrop ready\r\n"
    assert app.of(AuthPlain) == [AuthPlain("alice", "alice", "secret")]


def test_auth_failure_then_success():
    app = App()
    assert app.cmd(f"AUTH PLAIN {plain('', 'alice', 'nope')}") == b"-ERR [AUTH] authentication failed\r\n"
    assert app.machine.state == "authorization"
    app.cmd("AUTH plain")
    assert app.cmd(plain("", "alice", "secret")).startswith(b"+OK")


def test_auth_cancel_and_bad_responses():
    app = App()
    app.cmd("AUTH PLAIN")
    app.err("*", "Authentication cancelled")
    app.cmd("AUTH PLAIN")
    app.err("STAT 1", "Invalid base64 data")  # the response line is not a command
    app.cmd("AUTH PLAIN")
    app.err("", "Malformed PLAIN response")  # an empty response
    assert not app.of(AuthPlain)
    assert app.machine.state == "authorization"
    app.login()


@pytest.mark.parametrize(
    "response, text",
    [
        ("=", "Malformed PLAIN response"),
        (base64.b64encode(b"\0alice").decode(), "Malformed PLAIN response"),
        (base64.b64encode(b"\0\0secret").decode(), "Malformed PLAIN response"),
        (base64.b64encode(b"\0alice\0").decode(), "Malformed PLAIN response"),
        (base64.b64encode(b"a\0alice\0secret\0x").decode(), "Malformed PLAIN response"),
        (base64.b64encode(b"\0alice\0\xff").decode(), "Malformed PLAIN response"),
        ("AGFsaWNlAHNlY3JldA", "Invalid base64 data"),
        ("AGFsaWNlAHNlY3JldA===", "Invalid base64 data"),
        ("AGFsaWNl AHNlY3JldA==", "Invalid arguments"),
        ("AGFsaWNlAHNlY3JldA==AA==", "Invalid base64 data"),
        ("*", "Invalid base64 data"),
    ],
)
def test_bad_initial_responses(response, text):
    App().err(f"AUTH PLAIN {response}", text)


@pytest.mark.parametrize(
    "line, text",
    [
        ("AUTH LOGIN", "Unsupported authentication mechanism"),
        ("AUTH X-OAUTH2 abc", "Unsupported authentication mechanism"),
        ("AUTH PL@IN", "Invalid arguments"),
        ("AUTH  PLAIN", "Invalid arguments"),
        ("AUTH PLAIN ", "Invalid arguments"),
        ("AUTH " + "A" * 21, "Invalid arguments"),
    ],
)
def test_bad_auth_commands(line, text):
    App().err(line, text)


def test_auth_without_mechanisms():
    app = App(auth_mechanisms=())
    assert app.cmd("AUTH") == b"+OK Supported mechanisms\r\n.\r\n"
    app.err(f"AUTH PLAIN {plain('', 'alice', 'secret')}", "Unsupported authentication mechanism")


def test_auth_list_of_mechanisms():
    assert App().cmd("AUTH") == b"+OK Supported mechanisms\r\nPLAIN\r\n.\r\n"


def test_utf8_command_and_utf8_credentials():
    app = App()
    app.decide = lambda event: Ok()
    assert not app.machine.utf8
    assert app.cmd("UTF8") == b"+OK UTF8 enabled\r\n"
    assert app.machine.utf8
    response = plain("", "j\xf6rg", "p\xe4ss")
    app.cmd(f"AUTH PLAIN {response}")
    assert app.of(AuthPlain) == [AuthPlain("", "j\xf6rg", "p\xe4ss")]
    app.err("UTF8", "Already authenticated")


# ---------------------------------------------------------------------------
# sequence and syntax errors


@pytest.mark.parametrize("line", ["STAT", "LIST", "LIST 1", "UIDL", "UIDL 1", "RETR 1", "TOP 1 1", "DELE 1",
                                  "NOOP", "RSET"])
def test_transaction_commands_before_login(line):
    app = App()
    app.err(line, "Not authenticated yet")
    assert not [e for e in app.events if not isinstance(e, AutoReply)]


@pytest.mark.parametrize("line", ["USER alice", "PASS secret", "AUTH PLAIN", "AUTH", "STLS", "UTF8"])
def test_authorization_commands_after_login(line):
    app = session(stls_available=True)
    app.err(line, "Already authenticated")


@pytest.mark.parametrize(
    "line, event",
    [
        ("RETR 1", Retr(1)),
        ("RETR 0001", Retr(1)),
        ("RETR 2147483647", Retr(2147483647)),
        ("TOP 1 0", Top(1, 0)),
        ("TOP 2 2147483647", Top(2, 2147483647)),
        ("LIST", List()),
        ("LIST 3", List(3)),
        ("UIDL", Uidl()),
        ("DELE 7", Dele(7)),
    ],
)
def test_message_numbers_pass_through(line, event):
    app = session()
    app.cmd(line)
    assert app.events[-1] == event


@pytest.mark.parametrize(
    "line, text",
    [
        ("RETR 0", "Invalid message number"),
        ("RETR +1", "Invalid message number"),
        ("RETR -1", "Invalid message number"),
        ("RETR 1.0", "Invalid message number"),
        ("RETR 0x1", "Invalid message number"),
        ("RETR \u0661", "Invalid message number"),
        ("RETR 1_000", "Invalid message number"),
        ("RETR  1", "Invalid message number"),
        ("RETR 1 ", "Invalid message number"),
        ("RETR 2147483648", "Invalid message number"),
        ("RETR " + "0" * 40 + "1", "Invalid message number"),
        ("RETR", "Invalid arguments"),
        ("DELE", "Invalid arguments"),
        ("LIST ", "Invalid message number"),
        ("UIDL x", "Invalid message number"),
        ("TOP 1", "Invalid arguments"),
        ("TOP", "Invalid arguments"),
        ("TOP 0 1", "Invalid message number"),
        ("TOP 1 -1", "Invalid line count"),
        ("TOP 1 2147483648", "Invalid line count"),
        ("TOP 1 1 1", "Invalid line count"),
        ("STAT x", "Invalid arguments"),
        ("NOOP ", "Invalid arguments"),
        ("RSET now", "Invalid arguments"),
        ("QUIT now", "Invalid arguments"),
        ("CAPA ", "Invalid arguments"),
        ("", "Unknown command"),
        (" STAT", "Unknown command"),
        ("ST", "Unknown command"),
        ("STATS", "Unknown command"),
        ("APOP mrose c4c9334bac560ecc979e58001b3e22fb", "Unknown command"),
        ("LANG", "Unknown command"),
        ("XTND XMIT", "Unknown command"),
        (b"\xc3\xa9t\xc3\xa9", "Unknown command"),
        (b"STAT\rx", "Unknown command"),
        (b"NOOP \x00", "Invalid characters in command"),
        (b"RETR 1\r", "Invalid characters in command"),
        (b"RETR 1\n", "Invalid characters in command"),
    ],
)
def test_syntax_errors_are_err_and_the_session_goes_on(line, text):
    app = session()
    app.err(line, text)
    assert [e for e in app.events if not isinstance(e, AutoReply)] == [UserPass("alice", "secret")]
    assert app.cmd("NOOP") == b"+OK\r\n"


def test_bare_lf_does_not_end_a_command():
    app = session()
    assert app.feed(b"NOOP\nSTAT\n") == b""  # no CRLF yet: not a line
    assert app.feed(b"\r\n") == b"-ERR Unknown command\r\n"


# ---------------------------------------------------------------------------
# limits, each at its edge


@pytest.mark.parametrize("limit", [255, 512, 1000])
def test_line_of_exactly_max_line_is_accepted(limit):
    line = b"PASS " + b"p" * (limit - 2 - 5)
    assert len(line + b"\r\n") == limit
    app = App(max_line=limit)
    app.cmd("USER alice")
    app.decide = lambda event: Ok()
    assert app.cmd(line) == b"+OK\r\n"
    assert app.of(UserPass)[0].password == "p" * (limit - 7)


@pytest.mark.parametrize("extra", [1, 2, 100, 5000])
def test_line_over_max_line_is_err_and_the_rest_is_dropped(extra):
    app = session(max_line=255)
    line = b"NOOP " + b"x" * (255 - 2 - 5 + extra - 4) + b"QUIT"
    assert len(line + b"\r\n") == 255 + extra
    app.err(line, "Line too long")  # exactly one response: the tail "QUIT" was not executed
    assert app.cmd("NOOP") == b"+OK\r\n"
    assert not app.closed


def test_line_too_long_answers_before_the_line_ends():
    app = session(max_line=255)
    assert app.feed(b"z" * 254) == b""
    assert app.feed(b"z") == b"-ERR Line too long\r\n"
    assert app.feed(b"z" * 10_000) == b""
    assert app.machine.pending_bytes() <= 1
    assert app.feed(b"\r") == b""
    assert app.feed(b"\nNOOP\r\n") == b"+OK\r\n"


def test_crlf_straddling_the_limit_counts_as_too_long():
    app = session(max_line=255)
    out = app.feed(b"NOOP " + b"x" * 249 + b"\r\nNOOP\r\n")  # 256 octets with CRLF, then a NOOP
    assert out == b"-ERR Line too long\r\n+OK\r\n"


def test_too_long_auth_response_ends_the_exchange():
    app = App(max_line=255)
    app.cmd("AUTH PLAIN")
    app.err(b"A" * 300, "Line too long")
    app.err(plain("", "alice", "secret"), "Unknown command")  # a command again, not a response
    assert not app.of(AuthPlain)


def test_too_long_line_forgets_the_user():
    app = App(max_line=255)
    app.cmd("USER alice")
    app.err(b"x" * 300, "Line too long")
    app.err("PASS secret", "Send USER first")


@pytest.mark.parametrize("size, fits", [(381, True), (382, False)])
def test_longest_auth_continuation_at_the_default_limit(size, fits):
    """512 octets per line: a PLAIN message of 381 octets (508 in base64) fits on a continuation line."""
    encoded = plain("", "alice", "p" * (size - len("\0alice\0")))
    app = App()
    app.decide = lambda event: Ok()
    app.cmd("AUTH PLAIN")
    if fits:
        assert len(encoded) + 2 == 510
        assert app.cmd(encoded) == b"+OK\r\n"
    else:
        app.err(encoded, "Line too long")


@pytest.mark.parametrize("size, fits", [(372, True), (375, False)])
def test_longest_initial_response_at_the_default_limit(size, fits):
    """In ``AUTH PLAIN <initial-response>`` the command takes 11 octets: 372 octets of PLAIN message fit."""
    line = "AUTH PLAIN " + plain("", "alice", "p" * (size - len("\0alice\0")))
    app = App()
    app.decide = lambda event: Ok()
    if fits:
        assert len(line) + 2 == 509
        assert app.cmd(line) == b"+OK\r\n"
    else:
        assert len(line) + 2 == 513
        app.err(line, "Line too long")


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_bad_commands_up_to_max_then_close(limit):
    app = App(max_bad_commands=limit)
    for _ in range(limit):
        app.err("FOO", "Unknown command")
    assert not app.closed
    app.err("FOO", "Too many bad commands, closing connection")
    assert app.closed and app.events[-1] == ConnectionClosed("too many errors")


def test_a_good_command_resets_the_bad_count_and_app_errors_do_not_count():
    app = App(max_bad_commands=2)
    for _ in range(3):
        app.err("FOO")
        app.err("STAT")
        app.cmd("USER alice")
        app.err("PASS wrong")  # the app's -ERR: not counted
    app.err("BAR", "Unknown command")
    app.err("BAZ", "Unknown command")
    app.err("QUX", "Too many bad commands, closing connection")
    assert app.closed


def test_pipelined_bad_commands_stop_at_the_close():
    app = App(max_bad_commands=1)
    out = app.feed(b"FOO\r\nFOO\r\nUSER alice\r\n")
    assert out == b"-ERR Unknown command\r\n-ERR Too many bad commands, closing connection\r\n"
    assert app.closed


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_line=254), dict(max_line=512.0), dict(max_line=True), dict(max_bad_commands=-1),
     dict(auth_mechanisms=("LOGIN",)), dict(auth_mechanisms="PLAIN"), dict(auth_mechanisms=(b"PLAIN",)),
     dict(auth_mechanisms=(), user_command=False), dict(implementation="x\r\nSTLS"), dict(implementation=""),
     dict(implementation="x" * 201), dict(user_command=1)],
)
def test_constructor_limits(kwargs):
    with pytest.raises(ValueError):
        Pop3Server(**{"stls_available": False, **kwargs})


def test_stls_available_is_a_required_bool():
    with pytest.raises(ValueError):
        Pop3Server(stls_available="yes")
    with pytest.raises(TypeError):
        Pop3Server()  # type: ignore[call-arg]


def test_constructor_edges_are_accepted():
    machine = Pop3Server(max_line=255, max_bad_commands=0, stls_available=False, auth_mechanisms=["plain"],
                         user_command=False, implementation="x" * 200)
    assert machine.auth_mechanisms == ("PLAIN",)


# ---------------------------------------------------------------------------
# STLS (RFC 2595)


def test_stls_without_pipelined_bytes():
    app = App(stls_available=True)
    app.machine.receive_data(b"UTF8\r\nUSER alice\r\nSTLS\r\n")
    for _ in range(2):
        app.machine.send(app.machine.next_event())
    event = app.machine.next_event()
    assert event == StartTls()
    assert app.machine.owed == "the pending StartTls (or an Err)"
    with pytest.raises(LocalProtocolError):
        app.machine.next_event()
    assert app.machine.send(event) == b"+OK Begin TLS negotiation\r\n"
    assert app.machine.tls and not app.machine.utf8  # RFC 2595 §4: forget what came in the clear
    assert "STLS" not in capa_lines(app.cmd("CAPA"))
    app.err("STLS", "Already using TLS")
    app.err("PASS secret", "Send USER first")
    app.login()


def test_stls_with_pipelined_bytes_is_refused_and_they_stay_plaintext():
    app = App(stls_available=True)
    out = app.feed(b"STLS\r\nUSER alice\r\nPASS secret\r\n")
    assert out == b"-ERR Nothing may follow STLS before the TLS handshake\r\n+OK\r\n+OK maildrop ready\r\n"
    assert not app.machine.tls and not app.of(StartTls)
    assert app.machine.state == "transaction"


@pytest.mark.parametrize("tail", [b"N", b"\r", b"\r\n", b"NOOP\r\n"])
def test_stls_refused_whenever_anything_follows_in_the_buffer(tail):
    app = App(stls_available=True)
    out = app.feed(b"STLS\r\n" + tail)
    assert out.startswith(b"-ERR Nothing may follow STLS")
    assert not app.of(StartTls)


def test_stls_bytes_arriving_after_the_event_are_the_pumps_to_catch():
    machine = Pop3Server(stls_available=True)
    machine.send(Greeting())
    machine.receive_data(b"STLS\r\n")
    event = machine.next_event()
    assert event == StartTls() and machine.pending_bytes() == 0
    machine.receive_data(b"USER evil\r\n")  # what Pump.start_tls refuses to go on with
    assert machine.pending_bytes() == len(b"USER evil\r\n")


def test_stls_not_available_or_refused_by_the_app():
    App(stls_available=False).err("STLS", "STLS not available")
    app = App(stls_available=True)
    app.machine.receive_data(b"STLS\r\n")
    assert app.machine.next_event() == StartTls()
    with pytest.raises(LocalProtocolError):
        app.machine.send(Ok())
    with pytest.raises(LocalProtocolError, match="not the one pending"):
        app.machine.send(StartTls("other text"))
    assert app.machine.send(Err("TLS unavailable", "SYS/TEMP")) == b"-ERR [SYS/TEMP] TLS unavailable\r\n"
    assert not app.machine.tls
    assert "STLS" in capa_lines(app.cmd("CAPA"))


def test_stls_session_over_the_pump(loop_name):
    """STLS through Pump.start_tls, then a login and a RETR inside TLS."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def serve(app: App, pump: Pump) -> list:
        await pump.write(app.machine.send(Greeting()))
        seen = []
        while True:
            event = await pump.next_event(timeout=5)
            seen.append(event)
            if isinstance(event, StartTls):
                await pump.start_tls(server_ctx, reply=event, handshake_timeout=5)
            elif isinstance(event, AutoReply):
                await pump.send(event)
            elif isinstance(event, ConnectionClosed):
                return seen
            else:
                await pump.write(app.answer(event))

    async def scenario():
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        server_reader, server_writer = await accepted
        app = App(greet=False, stls_available=True)
        task = asyncio.create_task(serve(app, Pump(server_reader, server_writer, app.machine)))
        assert await reader.readline() == b"+OK POP3 server ready\r\n"
        writer.write(b"STLS\r\n")
        assert await reader.readline() == b"+OK Begin TLS negotiation\r\n"
        await writer.start_tls(client_ctx, server_hostname="localhost")
        writer.write(b"CAPA\r\nUSER alice\r\nPASS secret\r\nRETR 1\r\nQUIT\r\n")
        capa = [await reader.readline() for _ in range(11)]
        assert b"STLS\r\n" not in capa and capa[-1] == b".\r\n"
        assert await reader.readline() == b"+OK\r\n"
        assert await reader.readline() == b"+OK maildrop ready\r\n"
        assert await reader.readline() == b"+OK %d octets\r\n" % len(ONE)
        body = await reader.readuntil(b"\r\n.\r\n")
        assert body == ONE.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        assert (await reader.readline()).startswith(b"+OK bye")
        seen = await asyncio.wait_for(task, 5)
        assert seen[0] == StartTls() and seen[-1] == ConnectionClosed("quit")
        writer.close()
        server_writer.close()
        server.close()
        await server.wait_closed()

    run_on(loop_name, scenario())


# ---------------------------------------------------------------------------
# the app's side: LocalProtocolError, machine unchanged


def owing(line: bytes, **limits) -> Pop3Server:
    """A machine that has just asked the app about ``line`` (logged in first)."""
    machine = Pop3Server(**{"stls_available": False, **limits})
    machine.send(Greeting())
    machine.receive_data(b"USER alice\r\nPASS secret\r\n" + line + b"\r\n")
    machine.send(machine.next_event())
    assert isinstance(machine.next_event(), UserPass)
    machine.send(Ok())
    assert not isinstance(machine.next_event(), AutoReply)
    return machine


@pytest.mark.parametrize(
    "line, wrong, right",
    [
        (b"RETR 1", Ok("1 octets"), MultiLine("1 octets", b"x")),
        (b"TOP 1 1", Ok(), MultiLine("", [])),
        (b"LIST", Ok(), MultiLine("0 messages", [])),
        (b"UIDL", Ok(), MultiLine("", ["1 a"])),
        (b"LIST 1", MultiLine("1 20", []), Ok("1 20")),
        (b"UIDL 1", MultiLineStart("1 a"), Ok("1 a")),
        (b"STAT", MultiLine("0 0", []), Ok("0 0")),
        (b"DELE 1", MultiLineStart(), Ok()),
        (b"QUIT", MultiLine(), Ok()),
    ],
)
def test_answers_must_have_the_right_form(line, wrong, right):
    machine = owing(line)
    for bad in (wrong, Greeting(), AutoReply(Ok()), StartTls(), MultiLineData(b"x"), MultiLineEnd(), object()):
        with pytest.raises(LocalProtocolError):
            machine.send(bad)
    assert machine.owed.startswith("an answer to")
    machine.send(right)
    assert machine.owed is None


def test_every_decision_may_be_refused():
    for line in (b"RETR 1", b"LIST", b"STAT", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL 2"):
        machine = owing(line)
        assert machine.send(Err("no such message")) == b"-ERR no such message\r\n"


def test_one_answer_owed_at_a_time():
    machine = owing(b"STAT\r\nNOOP")
    assert machine.pending_bytes() == len(b"NOOP\r\n")  # not parsed while the app decides
    with pytest.raises(LocalProtocolError, match="before asking for the next event"):
        machine.next_event()
    machine.send(Ok("0 0"))
    with pytest.raises(LocalProtocolError, match="no answer is owed"):
        machine.send(Ok())
    assert machine.next_event() == Noop()


def test_pipelined_commands_wait_behind_a_failed_login():
    machine = Pop3Server(stls_available=False)
    machine.send(Greeting())
    machine.receive_data(b"USER alice\r\nPASS wrong\r\nSTAT\r\n")
    machine.send(machine.next_event())
    assert isinstance(machine.next_event(), UserPass)
    machine.send(Err("invalid", "AUTH"))
    event = machine.next_event()
    assert event == AutoReply(Err("Not authenticated yet"))


def test_pipelined_session_gives_the_same_output_as_one_by_one():
    script = [b"CAPA\r\n", b"USER alice\r\n", b"PASS secret\r\n", b"STAT\r\n", b"LIST\r\n", b"RETR 1\r\n",
              b"DELE 1\r\n", b"FOO\r\n", b"RSET\r\n", b"TOP 2 1\r\n", b"UIDL 2\r\n", b"QUIT\r\n"]
    one_by_one = App()
    outputs = [one_by_one.feed(line) for line in script]
    assert all(outputs)  # every command was answered before the next was sent
    pipelined = App()
    assert pipelined.feed(b"".join(script)) == b"".join(outputs)
    assert pipelined.events == one_by_one.events


def test_auto_reply_must_be_the_pending_one():
    machine = Pop3Server(stls_available=False)
    machine.send(Greeting())
    machine.receive_data(b"USER alice\r\n")
    event = machine.next_event()
    with pytest.raises(LocalProtocolError, match="not the one pending"):
        machine.send(AutoReply(Ok("other")))
    with pytest.raises(LocalProtocolError):
        machine.next_event()
    assert machine.send(event) == b"+OK\r\n"
    with pytest.raises(LocalProtocolError, match="not the one pending"):
        machine.send(event)  # only once


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Ok("[IN-USE] x"), "reads as a response code"),
        (lambda: Err("[x"), "reads as a response code"),
        (lambda: Err("x", "SYS]TEMP"), "response code"),
        (lambda: Err("x", "SYS//TEMP"), "response code"),
        (lambda: Err("x", ""), "response code"),
        (lambda: Err("x", "IN USE"), "response code"),
        (lambda: Err("x", close="yes"), "bool"),
        (lambda: Ok("a\rb"), "control character"),
        (lambda: Ok("a\x00"), "control character"),
        (lambda: Ok(b"bytes"), "must be a str"),
        (lambda: Ok("x" * 507), "513 octets"),
        (lambda: Err("x" * 506), "513 octets"),
        (lambda: MultiLine("ok", ["a\r\nb"]), "CR or LF"),
        (lambda: MultiLine("ok", [b"a\n"]), "CR or LF"),
        (lambda: MultiLine("ok", [1]), "str or bytes"),
        (lambda: MultiLine("ok", "a string"), "bytes or a sequence"),
        (lambda: MultiLineStart("\n"), "control character"),
    ],
)
def test_responses_that_cannot_be_sent_are_local_errors(build, match):
    with pytest.raises(LocalProtocolError, match=match):
        build()


def test_response_lines_of_exactly_512_octets():
    assert len(Ok("x" * 506).encode()) == 512
    assert len(Err("x" * 494, "SYS/TEMP").encode()) == 512
    assert len(Greeting("x" * 506).text) == 506
    with pytest.raises(LocalProtocolError, match="513 octets"):
        Err("x" * 495, "SYS/TEMP")
    assert Err("y", "SYS/TEMP").encode() == b"-ERR [SYS/TEMP] y\r\n"
    assert Err(code="LOGIN-DELAY").encode() == b"-ERR [LOGIN-DELAY]\r\n"
    assert Err("[x] text", "AUTH").encode() == b"-ERR [AUTH] [x] text\r\n"
    assert Ok("caf\xe9").encode() == "+OK caf\xe9\r\n".encode()


def test_error_table_uses_safe_text():
    error = MailError(ErrorKind.UNAVAILABLE, detail="dir1 and dir2 refused the connection")
    assert err_for_error(error) == Err("service temporarily unavailable", "SYS/TEMP")
    assert err_for_error(error, close=True).close
    assert set(pop3.ERROR_CODES) == set(ErrorKind)
    for kind in ErrorKind:
        err = err_for_error(MailError(kind))
        if MailError(kind).temporary:
            assert err.code == "SYS/TEMP"
        err.encode()


# ---------------------------------------------------------------------------
# multi-line answers: dot-stuffing and line ends


@pytest.mark.parametrize(
    "body, wire",
    [
        (b"", b".\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b"a\r\n.b\r\n.\r\nc", b"a\r\n..b\r\n..\r\nc\r\n.\r\n"),
        (b"a.\r\n b.\r\n", b"a.\r\n b.\r\n.\r\n"),
        (b"bare LF\n.dot\n", b"bare LF\r\n..dot\r\n.\r\n"),
        (b"bare CR\r.dot\r", b"bare CR\r\n..dot\r\n.\r\n"),
        (b"CR before CRLF\r\r\n", b"CR before CRLF\r\n\r\n.\r\n"),
        (b"\n\r", b"\r\n\r\n.\r\n"),
        (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
        (b"\xff\x00\x80 8bit\r\n", b"\xff\x00\x80 8bit\r\n.\r\n"),
    ],
)
def test_dot_stuffing_and_line_ends(body, wire):
    assert stuff_body(body) == wire
    machine = owing(b"RETR 1")
    assert machine.send(MultiLine("x", body)) == b"+OK x\r\n" + wire


def test_multi_line_from_lines():
    answer = MultiLine("3 lines", ["1 120", b".hidden", "caf\xe9", ""])
    assert answer.body == ("1 120", b".hidden", "caf\xe9", "")
    assert answer.encode() == "+OK 3 lines\r\n1 120\r\n..hidden\r\ncaf\xe9\r\n\r\n.\r\n".encode()
    assert MultiLine("none", []).encode() == b"+OK none\r\n.\r\n"
    assert MultiLine("b", bytearray(b"x")).body == b"x"


TRICKY = b".a\r\n..b\r\nc\r\n.\r\n\r.\n.x\r\r\n.\r"


def streamed(machine: Pop3Server, first: str, pieces: list[bytes]) -> bytes:
    out = machine.send(MultiLineStart(first))
    for piece in pieces:
        out += machine.send(MultiLineData(piece))
    return out + machine.send(MultiLineEnd())


def test_streamed_body_equals_one_piece_at_every_split():
    whole = owing(b"RETR 1").send(MultiLine("n octets", TRICKY))
    for a in range(len(TRICKY) + 1):
        for b in range(a, len(TRICKY) + 1):
            pieces = [TRICKY[:a], TRICKY[a:b], TRICKY[b:]]
            assert streamed(owing(b"RETR 1"), "n octets", pieces) == whole, (a, b)
    bytewise = [TRICKY[i : i + 1] for i in range(len(TRICKY))]
    assert streamed(owing(b"RETR 1"), "n octets", bytewise) == whole


def test_streaming_rules():
    machine = owing(b"RETR 1\r\nNOOP")
    assert machine.send(MultiLineStart("2 octets")) == b"+OK 2 octets\r\n"
    assert machine.owed.startswith("the rest of the streamed answer")
    with pytest.raises(LocalProtocolError, match="before asking"):
        machine.next_event()
    for bad in (Ok(), MultiLine(), MultiLineStart(), MultiLineData("str"), Err("x")):
        with pytest.raises(LocalProtocolError):
            machine.send(bad)
    assert machine.send(MultiLineData(b"")) == b""
    assert machine.send(MultiLineData(memoryview(b".x"))) == b"..x"
    assert machine.send(MultiLineEnd()) == b"\r\n.\r\n"
    with pytest.raises(LocalProtocolError, match="no streamed answer"):
        machine.send(MultiLineEnd())
    assert machine.next_event() == Noop()


def test_streamed_top_in_a_session():
    plain_app, stream_app = session(), session(stream=3)
    for line in ("RETR 1", "TOP 1 2", "RETR 2", "TOP 2 0"):
        assert plain_app.cmd(line) == stream_app.cmd(line)


# ---------------------------------------------------------------------------
# fuzzing: only RemoteProtocolError may escape, and the split never matters

TOKENS = [
    b"USER alice\r\n", b"PASS secret\r\n", b"PASS wrong\r\n", f"AUTH PLAIN {plain('', 'a', 'secret')}\r\n".encode(),
    b"AUTH PLAIN\r\n", plain("", "a", "secret").encode() + b"\r\n", b"*\r\n", b"AUTH\r\n", b"AUTH PLAIN =\r\n",
    b"CAPA\r\n", b"STAT\r\n", b"LIST\r\n", b"LIST 1\r\n", b"UIDL\r\n", b"UIDL 3\r\n", b"RETR 1\r\n", b"RETR 3\r\n",
    b"TOP 1 0\r\n", b"DELE 2\r\n", b"NOOP\r\n", b"RSET\r\n", b"QUIT\r\n", b"UTF8\r\n", b"STLS\r\n", b"RETR 0\r\n",
    b"APOP x y\r\n", "USER j\xf6rg\r\n".encode(), b"\r\n", b"\r", b"\n", b".", b" ", b"x" * 300, b"\x00\xff",
]
LIMITS = dict(max_line=255, max_bad_commands=4)
sessions = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=6), max_size=40).map(b"".join)


def check_events(events: list) -> None:
    for item in events:
        assert isinstance(item, tuple) and item[0] != "error", item
        check_response(item[1])


@FAST
@given(sessions, st.data())
def test_fuzz_token_sessions_split_anywhere(data, draw):
    if not data:
        return  # b"" is the end of the stream to the helper, not an empty read
    make = lambda: AutoApp(**LIMITS)  # noqa: E731
    whole = events_whole(make, data)
    check_events(whole)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=4)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
    assert events_for_chunks(make, pieces) == whole
    assert events_for_chunks(make, [data[i : i + 1] for i in range(len(data))]) == whole
    closed = events_for_chunks(make, [data, b""])
    assert closed[: len(whole)] == whole
    assert isinstance(closed[-1][0], ConnectionClosed)


@FAST
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data):
    for make in (lambda: AutoApp(**LIMITS), lambda: AutoApp()):
        whole = events_whole(make, data + b"\r\n")
        check_events(whole)
        assert events_for_chunks(make, [data[i : i + 7] for i in range(0, len(data), 7)] + [b"\r\n"]) == whole


@FAST
@given(st.lists(st.sampled_from(TOKENS) | st.binary(max_size=8), max_size=30).map(b"".join), st.data())
def test_fuzz_with_stls_offered_never_raises(data, draw):
    """STLS makes the split matter (by nature); still nothing but a response may come of any input."""
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=5)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
    check_events(events_for_chunks(lambda: AutoApp(stls_available=True, **LIMITS), [*pieces, b""]))


bodies = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"x", b" ", b"\xff"]), max_size=40).map(
    b"".join
) | st.binary(max_size=60)


@FAST
@given(bodies, st.data())
def test_fuzz_streamed_body_equals_one_piece(body, draw):
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    whole = MultiLine("n", body).encode()
    assert streamed(owing(b"RETR 1"), "n", pieces) == whole
    check_response(whole)
    # what a client reads back: the lines before the lone dot, unstuffed
    lines = whole.split(b"\r\n")[1:-2]
    unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    normalized = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    assert unstuffed == normalized


def test_remote_protocol_error_is_never_needed():
    """The contract allows RemoteProtocolError; the machine answers everything with a response instead."""
    events = events_whole(lambda: AutoApp(**LIMITS), b"".join(TOKENS) * 3)
    assert events and not any(item[0] == "error" for item in events)
