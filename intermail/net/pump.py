"""The one asyncio driver for every sans-I/O machine in :mod:`intermail.proto`.

Owns: reading from the socket (how much, when, with which timeout), feeding
the machine, writing what the machine produces with flow control, streaming
large bodies, and the STARTTLS transport switch.  Protocol code never touches
a StreamReader or StreamWriter; a session is a loop over
``await pump.next_event(...)`` and ``await pump.send(...)``.

Contract with the machine (see :mod:`intermail.proto`): ``receive_data``,
``next_event`` → event or ``NEED_DATA``, ``send(event)`` → bytes; ``b""`` is
fed exactly once, when the peer closes.  A machine whose protocol has
STARTTLS also implements ``pending_bytes() -> int``: how many received bytes
it holds that no event has consumed yet.

Invariants:

- The machine is asked for an event before any read, so pipelined commands
  already buffered are served without touching the socket.
- A timeout bounds the wait for one *whole event*, not one read: a peer
  trickling a byte a minute cannot hold a session open past it.
- Writes are followed by ``drain()``, so a peer that does not read stalls
  only its own session, never the process's memory.
- Bodies stream in chunks of at most :data:`CHUNK_SIZE` bytes with a drain
  after each: ``loop.sendfile`` is not an option (uvloop raises
  NotImplementedError for it, LIBRARIES.md §7).
- STARTTLS refuses (``RemoteProtocolError``, connection aborted) if any
  plaintext byte arrived after the STARTTLS command, whether the machine or
  the StreamReader holds it: such bytes would otherwise be taken as sent
  inside TLS (the RFC 3207 §4.2 / RFC 2595 §3.1 injection).

Logs: nothing; the session using the pump logs what it means.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, Iterable
from typing import Any

from intermail.errors import LocalProtocolError, RemoteProtocolError
from intermail.proto import NEED_DATA, Machine

CHUNK_SIZE = 64 * 1024  # one write+drain per chunk when streaming bodies
READ_SIZE = 64 * 1024  # default bytes asked of the StreamReader per read


class PumpTimeout(TimeoutError):
    """The peer did not complete an event (or did not read our data) in time."""

    def __init__(self, what: str, seconds: float):
        self.what = what
        self.seconds = seconds
        super().__init__(f"{what}: nothing for {seconds:g} s")


class PeerClosedError(ConnectionError):
    """The peer closed the connection and the machine has no further event."""


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


class Pump:
    """Drives one machine over one (StreamReader, StreamWriter) pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        machine: Machine,
        *,
        read_size: int = READ_SIZE,
        timeout: float | None = None,
        send_timeout: float | None = None,
    ):
        """``timeout``: default wait for one event; ``send_timeout``: longest a
        drain may wait for the peer to read (None = no limit)."""
        if read_size < 1:
            raise ValueError("read_size must be at least 1")
        self.reader = reader
        self.writer = writer
        self.machine = machine
        self.read_size = read_size
        self.timeout = timeout
        self.send_timeout = send_timeout
        self.bytes_received = 0
        self.bytes_sent = 0
        self._eof = False

    # -- reading --------------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        """True once the peer's close has been fed to the machine."""
        return self._eof

    async def next_event(self, timeout: float | None = DEFAULT) -> object:
        """The machine's next event, reading as much as it needs.

        ``timeout`` (default: the pump's) bounds the whole wait; on expiry
        :class:`PumpTimeout` is raised.  At end of input ``b""`` is fed to the
        machine; if it still needs data, :class:`PeerClosedError` is raised.
        ``RemoteProtocolError`` from the machine and OSErrors from the socket
        propagate unchanged.
        """
        event = self.machine.next_event()
        if event is not NEED_DATA:
            return event
        if timeout is DEFAULT:
            timeout = self.timeout
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                while True:
                    if self._eof:
                        raise PeerClosedError("connection closed by peer")
                    data = await self.reader.read(self.read_size)
                    if data:
                        self.bytes_received += len(data)
                    else:
                        self._eof = True
                    self.machine.receive_data(data)
                    event = self.machine.next_event()
                    if event is not NEED_DATA:
                        return event
        except TimeoutError:
            # Only our own deadline becomes PumpTimeout; an OS-level
            # ETIMEDOUT (also a TimeoutError) is a dead connection.
            if deadline.expired():
                raise PumpTimeout("waiting for the peer", timeout) from None
            raise

    # -- writing --------------------------------------------------------------------

    async def send(self, event: object) -> None:
        """Write ``machine.send(event)`` and wait until the transport can take more."""
        await self.write(self.machine.send(event))

    async def send_all(self, events: Iterable[object]) -> None:
        """Several events, one drain (pipelined replies)."""
        data = b"".join(self.machine.send(event) for event in events)
        await self.write(data)

    async def write(self, data: bytes) -> None:
        """Write raw bytes the machine has announced (e.g. an IMAP literal), then drain."""
        if data:
            self.writer.write(data)
            self.bytes_sent += len(data)
        await self._drain()

    async def write_chunks(self, chunks: AsyncIterable[bytes] | Iterable[bytes] | bytes, *,
                           chunk_size: int = CHUNK_SIZE) -> int:
        """Stream a body: each piece of at most ``chunk_size`` bytes is written then drained.

        The caller must have sent whatever event tells the peer these bytes
        come (a literal's size, a ``+OK``), and the bytes must be on the wire
        format already (dot-stuffed, CRLF).  Returns the number of bytes written.
        """
        total = 0
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            return await self._write_pieces(chunks, chunk_size)
        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                total += await self._write_pieces(chunk, chunk_size)
        else:
            for chunk in chunks:
                total += await self._write_pieces(chunk, chunk_size)
        return total

    async def _write_pieces(self, chunk: bytes, chunk_size: int) -> int:
        view = memoryview(chunk)
        for start in range(0, len(view), chunk_size):
            piece = view[start:start + chunk_size]
            self.writer.write(piece)
            self.bytes_sent += len(piece)
            await self._drain()
        return len(view)

    async def _drain(self) -> None:
        if self.send_timeout is None:
            await self.writer.drain()
            return
        deadline = asyncio.timeout(self.send_timeout)
        try:
            async with deadline:
                await self.writer.drain()
        except TimeoutError:
            if deadline.expired():
                raise PumpTimeout("peer not reading", self.send_timeout) from None
            raise

    # -- TLS ------------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return self.writer.get_extra_info("ssl_object") is not None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport information (``peername``, ``sockname``, ``ssl_object``, ``peercert``…)."""
        return self.writer.get_extra_info(name, default)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        *,
        reply: object | None = None,
        server_hostname: str | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        """Switch this connection to TLS, after the STARTTLS (or STLS) exchange.

        Server side: pass the "go ahead" event as ``reply``; it is written in
        the same step as the switch, with no await in between (LIBRARIES.md §7).
        Client side: call after reading the server's go-ahead, with
        ``server_hostname``.  Which side we are follows from how the stream
        was opened (``start_server`` or ``open_connection``).

        Raises RemoteProtocolError, after aborting the connection, if
        plaintext arrived after the STARTTLS command; ssl.SSLError or an
        OSError if the handshake fails.
        """
        if self.tls:
            raise LocalProtocolError("connection is already using TLS")
        pending_bytes = getattr(self.machine, "pending_bytes", None)
        if pending_bytes is None:
            raise LocalProtocolError(
                f"{type(self.machine).__name__} has no pending_bytes(): "
                "cannot check for plaintext injected before TLS"
            )
        transport = self.writer.transport
        # From here no more plaintext can be delivered to the reader, so the
        # check below cannot be overtaken by a late packet.  loop.start_tls
        # resumes reading on the TLS side once it is wired in.
        transport.pause_reading()
        # StreamReader has no public "bytes buffered" accessor; _buffer is
        # the bytearray both asyncio and uvloop streams fill.
        buffered = len(getattr(self.reader, "_buffer", b"")) + pending_bytes()
        if buffered:
            transport.abort()
            raise RemoteProtocolError(f"{buffered} bytes of plaintext sent after STARTTLS")
        if reply is not None:
            data = self.machine.send(reply)
            self.writer.write(data)
            self.bytes_sent += len(data)
        await self.writer.start_tls(
            ssl_context, server_hostname=server_hostname, ssl_handshake_timeout=handshake_timeout
        )

    # -- closing --------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Flush and close; abort if the peer does not let the close finish in time."""
        self.writer.close()
        try:
            async with asyncio.timeout(timeout):
                await self.writer.wait_closed()
        except TimeoutError:
            self.writer.transport.abort()
        except (ConnectionError, ssl.SSLError):
            pass  # the peer is gone either way
