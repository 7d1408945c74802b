"""The asyncio RPC client: calls, streamed bodies, pushes, failover and retry.

Owns: the client end of the store and directory RPC on real sockets -- one
connection at a time to the first reachable address of a list (as an MTA
walks an MX list, or a resolver's round-robin A records), many calls in
flight on it, request and response bodies in CHUNK frames, push
subscriptions, and what happens when the connection is lost::

    client = RpcClient([("127.0.1.5", 7000), ("127.0.1.6", 7000)], instance="imap1")
    info = await client.call("mailbox.status", {"user": u, "mailbox": "INBOX"}, idempotent=True)
    await client.call("message.append", {...}, body=message_bytes)
    result, body = await client.call_stream("message.fetch", {...})
    async for data in body: ...
    await client.subscribe(["mailbox:u@x/INBOX"], on_push, on_reconnect=resync)
    await client.close()

Invariants:

- A failure reaches the caller as a :class:`MailError`: the server's ERROR
  as its kind and safe text; no reachable server, or a lost connection that
  leaves the outcome unknown, as ``UNAVAILABLE``; no answer within
  ``request_timeout`` as ``TEMP`` (the request is cancelled on the wire).
- Retry: a call whose REQUEST was never written (no connection yet, or the
  server had said GOODBYE and answered ``NOT_RUN``) is always sent again on a
  new connection.  A call in flight when the connection is lost is sent again
  only if the caller marked it ``idempotent`` and its body (if any) is
  bytes, so it can be replayed; any other call fails with ``UNAVAILABLE``,
  because it may or may not have run.  Retries stop ``reconnect_window``
  seconds after the first loss.
- Reconnect: each attempt walks the address list in order, each address
  bounded by ``connect_timeout``, and repeats the walk with a short backoff
  until ``reconnect_window`` seconds have passed.  One attempt runs at a
  time, shared by every waiting call.  After a reconnect every subscription
  is renewed before any call uses the new connection, then each
  ``on_reconnect`` hook runs: pushes sent while no connection existed are
  lost, and the hook is where a subscriber resynchronises.  With
  subscriptions, a lost connection is re-established in the background
  even when no call is made.
- A cancelled call (task cancelled, or timed out) sends CANCEL; its request
  id is reused only once the server has sent its terminal frame.
- The connection has one reader.  A response body is handed to its caller
  through a bounded buffer: a caller that neither reads nor closes a body
  stops the whole connection (close it, or use ``async with``).
- Push callbacks run in the reader, in arrival order, and must not block
  (hand work to a task); one that raises is logged and skipped.
- When no call is in flight and nothing has arrived for ``keepalive``
  seconds, the client pings; a ping that fails closes the connection, so a
  silently dead server (e.g. a store that failed over) is noticed by an
  idle subscriber too.
- The server's ``max_in_flight`` is not announced in HELLO: the client's
  ``max_in_flight`` must not exceed the server's (both default to 256).

Logs: ``rpc.connected``, ``rpc.connect_failed`` (per address),
``rpc.connection_lost``, ``rpc.retry``, ``rpc.unavailable``,
``rpc.push_callback_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from intermail.errors import ErrorKind, LocalProtocolError, MailError, RemoteProtocolError
from intermail.log import log_event
from intermail.net.pump import PeerClosedError, Pump
from intermail.proto.rpc import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_IN_FLIGHT,
    Cancel,
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

__all__ = ["RpcClient", "ResponseBody", "Subscription", "PushCallback", "OUTCOME_UNKNOWN_TEXT"]

log = logging.getLogger("intermail.rpc.client")

PushCallback = Callable[[str, dict], None]
ReconnectHook = Callable[[], Awaitable[None] | None]

_DEFAULT: Any = object()
OUTCOME_UNKNOWN_TEXT = "connection lost, the request may or may not have run"
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0


class _Lost(Exception):
    """The connection went away; ``sent``: the REQUEST had been written."""

    def __init__(self, sent: bool, reason: str = "connection lost"):
        self.sent = sent
        self.reason = reason
        super().__init__(reason)


class _Call:
    __slots__ = ("id", "future", "body", "sent", "cancel_sent", "abandoned")

    def __init__(self, request_id: int):
        self.id = request_id
        self.future: asyncio.Future[Response | ErrorResponse] = asyncio.get_running_loop().create_future()
        self.body: BodyBuffer | None = None  # the response body, once RESPONSE+MORE arrived
        self.sent = False
        self.cancel_sent = False
        self.abandoned = False  # the caller is gone: drop whatever still comes


class Subscription:
    """Topics with the callback that receives their pushes."""

    def __init__(self, topics: Iterable[str], callback: PushCallback, on_reconnect: ReconnectHook | None):
        self.topics = frozenset(topics)
        self.callback = callback
        self.on_reconnect = on_reconnect


class _Connection:
    """One live connection: machine, pump, reader task, calls in flight."""

    def __init__(self, client: RpcClient, address: tuple[str, int], pump: Pump, hello: Hello):
        self.client = client
        self.address = address
        self.pump = pump
        self.machine: RpcConnection = pump.machine  # type: ignore[assignment]
        self.server_instance = hello.instance
        self.calls: dict[int, _Call] = {}
        self.slots = asyncio.Semaphore(self.machine.max_in_flight)
        self.lost: str | None = None
        self.last_received = time.monotonic()
        self.reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        client._connections.add(self)
        self.keepalive_task: asyncio.Task | None = None
        self.quiet = False  # set for a connection that failed while opening

    @property
    def usable(self) -> bool:
        return self.lost is None and not self.machine.goodbye_received and not self.machine.goodbye_sent

    # -- writing -------------------------------------------------------------------

    def _write_now(self, event: object) -> None:
        # machine.send and write with no await between: frames of concurrent
        # calls never interleave, and the machine matches the wire.
        self.pump.writer.write(self.machine.send(event))

    async def request(self, method: str, args: dict, body: Body | None) -> tuple[Response | ErrorResponse, _Call]:
        await self.slots.acquire()  # released by _forget (or on loss, for everyone)
        if self.lost is not None or not self.usable:
            raise _Lost(sent=False, reason=self.lost or "server said goodbye")
        call = _Call(self.machine.new_request_id())
        try:
            self._write_now(Request(call.id, method, args, more=body is not None))
        except BaseException:
            self.slots.release()  # the id was not taken
            raise
        call.sent = True
        self.calls[call.id] = call
        try:
            try:
                await self.pump.write(b"")  # drain
                if body is not None:
                    await self._send_body(call, body)
            except ConnectionError as exc:  # reset while sending: a loss like any other, not a raw OSError
                raise _Lost(sent=True, reason=f"{type(exc).__name__} while sending") from None
            return await call.future, call
        except BaseException:
            self.abandon(call)
            raise

    async def _send_body(self, call: _Call, body: Body) -> None:
        pieces = body_pieces(body, chunk_size(self.machine.peer_max_frame))
        try:
            async with contextlib.aclosing(lookahead(pieces)) as numbered:
                async for piece, last in numbered:
                    if call.future.done():
                        # An early ERROR (or the loss) came: stop sending.
                        self.abandon(call)
                        return
                    self._write_now(Chunk(call.id, piece, final=last))
                    await self.pump.write(b"")
        finally:
            await pieces.aclose()

    def abandon(self, call: _Call) -> None:
        """The caller no longer wants this call: CANCEL it if it is still open."""
        call.abandoned = True
        if call.body is not None:
            call.body.discard()
        if self.lost is None and not call.cancel_sent and call.id in self.machine.in_flight:
            call.cancel_sent = True
            with contextlib.suppress(LocalProtocolError, RuntimeError, ConnectionError):
                self._write_now(Cancel(call.id))
        self._forget(call)

    def _forget(self, call: _Call) -> None:
        """Free the slot once the machine has freed the id."""
        if call.id not in self.machine.in_flight and self.calls.get(call.id) is call:
            del self.calls[call.id]
            self.slots.release()
            if not self.calls and self.machine.goodbye_received:
                self.close()

    # -- reading -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "closed by server"
        try:
            while True:
                event = await self.pump.next_event(timeout=None)
                self.last_received = time.monotonic()
                if isinstance(event, ConnectionClosed):
                    break
                if isinstance(event, (Response, ErrorResponse, Chunk)):
                    await self._on_answer(event)
                elif isinstance(event, Push):
                    self.client._deliver(event)
                elif isinstance(event, Goodbye):
                    self.client._on_goodbye(self)
                    if not self.calls:
                        self.close()
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc.text}"
        except (PeerClosedError, ConnectionError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            reason = "client closed"
            raise
        finally:
            self._lose(reason)

    async def _on_answer(self, event: Response | ErrorResponse | Chunk) -> None:
        call = self.calls.get(event.id)
        if call is None:
            return
        if isinstance(event, Response):
            if event.more:
                call.body = BodyBuffer(self.client.body_buffer)
                if call.abandoned:
                    call.body.discard()
            if not call.future.done():
                call.future.set_result(event)
        elif isinstance(event, ErrorResponse):
            if call.body is not None:  # mid-stream
                call.body.fail(MailError(event.kind, event.text, detail=f"{event.text} (during the body)"))
            elif not call.future.done():
                call.future.set_result(event)
        elif call.body is not None:
            await call.body.put(event.data, event.final)
        self._forget(call)

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        self.client._connections.discard(self)
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            if not call.future.done():
                call.future.set_exception(_Lost(sent=call.sent, reason=reason))
                call.future.exception()  # retrieved: the waiter may be gone
            if call.body is not None:
                call.body.fail(MailError(ErrorKind.UNAVAILABLE, detail=f"connection lost: {reason}"))
        for _ in range(self.machine.max_in_flight):
            self.slots.release()  # wake waiters; they see self.lost
        if self.keepalive_task is not None:
            self.keepalive_task.cancel()
        self.pump.writer.close()
        if not self.quiet:
            self.client._on_lost(self, reason, in_flight=len(calls))

    def close(self) -> None:
        self.pump.writer.close()

    def abort(self) -> None:
        self.pump.writer.transport.abort()


class ResponseBody:
    """A streamed response body: ``async for data in body``, ``await body.read()``.

    Read it to the end or close it (``await body.aclose()``, ``async with``):
    a body left unread stalls its connection once its buffer is full.
    """

    def __init__(self, connection: _Connection | None, call: _Call | None, timeout: float | None):
        self._connection = connection
        self._call = call
        self._buffer = call.body if call is not None else None
        self._timeout = timeout

    def __aiter__(self) -> ResponseBody:
        return self

    async def __anext__(self) -> bytes:
        if self._buffer is None:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._buffer.get()
        except TimeoutError:
            await self.aclose()
            raise MailError(ErrorKind.TEMP, "request timed out", detail="response body stalled") from None
        except BaseException:
            await self.aclose()
            raise
        if data is None:
            raise StopAsyncIteration
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body; MailError(LIMIT) beyond ``limit`` bytes."""
        parts, total = [], 0
        async for data in self:
            total += len(data)
            if limit is not None and total > limit:
                await self.aclose()
                raise MailError(ErrorKind.LIMIT, detail=f"response body larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Stop the body: CANCEL it on the wire if it is still coming."""
        if self._buffer is not None and not self._buffer.ended and self._connection is not None:
            self._connection.abandon(self._call)
        self._buffer = None

    async def __aenter__(self) -> ResponseBody:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class RpcClient:
    """A client of one RPC service reachable at any of ``addresses``."""

    def __init__(
        self,
        addresses: Sequence[tuple[str, int]],
        *,
        instance: str = "",
        connect_timeout: float = 5.0,
        request_timeout: float | None = 30.0,
        reconnect_window: float = 10.0,
        keepalive: float | None = 30.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        body_buffer: int = BODY_BUFFER,
        max_backoff: float = _BACKOFF_MAX,
    ):
        """``connect_timeout``: per address, TCP connect and HELLO exchange;
        ``request_timeout``: per call, until its answer (and between pieces of
        a response body); ``reconnect_window``: how long after a loss we keep
        trying to reconnect and retry; ``keepalive``: idle seconds before a ping;
        ``max_backoff``: longest pause between two reconnect walks (a client
        waiting for a spare to take an address over wants it short)."""
        if not addresses:
            raise ValueError("an RpcClient needs at least one address")
        self.addresses = [(str(host), int(port)) for host, port in addresses]
        self.instance = instance
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_window = reconnect_window
        self.keepalive = keepalive
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self.body_buffer = body_buffer
        self.max_backoff = max_backoff
        self._current: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._background: asyncio.Task | None = None
        self._subscriptions: list[Subscription] = []
        self._connections: set[_Connection] = set()  # the current one, and old ones finishing calls
        self._ever_connected = False
        self._closed = False

    # -- what callers see ----------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | None:
        """The address of the live connection, if any."""
        conn = self._current
        return conn.address if conn is not None and conn.usable else None

    @property
    def server_instance(self) -> str | None:
        conn = self._current
        return conn.server_instance if conn is not None and conn.usable else None

    async def connect(self) -> None:
        """Connect now rather than on the first call (MailError UNAVAILABLE if nobody answers)."""
        await self._connection()

    async def call(self, method: str, args: dict | None = None, *, idempotent: bool = False,
                   body: Body | None = None, timeout: float | None = _DEFAULT) -> dict:
        """Call ``method`` and return its result.

        ``body``: bytes, or an (async) iterable of bytes, sent in CHUNK frames.
        A response body, if the method sends one, is cancelled and dropped:
        use :meth:`call_stream` for such methods.
        """
        result, response_body = await self._call(method, args, idempotent, body, timeout)
        await response_body.aclose()
        return result

    async def call_stream(self, method: str, args: dict | None = None, *, idempotent: bool = False,
                          body: Body | None = None, timeout: float | None = _DEFAULT) -> tuple[dict, ResponseBody]:
        """Call ``method``; returns its result and its response body (empty if none)."""
        return await self._call(method, args, idempotent, body, timeout)

    async def subscribe(self, topics: Iterable[str], callback: PushCallback, *,
                        on_reconnect: ReconnectHook | None = None) -> Subscription:
        """Receive pushes for ``topics``; renewed after every reconnect, then ``on_reconnect()``."""
        subscription = Subscription(topics, callback, on_reconnect)
        self._subscriptions.append(subscription)
        try:
            await self.call("subscribe", {"topics": sorted(subscription.topics)}, idempotent=True)
        except BaseException:
            self._subscriptions.remove(subscription)
            raise
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.remove(subscription)
        still = {t for s in self._subscriptions for t in s.topics}
        gone = sorted(subscription.topics - still)
        if gone and self._current is not None and self._current.usable:
            await self.call("unsubscribe", {"topics": gone}, idempotent=True)

    def demote_current(self) -> None:
        """Give up on the current server (it answers too slowly): drop its
        connection, failing its calls in flight, and try it last from now on."""
        conn = self._current
        if conn is None:
            return
        if conn.address in self.addresses:
            self.addresses.remove(conn.address)
            self.addresses.append(conn.address)
        self._current = None
        conn.abort()

    async def close(self) -> None:
        """Say GOODBYE and close; calls still in flight fail with UNAVAILABLE."""
        self._closed = True
        for task in (self._connecting, self._background):
            if task is not None:
                task.cancel()
        self._current = None
        for conn in list(self._connections):
            if conn.lost is None and not conn.machine.goodbye_sent:
                with contextlib.suppress(LocalProtocolError, RuntimeError, ConnectionError):
                    conn._write_now(Goodbye("client closing"))
            conn.close()
            conn.reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn.reader_task

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one call, with retry ------------------------------------------------------

    async def _call(self, method: str, args: dict | None, idempotent: bool, body: Body | None,
                    timeout: float | None) -> tuple[dict, ResponseBody]:
        if timeout is _DEFAULT:
            timeout = self.request_timeout
        args = {} if args is None else args
        replayable = body is None or isinstance(body, (bytes, bytearray, memoryview))
        retry_until: float | None = None
        while True:
            conn = await self._connection()
            try:
                async with asyncio.timeout(timeout):
                    answer, call = await conn.request(method, args, body)
                if isinstance(answer, ErrorResponse) and (answer.kind, answer.text) == (NOT_RUN_KIND, NOT_RUN_TEXT):
                    raise _Lost(sent=False, reason="the server is shutting down")  # crossed its GOODBYE
            except _Lost as lost:
                if lost.sent and not (idempotent and replayable):
                    raise MailError(
                        ErrorKind.UNAVAILABLE, OUTCOME_UNKNOWN_TEXT,
                        detail=f"{method} on {conn.address}: {lost.reason}",
                    ) from None
                now = time.monotonic()
                retry_until = retry_until or now + self.reconnect_window
                if now > retry_until:
                    raise MailError(ErrorKind.UNAVAILABLE, detail=f"{method}: {lost.reason}") from None
                if lost.sent:
                    log_event(log, "rpc.retry", method=method, address=list(conn.address), reason=lost.reason)
                continue
            except TimeoutError:
                raise MailError(ErrorKind.TEMP, "request timed out",
                                detail=f"{method} on {conn.address}: no answer in {timeout} s") from None
            if isinstance(answer, ErrorResponse):
                raise MailError(answer.kind, answer.text, detail=f"{method} on {conn.address}: {answer.text}")
            return answer.result, ResponseBody(conn, call if answer.more else None, timeout)

    # -- connections ---------------------------------------------------------------

    async def _connection(self) -> _Connection:
        while True:
            if self._closed:
                raise MailError(ErrorKind.UNAVAILABLE, detail="the client is closed")
            conn = self._current
            if conn is not None and conn.usable:
                return conn
            task = self._connecting
            if task is None:
                task = self._connecting = asyncio.get_running_loop().create_task(self._establish())
                task.add_done_callback(self._connect_done)
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if task.cancelled() and not (me is not None and me.cancelling()):
                    continue  # the attempt was cancelled by close(), not us
                raise

    def _connect_done(self, task: asyncio.Task) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # a failure is raised in every waiter; none may be left

    async def _establish(self) -> None:
        deadline = time.monotonic() + self.reconnect_window
        delay = _BACKOFF_FIRST
        errors: list[str] = []
        while True:
            for address in self.addresses:
                try:
                    conn = await self._open(address)
                except (OSError, TimeoutError, RemoteProtocolError, PeerClosedError, MailError) as exc:
                    errors.append(f"{address[0]}:{address[1]}: {exc}")
                    log_event(log, "rpc.connect_failed", level=logging.DEBUG, address=list(address),
                              error=f"{type(exc).__name__}: {exc}")
                    continue
                reconnected = self._ever_connected
                self._current = conn
                self._ever_connected = True
                self._start_keepalive(conn)
                if reconnected:
                    await self._run_reconnect_hooks()
                return
            now = time.monotonic()
            if now >= deadline:
                log_event(log, "rpc.unavailable", level=logging.WARNING,
                          addresses=[list(a) for a in self.addresses], window=self.reconnect_window)
                raise MailError(ErrorKind.UNAVAILABLE, detail="no server reachable: " + "; ".join(errors[-3:]))
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, self.max_backoff)

    async def _open(self, address: tuple[str, int]) -> _Connection:
        """Connect, exchange HELLOs, renew subscriptions; the connection is not yet current."""
        writer = None
        conn = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(*address)
                machine = RpcConnection("client", self.instance, max_frame=self.max_frame,
                                        max_in_flight=self.max_in_flight)
                pump = Pump(reader, writer, machine)
                await pump.send(machine.local_hello)
                hello = await pump.next_event(timeout=None)
                if not isinstance(hello, Hello):
                    raise PeerClosedError("closed during the HELLO exchange")
                conn = _Connection(self, address, pump, hello)
                topics = sorted({t for s in self._subscriptions for t in s.topics})
                if topics:
                    try:
                        answer, _ = await conn.request("subscribe", {"topics": topics}, None)
                    except _Lost as lost:
                        raise PeerClosedError(lost.reason) from None
                    if isinstance(answer, ErrorResponse):
                        raise MailError(answer.kind, answer.text)
        except BaseException:
            if conn is not None:
                conn.quiet = True  # never current: its end is not a lost connection
                conn.close()
            elif writer is not None:
                writer.close()
            raise
        log_event(log, "rpc.connected", address=list(address), server=conn.server_instance,
                  subscriptions=len(topics))
        return conn

    async def _run_reconnect_hooks(self) -> None:
        for subscription in list(self._subscriptions):
            if subscription.on_reconnect is None:
                continue
            try:
                outcome = subscription.on_reconnect()
                if asyncio.iscoroutine(outcome) or isinstance(outcome, Awaitable):
                    await outcome
            except Exception:
                log_event(log, "rpc.push_callback_failed", level=logging.ERROR, exc_info=True, topic="")

    def _start_keepalive(self, conn: _Connection) -> None:
        if self.keepalive is None:
            return

        async def keep() -> None:
            while conn.usable:
                await asyncio.sleep(self.keepalive)
                if conn.calls or time.monotonic() - conn.last_received < self.keepalive:
                    continue
                try:
                    async with asyncio.timeout(self.request_timeout):
                        await conn.request("ping", {}, None)
                except (_Lost, TimeoutError):
                    conn.abort()  # the reader then reports the loss
                    return

        conn.keepalive_task = asyncio.get_running_loop().create_task(keep())

    # -- events from a connection ---------------------------------------------------

    def _deliver(self, push: Push) -> None:
        for subscription in list(self._subscriptions):
            if push.topic not in subscription.topics:
                continue
            try:
                subscription.callback(push.topic, push.data)
            except Exception:
                log_event(log, "rpc.push_callback_failed", level=logging.ERROR, exc_info=True, topic=push.topic)

    def _on_goodbye(self, conn: _Connection) -> None:
        if self._current is conn:
            self._current = None
            self._reconnect_in_background()

    def _on_lost(self, conn: _Connection, reason: str, in_flight: int) -> None:
        if self._closed:
            return
        log_event(log, "rpc.connection_lost", level=logging.WARNING, address=list(conn.address),
                  reason=reason, in_flight=in_flight, subscriptions=len(self._subscriptions))
        if self._current is conn:
            self._current = None
            self._reconnect_in_background()

    def _reconnect_in_background(self) -> None:
        """Subscribers wait for pushes, not for a call: reconnect for them."""
        if not self._subscriptions or self._closed:
            return
        if self._background is not None and not self._background.done():
            return

        async def reconnect() -> None:
            while not self._closed and self._subscriptions:
                try:
                    await self._connection()
                    return
                except MailError:
                    await asyncio.sleep(_BACKOFF_MAX)

        self._background = asyncio.get_running_loop().create_task(reconnect())
