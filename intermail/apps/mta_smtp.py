"""The MTA's SMTP front end: aiosmtpd sessions, recipient policy, and the hand-off to the queue.

Owns: the ``smtp`` (port 25, mail from the world) and ``submission``
(AUTH required) listeners of an MTA, and everything a session decides:
which recipients it takes (the directory says who is local; only an
authenticated client may relay), what a message must look like to be
queued, and when the client hears ``250``::

    front = SmtpFrontEnd(queue, directory, hostname="mta1.intermail.test", submission=False,
                         limits=config.limits, tls_context=ctx, on_enqueued=manager.kick)
    await front.listen(runner, "smtp", "127.0.1.1", 25)

aiosmtpd 1.4.6 drives the sessions (LIBRARIES.md §1): an ``SMTP`` subclass
(:class:`_MtaSmtp`) fixes its gaps and the front end is its handler
(``handle_MAIL/RCPT/DATA``, async ``auth_PLAIN``/``auth_LOGIN``).  What the
subclass changes, and why:

- ``MAIL``/``RCPT`` arguments go to our hooks as the raw bytes: aiosmtpd's
  own parser drops source routes (``<@a:u@b>`` arrives as ``u@b``), upper-
  cases parameter values (ENVID, ORCPT are case-sensitive), refuses every
  RCPT parameter (no DSN) and takes the null sender ``<>`` for "no MAIL
  yet".  The hooks parse with :mod:`intermail.proto.smtp.grammar`.
- Every reply gets an enhanced status code (we announce
  ENHANCEDSTATUSCODES, RFC 2034), and aiosmtpd's own texts are replaced by
  ours: a client never sees ``500 Error: (Class) message``.
- The connection limit per client address, the ``421`` on a command
  timeout, and the goodbye on shutdown (below).

Decisions:

- **Acknowledged = durable (I-1).** ``250 2.0.0 Ok: queued as <id>`` is
  sent only after :meth:`QueueStore.enqueue` returned.  Any queue failure
  is ``451 4.3.0`` (the client keeps the message and retries).  The
  enqueue runs shielded: a client that hangs up while it runs does not cut
  a commit in half, and a message that did get queued is still handed to
  ``on_enqueued`` (the queue manager's kick).
- **Bare CR or LF is refused** (``554 5.6.0``, nothing queued).  aiosmtpd
  1.4.5+ (GHSA-pr2m-px7j-xg65) splits DATA lines on CRLF only, so only
  ``CRLF.CRLF`` ends a message: ``LF.LF``, ``CR.CR`` and ``LF.CRLF`` stay
  inside the body and cannot smuggle a second message past us.  But it
  keeps such bytes in the content, where the next hop might read them as
  line ends -- and our own stores refuse them (RFC 5321 §2.3.8).  So a
  message carrying one is refused here, once the client sent its real end.
- **No CHUNKING.** aiosmtpd 1.4.6 has no BDAT (aio-libs/aiosmtpd#558), so
  it is not announced.  Announced: SIZE, 8BITMIME, SMTPUTF8, PIPELINING
  (aiosmtpd reads pipelined commands in order), ENHANCEDSTATUSCODES, DSN,
  STARTTLS (with a TLS context), AUTH PLAIN LOGIN (after STARTTLS unless
  ``require_tls_for_auth`` is off).
- **Recipients.** Canonicalised by :func:`intermail.directory.address.parse`
  (malformed: ``501 5.1.3``).  A source route is always refused
  (``554 5.7.1``).  Without AUTH these are refused as relay tricks
  (``554 5.7.1``): percent hack and bang path (even at a hosted domain),
  a quoted local part holding ``@``, a domain with a trailing dot, an
  address literal.  For an authenticated client they are ordinary
  addresses.  Then the directory: an account or alias ``250``; unknown
  at a hosted domain ``550 5.1.1``; a domain we do not host is relayed for
  an authenticated client only (``554 5.7.1`` otherwise); the directory
  unreachable ``451 4.4.3`` -- never accept what we might then lose.
  ``<Postmaster>`` (RFC 5321 §4.5.1) means ``postmaster@<hostname>``.
  A recipient given twice is accepted once.
- **DSN (RFC 3461).** ``RET``/``ENVID`` on MAIL and ``NOTIFY``/``ORCPT`` on
  RCPT are checked and kept in the queue :class:`Envelope` (``params``
  holds the MAIL keywords, upper case, plus ``auth_user`` for an
  authenticated client; NOTIFY and ORCPT go into each RecipientSpec).
- **AUTH** logs in with the full address through
  :meth:`DirectoryClient.authenticate` (the hash is verified on the
  directory, not on this loop): wrong credentials ``535 5.7.8``,
  throttled or directory unreachable ``454 4.7.0``.  After
  ``limits.auth_failures_before_delay`` failures on one connection every
  further failure is answered only after ``auth_failure_delay`` seconds.
  AUTH inside a mail transaction is ``503 5.5.1`` (RFC 4954 §4).  On the
  submission listener MAIL needs AUTH first (``530 5.7.0``); without a TLS
  context (and with ``require_tls_for_auth``) nobody can authenticate
  there, which ``listen`` logs as ``mta.smtp_no_auth`` (a warning on
  submission) rather than refusing to start.
- **Limits.** ``limits.message_size`` (SIZE, DATA: ``552 5.3.4``),
  ``limits.line_length`` (``500 5.5.6``), ``limits.recipients``
  (``452 4.5.3``), ``limits.connections_per_ip`` (``421 4.7.0`` at
  connect), ``limits.command_timeout``: aiosmtpd's timer, restarted only by
  a valid command, so one command -- the whole DATA upload included --
  must finish within it; a client that does not is told ``421 4.4.2`` and
  disconnected (a slowloris gains nothing by trickling bytes).  The queue
  write gets a fresh timeout of its own.
- **Shutdown.** When the runner stops, idle sessions are told ``421 4.3.2``
  and closed at once; a session inside DATA finishes its message (and its
  reply) first, then gets the ``421``.
- ``limits.connections_per_ip`` is counted per front end, i.e. per
  listener kind (``smtp`` and ``submission`` each allow that many).
- aiosmtpd internals we rely on (pinned below 2.0): ``_reset_timeout``,
  ``_timeout_cb``, ``_call_handler_hook``, ``_original_transport``,
  ``_create_session``/``_create_envelope`` and ``command_size_limits``.
- aiosmtpd's ``mail.log`` logs every command at INFO; unless the process
  configured that logger, :meth:`SmtpFrontEnd.listen` raises it to WARNING
  (our own events carry what matters).

Logs (each line with the runner's ``session_id`` and ``peer``, and the
``queue_id`` once there is one): ``mta.smtp_queued``,
``mta.smtp_queue_failed``, ``mta.smtp_refused``, ``mta.smtp_auth``,
``mta.smtp_too_many_connections``, ``mta.smtp_timeout``, ``mta.smtp_error``,
``mta.smtp_no_auth``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime
import email.utils
import ipaddress
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope as AioEnvelope, Session as AioSession

from intermail.config import LimitsConfig
from intermail.directory.address import Address, is_relay_hack, is_source_route, parse
from intermail.directory.client import DirectoryClient
from intermail.directory.db import Account, AliasExpansion, Unknown
from intermail.errors import ErrorKind, MailError
from intermail.ids import new_queue_id
from intermail.log import log_context, log_event, register_events
from intermail.net.runner import Runner
from intermail.proto.smtp.grammar import (
    BODY_VALUES,
    GrammarError,
    Problem,
    decode_xtext,
    parse_mail,
    parse_rcpt,
    parse_size_value,
)
from intermail.proto.smtp.replies import (
    BARE_LINE_END_IN_MESSAGE,
    MESSAGE_TOO_BIG,
    SHUTTING_DOWN,
    TOO_MANY_RECIPIENTS,
    UNKNOWN_PARAMETER,
    Reply,
)
from intermail.queue.store import Envelope, QueueStore, RecipientSpec

__all__ = ["SmtpFrontEnd", "received_header"]

log = logging.getLogger("intermail.apps.mta_smtp")

register_events({
    "mta.smtp_queued": "a message was queued and its 250 sent (queue id, sender, recipients, size)",
    "mta.smtp_queue_failed": "the queue could not take a message; the client was told 451 and retries",
    "mta.smtp_refused": "an SMTP command or recipient was refused by policy (relay, unknown user, limits)",
    "mta.smtp_auth": "an SMTP AUTH attempt ended (user, mechanism, result)",
    "mta.smtp_too_many_connections": "a connection was refused: too many from one client address",
    "mta.smtp_timeout": "an SMTP client took longer than the command timeout and was disconnected",
    "mta.smtp_error": "an SMTP session hit an unexpected error; the client got a 451",
    "mta.smtp_no_auth": "a listener has no TLS context while AUTH needs TLS: nobody can authenticate on it",
})

IDENT = "ESMTP intermail"
AUTH_FAILURE_DELAY = 1.0  # seconds added to each AUTH failure past limits.auth_failures_before_delay
REVERSE_DNS_TIMEOUT = 2.0
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_HELO_IN_HEADER = 255

# RFC 5321 §4.5.3.1.4 gives 512; RFC 1870 (SIZE) +26, RFC 6531 (SMTPUTF8) +10,
# RFC 3461 §5 (RET, ENVID) +100, RFC 4954 §5 (AUTH=) +500; RCPT: RFC 3461 §5
# (NOTIFY, ORCPT) +500.
_COMMAND_SIZE_LIMITS = {"MAIL": 512 + 26 + 10 + 100 + 500, "RCPT": 512 + 500}

# -- replies --------------------------------------------------------------------

SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RELAY_RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok (relayed for an authenticated client)")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
PARAMS_NEED_EHLO = Reply(555, "5.5.4", "Parameters need EHLO")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SOURCE_ROUTE = Reply(554, "5.7.1", "Source routes are not accepted")
RELAY_TRICK = Reply(554, "5.7.1", "Relay access denied: address form not accepted without AUTH")
DIRECTORY_DOWN = Reply(451, "4.4.3", "Directory unavailable, try again later")
QUEUE_FAILED = Reply(451, "4.3.0", "Queue unavailable, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary server error, try again later")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
AUTH_BAD_PLAIN = Reply(501, "5.5.2", "Malformed PLAIN response")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")

_GRAMMAR_REPLIES = {
    Problem.SYNTAX: (501, "5.5.2"),
    Problem.ARGUMENTS: (501, "5.5.4"),
    Problem.SENDER: (501, "5.1.7"),
    Problem.RECIPIENT: (501, "5.1.3"),
    Problem.NON_ASCII: (553, "5.6.7"),
    Problem.PARAMETER: (501, "5.5.4"),
}

# aiosmtpd 1.4.6's own replies (prefix of the text it pushes) -> ours.
_AIOSMTPD_REPLIES: tuple[tuple[str, Reply], ...] = (
    ("500 Error: bad syntax", Reply(500, "5.5.2", "Syntax error")),
    ("500 Error: command ", Reply(500, "5.5.1", "Command unrecognized")),
    ("500 Command line too long", Reply(500, "5.5.6", "Line too long")),
    ("500 Line too long", Reply(500, "5.5.6", "Line too long (RFC 5321 4.5.3.1.6); message not accepted")),
    ("500 Error: strict ASCII mode", Reply(500, "5.6.7", "Non-ASCII data not accepted")),
    ("552 Error: Too much mail data", MESSAGE_TOO_BIG),
    ("552 Error: message size", MESSAGE_TOO_BIG),
    ("503 Error: send ", Reply(503, "5.5.1", "Send HELO or EHLO first")),
    ("503 Error: need RCPT", Reply(503, "5.5.1", "Need RCPT command first")),
    ("503 Already authenticated", Reply(503, "5.5.1", "Already authenticated")),
    ("502 EXPN", Reply(502, "5.5.1", "EXPN not implemented")),
)
# Enhanced code by reply code, for the replies aiosmtpd writes without one.
_DEFAULT_ENHANCED = {221: "2.0.0", 421: "4.3.0", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1",
                     504: "5.5.4", 530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 552: "5.3.4", 553: "5.1.3",
                     554: "5.0.0", 555: "5.5.4"}
_NO_ENHANCED = frozenset({220, 334, 354})  # greeting, AUTH challenge, go-ahead (RFC 2034 §3)
_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])([ -])(.*)", re.DOTALL)
_HAS_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")
_TRAILING_DOT_PATH = re.compile(r"<[^<>]*\.>")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 3461 §4.2 addr-type (an atom, in practice)
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_HEADER_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")  # printable ASCII but ( ) \ and space
_REPLY_UNSAFE = re.compile(r"[^\x20-\x7e]")


def enhance(status: str) -> str:
    """``status`` (one aiosmtpd reply line) with an enhanced status code, and our text for aiosmtpd's."""
    for prefix, reply in _AIOSMTPD_REPLIES:
        if status.startswith(prefix):
            return reply.encode().decode("utf-8")[:-2]
    match = _REPLY_LINE.fullmatch(status)
    if match is None:
        return status
    code = int(match.group(1))
    text = match.group(3)
    if code in _NO_ENHANCED or _HAS_ENHANCED.match(text):
        return status
    enhanced = _DEFAULT_ENHANCED.get(code, f"{str(code)[0]}.0.0")
    return f"{code}{match.group(2)}{enhanced} {text.removeprefix('Error: ')}"


# -- the session and envelope aiosmtpd keeps for us -----------------------------------


class MtaSession(AioSession):
    """aiosmtpd's Session, plus what our policy needs to know about the client."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.client_ip = ""
        self.auth_user: str | None = None
        self.auth_failures = 0
        self.reverse_name: str | None = None
        self.reverse_looked_up = False

    # aiosmtpd sets login_data after every successful AUTH, and its property
    # logs a deprecation warning each time; the value is kept without the noise.
    @property  # type: ignore[override]
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class MtaEnvelope(AioEnvelope):
    """aiosmtpd's Envelope, plus the DSN and other parameters that go into the queue's Envelope."""

    def __init__(self) -> None:
        super().__init__()
        self.recipients: list[RecipientSpec] = []
        self.params: dict[str, Any] = {}


# -- the aiosmtpd SMTP subclass ---------------------------------------------------


class _MtaSmtp(SMTP):
    """One SMTP connection: aiosmtpd's session loop with the changes the module docstring lists."""

    def __init__(self, front_end: SmtpFrontEnd, **kwargs: Any):
        self.front_end = front_end
        # Read by SMTP.__init__ to size the StreamReader: set it first.  +1 for
        # the transparency dot (RFC 5321 §4.5.2), as aiosmtpd's own 1001.
        self.line_length_limit = front_end.limits.line_length + 1
        # aiosmtpd keeps these limits in a class-level dict shared by every
        # connection (and grows it on each EHLO): ours is per connection.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(front_end, **kwargs)
        self.command_size_limits.update(_COMMAND_SIZE_LIMITS)
        self.refused = False
        self.client_ip_key = ""  # the per-address count this connection holds
        self.in_data = False
        self._raw_replies = False
        self._counted = False

    # -- connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None and self._original_transport is None
        if first:
            refusal = self.front_end._admit(self, transport)
            if refusal is not None:
                self.refused = True
                transport.write(refusal.encode())  # type: ignore[attr-defined]
                transport.close()
                return
            self._counted = True
        super().connection_made(transport)
        # Also after STARTTLS: aiosmtpd starts a new Session there (RFC 3207 §4.2).
        assert isinstance(self.session, MtaSession)
        self.session.client_ip = self.client_ip_key

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return  # aiosmtpd never saw this connection
        if self._counted:
            self._counted = False
            self.front_end._release(self)
        super().connection_lost(error)

    def _create_session(self) -> MtaSession:
        return MtaSession(self.loop)

    def _create_envelope(self) -> MtaEnvelope:
        return MtaEnvelope()

    def _timeout_cb(self) -> None:
        log_event(log, "mta.smtp_timeout", level=logging.WARNING, timeout=self._timeout_duration,
                  in_data=self.in_data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(TIMEOUT.encode())  # type: ignore[attr-defined]
        super()._timeout_cb()

    def restart_timer(self) -> None:
        """Give the current command a whole command timeout from now (the queue write)."""
        self._reset_timeout()

    def say_goodbye(self) -> None:
        """Shutting down: an idle session is closed now, one inside DATA after its reply."""
        if self.in_data or self.transport is None:
            return
        if not self.transport.is_closing():
            self.transport.write(SHUTTING_DOWN.encode())  # type: ignore[attr-defined]
            self.transport.close()

    # -- replies -----------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if isinstance(status, Reply):
            status = status.encode()[:-2]  # push() adds the last CRLF
        elif isinstance(status, str) and not self._raw_replies:
            status = enhance(status)
        await super().push(status)

    # -- commands whose aiosmtpd version we change ---------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        self._raw_replies = True  # the EHLO reply has no enhanced codes (RFC 2034 §3)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False
        self.command_size_limits.clear()
        self.command_size_limits.update(_COMMAND_SIZE_LIMITS)

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        assert self.envelope is not None
        if self.envelope.mail_from is not None:
            await self.push(NESTED_MAIL)
            return
        await self.push(await self._call_handler_hook("MAIL", _raw(arg)))

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:  # "<>" is a sender: aiosmtpd's truth test is not
            await self.push(NEED_MAIL)
            return
        await self.push(await self._call_handler_hook("RCPT", _raw(arg)))

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False
        if self.front_end.stopping:
            self.say_goodbye()


def _raw(arg: str | None) -> bytes | None:
    """The argument bytes as the client sent them (aiosmtpd decoded them with surrogateescape)."""
    return None if arg is None else arg.encode("utf-8", "surrogateescape")


# -- the front end ------------------------------------------------------------------


class SmtpFrontEnd:
    """The SMTP listeners of one MTA and the policy of their sessions (see the module docstring).

    This object is also the aiosmtpd *handler*: ``handle_*`` hooks and
    ``auth_*`` mechanisms, called with the connection's ``_MtaSmtp``.
    """

    def __init__(
        self,
        queue: QueueStore,
        directory: DirectoryClient,
        *,
        hostname: str,
        submission: bool,
        limits: LimitsConfig,
        tls_context: ssl.SSLContext | None,
        require_tls_for_auth: bool = True,
        on_enqueued: Callable[[str], None],
        auth_failure_delay: float = AUTH_FAILURE_DELAY,
        reverse_dns: Callable[[str], Awaitable[str | None]] | None = None,
        ident: str = IDENT,
    ):
        if not hostname:
            raise ValueError("the SMTP front end needs a hostname (aiosmtpd would block on getfqdn)")
        self.queue = queue
        self.directory = directory
        self.hostname = hostname
        self.submission = submission
        self.limits = limits
        self.tls_context = tls_context
        self.require_tls_for_auth = require_tls_for_auth
        self.on_enqueued = on_enqueued
        self.failed_auth_delay = auth_failure_delay  # no "auth_" prefix: aiosmtpd takes auth_* for mechanisms
        self.reverse_dns = reverse_dns
        self.ident = ident
        self.stopping = False
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._sessions: set[_MtaSmtp] = set()
        self._watchers: list[asyncio.Task] = []
        self._writes: set[asyncio.Task] = set()  # queue writes in flight (they outlive a lost client)

    # -- listening ---------------------------------------------------------------

    async def listen(self, runner: Runner, name: str, host: str, port: int) -> tuple[str, int]:
        """Open listener ``name`` on the runner; returns the bound address (port 0: any)."""
        loop = asyncio.get_running_loop()
        mail_log = logging.getLogger("mail.log")
        if mail_log.level == logging.NOTSET:
            mail_log.setLevel(logging.WARNING)
        bound = await runner.listen_protocol(name, host, port, lambda: self._new_connection(loop))
        if self.require_tls_for_auth and self.tls_context is None:
            # Not fatal (the listener still answers, and refuses): but on
            # submission no client can send anything, so say so loudly.
            log_event(log, "mta.smtp_no_auth", level=logging.WARNING if self.submission else logging.INFO,
                      listener=name, submission=self.submission)
        self._watchers.append(loop.create_task(self._wrap_up_when_stopping(runner)))
        return bound

    def _new_connection(self, loop: asyncio.AbstractEventLoop) -> _MtaSmtp:
        return _MtaSmtp(
            self,
            loop=loop,
            hostname=self.hostname,
            ident=self.ident,
            data_size_limit=self.limits.message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=self.tls_context,
            timeout=self.limits.command_timeout,
            auth_required=self.submission,
            auth_require_tls=self.require_tls_for_auth,
        )

    async def _wrap_up_when_stopping(self, runner: Runner) -> None:
        await runner.stopping.wait()
        self.stopping = True
        for session in list(self._sessions):
            session.say_goodbye()

    async def close(self, timeout: float = 30.0) -> None:
        """Wait (up to ``timeout`` s) for queue writes still in flight, stop the shutdown watchers.

        The app calls it from its ``stop()``, before it closes the queue: the
        runner has closed the listeners and connections by then, but a write
        whose client hung up may still be committing.
        """
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers.clear()

    @property
    def connection_count(self) -> int:
        return len(self._sessions)

    def _admit(self, server: _MtaSmtp, transport: asyncio.BaseTransport) -> Reply | None:
        """None if this new connection may proceed, else the reply that refuses it."""
        if self.stopping:
            return SHUTTING_DOWN
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else ""
        if self._per_ip[ip] >= self.limits.connections_per_ip:
            log_event(log, "mta.smtp_too_many_connections", level=logging.WARNING, client=ip,
                      limit=self.limits.connections_per_ip)
            return TOO_MANY_CONNECTIONS
        self._per_ip[ip] += 1
        server.client_ip_key = ip
        self._sessions.add(server)
        return None

    def _release(self, server: _MtaSmtp) -> None:
        self._sessions.discard(server)
        ip = server.client_ip_key
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    # -- aiosmtpd hooks: EHLO and AUTH ---------------------------------------------

    async def handle_EHLO(self, server: _MtaSmtp, session: MtaSession, envelope: MtaEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must do this itself
        extensions = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        return responses[:-1] + extensions + responses[-1:]

    async def handle_AUTH(self, server: _MtaSmtp, session: MtaSession, envelope: MtaEnvelope,
                          args: list[str]) -> Any:
        if envelope.mail_from is not None:
            return AUTH_IN_TRANSACTION
        return MISSING  # go on with the mechanism

    async def auth_PLAIN(self, server: _MtaSmtp, args: list[str]) -> AuthResult:
        """RFC 4616: ``authzid NUL authcid NUL passwd``, initial response or after a ``334``."""
        if len(args) == 1:
            response = await server.challenge_auth("")
            if response is MISSING:
                return AuthResult(success=False, handled=True)  # aborted; challenge_auth replied
        else:
            response = _b64decode(args[1])
            if response is None:
                await server.push(AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        assert isinstance(response, bytes)
        parts = response.split(b"\x00")
        if len(parts) != 3:
            await server.push(AUTH_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        authzid, user, password = parts
        if authzid and authzid != user:  # acting for another user: not offered
            return await self._authenticated(server, "PLAIN", None, b"")
        return await self._authenticated(server, "PLAIN", user, password)

    async def auth_LOGIN(self, server: _MtaSmtp, args: list[str]) -> AuthResult:
        """The LOGIN mechanism (draft-murchison-sasl-login): user and password after two ``334``."""
        if len(args) == 1:
            user = await server.challenge_auth("Username:")
            if user is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            user = _b64decode(args[1])
            if user is None:
                await server.push(AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(user, bytes) and isinstance(password, bytes)
        return await self._authenticated(server, "LOGIN", user, password)

    async def _authenticated(self, server: _MtaSmtp, mechanism: str, user_raw: bytes | None,
                             password_raw: bytes) -> AuthResult:
        session = server.session
        assert isinstance(session, MtaSession)
        reply = AUTH_INVALID
        user = ""
        try:
            if user_raw is None:
                raise MailError(ErrorKind.PERM, detail="authzid differs from authcid")
            user = user_raw.decode("utf-8")
            password = password_raw.decode("utf-8")
            account = await self.directory.authenticate(user, password, client=session.client_ip)
        except UnicodeDecodeError:
            result = "invalid"
        except MailError as exc:
            if exc.kind in (ErrorKind.PERM, ErrorKind.INVALID, ErrorKind.NOTFOUND):
                result = "invalid"
            elif exc.kind is ErrorKind.LIMIT:
                result, reply = "throttled", Reply(454, "4.7.0", _reply_text(exc.safe))
            else:
                result, reply = "unavailable", AUTH_TEMPORARY
        else:
            session.auth_user = account.address
            log_event(log, "mta.smtp_auth", user=account.address, mechanism=mechanism, result="ok")
            return AuthResult(success=True, auth_data=account.address)
        session.auth_failures += 1
        log_event(log, "mta.smtp_auth", level=logging.WARNING, user=user[:256], mechanism=mechanism,
                  result=result, failures=session.auth_failures)
        if session.auth_failures > self.limits.auth_failures_before_delay:
            await asyncio.sleep(self.failed_auth_delay)
        await server.push(reply)
        return AuthResult(success=False, handled=True)

    # -- aiosmtpd hooks: the transaction --------------------------------------------

    async def handle_MAIL(self, server: _MtaSmtp, session: MtaSession, envelope: MtaEnvelope,
                          arg: bytes | None) -> Reply:
        try:
            mail = parse_mail(_lenient_colon(arg))
        except GrammarError as exc:
            return _grammar_reply(exc)
        if mail.params and not session.extended_smtp:
            return PARAMS_NEED_EHLO
        params: dict[str, Any] = {}
        for keyword, value in mail.params.items():
            problem = _mail_param(keyword, value, params, self.limits.message_size)
            if problem is not None:
                return problem
        sender = ""
        if mail.path:
            try:
                sender = str(parse(mail.path))
            except MailError as exc:
                if not ("SMTPUTF8" in params and not mail.path.isascii()):
                    return Reply(501, "5.1.7", f"Bad sender address syntax: {_reply_text(exc.safe)}")
                sender = mail.path  # a UTF-8 local part: the grammar checked it; our parser does not take it
        if session.authenticated and session.auth_user:
            params["auth_user"] = session.auth_user
        envelope.mail_from = sender
        envelope.smtp_utf8 = "SMTPUTF8" in params
        envelope.params = params
        return SENDER_OK

    async def handle_RCPT(self, server: _MtaSmtp, session: MtaSession, envelope: MtaEnvelope,
                          arg: bytes | None) -> Reply:
        authenticated = bool(session.authenticated)
        if len(envelope.recipients) >= self.limits.recipients:
            return self._refused(TOO_MANY_RECIPIENTS, "too many recipients")
        text = _lenient_colon(arg) or b""
        path_text = text[3:].decode("utf-8", "replace") if text[:3].upper() == b"TO:" else ""
        if is_source_route(path_text):
            return self._refused(SOURCE_ROUTE, "source route", path=path_text)
        try:
            rcpt = parse_rcpt(text, utf8=envelope.smtp_utf8)
        except GrammarError as exc:
            if not authenticated and _TRAILING_DOT_PATH.match(path_text):
                return self._refused(RELAY_TRICK, "trailing dot", path=path_text)
            return _grammar_reply(exc)
        if rcpt.params and not session.extended_smtp:
            return PARAMS_NEED_EHLO
        path = rcpt.path if "@" in rcpt.path else f"postmaster@{self.hostname}"  # <Postmaster>, §4.5.1
        try:
            address = parse(path)
        except MailError as exc:
            return Reply(501, "5.1.3", f"Bad recipient address syntax: {_reply_text(exc.safe)}")
        if not authenticated:
            trick = _relay_trick(address)
            if trick:
                return self._refused(RELAY_TRICK, trick, path=path_text)
        notify, orcpt, problem = _rcpt_params(rcpt.params)
        if problem is not None:
            return problem
        canonical = str(address)
        try:
            resolution = await self.directory.resolve(address)
        except MailError as exc:
            if exc.kind is ErrorKind.INVALID:
                return Reply(501, "5.1.3", f"Bad recipient address syntax: {_reply_text(exc.safe)}")
            log_event(log, "mta.smtp_refused", level=logging.WARNING, reason="directory unavailable",
                      recipient=canonical, error=exc.detail)
            return DIRECTORY_DOWN
        reply = RECIPIENT_OK
        if isinstance(resolution, Unknown):
            if resolution.hosted:
                return self._refused(NO_SUCH_USER, "unknown user", recipient=canonical)
            if not authenticated:
                return self._refused(RELAY_DENIED, "relay denied", recipient=canonical)
            reply = RELAY_RECIPIENT_OK
        elif isinstance(resolution, AliasExpansion) and not (resolution.accounts or resolution.remote):
            return self._refused(NO_SUCH_USER, "alias with no deliverable target", recipient=canonical)
        else:
            assert isinstance(resolution, (Account, AliasExpansion))
        if canonical not in envelope.rcpt_tos:  # the same recipient twice is one delivery
            envelope.rcpt_tos.append(canonical)
            envelope.recipients.append(RecipientSpec(canonical, orcpt, notify))
        return reply

    def _refused(self, reply: Reply, reason: str, **fields: Any) -> Reply:
        log_event(log, "mta.smtp_refused", reason=reason, reply=str(reply), **fields)
        return reply

    async def handle_DATA(self, server: _MtaSmtp, session: MtaSession, envelope: MtaEnvelope) -> Reply:
        content = envelope.original_content or b""
        if _has_bare_line_end(content):
            return self._refused(BARE_LINE_END_IN_MESSAGE, "bare CR or LF in message")
        server.restart_timer()  # the upload used the client's timeout; the queue write gets its own
        queue_id = new_queue_id()
        with log_context(queue_id=queue_id):
            header = received_header(
                helo=session.host_name or "", client_ip=session.client_ip,
                reverse_name=await self._reverse_name(session), hostname=self.hostname,
                protocol=_protocol(session), queue_id=queue_id,
                recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
            )
            queued = Envelope(envelope.mail_from or "", tuple(envelope.recipients), dict(envelope.params))
            data = header + content
            # Shielded: a client that hangs up now must not cut the commit in
            # half; whatever the outcome, _enqueue_done sees it (log, kick).
            write = asyncio.get_running_loop().create_task(self.queue.enqueue(queued, data, queue_id=queue_id))
            self._writes.add(write)
            write.add_done_callback(lambda task: self._enqueue_done(task, queued, len(data)))
            try:
                await asyncio.shield(write)
            except MailError:
                return QUEUE_FAILED
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def _enqueue_done(self, task: asyncio.Task, envelope: Envelope, size: int) -> None:
        self._writes.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log_event(log, "mta.smtp_queue_failed", level=logging.ERROR, sender=envelope.sender,
                      recipients=len(envelope.recipients), error=str(exc))
            return
        queue_id = task.result()
        log_event(log, "mta.smtp_queued", sender=envelope.sender, recipients=len(envelope.recipients),
                  size=size, queue_id=queue_id)
        try:
            self.on_enqueued(queue_id)
        except Exception:
            # The message is queued; a kick lost is a delivery delayed, not lost.
            log_event(log, "mta.smtp_error", level=logging.ERROR, exc_info=True, where="on_enqueued")

    async def handle_exception(self, error: Exception) -> str:
        log_event(log, "mta.smtp_error", level=logging.ERROR, exc_info=error, where="session")
        return INTERNAL_ERROR.encode().decode("ascii")[:-2]

    async def _reverse_name(self, session: MtaSession) -> str | None:
        if self.reverse_dns is None or not session.client_ip:
            return None
        if not session.reverse_looked_up:
            session.reverse_looked_up = True
            try:
                async with asyncio.timeout(REVERSE_DNS_TIMEOUT):
                    session.reverse_name = await self.reverse_dns(session.client_ip)
            except Exception:
                session.reverse_name = None  # no name is an answer too: [ip] alone
        return session.reverse_name


# -- parameters ---------------------------------------------------------------------


def _mail_param(keyword: str, value: str | None, params: dict[str, Any], size_limit: int) -> Reply | None:
    """Check one MAIL parameter and record it in ``params``; a Reply refuses the command."""
    if keyword == "SIZE":  # RFC 1870
        try:
            size = parse_size_value(value)
        except GrammarError:
            return Reply(501, "5.5.4", "SIZE needs a number")
        if size > size_limit:
            return MESSAGE_TOO_BIG
    elif keyword == "BODY":  # RFC 6152
        if value is None or value.upper() not in BODY_VALUES:
            return Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
        params["BODY"] = value.upper()
    elif keyword == "SMTPUTF8":  # RFC 6531 §3.4
        if value is not None:
            return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
        params["SMTPUTF8"] = True
    elif keyword == "RET":  # RFC 3461 §4.3
        if value is None or value.upper() not in ("FULL", "HDRS"):
            return Reply(501, "5.5.4", "RET must be FULL or HDRS")
        params["RET"] = value.upper()
    elif keyword == "ENVID":  # RFC 3461 §4.4
        if value is None or len(value) > MAX_ENVID or not _is_xtext(value):
            return Reply(501, "5.5.4", "ENVID must be xtext of at most 100 characters")
        params["ENVID"] = value
    elif keyword == "AUTH":  # RFC 4954 §5: we may ignore it, and do (we trust no other MTA's AUTH)
        if value is None or not _is_xtext(value):
            return Reply(501, "5.5.4", "AUTH needs an xtext mailbox or <>")
    else:
        return UNKNOWN_PARAMETER
    return None


def _rcpt_params(rcpt_params: dict[str, str | None]) -> tuple[str | None, str | None, Reply | None]:
    """(NOTIFY, ORCPT, refusal) from the RCPT parameters (RFC 3461 §4.1, §4.2)."""
    notify = orcpt = None
    for keyword, value in rcpt_params.items():
        if keyword == "NOTIFY":
            items = [item.upper() for item in (value or "").split(",")]
            if items != ["NEVER"] and not (items and set(items) <= _NOTIFY_VALUES and len(set(items)) == len(items)):
                return None, None, Reply(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
            notify = ",".join(items)
        elif keyword == "ORCPT":
            addr_type, semicolon, xtext = (value or "").partition(";")
            if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or not xtext or not _is_xtext(xtext):
                return None, None, Reply(501, "5.5.4", "ORCPT must be addr-type;xtext")
            orcpt = value
        else:
            return None, None, UNKNOWN_PARAMETER
    return notify, orcpt, None


def _is_xtext(value: str) -> bool:
    try:
        decode_xtext(value)
    except GrammarError:
        return False
    return True


def _relay_trick(address: Address) -> str:
    """Why ``address`` is not accepted from an unauthenticated client; "" when it is fine."""
    if address.is_literal:
        return "address literal"
    if address.quoted and "@" in address.local:
        return "quoted local part with @"
    if is_relay_hack(address):
        return "percent hack or bang path"
    return ""


def _lenient_colon(arg: bytes | None) -> bytes | None:
    """``FROM: <a@b>`` as ``FROM:<a@b>``: RFC 5321 has no space there, but many clients send one."""
    if arg is None:
        return None
    head, colon, rest = arg.partition(b":")
    return head + colon + rest.lstrip(b" ") if colon and head.upper() in (b"FROM", b"TO") else arg


def _grammar_reply(exc: GrammarError) -> Reply:
    code, enhanced = _GRAMMAR_REPLIES[exc.problem]
    return Reply(code, enhanced, _reply_text(exc.text))


def _reply_text(text: str) -> str:
    """A text safe on a reply line: printable, bounded."""
    return _REPLY_UNSAFE.sub("?", text)[:200] or "refused"


def _b64decode(text: str) -> bytes | None:
    if text == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _has_bare_line_end(content: bytes) -> bool:
    """A CR or LF that is not part of a CRLF (aiosmtpd ends every line of its content with CRLF)."""
    pairs = content.count(b"\r\n")
    return content.count(b"\r") != pairs or content.count(b"\n") != pairs


# -- the Received: header -----------------------------------------------------------


def _protocol(session: MtaSession) -> str:
    """The ``with`` keyword (RFC 3848): SMTP after HELO; ESMTP, +S with TLS, +A with AUTH."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTP" + ("S" if session.ssl is not None else "") + ("A" if session.authenticated else "")


def received_header(*, helo: str, client_ip: str, reverse_name: str | None, hostname: str, protocol: str,
                    queue_id: str, recipient: str | None, when: datetime.datetime | None = None) -> bytes:
    """Our trace line, RFC 5321 §4.4::

        Received: from <helo> (<rdns> [<ip>])
                by <hostname> with <protocol> id <queue id>
                for <rcpt>; <date>

    ``for`` only names a single recipient (more would tell each of them
    about the others).  The client's own words (HELO, rDNS) are reduced to
    printable ASCII without parentheses, so they cannot break the header.
    """
    when = when or datetime.datetime.now(datetime.timezone.utc)
    helo_text = _HEADER_UNSAFE.sub("?", helo)[:MAX_HELO_IN_HEADER] or "unknown"
    literal = _address_literal(client_ip)
    tcp_info = f"{_HEADER_UNSAFE.sub('?', reverse_name)[:255]} {literal}" if reverse_name else literal
    lines = [f"Received: from {helo_text} ({tcp_info})", f"\tby {hostname} with {protocol} id {queue_id}"]
    date = email.utils.format_datetime(when)
    if recipient:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3)."""
    try:
        parsed = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return "[unknown]"
    if isinstance(parsed, ipaddress.IPv6Address):
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"
