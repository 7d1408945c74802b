"""The file layer under the storage engine: every byte the engine puts on disk passes here.

It exists for two reasons.  First, so that durability steps are spelled out in
one place (write, then ``fdatasync`` the file; create or rename, then
``fsync`` the directory).  Second, so that tests can stand between the engine
and the disk: :class:`FaultyFileOps` raises ``EIO`` / ``ENOSPC`` on chosen
paths, and an *observer* learns every durability point, which is how the
power-loss test knows what a real power cut would have kept (see
``docs/storage.md``).

Invariant: a call returns only after the operation it names is complete as
far as the kernel promises (``sync_file`` after ``fdatasync`` returned,
``sync_dir`` after the directory's ``fsync`` returned).  Observers are told
after that point, never before.

Logs: nothing; callers log.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable
from typing import Protocol


class Observer(Protocol):
    """Told of each durability point, after it happened."""

    def created(self, path: str) -> None: ...

    def synced(self, path: str, size: int) -> None: ...

    def dir_synced(self, path: str) -> None: ...

    def renamed(self, src: str, dst: str) -> None: ...

    def removed(self, path: str) -> None: ...


class FileOps:
    """Plain POSIX file operations with durability made explicit."""

    def __init__(self, observer: Observer | None = None, fsync: bool = True):
        self.observer = observer
        # fsync=False is for throw-away benchmarks of the CPU path only; it
        # breaks I-1 and is refused by every server configuration.
        self.fsync_enabled = fsync
        # Per open fd: the end of the data written through it.  Observers are
        # told this extent, not the file size, because preallocated segment
        # files are full of zeros past their data.
        self._extent: dict[int, int] = {}

    # -- opening -----------------------------------------------------------
    def open_write(self, path: str, create: bool) -> int:
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags | os.O_CLOEXEC, 0o640)
        self._extent[fd] = 0 if create else os.fstat(fd).st_size
        if create and self.observer:
            self.observer.created(path)
        return fd

    def preallocate(self, fd: int, path: str, size: int) -> None:
        """Fill a new file with zeros and sync it, so later appends and syncs touch no metadata.

        An ``fdatasync`` after appending to a file that grows must also commit
        the new size; within an already written (not just fallocated) region
        it flushes data only: on our disks twice to three times the flushes/s.
        """
        zeros = bytes(min(size, 1 << 20))
        pos = 0
        while pos < size:
            n = os.pwrite(fd, zeros[: size - pos], pos)
            pos += n
        if self.fsync_enabled:
            os.fdatasync(fd)

    def open_read(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        self._extent.pop(fd, None)
        os.close(fd)

    # -- data --------------------------------------------------------------
    def pwrite(self, fd: int, path: str, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            if n <= 0:  # pragma: no cover - a zero-length write means a full device
                raise OSError(errno.ENOSPC, "short write", path)
            view = view[n:]
            offset += n
        if offset > self._extent.get(fd, 0):
            self._extent[fd] = offset

    def pread(self, fd: int, path: str, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def sync_file(self, fd: int, path: str) -> None:
        if self.fsync_enabled:
            os.fdatasync(fd)
        if self.observer:
            self.observer.synced(path, self._extent.get(fd, 0))

    def sync_dir(self, path: str) -> None:
        if self.fsync_enabled:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.observer:
            self.observer.dir_synced(path)

    def truncate(self, path: str, size: int) -> None:
        os.truncate(path, size)

    # -- names -------------------------------------------------------------
    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)
        if self.observer:
            self.observer.renamed(src, dst)

    def rename_noreplace(self, src: str, dst: str) -> None:
        """Give ``src`` the name ``dst`` unless ``dst`` exists (FileExistsError then).

        link + unlink: unlike rename, a link never replaces an existing name.
        """
        os.link(src, dst)
        os.unlink(src)
        if self.observer:
            self.observer.renamed(src, dst)

    def remove(self, path: str) -> None:
        os.unlink(path)
        if self.observer:
            self.observer.removed(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    # -- whole small files (EPOCH, manifests) --------------------------------
    def write_atomic(self, path: str, data: bytes | Iterable[bytes]) -> None:
        """Replace ``path`` durably: temp file, fdatasync, rename, fsync dir.

        ``data`` is the content, or its pieces in order (a checkpoint's frames).
        """
        tmp = f"{path}.tmp"
        if os.path.exists(tmp):
            self.remove(tmp)
        fd = self.open_write(tmp, create=True)
        try:
            pos = 0
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                self.pwrite(fd, tmp, piece, pos)
                pos += len(piece)
            self.sync_file(fd, tmp)
        finally:
            self.close(fd)
        self.rename(tmp, path)
        self.sync_dir(os.path.dirname(path) or ".")

    def read_all(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()


class FaultyFileOps(FileOps):
    """FileOps that fails on demand: the injected errors are real ``OSError``s.

    ``fail(prefix, errno)`` makes every write, sync, create and rename under
    ``prefix`` raise that errno from then on, until ``heal(prefix)``.  Reads
    keep working unless ``fail_reads=True`` was given.  Thread-safe.
    """

    def __init__(self, observer: Observer | None = None, fsync: bool = True):
        super().__init__(observer, fsync)
        self._lock = threading.Lock()
        self._rules: dict[str, tuple[int, bool]] = {}
        self.hook: Callable[[str, str], None] | None = None

    def fail(self, prefix: str, err: int = errno.EIO, fail_reads: bool = False) -> None:
        with self._lock:
            self._rules[os.path.abspath(prefix)] = (err, fail_reads)

    def heal(self, prefix: str) -> None:
        with self._lock:
            self._rules.pop(os.path.abspath(prefix), None)

    def _check(self, path: str, reading: bool = False) -> None:
        if self.hook:
            self.hook("read" if reading else "write", path)
        apath = os.path.abspath(path)
        with self._lock:
            for prefix, (err, fail_reads) in self._rules.items():
                if (apath == prefix or apath.startswith(prefix + os.sep)) and (fail_reads or not reading):
                    raise OSError(err, os.strerror(err), path)

    def open_write(self, path: str, create: bool) -> int:
        self._check(path)
        return super().open_write(path, create)

    def preallocate(self, fd: int, path: str, size: int) -> None:
        self._check(path)
        super().preallocate(fd, path, size)

    def pwrite(self, fd: int, path: str, data: bytes | memoryview, offset: int) -> None:
        self._check(path)
        super().pwrite(fd, path, data, offset)

    def pread(self, fd: int, path: str, length: int, offset: int) -> bytes:
        self._check(path, reading=True)
        return super().pread(fd, path, length, offset)

    def sync_file(self, fd: int, path: str) -> None:
        self._check(path)
        super().sync_file(fd, path)

    def sync_dir(self, path: str) -> None:
        self._check(path)
        super().sync_dir(path)

    def rename(self, src: str, dst: str) -> None:
        self._check(dst)
        super().rename(src, dst)

    def rename_noreplace(self, src: str, dst: str) -> None:
        self._check(dst)
        super().rename_noreplace(src, dst)

    def write_atomic(self, path: str, data: bytes | Iterable[bytes]) -> None:
        self._check(path)
        super().write_atomic(path, data)

    def truncate(self, path: str, size: int) -> None:
        self._check(path)
        super().truncate(path, size)
