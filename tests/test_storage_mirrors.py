"""Mirrors (acceptance 3; I-5): a failing mirror is degraded and writing goes on.

In-process, with :class:`~intermail.storage.fileops.FaultyFileOps` injecting
real ``OSError``s (EIO, ENOSPC) on one mirror while 16 tasks commit; a real
full file system (a tiny tmpfs, when we are root and ``mount`` works); a
mirror directory removed under the store; a corrupted copy repaired on
read; ``rebuild_mirror`` and rebuild-on-open restoring full redundancy
(checked byte for byte, and by opening the store from the rebuilt mirror
alone); and all mirrors failing, where commits fail UNAVAILABLE and nothing
acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from pathlib import Path

import pytest

from intermail.errors import CorruptError, ErrorKind, MailError
from intermail.storage import Store, StoreOptions, rebuild_index
from intermail.storage.fileops import FaultyFileOps
from intermail.testing import kv
from intermail.testing.crashwriter import body_for
from intermail.testing import fs

BODY = 700


def options_for(mirrors, **kw) -> StoreOptions:
    kw.setdefault("segment_bytes", 32 << 10)
    return StoreOptions(mirrors=tuple(str(m) for m in mirrors), **kw)


async def load(store: Store, prefix: str, tasks: int = 16, per_task: int = 25, on_commit=None,
               delete_every: int = 0) -> dict[str, int]:
    """Concurrent committers; return {id: blob} of every acknowledged, undeleted PUT.

    ``on_commit(n)`` runs after the n-th acknowledged commit (to inject a fault mid-run).
    Any failed commit fails the test (through the exception).
    """
    acked: dict[str, int] = {}
    count = 0

    async def task(t: int) -> None:
        nonlocal count
        for n in range(per_task):
            item = f"{prefix}-{t}-{n}"
            txn = store.transaction()
            blob = kv.put(txn, item, body_for(item, BODY))
            await txn.commit()
            acked[item] = blob
            count += 1
            if on_commit is not None:
                on_commit(count)
            if delete_every and n % delete_every == delete_every - 1:
                victim = f"{prefix}-{t}-{n - 1}"
                txn = store.transaction()
                kv.delete(txn, victim, acked[victim])
                await txn.commit()
                del acked[victim]

    await asyncio.gather(*(task(t) for t in range(tasks)))
    return acked


async def check_store(options: StoreOptions, expected: dict[str, int], fileops=None) -> None:
    """Reopen: exactly the expected items, every body intact, index == rebuilt index."""
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    try:
        assert await store.read(kv.counts) == {i: 1 for i in expected}
        for item, blob in expected.items():
            assert await store.read_blob(blob) == body_for(item, BODY), item
        digest = await store.digest()
    finally:
        await store.close()
    rebuilt = await rebuild_index(options, kv.KvApplier(), fileops=fileops)
    try:
        assert await rebuilt.digest() == digest
    finally:
        await rebuilt.close()


def mirror_states(store: Store) -> list[bool]:
    return [m["healthy"] for m in store.health()["mirrors"]]


def journal_files(mirror) -> dict[str, bytes]:
    """Segment and checkpoint files of a mirror, name -> bytes."""
    out = {}
    for name in sorted(os.listdir(mirror)):
        if name.endswith((".seg", ".ckpt")):
            out[name] = Path(mirror, name).read_bytes()
    return out


def assert_identical(m_a, m_b) -> None:
    a, b = journal_files(m_a), journal_files(m_b)
    assert sorted(a) == sorted(b), f"different files: {sorted(set(a) ^ set(b))}"
    differ = [n for n in a if a[n] != b[n]]
    assert not differ, f"files with different bytes: {differ}"


async def open_from_one_mirror(options: StoreOptions, keep: int, expected: dict[str, int], tmp_path) -> None:
    """Redundancy check: lose every other mirror (and the index with mirror 0); all must still be there."""
    for i, m in enumerate(options.mirrors):
        if i != keep:
            shutil.rmtree(m)
    if options.index_path:
        for suffix in ("", "-wal", "-shm"):
            Path(options.index_path + suffix).unlink(missing_ok=True)
    await check_store(options, expected)


# -- EIO / ENOSPC injected on one mirror ---------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("n_mirrors,failing", [(2, 1), (2, 0), (3, 1), (3, 2)])
async def test_failing_mirror_is_degraded_and_commits_go_on(tmp_path, err, n_mirrors, failing):
    mirrors = [tmp_path / f"m{i}" for i in range(n_mirrors)]
    options = options_for(mirrors)
    fileops = FaultyFileOps()
    events = []
    store = await Store.open(options, kv.KvApplier(), fileops=fileops, on_event=lambda e, **f: events.append(e))

    def inject(n: int) -> None:
        if n == 120:
            fileops.fail(str(mirrors[failing]), err)

    try:
        acked = await load(store, "a", on_commit=inject)  # raises if any commit failed
        assert len(acked) == 400
        health = store.health()
        assert health["ok"] and not health["fenced"]
        assert mirror_states(store) == [i != failing for i in range(n_mirrors)]
        assert os.strerror(err) in health["mirrors"][failing]["error"]
        assert "storage.mirror_degraded" in events
        acked.update(await load(store, "b", tasks=4, per_task=10))  # and it keeps going
    finally:
        await store.close()
    fileops.heal(str(mirrors[failing]))
    await check_store(options, acked)


async def test_two_of_three_mirrors_fail(tmp_path):
    mirrors = [tmp_path / f"m{i}" for i in range(3)]
    options = options_for(mirrors)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)

    def inject(n: int) -> None:
        if n == 50:
            fileops.fail(str(mirrors[0]), errno.EIO)
        elif n == 150:
            fileops.fail(str(mirrors[2]), errno.ENOSPC)

    try:
        acked = await load(store, "a", on_commit=inject)
        assert mirror_states(store) == [False, True, False]
    finally:
        await store.close()
    fileops.heal(str(mirrors[0]))
    fileops.heal(str(mirrors[2]))
    await check_store(options, acked)


# Regression test for an engine bug (found by this test, since fixed): segments retired while a mirror was
# degraded come back from that mirror at open; load_segments raises 'successor missing and no seal recorded' and
# the store cannot be opened
async def test_degraded_mirror_with_segments_retired_meanwhile_reopens(tmp_path):
    """While mirror 1 is degraded, checkpoints retire segments on mirror 0; mirror 1 keeps stale ones.

    Reopening with mirror 1 healthy again must work and find everything.
    """
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=16 << 10)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    try:
        acked = await load(store, "keep", tasks=1, per_task=3)  # live blobs in the first segments
        doomed = await load(store, "a", tasks=4, per_task=15)
        fileops.fail(str(mirrors[1]), errno.EIO)
        doomed.update(await load(store, "b", tasks=4, per_task=15))
        for item, blob in doomed.items():
            txn = store.transaction()
            kv.delete(txn, item, blob)
            await txn.commit()
        acked.update(await load(store, "c", tasks=4, per_task=10))
        await store.checkpoint()  # retires segments on mirror 0 only
        assert mirror_states(store) == [True, False]
    finally:
        await store.close()
    fileops.heal(str(mirrors[1]))
    await check_store(options, acked)


# -- a real full file system ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path):
    try:
        with fs.tiny_tmpfs(tmp_path / "tmpfs", "2m") as mnt:
            yield mnt
    except fs.MountUnavailable as exc:
        pytest.skip(str(exc))


async def test_real_enospc_on_a_tiny_tmpfs_mirror(tmp_path, tiny_tmpfs):
    mirrors = [tmp_path / "m0", tiny_tmpfs / "m1"]
    options = options_for(mirrors, segment_bytes=128 << 10)
    events = []
    store = await Store.open(options, kv.KvApplier(), on_event=lambda e, **f: events.append((e, f)))
    try:
        acked = await load(store, "a", tasks=16, per_task=250)  # ~2.8 MB of bodies: the 2 MiB mirror fills up
        health = store.health()
        assert health["ok"]
        assert mirror_states(store) == [True, False]
        assert "No space left on device" in health["mirrors"][1]["error"], health
    finally:
        await store.close()
    await check_store(options, acked)  # the tmpfs is still full: open degrades it again and goes on


def remove_dir(path) -> None:
    """Remove a directory the engine keeps writing into, as a disk that vanishes would: at once.

    (A plain rmtree races with files the engine creates meanwhile; after the
    rename nothing new appears under the old name, and the files go with the rmtree.)
    """
    gone = f"{path}.removed"
    os.rename(path, gone)
    shutil.rmtree(gone)


# -- a mirror directory removed under the store ---------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [1, 0])
async def test_mirror_directory_removed_mid_run(tmp_path, victim):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    # the index lives apart from the mirrors here: removing mirror 0 must not take it along
    options = options_for(mirrors, index_path=str(tmp_path / "index.sqlite"))
    store = await Store.open(options, kv.KvApplier())

    def remove(n: int) -> None:
        if n == 100:
            remove_dir(mirrors[victim])

    try:
        acked = await load(store, "a", on_commit=remove)
        assert mirror_states(store) == [i != victim for i in range(2)]
        acked.update(await load(store, "b", tasks=2, per_task=10))
        for item in list(acked)[:20]:
            assert await store.read_blob(acked[item]) == body_for(item, BODY)
    finally:
        await store.close()
    await check_store(options, acked)


# Regression test for an engine bug (found by this test, since fixed): the default index lives in mirror 0's
# directory; when that directory goes, new reader connections fail and reads break
async def test_reads_survive_losing_mirror_0_with_the_default_index(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, readers=4)
    store = await Store.open(options, kv.KvApplier())
    try:
        acked = await load(store, "a", tasks=4, per_task=10)
        remove_dir(mirrors[0])
        acked.update(await load(store, "b", tasks=4, per_task=10))
        assert mirror_states(store) == [False, True]

        async def reader(item: str) -> None:
            assert (await store.read(kv.counts)).get(item) == 1
            assert await store.read_blob(acked[item]) == body_for(item, BODY)

        await asyncio.gather(*(reader(i) for i in list(acked)[:40]))  # every reader thread
    finally:
        await store.close()
    await check_store(options, acked)


# -- corruption: detected on read, repaired from a good mirror ------------------------------------------------------------


async def blob_location(store: Store, blob: int) -> tuple[int, int, int]:
    return await store.read(lambda c: c.execute("SELECT segment, offset, length FROM _blobs WHERE id = ?",
                                                (blob,)).fetchone())


def flip(path, offset: int, n: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in data))


def seg_path(mirror, segment: int) -> Path:
    return Path(mirror) / f"j{segment:010d}.seg"


@pytest.mark.parametrize("n_mirrors", [2, 3])
async def test_corrupted_blob_copy_is_repaired_on_read(tmp_path, n_mirrors):
    mirrors = [tmp_path / f"m{i}" for i in range(n_mirrors)]
    options = options_for(mirrors)
    store = await Store.open(options, kv.KvApplier())
    try:
        acked = await load(store, "a", tasks=4, per_task=10)
        item, blob = sorted(acked.items())[7]
        segment, offset, length = await blob_location(store, blob)
        good = seg_path(mirrors[-1], segment).read_bytes()[offset:offset + length]
        assert good == body_for(item, BODY)
        bad = mirrors[:-1]  # every mirror but the last holds a damaged copy
        for m in bad:
            flip(seg_path(m, segment), offset + length // 2)
            assert seg_path(m, segment).read_bytes()[offset:offset + length] != good
        repairs = store.stats.repairs
        assert await store.read_blob(blob) == good
        assert store.stats.repairs >= repairs + len(bad)
        for m in mirrors:  # the bad copies were rewritten on disk
            assert seg_path(m, segment).read_bytes()[offset:offset + length] == good, m
        assert all(mirror_states(store))
        assert await store.read_blob(blob) == good
    finally:
        await store.close()
    await check_store(options, acked)


async def test_corrupted_on_every_mirror_is_corrupt_error(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    store = await Store.open(options_for(mirrors), kv.KvApplier())
    try:
        acked = await load(store, "a", tasks=2, per_task=5)
        item, blob = sorted(acked.items())[3]
        segment, offset, length = await blob_location(store, blob)
        for m in mirrors:
            flip(seg_path(m, segment), offset + 10)
        with pytest.raises(MailError) as err:
            await store.read_blob(blob)
        assert isinstance(err.value, CorruptError) and err.value.kind is ErrorKind.CORRUPT
        other_item, other_blob = sorted(acked.items())[4]
        assert await store.read_blob(other_blob) == body_for(other_item, BODY)  # the rest is fine
    finally:
        await store.close()


async def test_corrupted_frame_in_the_last_segment_is_repaired_on_open(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=1 << 20)
    store = await Store.open(options, kv.KvApplier())
    try:
        acked = await load(store, "a", tasks=2, per_task=10)
        item, blob = sorted(acked.items())[2]
        segment, offset, _ = await blob_location(store, blob)
    finally:
        await store.close()
    # damage the frame around that blob on mirror 0 only, header included
    flip(seg_path(mirrors[0], segment), offset - 60, 80)
    store = await Store.open(options, kv.KvApplier())
    try:
        assert store.report.repairs >= 1 and store.report.tail_cut_bytes == 0
        assert await store.read(kv.counts) == {i: 1 for i in acked}
    finally:
        await store.close()
    a = seg_path(mirrors[0], segment).read_bytes()
    b = seg_path(mirrors[1], segment).read_bytes()
    assert a[:offset + BODY] == b[:offset + BODY]


# Regression test for an engine bug (found by this test, since fixed): a segment header damaged on one mirror is
# never repaired (load_segments takes the first good header); if the other mirror is lost later, open deletes
# that segment as a 'torn creation'
async def test_corrupted_segment_header_on_one_mirror_is_repaired(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=16 << 10)
    store = await Store.open(options, kv.KvApplier())
    try:
        acked = await load(store, "a", tasks=2, per_task=20)
    finally:
        await store.close()
    first = sorted(n for n in os.listdir(mirrors[0]) if n.endswith(".seg"))[0]
    flip(Path(mirrors[0], first), 20)  # the header's first_seq field
    store = await Store.open(options, kv.KvApplier())
    await store.close()
    assert Path(mirrors[0], first).read_bytes()[:64] == Path(mirrors[1], first).read_bytes()[:64]
    await open_from_one_mirror(options, 0, acked, tmp_path)


# -- rebuilding a mirror ----------------------------------------------------------------------------------------------------


async def _degrade_and_retire(store: Store, fileops: FaultyFileOps, failing) -> dict[str, int]:
    """Mirror ``failing`` fails mid-run; meanwhile segments fill, blobs die, a checkpoint retires."""
    acked = await load(store, "keep", tasks=1, per_task=3)  # live blobs in the oldest segments

    def inject(n: int) -> None:
        if n == 60:
            fileops.fail(str(failing), errno.EIO)

    acked.update(await load(store, "a", tasks=8, per_task=20, on_commit=inject, delete_every=3))
    doomed = {k: v for k, v in acked.items() if k.startswith("a-") and k.endswith(("-1", "-4", "-7"))}
    for item, blob in doomed.items():
        txn = store.transaction()
        kv.delete(txn, item, blob)
        await txn.commit()
        del acked[item]
    await store.checkpoint()
    acked.update(await load(store, "b", tasks=4, per_task=5))
    return acked


async def test_rebuild_mirror_restores_redundancy(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=16 << 10)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    try:
        acked = await _degrade_and_retire(store, fileops, mirrors[1])
        assert mirror_states(store) == [True, False]
        fileops.heal(str(mirrors[1]))
        await store.rebuild_mirror(1)
        assert mirror_states(store) == [True, True]
        assert store.health()["ok"]
        acked.update(await load(store, "c", tasks=4, per_task=10))  # a few more commits, on both
        assert mirror_states(store) == [True, True]
        assert_identical(mirrors[0], mirrors[1])
    finally:
        await store.close()
    assert_identical(mirrors[0], mirrors[1])
    await check_store(options, acked)
    await open_from_one_mirror(options, 1, acked, tmp_path)  # the rebuilt mirror alone holds it all


async def test_rebuild_mirror_while_commits_run(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    # preallocate=False: with spares, a replaced (emptied) mirror is degraded again at the next
    # rotation after its rebuild (test_rebuilt_empty_mirror_survives_the_next_rotation), which
    # would make this test fail at random.
    options = options_for(mirrors, segment_bytes=16 << 10, index_path=str(tmp_path / "index.sqlite"),
                          preallocate=False)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    try:
        acked = await _degrade_and_retire(store, fileops, mirrors[1])
        remove_dir(mirrors[1])  # the failed disk was replaced by an empty one
        fileops.heal(str(mirrors[1]))
        writers = asyncio.ensure_future(load(store, "c", tasks=8, per_task=30))
        await asyncio.sleep(0.01)
        await store.rebuild_mirror(1)
        acked.update(await writers)
        acked.update(await load(store, "d", tasks=2, per_task=5))
        assert mirror_states(store) == [True, True], store.health()["mirrors"][1]["error"]
    finally:
        await store.close()
    assert_identical(mirrors[0], mirrors[1])
    await open_from_one_mirror(options, 1, acked, tmp_path)


# Regression test for an engine bug (found by this test, since fixed): rebuild_mirror() left the journal's
# spare segment file of the replaced mirror in place; the next rotation renamed a next.prealloc that no
# longer existed and degraded the rebuilt mirror again.
@pytest.mark.parametrize("preallocate", [False, True])
async def test_rebuilt_empty_mirror_survives_the_next_rotation(tmp_path, preallocate):
    """The failed disk is replaced by an empty one, rebuilt online, and must then stay healthy."""
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=16 << 10, preallocate=preallocate)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)

    async def commits(prefix: str, n: int) -> dict[str, int]:
        out = {}
        for i in range(n):
            item = f"{prefix}-{i}"
            txn = store.transaction()
            out[item] = kv.put(txn, item, body_for(item, BODY))
            await txn.commit()
        return out

    try:
        acked = await commits("a", 30)  # past one rotation
        await asyncio.sleep(0.3)  # the background preparation of the next segment is done
        fileops.fail(str(mirrors[1]), errno.EIO)
        acked.update(await commits("b", 1))
        assert mirror_states(store) == [True, False]
        remove_dir(mirrors[1])
        fileops.heal(str(mirrors[1]))
        await store.rebuild_mirror(1)
        assert mirror_states(store) == [True, True]
        acked.update(await commits("c", 60))  # at least two more rotations
        assert mirror_states(store) == [True, True], store.health()["mirrors"][1]["error"]
    finally:
        await store.close()
    assert_identical(mirrors[0], mirrors[1])


async def test_mirror_emptied_while_closed_is_rebuilt_on_open(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=16 << 10)
    store = await Store.open(options, kv.KvApplier())
    try:
        acked = await load(store, "keep", tasks=1, per_task=3)
        acked.update(await load(store, "a", tasks=8, per_task=20, delete_every=3))
        await store.checkpoint()
        acked.update(await load(store, "b", tasks=4, per_task=10))
    finally:
        await store.close()
    shutil.rmtree(mirrors[1])
    store = await Store.open(options, kv.KvApplier())
    try:
        assert mirror_states(store) == [True, True]
        assert store.report.repairs >= 1
        acked.update(await load(store, "c", tasks=2, per_task=5))
    finally:
        await store.close()
    assert_identical(mirrors[0], mirrors[1])
    await open_from_one_mirror(options, 1, acked, tmp_path)


# Regression tests for an engine bug (found by these tests, since fixed): with preallocated segment files
# every copy has the size segment_bytes, and the size-based catch-up (reconciling sealed segments on open,
# copying files in rebuild_mirror) skipped the frames a degraded mirror had missed.


async def _fail_inside_a_segment(store: Store, fileops: FaultyFileOps, failing, rotate: bool) -> dict[str, int]:
    """Sequential commits (deterministic): the mirror fails in the middle of the current segment."""
    acked = {}
    for n in range(40 if rotate else 10):
        if n == 5:
            fileops.fail(str(failing), errno.EIO)
        item = f"s-{n}"
        txn = store.transaction()
        acked[item] = kv.put(txn, item, body_for(item, BODY))
        await txn.commit()
    return acked


@pytest.mark.parametrize("preallocate,rotate", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["same-segment", "rotated", "same-segment-prealloc", "rotated-prealloc"])
async def test_degraded_mirror_is_caught_up_on_reopen(tmp_path, preallocate, rotate):
    """A mirror that missed writes while degraded holds them all again after the next open."""
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=16 << 10, index_path=str(tmp_path / "index.sqlite"),
                          preallocate=preallocate)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    try:
        acked = await _fail_inside_a_segment(store, fileops, mirrors[1], rotate)
        assert mirror_states(store) == [True, False]
    finally:
        await store.close()
    fileops.heal(str(mirrors[1]))
    store = await Store.open(options, kv.KvApplier())
    await store.close()
    assert_identical(mirrors[0], mirrors[1])
    await open_from_one_mirror(options, 1, acked, tmp_path)


@pytest.mark.parametrize("preallocate", [False, True])
@pytest.mark.parametrize("rotate", [False, True], ids=["same-segment", "rotated"])
async def test_rebuild_mirror_after_a_failure_inside_a_segment(tmp_path, preallocate, rotate):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors, segment_bytes=16 << 10, index_path=str(tmp_path / "index.sqlite"),
                          preallocate=preallocate)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    try:
        acked = await _fail_inside_a_segment(store, fileops, mirrors[1], rotate)
        fileops.heal(str(mirrors[1]))
        await store.rebuild_mirror(1)
        assert mirror_states(store) == [True, True]
        acked.update(await load(store, "c", tasks=2, per_task=5))
    finally:
        await store.close()
    assert_identical(mirrors[0], mirrors[1])
    await open_from_one_mirror(options, 1, acked, tmp_path)


# -- every mirror fails -----------------------------------------------------------------------------------------------------


async def test_all_mirrors_failing_fails_commits_unavailable_and_loses_nothing(tmp_path):
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = options_for(mirrors)
    fileops = FaultyFileOps()
    store = await Store.open(options, kv.KvApplier(), fileops=fileops)
    acked: dict[str, int] = {}
    failures: list[MailError] = []
    try:
        acked.update(await load(store, "a", tasks=8, per_task=10))

        async def task(t: int) -> None:
            for n in range(40):
                item = f"b-{t}-{n}"
                if t == 0 and n == 10:
                    fileops.fail(str(mirrors[0]), errno.EIO)
                    fileops.fail(str(mirrors[1]), errno.ENOSPC)
                try:
                    txn = store.transaction()
                    blob = kv.put(txn, item, body_for(item, BODY))
                    await txn.commit()
                except MailError as exc:
                    failures.append(exc)
                    return
                acked[item] = blob

        await asyncio.gather(*(task(t) for t in range(8)))
        assert failures and all(f.kind is ErrorKind.UNAVAILABLE for f in failures), failures
        assert not store.health()["ok"] and mirror_states(store) == [False, False]
        assert store.failure is not None and store.failure.kind is ErrorKind.UNAVAILABLE
        with pytest.raises(MailError) as err:
            txn = store.transaction()
            kv.put(txn, "late", b"x")
            await txn.commit()
        assert err.value.kind is ErrorKind.UNAVAILABLE
    finally:
        await store.close()
    fileops.heal(str(mirrors[0]))
    fileops.heal(str(mirrors[1]))
    store = await Store.open(options, kv.KvApplier())
    try:
        counts = await store.read(kv.counts)
        missing = [i for i in acked if counts.get(i) != 1]
        assert not missing, f"acknowledged but lost: {missing[:10]}"
        assert all(n == 1 for n in counts.values())
        assert "late" not in counts
        for item, blob in acked.items():
            assert await store.read_blob(blob) == body_for(item, BODY)
    finally:
        await store.close()
