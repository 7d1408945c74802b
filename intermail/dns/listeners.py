"""The DNS server's sockets: one :class:`~intermail.dns.server.Authority` on UDP and TCP.

Owns: :class:`DnsServer` -- the UDP protocol, the TCP connection handler
(RFC 7766: two-byte length framing, several messages per connection, an
idle timeout), and the update path, which makes a change durable before
answering it.  ``dnsd`` puts these on the runner
(:mod:`intermail.apps.dns`); :meth:`DnsServer.start` binds them directly,
for tests and tools without a runner::

    server = DnsServer(Authority(zone, key.keyring), save=lambda z: save_zone(z, path))
    host, port = await server.start("127.0.0.1", 0)   # one port, UDP and TCP
    ...
    await server.stop()

Invariants:

- Queries are answered at once, on the loop, from the zone of the moment;
  they never wait for an update.
- Updates are handled one at a time (a lock), each against the zone left by
  the previous one.  An accepted change is saved (in a worker thread: the
  save fsyncs), and only then committed -- visible to queries -- and
  answered NOERROR; a failed save is answered SERVFAIL and changes nothing.
  A save that has begun is finished and committed even if the client goes
  away or the server is stopping: the file and the served zone never
  disagree.
- A bug while answering one message is logged and answered SERVFAIL; it
  never takes a listener down.
- ``port`` 0 picks one port free for both UDP and TCP.

Logs: ``dns.updated`` (peer, key, serial, changes), ``dns.update_refused``
(peer, rcode, why), ``dns.update_failed``, ``dns.handler_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import cast

import dns.rcode

from intermail.dns.server import Authority, ZoneChange, header_reply, is_update
from intermail.dns.zone import Zone
from intermail.log import log_event, register_events

__all__ = ["DnsServer", "bind_udp_and_tcp"]

log = logging.getLogger("intermail.dns")

register_events({
    "dns.updated": "an RFC 2136 update changed the zone, durably (peer, key, serial, changes)",
    "dns.update_refused": "an RFC 2136 update was refused or its prerequisites failed (peer, rcode, why)",
    "dns.update_failed": "an accepted update could not be saved: answered SERVFAIL, zone unchanged",
    "dns.handler_failed": "answering a DNS message raised (a bug): answered SERVFAIL",
})

BIND_ATTEMPTS = 20  # port 0: times to look for a port free for both UDP and TCP
SAVE_WAIT = 10.0  # seconds stop() waits for a save under way


class DnsServer:
    """UDP and TCP front ends of one Authority (see the module doc)."""

    def __init__(self, authority: Authority, *, save: Callable[[Zone], None] | None = None,
                 tcp_idle_timeout: float = 10.0, stopping: asyncio.Event | None = None,
                 on_change: Callable[[Zone], None] | None = None):
        self.authority = authority
        self.save = save
        self.tcp_idle_timeout = tcp_idle_timeout
        self.stopping = stopping if stopping is not None else asyncio.Event()
        self.on_change = on_change
        self._update_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._connections: set[asyncio.Task] = set()
        self.address: tuple[str, int] | None = None

    # -- answering -----------------------------------------------------------------

    def answer_now(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The reply to a message that is not an update."""
        outcome = self._handle(wire, tcp)
        assert not isinstance(outcome, ZoneChange)
        return outcome

    async def respond(self, wire: bytes, *, tcp: bool, peer: str = "") -> bytes | None:
        """The reply to any message; for an update, after its change is durable."""
        if not is_update(wire):
            return self.answer_now(wire, tcp=tcp)
        async with self._update_lock:
            outcome = self._handle(wire, tcp)
            if not isinstance(outcome, ZoneChange):
                if outcome is not None and self.authority.last_refusal:
                    log_event(log, "dns.update_refused", level=logging.WARNING, peer=peer,
                              rcode=dns.rcode.to_text(_rcode_of(outcome)), why=self.authority.last_refusal)
                return outcome
            task = asyncio.get_running_loop().create_task(self._save_and_commit(outcome, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # shielded: a client that goes away does not stop a save half way
            return await asyncio.shield(task)

    def _handle(self, wire: bytes, tcp: bool) -> bytes | ZoneChange | None:
        try:
            return self.authority.handle(wire, tcp=tcp)
        except Exception:
            log_event(log, "dns.handler_failed", level=logging.ERROR, exc_info=True, size=len(wire))
            return header_reply(wire, dns.rcode.SERVFAIL)

    async def _save_and_commit(self, change: ZoneChange, peer: str) -> bytes:
        if self.save is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.save, change.after)
            except Exception as exc:
                log_event(log, "dns.update_failed", level=logging.ERROR, peer=peer, key=change.key,
                          error=f"{type(exc).__name__}: {exc}"[:200])
                return change.failed
        self.authority.commit(change)
        log_event(log, "dns.updated", peer=peer, key=change.key, serial=change.after.serial,
                  changes=list(change.changes))
        if self.on_change is not None:
            self.on_change(change.after)
        return change.reply

    # -- UDP -----------------------------------------------------------------------

    def datagram_protocol(self) -> asyncio.DatagramProtocol:
        """A protocol for one UDP endpoint (a factory for ``create_datagram_endpoint``)."""
        return _UdpProtocol(self)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- TCP -----------------------------------------------------------------------

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection: length-prefixed messages until EOF, idle timeout or stop."""
        peer = _peer_text(writer.get_extra_info("peername"))
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        self._writers.add(writer)
        try:
            while not self.stopping.is_set():
                head = await self._read_or_stop(reader, 2)
                if head is None:
                    return
                size = int.from_bytes(head, "big")
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        wire = await reader.readexactly(size)
                except TimeoutError:
                    return
                reply = await self.respond(wire, tcp=True, peer=peer)
                if reply is None:
                    return  # not a request: nothing sensible more will come
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._connections.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _read_or_stop(self, reader: asyncio.StreamReader, n: int) -> bytes | None:
        """``n`` bytes, or None on idle timeout or when the server stops (between messages only)."""
        read = asyncio.ensure_future(reader.readexactly(n))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({read, stop}, timeout=self.tcp_idle_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not read.done():
                read.cancel()
        if read in done:
            return read.result()
        with contextlib.suppress(asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            await read
        return None

    # -- standalone binding ----------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on UDP and TCP ``port`` of ``host`` (0: one port free for both); the bound address."""
        loop = asyncio.get_running_loop()

        async def open_tcp(bound: int) -> None:
            self._tcp = await asyncio.start_server(self.serve_tcp, host, bound)

        async def open_udp(sock: socket.socket) -> None:
            transport, _ = await loop.create_datagram_endpoint(self.datagram_protocol, sock=sock)
            self._udp = cast(asyncio.DatagramTransport, transport)

        self.address = await bind_udp_and_tcp(host, port, open_tcp, open_udp)
        return self.address

    async def stop(self) -> None:
        """Close both listeners and every TCP connection; wait for a save under way."""
        self.stopping.set()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for writer in list(self._writers):
            writer.close()
        if self._connections:  # they see `stopping` (or their closed socket) and return
            await asyncio.wait(list(self._connections), timeout=SAVE_WAIT)
        await self.close()

    async def close(self) -> None:
        """Wait (bounded) for updates under way: their saves must finish and be committed."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=SAVE_WAIT)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if is_update(data):
            self.server._spawn(self._update(data, addr))
            return
        reply = self.server.answer_now(data, tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    async def _update(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.server.respond(data, tcp=False, peer=_peer_text(addr))
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from a client that went away: nothing to do


async def bind_udp_and_tcp(host: str, port: int, open_tcp: Callable[[int], Awaitable[None]],
                           open_udp: Callable[[socket.socket], Awaitable[None]]) -> tuple[str, int]:
    """Bind a UDP socket and a TCP listener on one port of ``host``; returns (host, port).

    ``open_tcp(port)`` opens the TCP listener, ``open_udp(sock)`` serves the
    bound UDP socket.  With ``port`` 0 a port is chosen for UDP and tried
    for TCP, again until both are free.
    """
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    for _ in range(BIND_ATTEMPTS if port == 0 else 1):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
            bound = sock.getsockname()[1]
            await open_tcp(bound)
        except OSError as exc:
            sock.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue  # the UDP port is taken over TCP: pick another
            raise
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        await open_udp(sock)
        return (host, bound)
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")


def _rcode_of(reply: bytes) -> dns.rcode.Rcode:
    return dns.rcode.Rcode.make(reply[3] & 0xF) if len(reply) >= 4 else dns.rcode.Rcode.SERVFAIL


def _peer_text(peer: object) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
