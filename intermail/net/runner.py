"""The one runner skeleton every server kind starts on (after Postfix's single_server_main).

Owns: a process's listeners, its live connections and its life cycle:
start the app (which opens listeners with :meth:`Runner.listen`, or
:meth:`Runner.listen_protocol` for a library that is an asyncio protocol, or
:meth:`Runner.listen_datagram` for UDP; port 0 allowed), record each listener's real ``(host, port)`` in
:attr:`Runner.addresses`, optionally publish them in a JSON *ready file*,
serve until SIGTERM/SIGINT (or :meth:`Runner.request_stop`), then drain and
exit.

Shutdown order, and why:

1. stop accepting (close the listening sockets) and set :attr:`Runner.stopping`,
   so long-lived sessions (IMAP IDLE) can say goodbye early;
2. let live connections finish for up to ``drain_timeout`` seconds: a client
   half way through DATA gets its reply rather than a reset;
3. cancel whatever is still running, so one stuck peer cannot hold a
   shutdown (a second SIGTERM/SIGINT skips straight to this step);
4. ``await app.stop()``, only now, because live sessions may need the app's
   resources (store, queue) until they end;
5. remove the ready file, log ``runner.stopped``; ``serve()`` returns the exit code.

Invariants: every connection task is tracked from accept to close and its
socket is closed when its handler returns, however it returns; each
connection runs with a fresh ``session_id`` and its ``peer`` in the log
context, so every line its handler logs carries them.  A protocol
connection (:meth:`Runner.listen_protocol`) is tracked the same way, by a
watcher task that lives from its ``connection_made`` to its
``connection_lost`` and aborts the transport when it is cancelled.

Logs: ``runner.listening``, ``runner.ready``, ``runner.draining``,
``runner.cancelled``, ``runner.handler_failed``, ``runner.start_failed``,
``runner.stop_failed``, ``runner.stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl as ssl_module
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from intermail.ids import new_session_id
from intermail.log import log_context, log_event

log = logging.getLogger("intermail.net.runner")

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_STOP_FAILED = 1
CANCEL_GRACE = 5.0  # seconds cancelled handlers get to unwind before we stop waiting


class App(Protocol):
    """What a server kind gives the runner."""

    async def start(self, runner: Runner) -> None:
        """Open listeners with ``runner.listen`` and start background work."""

    async def stop(self) -> None:
        """Release resources; called once, after connections have drained."""


class Runner:
    """Runs one app: listeners, connection tracking, signals, drain."""

    def __init__(
        self,
        app: App,
        *,
        instance: str = "",
        drain_timeout: float = 10.0,
        ready_file: str | os.PathLike[str] | None = None,
        install_signals: bool = True,
    ):
        self.app = app
        self.instance = instance
        self.drain_timeout = drain_timeout
        self.ready_file = Path(ready_file) if ready_file is not None else None
        self.install_signals = install_signals
        self.addresses: dict[str, tuple[str, int]] = {}
        self.stopping = asyncio.Event()  # set once a stop is requested: handlers may wrap up
        self.exit_code = EXIT_OK
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._datagrams: dict[str, asyncio.BaseTransport] = {}
        self._connections: set[asyncio.Task] = set()
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()  # skip the drain wait (second signal, cancellation)
        self._signals: list[int] = []
        self._stop_reason = ""
        self._shut_down = False
        self._ready = False  # the ready file has been written

    # -- listeners and connections -------------------------------------------------

    async def listen(
        self,
        name: str,
        host: str,
        port: int,
        handler: ConnectionHandler,
        *,
        ssl: ssl_module.SSLContext | None = None,
        limit: int = 64 * 1024,
        reuse_port: bool | None = None,
        backlog: int = 100,
    ) -> tuple[str, int]:
        """Open a stream listener called ``name``; returns (and records) the bound address.

        ``port`` 0 binds any free port.  ``limit`` is the StreamReader buffer
        limit (reading pauses above twice that).  Should ``host`` resolve to
        several addresses, the first bound socket is the one recorded.
        """
        self._check_new_listener(name)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_connection(name, handler, reader, writer)

        server = await asyncio.start_server(
            on_connect, host, port, ssl=ssl, limit=limit, reuse_port=reuse_port, backlog=backlog
        )
        return self._record_listener(name, server, tls=ssl is not None)

    async def listen_protocol(
        self,
        name: str,
        host: str,
        port: int,
        factory: ProtocolFactory,
        *,
        ssl: ssl_module.SSLContext | None = None,
        reuse_port: bool | None = None,
        backlog: int = 100,
    ) -> tuple[str, int]:
        """Like :meth:`listen`, for a server whose connections are asyncio protocols from ``factory``.

        For libraries that are protocols themselves (aiosmtpd's ``SMTP``).
        Each connection is tracked like a stream connection: from its first
        ``connection_made`` to its ``connection_lost`` it counts in
        :attr:`connection_count` and holds the drain; past the drain timeout
        its transport is aborted.  Its ``connection_made`` runs in a log
        context with a fresh ``session_id`` and its ``peer``, so the tasks
        the protocol starts there log with them.  A protocol that swaps its
        transport (STARTTLS: ``connection_made`` again, with the TLS
        transport) is still the same connection.
        """
        self._check_new_listener(name)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: self._track_protocol(name, factory()), host, port, ssl=ssl, reuse_port=reuse_port,
            backlog=backlog,
        )
        return self._record_listener(name, server, tls=ssl is not None)

    async def listen_datagram(
        self,
        name: str,
        host: str,
        port: int,
        factory: ProtocolFactory,
        *,
        sock: socket.socket | None = None,
    ) -> tuple[str, int]:
        """Open a UDP endpoint called ``name`` with a protocol from ``factory``; returns its bound address.

        ``sock``, when given, is an already bound datagram socket to serve on
        instead of (host, port) -- for a service that needs one port number
        free for both UDP and TCP (DNS).  A datagram endpoint has no
        connections to track or drain: it is closed with the stream
        listeners, when the shutdown stops accepting.
        """
        self._check_new_listener(name)
        loop = asyncio.get_running_loop()
        if sock is not None:
            transport, _ = await loop.create_datagram_endpoint(factory, sock=sock)
        else:
            transport, _ = await loop.create_datagram_endpoint(factory, local_addr=(host, port))
        sockname = transport.get_extra_info("sockname")
        bound = (str(sockname[0]), int(sockname[1]))
        self._datagrams[name] = transport
        self.addresses[name] = bound
        log_event(log, "runner.listening", listener=name, host=bound[0], port=bound[1], tls=False, transport="udp")
        if self._ready and self.ready_file is not None:
            write_ready_file(self.ready_file, self.addresses, instance=self.instance)
        return bound

    def _check_new_listener(self, name: str) -> None:
        if name in self._servers or name in self._datagrams:
            raise ValueError(f"listener {name!r} is already open")
        if self.stopping.is_set():
            raise RuntimeError("the runner is stopping: no new listeners")

    def _record_listener(self, name: str, server: asyncio.AbstractServer, *, tls: bool) -> tuple[str, int]:
        sockname = server.sockets[0].getsockname()
        bound = (str(sockname[0]), int(sockname[1]))
        self._servers[name] = server
        self.addresses[name] = bound
        log_event(log, "runner.listening", listener=name, host=bound[0], port=bound[1], tls=tls)
        if self._ready and self.ready_file is not None:
            # a listener opened after start (a spare taking over): publish it too
            write_ready_file(self.ready_file, self.addresses, instance=self.instance)
        return bound

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _add_connection(self, task: asyncio.Task) -> None:
        self._connections.add(task)
        self._no_connections.clear()

    def _remove_connection(self, task: asyncio.Task) -> None:
        self._connections.discard(task)
        if not self._connections:
            self._no_connections.set()

    async def _serve_connection(
        self, name: str, handler: ConnectionHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._add_connection(task)
        try:
            with log_context(session_id=new_session_id(), peer=_peer_text(writer.get_extra_info("peername"))):
                try:
                    await handler(reader, writer)
                except (ConnectionError, asyncio.IncompleteReadError):
                    pass  # the peer went away: normal for mail clients, not a fault of ours
                except Exception:
                    log_event(log, "runner.handler_failed", level=logging.ERROR, exc_info=True, listener=name)
        finally:
            self._remove_connection(task)
            # Close the socket even when the handler forgot to or was cancelled;
            # not awaiting wait_closed() here keeps cancellation prompt.
            writer.close()

    def _track_protocol(self, name: str, protocol: asyncio.BaseProtocol) -> asyncio.BaseProtocol:
        """Hook ``protocol``'s connection_made/lost so that its connection is tracked (see listen_protocol).

        The hooks are set on the instance rather than by wrapping the protocol
        in a proxy: a protocol that starts TLS itself (aiosmtpd's STARTTLS)
        hands its transport to an SSLProtocol, which from then on calls the
        protocol directly, past any proxy, and its connection_lost would be missed.
        """
        loop = asyncio.get_running_loop()
        protocol_made = protocol.connection_made
        protocol_lost = protocol.connection_lost
        closed: asyncio.Future[None] = loop.create_future()
        watcher: asyncio.Task | None = None

        def connection_made(transport: asyncio.BaseTransport) -> None:
            nonlocal watcher
            if watcher is not None:  # the same connection, on a new transport (STARTTLS)
                protocol_made(transport)
                return
            with log_context(session_id=new_session_id(), peer=_peer_text(transport.get_extra_info("peername"))):
                watcher = loop.create_task(self._watch_protocol(transport, closed))
                self._add_connection(watcher)
                watcher.add_done_callback(lambda task: self._protocol_watch_done(task, transport, closed))
                try:
                    protocol_made(transport)
                except Exception:
                    log_event(log, "runner.handler_failed", level=logging.ERROR, exc_info=True, listener=name)
                    transport.abort()
                    if not closed.done():
                        closed.set_result(None)

        def connection_lost(exc: Exception | None) -> None:
            try:
                protocol_lost(exc)
            finally:
                if not closed.done():
                    closed.set_result(None)

        # Instance attributes shadow the class's methods for every caller.
        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    async def _watch_protocol(self, transport: asyncio.BaseTransport, closed: asyncio.Future[None]) -> None:
        """Stands for one protocol connection in the connection set, until it is lost."""
        try:
            await asyncio.shield(closed)
        except asyncio.CancelledError:
            # The drain is over: drop the connection (the transport, whatever
            # protocol now sits on it) and give connection_lost a moment to run.
            transport.abort()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(CANCEL_GRACE):
                    await asyncio.shield(closed)
            raise

    def _protocol_watch_done(self, task: asyncio.Task, transport: asyncio.BaseTransport,
                             closed: asyncio.Future[None]) -> None:
        self._remove_connection(task)
        if not closed.done():
            transport.abort()  # cancelled before it ever ran: the connection must still go

    # -- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Install signal handlers, start the app, write the ready file."""
        if self.install_signals:
            self._install_signal_handlers()
        if self.ready_file is not None:
            # A parent polling for the file must never read a previous run's ports.
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
        await self.app.start(self)
        if self.ready_file is not None:
            write_ready_file(self.ready_file, self.addresses, instance=self.instance)
        self._ready = True
        loop = asyncio.get_running_loop()
        log_event(
            log, "runner.ready",
            listeners={name: list(addr) for name, addr in self.addresses.items()},
            loop=f"{type(loop).__module__}.{type(loop).__name__}",
            pid=os.getpid(),
        )

    def request_stop(self, *, exit_code: int = EXIT_OK, reason: str = "requested", hurry: bool = False) -> None:
        """Begin the shutdown sequence (safe to call more than once, from the loop thread).

        An app that must exit, e.g. a store fenced by a newer owner (I-6),
        calls this with a non-zero ``exit_code``; ``hurry`` skips the drain
        (live connections are cancelled at once: nothing more may be answered).
        """
        if hurry:
            self._hurry.set()
        if self._stop_requested.is_set():
            return
        self.exit_code = exit_code
        self._stop_reason = reason
        self._stop_requested.set()

    async def wait_stop_requested(self) -> None:
        await self._stop_requested.wait()

    async def serve(self) -> int:
        """Start, serve until asked to stop, drain, stop; returns the process exit code."""
        try:
            await self.start()
        except Exception:
            log_event(log, "runner.start_failed", level=logging.ERROR, exc_info=True)
            self._hurry.set()
            self.exit_code = EXIT_START_FAILED
            self._stop_reason = "start failed"
            await self.shutdown()
            return self.exit_code
        try:
            await self._stop_requested.wait()
        except asyncio.CancelledError:
            # Cancelled by whoever embeds us (a test, asyncio.Runner on
            # Ctrl-C): still close sockets and stop the app, but skip the drain.
            self._hurry.set()
            self._stop_reason = self._stop_reason or "cancelled"
            await self.shutdown()
            raise
        await self.shutdown()
        return self.exit_code

    async def shutdown(self) -> None:
        """Stop accepting, drain, cancel the rest, stop the app (runs once)."""
        if self._shut_down:
            return
        self._shut_down = True
        self.stopping.set()
        for server in self._servers.values():
            server.close()
        for transport in self._datagrams.values():
            transport.close()
        # Logged after the close, so whoever reads this line can rely on it:
        # the listeners no longer accept.
        log_event(
            log, "runner.draining",
            reason=self._stop_reason or "requested",
            connections=len(self._connections),
            drain_timeout=self.drain_timeout,
        )
        try:
            await self._drain()
            await self._cancel_remaining()
            for server in self._servers.values():
                # Python 3.11 returns at once here; newer versions wait for
                # the (by now closed) connections.  Bounded either way.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CANCEL_GRACE):
                        await server.wait_closed()
            try:
                await self.app.stop()
            except Exception:
                log_event(log, "runner.stop_failed", level=logging.ERROR, exc_info=True)
                if self.exit_code == EXIT_OK:
                    self.exit_code = EXIT_STOP_FAILED
        finally:
            self._remove_signal_handlers()
            if self.ready_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.ready_file.unlink()
            log_event(log, "runner.stopped", reason=self._stop_reason or "requested", exit_code=self.exit_code)

    async def _drain(self) -> None:
        if not self._connections or self._hurry.is_set() or self.drain_timeout <= 0:
            return
        waiters = {
            asyncio.ensure_future(self._no_connections.wait()),
            asyncio.ensure_future(self._hurry.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=self.drain_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _cancel_remaining(self) -> None:
        remaining = set(self._connections)
        if not remaining:
            return
        log_event(log, "runner.cancelled", level=logging.WARNING, connections=len(remaining))
        for task in remaining:
            task.cancel()
        await asyncio.wait(remaining, timeout=CANCEL_GRACE)

    # -- signals --------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                # Not the main thread, or a platform without loop signal
                # support: the embedding code must call request_stop().
                continue
            self._signals.append(sig)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_signal(self, sig: int) -> None:
        if self._stop_requested.is_set():
            self._hurry.set()  # asked twice: stop waiting for stragglers
        else:
            self.request_stop(reason=signal.Signals(sig).name)


def _peer_text(peer: object) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


# -- ready file -------------------------------------------------------------------------


def write_ready_file(path: str | os.PathLike[str], addresses: dict[str, tuple[str, int]], *,
                     instance: str = "") -> None:
    """Publish the bound addresses as JSON, atomically (a reader never sees half a file).

    Content: ``{"instance": ..., "pid": N, "listeners": {name: {"host": h, "port": p}}}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "instance": instance,
        "pid": os.getpid(),
        "listeners": {name: {"host": host, "port": port} for name, (host, port) in addresses.items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(content, fh)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_ready_file(path: str | os.PathLike[str]) -> dict[str, tuple[str, int]]:
    """The listener addresses a runner published with :func:`write_ready_file`."""
    with open(path) as fh:
        content = json.load(fh)
    return {name: (entry["host"], int(entry["port"])) for name, entry in content["listeners"].items()}


# -- process entry ----------------------------------------------------------------------


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event-loop factory for ``loop``: "auto" (uvloop if importable), "asyncio" or "uvloop".

    ``None`` means asyncio's default loop.
    """
    if loop == "asyncio":
        return None
    if loop not in ("auto", "uvloop"):
        raise ValueError(f"loop must be 'auto', 'asyncio' or 'uvloop', not {loop!r}")
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise
        return None
    # uvloop.install() and its policy are deprecated: pass the factory (LIBRARIES.md §7).
    return uvloop.new_event_loop


def run(
    app: App,
    *,
    loop: str = "auto",
    instance: str = "",
    drain_timeout: float = 10.0,
    ready_file: str | os.PathLike[str] | None = None,
) -> int:
    """Run ``app`` in a new event loop until it is stopped; returns the exit code.

    For a service's ``main()``: ``sys.exit(run(app, loop=config.runner.loop, ...))``.
    """

    async def main() -> int:
        runner = Runner(app, instance=instance, drain_timeout=drain_timeout, ready_file=ready_file)
        return await runner.serve()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main())
