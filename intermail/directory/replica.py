"""A directory replica following its primary's change log.

Owns: keeping a replica's database equal to a prefix of the primary's
change log -- catch-up after a (re)start or a lost connection, then
following pushes, with a periodic poll as the safety net::

    follower = ReplicaFollower(service, primary_client, poll_interval=5.0)
    await follower.start()
    await follower.wait_applied(seq, timeout=5.0)
    await follower.stop()

Invariants:

- The replica applies changes strictly in ``seq`` order, each pull as one
  transaction (:meth:`DirectoryDB.apply_changes`): after a crash it holds a
  prefix of the primary's log and resumes from its own last ``seq``.
- A push only says "there is more"; the data always comes from a pull, so
  a lost push costs at most ``poll_interval`` of delay, and a push that
  arrives during a pull causes one more pull, never a skipped change.
- The replica adopts the primary's change-log id (``origin``) on its first
  pull and checks it on every pull after; every pull also carries the hash
  chain of the replica's log up to its position, and the primary refuses
  (CORRUPT) when its own log differs there or ends before it.  Either way
  the replica stops following: it refuses to mix two histories (a primary
  rebuilt from scratch, or promoted from a replica that was behind), keeps
  serving what it has, reports the conflict in its status, and refuses
  writes rather than forwarding them into a history it will never see.
- A primary restored from a backup (:mod:`.backup`) serves a new origin
  and names the log it was restored from (``restored_from``: origin, seq).
  A replica of that log at or before the restore point adopts the new
  origin and carries on; one past it re-copies the restored log from seq 0,
  wiping its own in the same transaction as the first batch (the changes
  it had beyond the restore point no longer exist anywhere it may follow).
- The follow loop outlives every failure (a full disk, a bad answer); its
  status says ``primary_reachable`` only while pulls succeed.
- Losing the primary never stops the replica from serving: ``start`` does
  not wait for the primary, and the follow loop retries forever.

Logs: ``dir.replica_synced``, ``dir.replica_sync_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from intermail.directory import wire
from intermail.directory.service import CHANGES_TOPIC, DirectoryService
from intermail.errors import ErrorKind, MailError
from intermail.log import log_event
from intermail.rpc.client import RpcClient, Subscription

__all__ = ["ReplicaFollower"]

log = logging.getLogger("intermail.directory.replica")

OTHER_PRIMARY = "this directory replica follows another primary's change log"
_RETRY_MAX = 2.0  # seconds between attempts while the primary is unreachable


class ReplicaFollower:
    """Pulls the primary's change log into the replica's database."""

    def __init__(self, service: DirectoryService, primary: RpcClient, *, poll_interval: float = 5.0):
        self.service = service
        self.primary = primary
        self.poll_interval = poll_interval
        self.applied = 0  # last seq in our database
        self.primary_seq: int | None = None  # last seq the primary reported
        self.last_contact: float | None = None  # monotonic time of the last successful pull
        self.error: str | None = None
        self.conflict = False  # the primary serves another change log: never forward writes to it
        self._kick = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._subscription: Subscription | None = None
        service.follower = self

    async def start(self) -> None:
        self.applied = await self.service.in_db(self.service.db.last_seq)
        self.service.note_seq(self.applied)
        self._kick.set()
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="dir-replica-follow")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(MailError):
            await self.primary.close()

    def in_touch(self) -> bool:
        """Pulled from the primary successfully, recently, and the follow loop runs."""
        return (self.error is None and self.last_contact is not None and not self.conflict
                and time.monotonic() - self.last_contact < 3 * self.poll_interval + 5.0
                and self._task is not None and not self._task.done())

    async def wait_in_touch(self, timeout: float) -> bool:
        """Kick a pull and wait up to ``timeout`` for :meth:`in_touch`."""
        if self.in_touch():
            return True
        self._kick.set()
        try:
            async with asyncio.timeout(timeout), self._progress:
                await self._progress.wait_for(self.in_touch)
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        lag = None if self.primary_seq is None else self.primary_seq - self.applied
        age = None if self.last_contact is None else round(time.monotonic() - self.last_contact, 3)
        error = self.error
        if self._task is not None and self._task.done():
            error = "the follow loop stopped"
        return {"primary_seq": self.primary_seq, "lag": lag, "primary_reachable": self.in_touch(),
                "last_contact_age": age, "sync_error": error, "history_conflict": self.conflict}

    async def wait_applied(self, seq: int, timeout: float) -> bool:
        """Wait until changes up to ``seq`` are applied here; False on timeout."""
        self._kick.set()
        try:
            async with asyncio.timeout(timeout), self._progress:
                await self._progress.wait_for(lambda: self.applied >= seq)
        except TimeoutError:
            return False
        return True

    # -- the loop ------------------------------------------------------------------

    def _on_push(self, topic: str, data: dict) -> None:
        self._kick.set()

    async def _follow(self) -> None:
        delay = 0.05
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._kick.wait()
            self._kick.clear()
            try:
                if self._subscription is None:
                    self._subscription = await self.primary.subscribe(
                        [CHANGES_TOPIC], self._on_push, on_reconnect=self._kick.set)
                await self._pull()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failure (a full disk, a bad answer)
                if not isinstance(exc, MailError):
                    exc = MailError(ErrorKind.TEMP, safe="sync failed", detail=f"{type(exc).__name__}: {exc}")
                elif exc.kind is ErrorKind.CORRUPT:
                    self.conflict = True
                self._failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                self._kick.set()  # retry soon, not after a whole poll interval
                continue
            delay = 0.05

    async def _pull(self) -> None:
        """Pull and apply until the primary has nothing newer."""
        while True:
            db = self.service.db
            chain = await self.service.in_db(db.chain_at, self.applied)
            request = {"since": self.applied, "limit": wire.MAX_CHANGES}
            if chain:
                request["chain"] = chain  # none before the first change
            mine = self.service.origin
            if mine is not None:
                request["origin"] = mine  # lets a restored primary recognise the log it came from
            answer = await self.primary.call("changes", request, idempotent=True)
            changes = wire.decode_changes(answer.get("changes"))
            origin = answer.get("origin")
            if not isinstance(origin, str):
                raise MailError(ErrorKind.TEMP, safe="malformed change log answer", detail="no origin")
            restored = answer.get("restored_from")
            reseed = False
            if mine is not None and origin != mine:
                lineage = restored if isinstance(restored, dict) else {}
                if lineage.get("origin") != mine:
                    self.conflict = True
                    raise MailError(ErrorKind.CORRUPT, safe=OTHER_PRIMARY,
                                    detail=f"replica holds change log {mine}, primary serves {origin}")
                if answer.get("reseed"):
                    # The primary was restored from a backup of our log taken before
                    # our position: the changes after it were dropped.  Re-copy the
                    # restored log (wiping ours in the same transaction as the first batch).
                    answer = await self.primary.call("changes", {"since": 0, "limit": wire.MAX_CHANGES},
                                                      idempotent=True)
                    changes = wire.decode_changes(answer.get("changes"))
                    if answer.get("origin") != origin:
                        raise MailError(ErrorKind.TEMP, safe="the primary changed during a re-seed")
                    reseed = True
                    log_event(log, "dir.replica_reseeded", level=logging.WARNING, old_origin=mine,
                              origin=origin, dropped_after=lineage.get("seq"), had=self.applied)
                else:
                    # Our log is a prefix of the one the primary was restored from
                    # (it accepted our chain hash at our position): carry on under its new name.
                    await self.service.in_db(db.adopt_restored_origin, mine, origin, lineage)
                    self.service.origin = origin
                    log_event(log, "dir.replica_adopted_restore", old_origin=mine, origin=origin,
                              seq=self.applied)
            if changes or mine is None or reseed:
                applied = await self.service.in_db(db.apply_changes, changes, origin, reseed=reseed)
                self.service.origin = origin
                self.conflict = False
                if changes:
                    log_event(log, "dir.replica_synced", level=logging.DEBUG, applied=applied,
                              seq=changes[-1].seq)
            self.primary_seq = int(answer.get("last_seq", 0))
            self.last_contact = time.monotonic()
            self.error = None
            async with self._progress:
                self.applied = await self.service.in_db(self.service.db.last_seq)
                self.service.note_seq(self.applied)
                self._progress.notify_all()
            if len(changes) < wire.MAX_CHANGES:
                return

    def _failed(self, exc: MailError) -> None:
        text = exc.detail or exc.safe
        if text != self.error:
            log_event(log, "dir.replica_sync_failed", level=logging.WARNING, kind=exc.kind.value, error=text)
        self.error = text
