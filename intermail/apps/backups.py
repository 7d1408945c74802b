"""Scheduled backups (the ``[backup]`` section), run inside the mssd and the directory primary.

Owns: when a process takes a backup of what it serves, where it puts it, and
which old ones it deletes::

    schedule = BackupSchedule(root, take, full_interval=86400, incremental_interval=3600, keep=2)
    task = asyncio.create_task(schedule.run())

``take(kind, dest)`` writes one verified backup (kind ``full`` or
``incremental``) into the new directory ``dest`` and returns its manifest.
Backups go into ``root`` (``[backup] dir``/<identity or directory
instance>), named ``<UTC time>-<kind>``.

Invariants:

- A full is due ``full_interval`` after the last full found in ``root``
  (at once when there is none); an incremental ``incremental_interval``
  after the last backup of either kind, and only once a full exists in
  ``root`` (an incremental's chain starts with a full).  Times come from
  the manifests, so a restarted process keeps the rhythm.
- Only backups with a manifest count; a directory left without one (a
  crash mid-backup) is deleted before the next one starts.
- Pruning keeps the newest ``keep`` fulls and everything after the oldest
  kept one; it runs only after a backup succeeded, so a failing backup
  never deletes the last good one.
- A failed backup is logged and retried after ``min(interval, 60 s)``; the
  loop outlives every failure.

Logs: ``backup.scheduled`` (kind, dir, seq, seconds), ``backup.schedule_failed``,
``backup.pruned``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from intermail.config import Config
from intermail.log import log_event, register_events

__all__ = ["BackupSchedule", "backup_root", "schedule_for"]

log = logging.getLogger("intermail.backups")

register_events({
    "backup.scheduled": "a scheduled backup was written and verified (kind, dir, seq, seconds)",
    "backup.schedule_failed": "a scheduled backup failed; it is retried",
    "backup.pruned": "an old scheduled backup was deleted (keep)",
})

MANIFEST = "MANIFEST.json"
RETRY_MAX = 60.0

Take = Callable[[str, str], Awaitable[dict]]


def backup_root(config: Config, owner: str) -> Path:
    """Where ``owner``'s (a store identity or a directory instance) scheduled backups go."""
    base = config.backup.dir or os.path.join(config.cluster.data_dir or ".", "backups")
    return Path(base) / owner


def schedule_for(config: Config, owner: str, take: Take, *, incrementals: bool = True) -> BackupSchedule | None:
    """The schedule the Config asks of ``owner``, or None when backups are off."""
    b = config.backup
    incremental = b.incremental_interval if incrementals else 0.0
    if not b.full_interval and not incremental:
        return None
    return BackupSchedule(backup_root(config, owner), take, full_interval=b.full_interval,
                          incremental_interval=incremental, keep=b.keep)


class BackupSchedule:
    """The timer loop; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], take: Take, *, full_interval: float,
                 incremental_interval: float = 0.0, keep: int = 2, clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.take = take
        self.full_interval = full_interval
        self.incremental_interval = incremental_interval
        self.keep = keep
        self.clock = clock
        self.taken = 0
        self.failures = 0

    # -- what is there -------------------------------------------------------------

    def backups(self) -> list[dict[str, Any]]:
        """Manifests in ``root`` (each with ``dir``), oldest first."""
        found = []
        with os.scandir(self.root) if self.root.is_dir() else _empty() as entries:
            for entry in entries:
                try:
                    with open(os.path.join(entry.path, MANIFEST)) as f:
                        manifest = json.load(f)
                except (OSError, ValueError):
                    continue
                found.append({**manifest, "dir": entry.path})
        return sorted(found, key=lambda m: (m.get("created", 0), m["dir"]))

    def due(self) -> tuple[str, float]:
        """The next backup's kind and the time it is due."""
        found = self.backups()
        fulls = [m["created"] for m in found if m.get("kind") in ("full", "directory")]
        last_any = found[-1]["created"] if found else None
        candidates = []
        if self.full_interval:
            candidates.append(("full", fulls[-1] + self.full_interval if fulls else self.clock()))
        if self.incremental_interval:
            if fulls:
                candidates.append(("incremental", last_any + self.incremental_interval))
            else:
                candidates.append(("full", self.clock()))
        return min(candidates, key=lambda c: c[1])

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        retry = 1.0
        while True:
            kind, at = await asyncio.to_thread(self.due)
            wait = at - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.once(kind)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop outlives every failure
                self.failures += 1
                log_event(log, "backup.schedule_failed", level=logging.WARNING, kind=kind, root=str(self.root),
                          error=f"{type(exc).__name__}: {getattr(exc, 'detail', None) or exc}")
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
                continue
            retry = 1.0

    async def once(self, kind: str) -> dict:
        """Take one backup of ``kind`` now, then prune."""
        await asyncio.to_thread(self._clear_unfinished)
        stamp = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = self.root / f"{stamp}-{kind}"
        began = time.monotonic()
        manifest = await self.take(kind, str(dest))
        self.taken += 1
        log_event(log, "backup.scheduled", kind=kind, dir=str(dest), seq=manifest.get("seq"),
                  seconds=round(time.monotonic() - began, 3))
        await asyncio.to_thread(self.prune)
        return manifest

    def _clear_unfinished(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.root):
            if entry.is_dir() and not os.path.exists(os.path.join(entry.path, MANIFEST)):
                shutil.rmtree(entry.path, ignore_errors=True)

    def prune(self) -> list[str]:
        """Delete what precedes the oldest of the newest ``keep`` fulls; returns the deleted dirs."""
        found = self.backups()
        fulls = [m for m in found if m.get("kind") in ("full", "directory")]
        if len(fulls) <= self.keep:
            return []
        oldest_kept = fulls[-self.keep]
        deleted = []
        for m in found:
            if (m.get("created", 0), m["dir"]) < (oldest_kept["created"], oldest_kept["dir"]):
                shutil.rmtree(m["dir"], ignore_errors=True)
                deleted.append(m["dir"])
                log_event(log, "backup.pruned", dir=m["dir"], kind=m.get("kind"))
        return deleted


class _empty:
    def __enter__(self) -> list:
        return []

    def __exit__(self, *exc: object) -> None:
        return None
