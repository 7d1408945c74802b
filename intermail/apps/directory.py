"""The directory server kind (``dird``): a :class:`DirectoryService` on the runner.

Owns: turning the Config and one ``[[instance]]`` entry of kind
``directory`` into a running primary or replica -- its database file
(``<data_dir>/<name>/directory.db``), the RPC listener (``ports.rpc``), the
metrics/health listener (``ports.metrics``), the replica's link to the
primary -- and :func:`directory_client`, the one way other kinds find the
directory from the Config.

Invariants:

- Exactly one directory instance is the primary (``role = "primary"``, or
  the only directory with no role); the others are replicas.  A replica
  needs the primary's ``rpc`` port fixed in the Config, since it must find
  the primary again after either restarts.
- New accounts are placed on the mss identities the Config names.
- Health is ``ok`` while the process answers lookups -- a replica whose
  primary is unreachable included (it says so in ``warnings``); a replica
  that has never synchronised is ``starting`` (HTTP 503): it can answer
  nothing useful.

Scheduled backups (``[backup] full_interval``): the primary writes a full
directory backup each interval into ``[backup] dir``/<name>
(:mod:`intermail.apps.backups`).

Logs: what the service, the RPC server and the runner log; ``backup.*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from argon2 import profiles

from intermail.apps.backups import schedule_for
from intermail.config import Config, ConfigError, InstanceConfig
from intermail.directory.client import DirectoryClient
from intermail.directory.db import DirectoryDB
from intermail.directory.passwords import PasswordHashing
from intermail.directory.replica import ReplicaFollower
from intermail.directory.service import DirectoryService
from intermail.directory.throttle import AuthThrottle
from intermail.net.metrics import MetricsServer
from intermail.net.runner import Runner
from intermail.rpc.client import RpcClient
from intermail.rpc.server import RpcServer

__all__ = ["DirectoryApp", "directory_client", "primary_of", "hashing_from_config"]

DB_NAME = "directory.db"


def primary_of(config: Config) -> InstanceConfig:
    """The directory primary of the Config (ConfigError unless there is exactly one)."""
    directories = config.instances_of("directory")
    primaries = [i for i in directories if i.role == "primary"]
    if not primaries and len(directories) == 1 and directories[0].role == "":
        primaries = list(directories)
    if len(primaries) != 1:
        raise ConfigError(f"the cluster needs exactly one directory instance with role = \"primary\","
                          f" found {len(primaries)}")
    return primaries[0]


def hashing_from_config(config: Config, executor: Executor | None = None) -> PasswordHashing:
    d = config.directory
    return PasswordHashing(dataclasses.replace(
        profiles.RFC_9106_LOW_MEMORY, time_cost=d.hash_time_cost, memory_cost=d.hash_memory_kib,
        parallelism=d.hash_parallelism), executor=executor)


def directory_client(config: Config, *, instance: str = "", **kwargs: Any) -> DirectoryClient:
    """A client of every directory instance the Config names (those with a fixed rpc port)."""
    addresses = [(i.address, i.ports["rpc"]) for i in config.instances_of("directory") if i.ports.get("rpc")]
    if not addresses:
        raise ConfigError("no directory instance with a fixed rpc port in the configuration")
    d = config.directory
    options = {"cache_ttl": d.cache_ttl, "negative_ttl": d.negative_ttl, "stale_ttl": d.stale_ttl,
               "request_timeout": d.request_timeout, **kwargs}
    return DirectoryClient.static(addresses, instance=instance, **options)


class DirectoryApp:
    """The runner's app for one directory instance."""

    def __init__(self, config: Config, name: str, *, init: bool = False, hashing: PasswordHashing | None = None):
        self.config = config
        self.me = config.instance(name)
        if self.me.kind != "directory":
            raise ConfigError(f"instance {name!r} is a {self.me.kind}, not a directory")
        primary = primary_of(config)
        self.role = "primary" if primary.name == name else "replica"
        self.primary_address: tuple[str, int] | None = None
        if self.role == "replica":
            port = primary.ports.get("rpc", 0)
            if not port:
                raise ConfigError(f"instance[{primary.name}].ports.rpc: a directory primary with replicas"
                                  " needs a fixed port")
            self.primary_address = (primary.address, port)
        self.init = init
        # Hashes run on their own threads, one per core: a login storm queues
        # there (bounded by the service) instead of filling the loop's default pool.
        self._hash_pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix=f"argon2-{name}")
        self.hashing = hashing or hashing_from_config(config, self._hash_pool)
        self.service: DirectoryService | None = None
        self.follower: ReplicaFollower | None = None
        self.rpc: RpcServer | None = None
        self.db: DirectoryDB | None = None
        self._schedule_task: asyncio.Task | None = None

    async def start(self, runner: Runner) -> None:
        d = self.config.directory
        state = self.config.state_dir(self.me.name)
        if self.role == "primary" and not (state / DB_NAME).exists() and not self.init:
            # A primary that lost its database must not come back empty and
            # answer "unknown user" for everyone: that bounces real mail.
            raise ConfigError(f"directory primary {self.me.name}: no database in {state};"
                              " start it once with --init to create an empty directory")
        state.mkdir(parents=True, exist_ok=True)
        self.db = DirectoryDB(state / DB_NAME, replica=self.role == "replica",
                              max_alias_depth=d.max_alias_depth, max_alias_targets=d.max_alias_targets)
        primary_client = None
        if self.primary_address is not None:
            # A forwarded write must fail before the writer's own request times
            # out, so it can hear "the primary is unavailable" rather than a timeout.
            budget = d.request_timeout / 4
            primary_client = RpcClient([self.primary_address], instance=self.me.name,
                                       request_timeout=d.request_timeout / 2, reconnect_window=budget,
                                       connect_timeout=budget, keepalive=5.0)
        mss = sorted({i.identity for i in self.config.instances_of("mss") if i.identity})
        throttle = AuthThrottle(user_failures=d.auth_user_failures, ip_failures=d.auth_ip_failures,
                                window=d.auth_window)
        self.service = DirectoryService(
            self.db, role=self.role, instance=self.me.name, hashing=self.hashing, throttle=throttle,
            mss_candidates=mss, primary=primary_client, max_field_bytes=d.max_field_bytes,
            write_wait=d.write_wait)
        await self.service.start()
        if primary_client is not None:
            self.follower = ReplicaFollower(self.service, primary_client, poll_interval=d.replica_poll_interval)
            await self.follower.start()
        self.rpc = RpcServer(self.service.handlers(), instance=self.me.name)
        self.service.push = self.rpc.push
        await self.rpc.listen(runner, "rpc", self.me.address, self.me.ports.get("rpc", 0))
        if self.role == "primary":
            schedule = schedule_for(self.config, self.me.name, self._scheduled_backup, incrementals=False)
            if schedule is not None:
                self._schedule_task = asyncio.get_running_loop().create_task(schedule.run())
        if "metrics" in self.me.ports:
            metrics = MetricsServer(self.service.registry, self.health, instance=self.me.name)
            await metrics.listen(runner, self.me.address, self.me.ports["metrics"])

    async def health(self) -> dict[str, Any]:
        assert self.service is not None
        status = await self.service.status()
        warnings = []
        if self.role == "replica" and not status.get("primary_reachable"):
            warnings.append("primary unreachable: serving reads, refusing writes")
        # A replica that never synchronised answers nothing useful: not healthy.
        healthy = status.get("origin") is not None
        return {"status": "ok" if healthy else "starting", "kind": "directory", "warnings": warnings, **status}

    async def _scheduled_backup(self, kind: str, dest: str) -> dict:
        assert self.service is not None
        return await self.service.handlers()["directory.backup"](None, {"to": dest})

    async def stop(self) -> None:
        if self._schedule_task is not None:
            self._schedule_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._schedule_task
        if self.follower is not None:
            await self.follower.stop()
        if self.service is not None:
            await self.service.stop()
        if self.db is not None:
            self.db.close()
        self._hash_pool.shutdown(wait=False, cancel_futures=True)
