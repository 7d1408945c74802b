"""Deliver a message over LMTP (or SMTP) with the client machine: one shot, or on a kept connection.

Owns the I/O side of the MTA's client to the message stores: connecting
(TCP, optionally implicit TLS), the greeting and LHLO/EHLO, timeouts, streaming
the body through :class:`intermail.proto.smtp.client.SmtpClient` driven by
:class:`intermail.net.pump.Pump`, and turning whatever happened into a
:class:`DeliveryResult`: the server's final reply for every recipient it
answered (RCPT-time refusals and the replies after the message), and a
:class:`SessionFailure` when the session ended before it answered them all.

- :func:`deliver` connects, runs one transaction, QUITs and closes.  It never
  raises for anything the network or the server does: a refused or timed-out
  connect, a refusing greeting, a timeout, a lost connection or a protocol
  error all come back as a failure, and every recipient without a server
  reply gets the failure's temporary (4xx) reply.
- :class:`LmtpConnection` keeps one connection for many transactions (the
  queue manager reuses a connection per store).  Before every transaction but
  the first it sends RSET and waits for the answer: a connection that died
  while idle (closed by the server, a 421 idle timeout, a reset) is reported
  as :class:`ConnectionDead` *before any byte of the new message is sent*,
  so the caller can reconnect and retry at once without any risk of a double
  delivery.  A failure during a transaction closes the connection
  (``usable`` becomes False) and is returned in the result.

Timeouts (RFC 5321 §4.5.3.2 gives the classic values): ``connect_timeout``
bounds the TCP (and TLS) connect; ``command_timeout`` the wait for each reply
(greeting, LHLO, MAIL, RCPT, DATA, RSET); ``data_timeout`` each write of the
body (a store that stops reading) and the wait for each reply after the
message (the store syncs to disk before it answers); ``quit_timeout`` the
wait for the reply to QUIT, when the results are known already.

Invariants:

- The body is sent only after a 354, and only to a transaction with at least
  one accepted recipient (the machine sees to it).
- A result never claims a delivery the server did not answer with 2xx; a
  recipient the server did not answer gets a 4xx, so the queue retries it.
  When the failure came after the whole message was sent
  (``SessionFailure.after_data``), the store may have kept it: the MTA's
  delivery key (``XDELIVERYKEY``, I-4) makes the retry harmless.
- Arguments that cannot make a valid transaction (a malformed address, a
  UTF-8 address without ``SMTPUTF8``) raise ``LocalProtocolError`` before
  anything is sent: they are the caller's bug, not a delivery outcome.

Logs: nothing; the queue manager logs results with its queue id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import re
import ssl
from collections.abc import Iterable, Sequence

from intermail.errors import RemoteProtocolError
from intermail.net.pump import Pump, PumpTimeout
from intermail.proto.smtp.client import (
    DATA,
    DEFAULT_MAX_REPLY_LINE,
    DEFAULT_MAX_REPLY_LINES,
    END_OF_DATA,
    QUIT,
    RSET,
    Body,
    Capabilities,
    ConnectionClosed,
    EndOfData,
    Greeting,
    Hello,
    Quit,
    Replied,
    Reset,
    SendData,
    SmtpClient,
    Transaction,
    TransactionDone,
)
from intermail.proto.smtp.replies import Reply

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_DATA_TIMEOUT",
    "DEFAULT_QUIT_TIMEOUT",
    "BODY_CHUNK",
    "FailureKind",
    "SessionFailure",
    "DeliveryResult",
    "DeliveryError",
    "ConnectionDead",
    "LmtpConnection",
    "deliver",
]

DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_COMMAND_TIMEOUT = 300.0  # RFC 5321 §4.5.3.2.2-3: MAIL and RCPT, 5 minutes
DEFAULT_DATA_TIMEOUT = 600.0  # RFC 5321 §4.5.3.2.6: after the final dot, 10 minutes
DEFAULT_QUIT_TIMEOUT = 10.0  # the results are known by then: QUIT is a courtesy, not worth minutes
BODY_CHUNK = 64 * 1024  # body bytes dot-stuffed and written per step

STAGE_CONNECT = "connect"
STAGE_GREETING = "greeting"
STAGE_BODY = "body"

_REASON_LIMIT = 400  # octets of text kept in a synthesized reply (a reply line holds 512)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


class FailureKind(enum.Enum):
    """Why a session ended before the server answered every recipient."""

    CONNECT_REFUSED = "connect refused"  # nothing listens there
    CONNECT_TIMEOUT = "connect timeout"  # no answer to the connect within connect_timeout
    CONNECT_FAILED = "connect failed"  # any other connect error (unreachable, TLS handshake)
    GREETING_REFUSED = "greeting refused"  # the banner was 421/554
    HELLO_REFUSED = "hello refused"  # LHLO/EHLO was refused
    TIMEOUT = "timeout"  # a reply (or the peer's reading) took too long
    CONNECTION_LOST = "connection lost"  # the peer closed or reset the connection
    PROTOCOL_ERROR = "protocol error"  # the server's replies broke the protocol


# Enhanced status codes of the synthesized replies (RFC 3463).
_ENHANCED = {
    FailureKind.CONNECT_REFUSED: "4.4.1",  # no answer from host
    FailureKind.CONNECT_TIMEOUT: "4.4.1",
    FailureKind.CONNECT_FAILED: "4.4.1",
    FailureKind.GREETING_REFUSED: "4.3.2",  # system not accepting network messages
    FailureKind.HELLO_REFUSED: "4.5.0",  # other protocol status
    FailureKind.TIMEOUT: "4.4.2",  # bad connection
    FailureKind.CONNECTION_LOST: "4.4.2",
    FailureKind.PROTOCOL_ERROR: "4.5.0",
}


@dataclasses.dataclass(frozen=True)
class SessionFailure:
    """A connection-level failure.

    ``stage`` is what the session was waiting for: ``"connect"``,
    ``"greeting"``, a command (``"LHLO"``, ``"MAIL"``, ``"RCPT"``,
    ``"DATA"``, ``"END-OF-DATA"``, ``"RSET"``) or ``"body"``.
    ``server_reply`` is the server's own reply behind it, if any (a 421 or
    554 banner, a refused LHLO, a 421 answering RSET).  ``after_data``: the
    whole message had been sent, so the store may have kept it.
    """

    kind: FailureKind
    reason: str
    stage: str
    server_reply: Reply | None = None
    after_data: bool = False

    def __str__(self) -> str:
        return f"{self.kind.value} ({self.stage}): {self.reason}"

    @property
    def reply(self) -> Reply:
        """The temporary reply for every recipient the server did not answer."""
        text = _UNSAFE.sub(" ", str(self))
        # Reply lines are limited in octets (RFC 5321 §4.5.3.1.5), and the reason may quote UTF-8.
        text = text.encode("utf-8", "replace")[:_REASON_LIMIT].decode("utf-8", "ignore")
        return Reply(451, _ENHANCED[self.kind], text)


@dataclasses.dataclass(frozen=True)
class DeliveryResult:
    """What became of each recipient of one delivery attempt.

    ``server_replies[i]`` is the server's final reply for ``recipients[i]``
    (its RCPT refusal, the DATA refusal, or its reply after the message), or
    None when the session ended first; ``failure`` says how it ended then.
    """

    recipients: tuple[str, ...]
    server_replies: tuple[Reply | None, ...]
    failure: SessionFailure | None = None

    @property
    def replies(self) -> dict[str, Reply]:
        """address -> reply for every recipient, in recipient order; one without a server reply gets
        ``failure.reply`` (4xx).  (A recipient listed twice appears once, with its last reply.)"""
        out: dict[str, Reply] = {}
        for address, reply in zip(self.recipients, self.server_replies, strict=True):
            if reply is None:
                assert self.failure is not None, "an unanswered recipient without a failure"
                reply = self.failure.reply
            out[address] = reply
        return out

    @property
    def answered(self) -> bool:
        """The server gave a final reply for every recipient."""
        return all(reply is not None for reply in self.server_replies)

    @property
    def delivered(self) -> tuple[str, ...]:
        """Recipients the server accepted the message for (2xx)."""
        return tuple(address for address, reply in self.replies.items() if reply.accepted)

    @property
    def deferred(self) -> tuple[str, ...]:
        """Recipients to retry later (4xx, the synthesized ones included)."""
        return tuple(address for address, reply in self.replies.items() if reply.transient)

    @property
    def refused(self) -> tuple[str, ...]:
        """Recipients refused for good (5xx): to bounce."""
        return tuple(address for address, reply in self.replies.items() if reply.permanent)


class DeliveryError(Exception):
    """A connection could not be set up (or used): ``failure`` says why."""

    def __init__(self, failure: SessionFailure):
        self.failure = failure
        super().__init__(f"{failure.kind.value} ({failure.stage}): {failure.reason}")


class ConnectionDead(DeliveryError):
    """The kept connection is dead; nothing of the new transaction was sent: reconnect and retry."""


class LmtpConnection:
    """One open LMTP (or SMTP) session, greeted and LHLO'd, for one transaction after another.

    Make it with :meth:`open`; use :meth:`deliver` per message; :meth:`close`
    (or ``async with``) sends QUIT and closes.  Not for concurrent use: one
    transaction at a time.
    """

    def __init__(self, pump: Pump, machine: SmtpClient, *, command_timeout: float, data_timeout: float):
        self._pump = pump
        self._machine = machine
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self._usable = True
        self._transactions = 0
        self._last_closed: ConnectionClosed | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        hostname: str,
        lmtp: bool = True,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        data_timeout: float = DEFAULT_DATA_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        max_reply_line: int = DEFAULT_MAX_REPLY_LINE,
        max_reply_lines: int = DEFAULT_MAX_REPLY_LINES,
    ) -> LmtpConnection:
        """Connect, read the greeting, send LHLO (EHLO when ``lmtp`` is False).

        ``hostname`` is our name in LHLO/EHLO.  ``ssl_context``: implicit TLS
        (the whole session encrypted), verified against ``host``.  Raises
        :class:`DeliveryError` when no usable session comes of it.
        """
        for name, value in (("connect_timeout", connect_timeout), ("command_timeout", command_timeout),
                            ("data_timeout", data_timeout)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        machine = SmtpClient(lmtp, hostname, max_reply_line=max_reply_line, max_reply_lines=max_reply_lines)
        peer = f"{host}:{port}"
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl_context, server_hostname=host if ssl_context is not None else None
                )
        except TimeoutError:
            raise DeliveryError(SessionFailure(
                FailureKind.CONNECT_TIMEOUT, f"no connection to {peer} within {connect_timeout:g} s", STAGE_CONNECT
            )) from None
        except ConnectionRefusedError as exc:
            raise DeliveryError(SessionFailure(
                FailureKind.CONNECT_REFUSED, f"connect to {peer}: {_describe(exc)}", STAGE_CONNECT
            )) from None
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(SessionFailure(
                FailureKind.CONNECT_FAILED, f"connect to {peer}: {_describe(exc)}", STAGE_CONNECT
            )) from None
        pump = Pump(reader, writer, machine, timeout=command_timeout, send_timeout=data_timeout)
        connection = cls(pump, machine, command_timeout=command_timeout, data_timeout=data_timeout)
        try:
            await connection._start()
        except BaseException:
            connection._abort()
            raise
        return connection

    # -- what the caller may look at

    @property
    def capabilities(self) -> Capabilities:
        caps = self._machine.capabilities
        assert caps is not None  # open() succeeded, so LHLO/EHLO was accepted
        return caps

    @property
    def usable(self) -> bool:
        """False once the session failed or was closed (or a transaction was cut short): reconnect."""
        return self._usable and not self._machine.closed and not self._machine.in_transaction

    @property
    def transactions(self) -> int:
        """Transactions run on this connection (whatever their outcome)."""
        return self._transactions

    # -- the session

    async def _start(self) -> None:
        machine = self._machine
        stage = STAGE_GREETING
        try:
            event = await self._next(self.command_timeout)
            if isinstance(event, ConnectionClosed):
                raise DeliveryError(self._closed_failure(event, stage, FailureKind.GREETING_REFUSED))
            assert isinstance(event, Greeting)
            if not event.reply.accepted:
                await self._quit_quietly(DEFAULT_QUIT_TIMEOUT)
                raise DeliveryError(SessionFailure(
                    FailureKind.GREETING_REFUSED, f"greeting: {event.reply}", stage, event.reply
                ))
            stage = machine.hello_command
            await self._pump.send(Hello())
            reply = await self._reply_to(stage, self.command_timeout)
            if reply is None:
                raise DeliveryError(self._closed_failure(self._last_closed, stage, FailureKind.HELLO_REFUSED))
            if not reply.accepted:
                await self._quit_quietly(DEFAULT_QUIT_TIMEOUT)
                raise DeliveryError(SessionFailure(
                    FailureKind.HELLO_REFUSED, f"{stage}: {reply}", stage, reply
                ))
        except (PumpTimeout, RemoteProtocolError, OSError) as exc:
            raise DeliveryError(_failure_from(exc, stage, after_data=False)) from None

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        mail_params: Iterable[str] = (),
        rcpt_params: Iterable[Iterable[str]] = (),
    ) -> DeliveryResult:
        """Run one transaction: MAIL, RCPT per recipient, DATA and the message.

        ``data`` is the message as stored (CRLF line ends; the machine
        dot-stuffs it).  ``mail_params`` are ESMTP parameters as written
        (e.g. ``"XDELIVERYKEY=Q1"``); ``SIZE=<len(data)>`` is added when the
        server announced SIZE and the caller gave none.  ``rcpt_params``:
        empty, or one sequence of parameters per recipient.

        Raises :class:`ConnectionDead` when the connection turns out to be
        dead before the transaction starts (reconnect and retry); any later
        failure comes back in the result and leaves ``usable`` False.
        """
        recipients = tuple(recipients)
        params = list(mail_params)
        caps = self._machine.capabilities
        if caps is not None and caps.has("SIZE") and not any(_keyword(p) == "SIZE" for p in params):
            params.append(f"SIZE={len(data)}")
        transaction = Transaction(sender, recipients, tuple(params), tuple(tuple(p) for p in rcpt_params))
        if not self.usable:
            raise ConnectionDead(SessionFailure(FailureKind.CONNECTION_LOST, "connection already closed", RSET))
        try:
            if self._transactions:
                await self._reset()
            self._transactions += 1
            return await self._transaction(transaction, data)
        except BaseException:
            # Cancelled (or a bug) mid-session: the session state is unknown, never reuse it.
            self._abort()
            raise

    async def _reset(self) -> None:
        """RSET before reusing the connection: any trouble means it is dead (nothing sent yet)."""
        try:
            await self._pump.send(Reset())
            reply = await self._reply_to(RSET, self.command_timeout)
        except (PumpTimeout, RemoteProtocolError, OSError) as exc:
            self._abort()
            raise ConnectionDead(_failure_from(exc, RSET, after_data=False)) from None
        if reply is None or not reply.accepted:
            closed = self._last_closed
            self._abort()
            if reply is None:
                raise ConnectionDead(self._closed_failure(closed, RSET, FailureKind.CONNECTION_LOST))
            raise ConnectionDead(SessionFailure(FailureKind.PROTOCOL_ERROR, f"RSET: {reply}", RSET, reply))

    async def _transaction(self, transaction: Transaction, data: bytes) -> DeliveryResult:
        machine = self._machine
        recipients = transaction.recipients
        stage = machine.awaiting or "MAIL"
        after_data = False
        try:
            await self._pump.send(transaction)
            while True:
                stage = machine.awaiting or stage
                timeout = self.data_timeout if stage == END_OF_DATA else self.command_timeout
                event = await self._next(timeout)
                if isinstance(event, Replied) and event.command == DATA and event.reply.code == 354:
                    stage = STAGE_BODY
                    await self._send_body(data)
                    after_data = True
                elif isinstance(event, TransactionDone):
                    if machine.closed:  # a 421 ended it: the server is gone
                        self._abort()
                    return DeliveryResult(recipients, event.replies)
                elif isinstance(event, ConnectionClosed):
                    failure = self._closed_failure(event, stage, FailureKind.CONNECTION_LOST, after_data)
                    break
        except (PumpTimeout, RemoteProtocolError, OSError) as exc:
            failure = _failure_from(exc, stage, after_data=after_data)
        self._abort()
        return DeliveryResult(recipients, _pad(machine.transaction_replies, len(recipients)), failure)

    async def _send_body(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), BODY_CHUNK):
            await self._pump.write(self._machine.send(Body(view[start:start + BODY_CHUNK])))
        await self._pump.write(self._machine.send(EndOfData()))

    async def _next(self, timeout: float) -> object:
        """The next event that is not a SendData (those are written on the way)."""
        while True:
            event = await self._pump.next_event(timeout)
            if not isinstance(event, SendData):
                return event
            await self._pump.write(event.data)

    async def _reply_to(self, command: str, timeout: float) -> Reply | None:
        """The reply to ``command`` (other events on the way are dropped); None if the session closed."""
        self._last_closed = None
        while True:
            event = await self._next(timeout)
            if isinstance(event, Replied) and event.command == command:
                return event.reply
            if isinstance(event, ConnectionClosed):
                self._last_closed = event
                return None

    def _closed_failure(self, event: ConnectionClosed | None, stage: str, kind_if_reply: FailureKind,
                        after_data: bool = False) -> SessionFailure:
        if event is not None and event.reply is not None:
            return SessionFailure(kind_if_reply, f"server closing: {event.reply}", stage, event.reply, after_data)
        return SessionFailure(FailureKind.CONNECTION_LOST, "connection closed by the server", stage,
                              after_data=after_data)

    # -- closing

    async def close(self, quit_timeout: float = DEFAULT_QUIT_TIMEOUT) -> None:
        """QUIT (when the session is still usable, waiting at most ``quit_timeout`` for the reply) and close."""
        if self.usable:
            await self._quit_quietly(quit_timeout)
        self._usable = False
        await self._pump.close(timeout=quit_timeout)

    async def _quit_quietly(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            if not self._machine.closed and not self._machine.in_transaction:
                await self._pump.send(Quit())
                await self._reply_to(QUIT, timeout)
        self._usable = False

    def _abort(self) -> None:
        self._usable = False
        self._pump.writer.transport.abort()

    async def __aenter__(self) -> LmtpConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def deliver(
    host: str,
    port: int,
    *,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    hostname: str,
    mail_params: Iterable[str] = (),
    rcpt_params: Iterable[Iterable[str]] = (),
    lmtp: bool = True,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    data_timeout: float = DEFAULT_DATA_TIMEOUT,
    quit_timeout: float = DEFAULT_QUIT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> DeliveryResult:
    """Connect to ``host:port``, deliver one message, QUIT; see the module docstring.

    Never raises for what the network or the server does; raises
    ``LocalProtocolError`` (before connecting) for arguments that cannot make
    a valid transaction, ``ValueError`` for a bad ``hostname`` or timeout.
    """
    recipients = tuple(recipients)
    mail_params, rcpt_params = tuple(mail_params), tuple(tuple(p) for p in rcpt_params)
    Transaction(sender, recipients, mail_params, rcpt_params)  # check the arguments before any I/O
    try:
        connection = await LmtpConnection.open(
            host, port, hostname=hostname, lmtp=lmtp, connect_timeout=connect_timeout,
            command_timeout=command_timeout, data_timeout=data_timeout, ssl_context=ssl_context,
        )
    except DeliveryError as exc:
        return DeliveryResult(recipients, (None,) * len(recipients), exc.failure)
    try:
        return await connection.deliver(sender, recipients, data, mail_params=mail_params, rcpt_params=rcpt_params)
    finally:
        await connection.close(quit_timeout)


# ---------------------------------------------------------------------------
# helpers


def _failure_from(exc: BaseException, stage: str, *, after_data: bool) -> SessionFailure:
    if isinstance(exc, PumpTimeout):
        return SessionFailure(FailureKind.TIMEOUT, f"{exc.what}: nothing for {exc.seconds:g} s", stage,
                              after_data=after_data)
    if isinstance(exc, RemoteProtocolError):
        return SessionFailure(FailureKind.PROTOCOL_ERROR, exc.text, stage, after_data=after_data)
    return SessionFailure(FailureKind.CONNECTION_LOST, _describe(exc), stage, after_data=after_data)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _keyword(param: str) -> str:
    return param.split("=", 1)[0].upper()


def _pad(replies: tuple[Reply | None, ...], count: int) -> tuple[Reply | None, ...]:
    """The machine's known replies, or all-unknown if the transaction never started."""
    return replies if len(replies) == count else (None,) * count
