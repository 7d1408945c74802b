"""Pure machine tests of intermail.proto.imap: grammar, commands, the server machine and rendering.

The split-feed contract is checked with the shared helper on :class:`AutoApp`,
a tiny app in front of the machine that answers every event (accepts
literals, answers commands ``OK``, runs IDLE and AUTHENTICATE PLAIN) and
reports each event together with the bytes its answer produced.  Seed
transcripts live in ``tests/transcripts/imap``.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import datetime
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.errors import LocalProtocolError, RemoteProtocolError
from intermail.net.pump import Pump
from intermail.proto import NEED_DATA
from intermail.proto.imap import grammar, render
from intermail.proto.imap.commands import (
    ANY_STATE,
    COMMANDS,
    SELECTED,
    Append,
    AppendMessage,
    Authenticate,
    Capability,
    Check,
    Close,
    Copy,
    Create,
    Delete,
    Enable,
    Examine,
    Expunge,
    Fetch,
    Id,
    Idle,
    List,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    Rename,
    Search,
    Select,
    StartTls,
    Status,
    Store,
    Subscribe,
    Unselect,
    Unsubscribe,
    decode_plain,
    parse_command,
)
from intermail.proto.imap.grammar import (
    FETCH_MACROS,
    FetchAttribute,
    GrammarError,
    Reader,
    SearchKey,
    Section,
    SequenceSet,
    decode_mutf7,
    encode_mutf7,
)
from intermail.proto.imap.server import (
    LITERAL_MINUS_MAX,
    AuthResponse,
    BadCommand,
    Command,
    ConnectionClosed,
    Continuation,
    IdleDone,
    ImapServer,
    LiteralRequest,
    LiteralTooBig,
    Tagged,
    Untagged,
)
from intermail.testing.feed import assert_split_invariant, events_for_chunks, events_whole
from intermail.testing.loops import run_on

TRANSCRIPTS = Path(__file__).parent / "transcripts" / "imap"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PLAIN_OK = base64.b64encode(b"\0alice\0secret")


# ---------------------------------------------------------------------------
# helpers


class AutoApp:
    """A Machine for the split-feed helper: answers every event, returns (event, output bytes).

    Commands get ``<tag> OK <NAME> completed`` (LOGOUT a BYE first), IDLE
    and AUTHENTICATE PLAIN run their exchanges (password "secret"), every
    synchronizing literal is accepted unless it is over
    ``app_literal_limit``.  After ConnectionClosed it reports NEED_DATA.
    """

    def __init__(self, app_literal_limit: int | None = None, **limits):
        self.machine = ImapServer(**limits)
        self.app_literal_limit = app_literal_limit
        self.closed = False

    def receive_data(self, data: bytes) -> None:
        self.machine.receive_data(data)

    def next_event(self):
        if self.closed:
            return NEED_DATA
        event = self.machine.next_event()
        if event is NEED_DATA:
            return event
        return event, b"".join(self.machine.send(response) for response in self.answer(event))

    def send(self, event) -> bytes:
        return self.machine.send(event)

    def answer(self, event) -> list:
        if isinstance(event, Command):
            command, tag = event.command, event.tag
            if isinstance(command, Idle):
                return [Continuation("idling")]
            if isinstance(command, Authenticate):
                if command.mechanism != "PLAIN":
                    return [Tagged(tag, "NO", "Unsupported mechanism")]
                if command.initial_response is None:
                    return [Continuation.challenge(b"")]
                return [plain_result(tag, command.initial_response)]
            if isinstance(command, Logout):
                return [Untagged.status("BYE", "Logging out"), Tagged(tag, "OK", "LOGOUT completed")]
            return [Tagged(tag, "OK", f"{command.name} completed")]
        if isinstance(event, (BadCommand, LiteralTooBig, IdleDone)):
            return [event.response]
        if isinstance(event, LiteralRequest):
            if self.app_literal_limit is not None and event.size > self.app_literal_limit:
                return [event.refuse()]
            return [event.accept()]
        if isinstance(event, AuthResponse):
            if event.data is None:
                return [Tagged(event.tag, "BAD", "Authentication cancelled")]
            return [plain_result(event.tag, event.data)]
        if isinstance(event, ConnectionClosed):
            self.closed = True
            if event.reason == "too many errors":
                return [Untagged.status("BYE", "Too many invalid commands")]
            return []
        raise AssertionError(f"unexpected event {event!r}")


def plain_result(tag: str, data: bytes) -> Tagged:
    try:
        _, user, password = decode_plain(data)
    except GrammarError as exc:
        return Tagged(tag, "BAD", exc.text)
    if (user, password) == ("alice", "secret"):
        return Tagged(tag, "OK", "AUTHENTICATE completed")
    return Tagged(tag, "NO", "Invalid credentials", "AUTHENTICATIONFAILED")


def output_of(events: list) -> bytes:
    return b"".join(item[1] for item in events if isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[1], bytes))


def bare(events: list) -> list:
    """The events without their outputs, LiteralRequests and ConnectionClosed left out."""
    assert not any(item[0] == "error" for item in events), events  # the machine never raises
    return [item[0] for item in events if not isinstance(item[0], (LiteralRequest, ConnectionClosed))]


def events_of(data: bytes, **limits) -> list:
    return bare(events_whole(lambda: AutoApp(**limits), data))


def parse_line(line: bytes, **kwargs):
    """One command's wire bytes (literals inline) -> (tag, command), without the machine."""
    return grammar.run(lambda reader: _command_through(reader, **kwargs), line)


def _command_through(reader: Reader, **kwargs):
    """parse_command on the reader's first line; grammar.run feeds it the literals and later lines."""
    generator = parse_command(reader.line, **kwargs)
    result = yield from generator
    reader.pos = len(reader.line)
    return result


# ---------------------------------------------------------------------------
# seed transcripts


def load_transcript(path: Path) -> tuple[dict, bytes, bytes]:
    """(limits and app options, client bytes, expected server bytes) of a transcript file."""
    options: dict = {}
    client, server = bytearray(), bytearray()
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
        elif tag == "L:":
            options.update((k, int(v)) for k, v in (item.split("=") for item in text.split()))
        else:
            raise AssertionError(f"{path.name}: bad line {line!r}")
    return options, bytes(client), bytes(server)


TRANSCRIPT_PATHS = sorted(TRANSCRIPTS.glob("*.txt"))
assert TRANSCRIPT_PATHS, "no seed transcripts found"


@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_replays_byte_exact(path):
    options, client, server = load_transcript(path)
    events = events_whole(lambda: AutoApp(**options), client)
    assert not any(item[0] == "error" for item in events)
    assert output_of(events) == server


@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_split_invariant(path):
    options, client, _ = load_transcript(path)
    assert_split_invariant(lambda: AutoApp(**options), client)


def test_literal_transcript_commands_carry_their_literals():
    _, client, _ = load_transcript(TRANSCRIPTS / "literals.txt")
    commands = [event.command for event in events_of(client)]
    assert commands[0] == Login("alice", "pa\r\nss!")
    assert commands[1] == Append("Drafts", (AppendMessage(b"Hello\r\nWorld!", ("\\Draft",)),))
    utc = datetime.timezone.utc
    assert commands[2] == Append("INBOX", (
        AppendMessage(b"one"),
        AppendMessage(b"t\x00wo", ("\\Seen",), datetime.datetime(2026, 1, 1, tzinfo=utc), binary=True),
    ))
    assert commands[3] == Search((SearchKey("TEXT", ("",)),))
    assert commands[4] == Select("INBOX")
    assert commands[5] == Fetch(SequenceSet(((1, 1),)), (FetchAttribute("BODY", Section((), "HEADER.FIELDS",
                                                                                         ("Date",))),))
    assert commands[6] == Create("&&", ("\\Archive",))


def test_refused_literal_transcript_never_runs_hidden_commands():
    options, client, _ = load_transcript(TRANSCRIPTS / "refused_literals.txt")
    events = events_of(client, **options)
    tags = [event.tag for event in events]
    assert "c5" not in tags and "c6" not in tags and "c9" not in tags
    assert events[:3] == [LiteralTooBig("c2", "APPEND", 101, 100, True, message=True),
                          LiteralTooBig("c3", "LOGIN", 21, 20, True), LiteralTooBig("c4", "LOGIN", 21, 20, False)]


# ---------------------------------------------------------------------------
# the command table: every command, valid forms


def ss(*ranges) -> SequenceSet:
    return SequenceSet(tuple((r, r) if not isinstance(r, tuple) else r for r in ranges))


STAR = None
UTC1 = datetime.timezone(datetime.timedelta(hours=1))
HEADER_FROM = FetchAttribute("BODY.PEEK", Section((), "HEADER.FIELDS", ("From", "X-Spam")), (0, 100))

VALID = [
    (b"CAPABILITY", Capability()),
    (b"capability", Capability()),
    (b"NOOP", Noop()),
    (b"LOGOUT", Logout()),
    (b"STARTTLS", StartTls()),
    (b"NAMESPACE", Namespace()),
    (b"IDLE", Idle()),
    (b"CHECK", Check()),
    (b"CLOSE", Close()),
    (b"UNSELECT", Unselect()),
    (b"EXPUNGE", Expunge()),
    (b"UID EXPUNGE 3:5,7", Expunge(ss((3, 5), 7))),
    (b"uid expunge *", Expunge(ss((STAR, STAR)))),
    (b'ID ("name" "mutt" "version" NIL)', Id((("name", "mutt"), ("version", None)))),
    (b"ID NIL", Id(None)),
    (b"ID ()", Id(())),
    (b"AUTHENTICATE PLAIN", Authenticate("PLAIN")),
    (b"authenticate plain " + PLAIN_OK, Authenticate("PLAIN", b"\0alice\0secret")),
    (b"AUTHENTICATE PLAIN =", Authenticate("PLAIN", b"")),
    (b"AUTHENTICATE XOAUTH2 YQ==", Authenticate("XOAUTH2", b"a")),
    (b'LOGIN alice "p\\"w\\\\d"', Login("alice", 'p"w\\d')),
    (b"LOGIN {5}\r\nalice {3+}\r\npw!", Login("alice", "pw!")),
    (b'LOGIN "m\xc3\xbcller" x]', Login("m\u00fcller", "x]")),
    (b"LOGIN {0+}\r\n \"\"", Login("", "")),
    (b"ENABLE CONDSTORE UTF8=ACCEPT", Enable(("CONDSTORE", "UTF8=ACCEPT"))),
    (b"ENABLE IMAP4rev2", Enable(("IMAP4rev2",))),
    (b"SELECT inbox", Select("INBOX")),
    (b"SELECT INBOX (CONDSTORE)", Select("INBOX", condstore=True)),
    (b"select iNbOx (condstore)", Select("INBOX", condstore=True)),
    (b'EXAMINE "Sent Items"', Examine("Sent Items")),
    (b"EXAMINE Drafts (CONDSTORE)", Examine("Drafts", condstore=True)),
    (b"SELECT &Jjo-!", Select("\u263a!")),
    (b"SELECT ~peter/mail/&U,BTFw-/&ZeVnLIqe-", Select("~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e")),
    (b"SELECT INBOX/sub", Select("INBOX/sub")),
    (b"CREATE foo", Create("foo")),
    (b"CREATE Archive/2026 (USE (\\Archive))", Create("Archive/2026", ("\\Archive",))),
    (b"CREATE x (USE (\\sent \\Junk))", Create("x", ("\\Sent", "\\Junk"))),
    (b"CREATE x (USE ())", Create("x", ())),
    (b"DELETE foo", Delete("foo")),
    (b"RENAME foo {3+}\r\nbar", Rename("foo", "bar")),
    (b"SUBSCRIBE foo", Subscribe("foo")),
    (b"UNSUBSCRIBE &-", Unsubscribe("&")),
    (b'LIST "" *', List("", ("*",))),
    (b"LIST ~/ %", List("~/", ("%",))),
    (b'LIST "" INBOX/%]', List("", ("INBOX/%]",))),
    (b'LIST (SPECIAL-USE) "" *', List("", ("*",), ("SPECIAL-USE",), extended=True)),
    (b'LIST "" * RETURN (SPECIAL-USE CHILDREN)', List("", ("*",), (), ("SPECIAL-USE", "CHILDREN"), extended=True)),
    (b'LIST (SUBSCRIBED RECURSIVEMATCH) "" ("foo" %/bar) RETURN (SUBSCRIBED STATUS (MESSAGES UNSEEN))',
     List("", ("foo", "%/bar"), ("SUBSCRIBED", "RECURSIVEMATCH"), ("SUBSCRIBED", "STATUS"), ("MESSAGES", "UNSEEN"),
          extended=True)),
    (b'LIST () "" "" RETURN ()', List("", ("",), extended=True)),
    (b'LSUB "" *', Lsub("", "*")),
    (b"STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ APPENDLIMIT)",
     Status("INBOX", ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "HIGHESTMODSEQ",
                      "APPENDLIMIT"))),
    (b"status Drafts (messages)", Status("Drafts", ("MESSAGES",))),
    (b"APPEND INBOX {5+}\r\nhello", Append("INBOX", (AppendMessage(b"hello"),))),
    (b'APPEND INBOX (\\Seen $Forwarded) "01-Feb-2026 10:00:00 +0100" {5}\r\nhello',
     Append("INBOX", (AppendMessage(b"hello", ("\\Seen", "$Forwarded"),
                                    datetime.datetime(2026, 2, 1, 10, 0, tzinfo=UTC1)),))),
    (b'APPEND INBOX " 1-Feb-2026 10:00:00 -0000" {0+}\r\n',
     Append("INBOX", (AppendMessage(b"", (), datetime.datetime(2026, 2, 1, 10, 0, tzinfo=datetime.timezone.utc)),))),
    (b"APPEND INBOX () ~{3+}\r\na\x00b", Append("INBOX", (AppendMessage(b"a\x00b", binary=True),))),
    (b"APPEND INBOX UTF8 (~{4+}\r\n\xc3\xa9\r\n)", Append("INBOX", (AppendMessage(b"\xc3\xa9\r\n", binary=True),))),
    (b"APPEND INBOX {1+}\r\na (\\Draft) {1+}\r\nb",
     Append("INBOX", (AppendMessage(b"a"), AppendMessage(b"b", ("\\Draft",))))),
    (b"APPEND {5+}\r\nDraft {2+}\r\n\r\n", Append("Draft", (AppendMessage(b"\r\n"),))),
    (b"SEARCH ALL", Search((SearchKey("ALL"),))),
    (b"UID SEARCH CHARSET UTF-8 FROM alice", Search((SearchKey("FROM", ("alice",)),), "UTF-8", uid=True)),
    (b'SEARCH CHARSET "US-ASCII" TO {3+}\r\nbob', Search((SearchKey("TO", ("bob",)),), "US-ASCII")),
    (b"SEARCH RETURN () ALL", Search((SearchKey("ALL"),), returns=())),
    (b"SEARCH RETURN (MIN MAX COUNT ALL SAVE) CHARSET UTF-8 UNSEEN",
     Search((SearchKey("UNSEEN"),), "UTF-8", ("MIN", "MAX", "COUNT", "ALL", "SAVE"))),
    (b"SEARCH 1:5 NOT DELETED",
     Search((SearchKey("SEQUENCE", (ss((1, 5)),)), SearchKey("NOT", (SearchKey("DELETED"),))))),
    (b"SEARCH OR SEEN FLAGGED", Search((SearchKey("OR", (SearchKey("SEEN"), SearchKey("FLAGGED"))),))),
    (b"SEARCH (SEEN (UNDRAFT)) $",
     Search((SearchKey("AND", (SearchKey("SEEN"), SearchKey("AND", (SearchKey("UNDRAFT"),)))),
             SearchKey("SEQUENCE", (SequenceSet(saved=True),))))),
    (b'SEARCH HEADER Message-ID "<a@b>"', Search((SearchKey("HEADER", ("Message-ID", "<a@b>")),))),
    (b'SEARCH SINCE 1-Feb-2026 BEFORE "28-feb-2026" ON 29-Feb-2024',
     Search((SearchKey("SINCE", (datetime.date(2026, 2, 1),)), SearchKey("BEFORE", (datetime.date(2026, 2, 28),)),
             SearchKey("ON", (datetime.date(2024, 2, 29),))))),
    (b"SEARCH SENTBEFORE 1-Jan-2000 SENTON 1-Jan-2000 SENTSINCE 1-Jan-2000",
     Search(tuple(SearchKey(k, (datetime.date(2000, 1, 1),)) for k in ("SENTBEFORE", "SENTON", "SENTSINCE")))),
    (b"SEARCH LARGER 1000 SMALLER 9223372036854775807",
     Search((SearchKey("LARGER", (1000,)), SearchKey("SMALLER", (2**63 - 1,))))),
    (b"SEARCH KEYWORD $Forwarded UNKEYWORD $Junk",
     Search((SearchKey("KEYWORD", ("$Forwarded",)), SearchKey("UNKEYWORD", ("$Junk",))))),
    (b"SEARCH UID 1:* ANSWERED UNANSWERED",
     Search((SearchKey("UID", (ss((1, STAR)),)), SearchKey("ANSWERED"), SearchKey("UNANSWERED")))),
    (b"SEARCH MODSEQ 620162338", Search((SearchKey("MODSEQ", (620162338,)),))),
    (b'SEARCH MODSEQ "/flags/\\\\draft" all 0', Search((SearchKey("MODSEQ", ("/flags/\\draft", "all", 0)),))),
    (b"SEARCH TEXT {5+}\r\nhello BODY x", Search((SearchKey("TEXT", ("hello",)), SearchKey("BODY", ("x",))))),
    (b"SEARCH CHARSET ISO-8859-1 SUBJECT {1+}\r\n\xe9",
     Search((SearchKey("SUBJECT", ("\xe9",)),), "ISO-8859-1")),
    (b'SEARCH SUBJECT "gr\xc3\xbc\xc3\x9fe"', Search((SearchKey("SUBJECT", ("gr\u00fc\u00dfe",)),))),
    (b"SEARCH NEW OLD RECENT CC x BCC y", Search((SearchKey("NEW"), SearchKey("OLD"), SearchKey("RECENT"),
                                                   SearchKey("CC", ("x",)), SearchKey("BCC", ("y",))))),
    (b"FETCH 1 ALL", Fetch(ss(1), FETCH_MACROS["ALL"])),
    (b"FETCH 1 fast", Fetch(ss(1), FETCH_MACROS["FAST"])),
    (b"FETCH 1 FULL", Fetch(ss(1), FETCH_MACROS["FULL"])),
    (b"FETCH 2,4:* UID", Fetch(ss(2, (4, STAR)), (FetchAttribute("UID"),))),
    (b"FETCH 1:3 (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE UID MODSEQ)",
     Fetch(ss((1, 3)), tuple(FetchAttribute(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE",
                                                         "BODYSTRUCTURE", "UID", "MODSEQ")))),
    (b"FETCH * BODY[]", Fetch(ss((STAR, STAR)), (FetchAttribute("BODY", Section()),))),
    (b"FETCH 1 body.peek[header]<0.1024>", Fetch(ss(1), (FetchAttribute("BODY.PEEK", Section((), "HEADER"),
                                                                         (0, 1024)),))),
    (b'FETCH 1 (BODY.PEEK[HEADER.FIELDS (From "X-Spam")]<0.100>)', Fetch(ss(1), (HEADER_FROM,))),
    (b"FETCH 1 (BODY[1.2.MIME] BODY[1.TEXT] BODY[HEADER.FIELDS.NOT (Received)] BODY[3])",
     Fetch(ss(1), (FetchAttribute("BODY", Section((1, 2), "MIME")), FetchAttribute("BODY", Section((1,), "TEXT")),
                   FetchAttribute("BODY", Section((), "HEADER.FIELDS.NOT", ("Received",))),
                   FetchAttribute("BODY", Section((3,)))))),
    (b"FETCH 1 (BINARY[1.2] BINARY.PEEK[]<10.20> BINARY.SIZE[3])",
     Fetch(ss(1), (FetchAttribute("BINARY", Section((1, 2))), FetchAttribute("BINARY.PEEK", Section(), (10, 20)),
                   FetchAttribute("BINARY.SIZE", Section((3,)))))),
    (b"FETCH 1 (RFC822 RFC822.HEADER RFC822.TEXT BODY)",
     Fetch(ss(1), tuple(FetchAttribute(n) for n in ("RFC822", "RFC822.HEADER", "RFC822.TEXT", "BODY")))),
    (b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)",
     Fetch(ss((1, STAR)), (FetchAttribute("FLAGS"),), uid=True, changed_since=12345)),
    (b"STORE 1 FLAGS (\\Seen \\Deleted)", Store(ss(1), "replace", ("\\Seen", "\\Deleted"))),
    (b"STORE 1 +FLAGS.SILENT \\seen", Store(ss(1), "add", ("\\Seen",), silent=True)),
    (b"STORE 1 +flags \\Seen $Label1", Store(ss(1), "add", ("\\Seen", "$Label1"))),
    (b"UID STORE 2:4 (UNCHANGEDSINCE 0) -FLAGS ($Junk)",
     Store(ss((2, 4)), "remove", ("$Junk",), uid=True, unchanged_since=0)),
    (b"STORE 1 FLAGS ()", Store(ss(1), "replace", ())),
    (b"COPY 1:3 Trash", Copy(ss((1, 3)), "Trash")),
    (b'UID COPY 5 "Sent Items"', Copy(ss(5), "Sent Items", uid=True)),
    (b"MOVE 1 Junk", Move(ss(1), "Junk")),
    (b"UID MOVE 1,3 Junk", Move(ss(1, 3), "Junk", uid=True)),
]


@pytest.mark.parametrize("line, expected", VALID, ids=[line[:40].decode("latin-1") for line, _ in VALID])
def test_valid_commands(line, expected):
    data = b"t1 " + line + b"\r\n"
    events = assert_split_invariant(lambda: AutoApp(), data, every_split=len(data) < 200)
    assert bare(events) == [Command("t1", expected)]
    if not isinstance(expected, (Idle, Authenticate, Logout)):
        assert output_of(events).endswith(f"t1 OK {expected.name} completed\r\n".encode())
    assert parse_line(data[:-2]) == ("t1", expected)


def test_the_table_covers_every_command():
    assert set(COMMANDS) == {command.name for _, command in VALID}


def test_command_names_and_states():
    assert Fetch(ss(1), (), uid=True).name == "UID FETCH"
    assert Expunge(ss(1)).name == "UID EXPUNGE" and Expunge().name == "EXPUNGE"
    assert Capability.STATES == ANY_STATE
    assert Fetch.STATES == frozenset({SELECTED})
    assert Login.STATES == frozenset({"not authenticated"})
    assert set(COMMANDS) >= {"CAPABILITY", "APPEND", "UID MOVE", "UID EXPUNGE", "IDLE", "ID", "ENABLE"}


# ---------------------------------------------------------------------------
# the command table: invalid forms

INVALID = [
    (b"\r\n", "*", "Empty command line"),
    (b"+tag NOOP\r\n", "*", "Invalid tag"),
    (b"ta*g NOOP\r\n", "*", "Invalid tag"),
    (b" NOOP\r\n", "*", "Invalid tag"),
    (b"t\r\n", "t", "missing command"),
    (b"t  NOOP\r\n", "t", "expected a command name"),
    (b"t FROB\r\n", "t", "unknown command"),
    (b"t NOOP x\r\n", "t", "unexpected characters"),
    (b"t NOOP \r\n", "t", "unexpected characters"),
    (b"t LOGIN alice\r\n", "t", "missing arguments"),
    (b"t LOGIN\r\n", "t", "missing arguments"),
    (b"t LOGIN a b c\r\n", "t", "unexpected characters"),
    (b"t LOGIN a  b\r\n", "t", "expected a string"),
    (b"t LOGIN a \"b\r\n", "t", "expected a quoted string"),
    (b"t LOGIN \"\xff\" b\r\n", "t", "not valid UTF-8"),
    (b"t LOGIN a \"b\\x\"\r\n", "t", "expected a quoted string"),
    (b"t LOGIN a \"b\rc\"\r\n", "t", "expected a quoted string"),
    (b"t LOGIN {3}x\r\n", "t", "must end the line"),
    (b"t LOGIN ~{3+}\r\nabc b\r\n", "t", "expected a space"),
    (b"t ID (\"a\" ~{3+}\r\nabc)\r\n", "t", "literal8"),
    (b"t LOGIN {3+}\r\na\x00b b\r\n", "t", "NUL"),
    (b"t SELECT\r\n", "t", "missing arguments"),
    (b"t SELECT INBOX (QRESYNC)\r\n", "t", "unsupported select parameter"),
    (b"t SELECT INBOX ()\r\n", "t", "expected"),
    (b"t SELECT &Jjo\r\n", "t", "modified UTF-7"),
    (b"t SELECT &AGE-\r\n", "t", "canonical"),
    (b"t SELECT &Jjo-&Jjo-\r\n", "t", "canonical"),
    (b"t SELECT \"m\xc3\xbcller\"\r\n", "t", "8-bit"),
    (b"t SELECT m\xc3\xbcller\r\n", "t", "expected a space"),
    (b"t SELECT {3+}\r\na\x00b\r\n", "t", "NUL"),
    (b"t EXAMINE\r\n", "t", "missing"),
    (b"t CREATE x (USE (Sent))\r\n", "t", "backslash"),
    (b"t CREATE x (FOO)\r\n", "t", "unsupported create parameter"),
    (b"t RENAME a\r\n", "t", "missing"),
    (b"t DELETE\r\n", "t", "missing"),
    (b"t FETCH 0 FLAGS\r\n", "t", "sequence set"),
    (b"t FETCH 01 FLAGS\r\n", "t", "sequence set"),
    (b"t FETCH 4294967296 FLAGS\r\n", "t", "sequence set"),
    (b"t FETCH 1:x FLAGS\r\n", "t", "expected a space"),
    (b"t FETCH 1, FLAGS\r\n", "t", "expected a space"),
    (b"t FETCH 1 (FLAGS\r\n", "t", 'missing ")"'),
    (b"t FETCH 1 ()\r\n", "t", "fetch attribute"),
    (b"t FETCH 1 FLAGZ\r\n", "t", "unknown fetch attribute"),
    (b"t FETCH 1 BODY[5.X]\r\n", "t", "invalid section"),
    (b"t FETCH 1 BODY[0]\r\n", "t", "invalid section part"),
    (b"t FETCH 1 BODY[MIME]\r\n", "t", "invalid section"),
    (b"t FETCH 1 BODY[HEADER.FIELDS]\r\n", "t", "expected a space"),
    (b"t FETCH 1 BODY[HEADER.FIELDS ()]\r\n", "t", "expected"),
    (b"t FETCH 1 BODY[HEADER.FIELDS (a:b)]\r\n", "t", "field name"),
    (b"t FETCH 1 BODY.PEEK\r\n", "t", '"["'),
    (b"t FETCH 1 BODY[]<0.0>\r\n", "t", "partial"),
    (b"t FETCH 1 BODY[]<0>\r\n", "t", "partial"),
    (b"t FETCH 1 BINARY[TEXT]\r\n", "t", "section part"),
    (b"t FETCH 1 FLAGS (CHANGEDSINCE 0)\r\n", "t", "out of range"),
    (b"t FETCH 1 FLAGS (VANISHED)\r\n", "t", "unsupported fetch modifier"),
    (b"t FETCH 1\r\n", "t", "missing"),
    (b"t STORE 1 FLAGS\r\n", "t", "missing"),
    (b"t STORE 1 *FLAGS (\\Seen)\r\n", "t", "FLAGS"),
    (b"t STORE 1 FLAGS (\\)\r\n", "t", "flag"),
    (b"t STORE 1 FLAGS.LOUD (\\Seen)\r\n", "t", "FLAGS"),
    (b"t STORE 1 (UNCHANGEDSINCE x) FLAGS ()\r\n", "t", "mod-sequence"),
    (b"t COPY 1\r\n", "t", "missing"),
    (b"t MOVE x y\r\n", "t", "sequence set"),
    (b"t SEARCH\r\n", "t", "missing"),
    (b"t SEARCH FOO\r\n", "t", "unknown search key"),
    (b"t SEARCH SINCE 30-Feb-2026\r\n", "t", "no such date"),
    (b"t SEARCH SINCE 1-Foo-2026\r\n", "t", "month"),
    (b"t SEARCH SINCE 1-Feb-26\r\n", "t", "date"),
    (b"t SEARCH (SEEN\r\n", "t", '")"'),
    (b"t SEARCH ()\r\n", "t", "search key"),
    (b"t SEARCH OR SEEN\r\n", "t", "missing"),
    (b"t SEARCH LARGER 9223372036854775808\r\n", "t", "out of range"),
    (b"t SEARCH RETURN (FOO) ALL\r\n", "t", "unsupported return option"),
    (b"t SEARCH FROM \"\xff\"\r\n", "t", "UTF-8"),
    (b"t SEARCH " + b"NOT " * 40 + b"ALL\r\n", "t", "nested"),
    (b"t SEARCH " + b"(" * 40 + b"ALL" + b")" * 40 + b"\r\n", "t", "nested"),
    (b"t SEARCH MODSEQ \"/x\" all 5\r\n", "t", "entry name"),
    (b"t SEARCH MODSEQ \"/flags/\\\\seen\" none 5\r\n", "t", "entry type"),
    (b"t APPEND INBOX\r\n", "t", "missing"),
    (b"t APPEND INBOX (\\Seen)\r\n", "t", "missing"),
    (b"t APPEND INBOX \"hello\"\r\n", "t", "date-time"),
    (b"t APPEND INBOX \"1-Jan-2026 00:00:00 +0000\" {1+}\r\nx\r\n", "t", "date-time"),
    (b"t APPEND INBOX \"01-Jan-2026 25:00:00 +0000\" {1+}\r\nx\r\n", "t", "no such date-time"),
    (b"t APPEND INBOX \"01-Jan-2026 10:00:00 +2400\" {1+}\r\nx\r\n", "t", "no such date-time"),
    (b"t APPEND INBOX {3+}\r\na\x00b\r\n", "t", "NUL"),
    (b"t APPEND INBOX {1+}\r\na extra\r\n", "t", "expected the message literal"),
    (b"t APPEND INBOX UTF8 ~{1+}\r\na\r\n", "t", "expected"),
    (b"t APPEND INBOX UTF8 (~{1+}\r\na\r\n", "t", "missing \")\""),
    (b"t LIST\r\n", "t", "missing"),
    (b"t LIST \"\"\r\n", "t", "missing"),
    (b"t LIST (FOO) \"\" *\r\n", "t", "unsupported selection option"),
    (b"t LIST (RECURSIVEMATCH) \"\" *\r\n", "t", "RECURSIVEMATCH"),
    (b"t LIST \"\" * RETURN (FOO)\r\n", "t", "unsupported return option"),
    (b"t LIST \"\" * RETURN (STATUS ())\r\n", "t", "status items"),
    (b"t LIST \"\" * RETURN (STATUS (MESSAGES) STATUS (UNSEEN))\r\n", "t", "twice"),
    (b"t LIST \"\" * CHILDREN\r\n", "t", "RETURN"),
    (b"t LIST \"\" ()\r\n", "t", "expected"),
    (b"t LSUB \"\"\r\n", "t", "missing"),
    (b"t STATUS INBOX ()\r\n", "t", "status items"),
    (b"t STATUS INBOX (FOO)\r\n", "t", "unknown status item"),
    (b"t STATUS INBOX MESSAGES\r\n", "t", "expected"),
    (b"t ENABLE\r\n", "t", "missing"),
    (b"t ID\r\n", "t", "missing"),
    (b"t ID (\"a\")\r\n", "t", "expected a space"),
    (b"t ID (\"a\" \"b\"\r\n", "t", "missing"),
    (b"t AUTHENTICATE\r\n", "t", "missing"),
    (b"t AUTHENTICATE PLAIN abc\r\n", "t", "base64"),
    (b"t AUTHENTICATE PLAIN ab!=\r\n", "t", "base64"),
    (b"t UID\r\n", "t", "a command after UID"),
    (b"t UID FROB 1\r\n", "t", "unknown command"),
    (b"t UID EXPUNGE\r\n", "t", "missing"),
    (b"t UID NOOP\r\n", "t", "unknown command"),
    (b"t NOOP\nt2 NOOP\r\n", "t", "unexpected characters"),
]


@pytest.mark.parametrize("data, tag, text", INVALID, ids=[d[:40].decode("latin-1") for d, _, _ in INVALID])
def test_invalid_commands(data, tag, text):
    events = assert_split_invariant(lambda: AutoApp(), data + b"t9 NOOP\r\n")
    (bad, ok) = bare(events)
    assert isinstance(bad, BadCommand) and bad.tag == tag, bad
    assert text in bad.text, bad.text
    assert ok == Command("t9", Noop())  # the session goes on
    assert output_of(events).startswith(ImapServer().send(bad.response))


def test_bad_command_responses():
    assert BadCommand("a1", "nope").response == Tagged("a1", "BAD", "nope")
    assert ImapServer().send(BadCommand("*", "nope").response) == b"* BAD nope\r\n"


# ---------------------------------------------------------------------------
# synchronizing literals: the app decides before the client sends


def test_synchronizing_literal_waits_for_the_app():
    machine = ImapServer()
    machine.receive_data(b"a1 APPEND Drafts (\\Draft) {11}\r\na2 NOOP\r\n")
    request = machine.next_event()
    assert request == LiteralRequest("a1", "APPEND", 11, message=True, mailbox="Drafts")
    assert machine.phase == "wait" and machine.owed == "a Continuation or a tagged NO/BAD for the literal of a1"
    assert machine.pending_bytes() == len(b"a2 NOOP\r\n")  # nothing read while the app decides
    with pytest.raises(LocalProtocolError, match="before asking for the next event"):
        machine.next_event()
    with pytest.raises(LocalProtocolError, match="refuse it with NO or BAD"):
        machine.send(Tagged("a1", "OK", "fine"))
    assert machine.send(request.accept()) == b"+ Ready for literal data\r\n"
    # the client sent a2 NOOP before the "+": it is the literal's first octets now
    machine.receive_data(b"xx\r\n")
    assert machine.next_event() == Command("a1", Append("Drafts", (AppendMessage(b"a2 NOOP\r\nxx", ("\\Draft",)),)))


def test_no_tagged_answer_to_a_command_still_being_read():
    machine = ImapServer()
    machine.receive_data(b"a1 LOGIN {5}\r\n")
    machine.send(machine.next_event().accept())
    with pytest.raises(LocalProtocolError, match="still being read"):
        machine.send(Tagged("a1", "NO", "changed my mind"))
    machine.receive_data(b"alice bob\r\n")
    assert machine.next_event() == Command("a1", Login("alice", "bob"))
    assert machine.send(Tagged("a1", "OK", "done")) == b"a1 OK done\r\n"


def test_app_refuses_a_literal_before_it_is_sent():
    machine = ImapServer()
    machine.receive_data(b"a1 APPEND INBOX {5000}\r\na2 NOOP\r\n")
    request = machine.next_event()
    assert request.size == 5000 and request.message
    assert machine.send(request.refuse("Over your quota", code="OVERQUOTA")) == b"a1 NO [OVERQUOTA] Over your quota\r\n"
    assert machine.next_event() == Command("a2", Noop())
    assert machine.phase == "line"


def test_app_may_answer_other_commands_while_a_literal_decision_is_owed():
    machine = ImapServer()
    machine.receive_data(b"a1 LOGIN {5}\r\n")
    request = machine.next_event()
    assert machine.send(Untagged("OK still here")) == b"* OK still here\r\n"
    assert machine.send(Tagged("a0", "OK", "earlier command done")) == b"a0 OK earlier command done\r\n"
    assert machine.owed is not None
    assert machine.send(request.refuse("no literals before STARTTLS", status="BAD", code=None)) == (
        b"a1 BAD no literals before STARTTLS\r\n")


def test_literal_request_for_the_mailbox_then_for_the_message():
    machine = ImapServer()
    machine.receive_data(b"a1 APPEND {5}\r\n")
    first = machine.next_event()
    assert first == LiteralRequest("a1", "APPEND", 5)
    machine.send(first.accept())
    machine.receive_data(b"Draft (\\Seen) ~{3}\r\n")
    second = machine.next_event()
    assert second == LiteralRequest("a1", "APPEND", 3, message=True, mailbox="Draft", binary=True)
    machine.send(second.accept())
    machine.receive_data(b"a\x00b\r\n")
    assert machine.next_event() == Command("a1", Append("Draft", (AppendMessage(b"a\x00b", ("\\Seen",),
                                                                                 binary=True),)))


def test_machine_refuses_an_oversize_synchronizing_literal_before_it_is_sent():
    machine = ImapServer(max_append=100, max_literal=10)
    machine.receive_data(b"a1 APPEND INBOX {101}\r\na2 LOGIN {11}\r\na3 LOGIN {10}\r\n")
    too_big = machine.next_event()
    assert too_big == LiteralTooBig("a1", "APPEND", 101, 100, synchronizing=True, message=True)
    assert machine.send(too_big.response) == b"a1 NO [TOOBIG] Message too big\r\n"
    too_big = machine.next_event()
    assert too_big == LiteralTooBig("a2", "LOGIN", 11, 10, synchronizing=True)
    assert machine.send(too_big.response) == b"a2 BAD [TOOBIG] Literal too big\r\n"
    assert machine.next_event() == LiteralRequest("a3", "LOGIN", 10)


def test_literal_limits_at_their_edges():
    def run_command(data, **limits):
        return events_of(data, **limits)

    # max_literal: all literals of one command together
    assert run_command(b"a LOGIN {5+}\r\nalice {5+}\r\nsecre\r\n", max_literal=10)[0].command == Login("alice", "secre")
    assert run_command(b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n", max_literal=10) == [
        LiteralTooBig("a", "LOGIN", 6, 5, synchronizing=False)]
    # max_append: each message; max_append_total: all messages of one APPEND
    ok = run_command(b"a APPEND INBOX {10+}\r\n0123456789\r\n", max_append=10)
    assert ok[0].command.messages[0].data == b"0123456789"
    assert run_command(b"a APPEND INBOX {11+}\r\n0123456789x\r\n", max_append=10) == [
        LiteralTooBig("a", "APPEND", 11, 10, synchronizing=False, message=True)]
    multi = b"a APPEND INBOX {10+}\r\n0123456789 {10+}\r\n0123456789 {1+}\r\nx\r\n"
    assert len(run_command(multi, max_append=10, max_append_total=21)[0].command.messages) == 3
    assert run_command(multi, max_append=10, max_append_total=20) == [
        LiteralTooBig("a", "APPEND", 1, 0, synchronizing=False, message=True)]
    # the mailbox literal of an APPEND counts against max_literal, not max_append
    assert run_command(b"a APPEND {6+}\r\nDrafts {3+}\r\nabc\r\n", max_literal=5) == [
        LiteralTooBig("a", "APPEND", 6, 5, synchronizing=False)]


def test_oversize_non_synchronizing_literal_is_dropped_with_the_rest_of_its_command():
    hidden = b"h1 NOOP\r\nh2 LOGOUT\r\n"
    data = (b"a1 LOGIN {%d+}\r\n" % len(hidden) + hidden + b" x {2+}\r\nzz\r\n" + b"a2 NOOP\r\n")
    events = assert_split_invariant(lambda: AutoApp(max_literal=10), data)
    assert bare(events) == [LiteralTooBig("a1", "LOGIN", len(hidden), 10, False), Command("a2", Noop())]


def test_literal_minus_refuses_large_non_synchronizing_literals():
    big = b"x" * (LITERAL_MINUS_MAX + 1)
    data = (b"a1 SEARCH TEXT {%d+}\r\n" % len(big) + big + b"\r\n"
            b"a2 SEARCH TEXT {%d+}\r\n" % LITERAL_MINUS_MAX + big[:-1] + b"\r\n"
            b"a3 SEARCH TEXT {%d}\r\n" % len(big))
    limits = dict(literal_plus=False, max_literal=10_000)
    events = events_of(data, **limits)
    assert events[0] == LiteralTooBig("a1", "SEARCH", LITERAL_MINUS_MAX + 1, LITERAL_MINUS_MAX, False)
    assert events[0].response == Tagged("a1", "BAD", "Literal too big", "TOOBIG")
    assert events[1] == Command("a2", Search((SearchKey("TEXT", ("x" * LITERAL_MINUS_MAX,)),)))
    machine = ImapServer(**limits)
    machine.receive_data(data)
    assert [type(machine.next_event()) for _ in range(2)] == [LiteralTooBig, Command]
    assert machine.next_event() == LiteralRequest("a3", "SEARCH", LITERAL_MINUS_MAX + 1)  # synchronizing: asked
    # with LITERAL+ the same literal is simply taken
    assert isinstance(events_of(data[: data.index(b"a2")])[0], Command)


def test_a_refused_command_with_a_synchronizing_literal_expects_nothing_more():
    events = events_of(b"a1 FROB {5}\r\na2 NOOP\r\n")
    assert events == [BadCommand("a1", "unknown command"), Command("a2", Noop())]


def test_huge_literal_sizes_are_refused_not_misread():
    events = events_of(b"a1 LOGIN {99999999999999999999}\r\na2 NOOP\r\n")
    assert events == [LiteralTooBig("a1", "LOGIN", 99999999999999999999, 64 * 1024, True), Command("a2", Noop())]
    assert events_of(b"a1 LOGIN {999999999999999999999}\r\na2 NOOP\r\n")[0] == BadCommand(
        "a1", "LOGIN: expected a literal")


# ---------------------------------------------------------------------------
# IDLE


def test_idle_then_done():
    machine = ImapServer()
    machine.receive_data(b"a1 IDLE\r\n")
    assert machine.next_event() == Command("a1", Idle())
    with pytest.raises(LocalProtocolError, match="refusal for IDLE"):
        machine.next_event()
    assert machine.send(Continuation("idling")) == b"+ idling\r\n"
    assert machine.phase == "idle"
    assert machine.next_event() is NEED_DATA
    assert machine.send(Untagged("4 EXISTS")) == b"* 4 EXISTS\r\n"  # updates while idling
    with pytest.raises(LocalProtocolError, match="DONE"):
        machine.send(Tagged("a1", "OK", "too early"))
    machine.receive_data(b"DONE\r\na2 NOOP\r\n")
    done = machine.next_event()
    assert done == IdleDone("a1")
    assert machine.send(done.response) == b"a1 OK IDLE terminated\r\n"
    assert machine.next_event() == Command("a2", Noop())


def test_idle_refused_by_the_app():
    machine = ImapServer()
    machine.receive_data(b"a1 IDLE\r\nDONE\r\n")
    machine.next_event()
    assert machine.send(Tagged("a1", "NO", "not now")) == b"a1 NO not now\r\n"
    assert machine.next_event() == BadCommand("DONE", "missing command")


def test_idle_ended_by_something_else_is_a_bad_command():
    events = events_of(b"a1 IDLE\r\na2 NOOP\r\na3 NOOP\r\n")
    assert events == [Command("a1", Idle()), IdleDone("a1", "Expected DONE"), Command("a3", Noop())]
    assert IdleDone("a1", "Expected DONE").response == Tagged("a1", "BAD", "Expected DONE")
    long = events_of(b"a1 IDLE\r\n" + b"D" * 200 + b"\r\na3 NOOP\r\n", max_line=64)
    assert long == [Command("a1", Idle()), IdleDone("a1", "Expected DONE"), Command("a3", Noop())]


def test_continuation_only_when_one_is_expected():
    machine = ImapServer()
    with pytest.raises(LocalProtocolError, match="no continuation is expected"):
        machine.send(Continuation("go on"))
    machine.receive_data(b"a1 NOOP\r\n")
    machine.next_event()
    with pytest.raises(LocalProtocolError, match="no continuation is expected"):
        machine.send(Continuation("go on"))


# ---------------------------------------------------------------------------
# AUTHENTICATE


def test_authenticate_plain_with_a_continuation():
    machine = ImapServer()
    machine.receive_data(b"a1 AUTHENTICATE PLAIN\r\n")
    assert machine.next_event() == Command("a1", Authenticate("PLAIN"))
    with pytest.raises(LocalProtocolError, match="AUTHENTICATE"):
        machine.next_event()
    assert machine.send(Continuation.challenge(b"")) == b"+ \r\n"
    machine.receive_data(PLAIN_OK + b"\r\n")
    response = machine.next_event()
    assert response == AuthResponse("a1", b"\0alice\0secret")
    assert decode_plain(response.data) == ("", "alice", "secret")
    assert machine.send(Tagged("a1", "OK", "Logged in", "CAPABILITY IMAP4rev2")) == (
        b"a1 OK [CAPABILITY IMAP4rev2] Logged in\r\n")
    assert machine.phase == "line"


def test_authenticate_multi_step_and_cancel():
    machine = ImapServer()
    machine.receive_data(b"a1 AUTHENTICATE X-TWO-STEP\r\n")
    machine.next_event()
    assert machine.send(Continuation.challenge(b"first?")) == b"+ Zmlyc3Q/\r\n"
    machine.receive_data(b"MQ==\r\n")
    assert machine.next_event() == AuthResponse("a1", b"1")
    with pytest.raises(LocalProtocolError, match="AUTHENTICATE"):
        machine.next_event()
    machine.send(Continuation.challenge(b"second?"))
    with pytest.raises(LocalProtocolError, match="awaited"):
        machine.send(Tagged("a1", "OK", "not yet"))
    machine.receive_data(b"*\r\na2 NOOP\r\n")
    assert machine.next_event() == AuthResponse("a1", None)  # cancelled: no decision owed, answer BAD
    assert machine.next_event() == Command("a2", Noop())


def test_authenticate_empty_responses_and_bad_base64():
    events = events_of(b"a1 AUTHENTICATE PLAIN\r\n\r\na2 AUTHENTICATE PLAIN\r\n=\r\na3 AUTHENTICATE PLAIN\r\nabc\r\n")
    assert events[1] == AuthResponse("a1", b"")
    assert events[3] == AuthResponse("a2", b"")
    assert events[5] == BadCommand("a3", "Invalid base64 in SASL response")
    long = events_of(b"a1 AUTHENTICATE PLAIN\r\n" + b"QUFB" * 40 + b"\r\na2 NOOP\r\n", max_line=64)
    assert long[1:] == [BadCommand("a1", "SASL response too long"), Command("a2", Noop())]


@pytest.mark.parametrize("data", [b"", b"\0alice", b"\0\0secret", b"\0alice\0", b"a\0b\0c\0d", b"\0\xff\0x"])
def test_decode_plain_rejects_malformed(data):
    with pytest.raises(RemoteProtocolError):
        decode_plain(data)


def test_decode_plain_with_authzid():
    assert decode_plain(b"admin\0alice\0s\xc3\xa9cret") == ("admin", "alice", "s\u00e9cret")


# ---------------------------------------------------------------------------
# lines, bad commands, closing


def test_max_line_at_its_edge():
    line = b"a1 SEARCH TEXT " + b"x" * 60 + b"\r\n"
    assert events_of(line, max_line=len(line))[0].tag == "a1"
    assert events_of(line + b"a2 NOOP\r\n", max_line=len(line) - 1) == [
        BadCommand("a1", "Command line too long"), Command("a2", Noop())]


def test_a_line_after_a_literal_with_no_budget_left():
    first = b"a1 SEARCH SUBJECT " + b"s" * 34 + b" TEXT {1+}\r\n"
    assert len(first) == 64
    events = assert_split_invariant(lambda: AutoApp(max_line=64), first + b"x\r\na2 NOOP\r\n")
    assert bare(events) == [BadCommand("a1", "Command line too long"), Command("a2", Noop())]


def test_max_line_counts_every_line_of_a_command():
    first = b"a1 SEARCH SUBJECT " + b"s" * 50 + b" TEXT {1+}\r\n"
    data = first + b"x TEXT {1+}\r\ny\r\n"
    lines = len(first) + len(b" TEXT {1+}\r\n") + len(b"\r\n")  # the literals x and y do not count
    assert isinstance(events_of(data, max_line=lines)[0], Command)
    assert events_of(data + b"a2 NOOP\r\n", max_line=lines - 1) == [BadCommand("a1", "Command line too long"),
                                                                   Command("a2", Noop())]


def test_max_bad_commands():
    bad = b"x FROB\r\n"
    events = events_whole(lambda: AutoApp(max_bad_commands=2), bad * 2 + b"a NOOP\r\n" + bad * 3 + b"b NOOP\r\n")
    kinds = [type(item[0]).__name__ for item in events]
    assert kinds == ["BadCommand", "BadCommand", "Command", "BadCommand", "BadCommand", "ConnectionClosed"]
    assert events[-1][0] == ConnectionClosed("too many errors")
    assert events[-1][1] == b"* BYE Too many invalid commands\r\n"
    assert events_of(bad, max_bad_commands=0) == []


def test_logout_closes_and_ignores_the_rest():
    machine = ImapServer()
    machine.receive_data(b"a1 LOGOUT\r\na2 NOOP\r\n")
    assert machine.next_event() == Command("a1", Logout())
    assert machine.next_event() == ConnectionClosed("logout")
    machine.receive_data(b"a3 NOOP\r\n")
    assert machine.next_event() == ConnectionClosed("logout")
    assert machine.pending_bytes() == 0


def test_peer_close():
    machine = ImapServer()
    machine.receive_data(b"a1 NOOP\r\na2 LOGIN {5+}\r\nali")
    machine.receive_data(b"")
    assert machine.next_event() == Command("a1", Noop())
    assert machine.next_event() == ConnectionClosed("peer closed")  # the half command is dropped
    assert machine.next_event() == ConnectionClosed("peer closed")
    with pytest.raises(LocalProtocolError, match="after the end of the stream"):
        machine.receive_data(b"more")


def test_starttls_leaves_pipelined_bytes_unread():
    machine = ImapServer()
    machine.receive_data(b"a1 STARTTLS\r\n")
    assert machine.next_event() == Command("a1", StartTls())
    assert machine.pending_bytes() == 0
    injected = ImapServer()
    injected.receive_data(b"a1 STARTTLS\r\na2 LOGIN alice secret\r\n")
    injected.next_event()
    assert injected.pending_bytes() == len(b"a2 LOGIN alice secret\r\n")  # the pump refuses the switch


def test_utf8_names_after_enable():
    machine = ImapServer()
    machine.receive_data(b"a1 ENABLE UTF8=ACCEPT\r\na2 SELECT \"Entw\xc3\xbcrfe\"\r\na3 SELECT &Jjo-\r\n")
    assert machine.next_event() == Command("a1", Enable(("UTF8=ACCEPT",)))
    machine.utf8 = True  # the app enabled it: the pipelined commands are read as UTF-8
    assert machine.next_event() == Command("a2", Select("Entw\u00fcrfe"))
    assert machine.next_event() == Command("a3", Select("&Jjo-"))
    assert machine.send(Untagged((render.Atom("LIST"), (), "/", "\u263a"))) == '* LIST () "/" "\u263a"\r\n'.encode()
    machine.utf8 = False
    assert machine.send(Untagged(("\u263a",))) == b"* {3}\r\n\xe2\x98\xba\r\n"


# ---------------------------------------------------------------------------
# responses


def test_tagged_and_untagged_encoding():
    machine = ImapServer()
    assert machine.send(Tagged("a1", "OK", "done")) == b"a1 OK done\r\n"
    assert machine.send(Tagged("a1", "NO", "no such mailbox", "TRYCREATE")) == b"a1 NO [TRYCREATE] no such mailbox\r\n"
    assert machine.send(Untagged.status("OK", "Predicted next UID", "UIDNEXT 4392")) == (
        b"* OK [UIDNEXT 4392] Predicted next UID\r\n")
    assert machine.send(Untagged.status("BYE", "Server shutting down")) == b"* BYE Server shutting down\r\n"
    assert machine.send(Untagged(b"1 FETCH (BODY[] {5}\r\nhi\r\n!)")) == b"* 1 FETCH (BODY[] {5}\r\nhi\r\n!)\r\n"
    assert machine.send(Untagged((render.Atom("FLAGS"), render.flags(["\\seen", "$Junk"])))) == (
        b"* FLAGS (\\Seen $Junk)\r\n")


@pytest.mark.parametrize(
    "make",
    [
        lambda: Tagged("a 1", "OK", "x"),
        lambda: Tagged("*", "OK", "x"),
        lambda: Tagged("a+", "OK", "x"),
        lambda: Tagged("a1", "MAYBE", "x"),
        lambda: Tagged("a1", "OK", ""),
        lambda: Tagged("a1", "OK", "x\r\na2 OK injected"),
        lambda: Tagged("a1", "OK", "[ALERT] looks like a code"),
        lambda: Tagged("a1", "OK", "x", "CODE]"),
        lambda: Tagged("a1", "OK", "x", "CO\nDE"),
        lambda: Untagged(""),
        lambda: Untagged("a\rb"),
        lambda: Untagged(b"x\r\n* OK injected"),
        lambda: Untagged(b"1 FETCH (X {3}\r\nabcd\r\n* OK injected)"),
        lambda: Untagged(b"x {10}\r\nshort"),
        lambda: Untagged(()),
        lambda: Untagged(["a"]),
        lambda: Untagged.status("MAYBE", "x"),
        lambda: Continuation("a\nb"),
        lambda: render.Atom("a\r\n"),
    ],
)
def test_invalid_responses_are_local_errors(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_send_rejects_unknown_events_and_unrenderable_values():
    machine = ImapServer()
    for bad in (object(), b"* OK raw", Command("a", Noop())):
        with pytest.raises(LocalProtocolError):
            machine.send(bad)
    for value in ((object(),), (-1,), (True,), (render.Raw(b"x\r\n* OK injected"),)):
        with pytest.raises(LocalProtocolError):
            machine.send(Untagged(value))


def test_render_strings():
    assert render.string("hello") == b'"hello"'
    assert render.string('say "hi" \\o/') == b'"say \\"hi\\" \\\\o/"'
    assert render.string("line\r\nbreak") == b"{11}\r\nline\r\nbreak"
    assert render.string("gr\u00fc\u00df", utf8=True) == b'"gr\xc3\xbc\xc3\x9f"'
    assert render.string("gr\u00fc\u00df") == b"{6}\r\ngr\xc3\xbc\xc3\x9f"  # 8-bit only once enabled
    assert render.string(b"\xff", utf8=True) == b"{1}\r\n\xff"  # not UTF-8: a literal
    assert render.string("x" * (render.MAX_QUOTED + 1)).startswith(b"{1025}\r\n")
    assert render.string("") == b'""'
    assert render.astring("INBOX") == b"INBOX"
    assert render.astring("nil") == b'"nil"'
    assert render.astring("a b") == b'"a b"'
    assert render.astring("") == b'""'
    assert render.nstring(None) == b"NIL"
    assert render.value(render.Literal(b"a\x00b", binary=True)) == b"~{3}\r\na\x00b"
    assert render.value([1, None, "x", render.Atom("\\Seen"), (b"y",)]) == b'(1 NIL "x" \\Seen ("y"))'
    assert render.value(SequenceSet(((1, 3), (5, None)))) == b"1:3,5:*"


def test_render_responses():
    date = datetime.datetime(1996, 7, 17, 2, 44, 25, tzinfo=datetime.timezone(-datetime.timedelta(hours=7)))
    fetch = render.fetch(12, [
        ("UID", 4827313),
        ("FLAGS", render.flags(["\\Seen"])),
        ("INTERNALDATE", render.date_time(date)),
        (FetchAttribute("BODY.PEEK", Section((), "HEADER"), (0, 100)), b"Subject: hi\r\n"),
        ("ENVELOPE", render.Raw(b'("date" NIL NIL NIL NIL NIL NIL NIL NIL NIL)')),
    ])
    assert fetch == (b'12 FETCH (UID 4827313 FLAGS (\\Seen) INTERNALDATE "17-Jul-1996 02:44:25 -0700" '
                     b'BODY[HEADER]<0> {13}\r\nSubject: hi\r\n ENVELOPE ("date" NIL NIL NIL NIL NIL NIL NIL NIL NIL))')
    assert ImapServer().send(Untagged(fetch)).endswith(b"NIL))\r\n")
    assert render.list_response(["\\HasNoChildren", "\\Sent"], "/", "Sent Items", utf8=False) == (
        b'LIST (\\HasNoChildren \\Sent) "/" "Sent Items"')
    assert render.list_response([], "/", "\u263a", utf8=False, extended=[("CHILDINFO", ("SUBSCRIBED",))]) == (
        b'LIST () "/" &Jjo- (CHILDINFO ("SUBSCRIBED"))')
    assert render.list_response(["\\Noselect"], None, "", utf8=True, kind="LSUB") == b'LSUB (\\Noselect) NIL ""'
    assert render.list_response([], "/", "INBOX", utf8=True) == b'LIST () "/" INBOX'
    assert render.status_response("Entw\u00fcrfe", [("MESSAGES", 231), ("UIDNEXT", 44292)], utf8=False) == (
        b"STATUS Entw&APw-rfe (MESSAGES 231 UIDNEXT 44292)")
    assert render.search_response([2, 84, 882]) == b"SEARCH 2 84 882"
    assert render.search_response([], modseq=917162500) == b"SEARCH (MODSEQ 917162500)"
    assert render.esearch_response("A282", uid=True, results=[("MIN", 2), ("COUNT", 3),
                                                             ("ALL", SequenceSet.of([2, 10, 11]))]) == (
        b'ESEARCH (TAG "A282") UID MIN 2 COUNT 3 ALL 2,10:11')
    for bad in (lambda: render.fetch(-1, []), lambda: render.list_response([], "//", "x", utf8=True),
                lambda: render.flags(["bad flag"]), lambda: render.flags(["\\\\Seen"]),
                lambda: render.mailbox("\ud800", utf8=True),
                lambda: render.date_time(datetime.datetime(2026, 1, 1)), lambda: render.status_response(
                    "x", [("MESSAGES", -1)], utf8=True)):
        with pytest.raises(LocalProtocolError):
            bad()


def test_fetch_attribute_names():
    assert HEADER_FROM.response_name == "BODY[HEADER.FIELDS (From X-Spam)]<0>"
    assert str(HEADER_FROM) == "BODY.PEEK[HEADER.FIELDS (From X-Spam)]<0.100>"
    assert FetchAttribute("BINARY.PEEK", Section((1, 2)), (0, 5)).response_name == "BINARY[1.2]<0>"
    assert FetchAttribute("RFC822.SIZE").response_name == "RFC822.SIZE"
    assert [a.sets_seen for a in (FetchAttribute("BODY", Section()), FetchAttribute("BODY.PEEK", Section()),
                                  FetchAttribute("BODY"), FetchAttribute("RFC822"), FetchAttribute("RFC822.HEADER"),
                                  FetchAttribute("BINARY.SIZE", Section()))] == [True, False, False, True, False,
                                                                                  False]


# ---------------------------------------------------------------------------
# modified UTF-7


@pytest.mark.parametrize(
    "encoded, decoded",
    [
        ("&Jjo-!", "\u263a!"),
        ("~peter/mail/&U,BTFw-/&ZeVnLIqe-", "~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e"),
        ("&-", "&"),
        ("a&-b&-", "a&b&"),
        ("Entw&APw-rfe", "Entw\u00fcrfe"),
        ("&2D3eAA-", "\U0001f600"),
        ("INBOX", "INBOX"),
        ("", ""),
        ("&AAEAHw-", "\x01\x1f"),
    ],
)
def test_mutf7_known_vectors(encoded, decoded):
    assert decode_mutf7(encoded) == decoded
    assert encode_mutf7(decoded) == encoded


@pytest.mark.parametrize("text", ["&Jjo", "&Jjo-&Jjo-", "&AGE-", "&Jj-", "&J-", "\u00e9", "\x01", "&2D0-",
                                  "&,,,,-", "&Jjo=-", "&Jjp-", "&&-", "a&b"])
def test_mutf7_rejects_invalid_or_non_canonical(text):
    with pytest.raises(GrammarError):
        decode_mutf7(text)


@FAST
@given(st.text())
def test_mutf7_round_trip(text):
    encoded = encode_mutf7(text)
    assert all(" " <= c <= "~" for c in encoded)
    assert decode_mutf7(encoded) == text


@FAST
@given(st.text(st.sampled_from("&-AZaz09+,/=~\u00e9 ")))
def test_mutf7_decode_is_canonical_or_refuses(text):
    try:
        decoded = decode_mutf7(text)
    except GrammarError:
        return
    assert encode_mutf7(decoded) == text


# ---------------------------------------------------------------------------
# sequence sets

seq_numbers = st.integers(1, grammar.MAX_NUMBER) | st.none()
sequence_sets = st.lists(st.tuples(seq_numbers, seq_numbers), min_size=1, max_size=6).map(
    lambda ranges: SequenceSet(tuple(ranges)))


@FAST
@given(sequence_sets)
def test_sequence_set_round_trip(sequence_set):
    assert grammar.parse_sequence_set(str(sequence_set)) == sequence_set


@pytest.mark.parametrize(
    "text, ranges",
    [("1", ((1, 1),)), ("*", ((None, None),)), ("1:*", ((1, None),)), ("4:2", ((4, 2),)),
     ("2,4:7,9,12:*", ((2, 2), (4, 7), (9, 9), (12, None))), ("4294967295", ((2**32 - 1, 2**32 - 1),))],
)
def test_sequence_sets(text, ranges):
    assert grammar.parse_sequence_set(text) == SequenceSet(ranges)
    assert grammar.parse_sequence_set("$") == SequenceSet(saved=True)


@pytest.mark.parametrize("text", ["", "0", "1:0", "01", "1,", ",1", "1::2", "1:2:3", "a", "4294967296", "$,1",
                                  "1 ", "-1", "1:*:2", "*1"])
def test_invalid_sequence_sets(text):
    with pytest.raises(GrammarError):
        grammar.parse_sequence_set(text)


def test_sequence_set_resolve_and_of():
    assert SequenceSet(((4, 2), (7, None), (3, 3))).resolve(9) == ((2, 4), (7, 9))
    assert SequenceSet(((None, 5),)).resolve(3) == ((3, 5),)  # "*" below the low end, RFC 9051 §9
    assert SequenceSet(((None, None),)).resolve(0) == ((0, 0),)
    assert SequenceSet(((1, 3),)).contains(2, 10) and not SequenceSet(((1, 3),)).contains(4, 10)
    assert SequenceSet.of([5, 1, 2, 3, 9, 10]) == SequenceSet(((1, 3), (5, 5), (9, 10)))
    assert str(SequenceSet.of([5, 1, 2, 3, 9, 10])) == "1:3,5,9:10"
    with pytest.raises(LocalProtocolError):
        SequenceSet(saved=True).resolve(5)
    with pytest.raises(LocalProtocolError):
        SequenceSet.of([0])


# ---------------------------------------------------------------------------
# search key trees

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
dates = st.dates(min_value=datetime.date(1000, 1, 1), max_value=datetime.date(9999, 12, 31))
leaf_keys = st.one_of(
    st.sampled_from(["ALL", "SEEN", "UNSEEN", "DELETED", "FLAGGED", "ANSWERED", "DRAFT", "NEW", "OLD",
                     "RECENT", "UNDRAFT"]).map(SearchKey),
    st.tuples(st.sampled_from(["FROM", "TO", "CC", "BCC", "SUBJECT", "BODY", "TEXT"]), texts).map(
        lambda t: SearchKey(t[0], (t[1],))),
    st.tuples(st.sampled_from(["BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"]), dates).map(
        lambda t: SearchKey(t[0], (t[1],))),
    st.tuples(st.sampled_from(["LARGER", "SMALLER"]), st.integers(0, grammar.MAX_NUMBER64)).map(
        lambda t: SearchKey(t[0], (t[1],))),
    st.tuples(st.sampled_from(["KEYWORD", "UNKEYWORD"]), st.from_regex(r"\$?[A-Za-z][A-Za-z0-9_]{0,8}",
                                                                         fullmatch=True)).map(
        lambda t: SearchKey(t[0], (t[1],))),
    sequence_sets.map(lambda s: SearchKey("UID", (s,))),
    sequence_sets.map(lambda s: SearchKey("SEQUENCE", (s,))),
    st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True), texts).map(
        lambda t: SearchKey("HEADER", t)),
    st.integers(0, grammar.MAX_NUMBER64).map(lambda n: SearchKey("MODSEQ", (n,))),
)
search_keys = st.recursive(
    leaf_keys,
    lambda children: st.one_of(
        children.map(lambda key: SearchKey("NOT", (key,))),
        st.tuples(children, children).map(lambda pair: SearchKey("OR", pair)),
        st.lists(children, min_size=1, max_size=3).map(lambda keys: SearchKey("AND", tuple(keys))),
    ),
    max_leaves=8,
)


def search_wire(key: SearchKey) -> bytes:
    """A search key as a client writes it (test-side serializer)."""
    if key.name == "AND":
        return b"(" + b" ".join(search_wire(k) for k in key.args) + b")"
    if key.name == "SEQUENCE":
        return str(key.args[0]).encode()
    parts = [key.name.encode()]
    for arg in key.args:
        if isinstance(arg, SearchKey):
            parts.append(search_wire(arg))
        elif isinstance(arg, datetime.date):
            parts.append(f"{arg.day}-{grammar.MONTHS[arg.month - 1]}-{arg.year:04d}".encode())
        elif isinstance(arg, (int, SequenceSet)):
            parts.append(str(arg).encode())
        elif key.name in ("KEYWORD", "UNKEYWORD"):
            parts.append(arg.encode())
        else:
            parts.append(render.astring(arg))
    return b" ".join(parts)


@FAST
@given(st.lists(search_keys, min_size=1, max_size=3))
def test_search_keys_round_trip(keys):
    data = b" ".join(search_wire(key) for key in keys)
    assert grammar.parse_search_keys(data) == tuple(keys)


@FAST
@given(search_keys)
def test_search_command_through_the_machine(key):
    data = b"s1 UID SEARCH " + search_wire(key) + b"\r\n"
    events = bare(events_for_chunks(lambda: AutoApp(), [data[i : i + 5] for i in range(0, len(data), 5)]))
    assert events == [Command("s1", Search((key,), uid=True))]


def test_search_key_tree_shape():
    keys = grammar.parse_search_keys(b'OR (SEEN FROM "a b") NOT (1:3 UID 5) HEADER X-Spam yes')
    assert keys == (
        SearchKey("OR", (SearchKey("AND", (SearchKey("SEEN"), SearchKey("FROM", ("a b",)))),
                         SearchKey("NOT", (SearchKey("AND", (SearchKey("SEQUENCE", (ss((1, 3)),)),
                                                              SearchKey("UID", (ss(5),)))),)))),
        SearchKey("HEADER", ("X-Spam", "yes")),
    )
    depth = grammar.DEFAULT_MAX_DEPTH
    assert grammar.parse_search_keys(b"NOT " * depth + b"ALL")
    with pytest.raises(GrammarError, match="nested"):
        grammar.parse_search_keys(b"NOT " * (depth + 1) + b"ALL")
    assert grammar.parse_search_keys(b"(" * 3 + b"ALL" + b")" * 3, max_depth=3)
    with pytest.raises(GrammarError, match="nested"):
        grammar.parse_search_keys(b"(" * 4 + b"ALL" + b")" * 4, max_depth=3)


def test_search_depth_is_a_machine_limit():
    data = b"a SEARCH " + b"NOT " * 5 + b"ALL\r\n"
    assert isinstance(events_of(data, max_depth=5)[0], Command)
    assert isinstance(events_of(data, max_depth=4)[0], BadCommand)


# ---------------------------------------------------------------------------
# fetch attributes and dates

field_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True) | st.sampled_from(['Odd"Name', "a(b)"])
parts = st.lists(st.integers(1, 99), max_size=3).map(tuple)
sections = st.one_of(
    parts.map(Section),
    st.tuples(parts, st.sampled_from(["HEADER", "TEXT"])).map(lambda t: Section(t[0], t[1])),
    st.lists(st.integers(1, 99), min_size=1, max_size=3).map(lambda p: Section(tuple(p), "MIME")),
    st.tuples(parts, st.sampled_from(["HEADER.FIELDS", "HEADER.FIELDS.NOT"]),
              st.lists(field_names, min_size=1, max_size=3).map(tuple)).map(lambda t: Section(*t)),
)
partials = st.none() | st.tuples(st.integers(0, 2**40), st.integers(1, 2**40))
fetch_attributes = st.one_of(
    st.sampled_from(["ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE", "RFC822.TEXT",
                     "BODY", "BODYSTRUCTURE", "UID", "MODSEQ"]).map(FetchAttribute),
    st.tuples(st.sampled_from(["BODY", "BODY.PEEK"]), sections, partials).map(lambda t: FetchAttribute(*t)),
    st.tuples(st.sampled_from(["BINARY", "BINARY.PEEK"]), parts.map(Section), partials).map(
        lambda t: FetchAttribute(*t)),
    parts.map(lambda p: FetchAttribute("BINARY.SIZE", Section(p))),
)


@FAST
@given(st.lists(fetch_attributes, min_size=1, max_size=5))
def test_fetch_attributes_round_trip(attributes):
    data = ("(" + " ".join(map(str, attributes)) + ")").encode()
    assert grammar.parse_fetch_attributes(data) == tuple(attributes)


@FAST
@given(st.datetimes(min_value=datetime.datetime(1000, 1, 1), max_value=datetime.datetime(9999, 12, 31),
                    timezones=st.sampled_from([datetime.timezone.utc, UTC1,
                                               datetime.timezone(-datetime.timedelta(hours=9, minutes=30))])))
def test_date_time_round_trip(value):
    value = value.replace(microsecond=0)
    assert grammar.parse_date_time(render.value(render.date_time(value))) == value


def test_dates():
    assert grammar.parse_date(b"1-Jan-2026") == datetime.date(2026, 1, 1)
    assert grammar.parse_date(b'"01-jan-2026"') == datetime.date(2026, 1, 1)
    for bad in (b"1-Jan-26", b"32-Jan-2026", b"1-Jan-2026x", b'"1-Jan-2026', b"1 Jan 2026", b"0-Jan-2026"):
        with pytest.raises(GrammarError):
            grammar.parse_date(bad)


# ---------------------------------------------------------------------------
# rendering round trips

binaries_without_nul = st.binary(max_size=1200).filter(lambda b: b"\x00" not in b)


@FAST
@given(binaries_without_nul, st.booleans())
def test_render_string_round_trip(data, utf8):
    rendered = render.string(data, utf8=utf8)
    render.check_response_data(rendered)
    assert grammar.parse_string(rendered) == data
    assert grammar.parse_astring(render.astring(data, utf8=utf8)) == data


@FAST
@given(texts, st.booleans())
def test_render_text_round_trip(text, utf8):
    assert grammar.parse_string(render.string(text, utf8=utf8)).decode() == text
    assert render.value(text, utf8=utf8) == render.string(text, utf8=utf8)


@FAST
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20),
       st.booleans())
def test_render_mailbox_round_trip(name, utf8):
    expected = "INBOX" if name.upper() == "INBOX" else name
    assert grammar.run(Reader.mailbox, render.mailbox(name, utf8=utf8), utf8=utf8) == expected


@FAST
@given(st.recursive(st.none() | st.integers(0, 2**40) | binaries_without_nul | texts,
                    lambda children: st.lists(children, max_size=4), max_leaves=10))
def test_rendered_values_never_hold_a_bare_line_end(item):
    render.check_response_data(render.value(item))


# ---------------------------------------------------------------------------
# fuzzing: the machine never raises, and the split never matters

TOKENS = [
    b"a1 NOOP\r\n", b"a2 LOGIN {5}\r\n", b"alice", b"{3+}\r\n", b"abc", b"a3 APPEND INBOX {4+}\r\n", b"a4 IDLE\r\n",
    b"DONE\r\n", b"a5 AUTHENTICATE PLAIN\r\n", PLAIN_OK + b"\r\n", b"*\r\n", b"a6 SEARCH OR (SEEN", b" FROM {2}\r\n",
    b"x", b")", b"a7 FETCH 1:* (BODY.PEEK[HEADER.FIELDS (From)]<0.5>)\r\n", b"\r\n", b"\r", b"\n", b"~{2+}\r\n",
    b"\x00", b"{99999999999}\r\n", b"{30+}\r\n", b"a8 LOGOUT\r\n", b" ", b"(", b'"', b"\\", b"y" * 100,
    b"a9 SELECT &Jjo-\r\n", b"a10 UID STORE 1 +FLAGS (\\Seen)\r\n", b"a11 APPEND INBOX ~{3}\r\n", b"{0}\r\n",
    b"a12 STARTTLS\r\n", b"a13 ID (\"a\" NIL)\r\n", b"a14 LIST \"\" (% *)\r\n",
]
LIMITS = dict(max_line=128, max_literal=40, max_append=60, max_append_total=80, max_bad_commands=5)
sessions = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=8), max_size=40).map(b"".join)


def check_events(events: list) -> None:
    """Invariants of any event stream: known events only, bounded literals, well-formed output."""
    for item in events:
        assert isinstance(item, tuple) and item[0] != "error", item
        event = item[0]
        assert isinstance(event, (Command, BadCommand, LiteralRequest, LiteralTooBig, IdleDone, AuthResponse,
                                  ConnectionClosed)), event
        if isinstance(event, Command) and isinstance(event.command, Append):
            sizes = [len(m.data) for m in event.command.messages]
            assert max(sizes) <= LIMITS["max_append"] and sum(sizes) <= LIMITS["max_append_total"]
        if isinstance(event, LiteralRequest):
            assert event.size <= (LIMITS["max_append"] if event.message else LIMITS["max_literal"])
    output = output_of(events)
    assert not output or output.endswith(b"\r\n")


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
@given(st.binary(max_size=200))
def test_fuzz_the_parser_alone(data):
    """Straight into the command parser, literals inline: only GrammarError may escape."""
    with contextlib.suppress(GrammarError):
        parse_line(data)
    with contextlib.suppress(GrammarError):
        parse_line(b"t SEARCH " + data)
    with contextlib.suppress(GrammarError):
        parse_line(b"t FETCH 1 " + data)
    with contextlib.suppress(GrammarError):
        grammar.decode_mutf7(data.decode("latin-1"))


@FAST
@given(st.binary(max_size=100), st.sampled_from([b"a1 IDLE\r\n", b"a1 AUTHENTICATE PLAIN\r\n", b"a1 LOGIN {5}\r\n",
                                                  b"a1 APPEND INBOX {30+}\r\n", b"a1 LOGIN {50+}\r\n"]))
def test_fuzz_after_each_kind_of_continuation(data, opening):
    events = assert_split_invariant(lambda: AutoApp(**LIMITS), opening + data + b"\r\na2 NOOP\r\n",
                                    every_split=False)
    check_events(events)


# ---------------------------------------------------------------------------
# cost: linear in the command, whatever it holds


def test_many_literals_are_parsed_in_linear_time():
    count = 4000
    data = b"a1 SEARCH" + b" TEXT {1+}\r\nx" * count + b"\r\n"
    start = time.perf_counter()
    (event,) = events_of(data, max_literal=count)
    assert time.perf_counter() - start < 5
    assert len(event.command.criteria) == count


def test_pathological_lines_parse_fast():
    for line in (b"a SEARCH " + b"1," * 20000 + b"1", b"a SEARCH " + b"(" * 20000, b"a SELECT \"" + b"\\\\" * 20000,
                 b"a FETCH 1 (" + b"FLAGS " * 8000 + b")", b"a LOGIN " + b"&" * 60000, b"a " + b"x" * 60000,
                 b"a SELECT &" + b"A" * 60000 + b"-"):
        start = time.perf_counter()
        events_of(line + b"\r\n")
        assert time.perf_counter() - start < 2, line[:20]


# ---------------------------------------------------------------------------
# through the real pump: a session with a synchronizing literal over a socket


def test_session_over_the_pump(loop_name):
    async def serve(pump: Pump) -> list:
        await pump.write(pump.machine.send(Untagged.status("OK", "IMAP4rev2 ready")))
        app, seen = AutoApp(), []
        while True:
            event = await pump.next_event(timeout=5)
            seen.append(event)
            if isinstance(event, ConnectionClosed):
                return seen
            await pump.send_all(app.answer(event))

    async def scenario():
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        server_reader, server_writer = await accepted
        task = asyncio.create_task(serve(Pump(server_reader, server_writer, ImapServer())))
        assert await reader.readline() == b"* OK IMAP4rev2 ready\r\n"
        message = b"Subject: hi\r\n\r\n" + b"x" * 100_000 + b"\r\n"
        writer.write(b"a1 APPEND INBOX {%d}\r\n" % len(message))
        assert await reader.readline() == b"+ Ready for literal data\r\n"
        writer.write(message + b"\r\na2 LOGOUT\r\n")
        lines = [await reader.readline() for _ in range(3)]
        assert lines == [b"a1 OK APPEND completed\r\n", b"* BYE Logging out\r\n", b"a2 OK LOGOUT completed\r\n"]
        seen = await asyncio.wait_for(task, 5)
        assert seen[1] == Command("a1", Append("INBOX", (AppendMessage(message),)))
        writer.close()
        server_writer.close()
        server.close()
        await server.wait_closed()

    run_on(loop_name, scenario())
