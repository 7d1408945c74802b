"""The mail store: users' mailboxes and messages on the durable log engine.

Owns: every operation an MSS performs on mail -- delivery (idempotent, I-4),
append, mailbox list/create/delete/rename/subscribe, status, select, fetch,
flag changes with MODSEQ, expunge, copy, move, search, quota -- and the
change notifications sessions subscribe to.  Protocol front ends (LMTP,
the store RPC) call it; nothing here knows a protocol::

    mail = await Mailstore.open(StoreOptions(mirrors=(d1, d2)))
    results = await mail.deliver([Recipient("bob@x", key="Q1:bob@x")], message_bytes)
    snap = await mail.select("bob@x", "INBOX")
    await mail.store_flags("bob@x", "INBOX", [(1, -1)], "+", ["\\\\Seen"])

Invariants:

- **I-1.** An operation returns after its transaction is durable; the
  message body is a blob of the same transaction as its metadata.
- **Decided before the commit, on the loop.** UIDs, MODSEQs, mailbox ids
  and UIDVALIDITY come from in-memory counters (loaded from the index at
  open) and go into the records; taking them and queueing the commit happen
  with no ``await`` in between, so records reach the journal in the order
  their numbers were taken, and UIDs appear in ascending order.  A failed
  commit burns its numbers (IMAP allows gaps) and fails the store: the
  engine refuses every later commit, the process exits and recovers (I-3).
- **One writer of read-modify-write per user.** Flag changes, expunges,
  copies, moves, appends and mailbox changes of a user run under that
  user's lock, so what they read is what they change.  LMTP deliveries take
  no lock: they only add to INBOX, which cannot be deleted.
- **Blobs** are shared between a message and its copies (COPY/MOVE are
  cheap) but never between users; a blob is freed with the last message
  referencing it, decided under the user's lock.
- **I-4.** A delivery carrying a key that is already stored succeeds without
  a second copy.  Keys stay known after the message is expunged or moved
  (pruned after ``key_retention`` seconds, longer than any MTA queue
  lifetime), and a second delivery with a key still in flight waits for the
  first one's outcome.
- **Quota** (given by the caller, from the directory; 0 = none) is checked
  against the user's usage including deliveries in flight: over quota is
  NOQUOTA, and nothing is written.
- Notifications are sent after the commit, to listeners of the mailbox:
  ``exists`` (uid, uidnext), ``flags`` (uid, flags, modseq), ``expunge``
  (uids), ``gone`` (mailbox deleted or renamed away).

Logs: ``mailstore.delivered`` (debug), ``mailstore.duplicate``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events
from intermail.mailstore import names
from intermail.mailstore.index import (
    COUNTERS,
    MBOX_CREATE,
    MBOX_DELETE,
    MBOX_RENAME,
    MSG_ADD,
    MSG_COPY,
    MSG_EXPUNGE,
    MSG_FLAGS,
    PRUNE_KEYS,
    SUBSCRIBE,
    MailIndex,
    encode,
    flags_text,
)
from intermail.mailstore.parse import parse_message
from intermail.mailstore.search import compile_search
from intermail.storage import Store, StoreOptions, Transaction

__all__ = ["Mailstore", "Recipient", "Delivered", "MailboxInfo", "Status", "Snapshot", "MessageMeta", "Listener"]

log = logging.getLogger("intermail.mailstore")

register_events({
    "mailstore.delivered": "a message was stored for one or more recipients",
    "mailstore.duplicate": "a delivery whose key was already stored succeeded without a second copy",
})

Listener = Callable[[int, dict], None]  # (mailbox id, event)
KEY_RETENTION = 14 * 86400.0
MAX_KEY = 512
PARSE_INLINE = 256 << 10  # messages this small are parsed on the loop; larger ones in a thread


@dataclass(frozen=True)
class Recipient:
    user: str
    key: str | None = None  # delivery key (I-4); None: no deduplication
    quota: int = 0  # bytes; 0 = unlimited
    mailbox: str = names.INBOX


@dataclass(frozen=True)
class Delivered:
    user: str
    uid: int
    uidvalidity: int
    duplicate: bool = False


@dataclass(frozen=True)
class MailboxInfo:
    name: str
    special_use: str
    subscribed: bool
    has_children: bool


@dataclass(frozen=True)
class Status:
    messages: int
    unseen: int
    deleted: int
    size: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int


@dataclass(frozen=True)
class Snapshot:
    mailbox: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: tuple[tuple[int, str, int], ...]  # (uid, flags, modseq), ascending uid


@dataclass(frozen=True)
class MessageMeta:
    uid: int
    flags: str
    internaldate: float
    size: int
    modseq: int
    info: str  # JSON from intermail.mailstore.mime


@dataclass
class _Mailbox:
    id: int
    user: str
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: str


@dataclass
class _User:
    usage: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Mailstore:
    """One store (one MSS identity); see the module docstring."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 default_folders: Sequence[tuple[str, str]] = names.DEFAULT_FOLDERS,
                 key_retention: float = KEY_RETENTION):
        self.store = store
        self._clock = clock
        self.default_folders = tuple(default_folders)
        self.key_retention = key_retention
        self._mailboxes: dict[int, _Mailbox] = {}
        self._by_name: dict[tuple[str, str], int] = {}
        self._users: dict[str, _User] = {}
        self._next_mailbox = 1
        self._last_uidvalidity = 0
        self._inflight_keys: dict[str, asyncio.Future] = {}
        self._listeners: dict[int, set[Listener]] = {}
        self._all_listeners: list[Listener] = []

    # -- life cycle ----------------------------------------------------------------

    @classmethod
    async def open(cls, options: StoreOptions, **kwargs: Any) -> Mailstore:
        store = await Store.open(options, MailIndex())
        mail = cls(store, **kwargs)
        try:
            await mail._load()
        except BaseException:
            await store.close()
            raise
        return mail

    async def close(self) -> None:
        await self.store.close()

    async def _load(self) -> None:
        def read(conn):
            boxes = conn.execute("SELECT id, user, name, uidvalidity, uidnext, highestmodseq, special_use"
                                 " FROM mailboxes").fetchall()
            usage = conn.execute("SELECT b.user, SUM(m.size) FROM messages m JOIN mailboxes b"
                                 " ON b.id = m.mailbox GROUP BY b.user").fetchall()
            counters = dict(conn.execute("SELECT name, value FROM counters"))
            return boxes, usage, counters

        boxes, usage, counters = await self.store.read(read)
        for row in boxes:
            box = _Mailbox(*row)
            self._mailboxes[box.id] = box
            self._by_name[(box.user, box.name)] = box.id
            self._users.setdefault(box.user, _User())
        for user, used in usage:
            self._users.setdefault(user, _User()).usage = used or 0
        self._next_mailbox = max([counters.get("mailbox_id", 0), *self._mailboxes]) + 1
        self._last_uidvalidity = max([counters.get("uidvalidity", 0), *(row[3] for row in boxes)])

    def health(self) -> dict[str, Any]:
        return {"mailboxes": len(self._mailboxes), "users": len(self._users), **self.store.health()}

    # -- helpers -------------------------------------------------------------------

    def _user(self, user: str) -> _User:
        if not isinstance(user, str) or not user or len(user) > 320:
            raise MailError(ErrorKind.INVALID, safe="bad user name")
        return self._users.setdefault(user, _User())

    def _mailbox(self, user: str, name: str) -> _Mailbox:
        box_id = self._by_name.get((user, names.mailbox_name(name)))
        if box_id is None:
            raise MailError(ErrorKind.NOTFOUND, safe="no such mailbox")
        return self._mailboxes[box_id]

    def _new_uidvalidity(self) -> int:
        self._last_uidvalidity = max(int(self._clock()), self._last_uidvalidity + 1)
        return self._last_uidvalidity

    def _create_records(self, txn: Transaction, user: str, name: str, special_use: str) -> _Mailbox:
        box = _Mailbox(self._next_mailbox, user, name, self._new_uidvalidity(), 1, 0, special_use)
        self._next_mailbox += 1
        txn.add(MBOX_CREATE, encode({"id": box.id, "user": user, "name": name, "uidvalidity": box.uidvalidity,
                                     "special_use": special_use}))
        txn.add(COUNTERS, encode({"mailbox_id": box.id, "uidvalidity": box.uidvalidity}))
        return box

    def _register(self, box: _Mailbox) -> None:
        self._mailboxes[box.id] = box
        self._by_name[(box.user, box.name)] = box.id

    async def _commit(self, txn: Transaction) -> int:
        return await txn.commit()

    def listen_all(self, listener: Listener) -> None:
        """Call ``listener(mailbox id, event)`` after every change of every mailbox (the RPC push)."""
        self._all_listeners.append(listener)

    def _notify(self, box_id: int, event: dict) -> None:
        for listener in [*self._all_listeners, *self._listeners.get(box_id, ())]:
            try:
                listener(box_id, event)
            except Exception:
                log.exception("mail store listener failed")

    def listen(self, user: str, name: str, listener: Listener) -> tuple[int, Callable[[], None]]:
        """Call ``listener(mailbox id, event)`` after each change of the mailbox; returns (id, stop)."""
        box = self._mailbox(user, name)
        self._listeners.setdefault(box.id, set()).add(listener)

        def stop() -> None:
            listeners = self._listeners.get(box.id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[box.id]
        return box.id, stop

    # -- users ---------------------------------------------------------------------

    async def ensure_user(self, user: str) -> None:
        """Create INBOX and the special-use folders on first use of an account."""
        u = self._user(user)
        if (user, names.INBOX) in self._by_name:
            return
        async with u.lock:
            await self._ensure_locked(user)

    async def _ensure_locked(self, user: str) -> None:
        if (user, names.INBOX) in self._by_name:
            return
        txn = self.store.transaction()
        boxes = [self._create_records(txn, user, names.INBOX, "")]
        for folder, use in self.default_folders:
            if (user, folder) not in self._by_name:
                boxes.append(self._create_records(txn, user, folder, use))
        for box in boxes:
            txn.add(SUBSCRIBE, encode({"user": user, "name": box.name, "on": True}))
        await self._commit(txn)
        for box in boxes:
            self._register(box)

    async def usage(self, user: str) -> int:
        return self._user(user).usage

    # -- delivery and append -------------------------------------------------------

    async def deliver(self, recipients: Sequence[Recipient], data: bytes,
                      *, internaldate: float | None = None) -> list[Delivered | MailError]:
        """Store one message for each recipient, in one transaction; one result per recipient."""
        if not recipients:
            return []
        info, search = await self._parse(data)
        for r in recipients:
            await self.ensure_user(r.user)
        results: list[Delivered | MailError | None] = [None] * len(recipients)
        waits: list[tuple[int, asyncio.Future]] = []
        mine: list[str] = []
        try:
            keys = []
            for i, r in enumerate(recipients):
                if r.key is None:
                    continue
                if not isinstance(r.key, str) or not r.key or len(r.key) > MAX_KEY:
                    results[i] = MailError(ErrorKind.INVALID, safe="bad delivery key")
                    continue
                pending = self._inflight_keys.get(r.key)
                if r.key in mine:
                    results[i] = MailError(ErrorKind.INVALID, safe="delivery key repeated in one transaction")
                elif pending is not None:
                    waits.append((i, pending))
                else:
                    self._inflight_keys[r.key] = asyncio.get_running_loop().create_future()
                    mine.append(r.key)
                    keys.append(r.key)
            stored = await self._stored_keys(keys)
            for i, r in enumerate(recipients):
                if r.key in stored and results[i] is None and all(i != w for w, _ in waits):
                    box_id, uid = stored[r.key]
                    box = self._mailboxes.get(box_id)
                    results[i] = Delivered(r.user, uid, box.uidvalidity if box else 0, duplicate=True)
                    log_event(log, "mailstore.duplicate", user=r.user, key=r.key)
            txn = self.store.transaction()
            added: list[tuple[int, _Mailbox, int, int]] = []  # (recipient index, box, uid, size)
            now = self._clock() if internaldate is None else internaldate
            for i, r in enumerate(recipients):
                if results[i] is not None or any(i == w for w, _ in waits):
                    continue
                try:
                    box = self._mailbox(r.user, r.mailbox)
                except MailError as exc:
                    results[i] = exc
                    continue
                u = self._users[r.user]
                if r.quota and u.usage + len(data) > r.quota:
                    results[i] = MailError(ErrorKind.NOQUOTA, safe="mailbox full")
                    continue
                u.usage += len(data)
                uid = box.uidnext
                box.uidnext += 1
                box.highestmodseq += 1
                blob = txn.put_blob(data)
                txn.add(MSG_ADD, encode({"mailbox": box.id, "uid": uid, "blob": blob, "size": len(data),
                                         "date": now, "modseq": box.highestmodseq, "flags": "", "info": info,
                                         "key": r.key, "key_time": self._clock(), "search": search}))
                added.append((i, box, uid, len(data)))
            if added:
                try:
                    await self._commit(txn)
                except BaseException:
                    for _, box, _, size in added:
                        self._users[box.user].usage -= size
                    raise
            for i, box, uid, _ in added:
                results[i] = Delivered(box.user, uid, box.uidvalidity)
                self._notify(box.id, {"event": "exists", "uid": uid, "uidnext": box.uidnext})
            for key in mine:
                fut = self._inflight_keys.get(key)
                if fut is not None and not fut.done():
                    fut.set_result(True)
            if added:
                log_event(log, "mailstore.delivered", level=logging.DEBUG, recipients=len(added), size=len(data))
        except BaseException as exc:
            for key in mine:
                fut = self._inflight_keys.get(key)
                if fut is not None and not fut.done():
                    fut.set_exception(MailError(ErrorKind.TEMP, safe="delivery failed, try again",
                                                detail=repr(exc)))
                    fut.exception()
            raise
        finally:
            for key in mine:
                self._inflight_keys.pop(key, None)
        for i, pending in waits:
            r = recipients[i]
            try:
                await pending
            except MailError as exc:
                results[i] = exc
                continue
            # the other delivery with this key finished: now it is stored (or it failed and we retry once)
            again = await self.deliver([r], data, internaldate=internaldate)
            results[i] = again[0]
        return results  # type: ignore[return-value]

    async def _stored_keys(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        if not keys:
            return {}

        def read(conn):
            found = {}
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                marks = ",".join("?" * len(part))
                for key, box, uid in conn.execute(f"SELECT key, mailbox, uid FROM deliveries WHERE key IN ({marks})",
                                                  part):
                    found[key] = (box, uid)
            return found
        return await self.store.read(read)

    async def _parse(self, data: bytes) -> tuple[str, dict]:
        if len(data) <= PARSE_INLINE:
            return parse_message(data)
        return await asyncio.to_thread(parse_message, data)

    async def append(self, user: str, name: str, data: bytes, *, flags: Iterable[str] = (),
                     internaldate: float | None = None, quota: int = 0) -> tuple[int, int]:
        """APPEND: returns (uidvalidity, uid)."""
        stored_flags = flags_text(names.flags(flags))
        info, search = await self._parse(data)
        await self.ensure_user(user)
        u = self._users[user]
        async with u.lock:
            box = self._mailbox(user, name)
            if quota and u.usage + len(data) > quota:
                raise MailError(ErrorKind.NOQUOTA, safe="mailbox full")
            txn = self.store.transaction()
            uid = box.uidnext
            box.uidnext += 1
            box.highestmodseq += 1
            blob = txn.put_blob(data)
            txn.add(MSG_ADD, encode({"mailbox": box.id, "uid": uid, "blob": blob, "size": len(data),
                                     "date": self._clock() if internaldate is None else internaldate,
                                     "modseq": box.highestmodseq, "flags": stored_flags, "info": info,
                                     "key": None, "search": search}))
            u.usage += len(data)
            try:
                await self._commit(txn)
            except BaseException:
                u.usage -= len(data)
                raise
        self._notify(box.id, {"event": "exists", "uid": uid, "uidnext": box.uidnext})
        return box.uidvalidity, uid

    # -- mailboxes -----------------------------------------------------------------

    async def list_mailboxes(self, user: str) -> list[MailboxInfo]:
        await self.ensure_user(user)

        def read(conn):
            return {row[0] for row in conn.execute("SELECT name FROM subscriptions WHERE user = ?", (user,))}
        subscribed = await self.store.read(read)
        mine = sorted(b.name for b in self._mailboxes.values() if b.user == user)
        present = set(mine)
        out = []
        for name in mine:
            box = self._mailboxes[self._by_name[(user, name)]]
            children = any(names.is_inferior(other, name) for other in present)
            out.append(MailboxInfo(name, box.special_use, name in subscribed, children))
        return out

    async def subscriptions(self, user: str) -> list[str]:
        def read(conn):
            return [row[0] for row in conn.execute("SELECT name FROM subscriptions WHERE user = ? ORDER BY name",
                                                   (user,))]
        return await self.store.read(read)

    async def create_mailbox(self, user: str, name: str, special_use: str = "") -> None:
        """CREATE, with missing parents (RFC 3501 §6.3.3)."""
        name = names.mailbox_name(name)
        if special_use and special_use not in names.SPECIAL_USE:
            raise MailError(ErrorKind.INVALID, safe="unknown special use")
        await self.ensure_user(user)
        u = self._users[user]
        async with u.lock:
            if (user, name) in self._by_name:
                raise MailError(ErrorKind.EXISTS, safe="mailbox already exists")
            txn = self.store.transaction()
            boxes = [self._create_records(txn, user, parent, "") for parent in names.parents(name)
                     if (user, parent) not in self._by_name]
            boxes.append(self._create_records(txn, user, name, special_use))
            await self._commit(txn)
            for box in boxes:
                self._register(box)

    async def delete_mailbox(self, user: str, name: str) -> None:
        """DELETE: the mailbox and its messages; INBOX cannot be deleted; inferiors stay."""
        await self.ensure_user(user)
        u = self._users[user]
        async with u.lock:
            box = self._mailbox(user, name)
            if box.name == names.INBOX:
                raise MailError(ErrorKind.PERM, safe="INBOX cannot be deleted")
            # Gone for lock-free deliveries from now on: one that already took
            # a UID here is queued before our read below, which then sees it.
            del self._by_name[(user, box.name)]
            try:
                txn = self.store.transaction()
                freed = await self._free_blobs(txn, box.id, None)
                txn.add(MBOX_DELETE, encode({"id": box.id}))
                await self._commit(txn)
            except BaseException:
                self._by_name[(user, box.name)] = box.id
                raise
            u.usage -= freed
            del self._mailboxes[box.id]
        self._notify(box.id, {"event": "gone"})
        self._listeners.pop(box.id, None)

    async def rename_mailbox(self, user: str, old: str, new: str) -> None:
        """RENAME with inferiors; renaming INBOX moves its messages to the new name (RFC 3501 §6.3.5)."""
        new = names.mailbox_name(new)
        await self.ensure_user(user)
        u = self._users[user]
        async with u.lock:
            box = self._mailbox(user, old)
            if (user, new) in self._by_name:
                raise MailError(ErrorKind.EXISTS, safe="mailbox already exists")
            if names.is_inferior(new, box.name):
                raise MailError(ErrorKind.INVALID, safe="cannot rename a mailbox into itself")
            txn = self.store.transaction()
            created = [self._create_records(txn, user, parent, "") for parent in names.parents(new)
                       if (user, parent) not in self._by_name]
            if box.name == names.INBOX:
                target = self._create_records(txn, user, new, "")
                created.append(target)
                uids = await self._uids(box.id, None)
                if uids:
                    self._copy_records(txn, box, target, list(zip(uids, range(1, len(uids) + 1), strict=True)),
                                       move=True)
                target.uidnext = len(uids) + 1
                await self._commit(txn)
                for b in created:
                    self._register(b)
                if uids:
                    self._notify(box.id, {"event": "expunge", "uids": uids})
                return
            renames = [(box, new)]
            for other in list(self._mailboxes.values()):
                if other.user == user and names.is_inferior(other.name, box.name):
                    renames.append((other, new + other.name[len(box.name):]))
            moving = {b.id for b, _ in renames}
            for _, target in renames:
                holder = self._by_name.get((user, target))
                if holder is not None and holder not in moving:
                    raise MailError(ErrorKind.EXISTS, safe="a mailbox with a new name already exists")
                if len(target.encode("utf-8")) > names.MAX_NAME:
                    raise MailError(ErrorKind.LIMIT, safe="mailbox name too long")
            txn.add(MBOX_RENAME, encode({"renames": [[b.id, n] for b, n in renames]}))
            await self._commit(txn)
            for b in created:
                self._register(b)
            for b, _ in renames:
                del self._by_name[(user, b.name)]
            for b, n in renames:
                b.name = n
                self._by_name[(user, n)] = b.id
        for b, _ in renames:
            self._notify(b.id, {"event": "renamed", "name": b.name})

    async def subscribe(self, user: str, name: str, on: bool = True) -> None:
        self._user(user)
        name = names.mailbox_name(name)
        txn = self.store.transaction()
        txn.add(SUBSCRIBE, encode({"user": user, "name": name, "on": bool(on)}))
        await self._commit(txn)

    async def status(self, user: str, name: str) -> Status:
        await self.ensure_user(user)
        box = self._mailbox(user, name)

        def read(conn):
            return conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0),"
                " SUM(instr(' ' || flags || ' ', ' \\Seen ') = 0),"
                " SUM(instr(' ' || flags || ' ', ' \\Deleted ') > 0)"
                " FROM messages WHERE mailbox = ?", (box.id,)).fetchone()
        count, size, unseen, deleted = await self.store.read(read)
        return Status(count, unseen or 0, deleted or 0, size, box.uidnext, box.uidvalidity, box.highestmodseq)

    async def select(self, user: str, name: str) -> Snapshot:
        """The mailbox as a session starts from: every (uid, flags, modseq)."""
        await self.ensure_user(user)
        box = self._mailbox(user, name)

        def read(conn):
            rows = conn.execute("SELECT uid, flags, modseq FROM messages WHERE mailbox = ? ORDER BY uid",
                                (box.id,)).fetchall()
            top = conn.execute("SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ?", (box.id,)).fetchone()
            return rows, top
        rows, top = await self.store.read(read)
        return Snapshot(box.id, box.name, box.uidvalidity, top[0], top[1], tuple(map(tuple, rows)))

    # -- messages ------------------------------------------------------------------

    async def _uids(self, box_id: int, ranges: names.UidRanges | None, *, where: str = "",
                    params: tuple = ()) -> list[int]:
        """UIDs in the mailbox within ``ranges`` (None: all), ascending."""
        def read(conn):
            clause, args = _range_clause(conn, box_id, ranges)
            sql = f"SELECT uid FROM messages WHERE mailbox = ?{clause}{where} ORDER BY uid"
            return [row[0] for row in conn.execute(sql, (box_id, *args, *params))]
        return await self.store.read(read)

    async def fetch(self, user: str, name: str, ranges: names.UidRanges, *,
                    changed_since: int | None = None, with_info: bool = True) -> list[MessageMeta]:
        box = self._mailbox(user, name)
        columns = "uid, flags, internaldate, size, modseq, " + ("info" if with_info else "''")

        def read(conn):
            clause, args = _range_clause(conn, box.id, ranges)
            extra, extra_args = ("", ()) if changed_since is None else (" AND modseq > ?", (changed_since,))
            return conn.execute(f"SELECT {columns} FROM messages WHERE mailbox = ?{clause}{extra} ORDER BY uid",
                                (box.id, *args, *extra_args)).fetchall()
        return [MessageMeta(*row) for row in await self.store.read(read)]

    async def _blob_of(self, user: str, name: str, uid: int) -> int:
        box = self._mailbox(user, name)
        row = await self.store.read(lambda conn: conn.execute(
            "SELECT blob FROM messages WHERE mailbox = ? AND uid = ?", (box.id, uid)).fetchone())
        if row is None:
            raise MailError(ErrorKind.NOTFOUND, safe="no such message")
        return row[0]

    async def read_message(self, user: str, name: str, uid: int) -> bytes:
        return await self.store.read_blob(await self._blob_of(user, name, uid))

    async def iter_message(self, user: str, name: str, uid: int, offset: int = 0,
                           length: int | None = None, chunk: int = 64 << 10) -> AsyncIterator[bytes]:
        """The message's bytes from ``offset`` (``length`` of them, or to the end), in chunks."""
        blob = await self._blob_of(user, name, uid)
        pos = 0
        end = None if length is None else offset + length
        async for data in self.store.iter_blob(blob, chunk):
            start, stop = pos, pos + len(data)
            pos = stop
            if stop <= offset:
                continue
            if end is not None and start >= end:
                break
            piece = data[max(0, offset - start): len(data) if end is None else min(len(data), end - start)]
            if piece:
                yield piece

    async def store_flags(self, user: str, name: str, ranges: names.UidRanges, mode: str,
                          flags: Iterable[str], *, unchanged_since: int | None = None
                          ) -> tuple[list[tuple[int, str, int]], list[int]]:
        """STORE: ``mode`` ``+``, ``-`` or ``=``; returns (changed (uid, flags, modseq), failed uids).

        ``unchanged_since`` (CONDSTORE): messages modified after it are not
        changed and are returned as failed.
        """
        if mode not in ("+", "-", "="):
            raise MailError(ErrorKind.INVALID, safe="flag mode must be +, - or =")
        wanted = names.flags(flags)
        lowered = {f.lower() for f in wanted}
        u = self._user(user)
        async with u.lock:
            box = self._mailbox(user, name)

            def read(conn):
                clause, args = _range_clause(conn, box.id, ranges)
                return conn.execute(f"SELECT uid, flags, modseq FROM messages WHERE mailbox = ?{clause} ORDER BY uid",
                                    (box.id, *args)).fetchall()
            rows = await self.store.read(read)
            changes, failed = [], []
            for uid, stored, modseq in rows:
                if unchanged_since is not None and modseq > unchanged_since:
                    failed.append(uid)
                    continue
                current = names.split_flags(stored)
                if mode == "+":
                    new = current + [f for f in wanted if f.lower() not in {c.lower() for c in current}]
                elif mode == "-":
                    new = [c for c in current if c.lower() not in lowered]
                else:
                    new = wanted
                text = flags_text(new)
                if text != stored:
                    changes.append([uid, text])
            if not changes:
                return [], failed
            box.highestmodseq += 1
            modseq = box.highestmodseq
            txn = self.store.transaction()
            txn.add(MSG_FLAGS, encode({"mailbox": box.id, "modseq": modseq, "changes": changes}))
            await self._commit(txn)
        out = [(uid, text, modseq) for uid, text in changes]
        for uid, text, m in out:
            self._notify(box.id, {"event": "flags", "uid": uid, "flags": text, "modseq": m})
        return out, failed

    async def expunge(self, user: str, name: str, ranges: names.UidRanges | None = None, *,
                      flagged_only: bool = True) -> list[int]:
        """EXPUNGE (or UID EXPUNGE with ``ranges``): remove messages flagged \\Deleted; returns their UIDs.

        ``flagged_only=False`` removes every message of ``ranges`` whatever
        its flags (POP3's UPDATE state): in one transaction, so all of them
        go or none does.
        """
        u = self._user(user)
        async with u.lock:
            box = self._mailbox(user, name)
            where = " AND instr(' ' || flags || ' ', ' \\Deleted ') > 0" if flagged_only else ""
            uids = await self._uids(box.id, ranges, where=where)
            if not uids:
                return []
            txn = self.store.transaction()
            freed = await self._free_blobs(txn, box.id, uids)
            box.highestmodseq += 1
            txn.add(MSG_EXPUNGE, encode({"mailbox": box.id, "modseq": box.highestmodseq, "uids": uids}))
            await self._commit(txn)
            u.usage -= freed
        self._notify(box.id, {"event": "expunge", "uids": uids})
        return uids

    async def _free_blobs(self, txn: Transaction, box_id: int, uids: list[int] | None) -> int:
        """Free the blobs only the given messages reference; returns the bytes they counted for."""
        def read(conn):
            if uids is None:
                gone = conn.execute("SELECT blob, size FROM messages WHERE mailbox = ?", (box_id,)).fetchall()
            else:
                gone = []
                for start in range(0, len(uids), 500):
                    part = uids[start:start + 500]
                    gone += conn.execute(f"SELECT blob, size FROM messages WHERE mailbox = ? AND uid IN"
                                         f" ({','.join('?' * len(part))})", (box_id, *part)).fetchall()
            counts: dict[int, int] = {}
            for blob, _ in gone:
                counts[blob] = counts.get(blob, 0) + 1
            free = []
            for blob, n in counts.items():
                total = conn.execute("SELECT COUNT(*) FROM messages WHERE blob = ?", (blob,)).fetchone()[0]
                if total <= n:
                    free.append(blob)
            return free, sum(size for _, size in gone)
        free, size = await self.store.read(read)
        for blob in free:
            txn.free_blob(blob)
        return size

    def _copy_records(self, txn: Transaction, src: _Mailbox, dst: _Mailbox, pairs: list[tuple[int, int]],
                      move: bool) -> None:
        dst.highestmodseq += 1
        doc = {"src": src.id, "dst": dst.id, "modseq": dst.highestmodseq, "pairs": [list(p) for p in pairs],
               "move": move}
        if move:
            src.highestmodseq += 1
            doc["src_modseq"] = src.highestmodseq
        txn.add(MSG_COPY, encode(doc))

    async def copy(self, user: str, name: str, ranges: names.UidRanges, target: str, *, move: bool = False,
                   quota: int = 0) -> tuple[int, list[tuple[int, int]]]:
        """COPY/MOVE (RFC 6851): returns (target uidvalidity, [(source uid, new uid)])."""
        u = self._user(user)
        async with u.lock:
            src = self._mailbox(user, name)
            dst = self._mailbox(user, target)
            if src.id == dst.id and move:
                raise MailError(ErrorKind.INVALID, safe="cannot move a message into its own mailbox")

            def read(conn):
                clause, args = _range_clause(conn, src.id, ranges)
                return conn.execute(f"SELECT uid, size FROM messages WHERE mailbox = ?{clause} ORDER BY uid",
                                    (src.id, *args)).fetchall()
            rows = await self.store.read(read)
            if not rows:
                return dst.uidvalidity, []
            added = 0 if move else sum(size for _, size in rows)
            if quota and added and u.usage + added > quota:
                raise MailError(ErrorKind.NOQUOTA, safe="mailbox full")
            pairs = []
            for uid, _ in rows:
                pairs.append((uid, dst.uidnext))
                dst.uidnext += 1
            txn = self.store.transaction()
            self._copy_records(txn, src, dst, pairs, move)
            await self._commit(txn)
            u.usage += added
        for _, new in pairs:
            self._notify(dst.id, {"event": "exists", "uid": new, "uidnext": dst.uidnext})
        if move:
            self._notify(src.id, {"event": "expunge", "uids": [p[0] for p in pairs]})
        return dst.uidvalidity, pairs

    async def search(self, user: str, name: str, criteria: Any) -> list[int]:
        """UIDs matching ``criteria`` (the tree of :mod:`.search`), ascending."""
        box = self._mailbox(user, name)
        query = compile_search(criteria, clock=self._clock)

        columns = ("uid", "blob", "flags", "size", "internaldate", "modseq", "h_from", "h_to", "h_cc", "h_bcc",
                   "h_subject", "h_msgid", "sent_date")

        def read(conn):
            clause, args = query.sql(conn, box.id)
            rows = conn.execute(f"SELECT {', '.join(columns)} FROM messages WHERE mailbox = ?{clause} ORDER BY uid",
                                (box.id, *args)).fetchall()
            top = conn.execute("SELECT COALESCE(MAX(uid), 0) FROM messages WHERE mailbox = ?",
                               (box.id,)).fetchone()[0]
            return rows, top
        rows, max_uid = await self.store.read(read)
        if not query.needs_body:
            return [row[0] for row in rows]
        out = []
        for row in rows:
            fields = dict(zip(columns, row, strict=True))
            fields["max_uid"] = max_uid
            if query.match_body(await self.store.read_blob(fields["blob"]), fields):
                out.append(fields["uid"])
        return out

    async def prune_keys(self) -> None:
        """Forget delivery keys older than ``key_retention``."""
        txn = self.store.transaction()
        txn.add(PRUNE_KEYS, encode({"before": self._clock() - self.key_retention}))
        await self._commit(txn)


def _range_clause(conn, box_id: int, ranges: names.UidRanges | None) -> tuple[str, tuple]:
    """SQL restricting ``uid`` to ``ranges`` (``*`` = the largest UID present)."""
    if ranges is None:
        return "", ()
    max_uid = 0
    if any(low == -1 or high == -1 for low, high in ranges):
        max_uid = conn.execute("SELECT COALESCE(MAX(uid), 0) FROM messages WHERE mailbox = ?",
                               (box_id,)).fetchone()[0]
    merged = _merge(names.resolve_ranges(ranges, max_uid))
    if not merged:
        return " AND 0", ()
    if len(merged) <= 64:
        parts, args = [], []
        for low, high in merged:
            parts.append("uid BETWEEN ? AND ?")
            args += [low, high]
        return " AND (" + " OR ".join(parts) + ")", tuple(args)
    # Many ranges: one parameter, however many (SQLite limits expression depth).
    return (" AND uid BETWEEN ? AND ? AND EXISTS (SELECT 1 FROM json_each(?) j WHERE uid BETWEEN"
            " j.value ->> 0 AND j.value ->> 1)",
            (merged[0][0], merged[-1][1], json.dumps(merged)))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out

