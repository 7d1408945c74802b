"""The POP3 session of the access server: one client connection, its login, its locked maildrop.

Owns: what each POP3 command means for a logged-in user (RFC 1939 with
RFC 2449 CAPA and response codes, RFC 2595 STLS, RFC 5034 AUTH PLAIN),
carried out as calls on the user's store over the store RPC; the maildrop
lock; the session's fixed view of INBOX; and the UPDATE state.  The wire
is the :class:`~intermail.proto.pop3.Pop3Server` machine's, driven by the
pump; the login policy is :class:`~intermail.access.context.LoginGuard`'s.

The maildrop.  A login (USER/PASS or AUTH PLAIN, with the full address)
resolves the account's store, takes the store's maildrop lock for the
account (``maildrop.lock``, owner: this access server and session id,
lease ``access.pop3_lock_lease``; held elsewhere: ``-ERR [IN-USE]``, RFC
1939 §4, RFC 2449 §8.1.2) and snapshots INBOX: every UID and size,
numbered 1..n in UID order.  From then on the view is fixed: mail delivered
meanwhile shows up in the next session, and a message removed meanwhile
by another protocol (IMAP) is answered ``-ERR`` when asked for.  A
background task renews the lease every third of it while the session
lives; the lock is released before QUIT is answered (a client may log in
again at once; skipped when the store connection is gone, since the lock
went with it) or when the session ends otherwise, and the store drops it
by itself when the lease runs out or the RPC connection that took it
closes (this access server died).  Should a renewal find the lock taken by
someone else (the store restarted and another session got in first), the
session ends at its next command with ``-ERR [IN-USE]`` and removes
nothing.

UIDL is ``<uidvalidity>.<uid>``: both come from the store's journal, so a
message keeps its unique-id across sessions, access servers, store
restarts and take-overs (RFC 1939 §7 asks for exactly that).

UPDATE.  DELE only marks; QUIT removes every marked message with one
``message.expunge {any_flags: true, uids}``, which the store carries out
as one transaction: all of them go, or none does (more than 10000 runs of
marked messages take one call per 10000).  The call is idempotent (a
removed UID is simply not found again), so it is retried across a store
reconnect within ``access.failover_window``; ``+OK`` only once it
returned, i.e. once the removal is durable (I-1).  A failure is ``-ERR
[SYS/TEMP] some deleted messages not removed`` -- which, when the store
died after committing and before answering, is not the whole truth: the
removal then happened, all of it, as the next session shows.  A session
that ends without QUIT removes nothing (RFC 1939 §6).

RETR and TOP stream the message from the store (``message.body``) as it
comes, the machine dot-stuffing it; TOP stops reading once it has the
header and the lines asked for (:class:`TopCut`).  A body that breaks off
because the store connection was lost is resumed at the offset reached; one
that cannot be finished after its ``+OK`` went out leaves the client no
way to tell a short message from a whole one, so the connection is aborted
instead.

Not offered: APOP (it needs a plaintext-equivalent secret the directory
does not keep, RFC 1939 §7), and conversion of
SMTPUTF8 messages for clients that did not send UTF8 (they are handed out
as stored).

Limits: ``limits.line_length`` (any client line, CRLF included; at least
the machine's minimum of 255), ``access.pop3_max_bad_commands``,
``access.pop3_idle_timeout`` (the wait for each command, in every state:
RFC 1939 §3 asks for at least ten minutes; the session is then closed
without UPDATE), ``limits.command_timeout`` (a client that does not read
what we send), ``access.max_auth_failures`` (via the login guard).

Invariants:

- A client never sees a traceback or an internal text: a failure is an
  ``-ERR`` with a response code and a safe text; the detail goes to the log.
- The lock is held from before the snapshot until after UPDATE: no two
  sessions of this platform work on one maildrop at once.
- Nothing is removed before QUIT, and QUIT's ``+OK`` means removed.
- Passwords are never logged.

Logs: ``access.pop3_closed`` (one line per session: user, why it ended,
messages retrieved and deleted), ``access.pop3_update_failed``,
``access.pop3_failed`` (a command failed unexpectedly),
``access.pop3_lock_lost``, ``access.pop3_lock_failed``, and the login
events of :mod:`.context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

from intermail.access.context import AccessContext, LoginGuard, LoginRefused
from intermail.directory.db import Account
from intermail.errors import (
    ErrorKind,
    LocalProtocolError,
    MailError,
    RemoteProtocolError,
)
from intermail.ids import new_session_id
from intermail.log import current_context, log_event, register_events
from intermail.net.pump import PeerClosedError, Pump, PumpTimeout
from intermail.proto.pop3 import (
    MIN_MAX_LINE,
    AuthPlain,
    AutoReply,
    ConnectionClosed,
    Dele,
    Err,
    Greeting,
    List,
    MultiLine,
    MultiLineData,
    MultiLineEnd,
    MultiLineStart,
    Noop,
    Ok,
    Pop3Server,
    Quit,
    Retr,
    Rset,
    StartTls,
    Stat,
    Top,
    Uidl,
    UserPass,
    err_for_error,
)
from intermail.rpc.client import RpcClient

__all__ = ["Pop3Session", "TopCut", "uid_runs"]

log = logging.getLogger("intermail.access.pop3")

register_events({
    "access.pop3_closed": "a POP3 session ended (user, reason, messages retrieved and deleted)",
    "access.pop3_update_failed": "POP3 UPDATE could not remove the deleted messages (the client got -ERR)",
    "access.pop3_failed": "a POP3 command failed unexpectedly (the client got -ERR [SYS/TEMP])",
    "access.pop3_lock_lost": "a POP3 session found its maildrop lock held by another session; it ends",
    "access.pop3_lock_failed": "renewing or releasing a POP3 maildrop lock failed (a renewal is tried again;"
                               " an unreleased lock runs out with its lease)",
})

MAILBOX = "INBOX"
MAX_RANGES = 10_000  # UID ranges per store call (intermail.mailstore.names.uid_ranges)
UNLOCK_TIMEOUT = 2.0  # seconds a session's end waits for the store to release its lock
BODY_RESUMES = 3  # times a message body broken off by a lost store connection is resumed
STLS_HANDSHAKE_TIMEOUT = 30.0

_NO_SUCH_MESSAGE = "no such message"
_NOT_REMOVED = "some deleted messages not removed"


class _Refused(Exception):
    """Ends a command with this Err."""

    def __init__(self, answer: Err):
        super().__init__(answer.text)
        self.answer = answer


class _Abort(Exception):
    """A streamed answer cannot be finished: the connection must be aborted."""


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """A socket error escaping the store client is a store that went away: UNAVAILABLE."""
    try:
        yield
    except (ConnectionError, OSError) as exc:
        raise MailError(ErrorKind.UNAVAILABLE, safe="mail store unavailable",
                        detail=f"{type(exc).__name__}: {exc}") from None


class TopCut:
    """TOP's cut (RFC 1939 §7): the header, the blank line after it, and ``lines`` body lines.

    Fed the message in chunks of any size, :meth:`feed` returns what of each
    chunk goes out; :attr:`done` turns True once nothing more is needed.  A
    message shorter than asked for goes out whole, as does one without a
    blank line (all header).  Lines end at LF (CRLF in the store).
    """

    def __init__(self, lines: int):
        if lines < 0:
            raise ValueError("lines must be >= 0")
        self.lines = lines
        self.in_header = True
        self.done = False
        self._partial = b""  # the start of the current line, at most 2 bytes: enough to see an empty one

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                self._partial = (self._partial + data[pos:pos + 2])[:2]
                return data
            if self.in_header:
                content = self._partial + data[pos:end] if len(self._partial) + (end - pos) <= 1 else b"x"
                if content in (b"", b"\r"):
                    self.in_header = False
                    if self.lines == 0:
                        self.done = True
            else:
                self.lines -= 1
                if self.lines == 0:
                    self.done = True
            self._partial = b""
            pos = end + 1
            if self.done:
                return data[:pos]


def uid_runs(uids: list[int], marked: set[int]) -> list[list[int]]:
    """The marked UIDs as ``[low, high]`` ranges over runs of consecutive *view* entries.

    A range may span UIDs absent from the view: they were removed before
    the snapshot and can never come back, and UIDs above the view's last
    are never covered.
    """
    runs: list[list[int]] = []
    open_run = False
    for uid in uids:
        if uid in marked:
            if open_run:
                runs[-1][1] = uid
            else:
                runs.append([uid, uid])
                open_run = True
        else:
            open_run = False
    return runs


class _Maildrop:
    """The session's fixed view of INBOX: message n is ``uids[n-1]``."""

    def __init__(self, uidvalidity: int, messages: list[tuple[int, int]]):
        self.uidvalidity = uidvalidity
        self.uids = [uid for uid, _ in messages]
        self.sizes = [size for _, size in messages]
        self.deleted: set[int] = set()  # message numbers marked by DELE
        self.retrieved = 0

    def stat(self) -> tuple[int, int]:
        count = octets = 0
        for n, size in enumerate(self.sizes, 1):
            if n not in self.deleted:
                count += 1
                octets += size
        return count, octets

    def message(self, n: int) -> tuple[int, int]:
        """(uid, size) of message n, or _Refused if there is none (or it is marked deleted)."""
        if not 1 <= n <= len(self.uids):
            raise _Refused(Err(_NO_SUCH_MESSAGE))
        if n in self.deleted:
            raise _Refused(Err(f"message {n} already deleted"))
        return self.uids[n - 1], self.sizes[n - 1]

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.uids) + 1) if n not in self.deleted]

    def unique_id(self, n: int) -> str:
        return f"{self.uidvalidity}.{self.uids[n - 1]}"


class Pop3Session:
    """One POP3 client connection."""

    def __init__(self, ctx: AccessContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.ctx = ctx
        self.access = ctx.config.access
        limits = ctx.config.limits
        self.machine = Pop3Server(max_line=max(limits.line_length, MIN_MAX_LINE),
                                  max_bad_commands=self.access.pop3_max_bad_commands,
                                  stls_available=ctx.tls_context is not None)
        self.pump = Pump(reader, writer, self.machine, timeout=self.access.pop3_idle_timeout,
                         send_timeout=limits.command_timeout)
        peer = writer.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else str(peer)
        self.guard = LoginGuard(ctx, "pop3", peer_ip=self.peer_ip)
        session = current_context().get("session_id") or new_session_id()
        self.owner = f"{ctx.instance or ctx.hostname}/{session}"  # the maildrop lock's owner: unique
        self.account: Account | None = None
        self.client: RpcClient | None = None
        self.maildrop: _Maildrop | None = None
        self._locked = False
        self._lock_lost = False
        self._renewal: asyncio.Task | None = None
        self._streaming = False
        self._reason = "peer closed"
        self._handlers = {Stat: self._stat, List: self._list, Uidl: self._uidl, Retr: self._retr, Top: self._top,
                          Dele: self._dele, Noop: self._noop, Rset: self._rset, Quit: self._quit}

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.pump.send(Greeting(f"{self.ctx.hostname} POP3 ready"[:200]))
            await self._loop()
        except PumpTimeout as exc:
            self._reason = "idle timeout" if exc.what == "waiting for the peer" else "client not reading"
        except _Abort:
            self._reason = "aborted"
            self.pump.writer.transport.abort()
        except (PeerClosedError, ConnectionError, RemoteProtocolError, ssl.SSLError, OSError) as exc:
            self._reason = f"connection lost: {type(exc).__name__}"
        finally:
            await self._release()
            maildrop = self.maildrop
            if self.account is not None:
                log_event(log, "access.pop3_closed", user=self.account.address, reason=self._reason,
                          retrieved=maildrop.retrieved if maildrop else 0,
                          deleted=len(maildrop.deleted) if maildrop else 0)
            with contextlib.suppress(Exception):
                await self.pump.close()

    async def _loop(self) -> None:
        while True:
            event = await self.pump.next_event()
            if isinstance(event, AutoReply):
                await self.pump.send(event)
            elif isinstance(event, ConnectionClosed):
                self._reason = event.reason
                return
            elif isinstance(event, StartTls):
                await self._start_tls(event)
            elif isinstance(event, (UserPass, AuthPlain)):
                await self._answer(await self._login(event))
            else:
                await self._command(event)

    async def _answer(self, answer: Ok | Err | MultiLine) -> None:
        await self.pump.send(answer)
        self.ctx.count("commands", "pop3", "err" if isinstance(answer, Err) else "ok")

    async def _command(self, event: object) -> None:
        """A TRANSACTION command (or QUIT from it): the handler's answer, or the Err it ends with."""
        handler = self._handlers[type(event)]
        try:
            if self._lock_lost:
                text = _NOT_REMOVED + ": maildrop lock lost" if isinstance(event, Quit) else "maildrop lock lost"
                raise _Refused(Err(text, "IN-USE", close=True))
            answer = await handler(event)
        except _Refused as refused:
            answer = refused.answer
        except MailError as exc:
            if self._streaming:
                raise _Abort from None
            if exc.kind in (ErrorKind.INVALID, ErrorKind.CORRUPT):
                log_event(log, "access.pop3_failed", level=logging.ERROR, command=type(event).__name__,
                          error=f"{exc.kind.name}: {exc.detail}"[:300])
            answer = err_for_error(exc) if exc.kind is not ErrorKind.NOTFOUND else Err(_NO_SUCH_MESSAGE)
        except (LocalProtocolError, ValueError, KeyError, TypeError, IndexError) as exc:
            log_event(log, "access.pop3_failed", level=logging.ERROR, command=type(event).__name__,
                      error=f"{type(exc).__name__}: {exc}"[:300], exc_info=True)
            if self._streaming:
                raise _Abort from None
            answer = Err("internal error, try again later", "SYS/TEMP")
        if answer is not None:
            await self._answer(answer)
        else:
            self.ctx.count("commands", "pop3", "ok")

    # -- AUTHORIZATION ---------------------------------------------------------------

    async def _start_tls(self, event: StartTls) -> None:
        if self.ctx.tls_context is None:  # not offered, so the machine should not have let it through
            await self.pump.send(Err("STLS not available"))
            return
        await self.pump.start_tls(self.ctx.tls_context, reply=event, handshake_timeout=STLS_HANDSHAKE_TIMEOUT)

    async def _login(self, event: UserPass | AuthPlain) -> Ok | Err:
        if self.ctx.login_needs_tls and not self.pump.tls:
            return Err("Plaintext logins are disabled here: use STLS first", "AUTH")
        if isinstance(event, AuthPlain):
            user = event.authcid
            if event.authzid and event.authzid.lower() != user.lower():
                return Err("Authorization identity must be the user", "AUTH")
        else:
            user = event.user
        try:
            account = await self.guard.login(user, event.password)
        except LoginRefused as refused:
            if refused.kind is ErrorKind.PERM:
                return Err("Authentication failed", "AUTH", close=refused.close)
            if refused.kind is ErrorKind.LIMIT:
                return Err("Too many failed logins, try again later", "SYS/TEMP", close=refused.close)
            return Err("Authentication service unavailable, try again later", "SYS/TEMP", close=refused.close)
        try:
            return await self._open_maildrop(account)
        except MailError as exc:
            log_event(log, "access.pop3_failed", level=logging.WARNING, command="login", user=account.address,
                      error=f"{exc.kind.name}: {exc.detail}"[:300])
            await self._release()
            self.account = self.client = self.maildrop = None
            return Err("Your maildrop is unavailable, try again later", "SYS/TEMP")

    async def _open_maildrop(self, account: Account) -> Ok | Err:
        """Lock the account's maildrop and snapshot it (RFC 1939 §4: the maildrop is then fixed)."""
        self.client = self.ctx.stores.client(account.mss)
        self.account = account
        answer = await self._lock()
        if not answer.get("acquired"):
            self.account = None
            return Err("maildrop already locked", "IN-USE")
        self._locked = True
        self._renewal = asyncio.get_running_loop().create_task(self._renew())
        result, rows = await self._lines("mailbox.select", {"name": MAILBOX})
        uids = [row[0] for row in rows]
        sizes: dict[int, int] = {}
        if uids:
            _, info = await self._lines("message.fetch", {"name": MAILBOX, "uids": [[uids[0], uids[-1]]],
                                                          "info": False})
            sizes = {row["uid"]: row["size"] for row in info}
        # a message expunged between the two calls has no size: it is gone already
        self.maildrop = _Maildrop(result["uidvalidity"], [(uid, sizes[uid]) for uid in uids if uid in sizes])
        count, octets = self.maildrop.stat()
        return Ok(f"maildrop has {count} messages ({octets} octets)")

    # -- the lock --------------------------------------------------------------------

    async def _call(self, method: str, args: dict) -> dict:
        """A store call on the user's behalf, retried across a reconnect (see UPDATE in the module docstring)."""
        assert self.client is not None and self.account is not None
        with _store_errors():
            return await self.client.call(method, {"user": self.account.address, **args}, idempotent=True)

    async def _lock(self) -> dict:
        return await self._call("maildrop.lock", {"owner": self.owner, "lease": self.access.pop3_lock_lease})

    async def _renew(self) -> None:
        interval = self.access.pop3_lock_lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                answer = await asyncio.wait_for(self._lock(), interval)
            except (MailError, TimeoutError) as exc:
                log_event(log, "access.pop3_lock_failed", level=logging.WARNING,
                          error=(exc.detail if isinstance(exc, MailError) else "no answer in time")[:300])
                continue
            if not answer.get("acquired"):
                assert self.account is not None
                log_event(log, "access.pop3_lock_lost", level=logging.WARNING, user=self.account.address)
                self._lock_lost = True
                self._locked = False
                return

    async def _release(self) -> None:
        """Stop renewing and release the lock (bounded: the store drops it anyway when the lease ends)."""
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewal
        if not self._locked:
            return
        self._locked = False
        assert self.client is not None and self.account is not None
        if self.client.address is None:
            return  # no live store connection: the lock went with the one that took it
        try:
            async with asyncio.timeout(UNLOCK_TIMEOUT):
                with _store_errors():
                    # not retried on a new connection: the lock went with the old one
                    await self.client.call("maildrop.unlock", {"user": self.account.address, "owner": self.owner})
        except (MailError, TimeoutError) as exc:
            log_event(log, "access.pop3_lock_failed", level=logging.WARNING, user=self.account.address,
                      error="unlock: " + (exc.detail if isinstance(exc, MailError) else "no answer in time")[:300])

    # -- TRANSACTION -----------------------------------------------------------------

    @property
    def _view(self) -> _Maildrop:
        assert self.maildrop is not None
        return self.maildrop

    async def _stat(self, event: Stat) -> Ok:
        count, octets = self._view.stat()
        return Ok(f"{count} {octets}")

    async def _list(self, event: List) -> Ok | MultiLine:
        view = self._view
        if event.msg is not None:
            _, size = view.message(event.msg)
            return Ok(f"{event.msg} {size}")
        count, octets = view.stat()
        return MultiLine(f"{count} messages ({octets} octets)", [f"{n} {view.sizes[n - 1]}" for n in view.live()])

    async def _uidl(self, event: Uidl) -> Ok | MultiLine:
        view = self._view
        if event.msg is not None:
            view.message(event.msg)
            return Ok(f"{event.msg} {view.unique_id(event.msg)}")
        return MultiLine("unique-id listing follows", [f"{n} {view.unique_id(n)}" for n in view.live()])

    async def _retr(self, event: Retr) -> None:
        uid, size = self._view.message(event.msg)
        await self._stream(event.msg, uid, f"{size} octets", None)
        self._view.retrieved += 1

    async def _top(self, event: Top) -> None:
        uid, _ = self._view.message(event.msg)
        await self._stream(event.msg, uid, "top of message follows", TopCut(event.lines))

    async def _dele(self, event: Dele) -> Ok:
        self._view.message(event.msg)
        self._view.deleted.add(event.msg)
        return Ok(f"message {event.msg} deleted")

    async def _noop(self, event: Noop) -> Ok:
        return Ok()

    async def _rset(self, event: Rset) -> Ok:
        self._view.deleted.clear()
        count, octets = self._view.stat()
        return Ok(f"maildrop has {count} messages ({octets} octets)")

    async def _quit(self, event: Quit) -> Ok | Err:
        """The UPDATE state (RFC 1939 §6): remove the marked messages, release the lock, then answer."""
        view = self._view
        marked = {view.uids[n - 1] for n in view.deleted}
        answer: Ok | Err = Ok(f"{self.ctx.hostname} POP3 server signing off"[:200])
        if marked:
            runs = uid_runs(view.uids, marked)
            assert self.account is not None
            try:
                for start in range(0, len(runs), MAX_RANGES):
                    await self._call("message.expunge", {"name": MAILBOX, "uids": runs[start:start + MAX_RANGES],
                                                         "any_flags": True})
            except MailError as exc:
                log_event(log, "access.pop3_update_failed", level=logging.WARNING, user=self.account.address,
                          messages=len(marked), error=f"{exc.kind.name}: {exc.detail}"[:300])
                code = "SYS/PERM" if exc.kind in (ErrorKind.PERM, ErrorKind.INVALID, ErrorKind.CORRUPT) else "SYS/TEMP"
                answer = Err(_NOT_REMOVED, code)
        await self._release()
        return answer

    # -- message bodies ----------------------------------------------------------------

    async def _stream(self, n: int, uid: int, first_line: str, cut: TopCut | None) -> None:
        """Send message n as a streamed multi-line answer (all of it, or TOP's cut)."""
        async with contextlib.aclosing(self._body(uid)) as chunks:
            try:
                first = await anext(chunks, b"")
            except MailError as exc:
                if exc.kind is ErrorKind.NOTFOUND:
                    raise _Refused(Err(f"message {n} no longer exists")) from None
                raise
            self._streaming = True
            await self.pump.send(MultiLineStart(first_line))
            data = first
            while True:
                if cut is not None:
                    data = cut.feed(data)
                if data:
                    await self.pump.send(MultiLineData(data))
                if cut is not None and cut.done:
                    break
                data = await anext(chunks, None)
                if data is None:
                    break
            await self.pump.send(MultiLineEnd())
            self._streaming = False

    async def _body(self, uid: int) -> AsyncIterator[bytes]:
        """The message's bytes as the store sends them, resumed where they broke off if the connection is lost."""
        assert self.client is not None and self.account is not None
        offset = resumes = 0
        while True:
            try:
                with _store_errors():
                    _, body = await self.client.call_stream("message.body", {
                        "user": self.account.address, "name": MAILBOX, "uid": uid, "offset": offset},
                        idempotent=True)
                async with body:
                    while True:
                        with _store_errors():
                            data = await anext(body, None)
                        if data is None:
                            return
                        offset += len(data)
                        yield data
            except MailError as exc:
                if exc.kind is not ErrorKind.UNAVAILABLE or resumes >= BODY_RESUMES:
                    raise
                resumes += 1

    async def _lines(self, method: str, args: dict) -> tuple[dict, list[Any]]:
        """A read-only call whose body is JSON lines."""
        assert self.client is not None and self.account is not None
        with _store_errors():
            result, body = await self.client.call_stream(method, {"user": self.account.address, **args},
                                                         idempotent=True)
            async with body:
                data = await body.read()
        return result, [json.loads(line) for line in data.splitlines() if line]
