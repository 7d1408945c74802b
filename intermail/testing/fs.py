"""File systems for failure tests: a tiny tmpfs that fills up for real (ENOSPC).

Logs: nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


class MountUnavailable(Exception):
    """Mounting needs root and a kernel that lets us; tests skip on this."""


@contextlib.contextmanager
def tiny_tmpfs(where: str | os.PathLike[str], size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``where`` (created) for the block; unmounted afterwards."""
    mnt = Path(where)
    mnt.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise MountUnavailable("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        raise MountUnavailable(f"mount failed: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
