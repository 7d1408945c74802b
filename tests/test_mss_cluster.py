"""The message store as real processes: ``services.mssd`` with a ``services.dird`` on loopback.

LMTP from real clients (smtplib, swaks), the store RPC driven over real
sockets, and the crash test: SIGKILLs of mssd under LMTP load, then every
message that got a 250 is stored exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intermail.errors import ErrorKind, MailError
from intermail.mailstore import mime
from intermail.rpc.client import RpcClient
from intermail.testing.lmtpclient import LmtpTestClient
from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(300)

USERS = [f"user{i}@example.org" for i in range(8)]


def make_cluster(path: Path, **limits: object) -> TestCluster:
    cluster = TestCluster(path, sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "limits": {"message_size": 1 << 20, **limits}, "log": {"level": "INFO"}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0, "metrics": 0})
    cluster.add("mss2", "mss", identity="mss2", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.write()
    return cluster


def cli(cluster: TestCluster, *argv: str) -> None:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (argv, done.stderr)


@pytest.fixture
def cluster(tmp_path: Path):
    c = make_cluster(tmp_path / "data")
    c.start_all(["dir1", "mss1"])
    cli(c, "domain", "add", "example.org")
    for user in USERS:
        cli(c, "user", "add", user, "--password", "pw", "--mss", "mss1")
    cli(c, "user", "add", "tiny@example.org", "--password", "pw", "--mss", "mss1", "--quota", "2000")
    cli(c, "user", "add", "elsewhere@example.org", "--password", "pw", "--mss", "mss2")
    cli(c, "alias", "add", "team@example.org", USERS[0], USERS[1])
    yield c
    c.stop_all()


def message(ident: str, size: int = 1000) -> bytes:
    head = (f"From: Sender <sender@remote.test>\r\nTo: someone@example.org\r\nSubject: {ident}\r\n"
            f"Message-ID: <{ident}@remote.test>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def mailbox_subjects(rpc: RpcClient, user: str, name: str = "INBOX") -> list[str]:
    result, body = await rpc.call_stream("message.fetch", {"user": user, "name": name, "uids": [[1, -1]]},
                                         idempotent=True)
    rows = [json.loads(line) for line in (await body.read()).splitlines()]
    assert result["count"] == len(rows)
    return [mime.from_json(row["info"]).envelope.subject for row in rows]


# -- 1. real LMTP clients -----------------------------------------------------------------


def test_smtplib_lmtp_gets_one_reply_per_recipient(cluster):
    host, port = cluster.address("mss1", "lmtp")
    with smtplib.LMTP(host, port) as lmtp:
        lmtp.ehlo("mta.test")
        lmtp.mail("sender@remote.test", ["XDELIVERYKEY=Q1", "SIZE=1500"])
        replies = {r: lmtp.rcpt(r) for r in (USERS[0], USERS[1].upper(), "nobody@example.org", "tiny@example.org",
                                              "team@example.org", "elsewhere@example.org", "bad address")}
        assert replies[USERS[0]][0] == 250 and replies[USERS[1].upper()][0] == 250
        assert replies["nobody@example.org"] == (550, b"5.1.1 No such user here")
        assert replies["team@example.org"][0] == 550  # an alias: the MTA expands it
        assert replies["elsewhere@example.org"][0] == 451  # lives on mss2
        assert replies["bad address"][0] == 501
        assert replies["tiny@example.org"][0] == 250  # declared 1500 fits in 2000
        lmtp.putcmd("data")
        assert lmtp.getreply()[0] == 354
        lmtp.send(message("first", 3000).replace(b"\r\n.", b"\r\n..") + b".\r\n")
        after = [lmtp.getreply() for _ in range(3)]
    assert [code for code, _ in after] == [250, 250, 552]  # tiny: 3000 bytes over its 2000 quota
    assert after[2][1].startswith(b"5.2.2")

    async def check() -> None:
        async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
            assert await mailbox_subjects(rpc, USERS[0]) == ["first"]
            assert await mailbox_subjects(rpc, USERS[1]) == ["first"]
            assert await mailbox_subjects(rpc, "tiny@example.org") == []
    asyncio.run(check())


def test_swaks_delivers_over_lmtp(cluster):
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by .ci/run"
    host, port = cluster.address("mss1", "lmtp")
    done = subprocess.run([swaks, "--protocol", "LMTP", "--server", host, "--port", str(port),
                           "--from", "sender@remote.test", "--to", f"{USERS[2]},{USERS[3]},nobody@example.org",
                           "--header", "Subject: via swaks", "--body", "hello from swaks"],
                          capture_output=True, text=True, timeout=60)
    out = done.stdout
    assert "<-  250 2.1.5" in out and "<** 550 5.1.1" in out, out
    assert out.count("delivered, uid 1") == 2, out

    async def check() -> None:
        async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
            assert await mailbox_subjects(rpc, USERS[2]) == ["via swaks"]
            assert await mailbox_subjects(rpc, USERS[3]) == ["via swaks"]
    asyncio.run(check())


def test_a_retried_delivery_with_the_same_key_is_stored_once(cluster):
    host, port = cluster.address("mss1", "lmtp")
    for _ in range(3):
        with smtplib.LMTP(host, port) as lmtp:
            lmtp.ehlo("mta.test")
            assert lmtp.sendmail("sender@remote.test", [USERS[4]], message("once"),
                                 mail_options=["XDELIVERYKEY=Q-once"]) == {}

    async def check() -> None:
        async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
            assert await mailbox_subjects(rpc, USERS[4]) == ["once"]
    asyncio.run(check())


# -- 2. the crash test ----------------------------------------------------------------------


def test_sigkill_under_lmtp_load_stores_every_acknowledged_message_exactly_once(cluster):
    kills = int(os.environ.get("INTERMAIL_MSS_KILLS", "6"))
    seed = int(os.environ.get("INTERMAIL_CRASH_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    host, port = cluster.address("mss1", "lmtp")
    acked: dict[tuple[str, str], int] = {}  # (user, id) -> 250s seen
    sent_ids: set[str] = set()
    per_worker = 40
    stop_killing = asyncio.Event()

    async def worker(w: int) -> None:
        """Deliver new messages until the killing stops (at least ``per_worker``), resending on failure."""
        client = None
        made = 0
        pending: list[str] = []
        while True:
            if not pending:
                if stop_killing.is_set() and made >= per_worker:
                    break
                pending.append(f"w{w}m{made}")
                made += 1
            ident = pending[0]
            recipients = [USERS[(w + k) % len(USERS)] for k in range(1 + w % 2)]
            try:
                if client is None:
                    client = await LmtpTestClient.connect(host, port, timeout=10)
                sent_ids.add(ident)
                replies = await client.send("sender@remote.test", recipients, message(ident, 2000),
                                            params=[f"XDELIVERYKEY={ident}"])
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                client = None
                await asyncio.sleep(0.05)
                continue
            if all(code == 250 for code, _ in replies.values()):
                for r in recipients:
                    acked[(r, ident)] = acked.get((r, ident), 0) + 1
                pending.pop(0)
            else:
                assert all(code // 100 == 4 for code, _ in replies.values() if code != 250), replies
                await asyncio.sleep(0.05)  # a temporary failure: resend the same message (same key)

    async def killer() -> None:
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            cluster.procs["mss1"].kill()
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            await asyncio.to_thread(lambda: cluster.procs["mss1"].start().wait_ready())
        stop_killing.set()

    async def scenario() -> None:
        await asyncio.gather(killer(), *(worker(w) for w in range(32)))
        async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
            for user in USERS:
                subjects = await mailbox_subjects(rpc, user)
                counts: dict[str, int] = {}
                for s in subjects:
                    counts[s] = counts.get(s, 0) + 1
                doubled = {s: n for s, n in counts.items() if n > 1}
                assert not doubled, f"seed {seed}: {user} has doubles {doubled}"
                for (u, ident) in acked:
                    if u == user:
                        assert counts.get(ident) == 1, f"seed {seed}: {user} lost {ident}"
                assert set(counts) <= sent_ids
    began = time.monotonic()
    asyncio.run(scenario())
    assert len(acked) >= 32 * per_worker, "not every message was acknowledged"
    print(f"{kills} kills, {len(acked)} deliveries acknowledged, {time.monotonic() - began:.1f} s, seed {seed}")


# -- 3. the store RPC against the real server ------------------------------------------------


def test_every_store_rpc_operation_against_a_running_mssd(cluster):
    user = USERS[5]

    async def scenario() -> None:
        async with RpcClient([cluster.address("mss1", "rpc")]) as rpc, \
                RpcClient([cluster.address("mss1", "rpc")]) as watcher1, \
                RpcClient([cluster.address("mss1", "rpc")]) as watcher2:
            boxes = (await rpc.call("mailbox.list", {"user": user}))["mailboxes"]
            assert {b["name"] for b in boxes} == {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"}
            await rpc.call("mailbox.create", {"user": user, "name": "Projects/2026"})
            await rpc.call("mailbox.rename", {"user": user, "name": "Projects", "new": "Work"})
            await rpc.call("mailbox.subscribe", {"user": user, "name": "Work/2026", "on": True})
            assert "Work/2026" in (await rpc.call("mailbox.subscriptions", {"user": user}))["names"]
            result, body = await rpc.call_stream("mailbox.select", {"user": user, "name": "INBOX"})
            await body.read()
            topic = f"mailbox:{result['id']}"
            seen1, seen2 = [], []
            await watcher1.subscribe([topic], lambda t, d: seen1.append(d))
            await watcher2.subscribe([topic], lambda t, d: seen2.append(d))
            data = message("appended", 5000)
            added = await rpc.call("message.append", {"user": user, "name": "INBOX", "flags": ["\\Draft"],
                                                      "date": 1_700_000_000}, body=data)
            uid = added["uid"]
            status = await rpc.call("mailbox.status", {"user": user, "name": "INBOX"})
            assert status["messages"] == 1 and status["uidnext"] == uid + 1 and status["unseen"] == 1
            _, body = await rpc.call_stream("message.body", {"user": user, "name": "INBOX", "uid": uid,
                                                             "offset": 10, "length": 100})
            assert await body.read() == data[10:110]
            changed = await rpc.call("message.store", {"user": user, "name": "INBOX", "uids": [[uid, uid]],
                                                       "mode": "+", "flags": ["\\Seen", "urgent"]})
            assert changed["changed"][0][0] == uid
            result, body = await rpc.call_stream("message.search", {"user": user, "name": "INBOX",
                                                                    "criteria": ["and", ["flag", "urgent"],
                                                                                 ["body", "LAZY DOG"]]})
            assert [json.loads(x) for x in (await body.read()).splitlines()] == [uid]
            copied = await rpc.call("message.copy", {"user": user, "name": "INBOX", "uids": [[uid, uid]],
                                                     "target": "Archive"})
            assert len(copied["pairs"]) == 1
            moved = await rpc.call("message.move", {"user": user, "name": "Archive", "uids": [[1, -1]],
                                                    "target": "Work/2026"})
            assert len(moved["pairs"]) == 1
            await rpc.call("message.store", {"user": user, "name": "INBOX", "uids": [[1, -1]], "mode": "+",
                                             "flags": ["\\Deleted"]})
            assert (await rpc.call("message.expunge", {"user": user, "name": "INBOX"}))["uids"] == [uid]
            usage = (await rpc.call("quota.usage", {"user": user}))["bytes"]
            assert usage == len(data)  # the copy in Work/2026 remains
            await rpc.call("mailbox.delete", {"user": user, "name": "Work/2026"})
            assert (await rpc.call("quota.usage", {"user": user}))["bytes"] == 0
            assert (await rpc.call("store.health", {}))["ok"] is True
            with pytest.raises(MailError) as refused:
                await rpc.call("mailbox.delete", {"user": user, "name": "INBOX"})
            assert refused.value.kind is ErrorKind.PERM
            with pytest.raises(MailError) as refused:
                await rpc.call("message.fetch", {"user": user, "name": "INBOX", "uids": "all"})
            assert refused.value.kind is ErrorKind.INVALID
            deadline = time.monotonic() + 5
            while len(seen2) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for seen in (seen1, seen2):  # INBOX only: append, +Seen, +Deleted, expunge
                assert [e["event"] for e in seen] == ["exists", "flags", "flags", "expunge"], seen
                assert seen[0]["uid"] == uid and seen[3]["uids"] == [uid]
    asyncio.run(scenario())


def test_garbage_on_the_ports_gets_errors_and_the_server_keeps_serving(cluster):
    for port_name, junk in (("lmtp", b"\x00\xff" * 600 + b"\r\n"), ("lmtp", b"MAIL FROM:<a@b>\r\n" * 20),
                            ("rpc", os.urandom(2048)), ("rpc", b"LHLO x\r\n")):
        with socket.create_connection(cluster.address("mss1", port_name), timeout=5) as sock:
            sock.sendall(junk)
            sock.settimeout(3)
            got = b""
            try:
                while chunk := sock.recv(65536):
                    got += chunk
            except (TimeoutError, ConnectionResetError):
                pass
        if port_name == "lmtp":
            assert b"500" in got or b"503" in got, got[:200]
        assert cluster.procs["mss1"].alive
    host, port = cluster.address("mss1", "lmtp")
    with smtplib.LMTP(host, port) as lmtp:
        lmtp.ehlo("mta.test")
        assert lmtp.sendmail("sender@remote.test", [USERS[6]], message("after junk")) == {}


# -- take-over by a spare --------------------------------------------------------------------


def test_a_spare_takes_over_the_identity_and_nothing_acknowledged_is_lost(tmp_path):
    cluster = make_cluster(tmp_path / "data")
    cluster.add("mss1b", "mss", identity="mss1", role="spare", ports={"rpc": 0, "metrics": 0})
    cluster.write()
    try:
        cluster.start_all(["dir1", "mss1", "mss1b"])
        cli(cluster, "domain", "add", "example.org")
        cli(cluster, "user", "add", USERS[0], "--password", "pw", "--mss", "mss1")
        host, port = cluster.address("mss1", "lmtp")

        async def deliver(idents: list[str]) -> None:
            client = await LmtpTestClient.connect(host, port)
            for ident in idents:
                replies = await client.send("s@remote.test", [USERS[0]], message(ident),
                                            params=[f"XDELIVERYKEY={ident}"])
                assert replies[USERS[0]][0] == 250, replies
            await client.close()

        async def scenario() -> None:
            async with RpcClient([cluster.address("mss1b", "rpc")]) as control:
                assert (await control.call("mss.status"))["role"] == "spare"
                await deliver([f"before{i}" for i in range(20)])
                cluster.procs["mss1"].kill()
                began = time.monotonic()
                answer = await control.call("mss.takeover", {"bind_timeout": 10})
                took = time.monotonic() - began
                assert answer["identity"] == "mss1"
                status = await control.call("mss.status")
                assert status["role"] == "active" and status["took_over"] is True and status["ok"] is True
            await deliver(["before3"] + [f"after{i}" for i in range(5)])  # a resend is still recognised
            async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
                subjects = sorted(await mailbox_subjects(rpc, USERS[0]))
            assert subjects == sorted([f"before{i}" for i in range(20)] + [f"after{i}" for i in range(5)])
            print(f"take-over answered in {took * 1000:.0f} ms")
        asyncio.run(scenario())
    finally:
        cluster.stop_all()
