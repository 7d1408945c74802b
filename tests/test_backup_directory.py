"""Directory backup and restore with real processes (I-7 for ``dird``).

A primary and two replicas; users provisioned through the CLI, ``intermail
backup directory`` while they serve, more users after it, then the primary's
database replaced by ``intermail restore directory`` and the primary started
without ``--init``: exactly the backed-up users exist and log in, on the
primary and on both replicas -- the one that was at the backup point adopts
the restored log, the one that had followed past it re-copies it -- and
writes after the restore reach both.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intermail.directory.db import Account, Unknown
from intermail.errors import ErrorKind, MailError
from tests.test_directory_cluster import cli, client_of, make_cluster, status, wait_caught_up

pytestmark = pytest.mark.timeout(240)

BEFORE = [f"u{n}@example.org" for n in range(5)]
AFTER = [f"late{n}@example.org" for n in range(3)]


def run_json(cluster, *argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--json", "--data", str(cluster.data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return json.loads(done.stdout)


def add_users(cluster, users: list[str]) -> None:
    for user in users:
        done = cli(cluster, "user", "add", user, "--password", f"pw-{user}")
        assert done.returncode == 0, done.stderr


async def wait_for(cluster, name: str, check, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = await status(cluster, name)
        if check(st):
            return st
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.1)


async def holds_exactly(cluster, name: str, present: list[str], absent: list[str]) -> None:
    async with client_of(cluster, name, cache_ttl=0, negative_ttl=0) as client:
        for user in present:
            assert isinstance(await client.resolve(user), Account), (name, user)
            account = await client.authenticate(user, f"pw-{user}")
            assert account.address == user
        for user in absent:
            assert isinstance(await client.resolve(user), Unknown), (name, user)
            with pytest.raises(MailError) as refused:
                await client.authenticate(user, f"pw-{user}")
            assert refused.value.kind is ErrorKind.PERM


def test_backup_restore_the_primary_and_replicas_follow_the_restored_log(tmp_path: Path):
    cluster = make_cluster(tmp_path / "data")
    try:
        cluster.start_all(["dir1", "dir2", "dir3"])
        assert cli(cluster, "domain", "add", "example.org").returncode == 0
        add_users(cluster, BEFORE)
        old_origin = asyncio.run(status(cluster, "dir1"))["origin"]

        backup_dir = tmp_path / "dir-backup"
        manifest = run_json(cluster, "backup", "directory", "--to", str(backup_dir))
        assert manifest["verified"] and manifest["kind"] == "directory"
        assert manifest["seq"] == 1 + len(BEFORE) and manifest["origin"] == old_origin
        assert (backup_dir / "MANIFEST.json").exists() and (backup_dir / "directory.db").exists()
        # a backup goes into a new directory only
        again = cli(cluster, "backup", "directory", "--to", str(backup_dir))
        assert again.returncode == 1 and "not empty" in again.stderr

        asyncio.run(wait_caught_up(cluster, ["dir2", "dir3"], manifest["seq"]))
        cluster.procs["dir3"].stop()  # dir3 stays at the backup point; dir2 follows past it
        add_users(cluster, AFTER)
        assert cli(cluster, "user", "passwd", BEFORE[0], stdin="changed\n").returncode == 0
        after_seq = asyncio.run(status(cluster, "dir1"))["last_seq"]
        asyncio.run(wait_caught_up(cluster, ["dir2"], after_seq))
        asyncio.run(holds_exactly(cluster, "dir2", BEFORE[1:] + AFTER, []))

        # The primary loses its database; restore it from the backup.
        cluster.procs["dir1"].stop()
        refused = cli(cluster, "restore", "directory", "--from", str(backup_dir), "--instance", "dir1")
        assert refused.returncode == 1 and "--force" in refused.stderr
        report = run_json(cluster, "restore", "directory", "--from", str(backup_dir), "--instance", "dir1",
                          "--force")
        assert report["seq"] == manifest["seq"] and report["accounts"] == len(BEFORE)
        assert report["origin"] != old_origin and report["restored_from"]["origin"] == old_origin
        cluster.procs["dir1"].start(init=False).wait_ready()
        st = asyncio.run(status(cluster, "dir1"))
        assert st["last_seq"] == manifest["seq"] and st["origin"] == report["origin"]
        asyncio.run(holds_exactly(cluster, "dir1", BEFORE, AFTER))  # BEFORE[0] has its backed-up password

        # dir2 had followed past the backup point: it re-copies the restored log.
        asyncio.run(wait_for(cluster, "dir2", lambda s: s["origin"] == report["origin"]
                             and s["last_seq"] == manifest["seq"] and not s.get("history_conflict")))
        asyncio.run(holds_exactly(cluster, "dir2", BEFORE, AFTER))
        # dir3 was at the backup point: it adopts the new log id and carries on.
        cluster.procs["dir3"].start(init=False).wait_ready()
        asyncio.run(wait_for(cluster, "dir3", lambda s: s["origin"] == report["origin"]
                             and not s.get("history_conflict")))
        # Writes after the restore reach both replicas.
        add_users(cluster, ["new@example.org"])
        seq = asyncio.run(status(cluster, "dir1"))["last_seq"]
        assert seq == manifest["seq"] + 1
        asyncio.run(wait_caught_up(cluster, ["dir2", "dir3"], seq))
        for name in ("dir2", "dir3"):
            asyncio.run(holds_exactly(cluster, name, BEFORE + ["new@example.org"], AFTER))
        log2 = cluster.procs["dir2"].log_file.read_text()
        assert "dir.replica_reseeded" in log2
        assert "dir.replica_adopted_restore" in cluster.procs["dir3"].log_file.read_text()
    finally:
        cluster.stop_all()


def test_restore_names_a_new_log_and_refuses_a_damaged_backup(tmp_path: Path):
    from intermail.directory.backup import restore_database, take_backup_sync
    from intermail.directory.db import DirectoryDB
    primary = DirectoryDB(tmp_path / "a.db")
    primary.add_domain("example.org")
    take_backup_sync(primary, str(tmp_path / "b"))
    report = restore_database(str(tmp_path / "b"), tmp_path / "restored.db")
    restored = DirectoryDB(tmp_path / "restored.db")
    assert restored.origin == report["origin"] != primary.origin
    assert restored.restored_from["origin"] == primary.origin and restored.list_domains() == ["example.org"]
    # a corrupted backup is refused before anything is written
    with open(tmp_path / "b" / "directory.db", "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 8)
    with pytest.raises(MailError) as bad:
        restore_database(str(tmp_path / "b"), tmp_path / "other.db")
    assert "SHA-256" in bad.value.safe and not (tmp_path / "other.db").exists()


# -- scheduled backups ([backup]) ---------------------------------------------------------------


def test_scheduled_backups_of_a_store_and_the_directory(tmp_path: Path):
    """mssd: fulls every 3 s, incrementals every 0.7 s, keep 2 chains; dird primary: a full every 3 s."""
    from intermail.testing.lmtpclient import LmtpTestClient
    from tests.test_mss_cluster import USERS
    from tests.test_mss_cluster import cli as mss_cli
    from tests.test_mss_cluster import make_cluster as mss_cluster
    from tests.test_mss_cluster import message
    root = tmp_path / "backups"
    cluster = mss_cluster(tmp_path / "data")
    cluster.sections["backup"] = {"dir": str(root), "full_interval": 3.0, "incremental_interval": 0.7, "keep": 2}
    cluster.write()
    try:
        cluster.start_all(["dir1", "mss1"])
        mss_cli(cluster, "domain", "add", "example.org")
        for user in USERS[:3]:
            mss_cli(cluster, "user", "add", user, "--password", "pw", "--mss", "mss1")
        host, port = cluster.address("mss1", "lmtp")

        async def deliver_for(seconds: float) -> int:
            client = await LmtpTestClient.connect(host, port, timeout=10)
            n = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                replies = await client.send("s@remote.test", [USERS[n % 3]], message(f"m{n}", 3000),
                                            params=[f"XDELIVERYKEY=m{n}"])
                assert all(code == 250 for code, _ in replies.values())
                n += 1
                await asyncio.sleep(0.02)
            return n

        delivered = asyncio.run(deliver_for(8.0))
        time.sleep(1.0)  # one more incremental after the last delivery
        cluster.procs["mss1"].stop()
        cluster.procs["dir1"].stop()

        def manifests(owner: str) -> list[dict]:
            found = []
            dirs = sorted((root / owner).iterdir())
            for d in dirs:
                m = d / "MANIFEST.json"
                if not m.exists():  # only a backup cut short by the stop; the next run deletes it
                    assert d == dirs[-1], f"{d}: a backup directory without its manifest"
                    continue
                found.append(json.loads(m.read_text()))
            return found

        store = manifests("mss1")
        kinds = [m["kind"] for m in store]
        assert kinds.count("full") == 2, kinds  # 3 or 4 were taken; keep = 2 chains
        assert kinds.count("incremental") >= 4, kinds
        assert all(m["verified"] for m in store)
        # the newest chain restores to the last backup's seq, which holds every delivery
        restored = run_json(cluster, "restore", "--from", str(root / "mss1"), "--store-dir", str(tmp_path / "r"))
        assert restored["fsck"]["ok"] and restored["seq"] == max(m["seq"] for m in store)
        assert sum(b["messages"] for b in restored["fsck"]["mailboxes"]) == delivered
        directory = manifests("dir1")
        assert 1 <= len(directory) <= 2 and all(m["kind"] == "directory" and m["verified"] for m in directory)
        assert directory[-1]["seq"] == 1 + 3  # the domain and three users
        log = cluster.procs["mss1"].log_file.read_text()
        assert "backup.pruned" in log and "backup.schedule_failed" not in log
    finally:
        cluster.stop_all()
