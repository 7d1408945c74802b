"""Online backup, point-in-time restore and fsck of a mail store, in process (I-7, I-3).

The process-level tests (a running mssd under LMTP load, the CLI) are in
tests/test_backup.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from intermail.admin.backup import restore_store
from intermail.mailstore.fsck import fsck
from intermail.mailstore.store import Mailstore, Recipient
from intermail.storage import StoreOptions
from intermail.storage.backup import BackupError, restore, store_mirrors
from intermail.storage.journal import segment_name

USER = "a@example.org"


def message(ident: str, size: int = 3000) -> bytes:
    head = f"From: x@remote.test\r\nTo: {USER}\r\nSubject: {ident}\r\nMessage-ID: <{ident}@r>\r\n\r\n".encode()
    return head + b"body line of text for the backup tests.\r\n" * (size // 40)


def options(root: Path, **kw) -> StoreOptions:
    return StoreOptions(mirrors=(str(root / "mirror-1"), str(root / "mirror-2")), preallocate=False, **kw)


async def deliver(mail: Mailstore, n: int, tag: str) -> None:
    await asyncio.gather(*(mail.deliver([Recipient(USER, key=f"{tag}{i}:{USER}")], message(f"{tag}{i}"))
                           for i in range(n)))


async def settle(mail: Mailstore) -> None:
    """Let an automatic checkpoint (compaction: it moves blobs, in new journal records) finish, so the
    live digest taken next is the state at the last acknowledged seq and nothing runs behind it."""
    task = mail.store._checkpoint_task
    if task is not None:
        await task


async def state(root: Path) -> str:
    mail = await Mailstore.open(StoreOptions(mirrors=store_mirrors(str(root)), preallocate=False))
    try:
        return await mail.store.digest()
    finally:
        await mail.close()


def test_full_and_incrementals_restore_each_point_and_points_between(tmp_path: Path):
    async def scenario():
        mail = await Mailstore.open(options(tmp_path / "live", segment_bytes=64 << 10,
                                            auto_checkpoint_bytes=200 << 10))
        points = []  # (backup dir, seq, digest)
        await deliver(mail, 40, "a")
        # Writers keep going while the full backup is taken.
        load = asyncio.ensure_future(deliver(mail, 40, "b"))
        full = await mail.store.backup(str(tmp_path / "b0"), "full")
        await load
        points.append((tmp_path / "b0", full["seq"]))
        mid_digests = {}
        digests = {}
        for k in range(1, 4):
            await mail.store_flags(USER, "INBOX", [(1, 10 * k)], "+", ["\\Seen", f"k{k}"])
            await mail.store_flags(USER, "INBOX", [(k, k + 2)], "+", ["\\Deleted"])
            await mail.expunge(USER, "INBOX")
            await settle(mail)
            mid_digests[mail.store._acked_seq] = await mail.store.digest()
            await deliver(mail, 30, f"c{k}")
            await settle(mail)
            inc = await mail.store.backup(str(tmp_path / f"b{k}"), "incremental")
            assert inc["base"]["seq"] == points[-1][1]
            points.append((tmp_path / f"b{k}", inc["seq"]))
            digests[inc["seq"]] = await mail.store.digest()  # nothing in flight: the state at that seq
        assert mail.store.report is not None
        await mail.close()
        return points, mid_digests, digests

    points, mids, digests = asyncio.run(scenario())
    sources = [str(p) for p, _ in points]
    # Each backup point, restored from the chain, equals the live store replayed to that seq.
    for i, (_, seq) in enumerate(points):
        out = tmp_path / f"r{i}"
        report = restore_store(sources, str(out), to_seq=seq)
        assert report["seq"] == seq
        got = report["fsck"]
        assert got["ok"], got
        assert got["seq"] == seq
        if seq in digests:
            assert asyncio.run(state(out)) == digests[seq]
    # Points in between two backups.
    for seq, want in mids.items():
        out = tmp_path / f"pit{seq}"
        restore(sources, [str(out / "mirror-1"), str(out / "mirror-2")], to_seq=seq)
        assert asyncio.run(state(out)) == want
    # Retirement kept what the incrementals needed; a seq after the chain is refused.
    with pytest.raises(BackupError):
        restore(sources, [str(tmp_path / "bad")], to_seq=points[-1][1] + 1000)


def _store_with_mail(root: Path) -> None:
    async def go():
        mail = await Mailstore.open(options(root))
        await deliver(mail, 30, "m")
        await mail.store_flags(USER, "INBOX", [(1, 5)], "+", ["\\Deleted"])
        await mail.expunge(USER, "INBOX")
        await mail.close()
    asyncio.run(go())


def test_fsck_clean_store_reports_mailboxes(tmp_path: Path):
    _store_with_mail(tmp_path)
    report = fsck(str(tmp_path))
    assert report["ok"], report
    inbox = next(b for b in report["mailboxes"] if b["mailbox"] == "INBOX")
    assert inbox["user"] == USER and inbox["messages"] == 25 and inbox["uidnext"] == 31


def test_fsck_finds_and_repairs_a_corrupted_blob(tmp_path: Path):
    _store_with_mail(tmp_path)
    seg = tmp_path / "mirror-2" / segment_name(1)
    data = bytearray(seg.read_bytes())
    at = data.find(b"Subject: m7")
    data[at + 20] ^= 0xFF
    seg.write_bytes(bytes(data))
    report = fsck(str(tmp_path))
    assert not report["ok"]
    kinds = {p["kind"] for p in report["problems"]}
    assert "blob_corrupt" in kinds and "frame_corrupt" in kinds, report
    repaired = fsck(str(tmp_path), do_repair=True)
    assert repaired["ok"], repaired
    assert fsck(str(tmp_path))["ok"]


def test_fsck_finds_and_repairs_a_truncated_index(tmp_path: Path):
    _store_with_mail(tmp_path)
    index = tmp_path / "mirror-1" / "index.sqlite"
    before = asyncio.run(state(tmp_path))
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(index) + suffix):
            os.unlink(str(index) + suffix)
    os.truncate(index, os.path.getsize(index) // 3)
    report = fsck(str(tmp_path))
    assert not report["ok"] and {p["kind"] for p in report["problems"]} & {"index_damaged", "index_mismatch"}, report
    assert fsck(str(tmp_path), do_repair=True)["ok"]
    assert asyncio.run(state(tmp_path)) == before


def test_fsck_finds_and_repairs_a_deleted_index(tmp_path: Path):
    _store_with_mail(tmp_path)
    before = asyncio.run(state(tmp_path))
    for suffix in ("", "-wal", "-shm"):
        path = str(tmp_path / "mirror-1" / "index.sqlite") + suffix
        if os.path.exists(path):
            os.unlink(path)
    report = fsck(str(tmp_path))
    assert [p["kind"] for p in report["problems"]] == ["index_missing"], report
    assert fsck(str(tmp_path), do_repair=True)["ok"]
    assert asyncio.run(state(tmp_path)) == before


def test_fsck_finds_a_changed_index_row(tmp_path: Path):
    _store_with_mail(tmp_path)
    import sqlite3
    conn = sqlite3.connect(tmp_path / "mirror-1" / "index.sqlite")
    conn.execute("UPDATE messages SET flags = 'bogus' WHERE uid = 9")
    conn.commit()
    conn.close()
    report = fsck(str(tmp_path))
    assert [p["kind"] for p in report["problems"]] == ["index_mismatch"], report
    assert fsck(str(tmp_path), do_repair=True)["ok"]
    shutil.rmtree(tmp_path / "mirror-2")


def test_an_incremental_of_an_idle_store_is_empty_and_restores(tmp_path: Path):
    """A full of an empty store, then incrementals with nothing new (as a schedule takes them), then one with mail."""
    async def scenario():
        mail = await Mailstore.open(options(tmp_path / "live"))
        try:
            full = await mail.store.backup(str(tmp_path / "b0"), "full")
            idle = await mail.store.backup(str(tmp_path / "b1"), "incremental")
            assert full["seq"] == idle["seq"] and idle["extents"] == []
            await deliver(mail, 5, "x")
            last = await mail.store.backup(str(tmp_path / "b2"), "incremental")
            return last["seq"]
        finally:
            await mail.close()
    seq = asyncio.run(scenario())
    report = restore_store([str(tmp_path / f"b{i}") for i in range(3)], str(tmp_path / "r"))
    assert report["seq"] == seq and report["fsck"]["ok"]
    assert sum(b["messages"] for b in report["fsck"]["mailboxes"]) == 5
