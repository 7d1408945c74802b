"""The one HTTP endpoint every server kind exposes on its ``metrics`` port.

Owns: the server side of one HTTP/1.x exchange on that port — a sans-I/O
machine (:class:`HttpExchange`: request head in, one response out, after
h11) with :func:`parse_request_head` as its one-shot form — and
:class:`MetricsServer`, which serves ``GET /metrics`` (Prometheus text
exposition of one per-service ``CollectorRegistry``) and ``GET /health``
(the JSON document the health monitor reads) on a :class:`Runner` listener.
The health document gets an ``instance`` key when ``health()`` leaves it
out: after a take-over the spare answers on the identity's address, and the
monitor must be able to tell which process it reached.

Only the request line and the header fields matter (RFC 9112 §2–§5): this
endpoint takes no request body, so a request announcing one is refused
(413) and none is ever read as a request.

Invariants:

- The parser is split-invariant: the same result (head, "need more", or the
  same :class:`HttpHeadError`) whatever slices the bytes arrive in.  Bytes
  are judged in order, one line at a time, and only within the first
  ``max_head`` bytes; a line that can no longer become valid is refused as
  soon as its bad byte arrives, with the message its complete form would get.
- The parser raises nothing but :class:`HttpHeadError`, a
  :class:`~intermail.errors.RemoteProtocolError` carrying the HTTP status to
  answer with.
- One request per connection: every response says ``Connection: close`` and
  has a ``Content-Length``; a HEAD response has the GET headers, no body.
- Every wait on the peer or on ``health()`` is bounded (``read_timeout``,
  ``health_timeout``, ``write_timeout``); a peer that sends nothing is closed
  without a reply.
- Clients see status texts only; tracebacks go to the log.

Logs: ``metrics.request`` (debug), ``metrics.bad_request``,
``metrics.read_timeout`` (debug), ``metrics.write_timeout``,
``metrics.health_failed``, ``metrics.collect_failed``.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import inspect
import json
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client

from intermail.errors import LocalProtocolError, RemoteProtocolError
from intermail.log import log_event, register_events
from intermail.net.runner import Runner
from intermail.proto import NEED_DATA

log = logging.getLogger("intermail.net.metrics")

register_events({
    "metrics.request": "the metrics endpoint answered one request (method, path, status)",
    "metrics.bad_request": "a metrics-port client sent a malformed, oversized or unsupported request head",
    "metrics.read_timeout": "a metrics-port client sent no complete request head in time; closed without a reply",
    "metrics.write_timeout": "a metrics-port client did not read its response in time; the connection was aborted",
    "metrics.health_failed": "the health callback raised, timed out or returned no dict; /health answered 503",
    "metrics.collect_failed": "collecting the metrics registry raised; /metrics answered 500",
})

MAX_HEAD = 8192  # bytes of request line + header fields + the blank line ending them
READ_SIZE = 4096  # bytes asked of the StreamReader per read
LINGER_TIMEOUT = 2.0  # seconds spent discarding unread request bytes after an error reply
LINGER_BYTES = 64 * 1024  # at most this many unread bytes are discarded before closing
ALLOWED_METHODS = ("GET", "HEAD")
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

# -- grammar (RFC 9110 §5.6.2, §5.5; RFC 9112 §2.3, §3, §5) ------------------------------
#
#   tchar        = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#                  "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
#   token        = 1*tchar
#   request-line = method SP request-target SP HTTP-version      ; RFC 9112 §3
#   method       = token
#   HTTP-version = "HTTP/" DIGIT "." DIGIT                        ; RFC 9112 §2.3
#   field-line   = field-name ":" OWS field-value OWS             ; RFC 9112 §5
#   field-value  = *field-content                                 ; RFC 9110 §5.5
#   field-vchar  = VCHAR / obs-text
#
# The request-target is any run of VCHAR (its forms are told apart when routing).
# Lines end in CRLF; a bare LF is accepted too (RFC 9112 §2.2 allows it), a CR
# anywhere else is not.  obs-fold is refused (RFC 9112 §5.2 lets a server reply 400).
_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(
    rb"(?P<method>" + _TCHAR + rb"+) (?P<target>[\x21-\x7e]+) HTTP/(?P<major>[0-9])\.(?P<minor>[0-9])"
)
# Every prefix of a valid request line (plus its CR), and nothing that cannot become one.
_REQUEST_LINE_PREFIX = re.compile(
    rb"(?:" + _TCHAR + rb"+(?: (?:[\x21-\x7e]+(?: (?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?)?)?"
)
_FIELD_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_FIELD_LINE = re.compile(
    rb"(?P<name>" + _TCHAR + rb"+):[ \t]*"
    rb"(?P<value>(?:" + _FIELD_VCHAR + rb"(?:[ \t\x21-\x7e\x80-\xff]*" + _FIELD_VCHAR + rb")?)?)[ \t]*"
)
# A superset of the prefixes of a valid field line (plus its CR): sound, not exact.
_FIELD_LINE_PREFIX = re.compile(rb"(?:" + _TCHAR + rb"*(?::[ \t\x21-\x7e\x80-\xff]*)?)?\r?")
_DIGITS = re.compile(r"[0-9]+")
_TOKEN_TEXT = re.compile(_TCHAR.decode("ascii") + "+")  # response header names
_SUPPORTED_VERSIONS = ("1.0", "1.1")

_BAD_REQUEST_LINE = "malformed request line"
_BAD_FIELD_LINE = "malformed header field line"


class HttpHeadError(RemoteProtocolError):
    """The peer's request head is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, text: str, status: int = 400):
        super().__init__(text)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head; header names are lower case, values latin-1 decoded."""

    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        """Every value of the header field ``name`` (any case), in order."""
        name = name.lower()
        return [value for field, value in self.headers if field == name]

    def get(self, name: str) -> str | None:
        """The first value of ``name``, or None."""
        found = self.values(name)
        return found[0] if found else None

    @property
    def content_length(self) -> int:
        """The announced body length (0 if none); validated by the parser."""
        value = self.get("content-length")
        return int(value.split(",")[0]) if value is not None else 0

    @property
    def has_body(self) -> bool:
        return self.content_length > 0 or bool(self.values("transfer-encoding"))


@dataclass(frozen=True)
class Response:
    """What the server answers.  ``Content-Length`` and ``Connection`` are the machine's to set."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


class HttpExchange:
    """One server-side HTTP/1.x exchange: a request head in, one response out.

    ``next_event()`` returns the :class:`RequestHead` once, then NEED_DATA
    for ever (bytes after the head are counted in :attr:`trailing`, never
    parsed).  ``send(response)`` returns the response's wire bytes, once.
    """

    def __init__(self, *, max_head: int = MAX_HEAD):
        if max_head < 1:
            raise ValueError("max_head must be positive")
        self.max_head = max_head
        self._buf = bytearray()
        self._pos = 0  # start of the first line not yet judged
        self._eof = False
        self._request_line: tuple[str, str, str] | None = None
        self._headers: list[tuple[str, str]] = []
        self._head: RequestHead | None = None
        self._head_end = 0
        self._after_head = 0  # bytes received once the head was complete: counted, not kept
        self._emitted = False
        self._error: HttpHeadError | None = None
        self._sent = False

    @property
    def received(self) -> int:
        """Bytes received so far."""
        return len(self._buf) + self._after_head

    @property
    def trailing(self) -> int:
        """Bytes received after the end of the head (0 until the head is complete)."""
        if self._head is None:
            return 0
        return len(self._buf) - self._head_end + self._after_head

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("data received after the end of input")
        if not data:
            self._eof = True
        elif self._head is not None:
            self._after_head += len(data)
        else:
            self._buf += data

    def next_event(self) -> object:
        if self._error is not None:
            raise self._error
        if self._head is None:
            try:
                self._head = self._advance()
            except HttpHeadError as exc:
                self._error = exc
                raise
        if self._head is None or self._emitted:
            return NEED_DATA
        self._emitted = True
        return self._head

    def _advance(self) -> RequestHead | None:
        """Judge every complete line within the size window; the head once it is whole."""
        window = min(len(self._buf), self.max_head)
        while (newline := self._buf.find(b"\n", self._pos, window)) >= 0:
            line = bytes(self._buf[self._pos : newline])
            self._pos = newline + 1
            line = line[:-1] if line.endswith(b"\r") else line
            if self._request_line is None:
                if line:  # empty lines before the request line are ignored (RFC 9112 §2.2)
                    self._request_line = _parse_request_line(line)
            elif line:
                self._headers.append(_parse_field_line(line))
            else:
                self._head_end = self._pos
                return _finish_head(self._request_line, tuple(self._headers))
        self._check_partial_line(bytes(self._buf[self._pos : window]))
        if len(self._buf) > self.max_head:
            raise HttpHeadError(f"request head larger than {self.max_head} bytes", 431)
        if self._eof:
            raise HttpHeadError("connection closed before the request head ended")
        return None

    def _check_partial_line(self, partial: bytes) -> None:
        """Refuse an unfinished line as soon as no continuation can make it valid."""
        if self._request_line is None:
            if partial != b"\r" and not _REQUEST_LINE_PREFIX.fullmatch(partial):
                raise HttpHeadError(_BAD_REQUEST_LINE)
        elif not _FIELD_LINE_PREFIX.fullmatch(partial):
            raise HttpHeadError(_BAD_FIELD_LINE)

    def send(self, event: object) -> bytes:
        """The wire form of ``event`` (a :class:`Response`); the body is left out for HEAD."""
        if not isinstance(event, Response):
            raise LocalProtocolError(f"cannot send {type(event).__name__}: only a Response")
        if self._sent:
            raise LocalProtocolError("one response per connection: a response was sent already")
        head_only = self._head is not None and self._head.method == "HEAD"
        data = serialize_response(event, head_only=head_only)
        self._sent = True
        return data


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise HttpHeadError(_BAD_REQUEST_LINE)
    version = f"{match['major'].decode()}.{match['minor'].decode()}"
    if version not in _SUPPORTED_VERSIONS:
        raise HttpHeadError(f"HTTP version {version} not supported", 505)
    return match["method"].decode("ascii"), match["target"].decode("ascii"), version


def _parse_field_line(line: bytes) -> tuple[str, str]:
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        raise HttpHeadError(_BAD_FIELD_LINE)
    return match["name"].decode("ascii").lower(), match["value"].decode("latin-1")


def _finish_head(request_line: tuple[str, str, str], headers: tuple[tuple[str, str], ...]) -> RequestHead:
    """Whole-head checks: Host (RFC 9112 §3.2) and Content-Length (RFC 9110 §8.6)."""
    head = RequestHead(*request_line, headers=headers)
    if head.version == "1.1" and len(head.values("host")) != 1:
        raise HttpHeadError("an HTTP/1.1 request needs exactly one Host header field")
    lengths = {part.strip() for value in head.values("content-length") for part in value.split(",")}
    if lengths and (len(lengths) > 1 or not all(_DIGITS.fullmatch(length) for length in lengths)):
        raise HttpHeadError("invalid Content-Length")
    return head


def parse_request_head(data: bytes, *, max_head: int = MAX_HEAD) -> RequestHead | None:
    """The request head at the start of ``data``, or None while it is incomplete.

    Raises :class:`HttpHeadError` (a ``RemoteProtocolError``) for a malformed,
    unsupported or oversized head.  Bytes after the head are ignored.
    """
    exchange = HttpExchange(max_head=max_head)
    if data:
        exchange.receive_data(data)
    event = exchange.next_event()
    return event if isinstance(event, RequestHead) else None


def _header_safe(text: str) -> bool:
    return not any(char in text for char in "\r\n\0")


def serialize_response(response: Response, *, head_only: bool = False) -> bytes:
    """``HTTP/1.1`` status line, the response's fields, Content-Length, Connection: close."""
    try:
        reason = http.HTTPStatus(response.status).phrase
    except ValueError:
        raise LocalProtocolError(f"unknown HTTP status {response.status}") from None
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    for name, value in response.headers:
        if name.lower() in ("content-length", "connection", "transfer-encoding"):
            raise LocalProtocolError(f"the exchange sets {name} itself")
        if not _TOKEN_TEXT.fullmatch(name) or not _header_safe(value):
            raise LocalProtocolError(f"unsafe response header {name!r}")
        lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {len(response.body)}", "Connection: close", "", ""]
    head = "\r\n".join(lines).encode("latin-1")
    return head if head_only else head + response.body


# -- the server ----------------------------------------------------------------------------

# health() returns (or resolves to) a dict with at least "status"; "ok" means healthy.
HealthCallback = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


class MetricsServer:
    """Serves ``/metrics`` and ``/health`` for one service, one request per connection."""

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry,
        health: HealthCallback,
        *,
        instance: str,
        read_timeout: float = 5.0,
        max_head: int = MAX_HEAD,
        health_timeout: float = 5.0,
        write_timeout: float = 10.0,
    ):
        if max_head < 1:
            raise ValueError("max_head must be positive")
        self.registry = registry
        self.health = health
        self.instance = instance
        self.read_timeout = read_timeout  # for the whole request head, not per read
        self.max_head = max_head
        self.health_timeout = health_timeout
        self.write_timeout = write_timeout  # for the peer to take the whole response
        self._routes: dict[str, Callable[[], Awaitable[Response]]] = {
            "/metrics": self._metrics,
            "/health": self._health,
        }

    async def listen(self, runner: Runner, host: str, port: int) -> tuple[str, int]:
        """Open the runner's ``metrics`` listener on (host, port); returns the bound address."""
        return await runner.listen("metrics", host, port, self.handle_connection)

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A :class:`Runner` connection handler: read one request, answer it, close."""
        exchange = HttpExchange(max_head=self.max_head)
        try:
            async with asyncio.timeout(self.read_timeout):
                head = await _read_head(reader, exchange)
        except TimeoutError:
            log_event(log, "metrics.read_timeout", level=logging.DEBUG, seconds=self.read_timeout,
                      received=exchange.received)
            return
        except HttpHeadError as exc:
            log_event(log, "metrics.bad_request", status=exc.status, reason=exc.text)
            await self._reply(reader, writer, exchange, _text_response(exc.status, exc.text))
            return
        if head is None:
            return  # closed before sending anything: a port probe
        response = await self.respond(head)
        log_event(log, "metrics.request", level=logging.DEBUG, method=head.method, target=head.target,
                  status=response.status)
        await self._reply(reader, writer, exchange, response)

    async def respond(self, head: RequestHead) -> Response:
        """The response to ``head``: routing, method and body checks."""
        route = self._routes.get(_path_of(head.target))
        if route is None:
            return _text_response(404, "no such resource")
        if head.method not in ALLOWED_METHODS:
            return _text_response(405, f"use {' or '.join(ALLOWED_METHODS)}",
                                  extra=(("Allow", ", ".join(ALLOWED_METHODS)),))
        if head.has_body:
            return _text_response(413, "this endpoint takes no request body")
        return await route()

    async def _metrics(self) -> Response:
        # Collectors run here, on the loop: a service's collectors must be quick
        # (read counters they keep), never block on I/O.
        try:
            body = prometheus_client.generate_latest(self.registry)
        except Exception:
            log_event(log, "metrics.collect_failed", level=logging.ERROR, exc_info=True)
            return _text_response(500, "metrics collection failed")
        return _response(200, prometheus_client.CONTENT_TYPE_LATEST, body)

    async def _health(self) -> Response:
        healthy, body = await self._health_body()
        return _response(200 if healthy else 503, JSON_TYPE, body)

    async def _health_body(self) -> tuple[bool, bytes]:
        """Whether ``health()`` says "ok", and its document as JSON (``{"status": "error"}`` if it failed)."""
        try:
            async with asyncio.timeout(self.health_timeout):
                result = self.health()
                if inspect.isawaitable(result):
                    result = await result
            if not isinstance(result, Mapping):
                raise TypeError(f"health() returned {type(result).__name__}, not a dict")
            document = {**result}
            document.setdefault("instance", self.instance)
            return document.get("status") == "ok", document_bytes(document)
        except Exception as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            log_event(log, "metrics.health_failed", level=logging.ERROR, exc_info=True, reason=reason)
            return False, document_bytes({"status": "error", "instance": self.instance})

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     exchange: HttpExchange, response: Response) -> None:
        writer.write(exchange.send(response))
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.drain()
        except TimeoutError:
            log_event(log, "metrics.write_timeout", seconds=self.write_timeout)
            writer.transport.abort()
            return
        if response.status >= 400 or exchange.trailing:
            await _linger(reader, writer)


async def _read_head(reader: asyncio.StreamReader, exchange: HttpExchange) -> RequestHead | None:
    """The request head; None if the peer closed before sending a byte."""
    while True:
        event = exchange.next_event()
        if isinstance(event, RequestHead):
            return event
        data = await reader.read(READ_SIZE)
        if not data and not exchange.received:
            return None
        exchange.receive_data(data)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the peer still sends, for a little while.

    Closing a socket with unread bytes in its receive buffer sends a reset,
    which can destroy our error reply before the peer reads it.
    """
    if not writer.can_write_eof():
        return
    try:
        writer.write_eof()
    except OSError:
        return  # the peer is gone already: nothing left to protect
    discarded = 0
    try:
        async with asyncio.timeout(LINGER_TIMEOUT):
            while discarded < LINGER_BYTES and (data := await reader.read(READ_SIZE)):
                discarded += len(data)
    except (TimeoutError, ConnectionError):
        pass


def _path_of(target: str) -> str:
    """The path of an origin-form or absolute-form target (RFC 9112 §3.2.1, §3.2.2)."""
    if target.startswith("/"):
        return target.split("?", 1)[0]
    parts = urllib.parse.urlsplit(target)
    return parts.path if parts.scheme.lower() in ("http", "https") else ""


def document_bytes(document: Mapping[str, Any]) -> bytes:
    """The JSON body for a health document (one line, sorted keys)."""
    return json.dumps(document, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"


def _response(status: int, content_type: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    headers = (
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        *extra,
    )
    return Response(status, headers, body)


def _text_response(status: int, text: str, *, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    body = f"{status} {http.HTTPStatus(status).phrase}: {text}\n".encode("utf-8")
    return _response(status, TEXT_TYPE, body, extra)
