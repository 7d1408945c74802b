"""The directory service: the directory RPC served over a :class:`DirectoryDB`.

Owns: what a ``dird`` process does with each request -- reads from its own
database (primary and replicas alike), authentication with throttling,
writes on the primary (with a push to the replicas that follow it), and on
a replica either forwarding a write to the primary or refusing it clearly;
plus the process's metrics and health::

    service = DirectoryService(db, role="primary", hashing=..., mss_candidates=["mss1", "mss2"])
    await service.start()
    await rpc_server.listen(runner, "rpc", host, port)   # rpc_server = RpcServer(service.handlers())

Invariants:

- Every database call runs on one worker thread, in arrival order; the
  event loop never waits on SQLite or an fsync.  Password hashing and
  verifying run in the loop's default executor.
- A write is acknowledged only after the primary's transaction committed
  (``synchronous=FULL``); its answer carries the change's ``seq``.  A
  replica that forwarded a write waits (up to ``write_wait``) until it has
  applied that ``seq`` itself, so the writer then reads its write from the
  replica it talks to.
- With the primary down, a replica answers every read and every login and
  refuses writes with UNAVAILABLE "the directory primary is unavailable".
  A replica that has never synchronised answers nothing but UNAVAILABLE:
  an empty replica saying "unknown user" would make MTAs bounce real mail.
- Authentication costs the same for an unknown user as for a wrong
  password (a verify against a dummy hash), refuses disabled accounts only
  after a correct password, and is throttled per account and per client
  address (:mod:`.throttle`); a throttled attempt is refused without
  verifying, so a login storm cannot burn the CPU.  Throttling state is
  per process: with N directory instances a guesser gets at most N times
  the limit.
- Nothing secret leaves: answers carry no password hashes (except the
  change log a replica pulls); logs carry no passwords.

Backups: ``directory.backup {to}`` on the primary copies the database with
SQLite's online backup API on the database thread (so it is the state
after one change exactly) and verifies it off that thread
(:mod:`.backup`).

Logs: ``dir.write`` (each acknowledged write), ``dir.backup``, ``dir.auth_failed``,
``dir.auth_throttled``, ``dir.forward_failed``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from intermail.directory import wire
from intermail.directory.address import parse
from intermail.directory.db import DirectoryDB
from intermail.directory.passwords import PasswordHashing
from intermail.directory.throttle import AuthThrottle
from intermail.directory.wire import Args
from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events
from intermail.rpc.client import OUTCOME_UNKNOWN_TEXT, RpcClient
from intermail.rpc.server import CallContext, Handler

__all__ = ["DirectoryService", "ROLES", "CHANGES_TOPIC"]

log = logging.getLogger("intermail.directory.service")

register_events({
    "dir.write": "the directory committed a write (method, seq)",
    "dir.auth_failed": "a login was refused: unknown account, wrong password or disabled account",
    "dir.auth_throttled": "a login was refused without a check: too many recent failures",
    "dir.forward_failed": "a replica could not forward a write to the primary",
    "dir.replica_synced": "a replica applied changes from the primary's log",
    "dir.replica_sync_failed": "a replica could not pull or apply the primary's change log",
    "dir.backup": "the primary wrote a verified backup of the directory (seq, bytes, seconds)",
    "dir.replica_reseeded": "a replica re-copied the log of a primary restored from a backup",
    "dir.replica_adopted_restore": "a replica follows a restored primary whose log holds all of its own",
})

ROLES = frozenset({"primary", "replica"})
CHANGES_TOPIC = "dir.changes"
AUTH_FAILED = "authentication failed"
PRIMARY_DOWN = "the directory primary is unavailable; writes are refused until it is back"
NOT_SYNCED = wire.NOT_SYNCED
OUTCOME_UNKNOWN = "lost the directory primary during the write; it may or may not have been done"
HISTORY_DIFFERS = "the replica's change log differs from the primary's"
BUSY = "too many logins in progress; try again"

T = TypeVar("T")


class DirectoryService:
    """One directory instance (primary or replica); see the module docstring."""

    def __init__(
        self,
        db: DirectoryDB,
        *,
        role: str,
        instance: str = "",
        hashing: PasswordHashing,
        throttle: AuthThrottle | None = None,
        mss_candidates: Sequence[str] = (),
        primary: RpcClient | None = None,
        max_field_bytes: int = 1024,
        write_wait: float = 2.0,
        registry: CollectorRegistry | None = None,
        max_verifying: int = 64,
        max_user_attempts: int = 4,
        max_ip_attempts: int = 16,
    ):
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}")
        if (role == "replica") != (primary is not None):
            raise ValueError("a replica needs the primary's client; a primary has none")
        if db.replica != (role == "replica"):
            raise ValueError("the database's replica flag must match the role")
        self.db = db
        self.role = role
        self.instance = instance
        self.hashing = hashing
        self.throttle = throttle or AuthThrottle()
        self.mss_candidates = tuple(mss_candidates)
        self.primary = primary
        self.max_field_bytes = max_field_bytes
        self.write_wait = write_wait
        self.follower: Any = None  # a ReplicaFollower, set by the replica's wiring
        self.push: Callable[[str, dict], int] | None = None  # the RPC server's push, once listening
        self.started = time.monotonic()
        self.origin: str | None = None  # kept here: the loop must not read SQLite (the db thread holds its lock)
        self.forward_wait = 1.0  # seconds a replica waits to be in touch with its primary before refusing a write
        self.max_verifying = max_verifying
        self.max_user_attempts = max_user_attempts
        self.max_ip_attempts = max_ip_attempts
        self._verifying = 0
        self._attempts: dict[str, int] = {}  # logins in progress per "u:<user>" / "ip:<address>"
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dir-db-{instance}")
        self._dummy_hash = ""
        self.registry = registry or CollectorRegistry()
        self._requests = Counter("intermail_directory_requests", "directory requests by method and outcome",
                                 ["method", "outcome"], registry=self.registry)
        self._latency = Histogram("intermail_directory_request_seconds", "time to answer a directory request",
                                  ["method"], registry=self.registry,
                                  buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self._auth = Counter("intermail_directory_auth", "logins by result (ok, failed, disabled, throttled)",
                             ["result"], registry=self.registry)
        self._seq = Gauge("intermail_directory_change_seq", "last change-log sequence number applied here",
                          registry=self.registry)
        self._seq.set_function(lambda: self._last_seq)
        self._last_seq = 0

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._dummy_hash = await self.hashing.ahash(secrets.token_urlsafe(16))
        self._last_seq, self.origin = await self.in_db(lambda: (self.db.last_seq(), self.db.origin))

    async def stop(self) -> None:
        await asyncio.to_thread(self._db_thread.shutdown, True)

    async def in_db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: fn(*args, **kwargs))

    def note_seq(self, seq: int) -> None:
        self._last_seq = max(self._last_seq, seq)

    # -- the RPC table -------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        table: dict[str, Callable[[dict], Awaitable[dict]]] = {
            "resolve": self._resolve,
            "authenticate": self._authenticate_args,
            "domain.list": self._domain_list,
            "user.show": self._user_show,
            "user.list": self._user_list,
            "alias.list": self._alias_list,
            "changes": self._changes,
            "status": self._status,
            "directory.backup": self._backup,
        }
        for method in wire.WRITES:
            table[method] = self._write_handler(method)
        assert set(table) == wire.READS | wire.WRITES | wire.ADMIN
        return {method: self._instrument(method, fn) for method, fn in table.items()}

    def _instrument(self, method: str, fn: Callable[..., Awaitable[dict]]) -> Handler:
        requests, latency = self._requests, self._latency.labels(method)

        async def handler(ctx: CallContext, args: dict) -> dict:
            began = time.perf_counter()
            try:
                if method == "authenticate":
                    result = await fn(args, ctx.peer)
                else:
                    result = await fn(args)
            except MailError as exc:
                requests.labels(method, exc.kind.value).inc()
                raise
            except Exception:
                requests.labels(method, "internal").inc()
                raise
            finally:
                latency.observe(time.perf_counter() - began)
            requests.labels(method, "ok").inc()
            return result

        return handler

    def _args(self, args: dict, *allowed: str) -> Args:
        if not isinstance(args, dict):
            raise wire.invalid("arguments must be a map")
        return Args(args, set(allowed), self.max_field_bytes)

    def _require_synced(self) -> None:
        if self.role == "replica" and self.origin is None:
            raise MailError(ErrorKind.UNAVAILABLE, safe=NOT_SYNCED)

    # -- reads ---------------------------------------------------------------------

    async def _resolve(self, args: dict) -> dict:
        address = self._args(args, "address").text("address")
        self._require_synced()
        return wire.encode_resolution(await self.in_db(self.db.resolve, address))

    async def _domain_list(self, args: dict) -> dict:
        self._args(args)
        self._require_synced()
        return {"domains": await self.in_db(self.db.list_domains)}

    async def _user_show(self, args: dict) -> dict:
        address = self._args(args, "address").text("address")
        self._require_synced()
        return {"account": wire.encode_account(await self.in_db(self.db.show_user, address))}

    async def _user_list(self, args: dict) -> dict:
        domain = self._args(args, "domain").text("domain", required=False)
        self._require_synced()
        return {"accounts": [wire.encode_account(a) for a in await self.in_db(self.db.list_users, domain)]}

    async def _alias_list(self, args: dict) -> dict:
        domain = self._args(args, "domain").text("domain", required=False)
        self._require_synced()
        aliases = await self.in_db(self.db.list_aliases, domain)
        return {"aliases": [{"address": a.address, "targets": list(a.targets)} for a in aliases]}

    async def _changes(self, args: dict) -> dict:
        a = self._args(args, "since", "limit", "chain", "origin")
        since = a.integer("since")
        limit = a.integer("limit", default=wire.MAX_CHANGES, minimum=1, maximum=wire.MAX_CHANGES)
        chain = a.text("chain", required=False)
        follower_origin = a.text("origin", required=False)
        self._require_synced()

        def read() -> dict:
            last = self.db.last_seq()
            restored = self.db.restored_from
            # The follower proves its history: the hash of its log up to `since`
            # must be ours, else it holds changes we never made (or we lost some).
            if since > last or (chain is not None and self.db.chain_at(since) != chain):
                if restored is not None and follower_origin == restored["origin"]:
                    # It followed the log this one was restored from, past the
                    # restore point: it must re-copy (its extra changes were dropped
                    # by the restore), not mix the two histories.
                    return {"origin": self.db.origin, "last_seq": last, "changes": [],
                            "restored_from": restored, "reseed": True}
                raise MailError(ErrorKind.CORRUPT, safe=HISTORY_DIFFERS,
                                detail=f"follower at {since}, this log ends at {last}")
            answer = {"origin": self.db.origin, "last_seq": last,
                      "changes": wire.encode_changes(self.db.changes_since(since, limit))}
            if restored is not None:
                answer["restored_from"] = restored
            return answer

        return await self.in_db(read)

    async def _backup(self, args: dict) -> dict:
        """``directory.backup {to: /abs/dir}`` (primary): a consistent copy and its manifest (I-7)."""
        from intermail.directory.backup import copy_database, finish_backup
        to = self._args(args, "to").text("to")
        if not to.startswith("/"):
            raise wire.invalid("to must be an absolute directory path")
        if self.role != "primary":
            raise MailError(ErrorKind.PERM, safe="directory backups are taken on the primary")
        began = time.monotonic()
        point = await self.in_db(copy_database, self.db, to)  # the db thread: no write mid-copy
        manifest = await asyncio.to_thread(finish_backup, to, point, self.instance)  # hashing off it
        manifest["seconds"] = round(time.monotonic() - began, 3)
        log_event(log, "dir.backup", seq=manifest["seq"], bytes=manifest["bytes"], seconds=manifest["seconds"])
        return manifest

    async def _status(self, args: dict) -> dict:
        self._args(args)
        return await self.status()

    async def status(self) -> dict[str, Any]:
        """Role, position in the change log and, on a replica, how it follows the primary."""
        last_seq, origin = await self.in_db(lambda: (self.db.last_seq(), self.db.origin))
        self.note_seq(last_seq)
        self.origin = origin
        status: dict[str, Any] = {"instance": self.instance, "role": self.role, "last_seq": last_seq,
                                  "origin": origin, "uptime": round(time.monotonic() - self.started, 3),
                                  "throttle": self.throttle.stats()}
        if self.follower is not None:
            status.update(self.follower.status())
        return status

    # -- authentication ------------------------------------------------------------

    async def _authenticate_args(self, args: dict, peer: str) -> dict:
        a = self._args(args, "user", "password", "client")
        user, password = a.text("user"), a.text("password")
        client = a.text("client", required=False) or _peer_host(peer)
        self._require_synced()
        return {"account": wire.encode_account(await self.authenticate(user, password, client))}

    async def authenticate(self, user: str, password: str, client: str = ""):
        """The active account ``user`` names if ``password`` is right; PERM/LIMIT otherwise."""
        try:
            key = str(parse(user))
        except MailError:
            key = None
        user_key = key or user.lower()
        retry_after = self.throttle.check(user_key, client)
        if retry_after > 0:
            self._auth.labels("throttled").inc()
            log_event(log, "dir.auth_throttled", level=logging.WARNING, user=user[:256], client=client,
                      retry_after=round(retry_after, 1))
            raise MailError(ErrorKind.LIMIT, safe=f"too many failed logins; try again in {int(retry_after) + 1} s")
        # Attempts in flight have not failed yet: cap them per account and
        # address, or a burst of parallel guesses would all pass check().
        slots = [f"u:{user_key}"] + ([f"ip:{client}"] if client else [])
        caps = [self.max_user_attempts, self.max_ip_attempts]
        if any(self._attempts.get(slot, 0) >= cap for slot, cap in zip(slots, caps)) \
                or self._verifying >= self.max_verifying:
            self._auth.labels("throttled").inc()
            raise MailError(ErrorKind.LIMIT, safe=BUSY)
        for slot in slots:
            self._attempts[slot] = self._attempts.get(slot, 0) + 1
        self._verifying += 1
        try:
            account = None
            if key is not None:
                try:
                    account = await self.in_db(self.db.show_user, key)
                except MailError as exc:
                    if exc.kind is not ErrorKind.NOTFOUND:
                        raise
            stored = account.password_hash if account is not None else self._dummy_hash
            ok = await self.hashing.averify(stored, password)
        finally:
            self._verifying -= 1
            for slot in slots:
                left = self._attempts[slot] - 1
                if left:
                    self._attempts[slot] = left
                else:
                    del self._attempts[slot]
        if account is None or not ok:
            self.throttle.failed(user_key, client)
            self._auth.labels("failed").inc()
            log_event(log, "dir.auth_failed", user=user[:256], client=client,
                      reason="unknown account" if account is None else "wrong password")
            raise MailError(ErrorKind.PERM, safe=AUTH_FAILED)
        if not account.active:
            self._auth.labels("disabled").inc()
            log_event(log, "dir.auth_failed", user=key, client=client, reason="account disabled")
            raise MailError(ErrorKind.PERM, safe="account disabled")
        self.throttle.succeeded(key, client)
        self._auth.labels("ok").inc()
        return account

    # -- writes --------------------------------------------------------------------

    def _write_handler(self, method: str) -> Callable[[dict], Awaitable[dict]]:
        async def write(args: dict) -> dict:
            if self.role == "replica":
                return await self._forward(method, args)
            return await self._write(method, args)
        return write

    async def _write(self, method: str, args: dict) -> dict:
        apply, result = await self._prepare_write(method, args)

        def commit() -> tuple[Any, int]:
            out = apply()
            return out, self.db.last_seq()  # the one db thread: no write in between

        out, seq = await self.in_db(commit)
        self.note_seq(seq)
        log_event(log, "dir.write", method=method, seq=seq)
        if self.push is not None:
            self.push(CHANGES_TOPIC, {"seq": seq})
        answer = {"seq": seq}
        if result is not None:
            answer[result] = out
        return answer

    async def _prepare_write(self, method: str, args: dict) -> tuple[Callable[[], Any], str | None]:
        """Check the arguments (hashing a password off the loop); returns the db call and its answer key."""
        db = self.db
        if method in ("domain.add", "domain.del"):
            name = self._args(args, "name").text("name")
            if method == "domain.add":
                return (lambda: db.add_domain(name)), "domain"
            return (lambda: db.del_domain(name)), None
        if method == "alias.add":
            a = self._args(args, "address", "targets")
            address, targets = a.text("address"), a.texts("targets", most=wire.MAX_TARGETS)

            def add_alias() -> dict:
                alias = db.add_alias(address, targets)
                return {"address": alias.address, "targets": list(alias.targets)}
            return add_alias, "alias"
        if method == "alias.del":
            a = self._args(args, "address", "target")
            address, target = a.text("address"), a.text("target", required=False)
            return (lambda: db.del_alias(address, target)), None
        if method == "user.add":
            a = self._args(args, "address", "password", "mss", "quota")
            address, password = a.text("address"), a.text("password")
            mss, quota = a.text("mss", required=False), a.integer("quota", default=0)
            parse(address)  # a malformed address fails before the costly hash
            password_hash = await self.hashing.ahash(password)
            candidates = self.mss_candidates

            def add_user() -> dict:
                account = db.add_user(address, password_hash, mss=mss, mss_candidates=candidates,
                                      quota_bytes=quota)
                return wire.encode_account(account)
            return add_user, "account"
        a = self._args(args, "address", {"user.passwd": "password", "user.status": "status",
                                         "user.quota": "quota"}.get(method, "address"))
        address = a.text("address")
        if method == "user.del":
            return (lambda: db.del_user(address)), None
        if method == "user.passwd":
            password_hash = await self.hashing.ahash(a.text("password"))
            return (lambda: db.set_password(address, password_hash)), None
        if method == "user.status":
            status = a.text("status")
            return (lambda: db.set_status(address, status)), None
        if method == "user.quota":
            quota = a.integer("quota")
            return (lambda: db.set_quota(address, quota)), None
        raise MailError(ErrorKind.INVALID, safe="unknown method")  # pragma: no cover - WRITES is closed

    async def _forward(self, method: str, args: dict) -> dict:
        """A replica's write: the primary does it, then we wait to have applied it."""
        assert self.primary is not None
        if not isinstance(args, dict):
            raise wire.invalid("arguments must be a map")
        if self.follower is not None and self.follower.conflict:
            raise MailError(ErrorKind.UNAVAILABLE, safe="this directory replica follows another primary;"
                            " writes are refused until it is re-seeded")
        if self.follower is not None and not await self.follower.wait_in_touch(self.forward_wait):
            # Not following the primary right now (or not yet since start):
            # a write could land in a history this replica will never see.
            raise MailError(ErrorKind.UNAVAILABLE, safe=PRIMARY_DOWN, detail="replica not following its primary")
        try:
            answer = await self.primary.call(method, args)
        except MailError as exc:
            if exc.kind not in (ErrorKind.UNAVAILABLE, ErrorKind.TEMP):
                raise  # the primary's own answer (EXISTS, NOTFOUND, INVALID...)
            log_event(log, "dir.forward_failed", level=logging.WARNING, method=method, error=exc.detail or exc.safe)
            if exc.safe == OUTCOME_UNKNOWN_TEXT or exc.kind is ErrorKind.TEMP:
                # sent, and no answer: it may have been committed
                raise MailError(ErrorKind.UNAVAILABLE, safe=OUTCOME_UNKNOWN, detail=exc.detail) from None
            raise MailError(ErrorKind.UNAVAILABLE, safe=PRIMARY_DOWN, detail=exc.detail) from None
        seq = answer.get("seq")
        if self.follower is not None and isinstance(seq, int):
            await self.follower.wait_applied(seq, self.write_wait)
        return answer


def _peer_host(peer: str) -> str:
    """The client address part of a ``host:port`` peer text ('' when unknown)."""
    if not peer:
        return ""
    host, _, _ = peer.rpartition(":")
    return host.strip("[]") or peer
