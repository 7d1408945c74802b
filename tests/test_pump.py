"""intermail.net.pump over real loopback sockets, on asyncio and uvloop.

The machine here is a trivial CRLF line protocol defined in this file: one
event per line, an explicit event at end of input, and a line-length limit
that raises the remote error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

import pytest
import trustme

from intermail.errors import LocalProtocolError, RemoteProtocolError
from intermail.net.pump import CHUNK_SIZE, PeerClosedError, Pump, PumpTimeout
from intermail.proto import NEED_DATA
from intermail.testing.feed import assert_split_invariant
from intermail.testing.loops import run_on


@dataclass(frozen=True)
class Line:
    text: bytes


@dataclass(frozen=True)
class Closed:
    pass


class LineMachine:
    """CRLF lines in, Line events out; Closed once after the peer's EOF."""

    def __init__(self, max_line: int = 1000, eof_event: bool = True):
        self._buf = bytearray()
        self._eof = False
        self._closed_sent = False
        self.max_line = max_line
        self.eof_event = eof_event

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> object:
        end = self._buf.find(b"\r\n")
        if end >= 0:
            if end > self.max_line:
                raise RemoteProtocolError("line too long")
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            return Line(line)
        if len(self._buf) > self.max_line:
            raise RemoteProtocolError("line too long")
        if self._eof and self.eof_event and not self._closed_sent:
            if self._buf:
                raise RemoteProtocolError("connection closed mid-line")
            self._closed_sent = True
            return Closed()
        return NEED_DATA

    def send(self, event: object) -> bytes:
        assert isinstance(event, Line)
        return event.text + b"\r\n"

    def pending_bytes(self) -> int:
        return len(self._buf)


class NoTlsMachine(LineMachine):
    """A machine that cannot say what it holds: STARTTLS must be refused."""

    pending_bytes = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@contextlib.asynccontextmanager
async def connection(machine=None, **pump_kwargs):
    """A server-side Pump and the raw client streams of one loopback connection."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client_reader, client_writer = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await accepted
    pump = Pump(reader, writer, machine if machine is not None else LineMachine(), **pump_kwargs)
    try:
        yield pump, client_reader, client_writer
    finally:
        client_writer.close()
        writer.close()
        server.close()
        with contextlib.suppress(Exception):
            await client_writer.wait_closed()
        await server.wait_closed()


def test_line_machine_obeys_the_split_contract():
    data = b"EHLO a\r\nMAIL FROM:<x@y>\r\n\r\nQUIT\r\n"
    events = assert_split_invariant(LineMachine, data)
    assert events == [Line(b"EHLO a"), Line(b"MAIL FROM:<x@y>"), Line(b""), Line(b"QUIT")]


def test_echo_and_pipelined_lines(loop_name):
    async def scenario():
        async with connection() as (pump, client_r, client_w):
            client_w.write(b"one\r\ntwo\r\nthree\r\n")
            await client_w.drain()
            got = [await pump.next_event(timeout=5) for _ in range(3)]
            assert got == [Line(b"one"), Line(b"two"), Line(b"three")]
            for event in got:
                await pump.send(event)
            await pump.send_all([Line(b"a"), Line(b"b")])
            assert await client_r.readexactly(len(b"one\r\ntwo\r\nthree\r\na\r\nb\r\n")) == \
                b"one\r\ntwo\r\nthree\r\na\r\nb\r\n"
            assert pump.bytes_received == 17 and pump.bytes_sent == 23

    run_on(loop_name, scenario())


def test_split_reads_assemble_one_event(loop_name):
    async def scenario():
        async with connection(read_size=1) as (pump, client_r, client_w):
            task = asyncio.ensure_future(pump.next_event(timeout=5))
            for piece in (b"hel", b"lo wo", b"rld\r", b"\nnext\r\n"):
                client_w.write(piece)
                await client_w.drain()
                await asyncio.sleep(0.01)
            assert await task == Line(b"hello world")
            # The rest was read one byte at a time and is still served in order.
            assert await pump.next_event(timeout=5) == Line(b"next")

    run_on(loop_name, scenario())


def test_timeout_bounds_the_whole_event(loop_name):
    async def scenario():
        async with connection(timeout=0.2) as (pump, client_r, client_w):
            with pytest.raises(PumpTimeout) as info:
                await pump.next_event()  # the pump's default timeout
            assert info.value.seconds == 0.2
            assert isinstance(info.value, TimeoutError)
            # A trickle of bytes that never completes a line does not reset it.
            client_w.write(b"partial")
            await client_w.drain()
            with pytest.raises(PumpTimeout, match="0.1 s"):
                await pump.next_event(timeout=0.1)
            # The session can go on after a timeout (e.g. to send its 421).
            client_w.write(b" line\r\n")
            await client_w.drain()
            assert await pump.next_event(timeout=None) == Line(b"partial line")

    run_on(loop_name, scenario())


def test_eof_is_fed_to_the_machine(loop_name):
    async def scenario():
        async with connection() as (pump, client_r, client_w):
            client_w.write(b"last\r\n")
            client_w.write_eof()
            assert await pump.next_event(timeout=5) == Line(b"last")
            assert await pump.next_event(timeout=5) == Closed()
            assert pump.at_eof
            # The machine said it all; asking again is a closed connection.
            with pytest.raises(PeerClosedError):
                await pump.next_event(timeout=5)

    run_on(loop_name, scenario())


def test_eof_without_machine_event_raises_peer_closed(loop_name):
    async def scenario():
        async with connection(LineMachine(eof_event=False)) as (pump, client_r, client_w):
            client_w.close()
            with pytest.raises(PeerClosedError):
                await pump.next_event(timeout=5)

    run_on(loop_name, scenario())


def test_eof_mid_line_is_the_remote_error(loop_name):
    async def scenario():
        async with connection() as (pump, client_r, client_w):
            client_w.write(b"half a li")
            client_w.write_eof()
            with pytest.raises(RemoteProtocolError, match="mid-line"):
                await pump.next_event(timeout=5)

    run_on(loop_name, scenario())


def test_machine_errors_propagate(loop_name):
    async def scenario():
        async with connection(LineMachine(max_line=10)) as (pump, client_r, client_w):
            client_w.write(b"x" * 50)
            await client_w.drain()
            with pytest.raises(RemoteProtocolError, match="too long"):
                await pump.next_event(timeout=5)

    run_on(loop_name, scenario())


def test_write_chunks_streams_a_large_body(loop_name):
    body = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: several chunks

    async def scenario():
        async with connection() as (pump, client_r, client_w):
            async def agen():
                yield body[:100_000]
                yield body[100_000:]

            reader_task = asyncio.ensure_future(client_r.readexactly(3 * len(body) + 10))
            assert await pump.write_chunks(agen()) == len(body)
            assert await pump.write_chunks([body[:5], body[5:]]) == len(body)
            assert await pump.write_chunks(body, chunk_size=CHUNK_SIZE // 2) == len(body)
            await pump.write(b"0123456789")
            assert await reader_task == body * 3 + b"0123456789"
            assert pump.bytes_sent == 3 * len(body) + 10

    run_on(loop_name, scenario())


def test_send_timeout_when_peer_does_not_read(loop_name):
    async def scenario():
        async with connection(send_timeout=0.2) as (pump, client_r, client_w):
            with pytest.raises(PumpTimeout, match="peer not reading"):
                await pump.write_chunks(b"z" * (64 * 1024 * 1024))

    run_on(loop_name, scenario())


def test_starttls_upgrade(loop_name, tls_contexts):
    server_ctx, client_ctx = tls_contexts

    async def scenario():
        async with connection() as (server, client_r, client_w):
            client = Pump(client_r, client_w, LineMachine())
            await client.send(Line(b"STARTTLS"))
            assert await server.next_event(timeout=5) == Line(b"STARTTLS")

            async def client_side():
                assert await client.next_event(timeout=5) == Line(b"220 go ahead")
                await client.start_tls(client_ctx, server_hostname="localhost", handshake_timeout=5)

            await asyncio.gather(
                server.start_tls(server_ctx, reply=Line(b"220 go ahead"), handshake_timeout=5),
                client_side(),
            )
            assert server.tls and client.tls
            assert server.get_extra_info("ssl_object").version().startswith("TLS")
            await client.send(Line(b"EHLO secret"))
            assert await server.next_event(timeout=5) == Line(b"EHLO secret")
            await server.send(Line(b"250 ok"))
            assert await client.next_event(timeout=5) == Line(b"250 ok")
            with pytest.raises(LocalProtocolError, match="already"):
                await server.start_tls(server_ctx)

    run_on(loop_name, scenario())


def test_starttls_refuses_plaintext_held_by_the_machine(loop_name, tls_contexts):
    server_ctx, _ = tls_contexts

    async def scenario():
        async with connection() as (server, client_r, client_w):
            # The injection: a command pipelined behind STARTTLS in the clear.
            client_w.write(b"STARTTLS\r\nRCPT TO:<evil@x>\r\n")
            await client_w.drain()
            assert await server.next_event(timeout=5) == Line(b"STARTTLS")
            with pytest.raises(RemoteProtocolError, match="plaintext"):
                await server.start_tls(server_ctx, reply=Line(b"220 go ahead"))
            # No go-ahead was sent and the connection is gone.
            assert await client_r.read() == b""

    run_on(loop_name, scenario())


def test_starttls_refuses_plaintext_held_by_the_reader(loop_name, tls_contexts):
    server_ctx, _ = tls_contexts

    async def scenario():
        async with connection() as (server, client_r, client_w):
            client_w.write(b"STARTTLS\r\n")
            await client_w.drain()
            assert await server.next_event(timeout=5) == Line(b"STARTTLS")
            client_w.write(b"RCPT TO:<evil@x>\r\n")
            await client_w.drain()
            async with asyncio.timeout(5):  # wait until it sits in the StreamReader
                while not server.reader._buffer:
                    await asyncio.sleep(0.005)
            with pytest.raises(RemoteProtocolError, match="plaintext"):
                await server.start_tls(server_ctx, reply=Line(b"220 go ahead"))
            assert await client_r.read() == b""

    run_on(loop_name, scenario())


def test_starttls_needs_a_machine_that_reports_pending_bytes(loop_name, tls_contexts):
    server_ctx, _ = tls_contexts

    async def scenario():
        async with connection(NoTlsMachine()) as (server, client_r, client_w):
            with pytest.raises(LocalProtocolError, match="pending_bytes"):
                await server.start_tls(server_ctx)

    run_on(loop_name, scenario())


def test_bad_read_size():
    with pytest.raises(ValueError):
        Pump(None, None, LineMachine(), read_size=0)  # type: ignore[arg-type]


def test_close_is_clean(loop_name):
    async def scenario():
        async with connection() as (pump, client_r, client_w):
            await pump.send(Line(b"bye"))
            await pump.close(timeout=2)
            assert await client_r.read() == b"bye\r\n"

    run_on(loop_name, scenario())
