"""intermail.delivery.lmtp over real loopback sockets, on asyncio and uvloop.

The LMTP peer is our own server machine (:class:`LmtpServer`) driven by the
pump, with a small app (:class:`Store`) that refuses some recipients at RCPT
time, answers others per recipient after the message, and can misbehave on
request (close mid-DATA, close before answering, stall, close when idle).
The SMTP peer is aiosmtpd's server (it announces no PIPELINING, so the
one-command-at-a-time path runs against a real implementation).  Raw
scripted servers cover greetings and replies no real server would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import pytest
import trustme
from aiosmtpd.smtp import SMTP

from intermail.delivery import lmtp as delivery
from intermail.delivery.lmtp import (
    ConnectionDead,
    DeliveryError,
    DeliveryResult,
    FailureKind,
    LmtpConnection,
    SessionFailure,
    deliver,
)
from intermail.errors import LocalProtocolError
from intermail.net.pump import PeerClosedError, Pump, PumpTimeout
from intermail.proto.smtp import replies as R
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
)
from intermail.proto.smtp.replies import Reply
from intermail.testing.loops import run_bounded

ME = "mta1.intermail.test"
SENDER = "sender@example.test"
BODY = b"Subject: test\r\n\r\n.leading dot\r\n..two dots\r\nno final line end"
STORED = b"Subject: test\r\n\r\n.leading dot\r\n..two dots\r\nno final line end\r\n"
FAST = {"connect_timeout": 5.0, "command_timeout": 5.0, "data_timeout": 5.0}
DEADLINE = 30.0


# ---------------------------------------------------------------------------
# peers


class Store:
    """An in-process LMTP store: our server machine, driven by the pump, with a scriptable app.

    RCPT: ``no*`` 550 5.1.1, ``busy*`` 451 4.3.0, ``shutdown*`` 421 (the server
    closes), else 250.  After the message: ``quota*`` 452 4.2.2, else 250.
    ``at_end``: ``"close"`` (drop the connection instead of answering) or
    ``"stall"``; ``abort_on_data``: drop the connection at the first body
    chunk; ``close_after``: close when idle after that many transactions
    (``idle_421`` sends a 421 first).
    """

    def __init__(self, *, at_end: str | None = None, abort_on_data: bool = False, close_after: int | None = None,
                 idle_421: bool = False):
        self.at_end = at_end
        self.abort_on_data = abort_on_data
        self.close_after = close_after
        self.idle_421 = idle_421
        self.messages: list[tuple[MailFrom, tuple[str, ...], bytes]] = []
        self.auto_replies: list[Reply] = []
        self.sessions = 0
        self._tasks: set[asyncio.Task] = set()

    def rcpt_reply(self, path: str) -> Reply:
        if path.startswith("no"):
            return Reply(550, "5.1.1", "No such user")
        if path.startswith("busy"):
            return Reply(451, "4.3.0", "Directory unavailable")
        if path.startswith("shutdown"):
            return Reply(421, "4.3.2", "Shutting down")
        return Reply(250, "2.1.5", "Recipient ok")

    @staticmethod
    def final_reply(path: str) -> Reply:
        if path.startswith("quota"):
            return Reply(452, "4.2.2", "Mailbox full")
        return Reply(250, "2.0.0", f"Delivered to {path}")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.sessions += 1
        machine = LmtpServer("mss1.intermail.test", max_chunk=16 * 1024, mail_params=("XDELIVERYKEY",),
                             extra_capabilities=("XDELIVERYKEY",))
        pump = Pump(reader, writer, machine, timeout=10)
        transactions = 0
        try:
            await pump.send(Greeting())
            mail, accepted, body = None, [], bytearray()
            while True:
                event = await pump.next_event()
                if isinstance(event, AutoReply):
                    self.auto_replies.append(event.reply)
                    await pump.send(event)
                elif isinstance(event, MailFrom):
                    mail, accepted, body = event, [], bytearray()
                    await pump.send(R.SENDER_OK)
                elif isinstance(event, RcptTo):
                    reply = self.rcpt_reply(event.path)
                    if reply.accepted:
                        accepted.append(event.path)
                    await pump.send(reply)
                elif isinstance(event, MessageData):
                    if self.abort_on_data:
                        writer.transport.abort()
                        return
                    body += event.data
                elif isinstance(event, MessageEnd) and event.refused is None:
                    if self.at_end == "close":
                        writer.transport.abort()
                        return
                    if self.at_end == "stall":
                        await asyncio.sleep(60)
                    assert mail is not None
                    self.messages.append((mail, tuple(accepted), bytes(body)))
                    await pump.send(RecipientReplies(tuple(self.final_reply(p) for p in accepted)))
                    transactions += 1
                    if transactions == self.close_after:
                        if self.idle_421:
                            await pump.write(Reply(421, "4.4.2", "Idle timeout").encode())
                        await pump.close()
                        return
                elif isinstance(event, ConnectionClosed):
                    return
        except (PeerClosedError, PumpTimeout, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self, ssl_context: ssl.SSLContext | None = None):
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ssl_context)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def raw_server(script):
    """A scripted peer: ``script(reader, writer)`` runs per connection."""
    tasks: set[asyncio.Task] = set()

    async def handle(reader, writer):
        tasks.add(asyncio.current_task())
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def codes(result: DeliveryResult) -> list[int]:
    return [reply.code for reply in result.replies.values()]


def run(loop_name: str, scenario):
    return run_bounded(loop_name, scenario, DEADLINE)


# ---------------------------------------------------------------------------
# LMTP against our own server


def test_lmtp_delivery_with_partial_refusal(loop_name):
    store = Store()
    recipients = ["ann@x.test", "nobody@x.test", "quota@x.test", "busy@x.test", "bob@x.test"]

    async def scenario():
        async with store.serving() as port:
            return await deliver("127.0.0.1", port, sender=SENDER, recipients=recipients, data=BODY,
                                 mail_params=["XDELIVERYKEY=Q1"], hostname=ME, **FAST)

    result = run(loop_name, scenario)
    assert result.failure is None and result.answered
    assert [(a, r.code, r.enhanced) for a, r in result.replies.items()] == [
        ("ann@x.test", 250, "2.0.0"), ("nobody@x.test", 550, "5.1.1"), ("quota@x.test", 452, "4.2.2"),
        ("busy@x.test", 451, "4.3.0"), ("bob@x.test", 250, "2.0.0")]
    assert result.delivered == ("ann@x.test", "bob@x.test")
    assert result.deferred == ("quota@x.test", "busy@x.test")
    assert result.refused == ("nobody@x.test",)
    assert result.replies["bob@x.test"].text == "Delivered to bob@x.test"  # each recipient its own reply (RFC 2033)
    (mail, accepted, body), = store.messages
    assert mail.path == SENDER
    assert mail.params == {"XDELIVERYKEY": "Q1", "SIZE": str(len(BODY))}  # SIZE added: the store announced it
    assert accepted == ("ann@x.test", "quota@x.test", "bob@x.test")
    assert body == STORED


def test_connection_reused_with_rset_between(loop_name):
    store = Store()

    async def scenario():
        async with store.serving() as port:
            async with await LmtpConnection.open("127.0.0.1", port, hostname=ME, **FAST) as connection:
                assert connection.capabilities.pipelining and connection.capabilities.has("XDELIVERYKEY")
                results = []
                for n in range(3):
                    results.append(await connection.deliver(SENDER, [f"u{n}@x.test", "nobody@x.test"],
                                                            b"message %d\r\n" % n,
                                                            mail_params=[f"XDELIVERYKEY=Q{n}"]))
                assert connection.usable and connection.transactions == 3
            assert not connection.usable
            return results

    results = run(loop_name, scenario)
    assert [codes(r) for r in results] == [[250, 550]] * 3
    assert store.sessions == 1
    assert [m[2] for m in store.messages] == [b"message 0\r\n", b"message 1\r\n", b"message 2\r\n"]
    assert store.auto_replies.count(R.OK) == 2  # one RSET before each reuse
    assert store.auto_replies[-1] == R.CLOSING  # and QUIT at the end


@pytest.mark.parametrize("idle_421", [False, True], ids=["closed", "421"])
def test_dead_connection_is_reported_before_anything_is_sent(loop_name, idle_421):
    store = Store(close_after=1, idle_421=idle_421)

    async def scenario():
        async with store.serving() as port:
            connection = await LmtpConnection.open("127.0.0.1", port, hostname=ME, **FAST)
            first = await connection.deliver(SENDER, ["ann@x.test"], b"one\r\n")
            await asyncio.sleep(0.05)  # the store closes the idle connection
            with pytest.raises(ConnectionDead) as dead:
                await connection.deliver(SENDER, ["ann@x.test"], b"two\r\n")
            assert not connection.usable
            with pytest.raises(ConnectionDead):
                await connection.deliver(SENDER, ["ann@x.test"], b"two\r\n")
            await connection.close()
            # the caller reconnects and retries
            async with await LmtpConnection.open("127.0.0.1", port, hostname=ME, **FAST) as fresh:
                second = await fresh.deliver(SENDER, ["ann@x.test"], b"two\r\n")
            return first, dead.value.failure, second

    first, failure, second = run(loop_name, scenario)
    assert codes(first) == codes(second) == [250]
    assert failure.stage == "RSET" and not failure.after_data
    if idle_421:
        assert failure.server_reply is not None and failure.server_reply.code == 421
    else:
        assert failure.kind is FailureKind.CONNECTION_LOST
    assert [m[2] for m in store.messages] == [b"one\r\n", b"two\r\n"]


def test_421_at_rcpt_ends_the_session(loop_name):
    store = Store()

    async def scenario():
        async with store.serving() as port:
            connection = await LmtpConnection.open("127.0.0.1", port, hostname=ME, **FAST)
            result = await connection.deliver(SENDER, ["ann@x.test", "shutdown@x.test", "bob@x.test"], BODY)
            usable = connection.usable
            await connection.close()
            return result, usable

    result, usable = run(loop_name, scenario)
    assert result.failure is None  # the server answered everyone: with its 421
    assert codes(result) == [421, 421, 421] and result.deferred == result.recipients
    assert not usable and store.messages == []


def test_lmtp_over_implicit_tls(loop_name):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    store = Store()

    async def scenario():
        async with store.serving(server_context) as port:
            good = await deliver("127.0.0.1", port, sender=SENDER, recipients=["ann@x.test"], data=BODY,
                                 hostname=ME, ssl_context=client_context, **FAST)
            untrusted = await deliver("127.0.0.1", port, sender=SENDER, recipients=["ann@x.test"], data=BODY,
                                      hostname=ME, ssl_context=ssl.create_default_context(), **FAST)
            return good, untrusted

    good, untrusted = run(loop_name, scenario)
    assert codes(good) == [250] and store.messages[0][2] == STORED
    assert untrusted.failure.kind is FailureKind.CONNECT_FAILED and codes(untrusted) == [451]


# ---------------------------------------------------------------------------
# SMTP against aiosmtpd


class SinkHandler:
    def __init__(self):
        self.received: list[tuple[str, list[str], bytes, list[str]]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                              list(envelope.mail_options)))
        return "250 2.0.0 Ok: queued"


def test_smtp_mode_against_aiosmtpd(loop_name):
    handler = SinkHandler()

    async def scenario():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, hostname="sink.test"), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with await LmtpConnection.open("127.0.0.1", port, hostname=ME, lmtp=False, **FAST) as connection:
                assert not connection.capabilities.pipelining  # one command at a time
                first = await connection.deliver(SENDER, ["ann@x.test", "nobody@x.test", "bob@x.test"], BODY)
                second = await connection.deliver("", ["nobody@x.test"], b"never sent\r\n")
                third = await connection.deliver(SENDER, ["carol@x.test"], b".\r\n")
            return first, second, third
        finally:
            server.close()

    first, second, third = run(loop_name, scenario)
    assert codes(first) == [250, 550, 250]  # one reply after DATA counts for every accepted recipient
    assert first.replies["ann@x.test"] == Reply(250, "2.0.0", "Ok: queued")
    assert codes(second) == [550] and second.failure is None
    assert codes(third) == [250]
    assert [(m[0], m[1], m[2]) for m in handler.received] == [
        (SENDER, ["ann@x.test", "bob@x.test"], STORED), (SENDER, ["carol@x.test"], b".\r\n")]
    assert handler.received[0][3] == [f"SIZE={len(BODY)}"]


# ---------------------------------------------------------------------------
# connection-level failures


def test_connection_refused(loop_name):
    port = free_port()

    async def scenario():
        return await deliver("127.0.0.1", port, sender=SENDER, recipients=["a@x.test", "b@x.test"], data=BODY,
                             hostname=ME, **FAST)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.CONNECT_REFUSED and result.failure.stage == "connect"
    assert result.server_replies == (None, None) and not result.answered
    assert [(r.code, r.enhanced) for r in result.replies.values()] == [(451, "4.4.1")] * 2
    assert result.deferred == ("a@x.test", "b@x.test") and result.delivered == ()
    assert f"127.0.0.1:{port}" in result.failure.reason


def test_connect_timeout(loop_name, monkeypatch):
    async def never(*args, **kwargs):
        await asyncio.sleep(3600)

    monkeypatch.setattr(asyncio, "open_connection", never)

    async def scenario():
        return await deliver("192.0.2.1", 24, sender=SENDER, recipients=["a@x.test"], data=BODY, hostname=ME,
                             connect_timeout=0.2, command_timeout=5, data_timeout=5)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.CONNECT_TIMEOUT
    assert result.replies["a@x.test"].code == 451 and "0.2 s" in result.failure.reason


def test_greeting_timeout(loop_name):
    async def silent(reader, writer):
        await asyncio.sleep(60)

    async def scenario():
        async with raw_server(silent) as port:
            return await deliver("127.0.0.1", port, sender=SENDER, recipients=["a@x.test"], data=BODY,
                                 hostname=ME, connect_timeout=5, command_timeout=0.3, data_timeout=5)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.TIMEOUT and result.failure.stage == "greeting"
    assert result.replies["a@x.test"].enhanced == "4.4.2"


def test_greeting_refused_sends_quit(loop_name):
    seen: list[bytes] = []

    async def refuse(reader, writer):
        writer.write(b"554 5.3.2 No service here\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 Bye\r\n")
        await writer.drain()

    async def scenario():
        async with raw_server(refuse) as port:
            return await deliver("127.0.0.1", port, sender=SENDER, recipients=["a@x.test"], data=BODY,
                                 hostname=ME, **FAST)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.GREETING_REFUSED
    assert result.failure.server_reply == Reply(554, "5.3.2", "No service here")
    assert result.replies["a@x.test"].transient  # a refusing store is retried, never bounced
    assert seen == [b"QUIT\r\n"]


def test_lhlo_refused(loop_name):
    async def smtp_only(reader, writer):
        writer.write(b"220 smtp.test ESMTP\r\n")
        assert await reader.readline() == b"LHLO mta1.intermail.test\r\n"
        writer.write(b"500 5.5.1 Command unrecognized\r\n")
        await reader.readline()
        writer.write(b"221 Bye\r\n")
        await writer.drain()

    async def scenario():
        async with raw_server(smtp_only) as port:
            with pytest.raises(DeliveryError) as refused:
                await LmtpConnection.open("127.0.0.1", port, hostname=ME, **FAST)
            return refused.value.failure

    failure = run(loop_name, scenario)
    assert failure.kind is FailureKind.HELLO_REFUSED and failure.stage == "LHLO"
    assert failure.server_reply.code == 500


def test_malformed_reply_is_a_protocol_error(loop_name):
    async def broken(reader, writer):
        writer.write(b"220 mss.test\r\n")
        await reader.readline()
        writer.write(b"250-mss.test\r\n250 PIPELINING\r\n")
        await reader.readline()
        writer.write(b"250 2.1.0 Ok\r\nHTTP/1.1 200 OK\r\n")
        await asyncio.sleep(60)

    async def scenario():
        async with raw_server(broken) as port:
            return await deliver("127.0.0.1", port, sender=SENDER, recipients=["a@x.test", "b@x.test"],
                                 data=BODY, hostname=ME, **FAST)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.PROTOCOL_ERROR and result.failure.stage == "RCPT"
    assert [(r.code, r.enhanced) for r in result.replies.values()] == [(451, "4.5.0")] * 2


def test_server_closes_mid_data(loop_name):
    store = Store(abort_on_data=True)
    big = (b"x" * 998 + b"\r\n") * 2000  # 2 MB: the store drops the connection long before the end

    async def scenario():
        async with store.serving() as port:
            return await deliver("127.0.0.1", port, sender=SENDER, recipients=["ann@x.test", "nobody@x.test"],
                                 data=big, hostname=ME, **FAST)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.CONNECTION_LOST
    assert result.failure.stage in ("body", "END-OF-DATA")
    assert result.server_replies[0] is None and result.server_replies[1].code == 550  # RCPT refusal kept
    assert codes(result) == [451, 550] and result.replies["ann@x.test"].enhanced == "4.4.2"
    assert store.messages == []


def test_server_closes_before_answering_after_data(loop_name):
    store = Store(at_end="close")

    async def scenario():
        async with store.serving() as port:
            return await deliver("127.0.0.1", port, sender=SENDER,
                                 recipients=["ann@x.test", "nobody@x.test", "bob@x.test"], data=BODY,
                                 hostname=ME, **FAST)

    result = run(loop_name, scenario)
    failure = result.failure
    assert failure.kind is FailureKind.CONNECTION_LOST and failure.stage == "END-OF-DATA"
    assert failure.after_data  # the store may have kept it: the delivery key makes the retry safe
    assert codes(result) == [451, 550, 451]


def test_data_timeout_waiting_for_the_replies(loop_name):
    store = Store(at_end="stall")

    async def scenario():
        async with store.serving() as port:
            return await deliver("127.0.0.1", port, sender=SENDER, recipients=["ann@x.test"], data=BODY,
                                 hostname=ME, connect_timeout=5, command_timeout=5, data_timeout=0.3)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.TIMEOUT and result.failure.stage == "END-OF-DATA"
    assert result.failure.after_data and codes(result) == [451]


def test_cancelled_delivery_leaves_the_connection_unusable(loop_name):
    store = Store(at_end="stall")

    async def scenario():
        async with store.serving() as port:
            connection = await LmtpConnection.open("127.0.0.1", port, hostname=ME, **FAST)
            task = asyncio.create_task(connection.deliver(SENDER, ["ann@x.test"], BODY))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not connection.usable
            with pytest.raises(ConnectionDead):
                await connection.deliver(SENDER, ["ann@x.test"], BODY)
            await connection.close()

    run(loop_name, scenario)


def test_command_timeout_at_mail(loop_name):
    async def slow(reader, writer):
        writer.write(b"220 mss.test\r\n")
        await reader.readline()
        writer.write(b"250 mss.test\r\n")
        await asyncio.sleep(60)

    async def scenario():
        async with raw_server(slow) as port:
            return await deliver("127.0.0.1", port, sender=SENDER, recipients=["a@x.test"], data=BODY,
                                 hostname=ME, connect_timeout=5, command_timeout=0.3, data_timeout=5)

    result = run(loop_name, scenario)
    assert result.failure.kind is FailureKind.TIMEOUT and result.failure.stage == "MAIL"
    assert not result.failure.after_data


# ---------------------------------------------------------------------------
# arguments and the result type


def test_bad_arguments_raise_before_connecting(loop_name):
    async def scenario():
        with pytest.raises(LocalProtocolError):
            await deliver("127.0.0.1", 9, sender="a@b.test\r\nRSET", recipients=["c@d.test"], data=b"",
                          hostname=ME)
        with pytest.raises(LocalProtocolError):
            await deliver("127.0.0.1", 9, sender="a@b.test", recipients=[], data=b"", hostname=ME)
        with pytest.raises(ValueError):
            await deliver("127.0.0.1", 9, sender="a@b.test", recipients=["c@d.test"], data=b"", hostname="no name")
        with pytest.raises(ValueError):
            await deliver("127.0.0.1", 9, sender="a@b.test", recipients=["c@d.test"], data=b"", hostname=ME,
                          command_timeout=0)

    run(loop_name, scenario)


def test_synthesized_reply_is_always_sendable():
    failure = SessionFailure(FailureKind.CONNECTION_LOST, "é\r\n" * 500, "body")
    reply = failure.reply
    assert reply.code == 451 and reply.enhanced == "4.4.2" and "\r" not in reply.text
    assert len(reply.encode()) <= R.MAX_REPLY_LINE
    result = DeliveryResult(("a@x.test", "b@x.test"), (Reply(550, "5.1.1", "No"), None), failure)
    assert result.replies == {"a@x.test": Reply(550, "5.1.1", "No"), "b@x.test": reply}
    assert str(failure).startswith("connection lost (body): é")
    assert result.refused == ("a@x.test",) and result.deferred == ("b@x.test",)
    assert delivery.DEFAULT_DATA_TIMEOUT >= delivery.DEFAULT_COMMAND_TIMEOUT
