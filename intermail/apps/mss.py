"""The message store server kind (``mssd``): LMTP delivery and the store RPC over one Mailstore.

Owns: turning the Config and one ``[[instance]]`` of kind ``mss`` into a
running store -- its mirrors (``store_dirs``, default
``<data_dir>/stores/<identity>/mirror-N``), the LMTP listener (``ports.lmtp``),
the store RPC (``ports.rpc``), metrics and health (``ports.metrics``) -- and
the LMTP session: each RCPT checked against the directory, each accepted
recipient answered after the message (RFC 2033).

Delivery key (I-4): the MTA passes its queue id as the MAIL parameter
``XDELIVERYKEY=<id>`` (announced in the LHLO reply); each recipient's key is
``<id>:<canonical recipient>``, so a retried delivery of the same queue entry
to the same recipient stores nothing new and is answered 250 again.  A
delivery without the parameter is stored every time it is made.

RCPT answers: unknown address 550 5.1.1; an alias, or an account on another
store, 550 5.1.1 / 451 4.3.0 (the MTA resolves aliases and routes by the
directory); directory unreachable 451 4.4.3; a declared SIZE over the
account's quota 552 5.2.2 (452 4.2.2 with ``limits.quota_temporary``).
After the message, per recipient: 250 2.1.5, over quota 552 5.2.2 / 452
4.2.2, a store failure 451 4.3.0.

Roles: ``active`` (or no role) owns the identity from the start, until a
take-over; from then on the instance that took over does, as recorded in
``<data>/run/owners.json`` (:mod:`intermail.monitor.owners`), and the
former owner restarts as the spare.  A
``spare`` for the same identity (its own address; the same ``store_dirs``,
on shared storage) starts idle: it serves health and a control RPC on its
own address (``ports.rpc``) and waits for ``mss.takeover``.  Take-over opens
the store -- the engine bumps the epoch, fencing the old owner (I-6), and
rolls the journal forward (I-3) -- then binds the identity's LMTP and RPC
listeners (the address and ports of the identity's active entry), retrying
while the old owner's sockets are still bound, and from then on serves as
the active store.

Invariants:

- 250 after the message only once the message is durable (I-1): the
  Mailstore returns after the commit.
- A fenced store (another process took the identity over, I-6) stops this
  process at once: it must not answer anything more.
- A store whose directories are missing refuses to start unless ``--init``:
  an empty store must never stand in for a lost one.

Scheduled backups (``[backup]``): the active owner of the identity runs
:class:`~intermail.apps.backups.BackupSchedule` (fulls and incrementals into
``[backup] dir``/<identity>).

Logs: ``mss.lmtp_delivered`` (per message), ``mss.fenced``, ``backup.*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from intermail.apps.backups import schedule_for
from intermail.apps.directory import directory_client
from intermail.config import Config, ConfigError
from intermail.directory.address import parse
from intermail.directory.client import DirectoryClient
from intermail.directory.db import Account, AliasExpansion
from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events
from intermail.mailstore.service import MailstoreService
from intermail.mailstore.store import Delivered, Mailstore, Recipient
from intermail.monitor import netns
from intermail.monitor import owners as ownership
from intermail.net.metrics import MetricsServer
from intermail.net.pump import PeerClosedError, Pump, PumpTimeout
from intermail.net.runner import Runner
from intermail.proto.smtp.lmtp_server import (
    AutoReply,
    ConnectionClosed,
    Greeting,
    LmtpServer,
    MailFrom,
    MessageData,
    MessageEnd,
    RcptTo,
    RecipientReplies,
)
from intermail.proto.smtp.replies import Reply
from intermail.rpc.server import RpcServer
from intermail.storage import StoreOptions

__all__ = ["MssApp", "store_options", "DELIVERY_KEY_PARAM"]

log = logging.getLogger("intermail.apps.mss")

register_events({
    "mss.lmtp_delivered": "an LMTP message was answered (recipients, delivered, size)",
    "mss.fenced": "another process took this store over; this one stops",
    "mss.takeover": "a spare takes the identity over: opens the store (fencing the old owner) and binds its ports",
})

DELIVERY_KEY_PARAM = "XDELIVERYKEY"
EXIT_FENCED = 3
_KEY_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]{1,128}")  # esmtp-value (RFC 5321 §4.1.2), bounded

SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
NOT_A_MAILBOX = Reply(550, "5.1.1", "Not a mailbox here (an alias: deliver to its members)")
WRONG_STORE = Reply(451, "4.3.0", "Mailbox is on another store; look it up again")
DIRECTORY_DOWN = Reply(451, "4.4.3", "Directory unavailable, try again later")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_KEY = Reply(501, "5.5.4", "Bad XDELIVERYKEY value")
STORE_FAILED = Reply(451, "4.3.0", "Temporary store failure, try again later")


def store_options(config: Config, name: str) -> StoreOptions:
    """The mirrors and flush settings of instance ``name``'s store."""
    inst = config.instance(name)
    identity = inst.identity or name
    dirs = inst.store_dirs or tuple(str(Path(config.cluster.data_dir or ".") / "stores" / identity / f"mirror-{i + 1}")
                                    for i in range(config.storage.mirrors))
    base = Path(config.cluster.data_dir or ".")
    dirs = tuple(str(base / d) if not os.path.isabs(d) else d for d in dirs)
    s = config.storage
    return StoreOptions(mirrors=dirs, segment_bytes=s.segment_bytes, max_batch_bytes=s.group_commit_max_bytes,
                        max_batch_frames=s.group_commit_max_records,
                        auto_checkpoint_bytes=s.checkpoint_interval_bytes, fsync=s.fsync)


async def _bind_retrying(bind: Any, timeout: float) -> None:
    """Bind, retrying while the address is still held (a dying owner's sockets) for up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await bind()
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)


class MssApp:
    """The runner's app for one mss instance (the active owner of its identity)."""

    def __init__(self, config: Config, name: str, *, init: bool = False, store_dirs: tuple[str, ...] = ()):
        self.config = config
        self.me = config.instance(name)
        if self.me.kind != "mss":
            raise ConfigError(f"instance {name!r} is a {self.me.kind}, not an mss")
        self.identity = self.me.identity or name
        self.init = init
        owners = [i for i in config.instances_of("mss") if (i.identity or i.name) == self.identity
                  and i.role in ("active", "")]
        if len(owners) != 1:
            raise ConfigError(f"store identity {self.identity}: needs exactly one active instance, found {len(owners)}")
        self.owner = owners[0]  # whose address and ports the identity has
        # After a take-over the record in <data>/run says who owns the identity:
        # the repaired machine comes back as the spare (no fail-back).
        self.role = "active" if ownership.owner_of(config, self.identity) == name else "spare"
        # Where this instance's own listeners (metrics, a spare's control RPC) bind: its host's
        # address in the netns deployment (the identity's floats between hosts), else its own.
        self.host = os.environ.get(netns.HOST_ADDRESS_ENV) or self.me.address
        self.took_over_at: float | None = None
        self._takeover_lock = asyncio.Lock()
        self.options = store_options(config, name)
        if store_dirs:  # `mssd --store-dir NEW`: serve a restored store under this identity
            self.options = dataclasses.replace(self.options, mirrors=tuple(store_dirs))
        self.mail: Mailstore | None = None
        self.directory: DirectoryClient | None = None
        self.runner: Runner | None = None
        self._tasks: set[asyncio.Task] = set()
        self.registry = CollectorRegistry()
        self._deliveries = Counter("intermail_mss_deliveries", "LMTP recipients answered, by result",
                                   ["result"], registry=self.registry)
        self._delivery_time = Histogram("intermail_mss_delivery_seconds", "end of DATA to the replies",
                                        registry=self.registry,
                                        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self._sessions = Gauge("intermail_mss_lmtp_sessions", "LMTP sessions open", registry=self.registry)

    # -- life cycle ----------------------------------------------------------------

    async def start(self, runner: Runner) -> None:
        self.runner = runner
        if "metrics" in self.me.ports:
            metrics = MetricsServer(self.registry, self.health, instance=self.me.name)
            await metrics.listen(runner, self.host, self.me.ports["metrics"])
        if self.role == "spare":
            control = RpcServer({"mss.takeover": self._takeover_call, "mss.status": self._status_call},
                                instance=self.me.name)
            # The identity's own instance back as a spare shares the identity's address: its
            # control port is then any free one (published in the ready file), not the store RPC's.
            port = self.me.ports.get("rpc", 0)
            if self.host == self.owner.address:
                port = 0  # the identity's address is ours too: any free port (in the ready file)
            await control.listen(runner, "control", self.host, port)
            return
        await self._activate(runner)

    async def _takeover_call(self, ctx: Any, args: dict) -> dict:
        timeout = args.get("bind_timeout", 30.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 600:
            raise MailError(ErrorKind.INVALID, safe="bind_timeout must be seconds")
        began = time.monotonic()
        async with self._takeover_lock:
            if self.mail is None:
                assert self.runner is not None
                log_event(log, "mss.takeover", identity=self.identity)
                previous = ownership.owner_of(self.config, self.identity)
                try:
                    await self._activate(self.runner, bind_timeout=float(timeout))
                except Exception as exc:
                    # Half taken over (the store may be open, a port not bound):
                    # exit, and let the supervisor start a clean spare.
                    self.runner.request_stop(exit_code=1, reason="take-over failed")
                    raise MailError(ErrorKind.UNAVAILABLE, safe="take-over failed",
                                    detail=f"{type(exc).__name__}: {exc}") from None
                self.took_over_at = time.monotonic()
                ownership.record_takeover(self.config, self.identity, self.me.name, previous,
                                          self.took_over_at - began)
        return {"identity": self.identity, "seconds": round(time.monotonic() - began, 3),
                **{k: v for k, v in (await self.health()).items() if k in ("epoch", "applied_seq")}}

    async def _backup_call(self, ctx: Any, args: dict) -> dict:
        """``store.backup {kind, to, base?: {id, seq}, rate?}``: an online backup into directory ``to`` (I-7)."""
        unknown = set(args) - {"kind", "to", "base", "rate"}
        kind, to, base = args.get("kind"), args.get("to"), args.get("base")
        rate = args.get("rate", int(self.config.backup.rate_mb * 1e6))  # default: the configured bound
        if unknown or kind not in ("full", "incremental") or not isinstance(to, str) or not os.path.isabs(to) \
                or not (base is None or (isinstance(base, dict) and isinstance(base.get("seq"), int))) \
                or not isinstance(rate, int) or rate < 0:
            raise MailError(ErrorKind.INVALID, safe="store.backup wants {kind: full|incremental, to: /abs/dir,"
                                                    " base?: {id, seq}, rate?: bytes/s}")
        assert self.mail is not None
        return await self.mail.store.backup(to, kind, base=base, identity=self.identity, rate_bytes=rate)

    async def _status_call(self, ctx: Any, args: dict) -> dict:
        return await self.health()

    async def _activate(self, runner: Runner, bind_timeout: float = 0.0) -> None:
        missing = [d for d in self.options.mirrors if not os.path.isdir(d)]
        if missing and not self.init:
            raise ConfigError(f"store {self.identity}: missing directories {missing};"
                              " start once with --init to create an empty store")
        for d in missing:
            os.makedirs(d, exist_ok=True)
        self.mail = await Mailstore.open(self.options)
        self.directory = directory_client(self.config, instance=self.me.name)
        service = MailstoreService(self.mail, max_message=self.config.limits.message_size)
        handlers = service.handlers()
        handlers["store.backup"] = self._backup_call
        rpc = RpcServer(handlers, instance=self.me.name)
        service.attach(rpc)
        address = self.owner.address
        iface = os.environ.get(netns.TAKEOVER_IFACE_ENV)
        if iface and self.role == "spare":
            # netns: raise the identity's address on this host and announce it (gratuitous ARP)
            await asyncio.to_thread(netns.raise_address, address, iface)
        await _bind_retrying(lambda: rpc.listen(runner, "rpc", address, self.owner.ports.get("rpc", 0)),
                             bind_timeout)
        await _bind_retrying(lambda: runner.listen("lmtp", address, self.owner.ports.get("lmtp", 0),
                                                   self.lmtp_session), bind_timeout)
        self._spawn(self._prune_keys())
        schedule = schedule_for(self.config, self.identity, self._scheduled_backup)
        if schedule is not None:
            self._spawn(schedule.run())

    async def _scheduled_backup(self, kind: str, dest: str) -> dict:
        assert self.mail is not None
        rate = int(self.config.backup.rate_mb * 1e6)
        return await self.mail.store.backup(dest, kind, identity=self.identity, rate_bytes=rate)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.directory is not None:
            await self.directory.close()
        if self.mail is not None:
            await self.mail.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prune_keys(self) -> None:
        while True:
            await asyncio.sleep(6 * 3600)
            with contextlib.suppress(MailError):
                assert self.mail is not None
                await self.mail.prune_keys()

    async def health(self) -> dict[str, Any]:
        base = {"kind": "mss", "identity": self.identity, "instance": self.me.name}
        if self.mail is None:
            return {"status": "ok" if self.role == "spare" else "starting", "role": self.role, **base}
        store = self.mail.health()
        role = "active" if self.role == "active" or self.took_over_at is not None else "spare"
        return {"status": "ok" if store["ok"] else "failed", "role": role, "took_over": self.took_over_at is not None,
                **base, **store}

    def _store_failed(self, exc: MailError) -> None:
        """A failed store cannot take mail any more: fenced, stop now; otherwise exit and recover (I-3)."""
        assert self.runner is not None
        if exc.kind is ErrorKind.FENCED:
            log_event(log, "mss.fenced", level=logging.ERROR, identity=self.identity)
            self.runner.request_stop(exit_code=EXIT_FENCED, reason="fenced", hurry=True)
        elif self.mail is not None and not self.mail.store.health()["ok"]:
            self.runner.request_stop(exit_code=1, reason="store failed")

    # -- LMTP ----------------------------------------------------------------------

    async def lmtp_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.config.limits
        machine = LmtpServer(self.identity if "." in self.identity else f"{self.identity}.{self.config.cluster.zone}",
                             max_line=max(limits.line_length, 512), max_message_size=limits.message_size,
                             max_recipients=limits.recipients, mail_params=(DELIVERY_KEY_PARAM,),
                             extra_capabilities=(DELIVERY_KEY_PARAM,))
        pump = Pump(reader, writer, machine, timeout=limits.command_timeout)
        self._sessions.inc()
        try:
            await pump.send(Greeting())
            await self._lmtp_loop(pump)
        except (PeerClosedError, PumpTimeout, ConnectionError):
            pass
        finally:
            self._sessions.dec()
            with contextlib.suppress(Exception):
                await pump.close()

    async def _lmtp_loop(self, pump: Pump) -> None:
        key_id: str | None = None
        recipients: list[tuple[str, Account]] = []
        body = bytearray()
        while True:
            event = await pump.next_event()
            if isinstance(event, AutoReply):
                await pump.send(event)
            elif isinstance(event, MailFrom):
                key_id, recipients, body = None, [], bytearray()
                value = event.params.get(DELIVERY_KEY_PARAM)
                if value is not None and not _KEY_VALUE.fullmatch(value):
                    await pump.send(BAD_KEY)
                    continue
                key_id = value
                await pump.send(SENDER_OK)
            elif isinstance(event, RcptTo):
                reply, account = await self._check_recipient(event)
                if account is not None:
                    recipients.append(account)
                await pump.send(reply)
            elif isinstance(event, MessageData):
                body += event.data
            elif isinstance(event, MessageEnd):
                if event.refused is None:
                    replies = await self._deliver(recipients, bytes(body), key_id)
                    await pump.send(RecipientReplies(tuple(replies)))
                recipients, body = [], bytearray()
            elif isinstance(event, ConnectionClosed):
                return

    async def _check_recipient(self, event: RcptTo) -> tuple[Reply, Account | None]:
        assert self.directory is not None and self.mail is not None
        try:
            address = str(parse(event.path))
        except MailError:
            return BAD_RECIPIENT, None
        try:
            found = await self.directory.resolve(address)
        except MailError as exc:
            if exc.kind is ErrorKind.INVALID:
                return BAD_RECIPIENT, None
            return DIRECTORY_DOWN, None
        if isinstance(found, AliasExpansion):
            return NOT_A_MAILBOX, None
        if not isinstance(found, Account):
            return NO_SUCH_USER, None
        if found.mss != self.identity:
            return WRONG_STORE, None
        size = event.params.get("SIZE")
        if found.quota_bytes and size and size.isdigit():
            if await self.mail.usage(found.address) + int(size) > found.quota_bytes:
                self._deliveries.labels("over_quota").inc()
                return self._over_quota(), None
        return RECIPIENT_OK, found

    def _over_quota(self) -> Reply:
        if self.config.limits.quota_temporary:
            return Reply(452, "4.2.2", "Mailbox full, try again later")
        return Reply(552, "5.2.2", "Mailbox full")

    async def _deliver(self, accounts: list[Account], data: bytes, key_id: str | None) -> list[Reply]:
        assert self.mail is not None
        began = time.perf_counter()
        recipients = [Recipient(a.address, key=f"{key_id}:{a.address}" if key_id else None, quota=a.quota_bytes)
                      for a in accounts]
        try:
            results = await self.mail.deliver(recipients, data)
        except MailError as exc:
            self._deliveries.labels("temp_failure").inc(len(accounts))
            self._store_failed(exc)
            return [STORE_FAILED] * len(accounts)
        replies = []
        for account, result in zip(accounts, results, strict=True):
            if isinstance(result, Delivered):
                self._deliveries.labels("duplicate" if result.duplicate else "delivered").inc()
                replies.append(Reply(250, "2.1.5", f"<{account.address}> delivered, uid {result.uid}"))
            elif result.kind is ErrorKind.NOQUOTA:
                self._deliveries.labels("over_quota").inc()
                replies.append(self._over_quota())
            elif result.kind is ErrorKind.NOTFOUND:
                self._deliveries.labels("rejected").inc()
                replies.append(NO_SUCH_USER)
            else:
                self._deliveries.labels("temp_failure").inc()
                replies.append(STORE_FAILED)
        self._delivery_time.observe(time.perf_counter() - began)
        log_event(log, "mss.lmtp_delivered", level=logging.DEBUG, recipients=len(accounts),
                  delivered=sum(r.code == 250 for r in replies), size=len(data))
        return replies
