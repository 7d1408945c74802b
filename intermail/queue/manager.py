"""The queue manager: the one mover of the queue (Postfix's qmgr).

Owns: when each message is attempted, where each recipient goes (through a
:class:`Router`), handing recipients to transports grouped by destination,
and what an attempt's replies mean -- delivered, failed (bounced), or
deferred with exponential backoff until the queue lifetime runs out::

    manager = QueueManager(queue, router, {"lmtp": lmtp, "smtp": smtp}, settings, bounce=make_bounce)
    await manager.start()      # runs until stop(); kick() after each enqueue

Invariants:

- **One mover.** Only this object changes queue states; an entry is
  attempted by at most one task at a time (the in-memory ``active`` set).
- **Exactly once toward the stores (I-4).** Every LMTP transaction carries
  the queue id as the delivery key; a retry after a crash or a lost reply
  is answered "delivered" by the store without a second copy.  Remote SMTP
  has no such key: a reply lost after the remote server accepted the
  message may cause a second copy there, as with every MTA.
- **Never lose, never guess.** A recipient stays pending until a reply says
  2xx (delivered) or 5xx (failed, bounced); anything else -- a 4xx, a
  directory or DNS outage, a lost connection, a timeout -- defers it.  A
  message whose recipients are all decided is removed in the transaction
  that records the last outcome.
- **Bounces** go to the sender (never to the null sender, RFC 5321 §6.1)
  in the same transaction as the failure that causes them.
- Backoff: ``retry_base * 2**attempts`` capped at ``retry_max``, with ±10%
  jitter; after ``lifetime`` seconds in the queue, pending recipients fail
  with 4.4.7.

Logs: ``queue.delivered``, ``queue.deferred``, ``queue.bounced``,
``queue.expired`` -- each with the queue id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from intermail.errors import MailError
from intermail.log import log_context, log_event, register_events
from intermail.queue.store import DELIVERED, FAILED, PENDING, Entry, Envelope, Outcome, QueueStore

__all__ = ["QueueManager", "Route", "Router", "Transport", "Reply3", "Settings", "TransientFailure"]

log = logging.getLogger("intermail.queue.manager")

register_events({
    "queue.delivered": "recipients of a queued message were delivered (destination, recipients)",
    "queue.deferred": "recipients of a queued message will be retried (reason, next attempt)",
    "queue.bounced": "recipients of a queued message failed for good; a bounce was queued",
    "queue.expired": "recipients were still pending when the message's queue lifetime ran out",
    "queue.attempt_failed": "an attempt failed in an unexpected way; the message is deferred",
})


@dataclass(frozen=True)
class Reply3:
    """A recipient's reply: SMTP code, enhanced status ('' if none), text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status + ' ' if self.status else ''}{self.text}"


@dataclass(frozen=True)
class Route:
    """Where a recipient goes: transport kind, destination (``mss1``, a domain), final addresses."""

    transport: str
    destination: str
    addresses: tuple[str, ...]  # after alias expansion; one recipient may become several


class TransientFailure(Exception):
    """The destination could not be asked (no route, no connection): defer every recipient."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Router(Protocol):
    async def route(self, address: str) -> list[Route] | Reply3:
        """Routes for one recipient, or the reply that decides it (5xx unknown user, 4xx directory down)."""
        ...


class Transport(Protocol):
    async def deliver(self, destination: str, sender: str, recipients: Sequence[str], data: bytes,
                      key: str, params: dict | None = None) -> dict[str, Reply3]:
        """One transaction; a reply per recipient, or TransientFailure for all of them.

        ``params``: the envelope's parameters as the front end queued them
        (``SMTPUTF8``, ``BODY``, ``RET``, ``ENVID``...), for the MAIL command."""
        ...


BounceMaker = Callable[[Entry, list[tuple[str, Reply3]], bytes], Awaitable[tuple[Envelope, bytes] | None]]


@dataclass(frozen=True)
class Settings:
    concurrency: int = 64  # messages attempted at once
    per_destination: int = 32  # transactions at once per destination (a store, a domain)
    retry_base: float = 60.0
    retry_max: float = 3600.0
    lifetime: float = 5 * 86400.0
    batch: int = 256  # entries fetched per scan
    max_recipients: int = 100  # recipients per transaction (RFC 5321 §4.5.3.1.8: servers take at least 100)


@dataclass
class _Stats:
    attempts: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    in_flight: int = 0


class QueueManager:
    """Moves queued messages toward their destinations; see the module docstring."""

    def __init__(self, queue: QueueStore, router: Router, transports: dict[str, Transport],
                 settings: Settings = Settings(), *, bounce: BounceMaker | None = None,
                 clock: Callable[[], float] = time.time):
        self.queue = queue
        self.router = router
        self.transports = transports
        self.settings = settings
        self.bounce = bounce
        self._clock = clock
        self.stats = _Stats()
        self._active: set[str] = set()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._per_destination: dict[str, asyncio.Semaphore] = {}
        self._wake = asyncio.Event()
        self._backoff: dict[str, float] = {}  # entries whose outcome could not be recorded: not before this time
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="queue-manager")

    async def stop(self, timeout: float = 10.0) -> None:
        """Start nothing new; let attempts in flight finish for up to ``timeout`` s."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5.0)

    def is_active(self, qid: str) -> bool:
        """Whether an attempt of ``qid`` is under way (admin verbs must not delete it now)."""
        return qid in self._active

    def kick(self) -> None:
        """Something is due now (a new message, a flush): scan at once."""
        self._wake.set()

    async def flush(self) -> int:
        """Make every deferred entry due now (``intermail queue flush``); returns how many."""
        now = self._clock()
        entries = await self.queue.entries(states=("deferred",), limit=100_000)
        flushed = 0
        for e in entries:
            try:
                await self.queue.set_state(e.id, "deferred", next_attempt=now)
                flushed += 1
            except MailError:
                continue  # delivered and removed meanwhile
        self.kick()
        return flushed

    # -- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                started = await self._scan()
            except MailError as exc:
                log_event(log, "queue.attempt_failed", level=logging.ERROR, error=exc.detail or exc.safe)
                started = 0
            if started:
                continue  # more may be due: scan again once these are under way
            due = None
            with contextlib.suppress(MailError):
                due = await self.queue.next_due(exclude=sorted(self._active | set(self._backoff)))
                if self._backoff:
                    soonest = min(self._backoff.values())
                    due = soonest if due is None else min(due, soonest)
            # nothing startable is due: sleep until something is, or an attempt ends, or a kick
            wait = 60.0 if due is None else max(0.0, min(60.0, due - self._clock()))
            if wait == 0.0:
                wait = 0.05  # due now but no slot: an ending attempt sets the event
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _scan(self) -> int:
        now = self._clock()
        for qid, until in list(self._backoff.items()):
            if until <= now:
                del self._backoff[qid]
        skip = sorted(self._active | set(self._backoff))
        entries = await self.queue.entries(states=("incoming", "deferred"), due_before=now,
                                           limit=self.settings.batch, exclude=skip)
        started = 0
        for listed in entries:
            if listed.id in self._active or self._stopping:
                continue
            await self._slots.acquire()
            # The list may be stale by now (an attempt of this entry may have
            # ended while we waited for a slot): start from a fresh copy.
            try:
                entry = await self.queue.get(listed.id)
            except BaseException:
                self._slots.release()
                raise
            if entry is None or entry.state not in ("incoming", "deferred") or entry.next_attempt > self._clock() \
                    or entry.id in self._active:
                self._slots.release()
                continue
            self._active.add(entry.id)
            task = asyncio.get_running_loop().create_task(self._attempt_guarded(entry))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def _attempt_guarded(self, entry: Entry) -> None:
        self.stats.in_flight += 1
        try:
            with log_context(queue_id=entry.id):
                await self._attempt(entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug or a store failure: record a deferral (so the attempt counts and
            # the message can still expire), or, if even that fails, retry later.
            error = f"{type(exc).__name__}: {exc}"
            log_event(log, "queue.attempt_failed", level=logging.ERROR, exc_info=True, queue_id=entry.id,
                      error=error)
            # Never again at once: if even the deferral below cannot be recorded
            # (the queue's disks are failing), this in-memory backoff holds it.
            self._backoff[entry.id] = self._next_attempt(entry)
            with contextlib.suppress(Exception):
                fresh = await self.queue.get(entry.id)
                if fresh is not None and self._clock() - fresh.arrival >= self.settings.lifetime:
                    # it cannot be delivered and cannot be bounced: set it aside for the operator
                    await self.queue.set_state(fresh.id, "corrupt")
                    log_event(log, "queue.expired", level=logging.ERROR, queue_id=fresh.id, state="corrupt",
                              error=error)
                elif fresh is not None:
                    await self.queue.record(fresh, [], state="deferred", next_attempt=self._next_attempt(fresh),
                                            error=f"451 4.3.0 internal error: {error}")
        finally:
            self.stats.in_flight -= 1
            self._active.discard(entry.id)
            self._slots.release()
            self._wake.set()

    # -- one attempt ---------------------------------------------------------------

    async def _attempt(self, entry: Entry) -> None:
        self.stats.attempts += 1
        now = self._clock()
        pending = entry.pending
        if not pending:  # a crash between outcome and removal cannot happen, but an empty entry is harmless
            await self.queue.record(entry, [], state="deferred", next_attempt=now)
            return
        data = await self.queue.read_message(entry)
        decided: dict[int, Reply3] = {}
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        parts: dict[int, list[str]] = {}  # recipient idx -> its final addresses not yet decided
        for r in pending:
            routed = await self.router.route(r.address)
            if isinstance(routed, Reply3):
                decided[r.idx] = routed
                continue
            finals = list(dict.fromkeys(a for route in routed for a in route.addresses))
            if not finals and not r.done:
                decided[r.idx] = Reply3(550, "5.1.1", "alias expands to no address")
                continue
            parts[r.idx] = [a for a in finals if a not in r.done]  # members decided before are never sent again
            for route in routed:
                for address in route.addresses:
                    if address in parts[r.idx]:
                        groups.setdefault((route.transport, route.destination), []).append((r.idx, address))
        replies: dict[tuple[int, str], Reply3] = {}
        await asyncio.gather(*(self._deliver_group(entry, kind, dest, members, data, replies)
                               for (kind, dest), members in groups.items()))
        member_outcomes: dict[int, list[tuple[str, Reply3]]] = {}
        for idx, addresses in parts.items():
            member_outcomes[idx] = [(a, replies.get((idx, a), Reply3(451, "4.3.0", "not attempted")))
                                    for a in addresses]
        await self._conclude(entry, decided, member_outcomes, data, now)

    def _next_attempt(self, entry: Entry, now: float | None = None) -> float:
        """Exponential backoff with ±10% jitter, never past ``retry_max``."""
        now = self._clock() if now is None else now
        delay = self.settings.retry_base * 2 ** min(entry.attempts, 30) * random.uniform(0.9, 1.1)
        return now + min(self.settings.retry_max, delay)

    async def _deliver_group(self, entry: Entry, kind: str, destination: str, members: list[tuple[int, str]],
                             data: bytes, replies: dict[tuple[int, str], Reply3]) -> None:
        transport = self.transports.get(kind)
        addresses = list(dict.fromkeys(a for _, a in members))
        answer: dict[str, Reply3] = {}
        if transport is None:
            answer = {a: Reply3(451, "4.3.5", f"no transport {kind}") for a in addresses}
        else:
            name = f"{kind}:{destination}"
            slots = self._per_destination.get(name)
            if slots is None:
                slots = self._per_destination[name] = asyncio.Semaphore(self.settings.per_destination)
            step = self.settings.max_recipients
            for start in range(0, len(addresses), step):
                batch = addresses[start:start + step]
                async with slots:
                    answer.update(await self._one_transaction(transport, entry, kind, destination, batch, data))
            if not slots.locked() and slots._value == self.settings.per_destination:  # idle: forget it
                self._per_destination.pop(name, None)
        for idx, address in members:
            replies[(idx, address)] = answer.get(address, Reply3(451, "4.3.0", "no reply for this recipient"))

    async def _one_transaction(self, transport: Transport, entry: Entry, kind: str, destination: str,
                               batch: list[str], data: bytes) -> dict[str, Reply3]:
        try:
            return await transport.deliver(destination, entry.sender, batch, data, entry.id, params=entry.params)
        except TransientFailure as failure:
            return {a: Reply3(451, "4.4.1", failure.reason) for a in batch}
        except Exception as exc:  # one broken destination must not sink the others' results
            log_event(log, "queue.attempt_failed", level=logging.ERROR, exc_info=True, queue_id=entry.id,
                      error=f"{kind}:{destination}: {type(exc).__name__}: {exc}")
            return {a: Reply3(451, "4.3.0", "internal error, will retry") for a in batch}

    async def _conclude(self, entry: Entry, decided: dict[int, Reply3],
                        member_outcomes: dict[int, list[tuple[str, Reply3]]], data: bytes, now: float) -> None:
        """Turn replies into outcomes.  An alias recipient is decided member by member: a member
        that got 2xx or 5xx is recorded in ``done`` and never sent again; the recipient stays
        pending while any member does, and its failed members are bounced one by one."""
        expired = now - entry.arrival >= self.settings.lifetime
        outcomes, failed, delivered, deferred = [], [], [], []
        by_idx = {r.idx: r for r in entry.recipients}
        for idx, members in member_outcomes.items():
            row = by_idx[idx]
            done = list(row.done)
            waiting = []
            for address, reply in members:
                if 200 <= reply.code < 300:
                    done.append(address)
                    delivered.append(address)
                elif reply.code >= 500 or expired:
                    if reply.code < 500:
                        reply = Reply3(reply.code, "4.4.7", f"delivery time expired; last: {reply}")
                    done.append(address)
                    failed.append((address, reply))
                else:
                    waiting.append((address, reply))
            if waiting:
                outcomes.append(Outcome(idx, PENDING, str(waiting[0][1]), tuple(done)))
                deferred.extend(waiting)
            else:
                last = members[-1][1] if members else Reply3(250, "2.0.0", "delivered")
                outcomes.append(Outcome(idx, DELIVERED if any(a in delivered for a, _ in members) or not members
                                        else FAILED, str(last), tuple(done)))
        for idx, reply in decided.items():
            if 200 <= reply.code < 300:
                outcomes.append(Outcome(idx, DELIVERED, str(reply)))
                delivered.append(by_idx[idx].address)
            elif reply.code >= 500 or expired:
                if reply.code < 500:
                    reply = Reply3(reply.code, "4.4.7", f"delivery time expired; last: {reply}")
                outcomes.append(Outcome(idx, FAILED, str(reply)))
                failed.append((by_idx[idx].address, reply))
            else:
                outcomes.append(Outcome(idx, PENDING, str(reply)))
                deferred.append((by_idx[idx].address, reply))
        bounces = []
        if failed and entry.sender and self.bounce is not None:
            made = await self.bounce(entry, failed, data)
            if made is not None:
                bounces.append(made)
        if deferred:
            next_attempt = self._next_attempt(entry, now)
            state, error = "deferred", str(deferred[0][1])
        else:
            next_attempt, state, error = now, "active", ""
        await self.queue.record(entry, outcomes, state=state, next_attempt=next_attempt, error=error,
                                bounces=bounces)
        if bounces:
            self.kick()
        if delivered:
            self.stats.delivered += len(delivered)
            log_event(log, "queue.delivered", queue_id=entry.id, recipients=delivered)
        if failed:
            self.stats.failed += len(failed)
            log_event(log, "queue.expired" if expired else "queue.bounced", queue_id=entry.id,
                      recipients=[a for a, _ in failed], reply=str(failed[0][1]), bounce=bool(bounces))
        if deferred:
            self.stats.deferred += len(deferred)
            log_event(log, "queue.deferred", queue_id=entry.id, recipients=[a for a, _ in deferred],
                      reason=error, next_attempt=round(next_attempt, 3))



