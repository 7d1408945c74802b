"""Pure machine tests of intermail.proto.rpc: wire format, session rules, limits, fuzz."""

from __future__ import annotations

import struct
import textwrap
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.errors import ErrorKind, LocalProtocolError, MailError, RemoteProtocolError
from intermail.proto import NEED_DATA, rpc
from intermail.proto.rpc import (
    Cancel,
    Chunk,
    ConnectionClosed,
    ErrorResponse,
    FrameType,
    Goodbye,
    Hello,
    Push,
    Request,
    Response,
    RpcConnection,
    decode_event,
    encode_event,
)
from intermail.testing.feed import assert_split_invariant, events_whole

TRANSCRIPTS = Path(__file__).parent / "transcripts" / "rpc"
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# helpers


def raw_frame(frame_type: int, payload: bytes = b"", *, flags: int = 0, rid: int = 0, version: int = 1,
              magic: bytes = b"\x8aR") -> bytes:
    """A frame built from the documented layout, independently of the module's encoder."""
    head = magic + struct.pack(">BBBIII", version, frame_type, flags, rid, len(payload), zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + payload


def drain(conn) -> list:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


def pair(**kwargs) -> tuple[RpcConnection, RpcConnection]:
    """A client and a server that have exchanged HELLOs."""
    client = RpcConnection("client", "access1", **kwargs.get("client", {}))
    server = RpcConnection("server", "mss1", **kwargs.get("server", {}))
    server.receive_data(client.send(client.local_hello))
    client.receive_data(server.send(server.local_hello))
    assert drain(server) == [client.local_hello]
    assert drain(client) == [server.local_hello]
    return client, server


def feed(conn, data: bytes) -> None:
    """receive_data, except that an empty slice is not passed on: b"" means end of stream."""
    if data:
        conn.receive_data(bytes(data))


def deliver(sender: RpcConnection, receiver: RpcConnection, event) -> list:
    receiver.receive_data(sender.send(event))
    return drain(receiver)


def remote_error(conn: RpcConnection) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    return info.value.text


def server_after_hello(**kwargs) -> RpcConnection:
    server = RpcConnection("server", "mss1", **kwargs)
    server.send(server.local_hello)
    server.receive_data(encode_event(Hello("client", "access1")))
    assert drain(server) == [Hello("client", "access1")]
    return server


def client_after_hello(**kwargs) -> RpcConnection:
    client = RpcConnection("client", "access1", **kwargs)
    client.send(client.local_hello)
    client.receive_data(encode_event(Hello("server", "mss1")))
    assert drain(client) == [Hello("server", "mss1")]
    return client


# ---------------------------------------------------------------------------
# seed transcripts


def load_transcript(path: Path) -> list[tuple[str, bytes]]:
    """Lines ``C <hex>`` / ``S <hex>`` (one frame each, spaces ignored); ``#`` comments."""
    frames = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        direction, hexdata = line.split(None, 1)
        assert direction in ("C", "S"), line
        frames.append((direction, bytes.fromhex(hexdata)))
    return frames


TRANSCRIPT_PATHS = sorted(TRANSCRIPTS.glob("*.hex"))
assert TRANSCRIPT_PATHS, "no seed transcripts found"


class Scripted:
    """A connection that sends its own side of a transcript as the peer's events arrive.

    ``script[k]`` is sent after the k-th received event (``script[0]`` up front);
    event counts do not depend on how the input is split, so neither does this.
    """

    def __init__(self, conn: RpcConnection, script: dict[int, list], lenient: bool = False):
        self.conn, self.script, self.seen, self.lenient = conn, script, 0, lenient
        for event in script.get(0, []):
            self._send(event)

    def _send(self, event) -> None:
        try:
            self.conn.send(event)
        except LocalProtocolError:
            if not self.lenient:  # lenient: fuzzed input makes our script illegal
                raise

    def receive_data(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def next_event(self):
        event = self.conn.next_event()
        if event is not NEED_DATA:
            self.seen += 1
            for ours in self.script.get(self.seen, []):
                self._send(ours)
        return event

    def send(self, event) -> bytes:
        return self.conn.send(event)


def side(frames: list[tuple[str, bytes]], role: str):
    """(factory of a scripted ``role`` machine, the bytes it receives, the events it should yield)."""
    mine = "C" if role == "client" else "S"
    script: dict[int, list] = {}
    received: list[bytes] = []
    for direction, frame in frames:
        if direction == mine:
            script.setdefault(len(received), []).append(decode_event(frame))
        else:
            received.append(frame)
    ours_hello = next(decode_event(f) for d, f in frames if d == mine)

    def make(lenient: bool = False) -> Scripted:
        return Scripted(RpcConnection(role, ours_hello.instance), script, lenient)

    return make, received, [decode_event(f) for f in received]


@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_replays_byte_exact(path):
    """Both machines re-encode every seed frame to the same bytes and accept it."""
    frames = load_transcript(path)
    client = RpcConnection("client", decode_event(frames[0][1]).instance)
    server = RpcConnection("server", decode_event(frames[1][1]).instance)
    for direction, frame in frames:
        sender, receiver = (client, server) if direction == "C" else (server, client)
        event = decode_event(frame)
        assert sender.send(event) == frame, f"encoding of {event!r} changed"
        receiver.receive_data(frame)
        assert drain(receiver) == [event]
    assert client.in_flight == {} and server.in_flight == {}


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_transcript_split_invariant(path, role):
    make, received, expected = side(load_transcript(path), role)
    assert assert_split_invariant(make, b"".join(received)) == expected


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("path", TRANSCRIPT_PATHS, ids=lambda p: p.stem)
def test_every_single_byte_change_is_detected(path, role):
    """Both CRCs together: any one changed byte fails exactly the frame it is in."""
    make, received, expected = side(load_transcript(path), role)
    for index, frame in enumerate(received):
        prefix = b"".join(received[:index])
        for position in range(len(frame)):
            for mask in (0x01, 0x80, 0xFF):
                damaged = bytearray(frame)
                damaged[position] ^= mask
                events = events_whole(make, prefix + bytes(damaged))
                assert events[:-1] == expected[:index], (index, position)
                assert events[-1][0] == "error", (index, position, mask, events[-1])


@FAST
@given(data=st.data())
def test_any_flip_in_any_seed_frame_is_detected(data):
    path = data.draw(st.sampled_from(TRANSCRIPT_PATHS))
    role = data.draw(st.sampled_from(["client", "server"]))
    make, received, expected = side(load_transcript(path), role)
    index = data.draw(st.integers(0, len(received) - 1))
    frame = bytearray(received[index])
    frame[data.draw(st.integers(0, len(frame) - 1))] ^= data.draw(st.integers(1, 255))
    events = events_whole(make, b"".join(received[:index]) + bytes(frame) + b"".join(received[index + 1 :]))
    assert events[:-1] == expected[:index]
    assert events[-1][0] == "error"


def test_docstring_state_table_is_the_transitions_table():
    assert textwrap.indent(rpc.render_state_table(), "    ") in rpc.__doc__


# ---------------------------------------------------------------------------
# round trips


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=5)
request_ids = st.integers(1, 2**32 - 1)

hellos = st.builds(
    lambda role, instance, lo, span, max_frame: Hello(role, instance, lo, min(lo + span, 255), max_frame),
    st.sampled_from(["client", "server"]),
    st.text(max_size=40),
    st.integers(1, 255),
    st.integers(0, 10),
    st.integers(rpc.MIN_MAX_FRAME, 2**32 - 1),
)
requests = st.builds(Request, request_ids, st.text(max_size=30), json_objects, st.booleans())
responses = st.builds(Response, request_ids, json_objects, st.booleans())
error_responses = st.builds(ErrorResponse, request_ids, st.sampled_from(list(ErrorKind)), st.text(max_size=60))
chunks = st.builds(Chunk, request_ids, st.binary(max_size=300), st.booleans())
pushes = st.builds(Push, st.text(max_size=30), json_objects)
cancels = st.builds(Cancel, request_ids)
goodbyes = st.builds(Goodbye, st.text(max_size=60))
all_events = hellos | requests | responses | error_responses | chunks | pushes | cancels | goodbyes


@FAST
@given(all_events)
def test_round_trip_every_event_type(event):
    assert decode_event(encode_event(event)) == event


@FAST
@given(st.lists(requests | pushes | goodbyes, max_size=5), st.data())
def test_round_trip_through_connections(events, data):
    """Connection-level events survive a trip through a client/server pair, split anywhere."""
    client, server = pair()
    seen_ids: set[int] = set()
    for event in events:
        if isinstance(event, Request):
            if event.id in seen_ids:
                continue
            seen_ids.add(event.id)
            sender, receiver = client, server
        elif isinstance(event, Push):
            sender, receiver = server, client
        else:
            if client.goodbye_sent:
                continue
            sender, receiver = client, server
        try:
            wire = sender.send(event)
        except LocalProtocolError:
            continue  # e.g. a request after our own Goodbye
        cut = data.draw(st.integers(0, len(wire)))
        feed(receiver, wire[:cut])
        first = drain(receiver)
        feed(receiver, wire[cut:])
        assert first + drain(receiver) == [event]


def test_error_response_from_mail_error_uses_safe_text():
    err = MailError(ErrorKind.NOQUOTA, detail="user alice at 1034 MiB of 1024 MiB")
    assert ErrorResponse.from_error(7, err) == ErrorResponse(7, ErrorKind.NOQUOTA, "quota exceeded")


def test_frame_layout_matches_the_docstring():
    frame = encode_event(Chunk(0x01020304, b"abc", final=True), version=1)
    assert frame == raw_frame(FrameType.CHUNK, b"abc", flags=rpc.FLAG_FINAL, rid=0x01020304)
    assert len(frame) == rpc.HEADER_SIZE + 3
    assert frame[:2] == rpc.MAGIC


# ---------------------------------------------------------------------------
# HELLO and negotiation


def test_negotiates_highest_common_version():
    server = RpcConnection("server")
    server.receive_data(encode_event(Hello("client", "future-access", 1, 9)))
    assert drain(server) == [Hello("client", "future-access", 1, 9)]
    assert server.version == 1
    assert server.peer.instance == "future-access"


def test_no_common_version_fails():
    server = RpcConnection("server")
    server.receive_data(encode_event(Hello("client", "x", 2, 5)))
    assert "no common protocol version" in remote_error(server)


def test_peer_with_our_role_fails():
    server = RpcConnection("server")
    server.receive_data(encode_event(Hello("server", "x")))
    assert "server too" in remote_error(server)


def test_frame_before_hello_is_remote_error():
    server = RpcConnection("server")
    server.receive_data(encode_event(Request(1, "m", {})))
    assert "expected HELLO" in remote_error(server)


def test_second_hello_is_remote_error():
    server = server_after_hello()
    server.receive_data(encode_event(Hello("client", "again")))
    assert "second HELLO" in remote_error(server)


def test_hello_ignores_unknown_keys_for_future_versions():
    payload = b'{"versions":[1,3],"role":"client","instance":"a","max_frame":8192,"compress":["zstd"]}'
    server = RpcConnection("server")
    server.receive_data(raw_frame(FrameType.HELLO, payload))
    assert drain(server) == [Hello("client", "a", 1, 3, 8192)]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"versions":[3,1],"role":"client","instance":"a","max_frame":8192}',
        b'{"versions":[0,1],"role":"client","instance":"a","max_frame":8192}',
        b'{"versions":[1,true],"role":"client","instance":"a","max_frame":8192}',
        b'{"versions":[1,1],"role":"peer","instance":"a","max_frame":8192}',
        b'{"versions":[1,1],"role":"client","instance":"a","max_frame":100}',
        b'{"versions":[1,1],"role":"client","instance":7,"max_frame":8192}',
        b'{"versions":[1,1],"role":"client","max_frame":8192}',
    ],
)
def test_bad_hello_payloads(payload):
    server = RpcConnection("server")
    server.receive_data(raw_frame(FrameType.HELLO, payload))
    assert "HELLO" in remote_error(server)


def test_send_rules_around_hello():
    client = RpcConnection("client", "access1")
    with pytest.raises(LocalProtocolError, match="send HELLO before"):
        client.send(Request(1, "m", {}))
    with pytest.raises(LocalProtocolError, match="local_hello"):
        client.send(Hello("client", "someone-else"))
    client.send(client.local_hello)
    with pytest.raises(LocalProtocolError, match="already sent"):
        client.send(client.local_hello)
    with pytest.raises(LocalProtocolError, match="wait for the peer's HELLO"):
        client.send(Request(1, "m", {}))
    client.receive_data(encode_event(Hello("server", "mss1")))
    drain(client)
    client.send(Request(1, "m", {}))


def test_constructor_limits():
    for bad in (
        dict(role="peer"),
        dict(role="client", max_frame=rpc.MIN_MAX_FRAME - 1),
        dict(role="client", max_in_flight=0),
        dict(role="client", max_version=2),
        dict(role="client", instance="x" * 256),
    ):
        with pytest.raises(ValueError):
            RpcConnection(**bad)


# ---------------------------------------------------------------------------
# framing errors


def _garbage_header(**overrides) -> bytes:
    return raw_frame(**{"frame_type": FrameType.PUSH, "payload": b'{"topic":"t","data":{}}', **overrides})


@pytest.mark.parametrize(
    "frame, text",
    [
        (_garbage_header(magic=b"* "), "bad frame magic"),
        (b"* OK IMAP4rev1 ready\r\n", "bad frame magic"),
        (_garbage_header(version=2), "bad protocol version 2"),
        (_garbage_header(frame_type=9), "unknown frame type 9"),
        (_garbage_header(frame_type=0), "unknown frame type 0"),
        (_garbage_header(flags=0x01), "reserved flag bits"),
        (_garbage_header(rid=5), "must have request id 0"),
        (raw_frame(FrameType.CHUNK, b"x", rid=0), "request id 0"),
        (raw_frame(FrameType.CANCEL, b"x", rid=1), "empty payload"),
        (raw_frame(FrameType.PUSH, b"\xff\xfe"), "not valid UTF-8 JSON"),
        (raw_frame(FrameType.PUSH, b"{"), "not valid UTF-8 JSON"),
        (raw_frame(FrameType.PUSH, b"[1,2]"), "must be a JSON object"),
        (raw_frame(FrameType.PUSH, b'{"topic":"t","data":{"x":NaN}}'), "not valid UTF-8 JSON"),
        (raw_frame(FrameType.PUSH, b"[" * 100_000 + b"]" * 100_000), "not valid UTF-8 JSON"),
        (raw_frame(FrameType.PUSH, b'{"topic":"t","data":{"n":' + b"9" * 5000 + b"}}"), "not valid UTF-8 JSON"),
        (raw_frame(FrameType.PUSH, b'{"topic":"t"}'), "exactly the keys"),
        (raw_frame(FrameType.PUSH, b'{"topic":"t","data":{},"x":1}'), "exactly the keys"),
        (raw_frame(FrameType.PUSH, b'{"topic":1,"data":{}}'), "'topic' must be a JSON string"),
        (raw_frame(FrameType.PUSH, b'{"topic":"t","data":[]}'), "'data' must be a JSON object"),
    ],
)
def test_framing_errors_have_clear_text(frame, text):
    client = client_after_hello()
    client.receive_data(frame)
    assert text in remote_error(client)


def test_header_crc_mismatch():
    frame = bytearray(encode_event(Push("t", {})))
    frame[17] ^= 1
    client = client_after_hello()
    client.receive_data(bytes(frame))
    assert "header CRC mismatch" in remote_error(client)


def test_payload_crc_mismatch():
    frame = bytearray(encode_event(Push("t", {"a": 1})))
    frame[-2] ^= 1  # '1' -> '0': still valid JSON, caught only by the payload CRC
    client = client_after_hello()
    client.receive_data(bytes(frame))
    assert "payload CRC mismatch" in remote_error(client)


def test_error_is_sticky_and_allows_one_goodbye():
    client = client_after_hello()
    client.receive_data(_garbage_header(frame_type=42))
    first = remote_error(client)
    client.receive_data(encode_event(Push("t", {})))  # a valid frame does not revive it
    for _ in range(2):
        assert remote_error(client) == first
    assert client.error == first
    with pytest.raises(LocalProtocolError, match="only a Goodbye"):
        client.send(Request(1, "m", {}))
    assert decode_event(client.send(Goodbye(first))) == Goodbye(first)
    with pytest.raises(LocalProtocolError, match="second GOODBYE"):
        client.send(Goodbye("again"))


# ---------------------------------------------------------------------------
# limits at their edges


def test_max_frame_edge_on_receive():
    limit = 8192

    def push_of_size(size: int) -> bytes:
        head, tail = b'{"topic":"t","data":{"s":"', b'"}}'
        return head + b"x" * (size - len(head) - len(tail)) + tail

    client = client_after_hello(max_frame=limit)
    client.receive_data(raw_frame(FrameType.PUSH, push_of_size(limit)))
    assert [len(encode_event(e)) for e in drain(client)] == [rpc.HEADER_SIZE + limit]
    client.receive_data(raw_frame(FrameType.PUSH, push_of_size(limit + 1)))
    assert "PUSH frame payload of 8193 bytes exceeds max_frame 8192" in remote_error(client)


def test_oversize_length_fails_before_the_payload_arrives():
    client = client_after_hello(max_frame=8192)
    client.receive_data(raw_frame(FrameType.CHUNK, b"x" * 8193, rid=1)[: rpc.HEADER_SIZE])
    assert "exceeds max_frame" in remote_error(client)


def test_chunk_at_max_frame_passes_and_one_more_byte_fails():
    client, server = pair(server={"max_frame": 4096})
    assert client.peer_max_frame == 4096
    deliver(client, server, Request(1, "message.append", {}, more=True))
    assert deliver(client, server, Chunk(1, b"x" * 4096)) == [Chunk(1, b"x" * 4096)]
    with pytest.raises(LocalProtocolError, match="exceeds the peer's max_frame 4096"):
        client.send(Chunk(1, b"x" * 4097))
    server.receive_data(raw_frame(FrameType.CHUNK, b"x" * 4097, rid=1))
    assert "exceeds max_frame 4096" in remote_error(server)


def test_max_in_flight_edge_on_the_client():
    client, server = pair(client={"max_in_flight": 3})
    for _ in range(3):
        deliver(client, server, Request(client.new_request_id(), "m", {}))
    with pytest.raises(LocalProtocolError, match="max_in_flight=3"):
        client.send(Request(client.new_request_id(), "m", {}))
    deliver(server, client, Response(2, {}))
    assert sorted(client.in_flight) == [1, 3]
    deliver(client, server, Request(client.new_request_id(), "m", {}))


def test_max_in_flight_edge_on_the_server():
    client, server = pair(client={"max_in_flight": 4}, server={"max_in_flight": 3})
    for rid in (1, 2, 3):
        assert deliver(client, server, Request(rid, "m", {})) == [Request(rid, "m", {})]
    server.receive_data(client.send(Request(4, "m", {})))
    assert "max_in_flight=3" in remote_error(server)


def test_new_request_id_skips_ids_in_flight_and_wraps():
    client, server = pair()
    client._next_id = 2**32 - 1
    deliver(client, server, Request(1, "m", {}))
    assert client.new_request_id() == 2**32 - 1
    assert client.new_request_id() == 2  # wrapped past 0, skipped 1 (in flight)
    with pytest.raises(LocalProtocolError, match="only the client"):
        server.new_request_id()


# ---------------------------------------------------------------------------
# request accounting


def test_response_completes_a_request():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    assert client.in_flight == server.in_flight == {1: "waiting"}
    assert deliver(server, client, Response(1, {"ok": True})) == [Response(1, {"ok": True})]
    assert client.in_flight == server.in_flight == {}


def test_response_for_unknown_id_is_remote_error():
    client = client_after_hello()
    client.receive_data(encode_event(Response(9, {})))
    assert "RESPONSE (s) for unknown request id 9" in remote_error(client)


def test_error_response_for_unknown_id_is_remote_error():
    client = client_after_hello()
    client.receive_data(encode_event(ErrorResponse(9, ErrorKind.TEMP, "t")))
    assert "unknown request id 9" in remote_error(client)


def test_chunk_for_unknown_id_is_remote_error_both_ways():
    client = client_after_hello()
    client.receive_data(encode_event(Chunk(4, b"x")))
    assert "unknown request id 4" in remote_error(client)
    server = server_after_hello()
    server.receive_data(encode_event(Chunk(4, b"x", final=True)))
    assert "unknown request id 4" in remote_error(server)


def test_duplicate_in_flight_id():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.send(Request(1, "m", {}))
    server.receive_data(encode_event(Request(1, "m", {})))
    assert "request id 1 is already in flight" in remote_error(server)


def test_id_is_reusable_once_done():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    deliver(server, client, ErrorResponse(1, ErrorKind.TEMP, "t"))
    assert deliver(client, server, Request(1, "m2", {})) == [Request(1, "m2", {})]


def test_streamed_response():
    client, server = pair()
    deliver(client, server, Request(1, "message.fetch", {"uid": 1}))
    deliver(server, client, Response(1, {"size": 6}, more=True))
    assert client.in_flight == {1: "streaming"}
    assert deliver(server, client, Chunk(1, b"abc")) == [Chunk(1, b"abc")]
    assert deliver(server, client, Chunk(1, b"def", final=True)) == [Chunk(1, b"def", final=True)]
    assert client.in_flight == server.in_flight == {}


def test_server_chunk_needs_a_streaming_response():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    with pytest.raises(LocalProtocolError, match="not allowed on request 1 while it is waiting"):
        server.send(Chunk(1, b"x"))
    client.receive_data(encode_event(Chunk(1, b"x")))
    assert "CHUNK (s) not allowed on request 1 while it is waiting" in remote_error(client)


def test_response_after_plain_response_is_remote_error():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    deliver(server, client, Response(1, {}))
    client.receive_data(encode_event(Response(1, {})))
    assert "unknown request id 1" in remote_error(client)


def test_streamed_request_body():
    client, server = pair()
    deliver(client, server, Request(1, "message.append", {"size": 4}, more=True))
    assert server.in_flight == {1: "sending"}
    with pytest.raises(LocalProtocolError, match="RESPONSE \\(s\\) not allowed"):
        server.send(Response(1, {}))  # success needs the whole body
    deliver(client, server, Chunk(1, b"ab"))
    deliver(client, server, Chunk(1, b"cd", final=True))
    with pytest.raises(LocalProtocolError, match="not allowed on request 1 while it is waiting"):
        client.send(Chunk(1, b"more"))
    deliver(server, client, Response(1, {"uid": 5}))
    assert client.in_flight == server.in_flight == {}


def test_early_error_during_request_body_then_cancel():
    client, server = pair()
    deliver(client, server, Request(1, "message.append", {}, more=True))
    deliver(server, client, ErrorResponse(1, ErrorKind.NOQUOTA, "quota exceeded"))
    assert client.in_flight == server.in_flight == {1: "draining"}
    assert deliver(client, server, Chunk(1, b"in flight already")) == [Chunk(1, b"in flight already")]
    assert deliver(client, server, Cancel(1)) == [Cancel(1)]
    assert client.in_flight == server.in_flight == {}


def test_error_ends_a_streaming_response():
    client, server = pair()
    deliver(client, server, Request(1, "message.fetch", {}))
    deliver(server, client, Response(1, {}, more=True))
    deliver(server, client, Chunk(1, b"partial"))
    deliver(server, client, ErrorResponse(1, ErrorKind.CORRUPT, "stored data damaged"))
    assert client.in_flight == server.in_flight == {}


def test_client_cannot_send_server_frames_and_vice_versa():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    for event in (Response(1, {}), ErrorResponse(1, ErrorKind.TEMP, "t"), Push("t", {})):
        with pytest.raises(LocalProtocolError, match="a client may not send"):
            client.send(event)
    for event in (Request(2, "m", {}), Cancel(1)):
        with pytest.raises(LocalProtocolError, match="a server may not send"):
            server.send(event)
    server.receive_data(encode_event(Push("t", {})))
    assert "a client may not send PUSH" in remote_error(server)


def test_local_error_leaves_the_machine_unchanged():
    client, server = pair(client={"max_in_flight": 1})
    deliver(client, server, Request(1, "m", {}, more=True))
    before = (client.in_flight, client.goodbye_sent)
    for bad in (Request(2, "m", {}), Chunk(9, b"x"), Request(1, "m", {}), Cancel(3), Request(5, "m", {"b": b"x"})):
        with pytest.raises(LocalProtocolError):
            client.send(bad)
    assert (client.in_flight, client.goodbye_sent) == before
    deliver(client, server, Chunk(1, b"", final=True))


# ---------------------------------------------------------------------------
# cancel, push, goodbye


def test_cancel_while_waiting_still_needs_the_answer():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    assert deliver(client, server, Cancel(1)) == [Cancel(1)]
    assert client.in_flight == server.in_flight == {1: "waiting"}
    with pytest.raises(LocalProtocolError, match="cancelled twice"):
        client.send(Cancel(1))
    server.receive_data(encode_event(Cancel(1)))
    assert "cancelled twice" in remote_error(server)


def test_cancel_during_streaming_response():
    client, server = pair()
    deliver(client, server, Request(1, "message.fetch", {}))
    deliver(server, client, Response(1, {}, more=True))
    deliver(client, server, Cancel(1))
    deliver(server, client, Chunk(1, b"", final=True))
    assert client.in_flight == server.in_flight == {}


def test_cancel_that_crossed_the_response_is_dropped():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    response = server.send(Response(1, {}))
    cancel = client.send(Cancel(1))  # the two cross on the wire
    server.receive_data(cancel)
    assert drain(server) == []
    client.receive_data(response)
    assert drain(client) == [Response(1, {})]
    assert client.in_flight == server.in_flight == {}


def test_cancel_of_unknown_id_is_a_local_error():
    client, _ = pair()
    with pytest.raises(LocalProtocolError, match="CANCEL \\(c\\) for unknown request id 1"):
        client.send(Cancel(1))


def test_push_reaches_the_client():
    client, server = pair()
    push = Push("mailbox.expunge", {"user": "a@x", "mailbox": "INBOX", "uids": [4, 5]})
    assert deliver(server, client, push) == [push]


def test_goodbye_from_the_server():
    client, server = pair()
    deliver(client, server, Request(1, "m", {}))
    assert deliver(server, client, Goodbye("draining for shutdown")) == [Goodbye("draining for shutdown")]
    assert client.goodbye_received and server.goodbye_sent
    with pytest.raises(LocalProtocolError, match="server said GOODBYE"):
        client.send(Request(2, "m", {}))
    with pytest.raises(LocalProtocolError, match="PUSH after the server's GOODBYE"):
        server.send(Push("t", {}))
    deliver(server, client, Response(1, {}))  # in-flight work still completes
    client.receive_data(encode_event(Push("t", {})))
    assert "PUSH after the server's GOODBYE" in remote_error(client)


def test_request_crossing_the_servers_goodbye_is_answered():
    client, server = pair()
    request = client.send(Request(1, "m", {}))
    client.receive_data(server.send(Goodbye("bye")))
    server.receive_data(request)
    assert drain(server) == [Request(1, "m", {})]
    assert deliver(server, client, ErrorResponse(1, ErrorKind.UNAVAILABLE, "service temporarily unavailable"))


def test_goodbye_from_the_client():
    client, server = pair()
    deliver(client, server, Goodbye("logout"))
    with pytest.raises(LocalProtocolError, match="after the client's GOODBYE"):
        client.send(Request(1, "m", {}))
    server.receive_data(encode_event(Request(1, "m", {})))
    assert "REQUEST after the client's GOODBYE" in remote_error(server)


def test_second_goodbye_from_the_peer():
    client, server = pair()
    deliver(client, server, Goodbye("a"))
    server.receive_data(encode_event(Goodbye("b")))
    assert "second GOODBYE from the client" in remote_error(server)


# ---------------------------------------------------------------------------
# end of stream


def test_clean_eof_gives_connection_closed_every_time():
    client, server = pair()
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError, match="after the end of the stream"):
        server.receive_data(b"x")


def test_eof_before_hello_is_a_plain_close():
    server = RpcConnection("server")
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()


@pytest.mark.parametrize("cut", [1, 2, 20, 21, 30])
def test_eof_mid_frame(cut):
    client, server = pair()
    frame = client.send(Request(1, "message.fetch", {"uid": 1}))
    server.receive_data(frame[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    assert remote_error(server) == "connection closed mid-frame"


def test_sending_connection_closed():
    client, _ = pair()
    assert client.send(ConnectionClosed()) == b""
    with pytest.raises(LocalProtocolError, match="already closed"):
        client.send(Request(1, "m", {}))


# ---------------------------------------------------------------------------
# what send() refuses to put into JSON


@pytest.mark.parametrize(
    "event, text",
    [
        (Request(1, "message.append", {"body": b"raw"}), "Chunk frames"),
        (Request(1, "m", {"x": float("nan")}), "not JSON-serialisable"),
        (Request(1, "m", {"x": {1, 2}}), "not JSON-serialisable"),
        (Request(1, "m", ["not", "a", "dict"]), "must be a dict"),
        (Request(1, "m", {"s": "\ud800"}), "not JSON-serialisable"),
        (Request(0, "m", {}), "request id must be"),
        (Request(2**32, "m", {}), "request id must be"),
        (Request(True, "m", {}), "request id must be"),
        (Chunk(1, "text, not bytes"), "must be bytes"),
        ("not an event", "not an RPC event"),
    ],
)
def test_send_refuses_what_cannot_travel(event, text):
    client, _ = pair()
    with pytest.raises(LocalProtocolError, match=text):
        client.send(event)


# ---------------------------------------------------------------------------
# fuzz: parse it or raise RemoteProtocolError, never anything else


def _drain_all(conn) -> None:
    try:
        drain(conn)
        conn.receive_data(b"")
        drain(conn)
    except RemoteProtocolError:
        pass


@FAST
@given(st.binary(max_size=400), st.sampled_from(["client", "server"]))
def test_fuzz_arbitrary_bytes_after_hello(data, role):
    conn = client_after_hello() if role == "client" else server_after_hello()
    conn.receive_data(data)
    _drain_all(conn)


valid_crc_frames = st.builds(
    lambda t, flags, rid, payload, version: raw_frame(t, payload, flags=flags, rid=rid, version=version),
    st.integers(0, 10),
    st.sampled_from([0, 1, 2, 3, 0x80]),
    st.sampled_from([0, 1, 2, 3, 2**32 - 1]),
    st.binary(max_size=60) | json_objects.map(lambda o: rpc._dump_json(o, "fuzz")) | st.sampled_from(
        [b'{"method":"m","args":{}}', b'{"result":{}}', b'{"kind":"temp","text":"t"}', b'{"topic":"t","data":{}}',
         b'{"reason":"r"}', b"", b"null", b'{"versions":[1,1],"role":"client","instance":"","max_frame":4096}']
    ),
    st.sampled_from([1, 1, 1, 2]),
)


@FAST
@given(st.lists(valid_crc_frames, max_size=12), st.sampled_from(["client", "server"]))
def test_fuzz_frames_with_valid_crcs(frames, role):
    """Past the CRCs: random types, flags, ids and payloads reach the session rules."""
    conn = client_after_hello() if role == "client" else server_after_hello()
    conn.receive_data(b"".join(frames))
    _drain_all(conn)


@FAST
@given(st.data())
def test_fuzz_spliced_seed_frames(data):
    """Real frames out of order, repeated or dropped: the session rules hold."""
    path = data.draw(st.sampled_from(TRANSCRIPT_PATHS))
    role = data.draw(st.sampled_from(["client", "server"]))
    make, received, _ = side(load_transcript(path), role)
    picked = data.draw(st.lists(st.sampled_from(received[1:]), max_size=15))
    conn = make(lenient=True)
    conn.receive_data(received[0] + b"".join(picked))
    _drain_all(conn)


# ---------------------------------------------------------------------------
# two machines, random legal traffic, random delivery: local rules suffice


_WEIGHTED_OPS = (
    ["request"] * 3 + ["request+more"] * 2 + ["reuse", "cancel", "error", "push"]
    + ["c-chunk", "c-final", "response", "response+more", "s-chunk", "s-final"] * 2
    + ["to-server", "to-client"] * 5
    + ["c-goodbye", "s-goodbye"]  # rare: they end new work
)
operations = st.lists(
    st.tuples(st.sampled_from(_WEIGHTED_OPS), st.integers(0, 50)),
    min_size=20,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(1, 4))
def test_random_traffic_never_trips_the_peer(ops, cap):
    """If send() accepted an event, the peer accepts it too, whatever crossed on the wire."""
    client, server = pair(client={"max_in_flight": cap}, server={"max_in_flight": cap})
    wires = {"to-server": bytearray(), "to-client": bytearray()}

    def pick(conn, n):
        ids = sorted(conn.in_flight)
        return ids[n % len(ids)] if ids else 1 + n % 4

    for op, n in ops:
        if op in wires:
            receiver = server if op == "to-server" else client
            cut = len(wires[op]) if n % 2 == 0 else n * len(wires[op]) // 50  # all, or a prefix
            feed(receiver, wires[op][:cut])
            del wires[op][:cut]
            drain(receiver)  # a RemoteProtocolError here fails the test
            continue
        event = {
            "request": lambda: Request(client.new_request_id(), "m", {"n": n}),
            "request+more": lambda: Request(client.new_request_id(), "m", {}, more=True),
            "reuse": lambda: Request(1 + n % 4, "m", {}),
            "c-chunk": lambda: Chunk(pick(client, n), b"c" * n),
            "c-final": lambda: Chunk(pick(client, n), b"", final=True),
            "cancel": lambda: Cancel(pick(client, n)),
            "c-goodbye": lambda: Goodbye("client"),
            "response": lambda: Response(pick(server, n), {}),
            "response+more": lambda: Response(pick(server, n), {}, more=True),
            "error": lambda: ErrorResponse(pick(server, n), ErrorKind.TEMP, "t"),
            "s-chunk": lambda: Chunk(pick(server, n), b"s" * n),
            "s-final": lambda: Chunk(pick(server, n), b"", final=True),
            "push": lambda: Push("t", {"n": n}),
            "s-goodbye": lambda: Goodbye("server"),
        }[op]()
        sender, wire = (client, "to-server") if op in (
            "request", "request+more", "reuse", "c-chunk", "c-final", "cancel", "c-goodbye"
        ) else (server, "to-client")
        try:
            wires[wire] += sender.send(event)
        except LocalProtocolError:
            pass
        assert len(server.in_flight) <= cap and len(client.in_flight) <= cap
    for name, receiver in (("to-server", server), ("to-client", client)):
        feed(receiver, wires[name])
        drain(receiver)
