"""Pure machine tests of intermail.proto.smtp: the LMTP server machine, its grammar and replies.

Sessions run in memory through :class:`App`, a tiny app in front of the
machine (``app.cmd("MAIL FROM:<a@b>", "250")``); the split-feed contract is
checked with the shared helper on :class:`AutoApp`, which answers every
decision and reports each event together with the bytes its answer produced.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.errors import ErrorKind, LocalProtocolError, MailError, RemoteProtocolError
from intermail.net.pump import Pump
from intermail.proto import NEED_DATA
from intermail.proto.smtp import grammar, lmtp_server
from intermail.proto.smtp import replies as R
from intermail.proto.smtp.grammar import GrammarError, Problem
from intermail.proto.smtp.lmtp_server import (
    AutoReply,
    ConnectionClosed,
    Greeting,
    LmtpServer,
    MailFrom,
    MessageData,
    MessageEnd,
    RcptTo,
    RecipientReplies,
    Shutdown,
)
from intermail.proto.smtp.replies import Reply, parse_reply
from intermail.testing.feed import assert_split_invariant, events_for_chunks, events_whole
from intermail.testing.loops import run_on

HOST = "mss1.intermail.test"
TRANSCRIPTS = Path(__file__).parent / "transcripts" / "lmtp"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user")


# ---------------------------------------------------------------------------
# helpers


def split_replies(data: bytes) -> list[Reply]:
    """The replies in a stream of server output (each multi-line reply is one)."""
    result, pending = [], b""
    for line in data.split(b"\r\n")[:-1]:
        pending += line + b"\r\n"
        if len(line) == 3 or line[3:4] == b" ":
            result.append(parse_reply(pending))
            pending = b""
    assert pending == b"" and data.endswith(b"\r\n") or not data, f"unterminated output {data[-60:]!r}"
    return result


def label(reply: Reply) -> str:
    return f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)


class App:
    """A machine and a tiny in-memory app: greets, answers what it owes, records everything.

    MAIL is accepted; RCPT is refused for paths starting with "no"; after a
    message every recipient gets ``deliver(index)`` (250 by default).
    """

    def __init__(self, greet: bool = True, **limits):
        self.machine = LmtpServer(HOST, **limits)
        self.events: list = []
        self.messages: list[bytes] = []  # bodies of messages the app was asked to answer
        self._body = bytearray()
        self.banner = self.machine.send(Greeting()) if greet else b""
        self.deliver = lambda index: Reply(250, "2.0.0", f"delivered {index}")
        self.closed = False

    def decide(self, event) -> Reply:
        if isinstance(event, MailFrom):
            return SENDER_OK
        return NO_SUCH_USER if event.path.startswith("no") else RECIPIENT_OK

    def feed(self, data: bytes) -> bytes:
        """Bytes from the client in (b"" closes); the server's output back."""
        self.machine.receive_data(data)
        out = b""
        while (event := self.machine.next_event()) is not NEED_DATA:
            self.events.append(event)
            if isinstance(event, AutoReply):
                out += self.machine.send(event)
            elif isinstance(event, (MailFrom, RcptTo)):
                out += self.machine.send(self.decide(event))
            elif isinstance(event, MessageData):
                self._body += event.data
            elif isinstance(event, MessageEnd):
                if event.refused is None:
                    self.messages.append(bytes(self._body))
                    answers = tuple(self.deliver(i) for i in range(event.recipients))
                    out += self.machine.send(RecipientReplies(answers))
                self._body.clear()
            elif isinstance(event, ConnectionClosed):
                self.closed = True
                break
        return out

    def cmd(self, line: str | bytes, *expected: str) -> list[Reply]:
        """Send one command line; check the labels of the replies it produced."""
        raw = line.encode("utf-8") if isinstance(line, str) else line
        got = split_replies(self.feed(raw + b"\r\n"))
        labels = [label(reply) for reply in got]
        assert len(labels) == len(expected) and all(
            have.startswith(want) for have, want in zip(labels, expected, strict=False)
        ), f"{line!r}: expected {list(expected)}, got {[str(r) for r in got]}"
        return got

    def transaction(self, *recipients: str, sender: str = "sender@example.test") -> None:
        self.cmd(f"MAIL FROM:<{sender}>", "250")
        for rcpt in recipients:
            self.cmd(f"RCPT TO:<{rcpt}>", "550" if rcpt.startswith("no") else "250")

    def of(self, kind) -> list:
        return [event for event in self.events if isinstance(event, kind)]


def session(**limits) -> App:
    app = App(**limits)
    app.cmd("LHLO mta1.intermail.test", "250")
    return app


class AutoApp:
    """A Machine for the split-feed helper: answers every decision, returns (event, output bytes).

    After ConnectionClosed it reports NEED_DATA (the helper drains until then;
    the machine itself repeats ConnectionClosed forever).
    """

    def __init__(self, answers: list[Reply] | None = None, lenient: bool = False, **limits):
        self.machine = LmtpServer(HOST, **limits)
        self.answers = list(answers) if answers is not None else None
        self.lenient = lenient
        self.closed = False
        self.machine.send(Greeting())

    def _answer(self, default: Reply) -> Reply:
        if self.answers is None:
            return default
        if not self.answers:
            if self.lenient:
                return default
            raise AssertionError("the transcript has no answer left for this event")
        return self.answers.pop(0)

    def receive_data(self, data: bytes) -> None:
        self.machine.receive_data(data)

    def next_event(self):
        if self.closed:
            return NEED_DATA
        event = self.machine.next_event()
        if event is NEED_DATA:
            return event
        self.closed = isinstance(event, ConnectionClosed)
        if isinstance(event, AutoReply):
            out = self.machine.send(event)
        elif isinstance(event, MailFrom):
            out = self.machine.send(self._answer(SENDER_OK))
        elif isinstance(event, RcptTo):
            default = NO_SUCH_USER if event.path.startswith("no") else RECIPIENT_OK
            out = self.machine.send(self._answer(default))
        elif isinstance(event, MessageEnd) and event.refused is None:
            replies = tuple(self._answer(Reply(250, "2.0.0", "delivered")) for _ in range(event.recipients))
            out = self.machine.send(RecipientReplies(replies))
        else:
            out = b""
        return event, out

    def send(self, event) -> bytes:
        return self.machine.send(event)


def output_of(events: list) -> bytes:
    return b"".join(item[1] for item in events if isinstance(item, tuple) and len(item) == 2 and
                    isinstance(item[1], bytes))


# ---------------------------------------------------------------------------
# seed transcripts


def load_transcript(path: Path) -> tuple[dict, bytes, bytes, list[Reply]]:
    """(limits, client bytes, expected server bytes, the app's answers) of a transcript file."""
    limits: dict = {}
    client, server, answers = bytearray(), bytearray(), []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line or line.startswith("#"):
            continue
        tag, text = line[:2], line[3:]
        raw = codecs.escape_decode(text.encode("utf-8"))[0]
        if tag == "C:":
            client += raw + b"\r\n"
        elif tag == "C+":
            client += raw
        elif tag == "S:":
            server += raw + b"\r\n"
        elif tag == "A:":
            answers.append(parse_reply(raw + b"\r\n"))
        elif tag == "L:":
            limits.update((k, int(v)) for k, v in (item.split("=") for item in text.split()))
        else:
            raise AssertionError(f"{path.name}: bad line {line!r}")
    return limits, bytes(client), bytes(server), answers


TRANSCRIPT_PATHS = sorted(TRANSCRIPTS.glob("*.txt"))
assert TRANSCRIPT_PATHS, "no seed transcripts found"


@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_replays_byte_exact(path):
    limits, client, server, answers = load_transcript(path)
    auto = AutoApp(answers, **limits)
    greeting = LmtpServer(HOST, **limits).send(Greeting())
    events = events_whole(lambda: auto, client)
    assert greeting + output_of(events) == server
    assert auto.answers == [], "answers left over"
    assert not any(item[0] == "error" for item in events)


@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_split_invariant(path):
    limits, client, _, answers = load_transcript(path)
    assert_split_invariant(lambda: AutoApp(answers, **limits), client)


def test_docstring_state_table_is_the_transitions_table():
    assert textwrap.indent(lmtp_server.render_state_table(), "    ") in lmtp_server.__doc__


# ---------------------------------------------------------------------------
# greeting, LHLO, simple commands


def test_greeting_then_lhlo_capabilities():
    app = App()
    assert app.banner == b"220 mss1.intermail.test LMTP service ready\r\n"
    (reply,) = app.cmd("LHLO mta1.intermail.test", "250")
    assert reply.lines == (HOST, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8",
                           "SIZE 33554432", "CHUNKING")
    assert app.machine.client_name == "mta1.intermail.test"
    assert app.machine.state == "ready"


def test_extra_capabilities_and_greeting_text():
    machine = LmtpServer(HOST, extra_capabilities=["XDELIVERYKEY"], max_message_size=1000)
    assert machine.send(Greeting("ready when you are")) == b"220 mss1.intermail.test ready when you are\r\n"
    assert machine.lhlo_reply.lines[-2:] == ("CHUNKING", "XDELIVERYKEY")
    assert "SIZE 1000" in machine.lhlo_reply.lines


@pytest.mark.parametrize("verb", ["HELO", "EHLO", "helo"])
def test_helo_and_ehlo_are_not_lmtp(verb):
    app = App()
    (reply,) = app.cmd(f"{verb} mta1.intermail.test", "500 5.5.1")
    assert "LHLO" in reply.text
    assert app.machine.state == "init"


@pytest.mark.parametrize("line", ["LHLO", "LHLO ", "LHLO -bad-", "LHLO a b", "LHLO [1.2.3]", "LHLO m\xfcller.test"])
def test_lhlo_needs_a_domain_or_literal(line):
    App().cmd(line, "501 5.5.4")


@pytest.mark.parametrize("name", ["localhost", "mta-1.example.test", "[127.0.0.1]", "[IPv6:2001:db8::1]", "9.example"])
def test_lhlo_accepts_domains_and_literals(name):
    App().cmd(f"LHLO {name}", "250")


def test_noop_vrfy_help_rset_work_in_every_state():
    app = App()
    for _ in range(2):
        app.cmd("NOOP", "250 2.0.0")
        app.cmd("NOOP anything at all", "250 2.0.0")
        app.cmd("VRFY alice", "252")
        app.cmd("VRFY", "501 5.5.4")
        app.cmd("HELP", "214")
        app.cmd("HELP MAIL", "214")
        app.cmd("RSET", "250 2.0.0")
        app.cmd("LHLO mta", "250")
        app.transaction("alice@intermail.test")
    assert app.machine.state == "rcpt"
    app.cmd("RSET", "250")
    assert app.machine.state == "ready" and app.machine.recipients == 0


def test_rset_and_quit_take_no_arguments():
    app = session()
    app.cmd("RSET now", "501 5.5.4")
    app.cmd("QUIT now", "501 5.5.4")
    app.cmd("QUIT", "221 2.0.0")
    assert app.closed and app.events[-1] == ConnectionClosed("quit")


def test_lhlo_resets_a_transaction():
    app = session()
    app.transaction("alice@intermail.test")
    app.cmd("LHLO again", "250")
    app.cmd("RCPT TO:<alice@intermail.test>", "503 5.5.1")
    app.cmd("MAIL FROM:<a@b>", "250")


def test_verbs_are_case_insensitive():
    app = App()
    app.cmd("lhlo mta", "250")
    app.cmd("mail from:<a@b>", "250")
    app.cmd("rcpt to:<c@d>", "250")
    app.cmd("data", "354")
    app.feed(b".\r\n")
    app.cmd("quit", "221")


# ---------------------------------------------------------------------------
# full sessions


def test_multi_recipient_data_gets_one_reply_per_accepted_recipient_in_order():
    app = session()
    app.transaction("alice@intermail.test", "nobody@intermail.test", "bob@intermail.test", "carol@intermail.test")
    app.deliver = lambda i: [Reply(250, "2.0.0", "alice ok"), Reply(452, "4.2.2", "bob full"),
                             Reply(550, "5.7.1", "carol refused")][i]
    app.cmd("DATA", "354")
    out = app.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert [str(r) for r in split_replies(out)] == ["250 2.0.0 alice ok", "452 4.2.2 bob full",
                                                    "550 5.7.1 carol refused"]
    assert app.messages == [b"Subject: hi\r\n\r\nbody\r\n"]
    assert app.of(MessageEnd) == [MessageEnd(3)]
    assert [e.path for e in app.of(RcptTo)] == ["alice@intermail.test", "nobody@intermail.test",
                                               "bob@intermail.test", "carol@intermail.test"]
    # the transaction is over: a new one may start at once
    assert app.machine.state == "ready"
    app.transaction("dave@intermail.test")
    app.cmd("DATA", "354")
    assert len(split_replies(app.feed(b"second\r\n.\r\n"))) == 1
    assert app.messages[-1] == b"second\r\n"


def test_per_recipient_replies_may_be_sent_one_at_a_time():
    machine = LmtpServer(HOST)
    machine.send(Greeting())
    machine.receive_data(b"LHLO m\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n")
    machine.send(machine.next_event())
    for _ in range(3):
        assert isinstance(machine.next_event(), (MailFrom, RcptTo))
        machine.send(RECIPIENT_OK)
    machine.send(machine.next_event())  # 354
    assert machine.next_event() == MessageData(b"x\r\n")
    assert machine.next_event() == MessageEnd(2)
    assert machine.send(Reply(250, "2.0.0", "first")) == b"250 2.0.0 first\r\n"
    with pytest.raises(LocalProtocolError, match="send the per-recipient replies"):
        machine.next_event()
    with pytest.raises(LocalProtocolError, match="1 per-recipient replies are owed"):
        machine.send(RecipientReplies((RECIPIENT_OK, RECIPIENT_OK)))
    assert machine.send(Reply(451, "4.3.0", "second")) == b"451 4.3.0 second\r\n"
    assert machine.state == "ready"
    event = machine.next_event()
    assert event == AutoReply(R.OK)


def test_pipelined_commands_in_one_packet_give_the_same_output_as_one_by_one():
    script = [b"LHLO mta\r\n", b"MAIL FROM:<s@example.test>\r\n", b"RCPT TO:<a@x.test>\r\n",
              b"RCPT TO:<nobody@x.test>\r\n", b"RCPT TO:<b@x.test>\r\n", b"DATA\r\n"]
    one_by_one = App()
    outputs = [one_by_one.feed(line) for line in script]
    assert all(outputs)  # every command was answered before the next was sent
    pipelined = App()
    assert pipelined.feed(b"".join(script)) == b"".join(outputs)
    assert pipelined.events == one_by_one.events
    body = b"hello\r\n.\r\n"
    assert pipelined.feed(body) == one_by_one.feed(body)


def test_pipelined_commands_wait_behind_a_pending_decision():
    machine = LmtpServer(HOST)
    machine.send(Greeting())
    tail = b"RCPT TO:<a@x.test>\r\nDATA\r\n"
    machine.receive_data(b"LHLO mta\r\nMAIL FROM:<s@example.test>\r\n" + tail)
    machine.send(machine.next_event())
    assert machine.next_event() == MailFrom("s@example.test", {})
    assert machine.pending_bytes() == len(tail)  # not parsed while the app decides
    assert machine.owed == "a Reply to MailFrom"
    with pytest.raises(LocalProtocolError, match="before asking for the next event"):
        machine.next_event()
    machine.send(Reply(451, "4.3.0", "try later"))  # refused: the pipelined RCPT is now out of sequence
    assert machine.next_event() == AutoReply(Reply(503, "5.5.1", "Need MAIL before RCPT"))


def test_mail_refused_by_app_leaves_state_ready():
    app = session()
    app.decide = lambda event: Reply(550, "5.7.1", "not from you")
    app.cmd("MAIL FROM:<spam@example.test>", "550 5.7.1")
    assert app.machine.state == "ready"
    app.decide = App.decide.__get__(app)
    app.cmd("MAIL FROM:<ok@example.test>", "250")


def test_app_421_closes_the_connection():
    app = session()
    app.decide = lambda event: Reply(421, "4.3.2", "going away")
    app.cmd("MAIL FROM:<a@b>", "421 4.3.2")
    assert app.closed and app.events[-1] == ConnectionClosed("shutdown")
    assert app.feed(b"NOOP\r\n") == b""


def test_peer_close_gives_connection_closed_every_time():
    app = session()
    app.transaction("alice@intermail.test")
    app.cmd("DATA", "354")
    app.feed(b"half a message\r\nand a partial li")
    assert app.feed(b"") == b""
    assert app.events[-1] == ConnectionClosed("peer closed")
    assert app.messages == []  # never completed
    assert app.machine.next_event() == ConnectionClosed("peer closed")
    with pytest.raises(LocalProtocolError, match="after the end of the stream"):
        app.machine.receive_data(b"more")


def test_peer_close_after_complete_commands_answers_them_first():
    app = App()
    out = app.feed(b"LHLO mta\r\nNOOP\r\nNOO")
    app.machine.receive_data(b"")
    assert len(split_replies(out)) == 2
    assert app.machine.next_event() == ConnectionClosed("peer closed")


def test_shutdown_instead_of_greeting_and_when_idle():
    machine = LmtpServer(HOST)
    assert machine.send(Shutdown()) == b"421 4.3.2 Service shutting down, closing connection\r\n"
    assert machine.next_event() == ConnectionClosed("shutdown")
    app = session()
    app.transaction("alice@intermail.test")
    app.cmd("DATA", "354")
    app.feed(b"partial body\r\n")
    assert app.machine.send(Shutdown(Reply(421, "4.4.2", "bye"))) == b"421 4.4.2 bye\r\n"
    assert app.machine.next_event() == ConnectionClosed("shutdown")
    with pytest.raises(LocalProtocolError, match="cannot shut down"):
        app.machine.send(Shutdown())


def test_shutdown_rules():
    machine = LmtpServer(HOST)
    with pytest.raises(LocalProtocolError, match="421"):
        machine.send(Shutdown(Reply(554, "5.3.2", "no")))
    machine.send(Greeting())
    machine.receive_data(b"LHLO mta\r\n")
    machine.next_event()
    with pytest.raises(LocalProtocolError, match="cannot shut down"):
        machine.send(Shutdown())  # the LHLO reply is owed first


def test_receive_after_our_close_is_ignored():
    app = session()
    app.cmd("QUIT", "221")
    app.machine.receive_data(b"NOOP\r\n")
    assert app.machine.pending_bytes() == 0
    assert app.machine.next_event() == ConnectionClosed("quit")


# ---------------------------------------------------------------------------
# DATA: dot-unstuffing, the end of data, bare CR / LF


def data_session(*recipients: str, **limits) -> App:
    app = session(**limits)
    app.transaction(*(recipients or ("alice@intermail.test",)))
    app.cmd("DATA", "354")
    return app


@pytest.mark.parametrize(
    "wire, message",
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"..x\r\n.x\r\n.\r\n", b".x\r\nx\r\n"),
        (b"a.\r\n.b.\r\n. \r\n.\r\n", b"a.\r\nb.\r\n \r\n"),
        (b"x\r\n..\r\n\r\n.\r\n", b"x\r\n.\r\n\r\n"),
        (b"\xff\x00\x80 binary-ish 8bit\r\n.\r\n", b"\xff\x00\x80 binary-ish 8bit\r\n"),
    ],
)
def test_dot_unstuffing(wire, message):
    app = data_session()
    assert [label(r) for r in split_replies(app.feed(wire))] == ["250 2.0.0"]
    assert app.messages == [message]


def test_end_of_data_split_at_every_position():
    data = (b"LHLO mta\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
            b"line one\r\n..stuffed\r\n.\r\nNOOP\r\n")
    events = assert_split_invariant(AutoApp, data)
    kinds = [type(item[0]).__name__ for item in events]
    assert kinds == ["AutoReply", "MailFrom", "RcptTo", "AutoReply", "MessageData", "MessageEnd", "AutoReply"]
    assert events[4][0] == MessageData(b"line one\r\n.stuffed\r\n")


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\n", b"\r\n.\n", b"\r\n.\r", b"\n.\r", b"\r.\r\n",
     b"\r\n.\r\r\n", b"\n.\n\r\n"],
)
@pytest.mark.parametrize("where", ["middle", "start"])
def test_smuggling_payloads_never_end_the_message(fake_end, where):
    app = data_session("alice@intermail.test", "bob@intermail.test")
    smuggled = b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@intermail.test>\r\nDATA\r\nsmuggled\r\n"
    head = b"" if where == "start" else b"Subject: x\r\n\r\nhello"
    out = app.feed(head + fake_end + smuggled)
    assert out == b""  # nothing ended yet
    out = app.feed(b".\r\n")
    assert [str(r) for r in split_replies(out)] == ["554 5.6.0 Message contains bare CR or LF"] * 2
    assert [e.path for e in app.of(MailFrom)] == ["sender@example.test"]  # evil never seen
    assert app.of(MessageEnd) == [MessageEnd(2, R.BARE_LINE_END_IN_MESSAGE)]
    assert app.messages == []
    assert app.machine.state == "ready"
    app.transaction("carol@intermail.test")  # still usable


@pytest.mark.parametrize("body", [b"bare LF\n", b"bare CR\r", b"CR before CRLF\r\r\n", b"\n", b"a\rb\r\n",
                                  b"ok\r\n\nstarts with LF\r\n"])
def test_bare_cr_or_lf_anywhere_refuses_the_message(body):
    app = data_session("alice@intermail.test")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    out = app.feed(body + b".\r\n")
    assert [label(r) for r in split_replies(out)] == ["554 5.6.0"]


def test_data_delivered_up_to_a_bare_lf_is_cut_at_exactly_that_point():
    """Only full chunks before the first bare LF reach the app, however the input is split."""
    body = b"A" * 25 + b"\n" + b"B" * 30 + b"\r\n.\r\n"
    data = b"LHLO m\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + body
    events = assert_split_invariant(lambda: AutoApp(max_chunk=10), data)
    chunks = [item[0].data for item in events if isinstance(item[0], MessageData)]
    assert chunks == [b"A" * 10, b"A" * 10]
    assert events[-2][0] == MessageEnd(1, R.BARE_LINE_END_IN_MESSAGE)


def test_message_data_is_chunked_at_max_chunk():
    app = data_session(max_chunk=16)
    message = b"".join(b"line %03d ..\r\n" % i for i in range(40))
    wire = message.replace(b"\r\n.", b"\r\n..")
    app.feed(wire + b".\r\n")
    chunks = [e.data for e in app.of(MessageData)]
    assert all(len(c) == 16 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 16
    assert b"".join(chunks) == message == app.messages[0]


def test_large_message_streams_in_bounded_chunks():
    app = data_session()
    line = b"x" * 998 + b"\r\n"
    message = line * 300  # 300 kB, far beyond one chunk
    app.feed(message + b".\r\n")
    chunks = [e.data for e in app.of(MessageData)]
    assert len(chunks) == 5 and max(map(len, chunks)) == lmtp_server.DEFAULT_MAX_CHUNK
    assert app.messages == [message]


def test_long_text_lines_are_not_command_lines():
    app = data_session(max_line=512)
    message = b"y" * 5000 + b"\r\n"
    app.feed(message + b".\r\n")
    assert app.messages == [message]


# ---------------------------------------------------------------------------
# BDAT (RFC 3030)


def bdat_data(*chunks: bytes, last_marker: bytes = b" LAST") -> bytes:
    data = b"LHLO m\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@d.test>\r\n"
    for index, chunk in enumerate(chunks):
        marker = last_marker if index == len(chunks) - 1 else b""
        data += b"BDAT %d%s\r\n" % (len(chunk), marker) + chunk
    return data + b"NOOP\r\n"


def test_bdat_chunks_split_across_reads():
    chunks = [b"Subject: x\r\n\r\n", b".\r\n\n\r.raw bytes", b"", b"end\r\n"]
    events = assert_split_invariant(lambda: AutoApp(max_chunk=8), bdat_data(*chunks))
    data = [item[0].data for item in events if isinstance(item[0], MessageData)]
    assert b"".join(data) == b"".join(chunks)
    assert all(len(piece) <= 8 for piece in data)
    replies = [str(r) for r in split_replies(output_of(events))]
    assert replies[4:] == ["250 2.0.0 14 octets received", "250 2.0.0 29 octets received",
                           "250 2.0.0 29 octets received", "250 2.0.0 delivered", "250 2.0.0 delivered",
                           "250 2.0.0 Ok"]
    ends = [item[0] for item in events if isinstance(item[0], MessageEnd)]
    assert ends == [MessageEnd(2)]


def test_bdat_0_last():
    app = session()
    app.transaction("alice@intermail.test", "bob@intermail.test")
    app.cmd("BDAT 0 LAST", "250", "250")
    assert app.messages == [b""]
    assert app.of(MessageData) == []
    app.transaction("carol@intermail.test")
    app.cmd("BDAT 0", "250 2.0.0")
    app.cmd("bdat 000 last", "250 2.0.0")
    assert app.messages == [b"", b""]


def test_bdat_without_recipients_is_503_and_its_chunk_is_dropped():
    app = session()
    out = app.feed(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert [str(r) for r in split_replies(out)] == ["503 5.5.1 Need MAIL before BDAT", "250 2.0.0 Ok"]
    app.cmd("MAIL FROM:<a@b>", "250")
    app.cmd("RCPT TO:<nobody@x>", "550")
    out = app.feed(b"BDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
    assert [label(r) for r in split_replies(out)] == ["503 5.5.1", "250 2.0.0"]
    assert not app.closed


def test_malformed_bdat_with_a_size_still_drops_its_chunk():
    app = session()
    app.transaction("alice@intermail.test")
    out = app.feed(b"BDAT 6 LASTLY\r\nQUIT\r\nNOOP\r\n")
    assert [label(r) for r in split_replies(out)] == ["501 5.5.4", "250 2.0.0"]
    app.cmd("BDAT 20000000000000000000000", "501 5.5.4")  # no usable size: nothing dropped
    app.cmd("BDAT", "501 5.5.4")
    assert [label(r) for r in split_replies(app.feed(b"BDAT 2 LAST\r\nOK"))] == ["250 2.0.0"]
    assert app.messages == [b"OK"]


def test_data_after_bdat_and_rcpt_after_bdat_are_sequence_errors():
    app = session()
    app.transaction("alice@intermail.test")
    app.feed(b"BDAT 1\r\nx")
    app.cmd("DATA", "503 5.5.1")
    app.cmd("RCPT TO:<bob@intermail.test>", "503 5.5.1")
    app.cmd("MAIL FROM:<a@b>", "503 5.5.1")
    out = app.feed(b"BDAT 1 LAST\r\ny")
    assert [label(r) for r in split_replies(out)] == ["250 2.0.0"]
    assert app.messages == [b"xy"]


# ---------------------------------------------------------------------------
# limits, each at its edge


def test_command_line_of_exactly_max_line_is_accepted():
    app = App(max_line=512)
    line = b"NOOP " + b"x" * (512 - 2 - 5)
    assert len(line + b"\r\n") == 512
    app.cmd(line, "250")


@pytest.mark.parametrize("extra", [1, 2, 100, 5000])
def test_command_line_over_max_line_is_500_and_the_rest_is_dropped(extra):
    app = App(max_line=512)
    line = b"NOOP " + b"x" * (512 - 2 - 5 + extra - 4) + b"QUIT"
    assert len(line + b"\r\n") == 512 + extra
    app.cmd(line, "500 5.5.6")  # exactly one reply: the tail "QUIT" was not executed
    app.cmd("NOOP", "250")
    assert not app.closed


def test_line_too_long_answers_before_the_line_ends():
    app = App(max_line=512)
    out = app.feed(b"z" * 511)
    assert out == b""
    out = app.feed(b"z")
    assert [label(r) for r in split_replies(out)] == ["500 5.5.6"]
    assert app.feed(b"z" * 10_000) == b""
    assert app.machine.pending_bytes() <= 1
    assert app.feed(b"\r") == b""
    assert [label(r) for r in split_replies(app.feed(b"\nNOOP\r\n"))] == ["250 2.0.0"]


def test_crlf_straddling_the_limit_counts_as_too_long():
    app = App(max_line=512)
    out = app.feed(b"NOOP " + b"x" * 506 + b"\r\nNOOP\r\n")  # 513 octets with CRLF, then a NOOP
    assert [label(r) for r in split_replies(out)] == ["500 5.5.6", "250 2.0.0"]


@pytest.mark.parametrize("limit", [1, 3])
def test_recipients_up_to_max_then_452(limit):
    app = session(max_recipients=limit)
    app.cmd("MAIL FROM:<a@b>", "250")
    app.cmd("RCPT TO:<nobody@x>", "550")  # refused recipients do not count
    for i in range(limit):
        app.cmd(f"RCPT TO:<r{i}@x>", "250")
    before = len(app.of(RcptTo))
    app.cmd("RCPT TO:<one-more@x>", "452 4.5.3")
    assert len(app.of(RcptTo)) == before  # the app was not asked
    app.cmd("DATA", "354")
    assert len(split_replies(app.feed(b"x\r\n.\r\n"))) == limit


@pytest.mark.parametrize("size, ok", [(99, True), (100, True), (101, False), (5000, False)])
def test_message_size_at_the_limit(size, ok):
    app = data_session("alice@intermail.test", "bob@intermail.test", max_message_size=100, max_chunk=16)
    message = (b"." + b"m" * (size - 3) + b"\r\n") if size >= 3 else b"\r\n"
    wire = b"." + message  # stuffed: the wire is one octet longer than the message
    out = app.feed(wire + b".\r\n")
    labels = [label(r) for r in split_replies(out)]
    if ok:
        assert labels == ["250 2.0.0"] * 2 and app.messages == [message]
    else:
        assert labels == ["552 5.3.4"] * 2 and app.messages == []
        delivered = b"".join(e.data for e in app.of(MessageData))
        assert len(delivered) <= 100 and message.startswith(delivered)
        assert app.of(MessageEnd) == [MessageEnd(2, R.MESSAGE_TOO_BIG)]
    app.transaction("carol@intermail.test")  # usable afterwards


@pytest.mark.parametrize("declared, expect", [("100", "250"), ("0", "250"), ("101", "552 5.3.4"),
                                              ("99999999999999999999", "552 5.3.4"),
                                              ("999999999999999999999", "501 5.5.4"), ("", "501 5.5.4"),
                                              ("1e3", "501 5.5.4")])
def test_mail_size_parameter_at_the_limit(declared, expect):
    app = session(max_message_size=100)
    param = f" SIZE={declared}" if declared else " SIZE"
    app.cmd(f"MAIL FROM:<a@b>{param}", expect)


@pytest.mark.parametrize("chunks, ok", [((60, 40), True), ((100,), True), ((60, 41), False), ((101,), False)])
def test_bdat_total_size_at_the_limit(chunks, ok):
    app = session(max_message_size=100)
    app.transaction("alice@intermail.test", "bob@intermail.test")
    out = b""
    for index, size in enumerate(chunks):
        last = b" LAST" if index == len(chunks) - 1 else b""
        out += app.feed(b"BDAT %d%s\r\n" % (size, last) + b"b" * size)
    labels = [label(r) for r in split_replies(out)]
    if ok:
        assert labels[-2:] == ["250 2.0.0"] * 2 and app.messages == [b"b" * 100]
    else:
        assert labels[-2:] == ["552 5.3.4"] * 2 and app.messages == []
        assert app.of(MessageEnd)[-1].refused == R.MESSAGE_TOO_BIG
    assert app.machine.state == "ready"


def test_bdat_over_the_limit_mid_transaction_ends_it():
    app = session(max_message_size=10)
    app.transaction("alice@intermail.test", "bob@intermail.test")
    out = app.feed(b"BDAT 6\r\n123456BDAT 6\r\n123456BDAT 1 LAST\r\nx")
    assert [label(r) for r in split_replies(out)] == ["250 2.0.0", "552 5.3.4", "503 5.5.1"]
    assert app.of(MessageEnd) == [MessageEnd(2, R.MESSAGE_TOO_BIG)]
    app.cmd("RSET", "250")


def test_bad_commands_up_to_max_then_421():
    app = App(max_bad_commands=3)
    for _ in range(3):
        app.cmd("BOGUS", "500 5.5.1")
    app.cmd("NOOP", "250")  # a good command resets the count
    for _ in range(3):
        app.cmd("MAIL FROM:<a@b>", "503 5.5.1")
    app.cmd("BOGUS", "421 4.7.0")
    assert app.closed and app.events[-1] == ConnectionClosed("too many errors")


def test_max_bad_commands_zero_closes_on_the_first():
    app = App(max_bad_commands=0)
    out = app.feed(b"BOGUS\r\nNOOP\r\n")
    assert [label(r) for r in split_replies(out)] == ["421 4.7.0"]


def test_too_many_errors_while_a_bdat_chunk_would_follow():
    app = App(max_bad_commands=0)
    out = app.feed(b"BDAT 5\r\n12345NOOP\r\n")
    assert [label(r) for r in split_replies(out)] == ["421 4.7.0"]
    assert app.closed


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_line=511), dict(max_line=0), dict(max_message_size=0), dict(max_recipients=0),
     dict(max_bad_commands=-1), dict(max_chunk=0), dict(max_line=True), dict(max_chunk=1.5),
     dict(mail_params=["bad keyword"]), dict(rcpt_params=["-X"]), dict(extra_capabilities=["X\r\nY"])],
)
def test_constructor_limits(kwargs):
    with pytest.raises(ValueError):
        LmtpServer(HOST, **kwargs)


@pytest.mark.parametrize("hostname", ["", "a b", "-x.test", "x" * 256, "m\xfcller.test", "mss1\r\n"])
def test_constructor_hostname(hostname):
    with pytest.raises(ValueError):
        LmtpServer(hostname)


# ---------------------------------------------------------------------------
# sequence and syntax errors


@pytest.mark.parametrize(
    "setup, line, expect",
    [
        ([], "MAIL FROM:<a@b>", "503 5.5.1 Send LHLO first"),
        ([], "DATA", "503 5.5.1 Send LHLO first"),
        (["LHLO m"], "RCPT TO:<a@b>", "503 5.5.1 Need MAIL before RCPT"),
        (["LHLO m"], "DATA", "503 5.5.1 Need MAIL before DATA"),
        (["LHLO m", "MAIL FROM:<a@b>"], "DATA", "503 5.5.1 No valid recipients"),
        (["LHLO m", "MAIL FROM:<a@b>", "RCPT TO:<nobody@x>"], "DATA", "503 5.5.1 No valid recipients"),
        (["LHLO m", "MAIL FROM:<a@b>"], "MAIL FROM:<a@b>", "503 5.5.1 Sender already specified"),
        (["LHLO m", "MAIL FROM:<a@b>", "RCPT TO:<c@d>"], "MAIL FROM:<a@b>", "503 5.5.1 Sender already specified"),
    ],
)
def test_sequence_errors(setup, line, expect):
    app = App()
    for command in setup:
        app.feed(command.encode() + b"\r\n")
    (reply,) = app.cmd(line, expect[:9])
    assert str(reply) == expect


@pytest.mark.parametrize(
    "line, expect",
    [
        ("", "500 5.5.1"),
        ("FOO", "500 5.5.1"),
        ("M@IL FROM:<a@b>", "500 5.5.1"),
        (b"NOOP \x00", "250"),
        (b"\xc3\xa9", "500 5.5.1"),
        (b"NOOP\rx", "500 5.5.2"),
        ("MAIL", "501 5.5.2"),
        ("MAIL FROM:a@b", "501 5.5.2"),
        ("MAIL FROM: <a@b>", "501 5.5.2"),
        ("MAIL TO:<a@b>", "501 5.5.2"),
        ("MAIL FROM:<a@b> ", "501 5.5.2"),
        ("MAIL FROM:<a@b>x", "501 5.5.2"),
        (b"MAIL FROM:<a@b\xff>", "501 5.5.2"),
        ("MAIL FROM:<a@@b>", "501 5.1.7"),
        ("MAIL FROM:<a@b", "501 5.1.7"),
        ("MAIL FROM:<a@b.>", "501 5.1.7"),
        ("MAIL FROM:<a..b@c>", "501 5.1.7"),
        ("MAIL FROM:<a@b> SIZE=1 SIZE=2", "501 5.5.4"),
        ("MAIL FROM:<a@b>  SIZE=1", "501 5.5.4"),
        ("MAIL FROM:<a@b> SIZE=", "501 5.5.4"),
        ("MAIL FROM:<a@b> BODY=BINARYMIME", "501 5.5.4"),
        ("MAIL FROM:<a@b> BODY", "501 5.5.4"),
        ("MAIL FROM:<a@b> SMTPUTF8=yes", "501 5.5.4"),
        ("MAIL FROM:<a@b> RET=FULL", "555 5.5.4"),
        ("MAIL FROM:<a@b> XDELIVERYKEY=k1", "555 5.5.4"),
        ("MAIL FROM:<pel\xe9@example.test>", "553 5.6.7"),
        ("MAIL FROM:<a@b> X=\xe9", "501 5.5.4"),
        ("MAIL FROM:<a@b> BODY=8bitmime", "250"),
        ("MAIL FROM:<a@b> BODY=7BIT SIZE=10 SMTPUTF8", "250"),
        ("MAIL FROM:<pel\xe9@ex\xe4mple.test> SMTPUTF8", "250"),
        ("MAIL FROM:<@relay.test,@other.test:a@b>", "250"),
        ('MAIL FROM:<"a b>c"@[IPv6:2001:db8::1]>', "250"),
        ("MAIL FROM:<a@[192.0.2.1]>", "250"),
        ("MAIL FROM:<>", "250"),
    ],
)
def test_syntax_errors(line, expect):
    app = App()
    app.feed(b"LHLO m\r\n")
    app.cmd(line, expect)


@pytest.mark.parametrize(
    "line, expect",
    [
        ("RCPT TO:<a b@c>", "501 5.1.3"),
        ("RCPT TO:a@b", "501 5.5.2"),
        ("RCPT FROM:<a@b>", "501 5.5.2"),
        ("RCPT TO:<>", "501 5.1.3"),
        ("RCPT TO:<a@b> NOTIFY=NEVER", "555 5.5.4"),
        ("RCPT TO:<a@b> ORCPT=rfc822;a@b", "555 5.5.4"),
        ("RCPT TO:<j\xf6rg@example.test>", "553 5.6.7"),
        ("RCPT TO:<postmaster>", "250"),
        ("RCPT TO:<PostMaster@intermail.test>", "250"),
        ("RCPT TO:<a@b>", "250"),
    ],
)
def test_rcpt_syntax(line, expect):
    app = session()
    app.cmd("MAIL FROM:<a@b>", "250")
    app.cmd(line, expect)


def test_paths_are_returned_as_written():
    app = session()
    app.cmd('MAIL FROM:<"Odd \\"Quoted\\" Name"@Example.TEST> BODY=8bitmime', "250")
    app.cmd("RCPT TO:<@relay.test:Alice.Smith@InterMail.test>", "250")
    app.cmd("RCPT TO:<Postmaster>", "250")
    assert app.of(MailFrom) == [MailFrom('"Odd \\"Quoted\\" Name"@Example.TEST', {"BODY": "8bitmime"})]
    assert [e.path for e in app.of(RcptTo)] == ["Alice.Smith@InterMail.test", "Postmaster"]


def test_smtputf8_allows_utf8_recipients_for_that_transaction_only():
    app = session()
    app.cmd("MAIL FROM:<a@b> SMTPUTF8", "250")
    app.cmd("RCPT TO:<j\xf6rg@m\xfcller.example>", "250")
    assert app.of(RcptTo)[-1].path == "j\xf6rg@m\xfcller.example"
    app.cmd("RSET", "250")
    app.cmd("MAIL FROM:<a@b>", "250")
    app.cmd("RCPT TO:<j\xf6rg@m\xfcller.example>", "553 5.6.7")


def test_extra_parameters_pass_through_to_the_app():
    app = session(mail_params=["XDELIVERYKEY"], rcpt_params=["xdeliverykey", "NOTIFY"])
    app.cmd("MAIL FROM:<a@b> xdeliverykey=01HQ+2Bkey SIZE=10", "250")
    assert app.of(MailFrom)[-1].params == {"XDELIVERYKEY": "01HQ+2Bkey", "SIZE": "10"}
    app.decide = lambda event: Reply(555, "5.5.4", "bad delivery key")
    app.cmd("RCPT TO:<c@d> XDELIVERYKEY=broken NOTIFY=NEVER", "555 5.5.4")
    assert app.of(RcptTo)[-1].params == {"XDELIVERYKEY": "broken", "NOTIFY": "NEVER"}
    assert app.machine.state == "mail"  # the app refused: nothing moved
    app.cmd("RCPT TO:<c@d> RET=HDRS", "555 5.5.4")  # not passed through: the machine refuses


# ---------------------------------------------------------------------------
# the app's side: LocalProtocolError, machine unchanged


def owing_mail() -> LmtpServer:
    machine = LmtpServer(HOST)
    machine.send(Greeting())
    machine.receive_data(b"LHLO m\r\nMAIL FROM:<a@b>\r\n")
    machine.send(machine.next_event())
    assert isinstance(machine.next_event(), MailFrom)
    return machine


def owing_recipients(count: int) -> LmtpServer:
    machine = LmtpServer(HOST)
    machine.send(Greeting())
    machine.receive_data(b"LHLO m\r\nMAIL FROM:<a@b>\r\n" + b"RCPT TO:<c@d>\r\n" * count + b"DATA\r\n.\r\n")
    machine.send(machine.next_event())
    for _ in range(count + 1):
        assert isinstance(machine.next_event(), (MailFrom, RcptTo))
        machine.send(RECIPIENT_OK)
    machine.send(machine.next_event())
    assert machine.next_event() == MessageEnd(count)
    return machine


def test_before_the_greeting():
    machine = LmtpServer(HOST)
    with pytest.raises(LocalProtocolError, match="send the Greeting"):
        machine.next_event()
    with pytest.raises(LocalProtocolError):
        machine.send(R.OK)
    machine.send(Greeting())
    with pytest.raises(LocalProtocolError, match="once"):
        machine.send(Greeting())
    with pytest.raises(LocalProtocolError, match="control character"):
        LmtpServer(HOST).send(Greeting("evil\r\n250 fake"))


@pytest.mark.parametrize("wrong", [0, 1, 3])
def test_wrong_number_of_recipient_replies(wrong):
    machine = owing_recipients(2)
    with pytest.raises(LocalProtocolError, match="2 per-recipient replies are owed"):
        machine.send(RecipientReplies((R.DELIVERED,) * wrong))
    assert machine.send(RecipientReplies((R.DELIVERED, R.DELIVERED))) == R.DELIVERED.encode() * 2
    with pytest.raises(LocalProtocolError, match="no per-recipient replies are owed"):
        machine.send(RecipientReplies((R.DELIVERED,)))
    with pytest.raises(LocalProtocolError, match="no Reply is owed"):
        machine.send(R.DELIVERED)


@pytest.mark.parametrize(
    "bad, match",
    [
        (Reply(354, None, "go on"), "3xx"),
        (Reply(250, None, "no enhanced code"), "enhanced status code"),
        (Reply(421, "4.3.2", "bye"), "cannot be 421"),
        ("250 2.0.0 ok", "must be a Reply"),
    ],
)
def test_bad_recipient_replies(bad, match):
    machine = owing_recipients(2)
    with pytest.raises(LocalProtocolError, match=match):
        machine.send(RecipientReplies((R.DELIVERED, bad)))
    if isinstance(bad, Reply):
        with pytest.raises(LocalProtocolError, match=match):
            machine.send(bad)
    machine.send(RecipientReplies((R.DELIVERED, R.DELIVERED)))  # unchanged: still owes both


def test_bad_decisions_leave_the_machine_unchanged():
    machine = owing_mail()
    for bad in (Reply(354, None, "x"), Reply(250, None, "x"), RecipientReplies((R.OK,)), AutoReply(R.OK),
                Greeting(), object()):
        with pytest.raises(LocalProtocolError):
            machine.send(bad)
    assert machine.owed == "a Reply to MailFrom"
    machine.send(SENDER_OK)
    assert machine.state == "mail"


def test_auto_reply_must_be_the_pending_one():
    machine = LmtpServer(HOST)
    machine.send(Greeting())
    machine.receive_data(b"NOOP\r\n")
    event = machine.next_event()
    with pytest.raises(LocalProtocolError, match="not the one pending"):
        machine.send(AutoReply(R.HELP))
    with pytest.raises(LocalProtocolError):
        machine.next_event()
    assert machine.send(event) == b"250 2.0.0 Ok\r\n"
    with pytest.raises(LocalProtocolError, match="not the one pending"):
        machine.send(event)  # only once


# ---------------------------------------------------------------------------
# replies and grammar on their own


def test_reply_encoding():
    assert Reply(250, "2.1.5", "ok").encode() == b"250 2.1.5 ok\r\n"
    assert Reply(250, None, ("a", "b")).encode() == b"250-a\r\n250 b\r\n"
    assert Reply(214, "2.0.0", ("one", "", "two")).encode() == b"214-2.0.0 one\r\n214-2.0.0\r\n214 2.0.0 two\r\n"
    assert Reply(250).encode() == b"250\r\n"
    assert Reply(550, "5.1.1", "m\xfcller unknown").encode() == "550 5.1.1 m\xfcller unknown\r\n".encode()


@pytest.mark.parametrize(
    "kwargs",
    [dict(code=199), dict(code=560), dict(code=260), dict(code="250"), dict(code=True),
     dict(code=250, enhanced="5.0.0"), dict(code=354, enhanced="3.0.0"), dict(code=250, enhanced="2.0"),
     dict(code=250, enhanced="2.1000.0"), dict(code=250, lines=()), dict(code=250, lines=("a\nb",)),
     dict(code=250, lines=("\x00",)), dict(code=250, lines=(b"x",)), dict(code=250, lines="x" * 507)],
)
def test_invalid_replies_are_local_errors(kwargs):
    with pytest.raises(LocalProtocolError):
        Reply(**kwargs)


def test_longest_reply_line_is_512_octets():
    assert len(Reply(250, "2.0.0", "x" * 500).encode()) == 512


@pytest.mark.parametrize("data", [b"250 ok", b"25 ok\r\n", b"250-a\r\n", b"250-a\r\n251 b\r\n", b"250 a\r\n250 b\r\n",
                                  b"250xok\r\n", b"650 no\r\n", b"250 \xff\r\n", b"250-a\r\n250\r\nx\r\n"])
def test_parse_reply_rejects_malformed(data):
    with pytest.raises(RemoteProtocolError):
        parse_reply(data)


def test_error_table_uses_safe_text():
    error = MailError(ErrorKind.NOQUOTA, detail="alice at 1034 MiB of 1024 MiB")
    assert R.reply_for_error(error) == Reply(552, "5.2.2", "quota exceeded")
    assert set(R.ERROR_REPLIES) == set(ErrorKind)
    for kind in ErrorKind:
        reply = R.reply_for_error(MailError(kind))
        assert not reply.accepted and reply.enhanced
        if MailError(kind).temporary:
            assert reply.transient


text_lines = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.just("\t"), max_size=40)


@FAST
@given(
    st.sampled_from([211, 214, 220, 221, 250, 251, 252, 354, 421, 450, 451, 452, 500, 501, 503, 550, 552, 554, 555]),
    st.booleans(),
    st.integers(0, 999),
    st.integers(0, 999),
    st.lists(text_lines, min_size=1, max_size=4),
)
def test_reply_round_trip(code, with_enhanced, subject, detail, lines):
    enhanced = f"{str(code)[0]}.{subject}.{detail}" if with_enhanced and code // 100 != 3 else None
    if enhanced is None and R._ENHANCED.match(lines[0].partition(" ")[0]):
        lines[0] = "x" + lines[0]  # would read back as an enhanced code: the wire cannot tell
    reply = Reply(code, enhanced, tuple(lines))
    assert parse_reply(reply.encode()) == reply


atext = st.sampled_from("abcXYZ019!#$%&'*+/=?^_`{|}~-")
atoms = st.text(atext, min_size=1, max_size=6)
domain_labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,5}[A-Za-z0-9])?", fullmatch=True)
domains = st.lists(domain_labels, min_size=1, max_size=4).map(".".join)
local_parts = st.lists(atoms, min_size=1, max_size=3).map(".".join) | st.text(
    st.sampled_from(' !#az09[]~()<>@,;:."\\'), max_size=8
).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
mailboxes = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains | st.just("[192.0.2.7]"))
esmtp_params = st.dictionaries(
    st.from_regex(r"[A-Z0-9][A-Z0-9-]{0,8}", fullmatch=True),
    st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126).filter(lambda c: c != "="), min_size=1,
                        max_size=10),
    max_size=4,
)


@FAST
@given(mailboxes, esmtp_params)
def test_mail_and_rcpt_round_trip(mailbox, params):
    tail = "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params.items())
    assert grammar.parse_mail(f"FROM:<{mailbox}>{tail}".encode()) == grammar.PathArgs(mailbox, params)
    assert grammar.parse_rcpt(f"TO:<{mailbox}>{tail}".encode()) == grammar.PathArgs(mailbox, params)


@FAST
@given(st.text(max_size=30))
def test_xtext_round_trip(text):
    encoded = grammar.encode_xtext(text)
    assert encoded.isascii() and grammar.decode_xtext(encoded) == text


@pytest.mark.parametrize("value", ["a+2", "a+2g", "a=b", "a b", "+c3", "+FF"])
def test_bad_xtext(value):
    with pytest.raises(GrammarError):
        grammar.decode_xtext(value)


@FAST
@given(st.binary(max_size=80), st.booleans())
def test_grammar_raises_only_grammar_errors(data, utf8):
    for parse in (grammar.parse_mail, lambda d: grammar.parse_rcpt(d, utf8=utf8), grammar.parse_lhlo,
                  grammar.parse_bdat):
        with contextlib.suppress(GrammarError):
            parse(data)
        with contextlib.suppress(GrammarError):
            parse(b"FROM:<" + data)
        with contextlib.suppress(GrammarError):
            parse(b"TO:<" + data)
    grammar.split_command(data)


def test_grammar_problems_are_typed():
    assert pytest.raises(GrammarError, grammar.parse_mail, b"FROM:<a@-b>").value.problem is Problem.SENDER
    assert pytest.raises(GrammarError, grammar.parse_rcpt, b"TO:<a@-b>").value.problem is Problem.RECIPIENT
    assert issubclass(GrammarError, RemoteProtocolError)


def test_pathological_paths_parse_fast():
    import time

    for data in (b"FROM:<" + b"a." * 495, b"FROM:<a@" + b"a-" * 495, b"FROM:<a@b" + b".a" * 490 + b"-",
                 b'FROM:<"' + b"\\ " * 490, b"FROM:<@" + b"a," * 490, b"FROM:<a@[" + b"a-" * 490 + b":"):
        start = time.perf_counter()
        with contextlib.suppress(GrammarError):
            grammar.parse_mail(data)
        assert time.perf_counter() - start < 0.05, data[:20]


# ---------------------------------------------------------------------------
# fuzzing: only RemoteProtocolError may escape, and the split never matters

TOKENS = [
    b"LHLO mta\r\n", b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<> SIZE=50\r\n", b"MAIL FROM:<a@b> SMTPUTF8\r\n",
    b"RCPT TO:<r@x.test>\r\n", b"RCPT TO:<no@x.test>\r\n", "RCPT TO:<\xe9@x>\r\n".encode(), b"DATA\r\n",
    b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"BDAT 70\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
    b"HELP\r\n", b"VRFY x\r\n", b"EHLO x\r\n", b".\r\n", b"..\r\n", b"\r\n", b"\r", b"\n", b".", b"abc",
    b"\r\n.\r\n", b"\n.\n", b"y" * 300, b"\x00\xff",
]
LIMITS = dict(max_line=512, max_message_size=60, max_recipients=2, max_bad_commands=4, max_chunk=7)
sessions = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=6), max_size=40).map(b"".join)


def check_events(events: list) -> None:
    """Invariants of any event stream: bounded chunks and sizes, well-formed output."""
    body = 0
    for item in events:
        assert isinstance(item, tuple) and item[0] != "error", item
        event = item[0]
        if isinstance(event, MessageData):
            assert 0 < len(event.data) <= LIMITS["max_chunk"]
            body += len(event.data)
            assert body <= LIMITS["max_message_size"]
        elif isinstance(event, MessageEnd):
            body = 0
    split_replies(output_of(events))


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
    assert closed[-1][0] == ConnectionClosed(closed[-1][0].reason)


@FAST
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data):
    for make in (lambda: AutoApp(**LIMITS), lambda: AutoApp()):
        whole = events_whole(make, data + b"\r\n")
        assert events_for_chunks(make, [data[i : i + 7] for i in range(0, len(data), 7)] + [b"\r\n"]) == whole
    check_events(events_whole(lambda: AutoApp(**LIMITS), data))


@FAST
@given(st.binary(max_size=300), st.sampled_from([b"DATA\r\n", b"BDAT 40\r\n", b"BDAT 40 LAST\r\n"]))
def test_fuzz_message_bodies(body, command):
    """Random bodies after DATA or BDAT: never an error, and the split never matters."""
    data = b"LHLO m\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n" + command + body + b"\r\n.\r\nNOOP\r\n"
    events = assert_split_invariant(lambda: AutoApp(**LIMITS), data, every_split=len(data) < 120)
    check_events(events)


# ---------------------------------------------------------------------------
# through the real pump: pipelining over a socket does not stall


def test_session_over_the_pump(loop_name):
    async def serve(pump: Pump) -> list:
        await pump.write(pump.machine.send(Greeting()))
        seen = []
        while True:
            event = await pump.next_event(timeout=5)
            seen.append(event)
            if isinstance(event, AutoReply):
                await pump.send(event)
            elif isinstance(event, MailFrom):
                await pump.send(SENDER_OK)
            elif isinstance(event, RcptTo):
                await pump.send(RECIPIENT_OK)
            elif isinstance(event, MessageEnd):
                await pump.send(RecipientReplies((R.DELIVERED,) * event.recipients))
            elif isinstance(event, ConnectionClosed):
                return seen

    async def scenario():
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        server_reader, server_writer = await accepted
        task = asyncio.create_task(serve(Pump(server_reader, server_writer, LmtpServer(HOST))))
        assert (await reader.readline()).startswith(b"220 ")
        body = b"x" * 200_000 + b"\r\n"
        writer.write(b"LHLO m\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
        lines = [await reader.readline() for _ in range(7 + 3 + 1)]
        assert lines[-1].startswith(b"354")
        writer.write(body + b".\r\nQUIT\r\n")
        tail = [await reader.readline() for _ in range(3)]
        assert [line[:3] for line in tail] == [b"250", b"250", b"221"]
        seen = await asyncio.wait_for(task, 5)
        assert b"".join(e.data for e in seen if isinstance(e, MessageData)) == body
        writer.close()
        server_writer.close()
        server.close()
        await server.wait_closed()

    run_on(loop_name, scenario())
