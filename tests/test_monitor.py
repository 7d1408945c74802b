"""The monitor sidecar as a real process: store take-over by the spare, and no fail-back.

``dird``, ``mssd`` (active ``mss1`` + spare ``mss1b`` on the same store
directories) and ``monitord`` on loopback.  The active store is SIGKILLed:
the monitor notices within its probe rounds, fences what is left of the old
owner and has the spare take the identity over; LMTP on the identity's
address answers again and every delivered message is there.  The old owner,
restarted, comes back as the spare; killing the new owner then moves the
identity back.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(180)

USER = "mon@example.org"


def lmtp_delivers(cluster: TestCluster, subject: str) -> bool:
    try:
        with smtplib.LMTP(*cluster.address("mss1", "lmtp"), timeout=2) as lmtp:
            lmtp.sendmail("s@remote.test", [USER], f"Subject: {subject}\r\n\r\nx\r\n")
        return True
    except (OSError, smtplib.SMTPException):
        return False


def wait_for(predicate, timeout: float, step: float = 0.05) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")


def events(cluster: TestCluster, name: str, event: str) -> list[dict]:
    out = []
    for line in (cluster.data / "run" / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            out.append(json.loads(line))
    return out


def test_the_monitor_promotes_the_spare_and_the_old_owner_returns_as_spare(tmp_path: Path):
    cluster = TestCluster(tmp_path / "data", sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "monitor": {"interval": 0.1, "timeout": 0.5, "down_after": 3}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mss1b", "mss", identity="mss1", role="spare", ports={"rpc": 0})
    cluster.add("mon", "monitor", ports={})
    cluster.write()
    try:
        cluster.start_all()
        for argv in (("domain", "add", "example.org"), ("user", "add", USER, "--password", "pw", "--mss", "mss1")):
            done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        assert lmtp_delivers(cluster, "before")
        time.sleep(0.5)  # the monitor has seen everything up
        cluster.procs["mss1"].kill()
        took = wait_for(lambda: lmtp_delivers(cluster, "after"), timeout=15)
        print(f"LMTP answered again {took:.2f} s after the kill")
        takeovers = events(cluster, "mon", "monitor.takeover")
        assert takeovers and takeovers[-1]["by"] == "mss1b" and takeovers[-1]["identity"] == "mss1"
        owners = json.loads((cluster.data / "run" / "owners.json").read_text())
        assert owners["owners"] == {"mss1": "mss1b"}
        # the repaired machine comes back as the spare: no fail-back
        cluster.procs["mss1"].start().wait_ready()
        time.sleep(0.5)
        assert lmtp_delivers(cluster, "still b")
        assert json.loads((cluster.data / "run" / "owners.json").read_text())["owners"] == {"mss1": "mss1b"}
        cluster.procs["mss1b"].kill()
        wait_for(lambda: lmtp_delivers(cluster, "back to a"), timeout=15)
        assert json.loads((cluster.data / "run" / "owners.json").read_text())["owners"] == {"mss1": "mss1"}
    finally:
        cluster.stop_all()


def test_a_store_never_seen_up_is_taken_over_only_after_the_start_up_grace(tmp_path: Path):
    cluster = TestCluster(tmp_path / "data", sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "monitor": {"interval": 0.1, "timeout": 0.3, "down_after": 3, "startup_grace": 2.0}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mss1b", "mss", identity="mss1", role="spare", ports={"rpc": 0})
    cluster.add("mon", "monitor", ports={})
    cluster.write()
    try:
        cluster.start_all(["dir1", "mss1b", "mon"])  # mss1 never starts: the monitor never sees it up
        began = time.monotonic()
        for argv in (("domain", "add", "example.org"), ("user", "add", USER, "--password", "pw", "--mss", "mss1")):
            done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        wait_for(lambda: (cluster.data / "run" / "owners.json").exists(), timeout=15)
        assert time.monotonic() - began >= 1.0  # not before the grace (counted from the monitor's start)
        assert any(e.get("deferred") for e in events(cluster, "mon", "monitor.state"))
        wait_for(lambda: lmtp_delivers(cluster, "served by the spare"), timeout=10)
    finally:
        cluster.stop_all()
