"""``intermail bench directory``: lookups/s and logins/s through the directory client.

Starts a throw-away directory (a primary and two replicas, real ``dird``
processes on loopback), provisions a domain and some accounts, then
measures, each against a baseline taken in the same run:

- ``resolve`` through :class:`DirectoryClient` with its cache off, spread
  over the three instances, against ``ping`` over the same connections at
  the same concurrency (the RPC round trip: the ceiling a lookup can reach);
- ``authenticate`` (argon2id verify on the server) against the same verify
  run in-process on as many threads as the machine has cores (the CPU
  ceiling a login can reach).

Hashing parameters are the configuration's unless ``--time-cost``,
``--memory-kib`` or ``--parallelism`` say otherwise; they are reported.

Logs: nothing; returns the JSON contract of ``intermail bench``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from intermail import config as config_module
from intermail.admin.bench_storage import host_info
from intermail.apps.directory import hashing_from_config
from intermail.directory.client import DirectoryClient
from intermail.testing.procs import TestCluster, free_port, loopback_address

PASSWORD = "bench-password"


def _cluster(base: str, hashing: dict[str, int]) -> TestCluster:
    cluster = TestCluster(os.path.join(base, "data"), sections={
        "directory": {**hashing, "replica_poll_interval": 1.0},
        "log": {"level": "WARNING"}, "runner": {"loop": "auto"}})
    addresses = [loopback_address() for _ in range(3)]
    port = free_port(addresses[0])
    for n, address in enumerate(addresses):
        cluster.add(f"dir{n + 1}", "directory", role="primary" if n == 0 else "replica", address=address,
                    ports={"rpc": port})
    cluster.add("mss1", "mss", identity="mss1", ports={"lmtp": 0})
    cluster.write()
    return cluster


def _client(cluster: TestCluster, name: str) -> DirectoryClient:
    address = cluster.address(name, "rpc")

    async def fixed() -> tuple[list[tuple[str, int]], float]:
        return [address], float("inf")
    return DirectoryClient(fixed, [address], instance="bench", cache_ttl=0, negative_ttl=0, request_timeout=30.0)


async def _rate(concurrency: int, seconds: float, op: Callable[[int], Awaitable[Any]]) -> float:
    """Operations per second with ``concurrency`` tasks calling ``op(task_number)`` for ``seconds``."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await op(n)
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return done / (time.perf_counter() - began)


def _local_verify_rate(hashing: Any, seconds: float) -> tuple[float, int]:
    stored = hashing.hash(PASSWORD)
    threads = os.cpu_count() or 1
    stop_at = time.perf_counter() + seconds

    def loop() -> int:
        n = 0
        while time.perf_counter() < stop_at:
            hashing.verify(stored, PASSWORD)
            n += 1
        return n

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda _: loop(), range(threads)))
    return total / (time.perf_counter() - began), threads


async def run_bench(concurrency: list[int], auth_concurrency: int, users: int, seconds: float,
                    hashing_overrides: dict[str, int], directory: str | None = None, progress=None) -> dict:
    defaults = config_module.load(None).directory
    hashing = {"hash_time_cost": defaults.hash_time_cost, "hash_memory_kib": defaults.hash_memory_kib,
               "hash_parallelism": defaults.hash_parallelism, **hashing_overrides}
    base = tempfile.mkdtemp(prefix="bench-directory-", dir=directory)
    cluster = _cluster(base, hashing)
    results: list[dict] = []

    def record(result: dict) -> None:
        results.append(result)
        if progress:
            progress(result)

    try:
        names = ["dir1", "dir2", "dir3"]
        cluster.start_all(names)
        clients = [_client(cluster, name) for name in names]
        try:
            admin = clients[0]
            await admin.call("domain.add", {"name": "bench.test"})
            addresses = [f"user{i}@bench.test" for i in range(users)]
            for address in addresses:
                await admin.call("user.add", {"address": address, "password": PASSWORD})
            seq = (await admin.call("status"))["last_seq"]
            for client in clients[1:]:
                while (await client.call("status"))["last_seq"] < seq:
                    await asyncio.sleep(0.05)

            for c in concurrency:
                async def lookup(n: int) -> None:
                    await clients[n % 3].resolve(addresses[n % users])

                async def ping(n: int) -> None:
                    await clients[n % 3]._rpc.call("ping", idempotent=True)

                baseline = await _rate(c, seconds / 2, ping)
                ours = await _rate(c, seconds, lookup)
                record({"case": f"resolve conc={c}", "params": {"concurrency": c, "instances": 3, "cache": False},
                        "metric": "lookups/s", "ours": round(ours, 1), "baseline": round(baseline, 1),
                        "baseline_name": "RPC ping over the same connections", "ratio": round(ours / baseline, 3)})

            async def login(n: int) -> None:
                await clients[n % 3].authenticate(addresses[n % users], PASSWORD)

            ours = await _rate(auth_concurrency, seconds, login)
            config = config_module.from_dict({"directory": hashing})
            baseline, threads = await asyncio.to_thread(_local_verify_rate, hashing_from_config(config),
                                                        seconds)
            params = {"concurrency": auth_concurrency, "instances": 3, "time_cost": hashing["hash_time_cost"],
                      "memory_kib": hashing["hash_memory_kib"], "parallelism": hashing["hash_parallelism"]}
            record({"case": f"authenticate conc={auth_concurrency} argon2id t={params['time_cost']} "
                            f"m={params['memory_kib'] // 1024}MiB p={params['parallelism']}",
                    "params": params, "metric": "logins/s", "ours": round(ours, 2), "baseline": round(baseline, 2),
                    "baseline_name": f"argon2id verify in-process, {threads} threads",
                    "ratio": round(ours / baseline, 3)})
        finally:
            for client in clients:
                await client.close()
        return {"bench": "directory", "results": results, "host": host_info(base)}
    finally:
        cluster.stop_all()
        shutil.rmtree(base, ignore_errors=True)
