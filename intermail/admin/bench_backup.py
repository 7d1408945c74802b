"""``intermail bench backup``: full-backup throughput, and what a running backup costs LMTP delivery.

A throw-away ``dird`` + ``mssd`` (real processes on loopback, the default
durability: fsync on, 2 mirrors) is filled over LMTP with ``--messages``
messages of ``--size`` bytes, then two cases are measured in the same run:

- ``backup full``: MB/s of ``intermail backup full`` (store RPC
  ``store.backup``: copy every segment, CRC-check every frame, fsync, re-read
  each file for its SHA-256, write the manifest) -- *ours*; *baseline*:
  ``cp -r`` of the very files that backup wrote into a new directory,
  followed by ``sync -f`` (a plain copy, no checking).  Both read from the
  page cache (this bench cannot drop it).
- ``lmtp during backup``: deliveries/s from ``--concurrency`` LMTP
  connections while full backups run back to back the whole measured time
  -- *ours*; *baseline*: the same load with no backup, measured just
  before.  ``ratio`` = ours / baseline; the target is a drop under 10 %
  (ratio >= 0.9).

Logs: nothing; returns the JSON contract of ``intermail bench``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from intermail.admin.backup import request_backup
from intermail.admin.bench_lmtp import _cluster, _provision, _side, prime, run_load
from intermail.admin.bench_load import size_label
from intermail.admin.bench_storage import host_info

TARGET_RATIO = 0.9


async def _fill(address: tuple[str, int], messages: int, size: int, users: int) -> int:
    delivered = 0
    round_ = 0
    while delivered < messages:
        stats = await run_load(address, 16, 1.0, 0.0, size, users, f"fill{os.getpid()}r{round_}", lambda: [])
        delivered += stats.delivered
        round_ += 1
    return delivered


def _cp_rate(source: str, base: str) -> tuple[float, float]:
    """MB/s and seconds of ``cp -r source`` + ``sync -f`` into a new directory."""
    dest = os.path.join(base, f"cp-{time.monotonic_ns()}")
    began = time.perf_counter()
    subprocess.run(["cp", "-r", source, dest], check=True)
    subprocess.run(["sync", "-f", dest], check=True)
    seconds = time.perf_counter() - began
    size = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
    shutil.rmtree(dest, ignore_errors=True)
    return size / 1e6 / seconds, seconds


async def run_bench(messages: int, size: int, concurrency: int, seconds: float, users: int,
                    directory: str | None = None, progress=None) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="bench-backup-", dir=directory)
    cluster = _cluster(base)
    notes = ["ours: mssd with fsync on and 2 mirrors (the defaults); backups read the first healthy mirror",
             "both backup figures read from the page cache (it is not dropped)"]
    results: list[dict] = []
    backups = os.path.join(base, "backups")
    os.makedirs(backups)
    n = 0

    def next_dir() -> str:
        nonlocal n
        n += 1
        return os.path.join(backups, f"b{n}")

    try:
        cluster.start_all(["dir1", "mss1"])
        await _provision(cluster, users)
        lmtp = cluster.address("mss1", "lmtp")
        rpc = cluster.address("mss1", "rpc")
        pids = [cluster.procs[name].proc.pid for name in ("dir1", "mss1")]  # type: ignore[union-attr]
        await prime(lmtp, size, users, f"bb{os.getpid()}p")
        filled = await _fill(lmtp, messages, size, users)

        # 1. full backup MB/s vs cp of the same files
        ours_runs, cp_runs = [], []
        for _ in range(3):
            dest = next_dir()
            manifest = await request_backup(rpc, "full", dest, rate=0)  # unbounded: its speed
            ours_runs.append((manifest["bytes"] / 1e6 / manifest["seconds"], manifest["bytes"], manifest["seconds"]))
            cp_runs.append(await asyncio.to_thread(_cp_rate, dest, base))
            shutil.rmtree(dest, ignore_errors=True)
        ours_mb = sorted(r[0] for r in ours_runs)[1]
        cp_mb = sorted(r[0] for r in cp_runs)[1]
        result = {"case": f"backup full msgs={filled} size={size_label(size)}",
                  "params": {"messages": filled, "size": size, "bytes": ours_runs[0][1]},
                  "metric": "MB/s", "ours": round(ours_mb, 1), "baseline": round(cp_mb, 1),
                  "baseline_name": "cp -r + sync -f of the backup's files",
                  "ratio": round(ours_mb / cp_mb, 3) if cp_mb else None,
                  "details": {"ours_runs": [{"mb_s": round(r[0], 1), "bytes": r[1], "seconds": r[2]}
                                            for r in ours_runs],
                              "baseline_runs": [{"mb_s": round(r[0], 1), "seconds": round(r[1], 3)}
                                                for r in cp_runs], "median_of": 3}}
        results.append(result)
        if progress:
            progress(result)

        # 2. LMTP deliveries/s without, then with back-to-back full backups
        warmup = min(1.0, max(0.1, seconds / 5))
        quiet = await run_load(lmtp, concurrency, seconds, warmup, size, users, f"bb{os.getpid()}q", lambda: pids)
        stop = asyncio.Event()
        taken: list[dict] = []

        async def backups_loop() -> None:
            while not stop.is_set():
                dest = next_dir()
                taken.append(await request_backup(rpc, "full", dest))
                await asyncio.to_thread(shutil.rmtree, dest, True)

        loop_task = asyncio.create_task(backups_loop())
        try:
            busy = await run_load(lmtp, concurrency, seconds, warmup, size, users, f"bb{os.getpid()}b",
                                  lambda: pids)
        finally:
            stop.set()
            await loop_task
        ratio = busy.rate / quiet.rate if quiet.rate else None
        result = {"case": f"lmtp during backup conc={concurrency} size={size_label(size)}",
                  "params": {"concurrency": concurrency, "size": size, "messages_in_store": filled},
                  "metric": "deliveries/s", "ours": round(busy.rate, 1), "baseline": round(quiet.rate, 1),
                  "baseline_name": "the same LMTP load with no backup running",
                  "ratio": round(ratio, 3) if ratio is not None else None,
                  "target": f"ratio >= {TARGET_RATIO} (drop < 10 %)",
                  "target_met": ratio is not None and ratio >= TARGET_RATIO,
                  "errors": {"ours": busy.errors, "baseline": quiet.errors},
                  "details": {"ours": _side(busy), "baseline": _side(quiet), "seconds": seconds,
                              "backups_during": len(taken),
                              "backup_mb_s_during": [round(m["bytes"] / 1e6 / m["seconds"], 1) for m in taken]}}
        results.append(result)
        if progress:
            progress(result)
        return {"bench": "backup", "results": results, "notes": notes, "host": host_info(base)}
    finally:
        cluster.stop_all()
        shutil.rmtree(base, ignore_errors=True)
