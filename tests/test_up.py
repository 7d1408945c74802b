"""``intermail up`` as a user runs it: the embedded cluster, mail through it, drills, ``down``.

The embedded topology uses fixed addresses (127.0.n.k) and ports: this test
needs them free (it skips if something already listens on the MTA's).
Checks, against the real processes:

- ``status --json`` keeps the operator contract (every instance ``up``,
  roles, ports);
- SMTP into ``mta1`` reaches IMAP on ``access2`` and POP3 on ``access1``;
- ``dig`` against ``dnsd`` rotates the ``mta`` RRset; ``intermail kill
  mta1`` takes its address out of ``mta`` within a second or two (the
  monitor), ``intermail start mta1`` puts it back;
- ``intermail kill mss1``: the spare takes over, ``status`` says so, mail
  still flows; ``down`` leaves no process behind.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import shutil
import smtplib
import socket
import subprocess
import sys
import time

import dns.message
import dns.query
import dns.rdatatype
import pytest

pytestmark = pytest.mark.timeout(300)

ZONE = "intermail.test"
DNS = ("127.0.1.1", 5353)


def intermail(data, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(data)], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done


def a_records(name: str) -> list[str]:
    answer = dns.query.tcp(dns.message.make_query(f"{name}.{ZONE}", dns.rdatatype.A), DNS[0], port=DNS[1], timeout=2)
    return sorted(r.address for rrset in answer.answer for r in rrset)


def wait_for(predicate, timeout: float, step: float = 0.1) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s")


def busy(address: tuple[str, int]) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(address) == 0


@pytest.fixture
def cluster(tmp_path):
    if busy(("127.0.3.1", 2525)):
        pytest.skip("an embedded cluster is already running on this machine")
    data = tmp_path / "data"
    intermail(data, "up", "--detach", timeout=180)
    try:
        yield data
    finally:
        subprocess.run([sys.executable, "-m", "intermail", "down", "--data", str(data)], capture_output=True,
                       timeout=120)


def test_up_serves_mail_and_survives_the_drills(cluster):
    status = json.loads(intermail(cluster, "status", "--json").stdout)
    assert status["zone"] == ZONE and status["dns"] == {"address": DNS[0], "port": DNS[1]}
    by_name = {i["name"]: i for i in status["instances"]}
    assert {i["kind"] for i in status["instances"]} == {"dns", "directory", "mta", "access", "mss", "monitor"}
    assert all(i["state"] == "up" and isinstance(i["pid"], int) for i in status["instances"]), status
    assert by_name["mss1"]["role"] == "active" and by_name["mss1b"]["role"] == "spare"
    assert by_name["mss1"]["identity"] == "mss1" and by_name["dir1"]["role"] == "primary"
    assert by_name["mta1"]["ports"]["smtp"] == 2525 and by_name["access1"]["ports"]["imap"] == 2143
    assert status["names"]["mta"] == ["127.0.3.1", "127.0.3.2"] and status["names"]["mss1"] == ["127.0.5.1"]

    intermail(cluster, "domain", "add", "example.org")
    intermail(cluster, "user", "add", "alice@example.org", "--password", "secret")
    with smtplib.SMTP("127.0.3.1", 2525, timeout=30) as smtp:
        smtp.sendmail("bob@remote.test", ["alice@example.org"], "Subject: hello alice\r\n\r\nvia up\r\n")

    def imap_count(host: str) -> int:
        imap = imaplib.IMAP4(host, 2143, timeout=30)
        try:
            imap.login("alice@example.org", "secret")
            return int(imap.select("INBOX", readonly=True)[1][0])
        finally:
            imap.logout()
    wait_for(lambda: imap_count("127.0.4.2") == 1, timeout=30, step=0.3)
    pop = poplib.POP3("127.0.4.1", 2110, timeout=30)
    pop.user("alice@example.org")
    pop.pass_("secret")
    assert b"via up" in b"\r\n".join(pop.retr(1)[1])
    pop.quit()

    # DNS: both MTAs, in rotating order (dig, as an operator would)
    if shutil.which("dig"):
        orders = {subprocess.run(["dig", f"@{DNS[0]}", "-p", str(DNS[1]), f"mta.{ZONE}", "A", "+short"],
                                 capture_output=True, text=True, timeout=10).stdout.split()[0] for _ in range(4)}
        assert orders == {"127.0.3.1", "127.0.3.2"}
    assert a_records("mta") == ["127.0.3.1", "127.0.3.2"]
    intermail(cluster, "kill", "mta1")
    took = wait_for(lambda: a_records("mta") == ["127.0.3.2"], timeout=5, step=0.05)
    print(f"mta1 out of mta.{ZONE} {took:.2f} s after the kill")
    intermail(cluster, "start", "mta1")
    wait_for(lambda: a_records("mta") == ["127.0.3.1", "127.0.3.2"], timeout=10)

    intermail(cluster, "kill", "mss1")

    def spare_active() -> bool:
        roles = {i["name"]: i["role"] for i in json.loads(intermail(cluster, "status", "--json").stdout)["instances"]}
        return roles["mss1b"] == "active" and roles["mss1"] == "spare"
    wait_for(spare_active, timeout=15, step=0.2)
    with smtplib.SMTP("127.0.3.2", 2525, timeout=30) as smtp:
        smtp.sendmail("bob@remote.test", ["alice@example.org"], "Subject: after\r\n\r\ntake-over\r\n")
    wait_for(lambda: imap_count("127.0.4.1") == 2, timeout=30, step=0.3)
    status = json.loads(intermail(cluster, "status", "--json").stdout)
    assert status["takeovers"] and status["takeovers"][-1]["by"] == "mss1b"

    pids = [i["pid"] for i in status["instances"] if i["pid"]]
    intermail(cluster, "down")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or b"zombie" in open(f"/proc/{pid}/status", "rb").read().lower()
