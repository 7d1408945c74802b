"""The DNS server kind (``dnsd``): the cluster zone, authoritative, on UDP and TCP.

Owns: turning the Config and one ``[[instance]]`` of kind ``dns`` into a
running server -- its zone file (``<data_dir>/<name>/<zone>.zone``), the
cluster's TSIG update key (``dns.tsig_key_file``, default
``<data_dir>/keys/dns-update.key``), the listeners (``ports.dns``, UDP and
TCP on the same port; listener names ``dns`` for TCP and ``dns_udp``), and
health/metrics (``ports.metrics``).

Start-up:

- with ``--init`` (the first start): the zone is built from the Config
  (:func:`intermail.dns.zone.zone_from_config`) and saved, unless a zone
  file exists already -- then that file wins, so a re-run of ``--init``
  never throws membership away; the key file is created if absent (0600);
- without ``--init``: a missing zone file or key file is an error -- a DNS
  server that lost its zone must not come back with the Config's idea of
  who is alive.

The zone file is the truth from then on: RFC 2136 updates (the monitor's)
change it durably before they are answered, and a restart (SIGKILL
included) serves the last acknowledged membership.

Health: ``{"status": "ok", "kind": "dns", "zone", "serial", "records"}``.
Metrics: ``intermail_dns_answers_total{transport, rcode}``,
``intermail_dns_truncated_total{transport}``,
``intermail_dns_updates_total{rcode}``, ``intermail_dns_zone_serial``,
``intermail_dns_zone_records``.

Logs: ``dns.zone_created``, ``dns.zone_loaded``, ``dns.key_created``, and
what the listeners log (``dns.updated``...).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from intermail.config import Config, ConfigError
from intermail.dns.listeners import DnsServer, bind_udp_and_tcp
from intermail.dns.server import Authority
from intermail.dns.tsig import create_key_file, key_file_path, load_key
from intermail.dns.zone import Zone, load_zone, save_zone, zone_file_path, zone_from_config
from intermail.log import log_event, register_events
from intermail.net.metrics import MetricsServer
from intermail.net.runner import Runner

__all__ = ["DnsApp"]

log = logging.getLogger("intermail.apps.dns")

register_events({
    "dns.zone_created": "a new zone was built from the Config and saved (dnsd --init, no zone file yet)",
    "dns.zone_loaded": "the zone was read from its file at start-up",
    "dns.key_created": "a new TSIG update key was written (dnsd --init, no key file yet)",
})

DEFAULT_PORT = 53


class DnsApp:
    """The runner's app for one dns instance."""

    def __init__(self, config: Config, name: str, *, init: bool = False):
        self.config = config
        self.me = config.instance(name)
        if self.me.kind != "dns":
            raise ConfigError(f"instance {name!r} is a {self.me.kind}, not a dns server")
        self.init = init
        self.zone_path = zone_file_path(config, name)
        self.key_path = key_file_path(config)
        self.authority: Authority | None = None
        self.server: DnsServer | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_DnsCollector(self))

    async def start(self, runner: Runner) -> None:
        zone = self._open_zone()
        self._open_key()
        key = load_key(self.config)
        d = self.config.dns
        self.authority = Authority(zone, key.keyring, max_udp_payload=d.max_udp_payload)
        fsync = self.config.storage.fsync
        self.server = DnsServer(self.authority, save=lambda z: save_zone(z, self.zone_path, fsync=fsync),
                                tcp_idle_timeout=d.tcp_idle_timeout, stopping=runner.stopping)
        server = self.server

        async def open_tcp(port: int) -> None:
            await runner.listen("dns", self.me.address, port, server.serve_tcp)

        async def open_udp(sock: Any) -> None:
            await runner.listen_datagram("dns_udp", self.me.address, 0, server.datagram_protocol, sock=sock)

        await bind_udp_and_tcp(self.me.address, self.me.ports.get("dns", DEFAULT_PORT), open_tcp, open_udp)
        if "metrics" in self.me.ports:
            metrics = MetricsServer(self.registry, self.health, instance=self.me.name)
            await metrics.listen(runner, self.me.address, self.me.ports["metrics"])

    def _open_zone(self) -> Zone:
        if self.zone_path.exists():
            zone = load_zone(self.zone_path, self.config.cluster.zone)
            log_event(log, "dns.zone_loaded", path=str(self.zone_path), serial=zone.serial, records=len(zone))
            return zone
        if not self.init:
            raise ConfigError(f"dns {self.me.name}: no zone file {self.zone_path}; start it once with --init"
                              " to build the zone from the configuration")
        zone = zone_from_config(self.config)
        save_zone(zone, self.zone_path, fsync=self.config.storage.fsync)
        log_event(log, "dns.zone_created", path=str(self.zone_path), serial=zone.serial, records=len(zone))
        return zone

    def _open_key(self) -> None:
        if self.key_path.exists():
            return
        if not self.init:
            raise ConfigError(f"dns {self.me.name}: no TSIG key file {self.key_path}; start it once with --init"
                              " to create one")
        if create_key_file(self.key_path, self.config.dns.tsig_key_name, fsync=self.config.storage.fsync):
            log_event(log, "dns.key_created", path=str(self.key_path), key=self.config.dns.tsig_key_name)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def health(self) -> dict[str, Any]:
        base = {"kind": "dns", "instance": self.me.name, "zone": self.config.cluster.zone}
        if self.authority is None:
            return {"status": "starting", **base}
        zone = self.authority.zone
        return {"status": "ok", **base, "serial": zone.serial, "records": len(zone)}


class _DnsCollector(Collector):
    """Reads the authority's counters at scrape time (quick: a few dict reads)."""

    def __init__(self, app: DnsApp):
        self.app = app

    def collect(self) -> Any:
        answers = CounterMetricFamily("intermail_dns_answers", "DNS queries answered, by transport and rcode",
                                      labels=["transport", "rcode"])
        truncated = CounterMetricFamily("intermail_dns_truncated", "answers sent empty with TC set",
                                        labels=["transport"])
        updates = CounterMetricFamily("intermail_dns_updates", "RFC 2136 updates answered, by rcode", labels=["rcode"])
        tsig = CounterMetricFamily("intermail_dns_tsig_errors", "messages refused for their TSIG", labels=["error"])
        serial = GaugeMetricFamily("intermail_dns_zone_serial", "the SOA serial of the zone served")
        records = GaugeMetricFamily("intermail_dns_zone_records", "records in the zone served")
        authority = self.app.authority
        if authority is not None:
            for key, count in list(authority.stats.items()):
                if key[0] == "query":
                    answers.add_metric([key[1], key[2]], count)
                elif key[0] == "truncated":
                    truncated.add_metric([key[1]], count)
                elif key[0] == "update":
                    updates.add_metric([key[1]], count)
                elif key[0] == "tsig_error":
                    tsig.add_metric([key[1]], count)
            serial.add_metric([], authority.zone.serial)
            records.add_metric([], len(authority.zone))
        yield from (answers, truncated, updates, tsig, serial, records)
