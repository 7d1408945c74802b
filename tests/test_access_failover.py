"""IMAP sessions across a store take-over: real ``accessd``, ``mssd`` (active + spare) and ``dird`` processes.

The active ``mssd`` is SIGKILLed under an IMAP session; the spare takes the
identity over (``mss.takeover``, what the monitor sends).  The session sees
a pause, not a BYE: its next command is answered once the spare serves, and
its selected mailbox is resynchronised (mail delivered after the take-over
is announced by EXISTS, also to a client in IDLE).  Past
``access.failover_window`` with no store, a command gets ``NO
[UNAVAILABLE]`` and the session stays usable.
"""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from intermail.rpc.client import RpcClient
from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(180)

USER = "fail@example.org"


def make_cluster(path: Path, window: float) -> TestCluster:
    cluster = TestCluster(path, sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "tls": {"auth_without_tls": True}, "access": {"failover_window": window}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mss1b", "mss", identity="mss1", role="spare", ports={"rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0})
    cluster.write()
    cluster.start_all()
    for argv in (("domain", "add", "example.org"), ("user", "add", USER, "--password", "pw", "--mss", "mss1")):
        done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    return cluster


def deliver(cluster: TestCluster, subject: str) -> None:
    with smtplib.LMTP(*cluster.address("mss1", "lmtp")) as lmtp:
        lmtp.sendmail("s@remote.test", [USER], f"Subject: {subject}\r\n\r\n{subject}\r\n")


def take_over(cluster: TestCluster) -> None:
    async def call() -> None:
        async with RpcClient([cluster.address("mss1b", "rpc")]) as control:
            await control.call("mss.takeover", {"bind_timeout": 10})
    asyncio.run(call())


def login(cluster: TestCluster) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(*cluster.address("access1", "imap"), timeout=60)
    imap.login(USER, "pw")
    return imap


def test_a_selected_session_pauses_through_a_take_over_and_sees_later_mail(tmp_path):
    cluster = make_cluster(tmp_path / "data", window=30.0)
    try:
        for i in range(5):
            deliver(cluster, f"before {i}")
        imap = login(cluster)
        assert imap.select("INBOX") == ("OK", [b"5"])
        imap.store("2", "+FLAGS", "(\\Flagged)")
        cluster.procs["mss1"].kill()
        # the take-over comes a moment after the next command was sent: that command waits for it
        timer = threading.Timer(1.0, take_over, args=(cluster,))
        timer.start()
        began = time.monotonic()
        status, data = imap.fetch("1:*", "(FLAGS)")
        paused = time.monotonic() - began
        timer.join()
        assert status == "OK", data
        assert len(data) == 5 and b"\\Flagged" in data[1]
        assert paused >= 0.9  # it did wait for the spare
        deliver(cluster, "after")  # the identity's LMTP address is served by the spare now
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, data = imap.noop()
            if any(b"6 EXISTS" in d for d in imap.untagged_responses.get("EXISTS", [])) or \
                    imap.untagged_responses.get("EXISTS") == [b"6"]:
                break
            time.sleep(0.2)
        assert imap.untagged_responses.get("EXISTS", [])[-1:] == [b"6"]
        status, data = imap.fetch("6", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"Subject: after" in data[0][1]
        imap.logout()
    finally:
        cluster.stop_all()


def test_an_idling_client_hears_of_mail_delivered_after_the_take_over(tmp_path):
    imapclient = pytest.importorskip("imapclient")
    cluster = make_cluster(tmp_path / "data", window=30.0)
    try:
        deliver(cluster, "first")
        host, port = cluster.address("access1", "imap")
        client = imapclient.IMAPClient(host, port=port, ssl=False, timeout=60)
        client.login(USER, "pw")
        client.select_folder("INBOX")
        client.idle()
        cluster.procs["mss1"].kill()
        take_over(cluster)
        deliver(cluster, "second")
        responses = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (2, b"EXISTS") not in responses:
            responses += client.idle_check(timeout=1)
        client.idle_done()
        assert (2, b"EXISTS") in responses, responses
        assert client.search(["SUBJECT", "second"]) == [2]
        client.logout()
    finally:
        cluster.stop_all()


def test_past_the_window_a_command_fails_and_the_session_survives(tmp_path):
    cluster = make_cluster(tmp_path / "data", window=1.5)
    try:
        deliver(cluster, "one")
        imap = login(cluster)
        imap.select("INBOX")
        cluster.procs["mss1"].kill()
        began = time.monotonic()
        status, data = imap.fetch("1", "(FLAGS)")
        assert status == "NO" and b"[UNAVAILABLE]" in data[0], data
        assert time.monotonic() - began < 15
        take_over(cluster)
        status, data = imap.fetch("1", "(BODY.PEEK[TEXT])")
        assert status == "OK" and data[0][1] == b"one\r\n"
        imap.logout()
    finally:
        cluster.stop_all()
