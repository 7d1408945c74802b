"""intermail.rpc: the asyncio RPC client and server over real loopback sockets.

Every scenario runs on a fresh loop of each kind we support (asyncio, and
uvloop when installed), with a hard deadline so a bug hangs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time

import pytest

from intermail.errors import ErrorKind, MailError
from intermail.net.runner import Runner
from intermail.proto.rpc import MAGIC
from intermail.rpc import RpcClient, RpcServer, Streamed
from intermail.rpc.server import INTERNAL_ERROR_TEXT
from intermail.testing.loops import run_bounded

HOST = "127.0.0.1"
DEADLINE = 15.0  # no scenario should come near this
FIVE_MIB = 5 * 1024 * 1024


def run(loop_name, scenario):
    return run_bounded(loop_name, scenario, DEADLINE)


class Served:
    """An RpcServer on asyncio.start_server, which a test can kill like a crash."""

    def __init__(self, server: RpcServer):
        self.server = server
        self.writers: set[asyncio.StreamWriter] = set()
        self.listener: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] = (HOST, 0)

    async def start(self, port: int = 0) -> Served:
        async def handle(reader, writer):
            self.writers.add(writer)
            try:
                await self.server.handle_connection(reader, writer)
            finally:
                self.writers.discard(writer)

        self.listener = await asyncio.start_server(handle, HOST, port)
        self.address = (HOST, self.listener.sockets[0].getsockname()[1])
        return self

    async def kill(self) -> None:
        """Like SIGKILL: stop listening and reset every connection, no GOODBYE."""
        self.listener.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await asyncio.sleep(0.05)  # let the aborted connections' tasks unwind


@contextlib.asynccontextmanager
async def serving(handlers, *, port=0, instance="mss-test", **kwargs):
    served = await Served(RpcServer(handlers, instance=instance, **kwargs)).start(port)
    try:
        yield served
    finally:
        await served.server.stop(timeout=1.0)
        served.listener.close()


def client_for(*addresses, **kwargs) -> RpcClient:
    kwargs.setdefault("connect_timeout", 2.0)
    kwargs.setdefault("request_timeout", 5.0)
    kwargs.setdefault("reconnect_window", 3.0)
    return RpcClient(list(addresses), instance="imap-test", **kwargs)


def refused_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


async def slices(data: bytes, sizes=(1, 1000, 70_000, 333_333)):
    """``data`` in pieces of awkward sizes, as an async iterable."""
    offset, i = 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        yield data[offset:offset + size]
        offset += size
        i += 1
        if i % 7 == 0:
            await asyncio.sleep(0)


# -- calls -------------------------------------------------------------------------------


def test_ping_and_many_concurrent_calls_complete_out_of_order(loop_name):
    calls = 40
    gates: dict[int, asyncio.Event] = {}
    active = []

    async def echo(ctx, args):
        active.append(args["n"])
        await gates[args["n"]].wait()
        return {"n": args["n"], "session": ctx.session_id, "client": ctx.client_instance}

    async def scenario():
        gates.update({n: asyncio.Event() for n in range(calls)})
        async with serving({"echo": echo}) as served:
            async with client_for(served.address) as client:
                pong = await client.call("ping", idempotent=True)
                assert pong["instance"] == "mss-test" and abs(pong["time"] - time.time()) < 5
                finished = []

                async def one(n):
                    result = await client.call("echo", {"n": n})
                    finished.append(n)
                    return result

                tasks = [asyncio.create_task(one(n)) for n in range(calls)]
                while len(active) < calls:  # every request in flight on the one connection
                    await asyncio.sleep(0.005)
                order = list(reversed(range(calls)))
                for n in order:  # answer them last first
                    gates[n].set()
                    await tasks[n]
                results = [task.result() for task in tasks]
                assert finished == order
                assert [r["n"] for r in results] == list(range(calls))
                assert len({r["session"] for r in results}) == 1
                assert results[0]["client"] == "imap-test"

    run(loop_name, scenario)


def test_five_mib_request_and_response_bodies_arrive_byte_identical(loop_name):
    data = os.urandom(FIVE_MIB)

    async def upload(ctx, args):
        digest, size = hashlib.sha256(), 0
        async for piece in ctx.body():
            digest.update(piece)
            size += len(piece)
        return {"sha256": digest.hexdigest(), "size": size}

    async def download(ctx, args):
        return Streamed({"size": len(data)}, slices(data))

    async def echo_body(ctx, args):
        return Streamed({}, await ctx.read_body())

    async def scenario():
        # A small server buffer forces the reader to wait on the handler (backpressure).
        async with serving({"upload": upload, "download": download, "echo_body": echo_body},
                           body_buffer=64 * 1024) as served:
            async with client_for(served.address) as client:
                expect = {"sha256": hashlib.sha256(data).hexdigest(), "size": FIVE_MIB}
                uploads = await asyncio.gather(
                    client.call("upload", body=slices(data)),  # async iterable
                    client.call("upload", body=data),  # bytes
                )
                assert uploads == [expect, expect]
                result, body = await client.call_stream("download")
                assert result == {"size": FIVE_MIB}
                assert await body.read() == data
                result, body = await client.call_stream("echo_body", body=data[:100_000])
                assert await body.read() == data[:100_000]
                assert await client.call("upload", body=b"") == {"sha256": hashlib.sha256().hexdigest(), "size": 0}
                result, body = await client.call_stream("ping")  # no body: empty stream
                assert await body.read() == b""

    run(loop_name, scenario)


@pytest.mark.parametrize("kind", [ErrorKind.NOTFOUND, ErrorKind.NOQUOTA, ErrorKind.FENCED, ErrorKind.LIMIT])
def test_mail_errors_reach_the_client_as_kind_and_safe_text_only(kind):
    async def fail(ctx, args):
        raise MailError(kind, f"safe {kind.value}", detail="/var/intermail/mss1/index.db is locked")

    async def scenario():
        async with serving({"fail": fail}) as served:
            async with client_for(served.address) as client:
                with pytest.raises(MailError) as caught:
                    await client.call("fail")
                assert caught.value.kind is kind
                assert caught.value.safe == f"safe {kind.value}"
                assert "/var/intermail" not in str(caught.value)
                assert (await client.call("ping"))["instance"] == "mss-test"  # connection fine

    run("asyncio", scenario)


def test_unknown_method_is_invalid(loop_name):
    async def scenario():
        async with serving({}) as served:
            async with client_for(served.address) as client:
                with pytest.raises(MailError) as caught:
                    await client.call("message.frobnicate", {"x": 1})
                assert caught.value.kind is ErrorKind.INVALID
                assert caught.value.safe == "unknown method"
                with pytest.raises(MailError) as caught:
                    await client.call("subscribe", {"topics": "not a list"})
                assert caught.value.kind is ErrorKind.INVALID

    run(loop_name, scenario)


def test_handler_exception_is_temp_and_the_detail_only_logged(loop_name, caplog):
    caplog.set_level(logging.DEBUG, logger="intermail.rpc")

    async def buggy(ctx, args):
        raise RuntimeError("sqlite password=hunter2 at /srv/mss1")

    async def bad_result(ctx, args):
        return ["not", "a", "dict"]

    async def scenario():
        async with serving({"buggy": buggy, "bad_result": bad_result}) as served:
            async with client_for(served.address) as client:
                for method in ("buggy", "bad_result"):
                    with pytest.raises(MailError) as caught:
                        await client.call(method)
                    assert caught.value.kind is ErrorKind.TEMP
                    assert caught.value.safe == INTERNAL_ERROR_TEXT
                    assert "hunter2" not in str(caught.value) and "Traceback" not in str(caught.value)
                assert await client.call("ping")

    run(loop_name, scenario)
    failures = [r for r in caplog.records if getattr(r, "im_event", "") == "rpc.handler_failed"]
    assert len(failures) == 2
    assert "hunter2" in str(failures[0].exc_info[1])
    assert failures[0].im_context.get("method") == "buggy"


# -- push ---------------------------------------------------------------------------------


def test_push_reaches_every_subscriber_of_the_topic_only(loop_name):
    async def notify_me(ctx, args):
        assert ctx.connection.push("direct", {"to": ctx.client_instance})
        return {}

    async def scenario():
        async with serving({"notify_me": notify_me}) as served:
            got = {"a": [], "b": [], "c": []}
            clients = {name: client_for(served.address) for name in got}
            try:
                for name, client in clients.items():
                    topic = "mbox:u@x/INBOX" if name != "c" else "mbox:v@x/INBOX"
                    await client.subscribe([topic, "direct"],
                                           lambda t, d, name=name: got[name].append((t, d)))
                assert served.server.push("mbox:u@x/INBOX", {"uid": 7, "event": "exists"}) == 2
                assert served.server.push("nobody:listens", {}) == 0
                await clients["a"].call("notify_me")  # the push is written before the answer
                await clients["b"].call("ping")
                await clients["c"].call("ping")
                assert got["a"] == [("mbox:u@x/INBOX", {"uid": 7, "event": "exists"}),
                                    ("direct", {"to": "imap-test"})]
                assert got["b"] == [("mbox:u@x/INBOX", {"uid": 7, "event": "exists"})]
                assert got["c"] == []
            finally:
                for client in clients.values():
                    await client.close()

    run(loop_name, scenario)


# -- cancel -------------------------------------------------------------------------------


def test_cancel_and_timeout_cancel_the_handler_and_free_the_id(loop_name):
    started = asyncio.Event
    state = {}
    closed_generators = []

    async def stuck(ctx, args):
        state["started"].set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            state["cancelled"].append(args["n"])
            raise

    async def endless(ctx, args):
        async def forever():
            try:
                while True:
                    yield b"x" * 100_000
                    await asyncio.sleep(0)
            finally:
                closed_generators.append(True)

        return Streamed({}, forever())

    async def scenario():
        state.update(started=started(), cancelled=[])
        async with serving({"stuck": stuck, "endless": endless}) as served:
            async with client_for(served.address) as client:
                task = asyncio.create_task(client.call("stuck", {"n": 1}))
                await state["started"].wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                with pytest.raises(MailError) as caught:
                    await client.call("stuck", {"n": 2}, timeout=0.2)
                assert caught.value.kind is ErrorKind.TEMP
                result, body = await client.call_stream("endless")
                assert await body.__anext__() == b"x" * 65536  # one CHUNK piece
                await body.aclose()  # CANCEL mid-stream
                assert (await client.call("ping"))["instance"] == "mss-test"
                for _ in range(100):
                    if state["cancelled"] == [1, 2] and closed_generators and not client._current.calls:
                        break
                    await asyncio.sleep(0.01)
                assert state["cancelled"] == [1, 2]
                assert closed_generators == [True]
                assert client._current.calls == {} and client._current.machine.in_flight == {}

    run(loop_name, scenario)


# -- failure and failover -----------------------------------------------------------------


def test_killed_server_idempotent_call_retried_non_idempotent_unavailable(loop_name):

    async def first_get(ctx, args):
        await asyncio.Event().wait()  # still running when the server dies

    async def second_get(ctx, args):
        return {"from": "second"}

    async def scenario():
        first = await Served(RpcServer({"get": first_get, "put": first_get}, instance="one")).start()
        client = client_for(first.address, reconnect_window=5.0)
        try:
            await client.connect()
            idempotent = asyncio.create_task(client.call("get", idempotent=True))
            unsafe = asyncio.create_task(client.call("put", {"flags": ["\\Seen"]}))
            await asyncio.sleep(0.1)
            assert len(client._current.calls) == 2
            await first.kill()
            second = await Served(RpcServer({"get": second_get, "put": second_get}, instance="two")).start(
                first.address[1])
            try:
                with pytest.raises(MailError) as caught:
                    await unsafe
                assert caught.value.kind is ErrorKind.UNAVAILABLE
                assert await idempotent == {"from": "second"}
                assert client.server_instance == "two"
                assert await client.call("put") == {"from": "second"}  # not in flight: just sent
            finally:
                await second.server.stop(timeout=1)
                second.listener.close()
        finally:
            await client.close()

    run(loop_name, scenario)


def test_failover_to_the_next_address_when_the_first_refuses(loop_name):
    async def scenario():
        dead = (HOST, refused_port())
        async with serving({}, instance="second") as served:
            async with client_for(dead, served.address) as client:
                assert (await client.call("ping"))["instance"] == "second"
                assert client.address == served.address
        started = time.monotonic()
        async with client_for(dead, (HOST, refused_port()), reconnect_window=0.3) as client:
            with pytest.raises(MailError) as caught:
                await client.call("ping")
            assert caught.value.kind is ErrorKind.UNAVAILABLE
        assert time.monotonic() - started < 2.0

    run(loop_name, scenario)


def test_subscription_renewed_after_the_server_is_replaced(loop_name):
    async def scenario():
        first = await Served(RpcServer({}, instance="one")).start()
        client = client_for(first.address, reconnect_window=5.0)
        pushes, reconnects = [], []
        try:
            await client.subscribe(["mbox:u@x/INBOX"], lambda t, d: pushes.append(d),
                                   on_reconnect=lambda: reconnects.append(client.server_instance))
            first.server.push("mbox:u@x/INBOX", {"n": 1})
            await first.kill()
            second = await Served(RpcServer({}, instance="two")).start(first.address[1])
            try:
                for _ in range(300):  # nobody calls: the client reconnects by itself
                    if reconnects:
                        break
                    await asyncio.sleep(0.01)
                assert reconnects == ["two"]
                assert second.server.push("mbox:u@x/INBOX", {"n": 2}) == 1
                await client.call("ping")
                assert pushes == [{"n": 1}, {"n": 2}]
            finally:
                await second.server.stop(timeout=1)
                second.listener.close()
        finally:
            await client.close()

    run(loop_name, scenario)


def test_graceful_stop_finishes_in_flight_calls_and_clients_move_on(loop_name, caplog):
    caplog.set_level(logging.INFO)

    class App:
        def __init__(self):
            self.server = RpcServer({"slow": self.slow}, instance="one")
            self.release = asyncio.Event()
            self.entered = asyncio.Event()

        async def slow(self, ctx, args):
            self.entered.set()
            await self.release.wait()
            return {"done": True}

        async def start(self, runner):
            self.address = await self.server.listen(runner, "rpc", HOST, 0)

        async def stop(self):
            pass

    async def scenario():
        app = App()
        runner = Runner(app, instance="one", drain_timeout=5.0, install_signals=False)
        serving_task = asyncio.create_task(runner.serve())
        while not runner.addresses:
            await asyncio.sleep(0.01)
        async with serving({}, instance="two") as other:
            async with client_for(app.address, other.address) as client:
                slow = asyncio.create_task(client.call("slow"))
                await app.entered.wait()
                runner.request_stop(reason="test")
                for _ in range(200):  # the GOODBYE arrives: the client stops using "one"
                    if client.server_instance is None:
                        break
                    await asyncio.sleep(0.01)
                assert client.server_instance is None
                assert (await client.call("ping"))["instance"] == "two"
                app.release.set()
                assert await slow == {"done": True}  # finished, not cut off
        assert await serving_task == 0
        events = [getattr(r, "im_event", "") for r in caplog.records]
        assert "rpc.server_stopping" in events and "runner.cancelled" not in events

    run(loop_name, scenario)


def test_garbage_closes_that_connection_and_the_server_keeps_serving(loop_name, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with serving({}) as served:
            async with client_for(served.address) as client:
                await client.call("ping")
                for garbage in (b"EHLO mail.example\r\n", MAGIC + os.urandom(100)):
                    reader, writer = await asyncio.open_connection(*served.address)
                    writer.write(garbage)
                    await writer.drain()
                    received = await asyncio.wait_for(reader.read(), 5)  # until the server closes
                    assert received.startswith(MAGIC)  # its HELLO, then nothing it should not say
                    writer.close()
                assert (await client.call("ping"))["instance"] == "mss-test"
                assert client.server_instance == "mss-test"

    run(loop_name, scenario)
    assert [getattr(r, "im_event", "") for r in caplog.records].count("rpc.protocol_error") == 2


def test_early_error_stops_the_upload_and_frees_the_request(loop_name):
    async def over_quota(ctx, args):
        raise MailError(ErrorKind.NOQUOTA)  # without reading the body

    async def scenario():
        async with serving({"append": over_quota}) as served:
            async with client_for(served.address) as client:
                with pytest.raises(MailError) as caught:
                    await client.call("append", body=slices(os.urandom(FIVE_MIB)))
                assert caught.value.kind is ErrorKind.NOQUOTA
                assert (await client.call("ping"))["instance"] == "mss-test"
                assert client._current.machine.in_flight == {} and client._current.calls == {}

    run(loop_name, scenario)


def test_idle_connection_is_closed_and_the_next_call_reconnects(loop_name, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with serving({}, idle_timeout=0.2) as served:
            async with client_for(served.address, keepalive=None) as client:
                first = (await client.call("ping"))["instance"]
                await asyncio.sleep(0.5)
                assert client.address is None  # the server said GOODBYE and closed
                assert (await client.call("ping"))["instance"] == first

    run(loop_name, scenario)
    assert "rpc.idle_timeout" in [getattr(r, "im_event", "") for r in caplog.records]
