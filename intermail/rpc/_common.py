"""Pieces the RPC client and server share: body buffers, body splitting, log events.

Owns: :class:`BodyBuffer`, the bounded hand-over of a streamed body from the
connection's reader task to whoever consumes it (a handler reading a request
body, a caller reading a response body), and :func:`body_pieces`, which cuts
an outgoing body into CHUNK-sized pieces.

Invariant of :class:`BodyBuffer`: at most ``limit`` bytes plus one frame are
buffered per body.  Above that the reader task waits, which stops reading the
whole connection: the RPC has no per-request flow control, so backpressure is
per connection (TCP), as for any multiplexed stream without window updates.
A consumer that gives up calls :meth:`BodyBuffer.discard`, which frees the
reader at once and drops the rest of the body.

Logs: nothing; the catalogue entries for the ``rpc.*`` events are registered
here, once, for both ends.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, AsyncIterator, Iterable

from intermail.errors import ErrorKind, MailError
from intermail.log import register_events

PIECE_SIZE = 64 * 1024  # outgoing CHUNK payload size, capped by the peer's max_frame
BODY_BUFFER = 1 << 20  # bytes of one body buffered before the reader task waits

# The server answers a REQUEST that arrived after its own GOODBYE with this
# exact (kind, text): the request was not run, so a client may send it again
# elsewhere even when it is not idempotent.  Handlers never use this text.
NOT_RUN_KIND = ErrorKind.UNAVAILABLE
NOT_RUN_TEXT = "server is shutting down: request not run"

register_events({
    "rpc.connected": "an RPC connection completed its HELLO exchange (peer instance, address)",
    "rpc.disconnected": "an RPC connection ended (reason, requests still in flight)",
    "rpc.protocol_error": "the RPC peer broke the protocol; the connection is closed",
    "rpc.handler_failed": "an RPC handler raised an unexpected exception; the client got a TEMP error",
    "rpc.request_error": "an RPC handler refused a request with a MailError (kind, detail)",
    "rpc.idle_timeout": "an RPC connection with nothing in flight was idle too long and was closed",
    "rpc.push_dropped": "a push subscriber was not reading; its connection was closed",
    "rpc.server_stopping": "the RPC server said GOODBYE to its connections and is draining",
    "rpc.server_stopped": "the RPC server closed every connection",
    "rpc.connect_failed": "an RPC client could not connect to one address (it tries the next)",
    "rpc.connection_lost": "an RPC client lost its connection (requests in flight, subscriptions)",
    "rpc.retry": "an RPC client resent an idempotent request on a new connection",
    "rpc.unavailable": "an RPC client found no reachable server within its reconnect window",
    "rpc.push_callback_failed": "a push subscriber's callback raised; the push is dropped",
})


class BodyBuffer:
    """One streamed body, from the reader task (``put``) to one consumer (``get``)."""

    def __init__(self, limit: int = BODY_BUFFER):
        self.limit = limit
        self.received = 0  # bytes put so far
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._complete = False  # the final piece is in
        self._error: BaseException | None = None
        self._discarding = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._ended = asyncio.Event()  # the sender's side of the body is over

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def ended(self) -> bool:
        """The sender is done with this body: it completed, or it failed."""
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    async def put(self, data: bytes, final: bool) -> None:
        """Reader side: add a piece; waits while more than ``limit`` bytes are buffered."""
        if self._complete:
            return
        self.received += len(data)
        self._complete = final
        if final:
            self._ended.set()
        if not self._discarding and self._error is None:
            if data:
                self._chunks.append(data)
                self._size += len(data)
            self._readable.set()
        while self._size > self.limit and not self._discarding and self._error is None:
            self._writable.clear()
            await self._writable.wait()

    def fail(self, error: BaseException) -> None:
        """The body will never complete (connection lost, request cancelled, ERROR)."""
        if self._complete or self._error is not None:
            return
        self._error = error
        self._readable.set()
        self._writable.set()
        self._ended.set()

    def discard(self) -> None:
        """Consumer side: drop what is buffered and everything still to come."""
        self._discarding = True
        self._chunks.clear()
        self._size = 0
        self._writable.set()

    async def get(self) -> bytes | None:
        """The next piece, or None at the end of the body; raises the failure if any."""
        while not self._chunks:
            if self._discarding:
                return None
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size <= self.limit:
            self._writable.set()
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (data := await self.get()) is not None:
            yield data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole rest of the body; MailError(LIMIT) once it exceeds ``limit`` bytes."""
        parts = []
        total = 0
        while (data := await self.get()) is not None:
            total += len(data)
            if limit is not None and total > limit:
                self.discard()
                raise MailError(ErrorKind.LIMIT, detail=f"body larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)


Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | Iterable[bytes]


async def body_pieces(body: Body, size: int) -> AsyncIterator[memoryview]:
    """Non-empty pieces of at most ``size`` bytes, from bytes or an (async) iterable of bytes."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        items: AsyncIterable[bytes] | Iterable[bytes] = (body,)
    else:
        items = body
    if isinstance(items, AsyncIterable):
        async for item in items:
            for piece in _split(item, size):
                yield piece
    else:
        for item in items:
            for piece in _split(item, size):
                yield piece


def _split(item: bytes, size: int) -> Iterable[memoryview]:
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise TypeError(f"a body must yield bytes, not {type(item).__name__}")
    view = memoryview(item).cast("B")
    return (view[start:start + size] for start in range(0, len(view), size))


async def lookahead(pieces: AsyncIterator[memoryview]) -> AsyncIterator[tuple[memoryview, bool]]:
    """``(piece, is_last)`` pairs, so the last piece can carry FINAL; one empty piece if none."""
    previous: memoryview | None = None
    async for piece in pieces:
        if previous is not None:
            yield previous, False
        previous = piece
    yield (previous if previous is not None else memoryview(b"")), True


def chunk_size(peer_max_frame: int | None) -> int:
    return min(PIECE_SIZE, peer_max_frame or PIECE_SIZE)
