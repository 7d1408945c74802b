"""The store and directory RPC: one sans-I/O machine for both ends of a connection.

Owns the wire format and the session rules of the RPC that access servers use
to talk to a message store (``mssN``) and that MTAs and access servers use to
talk to the directory.  It knows frames, request ids and their states; it does
not know what ``message.fetch`` or ``user.lookup`` mean -- method names and
their arguments belong to the callers (``intermail.rpc``, ``mailstore``,
``directory``).  One :class:`RpcConnection` per end, ``role="client"`` or
``role="server"``; it follows the contract of :mod:`intermail.proto`.

Logs: nothing (no I/O here; the pump that drives the machine logs).

Frame layout
============

Every frame is a 21-byte header followed by ``length`` payload bytes.  All
integers are unsigned big-endian.

====== ==== ===============================================================
offset size field
====== ==== ===============================================================
0      2    magic ``0x8A 0x52``; the high bit keeps any text protocol
            (an SMTP banner, an IMAP greeting, HTTP) from passing for RPC
2      1    protocol version: ``1`` on HELLO frames, the negotiated
            version on every other frame
3      1    frame type (table below)
4      1    flags: ``0x01`` MORE (REQUEST, RESPONSE), ``0x02`` FINAL
            (CHUNK); every other bit is reserved and must be zero
5      4    request id: non-zero on per-request frames, zero on
            connection frames (HELLO, PUSH, GOODBYE)
9      4    payload length, at most the receiver's ``max_frame``
13     4    CRC-32 of the payload (0 for an empty payload)
17     4    CRC-32 of header bytes 0..16
21     n    payload
====== ==== ===============================================================

Both CRCs mean that a change to any one byte of a frame is detected: the
header CRC is checked as soon as 21 bytes are in (so a damaged length field
cannot make us wait for, or allocate, a payload that will never come), the
payload CRC once the payload is complete.

Frames
======

==== ======== ====== ========= ==============================================
type name     sender payload   meaning
==== ======== ====== ========= ==============================================
1    HELLO    both   JSON      first frame of each side: ``{"versions":
                               [min, max], "role", "instance", "max_frame"}``
2    REQUEST  client JSON      ``{"method", "args"}``; MORE: a request body
                               follows in CHUNK frames (e.g. an append)
3    RESPONSE server JSON      ``{"result"}``, success; MORE: a response body
                               follows in CHUNK frames (e.g. a fetch)
4    ERROR    server JSON      ``{"kind", "text"}``: failure; kind is an
                               :class:`ErrorKind` value, text the safe text
5    CHUNK    both   raw bytes a piece of a body; FINAL marks the last piece
6    PUSH     server JSON      ``{"topic", "data"}``: a notification (flags
                               changed, new message, expunge)
7    CANCEL   client empty     the client abandons a request (see below)
8    GOODBYE  both   JSON      ``{"reason"}``: the sender starts no new work
==== ======== ====== ========= ==============================================

JSON payloads are UTF-8, compact, and must be an object.  Bytes cannot travel
in JSON: bodies go in CHUNK frames, attached to a request id.  JSON rules
apply to args and results (tuples arrive as lists, non-string keys as
strings, NaN and infinities are refused).  Within a version, the key set of a
payload is exact; HELLO alone ignores keys it does not know, because its
format is frozen so that any two builds can negotiate.

Connection rules
================

- Each side's first frame is HELLO; receiving any other frame first is a
  :class:`RemoteProtocolError`.  A side sends nothing but HELLO until it has
  received the peer's HELLO (one round trip, then everything is known).  The
  version used is the highest one both ranges contain; no common version, or
  a peer claiming our own role, fails the connection.
- Each side announces its own ``max_frame`` in HELLO: frames we receive are
  checked against ours, frames we send against the peer's (split bodies with
  :attr:`RpcConnection.peer_max_frame`).
- GOODBYE (at most once per side) means "I start no new work": after it the
  sender sends no REQUEST (client) or PUSH (server), but finishes what is in
  flight.  A client that has received GOODBYE may not start requests either.
  A REQUEST that crossed the server's own GOODBYE on the wire is not an
  error: the server answers it, normally with ERROR ``unavailable``.
- ``receive_data(b"")`` marks the end of the stream: with an empty buffer
  :class:`ConnectionClosed` is returned (on every later call too); a partial
  frame at that point is "connection closed mid-frame".  Requests still in
  flight then are the caller's to retry: see :attr:`RpcConnection.in_flight`.
- A :class:`RemoteProtocolError` is final: every later ``next_event`` raises
  it again, and ``send`` accepts one last GOODBYE (to tell the peer why, if
  the HELLOs were exchanged) and nothing else.  A :class:`LocalProtocolError` from ``send`` leaves the
  machine exactly as it was.

Requests
========

Both ends track every request id in flight with the same table,
:data:`TRANSITIONS`: a frame is legal only if (state, frame) is a row.  A
request is *idle* before its REQUEST and again once *done*, which frees its
id.  ``(c)``/``(s)`` is who sends the frame.  Rendered by
:func:`render_state_table`:

    state      frame (sender)      next
    ---------  ------------------  ---------
    idle       REQUEST (c)         waiting
    idle       REQUEST+MORE (c)    sending
    sending    CHUNK (c)           sending
    sending    CHUNK+FINAL (c)     waiting
    sending    CANCEL (c)          waiting
    sending    ERROR (s)           draining
    waiting    CANCEL (c)          waiting
    waiting    RESPONSE (s)        done
    waiting    RESPONSE+MORE (s)   streaming
    waiting    ERROR (s)           done
    streaming  CHUNK (s)           streaming
    streaming  CHUNK+FINAL (s)     done
    streaming  CANCEL (c)          streaming
    streaming  ERROR (s)           done
    draining   CHUNK (c)           draining
    draining   CHUNK+FINAL (c)     done
    draining   CANCEL (c)          done

Read as: a request ends with exactly one terminal from the server -- a
RESPONSE, an ERROR, or (after RESPONSE+MORE) a final CHUNK -- and, if it
carried a body, with the end of that body (a final CHUNK or a CANCEL from the
client).  A successful RESPONSE needs the whole request body; an ERROR may
come at any time, even in the middle of a body in either direction (the body
is then incomplete).  After an early ERROR the client still ends its body,
normally with CANCEL (*draining*).

CANCEL is a request to stop, at most once per id, and it ends the client's
body at once: the server still answers with its terminal frame (for a
streaming response, a final CHUNK, possibly empty, or an ERROR).  A CANCEL
that crossed the terminal frame on the wire finds the id idle at the server
and is dropped without an event.

``max_in_flight`` counts the ids that are not idle.  The client frees an id
only after the server has sent its terminal frame and has been sent the end
of the body, so when a REQUEST arrives the server holds no id the client had
already freed when it sent it: a client that respects the limit never trips
the server's check, and a server that sees one request too many fails the
connection.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
import typing
import zlib

from intermail.errors import ErrorKind, LocalProtocolError, MailError, RemoteProtocolError
from intermail.proto import NEED_DATA

__all__ = [
    "MAGIC",
    "HEADER_SIZE",
    "MIN_VERSION",
    "MAX_VERSION",
    "HELLO_VERSION",
    "DEFAULT_MAX_FRAME",
    "MIN_MAX_FRAME",
    "DEFAULT_MAX_IN_FLIGHT",
    "FLAG_MORE",
    "FLAG_FINAL",
    "FrameType",
    "Hello",
    "Request",
    "Response",
    "ErrorResponse",
    "Chunk",
    "Push",
    "Cancel",
    "Goodbye",
    "ConnectionClosed",
    "TRANSITIONS",
    "RpcConnection",
    "encode_event",
    "decode_event",
    "render_state_table",
]

MAGIC = b"\x8aR"
HEADER_SIZE = 21
MIN_VERSION = 1  # oldest protocol version this module speaks
MAX_VERSION = 1  # newest protocol version this module speaks
HELLO_VERSION = 1  # header version of every HELLO frame, forever
DEFAULT_MAX_FRAME = 1 << 20
MIN_MAX_FRAME = 4096  # so that any HELLO fits whatever the peer's limit
DEFAULT_MAX_IN_FLIGHT = 256
MAX_INSTANCE_NAME = 255
U32_MAX = 0xFFFFFFFF

FLAG_MORE = 0x01
FLAG_FINAL = 0x02

_HEADER = struct.Struct(">2sBBBIII")  # header up to its own CRC
_HEADER_CRC = struct.Struct(">I")

CLIENT = "client"
SERVER = "server"
_ROLES = (CLIENT, SERVER)


class FrameType(enum.IntEnum):
    HELLO = 1
    REQUEST = 2
    RESPONSE = 3
    ERROR = 4
    CHUNK = 5
    PUSH = 6
    CANCEL = 7
    GOODBYE = 8


class _FrameRule(typing.NamedTuple):
    flags: int  # flag bits this frame type may carry
    has_id: bool  # per-request frame (non-zero id) or connection frame (id 0)
    senders: tuple[str, ...]


_FRAME_RULES: dict[FrameType, _FrameRule] = {
    FrameType.HELLO: _FrameRule(0, False, (CLIENT, SERVER)),
    FrameType.REQUEST: _FrameRule(FLAG_MORE, True, (CLIENT,)),
    FrameType.RESPONSE: _FrameRule(FLAG_MORE, True, (SERVER,)),
    FrameType.ERROR: _FrameRule(0, True, (SERVER,)),
    FrameType.CHUNK: _FrameRule(FLAG_FINAL, True, (CLIENT, SERVER)),
    FrameType.PUSH: _FrameRule(0, False, (SERVER,)),
    FrameType.CANCEL: _FrameRule(0, True, (CLIENT,)),
    FrameType.GOODBYE: _FrameRule(0, False, (CLIENT, SERVER)),
}


# ---------------------------------------------------------------------------
# Events


@dataclasses.dataclass(frozen=True)
class Hello:
    """First frame of each side; see :attr:`RpcConnection.local_hello`."""

    role: str
    instance: str
    min_version: int = MIN_VERSION
    max_version: int = MAX_VERSION
    max_frame: int = DEFAULT_MAX_FRAME


@dataclasses.dataclass(frozen=True)
class Request:
    """Call ``method``; ``more=True``: the request body follows as client Chunks."""

    id: int
    method: str
    args: dict = dataclasses.field(default_factory=dict)
    more: bool = False


@dataclasses.dataclass(frozen=True)
class Response:
    """Success; ``more=True``: the response body follows as server Chunks."""

    id: int
    result: dict = dataclasses.field(default_factory=dict)
    more: bool = False


@dataclasses.dataclass(frozen=True)
class ErrorResponse:
    """Failure of request ``id``; ``text`` is the client-safe text, never detail."""

    id: int
    kind: ErrorKind
    text: str

    @classmethod
    def from_error(cls, request_id: int, error: MailError) -> "ErrorResponse":
        return cls(request_id, error.kind, error.safe)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of the body of request ``id`` (its direction follows the sender)."""

    id: int
    data: bytes
    final: bool = False


@dataclasses.dataclass(frozen=True)
class Push:
    """A server-to-client notification, not tied to a request."""

    topic: str
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Cancel:
    """The client abandons request ``id``; the server still sends its terminal frame."""

    id: int


@dataclasses.dataclass(frozen=True)
class Goodbye:
    """The sender starts no new work; what is in flight still completes."""

    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed its side (received), or we close ours (sent: returns b"")."""


Event = Hello | Request | Response | ErrorResponse | Chunk | Push | Cancel | Goodbye


# ---------------------------------------------------------------------------
# Per-request state machine: the one table both ends follow.

IDLE = "idle"
SENDING = "sending"  # the client is sending the request body
WAITING = "waiting"  # the request is complete, no answer yet
STREAMING = "streaming"  # RESPONSE+MORE sent, the response body is flowing
DRAINING = "draining"  # answered early with ERROR, the request body still open
DONE = "done"  # finished: the id is idle again

TRANSITIONS: dict[tuple[str, str], str] = {
    # state      frame (sender)          next
    (IDLE,      "REQUEST (c)"):        WAITING,
    (IDLE,      "REQUEST+MORE (c)"):   SENDING,
    (SENDING,   "CHUNK (c)"):          SENDING,
    (SENDING,   "CHUNK+FINAL (c)"):    WAITING,
    (SENDING,   "CANCEL (c)"):         WAITING,
    (SENDING,   "ERROR (s)"):          DRAINING,
    (WAITING,   "CANCEL (c)"):         WAITING,
    (WAITING,   "RESPONSE (s)"):       DONE,
    (WAITING,   "RESPONSE+MORE (s)"):  STREAMING,
    (WAITING,   "ERROR (s)"):          DONE,
    (STREAMING, "CHUNK (s)"):          STREAMING,
    (STREAMING, "CHUNK+FINAL (s)"):    DONE,
    (STREAMING, "CANCEL (c)"):         STREAMING,
    (STREAMING, "ERROR (s)"):          DONE,
    (DRAINING,  "CHUNK (c)"):          DRAINING,
    (DRAINING,  "CHUNK+FINAL (c)"):    DONE,
    (DRAINING,  "CANCEL (c)"):         DONE,
}  # fmt: skip


def render_state_table() -> str:
    """The :data:`TRANSITIONS` table as the text shown in the module docstring."""
    rows = [("state", "frame (sender)", "next"), ("-" * 9, "-" * 18, "-" * 9)]
    rows += [(state, step, nxt) for (state, step), nxt in TRANSITIONS.items()]
    return "\n".join(f"{a:<9}  {b:<18}  {c}".rstrip() for a, b, c in rows)


def _step(event: Request | Response | ErrorResponse | Chunk | Cancel, sender: str) -> str:
    """The TRANSITIONS column name of a per-request frame."""
    if isinstance(event, Request):
        name = "REQUEST+MORE" if event.more else "REQUEST"
    elif isinstance(event, Response):
        name = "RESPONSE+MORE" if event.more else "RESPONSE"
    elif isinstance(event, ErrorResponse):
        name = "ERROR"
    elif isinstance(event, Chunk):
        name = "CHUNK+FINAL" if event.final else "CHUNK"
    else:
        name = "CANCEL"
    return f"{name} ({sender[0]})"


# ---------------------------------------------------------------------------
# Encoding (our side: errors are LocalProtocolError)


def _check_id(request_id: object) -> int:
    if isinstance(request_id, bool) or not isinstance(request_id, int) or not 1 <= request_id <= U32_MAX:
        raise LocalProtocolError(f"request id must be an integer in 1..{U32_MAX}, got {request_id!r}")
    return request_id


def _check_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a str, got {type(value).__name__}")
    return value


def _check_dict(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise LocalProtocolError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def _refuse_non_json(value: object) -> typing.NoReturn:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise LocalProtocolError("bytes cannot travel in JSON: send bodies as Chunk frames")
    raise TypeError(f"a {type(value).__name__} value cannot travel in JSON")


def _dump_json(obj: dict, what: str) -> bytes:
    try:
        text = json.dumps(
            obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_refuse_non_json
        )
        return text.encode("utf-8")
    except LocalProtocolError as exc:
        raise LocalProtocolError(f"{what}: {exc.text}") from None
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise LocalProtocolError(f"{what} is not JSON-serialisable: {exc}") from None


def _frame_parts(event: object) -> tuple[FrameType, int, int, bytes]:
    """(type, flags, id, payload) of one of our events, validating its fields."""
    if isinstance(event, Hello):
        if event.role not in _ROLES:
            raise LocalProtocolError(f"Hello.role must be 'client' or 'server', got {event.role!r}")
        _check_str(event.instance, "Hello.instance")
        if len(event.instance) > MAX_INSTANCE_NAME:
            raise LocalProtocolError(f"Hello.instance is longer than {MAX_INSTANCE_NAME} characters")
        for name in ("min_version", "max_version"):
            value = getattr(event, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
                raise LocalProtocolError(f"Hello.{name} must be an integer in 1..255, got {value!r}")
        if event.min_version > event.max_version:
            raise LocalProtocolError("Hello.min_version is above Hello.max_version")
        frame_limit = event.max_frame
        if type(frame_limit) is not int or not MIN_MAX_FRAME <= frame_limit <= U32_MAX:
            raise LocalProtocolError(f"Hello.max_frame must be an integer in {MIN_MAX_FRAME}..{U32_MAX}")
        payload = {
            "versions": [event.min_version, event.max_version],
            "role": event.role,
            "instance": event.instance,
            "max_frame": frame_limit,
        }
        return FrameType.HELLO, 0, 0, _dump_json(payload, "Hello")
    if isinstance(event, Request):
        payload = {
            "method": _check_str(event.method, "Request.method"),
            "args": _check_dict(event.args, "Request.args"),
        }
        flags = FLAG_MORE if event.more else 0
        return FrameType.REQUEST, flags, _check_id(event.id), _dump_json(payload, "Request.args")
    if isinstance(event, Response):
        payload = {"result": _check_dict(event.result, "Response.result")}
        flags = FLAG_MORE if event.more else 0
        return FrameType.RESPONSE, flags, _check_id(event.id), _dump_json(payload, "Response.result")
    if isinstance(event, ErrorResponse):
        if not isinstance(event.kind, ErrorKind):
            raise LocalProtocolError(f"ErrorResponse.kind must be an ErrorKind, got {event.kind!r}")
        payload = {"kind": event.kind.value, "text": _check_str(event.text, "ErrorResponse.text")}
        return FrameType.ERROR, 0, _check_id(event.id), _dump_json(payload, "ErrorResponse")
    if isinstance(event, Chunk):
        if not isinstance(event.data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"Chunk.data must be bytes, got {type(event.data).__name__}")
        flags = FLAG_FINAL if event.final else 0
        return FrameType.CHUNK, flags, _check_id(event.id), bytes(event.data)
    if isinstance(event, Push):
        payload = {"topic": _check_str(event.topic, "Push.topic"), "data": _check_dict(event.data, "Push.data")}
        return FrameType.PUSH, 0, 0, _dump_json(payload, "Push.data")
    if isinstance(event, Cancel):
        return FrameType.CANCEL, 0, _check_id(event.id), b""
    if isinstance(event, Goodbye):
        payload = {"reason": _check_str(event.reason, "Goodbye.reason")}
        return FrameType.GOODBYE, 0, 0, _dump_json(payload, "Goodbye")
    raise LocalProtocolError(f"not an RPC event: {event!r}")


def _frame(version: int, frame_type: FrameType, flags: int, request_id: int, payload: bytes) -> bytes:
    if len(payload) > U32_MAX:
        raise LocalProtocolError(f"{frame_type.name} payload of {len(payload)} bytes cannot be framed")
    head = _HEADER.pack(MAGIC, version, frame_type, flags, request_id, len(payload), zlib.crc32(payload))
    return head + _HEADER_CRC.pack(zlib.crc32(head)) + payload


def encode_event(event: Event, version: int = HELLO_VERSION) -> bytes:
    """One frame for ``event``, without any session rule (tools and tests)."""
    frame_type, flags, request_id, payload = _frame_parts(event)
    return _frame(version, frame_type, flags, request_id, payload)


# ---------------------------------------------------------------------------
# Decoding (the peer's side: errors are RemoteProtocolError)


class _Header(typing.NamedTuple):
    version: int
    type: FrameType
    flags: int
    id: int
    length: int
    payload_crc: int


def _check_magic(buffer: bytes | bytearray) -> None:
    """Fail as early as the first byte: a peer that is not speaking RPC at all."""
    prefix = bytes(buffer[: len(MAGIC)])
    if prefix != MAGIC[: len(prefix)]:
        raise RemoteProtocolError(f"bad frame magic {prefix.hex()}: the peer is not speaking intermail RPC")


def _parse_header(raw: bytes, max_frame: int, expect_version: int | None) -> _Header:
    """Check a complete 21-byte header; ``expect_version=None`` accepts any we speak."""
    _check_magic(raw)
    _, version, type_code, flags, request_id, length, payload_crc = _HEADER.unpack_from(raw)
    (header_crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
    if zlib.crc32(raw[: _HEADER.size]) != header_crc:
        raise RemoteProtocolError("frame header CRC mismatch: the stream is corrupt")
    if expect_version is None:
        if not MIN_VERSION <= version <= MAX_VERSION:
            raise RemoteProtocolError(
                f"unsupported protocol version {version} (we speak {MIN_VERSION}..{MAX_VERSION})"
            )
    elif version != expect_version:
        raise RemoteProtocolError(f"bad protocol version {version} in frame header, expected {expect_version}")
    try:
        frame_type = FrameType(type_code)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame type {type_code}") from None
    if frame_type is FrameType.HELLO and version != HELLO_VERSION:
        raise RemoteProtocolError(f"HELLO frame with protocol version {version}, expected {HELLO_VERSION}")
    rule = _FRAME_RULES[frame_type]
    if flags & ~rule.flags:
        raise RemoteProtocolError(f"{frame_type.name} frame has reserved flag bits 0x{flags & ~rule.flags:02x} set")
    if rule.has_id and request_id == 0:
        raise RemoteProtocolError(f"{frame_type.name} frame has request id 0")
    if not rule.has_id and request_id != 0:
        raise RemoteProtocolError(f"{frame_type.name} frame must have request id 0, got {request_id}")
    if length > max_frame:
        raise RemoteProtocolError(f"{frame_type.name} frame payload of {length} bytes exceeds max_frame {max_frame}")
    return _Header(version, frame_type, flags, request_id, length, payload_crc)


def _reject_constant(name: str) -> typing.NoReturn:
    raise ValueError(f"{name} is not JSON")


def _load_object(payload: bytes, frame_type: FrameType, keys: tuple[str, ...], exact: bool = True) -> dict:
    name = frame_type.name
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # covers UnicodeDecodeError and JSONDecodeError
        raise RemoteProtocolError(f"{name} payload is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{name} payload must be a JSON object")
    missing = [key for key in keys if key not in obj]
    extra = [key for key in obj if key not in keys] if exact else []
    if missing or extra:
        raise RemoteProtocolError(f"{name} payload must have exactly the keys {', '.join(keys)}")
    return obj


def _field(obj: dict, key: str, kind: type, frame_type: FrameType) -> typing.Any:
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RemoteProtocolError(f"{frame_type.name} field {key!r} must be a JSON {_JSON_NAMES[kind]}")
    return value


_JSON_NAMES = {str: "string", dict: "object", int: "integer", list: "array"}
_ERROR_KINDS = {kind.value: kind for kind in ErrorKind}


def _decode_hello(payload: bytes) -> Hello:
    t = FrameType.HELLO
    obj = _load_object(payload, t, ("versions", "role", "instance", "max_frame"), exact=False)
    versions = _field(obj, "versions", list, t)
    if len(versions) != 2 or not all(type(v) is int and 1 <= v <= 255 for v in versions) or versions[0] > versions[1]:
        raise RemoteProtocolError("HELLO versions must be [min, max] with 1 <= min <= max <= 255")
    role = _field(obj, "role", str, t)
    if role not in _ROLES:
        raise RemoteProtocolError(f"HELLO role must be 'client' or 'server', got {role[:40]!r}")
    instance = _field(obj, "instance", str, t)
    if len(instance) > MAX_INSTANCE_NAME:
        raise RemoteProtocolError(f"HELLO instance name longer than {MAX_INSTANCE_NAME} characters")
    frame_limit = _field(obj, "max_frame", int, t)
    if not MIN_MAX_FRAME <= frame_limit <= U32_MAX:
        raise RemoteProtocolError(f"HELLO max_frame must be in {MIN_MAX_FRAME}..{U32_MAX}")
    return Hello(role, instance, versions[0], versions[1], frame_limit)


def _decode_payload(header: _Header, payload: bytes) -> Event:
    t, flags, request_id = header.type, header.flags, header.id
    if t is FrameType.HELLO:
        return _decode_hello(payload)
    if t is FrameType.REQUEST:
        obj = _load_object(payload, t, ("method", "args"))
        return Request(request_id, _field(obj, "method", str, t), _field(obj, "args", dict, t), bool(flags & FLAG_MORE))
    if t is FrameType.RESPONSE:
        obj = _load_object(payload, t, ("result",))
        return Response(request_id, _field(obj, "result", dict, t), bool(flags & FLAG_MORE))
    if t is FrameType.ERROR:
        obj = _load_object(payload, t, ("kind", "text"))
        kind = _ERROR_KINDS.get(_field(obj, "kind", str, t))
        if kind is None:
            raise RemoteProtocolError("ERROR frame with an unknown error kind")
        return ErrorResponse(request_id, kind, _field(obj, "text", str, t))
    if t is FrameType.CHUNK:
        return Chunk(request_id, payload, bool(flags & FLAG_FINAL))
    if t is FrameType.PUSH:
        obj = _load_object(payload, t, ("topic", "data"))
        return Push(_field(obj, "topic", str, t), _field(obj, "data", dict, t))
    if t is FrameType.CANCEL:
        if payload:
            raise RemoteProtocolError("CANCEL frame must have an empty payload")
        return Cancel(request_id)
    obj = _load_object(payload, t, ("reason",))
    return Goodbye(_field(obj, "reason", str, t))


def decode_event(frame: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> Event:
    """The event in exactly one complete frame, without any session rule."""
    if len(frame) < HEADER_SIZE:
        _check_magic(frame)
        raise RemoteProtocolError("incomplete frame header")
    header = _parse_header(bytes(frame[:HEADER_SIZE]), max_frame, None)
    payload = bytes(frame[HEADER_SIZE:])
    if len(payload) != header.length:
        raise RemoteProtocolError(f"frame length field says {header.length} bytes, got {len(payload)}")
    if zlib.crc32(payload) != header.payload_crc:
        raise RemoteProtocolError("frame payload CRC mismatch: the stream is corrupt")
    return _decode_payload(header, payload)


# ---------------------------------------------------------------------------
# The connection machine


def _other(role: str) -> str:
    return SERVER if role == CLIENT else CLIENT


class RpcConnection:
    """One end of an RPC connection; see the module docstring for the rules.

    ``max_frame`` bounds the payload of frames we receive (and is announced
    to the peer); ``max_in_flight`` bounds the requests in flight;
    ``min_version``/``max_version`` narrow the versions we offer.
    """

    def __init__(
        self,
        role: str,
        instance: str = "",
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        min_version: int = MIN_VERSION,
        max_version: int = MAX_VERSION,
    ):
        if role not in _ROLES:
            raise ValueError(f"role must be 'client' or 'server', got {role!r}")
        if not MIN_MAX_FRAME <= max_frame <= U32_MAX:
            raise ValueError(f"max_frame must be in {MIN_MAX_FRAME}..{U32_MAX}, got {max_frame}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if not MIN_VERSION <= min_version <= max_version <= MAX_VERSION:
            raise ValueError(f"versions must satisfy {MIN_VERSION} <= min <= max <= {MAX_VERSION}")
        if len(instance) > MAX_INSTANCE_NAME:
            raise ValueError(f"instance name longer than {MAX_INSTANCE_NAME} characters")
        self.role = role
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self.local_hello = Hello(role, instance, min_version, max_version, max_frame)
        self._buffer = bytearray()
        self._header: _Header | None = None  # parsed header of the frame being received
        self._eof = False
        self._error: str | None = None
        self._closed = False
        self._hello_sent = False
        self._peer: Hello | None = None
        self._version: int | None = None
        self._goodbye = {CLIENT: False, SERVER: False}  # who has sent GOODBYE
        self._requests: dict[int, str] = {}  # id -> state, for every id not idle
        self._cancelled: set[int] = set()
        self._next_id = 1

    # -- what the caller may look at

    @property
    def peer(self) -> Hello | None:
        """The peer's HELLO, once received."""
        return self._peer

    @property
    def version(self) -> int | None:
        """The negotiated protocol version, once the peer's HELLO is in."""
        return self._version

    @property
    def peer_max_frame(self) -> int | None:
        """Largest payload the peer accepts: the bound for our Chunk sizes."""
        return self._peer.max_frame if self._peer else None

    @property
    def in_flight(self) -> dict[int, str]:
        """Request id -> state (a TRANSITIONS state name) for every id not idle."""
        return dict(self._requests)

    @property
    def goodbye_sent(self) -> bool:
        return self._goodbye[self.role]

    @property
    def goodbye_received(self) -> bool:
        return self._goodbye[_other(self.role)]

    @property
    def error(self) -> str | None:
        """The text of the RemoteProtocolError that failed the connection, if any."""
        return self._error

    def new_request_id(self) -> int:
        """A request id not in flight (client only); send() reserves it."""
        if self.role != CLIENT:
            raise LocalProtocolError("only the client allocates request ids")
        while True:  # terminates: at most max_in_flight ids are taken
            request_id = self._next_id
            self._next_id = request_id % U32_MAX + 1
            if request_id not in self._requests:
                return request_id

    # -- bytes in

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data after the end of the stream")
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> object:
        """The next event, NEED_DATA, or ConnectionClosed; raises only RemoteProtocolError."""
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        try:
            while True:
                frame = self._read_frame()
                if frame is None:
                    if not self._eof:
                        return NEED_DATA
                    if self._buffer:
                        raise RemoteProtocolError("connection closed mid-frame")
                    return ConnectionClosed()
                event = self._receive(*frame)
                if event is not None:
                    return event
        except RemoteProtocolError as exc:
            self._error = exc.text
            raise

    def _read_frame(self) -> tuple[_Header, bytes] | None:
        buffer = self._buffer
        if self._header is None:
            _check_magic(buffer)
            if len(buffer) < HEADER_SIZE:
                return None
            expect = HELLO_VERSION if self._peer is None else self._version
            header = _parse_header(bytes(buffer[:HEADER_SIZE]), self.max_frame, expect)
            if self._peer is None and header.type is not FrameType.HELLO:
                raise RemoteProtocolError(f"expected HELLO as the first frame, got {header.type.name}")
            if self._peer is not None and header.type is FrameType.HELLO:
                raise RemoteProtocolError("second HELLO on one connection")
            self._header = header
        header = self._header
        end = HEADER_SIZE + header.length
        if len(buffer) < end:
            return None
        payload = bytes(buffer[HEADER_SIZE:end])
        if zlib.crc32(payload) != header.payload_crc:
            raise RemoteProtocolError(f"{header.type.name} frame payload CRC mismatch: the stream is corrupt")
        del buffer[:end]
        self._header = None
        return header, payload

    def _receive(self, header: _Header, payload: bytes) -> Event | None:
        event = _decode_payload(header, payload)
        if isinstance(event, Hello):
            return self._negotiate(event)
        return self._apply(event, ours=False)

    def _negotiate(self, hello: Hello) -> Hello:
        ours = self.local_hello
        if hello.role == self.role:
            raise RemoteProtocolError(f"the peer says it is a {hello.role} too")
        low = max(ours.min_version, hello.min_version)
        high = min(ours.max_version, hello.max_version)
        if low > high:
            raise RemoteProtocolError(
                f"no common protocol version: we speak {ours.min_version}..{ours.max_version}, "
                f"the peer {hello.min_version}..{hello.max_version}"
            )
        self._peer = hello
        self._version = high
        return hello

    # -- events out

    def send(self, event: Event | ConnectionClosed) -> bytes:
        """Wire bytes for ``event``; LocalProtocolError (state unchanged) if illegal now."""
        if isinstance(event, ConnectionClosed):
            self._closed = True
            return b""
        if self._closed:
            raise LocalProtocolError("we already closed this connection")
        if self._error is not None and not isinstance(event, Goodbye):
            raise LocalProtocolError(f"the connection failed ({self._error}); only a Goodbye may be sent")
        frame_type, flags, request_id, payload = _frame_parts(event)
        if isinstance(event, Hello):
            if self._hello_sent:
                raise LocalProtocolError("HELLO already sent")
            if event != self.local_hello:
                raise LocalProtocolError("send this connection's local_hello, which matches its settings")
            self._hello_sent = True
            return _frame(HELLO_VERSION, frame_type, flags, request_id, payload)
        if not self._hello_sent:
            raise LocalProtocolError(f"send HELLO before {frame_type.name}")
        if self._peer is None:
            raise LocalProtocolError(f"wait for the peer's HELLO before sending {frame_type.name}")
        if len(payload) > self._peer.max_frame:
            raise LocalProtocolError(
                f"{frame_type.name} payload of {len(payload)} bytes exceeds the peer's max_frame "
                f"{self._peer.max_frame}"
            )
        self._apply(event, ours=True)
        return _frame(self._version, frame_type, flags, request_id, payload)

    # -- the session rules, one place for both directions

    def _apply(self, event: Event, ours: bool) -> Event | None:
        """Check ``event`` against the session rules and record it; None: drop it.

        Everything is checked before anything changes, so a refused send leaves
        the machine as it was.
        """
        fail = LocalProtocolError if ours else RemoteProtocolError
        sender = self.role if ours else _other(self.role)
        name = type(event).__name__ if ours else _frame_name(event)
        if sender not in _FRAME_RULES[_FRAME_TYPES[type(event)]].senders:
            raise fail(f"a {sender} may not send {name}")
        if isinstance(event, Goodbye):
            if self._goodbye[sender]:
                raise fail(f"second GOODBYE from the {sender}")
            self._goodbye[sender] = True
            return event
        if isinstance(event, Push):
            if self._goodbye[SERVER]:
                raise fail("PUSH after the server's GOODBYE")
            return event
        request_id = event.id
        if isinstance(event, Request):
            if self._goodbye[CLIENT]:
                raise fail("REQUEST after the client's GOODBYE")
            if ours and self._goodbye[SERVER]:
                raise fail("the server said GOODBYE: send new requests on a new connection")
            if request_id in self._requests:
                raise fail(f"request id {request_id} is already in flight")
            if len(self._requests) >= self.max_in_flight:
                raise fail(f"request {request_id} would exceed max_in_flight={self.max_in_flight}")
        if isinstance(event, Cancel):
            if not ours and request_id not in self._requests:
                return None  # crossed the terminal frame on the wire: stale
            if request_id in self._cancelled:
                raise fail(f"request {request_id} cancelled twice")
        state = self._requests.get(request_id, IDLE)
        step = _step(event, sender)
        next_state = TRANSITIONS.get((state, step))
        if next_state is None:
            if state == IDLE:
                raise fail(f"{step} for unknown request id {request_id}")
            raise fail(f"{step} not allowed on request {request_id} while it is {state}")
        if next_state == DONE:
            del self._requests[request_id]
            self._cancelled.discard(request_id)
        else:
            self._requests[request_id] = next_state
            if isinstance(event, Cancel):
                self._cancelled.add(request_id)
        return event


_FRAME_TYPES: dict[type, FrameType] = {
    Hello: FrameType.HELLO,
    Request: FrameType.REQUEST,
    Response: FrameType.RESPONSE,
    ErrorResponse: FrameType.ERROR,
    Chunk: FrameType.CHUNK,
    Push: FrameType.PUSH,
    Cancel: FrameType.CANCEL,
    Goodbye: FrameType.GOODBYE,
}


def _frame_name(event: Event) -> str:
    return _FRAME_TYPES[type(event)].name
