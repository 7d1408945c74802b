"""The durable log engine: group commit, recovery, checkpoints, mirrors, fencing.

One :class:`Store` per store directory set, owned by one process at a time.
Consumers (the MTA queue, the mail store) write through transactions and read
through the derived SQLite index.

Invariants (ARCHITECTURE.md):

- **I-1** ``Transaction.commit()`` returns only after the frame is written
  and ``fdatasync``ed on every healthy mirror (directories synced where files
  were created), the owner checked it still holds the epoch, and the index
  applied it (so a read that starts after commit sees the change).
- **I-2** commits made while a flush is under way wait and share the next
  flush: one ``fdatasync`` per mirror commits every frame of the batch.  All
  blocking I/O runs on the writer thread; the event loop only encodes frames.
- **I-3** ``open`` replays frames past the index's ``applied_seq``; a torn
  tail is cut; the index can be rebuilt from the latest checkpoint plus the
  journal (``rebuild_index``).
- **I-5** see :mod:`intermail.storage.journal`.
- **I-6** every open bumps the epoch; a writer that sees a newer epoch
  raises FENCED and writes nothing more.

Bodies (blobs) are records in the journal, so a message and its metadata
become durable in the same flush.  A segment is retired when a checkpoint
covers all its frames and none of its blobs is live; ``compact`` rewrites the
live blobs of sparse segments so that they can be retired too.

Logs: ``storage.opened``, ``storage.recovered``, ``storage.fenced``,
``storage.failed``, ``storage.checkpoint``, ``storage.mirror_rebuilt`` and
the journal's events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from intermail.errors import CorruptError, ErrorKind, FencedError, MailError
from intermail.storage import checkpoint as ckpt
from intermail.storage import records as rec
from intermail.storage.backup import retention_seq as backup_retention_seq
from intermail.storage.fence import EPOCH_FILE, Fence, open_lock
from intermail.storage.fileops import FileOps
from intermail.storage.index import Applier, Index, connect, digest, remove_index_files, snapshot_records
from intermail.storage.journal import Journal, SegmentExistsError

log = logging.getLogger("intermail.storage")

T = TypeVar("T")

OPEN_ATTEMPTS = 5  # listings retried when a former owner raced our open (see _open_sync)
CLAIM_BUSY_MS = 1000  # how long a take-over waits for the index's write lock
APPLY_BATCH = 512  # acknowledged frames gathered before the indexer is woken ...
APPLY_DELAY = 0.005  # ... or after this many seconds, or when a reader waits
INLINE_MAX_FRAMES = 2  # a flush this small runs on the event loop thread ...
INLINE_MAX_BYTES = 128 << 10  # ... when it is also this small



@dataclass(frozen=True)
class StoreOptions:
    """How one store is laid out and flushed.  Servers fill it from the topology config."""

    mirrors: tuple[str, ...]  # directories holding identical copies of the journal
    index_path: str | None = None  # SQLite index; default <first mirror>/index.sqlite
    segment_bytes: int = 64 << 20  # a journal segment is sealed once this big
    max_batch_bytes: int = 8 << 20  # one group flush carries at most this much
    max_batch_frames: int = 4096  # ... and at most this many transactions
    auto_checkpoint_bytes: int = 256 << 20  # checkpoint after this much journal (0: never)
    readers: int = 2  # threads serving index and blob reads
    preallocate: bool = True  # zero-fill the next segment ahead of time (faster flushes)
    verify_index: bool = True  # PRAGMA quick_check at open; a damaged index is rebuilt
    fsync: bool = True  # False only for CPU-path benchmarks: breaks I-1

    def index_file(self) -> str:
        return self.index_path or os.path.join(self.mirrors[0], "index.sqlite")


class IndexAheadError(Exception):
    """The index holds frames the journal does not have."""


@dataclass
class RecoveryReport:
    """What ``open`` found and did; logged as ``storage.recovered``."""

    epoch: int = 0
    applied_before: int = 0
    replayed_frames: int = 0
    last_seq: int = 0
    index_rebuilt: bool = False
    checkpoint_seq: int = 0
    torn_segments_removed: int = 0
    tail_cut_bytes: int = 0
    repairs: int = 0
    orphans_removed: int = 0
    segments_retired: int = 0
    seconds: float = 0.0


@dataclass
class StoreStats:
    commits: int = 0
    flushes: int = 0
    bytes_written: int = 0
    checkpoints: int = 0
    repairs: int = 0
    degraded_events: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Transaction:
    """Records and blobs that become durable together, or not at all.

    Nothing is reserved until ``commit``: a transaction that is dropped
    without committing leaves no trace.
    """

    def __init__(self, store: "Store"):
        self._store = store
        self._records: list[tuple[int, bytes]] = []
        self._frees: list[int] = []

    def put_blob(self, data: bytes) -> int:
        """Store a body with this transaction; return its id (never reused in this store)."""
        blob_id = self._store._new_blob_id()
        self._records.append((rec.REC_BLOB, rec.blob_payload(blob_id, data)))
        return blob_id

    def free_blob(self, blob_id: int) -> None:
        self._frees.append(blob_id)

    def add(self, rtype: int, payload: bytes) -> None:
        if not rec.FIRST_CONSUMER_TYPE <= rtype < 256:
            raise ValueError(f"consumer record types are {rec.FIRST_CONSUMER_TYPE}..255")
        self._records.append((rtype, payload))

    def _move_blob(self, blob_id: int, data: bytes) -> None:
        self._records.append((rec.REC_MOVE, rec.blob_payload(blob_id, data)))

    async def commit(self) -> int:
        """Make the transaction durable (I-1); return its seq."""
        records = list(self._records)
        if self._frees:
            records.append((rec.REC_FREE, rec.free_payload(self._frees)))
        return await self._store._commit(records)


class Store:
    """One journaled store.  Create with ``await Store.open(options, applier)``."""

    def __init__(self, options: StoreOptions, applier: Applier, fileops: FileOps | None = None,
                 on_event: Callable[..., None] | None = None):
        self.options = options
        self.applier = applier
        self.fileops = fileops or FileOps(fsync=options.fsync)
        self._user_event = on_event
        self.journal = self._new_journal()
        self.index = Index(options.index_file(), applier)
        self.fence: Fence | None = None
        self.report = RecoveryReport()
        self.stats = StoreStats()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "store-writer")
        # Applies acknowledged frames to the index, in seq order, while the writer
        # thread already flushes the next batch. Owns the index's writer connection
        # once the store is open.
        self._indexer = concurrent.futures.ThreadPoolExecutor(1, "store-index")
        self._readers = concurrent.futures.ThreadPoolExecutor(max(1, options.readers), "store-reader")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._next_seq = 1
        self._next_blob_id = 1
        self._acked_seq = 0
        self._unapplied: list = []  # acknowledged frames not yet handed to the indexer
        self._apply_timer: asyncio.TimerHandle | None = None
        self._last_written = 0
        self._apply_waiters: list[tuple[int, asyncio.Future]] = []
        # (seq, encoded frame size, records, future) waiting for a flush
        self._pending: list[tuple[int, int, list[tuple[int, bytes]], asyncio.Future]] = []
        self._kick_scheduled = False
        self._flushing = False  # a batch is on the writer thread
        self._idle = asyncio.Event()  # set when no batch is in flight
        self._idle.set()
        self._failure: MailError | None = None
        self._since_checkpoint = 0
        self._checkpoint_task: asyncio.Task | None = None
        self._checkpoint_lock = asyncio.Lock()
        self._io_lock = threading.Lock()  # the journal's write side: appends, rotation, retirement
        self._no_retire = 0  # > 0 while a mirror rebuild copies files
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- events ----------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        if event == "storage.mirror_repaired":
            self.stats.repairs += 1
            self.report.repairs += 1
        elif event == "storage.mirror_degraded":
            self.stats.degraded_events += 1
        elif event == "storage.tail_cut":
            self.report.tail_cut_bytes += fields.get("cut", 0)
        level = logging.WARNING if event in ("storage.mirror_degraded", "storage.tail_cut",
                                             "storage.fenced", "storage.failed") else logging.INFO
        log.log(level, event, extra={"event": event, **fields})
        if self._user_event:
            self._user_event(event, **fields)

    # -- opening -----------------------------------------------------------------
    @classmethod
    async def open(cls, options: StoreOptions, applier: Applier, *, fileops: FileOps | None = None,
                   on_event: Callable[..., None] | None = None) -> "Store":
        store = cls(options, applier, fileops, on_event)
        store._loop = asyncio.get_running_loop()
        try:
            await store._loop.run_in_executor(store._writer, store._open_sync)
            await store._open_readers()
        except BaseException:
            await store._loop.run_in_executor(store._writer, store._close_sync)
            store._writer.shutdown(wait=False)
            store._indexer.shutdown(wait=False)
            store._readers.shutdown(wait=False)
            raise
        return store

    def _open_sync(self) -> None:
        started = time.monotonic()
        # Everything from listing the segments to starting ours happens under the
        # open lock and after the epoch bump: a second opener waits, and a former
        # owner that is still running fails its next fence check.
        with open_lock(self._lock_dir()):
            self.fence = Fence.take(self.fileops, [m.path for m in self.journal.mirrors
                                                   if os.path.isdir(m.path)])
            self.report.epoch = self.fence.epoch
            for attempt in range(OPEN_ATTEMPTS):
                try:
                    self._recover(self.fence.epoch)
                    break
                except SegmentExistsError:
                    # A former owner started a segment after we listed them (it had
                    # passed its fence check just before our bump). List again: its
                    # segment is then sealed like the others.
                    if attempt + 1 == OPEN_ATTEMPTS:
                        raise
                    self.journal.close()
                    self.journal = self._new_journal()
        self.report.seconds = round(time.monotonic() - started, 6)
        journal = self.journal
        self._event("storage.recovered", **asdict(self.report))
        self._event("storage.opened", mirrors=[m.path for m in journal.mirrors],
                    healthy=len(journal.healthy()), epoch=self.fence.epoch, next_seq=self._next_seq)

    def _lock_dir(self) -> str:
        """Create the mirror directories that can be; the first one holds the open lock."""
        usable = []
        for mirror in self.journal.mirrors:
            try:
                self.fileops.makedirs(mirror.path)
                usable.append(mirror.path)
            except OSError:
                continue
        if not usable:
            raise MailError(ErrorKind.UNAVAILABLE, detail="no mirror directory is usable")
        return usable[0]

    def _new_journal(self) -> Journal:
        journal = Journal(list(self.options.mirrors), self.fileops, self.options.segment_bytes, self._event,
                          self.options.preallocate)
        journal.fence_check = self._check_fence
        return journal

    def _recover(self, epoch: int) -> None:
        """List, seal, replay and start a segment (I-3); the caller holds the lock and the epoch."""
        journal = self.journal
        numbers = journal.discover()
        healthy_paths = [m.path for m in journal.healthy()]
        before = len(numbers)
        journal.load_segments(numbers)
        self.report.torn_segments_removed = before - len(journal.segments)
        self._remove_temp_files()
        ckpt_seqs = ckpt.list_seqs(self.fileops, healthy_paths)
        checkpoint_seq = ckpt_seqs[-1] if ckpt_seqs else 0
        self.report.checkpoint_seq = checkpoint_seq

        rebuild = False
        if self.index.conn is None:
            try:
                self.index.open(verify=self.options.verify_index)
                self._claim_index(epoch)
                if self.index.applied_seq < checkpoint_seq or not self._index_covers_journal():
                    rebuild = True
            except sqlite3.DatabaseError:
                rebuild = True  # unreadable or damaged: it is derived, make it anew
            self.report.applied_before = self.index.applied_seq
        if rebuild:
            self._rebuild_index_sync(epoch)
        try:
            last_seq = self._replay(epoch)
        except (sqlite3.DatabaseError, IndexAheadError) as exc:
            if rebuild:
                raise
            # Damage the quick check did not see, met while applying; or an index
            # ahead of the journal.
            log.warning("storage.index_rebuilt", extra={"event": "storage.index_rebuilt", "reason": str(exc)})
            self._rebuild_index_sync(epoch)
            last_seq = self._replay(epoch)
        journal.resync_stale()  # mirrors that missed writes get everything anew
        self._next_seq = last_seq + 1
        self._last_written = last_seq
        self._next_blob_id = self.index.get("next_blob_id", 1)
        self.report.last_seq = last_seq
        journal.start_segment(self._next_seq, epoch)
        self._reconcile_checkpoints()
        self.report.segments_retired = self._retire_sync(checkpoint_seq)

    def _claim_index(self, epoch: int) -> None:
        """Make the index ours; a frozen former owner may hold SQLite's write lock forever."""
        try:
            self.index.claim(epoch, busy_ms=CLAIM_BUSY_MS)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            # Its lock lives in the old files: work on a copy of the main file
            # under the same name, with fresh -wal/-shm files. Transactions it
            # had only in its WAL are replayed from the journal.
            self.index.close()
            path = self.index.path
            tmp = path + ".takeover.tmp"
            shutil.copyfile(path, tmp)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)
            os.replace(tmp, path)
            self.index.open(verify=True)
            self.index.claim(epoch)

    def _check_fence(self) -> None:
        """Raise FencedError if another process took the store (I-6). Any thread."""
        if self.fence is not None:
            self.fence.check([m.path for m in self.journal.healthy()])

    def _index_covers_journal(self) -> bool:
        """The index must not be older than the oldest journal segment (else frames are missing)."""
        if not self.journal.segments:
            return True
        oldest = min(self.journal.segments.values(), key=lambda s: s.number)
        return self.index.applied_seq + 1 >= oldest.first_seq

    def _remove_temp_files(self) -> None:
        for mirror in self.journal.healthy():
            for filename in self.fileops.listdir(mirror.path):
                if filename.endswith((".tmp", ".prealloc")):
                    try:
                        self.fileops.remove(os.path.join(mirror.path, filename))
                        self.report.orphans_removed += 1
                    except OSError:
                        pass

    def _replay(self, epoch: int) -> int:
        """Apply every frame past ``applied_seq``; return the last seq in the journal."""
        applied = self.index.applied_seq
        journal = self.journal
        start = None
        for seg in sorted(journal.segments.values(), key=lambda s: s.number):
            if seg.first_seq <= applied + 1:
                start = seg.number
        last = applied
        batch: list = []
        expected: int | None = None
        first_new = True
        for scanned in journal.scan(start):
            frame = scanned.frame
            if expected is not None and frame.seq != expected:
                raise CorruptError(f"journal seq gap: expected {expected}, found {frame.seq} "
                                   f"at {scanned.segment}:{scanned.offset}")
            expected = frame.seq + 1
            last = frame.seq
            if frame.seq <= applied:
                continue
            if first_new and frame.seq != applied + 1:
                # The first frame past the index must be the very next one.
                raise CorruptError(f"journal starts at seq {frame.seq}, index needs {applied + 1}")
            first_new = False
            batch.append((frame.seq, scanned.segment, scanned.offset,
                          [(r.rtype, r.payload) for r in frame.records]))
            if len(batch) >= 1000:
                self.index.apply_batch(batch, epoch)
                self.report.replayed_frames += len(batch)
                batch = []
        if batch:
            self.index.apply_batch(batch, epoch)
            self.report.replayed_frames += len(batch)
        if expected is None and journal.segments:
            # No frame past the index: the journal ends just before its last segment.
            last = max(s.first_seq for s in journal.segments.values()) - 1
        if last < applied:
            # The index holds frames the journal does not: it is not derived from
            # this journal (restored from elsewhere, or the journal lost synced
            # data). Never build on it.
            raise IndexAheadError(f"index at seq {applied}, journal ends at {last}")
        return last

    def _read_checkpoint(self, seq: int) -> list[tuple[int, bytes]]:
        errors = []
        for mirror in self.journal.healthy():
            try:
                return ckpt.read(self.fileops, mirror.path, seq)
            except (OSError, rec.FrameError) as exc:
                errors.append(f"{mirror.path}: {exc}")
        raise CorruptError(f"checkpoint {seq} unreadable on every mirror: {'; '.join(errors)}")

    def _rebuild_index_sync(self, epoch: int) -> None:
        """Throw the index away and rebuild it from the latest intact checkpoint."""
        self.index.close()
        path = self.index.path
        remove_index_files(path)
        self.index.open()
        self.index.claim(epoch)
        seqs = ckpt.list_seqs(self.fileops, [m.path for m in self.journal.healthy()])
        for seq in reversed(seqs):
            try:
                records = self._read_checkpoint(seq)
            except CorruptError as exc:
                log.warning("storage.checkpoint_unreadable", extra={"event": "storage.checkpoint_unreadable",
                                                                   "detail": str(exc)})
                continue
            self.index.load_checkpoint(seq, records, epoch)
            break
        self.report.index_rebuilt = True

    def _reconcile_checkpoints(self) -> None:
        """Every healthy mirror holds the latest intact checkpoint; older ones are removed."""
        mirrors = self.journal.healthy()
        seqs = ckpt.list_seqs(self.fileops, [m.path for m in mirrors])
        if not seqs:
            return
        latest = seqs[-1]
        holders = [m for m in mirrors if os.path.exists(os.path.join(m.path, ckpt.name(latest)))]
        content: bytes | None = None
        for mirror in mirrors:
            if mirror not in holders:
                if content is None:
                    try:
                        content = self.fileops.read_all(os.path.join(holders[0].path, ckpt.name(latest)))
                    except OSError:
                        content = b""
                if content:
                    try:
                        ckpt.write(self.fileops, mirror.path, latest, [content])
                        self._event("storage.mirror_repaired", mirror=mirror.path, checkpoint=latest)
                    except OSError as exc:
                        self.journal.degrade(mirror, exc)
            for old in seqs[:-1]:
                try:
                    self.fileops.remove(os.path.join(mirror.path, ckpt.name(old)))
                    self.report.orphans_removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    self.journal.degrade(mirror, exc)

    # -- committing ------------------------------------------------------------------
    def transaction(self) -> Transaction:
        self._check_usable()
        return Transaction(self)

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise MailError(ErrorKind.UNAVAILABLE, detail="store closed")

    def _new_blob_id(self) -> int:
        blob_id = self._next_blob_id
        self._next_blob_id += 1
        return blob_id

    async def _commit(self, records: list[tuple[int, bytes]]) -> int:
        self._check_usable()
        # The seq is taken and the frame queued with no await in between, so
        # frames reach the journal in seq order.
        seq = self._next_seq
        self._next_seq += 1
        # The frame is encoded (and checksummed) by whichever thread flushes it:
        # on the writer thread, CRC-32 of large payloads runs without the GIL,
        # beside the event loop.
        future = self._loop.create_future()
        self._pending.append((seq, rec.frame_size(records), records, future))
        if not self._kick_scheduled and not self._flushing:
            # Flush after the commits made in this loop iteration have joined.
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)
        return await future

    def _kick(self) -> None:
        """Flush what is queued: inline for a lone small commit, else on the writer thread.

        One batch at a time; commits made while it is in flight queue up and
        form the next batch (I-2). Plain callbacks, not a task: at one
        writer, a task per commit costs more than the rest of the loop's work.
        """
        self._kick_scheduled = False
        while self._pending and not self._flushing and self._failure is None:
            batch = self._take_batch()
            try:
                if len(batch) <= INLINE_MAX_FRAMES and sum(b[1] for b in batch) <= INLINE_MAX_BYTES:
                    # A lone small commit is flushed right here: handing a single
                    # fdatasync to a thread costs two thread wake-ups, about as much
                    # as the sync itself.
                    frames = self._append(batch, blocking=False)
                    if frames is not None:
                        self._acknowledge(batch)
                        self._queue_apply(frames)
                        self._maybe_checkpoint()
                        continue
            except BaseException as exc:
                self._fail(self._as_failure(exc), batch)
                return
            self._flushing = True
            self._idle.clear()
            job = self._loop.run_in_executor(self._writer, self._write_batch, batch)
            job.add_done_callback(functools.partial(self._flushed, batch))
            return
        if not self._flushing:
            self._idle.set()

    def _flushed(self, batch: list, job: asyncio.Future) -> None:
        self._flushing = False
        exc = job.exception()
        if exc is not None:
            self._fail(self._as_failure(exc), batch)
            self._idle.set()
            return
        self._maybe_checkpoint()
        self._kick()

    def _as_failure(self, exc: BaseException) -> MailError:
        if isinstance(exc, MailError):
            return exc
        log.error("storage.failed", exc_info=exc, extra={"event": "storage.failed"})
        return MailError(ErrorKind.TEMP, detail=f"store write failed: {type(exc).__name__}: {str(exc)[:200]}")

    def _acknowledge(self, batch: list) -> None:
        """Loop thread: the batch is durable and still ours; its commits return."""
        for seq, _, _, future in batch:
            if not future.done():
                future.set_result(seq)
        self._acked_seq = batch[-1][0]
        self.stats.commits += len(batch)
        self.stats.flushes += 1
        if len(self.stats.batch_sizes) < 100000:
            self.stats.batch_sizes.append(len(batch))

    def _applied(self, seq: int) -> None:
        """Loop thread: the index holds everything up to ``seq``; wake readers waiting for it."""
        waiting = self._apply_waiters
        self._apply_waiters = []
        for target, future in waiting:
            if future.done():
                continue
            if target <= seq:
                future.set_result(None)
            else:
                self._apply_waiters.append((target, future))

    def _queue_apply(self, frames: list) -> None:
        """Loop thread: hand acknowledged frames to the indexer, in batches.

        Applying in batches (when enough have gathered, after APPLY_DELAY, or
        at once when a reader waits) makes fewer SQLite transactions and fewer
        thread wake-ups competing with the flush path for the GIL.
        """
        self._unapplied.extend(frames)
        if len(self._unapplied) >= APPLY_BATCH or self._apply_waiters:
            self._submit_apply()
        elif self._apply_timer is None:
            self._apply_timer = self._loop.call_later(APPLY_DELAY, self._submit_apply)

    def _submit_apply(self) -> None:
        if self._apply_timer is not None:
            self._apply_timer.cancel()
            self._apply_timer = None
        if self._unapplied:
            frames, self._unapplied = self._unapplied, []
            self._indexer.submit(self._apply, frames)

    async def _caught_up(self) -> None:
        """Read-your-writes: wait until the index holds every acknowledged commit."""
        target = self._acked_seq
        self._submit_apply()
        while self.index.applied_seq < target:
            if self._failure is not None:
                raise self._failure
            future = self._loop.create_future()
            self._apply_waiters.append((target, future))
            await future

    def _take_batch(self) -> list:
        size = 0
        n = 0
        for _, frame_size, _, _ in self._pending:
            if n and (size + frame_size > self.options.max_batch_bytes or n >= self.options.max_batch_frames):
                break
            size += frame_size
            n += 1
        batch, self._pending = self._pending[:n], self._pending[n:]
        return batch

    def _append(self, batch: list, blocking: bool = True) -> list | None:
        """Write + sync the batch on every mirror and check the fence; return its frames.

        Runs on the writer thread, or on the loop thread for a lone small
        commit (then ``blocking=False``: None if the journal is busy).
        """
        if not self._io_lock.acquire(blocking=blocking):
            return None
        epoch = self.fence.epoch
        parts: list[bytes] = []
        for seq, _, records, _ in batch:
            parts += rec.encode_frame_parts(seq, epoch, records)
        data = b"".join(parts)
        try:
            segment, offset = self.journal.append(data, batch[0][0])
            self._last_written = batch[-1][0]
        finally:
            self._io_lock.release()
        self.stats.bytes_written += len(data)
        self._since_checkpoint += len(data)
        # I-6: nothing is acknowledged unless we still own the store after the sync.
        self._check_fence()
        frames = []
        for seq, frame_size, records, _ in batch:
            frames.append((seq, segment, offset, records))
            offset += frame_size
        return frames

    def _apply(self, frames: list) -> None:
        """Writer thread: apply acknowledged frames to the index, then wake waiting readers."""
        try:
            self.index.apply_batch(frames, self.fence.epoch)
        except BaseException as exc:
            failure = self._as_failure(exc)
            self._loop.call_soon_threadsafe(self._fail, failure, [])
            return
        self._loop.call_soon_threadsafe(self._applied, frames[-1][0])

    def _write_batch(self, batch: list) -> None:
        """Writer thread: append, acknowledge, apply.

        The acknowledgement goes out before the index is applied: the batch is
        durable (I-1) and the index is derived, so applying it overlaps the
        callers' next steps; readers wait for it in ``_caught_up``.
        """
        frames = self._append(batch)
        self._loop.call_soon_threadsafe(self._acknowledge, batch)
        self._loop.call_soon_threadsafe(self._queue_apply, frames)

    def _fail(self, exc: MailError, batch: list) -> None:
        """The store can no longer write: fail this batch and everything after it."""
        if self._failure is None:
            self._failure = exc
            event = "storage.fenced" if isinstance(exc, FencedError) else "storage.failed"
            self._event(event, error=exc.detail)
        exc = self._failure
        for item in batch + self._pending:
            if not item[3].done():
                item[3].set_exception(exc)
        self._pending = []
        for _, future in self._apply_waiters:
            if not future.done():
                future.set_exception(exc)
        self._apply_waiters = []

    @property
    def fenced(self) -> bool:
        return isinstance(self._failure, FencedError)

    @property
    def failure(self) -> MailError | None:
        return self._failure

    # -- reading ---------------------------------------------------------------------
    async def _open_readers(self) -> None:
        """Give every reader thread its connection now, while the index file is surely there.

        An open connection keeps working if the directory holding the index
        is lost (the first mirror, by default); a new one would not.
        """
        count = max(1, self.options.readers)
        barrier = threading.Barrier(count)

        def open_one() -> None:
            self._reader_conn()
            barrier.wait(timeout=30)  # hold this thread so each task lands on its own

        await asyncio.gather(*(self._loop.run_in_executor(self._readers, open_one) for _ in range(count)))

    def _reader_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.index.path)
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader_conn()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a reader connection inside one read transaction."""
        self._check_usable()
        await self._caught_up()
        return await self._loop.run_in_executor(self._readers, self._read_sync, fn)

    def _blob_location(self, blob_id: int) -> tuple[int, int, int, bytes]:
        row = self._read_sync(lambda c: c.execute(
            "SELECT segment, offset, length, sha256 FROM _blobs WHERE id = ?", (blob_id,)).fetchone())
        if row is None:
            raise MailError(ErrorKind.NOTFOUND, detail=f"blob {blob_id} not found")
        return row

    def _read_blob_sync(self, blob_id: int) -> bytes:
        location = self._blob_location(blob_id)
        while True:
            segment, offset, length, digest_ = location
            try:
                return self.journal.read(segment, offset, length,
                                         lambda b: hashlib.sha256(b).digest() == digest_)
            except CorruptError:
                # Compaction may have moved the body and retired its segment while
                # we read: look again, and retry if it moved.
                moved = self._blob_location(blob_id)
                if moved == location:
                    raise
                location = moved

    async def read_blob(self, blob_id: int) -> bytes:
        """The body, verified against its hash; a bad copy is repaired from a good mirror."""
        self._check_usable()
        await self._caught_up()
        return await self._loop.run_in_executor(self._readers, self._read_blob_sync, blob_id)

    async def iter_blob(self, blob_id: int, chunk: int = 64 << 10) -> AsyncIterator[bytes]:
        """Stream a body in chunks; the hash is checked at the end (CorruptError if bad)."""
        if chunk <= 0:
            raise ValueError("chunk size must be positive")
        loop = self._loop
        await self._caught_up()
        segment, offset, length, digest_ = await loop.run_in_executor(self._readers, self._blob_location, blob_id)
        if length <= chunk:
            yield await self.read_blob(blob_id)
            return
        hasher = hashlib.sha256()
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            data = await loop.run_in_executor(self._readers, self.journal.read, segment, offset + pos, n,
                                              lambda b: True)
            hasher.update(data)
            pos += n
            if pos == length and hasher.digest() != digest_:
                # Repair through the verified path, then tell the caller to start over.
                await self.read_blob(blob_id)
                raise CorruptError(f"blob {blob_id} changed while streaming; repaired, retry")
            yield data

    @property
    def applied_seq(self) -> int:
        return self.index.applied_seq

    @property
    def epoch(self) -> int:
        return self.fence.epoch if self.fence else 0

    async def digest(self) -> str:
        """Hash of the index state (see :func:`intermail.storage.index.digest`)."""
        return await self.read(digest)

    # -- checkpoints and retirement ------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        limit = self.options.auto_checkpoint_bytes
        if limit and self._since_checkpoint >= limit and (
                self._checkpoint_task is None or self._checkpoint_task.done()):
            self._checkpoint_task = self._loop.create_task(self._auto_checkpoint())

    async def _auto_checkpoint(self) -> None:
        try:
            await self.compact()
        except MailError as exc:
            log.warning("storage.checkpoint_failed", extra={"event": "storage.checkpoint_failed",
                                                          "error": exc.detail})

    async def checkpoint(self) -> int:
        """Write the state at the current seq to every mirror; retire what it covers.  Returns its seq."""
        self._check_usable()
        async with self._checkpoint_lock:
            loop = self._loop
            await self._caught_up()  # the checkpoint covers every commit acknowledged before it
            try:
                # Seal the current segment so everything before the checkpoint is retirable.
                await loop.run_in_executor(self._writer, self._rotate_sync)
                seq = await loop.run_in_executor(self._readers, self._write_checkpoint_sync)
                retired = await loop.run_in_executor(self._writer, self._retire_sync, seq)
            except FencedError as exc:
                self._fail(exc, [])
                raise
            self._since_checkpoint = 0
            self.stats.checkpoints += 1
            self._event("storage.checkpoint", seq=seq, retired=retired)
            return seq

    def _rotate_sync(self) -> None:
        with self._io_lock:
            if self.journal.current.end > rec.SEG_HEADER_SIZE:
                self.journal.start_segment(self._written_seq() + 1, self.fence.epoch)

    def _written_seq(self) -> int:
        """The seq of the last frame in the journal (called with the io lock held)."""
        return self._last_written


    def _write_checkpoint_sync(self) -> int:
        def snapshot(conn: sqlite3.Connection) -> tuple[int, list[bytes]]:
            row = conn.execute("SELECT value FROM _engine WHERE key='applied_seq'").fetchone()
            seq = row[0] if row else 0
            return seq, list(ckpt.encode(seq, self.fence.epoch, snapshot_records(conn, self.applier)))

        seq, pieces = self._read_sync(snapshot)  # one read transaction: a consistent state
        written = 0
        for mirror in self.journal.healthy():
            self._check_fence()  # a fenced owner writes no checkpoint (I-6)
            try:
                ckpt.write(self.fileops, mirror.path, seq, pieces)
                written += 1
            except OSError as exc:
                self.journal.degrade(mirror, exc)
        if not written:
            self.journal.require_healthy()
        return seq

    def _retire_sync(self, checkpoint_seq: int) -> int:
        """Writer thread: retire sealed segments fully covered by the checkpoint with no live blob."""
        if self._no_retire or not checkpoint_seq:
            return 0
        with self._io_lock:
            self._check_fence()  # retiring rewrites SEALS and deletes files: owners only
            return self._retire_locked(checkpoint_seq)

    def _retire_locked(self, checkpoint_seq: int) -> int:
        journal = self.journal
        numbers = sorted(journal.segments)
        # Through a reader connection: the index's writer connection belongs to the
        # indexer thread. The index is at or past the checkpoint's seq here.
        live = self._read_sync(lambda c: {seg for (seg,) in c.execute("SELECT DISTINCT segment FROM _blobs")})
        # I-7: frames after the last backup stay until the next incremental has them.
        pin = backup_retention_seq([m.path for m in journal.healthy()])
        keep_after = checkpoint_seq if pin is None else min(checkpoint_seq, pin)
        doomed = []
        for i, n in enumerate(numbers[:-1]):
            if journal.current is not None and n >= journal.current.number:
                break
            last_seq_in_segment = journal.segments[numbers[i + 1]].first_seq - 1
            if last_seq_in_segment <= keep_after and n not in live:
                doomed.append(n)
        journal.retire_many(doomed)
        retired = len(doomed)
        for mirror in journal.healthy():
            for old in ckpt.list_seqs(self.fileops, [mirror.path]):
                if old < checkpoint_seq:
                    try:
                        self.fileops.remove(os.path.join(mirror.path, ckpt.name(old)))
                    except OSError:
                        pass
        return retired

    async def compact(self, min_live_ratio: float = 0.5) -> int:
        """Rewrite live blobs of sparse sealed segments, then checkpoint; return blobs moved."""
        self._check_usable()
        current = self.journal.current.number
        sizes = {n: s.end for n, s in self.journal.segments.items()}
        live = await self.read(lambda c: c.execute(
            "SELECT segment, sum(length) FROM _blobs GROUP BY segment").fetchall())
        sparse = [seg for seg, nbytes in live
                  if seg < current and sizes.get(seg, 0) > 0 and nbytes < min_live_ratio * sizes[seg]]
        moved = 0
        for seg in sparse:
            ids = await self.read(lambda c, s=seg: [r[0] for r in c.execute(
                "SELECT id FROM _blobs WHERE segment = ? ORDER BY id", (s,))])
            for blob_id in ids:
                try:
                    data = await self.read_blob(blob_id)
                except MailError as exc:
                    if exc.kind is ErrorKind.NOTFOUND:
                        continue  # freed since we listed it: nothing to move
                    raise
                txn = self.transaction()
                txn._move_blob(blob_id, data)
                await txn.commit()
                moved += 1
        await self.checkpoint()
        return moved

    async def backup(self, dest: str, kind: str = "full", **kwargs: Any) -> dict:
        """Online backup into ``dest`` (I-7); see :func:`intermail.storage.backup.take_backup`."""
        from intermail.storage.backup import take_backup
        return await take_backup(self, dest, kind, **kwargs)

    # -- mirrors ------------------------------------------------------------------------------
    def health(self) -> dict:
        return {
            "ok": self._failure is None and not self._closed,
            "fenced": self.fenced,
            "error": self._failure.detail if self._failure else "",
            "epoch": self.epoch,
            "applied_seq": self.index.applied_seq,
            "next_seq": self._next_seq,
            "mirrors": [{"path": m.path, "healthy": m.healthy, "error": m.error}
                        for m in self.journal.mirrors],
            "segments": len(self.journal.segments),
        }

    async def rebuild_mirror(self, index: int) -> None:
        """Bring mirror ``index`` back: copy every file online, then rejoin it to the writes."""
        self._check_usable()
        journal = self.journal
        mirror = journal.mirrors[index]
        if mirror.healthy:
            return
        loop = self._loop
        self._no_retire += 1
        try:
            # Bulk copy beside the writes: sealed segments and checkpoints never change.
            copied = await loop.run_in_executor(self._readers, journal.copy_all, mirror)
            # Then, under the io lock where no write can interleave, whatever changed
            # meanwhile (the current segment, anything sealed since), and the mirror
            # takes writes again.
            await loop.run_in_executor(self._writer, self._rejoin_mirror, mirror, copied)
        finally:
            self._no_retire -= 1
        self._event("storage.mirror_rebuilt", mirror=mirror.path)

    def _rejoin_mirror(self, mirror, copied: dict) -> None:
        with self._io_lock:
            self._check_fence()
            self.journal.copy_all(mirror, since=copied)
            self.fileops.write_atomic(os.path.join(mirror.path, EPOCH_FILE), f"{self.fence.epoch}\n".encode())
            self.journal.rejoin(mirror)

    # -- closing ------------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        while (self._pending or self._flushing) and self._failure is None:
            await self._idle.wait()
            await asyncio.sleep(0)
        while self._flushing:
            await self._idle.wait()
        if self._checkpoint_task is not None:
            try:
                await self._checkpoint_task
            except Exception:
                pass
        self._closed = True
        self._submit_apply()
        self._indexer.shutdown(wait=True)
        await self._loop.run_in_executor(self._writer, self._close_sync)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._reader_lock:
            for conn in self._reader_conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._reader_conns.clear()

    def _close_sync(self) -> None:
        self.journal.close()
        self.index.close()
        if self.fence is not None:
            self.fence.close()


# -- offline tools -------------------------------------------------------------------------------


async def rebuild_index(options: StoreOptions, applier: Applier, **kwargs: Any) -> Store:
    """Open the store with its index thrown away: the state comes from checkpoint + journal only."""
    remove_index_files(options.index_file())
    return await Store.open(options, applier, **kwargs)
