"""The network-namespace deployment: one namespace per host on a bridge, real address take-over (root only).

``intermail up --netns`` runs the embedded topology with its addresses
moved to a private /24; the test drives it from the root namespace over the
bridge.  Under SMTP load (unique subjects) the active store's host is killed
(``intermail kill mss1``): the monitor cuts the old owner's host off (its
processes killed, the identity address taken off it), the spare raises the
identity address on its own host with a gratuitous ARP and serves; every
message that got a 250 is then read over IMAP exactly once.  The identity
is flipped back the other way once more, and ``down`` removes every
namespace and the bridge.
"""

from __future__ import annotations

import asyncio
import collections
import imaplib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import aiosmtplib
import pytest

from intermail.admin.up import EMBEDDED_TOPOLOGY

pytestmark = pytest.mark.timeout(300)

USERS = [f"n{i}@example.org" for i in range(3)]


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"improbe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


pytestmark = [pytestmark, pytest.mark.skipif(not _netns_usable(), reason="needs root and ip netns")]


def intermail(data, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(data)], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done


@pytest.fixture
def cluster(tmp_path):
    net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
    topology = re.sub(r'"127\.0\.(\d+)\.(\d+)"', lambda m: f'"{net}.{int(m.group(1)) * 10 + int(m.group(2))}"',
                      EMBEDDED_TOPOLOGY)
    config = tmp_path / "netns.toml"
    config.write_text(topology)
    data = tmp_path / "data"
    intermail(data, "up", "--netns", "--config", str(config), "--detach")
    try:
        yield data, net
    finally:
        subprocess.run([sys.executable, "-m", "intermail", "down", "--data", str(data)], capture_output=True,
                       timeout=120)


def namespaces() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")


def imap_subjects(host: str, user: str) -> list[str]:
    imap = imaplib.IMAP4(host, 2143, timeout=30)
    try:
        imap.login(user, "pw")
        if int(imap.select("INBOX", readonly=True)[1][0]) == 0:
            return []
        _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [part[1].decode().split(":", 1)[1].strip() for part in data if isinstance(part, tuple)]
    finally:
        imap.logout()


def test_store_failover_under_load_moves_the_address_between_hosts(cluster):
    data, net = cluster
    status = json.loads(intermail(data, "status", "--json").stdout)
    assert all(i["state"] == "up" for i in status["instances"]), status
    assert len([n for n in namespaces() if n.strip()]) >= len(status["instances"])
    intermail(data, "domain", "add", "example.org")
    for user in USERS:
        intermail(data, "user", "add", user, "--password", "pw")
    mtas = [f"{net}.31", f"{net}.32"]
    acked: dict[str, str] = {}
    stop = asyncio.Event()

    async def client(phase: int, n: int) -> None:
        attempt = 0
        while not stop.is_set():
            subject, rcpt = f"p{phase}c{n}a{attempt}", USERS[(n + attempt) % len(USERS)]
            attempt += 1
            try:
                await aiosmtplib.send(f"Subject: {subject}\r\n\r\nnetns\r\n", sender="s@remote.test", recipients=[rcpt],
                                      hostname=mtas[n % 2], port=2525, start_tls=False, timeout=10)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            acked[subject] = rcpt

    async def load(phase: int, victim: str) -> None:
        stop.clear()
        tasks = [asyncio.ensure_future(client(phase, n)) for n in range(6)]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(intermail, data, "kill", victim)
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(load(1, "mss1"))
    intermail(data, "start", "mss1")  # back as the spare, on its own host address
    asyncio.run(load(2, "mss1b"))  # and the identity moves back
    assert len(acked) > 30, len(acked)
    deadline = time.monotonic() + 90
    while True:
        got = {u: imap_subjects(f"{net}.41", u) for u in USERS}
        missing = [s for s, u in acked.items() if s not in got[u]]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not missing, f"{len(missing)} acknowledged messages missing, e.g. {missing[:5]}"
    for user, subjects in got.items():
        doubled = [s for s, n in collections.Counter(subjects).items() if n > 1]
        assert not doubled, f"doubled for {user}: {doubled[:5]}"
    takeovers = json.loads(intermail(data, "status", "--json").stdout)["takeovers"]
    assert [(t["from"], t["by"]) for t in takeovers[-2:]] == [("mss1", "mss1b"), ("mss1b", "mss1")]
    print(f"{len(acked)} messages acknowledged across two take-overs, each read once over IMAP")
    intermail(data, "down")
    tag = [n for n in namespaces() if n.strip()]
    assert not any(str(net) in n for n in tag)
    assert not [n for n in tag if n.split()[0].endswith(("-mss1", "-mss1b", "-dns1"))
                and subprocess.run(["ip", "netns", "pids", n.split()[0]], capture_output=True).stdout]
