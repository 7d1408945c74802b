"""Real server processes for integration and crash tests.

Owns: writing a cluster's ``cluster.toml`` into a data directory, starting
``python -m services.<kind>d`` processes on it, waiting for their ready
files, and stopping (SIGTERM) or killing (SIGKILL) them::

    cluster = TestCluster(tmp_path)
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0, "metrics": 0})
    cluster.write()
    proc = cluster.start("dir1"); proc.wait_ready()
    proc.kill()

Invariants:

- Each instance gets its own loopback address (127.x.y.z, random, so
  parallel test runs do not collide) and, for ``ports`` given as 0, a port
  chosen now and written into the Config: an instance restarted after a
  kill comes back on the same address and port, as in a real cluster.
- A process's stderr (its JSON log) goes to ``<data>/run/<name>.log``.
- An instance's first start passes ``--init`` (its state is created), as
  ``intermail up`` does for a new cluster; later starts do not, so an
  instance that lost its state refuses to start, as in production.
- ``wait_ready`` succeeds only on a ready file written by *this* process
  (its pid), never on one left behind by a killed predecessor.

Logs: nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from intermail.net.runner import read_ready_file

_used_addresses: set[str] = set()


def loopback_address() -> str:
    """A random 127.x.y.z address no other instance of this process uses."""
    while True:
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
        if address not in _used_addresses:
            _used_addresses.add(address)
            return address


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def processes(match: Any) -> list[str]:
    """``"pid: command line"`` of every live process whose command line ``match(cmdline)`` accepts.

    What the leak checks of the bench tests look for (processes a bench
    started and should have stopped).
    """
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline and match(cmdline):
                found.append(f"{proc.name}: {cmdline}")
    return found


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


class ServiceProcess:
    """One running (or stopped) server process of the test cluster."""

    def __init__(self, cluster: TestCluster, name: str, kind: str):
        self.cluster = cluster
        self.name = name
        self.kind = kind
        self.proc: subprocess.Popen | None = None
        self.started = 0

    @property
    def ready_file(self) -> Path:
        return self.cluster.data / "run" / f"{self.name}.ready"

    @property
    def log_file(self) -> Path:
        return self.cluster.data / "run" / f"{self.name}.log"

    def start(self, init: bool | None = None) -> ServiceProcess:
        """Start the process; ``init`` (default: on its first start only) passes ``--init``."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        module = f"services.{'dir' if self.kind == 'directory' else self.kind}d"
        log = open(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(self.cluster.config_path),
                 "--instance", self.name, "--data", str(self.cluster.data),
                 *(["--init"] if (self.started == 0 if init is None else init) else [])],
                stdout=log, stderr=log, env={**os.environ, **self.cluster.env})
        finally:
            log.close()
        self.started += 1
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict[str, tuple[str, int]]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                if json.loads(self.ready_file.read_text()).get("pid") == self.proc.pid:
                    return read_ready_file(self.ready_file)
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} not ready in {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash: no drain, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""


class TestCluster:
    """A ``cluster.toml`` in a data directory plus the processes running it."""

    __test__ = False  # not a pytest class

    def __init__(self, data: str | os.PathLike[str], *, sections: dict[str, dict[str, Any]] | None = None,
                 env: dict[str, str] | None = None):
        self.data = Path(data)
        self.data.mkdir(parents=True, exist_ok=True)
        self.config_path = self.data / "cluster.toml"
        self.sections = sections or {}
        self.env = env or {}
        self.instances: list[dict[str, Any]] = []
        self.procs: dict[str, ServiceProcess] = {}

    def add(self, name: str, kind: str, *, ports: dict[str, int], **fields: Any) -> dict[str, Any]:
        address = fields.pop("address", None) or loopback_address()
        fixed = {port_name: port or free_port(address) for port_name, port in ports.items()}
        entry = {"name": name, "kind": kind, "address": address, "ports": fixed, **fields}
        self.instances.append(entry)
        self.procs[name] = ServiceProcess(self, name, kind)
        return entry

    def address(self, name: str, port_name: str) -> tuple[str, int]:
        entry = next(e for e in self.instances if e["name"] == name)
        return entry["address"], entry["ports"][port_name]

    def write(self) -> Path:
        lines = []
        for section, values in self.sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
            lines.append("")
        for entry in self.instances:
            lines.append("[[instance]]")
            lines += [f"{key} = {_toml(value)}" for key, value in entry.items()]
            lines.append("")
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    def start(self, name: str, init: bool | None = None) -> ServiceProcess:
        return self.procs[name].start(init)

    def start_all(self, names: list[str] | None = None, timeout: float = 30.0) -> None:
        """Start ``names`` (default: every instance), then wait until each is ready."""
        chosen = [self.procs[n] for n in names] if names is not None else list(self.procs.values())
        for proc in chosen:
            proc.start()
        for proc in chosen:
            proc.wait_ready(timeout)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.alive:
                proc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for proc in self.procs.values():
            proc.stop()
