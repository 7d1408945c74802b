"""The store RPC: the mail store's operations as methods of the shared RPC server.

Owns: the method table an MSS serves to access servers (IMAP, POP3), the
checks on every argument, how long lists travel (a JSON-lines response body,
so no answer is bounded by the frame size), and the pushes that drive IDLE::

    service = MailstoreService(mailstore)
    rpc = RpcServer(service.handlers(), instance="mss1"); service.attach(rpc)

Methods (``user`` is the canonical account address, ``name`` a mailbox name,
``uids`` a UID set ``[[low, high], ...]`` with ``high = -1`` for ``*``)::

    mailbox.list       {user}                           -> {"mailboxes": [{name, special_use, subscribed, children}]}
    mailbox.subscriptions {user}                        -> {"names": [...]}
    mailbox.create     {user, name, special_use?}       -> {}
    mailbox.delete     {user, name}                     -> {}
    mailbox.rename     {user, name, new}                -> {}
    mailbox.subscribe  {user, name, on}                 -> {}
    mailbox.status     {user, name}                     -> {messages, unseen, deleted, size, uidnext, uidvalidity, highestmodseq}
    mailbox.select     {user, name}                     -> {id, name, uidvalidity, uidnext, highestmodseq, count}
                                                           + body: one JSON line [uid, flags, modseq] per message
    message.fetch      {user, name, uids, changed_since?, info?}
                                                        -> {"count"} + body: one JSON line {uid, flags, date, size, modseq, info}
    message.body       {user, name, uid, offset?, length?} -> {} + body: the bytes
    message.append     {user, name, flags?, date?, quota?} + request body: the message -> {uidvalidity, uid}
    message.store      {user, name, uids, mode, flags, unchanged_since?} -> {changed: [[uid, flags, modseq]], failed: [uid]}
    message.expunge    {user, name, uids?, any_flags?}  -> {"uids": [...]}  (any_flags: not only \\Deleted ones)
    message.copy       {user, name, uids, target, quota?} -> {uidvalidity, pairs: [[src, dst]]}
    message.move       {user, name, uids, target}       -> {uidvalidity, pairs: [[src, dst]]}
    message.search     {user, name, criteria}           -> {"count"} + body: one JSON line per matching UID
    quota.usage        {user}                           -> {"bytes"}
    maildrop.lock      {user, owner, lease}             -> {"acquired": bool, "owner"?}
    maildrop.unlock    {user, owner}                    -> {"released": bool}
    store.health       {}                               -> the store's health

Pushes: subscribe to topic ``mailbox:<id>`` (the id from ``mailbox.select``);
each change of that mailbox is pushed as its event (``exists``, ``flags``,
``expunge``, ``gone``, ``renamed``).

Maildrop locks (POP3's one session per maildrop, RFC 1939 §8) are leases
held in this process's memory: taken by ``owner`` (any text the caller
chooses) for ``lease`` seconds, renewed by locking again with the same
owner, and gone when released, when the lease runs out, or when the RPC
connection that took it closes (its access server died).  A take-over
starts with none: the sessions of the old owner's connections are gone.

Invariants: an argument is checked before use (unknown ones refused); any
failure is a ``MailError`` with a safe text; a message body larger than
``max_message`` is refused before it is read whole.

Logs: nothing (the RPC server logs requests that fail).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from intermail.errors import ErrorKind, MailError
from intermail.mailstore import names
from intermail.mailstore.store import Mailstore
from intermail.rpc.server import CallContext, Handler, RpcServer, Streamed

__all__ = ["MailstoreService"]

MAX_TEXT = 1024
MAX_LOCKS = 100_000


def _invalid(text: str) -> MailError:
    return MailError(ErrorKind.INVALID, safe=text)


class _Args:
    def __init__(self, args: Any, allowed: Iterable[str]):
        if not isinstance(args, dict):
            raise _invalid("arguments must be a map")
        unknown = set(args) - set(allowed)
        if unknown:
            raise _invalid(f"unknown argument {sorted(unknown)[0][:40]!r}")
        self.args = args

    def text(self, name: str, *, required: bool = True) -> str | None:
        value = self.args.get(name)
        if value is None:
            if required:
                raise _invalid(f"missing argument {name!r}")
            return None
        if not isinstance(value, str) or not value:
            raise _invalid(f"argument {name!r} must be non-empty text")
        if len(value) > MAX_TEXT:
            raise MailError(ErrorKind.LIMIT, safe=f"argument {name!r} is too long")
        return value

    def integer(self, name: str, *, default: int | None = None, minimum: int = 0) -> int | None:
        value = self.args.get(name, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**63:
            raise _invalid(f"argument {name!r} must be an integer of at least {minimum}")
        return value

    def number(self, name: str) -> float | None:
        value = self.args.get(name)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 2**40:
            raise _invalid(f"argument {name!r} must be a time in seconds")
        return float(value)

    def texts(self, name: str) -> list[str]:
        value = self.args.get(name, [])
        if not isinstance(value, list) or len(value) > names.MAX_FLAGS:
            raise _invalid(f"argument {name!r} must be a list of at most {names.MAX_FLAGS} texts")
        return value

    def uids(self, name: str = "uids", *, required: bool = True) -> list[tuple[int, int]] | None:
        if name not in self.args and not required:
            return None
        if name not in self.args:
            raise _invalid(f"missing argument {name!r}")
        return names.uid_ranges(self.args[name])


def _lines(items: Iterable[Any]) -> Iterable[bytes]:
    """JSON lines, in pieces of about 64 KiB."""
    buffer: list[bytes] = []
    size = 0
    for item in items:
        line = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        buffer.append(line)
        size += len(line)
        if size >= 64 << 10:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)


class MailstoreService:
    """The store RPC over one :class:`Mailstore`."""

    def __init__(self, mailstore: Mailstore, *, max_message: int = 32 << 20):
        self.mail = mailstore
        self.max_message = max_message
        self._rpc: RpcServer | None = None
        self._locks: dict[str, tuple[str, Any, float]] = {}  # user -> (owner, connection, expiry)

    def attach(self, rpc: RpcServer) -> None:
        """Push every mailbox change to the connections subscribed to ``mailbox:<id>``."""
        self._rpc = rpc
        self.mail.listen_all(lambda box_id, event: rpc.push(f"mailbox:{box_id}", event))

    def handlers(self) -> dict[str, Handler]:
        table: dict[str, Callable[[CallContext, dict], Awaitable[Any]]] = {
            "mailbox.list": self._list, "mailbox.subscriptions": self._subscriptions,
            "mailbox.create": self._create, "mailbox.delete": self._delete, "mailbox.rename": self._rename,
            "mailbox.subscribe": self._subscribe, "mailbox.status": self._status, "mailbox.select": self._select,
            "message.fetch": self._fetch, "message.body": self._body, "message.append": self._append,
            "message.store": self._store, "message.expunge": self._expunge, "message.copy": self._copy,
            "message.move": self._move, "message.search": self._search, "quota.usage": self._usage,
            "store.health": self._health, "maildrop.lock": self._lock, "maildrop.unlock": self._unlock,
        }
        return table  # type: ignore[return-value]

    # -- mailboxes -----------------------------------------------------------------

    async def _list(self, ctx: CallContext, args: dict) -> dict:
        user = _Args(args, {"user"}).text("user")
        boxes = await self.mail.list_mailboxes(user)
        return {"mailboxes": [{"name": b.name, "special_use": b.special_use, "subscribed": b.subscribed,
                               "children": b.has_children} for b in boxes]}

    async def _subscriptions(self, ctx: CallContext, args: dict) -> dict:
        user = _Args(args, {"user"}).text("user")
        return {"names": await self.mail.subscriptions(user)}

    async def _create(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "special_use"})
        await self.mail.create_mailbox(a.text("user"), a.text("name"), a.text("special_use", required=False) or "")
        return {}

    async def _delete(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name"})
        await self.mail.delete_mailbox(a.text("user"), a.text("name"))
        return {}

    async def _rename(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "new"})
        await self.mail.rename_mailbox(a.text("user"), a.text("name"), a.text("new"))
        return {}

    async def _subscribe(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "on"})
        on = args.get("on", True)
        if not isinstance(on, bool):
            raise _invalid("argument 'on' must be true or false")
        await self.mail.subscribe(a.text("user"), a.text("name"), on)
        return {}

    async def _status(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name"})
        s = await self.mail.status(a.text("user"), a.text("name"))
        return {"messages": s.messages, "unseen": s.unseen, "deleted": s.deleted, "size": s.size,
                "uidnext": s.uidnext, "uidvalidity": s.uidvalidity, "highestmodseq": s.highestmodseq}

    async def _select(self, ctx: CallContext, args: dict) -> Streamed:
        a = _Args(args, {"user", "name"})
        snap = await self.mail.select(a.text("user"), a.text("name"))
        result = {"id": snap.mailbox, "name": snap.name, "uidvalidity": snap.uidvalidity, "uidnext": snap.uidnext,
                  "highestmodseq": snap.highestmodseq, "count": len(snap.messages)}
        return Streamed(result, _lines(list(m) for m in snap.messages))

    # -- messages ------------------------------------------------------------------

    async def _fetch(self, ctx: CallContext, args: dict) -> Streamed:
        a = _Args(args, {"user", "name", "uids", "changed_since", "info"})
        with_info = args.get("info", True)
        if not isinstance(with_info, bool):
            raise _invalid("argument 'info' must be true or false")
        metas = await self.mail.fetch(a.text("user"), a.text("name"), a.uids(),
                                      changed_since=a.integer("changed_since"), with_info=with_info)
        rows = ({"uid": m.uid, "flags": m.flags, "date": m.internaldate, "size": m.size, "modseq": m.modseq,
                 **({"info": m.info} if with_info else {})} for m in metas)
        return Streamed({"count": len(metas)}, _lines(rows))

    async def _body(self, ctx: CallContext, args: dict) -> Streamed:
        a = _Args(args, {"user", "name", "uid", "offset", "length"})
        user, name, uid = a.text("user"), a.text("name"), a.integer("uid", minimum=1)
        if uid is None:
            raise _invalid("missing argument 'uid'")
        offset, length = a.integer("offset", default=0), a.integer("length")
        # look the message up now, so a missing one is an ERROR, not a broken body
        if not await self.mail.fetch(user, name, [(uid, uid)], with_info=False):
            raise MailError(ErrorKind.NOTFOUND, safe="no such message")
        chunks: AsyncIterator[bytes] = self.mail.iter_message(user, name, uid, offset, length)
        return Streamed({}, chunks)

    async def _append(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "flags", "date", "quota"})
        user, name = a.text("user"), a.text("name")
        flags, date, quota = a.texts("flags"), a.number("date"), a.integer("quota", default=0)
        if not ctx.has_body:
            raise _invalid("message.append needs the message as its body")
        data = await ctx.read_body(self.max_message)
        if not data:
            raise _invalid("empty message")
        uidvalidity, uid = await self.mail.append(user, name, data, flags=flags, internaldate=date, quota=quota)
        return {"uidvalidity": uidvalidity, "uid": uid}

    async def _store(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "uids", "mode", "flags", "unchanged_since"})
        changed, failed = await self.mail.store_flags(a.text("user"), a.text("name"), a.uids(), a.text("mode"),
                                                      a.texts("flags"),
                                                      unchanged_since=a.integer("unchanged_since"))
        return {"changed": [list(c) for c in changed], "failed": failed}

    async def _expunge(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "uids", "any_flags"})
        any_flags = args.get("any_flags", False)
        if not isinstance(any_flags, bool):
            raise _invalid("argument 'any_flags' must be true or false")
        uids = a.uids(required=False)
        if any_flags and uids is None:
            raise _invalid("any_flags needs the uids to remove")
        return {"uids": await self.mail.expunge(a.text("user"), a.text("name"), uids, flagged_only=not any_flags)}

    async def _copy(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "uids", "target", "quota"})
        uidvalidity, pairs = await self.mail.copy(a.text("user"), a.text("name"), a.uids(), a.text("target"),
                                                  quota=a.integer("quota", default=0))
        return {"uidvalidity": uidvalidity, "pairs": [list(p) for p in pairs]}

    async def _move(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "name", "uids", "target"})
        uidvalidity, pairs = await self.mail.copy(a.text("user"), a.text("name"), a.uids(), a.text("target"),
                                                  move=True)
        return {"uidvalidity": uidvalidity, "pairs": [list(p) for p in pairs]}

    async def _search(self, ctx: CallContext, args: dict) -> Streamed:
        a = _Args(args, {"user", "name", "criteria"})
        uids = await self.mail.search(a.text("user"), a.text("name"), args.get("criteria"))
        return Streamed({"count": len(uids)}, _lines(uids))

    async def _usage(self, ctx: CallContext, args: dict) -> dict:
        user = _Args(args, {"user"}).text("user")
        return {"bytes": await self.mail.usage(user)}

    def _holder(self, user: str) -> str | None:
        held = self._locks.get(user)
        if held is None:
            return None
        owner, connection, expiry = held
        alive = self._rpc is None or connection in self._rpc.connections
        if time.monotonic() >= expiry or not alive:
            del self._locks[user]
            return None
        return owner

    async def _lock(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "owner", "lease"})
        user, owner, lease = a.text("user"), a.text("owner"), a.number("lease")
        if lease is None or not 0 < lease <= 3600:
            raise _invalid("argument 'lease' must be seconds, at most 3600")
        holder = self._holder(user)
        if holder is not None and holder != owner:
            return {"acquired": False}
        if len(self._locks) >= MAX_LOCKS and holder is None:
            for name in list(self._locks):
                self._holder(name)  # drop the dead ones
            if len(self._locks) >= MAX_LOCKS:
                raise MailError(ErrorKind.LIMIT, safe="too many maildrops locked")
        self._locks[user] = (owner, ctx.connection, time.monotonic() + lease)
        return {"acquired": True}

    async def _unlock(self, ctx: CallContext, args: dict) -> dict:
        a = _Args(args, {"user", "owner"})
        user, owner = a.text("user"), a.text("owner")
        if self._holder(user) == owner:
            del self._locks[user]
            return {"released": True}
        return {"released": False}

    async def _health(self, ctx: CallContext, args: dict) -> dict:
        _Args(args, ())
        return self.mail.health()
