"""``intermail bench storage``: commit rate of the durable log against the disk's raw fsync rate.

For each case it measures, in the same run and on the same directory:

- *baseline*: one writer appending the same record size to a plain file with
  ``pwrite`` + ``fdatasync`` per record (what a naive durable queue does);
- *ours*: ``Store`` commits of records of that size from N concurrent
  writers (asyncio tasks), each commit durable on every mirror (I-1) and
  applied to the index before it returns.

The baseline is re-measured right before each case so that a ratio compares
figures taken under the same disk conditions.  A last case reopens a store
with its index thrown away and reports the replay rate (frames/s) against a
plain sequential read of the same journal files.

Logs: nothing; prints a table or one JSON object (``--json``).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable

from intermail.storage import Store, StoreOptions, rebuild_index

RECORD_TYPE = 16


class BenchApplier:
    """Index work comparable to a real consumer: one row per committed record."""

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS records(seq INTEGER PRIMARY KEY, size INTEGER NOT NULL)")

    def apply(self, conn: sqlite3.Connection, seq: int, rtype: int, payload: bytes) -> None:
        conn.execute("INSERT OR REPLACE INTO records(seq, size) VALUES (?, ?)", (seq, len(payload)))

    def snapshot(self, conn: sqlite3.Connection) -> Iterable[tuple[int, bytes]]:
        return ()


def raw_fsync_rate(directory: str, size: int, seconds: float) -> float:
    """Records/s of append + fdatasync, one writer, on a fresh file in ``directory``."""
    path = os.path.join(directory, "raw-baseline")
    body = os.urandom(size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        n = 0
        offset = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            os.pwrite(fd, body, offset)
            os.fdatasync(fd)
            offset += size
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)


async def commit_rate(directory: str, writers: int, mirrors: int, size: int, seconds: float,
                      segment_bytes: int) -> tuple[float, dict]:
    dirs = tuple(os.path.join(directory, f"m{i}") for i in range(mirrors))
    options = StoreOptions(mirrors=dirs, segment_bytes=segment_bytes, auto_checkpoint_bytes=0)
    store = await Store.open(options, BenchApplier())
    body = os.urandom(size)
    done = 0
    stop = False

    async def writer() -> None:
        nonlocal done
        while not stop:
            txn = store.transaction()
            txn.add(RECORD_TYPE, body)
            await txn.commit()
            done += 1

    tasks = [asyncio.create_task(writer()) for _ in range(writers)]
    await asyncio.sleep(min(0.2, seconds / 5))  # warm-up: spare segment, first flushes
    start_done, start = done, time.perf_counter()
    await asyncio.sleep(seconds)
    rate = (done - start_done) / (time.perf_counter() - start)
    stop = True
    await asyncio.gather(*tasks)
    sizes = store.stats.batch_sizes
    info = {"flushes": store.stats.flushes, "mean_batch": round(sum(sizes) / max(1, len(sizes)), 1)}
    await store.close()
    return rate, info


async def replay_rate(directory: str, mirrors: int) -> tuple[float, float, int]:
    """(frames/s replayed with the index thrown away, frames/s of a plain read, frames)."""
    dirs = tuple(os.path.join(directory, f"m{i}") for i in range(mirrors))
    options = StoreOptions(mirrors=dirs, auto_checkpoint_bytes=0)
    store = await rebuild_index(options, BenchApplier())
    report = store.report
    await store.close()
    frames = report.replayed_frames
    start = time.perf_counter()
    total = 0
    for name in sorted(os.listdir(dirs[0])):
        if name.endswith(".seg"):
            with open(os.path.join(dirs[0], name), "rb") as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    plain = time.perf_counter() - start
    ours = frames / report.seconds if report.seconds else 0.0
    base = frames / plain if plain else 0.0
    return ours, base, frames


def host_info(directory: str) -> dict:
    usage = shutil.disk_usage(directory)
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "disk_free_gib": round(usage.free / 2**30, 1), "date": time.strftime("%Y-%m-%d")}


async def run_bench(directory: str | None, writers: list[int], mirrors: list[int], size: int,
                    seconds: float, progress=None) -> dict:
    base = tempfile.mkdtemp(prefix="bench-storage-", dir=directory)
    results = []
    try:
        for m in mirrors:
            for w in writers:
                case_dir = os.path.join(base, f"w{w}-m{m}")
                os.makedirs(case_dir)
                baseline = raw_fsync_rate(case_dir, size, max(1.0, seconds / 2))
                ours, info = await commit_rate(case_dir, w, m, size, seconds, segment_bytes=64 << 20)
                result = {
                    "case": f"writers={w} size={size // 1024}KiB mirrors={m}",
                    "params": {"writers": w, "size": size, "mirrors": m, **info},
                    "metric": "commits/s", "ours": round(ours, 1), "baseline": round(baseline, 1),
                    "baseline_name": "pwrite+fdatasync per record, 1 writer, same disk",
                    "ratio": round(ours / baseline, 2) if baseline else None,
                }
                results.append(result)
                if progress:
                    progress(result)
                if not (m == mirrors[-1] and w == writers[-1]):
                    shutil.rmtree(case_dir)
        last = os.path.join(base, f"w{writers[-1]}-m{mirrors[-1]}")
        ours, plain, frames = await replay_rate(last, mirrors[-1])
        result = {"case": f"replay frames={frames}", "params": {"frames": frames, "size": size},
                  "metric": "frames/s", "ours": round(ours, 1), "baseline": round(plain, 1),
                  "baseline_name": "sequential read of the same segment files",
                  "ratio": round(ours / plain, 3) if plain else None}
        results.append(result)
        if progress:
            progress(result)
        return {"bench": "storage", "results": results, "host": host_info(base)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
