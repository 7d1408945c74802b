"""``intermail bench failover``: SIGKILL of the active store under load, timed until LMTP and IMAP work again.

The cluster (real processes on loopback, :class:`~intermail.testing.procs.TestCluster`):
``dird``, ``mssd`` ``mss1`` (active) and ``mss1b`` (its spare, the same
store directories), ``accessd`` (IMAP) and ``monitord`` with fast probe
settings (``[monitor] interval``, ``timeout``, ``down_after``: options of
the bench, printed with the figures), cheap argon2, ``tls.auth_without_tls``,
``[storage]`` at its defaults (fsync on, 2 mirrors).

One trial: ``clients`` LMTP clients deliver into the identity's LMTP
address back to back, each message with a unique subject and a unique
``XDELIVERYKEY=`` MAIL parameter; a delivery that got no 250 (connection
refused or lost, a 4xx) is sent again with the *same* key, as an MTA
retries a queue entry, so a message whose end of DATA reached the dying
store is exercised against I-4 (stored once, or stored by the retry).  After
a random 0.5-1.5 s of load the current owner of ``mss1`` gets SIGKILL.
Measured from the kill:

- **kill to LMTP 250**: the first 250 on an LMTP connection opened after the
  kill (a reply read after the kill on an older connection could have been
  written by the dead store before it died);
- **kill to IMAP FETCH**: the first ``FETCH 1 (FLAGS)`` sent after the kill
  and answered OK with its ``* 1 FETCH`` by one IMAP session that was opened
  (LOGIN, SELECT INBOX) before the first trial and is kept across all of
  them, issuing ``NOOP`` and ``FETCH 1 (FLAGS)`` in a loop.  A ``* BYE`` (or
  the connection closing) is counted as ``bye`` and the session is opened
  again: the design says a client sees a pause, not an error.

Then the load stops (each client first gets its pending delivery
acknowledged), the killed instance is started again -- it comes back as the
spare -- and the next trial waits until the monitor has logged it UP (and
the identity UP again): the identity flips between the two instances.

*Baseline*, measured in the same run (``baseline_trials``, default as many
as ``trials``, alternating with them so that both meet the same mailbox
sizes; ``monitord`` is stopped for these and started again for the
others): the same trial, but right after the SIGKILL the bench itself sends
``mss.takeover`` to the spare (a connection opened before the kill), as the
monitor does once it has declared the owner DOWN.  It is the floor the
monitor-driven figure can reach: ``ratio`` = ours / baseline (above 1:
slower) is the cost of detection (probe rounds, ``down_after``) on top of
the take-over itself (open the store, roll the journal forward, bind the
address) and the clients' reconnects.

After all trials every mailbox is read through the store RPC
(``message.fetch``): ``lost`` counts acknowledged subjects missing,
``doubled`` subjects stored more than once, ``unacked_stored`` stored
subjects never acknowledged (0 while every delivery is retried to its 250).

Result per case: ``metric`` ``"s"``, ``ours`` = ``median`` (of the
monitor-driven trials), ``p99`` (nearest rank: with fewer than 100 trials,
the largest), ``max``, ``trials``, ``lost``, ``doubled``, ``bye``,
``imap_failed`` (FETCHes answered other than OK: a pause was promised, not
an error), ``baseline`` (median of the direct take-overs), ``target``
(median <= 1 s, p99 <= 2 s) and ``target_met``; ``details`` hold every
sample and where the time went, per side: kill to the identity declared
DOWN (the monitor's log), kill to the take-over answered, the spare's own
take-over seconds, kill to accessd's store connection made again (its
log).  The report adds ``deliveries`` (acknowledged, stored, cut off after
their end of DATA and retried) and ``trials`` (each one, in order).

Logs: nothing; returns the JSON contract of ``intermail bench``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import math
import random
import re
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intermail.admin.bench_lmtp import DOMAIN, PASSWORD
from intermail.admin.bench_lmtp import _provision as provision
from intermail.admin.bench_storage import host_info
from intermail.apps.mss import DELIVERY_KEY_PARAM
from intermail.errors import ErrorKind, MailError
from intermail.mailstore import mime
from intermail.net.runner import read_ready_file
from intermail.rpc.client import RpcClient
from intermail.testing.lmtpclient import LmtpTestClient, dot_stuff
from intermail.testing.procs import TestCluster

__all__ = ["run_bench", "DEFAULT_INTERVAL", "DEFAULT_TIMEOUT", "DEFAULT_DOWN_AFTER", "TARGET_MEDIAN", "TARGET_P99"]

IDENTITY = "mss1"
INSTANCES = ("mss1", "mss1b")  # the identity's active instance and its spare
SENDER = "bench@load.test"
DEFAULT_INTERVAL = 0.1  # [monitor] interval, seconds between probe rounds
DEFAULT_TIMEOUT = 0.3  # [monitor] timeout, seconds one probe may take
DEFAULT_DOWN_AFTER = 3  # [monitor] down_after, failed probes in a row before DOWN
TARGET_MEDIAN = 1.0  # seconds, kill to service again (ARCHITECTURE: sub-second detection)
TARGET_P99 = 2.0
KILL_AFTER = (0.5, 1.5)  # seconds of load before the kill, uniformly at random
RETRY_DELAY = 0.02  # seconds between an LMTP client's retries (also the resolution of the LMTP figure)
IMAP_PACE = 0.01  # seconds between two NOOP + FETCH rounds of the IMAP session
LMTP_TIMEOUT = 10.0  # seconds for one LMTP connect or reply
IMAP_TIMEOUT = 60.0  # seconds for one IMAP reply (accessd waits up to access.failover_window for a store)
MEASURE_TIMEOUT = 30.0  # seconds after a kill both figures must be in
SETTLE_TIMEOUT = 30.0  # seconds for the restarted instance to be ready and seen UP, or the load to stop
ERROR_SAMPLES = 5

_LITERAL = re.compile(rb"\{(\d+)\}\r\n\Z")


def user_address(n: int) -> str:
    return f"user{n}@{DOMAIN}"


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile (``q`` = 0.99: with fewer than 100 values, the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _wall(ts: str) -> float:
    """A log line's ``ts`` (ISO 8601, UTC) as a Unix time."""
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# -- what one trial saw -----------------------------------------------------------------


@dataclass
class Trial:
    phase: str  # "monitor" or "baseline"
    index: int
    victim: str  # the owner killed
    successor: str  # the spare expected to take over
    killed_at: float | None = None  # monotonic
    killed_wall: float = 0.0
    lmtp: float | None = None  # seconds from the kill to the first 250 on a new connection
    imap: float | None = None  # seconds from the kill to the first FETCH (sent after it) answered
    bye: int = 0
    imap_no: int = 0
    delivered: int = 0
    in_doubt: int = 0  # deliveries whose connection died after their end of DATA, before the reply
    down: float | None = None  # kill to the monitor declaring the identity DOWN (its log)
    takeover: float | None = None  # kill to the take-over answered (the monitor's log, or our call)
    store_seconds: float | None = None  # the spare's own take-over time (open, recover, bind)
    access_connected: float | None = None  # kill to accessd's store RPC connection made again (its log)
    failure: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def prefix(self) -> str:
        return f"{self.phase[0]}{self.index}"

    def lmtp_acknowledged(self, opened: float, now: float) -> None:
        if self.killed_at is not None and self.lmtp is None and opened > self.killed_at:
            self.lmtp = now - self.killed_at
            self._check()

    def fetch_answered(self, sent: float, now: float) -> None:
        if self.killed_at is not None and self.imap is None and sent > self.killed_at:
            self.imap = now - self.killed_at
            self._check()

    def _check(self) -> None:
        if self.lmtp is not None and self.imap is not None:
            self.done.set()

    def as_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)
        return {"phase": self.phase, "trial": self.index + 1, "killed": self.victim, "took_over": self.successor,
                "lmtp_s": r(self.lmtp), "imap_s": r(self.imap), "down_s": r(self.down),
                "takeover_s": r(self.takeover), "store_s": self.store_seconds,
                "access_connected_s": r(self.access_connected), "delivered": self.delivered,
                "in_doubt": self.in_doubt, "bye": self.bye, "imap_no": self.imap_no,
                **({"failure": self.failure} if self.failure else {})}


@dataclass
class Ledger:
    """Every delivery of the run: what was acknowledged, what was left in doubt, what was refused."""

    acked: dict[str, str] = field(default_factory=dict)  # subject (= key) -> recipient
    in_doubt: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    unfinished: dict[str, str] = field(default_factory=dict)  # given up when the load had to stop
    temp_replies: int = 0
    samples: list[str] = field(default_factory=list)

    def sample(self, what: str) -> None:
        if len(self.samples) < ERROR_SAMPLES and what not in self.samples:
            self.samples.append(what)


# -- the LMTP load ----------------------------------------------------------------------


def message(subject: str, rcpt: str) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@bench.failover>\r\n"
            "\r\n")
    return head.encode() + b"A message of the failover bench, delivered exactly once.\r\n" * 8


class _Attempt:
    data_sent = False  # the message and its final dot were written: the outcome is unknown without a reply


async def _transaction(client: LmtpTestClient, rcpt: str, key: str, data: bytes, attempt: _Attempt) -> tuple[int, str]:
    code, text = await client.command(f"MAIL FROM:<{SENDER}> {DELIVERY_KEY_PARAM}={key}")
    if code == 250:
        code, text = await client.command(f"RCPT TO:<{rcpt}>")
        if code == 250:
            code, text = await client.command("DATA")
            if code != 354:
                return code, text
            attempt.data_sent = True
            client.writer.write(dot_stuff(data))
            await client.writer.drain()
            return await client.reply()
    await client.command("RSET")
    return code, text


_LOST = (OSError, TimeoutError, EOFError, ValueError, asyncio.LimitOverrunError)  # EOFError: IncompleteReadError


async def lmtp_client(address: tuple[str, int], n: int, rcpt: str, trial: Trial, ledger: Ledger,
                      stop: asyncio.Event) -> None:
    """Deliver back to back until ``stop``; every delivery retried with its key until it gets its 250."""
    client: LmtpTestClient | None = None
    opened = 0.0
    serial = 0
    key = ""
    try:
        while not stop.is_set():
            key = f"{trial.prefix}-c{n}-{serial}"
            serial += 1
            data = message(key, rcpt)
            while True:
                if client is None:
                    try:
                        client = await LmtpTestClient.connect(*address, timeout=LMTP_TIMEOUT, name="bench.failover")
                        opened = time.monotonic()
                    except _LOST as exc:
                        if not isinstance(exc, ConnectionRefusedError):  # refused: nobody serves the address yet
                            ledger.sample(f"connect: {exc!r}"[:200])
                        await asyncio.sleep(RETRY_DELAY)
                        continue
                attempt = _Attempt()
                try:
                    code, text = await _transaction(client, rcpt, key, data, attempt)
                except _LOST:
                    if attempt.data_sent:
                        ledger.in_doubt.add(key)
                        trial.in_doubt += 1
                    client.writer.close()
                    client = None
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                if code == 250:
                    ledger.acked[key] = rcpt
                    trial.delivered += 1
                    trial.lmtp_acknowledged(opened, time.monotonic())
                    break
                if 400 <= code < 500:  # temporary: the same key again, as an MTA's queue would
                    ledger.temp_replies += 1
                    ledger.sample(f"{code} {text}"[:200])
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                ledger.refused[key] = f"{code} {text}"
                ledger.sample(f"{code} {text}"[:200])
                break
            key = ""
    except asyncio.CancelledError:
        if key:  # given up unacknowledged: may or may not be stored
            ledger.unfinished[key] = rcpt
        raise
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


# -- the IMAP session -------------------------------------------------------------------


class ImapSession:
    """One IMAP connection: tagged commands, untagged lines kept, a BYE noticed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.serial = 0
        self.bye = False

    @classmethod
    async def open(cls, address: tuple[str, int], user: str) -> ImapSession:
        async with asyncio.timeout(IMAP_TIMEOUT):
            reader, writer = await asyncio.open_connection(*address)
        session = cls(reader, writer)
        try:
            greeting = await session._line()
            if not greeting.startswith(b"* OK"):
                raise ConnectionError(f"greeting {greeting[:100]!r}")
            for command in (f'LOGIN "{user}" "{PASSWORD}"', "SELECT INBOX"):
                status, text, _ = await session.command(command)
                if status != "OK":
                    raise ConnectionError(f"{command.split()[0]}: {status} {text}")
        except BaseException:
            writer.close()
            raise
        return session

    async def _line(self) -> bytes:
        async with asyncio.timeout(IMAP_TIMEOUT):
            line = await self.reader.readuntil(b"\r\n")
            while (match := _LITERAL.search(line)) is not None:
                line += await self.reader.readexactly(int(match.group(1)))
                line += await self.reader.readuntil(b"\r\n")
        if line.startswith(b"* BYE"):
            self.bye = True
        return line

    async def command(self, text: str) -> tuple[str, str, list[bytes]]:
        """The tagged status (OK, NO, BAD), the rest of the tagged line, and the untagged lines before it."""
        self.serial += 1
        tag = f"f{self.serial}".encode()
        self.writer.write(tag + b" " + text.encode() + b"\r\n")
        await self.writer.drain()
        untagged = []
        while True:
            line = await self._line()
            if line.startswith(tag + b" "):
                status, _, rest = line[len(tag) + 1:].decode(errors="replace").rstrip("\r\n").partition(" ")
                return status, rest, untagged
            untagged.append(line)

    def close(self) -> None:
        self.writer.close()


class ImapWatcher:
    """The IMAP session kept across every trial; tells the current trial when FETCH works again."""

    def __init__(self, address: tuple[str, int], user: str):
        self.address, self.user = address, user
        self.trial: Trial | None = None
        self.session: ImapSession | None = None
        self.opened = asyncio.Event()
        self.byes = 0  # sessions that saw a BYE (or lost their connection)
        self.imap_no = 0  # FETCHes not answered OK with the message's flags
        self.samples: list[str] = []

    def _note(self, what: str) -> None:
        if len(self.samples) < ERROR_SAMPLES:
            self.samples.append(what[:400])

    async def run(self) -> None:
        while True:
            if self.session is None:
                try:
                    self.session = await ImapSession.open(self.address, self.user)
                    self.opened.set()
                except (*_LOST, ConnectionError) as exc:
                    self._note(f"open: {exc!r}")
                    await asyncio.sleep(RETRY_DELAY)
                    continue
            try:
                await self._round(self.session)
            except _LOST as exc:
                self._lost(f"connection: {exc!r}")
            if self.session is not None and self.session.bye:
                self._lost("BYE")
            await asyncio.sleep(IMAP_PACE)

    async def _round(self, session: ImapSession) -> None:
        await session.command("NOOP")
        sent = time.monotonic()
        status, text, untagged = await session.command("FETCH 1 (FLAGS)")
        now = time.monotonic()
        trial = self.trial
        if status == "OK" and any(line.startswith(b"* 1 FETCH ") for line in untagged):
            if trial is not None:
                trial.fetch_answered(sent, now)
            return
        where = "between trials"
        if trial is not None:
            trial.imap_no += 1
            where = f"{trial.phase} trial {trial.index + 1}"
            if trial.killed_at is not None:
                where += f", sent {sent - trial.killed_at:.3f} s after the kill, answered {now - sent:.3f} s later"
        self.imap_no += 1
        self._note(f"FETCH 1 (FLAGS) {where}: {status} {text}; untagged {untagged[-3:]!r}")

    def _lost(self, why: str) -> None:
        """The session ended under us: counted as a BYE, and a new one is opened."""
        self.byes += 1
        where = "between trials"
        if self.trial is not None:
            self.trial.bye += 1
            where = f"{self.trial.phase} trial {self.trial.index + 1}"
        self._note(f"session ended ({where}): {why}")
        if self.session is not None:
            self.session.close()
        self.session = None


# -- the cluster ------------------------------------------------------------------------


def make_cluster(base: str, interval: float, timeout: float, down_after: int) -> TestCluster:
    cluster = TestCluster(Path(base) / "data", sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "monitor": {"interval": interval, "timeout": timeout, "down_after": down_after},
        "tls": {"auth_without_tls": True},
        "limits": {"connections_per_ip": 200},
        "runner": {"loop": "auto"}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity=IDENTITY, role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mss1b", "mss", identity=IDENTITY, role="spare", ports={"rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0})
    cluster.add("mon", "monitor", ports={})
    cluster.write()
    return cluster


def recorded_owner(cluster: TestCluster) -> str:
    """The owner of the identity as ``<data>/run/owners.json`` says (the active instance without one)."""
    with contextlib.suppress(OSError, ValueError):
        owners = json.loads((cluster.data / "run" / "owners.json").read_text()).get("owners", {})
        if owners.get(IDENTITY) in INSTANCES:
            return owners[IDENTITY]
    return INSTANCES[0]


class LogWatch:
    """The JSON lines one process appended to its log since a mark."""

    def __init__(self, path: Path):
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def events(self, since: int, event: str, **fields: Any) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(since)
                data = fh.read()
        except OSError:
            return []
        found = []
        for line in data.splitlines():
            if line.startswith(b"{") and event.encode() in line:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                        found.append(record)
        return found

    async def wait(self, since: int, event: str, timeout: float, **fields: Any) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(since, event, **fields)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} {fields} in {self.path.name} within {timeout:g} s")
            await asyncio.sleep(0.02)


# -- one trial --------------------------------------------------------------------------


class FailoverBench:
    def __init__(self, cluster: TestCluster, clients: int, users: int, rng: random.Random):
        self.cluster = cluster
        self.clients, self.users = clients, users
        self.rng = rng
        self.ledger = Ledger()
        self.imap = ImapWatcher(cluster.address("access1", "imap"), user_address(0))
        self.monitor_log = LogWatch(cluster.procs["mon"].log_file)
        self.access_log = LogWatch(cluster.procs["access1"].log_file)
        self.owner = INSTANCES[0]

    async def trial(self, phase: str, index: int) -> Trial:
        victim = self.owner
        successor = next(i for i in INSTANCES if i != victim)
        trial = Trial(phase, index, victim, successor)
        self.imap.trial = trial
        stop = asyncio.Event()
        lmtp = self.cluster.address(IDENTITY, "lmtp")
        load = [asyncio.create_task(lmtp_client(lmtp, n, user_address(n % self.users), trial, self.ledger, stop))
                for n in range(self.clients)]
        control = None
        try:
            if phase == "baseline":  # the take-over call's connection is open before the kill
                control = RpcClient([read_ready_file(self.cluster.procs[successor].ready_file)["control"]],
                                    instance="bench", request_timeout=SETTLE_TIMEOUT, reconnect_window=0.0,
                                    keepalive=None)
                await control.call("mss.status", {})
            mark, access_mark = self.monitor_log.mark(), self.access_log.mark()
            await asyncio.sleep(self.rng.uniform(*KILL_AFTER))
            await self._kill(trial, control)
            try:
                await asyncio.wait_for(trial.done.wait(), MEASURE_TIMEOUT)
            except TimeoutError:
                trial.failure = (f"not served again within {MEASURE_TIMEOUT:g} s (LMTP {trial.lmtp}, "
                                 f"IMAP {trial.imap})")
        finally:
            stop.set()
            await self._stop_load(load)
            if control is not None:
                await control.close()
        if trial.failure:
            return trial
        connected = self.access_log.events(access_mark, "rpc.connected",
                                           address=list(self.cluster.address(IDENTITY, "rpc")))
        if connected:
            trial.access_connected = _wall(connected[0]["ts"]) - trial.killed_wall
        await asyncio.to_thread(lambda: self.cluster.start(victim).wait_ready(SETTLE_TIMEOUT))
        if phase == "monitor":
            await self._settle(trial, mark)
        owner = recorded_owner(self.cluster)
        if owner != successor:
            trial.failure = f"owners.json names {owner} after {victim} was killed"
        self.owner = owner
        return trial

    async def _kill(self, trial: Trial, control: RpcClient | None) -> None:
        proc = self.cluster.procs[trial.victim].proc
        assert proc is not None
        trial.killed_wall = time.time()
        trial.killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        if control is not None:  # baseline: we are the monitor, with nothing to detect
            try:
                answer = await control.call("mss.takeover", {"bind_timeout": SETTLE_TIMEOUT})
            except MailError as exc:
                trial.failure = f"mss.takeover of {trial.successor} failed: {exc.safe} {exc.detail}"
                trial.done.set()
            else:
                trial.takeover = time.monotonic() - trial.killed_at
                trial.store_seconds = answer.get("seconds")
        await asyncio.to_thread(proc.wait)

    async def _stop_load(self, load: list[asyncio.Task]) -> None:
        """Each client gets its pending delivery acknowledged, within reason."""
        done, pending = await asyncio.wait(load, timeout=SETTLE_TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                self.ledger.sample(f"load client failed: {task.exception()!r}")
        if pending:
            self.ledger.sample(f"{len(pending)} LMTP clients still retrying {SETTLE_TIMEOUT:g} s after the trial")

    async def _settle(self, trial: Trial, mark: int) -> None:
        """Wait until the monitor has seen the restarted instance and the identity UP; read its breakdown."""
        watch = self.monitor_log
        await watch.wait(mark, "monitor.state", SETTLE_TIMEOUT, target=trial.victim, new="up")
        await watch.wait(mark, "monitor.state", SETTLE_TIMEOUT, target=f"identity:{IDENTITY}", new="up")
        down = watch.events(mark, "monitor.state", target=f"identity:{IDENTITY}", new="down")
        if down:
            trial.down = _wall(down[0]["ts"]) - trial.killed_wall
        takeover = watch.events(mark, "monitor.takeover", identity=IDENTITY)
        if takeover:
            trial.takeover = _wall(takeover[0]["ts"]) - trial.killed_wall
            trial.store_seconds = takeover[0].get("store_seconds")
            if takeover[0].get("by") != trial.successor:
                trial.failure = f"the monitor had {takeover[0].get('by')} take over, not {trial.successor}"

    @property
    def monitor_running(self) -> bool:
        return self.cluster.procs["mon"].alive

    async def start_monitor(self) -> None:
        """Start monitord and wait until it has seen both store instances and the identity UP."""
        mark = self.monitor_log.mark()
        await asyncio.to_thread(lambda: self.cluster.start("mon").wait_ready(SETTLE_TIMEOUT))
        for target in (*INSTANCES, f"identity:{IDENTITY}"):
            await self.monitor_log.wait(mark, "monitor.state", SETTLE_TIMEOUT, target=target, new="up")

    async def stop_monitor(self) -> None:
        await asyncio.to_thread(self.cluster.procs["mon"].stop)

    async def count(self) -> dict[str, Any]:
        """Every mailbox read through the store: lost, doubled and unacknowledged-but-stored subjects."""
        stored: dict[str, collections.Counter[str]] = {}
        async with RpcClient([self.cluster.address(IDENTITY, "rpc")], instance="bench",
                             request_timeout=120.0) as rpc:
            for n in range(self.users):
                user = user_address(n)
                try:
                    result, body = await rpc.call_stream(
                        "message.fetch", {"user": user, "name": "INBOX", "uids": [[1, -1]]}, idempotent=True)
                    rows = [json.loads(line) for line in (await body.read()).splitlines()]
                except MailError as exc:
                    if exc.kind is not ErrorKind.NOTFOUND:
                        raise
                    rows = []
                stored[user] = collections.Counter(mime.from_json(r["info"]).envelope.subject for r in rows)
        lost = sorted(k for k, rcpt in self.ledger.acked.items() if stored.get(rcpt, {}).get(k, 0) == 0)
        doubled = sorted(s for counts in stored.values() for s, c in counts.items() if c > 1)
        extra = sorted(s for counts in stored.values() for s in counts
                       if s not in self.ledger.acked and s not in self.ledger.unfinished)
        in_doubt_once = sum(1 for k in self.ledger.in_doubt
                            if stored.get(self.ledger.acked.get(k, ""), {}).get(k, 0) == 1)
        return {"lost": lost, "doubled": doubled, "unacked_stored": extra, "in_doubt_stored_once": in_doubt_once,
                "stored": sum(sum(c.values()) for c in stored.values())}

    async def seed(self) -> None:
        """One message per account before the first trial: the IMAP session's FETCH 1 needs a message 1."""
        client = await LmtpTestClient.connect(*self.cluster.address(IDENTITY, "lmtp"), name="bench.failover")
        try:
            for n in range(self.users):
                rcpt = user_address(n)
                key = f"seed-{n}"
                code, text = (await client.send(SENDER, [rcpt], message(key, rcpt),
                                                params=[f"{DELIVERY_KEY_PARAM}={key}"]))[rcpt]
                if code != 250:
                    raise RuntimeError(f"seed delivery to {rcpt}: {code} {text}")
                self.ledger.acked[key] = rcpt
        finally:
            await client.close()


# -- the report -------------------------------------------------------------------------


def _figures(values: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)
    return {"median": r(statistics.median(values)) if values else None, "p99": r(quantile(values, 0.99)),
            "max": r(max(values)) if values else None, "min": r(min(values)) if values else None}


def _breakdown(trials: list[Trial]) -> dict[str, dict[str, float | None]]:
    out = {}
    for name in ("down", "takeover", "store_seconds", "access_connected"):
        values = [getattr(t, name) for t in trials if getattr(t, name) is not None]
        out[name] = _figures(values)
    return out


def build_results(monitored: list[Trial], baseline: list[Trial], counts: dict[str, Any], imap: ImapWatcher,
                  params: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    baseline_name = ("direct mss.takeover at the kill (no monitor: detection excluded)" if baseline
                     else f"target {TARGET_MEDIAN:g} s median")
    for case, attr in (("kill to LMTP 250", "lmtp"), ("kill to IMAP FETCH", "imap")):
        ours = [getattr(t, attr) for t in monitored if getattr(t, attr) is not None]
        base = [getattr(t, attr) for t in baseline if getattr(t, attr) is not None]
        mine, theirs = _figures(ours), _figures(base)
        met = (mine["median"] is not None and mine["median"] <= TARGET_MEDIAN and mine["p99"] is not None
               and mine["p99"] <= TARGET_P99 and len(ours) == len(monitored))
        results.append({
            "case": case, "params": params, "metric": "s",
            "ours": mine["median"], "median": mine["median"], "p99": mine["p99"], "max": mine["max"],
            "trials": len(ours), "failed_trials": len(monitored) - len(ours),
            "lost": len(counts["lost"]), "doubled": len(counts["doubled"]), "bye": imap.byes,
            "imap_failed": imap.imap_no,
            "baseline": theirs["median"], "baseline_name": baseline_name,
            "ratio": round(mine["median"] / theirs["median"], 3) if mine["median"] and theirs["median"] else None,
            "target": {"median": TARGET_MEDIAN, "p99": TARGET_P99}, "target_met": met,
            "details": {"samples": [None if v is None else round(v, 4) for v in (getattr(t, attr) for t in monitored)],
                        "baseline": {**theirs, "trials": len(base),
                                     "samples": [None if v is None else round(v, 4)
                                                 for v in (getattr(t, attr) for t in baseline)]},
                        "breakdown": _breakdown(monitored), "baseline_breakdown": _breakdown(baseline)},
        })
    return results


async def run_bench(trials: int, baseline_trials: int, clients: int, users: int, interval: float, timeout: float,
                    down_after: int, seed: int | None = None, directory: str | None = None,
                    progress: Callable[[Trial], None] | None = None, keep: bool = False) -> dict:
    if trials < 1 or baseline_trials < 0 or clients < 1 or users < 1 or down_after < 1:
        raise ValueError("trials, clients, users and down_after must be positive, baseline trials not negative")
    seed = random.randrange(1 << 30) if seed is None else seed
    params = {"interval": interval, "timeout": timeout, "down_after": down_after, "clients": clients,
              "users": users, "kill_after_s": list(KILL_AFTER), "seed": seed}
    notes = [f"monitor: interval {interval:g} s, timeout {timeout:g} s, down_after {down_after}; "
             f"{clients} LMTP clients back to back over {users} accounts, retries every {RETRY_DELAY:g} s "
             f"with the same XDELIVERYKEY; storage defaults (fsync on, 2 mirrors); kill moments: --seed {seed}",
             "p99 is the nearest-rank 99th percentile: with fewer than 100 trials, the largest sample"]
    base = tempfile.mkdtemp(prefix="bench-failover-", dir=directory)
    cluster = make_cluster(base, interval, timeout, down_after)
    monitored: list[Trial] = []
    baseline: list[Trial] = []
    ran: list[Trial] = []  # both, in the order they ran
    watcher_task: asyncio.Task | None = None
    try:
        await asyncio.to_thread(cluster.start_all, ["dir1", *INSTANCES, "access1"])
        await provision(cluster, users)
        bench = FailoverBench(cluster, clients, users, random.Random(seed))
        await bench.seed()
        watcher_task = asyncio.create_task(bench.imap.run())
        await asyncio.wait_for(bench.imap.opened.wait(), SETTLE_TIMEOUT)
        # Alternating, so that both sides meet the same mailbox sizes and the same machine, and each
        # side first in every other pair, so that both kill each instance about as often (the identity
        # flips at every kill).  The monitor runs for its trials only: a running one would race the
        # bench's own take-over.
        plan = []
        for index in range(max(trials, baseline_trials)):
            pair = [(phase, index) for phase, count in (("baseline", baseline_trials), ("monitor", trials))
                    if index < count]
            plan += pair if index % 2 == 0 else pair[::-1]
        for phase, index in plan:
            if phase == "monitor" and not bench.monitor_running:
                await bench.start_monitor()
            elif phase == "baseline" and bench.monitor_running:
                await bench.stop_monitor()
            trial = await bench.trial(phase, index)
            (baseline if phase == "baseline" else monitored).append(trial)
            ran.append(trial)
            if progress:
                progress(trial)
            if trial.failure:
                notes.append(f"{phase} trial {index + 1} failed: {trial.failure}; the trials stop there")
                break
        bench.imap.trial = None
        counts = await bench.count()
        ledger = bench.ledger
        results = build_results(monitored, baseline, counts, bench.imap, params)
        if bench.imap.samples:
            notes.append("IMAP session: " + "; ".join(bench.imap.samples))
        if keep:
            notes.append(f"the cluster's data directory (logs) is kept: {cluster.data}")
        return {"bench": "failover", "results": results, "notes": notes, "host": host_info(base),
                "deliveries": {"acknowledged": len(ledger.acked), "stored": counts["stored"],
                               "in_doubt_retried": len(ledger.in_doubt),
                               "in_doubt_stored_once": counts["in_doubt_stored_once"],
                               "temp_replies": ledger.temp_replies, "refused": len(ledger.refused),
                               "unfinished": len(ledger.unfinished),
                               "lost": counts["lost"][:20], "doubled": counts["doubled"][:20],
                               "unacked_stored": counts["unacked_stored"][:20], "error_samples": ledger.samples},
                "trials": [t.as_dict() for t in ran]}
    finally:
        if watcher_task is not None:
            watcher_task.cancel()
            await asyncio.gather(watcher_task, return_exceptions=True)
        await asyncio.to_thread(cluster.stop_all)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
