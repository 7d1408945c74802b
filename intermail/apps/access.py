"""The access server kind (``accessd``): IMAP and POP3 for mail clients, over the store RPC.

Owns: turning the Config and one ``[[instance]]`` of kind ``access`` into a
running access server -- its IMAP listener (``ports.imap``), its POP3
listener (``ports.pop3``), metrics and health (``ports.metrics``) -- and
what is shared by its sessions (:class:`~intermail.access.context.AccessContext`):
the directory client, one store RPC client per store identity, the TLS
context for STARTTLS/STLS (``[tls]``).  An access server keeps no state of
its own: any instance serves any user, and a killed one loses only its
open sessions.

Invariants:

- ``limits.connections_per_ip`` is counted per access server and per
  client address, over IMAP and POP3 together; the connection over it is
  told so (``* BYE`` / ``-ERR [SYS/TEMP]``) and closed.
- Health is ``ok`` once the listeners are bound; the stores and the
  directory are the monitor's to probe on their own.

Logs: ``access.refused`` (connection over the per-address limit).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from intermail.access.context import AccessContext
from intermail.access.stores import StoreClients
from intermail.apps.directory import directory_client
from intermail.config import Config, ConfigError
from intermail.log import log_event, register_events
from intermail.net.metrics import MetricsServer
from intermail.net.runner import Runner

__all__ = ["AccessApp", "AccessMetrics"]

log = logging.getLogger("intermail.apps.access")

register_events({
    "access.refused": "a connection was refused: too many from its client address",
})


class AccessMetrics:
    """The access server's Prometheus counters."""

    def __init__(self, registry: CollectorRegistry):
        self.sessions = Gauge("intermail_access_sessions", "client sessions open, by protocol", ["protocol"],
                              registry=registry)
        self.commands = Counter("intermail_access_commands", "client commands answered, by protocol and result",
                                ["protocol", "result"], registry=registry)
        self.logins = Counter("intermail_access_logins", "login attempts, by result", ["result"],
                              registry=registry)
        self.refused = Counter("intermail_access_refused", "connections refused (per-address limit)",
                               registry=registry)

    def count(self, name: str, *labels: str) -> None:
        metric = getattr(self, name)
        (metric.labels(*labels) if labels else metric).inc()


class AccessApp:
    """The runner's app for one access instance."""

    def __init__(self, config: Config, name: str, *, init: bool = False):
        self.config = config
        self.me = config.instance(name)
        if self.me.kind != "access":
            raise ConfigError(f"instance {name!r} is an {self.me.kind}, not an access server")
        if not any(p in self.me.ports for p in ("imap", "pop3")):
            raise ConfigError(f"instance[{name}].ports: an access server needs an imap or a pop3 port")
        self.registry = CollectorRegistry()
        self.metrics = AccessMetrics(self.registry)
        self.ctx: AccessContext | None = None
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._ready = False

    async def start(self, runner: Runner) -> None:
        tls = self.config.tls
        context = None
        if tls.cert_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert_file, tls.key_file)
        zone = self.config.cluster.zone
        self.ctx = AccessContext(self.config, directory_client(self.config, instance=self.me.name),
                                 StoreClients.from_config(self.config, instance=self.me.name),
                                 instance=self.me.name, hostname=f"{self.me.name}.{zone}", tls_context=context,
                                 metrics=self.metrics)
        if "metrics" in self.me.ports:
            metrics = MetricsServer(self.registry, self.health, instance=self.me.name)
            await metrics.listen(runner, self.me.address, self.me.ports["metrics"])
        if "imap" in self.me.ports:
            await runner.listen("imap", self.me.address, self.me.ports["imap"], self._imap)
        if "pop3" in self.me.ports:
            await runner.listen("pop3", self.me.address, self.me.ports["pop3"], self._pop3)
        self._ready = True

    async def stop(self) -> None:
        if self.ctx is not None:
            await self.ctx.stores.close()
            await self.ctx.directory.close()

    async def health(self) -> dict[str, Any]:
        return {"status": "ok" if self._ready else "starting", "kind": "access", "instance": self.me.name}

    # -- connections ---------------------------------------------------------------

    def _admit(self, writer: asyncio.StreamWriter) -> str | None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        if self._per_ip[ip] >= self.config.limits.connections_per_ip:
            log_event(log, "access.refused", level=logging.WARNING, client=ip,
                      limit=self.config.limits.connections_per_ip)
            self.metrics.count("refused")
            return None
        self._per_ip[ip] += 1
        return ip

    def _release(self, ip: str) -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    async def _serve(self, protocol: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     refusal: bytes) -> None:
        ip = self._admit(writer)
        if ip is None:
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(refusal)
                await writer.drain()
            writer.close()
            return
        assert self.ctx is not None
        gauge = self.metrics.sessions.labels(protocol)
        gauge.inc()
        try:
            if protocol == "imap":
                from intermail.access.imap import ImapSession
                await ImapSession(self.ctx, reader, writer).run()
            else:
                from intermail.access.pop3 import Pop3Session
                await Pop3Session(self.ctx, reader, writer).run()
        finally:
            gauge.dec()
            self._release(ip)

    async def _imap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve("imap", reader, writer, b"* BYE [UNAVAILABLE] Too many connections from your address\r\n")

    async def _pop3(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve("pop3", reader, writer, b"-ERR [SYS/TEMP] Too many connections from your address\r\n")
