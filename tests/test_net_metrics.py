"""intermail.net.metrics: the request-head machine, then the endpoint over real sockets.

Machine tests are pure (table, split-feed, hypothesis).  Endpoint tests start
a real :class:`Runner` on 127.0.0.1 port 0, on asyncio and uvloop, and talk
to it with ``urllib.request`` (in a thread) or with raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.error
import urllib.request

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intermail.errors import LocalProtocolError, RemoteProtocolError
from intermail.net.metrics import (
    MAX_HEAD,
    HttpExchange,
    HttpHeadError,
    MetricsServer,
    RequestHead,
    Response,
    parse_request_head,
    serialize_response,
)
from intermail.net.runner import Runner
from intermail.proto import NEED_DATA
from intermail.testing.feed import assert_split_invariant
from intermail.testing.loops import run_on

TIMEOUT = 5.0  # seconds any single client step may take before the test fails


def events(caplog) -> list[str]:
    return [r.im_event for r in caplog.records if hasattr(r, "im_event")]


# -- the request-head machine ------------------------------------------------------------


def test_parses_request_line_and_fields():
    head = parse_request_head(
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nAccept:  text/plain ; q=1 \t\r\n"
        b"X-Empty:\r\nX-Latin: caf\xe9\r\n\r\nbody bytes are never parsed"
    )
    assert head == RequestHead(
        "GET", "/metrics?x=1", "1.1",
        (("host", "127.0.0.1:9100"), ("accept", "text/plain ; q=1"), ("x-empty", ""), ("x-latin", "café")),
    )
    assert head.get("HOST") == "127.0.0.1:9100" and head.get("missing") is None
    assert not head.has_body


def test_need_more_data_until_the_blank_line():
    assert parse_request_head(b"") is None
    assert parse_request_head(b"GET /metrics HTTP/1.0\r\n") is None
    assert parse_request_head(b"GET /metrics HTTP/1.0\r\n\r") is None
    assert parse_request_head(b"GET /metrics HTTP/1.0\r\n\r\n").version == "1.0"


def test_leading_empty_lines_and_bare_lf_are_accepted():
    # RFC 9112 §2.2: empty lines before the request line are ignored; LF alone may end a line.
    head = parse_request_head(b"\r\n\nHEAD /health HTTP/1.0\nX: y\n\n")
    assert head == RequestHead("HEAD", "/health", "1.0", (("x", "y"),))


@pytest.mark.parametrize(
    "data, status",
    [
        (b"\x16\x03\x01\x02\x00", 400),  # a TLS ClientHello: refused at its first byte
        (b"GET\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\n", 400),
        (b"GET / HTTP/1.1 \r\n", 400),
        (b"GET / http/1.1\r\n", 400),
        (b"GET /\x7f HTTP/1.0\r\n", 400),
        (b"GET / HTTP/1.0\rX\r\n", 400),
        (b"G(T / HTTP/1.0\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\n\r\n", 505),
        (b"GET / HTTP/1.0\r\nHost : x\r\n\r\n", 400),  # RFC 9112 §5.1: no space before the colon
        (b"GET / HTTP/1.0\r\nX: a\r\n folded\r\n\r\n", 400),  # obs-fold, RFC 9112 §5.2
        (b"GET / HTTP/1.0\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\n: empty name\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # RFC 9112 §3.2: HTTP/1.1 needs a Host field...
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),  # ...exactly one
        (b"GET / HTTP/1.0\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nContent-Length: 1, 2\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    ],
)
def test_malformed_heads_are_refused_with_a_status(data, status):
    with pytest.raises(HttpHeadError) as caught:
        parse_request_head(data)
    assert isinstance(caught.value, RemoteProtocolError)
    assert caught.value.status == status


def test_content_length_and_transfer_encoding_announce_a_body():
    assert parse_request_head(b"GET / HTTP/1.0\r\nContent-Length: 0\r\n\r\n").has_body is False
    assert parse_request_head(b"GET / HTTP/1.0\r\nContent-Length: 5, 5\r\n\r\n").content_length == 5
    assert parse_request_head(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").has_body


def _head_of_size(size: int) -> bytes:
    base = b"GET /metrics HTTP/1.0\r\nX: \r\n\r\n"
    return base.replace(b"X: ", b"X: " + b"a" * (size - len(base)))


@pytest.mark.parametrize("max_head", [64, MAX_HEAD])
def test_head_size_limit_edge(max_head):
    exact = _head_of_size(max_head)
    assert len(exact) == max_head
    assert parse_request_head(exact + b"trailing", max_head=max_head) is not None
    over = _head_of_size(max_head + 1)
    with pytest.raises(HttpHeadError) as caught:
        parse_request_head(over, max_head=max_head)
    assert caught.value.status == 431
    # Undecided up to the limit, refused at the first byte past it.
    assert parse_request_head(over[:max_head], max_head=max_head) is None
    with pytest.raises(HttpHeadError):
        parse_request_head(over[: max_head + 1], max_head=max_head)


def test_a_bad_line_within_the_limit_wins_over_the_size():
    data = b"GET / HTTP/1.0\r\nbad line\r\n" + b"x" * 100
    with pytest.raises(HttpHeadError) as caught:
        parse_request_head(data, max_head=40)
    assert caught.value.status == 400


def test_machine_emits_the_head_once_and_counts_trailing_bytes():
    exchange = HttpExchange()
    exchange.receive_data(b"GET /health HTTP/1.0\r\n\r\nxyz")
    head = exchange.next_event()
    assert isinstance(head, RequestHead)
    assert exchange.next_event() is NEED_DATA
    exchange.receive_data(b"more")
    assert exchange.next_event() is NEED_DATA
    assert exchange.trailing == 7


def test_machine_eof_before_the_head_ends_is_a_remote_error():
    exchange = HttpExchange()
    exchange.receive_data(b"GET /health HTTP/1.0\r\n")
    assert exchange.next_event() is NEED_DATA
    exchange.receive_data(b"")
    with pytest.raises(HttpHeadError):
        exchange.next_event()
    with pytest.raises(HttpHeadError):  # the error sticks
        exchange.next_event()
    with pytest.raises(LocalProtocolError):
        exchange.receive_data(b"late")


def test_send_head_response_keeps_length_but_drops_body():
    exchange = HttpExchange()
    exchange.receive_data(b"HEAD /health HTTP/1.0\r\n\r\n")
    exchange.next_event()
    wire = exchange.send(Response(200, (("Content-Type", "application/json"),), b'{"status":"ok"}'))
    assert wire == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 15\r\nConnection: close\r\n\r\n")
    with pytest.raises(LocalProtocolError):
        exchange.send(Response(200))


@pytest.mark.parametrize(
    "response",
    [
        Response(200, (("X-Bad", "a\r\nSet-Cookie: x"),)),
        Response(200, (("Bad Name", "x"),)),
        Response(200, (("Content-Length", "3"),)),
        Response(799),
    ],
)
def test_serialize_refuses_what_would_break_framing(response):
    with pytest.raises(LocalProtocolError):
        serialize_response(response)


# -- split invariance and fuzzing --------------------------------------------------------

SEEDS = [
    b"GET /metrics HTTP/1.1\r\nHost: localhost:9100\r\nUser-Agent: Prometheus/2.53\r\n"
    b"Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    b"\r\nHEAD /health HTTP/1.0\nX:  spaced \t\n\nbody",
    b"GET / HTTP/1.0\r\nA: b\r\n folded\r\n\r\n",
    b"GET / HTTP/3.0\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    b"GET / HTTP/1.0\r\nX: " + b"a" * 80 + b"\r\n\r\n",
]


@pytest.mark.parametrize("data", SEEDS)
def test_split_invariant_on_seed_heads(data):
    assert_split_invariant(lambda: HttpExchange(max_head=64), data)
    assert_split_invariant(HttpExchange, data)


_token = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=12)
_vchar = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_field_value = st.text(alphabet=st.one_of(_vchar, st.characters(min_codepoint=0x80, max_codepoint=0xFF)),
                       max_size=20)


@st.composite
def request_heads(draw) -> RequestHead:
    version = draw(st.sampled_from(["1.0", "1.1"]))
    fields = draw(st.lists(st.tuples(_token.map(str.lower), _field_value), max_size=6))
    fields = [(name, value) for name, value in fields if name not in ("host", "content-length")]
    if version == "1.1":
        fields.insert(draw(st.integers(0, len(fields))), ("host", draw(_field_value)))
    target = "/" + draw(st.text(alphabet=_vchar, max_size=30))
    return RequestHead(draw(_token), target, version, tuple(fields))


def serialize_head(head: RequestHead, newline: bytes = b"\r\n") -> bytes:
    lines = [f"{head.method} {head.target} HTTP/{head.version}".encode("ascii")]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in head.headers]
    return newline.join(lines + [b"", b""])


@settings(max_examples=150, deadline=None)
@given(request_heads(), st.sampled_from([b"\r\n", b"\n"]), st.binary(max_size=8))
def test_round_trip_and_split_invariance_of_valid_heads(head, newline, tail):
    data = serialize_head(head, newline) + tail
    assert parse_request_head(data) == head
    assert assert_split_invariant(HttpExchange, data, every_split=len(data) < 200) == [head]


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda head, cut, noise: serialize_head(head)[:cut] + noise,
              request_heads(), st.integers(0, 300), st.binary(max_size=20)),
).filter(bool))  # the feed helper hands b"" over as end of input, which is a different test
def test_arbitrary_bytes_give_a_head_none_or_the_remote_error(data):
    def make() -> HttpExchange:
        return HttpExchange(max_head=128)

    events = assert_split_invariant(make, data, every_split=len(data) < 120)
    try:
        result = parse_request_head(data, max_head=128)
    except RemoteProtocolError as exc:
        assert isinstance(exc, HttpHeadError) and exc.status in (400, 431, 505)
        assert events == [("error", exc.text)]
    else:
        assert events == ([] if result is None else [result])
        assert result is None or isinstance(result, RequestHead)


# -- the endpoint over real sockets ------------------------------------------------------


class HealthSource:
    """A health callback whose answer the test changes: a dict, a failure, or a hang."""

    def __init__(self):
        self.document: dict = {"status": "ok", "queue": 3}
        self.fail = False
        self.hang = False
        self.calls = 0

    async def __call__(self) -> dict:
        self.calls += 1
        if self.fail:
            raise RuntimeError("store unreachable: secret detail")
        if self.hang:
            await asyncio.sleep(3600)
        return self.document


class MetricsApp:
    def __init__(self, server: MetricsServer):
        self.server = server
        self.address: tuple[str, int] | None = None

    async def start(self, runner: Runner) -> None:
        self.address = await self.server.listen(runner, "127.0.0.1", 0)

    async def stop(self) -> None:
        pass


def make_registry() -> tuple[prometheus_client.CollectorRegistry, prometheus_client.Counter]:
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("intermail_test_deliveries", "test deliveries", ["result"],
                                        registry=registry)
    return registry, counter


@contextlib.asynccontextmanager
async def running(server: MetricsServer):
    """A Runner serving ``server`` on 127.0.0.1 port 0; yields the bound address."""
    app = MetricsApp(server)
    runner = Runner(app, instance="test1", install_signals=False, drain_timeout=1)
    serving = asyncio.ensure_future(runner.serve())
    try:
        for _ in range(500):
            if app.address is not None:
                break
            await asyncio.sleep(0.01)
        assert app.address is not None and app.address == runner.addresses["metrics"]
        yield app.address
    finally:
        runner.request_stop()
        assert await asyncio.wait_for(serving, TIMEOUT) == 0


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def fetch(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}{path}", method=method)
    try:
        with _OPENER.open(request, timeout=TIMEOUT) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


async def exchange_raw(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read everything until the server closes."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_metrics_serves_the_service_registry(loop_name):
    registry, counter = make_registry()
    counter.labels(result="ok").inc(7)

    async def scenario():
        async with running(MetricsServer(registry, HealthSource(), instance="mta1")) as address:
            status, headers, body = await asyncio.to_thread(fetch, address, "/metrics")
            assert status == 200
            assert headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
            assert int(headers["Content-Length"]) == len(body)
            assert headers["Connection"] == "close"
            assert 'intermail_test_deliveries_total{result="ok"} 7.0' in body.decode()
            # Only our registry: nothing from the process-wide default one.
            assert "python_gc_objects_collected_total" not in body.decode()

            status, headers, body = await asyncio.to_thread(fetch, address, "/metrics?name[]=x", "HEAD")
            assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0

    run_on(loop_name, scenario())


def test_health_ok_and_unhealthy(loop_name):
    health = HealthSource()

    async def scenario():
        async with running(MetricsServer(prometheus_client.CollectorRegistry(), health, instance="mss1")) as addr:
            status, headers, body = await asyncio.to_thread(fetch, addr, "/health")
            assert status == 200 and headers["Content-Type"] == "application/json"
            assert json.loads(body) == {"status": "ok", "queue": 3, "instance": "mss1"}

            health.document = {"status": "degraded", "mirrors": 1}
            status, _, body = await asyncio.to_thread(fetch, addr, "/health")
            assert status == 503 and json.loads(body)["mirrors"] == 1

            status, headers, body = await asyncio.to_thread(fetch, addr, "/health", "HEAD")
            assert status == 503 and body == b"" and int(headers["Content-Length"]) > 0

    run_on(loop_name, scenario())


def test_sync_health_callback(loop_name):
    server = MetricsServer(prometheus_client.CollectorRegistry(), lambda: {"status": "ok"}, instance="dns1")

    async def scenario():
        async with running(server) as address:
            status, _, body = await asyncio.to_thread(fetch, address, "/health")
            assert status == 200 and json.loads(body) == {"status": "ok", "instance": "dns1"}

    run_on(loop_name, scenario())


@pytest.mark.parametrize("failure", ["raises", "hangs", "not_a_dict", "not_json", "int_keys"])
def test_health_failure_is_503_error_and_logged(loop_name, failure, caplog):
    caplog.set_level(logging.INFO)
    health = HealthSource()
    health.fail = failure == "raises"
    health.hang = failure == "hangs"
    if failure == "not_a_dict":
        health.document = ["ok"]
    if failure == "not_json":
        health.document = {"status": "ok", "when": object()}
    if failure == "int_keys":
        health.document = {1: "ok"}  # encodable alone, not once "instance" joins it
    server = MetricsServer(prometheus_client.CollectorRegistry(), health, instance="acc1", health_timeout=0.2)

    async def scenario():
        async with running(server) as address:
            status, _, body = await asyncio.to_thread(fetch, address, "/health")
            assert status == 503
            assert json.loads(body) == {"status": "error", "instance": "acc1"}
            assert b"secret" not in body

    run_on(loop_name, scenario())
    failed = [r for r in caplog.records if getattr(r, "im_event", None) == "metrics.health_failed"]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None


def test_collector_failure_is_500_and_logged(loop_name, caplog):
    class Broken(prometheus_client.registry.Collector):
        def collect(self):
            raise RuntimeError("collector bug")

    registry = prometheus_client.CollectorRegistry()
    registry.register(Broken())

    async def scenario():
        async with running(MetricsServer(registry, HealthSource(), instance="x")) as address:
            status, _, body = await asyncio.to_thread(fetch, address, "/metrics")
            assert status == 500 and b"collector bug" not in body

    run_on(loop_name, scenario())
    assert "metrics.collect_failed" in events(caplog)


def test_unknown_path_404_and_other_methods_405(loop_name):
    async def scenario():
        async with running(MetricsServer(prometheus_client.CollectorRegistry(), HealthSource(),
                                         instance="x")) as address:
            status, _, _ = await asyncio.to_thread(fetch, address, "/nope")
            assert status == 404
            status, headers, _ = await asyncio.to_thread(fetch, address, "/metrics", "DELETE")
            assert status == 405 and headers["Allow"] == "GET, HEAD"
            # Absolute-form targets are routed by their path (RFC 9112 §3.2.2).
            reply = await exchange_raw(address, b"GET http://h/health HTTP/1.0\r\n\r\n")
            assert status_of(reply) == 200

    run_on(loop_name, scenario())


def test_a_request_with_a_body_is_refused(loop_name):
    async def scenario():
        async with running(MetricsServer(prometheus_client.CollectorRegistry(), HealthSource(),
                                         instance="x")) as address:
            reply = await exchange_raw(address, b"GET /metrics HTTP/1.0\r\nContent-Length: 4\r\n\r\nabcd")
            assert status_of(reply) == 413

    run_on(loop_name, scenario())


def test_garbage_is_400_and_the_server_keeps_serving(loop_name, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with running(MetricsServer(prometheus_client.CollectorRegistry(), HealthSource(),
                                         instance="x")) as address:
            for garbage in (b"\x16\x03\x01\x00\xa5\x01\x00", b"hello there\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"):
                reply = await exchange_raw(address, garbage)
                assert status_of(reply) == 400
                assert b"Content-Length: " in reply and b"Connection: close" in reply
            reply = await exchange_raw(address, b"GET / HTTP/2.0\r\n\r\n")
            assert status_of(reply) == 505
            status, _, _ = await asyncio.to_thread(fetch, address, "/health")
            assert status == 200

    run_on(loop_name, scenario())
    assert events(caplog).count("metrics.bad_request") == 4


@pytest.mark.parametrize("extra", [1, 100_000])
def test_oversized_head_is_431(loop_name, extra):
    server = MetricsServer(prometheus_client.CollectorRegistry(), HealthSource(), instance="x", max_head=1024)

    async def scenario():
        async with running(server) as address:
            reply = await exchange_raw(address, _head_of_size(1024 + extra))
            assert status_of(reply) == 431
            reply = await exchange_raw(address, _head_of_size(1024).replace(b"/metrics", b"/health"))
            assert status_of(reply) == 200

    run_on(loop_name, scenario())


@pytest.mark.parametrize("sent", [b"", b"GET /metrics HTTP/1.0\r\n"])
def test_silent_client_is_closed_after_read_timeout(loop_name, sent, caplog):
    caplog.set_level(logging.DEBUG)
    server = MetricsServer(prometheus_client.CollectorRegistry(), HealthSource(), instance="x", read_timeout=0.3)

    async def scenario():
        async with running(server) as address:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await exchange_raw(address, sent) == b""  # closed without a reply
            assert 0.25 <= loop.time() - started < TIMEOUT

    run_on(loop_name, scenario())
    assert "metrics.read_timeout" in events(caplog)


def test_peer_closing_early_gets_no_reply_or_a_400(loop_name):
    async def scenario():
        async with running(MetricsServer(prometheus_client.CollectorRegistry(), HealthSource(),
                                         instance="x")) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /metrics HTTP/1.0\r\n")
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
            assert status_of(reply) == 400

            reader, writer = await asyncio.open_connection(*address)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()

    run_on(loop_name, scenario())
