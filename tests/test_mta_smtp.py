"""The MTA's SMTP front end over real sockets, with real clients (smtplib, aiosmtplib).

Each test builds an :class:`Mta`: a real directory (DirectoryService behind
an RpcServer on 127.0.0.1, cheap argon2), a real QueueStore in ``tmp_path``
(two mirrors, no fsync), and the ``smtp`` and ``submission`` front ends on a
Runner, with trustme certificates for STARTTLS.  smtplib is blocking: it runs
in a thread while the servers run on the test's loop.  Tests that take the
``loop_name`` fixture run on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import logging
import re
import smtplib
import ssl
import time
from typing import Any

import aiosmtplib
import pytest
import trustme
from argon2 import profiles

from intermail.apps.mta_smtp import SmtpFrontEnd, enhance, received_header
from intermail.config import LimitsConfig
from intermail.directory.client import DirectoryClient
from intermail.directory.db import DirectoryDB
from intermail.directory.passwords import PasswordHashing
from intermail.directory.service import DirectoryService
from intermail.directory.throttle import AuthThrottle
from intermail.errors import ErrorKind, MailError
from intermail.net.runner import Runner
from intermail.queue.store import QueueStore
from intermail.rpc.client import RpcClient
from intermail.rpc.server import RpcServer
from intermail.storage import StoreOptions
from intermail.testing.loops import run_on

HOST = "127.0.0.1"
HOSTNAME = "mta1.intermail.test"
CLIENT_NAME = "client.example"

pytestmark = pytest.mark.timeout(60)

# Every reply line: code, separator, and (past the greeting / EHLO) an enhanced code.
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -]")
ENHANCED = re.compile(rb"[2-5][0-9][0-9][ -][245]\.[0-9]{1,3}\.[0-9]{1,3} ")
LEAKS = (b"Error: (", b"Traceback", b"Exception", b"aiosmtpd", b"Python")


class FlakyQueue:
    """A real QueueStore whose enqueue fails while ``failing`` is set (the failing backend for tests)."""

    def __init__(self, queue: QueueStore):
        self.queue = queue
        self.failing = False
        self.delay = 0.0
        self.writing = asyncio.Event()

    async def enqueue(self, *args: Any, **kwargs: Any) -> str:
        self.writing.set()
        await asyncio.sleep(self.delay)
        if self.failing:
            raise MailError(ErrorKind.UNAVAILABLE, detail="every mirror failed (test)")
        return await self.queue.enqueue(*args, **kwargs)


class Mta:
    """Directory + queue + the two SMTP listeners on a Runner, for one test."""

    def __init__(self, tmp_path, *, limits: LimitsConfig | None = None, throttle: AuthThrottle | None = None,
                 auth_failure_delay: float = 0.0, drain_timeout: float = 5.0):
        self.tmp_path = tmp_path
        self.limits = limits or LimitsConfig()
        self.throttle = throttle
        self.auth_failure_delay = auth_failure_delay
        self.drain_timeout = drain_timeout
        self.kicked: list[str] = []
        self.stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Mta:
        await self.stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            await self.stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.aclose()

    async def _start(self) -> None:
        # the directory
        db = DirectoryDB(self.tmp_path / "directory.sqlite")
        self.stack.callback(db.close)
        service = DirectoryService(db, role="primary", instance="dir1", hashing=PasswordHashing(profiles.CHEAPEST),
                                   throttle=self.throttle, mss_candidates=("mss1",))
        await service.start()
        self.stack.push_async_callback(service.stop)
        self.rpc_server = RpcServer(service.handlers(), instance="dir1")
        service.push = self.rpc_server.push
        self.dir_listener = await asyncio.start_server(self.rpc_server.handle_connection, HOST, 0)
        self.stack.push_async_callback(self.stop_directory)
        dir_address = (HOST, self.dir_listener.sockets[0].getsockname()[1])
        admin = RpcClient([dir_address], instance="test", request_timeout=3.0, reconnect_window=0.5,
                          connect_timeout=0.5, keepalive=None)
        try:
            await admin.call("domain.add", {"name": "example.org"})
            await admin.call("user.add", {"address": "bob@example.org", "password": "bob-password"})
            await admin.call("user.add", {"address": "carol@example.org", "password": "carol-password"})
            await admin.call("alias.add", {"address": "team@example.org",
                                           "targets": ["bob@example.org", "carol@example.org"]})
        finally:
            await admin.close()
        self.directory = DirectoryClient.static([dir_address], instance="mta-test", request_timeout=0.5)
        self.stack.push_async_callback(self.directory.close)

        # the queue
        self.queue = await QueueStore.open(StoreOptions(
            mirrors=(str(self.tmp_path / "queue-1"), str(self.tmp_path / "queue-2")),
            fsync=False, segment_bytes=1 << 20, preallocate=False))
        self.stack.push_async_callback(self.queue.close)
        self.flaky = FlakyQueue(self.queue)

        # TLS
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", HOST)
        self.server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_tls)
        self.client_tls = ssl.create_default_context()
        self.ca.configure_trust(self.client_tls)

        # the front ends, on a runner
        common = dict(hostname=HOSTNAME, limits=self.limits, tls_context=self.server_tls,
                      on_enqueued=self.kicked.append, auth_failure_delay=self.auth_failure_delay)
        self.smtp = SmtpFrontEnd(self.flaky, self.directory, submission=False, **common)  # type: ignore[arg-type]
        self.submission = SmtpFrontEnd(self.flaky, self.directory, submission=True, **common)  # type: ignore[arg-type]
        started = asyncio.Event()
        mta = self

        class App:
            async def start(self, runner: Runner) -> None:
                await mta.smtp.listen(runner, "smtp", HOST, 0)
                await mta.submission.listen(runner, "submission", HOST, 0)
                started.set()

            async def stop(self) -> None:
                pass

        self.runner = Runner(App(), instance="mta1", drain_timeout=self.drain_timeout, install_signals=False)
        self.serving = asyncio.ensure_future(self.runner.serve())
        self.stack.push_async_callback(self.stop_runner)
        await asyncio.wait_for(started.wait(), 10)

    async def stop_runner(self) -> None:
        self.runner.request_stop(reason="test over")
        await asyncio.wait_for(self.serving, 15)
        await self.smtp.close()
        await self.submission.close()

    async def stop_directory(self) -> None:
        if self.dir_listener is not None:
            self.dir_listener.close()
            self.dir_listener = None
            await self.rpc_server.stop(timeout=1.0)

    def port(self, listener: str = "smtp") -> int:
        return self.runner.addresses[listener][1]

    # -- clients -----------------------------------------------------------------

    def smtplib_client(self, listener: str = "smtp") -> smtplib.SMTP:
        return smtplib.SMTP(HOST, self.port(listener), local_hostname=CLIENT_NAME, timeout=10)

    async def aio_client(self, listener: str = "smtp", *, start_tls: bool = False) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=HOST, port=self.port(listener), local_hostname=CLIENT_NAME,
                                 tls_context=self.client_tls, start_tls=start_tls, timeout=10)
        await client.connect()
        if start_tls:
            await client.ehlo()  # STARTTLS forgets the EHLO (RFC 3207 §4.2); aiosmtplib does not redo it
        return client

    async def raw(self, listener: str = "smtp") -> Raw:
        reader, writer = await asyncio.open_connection(HOST, self.port(listener))
        raw = Raw(reader, writer)
        greeting = await raw.reply()
        assert greeting.startswith(b"220 " + HOSTNAME.encode() + b" ESMTP intermail"), greeting
        return raw

    async def entries(self) -> list:
        return await self.queue.entries()


@dataclasses.dataclass
class Raw:
    """A hand-driven SMTP client: send bytes, read one whole reply."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def reply(self, timeout: float = 10) -> bytes:
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError(f"closed after {b''.join(lines)!r}")
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

    async def cmd(self, line: bytes | str) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert code(await self.cmd("STARTTLS")) == (220, "")
        await self.writer.start_tls(context, server_hostname=HOST)

    async def closed(self, timeout: float = 5) -> bytes:
        """What the server still sends before it closes the connection."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionResetError):
                return await self.reader.read()
        return b""

    def close(self) -> None:
        self.writer.close()


async def trickle(raw: Raw, pieces: list[bytes], pause: float = 0.05) -> bytes:
    """Send ``pieces`` slowly until the server says something; returns that line."""
    for piece in pieces:
        raw.writer.write(piece)
        try:
            return await asyncio.wait_for(raw.reader.readline(), pause)
        except TimeoutError:
            continue
    raise AssertionError("the server never spoke")


def code(reply: bytes) -> tuple[int, str]:
    """(code, enhanced) of a reply's last line."""
    last = reply.rstrip(b"\r\n").split(b"\r\n")[-1]
    match = re.match(rb"([2-5][0-9][0-9])[ -](?:([245]\.[0-9]{1,3}\.[0-9]{1,3}) )?", last)
    assert match, reply
    return int(match.group(1)), (match.group(2) or b"").decode()


def message(subject: str = "hello", body: str = "Hello Bob.") -> bytes:
    return (f"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sender.test>\r\n\r\n{body}\r\n").encode()


def events(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "im_event", None) == name]


# == 1. accepting mail ==================================================================


def test_accepts_mail_for_local_users_with_received_header_and_dsn_params(loop_name, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with Mta(tmp_path) as mta:
            def session():
                with mta.smtplib_client() as s:
                    code_, features = s.ehlo()
                    assert code_ == 250
                    extensions = {line.split()[0].upper() for line in features.decode().splitlines()[1:]}
                    mail = s.mail("Alice@Sender.test", ["BODY=8BITMIME", "RET=HDRS", "ENVID=QQ+2Bxyz"])
                    to_bob = s.rcpt("Bob@Example.org", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.org"])
                    to_team = s.rcpt("team@example.org")
                    again = s.rcpt("bob@example.org")  # the same recipient twice: one delivery
                    data = s.data(message("first"))
                    # a second transaction on the same connection, one recipient, null sender
                    s.mail("")
                    s.rcpt("carol@example.org")
                    data2 = s.data(message("second"))
                    return extensions, mail, to_bob, to_team, again, data, data2

            extensions, mail, to_bob, to_team, again, data, data2 = await asyncio.to_thread(session)
            assert {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "STARTTLS"} \
                <= extensions
            assert "CHUNKING" not in extensions  # aiosmtpd 1.4.6 has no BDAT
            assert "AUTH" not in extensions  # only after STARTTLS
            assert mail == (250, b"2.1.0 Sender ok")
            assert to_bob == (250, b"2.1.5 Recipient ok") and to_team[0] == 250 and again[0] == 250
            assert data[0] == 250 and data[1].startswith(b"2.0.0 Ok: queued as ")
            first_id = data[1].decode().rsplit(" ", 1)[1]
            second_id = data2[1].decode().rsplit(" ", 1)[1]

            entries = {e.id: e for e in await mta.entries()}
            assert set(entries) == {first_id, second_id}
            first = entries[first_id]
            assert first.sender == "alice@sender.test"
            assert first.params == {"BODY": "8BITMIME", "RET": "HDRS", "ENVID": "QQ+2Bxyz"}
            assert [(r.address, r.orcpt, r.notify) for r in first.recipients] == [
                ("bob@example.org", "rfc822;Bob@Example.org", "SUCCESS,FAILURE"),
                ("team@example.org", None, None),
            ]
            stored = await mta.queue.read_message(first)
            header, _, rest = stored.partition(b"\r\nFrom: ")
            assert re.fullmatch(
                rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n"
                rb"\tby mta1\.intermail\.test with ESMTP id " + first_id.encode() + rb"; [A-Z][a-z]{2}, .+ \+0000",
                header), header
            assert b"From: " + rest == message("first")  # the message itself, byte for byte

            second = entries[second_id]
            assert second.sender == "" and second.params == {}
            stored = await mta.queue.read_message(second)
            assert stored.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby mta1.intermail.test"
                                     b" with ESMTP id " + second_id.encode() + b"\r\n\tfor <carol@example.org>; ")
            assert mta.kicked == [first_id, second_id]
            return first_id

    first_id = run_on(loop_name, scenario())
    queued = [r for r in events(caplog, "mta.smtp_queued") if r.im_fields["queue_id"] == first_id]
    assert len(queued) == 1
    assert queued[0].im_context["session_id"] and queued[0].im_context["queue_id"] == first_id
    assert queued[0].im_context["peer"].startswith("127.0.0.1:")


async def test_unknown_local_user_is_550_and_alias_members_resolve(tmp_path):
    async with Mta(tmp_path) as mta:
        raw = await mta.raw()
        assert code(await raw.cmd("EHLO client.example")) == (250, "")
        assert code(await raw.cmd("MAIL FROM:<alice@sender.test>")) == (250, "2.1.0")
        assert code(await raw.cmd("RCPT TO:<nobody@example.org>")) == (550, "5.1.1")
        assert code(await raw.cmd("RCPT TO:<NOBODY@EXAMPLE.ORG>")) == (550, "5.1.1")
        assert code(await raw.cmd("RCPT TO:<team@example.org>")) == (250, "2.1.5")
        assert code(await raw.cmd("RCPT TO:<Carol@Example.ORG>")) == (250, "2.1.5")
        assert code(await raw.cmd("QUIT")) == (221, "2.0.0")
        raw.close()


# == 2. relaying ========================================================================

# Recipient forms that must not get a stranger's mail relayed (or mis-delivered).
RELAY_TRICKS = [
    ("<user%remote.test@example.org>", 554, "5.7.1"),  # percent hack through a hosted domain
    ("<user%remote.test@[127.0.0.1]>", 554, "5.7.1"),  # percent hack through our own address
    ("<remote.test!user@example.org>", 554, "5.7.1"),  # bang path through a hosted domain
    ("<user@remote.test!example.org>", 501, "5.1.3"),  # bang in the domain: malformed
    ("<@example.org:user@remote.test>", 554, "5.7.1"),  # source route
    ("<@example.org,@mx.example.org:user@remote.test>", 554, "5.7.1"),  # source route, two hops
    ("<@remote.test:bob@example.org>", 554, "5.7.1"),  # source route to a local user
    ('<"user@remote.test"@example.org>', 554, "5.7.1"),  # quoted local part holding @
    ('<"user%remote.test"@example.org>', 554, "5.7.1"),  # quoted percent hack
    ('<"remote.test!user"@example.org>', 554, "5.7.1"),  # quoted bang path
    ("<user@remote.test.>", 554, "5.7.1"),  # trailing dot
    ("<bob@example.org.>", 554, "5.7.1"),  # trailing dot on a hosted domain
    ("<user@[127.0.0.1]>", 554, "5.7.1"),  # address literal
    ("<user@[IPv6:::1]>", 554, "5.7.1"),  # IPv6 address literal
    ("<user@remote.test>", 554, "5.7.1"),  # plain relay
    ("<USER@REMOTE.TEST>", 554, "5.7.1"),  # plain relay, upper case
    ("<user@sub.example.org>", 554, "5.7.1"),  # a subdomain of a hosted domain is not hosted
    ("<user@127.0.0.1>", 554, "5.7.1"),  # a dotted quad without brackets is a (remote) domain
    ("<user@remote.test> NOTIFY=NEVER", 554, "5.7.1"),  # relay with DSN parameters
    ("<user>", 501, "5.1.3"),  # unqualified
    ("<user%remote.test>", 501, "5.1.3"),  # unqualified percent hack
    ("<remote.test!user>", 501, "5.1.3"),  # unqualified bang path
    ("<user@remote.test@example.org>", 501, "5.1.3"),  # two @
    ("<bob@example.org@remote.test>", 501, "5.1.3"),  # two @, the other way round
    ("user@remote.test", 501, "5.5.2"),  # no angle brackets
    ("<>", 501, "5.1.3"),  # the null path is no recipient
    ("<user@remote..test>", 501, "5.1.3"),  # empty label
]


def test_relay_tricks_are_refused_without_auth(loop_name, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert len(RELAY_TRICKS) >= 15

    async def scenario():
        async with Mta(tmp_path) as mta:
            raw = await mta.raw()
            assert code(await raw.cmd("EHLO client.example"))[0] == 250
            assert code(await raw.cmd("MAIL FROM:<spammer@remote.test>")) == (250, "2.1.0")
            answers = {}
            for path, _, _ in RELAY_TRICKS:
                reply = await raw.cmd(f"RCPT TO:{path}")
                answers[path] = code(reply)
                assert not any(leak in reply for leak in LEAKS), reply
            assert answers == {path: (c, e) for path, c, e in RELAY_TRICKS}
            # nothing was accepted, so there is nothing to send
            assert code(await raw.cmd("DATA")) == (503, "5.5.1")
            assert code(await raw.cmd("QUIT"))[0] == 221
            raw.close()
            assert await mta.entries() == []

    run_on(loop_name, scenario())
    reasons = {r.im_fields["reason"] for r in events(caplog, "mta.smtp_refused")}
    assert {"source route", "relay denied", "trailing dot", "percent hack or bang path",
            "quoted local part with @", "address literal"} <= reasons


def test_authenticated_submission_over_starttls_relays(loop_name, tmp_path):
    async def scenario():
        async with Mta(tmp_path) as mta:
            # AUTH PLAIN (aiosmtplib), STARTTLS first
            client = await mta.aio_client("submission", start_tls=True)
            assert client.server_auth_methods == ["login", "plain"]
            response = await client.auth_plain("Bob@Example.org", "bob-password")
            assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
            assert (await client.mail("bob@example.org")).code == 250
            assert (await client.rcpt("friend@remote.test")).message == \
                "2.1.5 Recipient ok (relayed for an authenticated client)"
            # percent hack and bang path are just addresses at a remote domain now...
            assert (await client.rcpt("user%x@remote.test")).code == 250
            assert (await client.rcpt("x!user@remote.test")).code == 250
            # ...but a source route is still refused, and unknown local users still 550
            refused = await client.execute_command(b"RCPT", b"TO:<@remote.test:user@other.test>")
            assert (refused.code, refused.message[:5]) == (554, "5.7.1")
            unknown = await client.execute_command(b"RCPT", b"TO:<nobody@example.org>")
            assert (unknown.code, unknown.message[:5]) == (550, "5.1.1")
            response = await client.data(message("relayed"))
            assert response.code == 250
            relayed_id = response.message.rsplit(" ", 1)[1]
            await client.quit()

            # AUTH LOGIN (aiosmtplib sends the user name with the command)
            client = await mta.aio_client("submission", start_tls=True)
            response = await client.auth_login("carol@example.org", "carol-password")
            assert response.code == 235
            assert (await client.mail("carol@example.org")).code == 250
            assert (await client.rcpt("someone@remote.test")).code == 250
            assert (await client.data(message("login"))).code == 250
            await client.quit()

            # AUTH LOGIN the other way (smtplib waits for both challenges), on the smtp port
            def smtplib_login():
                with mta.smtplib_client("smtp") as s:
                    s.starttls(context=mta.client_tls)
                    s.ehlo()
                    assert "LOGIN" in s.esmtp_features["auth"]
                    s.user, s.password = "bob@example.org", "bob-password"
                    result = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
                    refused = s.sendmail("bob@example.org", ["far@remote.test"], message("smtplib"))
                    return result, refused
            result, refused = await asyncio.to_thread(smtplib_login)
            assert result[0] == 235 and refused == {}

            entries = {e.id: e for e in await mta.entries()}
            assert len(entries) == 3
            relayed = entries[relayed_id]
            assert relayed.params == {"auth_user": "bob@example.org"}
            assert [r.address for r in relayed.recipients] == ["friend@remote.test", "user%x@remote.test",
                                                               "x!user@remote.test"]
            stored = await mta.queue.read_message(relayed)
            assert stored.startswith(b"Received: from client.example ([127.0.0.1])\r\n"
                                     b"\tby mta1.intermail.test with ESMTPSA id " + relayed_id.encode() + b"; ")
            assert sorted(e.sender for e in entries.values()) == ["bob@example.org", "bob@example.org",
                                                                  "carol@example.org"]

    run_on(loop_name, scenario())


async def test_submission_requires_auth_and_auth_requires_tls(tmp_path):
    async with Mta(tmp_path) as mta:
        plain = base64.b64encode(b"\0bob@example.org\0bob-password")
        raw = await mta.raw("submission")
        ehlo = await raw.cmd("EHLO client.example")
        assert b"AUTH" not in ehlo and b"STARTTLS" in ehlo
        assert code(await raw.cmd(b"AUTH PLAIN " + plain)) == (538, "5.7.11")
        assert code(await raw.cmd("MAIL FROM:<bob@example.org>")) == (530, "5.7.0")
        assert code(await raw.cmd("RCPT TO:<bob@example.org>")) == (530, "5.7.0")
        assert code(await raw.cmd("DATA")) == (530, "5.7.0")
        raw.close()

        # the smtp listener offers AUTH only after STARTTLS as well
        raw = await mta.raw("smtp")
        assert b"AUTH" not in await raw.cmd("EHLO client.example")
        assert code(await raw.cmd(b"AUTH LOGIN")) == (538, "5.7.11")
        raw.close()

        # after STARTTLS and AUTH, MAIL is allowed; AUTH inside a transaction is not
        client = await mta.aio_client("submission", start_tls=True)
        await client.auth_plain("bob@example.org", "bob-password")
        again = await client.execute_command(b"AUTH", b"PLAIN", plain)
        assert (again.code, again.message[:5]) == (503, "5.5.1")
        assert (await client.mail("bob@example.org")).code == 250
        await client.quit()

        client = await mta.aio_client("submission", start_tls=True)  # TLS but no AUTH yet
        response = await client.execute_command(b"MAIL", b"FROM:<bob@example.org>")
        assert (response.code, response.message[:5]) == (530, "5.7.0")
        await client.quit()
    with pytest.raises(ValueError, match="hostname"):
        SmtpFrontEnd(None, None, hostname="", submission=True, limits=LimitsConfig(),  # type: ignore[arg-type]
                     tls_context=None, on_enqueued=lambda qid: None)


async def test_submission_without_tls_context_warns_and_refuses_mail(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with Mta(tmp_path) as mta:
        front = SmtpFrontEnd(mta.flaky, mta.directory, hostname=HOSTNAME, submission=True,  # type: ignore[arg-type]
                             limits=mta.limits, tls_context=None, on_enqueued=mta.kicked.append)
        host, port = await front.listen(mta.runner, "submission-plain", HOST, 0)
        reader, writer = await asyncio.open_connection(host, port)
        raw = Raw(reader, writer)
        await raw.reply()
        ehlo = await raw.cmd("EHLO client.example")
        assert b"STARTTLS" not in ehlo and b"AUTH" not in ehlo
        assert code(await raw.cmd("MAIL FROM:<bob@example.org>")) == (530, "5.7.0")
        raw.close()
    [warning] = events(caplog, "mta.smtp_no_auth")
    assert warning.levelno == logging.WARNING and warning.im_fields["listener"] == "submission-plain"


async def test_wrong_password_is_535_then_delayed_then_throttled(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    limits = LimitsConfig(auth_failures_before_delay=1)
    throttle = AuthThrottle(user_failures=3, ip_failures=0)
    async with Mta(tmp_path, limits=limits, throttle=throttle, auth_failure_delay=0.4) as mta:
        client = await mta.aio_client("smtp", start_tls=True)
        started = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await client.auth_plain("bob@example.org", "wrong")
        assert (info.value.code, info.value.message) == (535, "5.7.8 Authentication credentials invalid")
        assert time.monotonic() - started < 0.4  # the first failure is answered at once
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
                await client.auth_login("bob@example.org", "wrong")
            assert info.value.code == 535
            assert time.monotonic() - started >= 0.4  # past auth_failures_before_delay
        # three failures: the directory now refuses the account for a while, even with the right password
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await client.auth_plain("bob@example.org", "bob-password")
        assert info.value.code == 454 and info.value.message.startswith("4.7.0 too many failed logins")
        # unknown users and malformed names are just wrong credentials
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await client.auth_plain("nobody", "x")
        assert info.value.code == 535
        await client.quit()
    results = [r.im_fields["result"] for r in events(caplog, "mta.smtp_auth")]
    assert results == ["invalid", "invalid", "invalid", "throttled", "invalid"]
    assert all("bob-password" not in r.getMessage() and "wrong" not in str(r.im_fields)
               for r in events(caplog, "mta.smtp_auth"))


async def test_auth_protocol_errors(tmp_path):
    async with Mta(tmp_path) as mta:
        client = await mta.aio_client("submission", start_tls=True)
        for args, expected in [
            ((b"PLAIN", b"not-base64!"), (501, "5.5.2")),
            ((b"PLAIN", base64.b64encode(b"no-nul-here")), (501, "5.5.2")),
            ((b"PLAIN", base64.b64encode(b"carol@example.org\0bob@example.org\0bob-password")), (535, "5.7.8")),
            ((b"CRAM-MD5",), (504, "5.5.4")),
        ]:
            response = await client.execute_command(b"AUTH", *args)
            assert (response.code, response.message[:len(expected[1])]) == expected, args
        # PLAIN with an empty initial response, then the credentials after the 334
        response = await client.execute_command(b"AUTH", b"PLAIN")
        assert response.code == 334
        response = await client.execute_command(base64.b64encode(b"\0bob@example.org\0bob-password"))
        assert response.code == 235
        await client.quit()

        client = await mta.aio_client("submission", start_tls=True)
        response = await client.execute_command(b"AUTH", b"LOGIN")
        assert (response.code, base64.b64decode(response.message)) == (334, b"Username:")
        response = await client.execute_command(b"*")  # the client gives up
        assert (response.code, response.message[:5]) == (501, "5.7.0")
        await client.quit()


# == 3. failures: nothing acknowledged is lost ==========================================


async def test_directory_down_is_451_and_auth_454(tmp_path):
    async with Mta(tmp_path) as mta:
        client = await mta.aio_client("smtp", start_tls=True)
        assert (await client.mail("alice@sender.test")).code == 250
        assert (await client.rcpt("bob@example.org")).code == 250  # looked up (and cached) while it is up
        await mta.stop_directory()
        response = await client.execute_command(b"RCPT", b"TO:<carol@example.org>")
        assert (response.code, response.message) == (451, "4.4.3 Directory unavailable, try again later")
        # the recipient accepted before the outage is still delivered
        response = await client.data(message())
        assert response.code == 250
        await client.quit()
        client = await mta.aio_client("submission", start_tls=True)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await client.auth_plain("bob@example.org", "bob-password")
        assert (info.value.code, info.value.message) == (454, "4.7.0 Temporary authentication failure, try again later")
        await client.quit()
        [entry] = await mta.entries()
        assert [r.address for r in entry.recipients] == ["bob@example.org"]


def test_queue_failure_is_451_and_nothing_is_queued(loop_name, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with Mta(tmp_path) as mta:
            mta.flaky.failing = True

            def session():
                with mta.smtplib_client() as s:
                    s.ehlo()
                    s.mail("alice@sender.test")
                    s.rcpt("bob@example.org")
                    failed = s.data(message())
                    mta.flaky.failing = False  # the client retries, on the same connection
                    s.mail("alice@sender.test")
                    s.rcpt("bob@example.org")
                    return failed, s.data(message())

            failed, retried = await asyncio.to_thread(session)
            assert failed == (451, b"4.3.0 Queue unavailable, try again later")
            assert retried[0] == 250
            entries = await mta.entries()
            assert [e.id for e in entries] == [retried[1].decode().rsplit(" ", 1)[1]]
            assert mta.kicked == [entries[0].id]

    run_on(loop_name, scenario())
    [failure] = events(caplog, "mta.smtp_queue_failed")
    assert "every mirror failed" in failure.im_fields["error"] and failure.im_context["queue_id"]


async def test_client_hanging_up_during_the_queue_write_loses_nothing(tmp_path):
    async with Mta(tmp_path) as mta:
        mta.flaky.delay = 0.3
        raw = await mta.raw()
        await raw.cmd("EHLO client.example")
        await raw.cmd("MAIL FROM:<alice@sender.test>")
        await raw.cmd("RCPT TO:<bob@example.org>")
        assert code(await raw.cmd("DATA")) == (354, "")
        raw.writer.write(message() + b".\r\n")
        await asyncio.wait_for(mta.flaky.writing.wait(), 5)
        raw.writer.transport.abort()  # gone before the 250
        raw.close()
        await mta.smtp.close()  # what the app's stop() does before closing the queue
        # no 250 was sent, but the message was queued and the queue manager kicked:
        # the client's retry may bring a second copy (RFC 5321 §6.1), never none
        [entry] = await mta.entries()
        assert mta.kicked == [entry.id]


# == 4. limits ==========================================================================


async def test_oversize_message_is_552(tmp_path):
    async with Mta(tmp_path, limits=LimitsConfig(message_size=10_000)) as mta:
        raw = await mta.raw()
        assert b"250-SIZE 10000" in await raw.cmd("EHLO client.example")
        assert code(await raw.cmd("MAIL FROM:<alice@sender.test> SIZE=10001")) == (552, "5.3.4")
        assert code(await raw.cmd("MAIL FROM:<alice@sender.test> SIZE=9000")) == (250, "2.1.0")
        assert code(await raw.cmd("RCPT TO:<bob@example.org>")) == (250, "2.1.5")
        assert code(await raw.cmd("DATA")) == (354, "")
        raw.writer.write(message(body="x" * 70 + "\r\n") * 150 + b".\r\n")  # SIZE lied
        assert code(await raw.reply()) == (552, "5.3.4")
        assert code(await raw.cmd("NOOP")) == (250, "2.0.0")  # still in step
        raw.close()
        assert await mta.entries() == []

        def smtplib_oversize():
            with mta.smtplib_client() as s:
                with pytest.raises(smtplib.SMTPSenderRefused) as info:
                    s.sendmail("alice@sender.test", ["bob@example.org"], b"x" * 20_000)
                return info.value.smtp_code, info.value.smtp_error
        assert await asyncio.to_thread(smtplib_oversize) == (552, b"5.3.4 Message size exceeds fixed maximum"
                                                                  b" message size")
        assert await mta.entries() == []


async def test_too_many_recipients_is_452(tmp_path):
    async with Mta(tmp_path, limits=LimitsConfig(recipients=3)) as mta:
        raw = await mta.raw()
        await raw.cmd("EHLO client.example")
        await raw.cmd("MAIL FROM:<alice@sender.test>")
        for rcpt in ("bob@example.org", "carol@example.org", "team@example.org"):
            assert code(await raw.cmd(f"RCPT TO:<{rcpt}>")) == (250, "2.1.5")
        assert code(await raw.cmd("RCPT TO:<bob@example.org>")) == (452, "4.5.3")
        assert code(await raw.cmd("DATA")) == (354, "")
        assert code(await raw.cmd(message().rstrip(b"\r\n") + b"\r\n.")) == (250, "2.0.0")
        raw.close()
        [entry] = await mta.entries()
        assert len(entry.recipients) == 3


async def test_mail_and_rcpt_parameters_are_checked(tmp_path):
    async with Mta(tmp_path) as mta:
        raw = await mta.raw()
        await raw.cmd("EHLO client.example")
        for line, expected in [
            ("MAIL FROM:<alice@sender.test> RET=SOME", (501, "5.5.4")),
            ("MAIL FROM:<alice@sender.test> ENVID=" + "x" * 101, (501, "5.5.4")),
            ("MAIL FROM:<alice@sender.test> ENVID=bad+zz", (501, "5.5.4")),
            ("MAIL FROM:<alice@sender.test> BODY=BINARYMIME", (501, "5.5.4")),
            ("MAIL FROM:<alice@sender.test> SIZE=big", (501, "5.5.4")),
            ("MAIL FROM:<alice@sender.test> SMTPUTF8=yes", (501, "5.5.4")),
            ("MAIL FROM:<alice@sender.test> FOO=BAR", (555, "5.5.4")),
            ("MAIL FROM:<alice@sender.test> RET=FULL RET=HDRS", (501, "5.5.4")),
            ("MAIL FROM:<alice@@sender.test>", (501, "5.1.7")),
            ("MAIL FROM:<alice@sender.test.>", (501, "5.1.7")),
            ("MAIL FROM:<jörg@sender.test>", (553, "5.6.7")),  # UTF-8 without SMTPUTF8
            ("MAIL TO:<alice@sender.test>", (501, "5.5.2")),
            ("MAIL FROM: <alice@sender.test> AUTH=<> RET=full ENVID=abc", (250, "2.1.0")),
            ("MAIL FROM:<alice@sender.test>", (503, "5.5.1")),  # nested
        ]:
            assert code(await raw.cmd(line)) == expected, line
        for line, expected in [
            ("RCPT TO:<bob@example.org> NOTIFY=NEVER,SUCCESS", (501, "5.5.4")),
            ("RCPT TO:<bob@example.org> NOTIFY=SOMETIMES", (501, "5.5.4")),
            ("RCPT TO:<bob@example.org> NOTIFY=", (501, "5.5.4")),
            ("RCPT TO:<bob@example.org> ORCPT=bob@example.org", (501, "5.5.4")),
            ("RCPT TO:<bob@example.org> ORCPT=rfc822;bad+zz", (501, "5.5.4")),
            ("RCPT TO:<bob@example.org> XFOO", (555, "5.5.4")),
            ("RCPT TO: <bob@example.org> notify=never orcpt=rfc822;bob+40example.org", (250, "2.1.5")),
        ]:
            assert code(await raw.cmd(line)) == expected, line
        assert code(await raw.cmd("RSET")) == (250, "2.0.0")
        # SMTPUTF8: a UTF-8 sender is taken as written
        assert code(await raw.cmd("MAIL FROM:<jörg@sender.test> SMTPUTF8")) == (250, "2.1.0")
        assert code(await raw.cmd("RCPT TO:<bob@example.org>")) == (250, "2.1.5")
        assert code(await raw.cmd("DATA")) == (354, "")
        assert code(await raw.cmd(message().rstrip(b"\r\n") + b"\r\n.")) == (250, "2.0.0")
        # HELO: no parameters
        assert code(await raw.cmd("HELO client.example")) == (250, "")
        assert code(await raw.cmd("MAIL FROM:<alice@sender.test> SIZE=10")) == (555, "5.5.4")
        raw.close()
        entries = await mta.entries()
        assert [(e.sender, e.params) for e in entries] == [("jörg@sender.test", {"SMTPUTF8": True})]


async def test_junk_and_overlong_lines_get_errors_not_internals(tmp_path):
    async with Mta(tmp_path) as mta:
        raw = await mta.raw()
        replies = []
        for line in [
            b"MAIL FROM:<alice@sender.test>",  # before EHLO
            b"\xff\xfe\xfd",
            b"",
            b"\x00\x01\x02 \x03",
            b"EHLO client.example",
            b"RCPT TO:<bob@example.org>",  # before MAIL
            b"DATA",  # before RCPT
            b"MAIL FROM:<<alice@sender.test>>",
            b"MAIL FROM:alice@sender.test",
            b"MAIL FROM:<alice@sender.test> \xff=\xfe",
            b"FOO bar",
            b"VRFY bob@example.org",
            b"EXPN team@example.org",
            b"A" * 2000,
            b"MAIL FROM:<" + b"a" * 600 + b"@sender.test>",
            b"RSET now",
            b"NOOP",
        ]:
            reply = await raw.cmd(line)
            replies.append(reply)
            assert REPLY_LINE.match(reply), (line, reply)
            assert not any(leak in reply for leak in LEAKS), (line, reply)
            if not line.startswith(b"EHLO"):
                assert ENHANCED.match(reply), (line, reply)
        assert [code(r)[0] for r in replies] == [503, 500, 500, 500, 250, 503, 503, 501, 501, 501, 500, 252, 502,
                                                 500, 501, 501, 250]
        assert code(replies[13]) == (500, "5.5.6")  # the overlong line
        # an overlong line inside DATA: the message is refused, the session stays in step
        await raw.cmd("MAIL FROM:<alice@sender.test>")
        await raw.cmd("RCPT TO:<bob@example.org>")
        assert code(await raw.cmd("DATA")) == (354, "")
        assert code(await raw.cmd(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n.")) == (500, "5.5.6")
        assert code(await raw.cmd("NOOP")) == (250, "2.0.0")
        # a line of the longest allowed length (998 octets + CRLF) is fine
        await raw.cmd("MAIL FROM:<alice@sender.test>")
        await raw.cmd("RCPT TO:<bob@example.org>")
        await raw.cmd("DATA")
        assert code(await raw.cmd(b"Subject: x\r\n\r\n" + b"." + b"z" * 997 + b"\r\n.")) == (250, "2.0.0")
        # five unknown commands and the server hangs up
        for _ in range(2):  # the NUL-led line and "FOO bar" above were the first two unknown commands
            assert code(await raw.cmd("BOGUS")) == (500, "5.5.1")
        assert code(await raw.cmd("BOGUS")) == (502, "5.5.1")
        assert await raw.closed() == b""
        raw.close()
        [entry] = await mta.entries()
        stored = await mta.queue.read_message(entry)
        assert stored.endswith(b"\r\n\r\n" + b"z" * 997 + b"\r\n")  # the transparency dot removed


def test_bare_line_ends_are_refused_and_cannot_smuggle(loop_name, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with Mta(tmp_path) as mta:
            raw = await mta.raw()
            await raw.cmd("EHLO client.example")
            smuggled = (b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                        b"Subject: smuggled\r\n\r\nsmuggled\r\n")
            for end in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"):
                await raw.cmd("MAIL FROM:<alice@sender.test>")
                await raw.cmd("RCPT TO:<bob@example.org>")
                assert code(await raw.cmd("DATA")) == (354, "")
                # the client's own end marker comes last: only CRLF.CRLF ends a message
                reply = await raw.cmd(b"Subject: first\r\n\r\nfirst" + end + smuggled + b".")
                assert code(reply) == (554, "5.6.0"), end
                assert code(await raw.cmd("NOOP")) == (250, "2.0.0")  # exactly one reply: in step
            # a lone CR or LF inside a line is refused as well
            await raw.cmd("MAIL FROM:<alice@sender.test>")
            await raw.cmd("RCPT TO:<bob@example.org>")
            await raw.cmd("DATA")
            assert code(await raw.cmd(b"Subject: x\r\n\r\nbare\nline\r\n.")) == (554, "5.6.0")
            raw.close()
            assert await mta.entries() == []

    run_on(loop_name, scenario())
    assert len(events(caplog, "mta.smtp_refused")) == 6


def test_slowloris_is_disconnected_after_the_command_timeout(loop_name, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with Mta(tmp_path, limits=LimitsConfig(command_timeout=0.5)) as mta:
            raw = await mta.raw()
            assert code(await raw.cmd("EHLO client.example"))[0] == 250
            started = time.monotonic()
            # one byte at a time, never a whole line
            assert await trickle(raw, [bytes([b]) for b in b"MAIL FROM:<alice@sender.test>" * 3]) == \
                b"421 4.4.2 Timeout exceeded, closing connection\r\n"
            assert 0.4 < time.monotonic() - started < 3.0
            assert await raw.closed() == b""
            raw.close()

            # inside DATA the whole upload must fit in the timeout as well
            raw = await mta.raw()
            await raw.cmd("EHLO client.example")
            await raw.cmd("MAIL FROM:<alice@sender.test>")
            await raw.cmd("RCPT TO:<bob@example.org>")
            assert code(await raw.cmd("DATA")) == (354, "")
            assert (await trickle(raw, [b"a line of text\r\n"] * 60)).startswith(b"421 4.4.2")
            raw.close()
            assert await mta.entries() == []
            async with asyncio.timeout(5):
                while mta.runner.connection_count:
                    await asyncio.sleep(0.01)

    run_on(loop_name, scenario())
    assert len(events(caplog, "mta.smtp_timeout")) == 2


async def test_connections_per_ip_limit(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with Mta(tmp_path, limits=LimitsConfig(connections_per_ip=2)) as mta:
        first = await mta.raw()
        second = await mta.raw("submission")  # the limit counts per front end and listener
        third = await mta.raw()
        reader, writer = await asyncio.open_connection(HOST, mta.port())
        refused = Raw(reader, writer)
        assert await refused.closed() == b"421 4.7.0 Too many connections from your address, try again later\r\n"
        refused.close()
        first.close()
        async with asyncio.timeout(5):
            while mta.smtp.connection_count != 1:
                await asyncio.sleep(0.01)
        fourth = await mta.raw()  # a slot is free again
        assert code(await fourth.cmd("NOOP")) == (250, "2.0.0")
        for raw in (second, third, fourth):
            raw.close()
    assert len(events(caplog, "mta.smtp_too_many_connections")) == 1


# == 5. shutdown ========================================================================


async def test_stop_lets_a_message_finish_and_closes_idle_sessions(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with Mta(tmp_path, drain_timeout=10) as mta:
        idle = await mta.raw()
        await idle.cmd("EHLO client.example")
        busy = await mta.raw()
        await busy.cmd("EHLO client.example")
        await busy.starttls(mta.client_tls)  # a TLS session counts like any other
        assert b"250-AUTH LOGIN PLAIN\r\n" in await busy.cmd("EHLO client.example")
        assert code(await busy.cmd("MAIL FROM:<alice@sender.test>")) == (250, "2.1.0")
        assert code(await busy.cmd("RCPT TO:<bob@example.org>")) == (250, "2.1.5")
        assert code(await busy.cmd("DATA")) == (354, "")
        assert mta.runner.connection_count == 2

        mta.runner.request_stop(reason="test")
        assert await idle.closed() == b"421 4.3.2 Service shutting down, closing connection\r\n"
        idle.close()
        await asyncio.sleep(0.1)
        assert not mta.serving.done()  # the message in flight holds the drain
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, mta.port())
        reply = await busy.cmd(message("during shutdown") + b".")  # the rest of the upload
        assert reply.startswith(b"250 2.0.0 Ok: queued as ")
        assert await busy.closed() == b"421 4.3.2 Service shutting down, closing connection\r\n"
        await asyncio.wait_for(mta.serving, 5)
        assert mta.runner.connection_count == 0
        [entry] = await mta.entries()
        assert entry.id == reply.decode().split()[-1]
        busy.close()
    assert not any(r.im_event == "runner.cancelled" for r in caplog.records if hasattr(r, "im_event"))


async def test_stop_aborts_a_stuck_tls_session_after_the_drain_timeout(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with Mta(tmp_path, drain_timeout=0.3) as mta:
        stuck = await mta.aio_client("submission", start_tls=True)
        await stuck.auth_plain("bob@example.org", "bob-password")
        await stuck.mail("bob@example.org")
        await stuck.rcpt("friend@remote.test")
        assert (await stuck.execute_command(b"DATA")).code == 354
        stuck.protocol.write(b"Subject: never finished\r\n")
        await asyncio.sleep(0.05)
        mta.runner.request_stop(reason="test")
        await asyncio.wait_for(mta.serving, 5)
        assert mta.runner.connection_count == 0 and mta.submission.connection_count == 0
        with pytest.raises(aiosmtplib.SMTPException):
            await stuck.noop()
        stuck.close()
        assert await mta.entries() == []
    assert any(r.im_event == "runner.cancelled" for r in caplog.records if hasattr(r, "im_event"))


# == 6. pieces ==========================================================================


def test_received_header_is_safe_and_well_formed():
    when = datetime.datetime(2026, 11, 24, 10, 30, 0, tzinfo=datetime.timezone.utc)
    header = received_header(helo="evil (x) \\ \x7f", client_ip="2001:db8::1", reverse_name="host (fake)",
                             hostname=HOSTNAME, protocol="ESMTPSA", queue_id="01ABC", recipient=None, when=when)
    assert header == (b"Received: from evil??x????? (host??fake? [IPv6:2001:db8::1])\r\n"
                      b"\tby mta1.intermail.test with ESMTPSA id 01ABC; Tue, 24 Nov 2026 10:30:00 +0000\r\n")
    header = received_header(helo="", client_ip="192.0.2.7", reverse_name=None, hostname=HOSTNAME,
                             protocol="SMTP", queue_id="01ABC", recipient="bob@example.org", when=when)
    assert header == (b"Received: from unknown ([192.0.2.7])\r\n\tby mta1.intermail.test with SMTP id 01ABC\r\n"
                      b"\tfor <bob@example.org>; Tue, 24 Nov 2026 10:30:00 +0000\r\n")


@pytest.mark.parametrize("aiosmtpd_reply, ours", [
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("220 mta1 ESMTP intermail", "220 mta1 ESMTP intermail"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("535 5.7.8 Authentication credentials invalid", "535 5.7.8 Authentication credentials invalid"),
    ('500 Error: command "FOO" not recognized', "500 5.5.1 Command unrecognized"),
    ("500 Error: bad syntax", "500 5.5.2 Syntax error"),
    ("503 Error: send HELO first", "503 5.5.1 Send HELO or EHLO first"),
    ("552 Error: Too much mail data", "552 5.3.4 Message size exceeds fixed maximum message size"),
    ("501 Syntax: RSET", "501 5.5.4 Syntax: RSET"),
    ("252 Cannot VRFY user", "252 2.0.0 Cannot VRFY user"),
    ("not a reply", "not a reply"),
])
def test_aiosmtpd_replies_get_enhanced_codes(aiosmtpd_reply, ours):
    assert enhance(aiosmtpd_reply) == ours

