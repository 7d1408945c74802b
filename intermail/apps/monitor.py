"""The monitor sidecar (``monitord``): probes every instance, keeps DNS membership, promotes spares.

Owns the loop that turns probe results into actions:

- every ``monitor.interval`` seconds each instance is probed at protocol
  level (:mod:`intermail.monitor.probes`), all at once, each bounded by
  ``monitor.timeout``; its :class:`~intermail.monitor.state.Tracker` turns
  the results into UP / SUSPECT / DOWN;
- a redundant instance (mta, access, directory) going DOWN is removed from
  its names (``mta``, ``imap``/``pop``, ``dir``) with an RFC 2136 UPDATE,
  and added back once UP again -- but the last address of a name is never
  removed (a name with no address helps nobody);
- a store identity whose owner goes DOWN is taken over: the old owner is
  fenced first (the power switch: in the embedded deployment a SIGKILL of
  its process, in the netns one every process of its host and its address
  taken off; the epoch bump of the take-over fences its store, I-6), then
  the spare gets ``mss.takeover`` and serves the identity's address.  The
  former owner, once restarted, comes back as the spare
  (:mod:`intermail.monitor.owners`).

The monitor keeps no state that matters: restarted, it probes again and
acts on what it sees.  Its view (state per instance) is written to
``<data>/run/monitor.json`` for ``intermail status``.

Invariants:

- At most one take-over per identity at a time; none without a spare that
  answers its probes; none for a store not seen up since the monitor
  started until ``monitor.startup_grace`` has passed (it may be starting).
- An address is removed from a name only while another address of the name
  is in the zone.

Logs: ``monitor.state`` (an instance changed state), ``monitor.dns``
(membership changed), ``monitor.takeover`` (with the seconds from the first
failed probe to the spare serving), ``monitor.no_spare``,
``monitor.takeover_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from intermail.config import Config, ConfigError
from intermail.errors import MailError
from intermail.log import log_event, register_events
from intermail.monitor import netns
from intermail.monitor import owners as ownership
from intermail.monitor.probes import probe
from intermail.monitor.state import DOWN, UP, Tracker
from intermail.net.metrics import MetricsServer
from intermail.net.runner import Runner, read_ready_file
from intermail.rpc.client import RpcClient

__all__ = ["MonitorApp", "ProcessPowerSwitch", "SERVICE_NAMES"]

log = logging.getLogger("intermail.apps.monitor")

register_events({
    "monitor.state": "an instance changed state (target, old, new, why)",
    "monitor.round_failed": "a probe round failed unexpectedly (the loop goes on)",
    "monitor.dns": "DNS membership changed (name, address, action)",
    "monitor.dns_failed": "a DNS membership update failed (name, address, action, error)",
    "monitor.takeover": "a spare took a store identity over (identity, by, from, seconds since the first failed probe)",
    "monitor.no_spare": "a store identity is down and no spare answers",
    "monitor.takeover_failed": "a take-over was attempted and failed",
    "monitor.fenced": "the power switch stopped an instance before its spare took over",
})

# the names each redundant kind is published under, by the port that serves it
SERVICE_NAMES = {("mta", "smtp"): "mta", ("access", "imap"): "imap", ("access", "pop3"): "pop",
                 ("directory", "rpc"): "dir"}
_PROBE_PORTS = {"mta": ("smtp", "submission"), "access": ("imap", "pop3"), "directory": ("rpc",), "dns": ("dns",)}

Membership = Callable[[str, str, str], Awaitable[list[str]]]  # (action, name, address) -> addresses after


class ProcessPowerSwitch:
    """The embedded deployment's power switch: SIGKILL the instance's process (its pid from its ready file)."""

    def __init__(self, config: Config):
        self.config = config

    async def fence(self, name: str) -> bool:
        """True if a live process of ``name`` was killed."""
        try:
            pid = json.loads(self.config.ready_file(name).read_text()).get("pid")
        except (OSError, ValueError):
            return False
        if not isinstance(pid, int) or pid <= 1:
            return False
        try:  # the pid must still be that instance's (not a reused number)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if b"--instance" not in cmdline or name.encode() not in cmdline:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            return True
        return False


@dataclasses.dataclass
class _Target:
    name: str  # instance, or "identity:<id>" for a store identity
    kind: str
    probes: list[tuple[str, Callable[[], tuple[str, int] | None]]]
    tracker: Tracker
    why: str = ""
    ever_up: bool = False  # seen UP since the monitor started
    pending: bool = False  # DOWN, not acted upon yet (still in the start-up grace)


class MonitorApp:
    """The runner's app for the monitor instance."""

    def __init__(self, config: Config, name: str, *, init: bool = False,
                 membership: Membership | None = None, power: Any = None):
        self.config = config
        self.me = config.instance(name)
        if self.me.kind != "monitor":
            raise ConfigError(f"instance {name!r} is a {self.me.kind}, not a monitor")
        m = config.monitor
        self.interval, self.timeout = m.interval, m.timeout
        self.membership = membership
        if power is None:
            power = netns.NetnsPowerSwitch(config) if netns.is_netns(config) else ProcessPowerSwitch(config)
        self.power = power
        self.targets: list[_Target] = []
        self._busy: set[str] = set()  # identities being taken over
        self._started = time.monotonic()
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        for inst in config.instances:
            if inst.kind in _PROBE_PORTS:
                probes = [(port, self._where(inst.name, port)) for port in _PROBE_PORTS[inst.kind]
                          if port in inst.ports]
                if probes:
                    self.targets.append(_Target(inst.name, inst.kind, probes, self._tracker()))
            elif inst.kind == "mss":
                self.targets.append(_Target(inst.name, "mss", [("rpc", self._mss_where(inst.name))], self._tracker()))
        for identity in sorted({i.identity or i.name for i in config.instances_of("mss")}):
            owner = next(i for i in config.instances_of("mss") if (i.identity or i.name) == identity
                         and i.role in ("active", ""))
            self.targets.append(_Target(f"identity:{identity}", "identity",
                                        [("lmtp", self._fixed(owner.address, owner.ports.get("lmtp", 0)))],
                                        self._tracker()))
        if membership is None and config.instances_of("dns"):
            from intermail.dns.update import membership_from_config
            self.membership = membership_from_config(config)

    def _tracker(self) -> Tracker:
        return Tracker(down_after=self.config.monitor.down_after, up_after=self.config.monitor.up_after)

    # -- where to probe ------------------------------------------------------------

    def _fixed(self, address: str, port: int) -> Callable[[], tuple[str, int] | None]:
        return lambda: (address, port) if port else None

    def _where(self, name: str, port_name: str) -> Callable[[], tuple[str, int] | None]:
        inst = self.config.instance(name)
        if inst.ports.get(port_name):
            return self._fixed(inst.address, inst.ports[port_name])

        def from_ready_file() -> tuple[str, int] | None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                return read_ready_file(self.config.ready_file(name)).get(port_name)
            return None
        return from_ready_file

    def _mss_where(self, name: str) -> Callable[[], tuple[str, int] | None]:
        """A store instance answers on its store RPC (the owner) or its control RPC (a spare)."""
        def where() -> tuple[str, int] | None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                listeners = read_ready_file(self.config.ready_file(name))
                return listeners.get("control") or listeners.get("rpc")
            return None
        return where

    # -- life cycle ----------------------------------------------------------------

    async def start(self, runner: Runner) -> None:
        if "metrics" in self.me.ports:
            metrics = MetricsServer(_registry(), self.health, instance=self.me.name)
            await metrics.listen(runner, self.me.address, self.me.ports["metrics"])
        self._started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "kind": "monitor", "instance": self.me.name,
                "states": {t.name: t.tracker.state for t in self.targets}}

    async def _loop(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.round()
            except Exception:
                log_event(log, "monitor.round_failed", level=logging.ERROR, exc_info=True)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    async def round(self) -> None:
        """Probe every target once and act on the changes."""
        results = await asyncio.gather(*(self._probe(t) for t in self.targets))
        now = time.monotonic()
        changed = False
        settled = now - self._started >= self.config.monitor.startup_grace
        for target, (ok, why) in zip(self.targets, results, strict=True):
            change = target.tracker.observe(ok, now)
            if not ok:
                target.why = why
            if target.pending and settled and target.tracker.state == DOWN:
                target.pending = False
                self._spawn(self._act(target, DOWN))
            if change is None:
                continue
            if change.new == UP:
                target.ever_up, target.pending = True, False
            if change.new == DOWN and target.kind == "identity" and not target.ever_up and not settled:
                # A store never seen up since we started may just be starting: a take-over
                # now would fight it for its address.  Act once the grace is over.
                target.pending = True
                log_event(log, "monitor.state", level=logging.WARNING, target=target.name, old=change.old,
                          new=change.new, why=why, deferred=True)
                changed = True
                continue
            changed = True
            log_event(log, "monitor.state", level=logging.WARNING if change.new == DOWN else logging.INFO,
                      target=target.name, old=change.old, new=change.new, why="" if ok else why)
            if change.new in (UP, DOWN):
                self._spawn(self._act(target, change.new))
        if changed:
            self._write_view()

    async def _probe(self, target: _Target) -> tuple[bool, str]:
        for port_name, where in target.probes:
            address = where()
            if address is None:
                return False, f"no {port_name} address (not started?)"
            ok, why = await probe(port_name, address, timeout=self.timeout, zone=self.config.cluster.zone)
            if not ok:
                return False, f"{port_name}: {why}"
        return True, ""

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- actions -------------------------------------------------------------------

    async def _act(self, target: _Target, state: str) -> None:
        if target.kind == "identity" and state == DOWN:
            await self._take_over(target.name.split(":", 1)[1], target)
            return
        if target.kind in ("mta", "access", "directory") and self.membership is not None:
            inst = self.config.instance(target.name)
            for (kind, port), name in SERVICE_NAMES.items():
                if kind == inst.kind and port in inst.ports:
                    await self._membership("delete" if state == DOWN else "add", name, inst.address)

    async def _membership(self, action: str, name: str, address: str) -> None:
        assert self.membership is not None
        try:
            after = await self.membership(action, name, address)
        except (MailError, OSError, TimeoutError, ValueError) as exc:
            log_event(log, "monitor.dns_failed", level=logging.ERROR, name=name, address=address, action=action,
                      error=f"{type(exc).__name__}: {exc}"[:200])
            return
        log_event(log, "monitor.dns", name=name, address=address, action=action, addresses=after)

    async def _take_over(self, identity: str, target: _Target) -> None:
        if identity in self._busy:
            return
        self._busy.add(identity)
        try:
            down_since = target.tracker.down_since or time.monotonic()
            owner = ownership.owner_of(self.config, identity)
            spares = [t for t in self.targets if t.kind == "mss" and t.name != owner and t.tracker.state == UP
                      and (self.config.instance(t.name).identity or t.name) == identity]
            if not spares:
                log_event(log, "monitor.no_spare", level=logging.ERROR, identity=identity, owner=owner)
                return
            spare = spares[0]
            if await self.power.fence(owner):
                log_event(log, "monitor.fenced", level=logging.WARNING, target=owner)
            address = spare.probes[0][1]()
            if address is None:
                return
            client = RpcClient([address], instance=self.me.name, connect_timeout=self.timeout,
                               request_timeout=self.config.monitor.takeover_timeout, reconnect_window=0.0,
                               keepalive=None)
            try:
                answer = await client.call("mss.takeover", {"bind_timeout": self.config.monitor.takeover_timeout})
            except MailError as exc:
                log_event(log, "monitor.takeover_failed", level=logging.ERROR, identity=identity, by=spare.name,
                          error=exc.safe)
                return
            finally:
                await client.close()
            log_event(log, "monitor.takeover", level=logging.WARNING, identity=identity, by=spare.name, previous=owner,
                      seconds=round(time.monotonic() - down_since, 3), store_seconds=answer.get("seconds"))
        finally:
            self._busy.discard(identity)

    def _write_view(self) -> None:
        path = Path(self.config.cluster.data_dir or ".") / "run" / "monitor.json"
        view = {t.name: {"state": t.tracker.state, "why": t.why if t.tracker.state != UP else ""}
                for t in self.targets}
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".monitor.", dir=path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump({"at": time.time(), "instances": view}, fh)
            os.replace(tmp, path)


def _registry():
    from prometheus_client import CollectorRegistry
    return CollectorRegistry()
