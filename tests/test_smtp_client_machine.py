"""Pure machine tests of intermail.proto.smtp.client: the SMTP/LMTP client against scripted server replies.

Sessions run in memory.  :class:`Driver` stands in front of the machine the
way :mod:`intermail.delivery.lmtp` does (Hello after the greeting, the next
Transaction after LHLO or TransactionDone, the body after a 354) and reports
every event together with the bytes its reaction wrote, so the split-feed
helper checks the client's output as well as its events.  The last section
connects the client machine to our own LMTP server machine, both in memory.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.errors import LocalProtocolError, RemoteProtocolError
from intermail.proto import NEED_DATA
from intermail.proto.dotstuff import DotStuffer
from intermail.proto.smtp import client as C
from intermail.proto.smtp.client import (
    Body,
    Capabilities,
    ConnectionClosed,
    EndOfData,
    Greeting,
    Hello,
    Quit,
    RecipientResult,
    Replied,
    Reset,
    SendData,
    SmtpClient,
    Transaction,
    TransactionDone,
    parse_capabilities,
    stuff_body,
)
from intermail.proto.smtp.lmtp_server import (
    AutoReply,
    LmtpServer,
    MailFrom,
    MessageData,
    MessageEnd,
    RcptTo,
    RecipientReplies,
)
from intermail.proto.smtp.lmtp_server import ConnectionClosed as ServerClosed
from intermail.proto.smtp.lmtp_server import Greeting as ServerGreeting
from intermail.proto.smtp.replies import Reply
from intermail.testing.feed import assert_split_invariant, events_for_chunks, events_whole

ME = "mta1.intermail.test"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GREETING = b"220 mss1.intermail.test LMTP service ready\r\n"
LHLO_PIPELINING = (b"250-mss1.intermail.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
                   b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 1000\r\n250 CHUNKING\r\n")
LHLO_PLAIN = b"250-sink.test\r\n250-8BITMIME\r\n250 SIZE\r\n"
TXN = Transaction("sender@example.test", ("ann@x.test", "nobody@x.test", "bob@x.test"), ("XDELIVERYKEY=Q1",))
COMMANDS = (b"MAIL FROM:<sender@example.test> XDELIVERYKEY=Q1\r\n"
            b"RCPT TO:<ann@x.test>\r\nRCPT TO:<nobody@x.test>\r\nRCPT TO:<bob@x.test>\r\n")
BODY = b"Subject: hi\r\n\r\n.leading dot\r\nlast line without CRLF"
STUFFED = b"Subject: hi\r\n\r\n..leading dot\r\nlast line without CRLF\r\n.\r\n"

OK_MAIL = b"250 2.1.0 Sender ok\r\n"
OK_RCPT = b"250 2.1.5 Recipient ok\r\n"
NO_USER = b"550 5.1.1 No such user\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"


# ---------------------------------------------------------------------------
# helpers


class Driver:
    """A Machine for the split-feed helper: reacts like the delivery driver, returns (event, bytes written).

    After ConnectionClosed it reports NEED_DATA (the machine itself repeats
    ConnectionClosed forever).  Reactions never depend on anything but the
    events, so the output may be compared across input splits too.
    """

    def __init__(self, lmtp: bool = True, transactions=(TXN,), body=(BODY,), **limits):
        self.machine = SmtpClient(lmtp, ME, **limits)
        self.todo = list(transactions)
        self.body = body
        self.done = False

    def receive_data(self, data: bytes) -> None:
        self.machine.receive_data(data)

    def next_event(self):
        if self.done:
            return NEED_DATA
        event = self.machine.next_event()
        if event is NEED_DATA:
            return event
        return event, self.react(event)

    def send(self, event) -> bytes:
        return self.machine.send(event)

    def react(self, event) -> bytes:
        machine = self.machine
        if isinstance(event, SendData):
            return event.data
        if isinstance(event, ConnectionClosed):
            self.done = True
            return b""
        if machine.closed:
            return b""
        if isinstance(event, Greeting):
            return machine.send(Hello() if event.reply.accepted else Quit())
        if isinstance(event, Replied) and event.command in (C.LHLO, C.EHLO):
            return self.next_transaction(reset=False) if event.reply.accepted else machine.send(Quit())
        if isinstance(event, Replied) and event.command == C.DATA and machine.awaiting == "body":
            return b"".join(machine.send(Body(chunk)) for chunk in self.body) + machine.send(EndOfData())
        if isinstance(event, TransactionDone):
            return self.next_transaction(reset=True)
        return b""

    def next_transaction(self, reset: bool) -> bytes:
        if not self.todo:
            return self.machine.send(Quit())
        out = self.machine.send(Reset()) if reset else b""
        return out + self.machine.send(self.todo.pop(0))


def run(data: bytes, **kwargs) -> tuple[list, bytes]:
    """(events, everything the client wrote) for server output ``data``, checked for split invariance."""
    items = assert_split_invariant(lambda: Driver(**kwargs), data, every_split=len(data) < 600)
    return [item[0] for item in items], written(items)


def written(items: list) -> bytes:
    return b"".join(item[1] for item in items if isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[1], bytes))


def of(events: list, kind) -> list:
    return [event for event in events if isinstance(event, kind)]


def codes(replies) -> list[int]:
    return [reply.code for reply in replies]


class Session:
    """Step by step: feed server bytes, get the events (SendData included) of that step."""

    def __init__(self, lmtp: bool = True, **limits):
        self.machine = SmtpClient(lmtp, ME, **limits)

    def feed(self, data: bytes) -> list:
        self.machine.receive_data(data)
        out = []
        while (event := self.machine.next_event()) is not NEED_DATA:
            out.append(event)
            if isinstance(event, ConnectionClosed):
                break
        return out

    def ready(self, hello_reply: bytes = LHLO_PIPELINING) -> None:
        assert isinstance(self.feed(GREETING)[0], Greeting)
        self.machine.send(Hello())
        self.feed(hello_reply)
        assert self.machine.capabilities is not None


# ---------------------------------------------------------------------------
# greeting, LHLO/EHLO, capabilities


def test_greeting_and_lhlo():
    session = Session()
    (greeting,) = session.feed(GREETING)
    assert greeting == Greeting(Reply(220, None, "mss1.intermail.test LMTP service ready"))
    assert session.machine.send(Hello()) == b"LHLO mta1.intermail.test\r\n"
    caps, replied = session.feed(LHLO_PIPELINING)
    assert isinstance(caps, Capabilities) and replied.command == C.LHLO and replied.reply.code == 250
    assert (caps.server_name, caps.pipelining, caps.size, caps.eightbitmime, caps.smtputf8, caps.chunking,
            caps.enhancedstatuscodes) == ("mss1.intermail.test", True, 1000, True, True, True, True)
    assert session.machine.capabilities == caps


def test_ehlo_in_smtp_mode():
    session = Session(lmtp=False)
    session.feed(b"220 sink.test ESMTP\r\n")
    assert session.machine.send(Hello()) == b"EHLO mta1.intermail.test\r\n"
    caps, replied = session.feed(LHLO_PLAIN)
    assert replied.command == C.EHLO
    assert not caps.pipelining and caps.size is None and caps.has("size") and caps.eightbitmime


@pytest.mark.parametrize("lines, expected", [
    (("mx.test Hello",), {}),
    (("mx", "SIZE 0"), {"size": None}),
    (("mx", "SIZE"), {"size": None}),
    (("mx", "SIZE 35882577"), {"size": 35882577}),
    (("mx", "SIZE lots"), {"size": None}),
    (("mx", "size 10", "pipelining"), {"size": 10, "pipelining": True}),
    (("mx", "AUTH=LOGIN PLAIN", "AUTH PLAIN LOGIN", "XDELIVERYKEY"), {}),
])
def test_parse_capabilities(lines, expected):
    caps = parse_capabilities(Reply(250, None, lines))
    for field, value in expected.items():
        assert getattr(caps, field) == value
    assert caps.server_name == lines[0].split()[0]
    if "AUTH PLAIN LOGIN" in lines:
        assert caps.extensions["AUTH"] == ("PLAIN", "LOGIN") and caps.has("xdeliverykey")
        assert "AUTH=LOGIN" not in caps.extensions


def test_refused_greeting_allows_only_quit():
    session = Session()
    (greeting,) = session.feed(b"554 5.3.2 go away\r\n")
    assert greeting.reply.code == 554
    with pytest.raises(LocalProtocolError):
        session.machine.send(Hello())
    assert session.machine.send(Quit()) == b"QUIT\r\n"
    replied, closed = session.feed(b"221 bye\r\n")
    assert replied.command == C.QUIT and closed == ConnectionClosed(C.QUIT_DONE, replied.reply)


def test_421_greeting_closes():
    session = Session()
    greeting, closed = session.feed(b"421 4.3.2 busy\r\n")
    assert greeting.reply.code == 421 and closed.reason == C.SERVER_CLOSING and closed.reply.code == 421
    assert session.machine.closed
    with pytest.raises(LocalProtocolError):
        session.machine.send(Quit())


def test_refused_hello_leaves_no_capabilities():
    session = Session()
    session.feed(GREETING)
    session.machine.send(Hello())
    (replied,) = session.feed(b"500 5.5.1 This is LMTP: use LHLO\r\n")
    assert replied.reply.code == 500 and session.machine.capabilities is None
    with pytest.raises(LocalProtocolError):
        session.machine.send(TXN)


# ---------------------------------------------------------------------------
# pipelined LMTP


def test_pipelined_lmtp_partial_refusal_and_per_recipient_replies():
    server = (GREETING + LHLO_PIPELINING + OK_MAIL + OK_RCPT + NO_USER + OK_RCPT + GO_AHEAD
              + b"250 2.0.0 delivered to ann\r\n452 4.2.2 bob over quota\r\n" + b"221 2.0.0 Bye\r\n")
    events, out = run(server)
    # one write for MAIL + every RCPT + DATA (RFC 2920), the body after the 354
    assert out == b"LHLO mta1.intermail.test\r\n" + COMMANDS + b"DATA\r\n" + STUFFED + b"QUIT\r\n"
    assert [(e.command, e.recipient) for e in of(events, Replied)] == [
        ("LHLO", None), ("MAIL", None), ("RCPT", 0), ("RCPT", 1), ("RCPT", 2), ("DATA", None), ("QUIT", None)]
    assert [(r.recipient_index, r.reply.code) for r in of(events, RecipientResult)] == [(0, 250), (2, 452)]
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [250, 550, 452]
    assert done.replies[1].enhanced == "5.1.1"
    assert events[-1] == ConnectionClosed(C.QUIT_DONE, Reply(221, "2.0.0", "Bye"))


def test_pipelined_writes_everything_at_once():
    session = Session()
    session.ready()
    assert session.machine.send(TXN) == COMMANDS + b"DATA\r\n"
    assert session.machine.awaiting == C.MAIL


def test_pipelined_reset_goes_with_the_next_transaction():
    session = Session()
    session.ready()
    assert session.machine.send(Reset()) == b"RSET\r\n"
    assert session.machine.send(TXN) == COMMANDS + b"DATA\r\n"
    events = session.feed(b"250 2.0.0 Ok\r\n" + OK_MAIL)
    assert [e.command for e in events] == ["RSET", "MAIL"]


def test_pipelined_no_recipient_accepted_data_refused():
    server = GREETING + LHLO_PIPELINING + OK_MAIL + NO_USER * 3 + b"503 5.5.1 No valid recipients\r\n"
    server += b"221 Bye\r\n"
    events, out = run(server, body=(b"never sent",))
    assert b"never sent" not in out
    assert out.endswith(b"DATA\r\nQUIT\r\n")
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [550, 550, 550]


def test_pipelined_mail_refused_gives_every_recipient_the_mail_reply():
    server = (GREETING + LHLO_PIPELINING + b"452 4.3.1 Insufficient system storage\r\n"
              + b"503 5.5.1 Need MAIL before RCPT\r\n" * 3 + b"503 5.5.1 Need MAIL before DATA\r\n")
    events, _ = run(server)
    (done,) = of(events, TransactionDone)
    assert [(r.code, r.enhanced) for r in done.replies] == [(452, "4.3.1")] * 3


def test_pipelined_354_without_recipients_smtp_sends_a_lone_dot():
    """RFC 2920 §3.1: DATA accepted although no RCPT was: send a single dot, take its reply."""
    server = b"220 sink\r\n" + b"250-sink\r\n250 PIPELINING\r\n" + OK_MAIL + NO_USER * 3 + GO_AHEAD
    server += b"554 5.5.1 No valid recipients\r\n" + b"221 Bye\r\n"
    events, out = run(server, lmtp=False, body=(b"never sent",))
    assert b"never sent" not in out
    assert out.endswith(b"DATA\r\n.\r\nQUIT\r\n")
    assert SendData(b".\r\n") in events
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [550, 550, 550]


def test_pipelined_354_without_recipients_lmtp_is_a_protocol_error():
    server = GREETING + LHLO_PIPELINING + OK_MAIL + NO_USER * 3 + GO_AHEAD
    items = events_whole(lambda: Driver(), server)
    assert items[-1][0] == "error" and "RFC 2033" in items[-1][1]
    assert not any(isinstance(item[0], Replied) and item[0].command == C.DATA for item in items[:-1])


def test_data_refused_applies_to_accepted_recipients():
    server = GREETING + LHLO_PIPELINING + OK_MAIL + OK_RCPT + NO_USER + OK_RCPT + b"451 4.3.0 Try later\r\n"
    events, out = run(server)
    assert BODY not in out
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [451, 550, 451]


# ---------------------------------------------------------------------------
# one command at a time (no PIPELINING)


def test_non_pipelined_smtp_session_step_by_step():
    session = Session(lmtp=False)
    session.ready(LHLO_PLAIN)
    machine = session.machine
    assert machine.send(TXN) == b"MAIL FROM:<sender@example.test> XDELIVERYKEY=Q1\r\n"
    machine.receive_data(OK_MAIL)
    assert machine.next_event().command == C.MAIL
    with pytest.raises(LocalProtocolError, match="SendData"):
        machine.send(Quit())  # a pending SendData must be taken (and written) first
    assert machine.next_event() == SendData(b"RCPT TO:<ann@x.test>\r\n")
    assert session.feed(OK_RCPT)[1] == SendData(b"RCPT TO:<nobody@x.test>\r\n")
    assert session.feed(NO_USER)[1] == SendData(b"RCPT TO:<bob@x.test>\r\n")
    replied, send = session.feed(OK_RCPT)
    assert replied == Replied(C.RCPT, Reply(250, "2.1.5", "Recipient ok"), 2) and send == SendData(b"DATA\r\n")
    (replied,) = session.feed(GO_AHEAD)
    assert machine.awaiting == "body"
    assert machine.send(Body(BODY[:20])) + machine.send(Body(BODY[20:])) + machine.send(EndOfData()) == STUFFED
    replied, done = session.feed(b"250 2.0.0 Ok: queued as 123\r\n")
    assert replied.command == C.END_OF_DATA
    assert codes(done.replies) == [250, 550, 250] and done.replies[0] is done.replies[2]
    assert not machine.in_transaction


def test_non_pipelined_all_recipients_refused_sends_no_data():
    server = b"220 sink\r\n" + LHLO_PLAIN + OK_MAIL + NO_USER * 3 + b"221 Bye\r\n"
    events, out = run(server, lmtp=False)
    assert b"DATA" not in out and out.endswith(b"RCPT TO:<bob@x.test>\r\nQUIT\r\n")
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [550, 550, 550]


def test_non_pipelined_mail_refused_sends_no_rcpt():
    server = b"220 sink\r\n" + LHLO_PLAIN + b"550 5.7.1 Sender refused\r\n" + b"221 Bye\r\n"
    events, out = run(server, lmtp=False)
    assert b"RCPT" not in out
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [550, 550, 550]


def test_non_pipelined_lmtp_per_recipient_replies():
    server = GREETING + b"250 mss1\r\n" + OK_MAIL + OK_RCPT + NO_USER + OK_RCPT + GO_AHEAD
    server += b"250 2.0.0 ann ok\r\n250 2.0.0 bob ok\r\n221 Bye\r\n"
    events, out = run(server)
    assert out == (b"LHLO mta1.intermail.test\r\n" + COMMANDS + b"DATA\r\n" + STUFFED + b"QUIT\r\n")
    assert [(r.recipient_index, r.reply.text) for r in of(events, RecipientResult)] == [(0, "ann ok"),
                                                                                         (2, "bob ok")]


def test_non_pipelined_reset_holds_the_transaction_until_answered():
    session = Session(lmtp=False)
    session.ready(LHLO_PLAIN)
    assert session.machine.send(Reset()) == b"RSET\r\n"
    assert session.machine.send(TXN) == b""
    replied, send = session.feed(b"250 Ok\r\n")
    assert replied.command == C.RSET and send.data.startswith(b"MAIL FROM:")


def test_smtp_one_reply_after_data_applies_to_all_accepted():
    server = b"220 sink\r\n" + LHLO_PLAIN + OK_MAIL + OK_RCPT + OK_RCPT + OK_RCPT + GO_AHEAD
    server += b"552 5.3.4 Message too big\r\n"
    events, _ = run(server, lmtp=False)
    assert of(events, RecipientResult) == []
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [552, 552, 552]


# ---------------------------------------------------------------------------
# 421, end of input, replies nobody asked for


def test_421_to_a_pipelined_rcpt_ends_everything():
    server = GREETING + LHLO_PIPELINING + OK_MAIL + OK_RCPT + b"421 4.3.2 Shutting down\r\n" + b"250 ignored\r\n"
    events, out = run(server)
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [421, 421, 421]
    assert events[-1].reason == C.SERVER_CLOSING and events[-1].reply.code == 421
    assert not out.endswith(b"QUIT\r\n")


def test_421_among_lmtp_recipient_replies():
    server = GREETING + LHLO_PIPELINING + OK_MAIL + OK_RCPT + OK_RCPT + OK_RCPT + GO_AHEAD
    server += b"250 2.0.0 ok\r\n421 4.3.2 Shutting down\r\n"
    events, _ = run(server)
    assert [r.reply.code for r in of(events, RecipientResult)] == [250, 421]
    (done,) = of(events, TransactionDone)
    assert codes(done.replies) == [250, 421, 421]


def test_unsolicited_421_closes_an_idle_session():
    session = Session()
    session.ready()
    (closed,) = session.feed(b"421 4.4.2 Idle timeout\r\n")
    assert closed.reason == C.SERVER_CLOSING and session.machine.closed
    assert session.feed(b"") == [closed]


def test_unsolicited_reply_is_a_protocol_error():
    session = Session()
    session.ready()
    with pytest.raises(RemoteProtocolError, match="no command"):
        session.feed(b"250 surprise\r\n")
    with pytest.raises(RemoteProtocolError):  # the machine stays broken
        session.machine.next_event()
    with pytest.raises(LocalProtocolError):
        session.machine.send(Quit())


def test_end_of_input_mid_transaction_keeps_what_is_known():
    session = Session()
    session.ready()
    session.machine.send(TXN)
    events = session.feed(OK_MAIL + OK_RCPT + NO_USER + b"250-partial")
    assert len(events) == 3 and session.machine.in_transaction
    assert session.machine.transaction_replies == (None, Reply(550, "5.1.1", "No such user"), None)
    (closed,) = session.feed(b"")
    assert closed == ConnectionClosed(C.PEER_CLOSED)
    assert not session.machine.in_transaction
    assert codes(r for r in session.machine.transaction_replies if r) == [550]


def test_end_of_input_before_greeting():
    assert Session().feed(b"") == [ConnectionClosed(C.PEER_CLOSED)]


def test_quit_then_close_without_reply():
    session = Session()
    session.ready()
    session.machine.send(Quit())
    assert session.feed(b"") == [ConnectionClosed(C.PEER_CLOSED)]


# ---------------------------------------------------------------------------
# malformed replies and the limits


@pytest.mark.parametrize("data", [
    b"hello\r\n",
    b"HTTP/1.1 400 Bad Request\r\n",
    b"220-first\r\n221 different code\r\n",
    b"220x no separator\r\n",
    b"220 bare\nLF inside\r\n",
    b"220 \xff\xfe not utf-8\r\n",
    b"220 nul \x00 inside\r\n",
    b"600 bad code\r\n",
    b"354 greeting with 3xx\r\n",
    b"2",  # ...followed by the end of input: ConnectionClosed, not an error (see below)
])
def test_malformed_greetings(data):
    items = events_whole(lambda: Driver(), data)
    if data == b"2":
        assert items == [(ConnectionClosed(C.PEER_CLOSED), b"")] or items == []
        return
    assert items[-1][0] == "error"


@pytest.mark.parametrize("reply", [b"354 go on\r\n", b"250 Ok\r\n"])
def test_wrong_class_of_reply(reply):
    """A 3xx to MAIL, a 2xx to DATA: protocol errors."""
    session = Session()
    session.ready()
    session.machine.send(TXN)
    answers = reply if reply.startswith(b"354") else OK_MAIL + OK_RCPT * 3 + reply
    with pytest.raises(RemoteProtocolError):
        session.feed(answers)


def test_reply_line_limit_edge():
    line = b"220 " + b"x" * (100 - 6) + b"\r\n"
    assert len(line) == 100
    assert isinstance(Session(max_reply_line=100).feed(line)[0], Greeting)
    with pytest.raises(RemoteProtocolError, match="longer than 99"):
        Session(max_reply_line=99).feed(line)
    # without a CRLF in sight the error comes as soon as the limit is passed
    with pytest.raises(RemoteProtocolError):
        Session(max_reply_line=64).feed(b"2" * 64)
    assert Session(max_reply_line=64).feed(b"2" * 63) == []


def test_reply_lines_limit_edge():
    reply = b"250-mss1\r\n" + b"250-X\r\n" * 3 + b"250 Y\r\n"  # five lines
    for limit, ok in ((5, True), (4, False)):
        session = Session(max_reply_lines=limit)
        session.feed(GREETING)
        session.machine.send(Hello())
        if ok:
            assert session.feed(reply)[-1].reply.lines == ("mss1", "X", "X", "X", "Y")
        else:
            with pytest.raises(RemoteProtocolError, match="more than 4 lines"):
                session.feed(reply)


@pytest.mark.parametrize("kwargs", [
    {"max_reply_line": 63}, {"max_reply_line": 513}, {"max_reply_line": "512"}, {"max_reply_lines": 0},
])
def test_bad_limits(kwargs):
    with pytest.raises(ValueError):
        SmtpClient(True, ME, **kwargs)


@pytest.mark.parametrize("hostname", ["", "bad host", "x" * 300, "-a.test"])
def test_bad_hostname(hostname):
    with pytest.raises(ValueError):
        SmtpClient(True, hostname)


def test_multiline_reply_to_rcpt():
    session = Session()
    session.ready()
    session.machine.send(Transaction("", ("a@x.test",)))
    events = session.feed(OK_MAIL + b"550-5.1.1 No such user\r\n550 5.1.1 see https://help\r\n503 no\r\n")
    assert events[1].reply.lines == ("No such user", "see https://help") and events[1].reply.enhanced == "5.1.1"


# ---------------------------------------------------------------------------
# what the driver may send when


def test_local_errors_leave_the_machine_unchanged():
    session = Session()
    machine = session.machine
    for early in (Hello(), TXN, Reset(), Quit(), Body(b"x"), EndOfData()):
        with pytest.raises(LocalProtocolError):
            machine.send(early)  # nothing before the greeting
    session.feed(GREETING)
    with pytest.raises(LocalProtocolError):
        machine.send(TXN)  # not before LHLO
    machine.send(Hello())
    with pytest.raises(LocalProtocolError):
        machine.send(Hello())  # one outstanding at a time
    session.feed(LHLO_PIPELINING)
    machine.send(TXN)
    for wrong in (TXN, Reset(), Quit(), Hello(), Body(b"x"), EndOfData(), "MAIL FROM:<a@b>"):
        with pytest.raises(LocalProtocolError):
            machine.send(wrong)
    session.feed(OK_MAIL + OK_RCPT * 3 + GO_AHEAD)
    for wrong in (TXN, Reset(), Quit(), Body("text")):
        with pytest.raises(LocalProtocolError):
            machine.send(wrong)
    assert machine.send(EndOfData()) == b".\r\n"  # an empty message
    (r1, r2, r3, done) = session.feed(b"250 2.0.0 a\r\n" * 3)
    assert codes(done.replies) == [250, 250, 250]


@pytest.mark.parametrize("sender, recipients, params_mail, params_rcpt", [
    ("a@b.test", (), (), ()),
    ("a@b.test\r\nRSET", ("c@d.test",), (), ()),
    ("a@b.test> X=1", ("c@d.test",), (), ()),
    ("a@b.test", ("c@d.test>\r\nDATA",), (), ()),
    ("a@b.test", ("c@d.test",), ("SIZE=1\r\nRSET",), ()),
    ("a@b.test", ("c@d.test",), ("",), ()),
    ("a@b.test", ("c@d.test",), (), (("X=1",), ("Y=2",))),
    ("a@b.test", "c@d.test", (), ()),
    ("jörg@b.test", ("c@d.test",), (), ()),  # UTF-8 needs SMTPUTF8
    ("a@b.test", ("jörg@d.test",), (), ()),
    ("@relay.test:a@b.test", ("c@d.test",), (), ()),  # no source routes
    (None, ("c@d.test",), (), ()),
])
def test_transaction_refuses_what_would_not_parse(sender, recipients, params_mail, params_rcpt):
    with pytest.raises(LocalProtocolError):
        Transaction(sender, recipients, params_mail, params_rcpt)


def test_transaction_accepts_what_our_grammar_takes():
    txn = Transaction("", ["Postmaster", '"john doe"@x.test', "jörg@bücher.test"], ["SMTPUTF8", "BODY=8BITMIME"],
                      [(), ("NOTIFY=NEVER",), ()])
    assert txn.recipients == ("Postmaster", '"john doe"@x.test', "jörg@bücher.test")
    assert txn.mail_line() == b"MAIL FROM:<> SMTPUTF8 BODY=8BITMIME\r\n"
    assert txn.rcpt_line(1) == b'RCPT TO:<"john doe"@x.test> NOTIFY=NEVER\r\n'
    assert txn.rcpt_line(2) == "RCPT TO:<jörg@bücher.test>\r\n".encode()


# ---------------------------------------------------------------------------
# the body: dot-stuffing and line ends


@pytest.mark.parametrize("body, wire", [
    (b"", b".\r\n"),
    (b"x", b"x\r\n.\r\n"),
    (b"x\r\n", b"x\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
    (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),  # bare LF goes out as CRLF (RFC 5321 §2.3.8)
    (b"a\r.\rb\r", b"a\r\n..\r\nb\r\n.\r\n"),  # so does a bare CR
    (b"a\r\r\n", b"a\r\n\r\n.\r\n"),
    (b"a.b\r\n x.\r\n", b"a.b\r\n x.\r\n.\r\n"),
])
def test_stuff_body(body, wire):
    assert stuff_body(body) == wire
    # the same whatever the chunking of Body
    for size in (1, 2, 3):
        stuffer = DotStuffer()
        pieces = b"".join(stuffer.feed(body[i:i + size]) for i in range(0, len(body), size))
        assert pieces + stuffer.end() == wire


@FAST
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_stuffing_is_chunking_invariant_and_ends_right(body, cuts):
    cuts = sorted({min(c, len(body)) for c in cuts})
    stuffer = DotStuffer()
    start, out = 0, b""
    for cut in [*cuts, len(body)]:
        out += stuffer.feed(body[start:cut])
        start = cut
    out += stuffer.end()
    assert out == stuff_body(body)
    assert out.endswith(b".\r\n") and (out == b".\r\n" or out.endswith(b"\r\n.\r\n"))
    assert b"\r\n.\r\n" not in out[:-3]  # the end marker appears only at the end
    assert b"\r" not in out.replace(b"\r\n", b"") and b"\n" not in out.replace(b"\r\n", b"")


# ---------------------------------------------------------------------------
# split-feed invariance and fuzzing


TRANSCRIPTS = {
    "pipelined lmtp": (GREETING + LHLO_PIPELINING + OK_MAIL + OK_RCPT + NO_USER + OK_RCPT + GO_AHEAD
                       + b"250 2.0.0 a\r\n250 2.0.0 b\r\n221 Bye\r\n", {}),
    "plain smtp": (b"220-sink.test\r\n220 welcome\r\n" + LHLO_PLAIN + OK_MAIL + OK_RCPT + NO_USER + OK_RCPT
                   + GO_AHEAD + b"250 queued\r\n221 Bye\r\n", {"lmtp": False}),
    "two transactions": (GREETING + LHLO_PIPELINING + OK_MAIL + OK_RCPT * 3 + GO_AHEAD + b"250 2.0.0 a\r\n" * 3
                         + b"250 Ok\r\n" + OK_MAIL + NO_USER * 3 + b"503 5.5.1 No valid recipients\r\n"
                         + b"221 Bye\r\n", {"transactions": (TXN, TXN)}),
}


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_split_invariance_of_server_replies(name):
    data, kwargs = TRANSCRIPTS[name]
    items = assert_split_invariant(lambda: Driver(**kwargs), data)
    assert isinstance(items[-1][0], ConnectionClosed)


def check_events(items: list, recipients: int = 3) -> None:
    """What any event sequence must satisfy, whatever the server sent."""
    for item in items:
        if item[0] == "error":
            assert item is items[-1]
            continue
        event, _ = item
        if isinstance(event, TransactionDone):
            assert len(event.replies) == recipients and all(isinstance(r, Reply) for r in event.replies)
            assert not any(300 <= r.code < 400 for r in event.replies)
        if isinstance(event, RecipientResult):
            assert 0 <= event.recipient_index < recipients
    closed = [i for i, item in enumerate(items) if isinstance(item[0], ConnectionClosed)]
    assert closed in ([], [len(items) - 1])


REPLY_LINE = st.builds(
    lambda code, sep, text: code + sep + text + b"\r\n",
    st.sampled_from([b"220", b"221", b"250", b"354", b"421", b"452", b"503", b"550", b"554", b"199", b"2x0"]),
    st.sampled_from([b" ", b"-", b"", b"  "]),
    st.sampled_from([b"", b"Ok", b"2.1.5 Ok", b"PIPELINING", b"SIZE 10", b"\xc3\xa9t\xc3\xa9", b"\xff", b"a\rb"]),
)


@FAST
@given(st.lists(REPLY_LINE, max_size=25), st.booleans(), st.booleans())
def test_fuzz_reply_sequences(lines, lmtp, pipelining):
    """Plausible replies in any order: events or RemoteProtocolError only, split never matters."""
    hello = b"250-mss1\r\n250 PIPELINING\r\n" if pipelining else b"250 mss1\r\n"
    data = GREETING + hello + b"".join(lines)
    make = lambda: Driver(lmtp=lmtp)  # noqa: E731
    whole = events_whole(make, data)
    assert events_for_chunks(make, [data[i:i + 7] for i in range(0, len(data), 7)]) == whole
    assert events_for_chunks(make, [data, b""]) == events_for_chunks(make, [data[:40], data[40:], b""])
    check_events(whole)
    check_events(events_for_chunks(make, [data, b""]))


@FAST
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    """Whatever the server sends: events, or RemoteProtocolError -- never anything else."""
    for prefix in (b"", GREETING, GREETING + LHLO_PIPELINING + OK_MAIL):
        make = lambda: Driver(max_reply_line=64, max_reply_lines=3)  # noqa: E731
        whole = events_for_chunks(make, [c for c in (prefix + data,) if c])  # b"" would mean end of input
        assert events_for_chunks(make, [c for c in (prefix, data[:5], data[5:]) if c]) == whole
        check_events(events_for_chunks(make, [prefix + data, b""]))


# ---------------------------------------------------------------------------
# against our own LMTP server machine, in memory


class StoreApp:
    """Our LMTP server machine with a tiny app: refuses recipients starting with "no", records what arrives."""

    def __init__(self, **limits):
        self.machine = LmtpServer("mss1.intermail.test", mail_params=("XDELIVERYKEY",), rcpt_params=("NOTIFY",),
                                  extra_capabilities=("XDELIVERYKEY",), **limits)
        self.mail: list[MailFrom] = []
        self.rcpts: list[RcptTo] = []
        self.bodies: list[bytes] = []
        self._body = bytearray()

    def greet(self) -> bytes:
        return self.machine.send(ServerGreeting())

    def feed(self, data: bytes) -> bytes:
        self.machine.receive_data(data)
        out = b""
        while (event := self.machine.next_event()) is not NEED_DATA:
            if isinstance(event, AutoReply):
                out += self.machine.send(event)
            elif isinstance(event, MailFrom):
                self.mail.append(event)
                out += self.machine.send(Reply(250, "2.1.0", "Sender ok"))
            elif isinstance(event, RcptTo):
                self.rcpts.append(event)
                refuse = event.path.startswith("no")
                out += self.machine.send(Reply(550, "5.1.1", "No such user") if refuse
                                         else Reply(250, "2.1.5", "Recipient ok"))
            elif isinstance(event, MessageData):
                self._body += event.data
            elif isinstance(event, MessageEnd):
                if event.refused is None:
                    self.bodies.append(bytes(self._body))
                    out += self.machine.send(RecipientReplies(
                        tuple(Reply(250, "2.0.0", f"delivered {i}") for i in range(event.recipients))))
                self._body.clear()
            elif isinstance(event, ServerClosed):
                break
        return out


def converse(driver: Driver, store: StoreApp) -> list:
    """Run client and server machines against each other until the client's session ends."""
    events: list = []
    to_client = store.greet()
    for _ in range(1000):
        driver.receive_data(to_client)
        to_server = b""
        while (item := driver.next_event()) is not NEED_DATA:
            events.append(item[0])
            to_server += item[1]
        if driver.done:
            return events
        to_client = store.feed(to_server)
        if not to_client and not to_server:
            raise AssertionError("the session stalled")
    raise AssertionError("the session did not end")


def stored_form(body: bytes) -> bytes:
    """What the store keeps of ``body``: CRLF line ends, the last line ended."""
    body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return body if not body or body.endswith(b"\r\n") else body + b"\r\n"


def test_in_memory_session_with_our_lmtp_server():
    txn = Transaction("s@example.test", ("ann@x.test", "nobody@x.test", "bob@x.test"), ("XDELIVERYKEY=Q1",),
                      ((), (), ("NOTIFY=NEVER",)))
    store = StoreApp()
    events = converse(Driver(transactions=(txn, txn), body=(BODY[:7], BODY[7:])), store)
    done = of(events, TransactionDone)
    assert [codes(d.replies) for d in done] == [[250, 550, 250]] * 2
    assert [e.reply.text for e in of(events, RecipientResult)] == ["delivered 0", "delivered 1"] * 2
    assert store.bodies == [stored_form(BODY)] * 2
    assert store.mail[0].params == {"XDELIVERYKEY": "Q1"}
    assert store.rcpts[2].params == {"NOTIFY": "NEVER"}
    assert isinstance(events[-1], ConnectionClosed) and events[-1].reason == C.QUIT_DONE


LOCAL = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,8}(\.[A-Za-z0-9_-]{1,4}){0,2}", fullmatch=True)
QUOTED = st.from_regex(r'"([ !#-\[\]-~]|\\[ -~]){0,8}"', fullmatch=True)
DOMAIN = st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,5}){0,2}", fullmatch=True)
ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", st.one_of(LOCAL, QUOTED), DOMAIN)


@FAST
@given(ADDRESS, st.lists(ADDRESS, min_size=1, max_size=4), st.binary(max_size=300), st.integers(1, 50))
def test_round_trip_through_our_server(sender, recipients, body, chunk):
    """What the client sends, our server reads back exactly: paths, and the body as stored."""
    txn = Transaction(sender, tuple(recipients))
    store = StoreApp()
    pieces = tuple(body[i:i + chunk] for i in range(0, len(body), chunk))
    events = converse(Driver(transactions=(txn,), body=pieces), store)
    assert [m.path for m in store.mail] == [sender]
    assert [r.path for r in store.rcpts] == recipients
    (done,) = of(events, TransactionDone)
    expected = [550 if r.startswith("no") else 250 for r in recipients]
    assert codes(done.replies) == expected
    assert store.bodies == ([stored_form(body)] if 250 in expected else [])
