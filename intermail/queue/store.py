"""The queue's records on the durable log and the SQLite index derived from them.

Owns: what an accepted message is on disk (its bytes as a blob, its envelope
and one row per recipient), the record types that change it, and
:class:`QueueStore`, the narrow interface the SMTP front end and the queue
manager use::

    queue = await QueueStore.open(StoreOptions(mirrors=(d1, d2)))
    qid = await queue.enqueue(Envelope(sender, [RecipientSpec(addr)], params), message_bytes)  # durable: 250
    for entry in await queue.entries(states=("incoming", "deferred"), due_before=now): ...
    await queue.record(entry, outcomes, state="deferred", next_attempt=t, bounces=[(envelope, dsn)])

Invariants:

- **I-1.** ``enqueue`` returns after the message and its envelope are one
  durable transaction on every healthy mirror (the SMTP ``250`` waits for it).
- **Outcomes are recorded once, with what they imply.** A recipient's final
  outcome (delivered, failed), the bounce it causes (enqueued as a new
  message from the null sender) and, when no recipient is left, the removal
  of the message and the release of its blob are one transaction: a crash
  can never leave a bounce without its cause, or a delivered recipient
  still pending.
- **What is not recorded is retried.** The ``active`` state is kept in memory
  only: after a crash every pending recipient is delivered again; the
  delivery key (queue id + recipient) makes the store answer "already
  delivered" without a second copy (I-4).
- ``state`` changes only through :meth:`QueueStore.record`,
  :meth:`QueueStore.set_state` and :meth:`QueueStore.delete`, all called by
  the one queue manager (and the admin verbs, through it).

Records: ``Q_ADD`` (the envelope), ``Q_RESULT`` (per-recipient outcomes, the
message's new state and next attempt), ``Q_STATE`` (hold/release/corrupt),
``Q_DEL``.

Logs: ``queue.enqueued``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from intermail.errors import ErrorKind, MailError
from intermail.ids import new_queue_id
from intermail.log import log_event, register_events
from intermail.storage import FIRST_CONSUMER_TYPE, Store, StoreOptions

__all__ = ["QueueStore", "Envelope", "RecipientSpec", "Entry", "RecipientRow", "Outcome", "STATES"]

log = logging.getLogger("intermail.queue")

register_events({
    "queue.enqueued": "a message was accepted into the queue (queue id, sender, recipients, size)",
})

Q_ADD = FIRST_CONSUMER_TYPE
Q_RESULT = FIRST_CONSUMER_TYPE + 1
Q_STATE = FIRST_CONSUMER_TYPE + 2
Q_DEL = FIRST_CONSUMER_TYPE + 3

STATES = ("incoming", "active", "deferred", "hold", "corrupt")
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id            TEXT PRIMARY KEY,
    sender        TEXT NOT NULL,
    params        TEXT NOT NULL,
    arrival       REAL NOT NULL,
    blob          INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    state         TEXT NOT NULL,
    next_attempt  REAL NOT NULL,
    attempts      INTEGER NOT NULL,
    last_error    TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_due ON queue(state, next_attempt);
CREATE TABLE IF NOT EXISTS recipients (
    id          TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    address     TEXT NOT NULL,
    orcpt       TEXT,
    notify      TEXT,
    status      TEXT NOT NULL,
    reply       TEXT NOT NULL,
    done        TEXT NOT NULL,
    PRIMARY KEY (id, idx)
) WITHOUT ROWID;
"""


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class RecipientSpec:
    address: str
    orcpt: str | None = None  # RFC 3461 ORCPT, as given
    notify: str | None = None  # RFC 3461 NOTIFY, comma-separated, as given


@dataclass(frozen=True)
class Envelope:
    sender: str  # "" for the null reverse-path
    recipients: Sequence[RecipientSpec]
    params: dict[str, Any] = field(default_factory=dict)  # RET, ENVID, SMTPUTF8, BODY, auth user...


@dataclass(frozen=True)
class RecipientRow:
    idx: int
    address: str
    orcpt: str | None
    notify: str | None
    status: str
    reply: str
    done: tuple[str, ...] = ()  # final addresses (an alias's members) already delivered or failed


@dataclass(frozen=True)
class Entry:
    id: str
    sender: str
    params: dict[str, Any]
    arrival: float
    blob: int
    size: int
    state: str
    next_attempt: float
    attempts: int
    last_error: str
    recipients: tuple[RecipientRow, ...] = ()

    @property
    def pending(self) -> list[RecipientRow]:
        return [r for r in self.recipients if r.status == PENDING]


@dataclass(frozen=True)
class Outcome:
    idx: int
    status: str  # delivered | failed | pending (a temporary failure: stays pending)
    reply: str  # the reply text (for logs, `queue show` and the bounce)
    done: tuple[str, ...] = ()  # final addresses now decided for good (never attempted again)


class QueueApplier:
    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)

    def apply(self, conn: sqlite3.Connection, seq: int, rtype: int, payload: bytes) -> None:
        d = json.loads(payload)
        if rtype == Q_ADD:
            conn.execute("INSERT INTO queue (id, sender, params, arrival, blob, size, state, next_attempt, attempts,"
                         " last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (d["id"], d["sender"], json.dumps(d["params"], sort_keys=True), d["arrival"], d["blob"],
                          d["size"], d.get("state", "incoming"), d.get("next_attempt", d["arrival"]),
                          d.get("attempts", 0), d.get("last_error", "")))
            conn.executemany("INSERT INTO recipients (id, idx, address, orcpt, notify, status, reply, done)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             [(d["id"], i, r["address"], r.get("orcpt"), r.get("notify"), r.get("status", PENDING),
                               r.get("reply", ""), json.dumps(r.get("done", [])))
                              for i, r in enumerate(d["recipients"])])
        elif rtype == Q_RESULT:
            conn.executemany("UPDATE recipients SET status = ?, reply = ?, done = ? WHERE id = ? AND idx = ?",
                             [(o[1], o[2], json.dumps(o[3] if len(o) > 3 else []), d["id"], o[0])
                              for o in d["outcomes"]])
            # a message put on hold while it was being attempted stays on hold
            conn.execute("UPDATE queue SET state = CASE WHEN state = 'hold' THEN 'hold' ELSE ? END,"
                         " next_attempt = ?, attempts = ?, last_error = ? WHERE id = ?",
                         (d["state"], d["next_attempt"], d["attempts"], d["error"], d["id"]))
        elif rtype == Q_STATE:
            conn.execute("UPDATE queue SET state = ?, next_attempt = ? WHERE id = ?",
                         (d["state"], d["next_attempt"], d["id"]))
        elif rtype == Q_DEL:
            conn.execute("DELETE FROM recipients WHERE id = ?", (d["id"],))
            conn.execute("DELETE FROM queue WHERE id = ?", (d["id"],))
        else:
            raise ValueError(f"unknown queue record type {rtype}")

    def snapshot(self, conn: sqlite3.Connection) -> Iterable[tuple[int, bytes]]:
        rows = conn.execute("SELECT id, sender, params, arrival, blob, size, state, next_attempt, attempts, last_error"
                            " FROM queue ORDER BY id").fetchall()
        for qid, sender, params, arrival, blob, size, state, next_attempt, attempts, error in rows:
            recipients = [{"address": a, "orcpt": o, "notify": n, "status": s, "reply": r, "done": json.loads(dn)}
                          for a, o, n, s, r, dn in conn.execute(
                              "SELECT address, orcpt, notify, status, reply, done FROM recipients WHERE id = ?"
                              " ORDER BY idx", (qid,))]
            yield Q_ADD, _encode({"id": qid, "sender": sender, "params": json.loads(params), "arrival": arrival,
                                  "blob": blob, "size": size, "state": state, "next_attempt": next_attempt,
                                  "attempts": attempts, "last_error": error, "recipients": recipients})


def _entry(row: tuple, recipients: list[tuple]) -> Entry:
    qid, sender, params, arrival, blob, size, state, next_attempt, attempts, error = row
    return Entry(qid, sender, json.loads(params), arrival, blob, size, state, next_attempt, attempts, error,
                 tuple(RecipientRow(*r[:6], tuple(json.loads(r[6]))) for r in recipients))


class QueueStore:
    """One MTA's queue; see the module docstring."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store = store
        self._clock = clock
        self._adding: set[str | None] = set()  # explicit queue ids being enqueued

    @classmethod
    async def open(cls, options: StoreOptions, *, clock: Callable[[], float] = time.time) -> QueueStore:
        return cls(await Store.open(options, QueueApplier()), clock)

    async def close(self) -> None:
        await self.store.close()

    def health(self) -> dict[str, Any]:
        return self.store.health()

    # -- accepting -----------------------------------------------------------------

    async def enqueue(self, envelope: Envelope, data: bytes, *, queue_id: str | None = None,
                      bounce_for: str | None = None) -> str:
        """Make ``data`` and its envelope durable; returns the queue id (I-1)."""
        if not envelope.recipients:
            raise MailError(ErrorKind.INVALID, safe="no recipients")
        if queue_id is not None:
            # A given id must be new: a second Q_ADD of one id could never be applied.
            if queue_id in self._adding or await self.get(queue_id) is not None:
                raise MailError(ErrorKind.EXISTS, safe="queue id already in use")
            self._adding.add(queue_id)
        try:
            txn = self.store.transaction()
            qid = self._add(txn, envelope, data, queue_id)
            await txn.commit()
        finally:
            self._adding.discard(queue_id)
        log_event(log, "queue.enqueued", queue_id=qid, sender=envelope.sender,
                  recipients=len(envelope.recipients), size=len(data), bounce_for=bounce_for)
        return qid

    def _add(self, txn: Any, envelope: Envelope, data: bytes, queue_id: str | None) -> str:
        qid = queue_id or new_queue_id()
        now = self._clock()
        blob = txn.put_blob(data)
        txn.add(Q_ADD, _encode({
            "id": qid, "sender": envelope.sender, "params": envelope.params, "arrival": now, "blob": blob,
            "size": len(data), "state": "incoming", "next_attempt": now,
            "recipients": [{"address": r.address, "orcpt": r.orcpt, "notify": r.notify} for r in envelope.recipients],
        }))
        return qid

    # -- reading -------------------------------------------------------------------

    async def get(self, qid: str) -> Entry | None:
        def read(conn):
            row = conn.execute("SELECT id, sender, params, arrival, blob, size, state, next_attempt, attempts,"
                               " last_error FROM queue WHERE id = ?", (qid,)).fetchone()
            if row is None:
                return None
            rcpts = conn.execute("SELECT idx, address, orcpt, notify, status, reply, done FROM recipients WHERE id = ?"
                                 " ORDER BY idx", (qid,)).fetchall()
            return _entry(row, rcpts)
        return await self.store.read(read)

    async def entries(self, *, states: Sequence[str] = STATES, due_before: float | None = None,
                      limit: int = 1000, after: str | None = None, exclude: Sequence[str] = ()) -> list[Entry]:
        """Entries in ``states`` with their recipients: by due time (due by ``due_before`` if given),
        or by queue id when paging with ``after`` (ids greater than it); ``exclude``: ids to leave out."""
        def read(conn):
            marks = ",".join("?" * len(states))
            sql = (f"SELECT id, sender, params, arrival, blob, size, state, next_attempt, attempts, last_error"
                   f" FROM queue WHERE state IN ({marks})")
            args: list[Any] = [*states]
            if after is not None:
                sql += " AND id > ?"
                args.append(after)
            if due_before is not None:
                sql += " AND next_attempt <= ?"
                args.append(due_before)
            if exclude:
                sql += f" AND id NOT IN ({','.join('?' * len(exclude))})"
                args += list(exclude)
            order = " ORDER BY id" if after is not None else " ORDER BY next_attempt, id"
            rows = conn.execute(sql + order + " LIMIT ?", (*args, limit)).fetchall()
            out = []
            for row in rows:
                rcpts = conn.execute("SELECT idx, address, orcpt, notify, status, reply, done FROM recipients"
                                     " WHERE id = ? ORDER BY idx", (row[0],)).fetchall()
                out.append(_entry(row, rcpts))
            return out
        return await self.store.read(read)

    async def counts(self) -> dict[str, int]:
        rows = await self.store.read(lambda c: c.execute("SELECT state, COUNT(*) FROM queue GROUP BY state").fetchall())
        return {state: 0 for state in STATES} | dict(rows)

    async def next_due(self, exclude: Sequence[str] = ()) -> float | None:
        """When the earliest deferred or incoming entry not in ``exclude`` is due (None: nothing waits)."""
        marks = ",".join("?" * len(exclude))
        extra = f" AND id NOT IN ({marks})" if exclude else ""
        row = await self.store.read(lambda c: c.execute(
            f"SELECT MIN(next_attempt) FROM queue WHERE state IN ('incoming', 'deferred'){extra}",
            tuple(exclude)).fetchone())
        return row[0]

    async def read_message(self, entry: Entry) -> bytes:
        return await self.store.read_blob(entry.blob)

    # -- the manager's changes -----------------------------------------------------

    async def record(self, entry: Entry, outcomes: Sequence[Outcome], *, state: str, next_attempt: float,
                     error: str = "", bounces: Sequence[tuple[Envelope, bytes]] = (),
                     count_attempt: bool = True) -> list[str]:
        """Record one attempt's outcomes, and the bounces they cause, in one transaction.

        When no recipient is left pending the message is removed (with its
        blob) in the same transaction.  Returns the bounces' queue ids.
        """
        txn = self.store.transaction()
        bounce_ids = [self._add(txn, envelope, data, None) for envelope, data in bounces]
        status = {r.idx: r.status for r in entry.recipients}
        for o in outcomes:
            status[o.idx] = o.status
        txn.add(Q_RESULT, _encode({"id": entry.id,
                                   "outcomes": [[o.idx, o.status, o.reply[:1000], list(o.done)] for o in outcomes],
                                   "state": state, "next_attempt": next_attempt,
                                   "attempts": entry.attempts + (1 if count_attempt else 0),
                                   "error": error[:1000]}))
        if all(s != PENDING for s in status.values()):
            txn.add(Q_DEL, _encode({"id": entry.id}))
            txn.free_blob(entry.blob)
        await txn.commit()
        for qid, (envelope, data) in zip(bounce_ids, bounces, strict=True):
            log_event(log, "queue.enqueued", queue_id=qid, sender=envelope.sender,
                      recipients=len(envelope.recipients), size=len(data), bounce_for=entry.id)
        return bounce_ids

    async def set_state(self, qid: str, state: str, next_attempt: float | None = None) -> None:
        if state not in STATES:
            raise MailError(ErrorKind.INVALID, safe="unknown queue state")
        entry = await self.get(qid)
        if entry is None:
            raise MailError(ErrorKind.NOTFOUND, safe="no such queue entry")
        txn = self.store.transaction()
        txn.add(Q_STATE, _encode({"id": qid, "state": state,
                                  "next_attempt": entry.next_attempt if next_attempt is None else next_attempt}))
        await txn.commit()

    async def delete(self, qid: str) -> None:
        entry = await self.get(qid)
        if entry is None:
            raise MailError(ErrorKind.NOTFOUND, safe="no such queue entry")
        txn = self.store.transaction()
        txn.add(Q_DEL, _encode({"id": qid}))
        txn.free_blob(entry.blob)
        await txn.commit()
