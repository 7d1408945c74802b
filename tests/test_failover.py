"""Store failover end to end, as real processes: SMTP in, the active store killed or frozen, IMAP out.

1. Under SMTP load (unique subjects) the active ``mssd`` is SIGKILLed; the
   monitor fences it and has the spare take the identity over; afterwards
   every message that got a 250 is readable over IMAP exactly once, and no
   message is there twice.
2. Split brain: the active store is frozen (SIGSTOP) with a delivery in
   flight and the spare takes the store over (no power switch: the epoch
   alone fences).  Resumed, the old owner writes nothing: its delivery is
   not acknowledged and not stored, it exits (status 3, fenced), and the
   spare serves a consistent store.
"""

from __future__ import annotations

import asyncio
import collections
import imaplib
import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiosmtplib
import pytest

from intermail.rpc.client import RpcClient
from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(300)

USERS = [f"f{i}@example.org" for i in range(3)]


def cli(cluster: TestCluster, *argv: str) -> None:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (argv, done.stderr)


def make_cluster(path: Path, *, monitor: bool) -> TestCluster:
    cluster = TestCluster(path, sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "queue": {"retry_base": 0.2, "retry_max": 0.5, "connect_timeout": 1.0, "data_timeout": 10.0},
        "monitor": {"interval": 0.1, "timeout": 0.5, "down_after": 3},
        "tls": {"auth_without_tls": True}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mss1b", "mss", identity="mss1", role="spare", ports={"rpc": 0})
    cluster.add("mta1", "mta", ports={"smtp": 0, "rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0})
    if monitor:
        cluster.add("mon", "monitor", ports={})
    cluster.write()
    cluster.start_all()
    cli(cluster, "domain", "add", "example.org")
    for user in USERS:
        cli(cluster, "user", "add", user, "--password", "pw", "--mss", "mss1")
    return cluster


def imap_subjects(cluster: TestCluster, user: str) -> list[str]:
    imap = imaplib.IMAP4(*cluster.address("access1", "imap"), timeout=30)
    try:
        imap.login(user, "pw")
        typ, data = imap.select("INBOX", readonly=True)
        if int(data[0]) == 0:
            return []
        typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [part[1].decode().split(":", 1)[1].strip() for part in data if isinstance(part, tuple)]
    finally:
        imap.logout()


def test_sigkill_of_the_active_store_under_smtp_load_loses_and_doubles_nothing(tmp_path):
    seed = int(os.environ.get("INTERMAIL_CRASH_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    cluster = make_cluster(tmp_path / "data", monitor=True)
    try:
        host, port = cluster.address("mta1", "smtp")
        acked: dict[str, str] = {}
        stop = asyncio.Event()

        async def client(n: int) -> None:
            attempt = 0
            while not stop.is_set():
                subject, rcpt = f"c{n}a{attempt}", USERS[(n + attempt) % len(USERS)]
                attempt += 1
                body = f"Subject: {subject}\r\nMessage-ID: <{subject}@t>\r\n\r\nload\r\n"
                try:
                    await aiosmtplib.send(body, sender="s@remote.test", recipients=[rcpt], hostname=host, port=port,
                                          start_tls=False, timeout=10)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    await asyncio.sleep(0.05)
                    continue
                acked[subject] = rcpt

        async def scenario() -> float:
            tasks = [asyncio.ensure_future(client(n)) for n in range(8)]
            await asyncio.sleep(rng.uniform(1.0, 2.0))
            cluster.procs["mss1"].kill()
            killed_at = time.monotonic()
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*tasks)
            return killed_at

        asyncio.run(scenario())
        assert len(acked) > 50, len(acked)
        deadline = time.monotonic() + 90
        while True:
            got = {u: imap_subjects(cluster, u) for u in USERS}
            missing = [s for s, u in acked.items() if s not in got[u]]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert not missing, f"seed {seed}: {len(missing)} acknowledged messages missing, e.g. {missing[:5]}"
        for user, subjects in got.items():
            doubled = [s for s, n in collections.Counter(subjects).items() if n > 1]
            assert not doubled, f"seed {seed}: doubled for {user}: {doubled[:5]}"
        owners = (cluster.data / "run" / "owners.json").read_text()
        assert '"mss1": "mss1b"' in owners
        print(f"{len(acked)} messages acknowledged, each read once over IMAP after the take-over (seed {seed})")
    finally:
        cluster.stop_all()


def test_a_frozen_owner_resumed_after_the_take_over_writes_nothing(tmp_path):
    cluster = make_cluster(tmp_path / "data", monitor=False)
    try:
        host, port = cluster.address("mss1", "lmtp")
        with smtplib.LMTP(host, port) as lmtp:
            for i in range(5):
                lmtp.sendmail("s@remote.test", [USERS[0]], f"Subject: before{i}\r\n\r\nx\r\n")
        # a delivery in flight: everything sent but the end of DATA
        lmtp = smtplib.LMTP(host, port, timeout=30)
        lmtp.ehlo("t")
        lmtp.mail("s@remote.test", ["XDELIVERYKEY=frozen1"])
        lmtp.rcpt(USERS[0])
        lmtp.putcmd("data")
        assert lmtp.getreply()[0] == 354
        lmtp.send(b"Subject: frozen\r\n\r\nnever acknowledged\r\n")
        pid = cluster.procs["mss1"].proc.pid
        os.kill(pid, signal.SIGSTOP)
        lmtp.send(b".\r\n")  # the frozen store holds it unanswered

        answer: dict = {}

        def take_over() -> None:
            async def call() -> None:
                async with RpcClient([cluster.address("mss1b", "rpc")], request_timeout=30) as control:
                    answer.update(await control.call("mss.takeover", {"bind_timeout": 20}))
            asyncio.run(call())
        spare = threading.Thread(target=take_over)
        spare.start()
        time.sleep(1.5)  # the spare has opened the store (new epoch) and waits for the address
        os.kill(pid, signal.SIGCONT)
        try:
            code = lmtp.getreply()[0]
        except (smtplib.SMTPServerDisconnected, OSError):
            code = None
        assert code != 250, "a fenced store acknowledged a delivery"
        spare.join(30)
        assert answer.get("identity") == "mss1", answer
        assert cluster.procs["mss1"].proc.wait(10) == 3  # exited as fenced
        subjects = imap_subjects(cluster, USERS[0])
        assert sorted(subjects) == [f"before{i}" for i in range(5)], subjects
        # the same delivery again, now to the new owner: stored once
        with smtplib.LMTP(host, port) as again:
            again.sendmail("s@remote.test", [USERS[0]], b"Subject: frozen\r\n\r\nnever acknowledged\r\n",
                           mail_options=["XDELIVERYKEY=frozen1"])
        assert sorted(imap_subjects(cluster, USERS[0])) == sorted([f"before{i}" for i in range(5)] + ["frozen"])
    finally:
        cluster.stop_all()
