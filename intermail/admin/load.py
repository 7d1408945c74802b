"""``intermail load smtp|imap|pop3|mixed``: a load generator for a running cluster, with verification.

::

    intermail load smtp|imap|pop3|mixed [--target NAME|HOST:PORT]
        [--users N] [--concurrency C] (--rate R | --count N | --duration T)
        [--mix smtp=2,imap=1,pop3=1] [--size BYTES] [--verify] [--plot FILE.png]
        [--json] [--report FILE.json] [--data DIR]

Owns: the load itself -- ``concurrency`` workers, each taking the next
*transaction* from one shared schedule (paced at ``rate`` per second when
given; stopping after ``count`` transactions or ``duration`` seconds,
whichever comes first, or at Ctrl-C) -- the targets, the load accounts, and
the progress bar.  What is measured and how it is printed lives in
:mod:`.load_report`; the ``--verify`` check in :mod:`.load_verify`.

Transactions:

- **smtp**: one message of about ``size`` octets to one load account, over
  a connection the worker keeps (``--per-connection`` messages, then a new
  one, so the load spreads over the MTAs as DNS rotates them): MAIL, RCPT,
  DATA, body, each command waiting for its reply (no pipelining, so each
  command's latency is its own).  Each message carries a unique token
  (``X-Load-Token: <run>-<serial>``, also in the subject).
- **imap**: a reading session as a mail client makes it: LOGIN, SELECT
  INBOX, FETCH of the newest ten (FLAGS ENVELOPE), FETCH of the newest
  message's BODY[] (marks it seen), LOGOUT.  Nothing is deleted.
- **pop3**: USER, PASS, STAT, UIDL, RETR of the newest message, QUIT --
  nothing deleted; each session on an account no other POP3 session holds
  at that moment (the maildrop lock).
- **mixed**: all three at once, interleaved by ``--mix`` weights.

Targets: ``--target`` is a name in the cluster's zone (``mta``, ``imap``,
``pop``; a bare name gets ``.<zone>`` appended) resolved through the
cluster's own DNS server (found in ``--data``'s ``cluster.toml``), every
new connection going to the next address of the answer -- the answer is
cached for its TTL, and forgotten when a connection to one of its
addresses fails -- or ``HOST:PORT``.  The port of a resolved address is
that of the cluster instance with that address.  Defaults: ``mta`` for
SMTP, ``imap`` for IMAP, ``pop`` for POP3; in mixed mode
``--smtp-target``/``--imap-target``/``--pop3-target`` set them one by one
(as they do in any mode; ``--verify`` reads over the IMAP target).

Accounts: ``load1@<domain>`` ... ``load<N>@<domain>`` (``--domain``,
default ``load.test``; ``--password``, default ``load-password``).  Before
the load, with a cluster in ``--data``, the domain and the accounts that
are missing are created through the directory RPC (as ``intermail domain
add`` and ``intermail user add`` do) and the tool waits until every
directory instance knows them; accounts that exist are left as they are
(they must have that password).  ``--no-create-users`` skips this.

Load clients connect from loopback addresses of their own (127.250.x.y,
one per worker) when the target is on loopback, as distinct client
machines would -- otherwise the servers' per-address limits (connections,
concurrent logins) would be what is measured.

``--verify`` (smtp or mixed): after the load, every account's INBOX is
read over IMAP until each message that got its 250 has arrived, or
``--verify-timeout`` passes; it prints ``lost N doubled M``.

Output: a progress bar with the live rate on stderr (when stderr is a
terminal; otherwise a line every 5 s), then the report: transactions per
kind, p50/p90/p99/max latency of every command and transaction, errors by
reply code with samples, and the verification.  ``--json`` prints the
report as one JSON object on stdout (the text report then goes to stderr);
``--report FILE`` writes the JSON to a file; ``--plot FILE.png`` draws
throughput and latency over time (needs matplotlib, the ``plots`` extra).

Exit status: 0 done; 1 verification found lost or doubled mail, or no
transaction went through; 2 usage errors (bad options, --plot without
matplotlib, no cluster where one is needed); 3 a target could not be
resolved or the directory did not answer.

Logs: nothing (prints).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import math
import re
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from intermail.admin.bench_access import (
    ImapClient,
    Pop3Client,
    SessionError,
    client_address,
)
from intermail.admin.bench_smtp import SmtpSession
from intermail.admin.cluster import CLUSTER_FILE, listener, load_cluster
from intermail.admin.load_report import (
    PLOTS_HINT,
    Recorder,
    plot_available,
    render_text,
    write_plot,
)
from intermail.admin.load_verify import TOKEN_HEADER, Ledger, verify
from intermail.config import Config, ConfigError
from intermail.errors import ErrorKind, MailError
from intermail.proto.dotstuff import stuff_body

MODES = ("smtp", "imap", "pop3", "mixed")
DEFAULT_NAMES = {"smtp": "mta", "imap": "imap", "pop3": "pop"}
SERVING_KIND = {"smtp": "mta", "imap": "access", "pop3": "access"}
DEFAULT_MIX = "smtp=2,imap=1,pop3=1"
SENDER = "loadgen@load.invalid"
CONNECT_TIMEOUT = 10.0  # seconds to connect and get through greeting (and EHLO)
STOP_TIMEOUT = 60.0  # seconds the transactions in flight may take to finish once the load stops
EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3
_REPLY_CODE = re.compile(r"(?:\b(NO|BAD|BYE)\b|(-ERR))( \[[A-Z-]+\])?")


class LoadUsageError(Exception):
    """A problem with the command line or the environment: exit 2 with its message."""


class TargetError(Exception):
    """A target that could not be resolved: exit 3."""


# -- targets ----------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int] | None:
    host, colon, port = text.rpartition(":")
    if colon and host and port.isdigit():
        return host.strip("[]"), int(port)
    return None


class Target:
    """Where one protocol's connections go: fixed, or a DNS name of the cluster, round-robin."""

    def __init__(self, protocol: str, spec: str, config: Config | None, resolver: Any | None):
        self.protocol = protocol
        self.spec = spec
        self.fixed = _host_port(spec)
        self.config = config
        self.resolver = resolver
        self.name = ""
        if self.fixed is None:
            if config is None or resolver is None:
                raise LoadUsageError(f"--target {spec}: a DNS name needs the cluster in --data "
                                     f"({CLUSTER_FILE} not found); give HOST:PORT instead")
            self.name = spec if "." in spec else f"{spec}.{config.cluster.zone}"
        self._turn = itertools.count()

    def __str__(self) -> str:
        return self.spec if self.fixed else f"{self.name} ({self.protocol})"

    def _port(self, address: str) -> int:
        assert self.config is not None
        port_name = self.protocol
        candidates = [i for i in self.config.instances if i.address == address and i.ports.get(port_name) is not None]
        candidates += [i for i in self.config.instances_of(SERVING_KIND[self.protocol])
                       if port_name in i.ports and i not in candidates]
        for inst in candidates:
            found = listener(self.config, inst.name, port_name)
            if found is not None:
                return found[1]
        raise TargetError(f"{self}: no instance at {address} serves {port_name}")

    async def addresses(self) -> list[tuple[str, int]]:
        if self.fixed is not None:
            return [self.fixed]
        try:
            answer = await self.resolver.addresses(self.name, allow_stale=True)
        except MailError as exc:
            raise TargetError(f"{self.name}: {exc.safe}") from None
        return [(address, self._port(address)) for address in answer.addresses]

    async def next(self) -> tuple[str, int]:
        """The address the next connection goes to (the answer's addresses in turn)."""
        addresses = await self.addresses()
        if not addresses:
            raise TargetError(f"{self}: no address")
        return addresses[next(self._turn) % len(addresses)]

    def failed(self) -> None:
        """A connection failed: ask DNS again next time (the monitor may have taken the address out)."""
        if self.resolver is not None and self.name:
            self.resolver.invalidate(self.name)


def _source(worker: int, address: tuple[str, int]) -> str:
    """The source address of ``worker``'s connections to ``address``."""
    try:
        loopback = ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        loopback = address[0] == "localhost"
    return client_address(worker) if loopback else "0.0.0.0"


# -- the schedule -----------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, int]:
    weights: dict[str, int] = {}
    for part in text.split(","):
        kind, _, weight = part.strip().partition("=")
        kind = kind.strip().lower()
        if kind not in ("smtp", "imap", "pop3") or not weight.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected e.g. {DEFAULT_MIX}, got {text!r}")
        weights[kind] = int(weight)
    if not any(weights.values()):
        raise argparse.ArgumentTypeError("the mix needs a positive weight")
    return {k: w for k, w in weights.items() if w > 0}


def weighted_cycle(weights: dict[str, int]) -> list[str]:
    """One period of smooth weighted round robin: ``{smtp: 2, imap: 1}`` -> smtp, imap, smtp."""
    divisor = math.gcd(*weights.values())
    weights = {k: w // divisor for k, w in weights.items()}
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    cycle = []
    for _ in range(total):
        for kind, weight in weights.items():
            current[kind] += weight
        chosen = max(current, key=lambda k: current[k])
        current[chosen] -= total
        cycle.append(chosen)
    return cycle


class Schedule:
    """Hands out transactions: (serial, kind), paced at ``rate``, up to ``count`` or ``duration``."""

    def __init__(self, cycle: list[str], rate: float | None, count: int | None, duration: float | None):
        self.cycle = cycle
        self.rate = rate
        self.count = count
        self.duration = duration
        self.issued = 0
        self.stopped = asyncio.Event()
        self.started = time.monotonic()

    def over(self) -> bool:
        if self.stopped.is_set() or (self.count is not None and self.issued >= self.count):
            return True
        return self.duration is not None and time.monotonic() - self.started >= self.duration

    async def take(self) -> tuple[int, str] | None:
        if self.over():
            return None
        serial = self.issued
        self.issued += 1
        if self.rate:
            delay = self.started + serial / self.rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self.stopped.wait()
                if self.stopped.is_set() or (self.duration is not None
                                             and time.monotonic() - self.started >= self.duration):
                    return None
        return serial, self.cycle[serial % len(self.cycle)]


# -- errors -----------------------------------------------------------------------------


class SmtpRefused(Exception):
    def __init__(self, code: int, line: bytes, command: str):
        super().__init__(f"{command}: {line.decode('ascii', 'replace').strip()[:200]}")
        self.code = code


def classify(kind: str, exc: BaseException) -> str:
    """The key an error is counted under: its reply code, or what happened to the connection."""
    if isinstance(exc, SmtpRefused):
        return f"smtp {exc.code or 'bad reply'}"
    if isinstance(exc, SessionError):
        match = _REPLY_CODE.search(str(exc))
        if match:
            return f"{kind} {match.group(1) or match.group(2)}{match.group(3) or ''}"
        return f"{kind} unexpected answer"
    if isinstance(exc, TimeoutError):
        return f"{kind} timeout"
    if isinstance(exc, ConnectionRefusedError):
        return f"{kind} connection refused"
    if isinstance(exc, (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)):
        return f"{kind} connection lost"
    if isinstance(exc, TargetError):
        return f"{kind} no address"
    return f"{kind} {type(exc).__name__}"


# -- the load ---------------------------------------------------------------------------


class Load:
    """The workers, their connections and the transactions (one event loop)."""

    def __init__(self, args: argparse.Namespace, targets: dict[str, Target], users: list[str], run: str,
                 recorder: Recorder, ledger: Ledger):
        self.args = args
        self.targets = targets
        self.users = users
        self.run = run
        self.recorder = recorder
        self.ledger = ledger
        self.free_pop3_users: asyncio.Queue[str] = asyncio.Queue()
        for user in users:
            self.free_pop3_users.put_nowait(user)
        self.body = self._body(args.size)

    @staticmethod
    def _body(size: int) -> bytes:
        line = b"The quick brown fox jumps over the lazy dog while the load runs on.\r\n"
        lines = max(1, (size - 400) // len(line))
        return stuff_body(b"Load generated by intermail load.\r\n" + b".a stuffed line\r\n" + line * lines)

    def message(self, token: str, rcpt: str) -> bytes:
        return ("From: Load Generator <" + SENDER + ">\r\n"
                f"To: <{rcpt}>\r\n"
                f"Subject: load {token}\r\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
                f"Message-ID: <{token}@load.invalid>\r\n"
                f"{TOKEN_HEADER}: {token}\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n").encode() + self.body

    async def worker(self, index: int, schedule: Schedule) -> None:
        smtp = _SmtpConnection(self, index)
        try:
            while (ticket := await schedule.take()) is not None:
                serial, kind = ticket
                began = time.monotonic()
                try:
                    async with asyncio.timeout(self.args.timeout):
                        if kind == "smtp":
                            seconds = await smtp.send(serial)
                        elif kind == "imap":
                            await self.imap_session(index, serial)
                        else:
                            await self.pop3_session(index)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # every failure is counted by its reply code, never fatal
                    if kind == "smtp":
                        await smtp.close()
                    self.recorder.error(kind, classify(kind, exc), f"{type(exc).__name__}: {exc}")
                else:
                    self.recorder.transaction(kind, seconds if kind == "smtp" else time.monotonic() - began)
        finally:
            await smtp.close()

    def _timed(self, kind: str, command: str, began: float) -> None:
        self.recorder.command(f"{kind} {command}", time.monotonic() - began)

    async def _connect(self, kind: str, index: int, connect: Callable[[tuple[str, int], str], Awaitable[Any]]) -> Any:
        target = self.targets[kind]
        address = await target.next()
        began = time.monotonic()
        try:
            client = await connect(address, _source(index, address))
        except (OSError, TimeoutError):
            target.failed()
            raise
        self._timed(kind, "connect", began)
        return client

    async def imap_session(self, index: int, serial: int) -> None:
        user = self.users[serial % len(self.users)]
        client = await self._connect("imap", index, ImapClient.connect)
        try:
            began = time.monotonic()
            await client.command(b'LOGIN "%s" "%s"' % (user.encode(), self.args.password.encode()))
            self._timed("imap", "LOGIN", began)
            began = time.monotonic()
            _, untagged = await client.command(b"SELECT INBOX")
            exists = next((int(r[0].split()[1]) for r in untagged if r[0].endswith(b" EXISTS\r\n")), -1)
            if exists < 0:
                raise SessionError("SELECT: no EXISTS")
            self._timed("imap", "SELECT", began)
            if exists:
                began = time.monotonic()
                await client.command(b"FETCH %d:%d (FLAGS ENVELOPE)" % (max(1, exists - 9), exists))
                self._timed("imap", "FETCH ENVELOPE", began)
                began = time.monotonic()
                _, untagged = await client.command(b"FETCH %d BODY[]" % exists)
                if not any(r[1] for r in untagged if b" FETCH " in r[0][:24]):
                    raise SessionError(f"FETCH {exists} BODY[]: no literal")
                self._timed("imap", "FETCH BODY[]", began)
            began = time.monotonic()
            await client.command(b"LOGOUT")
            self._timed("imap", "LOGOUT", began)
        finally:
            client.close()

    async def pop3_session(self, index: int) -> None:
        user = await self.free_pop3_users.get()
        try:
            client = await self._connect("pop3", index, Pop3Client.connect)
            try:
                for command in (b"USER " + user.encode(), b"PASS " + self.args.password.encode()):
                    began = time.monotonic()
                    await client.command(command)
                    self._timed("pop3", command.split()[0].decode(), began)
                began = time.monotonic()
                status, _ = await client.command(b"STAT")
                count = int(status.split()[1])
                self._timed("pop3", "STAT", began)
                began = time.monotonic()
                await client.command(b"UIDL", multiline=True)
                self._timed("pop3", "UIDL", began)
                if count:
                    began = time.monotonic()
                    await client.command(b"RETR %d" % count, multiline=True)
                    self._timed("pop3", "RETR", began)
                began = time.monotonic()
                await client.command(b"QUIT")
                self._timed("pop3", "QUIT", began)
            finally:
                client.close()
        finally:
            self.free_pop3_users.put_nowait(user)


class _SmtpConnection:
    """One worker's SMTP connection, opened when needed, renewed every ``per_connection`` messages."""

    def __init__(self, load: Load, index: int):
        self.load = load
        self.index = index
        self.session: SmtpSession | None = None
        self.sent = 0

    async def _open(self) -> SmtpSession:
        async def connect(address: tuple[str, int], source: str) -> SmtpSession:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(*address, limit=1 << 16, local_addr=(source, 0))
                session = SmtpSession(reader, writer)
                try:
                    code, line = await session.reply()
                    if code != 220:
                        raise SmtpRefused(code, line, "greeting")
                    began = time.monotonic()
                    await session.ehlo()
                    self.load._timed("smtp", "EHLO", began)
                except BaseException:
                    writer.close()
                    raise
            return session
        return await self.load._connect("smtp", self.index, connect)

    async def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    async def _command(self, data: bytes, name: str) -> tuple[int, bytes]:
        assert self.session is not None
        began = time.monotonic()
        self.session.writer.write(data)
        code, line = await self.session.reply()
        self.load._timed("smtp", name, began)
        return code, line

    async def send(self, serial: int) -> float:
        """Message ``serial`` to its account; the seconds from MAIL to the 250 after the dot."""
        load = self.load
        token = f"{load.run}-{serial:08d}"
        rcpt = load.users[serial % len(load.users)]
        for attempt in (1, 2):
            reused = self.session is not None
            if self.session is None or self.sent >= load.args.per_connection:
                await self.close()
                self.session = await self._open()
                self.sent = 0
            self.sent += 1
            began = time.monotonic()
            try:
                code, line = await self._command(b"MAIL FROM:<%s>\r\n" % SENDER.encode(), "MAIL")
            except (OSError, asyncio.IncompleteReadError):
                await self.close()
                if reused and attempt == 1:
                    continue  # a kept connection the server closed meanwhile: nothing was sent yet
                raise
            break
        if code != 250:
            raise await self._refused(code, line, "MAIL")
        code, line = await self._command(b"RCPT TO:<%s>\r\n" % rcpt.encode(), "RCPT")
        if code != 250:
            raise await self._refused(code, line, "RCPT")
        code, line = await self._command(b"DATA\r\n", "DATA")
        if code != 354:
            raise await self._refused(code, line, "DATA")
        load.ledger.sent(token, rcpt)
        code, line = await self._command(load.message(token, rcpt), "end of data")
        if code != 250:
            load.ledger.rejected(token)
            raise await self._refused(code, line, "end of data")
        load.ledger.acknowledged(token)
        return time.monotonic() - began

    async def _refused(self, code: int, line: bytes, command: str) -> SmtpRefused:
        if code == 421 or code == 0:
            await self.close()
        else:
            with contextlib.suppress(Exception):
                assert self.session is not None
                self.session.writer.write(b"RSET\r\n")
                await self.session.reply()
        return SmtpRefused(code, line, command)


# -- progress ---------------------------------------------------------------------------


class Progress:
    """The progress bar with the live rate (rich, on stderr) -- or a line every 5 s when not a terminal."""

    def __init__(self, recorder: Recorder, schedule: Schedule, quiet: bool):
        self.recorder = recorder
        self.schedule = schedule
        self.quiet = quiet
        self.history: deque[tuple[float, int]] = deque(maxlen=9)
        self.bar: Any = None
        self.task: Any = None
        self.last_line = time.monotonic()

    def rate(self) -> float:
        now, done = time.monotonic(), self.recorder.done
        self.history.append((now, done))
        then, before = self.history[0]
        return (done - before) / (now - then) if now > then else 0.0

    def text(self, rate: float) -> str:
        parts = [f"{rate:,.1f}/s"]
        for kind in ("smtp", "imap", "pop3"):
            if self.recorder.ok[kind] or self.recorder.failed[kind]:
                parts.append(f"{kind} {self.recorder.ok[kind]}")
        failed = sum(self.recorder.failed.values())
        parts.append(f"errors {failed}")
        return "  ".join(parts)

    def __enter__(self) -> Progress:
        if not self.quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress
            self.bar = RichProgress(TextColumn("[bold]load"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TextColumn("{task.fields[live]}"), console=Console(stderr=True))
            total = self.schedule.count if self.schedule.count is not None else (
                self.schedule.duration if self.schedule.duration is not None else None)
            self.task = self.bar.add_task("load", total=total, live="")
            self.bar.__enter__()
        return self

    def tick(self) -> None:
        rate = self.rate()
        if self.bar is not None:
            if self.schedule.count is not None:
                completed: float = self.recorder.done
            elif self.schedule.duration is not None:
                completed = min(self.schedule.duration, round(self.recorder.elapsed(), 1))
            else:
                completed = self.recorder.done
            self.bar.update(self.task, completed=completed, live=self.text(rate))
        elif not self.quiet and time.monotonic() - self.last_line >= 5.0:
            self.last_line = time.monotonic()
            print(f"load: {self.recorder.elapsed():.0f} s, {self.recorder.done} done, {self.text(rate)}",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.tick()
            self.bar.__exit__(*exc)


# -- accounts ---------------------------------------------------------------------------


def user_addresses(count: int, domain: str) -> list[str]:
    return [f"load{n}@{domain}" for n in range(1, count + 1)]


async def ensure_accounts(config: Config, users: list[str], domain: str, password: str,
                          timeout: float = 30.0) -> int:
    """Create the domain and the missing accounts through the primary; wait for every directory to know them.

    Returns how many accounts were created.
    """
    from intermail.apps.directory import primary_of
    from intermail.directory.client import DirectoryClient

    def client_of(addresses: list[tuple[str, int]]) -> DirectoryClient:
        async def fixed() -> tuple[list[tuple[str, int]], float]:
            return addresses, float("inf")
        return DirectoryClient(fixed, addresses, instance="load", request_timeout=10.0, cache_ttl=0)

    primary = primary_of(config).name
    names = [primary] + [i.name for i in config.instances_of("directory") if i.name != primary]
    addresses = [a for a in (listener(config, n, "rpc") for n in names) if a is not None]
    if not addresses:
        raise MailError(ErrorKind.UNAVAILABLE, safe="no directory instance is running")
    created = 0
    async with client_of(addresses) as directory:
        with contextlib.suppress(MailError):
            await directory.call("domain.add", {"name": domain})  # EXISTS: fine
        for user in users:
            try:
                await directory.call("user.show", {"address": user})
                continue
            except MailError as exc:
                if exc.kind is not ErrorKind.NOTFOUND:
                    raise
            try:
                await directory.call("user.add", {"address": user, "password": password, "quota": 0})
                created += 1
            except MailError as exc:
                if exc.kind is not ErrorKind.EXISTS:
                    raise
    if created:  # the MTAs and access servers may ask any replica: wait until all have them
        deadline = time.monotonic() + timeout
        for address in addresses:
            async with client_of([address]) as directory:
                for user in users:
                    while True:
                        try:
                            await directory.call("user.show", {"address": user})
                            break
                        except MailError as exc:
                            if exc.kind is not ErrorKind.NOTFOUND or time.monotonic() > deadline:
                                raise
                            await asyncio.sleep(0.1)
    return created


# -- the run ----------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    if args.rate is None and args.count is None and args.duration is None:
        raise LoadUsageError("say how much load: --rate R, --count N or --duration T (or several)")
    for name in ("rate", "duration"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise LoadUsageError(f"--{name} must be positive")
    if args.count is not None and args.count <= 0:
        raise LoadUsageError("--count must be positive")
    if args.users <= 0 or args.concurrency <= 0 or args.per_connection <= 0:
        raise LoadUsageError("--users, --concurrency and --per-connection must be positive")
    if args.mode == "mixed" and args.target:
        raise LoadUsageError("mixed runs three protocols: use --smtp-target, --imap-target and --pop3-target")
    if args.verify and args.mode not in ("smtp", "mixed"):
        raise LoadUsageError("--verify checks injected mail: it needs smtp or mixed")
    if args.plot and not plot_available():
        raise LoadUsageError(PLOTS_HINT)


def _kinds(args: argparse.Namespace) -> dict[str, int]:
    if args.mode == "mixed":
        return args.mix
    return {args.mode: 1}


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run: targets, accounts, load, verification; the report."""
    config: Config | None = None
    if (Path(args.data) / CLUSTER_FILE).is_file():
        config = load_cluster(args.data)
    resolver = None
    if config is not None:
        from intermail.resolve import Resolver
        dns = [(i.address, i.ports.get("dns") or 53) for i in config.instances_of("dns")]
        resolver = Resolver(dns, timeout=1.0, lifetime=3.0, holddown=2.0) if dns else None

    kinds = _kinds(args)
    needed = set(kinds) | ({"imap"} if args.verify else set())
    targets = {}
    for kind in sorted(needed):
        spec = (args.target if args.mode == kind else None) or getattr(args, f"{kind}_target") or DEFAULT_NAMES[kind]
        targets[kind] = Target(kind, spec, config, resolver)
        await targets[kind].next()  # resolvable now, or exit 3 before any load

    users = user_addresses(args.users, args.domain)
    created = 0
    if config is not None and not args.no_create_users:
        created = await ensure_accounts(config, users, args.domain, args.password)

    run = secrets.token_hex(4)
    recorder = Recorder()
    ledger = Ledger(run)
    load = Load(args, targets, users, run, recorder, ledger)
    schedule = Schedule(weighted_cycle(kinds), args.rate, args.count, args.duration)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, schedule.stopped.set)  # Ctrl-C: stop, then report
    recorder.started = schedule.started = time.monotonic()
    workers = [asyncio.create_task(load.worker(i, schedule)) for i in range(args.concurrency)]
    with Progress(recorder, schedule, args.quiet) as progress:
        while not all(w.done() for w in workers):
            await asyncio.wait(workers, timeout=0.25)
            progress.tick()
            if schedule.over():
                break
        # the schedule is over: what is in flight may finish, within STOP_TIMEOUT
        _, pending = await asyncio.wait(workers, timeout=STOP_TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        recorder.finish()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.remove_signal_handler(signal.SIGINT)

    report: dict[str, Any] = {
        "mode": args.mode, "run": run,
        "targets": {kind: str(t) for kind, t in targets.items()},
        "params": {"users": args.users, "concurrency": args.concurrency, "rate": args.rate, "count": args.count,
                   "duration": args.duration, "size": args.size, "mix": kinds, "domain": args.domain},
        "accounts_created": created,
        **recorder.summary(),
    }
    if args.verify:
        if not args.quiet:
            print(f"load: verifying {len(ledger.accepted)} accepted messages over IMAP ...", file=sys.stderr,
                  flush=True)
        report["verify"] = await verify(ledger, users, args.password, targets["imap"].next, args.verify_timeout)
    return report


def _run(args: argparse.Namespace) -> int:
    from intermail.net.runner import loop_factory

    try:
        _check_args(args)
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            report = runner.run(run_load(args))
    except LoadUsageError as exc:
        print(f"intermail load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"intermail load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TargetError, MailError) as exc:
        print(f"intermail load: {exc.safe if isinstance(exc, MailError) else exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.plot:
        write_plot(report, args.plot)
        report["plot"] = str(args.plot)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    text = render_text(report)
    if args.json:
        print(text, file=sys.stderr)
        json.dump(report, sys.stdout)
        print()
    else:
        print(text)
    verdict = report.get("verify")
    if verdict and (verdict["lost"] or verdict["doubled"]):
        return EXIT_FAILED
    if not any(t["ok"] for t in report["transactions"].values()):
        return EXIT_FAILED
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "load", help="generate SMTP/IMAP/POP3 load against a cluster; latency, errors, --verify, --plot",
        description="Load a running cluster: SMTP in, IMAP reads, POP3 sessions, or all at once (mixed).")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--target", metavar="NAME|HOST:PORT",
                        help="where the load goes: a name in the cluster zone (mta, imap, pop) or HOST:PORT")
    for kind in ("smtp", "imap", "pop3"):
        parser.add_argument(f"--{kind}-target", metavar="NAME|HOST:PORT",
                            help=f"the {kind} target in any mode (default: {DEFAULT_NAMES[kind]})")
    parser.add_argument("--users", type=int, default=10, help="accounts load1..loadN@DOMAIN (default 10)")
    parser.add_argument("--domain", default="load.test", help="the accounts' domain (default load.test)")
    parser.add_argument("--password", default="load-password", help="the accounts' password")
    parser.add_argument("--no-create-users", action="store_true",
                        help="do not create the domain and missing accounts (they exist already)")
    parser.add_argument("--concurrency", type=int, default=10, help="transactions in flight at once (default 10)")
    parser.add_argument("--rate", type=float, help="transactions per second (default: as fast as they go)")
    parser.add_argument("--count", type=int, help="stop after this many transactions")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                        help=f"mixed: weights of the transaction kinds (default {DEFAULT_MIX})")
    parser.add_argument("--size", type=int, default=4096, help="SMTP message size in octets (default 4096)")
    parser.add_argument("--per-connection", type=int, default=100,
                        help="SMTP messages per connection before a new one (default 100)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one transaction may take (default 60)")
    parser.add_argument("--verify", action="store_true",
                        help="check over IMAP that every accepted message arrived exactly once")
    parser.add_argument("--verify-timeout", type=float, default=300.0,
                        help="seconds to wait for accepted mail to arrive (default 300)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency over time (matplotlib)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    parser.add_argument("--report", metavar="FILE.json", help="also write the JSON report to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(run=_run)
