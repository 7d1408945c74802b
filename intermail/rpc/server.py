"""The asyncio RPC server: one :class:`RpcConnection` per connection, driven by the pump.

Owns: the server end of the store and directory RPC on real sockets --
the HELLO exchange, dispatch of each REQUEST to a handler from a table,
many requests in flight per connection, streamed request and response
bodies, CANCEL, server push to subscribed connections, the idle timeout, and
a graceful stop.  It knows no method but the two built-ins (``ping``,
``subscribe``/``unsubscribe``); the mail store and the directory bring theirs::

    server = RpcServer({"user.lookup": lookup}, instance="dir1")
    await runner.listen("rpc", host, port, server.handle_connection)
    # or: await server.listen(runner, "rpc", host, port)  -- also stops with the runner

A handler is ``async def handler(ctx: CallContext, args: dict) -> dict | Streamed``.
``ctx`` carries the session id, the peer, the client's instance name, the
request body (``async for data in ctx.body()`` / ``await ctx.read_body(limit)``,
empty unless the request had MORE) and ``ctx.connection.push(...)``.  Return
``Streamed(result, body)`` to send a response body (bytes, or an iterable or
async iterable of bytes) in CHUNK frames.

Invariants:

- One reader per connection (the task :meth:`RpcServer.handle_connection`
  runs in) and one task per request.  Results are written as they complete,
  in any order.  Every ``machine.send`` is immediately followed by its
  ``writer.write`` with no await in between, so concurrent tasks never
  interleave bytes within a frame and the machine's state always matches
  what is on the wire; each task then drains on its own.
- Every request gets exactly one terminal frame while the connection lives:
  the handler's result, an ERROR, or (after CANCEL of a streaming response)
  an empty final CHUNK.
- The peer never sees internals: a :class:`MailError` becomes ERROR with its
  kind and *safe* text (detail logged at debug); any other exception becomes
  ERROR ``temp`` with a fixed text, the traceback goes to the log only.
- A handler that returns before reading its whole request body gets the rest
  drained and dropped; the RESPONSE goes out once the body has ended (the
  protocol wants a complete request before a success).
- Backpressure is per connection: a request body that its handler does not
  read holds at most :data:`~intermail.rpc._common.BODY_BUFFER` bytes, then
  the connection stops being read (see ``_common``).
- Pushes never block the caller: :meth:`ServerConnection.push` writes at
  once; a subscriber whose unsent output exceeds ``max_push_backlog`` bytes is
  disconnected (it reconnects and resynchronises) rather than buffered
  without bound.
- Losing the connection cancels its handler tasks: nobody can receive their
  answers.  A client's CANCEL cancels that one handler task.
- Stop: GOODBYE to every connection, new requests answered ERROR
  ``unavailable`` with :data:`~intermail.rpc._common.NOT_RUN_TEXT` (so
  clients know they may resend them elsewhere), in-flight requests get up to
  ``timeout`` seconds, then their tasks are cancelled and the sockets closed.

Logs: ``rpc.connected``, ``rpc.disconnected``, ``rpc.protocol_error``,
``rpc.handler_failed`` (with the traceback), ``rpc.request_error`` (debug),
``rpc.idle_timeout``, ``rpc.push_dropped``, ``rpc.server_stopping``,
``rpc.server_stopped``.  Lines carry the runner's ``session_id`` and
``peer``; a handler's lines also carry ``rpc_id`` and ``method``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from intermail.errors import ErrorKind, LocalProtocolError, MailError, RemoteProtocolError
from intermail.ids import new_session_id
from intermail.log import current_context, log_context, log_event
from intermail.net.pump import PeerClosedError, Pump, PumpTimeout
from intermail.net.runner import Runner
from intermail.proto.rpc import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_IN_FLIGHT,
    Chunk,
    ConnectionClosed,
    ErrorResponse,
    Goodbye,
    Hello,
    Push,
    Request,
    Response,
    RpcConnection,
)
from intermail.rpc._common import (
    BODY_BUFFER,
    NOT_RUN_KIND,
    NOT_RUN_TEXT,
    Body,
    BodyBuffer,
    body_pieces,
    chunk_size,
    lookahead,
)

__all__ = ["RpcServer", "ServerConnection", "CallContext", "Streamed", "Handler", "BUILTIN_METHODS"]

log = logging.getLogger("intermail.rpc.server")

INTERNAL_ERROR_TEXT = "internal error, try again later"  # never more than this for a bug
UNKNOWN_METHOD_TEXT = "unknown method"
CANCELLED_TEXT = "request cancelled"
INTERRUPTED_TEXT = "server stopped before the request completed"
BUILTIN_METHODS = frozenset({"ping", "subscribe", "unsubscribe"})
CLOSE_GRACE = 5.0  # seconds a cancelled connection's tasks get to unwind


@dataclasses.dataclass(frozen=True)
class Streamed:
    """A handler's answer with a response body: ``result`` in RESPONSE+MORE, ``body`` in CHUNKs."""

    result: dict
    body: Body


Handler = Callable[["CallContext", dict], Awaitable["dict | Streamed"]]


class CallContext:
    """What a handler knows about the request it serves."""

    def __init__(self, connection: ServerConnection, request_id: int, method: str, body: BodyBuffer | None):
        self.connection = connection
        self.request_id = request_id
        self.method = method
        self._body = body

    @property
    def session_id(self) -> str:
        return self.connection.session_id

    @property
    def peer(self) -> str:
        return self.connection.peer

    @property
    def client_instance(self) -> str:
        return self.connection.client_instance

    @property
    def has_body(self) -> bool:
        return self._body is not None

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, piece by piece (nothing if the request had no body).

        Raises MailError(UNAVAILABLE) if the connection ends before the body does.
        """
        if self._body is not None:
            async for data in self._body:
                yield data

    async def read_body(self, limit: int | None = None) -> bytes:
        """The whole request body; MailError(LIMIT) beyond ``limit`` bytes."""
        if self._body is None:
            return b""
        return await self._body.read(limit)


def _peer_text(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)


class _ServerRequest:
    __slots__ = ("id", "method", "task", "body", "cancelled_by_peer")

    def __init__(self, request_id: int, method: str, body: BodyBuffer | None):
        self.id = request_id
        self.method = method
        self.task: asyncio.Task | None = None
        self.body = body
        self.cancelled_by_peer = False


class ServerConnection:
    """One client connection: its machine, pump, requests in flight and subscriptions."""

    def __init__(self, server: RpcServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.machine = RpcConnection(
            "server", server.instance, max_frame=server.max_frame, max_in_flight=server.max_in_flight
        )
        self.pump = Pump(reader, writer, self.machine, send_timeout=server.send_timeout)
        self.writer = writer
        context = current_context()
        self.session_id: str = context.get("session_id") or new_session_id()
        self.peer: str = context.get("peer") or _peer_text(writer)
        self.client_instance = ""
        self.subscriptions: set[str] = set()
        self.requests: dict[int, _ServerRequest] = {}
        self._closing = False

    # -- writing (synchronous: see the module invariants) --------------------------

    def _write_now(self, event: object) -> None:
        self.writer.write(self.machine.send(event))

    async def _send(self, event: object) -> None:
        await self.pump.send(event)

    def push(self, topic: str, data: dict | None = None) -> bool:
        """Send a PUSH now; False if this connection cannot take it (and was closed if too slow)."""
        if self._closing or self.machine.peer is None or self.machine.goodbye_sent:
            return False
        transport = self.writer.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > self.server.max_push_backlog:
            log_event(log, "rpc.push_dropped", level=logging.WARNING, session_id=self.session_id,
                      topic=topic, backlog=transport.get_write_buffer_size())
            self.abort()
            return False
        self._write_now(Push(topic, data or {}))
        return True

    def say_goodbye(self, reason: str) -> None:
        """Start no new work here; close once what is in flight has finished."""
        if self.machine.peer is None:
            self.close()  # HELLO not even exchanged: nothing to finish
            return
        if not self.machine.goodbye_sent and self.machine.error is None:
            with contextlib.suppress(LocalProtocolError):
                self._write_now(Goodbye(reason))
        self._close_if_idle()

    def close(self) -> None:
        """Flush what is written and close; the reader then sees the end of the stream."""
        self._closing = True
        self.writer.close()

    def abort(self) -> None:
        self._closing = True
        self.writer.transport.abort()

    def _close_if_idle(self) -> None:
        if self.machine.goodbye_sent and not self.requests:
            self.close()

    # -- the reader ----------------------------------------------------------------

    async def run(self) -> None:
        server = self.server
        reason = "closed by peer"
        try:
            await self._send(self.machine.local_hello)
            hello = await self.pump.next_event(timeout=server.handshake_timeout)
            if not isinstance(hello, Hello):
                reason = "closed before HELLO"  # a port probe
                return
            self.client_instance = hello.instance
            log_event(log, "rpc.connected", client=hello.instance, version=self.machine.version)
            if server.stopping:
                self.say_goodbye("server shutting down")
            while not self._closing:
                try:
                    event = await self.pump.next_event(timeout=server.idle_timeout)
                except PumpTimeout:
                    if self._waiting_on_us():
                        continue
                    log_event(log, "rpc.idle_timeout", idle_timeout=server.idle_timeout)
                    reason = "idle timeout"
                    self.say_goodbye("idle timeout")
                    self.close()
                    return
                if isinstance(event, ConnectionClosed) or self._closing:
                    return  # once we closed, nothing more can be answered
                await self._dispatch(event)
            reason = "closed by server"
        except RemoteProtocolError as exc:
            reason = "protocol error"
            log_event(log, "rpc.protocol_error", level=logging.WARNING, error=exc.text)
            # Tell the peer why, when the HELLOs were exchanged; else just close.
            with contextlib.suppress(LocalProtocolError, RuntimeError, ConnectionError):
                self._write_now(Goodbye(exc.text[:200]))
        except PumpTimeout:
            reason = "no HELLO in time"
        except (PeerClosedError, ConnectionError, OSError) as exc:
            reason = f"connection error: {type(exc).__name__}"
        finally:
            await self._end(reason)

    def _waiting_on_us(self) -> bool:
        """A quiet peer is fine while every open request waits on us, or it awaits pushes."""
        states = self.machine.in_flight.values()
        if states:
            return all(state in ("waiting", "streaming") for state in states)
        return bool(self.subscriptions) and not self.machine.goodbye_sent

    async def _end(self, reason: str) -> None:
        in_flight = len(self.requests)
        self._closing = True
        lost = MailError(ErrorKind.UNAVAILABLE, detail="connection closed")
        tasks = []
        for request in list(self.requests.values()):
            if request.body is not None:
                request.body.fail(lost)
            if request.task is not None and not request.task.done():
                request.task.cancel()
                tasks.append(request.task)
        try:
            if tasks:
                await asyncio.wait(tasks, timeout=CLOSE_GRACE)
        finally:
            self.writer.close()
            if self.machine.peer is not None:
                log_event(log, "rpc.disconnected", reason=reason, in_flight=in_flight)

    async def _dispatch(self, event: object) -> None:
        if isinstance(event, Request):
            self._start_request(event)
            return
        if isinstance(event, Goodbye):
            return  # the client starts nothing new and closes when it is done
        # Chunk or Cancel: the machine refuses anything else from a client.
        request = self.requests.get(event.id)
        if request is None:
            return
        if isinstance(event, Chunk):
            if request.body is not None:
                await request.body.put(event.data, event.final)
        else:
            request.cancelled_by_peer = True
            if request.body is not None:
                request.body.fail(MailError(ErrorKind.INVALID, CANCELLED_TEXT))
            if request.task is not None:
                request.task.cancel()
        if request.task is None or request.task.done():
            self._finish(event.id)  # answered already; this ended its body

    def _start_request(self, request: Request) -> None:
        if self.machine.goodbye_sent:
            # Crossed our GOODBYE on the wire: not run, and the text says so.
            self._write_now(ErrorResponse(request.id, NOT_RUN_KIND, NOT_RUN_TEXT))
            if request.more:  # its body still comes and is dropped
                self.requests[request.id] = _ServerRequest(request.id, request.method, None)
            return
        body = BodyBuffer(self.server.body_buffer) if request.more else None
        record = _ServerRequest(request.id, request.method, body)
        self.requests[request.id] = record
        with log_context(rpc_id=request.id, method=request.method):
            record.task = asyncio.get_running_loop().create_task(self._serve(record, request.args))
        # The callback, not a finally in _serve, because a task cancelled
        # before its first step never runs its coroutine at all.
        record.task.add_done_callback(lambda task: self._request_done(record))

    def _request_done(self, record: _ServerRequest) -> None:
        if record.body is not None:
            record.body.discard()
        if record.task is not None and record.task.cancelled() and not self._closing:
            self._terminate(record, ErrorKind.UNAVAILABLE, INTERRUPTED_TEXT)
        self._finish(record.id)

    def _finish(self, request_id: int) -> None:
        """Forget a request once the machine has freed its id."""
        if request_id not in self.machine.in_flight:
            self.requests.pop(request_id, None)
            self._close_if_idle()

    # -- one request ---------------------------------------------------------------

    async def _serve(self, record: _ServerRequest, args: dict) -> None:
        ctx = CallContext(self, record.id, record.method, record.body)
        try:
            answer = await self.server._call(ctx, args)
            if not isinstance(answer, (dict, Streamed)):
                raise TypeError(f"handler returned {type(answer).__name__}, not a dict or Streamed")
            if record.body is not None and not record.body.ended:
                record.body.discard()  # the rest is dropped as it arrives
                await record.body.wait_ended()
            if isinstance(answer, Streamed):
                # the response goes out with the body's first piece: one write for a small answer
                await self._stream(record, answer.body, head=Response(record.id, answer.result, more=True))
            else:
                await self._send(Response(record.id, answer))
        except asyncio.CancelledError:
            if not record.cancelled_by_peer or self._closing:
                raise  # connection lost or server stopping: see _request_done
            asyncio.current_task().uncancel()
            self._terminate(record, ErrorKind.TEMP, CANCELLED_TEXT)
        except MailError as exc:
            log_event(log, "rpc.request_error", level=logging.DEBUG, kind=exc.kind.value, detail=exc.detail)
            self._terminate(record, exc.kind, exc.safe)
        except (PumpTimeout, ConnectionError):
            self.abort()  # the peer does not read, or is gone: nothing more to say
        except Exception:
            if self._closing:
                return  # e.g. a send on the closed transport: nobody to tell
            log_event(log, "rpc.handler_failed", level=logging.ERROR, exc_info=True)
            self._terminate(record, ErrorKind.TEMP, INTERNAL_ERROR_TEXT)

    def _terminate(self, record: _ServerRequest, kind: ErrorKind, text: str) -> None:
        """The terminal frame of a request that did not succeed, if one is still owed."""
        state = self.machine.in_flight.get(record.id)
        if state not in ("sending", "waiting", "streaming") or self.writer.transport.is_closing():
            return
        try:
            if state == "streaming" and record.cancelled_by_peer:
                self._write_now(Chunk(record.id, b"", final=True))
            else:
                self._write_now(ErrorResponse(record.id, kind, text))
        except (LocalProtocolError, RuntimeError):
            pass  # the connection failed meanwhile

    async def _stream(self, record: _ServerRequest, body: Body, head: Response) -> None:
        pieces = body_pieces(body, chunk_size(self.machine.peer_max_frame))
        pending: Response | None = head
        try:
            async with contextlib.aclosing(lookahead(pieces)) as numbered:
                async for piece, last in numbered:
                    frames: list[object] = [] if pending is None else [pending]
                    pending = None
                    if record.cancelled_by_peer:
                        frames.append(Chunk(record.id, b"", final=True))
                    else:
                        frames.append(Chunk(record.id, piece, final=last))
                    await self.pump.send_all(frames)
                    if record.cancelled_by_peer:
                        return
            if pending is not None:  # not reached: lookahead yields one empty final piece for an empty body
                await self._send(pending)
        finally:
            await pieces.aclose()
            closer = getattr(body, "aclose", None)
            if closer is not None:
                await closer()


class RpcServer:
    """Serves RPC connections: a handler table plus the built-in methods."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        instance: str = "",
        max_frame: int = DEFAULT_MAX_FRAME,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        idle_timeout: float | None = 300.0,
        handshake_timeout: float = 10.0,
        send_timeout: float | None = 60.0,
        body_buffer: int = BODY_BUFFER,
        max_push_backlog: int = 4 << 20,
    ):
        """``idle_timeout``: close a connection with nothing in flight and no
        subscription after this long without a frame; ``send_timeout``: the
        longest a write may wait for the peer to read; ``body_buffer``: bytes
        of one request body buffered ahead of its handler; ``max_push_backlog``:
        unsent bytes above which a push subscriber is disconnected."""
        clash = BUILTIN_METHODS.intersection(handlers)
        if clash:
            raise ValueError(f"methods {sorted(clash)} are built in")
        self.handlers = dict(handlers)
        self.instance = instance
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.body_buffer = body_buffer
        self.max_push_backlog = max_push_backlog
        self.stopping = False
        self.connections: set[ServerConnection] = set()
        self._connection_tasks: set[asyncio.Task] = set()
        self._runner_watch: asyncio.Task | None = None
        self._builtins: dict[str, Handler] = {
            "ping": self._ping,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
        }

    # -- connections ---------------------------------------------------------------

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The connection handler for ``Runner.listen`` or ``asyncio.start_server``."""
        task = asyncio.current_task()
        context = current_context()
        fields = {}  # the runner sets both; asyncio.start_server does not
        if "session_id" not in context:
            fields["session_id"] = new_session_id()
        if "peer" not in context:
            fields["peer"] = _peer_text(writer)
        with log_context(**fields):
            connection = ServerConnection(self, reader, writer)
            self.connections.add(connection)
            self._connection_tasks.add(task)
            try:
                await connection.run()
            finally:
                self.connections.discard(connection)
                self._connection_tasks.discard(task)

    async def listen(self, runner: Runner, name: str, host: str, port: int, **kwargs: Any) -> tuple[str, int]:
        """``runner.listen`` with our handler, and :meth:`stop` once the runner starts stopping."""
        address = await runner.listen(name, host, port, self.handle_connection, **kwargs)

        async def stop_with_runner() -> None:
            await runner.stopping.wait()
            await self.stop(timeout=runner.drain_timeout)

        self._runner_watch = asyncio.get_running_loop().create_task(stop_with_runner())
        return address

    # -- push ----------------------------------------------------------------------

    def push(self, topic: str, data: dict | None = None) -> int:
        """Push to every connection subscribed to ``topic``; returns how many were sent."""
        sent = 0
        for connection in list(self.connections):
            if topic in connection.subscriptions and connection.push(topic, data):
                sent += 1
        return sent

    # -- stop ----------------------------------------------------------------------

    async def stop(self, timeout: float = 10.0) -> None:
        """GOODBYE to everyone, let in-flight requests finish for ``timeout`` s, close all."""
        if self.stopping:
            return
        self.stopping = True
        connections = list(self.connections)
        in_flight = [r.task for c in connections for r in c.requests.values() if r.task is not None]
        log_event(log, "rpc.server_stopping", connections=len(connections), in_flight=len(in_flight))
        for connection in connections:
            connection.say_goodbye("server shutting down")
        if in_flight:
            await asyncio.wait(in_flight, timeout=timeout)
        # Past the timeout: cancel, and let each task send its ERROR before
        # the sockets close (see _request_done).
        remaining = [r.task for c in list(self.connections) for r in c.requests.values()
                     if r.task is not None and not r.task.done()]
        for task in remaining:
            task.cancel()
        if remaining:
            await asyncio.wait(remaining, timeout=CLOSE_GRACE)
        tasks = [t for t in self._connection_tasks if t is not asyncio.current_task()]
        for connection in list(self.connections):
            connection.close()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_GRACE)
        log_event(log, "rpc.server_stopped")

    # -- dispatch ------------------------------------------------------------------

    async def _call(self, ctx: CallContext, args: dict) -> dict | Streamed:
        handler = self._builtins.get(ctx.method) or self.handlers.get(ctx.method)
        if handler is None:
            raise MailError(ErrorKind.INVALID, UNKNOWN_METHOD_TEXT, detail=f"unknown method {ctx.method[:80]!r}")
        return await handler(ctx, args)

    async def _ping(self, ctx: CallContext, args: dict) -> dict:
        return {"instance": self.instance, "time": time.time()}

    @staticmethod
    def _topics(args: dict) -> list[str]:
        topics = args.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise MailError(ErrorKind.INVALID, "topics must be a list of strings")
        return topics

    async def _subscribe(self, ctx: CallContext, args: dict) -> dict:
        ctx.connection.subscriptions.update(self._topics(args))
        return {"topics": sorted(ctx.connection.subscriptions)}

    async def _unsubscribe(self, ctx: CallContext, args: dict) -> dict:
        ctx.connection.subscriptions.difference_update(self._topics(args))
        return {"topics": sorted(ctx.connection.subscriptions)}
