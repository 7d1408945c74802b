"""Ownership of a store directory: the epoch (invariant I-6).

Each mirror directory holds a file ``EPOCH`` with one decimal number.  Opening
a store *takes* it: under an exclusive ``flock`` on ``LOCK`` (held only while
opening, so a frozen old owner cannot block a take-over) the opener writes
``max(epoch on every mirror) + 1`` to every mirror it can reach, durably.
From then on the owner checks, after each group flush and before it
acknowledges anything, that no mirror carries a newer epoch; one that does
means another process took over, and the owner raises FENCED, acknowledges
nothing more and writes nothing more.

The check reads ``EPOCH`` on every healthy mirror: an open, a read and a
close, a few microseconds per flush.

Logs: nothing; the engine logs ``storage.fenced``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from intermail.errors import FencedError
from intermail.storage.fileops import FileOps

EPOCH_FILE = "EPOCH"
LOCK_FILE = "LOCK"


def read_epoch(fileops: FileOps, mirror: str) -> int:
    try:
        text = fileops.read_all(os.path.join(mirror, EPOCH_FILE)).decode("ascii").strip()
    except FileNotFoundError:
        return 0
    try:
        return int(text)
    except ValueError:
        return 0  # a torn EPOCH write: the others (or the next bump) decide


@contextlib.contextmanager
def open_lock(mirror: str) -> Iterator[None]:
    """Serialise openers of one store (two simultaneous opens must not share an epoch)."""
    fd = os.open(os.path.join(mirror, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Fence:
    """The epoch this process owns, and the check that it still owns it."""

    def __init__(self, fileops: FileOps, epoch: int):
        self.fileops = fileops
        self.epoch = epoch

    @classmethod
    def take(cls, fileops: FileOps, mirrors: list[str]) -> "Fence":
        """Bump the epoch on every reachable mirror; the caller holds ``open_lock``."""
        epoch = max((read_epoch(fileops, m) for m in mirrors), default=0) + 1
        fence = cls(fileops, epoch)
        written = 0
        for mirror in mirrors:
            try:
                fileops.write_atomic(os.path.join(mirror, EPOCH_FILE), f"{epoch}\n".encode())
                written += 1
            except OSError:
                continue  # that mirror is degraded; the engine finds out when it writes
        if not written:
            raise OSError("no mirror accepted the new epoch")
        return fence

    def check(self, mirrors: list[str]) -> None:
        """Raise FencedError if any of ``mirrors`` carries a newer epoch.

        Reads the file each time (a few microseconds): comparing inode
        numbers is not enough, since a take-over's rename can reuse the inode
        number of the file it replaced.
        """
        for mirror in mirrors:
            try:
                fd = os.open(os.path.join(mirror, EPOCH_FILE), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # unreadable mirror: the write path decides its health
            try:
                text = os.read(fd, 64)
            except OSError:
                continue
            finally:
                os.close(fd)
            try:
                found = int(text.decode("ascii").strip())
            except ValueError:
                continue  # torn write of a new EPOCH: the bump is on the other mirrors too
            if found > self.epoch:
                raise FencedError(f"store taken over: epoch {found} > ours {self.epoch} on {mirror}")
