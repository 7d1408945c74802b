"""The journal: segment files replicated across N mirror directories (I-1, I-3, I-5).

Owns the byte layout on disk and the mirrors' health; knows nothing of what
records mean.  Every mirror holds the same files with the same bytes at the
same offsets, so a position ``(segment, offset)`` names the same bytes on
each, and any mirror can repair another.

Writing (only from the engine's writer thread):
  ``append`` writes one batch of frames at the current offset of the current
  segment on every healthy mirror (in parallel), then ``fdatasync``s each.
  A mirror whose write or sync fails (EIO, ENOSPC, EROFS) or whose file
  vanished (link count 0) is marked degraded and skipped from then on; the
  batch succeeds while one mirror is healthy.  A new segment's header is
  synced, and its directory too, before any frame goes into it.

Opening (I-3):
  every open starts a new segment whose header records the previous
  segment's valid end (the *seal*): bytes a fenced former owner may still
  write past that end are never read.  ``scan`` reads frames with read-repair:
  each frame is checked on every mirror and bad or missing copies are
  rewritten from a good one; the last segment ends at the first position
  where no mirror has a valid frame (the torn tail, cut on every mirror).

Reading: ``read`` verifies through the caller's check and repairs the same way.

Logs: ``storage.mirror_degraded``, ``storage.mirror_repaired``,
``storage.tail_cut``, ``storage.segment_retired``.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from intermail.errors import CorruptError, ErrorKind, FencedError, MailError
from intermail.storage import checkpoint as ckpt
from intermail.storage import records as rec
from intermail.storage.fileops import FileOps

log = logging.getLogger("intermail.storage")

SEGMENT_SUFFIX = ".seg"
SEALS_FILE = "SEALS"
MIRRORS_FILE = "MIRRORS"
CHECKPOINT_SUFFIX = ckpt.SUFFIX
SPARE_SUFFIX = ".prealloc"
READ_AHEAD = 1 << 20
FD_GRACE_SECONDS = 30.0  # a dropped read fd is closed this long after (see _drop_read_fd)


def segment_name(segment: int) -> str:
    return rec.numbered_name("j", segment, 10, SEGMENT_SUFFIX)


def parse_segment_name(name: str) -> int | None:
    return rec.parse_numbered_name(name, "j", SEGMENT_SUFFIX)


@dataclass
class Mirror:
    index: int
    path: str
    healthy: bool = True
    stale: bool = False  # missed writes while degraded: not trusted until resynchronised
    error: str = ""
    degraded_at: float = 0.0
    write_fd: int | None = None
    read_fds: dict[int, int] = field(default_factory=dict)


@dataclass
class Segment:
    number: int
    first_seq: int
    end: int  # valid length: sealed end, or the write offset of the current segment


@dataclass(frozen=True)
class ScannedFrame:
    segment: int
    offset: int
    frame: rec.Frame


class SegmentExistsError(FencedError):
    """The segment we were about to create exists: another process writes this store."""


class Journal:
    """Segment files on N mirrors.  Not thread-safe: writes come from one thread."""

    def __init__(self, mirror_paths: list[str], fileops: FileOps, segment_bytes: int,
                 on_event: Callable[..., None] | None = None, preallocate: bool = True):
        if not mirror_paths:
            raise ValueError("a store needs at least one mirror directory")
        self.fileops = fileops
        self.mirrors = [Mirror(i, os.path.abspath(p)) for i, p in enumerate(mirror_paths)]
        self.segment_bytes = segment_bytes
        self.segments: dict[int, Segment] = {}
        self.current: Segment | None = None
        self.epoch = 0
        self._on_event = on_event or (lambda event, **fields: None)
        self._pool = (concurrent.futures.ThreadPoolExecutor(len(self.mirrors) - 1, "mirror")
                      if len(self.mirrors) > 1 else None)
        self._read_lock = threading.Lock()  # guards read_fds opened from reader threads
        self._graveyard: list[tuple[float, int]] = []  # read fds dropped, closed after a grace time
        self.preallocate = preallocate
        self.fence_check: Callable[[], None] = lambda: None  # set by the engine (I-6)
        self._spares: dict[int, int] = {}
        self._spare_job: concurrent.futures.Future | None = None
        self._spare_pool = concurrent.futures.ThreadPoolExecutor(1, "segment-prealloc")

    # -- health ------------------------------------------------------------
    def healthy(self) -> list[Mirror]:
        return [m for m in self.mirrors if m.healthy]

    def degrade(self, mirror: Mirror, exc: BaseException) -> None:
        if not mirror.healthy:
            return
        # Only flags change here: degrade() is called from reader threads too,
        # and closing the writer's fd under it could let the number be reused
        # by another open file. The writer thread closes it (_close_degraded).
        mirror.healthy = False
        mirror.error = f"{type(exc).__name__}: {exc}"
        mirror.degraded_at = time.time()
        self._on_event("storage.mirror_degraded", mirror=mirror.path, error=mirror.error)
        # Remember it on the others: after a restart this mirror is not trusted
        # until it has been copied anew (its files may lack acknowledged frames).
        self._write_mirror_state()

    def require_healthy(self) -> None:
        if not self.healthy():
            errors = "; ".join(f"{m.path}: {m.error}" for m in self.mirrors)
            raise MailError(ErrorKind.UNAVAILABLE, detail=f"no healthy mirror left ({errors})")

    def _path(self, mirror: Mirror, segment: int) -> str:
        return os.path.join(mirror.path, segment_name(segment))

    # -- opening -------------------------------------------------------------
    def discover(self) -> list[int]:
        """Create missing mirror directories and return the union of segment numbers.

        A mirror that another mirror's ``MIRRORS`` file records as degraded
        holds stale files: it is left out (``stale``) until ``resync_stale``
        has copied everything onto it, so none of its files is trusted.
        """
        listed: dict[int, list[str]] = {}
        for mirror in self.mirrors:
            try:
                self.fileops.makedirs(mirror.path)
                listed[mirror.index] = self.fileops.listdir(mirror.path)
            except OSError as exc:
                mirror.healthy = False
                mirror.error = f"{type(exc).__name__}: {exc}"
        degraded: set[str] = set()
        for mirror in self.mirrors:
            if mirror.index in listed:
                degraded |= {p for p in self._read_mirror_state(mirror) if p != mirror.path}
        usable = [m for m in self.mirrors if m.index in listed]
        if any(m.path not in degraded for m in usable):
            for mirror in usable:
                if mirror.path in degraded:
                    mirror.healthy = False
                    mirror.stale = True
                    mirror.error = "stale: was degraded; resynchronised at open"
        numbers: set[int] = set()
        for mirror in self.healthy():
            for name in listed[mirror.index]:
                n = parse_segment_name(name)
                if n is not None:
                    numbers.add(n)
        self.require_healthy()
        return sorted(numbers)

    # -- mirror state: which mirrors missed writes ------------------------------------
    def _read_mirror_state(self, mirror: Mirror) -> dict[str, dict]:
        try:
            data = json.loads(self.fileops.read_all(os.path.join(mirror.path, MIRRORS_FILE)))
            return dict(data.get("degraded", {}))
        except (OSError, ValueError, AttributeError):
            return {}

    def _write_mirror_state(self) -> None:
        """Record on every healthy mirror which mirrors are degraded (best effort)."""
        degraded = {m.path: {"error": m.error, "since": m.degraded_at} for m in self.mirrors
                    if not m.healthy and not m.stale}
        payload = json.dumps({"degraded": degraded}, sort_keys=True).encode()
        for mirror in self.healthy():
            try:
                self.fileops.write_atomic(os.path.join(mirror.path, MIRRORS_FILE), payload)
            except OSError:
                pass  # its next write fails too and degrades it

    def resync_stale(self) -> None:
        """Copy everything onto mirrors that missed writes; they take writes again after.

        Called at open once the segments' ends are known (after the scan).
        """
        stale = [m for m in self.mirrors if m.stale]
        if not stale:
            return
        for mirror in stale:
            try:
                self.copy_all(mirror)
            except (OSError, rec.FrameError) as exc:
                mirror.stale = False
                mirror.error = f"resync failed: {type(exc).__name__}: {exc}"
                continue
            mirror.stale = False
            mirror.healthy = True
            mirror.error = ""
            self._on_event("storage.mirror_rebuilt", mirror=mirror.path)
        self._write_mirror_state()

    def copy_all(self, dst: Mirror, since: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
        """Make ``dst`` hold what the first healthy mirror holds; return what was copied.

        Segments, checkpoints and SEALS are copied whole (sizes say nothing
        about content: preallocated segments all have the same size); files
        on ``dst`` that the source lacks are removed.  With ``since`` (the
        result of an earlier call), files whose size and mtime did not change
        are skipped: sealed segments and checkpoints never change.
        """
        self._drop_spare(dst)
        src = self.healthy()[0]
        self.fileops.makedirs(dst.path)
        wanted = {segment_name(n) for n in self.segments}
        names = [n for n in self.fileops.listdir(src.path)
                 if n in wanted or n.endswith(CHECKPOINT_SUFFIX) or n == SEALS_FILE]
        for name in self.fileops.listdir(dst.path):
            if (parse_segment_name(name) is not None or name.endswith((CHECKPOINT_SUFFIX, SPARE_SUFFIX, ".tmp"))
                    or name == SEALS_FILE) and name not in names:
                self.fileops.remove(os.path.join(dst.path, name))
        copied: dict[str, tuple[int, int]] = {}
        for name in names:
            st = self.fileops.stat(os.path.join(src.path, name))
            stamp = (st.st_size, st.st_mtime_ns)
            copied[name] = stamp
            if since is not None and since.get(name) == stamp:
                continue
            self._copy_file(os.path.join(src.path, name), os.path.join(dst.path, name), st.st_size)
        self.fileops.sync_dir(dst.path)
        n_segment = {segment_name(n): n for n in self.segments}
        for name in names:
            if name in n_segment:
                self._drop_read_fd(dst, n_segment[name])
        return copied

    def _copy_file(self, src: str, dst: str, size: int) -> None:
        exists = os.path.exists(dst)
        fd = self.fileops.open_write(dst, create=not exists)
        try:
            with open(src, "rb") as fin:
                pos = 0
                while pos < size:
                    chunk = fin.read(min(READ_AHEAD, size - pos))
                    if not chunk:
                        break
                    self.fileops.pwrite(fd, dst, chunk, pos)
                    pos += len(chunk)
            os.ftruncate(fd, pos)
            self.fileops.sync_file(fd, dst)
        finally:
            self.fileops.close(fd)

    def _drop_spare(self, mirror: Mirror) -> None:
        fd = self._spares.pop(mirror.index, None)
        if fd is not None:
            try:
                self.fileops.close(fd)
            except OSError:
                pass

    def rejoin(self, mirror: Mirror) -> None:
        """A rebuilt mirror takes writes again (writer side, no write in flight)."""
        if self.current is not None:
            path = self._path(mirror, self.current.number)
            mirror.write_fd = self.fileops.open_write(path, create=False)
        mirror.error = ""
        mirror.stale = False
        mirror.healthy = True
        self._write_mirror_state()

    def _file_size(self, mirror: Mirror, segment: int) -> int:
        try:
            return self.fileops.stat(self._path(mirror, segment)).st_size
        except OSError:
            return -1

    def _read_header(self, segment: int, repair: bool = False) -> rec.SegmentHeader | None:
        """The segment's header from the first mirror with a valid one; with ``repair``,
        bad copies on mirrors that have the file are rewritten from it."""
        good: tuple[rec.SegmentHeader, bytes] | None = None
        bad: list[Mirror] = []
        for mirror in self.healthy():
            try:
                data = self._pread(mirror, segment, rec.SEG_HEADER_SIZE, 0)
                header = rec.SegmentHeader.decode(data)
            except (OSError, rec.FrameError):
                bad.append(mirror)
                continue
            if good is None:
                good = (header, data)
        if good is not None and repair:
            for mirror in bad:
                if os.path.exists(self._path(mirror, segment)):
                    self._repair_bytes(mirror, segment, 0, good[1])
        return good[0] if good else None

    def _valid_end(self, segment: int) -> int:
        """End of the last valid frame of a segment, on the mirror where it is furthest."""
        best = rec.SEG_HEADER_SIZE
        for mirror in self.healthy():
            pos = rec.SEG_HEADER_SIZE
            try:
                while True:
                    pos += self._read_frame(mirror, segment, pos)[0].size
            except (OSError, rec.FrameError):
                pass
            best = max(best, pos)
        return best

    def load_segments(self, numbers: list[int]) -> None:
        """Read headers, drop torn creations, seal ends; reconcile sealed files across mirrors."""
        headers: dict[int, rec.SegmentHeader] = {}
        for n in numbers:
            header = self._read_header(n, repair=True)
            if header is None or header.segment != n or header.kind != rec.KIND_JOURNAL:
                # A segment whose header never became durable held no frame:
                # frames are written only after the header and the directory
                # entry are synced. Remove it everywhere.
                for mirror in self.healthy():
                    try:
                        self.fileops.remove(self._path(mirror, n))
                    except FileNotFoundError:
                        pass
                continue
            headers[n] = header
        ordered = sorted(headers)
        seals = self._read_seals()
        for i, n in enumerate(ordered):
            if i + 1 == len(ordered):
                end = -1  # the last segment: the scan decides where it ends
            elif ordered[i + 1] == n + 1:
                end = headers[n + 1].prev_end
            elif n in seals:
                end = seals[n]  # its successor was retired; the seal was carried over
            else:
                # No seal known (a leftover of a retirement, or SEALS lost): it
                # ends at its last valid frame; retirement at open removes it
                # if it is checkpointed and holds nothing live.
                end = self._valid_end(n)
            self.segments[n] = Segment(n, headers[n].first_seq, end)
            if end >= 0:
                self._reconcile_sealed(n, end)

    def _reconcile_sealed(self, segment: int, end: int) -> None:
        """Make every healthy mirror hold exactly ``end`` bytes of a sealed segment."""
        sizes = {m.index: self._file_size(m, segment) for m in self.healthy()}
        source = next((m for m in self.healthy() if sizes[m.index] >= end), None)
        for mirror in self.healthy():
            size = sizes[mirror.index]
            try:
                if size > end:
                    # Past the seal: a fenced owner's late writes. Never read; cut.
                    self.fileops.truncate(self._path(mirror, segment), end)
                elif size < end and source is not None:
                    self._copy_range(source, mirror, segment, max(size, 0), end)
            except OSError as exc:
                self.degrade(mirror, exc)

    def _copy_range(self, src: Mirror, dst: Mirror, segment: int, start: int, end: int) -> None:
        path = self._path(dst, segment)
        create = not os.path.exists(path)
        fd = self.fileops.open_write(path, create=create)
        try:
            pos = start
            while pos < end:
                chunk = self._pread(src, segment, min(READ_AHEAD, end - pos), pos)
                if not chunk:
                    raise OSError(errno.EIO, "source mirror shorter than expected", path)
                self.fileops.pwrite(fd, path, chunk, pos)
                pos += len(chunk)
            self.fileops.sync_file(fd, path)
        finally:
            self.fileops.close(fd)
        if create:
            self.fileops.sync_dir(dst.path)
        self._on_event("storage.mirror_repaired", mirror=dst.path, segment=segment, start=start, end=end)

    def scan(self, from_segment: int | None = None) -> Iterator[ScannedFrame]:
        """Yield every valid frame from ``from_segment`` on, repairing mirrors as it goes.

        The last segment's end is set to the end of its last valid frame and
        every mirror is cut there (torn tail).  A sealed segment with an
        invalid frame on every mirror before its end is corruption.
        """
        numbers = sorted(self.segments)
        if from_segment is not None:
            numbers = [n for n in numbers if n >= from_segment]
        for n in numbers:
            seg = self.segments[n]
            pos = rec.SEG_HEADER_SIZE
            sealed = seg.end >= 0
            while not sealed or pos < seg.end:
                scanned = self._frame_with_repair(n, pos, seg.end if sealed else None)
                if scanned is None:
                    if sealed:
                        raise CorruptError(f"segment {n}: no valid copy of the frame at offset {pos} "
                                           f"(sealed end {seg.end})")
                    break
                yield ScannedFrame(n, pos, scanned)
                pos += scanned.size
            if not sealed:
                self._cut_tail(n, pos)
                seg.end = pos

    def _read_frame(self, mirror: Mirror, segment: int, pos: int,
                    limit: int | None = None) -> tuple[rec.Frame, bytes]:
        """The verified frame at ``pos`` on one mirror, and its bytes (FrameError if none)."""
        head = self._pread(mirror, segment, rec.FRAME_HEADER_SIZE, pos)
        _, _, size = rec.frame_header(head)
        if limit is not None and pos + size > limit:
            raise rec.FrameError("frame crosses the seal")
        data = head + self._pread(mirror, segment, size - rec.FRAME_HEADER_SIZE, pos + rec.FRAME_HEADER_SIZE)
        return rec.decode_frame(data), data

    def _frame_with_repair(self, segment: int, pos: int, limit: int | None) -> rec.Frame | None:
        good: tuple[rec.Frame, bytes] | None = None
        bad: list[Mirror] = []
        for mirror in self.healthy():
            try:
                frame, data = self._read_frame(mirror, segment, pos, limit)
            except (OSError, rec.FrameError):
                bad.append(mirror)
                continue
            if good is None:
                good = (frame, data)
        if good is None:
            return None
        for mirror in bad:
            self._repair(mirror, segment, pos, good[1])
        return good[0]

    def _repair(self, mirror: Mirror, segment: int, pos: int, data: bytes) -> None:
        if not os.path.exists(self._path(mirror, segment)):
            # The whole file is missing on this mirror: copy what precedes from a good one.
            src = next((m for m in self.healthy()
                        if m is not mirror and os.path.exists(self._path(m, segment))), None)
            try:
                if src is None:
                    raise OSError(errno.EIO, "no source to repair from")
                self._copy_range(src, mirror, segment, 0, pos)
            except OSError as exc:
                self.degrade(mirror, exc)
                return
        self._repair_bytes(mirror, segment, pos, data)

    def _cut_tail(self, segment: int, end: int) -> None:
        for mirror in self.healthy():
            size = self._file_size(mirror, segment)
            if size > end:
                try:
                    # Zeros right at the end are preallocated space, not a torn frame
                    # (a frame starts with its magic): cut them silently.
                    try:
                        torn = any(self._pread(mirror, segment, min(32, size - end), end))
                    except (OSError, rec.FrameError):
                        torn = True
                    self.fileops.truncate(self._path(mirror, segment), end)
                    self._drop_read_fd(mirror, segment)
                    if torn:
                        self._on_event("storage.tail_cut", mirror=mirror.path, segment=segment, end=end,
                                       cut=size - end)
                except OSError as exc:
                    self.degrade(mirror, exc)

    # -- writing -------------------------------------------------------------
    # Segment files are preallocated (zero-filled and synced) one ahead, off the
    # writer's path, by a background thread: appends inside written space make
    # fdatasync flush data only. A spare is the file "next.prealloc" on each
    # mirror; it becomes a segment by header write + sync + rename + dir sync.
    def _spare_path(self, mirror: Mirror) -> str:
        # Named by epoch: a fenced former owner and the new owner never share a spare.
        return os.path.join(mirror.path, f"next-{self.epoch}{SPARE_SUFFIX}")

    def remove_spares(self) -> None:
        for mirror in self.mirrors:
            fd = self._spares.pop(mirror.index, None)
            if fd is not None:
                self.fileops.close(fd)
            try:
                os.unlink(self._spare_path(mirror))
            except OSError:
                pass

    def _prepare_spares(self) -> None:
        """Background thread: zero-fill a spare segment file on every healthy mirror lacking one."""
        for mirror in self.healthy():
            if mirror.index in self._spares:
                continue
            path = self._spare_path(mirror)
            try:
                if os.path.exists(path):
                    os.unlink(path)
                fd = self.fileops.open_write(path, create=True)
                try:
                    self.fileops.preallocate(fd, path, self.segment_bytes)
                except BaseException:
                    self.fileops.close(fd)
                    raise
                self._spares[mirror.index] = fd
            except OSError:
                pass  # that mirror gets a plain file; its writes will report the problem

    def _spares_ready(self) -> bool:
        if self._spare_job is None or not self._spare_job.done():
            return False
        return all(m.index in self._spares for m in self.healthy())

    def start_segment(self, first_seq: int, epoch: int) -> None:
        """Open a new segment sealing the current one at its end.

        The owner must hold the epoch: ``fence_check`` runs first, and the new
        file is linked in without replacing anything, so a fenced former owner
        can never put a segment in place of one the new owner created.
        """
        self.fence_check()
        self.epoch = epoch
        prev = self.current if self.current is not None else (
            self.segments[max(self.segments)] if self.segments else None)
        number = (prev.number + 1) if prev is not None else 1
        prev_end = prev.end if prev is not None else 0
        header = rec.SegmentHeader(rec.KIND_JOURNAL, number, first_seq, epoch, prev_end).encode()
        if self.preallocate and self._spare_job is None:
            # The first segment after open: preallocate it now (costs a zero-fill of
            # segment_bytes per mirror at open); later ones are prepared in the background.
            self._prepare_spares()
            self._spare_job = concurrent.futures.Future()
            self._spare_job.set_result(None)
        use_spares = self._spares_ready()

        def create(mirror: Mirror) -> None:
            path = self._path(mirror, number)
            try:
                if use_spares:
                    fd = self._spares.pop(mirror.index)
                    spare = self._spare_path(mirror)
                    self.fileops.pwrite(fd, spare, header, 0)
                    self.fileops.sync_file(fd, spare)
                    self.fileops.rename_noreplace(spare, path)
                else:
                    fd = self.fileops.open_write(path, create=True)
            except FileExistsError:
                raise SegmentExistsError(f"segment {number} already exists on {mirror.path}: "
                                         f"another owner is writing this store") from None
            try:
                if not use_spares:
                    self.fileops.pwrite(fd, path, header, 0)
                    self.fileops.sync_file(fd, path)
                self.fileops.sync_dir(mirror.path)
            except BaseException:
                self.fileops.close(fd)
                raise
            if mirror.write_fd is not None:
                self.fileops.close(mirror.write_fd)
            mirror.write_fd = fd

        self._each_mirror(create)
        self.current = Segment(number, first_seq, rec.SEG_HEADER_SIZE)
        self.segments[number] = self.current
        self.epoch = epoch
        # Never wait for a spare: when segments fill faster than they can be
        # zero-filled, plain files are used (appends then sync metadata too,
        # which large batches amortise) and the spare is used when ready.
        if self.preallocate and self._spare_job.done():
            self._spare_job = self._spare_pool.submit(self._prepare_spares)

    def _wait_spares(self) -> None:
        if self._spare_job is not None:
            try:
                self._spare_job.result()
            except Exception:
                pass
            self._spare_job = None

    def append(self, data: bytes, first_seq: int) -> tuple[int, int]:
        """Write ``data`` (whole frames) durably on every healthy mirror; return its position."""
        assert self.current is not None, "journal not open for writing"
        if self.current.end + len(data) > self.segment_bytes and self.current.end > rec.SEG_HEADER_SIZE:
            self.start_segment(first_seq, self.epoch)
        seg = self.current
        offset = seg.end

        def write(mirror: Mirror) -> None:
            path = self._path(mirror, seg.number)
            self.fileops.pwrite(mirror.write_fd, path, data, offset)
            self.fileops.sync_file(mirror.write_fd, path)
            if self.fileops.fstat(mirror.write_fd).st_nlink == 0:
                raise OSError(errno.ENOENT, "segment file vanished", path)

        self._each_mirror(write)
        seg.end = offset + len(data)
        return seg.number, offset

    def _close_degraded(self) -> None:
        for mirror in self.mirrors:
            if not mirror.healthy and mirror.write_fd is not None:
                try:
                    self.fileops.close(mirror.write_fd)
                except OSError:
                    pass
                mirror.write_fd = None

    def _each_mirror(self, fn: Callable[[Mirror], None]) -> None:
        """Run ``fn`` on every healthy mirror (in parallel); degrade those that fail."""
        self._close_degraded()
        mirrors = self.healthy()
        if not mirrors:
            self.require_healthy()
        futures = []
        if self._pool is not None:
            futures = [(m, self._pool.submit(fn, m)) for m in mirrors[1:]]
        try:
            fn(mirrors[0])
        except OSError as exc:
            self.degrade(mirrors[0], exc)
        for mirror, future in futures:
            try:
                future.result()
            except OSError as exc:
                self.degrade(mirror, exc)
        self.require_healthy()

    # -- reading ---------------------------------------------------------------
    def _read_fd(self, mirror: Mirror, segment: int) -> int:
        with self._read_lock:
            fd = mirror.read_fds.get(segment)
            if fd is None:
                fd = self.fileops.open_read(self._path(mirror, segment))
                mirror.read_fds[segment] = fd
            return fd

    def _drop_read_fd(self, mirror: Mirror, segment: int) -> None:
        """Forget a read fd; close it only later.

        A reader thread may be inside ``pread`` on it right now: closing at
        once could let the number be reused by another open file and the
        reader read the wrong file. An fd of a retired segment still reads
        the (unlinked) file's intact bytes, so keeping it a while is harmless.
        """
        now = time.monotonic()
        with self._read_lock:
            fd = mirror.read_fds.pop(segment, None)
            if fd is not None:
                self._graveyard.append((now, fd))
            expired = [fd for t, fd in self._graveyard if now - t > FD_GRACE_SECONDS]
            self._graveyard = [(t, fd) for t, fd in self._graveyard if now - t <= FD_GRACE_SECONDS]
        for old in expired:
            self.fileops.close(old)

    def _pread(self, mirror: Mirror, segment: int, length: int, offset: int) -> bytes:
        data = self.fileops.pread(self._read_fd(mirror, segment), self._path(mirror, segment), length, offset)
        if len(data) != length:
            raise rec.FrameError(f"short read at {segment}:{offset}")
        return data

    def read(self, segment: int, offset: int, length: int, verify: Callable[[bytes], bool]) -> bytes:
        """Read bytes that ``verify`` accepts, from the first mirror that has them; repair the others.

        Callable from any thread. A mirror that returns bad bytes is rewritten
        from the good copy (read-repair, I-5).
        """
        bad: list[Mirror] = []
        for mirror in self.healthy():
            try:
                data = self._pread(mirror, segment, length, offset)
            except (OSError, rec.FrameError):
                bad.append(mirror)
                continue
            if verify(data):
                if segment in self.segments:  # not retired meanwhile
                    for other in bad:
                        self._repair_bytes(other, segment, offset, data)
                return data
            bad.append(mirror)
        raise CorruptError(f"no mirror holds a valid copy of {segment}:{offset}+{length}")

    def _repair_bytes(self, mirror: Mirror, segment: int, offset: int, data: bytes) -> None:
        path = self._path(mirror, segment)
        try:
            fd = self.fileops.open_write(path, create=False)
            try:
                self.fileops.pwrite(fd, path, data, offset)
                self.fileops.sync_file(fd, path)
            finally:
                self.fileops.close(fd)
            self._drop_read_fd(mirror, segment)
            self._on_event("storage.mirror_repaired", mirror=mirror.path, segment=segment, start=offset,
                           end=offset + len(data))
        except FileNotFoundError:
            pass  # retired (or copied anew) meanwhile: nothing to repair
        except OSError as exc:
            self.degrade(mirror, exc)

    # -- retirement --------------------------------------------------------------
    # A segment's end is sealed in its successor's header. Before a successor
    # is retired, the end it carries is copied into SEALS (written atomically
    # on every healthy mirror), so a remaining segment never loses its seal.
    def _read_seals(self) -> dict[int, int]:
        seals: dict[int, int] = {}
        for mirror in self.healthy():
            try:
                data = json.loads(self.fileops.read_all(os.path.join(mirror.path, SEALS_FILE)))
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                continue  # a torn SEALS write: the other mirror, or the successor headers, decide
            seals.update({int(k): int(v) for k, v in data.items()})
        return seals

    def retire_many(self, numbers: list[int]) -> None:
        """Delete sealed segments (their frames are checkpointed, their blobs dead)."""
        if not numbers:
            return
        if self.current is not None and max(numbers) >= self.current.number:
            raise ValueError("cannot retire the current segment")
        going = set(numbers)
        remaining = sorted(n for n in self.segments if n not in going)
        old = self._read_seals()
        seals = {n: e for n, e in old.items() if n in self.segments and n not in going}
        for n in remaining:
            if (n + 1) in going and self.segments[n] is not self.current:
                seals[n] = self.segments[n].end  # its successor, which holds its seal, goes
        payload = json.dumps({str(n): e for n, e in sorted(seals.items())}).encode()
        for mirror in self.healthy():
            try:
                self.fileops.write_atomic(os.path.join(mirror.path, SEALS_FILE), payload)
            except OSError as exc:
                self.degrade(mirror, exc)
        self.require_healthy()
        for n in sorted(numbers):
            self.retire(n)
        self.sync_dirs()

    def retire(self, segment: int) -> None:
        """Delete one sealed segment on every healthy mirror (use ``retire_many``: it keeps seals)."""
        if self.current is not None and segment >= self.current.number:
            raise ValueError("cannot retire the current segment")
        for mirror in self.mirrors:
            self._drop_read_fd(mirror, segment)
            if not mirror.healthy:
                continue
            try:
                self.fileops.remove(self._path(mirror, segment))
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.degrade(mirror, exc)
        self.segments.pop(segment, None)
        self._on_event("storage.segment_retired", segment=segment)

    def sync_dirs(self) -> None:
        for mirror in self.healthy():
            try:
                self.fileops.sync_dir(mirror.path)
            except OSError as exc:
                self.degrade(mirror, exc)

    def close(self) -> None:
        self._wait_spares()
        self._spare_pool.shutdown(wait=True)
        self.remove_spares()
        for mirror in self.mirrors:
            if mirror.write_fd is not None:
                try:
                    self.fileops.close(mirror.write_fd)
                except OSError:
                    pass
                mirror.write_fd = None
            for seg in list(mirror.read_fds):
                self._drop_read_fd(mirror, seg)
        with self._read_lock:
            graveyard, self._graveyard = self._graveyard, []
        for _, fd in graveyard:
            self.fileops.close(fd)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
