"""``intermail bench imap`` and ``intermail bench pop3``: mail-client sessions against our accessd and Dovecot, same run.

For each concurrency N, measured back to back on the same machine (the
order alternating from case to case, ours first in the first), N client
sessions run over and over for ``seconds`` after a warm-up, each on an
account no other session holds at that moment (a pool of ``users``
accounts, taken in turn):

- **imap** (metric: operations/s, every command one operation; sessions/s
  in the details): LOGIN, SELECT INBOX, FETCH 1:* (FLAGS ENVELOPE), one
  FETCH of three messages' BODY.PEEK[HEADER], two FETCHes of one whole
  BODY[] each, UID SEARCH UNDELETED FROM "alice", STORE +FLAGS or -FLAGS
  (\\Flagged), APPEND of a 4 KiB draft, UID STORE +FLAGS.SILENT (\\Deleted)
  and UID EXPUNGE of that draft (the mailbox keeps its size), LOGOUT: 12
  commands.  APPEND sends its message as a LITERAL+ literal when the
  server announces LITERAL+ (both do), else waits for the continuation.
- **pop3** (metric: sessions/s; operations/s in the details): USER, PASS,
  STAT, UIDL, RETR of every message, QUIT -- nothing deleted, so the
  maildrop stays as it is.

Every answer is checked, not only its status: the SELECT's EXISTS and the
FETCH 1:* count, one header literal per message asked, bodies at least as
long as the message delivered, the SEARCH hits (the mix has exactly 2 in 5
messages from alice), the APPENDUID, one EXPUNGE, the BYE; POP3's STAT,
the UIDL lines and every RETR.  Anything else is an error (with samples);
the session is then dropped and the next one opens a new connection.

*Ours*: a throw-away ``dird`` + ``mssd`` + ``accessd`` (real processes on
loopback; ``[storage] fsync = true`` and the default mirrors;
``tls.auth_without_tls`` since the bench speaks plaintext).  *Baseline*:
Dovecot 2.3 (:mod:`~intermail.admin.bench_dovecot`, ``protocols = imap
pop3 lmtp``, ``sdbox``, default ``mail_fsync = optimized``, login
processes in Dovecot's high-performance mode, imap/pop3 processes reused
for 100 sessions, no auth cache).  Both check the same password against
the same kind of hash: argon2id with t=1, m=8 KiB, p=1 -- our directory's
hash parameters for the bench, and the same PHC string for Dovecot's
``passwd-file`` (its ``{ARGON2ID}`` scheme).

Both get the same mail before the first case: ``messages`` messages per
account (:func:`~intermail.admin.bench_load.mailbox_mix`: 2 to 40 KiB,
plain, multipart/alternative, multipart/mixed with a base64 attachment)
over LMTP, then one session of the workload per account, unmeasured, so
that no case pays for a first SELECT.

The load client is one asyncio process (uvloop when installed) speaking
the protocols over raw streams: tagged commands and a literal-aware
response reader for IMAP, ``readuntil`` on whole multi-line answers for
POP3.  Each load worker connects from a loopback address of its own
(``127.250.x.y``), as distinct client machines would: from one address
the servers' per-address policies would be measured instead of their
sessions (our directory checks at most 16 logins of one client address at
once and refuses the others as LIMIT).  Its own CPU and each server's process tree's CPU (cores, from
``/proc``, reaped children included -- Dovecot's session processes) are
reported per side, with latency per command and per session.

Besides the contract's keys each result has ``errors`` (per side) and
``details``; the report has ``notes``.  When Dovecot is missing the bench
installs Debian's ``dovecot-imapd``, ``dovecot-pop3d`` and
``dovecot-lmtpd`` with apt-get; when it cannot, or Dovecot does not come
up, ``baseline`` and ``ratio`` are null and a note says why.

Logs: nothing; returns the JSON contract of ``intermail bench``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from intermail import config as config_module
from intermail.admin.bench_dovecot import Dovecot, dovecot_home, find_or_install_dovecot
from intermail.admin.bench_lmtp import DOMAIN, PASSWORD
from intermail.admin.bench_lmtp import _provision as provision  # the same accounts as the LMTP bench
from intermail.admin.bench_load import draft_message, mailbox_mix
from intermail.admin.bench_smtp import CpuWindow
from intermail.admin.bench_storage import host_info
from intermail.apps.directory import hashing_from_config
from intermail.testing.lmtpclient import LmtpTestClient
from intermail.testing.procs import TestCluster

SENDER = "bench@load.test"
ERROR_SAMPLES = 5
CONNECT_TIMEOUT = 30.0  # seconds to connect and get the greeting
SESSION_TIMEOUT = 60.0  # seconds one whole session may take
STOP_TIMEOUT = 30.0  # seconds the sessions may take to finish once the case is over
DELIVERY_CONNECTIONS = 8  # LMTP connections filling the mailboxes
PRIME_CONCURRENCY = 4  # sessions at once in the unmeasured first pass over the accounts
SEARCH_FROM = "alice"  # the sender of 2 in 5 messages of the mix (and of no draft)
HEADER_FETCHES = 3  # messages whose header one FETCH asks for
BODY_FETCHES = 2  # FETCHes of one whole message each
IMAP_COMMANDS = 10 + BODY_FETCHES  # commands in one IMAP session of the workload
PROTOCOLS = ("imap", "pop3")
CLIENT_NET = "127.250"  # the load workers' source addresses: 127.250.x.y, one per worker

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n\Z")
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]", re.IGNORECASE)


class SessionError(Exception):
    """An answer that was not the one expected: the session is dropped."""


# -- what both sides hold ---------------------------------------------------------------


@dataclass(frozen=True)
class Mailbox:
    """What every account's INBOX holds once the mail is delivered, as the sessions check it."""

    sizes: tuple[int, ...]  # octets of each message as sent over LMTP (a server adds trace headers, never less)
    search_hits: int  # messages FROM "alice"

    @classmethod
    def of(cls, messages: list[bytes]) -> Mailbox:
        hits = sum(1 for m in messages if b"\r\nFrom: " in m and SEARCH_FROM.encode() in
                   m.split(b"\r\nFrom: ", 1)[1].split(b"\r\n", 1)[0].lower())
        return cls(tuple(len(m) for m in messages), hits)

    @property
    def count(self) -> int:
        return len(self.sizes)


def user_address(n: int) -> str:
    return f"user{n}@{DOMAIN}"


async def deliver_all(address: tuple[str, int], users: int, messages: int) -> list[str]:
    """``messages`` messages of the mix to every account over LMTP, in order; what was refused."""
    pending: asyncio.Queue[int] = asyncio.Queue()
    for n in range(users):
        pending.put_nowait(n)
    errors: list[str] = []

    async def worker() -> None:
        client = await LmtpTestClient.connect(*address, timeout=CONNECT_TIMEOUT, name="load.test")
        try:
            while not pending.empty():
                rcpt = user_address(pending.get_nowait())
                for message in mailbox_mix(messages, rcpt):
                    code, text = (await client.send(SENDER, [rcpt], message))[rcpt]
                    if code != 250:
                        errors.append(f"{rcpt}: {code} {text}")
        finally:
            await client.close()

    await asyncio.gather(*(worker() for _ in range(min(DELIVERY_CONNECTIONS, users))))
    return errors


# -- what one run measures --------------------------------------------------------------


@dataclass
class AccessStats:
    """What one load run saw; counts and latencies only inside the measured window."""

    sessions: int = 0
    operations: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    client_cpu: float = 0.0  # cores used by this process during the window
    server_cpu: dict[str, float | None] = field(default_factory=dict)  # cores per server process tree
    command_latencies: dict[str, list[float]] = field(default_factory=dict)
    session_latencies: list[float] = field(default_factory=list)
    measuring: bool = False

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < ERROR_SAMPLES and what not in self.samples:
            self.samples.append(what)

    def done(self, command: str, began: float) -> None:
        """One command answered as expected, sent at ``began``."""
        if self.measuring:
            self.operations += 1
            self.command_latencies.setdefault(command, []).append(time.perf_counter() - began)

    def rate(self, what: str) -> float:
        return getattr(self, what) / self.seconds if self.seconds else 0.0


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


# -- the IMAP client --------------------------------------------------------------------


class ImapClient:
    """One IMAP connection of the load client: tagged commands, responses read whole (literals included).

    A response is ``(first line, literal sizes)``: the line it starts with
    and the size of every literal it carries (the literals themselves are
    read and dropped).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, literal_plus: bool):
        self.reader = reader
        self.writer = writer
        self.literal_plus = literal_plus
        self.serial = 0

    @classmethod
    async def connect(cls, address: tuple[str, int], source: str) -> ImapClient:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(*address, limit=1 << 20, local_addr=(source, 0))
            try:
                greeting = await reader.readuntil(b"\r\n")
            except BaseException:
                writer.close()
                raise
        if not greeting.startswith(b"* OK"):
            writer.close()
            raise SessionError(f"greeting {greeting[:200]!r}")
        return cls(reader, writer, b"LITERAL+" in greeting.upper())

    async def _response(self) -> tuple[bytes, list[int]]:
        line = first = await self.reader.readuntil(b"\r\n")
        literals: list[int] = []
        while line.endswith(b"}\r\n") and (match := _LITERAL.search(line)):
            size = int(match.group(1))
            await self.reader.readexactly(size)
            literals.append(size)
            line = await self.reader.readuntil(b"\r\n")
        return first, literals

    async def command(self, text: bytes, literal: bytes | None = None
                      ) -> tuple[bytes, list[tuple[bytes, list[int]]]]:
        """Send one command; its tagged line (raising :class:`SessionError` unless OK) and the untagged responses."""
        self.serial += 1
        tag = b"a%d " % self.serial
        untagged: list[tuple[bytes, list[int]]] = []
        if literal is None:
            self.writer.write(tag + text + b"\r\n")
        elif self.literal_plus:
            self.writer.write(tag + text + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        else:
            self.writer.write(tag + text + b" {%d}\r\n" % len(literal))
            while True:
                response = await self._response()
                if response[0].startswith(b"+"):
                    break
                if response[0].startswith(tag):
                    raise SessionError(f"{text[:40]!r}: {response[0][len(tag):].strip()[:200]!r}")
                untagged.append(response)
            self.writer.write(literal + b"\r\n")
        while True:
            first, literals = await self._response()
            if first.startswith(tag):
                if first[len(tag):len(tag) + 2] != b"OK":
                    raise SessionError(f"{text.split(b' ', 1)[0]!r}: {first[len(tag):].strip()[:200]!r}")
                return first, untagged
            untagged.append((first, literals))

    def close(self) -> None:
        self.writer.close()


def _fetches(untagged: list[tuple[bytes, list[int]]]) -> list[tuple[bytes, list[int]]]:
    return [r for r in untagged if r[0].startswith(b"* ") and b" FETCH " in r[0][:24]]


async def imap_session(address: tuple[str, int], source: str, user: int, serial: int, mailbox: Mailbox,
                       stats: AccessStats) -> None:
    """One session of the IMAP workload (see the module docstring) as ``user``, from address ``source``."""
    client = await ImapClient.connect(address, source)
    clock = time.perf_counter
    try:
        began = clock()
        await client.command(b'LOGIN "%s" "%s"' % (user_address(user).encode(), PASSWORD.encode()))
        stats.done("LOGIN", began)

        began = clock()
        _, untagged = await client.command(b"SELECT INBOX")
        exists = next((int(r[0].split()[1]) for r in untagged if r[0].endswith(b" EXISTS\r\n")), -1)
        if exists < mailbox.count:
            raise SessionError(f"SELECT: {exists} messages, {mailbox.count} delivered")
        stats.done("SELECT", began)

        began = clock()
        _, untagged = await client.command(b"FETCH 1:* (FLAGS ENVELOPE)")
        if len(_fetches(untagged)) != exists:
            raise SessionError(f"FETCH 1:*: {len(_fetches(untagged))} answers for {exists} messages")
        stats.done("FETCH 1:* (FLAGS ENVELOPE)", began)

        # only the delivered messages (1..count): they are never expunged, so their numbers hold
        count = mailbox.count
        seqs = sorted({(serial * HEADER_FETCHES + k) % count + 1 for k in range(HEADER_FETCHES)})
        began = clock()
        _, untagged = await client.command(b"FETCH %s (BODY.PEEK[HEADER])" % ",".join(map(str, seqs)).encode())
        headers = _fetches(untagged)
        if len(headers) != len(seqs) or any(len(r[1]) != 1 or r[1][0] < 200 for r in headers):
            raise SessionError(f"FETCH BODY.PEEK[HEADER] of {len(seqs)}: {[r[1] for r in headers]}")
        stats.done("FETCH BODY.PEEK[HEADER]", began)

        for k in range(BODY_FETCHES):
            seq = (serial * 7 + k * 11) % count + 1
            began = clock()
            _, untagged = await client.command(b"FETCH %d BODY[]" % seq)
            bodies = [size for r in _fetches(untagged) for size in r[1]]
            if len(bodies) != 1 or bodies[0] < mailbox.sizes[seq - 1]:
                raise SessionError(f"FETCH {seq} BODY[]: literals {bodies}, {mailbox.sizes[seq - 1]} octets delivered")
            stats.done("FETCH BODY[]", began)

        began = clock()
        _, untagged = await client.command(b'UID SEARCH UNDELETED FROM "%s"' % SEARCH_FROM.encode())
        hits = next((len(r[0].split()) - 2 for r in untagged if r[0].startswith(b"* SEARCH")), -1)
        if hits != mailbox.search_hits:
            raise SessionError(f"UID SEARCH FROM {SEARCH_FROM}: {hits} hits, {mailbox.search_hits} expected")
        stats.done("UID SEARCH", began)

        began = clock()
        await client.command(b"STORE %d %sFLAGS (\\Flagged)" % (serial % count + 1, b"+" if serial % 2 else b"-"))
        stats.done("STORE", began)

        began = clock()
        tagged, _ = await client.command(b"APPEND INBOX (\\Seen)", draft_message(user_address(user), serial))
        appended = _APPENDUID.search(tagged)
        if appended is None:
            raise SessionError(f"APPEND: no APPENDUID in {tagged[:200]!r}")
        uid = int(appended.group(1))
        stats.done("APPEND", began)

        began = clock()
        await client.command(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid)
        stats.done("UID STORE \\Deleted", began)

        began = clock()
        _, untagged = await client.command(b"UID EXPUNGE %d" % uid)
        if sum(1 for r in untagged if r[0].endswith(b" EXPUNGE\r\n")) != 1:
            raise SessionError(f"UID EXPUNGE {uid}: {[r[0] for r in untagged]}")
        stats.done("UID EXPUNGE", began)

        began = clock()
        _, untagged = await client.command(b"LOGOUT")
        if not any(r[0].startswith(b"* BYE") for r in untagged):
            raise SessionError("LOGOUT: no BYE")
        stats.done("LOGOUT", began)
    finally:
        client.close()


# -- the POP3 client --------------------------------------------------------------------


class Pop3Client:
    """One POP3 connection of the load client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int], source: str) -> Pop3Client:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(*address, limit=1 << 20, local_addr=(source, 0))
            try:
                greeting = await reader.readuntil(b"\r\n")
            except BaseException:
                writer.close()
                raise
        if not greeting.startswith(b"+OK"):
            writer.close()
            raise SessionError(f"greeting {greeting[:200]!r}")
        return cls(reader, writer)

    async def command(self, text: bytes, multiline: bool = False) -> tuple[bytes, bytes]:
        """Send one command; its status line (raising :class:`SessionError` unless +OK) and, if
        ``multiline``, the dot-stuffed lines after it up to and including the final ``.`` line."""
        self.writer.write(text + b"\r\n")
        status = await self.reader.readuntil(b"\r\n")
        if not status.startswith(b"+OK"):
            raise SessionError(f"{text.split(b' ', 1)[0]!r}: {status.strip()[:200]!r}")
        if not multiline:
            return status, b""
        # The status line's CRLF starts the terminator of an empty answer (CRLF "." CRLF), so search
        # from it; the server sends nothing after the terminator until the next command (no
        # pipelining here), so reading in chunks never takes bytes of another answer.
        data = bytearray(b"\r\n")
        while not data.endswith(b"\r\n.\r\n"):
            chunk = await self.reader.read(65536)
            if not chunk:
                raise SessionError(f"{text.split(b' ', 1)[0]!r}: connection closed in a multi-line answer")
            data += chunk
        return status, bytes(data[2:])

    def close(self) -> None:
        self.writer.close()


async def pop3_session(address: tuple[str, int], source: str, user: int, serial: int, mailbox: Mailbox,
                       stats: AccessStats) -> None:
    """One session of the POP3 workload (see the module docstring) as ``user``, from address ``source``."""
    client = await Pop3Client.connect(address, source)
    clock = time.perf_counter
    try:
        began = clock()
        await client.command(b"USER " + user_address(user).encode())
        stats.done("USER", began)
        began = clock()
        await client.command(b"PASS " + PASSWORD.encode())
        stats.done("PASS", began)

        began = clock()
        status, _ = await client.command(b"STAT")
        count = int(status.split()[1])
        if count < mailbox.count:
            raise SessionError(f"STAT: {count} messages, {mailbox.count} delivered")
        stats.done("STAT", began)

        began = clock()
        _, listing = await client.command(b"UIDL", multiline=True)
        lines = listing.count(b"\n") - 1  # the final "." line aside
        if lines != count:
            raise SessionError(f"UIDL: {lines} lines for {count} messages")
        stats.done("UIDL", began)

        for n in range(1, count + 1):
            began = clock()
            _, body = await client.command(b"RETR %d" % n, multiline=True)
            if n <= mailbox.count and len(body) < mailbox.sizes[n - 1]:
                raise SessionError(f"RETR {n}: {len(body)} octets, {mailbox.sizes[n - 1]} delivered")
            stats.done("RETR", began)

        began = clock()
        await client.command(b"QUIT")
        stats.done("QUIT", began)
    finally:
        client.close()


Session = Callable[[tuple[str, int], str, int, int, Mailbox, AccessStats], Awaitable[None]]
SESSIONS: dict[str, Session] = {"imap": imap_session, "pop3": pop3_session}


# -- the load ---------------------------------------------------------------------------


def client_address(worker: int) -> str:
    """The source address of load worker ``worker``: one client machine per worker, as in real life.

    From a single address the servers' per-address policies would be what is
    measured (our directory lets 16 logins per client address be checked at
    once and refuses the others), not their sessions.
    """
    return f"{CLIENT_NET}.{worker // 250 % 250}.{worker % 250 + 1}"


async def _one(session: Session, address: tuple[str, int], source: str, user: int, serial: int, mailbox: Mailbox,
               stats: AccessStats) -> bool:
    """One session; False (and an error counted) when it did not go through."""
    try:
        async with asyncio.timeout(SESSION_TIMEOUT):
            await session(address, source, user, serial, mailbox, stats)
    except SessionError as exc:
        stats.error(str(exc))
    except TimeoutError:
        stats.error(f"no answer in time (connect: {CONNECT_TIMEOUT:g} s, whole session: {SESSION_TIMEOUT:g} s)")
    except (OSError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError) as exc:
        stats.error(f"connection: {exc!r}"[:300])  # EOFError: IncompleteReadError
    else:
        return True
    return False


async def prime(session: Session, address: tuple[str, int], users: int, mailbox: Mailbox) -> AccessStats:
    """One session per account, a few at a time, unmeasured; what they saw (errors)."""
    stats = AccessStats()
    pending = list(range(users))

    async def worker(source: str) -> None:
        while pending:
            user = pending.pop(0)
            await _one(session, address, source, user, user, mailbox, stats)

    await asyncio.gather(*(worker(client_address(w)) for w in range(min(PRIME_CONCURRENCY, users))))
    return stats


async def run_load(session: Session, address: tuple[str, int], concurrency: int, seconds: float, warmup: float,
                   users: int, mailbox: Mailbox, pids: Callable[[], dict[str, list[int]]]) -> AccessStats:
    """``concurrency`` sessions at a time: ``warmup`` s unmeasured, then ``seconds`` counted."""
    stats = AccessStats()
    free: asyncio.Queue[int] = asyncio.Queue()  # accounts no session holds, the longest-free first
    for n in range(users):
        free.put_nowait(n)
    stopping = False
    serial = 0

    async def worker(source: str) -> None:
        nonlocal serial
        while not stopping:
            user = await free.get()
            serial += 1
            began = time.perf_counter()
            try:
                ok = await _one(session, address, source, user, serial, mailbox, stats)
            finally:
                free.put_nowait(user)
            if ok and stats.measuring:
                stats.sessions += 1
                stats.session_latencies.append(time.perf_counter() - began)
            elif not ok:
                await asyncio.sleep(0.01)  # a server that refuses at once is not hammered

    tasks = [asyncio.create_task(worker(client_address(w))) for w in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        window = CpuWindow(pids())
        stats.measuring = True
        await asyncio.sleep(seconds)
        stats.measuring = False
        window.stop(stats)
        stats.seconds = time.perf_counter() - window.began
        stopping = True
        done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        for task in pending:
            stats.error(f"a session still running {STOP_TIMEOUT:g} s after the case ended")
        for task in done:
            if task.exception() is not None:
                stats.error(f"load worker failed: {task.exception()!r}")
    finally:
        stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats


# -- the two sides ----------------------------------------------------------------------


def _cluster(base: str, concurrency: int) -> TestCluster:
    cluster = TestCluster(os.path.join(base, "data"), sections={
        "storage": {"fsync": True},
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "tls": {"auth_without_tls": True},
        "limits": {"connections_per_ip": max(100, 2 * concurrency + PRIME_CONCURRENCY + DELIVERY_CONNECTIONS)},
        "runner": {"loop": "auto"}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0, "pop3": 0})
    cluster.write()
    return cluster


def _our_pids(cluster: TestCluster) -> dict[str, list[int]]:
    names = (("accessd", "access1"), ("mssd", "mss1"), ("dird", "dir1"))
    return {kind: [cluster.procs[name].proc.pid] if cluster.procs[name].alive else []  # type: ignore[union-attr]
            for kind, name in names}


def _password_hash(cluster: TestCluster) -> str:
    """The PHC string our directory stores for the bench password, as Dovecot's passwd-file wants it."""
    hashing = hashing_from_config(config_module.load(cluster.config_path))
    return "{ARGON2ID}" + hashing.hash(PASSWORD)


async def _start_dovecot(base: str, users: int, password_hash: str, concurrency: int,
                         notes: list[str]) -> tuple[Dovecot | None, str | None]:
    """The running Dovecot (None when unavailable, with a note) and a directory of its own to remove."""
    binary = await asyncio.to_thread(find_or_install_dovecot, notes, ("imap", "pop3", "lmtp"))
    if binary is None:
        return None, None
    home, own = dovecot_home(base, notes, "bench-access-")
    dovecot: Dovecot | None = None
    try:
        dovecot = Dovecot(binary, home, protocols=["imap", "pop3", "lmtp"],
                          process_limit=max(100, 2 * concurrency + PRIME_CONCURRENCY + DELIVERY_CONNECTIONS),
                          users={user_address(n): password_hash for n in range(users)}, performance=True)
        await asyncio.to_thread(dovecot.start)
    except (OSError, RuntimeError, TimeoutError, KeyError, subprocess.SubprocessError) as exc:
        notes.append(f"baseline unavailable: dovecot did not start: {exc}")
        if dovecot is not None:
            await asyncio.to_thread(dovecot.stop)
        return None, own
    return dovecot, own


# -- the bench --------------------------------------------------------------------------


def _side(stats: AccessStats) -> dict[str, Any]:
    return {
        "sessions": stats.sessions, "operations": stats.operations,
        "sessions_per_s": round(stats.rate("sessions"), 1), "ops_per_s": round(stats.rate("operations"), 1),
        "errors": stats.errors, "error_samples": stats.samples, "seconds": round(stats.seconds, 3),
        "session_ms": {"p50": _ms(stats.session_latencies, 0.5), "p99": _ms(stats.session_latencies, 0.99)},
        "command_ms": {name: {"count": len(values), "p50": _ms(values, 0.5), "p99": _ms(values, 0.99)}
                       for name, values in stats.command_latencies.items()},
        "client_cpu": stats.client_cpu, "server_cpu": stats.server_cpu,
    }


def _result(protocol: str, concurrency: int, users: int, mailbox: Mailbox, mine: AccessStats,
            theirs: AccessStats | None, baseline_name: str, first: str, notes: list[str],
            extra: dict[str, Any]) -> dict[str, Any]:
    what, metric = ("operations", "ops/s") if protocol == "imap" else ("sessions", "sessions/s")
    ours = mine.rate(what)
    base = theirs.rate(what) if theirs is not None else None
    params: dict[str, Any] = {"concurrency": concurrency, "users": users, "messages": mailbox.count,
                              "mailbox_bytes": sum(mailbox.sizes)}
    params["commands_per_session"] = IMAP_COMMANDS if protocol == "imap" else 5 + mailbox.count
    result = {
        "case": f"{protocol} conc={concurrency} msgs={mailbox.count}", "params": params, "metric": metric,
        "ours": round(ours, 1), "baseline": round(base, 1) if base is not None else None,
        "baseline_name": baseline_name, "ratio": round(ours / base, 3) if base else None,
        "errors": {"ours": mine.errors, "baseline": theirs.errors if theirs is not None else None},
        "details": {"ours": _side(mine), "baseline": _side(theirs) if theirs is not None else None,
                    "first": first, **extra},
    }
    if theirs is None:
        result["note"] = next((n for n in notes if n.startswith("baseline unavailable")), "baseline unavailable")
    return result


async def run_bench(protocol: str, concurrency: list[int], seconds: float, users: int, messages: int,
                    directory: str | None = None, progress=None) -> dict:
    if protocol not in SESSIONS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if users < max(concurrency):
        raise ValueError(f"--users ({users}) must be at least the largest concurrency ({max(concurrency)}): "
                         "a session holds its account")
    if messages < 1:
        raise ValueError("--messages must be positive")
    session = SESSIONS[protocol]
    mailbox = Mailbox.of(mailbox_mix(messages, user_address(0)))
    storage = config_module.load(None).storage
    notes = [f"ours: accessd + mssd + dird, [storage] fsync = {str(storage.fsync).lower()}, {storage.mirrors} "
             "mirrors (the defaults)",
             "passwords: argon2id t=1 m=8KiB p=1 on both sides (our directory's hash; the same PHC string in "
             "Dovecot's passwd-file, scheme {ARGON2ID}, no auth cache)"]
    notes.append(f"load average (1 min) when the bench began: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
                 "client and servers share them")
    base = tempfile.mkdtemp(prefix="bench-access-", dir=directory)
    cluster = _cluster(base, max(concurrency))
    dovecot: Dovecot | None = None
    dovecot_own: str | None = None
    warmup = min(1.0, max(0.1, seconds / 5))
    results: list[dict] = []
    try:
        await asyncio.to_thread(cluster.start_all, ["dir1", "mss1", "access1"])
        await provision(cluster, users)
        ours_address = cluster.address("access1", protocol)
        dovecot, dovecot_own = await _start_dovecot(base, users, _password_hash(cluster), max(concurrency), notes)
        if dovecot is not None:
            notes.append(f"baseline: Dovecot {dovecot.version} (imap pop3 lmtp, sdbox, mail_fsync = optimized; "
                         "login processes in high-performance mode, imap/pop3 processes reused for 100 sessions)")
        baseline_name = (f"dovecot {dovecot.version} {protocol} sdbox" if dovecot is not None
                         else f"dovecot {protocol} sdbox (unavailable)")
        sides: list[tuple[str, tuple[str, int], tuple[str, int], Callable[[], dict[str, list[int]]]]] = [
            ("ours", cluster.address("mss1", "lmtp"), ours_address, lambda: _our_pids(cluster))]
        if dovecot is not None:
            running = dovecot
            sides.append(("baseline", dovecot.address_of("lmtp"), dovecot.address_of(protocol),
                          lambda: {"dovecot": running.pids()}))
        for name, lmtp, _, _ in list(sides):
            try:
                refused = await deliver_all(lmtp, users, messages)
            except (OSError, EOFError, ConnectionError, TimeoutError) as exc:
                if name == "ours":
                    raise
                notes.append(f"baseline unavailable: delivering to dovecot's LMTP failed: {exc!r}")
                sides.pop()
                baseline_name = f"dovecot {protocol} sdbox (unavailable)"
                continue
            if refused:
                notes.append(f"{name}: {len(refused)} of {users * messages} deliveries refused, e.g. {refused[0]}")
        for name, _, address, _ in sides:
            primed = await prime(session, address, users, mailbox)
            if primed.errors:
                notes.append(f"{name}: {primed.errors} of {users} first sessions failed, e.g. {primed.samples[0]}")

        for index, c in enumerate(concurrency):
            runs = {name: (address, pids) for name, _, address, pids in sides}
            order = ["ours", "baseline"] if index % 2 == 0 else ["baseline", "ours"]
            measured: dict[str, AccessStats] = {}
            for name in order:
                if name in runs:
                    address, pids = runs[name]
                    measured[name] = await run_load(session, address, c, seconds, warmup, users, mailbox, pids)
            result = _result(protocol, c, users, mailbox, measured["ours"], measured.get("baseline"),
                             baseline_name, order[0] if "baseline" in measured else "ours", notes,
                             {"seconds": seconds, "warmup": warmup})
            results.append(result)
            if progress:
                progress(result)
        return {"bench": protocol, "results": results, "notes": notes, "host": host_info(base)}
    finally:
        if dovecot is not None:
            await asyncio.to_thread(dovecot.stop)
        await asyncio.to_thread(cluster.stop_all)
        shutil.rmtree(base, ignore_errors=True)
        if dovecot_own is not None:
            shutil.rmtree(dovecot_own, ignore_errors=True)
