"""Online backup under load, point-in-time restore, and serving the result, with real processes (I-7).

An mssd takes LMTP deliveries from 8 clients and flag changes + expunges over
the store RPC while ``intermail backup`` takes one full and three
incrementals; each point restored (``intermail restore``) holds exactly the
acknowledged state at its seq -- compared with the live journal replayed to
that seq (fsck's scratch replay, not the backup path) and with what the
clients were told -- and an mssd started on a restore serves the mailboxes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from intermail.errors import ErrorKind, MailError
from intermail.rpc.client import RpcClient
from intermail.testing.lmtpclient import LmtpTestClient
from tests.test_mss_cluster import USERS, cli, make_cluster, message

pytestmark = pytest.mark.timeout(300)


def run_cli(cluster, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--json", "--data", str(cluster.data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return json.loads(done.stdout)


async def inbox(rpc: RpcClient, user: str) -> dict[int, list[str]]:
    result, body = await rpc.call_stream("mailbox.select", {"user": user, "name": "INBOX"}, idempotent=True)
    return {uid: sorted(flags) for uid, flags, _ in (json.loads(line) for line in (await body.read()).splitlines())}


def test_backups_under_load_restore_to_each_point_and_serve(tmp_path: Path):
    cluster = make_cluster(tmp_path / "data")
    try:
        cluster.start_all(["dir1", "mss1"])
        cli(cluster, "domain", "add", "example.org")
        for user in USERS:
            cli(cluster, "user", "add", user, "--password", "pw", "--mss", "mss1")
        host, port = cluster.address("mss1", "lmtp")
        stop = asyncio.Event()
        acked: list[tuple[str, str]] = []

        async def deliverer(w: int) -> None:
            client = await LmtpTestClient.connect(host, port, timeout=10)
            n = 0
            while not stop.is_set():
                ident = f"w{w}m{n}"
                user = USERS[(w + n) % len(USERS)]
                replies = await client.send("s@remote.test", [user], message(ident, 4000),
                                            params=[f"XDELIVERYKEY={ident}"])
                assert all(code == 250 for code, _ in replies.values())
                acked.append((user, ident))
                n += 1

        async def flagger(rpc: RpcClient) -> None:
            k = 0
            while not stop.is_set():
                user = USERS[k % len(USERS)]
                try:
                    await rpc.call("message.store", {"user": user, "name": "INBOX", "uids": [[1 + k % 7, 3 + k % 7]],
                                                     "mode": "+", "flags": ["\\Deleted" if k % 3 == 0 else "\\Seen"]})
                    if k % 5 == 0:
                        await rpc.call("message.expunge", {"user": user, "name": "INBOX"})
                except MailError as exc:
                    assert exc.kind is ErrorKind.NOTFOUND  # no INBOX yet
                    await asyncio.sleep(0.05)
                k += 1
                await asyncio.sleep(0.01)

        async def scenario() -> list[dict]:
            manifests = []
            async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
                load = [asyncio.ensure_future(deliverer(w)) for w in range(8)]
                load.append(asyncio.ensure_future(flagger(rpc)))
                await asyncio.sleep(1.0)
                for i, kind in enumerate(["full", "incremental", "incremental", "incremental"]):
                    before = len(acked)
                    m = await asyncio.to_thread(run_cli, cluster, "backup", kind, "--store", "mss1",
                                                "--to", str(tmp_path / f"b{i}"))
                    m["acked_before"] = acked[:before]
                    manifests.append(m)
                    await asyncio.sleep(0.7)
                stop.set()
                await asyncio.gather(*load)
            return manifests

        manifests = asyncio.run(scenario())
        assert all(m["verified"] for m in manifests)
        for a, b in zip(manifests, manifests[1:]):
            assert b["base"]["seq"] == a["seq"] and b["first_seq"] == a["seq"] and b["seq"] > a["seq"]
        cluster.procs["mss1"].stop()
        live = tmp_path / "data" / "stores" / "mss1"
        sources = [f"--from={tmp_path / f'b{i}'}" for i in range(4)]
        # The truth at seq S: the live journal replayed to S (fsck's scratch index).
        from intermail.mailstore.fsck import reference_digest
        points = [m["seq"] for m in manifests]
        points.insert(2, (points[1] + points[2]) // 2)  # and a point between two backups
        for i, seq in enumerate(points):
            out = tmp_path / f"r{i}"
            report = run_cli(cluster, "restore", *sources, "--to-seq", str(seq), "--store-dir", str(out))
            assert report["fsck"]["ok"] and report["seq"] == seq, report
            assert reference_digest(str(out)) == reference_digest(str(live), upto=seq)
        # Serve the last restore under the identity; every delivery acknowledged before it began is there.
        last = manifests[-1]
        proc = subprocess.Popen([sys.executable, "-m", "services.mssd", "--config", str(cluster.config_path),
                                 "--instance", "mss1", "--data", str(cluster.data), "--store-dir",
                                 str(tmp_path / "r4")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            import time
            ready = cluster.procs["mss1"].ready_file
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if ready.exists() and json.loads(ready.read_text()).get("pid") == proc.pid:
                    break
                time.sleep(0.05)

            async def check() -> None:
                async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
                    subjects: dict[str, set[str]] = {}
                    for user in USERS:
                        result, body = await rpc.call_stream("message.fetch", {"user": user, "name": "INBOX",
                                                                               "uids": [[1, -1]]}, idempotent=True)
                        from intermail.mailstore import mime
                        subjects[user] = {mime.from_json(json.loads(line)["info"]).envelope.subject
                                          for line in (await body.read()).splitlines()}
                    expunged_somewhere = 0
                    for user, ident in last["acked_before"]:
                        if ident.encode() not in {s.encode() if isinstance(s, str) else s for s in subjects[user]}:
                            expunged_somewhere += 1
                    assert sum(len(s) for s in subjects.values()) > 0
                    # Missing ones were expunged (the flagger deletes low UIDs): never more than it touched.
                    assert expunged_somewhere <= 10 * len(USERS), expunged_somewhere
            asyncio.run(check())
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        cluster.stop_all()
