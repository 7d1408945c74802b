"""intermail.net.runner: binding, ready file, drain on SIGTERM, failure paths.

In-process tests drive a Runner without signal handlers; the signal tests run
a tiny echo app in a child process (``python -c``) and send it SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from intermail.net import runner as runner_module
from intermail.net.runner import Runner, loop_factory, read_ready_file
from intermail.testing.loops import available_loops, run_on

ROOT = str(Path(__file__).resolve().parents[1])


class EchoApp:
    """Echoes lines on one or more listeners; records its life cycle."""

    def __init__(self, names=("echo",), fail_start=False):
        self.names = names
        self.fail_start = fail_start
        self.started = asyncio.Event()
        self.stop_calls = 0
        self.cancelled = 0
        self.runner: Runner | None = None

    async def start(self, runner: Runner) -> None:
        self.runner = runner
        for name in self.names:
            await runner.listen(name, "127.0.0.1", 0, self.handle)
        if self.fail_start:
            raise RuntimeError("cannot open the store")
        self.started.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if line == b"crash\n":
                    raise ValueError("handler bug")
                writer.write(line)
                await writer.drain()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def stop(self) -> None:
        self.stop_calls += 1


async def echo_once(reader, writer, text: bytes) -> bytes:
    writer.write(text)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5)


def events(caplog) -> list[str]:
    return [r.im_event for r in caplog.records if hasattr(r, "im_event")]


def test_binds_port_zero_and_reports_real_ports(loop_name, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ready = tmp_path / "run" / "echo1.json"

    async def scenario():
        app = EchoApp(names=("smtp", "submission"))
        runner = Runner(app, instance="echo1", ready_file=ready, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        await asyncio.sleep(0)  # let start() write the ready file after app.start
        assert set(runner.addresses) == {"smtp", "submission"}
        for host, port in runner.addresses.values():
            assert host == "127.0.0.1" and port > 0
        assert runner.addresses["smtp"][1] != runner.addresses["submission"][1]

        content = json.loads(ready.read_text())
        assert content["instance"] == "echo1" and content["pid"] == os.getpid()
        assert content["listeners"] == {
            name: {"host": host, "port": port} for name, (host, port) in runner.addresses.items()
        }
        assert read_ready_file(ready) == runner.addresses

        reader, writer = await asyncio.open_connection(*runner.addresses["submission"])
        assert await echo_once(reader, writer, b"hi\n") == b"hi\n"
        writer.close()

        runner.request_stop()
        assert await asyncio.wait_for(serving, 5) == 0
        assert app.stop_calls == 1
        assert not ready.exists()  # a stopped instance leaves no stale ports behind
        with pytest.raises(OSError):
            await asyncio.open_connection(*runner.addresses["smtp"])

    run_on(loop_name, scenario())
    assert events(caplog).count("runner.listening") == 2
    assert {"runner.ready", "runner.draining", "runner.stopped"} <= set(events(caplog))


def test_drain_lets_live_connections_finish(loop_name, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        app = EchoApp()
        runner = Runner(app, drain_timeout=30, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        address = runner.addresses["echo"]
        reader, writer = await asyncio.open_connection(*address)
        assert await echo_once(reader, writer, b"before\n") == b"before\n"

        runner.request_stop(reason="test")
        async with asyncio.timeout(5):
            while not runner.stopping.is_set():
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not serving.done()  # waiting for our connection
        with pytest.raises(OSError):  # but no longer accepting
            await asyncio.open_connection(*address)
        assert await echo_once(reader, writer, b"during\n") == b"during\n"
        assert app.stop_calls == 0  # the app's resources outlive the sessions

        writer.close()
        assert await asyncio.wait_for(serving, 5) == 0
        assert app.stop_calls == 1 and app.cancelled == 0

    run_on(loop_name, scenario())
    assert "runner.cancelled" not in events(caplog)


def test_drain_timeout_cancels_stragglers(loop_name, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        app = EchoApp()
        runner = Runner(app, drain_timeout=0.2, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        reader, writer = await asyncio.open_connection(*runner.addresses["echo"])
        assert await echo_once(reader, writer, b"x\n") == b"x\n"
        assert runner.connection_count == 1
        runner.request_stop(exit_code=3, reason="fenced")
        assert await asyncio.wait_for(serving, 5) == 3
        assert app.cancelled == 1 and runner.connection_count == 0
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the runner closed our socket
        writer.close()

    run_on(loop_name, scenario())
    assert "runner.cancelled" in events(caplog)


def test_handler_failure_is_logged_and_contained(loop_name, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        app = EchoApp()
        runner = Runner(app, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        reader, writer = await asyncio.open_connection(*runner.addresses["echo"])
        writer.write(b"crash\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the bug
        reader, writer = await asyncio.open_connection(*runner.addresses["echo"])
        assert await echo_once(reader, writer, b"still up\n") == b"still up\n"
        writer.close()
        runner.request_stop()
        assert await asyncio.wait_for(serving, 5) == 0

    run_on(loop_name, scenario())
    failed = [r for r in caplog.records if getattr(r, "im_event", None) == "runner.handler_failed"]
    assert len(failed) == 1 and failed[0].exc_info[0] is ValueError
    # The connection's log context was in force: session id and peer.
    assert failed[0].im_context["session_id"] and failed[0].im_context["peer"].startswith("127.0.0.1:")


def test_start_failure_exits_1_and_cleans_up(loop_name, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        app = EchoApp(fail_start=True)
        runner = Runner(app, install_signals=False)
        assert await asyncio.wait_for(runner.serve(), 5) == 1
        assert app.stop_calls == 1
        with pytest.raises(OSError):
            await asyncio.open_connection(*runner.addresses["echo"])

    run_on(loop_name, scenario())
    assert "runner.start_failed" in events(caplog)


def test_cancelling_serve_still_stops_the_app(loop_name):
    async def scenario():
        app = EchoApp()
        runner = Runner(app, drain_timeout=30, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        reader, writer = await asyncio.open_connection(*runner.addresses["echo"])
        assert await echo_once(reader, writer, b"x\n") == b"x\n"
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, 5)
        assert app.stop_calls == 1 and app.cancelled == 1
        writer.close()

    run_on(loop_name, scenario())


def test_listen_rejects_duplicates():
    async def scenario():
        app = EchoApp()
        runner = Runner(app, install_signals=False)
        await runner.listen("a", "127.0.0.1", 0, app.handle)
        with pytest.raises(ValueError, match="already open"):
            await runner.listen("a", "127.0.0.1", 0, app.handle)
        await runner.shutdown()
        with pytest.raises(RuntimeError, match="stopping"):
            await runner.listen("b", "127.0.0.1", 0, app.handle)

    run_on("asyncio", scenario())


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


def test_listen_datagram_records_publishes_and_closes_at_shutdown(loop_name, tmp_path):
    ready = tmp_path / "udp.ready"

    async def scenario():
        app = EchoApp(names=("tcp",))
        runner = Runner(app, install_signals=False, ready_file=ready)
        await runner.start()
        bound = await runner.listen_datagram("udp", "127.0.0.1", 0, DatagramEcho)
        assert runner.addresses["udp"] == bound and bound[1] > 0
        assert read_ready_file(ready)["udp"] == bound  # opened after start: published too
        with pytest.raises(ValueError, match="already open"):
            await runner.listen_datagram("udp", "127.0.0.1", 0, DatagramEcho)
        with pytest.raises(ValueError, match="already open"):
            await runner.listen("udp", "127.0.0.1", 0, app.handle)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a pre-bound socket is served as it is
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        assert await runner.listen_datagram("udp2", "ignored", 0, DatagramEcho, sock=sock) == sock.getsockname()
        loop = asyncio.get_running_loop()
        received: asyncio.Future[bytes] = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if not received.done():
                    received.set_result(data)

        client, _ = await loop.create_datagram_endpoint(Client, remote_addr=bound)
        client.sendto(b"ping")
        assert await asyncio.wait_for(received, 5) == b"ping"
        client.close()
        second = sock.getsockname()
        await runner.shutdown()
        await asyncio.sleep(0.05)  # a transport closes its socket on the next loop turn
        for address in (bound, second):  # closed with the listeners: the ports are free again
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind(address)
            probe.close()

    run_on(loop_name, scenario())


class LineEchoProtocol(asyncio.Protocol):
    """An echo server that is an asyncio protocol (as aiosmtpd's SMTP is), with a task per connection."""

    instances: list[LineEchoProtocol] = []

    def __init__(self):
        self.transport = None
        self.lines: asyncio.Queue[bytes] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.context: dict = {}
        self.lost = False
        LineEchoProtocol.instances.append(self)

    def connection_made(self, transport):
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self.serve())

    async def serve(self):
        from intermail.log import current_context

        self.context = dict(current_context())
        while True:
            self.transport.write(await self.lines.get())

    def data_received(self, data):
        self.lines.put_nowait(data)

    def connection_lost(self, exc):
        self.lost = True
        if self.task is not None:
            self.task.cancel()


class ProtocolApp(EchoApp):
    async def start(self, runner: Runner) -> None:
        self.runner = runner
        await runner.listen_protocol("echo", "127.0.0.1", 0, LineEchoProtocol)
        self.started.set()


def test_listen_protocol_tracks_connections_and_drains(loop_name, caplog):
    caplog.set_level(logging.INFO)
    LineEchoProtocol.instances.clear()

    async def scenario():
        app = ProtocolApp()
        runner = Runner(app, drain_timeout=30, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        address = runner.addresses["echo"]
        assert address[0] == "127.0.0.1" and address[1] > 0
        reader, writer = await asyncio.open_connection(*address)
        assert await echo_once(reader, writer, b"one\n") == b"one\n"
        assert runner.connection_count == 1
        # the protocol's own task runs in the connection's log context
        protocol = LineEchoProtocol.instances[0]
        assert protocol.context["session_id"] and protocol.context["peer"].startswith("127.0.0.1:")

        # a connection that ends by itself leaves the set
        reader2, writer2 = await asyncio.open_connection(*address)
        assert await echo_once(reader2, writer2, b"two\n") == b"two\n"
        assert runner.connection_count == 2
        writer2.close()
        async with asyncio.timeout(5):
            while runner.connection_count != 1:
                await asyncio.sleep(0.01)

        runner.request_stop(reason="test")
        async with asyncio.timeout(5):
            while not runner.stopping.is_set():
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not serving.done()  # the live connection holds the drain
        with pytest.raises(OSError):  # the listener is closed
            await asyncio.open_connection(*address)
        assert await echo_once(reader, writer, b"during\n") == b"during\n"
        writer.close()
        assert await asyncio.wait_for(serving, 5) == 0
        assert runner.connection_count == 0 and app.stop_calls == 1

    run_on(loop_name, scenario())
    assert "runner.cancelled" not in events(caplog)
    assert all(p.lost for p in LineEchoProtocol.instances)


def test_listen_protocol_drain_timeout_aborts_the_connection(loop_name, caplog):
    caplog.set_level(logging.INFO)
    LineEchoProtocol.instances.clear()

    async def scenario():
        app = ProtocolApp()
        runner = Runner(app, drain_timeout=0.2, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        reader, writer = await asyncio.open_connection(*runner.addresses["echo"])
        assert await echo_once(reader, writer, b"x\n") == b"x\n"
        assert runner.connection_count == 1
        runner.request_stop(reason="test")
        assert await asyncio.wait_for(serving, 5) == 0
        assert runner.connection_count == 0
        with contextlib.suppress(ConnectionResetError):  # aborted: a reset or an EOF
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert LineEchoProtocol.instances[0].lost  # the protocol saw its connection go

    run_on(loop_name, scenario())
    assert "runner.cancelled" in events(caplog)


def test_listen_protocol_factory_failure_is_contained(loop_name, caplog):
    caplog.set_level(logging.INFO)

    class Broken(asyncio.Protocol):
        def connection_made(self, transport):
            raise ValueError("protocol bug")

    class App(EchoApp):
        async def start(self, runner):
            self.runner = runner
            await runner.listen_protocol("broken", "127.0.0.1", 0, Broken)
            await runner.listen_protocol("echo", "127.0.0.1", 0, LineEchoProtocol)
            self.started.set()

    async def scenario():
        app = App()
        runner = Runner(app, install_signals=False)
        serving = asyncio.ensure_future(runner.serve())
        await asyncio.wait_for(app.started.wait(), 5)
        reader, writer = await asyncio.open_connection(*runner.addresses["broken"])
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        async with asyncio.timeout(5):
            while runner.connection_count:
                await asyncio.sleep(0.01)
        with pytest.raises(ValueError, match="already open"):
            await runner.listen_protocol("echo", "127.0.0.1", 0, LineEchoProtocol)
        runner.request_stop()
        assert await asyncio.wait_for(serving, 5) == 0

    run_on(loop_name, scenario())
    failed = [r for r in caplog.records if getattr(r, "im_event", None) == "runner.handler_failed"]
    assert len(failed) == 1 and failed[0].im_context["session_id"]


def test_loop_factory():
    assert loop_factory("asyncio") is None
    with pytest.raises(ValueError):
        loop_factory("trio")
    if "uvloop" in available_loops():
        import uvloop

        assert loop_factory("uvloop") is uvloop.new_event_loop
        assert loop_factory("auto") is uvloop.new_event_loop
    else:  # pragma: no cover - uvloop is a dependency on Linux
        assert loop_factory("auto") is None


# -- a real process and a real SIGTERM ---------------------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, sys
    from intermail.log import setup_logging
    from intermail.net.runner import run

    class Echo:
        async def start(self, runner):
            await runner.listen("echo", "127.0.0.1", 0, self.handle)

        async def handle(self, reader, writer):
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()

        async def stop(self):
            pass

    setup_logging("echo1", "INFO", strict_events=True)
    loop, drain, ready = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    sys.exit(run(Echo(), loop=loop, instance="echo1", drain_timeout=drain, ready_file=ready))
""")


class Child:
    """The echo app in a subprocess, with its JSON log lines parsed as they come."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[dict] = []

    @classmethod
    async def start(cls, loop_name: str, drain: float, ready: Path) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, loop_name, str(drain), str(ready),
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        return cls(proc)

    async def wait_event(self, event: str, timeout: float = 10) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if line["event"] == event:
                        return line
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"child exited before {event}: {self.lines}")
                self.lines.append(json.loads(raw))

    async def finish(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            rest = await self.proc.stderr.read()
            self.lines += [json.loads(raw) for raw in rest.splitlines()]
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def test_sigterm_drains_then_exits_0(loop_name, tmp_path):
    ready = tmp_path / "ready.json"
    child = await Child.start(loop_name, drain=5.0, ready=ready)
    try:
        await child.wait_event("runner.ready")
        address = read_ready_file(ready)["echo"]
        reader, writer = await asyncio.open_connection(*address)
        assert await echo_once(reader, writer, b"hello\n") == b"hello\n"

        child.proc.send_signal(signal.SIGTERM)
        draining = await child.wait_event("runner.draining")
        assert draining["reason"] == "SIGTERM" and draining["connections"] == 1
        assert draining["instance"] == "echo1"
        with pytest.raises(OSError):
            await asyncio.open_connection(*address)
        # The open session is still served while draining...
        assert await echo_once(reader, writer, b"still here\n") == b"still here\n"
        # ...and once it ends the process exits cleanly, well within the drain timeout.
        writer.close()
        assert await child.finish(timeout=4.0) == 0
    finally:
        child.kill()
    names = [line["event"] for line in child.lines]
    assert "runner.cancelled" not in names
    assert names[-1] == "runner.stopped"
    assert not ready.exists()


async def test_sigterm_cancels_connections_after_drain_timeout(loop_name, tmp_path):
    ready = tmp_path / "ready.json"
    child = await Child.start(loop_name, drain=0.5, ready=ready)
    try:
        await child.wait_event("runner.ready")
        reader, writer = await asyncio.open_connection(*read_ready_file(ready)["echo"])
        assert await echo_once(reader, writer, b"hello\n") == b"hello\n"
        child.proc.send_signal(signal.SIGTERM)
        await child.wait_event("runner.draining")
        # We keep the connection open; the runner must not wait for us forever.
        assert await child.finish(timeout=8.0) == 0
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        child.kill()
    names = [line["event"] for line in child.lines]
    assert "runner.cancelled" in names and names[-1] == "runner.stopped"


async def test_second_signal_skips_the_drain(tmp_path):
    ready = tmp_path / "ready.json"
    child = await Child.start("asyncio", drain=60.0, ready=ready)
    try:
        await child.wait_event("runner.ready")
        reader, writer = await asyncio.open_connection(*read_ready_file(ready)["echo"])
        assert await echo_once(reader, writer, b"hello\n") == b"hello\n"
        child.proc.send_signal(signal.SIGTERM)
        await child.wait_event("runner.draining")
        child.proc.send_signal(signal.SIGINT)
        assert await child.finish(timeout=10.0) == 0  # not the 60 s drain
        writer.close()
    finally:
        child.kill()
    assert "runner.cancelled" in [line["event"] for line in child.lines]


def test_module_exports():
    for name in ("App", "Runner", "run", "loop_factory", "read_ready_file", "write_ready_file"):
        assert hasattr(runner_module, name)
