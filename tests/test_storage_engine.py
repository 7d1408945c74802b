"""Functional tests of the storage engine (intermail.storage.engine) through its public API.

Commit and read, group commit (I-2), read-your-writes, checkpoints retiring
segments, compaction, the index as a derived view (deleted or damaged:
rebuilt with the same digest, I-3), the recovery report, blob ids that are
never reused.  Everything in-process with :class:`~intermail.testing.kv.KvApplier`;
crashes are in ``test_storage_crash.py``, mirrors in ``test_storage_mirrors.py``,
fencing in ``test_storage_fencing.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest

from intermail.errors import ErrorKind, MailError
from intermail.storage import Store, StoreOptions, rebuild_index
from intermail.storage.fileops import FaultyFileOps
from intermail.testing import kv
from intermail.storage import records as rec
from intermail.testing.crashwriter import body_for


def options_for(tmp_path, n: int = 2, **kw) -> StoreOptions:
    return StoreOptions(mirrors=tuple(str(tmp_path / f"m{i}") for i in range(n)), **kw)


async def put(store: Store, item_id: str, body: bytes | None = None) -> tuple[int, int]:
    """Commit one PUT; return (seq, blob id)."""
    txn = store.transaction()
    blob = kv.put(txn, item_id, body)
    return await txn.commit(), blob


async def delete(store: Store, item_id: str, blob: int = 0) -> int:
    txn = store.transaction()
    kv.delete(txn, item_id, blob)
    return await txn.commit()


def segment_files(mirror: str) -> list[str]:
    return sorted(n for n in os.listdir(mirror) if n.endswith(".seg"))


def segment_bytes_on_disk(mirror: str) -> int:
    """Blocks actually allocated to segment files (preallocated files have the same st_size)."""
    return sum(os.stat(os.path.join(mirror, n)).st_blocks * 512 for n in segment_files(mirror))


async def rebuilt_digest(options: StoreOptions) -> str:
    store = await rebuild_index(options, kv.KvApplier())
    try:
        assert store.report.index_rebuilt
        return await store.digest()
    finally:
        await store.close()


# -- commit and read -------------------------------------------------------------------------------------


async def test_commit_and_read(tmp_path):
    options = options_for(tmp_path)
    store = await Store.open(options, kv.KvApplier())
    try:
        seq1, blob1 = await put(store, "a", b"hello")
        seq2, blob2 = await put(store, "b")
        seq3, blob3 = await put(store, "c", b"")
        assert (seq1, seq2, seq3) == (1, 2, 3)
        assert blob1 and blob2 == 0 and blob3 and blob3 != blob1
        assert await store.read(kv.counts) == {"a": 1, "b": 1, "c": 1}
        assert await store.read_blob(blob1) == b"hello"
        assert await store.read_blob(blob3) == b""
        rows = await store.read(lambda c: c.execute("SELECT id, blob, seq FROM items ORDER BY id").fetchall())
        assert rows == [("a", blob1, 1), ("b", 0, 2), ("c", blob3, 3)]
        await delete(store, "a", blob1)
        assert await store.read(kv.counts) == {"b": 1, "c": 1}
        with pytest.raises(MailError) as err:
            await store.read_blob(blob1)  # freed with the delete
        assert err.value.kind is ErrorKind.NOTFOUND
        # a transaction that is dropped leaves no trace
        txn = store.transaction()
        kv.put(txn, "dropped", b"x")
        del txn
        assert store.applied_seq == 4
        h = store.health()
        assert h["ok"] and not h["fenced"] and h["applied_seq"] == 4 and h["next_seq"] == 5
        assert [m["healthy"] for m in h["mirrors"]] == [True, True]
    finally:
        await store.close()
    store = await Store.open(options, kv.KvApplier())
    try:
        assert await store.read(kv.counts) == {"b": 1, "c": 1}
        assert await store.read_blob(blob3) == b""
        assert (await put(store, "d"))[0] == 5
    finally:
        await store.close()


async def test_large_body_and_iter_blob(tmp_path):
    store = await Store.open(options_for(tmp_path, segment_bytes=256 << 10), kv.KvApplier())
    try:
        body = random.Random(1).randbytes(1 << 20)  # bigger than a segment
        _, blob = await put(store, "big", body)
        assert await store.read_blob(blob) == body
        chunks = [c async for c in store.iter_blob(blob, chunk=100_000)]
        assert b"".join(chunks) == body and len(chunks) == 11
    finally:
        await store.close()


async def test_empty_transaction_commits(tmp_path):
    store = await Store.open(options_for(tmp_path), kv.KvApplier())
    try:
        assert await store.transaction().commit() == 1
        assert (await put(store, "a"))[0] == 2
    finally:
        await store.close()


# -- group commit (I-2) and read-your-writes ------------------------------------------------------------------


async def test_concurrent_commits_share_flushes(tmp_path):
    store = await Store.open(options_for(tmp_path), kv.KvApplier())
    try:
        async def writer(t: int) -> list[int]:
            return [(await put(store, f"t{t}-{n}", body_for(f"t{t}-{n}", 100)))[0] for n in range(20)]

        seqs = await asyncio.gather(*(writer(t) for t in range(50)))
        flat = sorted(s for task in seqs for s in task)
        assert flat == list(range(1, 1001))  # every commit got its own seq, none lost
        assert store.stats.commits == 1000
        assert store.stats.flushes < store.stats.commits / 4, store.stats.flushes
        assert max(store.stats.batch_sizes) > 1
        assert len(await store.read(kv.counts)) == 1000
    finally:
        await store.close()


async def test_read_your_writes(tmp_path):
    store = await Store.open(options_for(tmp_path), kv.KvApplier())
    try:
        async def writer(t: int) -> None:
            for n in range(30):
                item = f"t{t}-{n}"
                _, blob = await put(store, item, item.encode())
                # the commit returned: every read from now on sees it
                assert (await store.read(kv.counts)).get(item) == 1, item
                assert await store.read_blob(blob) == item.encode()
                assert await store.digest()

        await asyncio.gather(*(writer(t) for t in range(10)))
    finally:
        await store.close()


# -- checkpoints and compaction -------------------------------------------------------------------------------


async def test_checkpoint_retires_segments(tmp_path):
    options = options_for(tmp_path, segment_bytes=16 << 10)
    m0 = options.mirrors[0]
    store = await Store.open(options, kv.KvApplier())
    try:
        blobs = {}
        for n in range(200):
            _, blobs[f"i{n}"] = await put(store, f"i{n}", body_for(f"i{n}", 1000))
        before = segment_files(m0)
        assert len(before) > 10
        for item, blob in blobs.items():
            if item != "i199":
                await delete(store, item, blob)
        seq = await store.checkpoint()
        assert seq == store.applied_seq
        after = segment_files(m0)
        assert len(after) <= 4, after  # the live blob's segment, the current one, maybe one between
        assert segment_files(options.mirrors[1]) == after
        assert [n for n in os.listdir(m0) if n.endswith(".ckpt")] == [f"c{seq:020d}.ckpt"]
        assert await store.read_blob(blobs["i199"]) == body_for("i199", 1000)
        live_digest = await store.digest()
    finally:
        await store.close()
    assert await rebuilt_digest(options) == live_digest
    store = await Store.open(options, kv.KvApplier())
    try:
        assert await store.read(kv.counts) == {"i199": 1}
        assert await store.read_blob(blobs["i199"]) == body_for("i199", 1000)
    finally:
        await store.close()


async def test_auto_checkpoint(tmp_path):
    options = options_for(tmp_path, segment_bytes=16 << 10, auto_checkpoint_bytes=64 << 10)
    store = await Store.open(options, kv.KvApplier())
    try:
        for n in range(100):
            seq, blob = await put(store, f"i{n}", body_for(f"i{n}", 2000))
            await delete(store, f"i{n}", blob)
        for _ in range(100):
            if store.stats.checkpoints:
                break
            await asyncio.sleep(0.01)
        assert store.stats.checkpoints >= 1
        assert any(n.endswith(".ckpt") for n in os.listdir(options.mirrors[0]))
    finally:
        await store.close()


async def test_compact_moves_live_blobs_and_frees_space(tmp_path):
    options = options_for(tmp_path, segment_bytes=32 << 10)
    m0 = options.mirrors[0]
    store = await Store.open(options, kv.KvApplier())
    try:
        blobs = {}
        for n in range(300):
            _, blobs[f"i{n}"] = await put(store, f"i{n}", body_for(f"i{n}", 1500))
        keep = {f"i{n}" for n in range(0, 300, 10)}  # one in ten stays: every segment is sparse
        for item, blob in blobs.items():
            if item not in keep:
                await delete(store, item, blob)
        await store.checkpoint()
        usage_before = segment_bytes_on_disk(m0)
        files_before = len(segment_files(m0))
        locations_before = await store.read(lambda c: dict(c.execute("SELECT id, segment FROM _blobs")))
        moved = await store.compact()
        assert moved == len(keep)
        locations_after = await store.read(lambda c: dict(c.execute("SELECT id, segment FROM _blobs")))
        assert set(locations_after) == set(locations_before)
        assert all(locations_after[b] > max(locations_before.values()) for b in locations_after)
        assert len(segment_files(m0)) < files_before / 3
        assert segment_bytes_on_disk(m0) < usage_before / 2, (usage_before, segment_bytes_on_disk(m0))
        for item in keep:
            assert await store.read_blob(blobs[item]) == body_for(item, 1500)
        assert await store.read(kv.counts) == {i: 1 for i in keep}
        live_digest = await store.digest()
    finally:
        await store.close()
    assert await rebuilt_digest(options) == live_digest
    store = await Store.open(options, kv.KvApplier())
    try:
        for item in keep:
            assert await store.read_blob(blobs[item]) == body_for(item, 1500)
    finally:
        await store.close()


# -- the index is derived (I-3) -------------------------------------------------------------------------------


async def _populate(options: StoreOptions, checkpoint_at: int | None = 60) -> tuple[dict, str]:
    store = await Store.open(options, kv.KvApplier())
    try:
        blobs = {}
        for n in range(100):
            _, blobs[f"i{n}"] = await put(store, f"i{n}", body_for(f"i{n}", n * 10) if n % 3 else None)
            if n % 7 == 0 and n:
                await delete(store, f"i{n - 1}", blobs.pop(f"i{n - 1}"))
            if n == checkpoint_at:
                await store.checkpoint()
        return blobs, await store.digest()
    finally:
        await store.close()


def index_files(options: StoreOptions) -> list[str]:
    base = options.index_file()
    return [base + s for s in ("", "-wal", "-shm") if os.path.exists(base + s)]


@pytest.mark.parametrize("checkpoint_at", [None, 60])
async def test_index_deleted_is_rebuilt_on_open(tmp_path, checkpoint_at):
    options = options_for(tmp_path, segment_bytes=16 << 10)
    blobs, digest = await _populate(options, checkpoint_at)
    for path in index_files(options):
        os.unlink(path)
    store = await Store.open(options, kv.KvApplier())
    try:
        r = store.report
        if checkpoint_at is None:  # no checkpoint: an empty index and the whole journal replayed
            assert r.applied_before == 0 and r.replayed_frames == r.last_seq > 100, r
        else:  # from the checkpoint, then the journal after it
            assert r.index_rebuilt and r.checkpoint_seq > 0 and r.replayed_frames == r.last_seq - r.checkpoint_seq, r
        assert await store.digest() == digest
        for item, blob in blobs.items():
            if blob:
                assert await store.read_blob(blob) == body_for(item, int(item[1:]) * 10)
    finally:
        await store.close()


@pytest.mark.parametrize("where", ["header", "whole"])
async def test_index_overwritten_with_garbage_is_rebuilt(tmp_path, where):
    options = options_for(tmp_path, segment_bytes=16 << 10)
    _, digest = await _populate(options)
    path = options.index_file()
    size = os.path.getsize(path)
    rng = random.Random(7)
    with open(path, "r+b") as f:
        f.write(rng.randbytes(100 if where == "header" else size))
    store = await Store.open(options, kv.KvApplier())
    try:
        assert store.report.index_rebuilt
        assert await store.digest() == digest
        assert len(await store.read(kv.counts)) > 50
    finally:
        await store.close()


# Regression test for an engine bug (found by this test, since fixed): damaged index pages (header intact) are
# not detected at open: Store.open raises DatabaseError or reads fail 'malformed'
@pytest.mark.parametrize("damaged_from", [0.5, 0.75])
async def test_index_with_damaged_pages_is_rebuilt(tmp_path, damaged_from):
    """Garbage over the second half of the index file, its header intact: SQLite opens it happily."""
    options = options_for(tmp_path, segment_bytes=16 << 10)
    _, digest = await _populate(options)
    path = options.index_file()
    size = os.path.getsize(path)
    assert size >= 6 * 4096
    rng = random.Random(8)
    start = int(size * damaged_from) // 4096 * 4096
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(rng.randbytes(size - start))
    store = await Store.open(options, kv.KvApplier())
    try:
        assert await store.digest() == digest
        assert len(await store.read(kv.counts)) > 50
    finally:
        await store.close()


async def test_rebuild_index_equals_live_index_after_crash_like_close(tmp_path):
    """The live index (with replay) and one rebuilt from checkpoint + journal hold the same rows."""
    options = options_for(tmp_path, segment_bytes=16 << 10)
    _, digest = await _populate(options)
    assert await rebuilt_digest(options) == digest
    assert await rebuilt_digest(options) == digest


# -- recovery report -----------------------------------------------------------------------------------------------


def frames_end(data: bytes) -> int:
    """Offset just past the last valid frame of a segment file's bytes."""
    pos = rec.SEG_HEADER_SIZE
    while True:
        try:
            pos += rec.decode_frame(data, pos).size
        except rec.FrameError:
            return pos


async def test_recovery_report_fields(tmp_path):
    options = options_for(tmp_path, segment_bytes=16 << 10)
    store = await Store.open(options, kv.KvApplier())
    r = store.report
    assert (r.epoch, r.applied_before, r.replayed_frames, r.last_seq, r.checkpoint_seq) == (1, 0, 0, 0, 0)
    assert not r.index_rebuilt and r.tail_cut_bytes == 0 and r.seconds >= 0
    for n in range(10):
        await put(store, f"i{n}", b"x" * 100)
    await store.close()

    store = await Store.open(options, kv.KvApplier())
    r = store.report
    assert (r.epoch, r.applied_before, r.last_seq, r.replayed_frames, r.index_rebuilt) == (2, 10, 10, 0, False)
    for n in range(10, 40):
        await put(store, f"i{n}", b"y" * 1000)
    ckpt_seq = await store.checkpoint()
    await put(store, "after", b"z")
    await store.close()
    assert ckpt_seq == 40

    for path in index_files(options):
        os.unlink(path)
    m0 = options.mirrors[0]
    with open(os.path.join(m0, "stray.tmp"), "wb") as f:
        f.write(b"half a file")
    store = await Store.open(options, kv.KvApplier())
    r = store.report
    assert r.epoch == 3 and r.index_rebuilt and r.checkpoint_seq == 40
    assert r.replayed_frames == 1 and r.last_seq == 41
    assert r.orphans_removed >= 1 and not os.path.exists(os.path.join(m0, "stray.tmp"))
    assert len(await store.read(kv.counts)) == 41
    await store.close()

    # A torn tail: garbage after the last frame of the last segment, on both mirrors.
    last = segment_files(m0)[-1]
    store = await Store.open(options, kv.KvApplier())
    await put(store, "tail", b"t")
    await store.close()
    last = segment_files(m0)[-1]
    for m in options.mirrors:
        path = os.path.join(m, last)
        with open(path, "rb") as f:
            data = f.read()
        end = frames_end(data)  # not data.rstrip(b"\0"): a frame may end in zero bytes
        with open(path, "r+b") as f:
            f.seek(end)
            f.write(b"\x01torn frame bytes")
    store = await Store.open(options, kv.KvApplier())
    r = store.report
    assert r.tail_cut_bytes > 0 and r.last_seq == 42 and r.replayed_frames == 0
    assert (await store.read(kv.counts))["tail"] == 1
    await store.close()

    # A segment whose header never became durable (created, not yet written) is dropped.
    header_less = os.path.join(m0, f"j{int(last[1:11]) + 5:010d}.seg")
    with open(header_less, "wb") as f:
        f.write(bytes(100))
    store = await Store.open(options, kv.KvApplier())
    assert store.report.torn_segments_removed == 1 and not os.path.exists(header_less)
    assert len(await store.read(kv.counts)) == 42
    await store.close()


# -- blob ids ---------------------------------------------------------------------------------------------------------


async def test_blob_ids_never_reused(tmp_path):
    options = options_for(tmp_path, segment_bytes=16 << 10)
    seen: set[int] = set()

    async def batch(store: Store, prefix: str, n: int, delete_all: bool) -> None:
        ids = []
        for i in range(n):
            _, blob = await put(store, f"{prefix}{i}", b"b" * 500)
            assert blob not in seen, f"blob id {blob} reused"
            assert not seen or blob > max(seen)
            seen.add(blob)
            ids.append((f"{prefix}{i}", blob))
        if delete_all:  # the newest ids are freed: a naive "max live id + 1" would hand them out again
            for item, blob in ids:
                await delete(store, item, blob)

    store = await Store.open(options, kv.KvApplier())
    await batch(store, "a", 20, False)
    await batch(store, "b", 20, True)
    await store.close()
    store = await Store.open(options, kv.KvApplier())  # restart
    await batch(store, "c", 5, True)
    await store.checkpoint()
    await store.close()
    store = await Store.open(options, kv.KvApplier())  # restart after a checkpoint
    await batch(store, "d", 5, True)
    await store.compact()
    await store.close()
    store = await rebuild_index(options, kv.KvApplier())  # index rebuilt from checkpoint + journal
    await batch(store, "e", 5, True)
    await store.checkpoint()
    await store.close()
    for path in index_files(options):
        os.unlink(path)
    store = await Store.open(options, kv.KvApplier())  # index rebuilt from the checkpoint alone
    await batch(store, "f", 5, False)
    await store.close()


# -- races between compaction and the writers ----------------------------------------------------------------------------


# Regression test for an engine bug (found by this test, since fixed): compact() fails with NOTFOUND when a blob
# it is about to move is deleted meanwhile (engine.py compact)
async def test_compact_races_with_delete(tmp_path):
    """A delete committed while compact() is moving a segment's live blobs."""
    options = options_for(tmp_path, segment_bytes=16 << 10)
    store = await Store.open(options, kv.KvApplier())
    try:
        blobs = {}
        for n in range(60):
            _, blobs[f"i{n}"] = await put(store, f"i{n}", body_for(f"i{n}", 1000))
        for n in range(60):
            if n % 5:
                await delete(store, f"i{n}", blobs.pop(f"i{n}"))
        # The first blob compact() reads gets deleted (by another task) before compact moves it.
        victim_item, victim_blob = sorted(blobs.items(), key=lambda kv_: kv_[1])[0]
        real_read_blob = store.read_blob
        raced = False

        async def read_blob_then_delete(blob_id: int) -> bytes:
            nonlocal raced
            if not raced:
                raced = True
                await delete(store, victim_item, blobs.pop(victim_item))
            return await real_read_blob(blob_id)

        store.read_blob = read_blob_then_delete
        await store.compact()
        store.read_blob = real_read_blob
        assert raced
        live = await store.read(lambda c: {r[0] for r in c.execute("SELECT id FROM _blobs")})
        assert victim_blob not in live, "compact() brought a freed blob back to life"
        assert live == set(blobs.values())
    finally:
        await store.close()


# Regression test for an engine bug (found by this test, since fixed): compact() re-inserts the _blobs row of a
# blob that was freed between its read and its move (engine.py compact / _move_blob)
async def test_compact_must_not_resurrect_a_blob_freed_while_moving(tmp_path):
    """The other order: the blob is read by compact, then deleted, then compact's move commits."""
    options = options_for(tmp_path, segment_bytes=16 << 10)
    store = await Store.open(options, kv.KvApplier())
    try:
        blobs = {}
        for n in range(60):
            _, blobs[f"i{n}"] = await put(store, f"i{n}", body_for(f"i{n}", 1000))
        for n in range(60):
            if n % 5:
                await delete(store, f"i{n}", blobs.pop(f"i{n}"))
        victim_item = sorted(blobs.items(), key=lambda kv_: kv_[1])[0][0]
        victim_blob = blobs[victim_item]
        real_read_blob = store.read_blob
        raced = False

        async def read_blob_and_race(blob_id: int) -> bytes:
            nonlocal raced
            data = await real_read_blob(blob_id)
            if blob_id == victim_blob and not raced:
                raced = True
                await delete(store, victim_item, blobs.pop(victim_item))  # after the read, before the move
            return data

        store.read_blob = read_blob_and_race
        await store.compact()
        store.read_blob = real_read_blob
        assert raced
        live = await store.read(lambda c: {r[0] for r in c.execute("SELECT id FROM _blobs")})
        assert live == set(blobs.values()), "compact() brought a freed blob back to life"
        digest = await store.digest()
    finally:
        await store.close()
    assert await rebuilt_digest(options) == digest


# Regression test for an engine bug (found by this test, since fixed): read_blob() of a live blob fails with
# CorruptError when compaction moves it and retires its segment during the read
async def test_read_blob_racing_compaction(tmp_path):
    """A reader that found a blob's old location while compaction moved it and retired the segment."""
    options = options_for(tmp_path, segment_bytes=16 << 10)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    try:
        blobs = {}
        for n in range(60):
            _, blobs[f"i{n}"] = await put(store, f"i{n}", body_for(f"i{n}", 1000))
        for n in range(60):
            if n % 5:
                await delete(store, f"i{n}", blobs.pop(f"i{n}"))
        await store.checkpoint()
        victim_item, victim_blob = sorted(blobs.items(), key=lambda kv_: kv_[1])[0]
        segment = await store.read(lambda c: c.execute("SELECT segment FROM _blobs WHERE id = ?",
                                                       (victim_blob,)).fetchone()[0])
        seg_name = f"j{segment:010d}.seg"
        reading = threading.Event()
        go_on = threading.Event()

        def hook(op: str, path: str) -> None:
            if op == "read" and path.endswith(seg_name) and not reading.is_set():
                reading.set()  # the reader holds the old location and an open fd ...
                go_on.wait(10)  # ... while compaction moves the blob and retires the segment

        fileops.hook = hook
        reader = asyncio.ensure_future(store.read_blob(victim_blob))
        while not reading.is_set():
            await asyncio.sleep(0.001)
        fileops.hook = None
        await store.compact()
        assert not os.path.exists(os.path.join(options.mirrors[0], seg_name)), "segment not retired"
        go_on.set()
        assert await reader == body_for(victim_item, 1000)
        assert all(m["healthy"] for m in store.health()["mirrors"]), store.health()
    finally:
        go_on.set()
        await store.close()


# -- the index cannot apply a frame -------------------------------------------------------------------------------------------


class BrokenApplier(kv.KvApplier):
    """Raises on the PUT of "boom": a record the consumer could never have written (a bug)."""

    def apply(self, conn, seq, rtype, payload):
        if b'"boom"' in payload:
            raise ValueError("applier bug")
        super().apply(conn, seq, rtype, payload)


# Regression test for an engine bug (found by this test, since fixed): Store._apply reports an index failure
# through a lambda that uses the except variable after the except block (NameError in the loop callback): the
# store never fails, keeps acknowledging, and readers hang
async def test_index_apply_failure_stops_the_store(tmp_path):
    store = await Store.open(options_for(tmp_path), BrokenApplier())
    try:
        await put(store, "fine")
        try:
            await put(store, "boom")  # the frame is durable: the acknowledgement may come first
        except MailError:
            pass
        with pytest.raises(MailError):
            await asyncio.wait_for(store.read(kv.counts), 5)  # no hang: the failure is reported
        assert store.failure is not None and not store.health()["ok"]
        with pytest.raises(MailError):
            await put(store, "after")
    finally:
        await asyncio.wait_for(store.close(), 10)


async def test_index_ahead_of_the_journal_is_rebuilt(tmp_path):
    """An index holding frames the journal lacks (restored from a later copy) is never built on."""
    import shutil

    old, new = tmp_path / "old", tmp_path / "new"
    options_new = options_for(new)
    store = await Store.open(options_new, kv.KvApplier())
    for n in range(10):
        await put(store, f"early{n}", b"e" * 50)
    await store.close()
    shutil.copytree(new, old)
    store = await Store.open(options_new, kv.KvApplier())
    for n in range(10):
        await put(store, f"late{n}", b"l" * 50)
    await store.close()
    # The later index over the earlier journal.
    options_old = options_for(old)
    for suffix in ("", "-wal", "-shm"):
        src = options_new.index_file() + suffix
        if os.path.exists(src):
            shutil.copyfile(src, options_old.index_file() + suffix)
    store = await Store.open(options_old, kv.KvApplier())
    try:
        assert store.report.index_rebuilt
        assert sorted(await store.read(kv.counts)) == sorted(f"early{n}" for n in range(10))
        await put(store, "next", b"n")  # seqs continue from the journal, no gap
        digest = await store.digest()
    finally:
        await store.close()
    store = await rebuild_index(options_old, kv.KvApplier())
    try:
        assert await store.digest() == digest
    finally:
        await store.close()
