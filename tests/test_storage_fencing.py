"""Fencing (acceptance 4; I-6): one owner at a time, and a fenced owner writes nothing that counts.

Two processes on one store directory: a writer A
(:mod:`intermail.testing.crashwriter`) runs; a second process B opens the
store (a take-over: the epoch goes up) and commits its own records.  A must
stop: its next commit raises FencedError and it exits with code 3 after
printing ``FENCED``.  Every id A reported ``OK`` (all of them were
acknowledged before A was fenced, or they would not have been reported) and
every id B reported must be present exactly once, and the store must agree
with an index rebuilt from the journal.  Then the same with A frozen
(SIGSTOP) across the take-over and thawed (SIGCONT) after B is done: A
wakes up believing it owns the store, and nothing it does from then on may
become visible.

In-process tests pin down the single steps: a fenced commit, a fenced
checkpoint, a fenced segment rotation, simultaneous opens.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from intermail.errors import ErrorKind, FencedError, MailError
from intermail.storage import Store, StoreOptions, rebuild_index
from intermail.storage.fence import Fence
from intermail.storage.fileops import FaultyFileOps, FileOps
from intermail.testing import kv
from intermail.testing.crashwriter import EXIT_FENCED, Ledger, body_for, size_from_value
from intermail.testing.powercut import read_complete_lines

REPO = str(Path(__file__).resolve().parent.parent)
SEED = int(os.environ.get("INTERMAIL_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
SEGMENT_BYTES = 64 << 10


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def spawn(mirrors, run: int, out: Path, *extra: str) -> subprocess.Popen:
    # Small segments and frequent checkpoints: the old owner starts new segments and retires
    # old ones while the new owner opens (test_takeover_racing_the_old_owners_rotation is
    # the deterministic version of that race).
    cmd = [sys.executable, "-m", "intermail.testing.crashwriter", "--mirrors", ",".join(map(str, mirrors)),
           "--run", str(run), "--segment-bytes", str(SEGMENT_BYTES), "--blob-max", "3000",
           "--checkpoint-every", "200", "--seed", str(SEED + run), *extra]
    with open(out, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, env=env(), cwd=REPO)


async def wait_line(out: Path, proc: subprocess.Popen, prefix: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(line.startswith(prefix) for line in read_complete_lines(str(out))):
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited ({proc.returncode}) before {prefix!r}: "
                                 f"{read_complete_lines(str(out))[-3:]} {proc.stderr.read().decode()[-2000:]}")
        await asyncio.sleep(0.005)
    raise AssertionError(f"no {prefix!r} from the writer within {timeout}s")


async def wait_exit(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"writer still running after {timeout}s")
        await asyncio.sleep(0.01)
    return proc.returncode


def finish(proc: subprocess.Popen) -> str:
    """Make sure the process is gone; return its stderr (once)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stderr.closed:
        return ""
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return err


async def check_store(options: StoreOptions, ledger: Ledger, where: str) -> tuple[dict, str]:
    """Open (a take-over too), hold the store to the ledger, read every body, compare with a rebuild."""
    store = await Store.open(options, kv.KvApplier())
    try:
        counts = await store.read(kv.counts)
        problems = ledger.check(counts)
        assert not problems, f"{where}: {sorted(problems)[:10]}"
        for item_id, blob, value in await store.read(lambda c: c.execute("SELECT id, blob, value FROM items")
                                                     .fetchall()):
            size = size_from_value(value)
            if size is not None:
                assert await store.read_blob(blob) == body_for(item_id, size), f"{where}: body of {item_id}"
        digest = await store.digest()
    finally:
        await store.close()
    rebuilt = await rebuild_index(options, kv.KvApplier())
    try:
        assert await rebuilt.read(kv.counts) == counts, f"{where}: the journal holds other items than the index"
        assert await rebuilt.digest() == digest, f"{where}: index != rebuilt index"
    finally:
        await rebuilt.close()
    return counts, digest


# -- two processes ------------------------------------------------------------------------------------------------


async def test_takeover_fences_the_running_writer(tmp_path):
    rng = random.Random(SEED)
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = StoreOptions(mirrors=tuple(map(str, mirrors)), segment_bytes=SEGMENT_BYTES)
    ledger = Ledger()
    for round_ in range(4):
        where = f"seed {SEED} round {round_}"
        run_a, run_b = 2 * round_ + 1, 2 * round_ + 2
        out_a, out_b = tmp_path / f"a{round_}.txt", tmp_path / f"b{round_}.txt"
        a = spawn(mirrors, run_a, out_a)
        b = None
        try:
            await wait_line(out_a, a, "READY")
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            assert a.poll() is None, f"{where}: A died early: {finish(a)}"
            b = spawn(mirrors, run_b, out_b, "--count", "60", "--tasks", "4", "--checkpoint-every", "25")
            assert await wait_exit(b) == 0, f"{where}: B failed: {read_complete_lines(str(out_b))[-3:]} {finish(b)}"
            code_a = await wait_exit(a, 15)
        finally:
            err_a = finish(a)
            if b is not None:
                finish(b)
        lines_a, lines_b = read_complete_lines(str(out_a)), read_complete_lines(str(out_b))
        assert lines_b[0].startswith("READY") and lines_b[-1] == "DONE"
        assert int(lines_b[0].split()[1]) > int(lines_a[0].split()[1])  # B took a newer epoch
        # A stopped with FENCED, and nothing after it.
        assert code_a == EXIT_FENCED and lines_a[-1] == "FENCED", f"{where}: A ended {code_a}: {lines_a[-3:]} {err_a}"
        ledger.feed(lines_a, run_a)
        ledger.feed(lines_b, run_b)
        await check_store(options, ledger, where)


async def test_frozen_writer_thawed_after_takeover_writes_nothing_visible(tmp_path):
    rng = random.Random(SEED + 1)
    mirrors = [tmp_path / "m0", tmp_path / "m1"]
    options = StoreOptions(mirrors=tuple(map(str, mirrors)), segment_bytes=SEGMENT_BYTES)
    ledger = Ledger()
    for round_ in range(3):
        where = f"seed {SEED} round {round_}"
        run_a, run_b = 2 * round_ + 1, 2 * round_ + 2
        out_a, out_b = tmp_path / f"a{round_}.txt", tmp_path / f"b{round_}.txt"
        a = spawn(mirrors, run_a, out_a)
        b = None
        try:
            await wait_line(out_a, a, "READY")
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            a.send_signal(signal.SIGSTOP)
            stopped_lines = len(read_complete_lines(str(out_a)))
            b = spawn(mirrors, run_b, out_b, "--count", "60", "--tasks", "4", "--checkpoint-every", "25")
            assert await wait_exit(b) == 0, f"{where}: B failed: {read_complete_lines(str(out_b))[-3:]} {finish(b)}"
            # The state after the take-over, before A wakes up.  (This open is one more take-over.)
            ledger.feed(read_complete_lines(str(out_a))[:stopped_lines], run_a)
            ledger.feed(read_complete_lines(str(out_b)), run_b)
            before, digest_before = await check_store(options, ledger, where + " (A frozen)")
            a.send_signal(signal.SIGCONT)
            code_a = await wait_exit(a, 15)
        finally:
            if a.poll() is None:
                a.send_signal(signal.SIGCONT)
            err_a = finish(a)
            if b is not None:
                finish(b)
        lines_a = read_complete_lines(str(out_a))
        assert code_a in (EXIT_FENCED, 4), f"{where}: A ended {code_a}: {lines_a[-3:]} {err_a}"
        assert lines_a[-1] == "FENCED" or lines_a[-1].startswith("ERROR "), f"{where}: {lines_a[-3:]}"
        # Whatever A printed after waking up was acknowledged before the take-over: it must be there.
        ledger.feed(lines_a[stopped_lines:], run_a)
        after, digest_after = await check_store(options, ledger, where + " (A thawed)")
        assert after == before, f"{where}: the thawed writer changed the store: {set(after) ^ set(before)}"
        assert digest_after == digest_before


# -- in-process: the single steps ---------------------------------------------------------------------------------------------


def options_for(tmp_path, **kw) -> StoreOptions:
    kw.setdefault("segment_bytes", 16 << 10)
    return StoreOptions(mirrors=(str(tmp_path / "m0"), str(tmp_path / "m1")), **kw)


async def commits(store: Store, prefix: str, n: int, size: int = 700) -> dict[str, int]:
    out = {}
    for i in range(n):
        item = f"{prefix}-{i}"
        txn = store.transaction()
        out[item] = kv.put(txn, item, body_for(item, size) if size else None)
        await txn.commit()
    return out


async def verify(options: StoreOptions, expected: dict[str, int], size: int = 700) -> None:
    store = await Store.open(options, kv.KvApplier())
    try:
        counts = await store.read(kv.counts)
        assert {i: counts.get(i) for i in expected} == {i: 1 for i in expected}
        for item, blob in expected.items():
            if blob:
                assert await store.read_blob(blob) == body_for(item, size), item
        digest = await store.digest()
    finally:
        await store.close()
    rebuilt = await rebuild_index(options, kv.KvApplier())
    try:
        assert await rebuilt.digest() == digest
    finally:
        await rebuilt.close()


async def test_fenced_commit_fails_and_stays_invisible(tmp_path):
    options = options_for(tmp_path)
    a = await Store.open(options, kv.KvApplier())
    b = None
    try:
        acked = await commits(a, "a", 10)
        b = await Store.open(options, kv.KvApplier())
        assert b.epoch == a.epoch + 1
        with pytest.raises(FencedError):
            await commits(a, "late", 1)
        assert a.fenced and a.health()["fenced"] and not a.health()["ok"]
        with pytest.raises(MailError) as err:
            await commits(a, "later", 1)
        assert err.value.kind is ErrorKind.FENCED
        acked.update(await commits(b, "b", 10))
        assert "late-0" not in await b.read(kv.counts)
    finally:
        await a.close()
        if b is not None:
            await b.close()
    store = await Store.open(options, kv.KvApplier())
    try:
        assert await store.read(kv.counts) == {i: 1 for i in acked}
    finally:
        await store.close()
    await verify(options, acked)


async def test_fenced_commits_in_flight_are_refused_together(tmp_path):
    """Many commits queued when the take-over happens: none returns success afterwards."""
    options = options_for(tmp_path)
    a = await Store.open(options, kv.KvApplier())
    b = None
    try:
        acked = await commits(a, "a", 5)
        b = await Store.open(options, kv.KvApplier())

        async def one(i: int):
            txn = a.transaction()
            kv.put(txn, f"late-{i}", b"x")
            return await txn.commit()

        results = await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
        assert all(isinstance(r, FencedError) for r in results), results
        assert not any(k.startswith("late") for k in await b.read(kv.counts))
    finally:
        await a.close()
        if b is not None:
            await b.close()
    await verify(options, acked)


# Regression test for an engine bug (found by this test, since fixed): Store._open_sync lists the segments
# (journal.discover) before it takes the open lock, so simultaneous openers choose the same new segment number:
# later opens fail (EEXIST) or, with spare files, replace the earlier opener's segment by rename
@pytest.mark.parametrize("preallocate", [False, True])
async def test_simultaneous_opens_take_distinct_epochs(tmp_path, preallocate):
    options = options_for(tmp_path, preallocate=preallocate)
    first = await Store.open(options, kv.KvApplier())
    await first.close()
    stores = await asyncio.gather(*(Store.open(options, kv.KvApplier()) for _ in range(4)))
    try:
        epochs = sorted(s.epoch for s in stores)
        assert epochs == [2, 3, 4, 5]
        owner = max(stores, key=lambda s: s.epoch)
        for s in stores:
            if s is not owner:
                with pytest.raises(FencedError):
                    await commits(s, f"e{s.epoch}", 1)
        acked = await commits(owner, "owner", 3)
    finally:
        for s in stores:
            await s.close()
    await verify(options, acked)


# Regression test for an engine bug (found by this test, since fixed): checkpoint() does not check the fence; a
# fenced owner writes a checkpoint and rewrites SEALS from its stale segment list, dropping the new owner's
# seals: the store no longer opens
async def test_fenced_owner_checkpoint_writes_nothing(tmp_path):
    options = options_for(tmp_path)
    m0 = Path(options.mirrors[0])
    a = await Store.open(options, kv.KvApplier())
    try:
        old = await commits(a, "a", 60)
        await a.checkpoint()  # A's current segment is empty from here on
        b = await Store.open(options, kv.KvApplier())
        try:
            for item, blob in old.items():
                txn = b.transaction()
                kv.delete(txn, item, blob)
                await txn.commit()
            acked = await commits(b, "keep", 2)  # live blobs in B's first segment
            acked.update(await commits(b, "x", 60, size=0))
            doomed = await commits(b, "y", 60)
            for item, blob in doomed.items():
                txn = b.transaction()
                kv.delete(txn, item, blob)
                await txn.commit()
            await b.checkpoint()  # retires segments after B's first: SEALS holds its end
        finally:
            await b.close()
        files_before = {n: (m0 / n).read_bytes() for n in os.listdir(m0) if not n.startswith("index.sqlite")}
        with pytest.raises(FencedError):
            await a.checkpoint()
        files_after = {n: (m0 / n).read_bytes() for n in os.listdir(m0) if not n.startswith("index.sqlite")}
        assert files_after == files_before, "the fenced owner changed files"
    finally:
        await a.close()
    await verify(options, acked)


# Regression test for an engine bug (found by this test, since fixed): a fenced owner's segment rotation renames
# next.prealloc over the new owner's current segment (rename replaces; no fence check, no O_EXCL): the new
# owner's acknowledged frames vanish from the journal
async def test_fenced_owner_rotation_cannot_replace_the_new_owners_segment(tmp_path):
    options = options_for(tmp_path)
    a = await Store.open(options, kv.KvApplier())
    b = None
    try:
        acked = await commits(a, "a", 5)
        await asyncio.sleep(0.3)  # A's next segment file is prepared
        b = await Store.open(options, kv.KvApplier())
        acked.update(await commits(b, "b", 10))  # in B's current segment: the number A would use next
        await asyncio.sleep(0.3)
        with pytest.raises(FencedError):
            await a.checkpoint()  # rotates A's journal first
        acked.update(await commits(b, "b2", 3))  # B is unharmed
        assert all(m["healthy"] for m in b.health()["mirrors"])
    finally:
        await a.close()
        if b is not None:
            await b.close()
    await verify(options, acked)


async def test_fenced_owner_compact_fails(tmp_path):
    options = options_for(tmp_path)
    a = await Store.open(options, kv.KvApplier())
    b = None
    try:
        blobs = await commits(a, "a", 60)
        for n, (item, blob) in enumerate(list(blobs.items())):
            if n % 5:
                txn = a.transaction()
                kv.delete(txn, item, blob)
                await txn.commit()
                del blobs[item]
        b = await Store.open(options, kv.KvApplier())
        with pytest.raises(FencedError):
            await a.compact()
        blobs.update(await commits(b, "b", 5))
    finally:
        await a.close()
        if b is not None:
            await b.close()
    await verify(options, blobs)


def _epoch_inode_comes_back(mirrors, held: dict[str, str]) -> None:
    """Make EPOCH carry the newest epoch in the inode the old owner saw: what inode reuse produces.

    A take-over replaces EPOCH by rename; the old inode is freed and file
    systems hand freed inode numbers out again (ext4 here: three bare
    ``Fence.take`` calls in a row cycle back to the same numbers).  To be
    deterministic on any file system we keep the old inode alive with a hard
    link and put it back, holding the newest epoch, with the same rename a
    take-over uses.
    """
    for m in mirrors:
        epoch = Path(m, "EPOCH").read_text()
        with open(held[m], "r+") as f:
            f.truncate(0)
            f.write(epoch)
        os.rename(held[m], os.path.join(m, "EPOCH"))


def _hold_epoch_inodes(mirrors) -> dict[str, str]:
    held = {}
    for m in mirrors:
        held[m] = os.path.join(m, "EPOCH.held")
        os.link(os.path.join(m, "EPOCH"), held[m])
    return held


# Regression test for an engine bug (found by this test, since fixed): Fence.check used to skip reading EPOCH
# while its inode number was unchanged; inode numbers are reused after a take-over's rename (on ext4 here
# three bare take-overs in a row cycle back to the same numbers), so a fenced owner passed the check.
async def test_fence_check_sees_a_takeover_behind_a_reused_inode(tmp_path):
    mirrors = [str(tmp_path / "m0"), str(tmp_path / "m1")]
    for m in mirrors:
        os.makedirs(m)
    owner = Fence.take(FileOps(), mirrors)
    owner.check(mirrors)
    held = _hold_epoch_inodes(mirrors)
    Fence.take(FileOps(), mirrors)
    _epoch_inode_comes_back(mirrors, held)
    with pytest.raises(FencedError):
        owner.check(mirrors)


# Regression test for the same bug, end to end: the fenced owner acknowledged a commit that the new
# owner's seal made invisible (an acknowledged write lost).
async def test_fenced_owner_acknowledges_nothing_behind_a_reused_inode(tmp_path):
    options = options_for(tmp_path)
    a = await Store.open(options, kv.KvApplier())
    acked = {}
    try:
        acked.update(await commits(a, "a", 3))
        held = _hold_epoch_inodes(options.mirrors)
        b = await Store.open(options, kv.KvApplier())  # a real take-over: seals A's segment, claims the index
        try:
            acked.update(await commits(b, "b", 3))
        finally:
            await b.close()
        _epoch_inode_comes_back(options.mirrors, held)
        try:
            acked.update(await commits(a, "late", 1))  # must raise FencedError
        except FencedError:
            pass
    finally:
        await a.close()
    store = await Store.open(options, kv.KvApplier())
    try:
        counts = await store.read(kv.counts)
        lost = [i for i in acked if counts.get(i) != 1]
        assert not lost, f"acknowledged by the fenced owner and lost: {lost}"
    finally:
        await store.close()


# Regression test for an engine bug (found by this test, since fixed): a frozen old owner inside an index
# transaction holds SQLite's write lock; the new owner's Index.claim waits busy_timeout (10 s), then treats
# 'database is locked' as corruption and rebuilds the whole index
async def test_takeover_is_not_held_up_by_a_frozen_owner_in_an_index_transaction(tmp_path):
    import sqlite3

    options = options_for(tmp_path)
    a = await Store.open(options, kv.KvApplier())
    acked = await commits(a, "a", 20)
    # A freezes (SIGSTOP, a stalled VM) in the middle of applying a batch to the index.
    frozen = sqlite3.connect(options.index_file(), isolation_level=None)
    frozen.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        b = await Store.open(options, kv.KvApplier())
        took = time.monotonic() - started
        try:
            acked.update(await commits(b, "b", 5))
            assert await b.read(kv.counts) == {i: 1 for i in acked}
            rebuilt = b.report.index_rebuilt
        finally:
            await b.close()
    finally:
        frozen.execute("ROLLBACK")
        frozen.close()
        await a.close()
    assert took < 3, f"the take-over waited {took:.1f}s for the frozen owner"
    assert not rebuilt, "the take-over threw the index away"


# Regression test for an engine bug (found by this test, since fixed): Store._open_sync lists segments before it
# takes the lock and the epoch; a segment the old owner starts in between is unknown to the new owner, whose new
# segment gets the same number and replaces it by rename: the old owner's acknowledged frames are lost
async def test_takeover_racing_the_old_owners_rotation(tmp_path):
    options = options_for(tmp_path)
    a = await Store.open(options, kv.KvApplier())
    b = None
    listed = threading.Event()
    go_on = threading.Event()

    def hook(op: str, path: str) -> None:
        # B's open calls this first when it writes EPOCH: B has listed the segments already.
        if path.endswith("EPOCH") and not listed.is_set():
            listed.set()
            go_on.wait(10)

    b_fileops = FaultyFileOps()
    b_fileops.hook = hook
    try:
        acked = await commits(a, "a", 5)
        await asyncio.sleep(0.3)  # A's next segment file is prepared
        opening = asyncio.ensure_future(Store.open(options, kv.KvApplier(), fileops=b_fileops))
        while not listed.is_set():
            await asyncio.sleep(0.001)
        # B has listed the journal but not taken the store yet: A still owns it, rotates and commits.
        await a.checkpoint()
        acked.update(await commits(a, "a-late", 3))  # acknowledged by the owner of the moment
        go_on.set()
        b = await opening
        b_fileops.hook = None
        acked.update(await commits(b, "b", 5))
    finally:
        go_on.set()
        await a.close()
        if b is not None:
            await b.close()
    await verify(options, acked)
