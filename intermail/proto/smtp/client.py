"""The SMTP/LMTP client machine: how an MTA talks to a message store (RFC 2033) or an SMTP server.

Owns the client side of one SMTP or LMTP connection: the commands it writes
(LHLO/EHLO, MAIL, RCPT, DATA, RSET, QUIT), pipelining (RFC 2920), the
dot-stuffed message body, which reply belongs to which command, the
capability list, and the final answer for every recipient of a transaction.
It does not open sockets, time anything out or decide what to do with a
refusal: :mod:`intermail.delivery.lmtp` drives it with the pump.  It follows
the contract of :mod:`intermail.proto`.

Invariants:

- Replies are matched to commands strictly in the order the commands were
  written (RFC 2920 §3.1).  After the message, LMTP expects one reply per
  *accepted* recipient, in RCPT order (RFC 2033 §4.2), SMTP exactly one.
- Every transaction ends with one :class:`TransactionDone` holding one final
  reply per recipient, unless the connection ends first (then
  :attr:`SmtpClient.transaction_replies` has what is known).
- A command we write is one our own server grammar
  (:mod:`intermail.proto.smtp.grammar`) parses back to the same path:
  :class:`Transaction` checks its addresses and parameters when it is built.
- No bare CR or LF leaves in a body (RFC 5321 §2.3.8: they go out as CRLF),
  every line starting with ``.`` gets another (§4.5.2), and the body always
  ends with ``CRLF . CRLF``, whatever the chunking of :class:`Body`.
- The events depend only on the bytes received (and the events sent), never
  on how the bytes were split.  Whatever the server sends, ``next_event``
  returns an event or raises ``RemoteProtocolError`` -- never anything else;
  after that error the machine stays broken (the same error again).
- Nothing the server sends is buffered without bound: a reply line is at
  most ``max_reply_line`` octets with its CRLF, a reply at most
  ``max_reply_lines`` lines.

Logs: nothing (no I/O here; the driver logs).

Conversation with the driver
============================

The first event is :class:`Greeting`.  If its reply is 2xx, ``send``
:class:`Hello` (LHLO in LMTP mode, EHLO in SMTP mode); its answer is a
:class:`Capabilities` (when accepted) followed by ``Replied("LHLO"/"EHLO")``.
Then each :class:`Transaction` produces, in order:

==========================  ===============================================
``Replied("MAIL")``         the reverse-path's answer
``Replied("RCPT", i)``      one per recipient ``i`` that was sent
``Replied("DATA")``         only if DATA was sent; a 354 means: ``send``
                            :class:`Body` chunks, then :class:`EndOfData`
``RecipientResult(i)``      LMTP: one per accepted recipient, after the body
``Replied("END-OF-DATA")``  SMTP: the one reply after the body
``TransactionDone``         the final reply of every recipient
==========================  ===============================================

:class:`SendData` may come between them: the machine wants to write bytes
it could not write at ``send`` time (the next command when not pipelining,
the lone dot of RFC 2920 §3.1).  Write them before anything else:
``send`` refuses (``LocalProtocolError``) while a SendData is pending.

Pipelining: once the server announced PIPELINING, a Transaction goes out
as MAIL, every RCPT and DATA in one write, and a Reset or Quit may be
written behind a RSET still unanswered.  Without it, each command waits for
the previous reply, and DATA is sent only if at least one RCPT was
accepted.  When pipelining, DATA is sent anyway: its 503/554 ends the
transaction; if the server answers 354 although no recipient was accepted,
the machine sends the lone dot itself (RFC 2920 §3.1) and, in SMTP mode,
takes the reply to it (LMTP: a protocol error -- RFC 2033 §4.2 leaves no
reply to give).

A final reply per recipient: the MAIL refusal if MAIL was refused; its RCPT
refusal if RCPT was refused; the DATA refusal if DATA was refused; else the
reply after the body (LMTP: its own; SMTP: the one reply).

421 (RFC 5321 §3.8) answers any command and closes: the machine reports it
as that command's reply, gives it as the final reply of every recipient
still waiting for one, drops the rest of the queue and emits
:class:`ConnectionClosed`.  A 421 that answers nothing (an idle-timeout
notice) closes too; any other reply that answers nothing is a protocol
error.  A 3xx answering anything but DATA, and anything but 354/4xx/5xx
answering DATA, are protocol errors.  The end of input is
``ConnectionClosed("peer closed")`` wherever it comes.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable

from intermail.errors import LocalProtocolError, RemoteProtocolError
from intermail.proto import NEED_DATA
from intermail.proto.dotstuff import DotStuffer, stuff_body
from intermail.proto.smtp import grammar
from intermail.proto.smtp.grammar import GrammarError
from intermail.proto.smtp.replies import MAX_REPLY_LINE, Reply, parse_reply

__all__ = [
    "DEFAULT_MAX_REPLY_LINE",
    "DEFAULT_MAX_REPLY_LINES",
    "MIN_MAX_REPLY_LINE",
    "LHLO", "EHLO", "MAIL", "RCPT", "DATA", "END_OF_DATA", "RSET", "QUIT",
    "PEER_CLOSED", "SERVER_CLOSING", "QUIT_DONE",
    "Hello", "Transaction", "Body", "EndOfData", "Reset", "Quit",
    "Greeting", "Capabilities", "Replied", "RecipientResult", "TransactionDone", "SendData",
    "ConnectionClosed",
    "SmtpClient",
    "parse_capabilities",
    "stuff_body",
]

DEFAULT_MAX_REPLY_LINE = MAX_REPLY_LINE  # 512 octets with CRLF (RFC 5321 §4.5.3.1.5); a Reply holds no more
MIN_MAX_REPLY_LINE = 64
DEFAULT_MAX_REPLY_LINES = 100  # an EHLO reply has ~15; nothing sane has 100

# Command names, as in Replied.command
LHLO = "LHLO"
EHLO = "EHLO"
MAIL = "MAIL"
RCPT = "RCPT"
DATA = "DATA"
END_OF_DATA = "END-OF-DATA"  # the body's final CRLF.CRLF, answered like a command
RSET = "RSET"
QUIT = "QUIT"

# Reasons of ConnectionClosed
PEER_CLOSED = "peer closed"
SERVER_CLOSING = "server closing"  # a 421
QUIT_DONE = "quit"

# RFC 2920 §3.1: these may only be the last command of a group.
_GROUP_ENDERS = frozenset({LHLO, EHLO, DATA, QUIT})

# RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39, at the start of every reply line.
_REPLY_LINE_HEAD = re.compile(rb"[2-5][0-5][0-9]")


# ---------------------------------------------------------------------------
# Events we send


@dataclasses.dataclass(frozen=True)
class Hello:
    """LHLO (LMTP) or EHLO (SMTP) with the machine's hostname."""


@dataclasses.dataclass(frozen=True)
class Transaction:
    """One mail transaction: ``MAIL FROM:<sender>``, ``RCPT TO:<r>`` per recipient, then DATA.

    ``sender`` is ``""`` for the null reverse-path.  ``params_mail`` are
    ESMTP parameters as written (``"SIZE=1234"``, ``"SMTPUTF8"``);
    ``params_rcpt`` is empty or holds one tuple of parameters per recipient.
    Addresses and parameters are checked against the RFC 5321/6531 grammar
    when the event is built (``LocalProtocolError``): UTF-8 in an address
    needs ``SMTPUTF8`` in ``params_mail``.
    """

    sender: str
    recipients: tuple[str, ...]
    params_mail: tuple[str, ...] = ()
    params_rcpt: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        recipients = _str_tuple(self.recipients, "recipients")
        params_mail = _str_tuple(self.params_mail, "params_mail")
        if isinstance(self.params_rcpt, (str, bytes)):
            raise LocalProtocolError("params_rcpt must hold one tuple of parameters per recipient")
        params_rcpt = tuple(_str_tuple(p, "params_rcpt entry") for p in self.params_rcpt)
        object.__setattr__(self, "recipients", recipients)
        object.__setattr__(self, "params_mail", params_mail)
        object.__setattr__(self, "params_rcpt", params_rcpt)
        if not recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        if params_rcpt and len(params_rcpt) != len(recipients):
            raise LocalProtocolError(
                f"params_rcpt has {len(params_rcpt)} entries for {len(recipients)} recipients"
            )
        if not isinstance(self.sender, str):
            raise LocalProtocolError(f"sender must be a str, got {self.sender!r}")
        # The lines we will write must parse back, with our own server's
        # grammar, to exactly these paths: no injection through an address.
        mail = _command_args("FROM", self.sender, params_mail)
        try:
            parsed = grammar.parse_mail(mail)
        except GrammarError as exc:
            raise LocalProtocolError(f"cannot send MAIL FROM:<{self.sender}>: {exc.text}") from None
        if parsed.path != self.sender:
            raise LocalProtocolError(f"sender {self.sender!r} is not a plain path")
        utf8 = "SMTPUTF8" in parsed.params
        for index, recipient in enumerate(recipients):
            args = _command_args("TO", recipient, params_rcpt[index] if params_rcpt else ())
            try:
                path = grammar.parse_rcpt(args, utf8=utf8).path
            except GrammarError as exc:
                raise LocalProtocolError(f"cannot send RCPT TO:<{recipient}>: {exc.text}") from None
            if path != recipient:
                raise LocalProtocolError(f"recipient {recipient!r} is not a plain path")

    def mail_line(self) -> bytes:
        return b"MAIL " + _command_args("FROM", self.sender, self.params_mail) + b"\r\n"

    def rcpt_line(self, index: int) -> bytes:
        params = self.params_rcpt[index] if self.params_rcpt else ()
        return b"RCPT " + _command_args("TO", self.recipients[index], params) + b"\r\n"


@dataclasses.dataclass(frozen=True)
class Body:
    """The next piece of the message, as stored (CRLF line ends); the machine dot-stuffs it."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class EndOfData:
    """The message is complete: the machine ends its last line and writes the final dot."""


@dataclasses.dataclass(frozen=True)
class Reset:
    """RSET: forget any transaction state on the server (between transactions)."""


@dataclasses.dataclass(frozen=True)
class Quit:
    """QUIT: end the session."""


# ---------------------------------------------------------------------------
# Events we receive


@dataclasses.dataclass(frozen=True)
class Greeting:
    """The server's banner: 2xx (220) lets the session go on; 421/554 turn us away."""

    reply: Reply


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the LHLO/EHLO reply announced (RFC 5321 §4.1.1.1).

    ``extensions`` maps every announced keyword (upper-cased) to its
    parameters; the named fields are the extensions the machine or the
    driver act on.  ``size`` is the fixed maximum message size of RFC 1870,
    None when SIZE is absent, has no number or is 0 ("no fixed limit").
    """

    server_name: str
    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    smtputf8: bool = False
    chunking: bool = False
    enhancedstatuscodes: bool = False
    extensions: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions


@dataclasses.dataclass(frozen=True)
class Replied:
    """The reply to one command; ``recipient`` is the recipient's index for RCPT."""

    command: str
    reply: Reply
    recipient: int | None = None


@dataclasses.dataclass(frozen=True)
class RecipientResult:
    """LMTP, after the body: the reply for recipient ``recipient_index`` (its index in the Transaction)."""

    recipient_index: int
    reply: Reply


@dataclasses.dataclass(frozen=True)
class TransactionDone:
    """The transaction is over: one final reply per recipient, in Transaction order."""

    replies: tuple[Reply, ...]


@dataclasses.dataclass(frozen=True)
class SendData:
    """Bytes the machine needs written now (a command released by a reply, the lone dot)."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The session is over: the peer closed, a 421 (``reply``), or QUIT answered."""

    reason: str = PEER_CLOSED
    reply: Reply | None = None


# ---------------------------------------------------------------------------
# Capabilities


def parse_capabilities(reply: Reply) -> Capabilities:
    """The capabilities in an accepted LHLO/EHLO reply.

    The first line is the server's name (and greeting text); each further
    line is ``ehlo-keyword *(SP ehlo-param)``.  A line that does not start
    with a keyword (old-style ``AUTH=LOGIN``) is skipped, not an error: being
    liberal here costs nothing.
    """
    server_name = reply.lines[0].split(" ", 1)[0]
    extensions: dict[str, tuple[str, ...]] = {}
    for line in reply.lines[1:]:
        words = line.split()
        if not words or not grammar.is_esmtp_keyword(words[0]):
            continue
        extensions.setdefault(words[0].upper(), tuple(words[1:]))
    size = None
    size_params = extensions.get("SIZE", ())
    if size_params and size_params[0].isdigit() and size_params[0].isascii() and len(size_params[0]) <= 20:
        size = int(size_params[0]) or None
    return Capabilities(
        server_name=server_name,
        pipelining="PIPELINING" in extensions,
        size=size,
        eightbitmime="8BITMIME" in extensions,
        smtputf8="SMTPUTF8" in extensions,
        chunking="CHUNKING" in extensions,
        enhancedstatuscodes="ENHANCEDSTATUSCODES" in extensions,
        extensions=extensions,
    )


# ---------------------------------------------------------------------------
# The machine (the body's dot-stuffing is intermail.proto.dotstuff's)

_GREETING = "greeting"  # waiting for the banner
_REFUSED = "refused"  # the banner was a refusal: only QUIT
_SESSION = "session"  # commands may be sent
_BODY = "body"  # after 354: Body / EndOfData
_CLOSED = "closed"


@dataclasses.dataclass
class _Pending:
    """A command written (or to be written) and the reply it waits for."""

    command: str
    line: bytes = b""
    recipient: int | None = None
    lone_dot: bool = False  # the END-OF-DATA of a dot we sent for a transaction with no recipient


class _Txn:
    """The bookkeeping of the transaction in progress."""

    def __init__(self, event: Transaction, pipelined: bool):
        self.event = event
        self.pipelined = pipelined
        self.count = len(event.recipients)
        self.results: list[Reply | None] = [None] * self.count
        self.mail_accepted: bool | None = None
        self.accepted: list[int] = []
        self.rcpt_answered = 0
        self.eod_left = 0  # replies still expected after the body


class SmtpClient:
    """The client end of one SMTP (``lmtp=False``) or LMTP (``lmtp=True``) connection.

    ``hostname`` is our name in LHLO/EHLO.  Limits: ``max_reply_line``
    (octets of one reply line with its CRLF, 64..512) and
    ``max_reply_lines`` (lines of one reply).
    """

    def __init__(
        self,
        lmtp: bool,
        hostname: str,
        *,
        max_reply_line: int = DEFAULT_MAX_REPLY_LINE,
        max_reply_lines: int = DEFAULT_MAX_REPLY_LINES,
    ):
        if not isinstance(lmtp, bool):
            raise ValueError(f"lmtp must be a bool, got {lmtp!r}")
        if not grammar.is_domain_or_literal(hostname) or len(hostname) > 255:
            raise ValueError(f"hostname must be a domain or an address literal, got {hostname!r}")
        if type(max_reply_line) is not int or not MIN_MAX_REPLY_LINE <= max_reply_line <= MAX_REPLY_LINE:
            # Above 512 a Reply could not hold the line anyway (replies.MAX_REPLY_LINE).
            raise ValueError(f"max_reply_line must be an integer in {MIN_MAX_REPLY_LINE}..{MAX_REPLY_LINE}, "
                             f"got {max_reply_line!r}")
        if type(max_reply_lines) is not int or max_reply_lines < 1:
            raise ValueError(f"max_reply_lines must be an integer >= 1, got {max_reply_lines!r}")
        self.lmtp = lmtp
        self.hostname = hostname
        self.max_reply_line = max_reply_line
        self.max_reply_lines = max_reply_lines
        self.hello_command = LHLO if lmtp else EHLO

        self._buffer = bytearray()
        self._lines: list[bytes] = []  # lines of the reply being read
        self._eof = False
        self._events: collections.deque[object] = collections.deque()
        self._phase = _GREETING
        self._closed_event: ConnectionClosed | None = None
        self._error: RemoteProtocolError | None = None
        self._inflight: collections.deque[_Pending] = collections.deque()  # written, awaiting replies
        self._waiting: collections.deque[_Pending] = collections.deque()  # not written yet
        self._capabilities: Capabilities | None = None
        self._txn: _Txn | None = None
        self._results: tuple[Reply | None, ...] = ()
        self._stuffer: DotStuffer | None = None

    # -- what the driver may look at

    @property
    def capabilities(self) -> Capabilities | None:
        """The capabilities of the last accepted LHLO/EHLO, or None."""
        return self._capabilities

    @property
    def pipelining(self) -> bool:
        return self._capabilities is not None and self._capabilities.pipelining

    @property
    def closed(self) -> bool:
        """The session is over (ConnectionClosed is, or will be, the last event)."""
        return self._phase == _CLOSED

    @property
    def in_transaction(self) -> bool:
        """A Transaction was sent and its TransactionDone not yet emitted."""
        return self._txn is not None

    @property
    def awaiting(self) -> str | None:
        """What the machine waits for: the command whose reply is next, ``"body"``, or None."""
        if self._inflight:
            return self._inflight[0].command
        if self._phase == _BODY:
            return "body"
        if self._phase == _GREETING:
            return "greeting"
        return None

    @property
    def transaction_replies(self) -> tuple[Reply | None, ...]:
        """Final replies known so far for the current (or last) transaction; None: not known yet."""
        if self._txn is not None:
            return tuple(self._txn.results)
        return self._results

    # -- bytes in

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data after the end of the stream")
            if self._phase != _CLOSED and self._error is None:  # after a 421, QUIT or an error: ignored
                self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> object:
        """The next event or NEED_DATA; RemoteProtocolError if the server broke the protocol."""
        if self._error is not None:
            raise self._error
        while not self._events:
            if self._phase == _CLOSED:
                assert self._closed_event is not None
                return self._closed_event
            try:
                progressed = self._step()
            except RemoteProtocolError as exc:
                self._error = exc
                self._buffer.clear()
                raise
            if not progressed:
                if not self._eof:
                    return NEED_DATA
                self._close(ConnectionClosed(PEER_CLOSED))
        return self._events.popleft()

    def _step(self) -> bool:
        """Read one whole reply and act on it; False if it is not all there yet."""
        buffer, lines = self._buffer, self._lines
        while True:
            end = buffer.find(b"\r\n", 0, self.max_reply_line)
            if end < 0:
                if len(buffer) >= self.max_reply_line:
                    raise RemoteProtocolError(f"reply line longer than {self.max_reply_line} octets")
                return False
            line = bytes(buffer[: end + 2])
            del buffer[: end + 2]
            if not _REPLY_LINE_HEAD.match(line):
                raise RemoteProtocolError(f"not a reply line: {line[:40]!r}")
            lines.append(line)
            if line[3:4] != b"-":
                break
            if len(lines) >= self.max_reply_lines:
                raise RemoteProtocolError(f"reply of more than {self.max_reply_lines} lines")
        data = b"".join(lines)
        lines.clear()
        self._on_reply(parse_reply(data))
        return True

    # -- events out

    def send(self, event: object) -> bytes:
        """Wire bytes for ``event``; LocalProtocolError (machine unchanged) if it is not allowed now."""
        if any(isinstance(queued, SendData) for queued in self._events):
            raise LocalProtocolError("take the pending SendData event (and write it) before sending")
        if self._phase == _CLOSED:
            raise LocalProtocolError("the connection is closed")
        if self._error is not None:
            raise LocalProtocolError(f"the server broke the protocol: {self._error.text}")
        if isinstance(event, Body):
            return self._send_body(event)
        if isinstance(event, EndOfData):
            return self._send_end_of_data()
        if self._phase == _BODY:
            raise LocalProtocolError("send the Body and EndOfData first (the server said 354)")
        if isinstance(event, Hello):
            self._check_idle("Hello")
            if self._phase != _SESSION:
                raise LocalProtocolError("Hello only after a 2xx greeting")
            return self._queue(_Pending(self.hello_command, f"{self.hello_command} {self.hostname}\r\n".encode()))
        if isinstance(event, Transaction):
            return self._send_transaction(event)
        if isinstance(event, Reset):
            if self._txn is not None:
                raise LocalProtocolError("Reset only between transactions")
            if self._phase != _SESSION:
                raise LocalProtocolError("Reset only after a 2xx greeting")
            return self._queue(_Pending(RSET, b"RSET\r\n"))
        if isinstance(event, Quit):
            if self._txn is not None:
                raise LocalProtocolError("Quit only between transactions")
            if self._phase == _GREETING:
                raise LocalProtocolError("wait for the greeting before Quit")
            return self._queue(_Pending(QUIT, b"QUIT\r\n"))
        raise LocalProtocolError(f"not an SMTP client event: {event!r}")

    def _check_idle(self, what: str) -> None:
        if self._inflight or self._waiting or self._txn is not None:
            raise LocalProtocolError(f"{what} only when no command is outstanding")

    def _send_transaction(self, event: Transaction) -> bytes:
        if self._txn is not None:
            raise LocalProtocolError("a transaction is already in progress")
        if self._capabilities is None:
            raise LocalProtocolError("Transaction only after an accepted Hello")
        if self._phase != _SESSION:
            raise LocalProtocolError(f"no transaction in phase {self._phase}")
        if any(p.command in (LHLO, EHLO, QUIT) for p in (*self._inflight, *self._waiting)):
            raise LocalProtocolError("Transaction while a Hello or Quit is outstanding")
        txn = _Txn(event, pipelined=self.pipelining)
        self._txn = txn
        commands = [_Pending(MAIL, event.mail_line())]
        commands += [_Pending(RCPT, event.rcpt_line(i), recipient=i) for i in range(txn.count)]
        if txn.pipelined:
            commands.append(_Pending(DATA, b"DATA\r\n"))
        self._waiting.extend(commands)
        return self._release()

    def _send_body(self, event: Body) -> bytes:
        if self._phase != _BODY or self._stuffer is None:
            raise LocalProtocolError("Body only after the 354 reply to DATA")
        if not isinstance(event.data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"Body.data must be bytes, got {type(event.data).__name__}")
        return self._stuffer.feed(bytes(event.data))

    def _send_end_of_data(self) -> bytes:
        if self._phase != _BODY or self._stuffer is None or self._txn is None:
            raise LocalProtocolError("EndOfData only after the 354 reply to DATA")
        data = self._stuffer.end()
        self._stuffer = None
        self._phase = _SESSION
        self._expect_end_of_data(self._txn, lone_dot=False)
        return data

    def _expect_end_of_data(self, txn: _Txn, *, lone_dot: bool) -> None:
        if self.lmtp:
            pendings = [_Pending(END_OF_DATA, recipient=i) for i in txn.accepted]
        else:
            pendings = [_Pending(END_OF_DATA, lone_dot=lone_dot)]
        txn.eod_left = len(pendings)
        self._inflight.extend(pendings)

    def _queue(self, pending: _Pending) -> bytes:
        self._waiting.append(pending)
        return self._release()

    def _release(self) -> bytes:
        """Move every command that may be written now from the waiting queue to the wire."""
        out = bytearray()
        while self._waiting:
            if self._inflight and (not self.pipelining or self._inflight[-1].command in _GROUP_ENDERS):
                break
            pending = self._waiting.popleft()
            self._inflight.append(pending)
            out += pending.line
        return bytes(out)

    # -- replies

    def _on_reply(self, reply: Reply) -> None:
        if not self._inflight:
            if self._phase == _GREETING:
                self._on_greeting(reply)
            elif reply.code == 421:
                self._server_closing(reply)
            else:
                raise RemoteProtocolError(f"reply with no command to answer: {str(reply)[:60]}")
            return
        pending = self._inflight.popleft()
        command = pending.command
        if command == DATA:
            if reply.code != 354 and reply.code < 400:
                raise RemoteProtocolError(f"DATA answered {reply.code}: expected 354, 4xx or 5xx")
        elif 300 <= reply.code < 400:
            raise RemoteProtocolError(f"{command} answered {reply.code}: 3xx only answers DATA")
        handler = _HANDLERS[command]
        handler(self, pending, reply)
        if reply.code == 421:
            self._server_closing(reply)
            return
        data = self._release()
        if data:
            self._events.append(SendData(data))

    def _on_greeting(self, reply: Reply) -> None:
        if 300 <= reply.code < 400:
            raise RemoteProtocolError(f"greeting with code {reply.code}")
        self._events.append(Greeting(reply))
        if reply.accepted:
            self._phase = _SESSION
        elif reply.code == 421:
            self._close(ConnectionClosed(SERVER_CLOSING, reply))
        else:
            self._phase = _REFUSED

    def _on_hello(self, pending: _Pending, reply: Reply) -> None:
        if reply.accepted:
            self._capabilities = parse_capabilities(reply)
            self._events.append(self._capabilities)
        self._events.append(Replied(pending.command, reply))

    def _on_simple(self, pending: _Pending, reply: Reply) -> None:
        self._events.append(Replied(pending.command, reply))

    def _on_quit(self, pending: _Pending, reply: Reply) -> None:
        self._events.append(Replied(QUIT, reply))
        if reply.code != 421:
            self._close(ConnectionClosed(QUIT_DONE, reply))

    def _on_mail(self, pending: _Pending, reply: Reply) -> None:
        txn = self._current_txn()
        self._events.append(Replied(MAIL, reply))
        txn.mail_accepted = reply.accepted
        if reply.accepted:
            return
        txn.results = [reply] * txn.count
        if not txn.pipelined:
            self._waiting.clear()  # the RCPTs were never written
            self._finish()
        # pipelined: the RCPTs and DATA are on the wire; their replies (503s) still come

    def _on_rcpt(self, pending: _Pending, reply: Reply) -> None:
        txn = self._current_txn()
        index = pending.recipient
        assert index is not None
        self._events.append(Replied(RCPT, reply, index))
        txn.rcpt_answered += 1
        if txn.mail_accepted and reply.accepted:
            txn.accepted.append(index)
        elif txn.mail_accepted:
            txn.results[index] = reply
        if txn.pipelined or txn.rcpt_answered < txn.count:
            return
        if txn.accepted:
            self._waiting.append(_Pending(DATA, b"DATA\r\n"))
        else:
            self._finish()

    def _on_data(self, pending: _Pending, reply: Reply) -> None:
        txn = self._current_txn()
        if reply.code == 354 and not txn.accepted and self.lmtp:
            # RFC 2920 §3.1 would have us send a lone dot, but RFC 2033 §4.2
            # leaves no reply to expect for it: the server's count is not ours.
            raise RemoteProtocolError("354 to DATA although no recipient was accepted (RFC 2033 §4.2)")
        self._events.append(Replied(DATA, reply))
        if reply.code != 354:
            for index in txn.accepted:
                txn.results[index] = reply
            self._finish()
            return
        if txn.accepted:
            self._phase = _BODY
            self._stuffer = DotStuffer()
            return
        # RFC 2920 §3.1: DATA accepted although no recipient was: send a lone dot.
        self._events.append(SendData(b".\r\n"))
        self._expect_end_of_data(txn, lone_dot=True)

    def _on_end_of_data(self, pending: _Pending, reply: Reply) -> None:
        txn = self._current_txn()
        if pending.recipient is not None:
            txn.results[pending.recipient] = reply
            self._events.append(RecipientResult(pending.recipient, reply))
        else:
            if not pending.lone_dot:
                for index in txn.accepted:
                    txn.results[index] = reply
            self._events.append(Replied(END_OF_DATA, reply))
        txn.eod_left -= 1
        if txn.eod_left == 0:
            self._finish()

    def _current_txn(self) -> _Txn:
        assert self._txn is not None, "transaction replies without a transaction"
        return self._txn

    def _finish(self) -> None:
        txn = self._current_txn()
        results = tuple(txn.results)
        assert all(reply is not None for reply in results)
        self._results = results
        self._txn = None
        self._events.append(TransactionDone(results))  # type: ignore[arg-type]

    def _server_closing(self, reply: Reply) -> None:
        """A 421: every recipient still without a final reply gets it; nothing more is answered."""
        txn = self._txn
        if txn is not None:
            txn.results = [result if result is not None else reply for result in txn.results]
            self._inflight.clear()
            self._finish()
        self._close(ConnectionClosed(SERVER_CLOSING, reply))

    def _close(self, event: ConnectionClosed) -> None:
        self._phase = _CLOSED
        self._closed_event = event
        self._inflight.clear()
        self._waiting.clear()
        self._buffer.clear()
        self._lines.clear()
        self._stuffer = None
        if self._txn is not None:
            self._results = tuple(self._txn.results)
            self._txn = None


_HANDLERS = {
    LHLO: SmtpClient._on_hello,
    EHLO: SmtpClient._on_hello,
    RSET: SmtpClient._on_simple,
    QUIT: SmtpClient._on_quit,
    MAIL: SmtpClient._on_mail,
    RCPT: SmtpClient._on_rcpt,
    DATA: SmtpClient._on_data,
    END_OF_DATA: SmtpClient._on_end_of_data,
}


# ---------------------------------------------------------------------------
# helpers


def _str_tuple(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise LocalProtocolError(f"{what} must be a sequence of str, got {value!r}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise LocalProtocolError(f"{what} must hold str, got {item!r}")
    return items


def _command_args(head: str, path: str, params: tuple[str, ...]) -> bytes:
    """``FROM:<path> params`` / ``TO:<path> params`` as bytes (UTF-8 only appears with SMTPUTF8)."""
    text = f"{head}:<{path}>" + "".join(" " + param for param in params)
    return text.encode("utf-8", "surrogatepass")
