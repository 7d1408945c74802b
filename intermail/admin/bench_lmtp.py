"""``intermail bench lmtp``: LMTP deliveries/s into our mssd against Dovecot's LMTP, in the same run.

For each concurrency N it measures, back to back on the same machine:

- *ours*: a throw-away ``mssd`` (with its ``dird``, real processes on
  loopback) taking 10 KiB messages over LMTP, each 250 given only once the
  message is durable on every mirror (the defaults: ``[storage] fsync =
  true``, 2 mirrors); every MAIL carries ``XDELIVERYKEY=<unique id>`` as an
  MTA's would;
- *baseline*: Dovecot 2.3's LMTP (``dovecot -F`` as root on 127.0.0.1, its
  own base and state directories, static userdb, ``sdbox`` mailboxes,
  default ``mail_fsync = optimized``), which refuses the key parameter, so
  it gets none.

Before the first case each side gets one message per account, one at a
time, so that no case pays for (or, on Dovecot, races on) creating a
mailbox.  The order of the two alternates from case to case.  The load
client holds one connection per worker, sends LHLO once, then per message
MAIL + RCPT + DATA pipelined in one write (RFC 2920: DATA must see its 354
before the body), the dot-stuffed body with its terminating dot in a
second, and reads each reply whole with ``readuntil``.  Only a 250 after the message counts as
a delivery; any other reply is an error, reported with samples.  Recipients
rotate over ``users`` accounts of ``bench.test``.  The client's CPU and the
servers' CPU (their process trees, from ``/proc``) are reported per side.

Besides the contract's keys each result has ``errors`` (per side) and
``details`` (deliveries, error samples, latency p50/p99, client and server
CPU in cores); the report has ``notes`` (durability settings, an install,
why a baseline is missing).

When ``dovecot`` is missing the bench installs Debian's ``dovecot-lmtpd``
with apt-get (and says so); when it cannot, or Dovecot does not come up,
each result has ``baseline`` and ``ratio`` null and a note says why.

Logs: nothing; returns the JSON contract of ``intermail bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from intermail import config as config_module
from intermail.admin.bench_dovecot import Dovecot, dovecot_home, find_or_install_dovecot
from intermail.admin.bench_storage import host_info
from intermail.apps.mss import DELIVERY_KEY_PARAM
from intermail.directory.client import DirectoryClient
from intermail.admin.bench_load import size_label, wire_message
from intermail.testing.procs import TestCluster

DOMAIN = "bench.test"
SENDER = b"bench@load.test"
PASSWORD = "bench-password"
ERROR_SAMPLES = 5
STOP_TIMEOUT = 30.0  # seconds a worker may take to finish its last message once the case is over


# -- the message ------------------------------------------------------------------------


def message_parts(size: int) -> tuple[bytes, bytes]:
    """A ``size``-octet message, dot-stuffed and with its ``.`` line, split where a 12-digit serial goes.

    A realistic header block (trace, originator, MIME) and plain text lines,
    one of which starts with a dot so that the stuffing is exercised.
    """
    head = ("Return-Path: <bench@load.test>\r\n"
            "Received: from client.load.test (client.load.test [127.0.0.1])\r\n"
            "\tby mta1.intermail.test (intermail) with ESMTPS id Q{serial}\r\n"
            "\tfor <user@bench.test>; Tue, 24 Nov 2026 12:00:00 +0000\r\n"
            "From: Load Generator <bench@load.test>\r\n"
            "To: Bench User <user@bench.test>\r\n"
            "Subject: LMTP benchmark message\r\n"
            "Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
            "Message-ID: <{serial}.bench@load.test>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 7bit\r\n"
            "\r\n")
    return wire_message(head, size)


# -- the load client --------------------------------------------------------------------


class _Session:
    """One LMTP connection of the load client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def reply(self) -> tuple[int, bytes]:
        """One whole reply: (code, last line); code 0 when the line is not a reply."""
        line = await self.reader.readuntil(b"\r\n")
        while line[3:4] == b"-":
            line = await self.reader.readuntil(b"\r\n")
        try:
            return int(line[:3]), line
        except ValueError:
            return 0, line

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            self.writer.close()
            await self.writer.wait_closed()


async def open_session(address: tuple[str, int]) -> _Session:
    reader, writer = await asyncio.open_connection(*address, limit=1 << 16)
    session = _Session(reader, writer)
    code, line = await session.reply()
    if code != 220:
        raise ConnectionError(f"greeting {line!r}")
    writer.write(b"LHLO load.test\r\n")
    code, line = await session.reply()
    if code != 250:
        raise ConnectionError(f"LHLO answered {line!r}")
    return session


@dataclass
class LoadStats:
    """What one load run saw; deliveries and latencies only inside the measured window."""

    delivered: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    client_cpu: float = 0.0  # cores used by this process during the window
    server_cpu: float | None = None  # cores used by the server's processes during the window

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < ERROR_SAMPLES and what not in self.samples:
            self.samples.append(what)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


class _Sender:
    """One message over one session: the transaction's bytes, built once, and its replies checked."""

    def __init__(self, size: int, users: int, key_prefix: str | None):
        self.before, self.after = message_parts(size)
        self.rcpts = [b"RCPT TO:<user%d@%s>\r\nDATA\r\n" % (i, DOMAIN.encode()) for i in range(users)]
        self.mail = b"MAIL FROM:<" + SENDER + b">"
        self.key_param = f" {DELIVERY_KEY_PARAM}={key_prefix}.".encode() if key_prefix is not None else None

    async def deliver(self, session: _Session, n: int, user: int) -> str | None:
        """Message number ``n`` to account ``user``; None when it got its 250, else the reply that was not."""
        if self.key_param is not None:
            envelope = self.mail + self.key_param + b"%d\r\n" % n
        else:
            envelope = self.mail + b"\r\n"
        session.writer.write(envelope + self.rcpts[user])
        mail_reply = await session.reply()
        rcpt_reply = await session.reply()
        data_reply = await session.reply()
        final: tuple[int, bytes] | None = None
        if data_reply[0] == 354:
            session.writer.write(self.before + b"%012d" % n + self.after)
            if rcpt_reply[0] == 250:  # LMTP: one reply per accepted recipient (RFC 2033 §4.2)
                final = await session.reply()
        if final is not None and final[0] == 250 and mail_reply[0] == 250:
            return None
        bad = next(r for r in (mail_reply, rcpt_reply, data_reply, final or (0, b"no reply after DATA"))
                   if r[0] not in (250, 354))
        session.writer.write(b"RSET\r\n")
        await session.reply()
        return bad[1].decode("ascii", "replace").strip()


async def prime(address: tuple[str, int], size: int, users: int, key_prefix: str | None) -> list[str]:
    """One message to each account, one at a time, so that no case pays for (or races on) a first delivery."""
    sender = _Sender(size, users, key_prefix)
    session = await open_session(address)
    try:
        errors = [await sender.deliver(session, n, n) for n in range(users)]
    finally:
        await session.close()
    return [e for e in errors if e is not None]


async def run_load(address: tuple[str, int], concurrency: int, seconds: float, warmup: float, size: int,
                   users: int, key_prefix: str | None, server_pids: Callable[[], list[int]]) -> LoadStats:
    """Deliver to ``address`` from ``concurrency`` connections: ``warmup`` s unmeasured, then ``seconds``."""
    sender = _Sender(size, users, key_prefix)
    stats = LoadStats()
    measuring = False
    stopping = False
    serial = 0

    async def worker(session: _Session) -> None:
        nonlocal serial
        while not stopping:
            n = serial
            serial += 1
            began = time.perf_counter()
            error = await sender.deliver(session, n, n % users)
            if error is not None:
                stats.error(error)
            elif measuring:
                stats.delivered += 1
                stats.latencies.append(time.perf_counter() - began)

    sessions = await asyncio.gather(*(open_session(address) for _ in range(concurrency)))
    tasks = [asyncio.create_task(worker(s)) for s in sessions]
    try:
        await asyncio.sleep(warmup)
        cpu_began, server_began = time.process_time(), _cpu_ticks(server_pids())
        began = time.perf_counter()
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        stats.seconds = time.perf_counter() - began
        stats.client_cpu = round((time.process_time() - cpu_began) / stats.seconds, 2)
        server_ticks = _cpu_ticks(server_pids())
        if server_ticks is not None and server_began is not None:
            stats.server_cpu = round((server_ticks - server_began) / os.sysconf("SC_CLK_TCK") / stats.seconds, 2)
        stopping = True
        done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        for task in pending:
            task.cancel()
            stats.error(f"no answer within {STOP_TIMEOUT:g} s at the end of the case")
        for task in done:
            if task.exception() is not None:
                stats.error(f"connection lost: {task.exception()!r}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sessions))
    return stats


def _cpu_ticks(roots: list[int]) -> int | None:
    """utime + stime of ``roots`` and all their descendants, in clock ticks; None without /proc."""
    if not roots:
        return None
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "
        parents[int(name)] = int(fields[1])
        ticks[int(name)] = int(fields[11]) + int(fields[12])
    wanted = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in wanted and pid not in wanted:
                wanted.add(pid)
                grew = True
    return sum(ticks.get(pid, 0) for pid in wanted)


# -- ours: dird + mssd ------------------------------------------------------------------


def _cluster(base: str) -> TestCluster:
    cluster = TestCluster(os.path.join(base, "data"), sections={
        "storage": {"fsync": True},
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "runner": {"loop": "auto"}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.write()
    return cluster


async def _provision(cluster: TestCluster, users: int) -> None:
    address = cluster.address("dir1", "rpc")

    async def fixed() -> tuple[list[tuple[str, int]], float]:
        return [address], float("inf")
    client = DirectoryClient(fixed, [address], instance="bench", cache_ttl=0, negative_ttl=0, request_timeout=30.0)
    try:
        await client.call("domain.add", {"name": DOMAIN})
        for i in range(users):
            await client.call("user.add", {"address": f"user{i}@{DOMAIN}", "password": PASSWORD, "mss": "mss1"})
    finally:
        await client.close()


# -- the bench --------------------------------------------------------------------------


def _side(stats: LoadStats) -> dict[str, Any]:
    return {"delivered": stats.delivered, "errors": stats.errors, "error_samples": stats.samples,
            "latency_ms": {"p50": stats.latency_ms(0.5), "p99": stats.latency_ms(0.99)},
            "client_cpu": stats.client_cpu, "server_cpu": stats.server_cpu}


async def _start_dovecot(base: str, concurrency: list[int], notes: list[str]) -> tuple[Dovecot | None, str | None]:
    binary = await asyncio.to_thread(find_or_install_dovecot, notes)
    if binary is None:
        return None, None
    home, own = dovecot_home(base, notes, "bench-lmtp-")
    dovecot: Dovecot | None = None
    try:
        dovecot = Dovecot(binary, home, protocols=["lmtp"], process_limit=max(100, *concurrency))
        await asyncio.to_thread(dovecot.start)
    except (OSError, RuntimeError, TimeoutError, KeyError, subprocess.SubprocessError) as exc:
        notes.append(f"baseline unavailable: dovecot did not start: {exc}")
        if dovecot is not None:
            dovecot.stop()
        return None, own
    return dovecot, own


async def run_bench(concurrency: list[int], seconds: float, size: int, users: int, directory: str | None = None,
                    progress=None) -> dict:
    message_parts(size)  # a size too small for the header block fails before anything starts
    storage = config_module.load(None).storage
    notes = [f"ours: mssd with [storage] fsync = {str(storage.fsync).lower()}, {storage.mirrors} mirrors "
             "(the defaults); a 250 means durable on every mirror"]
    base = tempfile.mkdtemp(prefix="bench-lmtp-", dir=directory)
    cluster = _cluster(base)
    dovecot: Dovecot | None = None
    dovecot_own: str | None = None
    results: list[dict] = []
    warmup = min(1.0, max(0.1, seconds / 5))
    try:
        cluster.start_all(["dir1", "mss1"])
        await _provision(cluster, users)
        ours_address = cluster.address("mss1", "lmtp")
        ours_pids = [cluster.procs[name].proc.pid for name in ("dir1", "mss1")]  # type: ignore[union-attr]
        dovecot, dovecot_own = await _start_dovecot(base, concurrency, notes)
        baseline_name = (f"dovecot {dovecot.version} lmtp sdbox" if dovecot is not None
                         else "dovecot lmtp sdbox (unavailable)")
        primed = [("ours", await prime(ours_address, size, users, f"b{os.getpid()}p"))]
        if dovecot is not None:
            primed.append(("baseline", await prime(dovecot.address, size, users, None)))
        for side, errors in primed:
            if errors:
                notes.append(f"{side}: {len(errors)} of {users} first deliveries failed, e.g. {errors[0]}")

        for index, c in enumerate(concurrency):
            ours_run = functools.partial(run_load, ours_address, c, seconds, warmup, size, users,
                                         f"b{os.getpid()}c{index}", lambda: ours_pids)
            theirs_run = (functools.partial(run_load, dovecot.address, c, seconds, warmup, size, users, None,
                                            dovecot.pids) if dovecot is not None else None)
            if index % 2 == 0:  # alternate who goes first
                mine = await ours_run()
                theirs = await theirs_run() if theirs_run is not None else None
            else:
                theirs = await theirs_run() if theirs_run is not None else None
                mine = await ours_run()
            result = {
                "case": f"lmtp conc={c} size={size_label(size)}",
                "params": {"concurrency": c, "size": size, "mirrors": storage.mirrors, "fsync": storage.fsync,
                           "recipients": 1},
                "metric": "deliveries/s", "ours": round(mine.rate, 1),
                "baseline": round(theirs.rate, 1) if theirs is not None else None,
                "baseline_name": baseline_name,
                "ratio": round(mine.rate / theirs.rate, 3) if theirs is not None and theirs.rate else None,
                "errors": {"ours": mine.errors, "baseline": theirs.errors if theirs is not None else None},
                "details": {"ours": _side(mine), "baseline": _side(theirs) if theirs is not None else None,
                            "seconds": seconds, "warmup": warmup, "users": users},
            }
            if theirs is None:
                result["note"] = next((n for n in notes if n.startswith("baseline unavailable")),
                                      "baseline unavailable")
            results.append(result)
            if progress:
                progress(result)
        return {"bench": "lmtp", "results": results, "notes": notes, "host": host_info(base)}
    finally:
        if dovecot is not None:
            dovecot.stop()
        cluster.stop_all()
        shutil.rmtree(base, ignore_errors=True)
        if dovecot_own is not None:
            shutil.rmtree(dovecot_own, ignore_errors=True)
