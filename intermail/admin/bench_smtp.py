"""``intermail bench smtp``: SMTP messages/s into our mtad against Postfix, accepted and end to end, same run.

Two cases, each measured back to back on the same machine for both sides,
the order alternating from case to case (ours first in the first):

- **accept**: ``sessions`` SMTP connections, each sending 10 KiB messages
  (one recipient each) back to back; the metric is the ``250`` replies to
  DATA the client saw per second, over ``seconds`` after a warm-up.  Both
  servers keep delivering what they accept meanwhile, as they would; the
  backlog left when the window closes and the time to deliver it are
  reported.  (Postfix slows its clients down when its deliveries lag:
  ``in_flow_delay``, 1 s by default.  Ours does not.)
- **end to end**: a fixed number of messages (``messages``) sent by the same
  sessions, timed from the first MAIL until the last of them is delivered
  into the message store (``mssd``'s 250 to the LMTP delivery, i.e. durable
  there).

*Ours*: a throw-away ``dird`` + ``mssd`` + ``mtad`` (real processes on
loopback, the defaults: ``[storage] fsync = true``, 2 mirrors for the queue
and the store), one hosted domain and ``users`` accounts on mss1.  Our
deliveries are counted by the MTA's ``queue.stats`` RPC (``delivered``:
recipients the store answered 250 to) and, at the end, checked against the
store: the INBOX counts (``mailbox.status``) of all accounts must add up to
every message either side delivered there.

*Baseline*: Debian's Postfix as a throw-away instance run as root -- its own
``config_directory``, ``queue_directory`` and ``data_directory`` under the
bench directory, ``master -s`` in the foreground, ``smtpd`` on a free
loopback port, default fsync discipline (one fsync per message before the
250), ``smtpd_recipient_restrictions = permit_mynetworks, reject``,
``maillog_file`` in its directory.  It relays the same domain over LMTP to
the same ``mssd`` (``transport_maps``), so the end-to-end figures of both
sides end at the same store with the same durability; deliveries are
counted from ``status=sent`` lines in its log.  It sends no delivery key,
so the store skips the key bookkeeping it does for our MTA.  For the
figure PERFORMANCE.md quotes, Postfix's end to end is also measured into
Postfix's own ``smtp-sink`` (a second relay domain, no store), reported in
that result's ``details`` only.

The load client (one asyncio process, uvloop when installed) holds one
connection per session, sends EHLO once, then per message MAIL + RCPT +
DATA in one write when the server announces PIPELINING (one at a time
otherwise), then the dot-stuffed body.  Only a 250 after the message counts;
any other reply is an error, reported with samples.  Recipients rotate over
``user<n>@bench.test``.  Before the first case each side gets one message
per account, one at a time, so that no case pays for creating a mailbox;
before every measurement both sides' queues are drained.

Besides the contract's keys each result has ``errors`` (per side: replies
that were not 250, plus deliveries deferred or bounced, or never made,
during the case) and ``details`` (per side: counts, latency p50/p99 from
MAIL to the 250, CPU in cores of the client and of each server process tree
-- the mssd and dird both sides deliver through count on both); the report
has ``notes``.  A backlog that makes no progress for ``STALL_TIMEOUT`` s is
given up (a deferred message would wait for its retry), with an error.
When Postfix is missing the bench installs Debian's ``postfix`` with
apt-get (preseeded "No configuration", so no system instance is set up);
when it cannot, or this is not root, or the instance does not come up or
fails in a case, ``baseline`` and ``ratio`` are null and a note says why.

Logs: nothing; returns the JSON contract of ``intermail bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intermail import config as config_module
from intermail.admin.bench_lmtp import (
    _provision as provision,  # the same accounts as the LMTP bench
)
from intermail.admin.bench_load import group_alive, size_label, wire_message
from intermail.admin.bench_storage import host_info
from intermail.rpc.client import RpcClient
from intermail.testing.procs import TestCluster, free_port

DOMAIN = "bench.test"
SINK_DOMAIN = "sink.test"  # Postfix only: relayed to smtp-sink, for the figure without a store
SENDER = b"bench@load.test"
POSTFIX_PACKAGE = "postfix"
ERROR_SAMPLES = 5
STOP_TIMEOUT = 30.0  # seconds a session may take to finish its last message once the case is over
DRAIN_TIMEOUT = 180.0  # seconds a side may take to deliver its backlog
STALL_TIMEOUT = 15.0  # seconds without a single delivery after which a backlog is given up
POLL_INTERVAL = 0.02  # seconds between two looks at the delivered count while timing end to end
MIN_RATE = 10.0  # end to end: messages/s below which the sending is given up as hung
CONNECT_TIMEOUT = 30.0  # seconds to connect and get through the greeting and EHLO


# -- the message ------------------------------------------------------------------------


def message_parts(size: int) -> tuple[bytes, bytes]:
    """A ``size``-octet message, dot-stuffed and with its ``.`` line, split where a 12-digit serial goes.

    What a client hands its MTA: originator headers, MIME, the submission
    hop's Received line, plain text lines -- one of which starts with a dot,
    so that the stuffing is exercised.
    """
    head = ("Received: from [192.0.2.10] (client.load.test [192.0.2.10])\r\n"
            "\tby submit.load.test with ESMTPSA id S{serial}; Tue, 24 Nov 2026 12:00:00 +0000\r\n"
            "From: Load Generator <bench@load.test>\r\n"
            "To: Bench User <user@bench.test>\r\n"
            "Subject: SMTP benchmark message\r\n"
            "Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
            "Message-ID: <{serial}.bench@load.test>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 7bit\r\n"
            "\r\n")
    return wire_message(head, size)


# -- the load client --------------------------------------------------------------------


class SmtpSession:
    """One SMTP connection of the load client, past its EHLO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.extensions: set[str] = set()

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def reply(self) -> tuple[int, bytes]:
        """One whole reply: (code, last line); code 0 when the line is not a reply."""
        line = await self.reader.readuntil(b"\r\n")
        while line[3:4] == b"-":
            line = await self.reader.readuntil(b"\r\n")
        try:
            return int(line[:3]), line
        except ValueError:
            return 0, line

    async def ehlo(self) -> None:
        self.writer.write(b"EHLO client.load.test\r\n")
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if not line.startswith(b"250"):
                raise ConnectionError(f"EHLO answered {line!r}")
            self.extensions.add(line[4:].split(b" ", 1)[0].strip().decode("ascii", "replace").upper())
            if line[3:4] != b"-":
                return

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            self.writer.close()
            await self.writer.wait_closed()


async def open_session(address: tuple[str, int]) -> SmtpSession:
    async with asyncio.timeout(CONNECT_TIMEOUT):
        reader, writer = await asyncio.open_connection(*address, limit=1 << 16)
    session = SmtpSession(reader, writer)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            code, line = await session.reply()
            if code != 220:
                raise ConnectionError(f"greeting {line!r}")
            await session.ehlo()
    except BaseException:
        writer.close()
        raise
    return session


class Sender:
    """One message over one session: the transaction's bytes, built once, and its replies checked."""

    def __init__(self, size: int, users: int, domain: str = DOMAIN):
        self.before, self.after = message_parts(size)
        self.mail = b"MAIL FROM:<" + SENDER + b"> SIZE=%d\r\n" % (len(self.before) + 12 + len(self.after))
        self.rcpts = [b"RCPT TO:<user%d@%s>\r\n" % (i, domain.encode()) for i in range(users)]

    async def send(self, session: SmtpSession, n: int, user: int) -> str | None:
        """Message number ``n`` to account ``user``; None when it got its 250, else the reply that was not."""
        rcpt = self.rcpts[user]
        if session.pipelining:  # RFC 2920: DATA ends the group, the body waits for its 354
            session.writer.write(self.mail + rcpt + b"DATA\r\n")
            replies = [await session.reply(), await session.reply(), await session.reply()]
        else:
            replies = []
            for command in (self.mail, rcpt, b"DATA\r\n"):
                session.writer.write(command)
                replies.append(await session.reply())
                if replies[-1][0] not in (250, 354):
                    break
        final: tuple[int, bytes] = (0, b"no reply after DATA")
        if replies[-1][0] == 354:  # the server waits for a body whatever it said before: send it
            session.writer.write(self.before + b"%012d" % n + self.after)
            final = await session.reply()
        if final[0] == 250 and all(r[0] == 250 for r in replies[:2]):
            return None
        bad = next(r for r in (*replies, final) if r[0] not in (250, 354))
        session.writer.write(b"RSET\r\n")
        await session.reply()
        return bad[1].decode("ascii", "replace").strip()


@dataclass
class LoadStats:
    """What one load run saw: accepted messages, errors, latencies, CPU."""

    accepted: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0  # the measured window (accept) or first MAIL to last delivery (end to end)
    backlog: int | None = None  # accept: accepted, not yet delivered, when the window closed
    drain_seconds: float | None = None  # accept: from the end of the case until that backlog was delivered
    accept_seconds: float = 0.0  # end to end: first MAIL to last 250
    delivered: int = 0  # end to end: deliveries counted in the window
    client_cpu: float = 0.0  # cores used by this process during the window
    server_cpu: dict[str, float | None] = field(default_factory=dict)  # cores per server process tree

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < ERROR_SAMPLES and what not in self.samples:
            self.samples.append(what)

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def cpu_ticks(roots: list[int]) -> int | None:
    """CPU of ``roots`` and all their descendants so far, in clock ticks; None without /proc.

    utime + stime of each live process, plus cutime + cstime: the CPU of
    children already reaped.  Postfix's daemons exit after ``max_use``
    requests, so without the reaped share most of its CPU would vanish.
    """
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
        ticks[int(name)] = sum(int(v) for v in fields[11:15])
    wanted = set(roots) & set(ticks)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in wanted and pid not in wanted:
                wanted.add(pid)
                grew = True
    return sum(ticks[pid] for pid in wanted) if wanted else None


class CpuWindow:
    """CPU of this process and of the servers' process trees between ``__init__`` and ``stop``."""

    def __init__(self, roots: dict[str, list[int]]):
        self.roots = roots
        self.began = time.perf_counter()
        self.process = time.process_time()
        self.ticks = {name: cpu_ticks(pids) for name, pids in roots.items()}

    def stop(self, stats: LoadStats) -> None:
        seconds = time.perf_counter() - self.began
        stats.client_cpu = round((time.process_time() - self.process) / seconds, 2)
        for name, pids in self.roots.items():
            now, then = cpu_ticks(pids), self.ticks[name]
            stats.server_cpu[name] = (round((now - then) / os.sysconf("SC_CLK_TCK") / seconds, 2)
                                      if now is not None and then is not None else None)


async def _finish(tasks: list[asyncio.Task], sessions: list[SmtpSession], stats: LoadStats,
                  timeout: float = STOP_TIMEOUT) -> None:
    """Wait (up to ``timeout`` s) for the workers to end, report what went wrong, close the sessions."""
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
            stats.error(f"workers still waiting for an answer after {timeout:g} s")
        for task in done:
            if task.exception() is not None:
                stats.error(f"connection lost: {task.exception()!r}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sessions))


async def run_accept(target: Target, sessions: int, seconds: float, warmup: float, sender: Sender,
                     users: int) -> LoadStats:
    """``sessions`` connections sending back to back: ``warmup`` s unmeasured, then ``seconds`` counted."""
    stats = LoadStats()
    measuring = stopping = False
    serial = 0

    async def worker(session: SmtpSession) -> None:
        nonlocal serial
        while not stopping:
            n = serial
            serial += 1
            began = time.perf_counter()
            error = await sender.send(session, n, n % users)
            if error is not None:
                stats.error(error)
                continue
            target.accepted_total += 1
            if measuring:
                stats.accepted += 1
                stats.latencies.append(time.perf_counter() - began)

    opened = await asyncio.gather(*(open_session(target.address) for _ in range(sessions)))
    tasks = [asyncio.create_task(worker(s)) for s in opened]
    try:
        await asyncio.sleep(warmup)
        failures_before = await target.failures()
        window = CpuWindow(target.pids())
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        window.stop(stats)
        stats.seconds = time.perf_counter() - window.began
        stats.backlog = target.accepted_total - await target.delivered()
        stopping = True
    finally:
        stopping = True
        await _finish(tasks, opened, stats)
    ended = time.perf_counter()
    if await target.drain():
        stats.drain_seconds = round(time.perf_counter() - ended, 2)
    for _ in range(await target.failures() - failures_before):
        stats.error("a delivery was deferred or bounced (see the server's log)")
    return stats


async def run_end_to_end(target: Target, sessions: int, messages: int, sender: Sender, users: int) -> LoadStats:
    """``messages`` messages over ``sessions`` connections, timed from the first MAIL to the last delivery."""
    stats = LoadStats()
    sent = 0
    delivered_before, failures_before = await target.delivered(), await target.failures()

    async def worker(session: SmtpSession) -> None:
        nonlocal sent
        while sent < messages:
            n = sent
            sent += 1
            began = time.perf_counter()
            error = await sender.send(session, n, n % users)
            if error is not None:
                stats.error(error)
                continue
            target.accepted_total += 1
            stats.accepted += 1
            stats.latencies.append(time.perf_counter() - began)

    opened = await asyncio.gather(*(open_session(target.address) for _ in range(sessions)))
    window = CpuWindow(target.pids())
    tasks = [asyncio.create_task(worker(s)) for s in opened]
    await _finish(tasks, opened, stats, timeout=STOP_TIMEOUT + messages / MIN_RATE)
    stats.accept_seconds = time.perf_counter() - window.began
    await target.wait_delivered(delivered_before + stats.accepted, DRAIN_TIMEOUT, POLL_INTERVAL)
    stats.seconds = time.perf_counter() - window.began
    window.stop(stats)
    stats.delivered = await target.delivered() - delivered_before
    if stats.delivered < stats.accepted:
        stats.error(f"{stats.accepted - stats.delivered} accepted messages not delivered (time out, stall "
                    "or a dead server)")
    for _ in range(await target.failures() - failures_before):
        stats.error("a delivery was deferred or bounced (see the server's log)")
    return stats


async def prime(target: Target, sender: Sender, users: int) -> list[str]:
    """One message to each account, one at a time, so that no case pays for (or races on) a first delivery."""
    session = await open_session(target.address)
    errors = []
    try:
        for n in range(users):
            error = await sender.send(session, n, n)
            if error is None:
                target.accepted_total += 1
            else:
                errors.append(error)
    finally:
        await session.close()
    return errors


# -- the two sides ----------------------------------------------------------------------


class Target:
    """A server under load: where it listens, its processes, and how many messages it delivered so far."""

    name = ""

    def __init__(self, address: tuple[str, int]):
        self.address = address
        self.accepted_total = 0  # every 250 after DATA this bench ever saw from it

    def pids(self) -> dict[str, list[int]]:
        raise NotImplementedError

    async def delivered(self) -> int:
        """Messages delivered (into the store, or to the sink) since the server started."""
        raise NotImplementedError

    async def failures(self) -> int:
        """Deliveries deferred or bounced since the server started."""
        raise NotImplementedError

    def alive(self) -> bool:
        return all(self.pids().values())

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Wait until everything accepted so far is delivered; False if it is not within ``timeout``."""
        return await self.wait_delivered(self.accepted_total, timeout, 0.05)

    async def wait_delivered(self, count: int, timeout: float, interval: float) -> bool:
        """Wait until ``count`` messages are delivered; False on ``timeout``, a stall, or a dead server.

        A stall is no delivery for ``STALL_TIMEOUT`` s: a deferred message
        waits for its retry (a minute or more), a bench should not.
        """
        deadline = time.monotonic() + timeout
        last, moved = -1, time.monotonic()
        while (delivered := await self.delivered()) < count:
            now = time.monotonic()
            if delivered != last:
                last, moved = delivered, now
            if now > deadline or now - moved > STALL_TIMEOUT or not self.alive():
                return False
            await asyncio.sleep(interval)
        return True


class OurCluster(Target):
    """dird + mssd + mtad; deliveries counted by the MTA's queue.stats."""

    name = "ours"

    def __init__(self, cluster: TestCluster):
        super().__init__(cluster.address("mta1", "smtp"))
        self.cluster = cluster
        self.control = RpcClient([cluster.address("mta1", "rpc")], instance="bench")

    def pids(self) -> dict[str, list[int]]:
        names = (("mtad", "mta1"), ("mssd", "mss1"), ("dird", "dir1"))
        procs = {kind: self.cluster.procs[name] for kind, name in names}
        return {kind: [proc.proc.pid] if proc.proc is not None and proc.alive else [] for kind, proc in procs.items()}

    async def _stats(self) -> dict[str, Any]:
        return await self.control.call("queue.stats", {}, idempotent=True)

    async def delivered(self) -> int:
        return int((await self._stats())["delivered"])

    async def failures(self) -> int:
        stats = await self._stats()
        return int(stats["deferred"]) + int(stats["failed"])

    async def close(self) -> None:
        await self.control.close()


class PostfixTarget(Target):
    """The Postfix instance, counted from its log (``status=sent`` lines to one domain)."""

    name = "baseline"

    def __init__(self, postfix: PostfixInstance, domain: str, store_pids: dict[str, list[int]]):
        super().__init__(postfix.address)
        self.postfix = postfix
        self.domain = domain
        self.store_pids = store_pids  # the mssd (and its dird) it delivers into work for it too

    def pids(self) -> dict[str, list[int]]:
        return self.postfix.pids() | self.store_pids

    async def delivered(self) -> int:
        return self.postfix.log.count(self.domain, "sent")

    async def failures(self) -> int:
        return self.postfix.log.count(self.domain, "deferred") + self.postfix.log.count(self.domain, "bounced")


# -- the baseline: Postfix --------------------------------------------------------------

_DELIVERY_LINE = re.compile(rb" to=<[^@>]*@([^>]+)>, .* status=(sent|deferred|bounced|expired) ")


class MailLog:
    """Postfix's ``maillog_file``, read as it grows: delivery outcomes per recipient domain."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.counts: dict[tuple[str, str], int] = {}

    def count(self, domain: str, status: str) -> int:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset += len(chunk)
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            for line in lines:
                match = _DELIVERY_LINE.search(line)
                if match:
                    key = (match.group(1).decode("ascii", "replace").lower(), match.group(2).decode())
                    self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts.get((domain, status), 0)


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def find_or_install_postfix(notes: list[str]) -> str | None:
    """The ``postfix`` command, installing Debian's ``postfix`` when it is missing; None if it cannot.

    The install is preseeded "No configuration": Debian then writes no
    main.cf and starts no system Postfix that would take port 25.
    """
    binary = shutil.which("postfix", path=_sbin_path())
    if binary is not None and shutil.which("smtp-sink", path=_sbin_path()) is not None:
        return binary
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        notes.append("baseline unavailable: postfix is not installed and cannot be installed here "
                     f"(needs root and apt-get: apt-get install {POSTFIX_PACKAGE})")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select No configuration\n",
                       env=env, capture_output=True, text=True, timeout=60)
    install = ["apt-get", "install", "-y", "-q", POSTFIX_PACKAGE]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    binary = shutil.which("postfix", path=_sbin_path())
    if done.returncode != 0 or binary is None:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        notes.append(f"baseline unavailable: apt-get install {POSTFIX_PACKAGE} failed: {tail}")
        return None
    notes.append(f"installed {POSTFIX_PACKAGE} with apt-get for the baseline")
    return binary


def _postconf(binary: str, name: str) -> str:
    postconf = os.path.join(os.path.dirname(binary), "postconf")
    done = subprocess.run([postconf, "-d", "-h", name], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


# Every service of a Postfix that receives and relays (Debian's master.cf without
# the local, pickup and pipe ones), none chrooted: the instance lives in a temp dir.
_MASTER_CF = """\
{listen} inet n - n - - smtpd
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
lmtp      unix  - - n -    - lmtp
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixInstance:
    """A throw-away Postfix (and its smtp-sink) with everything under ``home``."""

    def __init__(self, binary: str, home: str, store_lmtp: tuple[str, int]):
        self.binary = binary
        self.home = Path(home)
        self.store_lmtp = store_lmtp
        self.address = ("127.0.0.1", free_port("127.0.0.1"))
        self.sink_address = ("127.0.0.1", free_port("127.0.0.1"))
        self.version = _postconf(binary, "mail_version") or "?"
        self.daemons = _postconf(binary, "daemon_directory") or "/usr/lib/postfix/sbin"
        self.log = MailLog(self.home / "maillog")
        self.proc: subprocess.Popen | None = None
        self.sink: subprocess.Popen | None = None

    @property
    def conf(self) -> Path:
        return self.home / "conf"

    def _main_cf(self) -> str:
        h = self.home
        store = f"lmtp:[{self.store_lmtp[0]}]:{self.store_lmtp[1]}"
        sink = f"relay:[{self.sink_address[0]}]:{self.sink_address[1]}"
        return f"""# throw-away Postfix for `intermail bench smtp`: receive, queue, relay; defaults otherwise
compatibility_level = 3.6
queue_directory = {h}/queue
data_directory = {h}/data
maillog_file = {h}/maillog
maillog_file_prefixes = {h}
syslog_name = postfix-bench
myhostname = postfix.bench.invalid
mydomain = bench.invalid
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = {self.address[0]}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {DOMAIN}, {SINK_DOMAIN}
transport_maps = inline:{{ {DOMAIN}={store}, {SINK_DOMAIN}={sink} }}
smtpd_recipient_restrictions = permit_mynetworks, reject
biff = no
append_dot_mydomain = no
"""

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("conf", "queue", "data"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam(_postconf(self.binary, "mail_owner") or "postfix")
        os.chown(self.home / "data", user.pw_uid, user.pw_gid)
        (self.conf / "main.cf").write_text(self._main_cf())
        (self.conf / "master.cf").write_text(_MASTER_CF.format(listen=f"{self.address[0]}:{self.address[1]}"))
        sink = shutil.which("smtp-sink", path=_sbin_path())
        if sink is None:
            raise RuntimeError("smtp-sink is missing (Debian ships it in the postfix package)")
        with open(self.home / "sink.log", "wb") as out:
            # -u: it refuses to run as root; 256: listen backlog
            self.sink = subprocess.Popen([sink, "-u", "nobody", "-h", "sink.bench.invalid",
                                          f"{self.sink_address[0]}:{self.sink_address[1]}", "256"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.home,
                                         start_new_session=True)
        # `postfix check` creates the queue directories with their owners and modes
        check = subprocess.run([self.binary, "-c", str(self.conf), "check"], capture_output=True, text=True,
                               timeout=120)
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed ({check.returncode}): {check.stderr.strip()} {self.log_tail()}")
        with open(self.home / "master.out", "wb") as out:
            # in the foreground; it makes itself a session leader, so its children are its process group
            self.proc = subprocess.Popen([os.path.join(self.daemons, "master"), "-c", str(self.conf), "-s"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.home)
        deadline = time.monotonic() + timeout
        for address, proc in ((self.address, self.proc), (self.sink_address, self.sink)):
            while not _answers_220(address):
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{address[0]}:{address[1]} did not answer in {timeout:g} s: "
                                       f"{self.log_tail()}")
                time.sleep(0.05)

    def pids(self) -> dict[str, list[int]]:
        return {"postfix": [self.proc.pid] if self.proc is not None and self.proc.poll() is None else [],
                "smtp-sink": [self.sink.pid] if self.sink is not None and self.sink.poll() is None else []}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master (it passes it on to its process group), then make sure the group is gone."""
        for proc in (self.proc, self.sink):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            deadline = time.monotonic() + timeout
            while group_alive(proc.pid):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)

    def log_tail(self, lines: int = 3) -> str:
        text = ""
        for path in (self.home / "maillog", self.home / "master.out", self.home / "sink.log"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])


def _answers_220(address: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=1) as sock:
        sock.settimeout(2)
        return sock.recv(512).startswith(b"220")
    return False


def _postfix_home(base: str, notes: list[str]) -> tuple[str, str | None]:
    """Where Postfix's files go, and a directory made for them alone (to remove), if any.

    Under ``base`` when Postfix's unprivileged user can reach it (``base``
    is ours to open up; its parents are not), else a directory of its own in
    the system temp directory.
    """
    if all(parent.stat().st_mode & 0o001 for parent in Path(base).resolve().parents):
        return os.path.join(base, "postfix"), None
    own = tempfile.mkdtemp(prefix="bench-smtp-postfix-")
    os.chmod(own, 0o711)
    notes.append("Postfix's queue is in the system temp directory: its mail user cannot reach --dir")
    return own, own


async def _start_postfix(base: str, store_lmtp: tuple[str, int],
                         notes: list[str]) -> tuple[PostfixInstance | None, str | None]:
    """The running instance (None when unavailable, with a note) and a directory of its own to remove."""
    binary = await asyncio.to_thread(find_or_install_postfix, notes)
    if binary is None:
        return None, None
    if os.geteuid() != 0:
        notes.append("baseline unavailable: a Postfix instance must be started as root")
        return None, None
    home, own = _postfix_home(base, notes)
    postfix: PostfixInstance | None = None
    try:
        postfix = PostfixInstance(binary, home, store_lmtp)
        await asyncio.to_thread(postfix.start)
    except (OSError, RuntimeError, TimeoutError, KeyError, subprocess.SubprocessError) as exc:
        notes.append(f"baseline unavailable: postfix did not start: {exc}")
        if postfix is not None:
            postfix.stop()
        return None, own
    return postfix, own


# -- ours: dird + mssd + mtad -----------------------------------------------------------


def _cluster(base: str, sessions: int) -> TestCluster:
    cluster = TestCluster(os.path.join(base, "data"), sections={
        "storage": {"fsync": True},
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "limits": {"connections_per_ip": max(100, 2 * sessions)},
        "runner": {"loop": "auto"}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mta1", "mta", ports={"smtp": 0, "rpc": 0})
    cluster.write()
    return cluster


async def _stored(cluster: TestCluster, users: int) -> int:
    """Messages in the INBOXes of all bench accounts on mss1."""
    async with RpcClient([cluster.address("mss1", "rpc")], instance="bench") as rpc:
        total = 0
        for i in range(users):
            status = await rpc.call("mailbox.status", {"user": f"user{i}@{DOMAIN}", "name": "INBOX"},
                                    idempotent=True)
            total += int(status["messages"])
        return total


# -- the bench --------------------------------------------------------------------------


def _side(stats: LoadStats) -> dict[str, Any]:
    out = {"accepted": stats.accepted, "errors": stats.errors, "error_samples": stats.samples,
           "seconds": round(stats.seconds, 3),
           "latency_ms": {"p50": stats.latency_ms(0.5), "p99": stats.latency_ms(0.99)},
           "client_cpu": stats.client_cpu, "server_cpu": stats.server_cpu}
    if stats.backlog is not None:
        out |= {"backlog": stats.backlog, "drain_seconds": stats.drain_seconds}
    if stats.accept_seconds:
        out |= {"delivered": stats.delivered, "accept_seconds": round(stats.accept_seconds, 3),
                "accepted_per_s": round(stats.accepted / stats.accept_seconds, 1)}
    return out


def _result(case: str, params: dict, metric: str, mine: LoadStats, theirs: LoadStats | None, baseline_name: str,
            rate: Callable[[LoadStats], float], notes: list[str], details: dict) -> dict[str, Any]:
    ours, base = rate(mine), rate(theirs) if theirs is not None else None
    result = {
        "case": case, "params": params, "metric": metric, "ours": round(ours, 1),
        "baseline": round(base, 1) if base is not None else None, "baseline_name": baseline_name,
        "ratio": round(ours / base, 3) if base else None,
        "errors": {"ours": mine.errors, "baseline": theirs.errors if theirs is not None else None},
        "details": {"ours": _side(mine), "baseline": _side(theirs) if theirs is not None else None, **details},
    }
    if theirs is None:
        result["note"] = next((n for n in notes if n.startswith("baseline unavailable")), "baseline unavailable")
    return result


class _Cases:
    """The cases of one bench run over the started sides, and what they noted."""

    def __init__(self, ours: OurCluster, postfix: PostfixInstance | None, sessions: int, size: int, users: int,
                 notes: list[str]):
        self.ours = ours
        store_pids = {kind: pids for kind, pids in ours.pids().items() if kind != "mtad"}
        self.theirs = PostfixTarget(postfix, DOMAIN, store_pids) if postfix is not None else None
        self.to_sink = PostfixTarget(postfix, SINK_DOMAIN, {}) if postfix is not None else None
        self.baseline_name = f"postfix {postfix.version}" if postfix is not None else "postfix (unavailable)"
        self.sessions, self.users, self.notes = sessions, users, notes
        self.sender, self.sink_sender = Sender(size, users), Sender(size, users, SINK_DOMAIN)
        self.broken: set[Target] = set()  # a Postfix that failed in a case is not waited for again
        storage = config_module.load(None).storage
        self.params = {"sessions": sessions, "size": size, "recipients": 1, "users": users,
                       "mirrors": storage.mirrors, "fsync": storage.fsync}
        self.label = f"sessions={sessions} size={size_label(size)}"

    async def prime(self) -> None:
        for target in (self.ours, self.theirs, self.to_sink):
            if target is None:
                continue
            errors = await prime(target, self.sink_sender if target is self.to_sink else self.sender, self.users)
            if errors:
                self.notes.append(f"{target.name}: {len(errors)} of {self.users} first messages failed, "
                                  f"e.g. {errors[0]}")
            if not await target.drain():
                self.notes.append(f"{target.name}: the first messages were not all delivered (time out or stall)")

    async def _drained(self, run: Callable[[], Awaitable[LoadStats]]) -> LoadStats:
        """``run``, once neither side has a backlog left that would compete with it."""
        for target in (self.ours, self.theirs):
            if target is not None and target not in self.broken and not await target.drain():
                self.notes.append(f"{target.name}: backlog not delivered (time out or stall) before a case")
        return await run()

    async def _baseline(self, run: Callable[[], Awaitable[LoadStats]]) -> LoadStats | None:
        """A baseline case; None (and a note) when Postfix fails in it: the bench goes on without."""
        if self.theirs is None or self.theirs in self.broken:
            return None
        try:
            return await self._drained(run)
        except (OSError, EOFError, asyncio.LimitOverrunError) as exc:  # EOFError: IncompleteReadError
            self.notes.append(f"baseline unavailable: postfix failed during a case: {exc!r}")
            self.broken.update(t for t in (self.theirs, self.to_sink) if t is not None)
            return None

    async def _both(self, ours_first: bool, run: Callable[[Target], Awaitable[LoadStats]]
                    ) -> tuple[LoadStats, LoadStats | None]:
        theirs = self.theirs
        if ours_first:
            mine = await self._drained(lambda: run(self.ours))
            return mine, await self._baseline(lambda: run(theirs))  # type: ignore[arg-type]
        other = await self._baseline(lambda: run(theirs))  # type: ignore[arg-type]
        return await self._drained(lambda: run(self.ours)), other

    async def accept(self, seconds: float) -> dict[str, Any]:
        warmup = min(1.0, max(0.1, seconds / 5))
        mine, other = await self._both(True, lambda target: run_accept(target, self.sessions, seconds, warmup,
                                                                       self.sender, self.users))
        return _result(f"smtp accept {self.label}", self.params, "accepted/s", mine, other, self.baseline_name,
                       lambda s: s.accepted / s.seconds if s.seconds else 0.0, self.notes,
                       {"seconds": seconds, "warmup": warmup, "first": "ours"})

    async def end_to_end(self, messages: int) -> dict[str, Any]:
        mine, other = await self._both(False, lambda target: run_end_to_end(target, self.sessions, messages,
                                                                            self.sender, self.users))
        details: dict[str, Any] = {"messages": messages, "first": "baseline" if self.theirs is not None else "ours"}
        to_sink = self.to_sink
        sunk = await self._baseline(lambda: run_end_to_end(to_sink, self.sessions, messages,  # type: ignore[arg-type]
                                                           self.sink_sender, self.users))
        if sunk is not None:
            details["baseline_to_sink"] = _side(sunk) | {
                "delivered_per_s": round(sunk.delivered / sunk.seconds, 1) if sunk.seconds else None,
                "what": f"Postfix relaying {SINK_DOMAIN} to smtp-sink (no store): not comparable, for reference"}
        return _result(f"smtp end-to-end {self.label}", self.params | {"messages": messages}, "delivered/s", mine,
                       other, self.baseline_name, lambda s: s.delivered / s.seconds if s.seconds else 0.0,
                       self.notes, details)

    async def check_store(self, cluster: TestCluster) -> dict[str, int]:
        """What mss1 holds against what both sides delivered there (a note when they differ)."""
        for target in (self.ours, self.theirs):
            if target is not None and target not in self.broken and not await target.drain():
                self.notes.append(f"{target.name}: backlog not delivered (time out or stall) at the end")
        expected = self.ours.accepted_total + (await self.theirs.delivered() if self.theirs is not None else 0)
        stored = await _stored(cluster, self.users)
        if stored != expected:
            self.notes.append(f"mss1 holds {stored} messages in the bench accounts, {expected} were delivered there")
        return {"messages": stored, "expected": expected}


async def run_bench(sessions: int, seconds: float, size: int, users: int, messages: int,
                    directory: str | None = None, progress=None) -> dict:
    message_parts(size)  # a size too small for the header block fails before anything starts
    storage = config_module.load(None).storage
    notes = [f"ours: mtad + mssd + dird with [storage] fsync = {str(storage.fsync).lower()}, {storage.mirrors} "
             "mirrors (the defaults) for the queue and the store; a 250 means durable on every mirror"]
    base = tempfile.mkdtemp(prefix="bench-smtp-", dir=directory)
    os.chmod(base, 0o711)  # Postfix's unprivileged daemons work below it
    cluster = _cluster(base, sessions)
    ours: OurCluster | None = None
    postfix: PostfixInstance | None = None
    postfix_own: str | None = None
    try:
        await asyncio.to_thread(cluster.start_all, ["dir1", "mss1", "mta1"])
        await provision(cluster, users)
        ours = OurCluster(cluster)
        postfix, postfix_own = await _start_postfix(base, cluster.address("mss1", "lmtp"), notes)
        if postfix is not None:
            notes.append(f"baseline: Postfix {postfix.version} (compatibility_level 3.6, default fsync), relaying "
                         f"{DOMAIN} over LMTP to the same mssd, without a delivery key")
        cases = _Cases(ours, postfix, sessions, size, users, notes)
        await cases.prime()
        results = [await cases.accept(seconds)]
        if progress:
            progress(results[-1])
        results.append(await cases.end_to_end(messages))
        results[-1]["details"]["stored_in_mss"] = await cases.check_store(cluster)
        if progress:
            progress(results[-1])
        return {"bench": "smtp", "results": results, "notes": notes, "host": host_info(base)}
    finally:
        if ours is not None:
            await ours.close()
        if postfix is not None:
            await asyncio.to_thread(postfix.stop)
        await asyncio.to_thread(cluster.stop_all)
        shutil.rmtree(base, ignore_errors=True)
        if postfix_own is not None:
            shutil.rmtree(postfix_own, ignore_errors=True)
