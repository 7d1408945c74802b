"""The IMAP session of the access server: one client connection, its state, and its mailbox view.

Owns: what each IMAP command means for a logged-in user (RFC 3501 / RFC
9051 with IDLE, UIDPLUS, MOVE, NAMESPACE, ENABLE, ID, SPECIAL-USE,
LIST-EXTENDED, LIST-STATUS, CHILDREN, UNSELECT, ESEARCH, SEARCHRES,
SASL-IR, LITERAL+, MULTIAPPEND, BINARY, CONDSTORE, UTF8=ACCEPT), carried
out as calls on the user's store over the store RPC; the session states
(not authenticated, authenticated, selected, logout); and the selected
mailbox as this session sees it -- the sequence numbers -- kept in step
with the store through its pushes.  The wire is the
:class:`~intermail.proto.imap.server.ImapServer` machine's, driven by the pump.

Commands run one at a time, in the order they arrive: the pump reads no
further input while one runs, so pipelining is bounded by TCP flow
control and every response comes in command order.

The mailbox view.  SELECT takes the store's snapshot (every UID) and
subscribes to the mailbox's pushes.  Changes by other sessions (and
deliveries) are queued as they are pushed and reported at the points RFC
9051 §7 allows: at the end of any command, during IDLE, and on NOOP --
except that EXPUNGE responses are held back during FETCH, STORE and SEARCH
by sequence number (RFC 9051 §7.5.1), so a number the client is using
never shifts under it.  A message is removed from the view only when its
EXPUNGE is sent; a FETCH of a message already gone from the store simply
returns nothing for it.

Failover.  The store RPC client retries idempotent calls against the same
identity for ``access.failover_window`` seconds (a spare taking over), so a
command then takes longer instead of failing.  After a reconnect the view
is resynchronised from a fresh snapshot (pushes sent while no connection
existed are lost): vanished messages become EXPUNGEs, new ones EXISTS,
flag changes since the last known MODSEQ untagged FETCHes.

Invariants:

- A client never sees a traceback or an internal error text: a failure is
  a tagged ``NO`` with a response code (RFC 5530), a store that cannot be
  reached ``NO [UNAVAILABLE]``.
- Passwords are never logged.
- The view's UIDs are ascending; sequence number n is the n-th of them.

Logs: ``access.imap_failed`` (a command failed unexpectedly), and the
login events of :mod:`.context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from intermail.access import imap_fetch as fx
from intermail.access.context import AccessContext, LoginGuard, LoginRefused
from intermail.directory.db import Account
from intermail.errors import ErrorKind, LocalProtocolError, MailError, RemoteProtocolError
from intermail.log import log_event, register_events
from intermail.mailstore import mime
from intermail.net.pump import PeerClosedError, Pump, PumpTimeout
from intermail.proto.imap import commands as c
from intermail.proto.imap import render
from intermail.proto.imap.commands import decode_plain
from intermail.proto.imap.grammar import FetchAttribute, GrammarError, SequenceSet
from intermail.proto.imap.server import (
    AuthResponse,
    BadCommand,
    Command,
    ConnectionClosed,
    Continuation,
    IdleDone,
    ImapServer,
    LiteralRequest,
    LiteralTooBig,
    Tagged,
    Untagged,
)
from intermail.rpc.client import RpcClient

__all__ = ["ImapSession", "capabilities"]

log = logging.getLogger("intermail.access.imap")

register_events({
    "access.imap_failed": "an IMAP command failed unexpectedly (the client got NO [SERVERBUG])",
    "access.imap_resync": "a selected mailbox was resynchronised after the store connection came back",
})

DELIMITER = "/"
SPECIAL_USES = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive", "\\All", "\\Flagged")  # the store's
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_CODES = {
    ErrorKind.NOTFOUND: "NONEXISTENT", ErrorKind.EXISTS: "ALREADYEXISTS", ErrorKind.PERM: "CANNOT",
    ErrorKind.NOQUOTA: "OVERQUOTA", ErrorKind.LIMIT: "LIMIT", ErrorKind.INVALID: "CANNOT",
    ErrorKind.UNAVAILABLE: "UNAVAILABLE", ErrorKind.TEMP: "UNAVAILABLE", ErrorKind.FENCED: "UNAVAILABLE",
    ErrorKind.CORRUPT: "SERVERBUG",
}
_NO_EXPUNGE = (c.Fetch, c.Store, c.Search)  # by sequence number: no EXPUNGE while they run (RFC 9051 §7.5.1)
_LOGIN_CHALLENGES = (b"Username:", b"Password:")
_WRITE_BATCH = 256 << 10  # untagged responses queued before a write


def capabilities(ctx: AccessContext, *, tls: bool, authenticated: bool) -> list[str]:
    """What the server announces now (RFC 9051 §7.2.2: it changes with TLS and login)."""
    caps = ["IMAP4rev1", "IMAP4rev2"]
    can_login = tls or not ctx.login_needs_tls
    if not authenticated:
        if ctx.tls_context is not None and not tls:
            caps.append("STARTTLS")
        if can_login:
            caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
        else:
            caps.append("LOGINDISABLED")
    caps += ["SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN",
             "SPECIAL-USE", "CREATE-SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS", "ESEARCH", "SEARCHRES",
             "MULTIAPPEND", "BINARY", "CONDSTORE", "UTF8=ACCEPT", "STATUS=SIZE",
             f"APPENDLIMIT={ctx.config.limits.message_size}"]
    return caps


class _Failed(Exception):
    """Ends a command with a tagged NO (or BAD) carrying ``code``."""

    def __init__(self, text: str, code: str | None = None, status: str = "NO"):
        super().__init__(text)
        self.text = text
        self.code = code
        self.status = status


class _View:
    """The selected mailbox as this session sees it."""

    def __init__(self, result: dict, rows: list[list], readonly: bool, client: RpcClient):
        self.id: int = result["id"]
        self.name: str = result["name"]
        self.uidvalidity: int = result["uidvalidity"]
        self.uidnext: int = result["uidnext"]
        self.highestmodseq: int = result["highestmodseq"]
        self.readonly = readonly
        self.client = client
        self.uids: list[int] = [row[0] for row in rows]
        self.pending: list[dict] = []  # pushes not reported yet
        self.held_expunges: set[int] = set()  # gone from the store, EXPUNGE not sent yet
        self.own: set[tuple[int, int]] = set()  # (uid, modseq) of our own STOREs: no echo
        self.resync = False
        self.subscription: Any = None
        self.saved: list[int] | None = None  # SEARCHRES


class ImapSession:
    """One IMAP client connection."""

    def __init__(self, ctx: AccessContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.ctx = ctx
        config = ctx.config
        self.limits = config.limits
        access = config.access
        self.machine = ImapServer(max_line=access.imap_max_line, max_literal=access.imap_max_literal,
                                  max_append=self.limits.message_size, max_bad_commands=access.imap_max_bad_commands)
        self.pump = Pump(reader, writer, self.machine, send_timeout=self.limits.command_timeout)
        peer = writer.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else str(peer)
        self.guard = LoginGuard(ctx, "imap", self.peer_ip)
        self.account: Account | None = None
        self.client: RpcClient | None = None
        self.view: _View | None = None
        self.enabled: set[str] = set()
        self.wake = asyncio.Event()
        self._auth: dict[str, Any] | None = None  # an AUTHENTICATE exchange in progress
        self._out: list[Untagged] = []  # untagged responses not written yet
        self._out_size = 0
        self._closing = False

    # -- the loop ------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.account is None:
            return c.NOT_AUTHENTICATED
        return c.SELECTED if self.view is not None else c.AUTHENTICATED

    @property
    def user(self) -> str:
        assert self.account is not None
        return self.account.address

    async def run(self) -> None:
        try:
            caps = " ".join(capabilities(self.ctx, tls=self.pump.tls, authenticated=False))
            await self._send(Untagged.status("OK", "intermail IMAP ready", f"CAPABILITY {caps}"))
            await self._loop()
        except (PeerClosedError, ConnectionError, RemoteProtocolError, TimeoutError, OSError):
            pass
        finally:
            await self._unselect()
            with contextlib.suppress(Exception):
                await self.pump.close()

    async def _loop(self) -> None:
        while not self._closing:
            timeout = self.limits.idle_timeout if self.account is not None else self.limits.command_timeout
            try:
                event = await self.pump.next_event(timeout)
            except PumpTimeout:
                await self._send(Untagged.status("BYE", "Autologout: idle for too long"))
                return
            if isinstance(event, Command):
                await self._command(event.tag, event.command)
            elif isinstance(event, (BadCommand, LiteralTooBig)):
                await self._send(event.response)
            elif isinstance(event, LiteralRequest):
                await self._send(self._literal_decision(event))
            elif isinstance(event, AuthResponse):
                await self._auth_step(event)
            elif isinstance(event, ConnectionClosed):
                if event.reason == "too many errors":
                    with contextlib.suppress(ConnectionError, OSError, LocalProtocolError):
                        await self._send(Untagged.status("BYE", "Too many invalid commands"))
                return

    def _literal_decision(self, event: LiteralRequest) -> Continuation | Tagged:
        if event.message:
            if self.account is None:
                return event.refuse("Log in first", status="NO", code=None)
            if event.size > self.limits.message_size:
                return event.refuse("Message too big")
        return event.accept()

    async def _command(self, tag: str, command: Any) -> None:
        if self.state not in command.STATES:
            await self._send(Tagged(tag, "BAD", f"{command.name} is not valid in this state"))
            return
        handler = getattr(self, "_do_" + type(command).__name__.lower())
        try:
            result = await handler(tag, command)
        except _Failed as exc:
            await self._flush(command)
            await self._send(Tagged(tag, exc.status, exc.text, exc.code))
            self.ctx.count("commands", "imap", "no")
            return
        except MailError as exc:
            await self._flush(command)
            text = exc.safe[:200] if exc.safe else "failed"
            await self._send(Tagged(tag, "NO", _clean(text), _CODES.get(exc.kind)))
            self.ctx.count("commands", "imap", "no")
            return
        except (PeerClosedError, PumpTimeout, ConnectionError, RemoteProtocolError, OSError):
            raise  # the connection is gone: nothing to answer
        except Exception as exc:  # our bug: the client gets a clear NO, the session goes on
            log_event(log, "access.imap_failed", level=logging.ERROR, command=command.name,
                      error=f"{type(exc).__name__}: {exc}"[:300], exc_info=True)
            await self._send(Tagged(tag, "NO", "Internal error", "SERVERBUG"))
            self.ctx.count("commands", "imap", "error")
            return
        if result is None:
            return  # the handler answered (LOGOUT, IDLE, AUTHENTICATE...)
        await self._flush(command)
        code, text = result if isinstance(result, tuple) else (None, result)
        await self._send(Tagged(tag, "OK", text, code))
        self.ctx.count("commands", "imap", "ok")

    async def _untagged(self, *items: Untagged | bytes | str) -> None:
        """Queue untagged responses; they go out with the command's next response, in one write."""
        for item in items:
            event = item if isinstance(item, Untagged) else Untagged(item)
            self._out.append(event)
            self._out_size += len(event.data) if isinstance(event.data, (bytes, str)) else 64
        if self._out_size >= _WRITE_BATCH:
            await self._send()

    async def _send(self, *events: object) -> None:
        """Write what is queued and ``events`` in one write (and drain)."""
        out, self._out, self._out_size = [*self._out, *events], [], 0
        if out:
            await self.pump.send_all(out)

    # -- any state -----------------------------------------------------------------

    async def _do_capability(self, tag: str, cmd: c.Capability) -> str:
        caps = capabilities(self.ctx, tls=self.pump.tls, authenticated=self.account is not None)
        await self._untagged("CAPABILITY " + " ".join(caps))
        return "CAPABILITY completed"

    async def _do_noop(self, tag: str, cmd: Any) -> str:
        return f"{cmd.name} completed"

    async def _do_logout(self, tag: str, cmd: c.Logout) -> None:
        await self._send(Untagged.status("BYE", "Logging out"), Tagged(tag, "OK", "LOGOUT completed"))
        self._closing = True

    async def _do_id(self, tag: str, cmd: c.Id) -> str:
        await self._untagged(b"ID " + render.value(("name", "intermail", "vendor", "intermail")))
        return "ID completed"

    # -- not authenticated ---------------------------------------------------------

    async def _do_starttls(self, tag: str, cmd: c.StartTls) -> tuple[str | None, str] | None:
        if self.ctx.tls_context is None:
            raise _Failed("STARTTLS is not available here", status="BAD")
        if self.pump.tls:
            raise _Failed("TLS is active already", status="BAD")
        await self.pump.start_tls(self.ctx.tls_context, reply=Tagged(tag, "OK", "Begin TLS negotiation now"),
                                  handshake_timeout=30.0)
        return None

    def _check_login_allowed(self) -> None:
        if self.ctx.login_needs_tls and not self.pump.tls:
            raise _Failed("Log in over TLS (STARTTLS) only", "PRIVACYREQUIRED")

    async def _do_login(self, tag: str, cmd: c.Login) -> tuple[str, str]:
        self._check_login_allowed()
        return await self._log_in(cmd.username, cmd.password)

    async def _log_in(self, user: str, password: str) -> tuple[str, str]:
        try:
            account = await self.guard.login(user, password)
        except LoginRefused as exc:
            if exc.close:
                self._closing = True
            if exc.kind is ErrorKind.PERM:
                raise _Failed("Authentication failed", "AUTHENTICATIONFAILED") from None
            if exc.kind is ErrorKind.LIMIT:
                raise _Failed("Too many login attempts, try again later", "UNAVAILABLE") from None
            raise _Failed("Authentication service unavailable, try again later", "UNAVAILABLE") from None
        try:
            self.client = self.ctx.stores.client(account.mss)
        except MailError:
            raise _Failed("Your mail store is unavailable, try again later", "UNAVAILABLE") from None
        self.account = account
        caps = " ".join(capabilities(self.ctx, tls=self.pump.tls, authenticated=True))
        return f"CAPABILITY {caps}", "Logged in"

    async def _do_authenticate(self, tag: str, cmd: c.Authenticate) -> tuple[str, str] | None:
        if cmd.mechanism not in ("PLAIN", "LOGIN"):
            raise _Failed(f"Mechanism {cmd.mechanism[:40]} is not supported", status="NO")
        self._check_login_allowed()
        self._auth = {"tag": tag, "mechanism": cmd.mechanism, "answers": []}
        if cmd.initial_response is not None:
            return await self._auth_answer(cmd.initial_response)
        await self._send(Continuation.challenge(b"" if cmd.mechanism == "PLAIN" else _LOGIN_CHALLENGES[0]))
        return None

    async def _auth_step(self, event: AuthResponse) -> None:
        if self._auth is None:
            return
        tag = self._auth["tag"]
        if event.data is None:
            self._auth = None
            await self._send(Tagged(tag, "BAD", "Authentication cancelled"))
            return
        try:
            result = await self._auth_answer(event.data)
        except _Failed as exc:
            self._auth = None
            await self._send(Tagged(tag, exc.status, exc.text, exc.code))
            return
        if result is not None:
            await self._send(Tagged(tag, "OK", result[1], result[0]))

    async def _auth_answer(self, data: bytes) -> tuple[str, str] | None:
        """One client answer of the SASL exchange: None when another challenge was sent."""
        auth = self._auth
        assert auth is not None
        if auth["mechanism"] == "PLAIN":
            self._auth = None
            try:
                authzid, user, password = decode_plain(data)
            except GrammarError:
                raise _Failed("Malformed PLAIN response", status="BAD") from None
            if authzid and authzid.lower() != user.lower():
                raise _Failed("Authorization identity must be the user", "AUTHORIZATIONFAILED")
            return await self._log_in(user, password)
        auth["answers"].append(data)
        if len(auth["answers"]) < 2:
            await self._send(Continuation.challenge(_LOGIN_CHALLENGES[1]))
            return None
        self._auth = None
        try:
            user, password = (a.decode("utf-8") for a in auth["answers"])
        except UnicodeDecodeError:
            raise _Failed("Malformed LOGIN response", status="BAD") from None
        return await self._log_in(user, password)

    # -- authenticated -------------------------------------------------------------

    async def _call(self, method: str, args: dict, *, idempotent: bool = True, **kwargs: Any) -> dict:
        assert self.client is not None
        return await self.client.call(method, {"user": self.user, **args}, idempotent=idempotent, **kwargs)

    async def _read(self, method: str, args: dict) -> tuple[dict, bytes]:
        """A read with a streamed answer, whole; sent again when the store connection broke mid-answer.

        The RPC client replays an idempotent call lost before its answer
        began; one lost while its body came is this function's to replay,
        within ``access.failover_window``, so a take-over is a pause here too.
        """
        assert self.client is not None
        deadline = time.monotonic() + self.ctx.config.access.failover_window
        while True:
            try:
                result, body = await self.client.call_stream(method, {"user": self.user, **args}, idempotent=True)
                async with body:
                    return result, await body.read()
            except MailError as exc:
                if exc.kind is not ErrorKind.UNAVAILABLE or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _lines(self, method: str, args: dict) -> tuple[dict, list[Any]]:
        result, data = await self._read(method, args)
        return result, [json.loads(line) for line in data.splitlines() if line]

    async def _do_enable(self, tag: str, cmd: c.Enable) -> str:
        known = {"CONDSTORE", "UTF8=ACCEPT", "IMAP4REV2"}
        new = [name.upper() for name in cmd.capabilities if name.upper() in known and name.upper() not in self.enabled]
        self.enabled.update(new)
        new = ["IMAP4rev2" if name == "IMAP4REV2" else name for name in new]
        if self.utf8:
            self.machine.utf8 = True
        await self._untagged(" ".join(["ENABLED", *new]))
        return "ENABLE completed"

    @property
    def utf8(self) -> bool:
        return "UTF8=ACCEPT" in self.enabled or self.rev2

    @property
    def rev2(self) -> bool:
        """The client enabled IMAP4rev2 (RFC 9051 §6.3.1): ESEARCH only, no \\Recent, UTF-8 names."""
        return "IMAP4REV2" in self.enabled

    @property
    def condstore(self) -> bool:
        return "CONDSTORE" in self.enabled

    async def _do_select(self, tag: str, cmd: c.Select | c.Examine) -> tuple[str, str]:
        readonly = isinstance(cmd, c.Examine)
        had = self.view is not None
        await self._unselect()
        if had and (self.rev2 or self.condstore):
            await self._untagged(Untagged.status("OK", "Previous mailbox closed", "CLOSED"))
        if cmd.condstore:
            self.enabled.add("CONDSTORE")
        try:
            result, rows = await self._lines("mailbox.select", {"name": cmd.mailbox})
        except MailError as exc:
            if exc.kind is ErrorKind.NOTFOUND:
                raise _Failed("No such mailbox", "NONEXISTENT") from None
            raise
        assert self.client is not None
        view = _View(result, rows, readonly, self.client)
        view.subscription = await self.client.subscribe([f"mailbox:{view.id}"], self._on_push,
                                                        on_reconnect=self._on_reconnect)
        self.view = view
        # a change between the snapshot and the subscription: catch up now
        status = await self._call("mailbox.status", {"name": view.name})
        if status["highestmodseq"] != view.highestmodseq or status["uidnext"] != view.uidnext:
            view.resync = True
        unseen = next((i + 1 for i, row in enumerate(rows) if "\\Seen" not in row[1].split()), None)
        out = [Untagged(b"FLAGS " + render.value(render.flags(SYSTEM_FLAGS))),
               Untagged.status("OK", "Flags permitted", "PERMANENTFLAGS " + (
                   "()" if readonly else "(" + " ".join(SYSTEM_FLAGS) + " \\*)")),
               Untagged(f"{len(view.uids)} EXISTS")]
        if self.rev2:  # RFC 9051 §6.3.2: the mailbox's name as the server knows it
            out.append(Untagged(render.list_response((), DELIMITER, view.name, utf8=True)))
        else:
            out.append(Untagged("0 RECENT"))
        if unseen is not None and not self.rev2:
            out.append(Untagged.status("OK", "First unseen", f"UNSEEN {unseen}"))
        out += [Untagged.status("OK", "UIDs valid", f"UIDVALIDITY {view.uidvalidity}"),
                Untagged.status("OK", "Predicted next UID", f"UIDNEXT {view.uidnext}"),
                Untagged.status("OK", "Highest", f"HIGHESTMODSEQ {view.highestmodseq}")]
        await self._untagged(*out)
        return ("READ-ONLY" if readonly else "READ-WRITE"), f"{cmd.name} completed"

    _do_examine = _do_select

    async def _unselect(self) -> None:
        view, self.view = self.view, None
        if view is not None and view.subscription is not None:
            with contextlib.suppress(MailError, ValueError, ConnectionError):
                await view.client.unsubscribe(view.subscription)

    def _on_push(self, topic: str, data: dict) -> None:
        view = self.view
        if view is not None and topic == f"mailbox:{view.id}":
            view.pending.append(data)
            self.wake.set()

    def _on_reconnect(self) -> None:
        if self.view is not None:
            self.view.resync = True
            self.wake.set()

    async def _do_create(self, tag: str, cmd: c.Create) -> str:
        name = _mailbox_arg(cmd.mailbox.rstrip(DELIMITER) or cmd.mailbox)  # RFC 9051 §6.3.4: ignore a trailing "/"
        if name.upper() == "INBOX":
            raise _Failed("INBOX exists already", "ALREADYEXISTS")
        if len(cmd.special_use) > 1:
            raise _Failed("One special use per mailbox", "USEATTR")
        if cmd.special_use and cmd.special_use[0] not in SPECIAL_USES:
            raise _Failed(f"Special use {cmd.special_use[0][:40]} is not supported", "USEATTR")
        args: dict[str, Any] = {"name": name}
        if cmd.special_use:
            args["special_use"] = cmd.special_use[0]
        await self._call("mailbox.create", args, idempotent=False)
        return "CREATE completed"

    async def _do_delete(self, tag: str, cmd: c.Delete) -> str:
        name = _mailbox_arg(cmd.mailbox)
        if name.upper() == "INBOX":
            raise _Failed("INBOX cannot be deleted", "CANNOT")
        if self.view is not None and self.view.name == name:
            await self._unselect()
        await self._call("mailbox.delete", {"name": name}, idempotent=False)
        return "DELETE completed"

    async def _do_rename(self, tag: str, cmd: c.Rename) -> str:
        old, new = _mailbox_arg(cmd.mailbox), _mailbox_arg(cmd.new_name)
        await self._call("mailbox.rename", {"name": old, "new": new}, idempotent=False)
        return "RENAME completed"

    async def _do_subscribe(self, tag: str, cmd: c.Subscribe | c.Unsubscribe) -> str:
        on = isinstance(cmd, c.Subscribe)
        await self._call("mailbox.subscribe", {"name": _mailbox_arg(cmd.mailbox), "on": on})
        return f"{cmd.name} completed"

    _do_unsubscribe = _do_subscribe

    async def _do_namespace(self, tag: str, cmd: c.Namespace) -> str:
        await self._untagged(b"NAMESPACE ((\"\" \"/\")) NIL NIL")
        return "NAMESPACE completed"

    async def _do_list(self, tag: str, cmd: c.List) -> str:
        if not any(cmd.patterns) and not cmd.extended:
            await self._untagged(render.list_response(["\\Noselect"], DELIMITER, "", utf8=self.utf8))
            return "LIST completed"
        boxes = (await self._call("mailbox.list", {}))["mailboxes"]
        selection, returns = set(cmd.selection), set(cmd.returns)
        subscribed_only = "SUBSCRIBED" in selection
        want_subscribed = subscribed_only or "SUBSCRIBED" in returns
        special_only = "SPECIAL-USE" in selection
        recursive = "RECURSIVEMATCH" in selection
        exists = {b["name"]: b for b in boxes}
        subscribed = set((await self._call("mailbox.subscriptions", {}))["names"]) if want_subscribed else set()
        names: dict[str, list[str]] = {}
        extended: dict[str, list[tuple[str, object]]] = {}
        patterns = [_join(cmd.reference, p) for p in cmd.patterns if p]
        candidates = set(exists) | (subscribed if subscribed_only else set())
        # every parent of an existing name is a node of the hierarchy too
        for name in list(candidates):
            parts = name.split(DELIMITER)
            for i in range(1, len(parts)):
                candidates.add(DELIMITER.join(parts[:i]))
        for name in sorted(candidates, key=_inbox_first):
            if not any(_matches(p, name) for p in patterns):
                continue
            box = exists.get(name)
            children = any(other.startswith(name + DELIMITER) for other in exists)
            attributes: list[str] = []
            if box is None:
                attributes.append("\\NonExistent" if subscribed_only or cmd.extended else "\\Noselect")
            attributes.append("\\HasChildren" if children else "\\HasNoChildren")
            if box is not None and box["special_use"]:
                attributes.append(box["special_use"])
            if name in subscribed:
                attributes.append("\\Subscribed")
            if subscribed_only and name not in subscribed:
                child_subscribed = recursive and any(s.startswith(name + DELIMITER) for s in subscribed)
                if not child_subscribed:
                    continue
                extended[name] = [("CHILDINFO", ("SUBSCRIBED",))]
            if special_only and (box is None or not box["special_use"]):
                continue
            if box is None and not children and name not in subscribed:
                continue
            names[name] = attributes
        for name, attributes in names.items():
            await self._untagged(render.list_response(attributes, DELIMITER, name, utf8=self.utf8,
                                                      extended=extended.get(name, ())))
            if cmd.status_items is not None and "\\NonExistent" not in attributes and name in exists:
                with contextlib.suppress(MailError):
                    await self._untagged(await self._status_data(name, cmd.status_items))
        return "LIST completed"

    async def _do_lsub(self, tag: str, cmd: c.Lsub) -> str:
        subscribed = (await self._call("mailbox.subscriptions", {}))["names"]
        boxes = {b["name"] for b in (await self._call("mailbox.list", {}))["mailboxes"]}
        pattern = _join(cmd.reference, cmd.pattern)
        for name in sorted(subscribed, key=_inbox_first):
            if _matches(pattern, name):
                attributes = [] if name in boxes else ["\\Noselect"]
                await self._untagged(render.list_response(attributes, DELIMITER, name, utf8=self.utf8, kind="LSUB"))
        return "LSUB completed"

    async def _status_data(self, name: str, items: Sequence[str]) -> bytes:
        s = await self._call("mailbox.status", {"name": name})
        values = {"MESSAGES": s["messages"], "RECENT": 0, "UIDNEXT": s["uidnext"], "UIDVALIDITY": s["uidvalidity"],
                  "UNSEEN": s["unseen"], "DELETED": s["deleted"], "SIZE": s["size"],
                  "HIGHESTMODSEQ": s["highestmodseq"], "APPENDLIMIT": self.limits.message_size}
        return render.status_response(name, [(item, values[item]) for item in items], utf8=self.utf8)

    async def _do_status(self, tag: str, cmd: c.Status) -> str:
        try:
            await self._untagged(await self._status_data(_mailbox_arg(cmd.mailbox), cmd.items))
        except MailError as exc:
            if exc.kind is ErrorKind.NOTFOUND:
                raise _Failed("No such mailbox", "NONEXISTENT") from None
            raise
        return "STATUS completed"

    async def _do_append(self, tag: str, cmd: c.Append) -> tuple[str, str]:
        name = _mailbox_arg(cmd.mailbox)
        uids: list[int] = []
        uidvalidity = 0
        quota = self.account.quota_bytes if self.account else 0
        for message in cmd.messages:
            args: dict[str, Any] = {"name": name, "flags": [f for f in message.flags if f.lower() != "\\recent"],
                                    "quota": quota}
            if message.internal_date is not None:
                args["date"] = message.internal_date.timestamp()
            try:
                result = await self._call("message.append", args, idempotent=False, body=message.data)
            except MailError as exc:
                if exc.kind is ErrorKind.NOTFOUND:
                    raise _Failed("No such mailbox", "TRYCREATE") from None
                raise
            uidvalidity = result["uidvalidity"]
            uids.append(result["uid"])
        return f"APPENDUID {uidvalidity} {_uid_set(uids)}", "APPEND completed"

    async def _do_idle(self, tag: str, cmd: c.Idle) -> None:
        await self._send(Continuation("idling"))
        reader = asyncio.ensure_future(self.pump.next_event(self.limits.idle_timeout))
        try:
            while True:
                await self._flush(cmd)
                await self._send()
                self.wake.clear()
                waker = asyncio.ensure_future(self.wake.wait())
                done, _ = await asyncio.wait({reader, waker}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if reader in done:
                    break
        except BaseException:
            reader.cancel()
            raise
        try:
            event = reader.result()
        except PumpTimeout:
            await self._send(Untagged.status("BYE", "Autologout: idle for too long"))
            self._closing = True
            return
        if isinstance(event, IdleDone):
            await self._flush(cmd)
            await self._send(event.response)
        elif isinstance(event, ConnectionClosed):
            self._closing = True

    # -- selected ------------------------------------------------------------------

    def _selected(self) -> _View:
        assert self.view is not None
        return self.view

    def _writable(self) -> _View:
        view = self._selected()
        if view.readonly:
            raise _Failed("Mailbox is read-only (EXAMINE)", "READ-ONLY")
        return view

    def _uid_ranges(self, sequence: SequenceSet, uid: bool) -> list[list[int]]:
        """The UIDs a command's set names, as ranges; BAD for a sequence number past the view."""
        view = self._selected()
        if sequence.saved:
            return [[u, u] for u in (view.saved or ())]
        if uid:
            largest = view.uids[-1] if view.uids else 0
            # "*" with an empty mailbox names nothing; with UIDs past the last, the last message (RFC 9051 §6.4.8)
            out = []
            for low, high in sequence.ranges:
                a = largest if low is None else low
                b = largest if high is None else high
                if (low is None or high is None) and not view.uids:
                    continue
                out.append([min(a, b), max(a, b)])
            return out
        if not view.uids and any(None in pair for pair in sequence.ranges):
            return []  # "1:*" in an empty mailbox names no message (not an error)
        numbers = sequence.resolve(len(view.uids))
        if any(a < 1 or b > len(view.uids) for a, b in numbers):
            raise _Failed("Invalid message sequence number", status="BAD")
        return fx.seq_uid_ranges(view.uids, numbers)

    async def _do_check(self, tag: str, cmd: c.Check) -> str:
        return "CHECK completed"

    async def _do_close(self, tag: str, cmd: c.Close) -> str:
        view = self._selected()
        if not view.readonly:
            with contextlib.suppress(MailError):
                await self._call("message.expunge", {"name": view.name}, idempotent=False)
        await self._unselect()
        return "CLOSE completed"

    async def _do_unselect(self, tag: str, cmd: c.Unselect) -> str:
        await self._unselect()
        return "UNSELECT completed"

    async def _do_expunge(self, tag: str, cmd: c.Expunge) -> str:
        view = self._writable()
        args: dict[str, Any] = {"name": view.name}
        if cmd.uids is not None:
            ranges = self._uid_ranges(cmd.uids, True)
            if not ranges:
                return "EXPUNGE completed"
            args["uids"] = ranges
        result = await self._call("message.expunge", args, idempotent=True)
        await self._send_expunges(result["uids"])
        return f"{cmd.name} completed"

    async def _send_expunges(self, uids: Sequence[int]) -> None:
        view = self._selected()
        out = []
        for uid in sorted(uids):
            seq = fx.uid_to_seq(view.uids, uid)
            if seq is not None:
                del view.uids[seq - 1]
                out.append(Untagged(f"{seq} EXPUNGE"))
            view.held_expunges.discard(uid)
        await self._untagged(*out)

    async def _do_search(self, tag: str, cmd: c.Search) -> str:
        view = self._selected()
        if cmd.charset is not None and cmd.charset.upper() not in ("UTF-8", "US-ASCII"):
            raise _Failed("Only UTF-8 and US-ASCII searches", "BADCHARSET (UTF-8 US-ASCII)")
        search_ctx = fx.SearchContext(view.uids, view.uidnext, view.saved)
        tree = fx.criteria(cmd.criteria, search_ctx)
        _, found = await self._lines("message.search", {"name": view.name, "criteria": tree})
        if cmd.uid:
            results = sorted(found)
        else:
            results = sorted(s for s in (fx.uid_to_seq(view.uids, u) for u in found) if s is not None)
        uids_found = sorted(found) if cmd.uid else [view.uids[s - 1] for s in results]
        modseq = None
        if any(k.name == "MODSEQ" for k in _walk(cmd.criteria)) and uids_found:
            _, rows = await self._lines("message.fetch", {"name": view.name, "uids": fx.ranges(uids_found),
                                                          "info": False})
            modseq = max((r["modseq"] for r in rows), default=None)
        if cmd.returns is None and not self.rev2:
            await self._untagged(render.search_response(results, modseq=modseq))
            return f"{cmd.name} completed"
        options = set(cmd.returns or ()) or {"ALL"}
        data: list[tuple[str, object]] = []
        if "MIN" in options and results:
            data.append(("MIN", results[0]))
        if "MAX" in options and results:
            data.append(("MAX", results[-1]))
        if "ALL" in options and results:
            data.append(("ALL", SequenceSet(tuple((a, b) for a, b in fx.ranges(results)))))
        if "COUNT" in options:
            data.append(("COUNT", len(results)))
        if modseq is not None:
            data.append(("MODSEQ", modseq))
        if "SAVE" in options:
            if results and options & {"MIN", "MAX"} and not options & {"ALL", "COUNT"}:
                # RFC 5182 §2.1: with only MIN and/or MAX, only those are saved
                keep = {results[0]} if "MIN" in options else set()
                keep |= {results[-1]} if "MAX" in options else set()
                uids_found = [u for u, r in zip(uids_found, results, strict=True) if r in keep]
            view.saved = uids_found
            if options == {"SAVE"}:
                return f"{cmd.name} completed"
        await self._untagged(render.esearch_response(tag, uid=cmd.uid, results=data))
        return f"{cmd.name} completed"

    async def _do_store(self, tag: str, cmd: c.Store) -> tuple[str | None, str]:
        view = self._writable()
        ranges = self._uid_ranges(cmd.sequence_set, cmd.uid)
        if not ranges:
            return None, f"{cmd.name} completed"
        mode = {"add": "+", "remove": "-", "replace": "="}[cmd.mode]
        args: dict[str, Any] = {"name": view.name, "uids": ranges, "mode": mode,
                                "flags": [f for f in cmd.flags if f.lower() != "\\recent"]}
        if cmd.unchanged_since is not None:
            args["unchanged_since"] = cmd.unchanged_since
            self.enabled.add("CONDSTORE")
        result = await self._call("message.store", args)
        out = []
        for uid, flags, modseq in result["changed"]:
            view.own.add((uid, modseq))
            seq = fx.uid_to_seq(view.uids, uid)
            if seq is None or (cmd.silent and cmd.unchanged_since is None):
                continue
            items: list[tuple[str, object]] = []
            if not cmd.silent:
                items.append(("FLAGS", render.flags(flags.split())))
            if cmd.uid:
                items.append(("UID", uid))
            if self.condstore:
                items.append(("MODSEQ", (modseq,)))
            out.append(Untagged(render.fetch(seq, items)))
        await self._untagged(*out)
        if result["failed"]:
            failed = result["failed"] if cmd.uid else [s for s in (fx.uid_to_seq(view.uids, u) for u in
                                                                   result["failed"]) if s is not None]
            return f"MODIFIED {_uid_set(sorted(failed))}", "Conditional STORE failed"
        return None, f"{cmd.name} completed"

    async def _do_copy(self, tag: str, cmd: c.Copy | c.Move) -> tuple[str | None, str]:
        move = isinstance(cmd, c.Move)
        view = self._writable() if move else self._selected()
        ranges = self._uid_ranges(cmd.sequence_set, cmd.uid)
        if not ranges:
            return None, f"{cmd.name} completed"
        target = _mailbox_arg(cmd.mailbox)
        args: dict[str, Any] = {"name": view.name, "uids": ranges, "target": target}
        if not move:
            args["quota"] = self.account.quota_bytes if self.account else 0
        try:
            result = await self._call("message.move" if move else "message.copy", args, idempotent=False)
        except MailError as exc:
            if exc.kind is ErrorKind.NOTFOUND:
                raise _Failed("No such mailbox", "TRYCREATE") from None
            raise
        pairs = result["pairs"]
        if not pairs:
            return None, f"{cmd.name} completed"
        code = f"COPYUID {result['uidvalidity']} {_uid_set([p[0] for p in pairs])} {_uid_set([p[1] for p in pairs])}"
        if not move:
            return code, f"{cmd.name} completed"
        await self._untagged(Untagged.status("OK", "Moved", code))
        await self._send_expunges([p[0] for p in pairs])
        return None, f"{cmd.name} completed"

    _do_move = _do_copy

    async def _do_fetch(self, tag: str, cmd: c.Fetch) -> str:
        view = self._selected()
        ranges = self._uid_ranges(cmd.sequence_set, cmd.uid)
        attributes = list(cmd.attributes)
        if cmd.uid and not any(a.name == "UID" for a in attributes):
            attributes.insert(0, FetchAttribute("UID"))
        if cmd.changed_since is not None:
            self.enabled.add("CONDSTORE")
        if self.condstore and cmd.changed_since is not None and not any(a.name == "MODSEQ" for a in attributes):
            attributes.append(FetchAttribute("MODSEQ"))
        if not ranges:
            return "FETCH completed"
        sets_seen = not view.readonly and any(a.sets_seen for a in attributes)
        with_info = fx.needs_info(attributes)
        args: dict[str, Any] = {"name": view.name, "uids": ranges, "info": with_info}
        if cmd.changed_since is not None:
            args["changed_since"] = cmd.changed_since
        _, rows = await self._lines("message.fetch", args)
        if sets_seen:
            unseen = [r["uid"] for r in rows if "\\Seen" not in r["flags"].split()]
            if unseen:
                changed = await self._call("message.store", {"name": view.name, "uids": fx.ranges(unseen), "mode": "+",
                                                             "flags": ["\\Seen"]})
                news = {uid: (flags, modseq) for uid, flags, modseq in changed["changed"]}
                for row in rows:
                    if row["uid"] in news:
                        row["flags"], row["modseq"] = news[row["uid"]]
                        view.own.add((row["uid"], row["modseq"]))
                        row["seen_now"] = True
        batch: list[Untagged] = []
        size = 0
        for row in rows:
            seq = fx.uid_to_seq(view.uids, row["uid"])
            if seq is None:
                continue
            data = await self._fetch_one(view, seq, row, attributes)
            batch.append(Untagged(data))
            size += len(data)
            if size >= 256 << 10:
                await self._untagged(*batch)
                batch, size = [], 0
        await self._untagged(*batch)
        return f"{cmd.name} completed"

    async def _fetch_one(self, view: _View, seq: int, row: dict, attributes: list[FetchAttribute]) -> bytes:
        info = mime.from_json(row["info"]) if row.get("info") else None
        whole: bytes | None = None
        items: list[tuple[str | FetchAttribute, object]] = []
        flags_sent = False

        async def message_bytes() -> bytes:
            nonlocal whole
            if whole is None:
                whole = await self._body(view, row["uid"])
            return whole

        for a in attributes:
            name = a.name
            if name == "UID":
                items.append(("UID", row["uid"]))
            elif name == "FLAGS":
                items.append(("FLAGS", render.flags(row["flags"].split())))
                flags_sent = True
            elif name == "INTERNALDATE":
                items.append(("INTERNALDATE", fx.internaldate(row["date"])))
            elif name == "RFC822.SIZE":
                items.append(("RFC822.SIZE", row["size"]))
            elif name == "MODSEQ":
                items.append(("MODSEQ", (row["modseq"],)))
            elif name == "ENVELOPE":
                assert info is not None
                items.append(("ENVELOPE", fx.envelope(info, self.utf8)))
            elif name == "BODYSTRUCTURE" or (name == "BODY" and a.section is None):
                assert info is not None
                items.append((name, fx.bodystructure(info, name == "BODYSTRUCTURE", self.utf8)))
            elif name.startswith("BINARY"):
                assert info is not None and a.section is not None
                part = mime.part_at(info, a.section.part)
                if part is None:
                    raise _Failed("No such message part", "NONEXISTENT")
                raw = (await message_bytes())[part.body_offset:part.end]
                try:
                    decoded = fx.decode_binary(raw, part.encoding)
                except fx.UnknownCte:
                    raise _Failed("Unknown Content-Transfer-Encoding", "UNKNOWN-CTE") from None
                if name == "BINARY.SIZE":
                    items.append((f"BINARY.SIZE[{a.section}]", len(decoded)))
                else:
                    items.append((a, render.Literal(_partial(decoded, a.partial), binary=b"\x00" in decoded)))
            else:  # BODY[...], BODY.PEEK[...], RFC822, RFC822.HEADER, RFC822.TEXT
                assert info is not None
                span = fx.body_range(info, a)
                data = b""
                if span is not None:
                    offset, size = span
                    if offset == 0 and size == row["size"]:
                        data = await message_bytes()
                    elif whole is not None:
                        data = whole[offset:offset + size]
                    else:
                        data = await self._body(view, row["uid"], offset, size)
                    if a.section is not None and a.section.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
                        data = fx.header_fields(data, a.section.fields,
                                                exclude=a.section.text == "HEADER.FIELDS.NOT")
                data = _partial(data, a.partial)
                label = a if a.section is not None else name
                items.append((label, render.Literal(data)))
        if row.get("seen_now") and not flags_sent:
            items.append(("FLAGS", render.flags(row["flags"].split())))
        return render.fetch(seq, items, utf8=self.utf8)

    async def _body(self, view: _View, uid: int, offset: int = 0, length: int | None = None) -> bytes:
        args: dict[str, Any] = {"name": view.name, "uid": uid, "offset": offset}
        if length is not None:
            args["length"] = length
        return (await self._read("message.body", args))[1]

    # -- unsolicited responses -----------------------------------------------------

    async def _flush(self, command: Any) -> None:
        """Report what changed in the selected mailbox, as far as ``command`` allows (RFC 9051 §7)."""
        view = self.view
        if view is None:
            return
        if view.resync:
            view.resync = False
            await self._resync(view)
        allow_expunge = not (isinstance(command, _NO_EXPUNGE) and not getattr(command, "uid", False))
        pending, view.pending = view.pending, []
        out: list[Untagged] = []
        new: list[int] = []
        last = view.uids[-1] if view.uids else 0
        for event in pending:
            kind = event.get("event")
            if kind == "exists":
                uid = event.get("uid", 0)
                if uid > last and uid not in new:
                    new.append(uid)
                view.uidnext = max(view.uidnext, event.get("uidnext", 0))
            elif kind == "expunge":
                view.held_expunges.update(u for u in event.get("uids", ()) if fx.uid_to_seq(view.uids, u))
                new = [u for u in new if u not in set(event.get("uids", ()))]
            elif kind == "flags":
                uid, modseq = event.get("uid"), event.get("modseq", 0)
                view.highestmodseq = max(view.highestmodseq, modseq)
                if (uid, modseq) in view.own:
                    view.own.discard((uid, modseq))
                    continue
                seq = fx.uid_to_seq(view.uids, uid) if isinstance(uid, int) else None
                if seq is not None and uid not in view.held_expunges:
                    items: list[tuple[str, object]] = [("FLAGS", render.flags(str(event.get("flags", "")).split()))]
                    items.append(("UID", uid))
                    if self.condstore:
                        items.append(("MODSEQ", (modseq,)))
                    out.append(Untagged(render.fetch(seq, items)))
            elif kind in ("gone", "renamed"):
                if kind == "gone":
                    out.append(Untagged.status("BYE", "The selected mailbox was deleted"))
                    self._closing = True
                elif isinstance(event.get("name"), str):
                    view.name = event["name"]
        if allow_expunge and view.held_expunges:
            for uid in sorted(view.held_expunges, reverse=True):
                seq = fx.uid_to_seq(view.uids, uid)
                if seq is not None:
                    del view.uids[seq - 1]
                    out.append(Untagged(f"{seq} EXPUNGE"))
            view.held_expunges.clear()
        if new:
            view.uids.extend(sorted(new))
            out.append(Untagged(f"{len(view.uids)} EXISTS"))
        if len(view.own) > 10000:
            view.own.clear()
        await self._untagged(*out)

    async def _resync(self, view: _View) -> None:
        """After a store reconnect: take a fresh snapshot and turn the differences into pending events."""
        try:
            result, rows = await self._lines("mailbox.select", {"name": view.name})
        except MailError as exc:
            if exc.kind is ErrorKind.NOTFOUND:
                view.pending.append({"event": "gone"})
                return
            view.resync = True  # try again at the next chance
            return
        if result["uidvalidity"] != view.uidvalidity:
            view.pending.append({"event": "gone"})
            return
        log_event(log, "access.imap_resync", mailbox_id=view.id)
        now = {row[0]: row for row in rows}
        gone = [u for u in view.uids if u not in now]
        if gone:
            view.pending.insert(0, {"event": "expunge", "uids": gone})
        last = view.uids[-1] if view.uids else 0
        for uid in sorted(now):
            row = now[uid]
            if uid > last:
                view.pending.append({"event": "exists", "uid": uid, "uidnext": result["uidnext"]})
            elif row[2] > view.highestmodseq:
                view.pending.append({"event": "flags", "uid": uid, "flags": row[1], "modseq": row[2]})
        view.uidnext = max(view.uidnext, result["uidnext"])
        view.highestmodseq = max(view.highestmodseq, result["highestmodseq"])


# -- helpers ----------------------------------------------------------------------------


def _clean(text: str) -> str:
    text = re.sub(r"[\r\n\x00]", " ", text).strip() or "failed"
    return text if not text.startswith("[") else "(" + text + ")"


def _mailbox_arg(name: str) -> str:
    if name.upper() == "INBOX":
        return "INBOX"
    return name


def _join(reference: str, pattern: str) -> str:
    if not reference or pattern.startswith(DELIMITER):
        return pattern
    return reference + pattern if reference.endswith(DELIMITER) else reference + DELIMITER + pattern


def _matches(pattern: str, name: str) -> bool:
    """LIST wildcards: ``*`` matches anything, ``%`` anything but the delimiter (RFC 9051 §6.3.9).

    ``INBOX`` is case-insensitive, also as a pattern's first level.
    """
    if pattern[:5].upper() == "INBOX":
        pattern = "INBOX" + pattern[5:]
    regex = "".join(".*" if ch == "*" else "[^/]*" if ch == "%" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, name, re.DOTALL) is not None


def _inbox_first(name: str) -> tuple[int, str]:
    return (0 if name == "INBOX" else 1, name)


def _uid_set(numbers: Sequence[int]) -> str:
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in fx.ranges(numbers)) if numbers else ""


def _partial(data: bytes, partial: tuple[int, int] | None) -> bytes:
    if partial is None:
        return data
    offset, count = partial
    return data[offset:offset + count]


def _walk(keys: Sequence[Any]):
    for key in keys:
        yield key
        for arg in getattr(key, "args", ()):
            if hasattr(arg, "name") and hasattr(arg, "args"):
                yield from _walk([arg])
            elif isinstance(arg, tuple):
                yield from _walk([a for a in arg if hasattr(a, "args")])

