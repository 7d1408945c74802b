"""The MTA server kind (``mtad``): SMTP in, the mirrored queue, the queue manager, LMTP/SMTP out.

Owns: turning the Config and one ``[[instance]]`` of kind ``mta`` into a
running MTA -- the queue (``store_dirs``, default
``<data_dir>/queues/<name>/mirror-N``, ``storage.mirrors`` of them), the
SMTP (``ports.smtp``) and submission (``ports.submission``) listeners, the
queue manager with its router and transports, the control RPC
(``ports.rpc``: the ``intermail queue`` verbs) and metrics -- and
:class:`MtaRouter`, which decides where each recipient goes.

Routing: the directory says what an address is.  An account goes over LMTP
to its store (``mssN``: the identity's address and LMTP port from the
Config); an alias to its members (accounts by store, remote addresses by
domain); an address in a domain we do not host goes out over SMTP to the
domain's MX (only authenticated clients could queue one); an unknown
address in a hosted domain fails (550 5.1.1); a directory outage defers
(451 4.4.3).

Invariants: the queue is opened before any listener, and the listeners are
closed (runner drain) before the queue; ``250`` only after the queue's
commit (I-1); a queue whose directories are missing refuses to start
unless ``--init``.

Logs: what the front end, the queue and the manager log.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from intermail.apps.directory import directory_client
from intermail.config import Config, ConfigError
from intermail.delivery.smtp import SmtpTransport
from intermail.directory.client import DirectoryClient
from intermail.directory.db import Account, AliasExpansion
from intermail.errors import ErrorKind, LocalProtocolError, MailError
from intermail.net.metrics import MetricsServer
from intermail.net.runner import Runner
from intermail.queue.bounce import FailedRecipient, build_dsn
from intermail.queue.manager import QueueManager, Reply3, Route, Settings, TransientFailure
from intermail.queue.store import STATES, Entry, Envelope, QueueStore, RecipientSpec
from intermail.resolve import Resolver
from intermail.rpc.server import RpcServer
from intermail.storage import StoreOptions

__all__ = ["MtaApp", "MtaRouter", "LmtpTransport", "QueueControl", "bounce_maker", "queue_options",
           "resolver_from_config", "store_addresses"]


def queue_options(config: Config, name: str) -> StoreOptions:
    inst = config.instance(name)
    base = Path(config.cluster.data_dir or ".")
    dirs = inst.store_dirs or tuple(str(base / "queues" / name / f"mirror-{i + 1}")
                                    for i in range(config.storage.mirrors))
    dirs = tuple(d if os.path.isabs(d) else str(base / d) for d in dirs)
    s = config.storage
    return StoreOptions(mirrors=dirs, segment_bytes=s.segment_bytes, max_batch_bytes=s.group_commit_max_bytes,
                        max_batch_frames=s.group_commit_max_records,
                        auto_checkpoint_bytes=s.checkpoint_interval_bytes, fsync=s.fsync)


def resolver_from_config(config: Config) -> Resolver:
    """The cluster's DNS servers when the Config names some, else the system's."""
    servers = [(i.address, i.ports["dns"]) for i in config.instances_of("dns") if i.ports.get("dns")]
    return Resolver(servers or None)


def store_addresses(config: Config) -> dict[str, tuple[str, int]]:
    """Each mss identity's LMTP address: the address and port of its active instance."""
    out: dict[str, tuple[str, int]] = {}
    for inst in config.instances_of("mss"):
        if inst.role in ("active", "") and inst.ports.get("lmtp"):
            out[inst.identity or inst.name] = (inst.address, inst.ports["lmtp"])
    return out


class MtaRouter:
    """Where each recipient goes (see the module docstring)."""

    def __init__(self, directory: DirectoryClient):
        self.directory = directory

    async def route(self, address: str) -> list[Route] | Reply3:
        try:
            found = await self.directory.resolve(address)
        except MailError as exc:
            if exc.kind is ErrorKind.INVALID:
                return Reply3(550, "5.1.3", "bad recipient address syntax")
            return Reply3(451, "4.4.3", "directory unavailable")
        if isinstance(found, Account):
            return [Route("lmtp", found.mss, (found.address,))]
        if isinstance(found, AliasExpansion):
            by_store: dict[str, list[str]] = {}
            for account in found.accounts:
                by_store.setdefault(account.mss, []).append(account.address)
            routes = [Route("lmtp", mss, tuple(addresses)) for mss, addresses in by_store.items()]
            by_domain: dict[str, list[str]] = {}
            for remote in found.remote:
                by_domain.setdefault(remote.rpartition("@")[2], []).append(remote)
            routes += [Route("smtp", domain, tuple(addresses)) for domain, addresses in by_domain.items()]
            return routes if routes else Reply3(550, "5.1.1", "alias has no deliverable member")
        if found.hosted:
            return Reply3(550, "5.1.1", "no such user here")
        return [Route("smtp", address.rpartition("@")[2].lower(), (address,))]


class LmtpTransport:
    """The ``lmtp`` transport: one LMTP transaction per store, the queue id as the delivery key.

    Connections are kept per store and reused (RSET between transactions):
    a kept connection found dead before anything was sent is replaced, and
    the transaction runs on the new one; a connection that failed during a
    transaction is dropped (the replies say what happened).
    """

    def __init__(self, stores: dict[str, tuple[str, int]], *, hostname: str, connect_timeout: float,
                 timeout: float, keep: int = 16):
        self.stores = stores
        self.hostname = hostname
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.keep = keep  # idle connections kept per store
        self._idle: dict[str, list[Any]] = {}

    async def _connect(self, address: tuple[str, int]) -> Any:
        from intermail.delivery.lmtp import DeliveryError, LmtpConnection

        try:
            return await LmtpConnection.open(address[0], address[1], hostname=self.hostname, lmtp=True,
                                             connect_timeout=self.connect_timeout, command_timeout=self.timeout,
                                             data_timeout=self.timeout)
        except DeliveryError as exc:
            raise TransientFailure(str(exc)) from None

    async def deliver(self, destination: str, sender: str, recipients: Sequence[str], data: bytes,
                      key: str, params: dict | None = None) -> dict[str, Reply3]:
        from intermail.delivery.lmtp import ConnectionDead

        mail_params = [f"XDELIVERYKEY={key}", *_mail_params(params)]
        address = self.stores.get(destination)
        if address is None:
            raise TransientFailure(f"no address known for store {destination}")
        idle = self._idle.setdefault(destination, [])
        while True:
            conn = idle.pop() if idle else await self._connect(address)
            try:
                result = await conn.deliver(sender, list(recipients), data, mail_params=mail_params)
            except ConnectionDead:
                await conn.close()
                continue  # nothing was sent on it: try a fresh one
            except LocalProtocolError as exc:
                # Something in this envelope can never be sent (checked before any byte
                # went out): fail it, so the sender hears, rather than retry forever.
                if conn.usable and len(idle) < self.keep:
                    idle.append(conn)
                else:
                    await conn.close()
                return {r: Reply3(554, "5.6.7", f"cannot be relayed: {exc}") for r in recipients}
            except BaseException:
                await conn.close()
                raise
            if conn.usable and len(idle) < self.keep:
                idle.append(conn)
            else:
                await conn.close()
            return _replies(result, recipients)

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await conn.close()
        self._idle.clear()


def _mail_params(params: dict | None) -> list[str]:
    """The MAIL parameters a queued message carries on to the next hop (RFC 6531, RFC 6152)."""
    params = params or {}
    out = []
    if params.get("SMTPUTF8"):
        out.append("SMTPUTF8")
    if params.get("BODY") == "8BITMIME":
        out.append("BODY=8BITMIME")
    return out


def _replies(result: Any, recipients: Sequence[str]) -> dict[str, Reply3]:
    """A delivery result of :mod:`intermail.delivery.lmtp` as the manager's per-recipient replies.

    Every recipient has one: the server's, or a synthesized 451 when the
    session failed before it answered -- so a RCPT-time 5xx still bounces
    even when the connection died later.
    """
    out = {}
    for address, reply in result.replies.items():
        out[address] = Reply3(reply.code, reply.enhanced or "", " ".join(reply.lines))
    return out


def _xtext_decode(value: str | None) -> str | None:
    """RFC 3461 §4: ``+XX`` is the octet XX."""
    if value is None:
        return None
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def bounce_maker(hostname: str) -> Any:
    """The queue manager's bounce hook: an RFC 3464 DSN from the null sender to the original sender."""

    async def make(entry: Entry, failed: list[tuple[str, Reply3]], data: bytes) -> tuple[Envelope, bytes] | None:
        by_address = {r.address: r for r in entry.recipients}
        recipients = []
        for address, reply in failed:
            row = by_address.get(address)
            notify = frozenset(n.strip().upper() for n in row.notify.split(",")) if row and row.notify else None
            status = reply.status if reply.status and reply.status[0] in "45" else f"{reply.code // 100}.0.0"
            if status.startswith("4"):  # failed for good (expired): a permanent status in the report
                status = "5" + status[1:]
            recipients.append(FailedRecipient(address=address, status=status, diagnostic=f"smtp; {reply}",
                                              original_recipient=row.orcpt if row else None, notify=notify,
                                              last_attempt=time.time()))
        try:
            dsn = build_dsn(reporting_mta=hostname, sender=entry.sender, recipients=recipients, original=data,
                            queue_id=entry.id, arrival=entry.arrival, message_id_domain=hostname,
                            ret=entry.params.get("RET"), envid=_xtext_decode(entry.params.get("ENVID")),
                            smtputf8=bool(entry.params.get("SMTPUTF8")))
        except MailError:
            return None  # nothing sendable to say (malformed ORCPT...): the failure is still recorded
        if dsn is None:
            return None
        return Envelope("", [RecipientSpec(entry.sender)], {"bounce_for": entry.id}), dsn

    return make


class QueueControl:
    """The control RPC of an mtad (``intermail queue ...``)."""

    def __init__(self, queue: QueueStore, manager: QueueManager):
        self.queue = queue
        self.manager = manager

    def handlers(self) -> dict[str, Any]:
        return {"queue.list": self._list, "queue.show": self._show, "queue.flush": self._flush,
                "queue.hold": self._hold, "queue.release": self._release, "queue.delete": self._delete,
                "queue.stats": self._stats}

    @staticmethod
    def _qid(args: dict) -> str:
        qid = args.get("id") if isinstance(args, dict) else None
        if not isinstance(qid, str) or not 1 <= len(qid) <= 64:
            raise MailError(ErrorKind.INVALID, safe="argument 'id' must be a queue id")
        return qid

    @staticmethod
    def _summary(e: Entry) -> dict[str, Any]:
        return {"id": e.id, "sender": e.sender, "state": e.state, "size": e.size, "arrival": e.arrival,
                "next_attempt": e.next_attempt, "attempts": e.attempts, "last_error": e.last_error,
                "recipients": [{"address": r.address, "status": r.status, "reply": r.reply} for r in e.recipients]}

    async def _list(self, ctx: Any, args: dict) -> dict:
        state = args.get("state") if isinstance(args, dict) else None
        states = STATES if state is None else (state,)
        if any(s not in STATES for s in states):
            raise MailError(ErrorKind.INVALID, safe="unknown queue state")
        return {"entries": [self._summary(e) for e in await self.queue.entries(states=states, limit=10_000)]}

    async def _show(self, ctx: Any, args: dict) -> dict:
        entry = await self.queue.get(self._qid(args))
        if entry is None:
            raise MailError(ErrorKind.NOTFOUND, safe="no such queue entry")
        return {"entry": self._summary(entry) | {"params": entry.params}}

    async def _flush(self, ctx: Any, args: dict) -> dict:
        return {"flushed": await self.manager.flush()}

    async def _hold(self, ctx: Any, args: dict) -> dict:
        await self.queue.set_state(self._qid(args), "hold")
        return {}

    async def _release(self, ctx: Any, args: dict) -> dict:
        await self.queue.set_state(self._qid(args), "deferred", next_attempt=time.time())
        self.manager.kick()
        return {}

    async def _delete(self, ctx: Any, args: dict) -> dict:
        qid = self._qid(args)
        if self.manager.is_active(qid):
            raise MailError(ErrorKind.TEMP, safe="the message is being delivered right now; try again")
        await self.queue.delete(qid)
        return {}

    async def _stats(self, ctx: Any, args: dict) -> dict:
        s = self.manager.stats
        return {"counts": await self.queue.counts(), "attempts": s.attempts, "delivered": s.delivered,
                "deferred": s.deferred, "failed": s.failed, "in_flight": s.in_flight}


class MtaApp:
    """The runner's app for one mta instance."""

    def __init__(self, config: Config, name: str, *, init: bool = False):
        self.config = config
        self.me = config.instance(name)
        if self.me.kind != "mta":
            raise ConfigError(f"instance {name!r} is a {self.me.kind}, not an mta")
        self.init = init
        self.hostname = f"{name}.{config.cluster.zone}"
        self.options = queue_options(config, name)
        self.queue: QueueStore | None = None
        self.manager: QueueManager | None = None
        self.directory: DirectoryClient | None = None
        self.registry = CollectorRegistry()
        self._queued = Gauge("intermail_mta_queue", "queued messages by state", ["state"], registry=self.registry)
        self._fronts: list[Any] = []
        self._lmtp: LmtpTransport | None = None

    async def start(self, runner: Runner) -> None:
        from intermail.apps.mta_smtp import SmtpFrontEnd

        missing = [d for d in self.options.mirrors if not os.path.isdir(d)]
        if missing and not self.init:
            raise ConfigError(f"queue of {self.me.name}: missing directories {missing};"
                              " start once with --init to create an empty queue")
        for d in missing:
            os.makedirs(d, exist_ok=True)
        q = self.config.queue
        self.queue = await QueueStore.open(self.options)
        self.directory = directory_client(self.config, instance=self.me.name)
        resolver = resolver_from_config(self.config)
        self._lmtp = LmtpTransport(store_addresses(self.config), hostname=self.hostname,
                                   connect_timeout=q.connect_timeout, timeout=q.data_timeout)
        transports = {
            "lmtp": self._lmtp,
            "smtp": SmtpTransport(resolver, hostname=self.hostname, port=q.smtp_port,
                                  connect_timeout=q.connect_timeout, timeout=q.data_timeout),
        }
        settings = Settings(concurrency=q.concurrency, per_destination=q.per_destination, retry_base=q.retry_base,
                            retry_max=q.retry_max, lifetime=q.lifetime)
        self.manager = QueueManager(self.queue, MtaRouter(self.directory), transports, settings,
                                    bounce=bounce_maker(self.hostname))
        await self.manager.start()
        control = RpcServer(QueueControl(self.queue, self.manager).handlers(), instance=self.me.name)
        await control.listen(runner, "rpc", self.me.address, self.me.ports.get("rpc", 0))
        tls = self.config.tls
        context = None
        if tls.cert_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert_file, tls.key_file)
        for port_name, submission in (("smtp", False), ("submission", True)):
            if port_name in self.me.ports:
                front = SmtpFrontEnd(self.queue, self.directory, hostname=self.hostname, submission=submission,
                                     limits=self.config.limits, tls_context=context,
                                     require_tls_for_auth=not tls.auth_without_tls,
                                     on_enqueued=lambda qid: self.manager.kick() if self.manager else None)
                await front.listen(runner, port_name, self.me.address, self.me.ports[port_name])
                self._fronts.append(front)
        if "metrics" in self.me.ports:
            metrics = MetricsServer(self.registry, self.health, instance=self.me.name)
            await metrics.listen(runner, self.me.address, self.me.ports["metrics"])

    async def health(self) -> dict[str, Any]:
        assert self.queue is not None and self.manager is not None
        store = self.queue.health()
        counts = await self.queue.counts()
        for state, n in counts.items():
            self._queued.labels(state).set(n)
        return {"status": "ok" if store["ok"] else "failed", "kind": "mta", "instance": self.me.name,
                "queue": counts, "in_flight": self.manager.stats.in_flight, **store}

    async def stop(self) -> None:
        for front in self._fronts:  # queue writes in flight finish before the queue closes
            await front.close()
        if self.manager is not None:
            await self.manager.stop(timeout=self.config.runner.drain_timeout)
        if self._lmtp is not None:
            await self._lmtp.close()
        if self.directory is not None:
            await self.directory.close()
        if self.queue is not None:
            await self.queue.close()
