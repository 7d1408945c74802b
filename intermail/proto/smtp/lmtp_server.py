"""The LMTP server machine (RFC 2033 on the RFC 5321 grammar): how a message store takes mail.

Owns the server side of one LMTP connection from an MTA to a message store
(``mssN``): command lines, the session and transaction states, dot-unstuffing
and the end of DATA, BDAT chunks (RFC 3030), the limits, and every reply the
protocol itself decides.  It does not know users, mailboxes or storage: the
app (the store's LMTP session) decides each MAIL and RCPT and answers each
accepted recipient after the message, which is what RFC 2033 §4.2 and the
exactly-once rule (I-4) need and what aiosmtpd's LMTP class cannot do.  It
follows the contract of :mod:`intermail.proto`; the pump drives it.

Invariants:

- One reply per command, in command order (RFC 2920), and one per accepted
  recipient after a message (RFC 2033 §4.2); the app owes at most one
  answer at a time, and ``send`` refuses anything else.
- Only ``CRLF . CRLF`` ends DATA; a message with a bare CR or LF is never
  accepted.
- The events and the output depend only on the bytes received, never on how
  they were split (MessageData boundaries included).
- Nothing the peer sends is buffered without bound: an over-long command line
  and the body of an over-size message are dropped as they arrive; the
  machine holds at most one ``max_chunk`` of body besides its input buffer.
- No input makes the machine raise; a ``LocalProtocolError`` from ``send``
  leaves it unchanged.

Logs: nothing (no I/O here; the session that drives the machine logs).

Conversation with the app
=========================

The app's first ``send`` is :class:`Greeting` (the 220 banner), or
:class:`Shutdown` to turn the client away.  Then it loops on ``next_event``:

================= ===================================================
event             the app must
================= ===================================================
AutoReply         pass it to ``send`` unchanged: the machine answered
                  a command itself (LHLO, RSET, NOOP, a 354, a 503...)
MailFrom, RcptTo  ``send`` one :class:`Reply`: 2xx accepts, 4xx/5xx
                  refuses, 421 refuses and closes
MessageData       store ``data`` (at most ``max_chunk`` bytes, already
                  dot-unstuffed); nothing to send
MessageEnd        if ``refused`` is None: ``send`` one reply per
                  accepted recipient, in RCPT order -- one
                  :class:`RecipientReplies` or that many single Replies;
                  otherwise discard the data (an AutoReply follows)
ConnectionClosed  close the connection (``reason`` says why)
================= ===================================================

At most one answer is owed at a time: ``next_event`` raises
``LocalProtocolError`` while the app owes one, and the machine does not look
at pipelined input behind the command until it is sent.  So pipelined
commands are handled strictly in order, each one against the state the
previous answers left (a RCPT behind a refused MAIL gets 503), and an app
that forgets an answer fails at once instead of leaving the client waiting.
The pipelined bytes stay in the buffer meanwhile (:meth:`LmtpServer.pending_bytes`).
:class:`Shutdown` (a 421) may be sent whenever no answer is owed.

Every MailFrom/RcptTo/per-recipient reply must carry an enhanced status
code: the LHLO reply announces ENHANCEDSTATUSCODES (RFC 2034).

Session states
==============

:data:`TRANSITIONS` says which command is legal in which state and where
it leads; a pair that is not a row is a sequence error (503 5.5.1).  MAIL
and RCPT move the state only when the app's reply is 2xx.  NOOP, VRFY, HELP
and QUIT are legal everywhere and move nothing (QUIT then closes).  Rendered
by :func:`render_state_table`:

    state     step         next
    --------  -----------  --------
    init      LHLO         ready
    init      RSET         init
    ready     LHLO         ready
    ready     MAIL         mail
    ready     RSET         ready
    mail      LHLO         ready
    mail      RCPT         rcpt
    mail      RSET         ready
    rcpt      LHLO         ready
    rcpt      RCPT         rcpt
    rcpt      DATA         rcpt
    rcpt      BDAT         chunking
    rcpt      RSET         ready
    rcpt      message end  ready
    chunking  LHLO         ready
    chunking  BDAT         chunking
    chunking  RSET         ready
    chunking  message end  ready

``message end`` is the end of DATA or of ``BDAT ... LAST`` once every
per-recipient reply is sent, or a message the machine refused.

The message body
================

- DATA: only ``CRLF . CRLF`` ends the body.  Lines are split on CRLF only,
  so a bare LF or bare CR can never end a line or the body: ``LF . LF``,
  ``CR . CR``, ``LF . CRLF`` and their kin are ordinary bytes (the
  SMTP-smuggling payloads).  A message that contains a bare CR or LF is
  **refused**: the machine reads on to the real end and answers 554 5.6.0
  for every recipient, so no other reader can disagree with us about where
  this message ends.  A leading dot is removed from every line that has one
  (RFC 5321 §4.5.2).  Text lines are not bounded by ``max_line``: the body
  is streamed, only its size is limited.
- BDAT: the chunk's bytes are the message bytes (no dot-unstuffing, no line
  checks: the length, not a terminator, ends a chunk).  Every chunk but the
  last is answered 250 by the machine.  A BDAT the state does not allow
  (503), or whose size line is malformed but names a size (501), has its
  chunk read and dropped.  After a refused BDAT the transaction is over
  (RFC 3030 §2: the client must RSET; later BDATs get 503).
- Size: the message size counts the body as stored (after
  dot-unstuffing, without the final ``.CRLF``).  Exactly
  ``max_message_size`` bytes is accepted; one more and the machine stops
  passing data on, reads to the end without buffering, and answers 552
  5.3.4 for every recipient (``MessageEnd.refused``).  A BDAT that would
  pass the limit is refused when its command arrives, and its chunk dropped.
- ``MessageData`` chunks are exactly ``max_chunk`` bytes, except the last
  chunk of a DATA body or of each BDAT chunk: the events do not depend on
  how the input was split.

Errors
======

Whatever the peer sends becomes a reply; no input makes ``receive_data`` or
``next_event`` raise (``RemoteProtocolError`` is allowed by the contract and
never needed).  A command line longer than ``max_line`` octets with its CRLF
gets 500 5.5.6 as soon as the limit is passed, and the rest of that line is
dropped unread up to its CRLF.  Bad commands (500, 501, 503, 553, 555 from
the machine) are counted; a good command resets the count; the bad command
after ``max_bad_commands`` in a row gets 421 4.7.0 and the machine closes.
``LocalProtocolError`` from ``send`` leaves the machine unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

from intermail.errors import LocalProtocolError
from intermail.proto.buffered import BufferedInput
from intermail.proto.smtp import grammar
from intermail.proto.smtp import replies as R
from intermail.proto.smtp.grammar import GrammarError, Problem
from intermail.proto.smtp.replies import Reply

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_RECIPIENTS",
    "DEFAULT_MAX_BAD_COMMANDS",
    "DEFAULT_MAX_CHUNK",
    "MIN_MAX_LINE",
    "Greeting",
    "Shutdown",
    "AutoReply",
    "MailFrom",
    "RcptTo",
    "MessageData",
    "MessageEnd",
    "RecipientReplies",
    "ConnectionClosed",
    "TRANSITIONS",
    "LmtpServer",
    "render_state_table",
]

DEFAULT_MAX_LINE = 1000  # command line, octets with CRLF (RFC 5321 §4.5.3.1.4 asks for at least 512)
MIN_MAX_LINE = 512
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024
DEFAULT_MAX_RECIPIENTS = 1000  # RFC 5321 §4.5.3.1.8 asks for at least 100
DEFAULT_MAX_BAD_COMMANDS = 10
DEFAULT_MAX_CHUNK = 64 * 1024

# Reasons of ConnectionClosed
PEER_CLOSED = "peer closed"
QUIT = "quit"
TOO_MANY_ERRORS = "too many errors"
SHUTDOWN = "shutdown"


# ---------------------------------------------------------------------------
# Events


@dataclasses.dataclass(frozen=True)
class Greeting:
    """Ours, sent first: ``220 <hostname> <text>``."""

    text: str = "LMTP service ready"


@dataclasses.dataclass(frozen=True)
class Shutdown:
    """Ours: send a 421 and close (instead of the greeting, or whenever no answer is owed)."""

    reply: Reply = R.SHUTTING_DOWN


@dataclasses.dataclass(frozen=True)
class AutoReply:
    """The machine answered a command itself: ``send`` this event to get the bytes.

    ``count`` > 1 only after a refused message: the same reply once per
    recipient (RFC 2033 §4.2).
    """

    reply: Reply
    count: int = 1


@dataclasses.dataclass(frozen=True)
class MailFrom:
    """``MAIL FROM:<path>``: the app sends a Reply.  ``path`` is ``""`` for ``<>``.

    ``params`` holds every ESMTP parameter (keyword upper-cased, value as
    written or None), the ones the machine checked (SIZE, BODY, SMTPUTF8)
    included.
    """

    path: str
    params: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RcptTo:
    """``RCPT TO:<path>``: the app sends a Reply (2xx accepts the recipient)."""

    path: str
    params: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MessageData:
    """The next piece of the message body, as it is to be stored."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class MessageEnd:
    """The body is complete.

    ``refused`` None: the app owes ``recipients`` replies, one per accepted
    recipient in RCPT order.  Otherwise the machine refused the message
    (too big, bare CR/LF): the data already delivered is to be discarded,
    and the machine's own per-recipient replies follow as an AutoReply.
    """

    recipients: int
    refused: Reply | None = None


@dataclasses.dataclass(frozen=True)
class RecipientReplies:
    """Ours, after MessageEnd: the replies for the remaining recipients, in RCPT order."""

    replies: tuple[Reply, ...]


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The session is over: the peer closed, or QUIT, too many errors, a 421 of ours."""

    reason: str = PEER_CLOSED


# ---------------------------------------------------------------------------
# Session states: the one table (see the module docstring)

INIT = "init"  # connected, no LHLO yet
READY = "ready"  # LHLO done, no transaction
MAIL = "mail"  # MAIL accepted, no recipient accepted yet
RCPT = "rcpt"  # at least one recipient accepted
CHUNKING = "chunking"  # at least one BDAT chunk taken
CLOSED = "closed"

MESSAGE_END = "message end"

TRANSITIONS: dict[tuple[str, str], str] = {
    # state      step             next
    (INIT,     "LHLO"):         READY,
    (INIT,     "RSET"):         INIT,
    (READY,    "LHLO"):         READY,
    (READY,    "MAIL"):         MAIL,
    (READY,    "RSET"):         READY,
    (MAIL,     "LHLO"):         READY,
    (MAIL,     "RCPT"):         RCPT,
    (MAIL,     "RSET"):         READY,
    (RCPT,     "LHLO"):         READY,
    (RCPT,     "RCPT"):         RCPT,
    (RCPT,     "DATA"):         RCPT,
    (RCPT,     "BDAT"):         CHUNKING,
    (RCPT,     "RSET"):         READY,
    (RCPT,     MESSAGE_END):    READY,
    (CHUNKING, "LHLO"):         READY,
    (CHUNKING, "BDAT"):         CHUNKING,
    (CHUNKING, "RSET"):         READY,
    (CHUNKING, MESSAGE_END):    READY,
}  # fmt: skip

# Why a command is out of sequence, for the 503 text.
_SEQUENCE_TEXT: dict[tuple[str, str], str] = {
    (INIT, "MAIL"): "Send LHLO first",
    (INIT, "RCPT"): "Send LHLO first",
    (INIT, "DATA"): "Send LHLO first",
    (INIT, "BDAT"): "Send LHLO first",
    (MAIL, "MAIL"): "Sender already specified",
    (RCPT, "MAIL"): "Sender already specified",
    (CHUNKING, "MAIL"): "Sender already specified",
    (READY, "RCPT"): "Need MAIL before RCPT",
    (CHUNKING, "RCPT"): "RCPT not allowed after BDAT",
    (READY, "DATA"): "Need MAIL before DATA",
    (MAIL, "DATA"): "No valid recipients",
    (CHUNKING, "DATA"): "DATA not allowed after BDAT",
    (READY, "BDAT"): "Need MAIL before BDAT",
    (MAIL, "BDAT"): "No valid recipients",
}


def render_state_table() -> str:
    """The :data:`TRANSITIONS` table as the text shown in the module docstring."""
    rows = [("state", "step", "next"), ("-" * 8, "-" * 11, "-" * 8)]
    rows += [(state, step, nxt) for (state, step), nxt in TRANSITIONS.items()]
    return "\n".join(f"{a:<8}  {b:<11}  {c}".rstrip() for a, b, c in rows)


_GRAMMAR_REPLIES: dict[Problem, Reply] = {
    Problem.SYNTAX: R.SYNTAX_ERROR,
    Problem.ARGUMENTS: R.INVALID_ARGUMENTS,
    Problem.SENDER: R.BAD_SENDER_SYNTAX,
    Problem.RECIPIENT: R.BAD_RECIPIENT_SYNTAX,
    Problem.NON_ASCII: R.NON_ASCII_ADDRESS,
    Problem.PARAMETER: R.INVALID_ARGUMENTS,
}

# MAIL parameters the machine implements itself (and advertises).
_BUILTIN_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8"})

# Input phases: what the next bytes are.
_COMMAND = "command"
_SKIP_LINE = "skip line"  # the rest of an over-long command line
_BODY = "body"  # DATA body
_CHUNK = "chunk"  # a BDAT chunk being taken
_DROP = "drop"  # a refused BDAT chunk being skipped

# What the app owes.
_GREETING = "the Greeting"
_AUTO = "the pending AutoReply"
_MAIL_REPLY = "a Reply to MailFrom"
_RCPT_REPLY = "a Reply to RcptTo"
_RECIPIENT_REPLIES = "the per-recipient replies"


class LmtpServer(BufferedInput):
    """The server end of one LMTP connection; see the module docstring for the rules.

    ``hostname`` is our name in the greeting and the LHLO reply.  Limits:
    ``max_line`` (command line octets with CRLF), ``max_message_size``
    (octets, advertised as SIZE), ``max_recipients`` (accepted per
    transaction), ``max_bad_commands`` (in a row, before 421),
    ``max_chunk`` (largest MessageData).  ``mail_params`` / ``rcpt_params``
    name the extra ESMTP keywords passed through to the app (any other
    unknown keyword gets 555 5.5.4); ``extra_capabilities`` are added to the
    LHLO reply (e.g. the keyword of such a parameter).
    """

    def __init__(
        self,
        hostname: str,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        max_bad_commands: int = DEFAULT_MAX_BAD_COMMANDS,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        mail_params: Iterable[str] = (),
        rcpt_params: Iterable[str] = (),
        extra_capabilities: Iterable[str] = (),
    ):
        if not grammar.is_domain_or_literal(hostname) or len(hostname) > 255:
            raise ValueError(f"hostname must be a domain or an address literal, got {hostname!r}")
        _check_limit("max_line", max_line, MIN_MAX_LINE)
        _check_limit("max_message_size", max_message_size, 1)  # SIZE 0 would mean "no limit" (RFC 1870)
        _check_limit("max_recipients", max_recipients, 1)
        _check_limit("max_bad_commands", max_bad_commands, 0)
        _check_limit("max_chunk", max_chunk, 1)
        self.hostname = hostname
        self.max_line = max_line
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_bad_commands = max_bad_commands
        self.max_chunk = max_chunk
        self.mail_params = _keywords("mail_params", mail_params)
        self.rcpt_params = _keywords("rcpt_params", rcpt_params)
        capabilities = tuple(extra_capabilities)
        for line in capabilities:
            if not grammar.is_ehlo_line(line):
                raise ValueError(f"extra capability {line!r} is not an ehlo-line (RFC 5321 §4.1.1.1)")
        self.lhlo_reply = Reply(
            250,
            None,
            (hostname, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8",
             f"SIZE {max_message_size}", "CHUNKING", *capabilities),
        )  # fmt: skip

        self._buffer = bytearray()
        self._eof = False
        self._events: collections.deque[object] = collections.deque()
        self._state = INIT
        self._phase = _COMMAND
        self._close_reason = ""
        self._owed: str | None = _GREETING
        self._owed_auto: AutoReply | None = None
        self._owed_left = 0  # per-recipient replies still owed
        self._bad_in_a_row = 0
        self._client_name: str | None = None
        # the transaction
        self._pending_smtputf8 = False  # of the MAIL the app is deciding
        self._smtputf8 = False
        self._recipients = 0
        self._size = 0  # message octets taken so far
        self._refused: Reply | None = None  # the machine refused this message
        self._out = bytearray()  # body octets not yet emitted as MessageData
        self._line_start = True  # DATA: the next byte starts a line
        self._chunk_left = 0  # BDAT: octets of the chunk still to take (or to drop)
        self._chunk_last = False

    # -- what the app may look at

    @property
    def state(self) -> str:
        """The session state: a :data:`TRANSITIONS` state name, or ``"closed"``."""
        return self._state

    @property
    def client_name(self) -> str | None:
        """The name the client gave in its last LHLO."""
        return self._client_name

    @property
    def recipients(self) -> int:
        """Recipients accepted in the current transaction."""
        return self._recipients

    @property
    def owed(self) -> str | None:
        """What the app must send before the next event, if anything (for error messages and logs)."""
        return self._owed

    # -- bytes in: pending_bytes and receive_data are BufferedInput's

    def _input_closed(self) -> bool:
        return self._state == CLOSED

    def next_event(self) -> object:
        """The next event or NEED_DATA; ``LocalProtocolError`` while the app owes an answer."""
        if self._owed is not None:
            raise LocalProtocolError(f"send {self._owed} before asking for the next event")
        event = self._next_queued(PEER_CLOSED)
        if event is None:
            return self._nothing_queued(ConnectionClosed)
        if isinstance(event, AutoReply):
            self._owed, self._owed_auto = _AUTO, event
        elif isinstance(event, MailFrom):
            self._owed = _MAIL_REPLY
        elif isinstance(event, RcptTo):
            self._owed = _RCPT_REPLY
        elif isinstance(event, MessageEnd) and event.refused is None:
            self._owed, self._owed_left = _RECIPIENT_REPLIES, event.recipients
        return event

    def _step(self) -> bool:
        """Consume input for the current phase; False if nothing can be done without more bytes.

        Every True return has consumed bytes, changed phase or queued an event.
        """
        phase = self._phase
        if phase == _COMMAND:
            return self._read_command()
        if phase == _BODY:
            return self._read_body()
        if phase == _CHUNK:
            return self._read_chunk()
        if phase == _DROP:
            return self._drop_chunk()
        return self._skip_line()

    # -- events out

    def send(self, event: object) -> bytes:
        """Wire bytes for ``event``; LocalProtocolError (machine unchanged) if it is not owed now."""
        if isinstance(event, AutoReply):
            if self._owed != _AUTO or event != self._owed_auto:
                raise LocalProtocolError(f"this AutoReply is not the one pending (owed: {self._owed})")
            self._owed = self._owed_auto = None
            return event.reply.encode() * event.count
        if isinstance(event, Reply):
            return self._send_reply(event)
        if isinstance(event, RecipientReplies):
            return self._send_recipient_replies(event)
        if isinstance(event, Greeting):
            if self._owed != _GREETING:
                raise LocalProtocolError("the Greeting is sent once, before anything else")
            if not isinstance(event.text, str):
                raise LocalProtocolError("Greeting.text must be a str")
            data = Reply(R.GREETING_CODE, None, f"{self.hostname} {event.text}".rstrip()).encode()
            self._owed = None
            return data
        if isinstance(event, Shutdown):
            if self._owed not in (None, _GREETING) or self._state == CLOSED:
                raise LocalProtocolError(f"cannot shut down now (owed: {self._owed}, state: {self._state})")
            if not isinstance(event.reply, Reply) or event.reply.code != 421:
                raise LocalProtocolError("Shutdown needs a 421 reply (RFC 5321 §3.8)")
            self._owed = None
            self._events.clear()  # nothing more reaches the app, or the client, after the 421
            self._close(SHUTDOWN)
            return event.reply.encode()
        raise LocalProtocolError(f"not an LMTP server event: {event!r}")

    def _send_reply(self, reply: Reply) -> bytes:
        owed = self._owed
        if owed == _RECIPIENT_REPLIES:
            _check_answer(reply, "a recipient reply", allow_421=False)
            self._owed_left -= 1
            if self._owed_left == 0:
                self._owed = None
                self._end_transaction()
            return reply.encode()
        if owed not in (_MAIL_REPLY, _RCPT_REPLY):
            raise LocalProtocolError(f"no Reply is owed now (owed: {owed})")
        _check_answer(reply, owed, allow_421=True)
        self._owed = None
        if reply.accepted:
            if owed == _MAIL_REPLY:
                self._reset_transaction()
                self._smtputf8 = self._pending_smtputf8
                self._go("MAIL")
            else:
                self._recipients += 1
                self._go("RCPT")
        elif reply.code == 421:
            self._events.clear()
            self._close(SHUTDOWN)
        return reply.encode()

    def _send_recipient_replies(self, event: RecipientReplies) -> bytes:
        if self._owed != _RECIPIENT_REPLIES:
            raise LocalProtocolError(f"no per-recipient replies are owed now (owed: {self._owed})")
        replies = event.replies
        if not isinstance(replies, tuple) or len(replies) != self._owed_left:
            count = len(replies) if isinstance(replies, tuple) else replies
            raise LocalProtocolError(
                f"{self._owed_left} per-recipient replies are owed (RFC 2033 §4.2), got {count!r}"
            )
        for reply in replies:
            _check_answer(reply, "a recipient reply", allow_421=False)
        self._owed, self._owed_left = None, 0
        self._end_transaction()
        return b"".join(reply.encode() for reply in replies)

    # -- state helpers

    def _go(self, step: str) -> None:
        self._state = TRANSITIONS[(self._state, step)]

    def _reset_transaction(self) -> None:
        self._smtputf8 = False
        self._recipients = 0
        self._size = 0
        self._refused = None
        self._out.clear()

    def _end_transaction(self) -> None:
        self._go(MESSAGE_END)
        self._reset_transaction()

    def _close(self, reason: str) -> None:
        self._state = CLOSED
        self._close_reason = reason
        self._buffer.clear()
        self._out.clear()

    def _reply(self, reply: Reply, count: int = 1) -> None:
        self._events.append(AutoReply(reply, count))

    def _good(self) -> None:
        self._bad_in_a_row = 0

    def _bad(self, reply: Reply) -> None:
        """Answer a bad command, or close if there have been too many in a row."""
        if self._bad_in_a_row >= self.max_bad_commands:
            self._reply(R.TOO_MANY_ERRORS)
            self._close(TOO_MANY_ERRORS)
        else:
            self._bad_in_a_row += 1
            self._reply(reply)

    def _out_of_sequence(self, verb: str) -> Reply:
        text = _SEQUENCE_TEXT.get((self._state, verb))
        return Reply(503, "5.5.1", text) if text else R.BAD_SEQUENCE

    # -- commands

    def _read_command(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n", 0, self.max_line)
        if end < 0:
            if len(buffer) < self.max_line:
                return False
            # Over the limit with no CRLF in sight: answer now, drop the rest of
            # the line unread.  The last octet is kept: it may be the CR of CRLF.
            del buffer[: self.max_line - 1]
            self._phase = _SKIP_LINE
            self._bad(R.LINE_TOO_LONG)
            return True
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        self._command(line)
        return True

    def _skip_line(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if end >= 0:
            del buffer[: end + 2]
            self._phase = _COMMAND
            return True
        keep = 1 if buffer.endswith(b"\r") else 0
        if len(buffer) <= keep:
            return False
        del buffer[: len(buffer) - keep]
        return True

    def _command(self, line: bytes) -> None:
        if b"\r" in line or b"\n" in line:
            self._bad(R.BARE_LINE_END_IN_COMMAND)
            return
        verb, args = grammar.split_command(line)
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._bad(R.USE_LHLO if verb in ("HELO", "EHLO") else R.UNKNOWN_COMMAND)
            return
        handler(self, args)

    def _lhlo(self, args: bytes | None) -> None:
        try:
            name = grammar.parse_lhlo(args)
        except GrammarError as exc:
            self._bad(_GRAMMAR_REPLIES[exc.problem])
            return
        self._good()
        self._client_name = name
        self._reset_transaction()
        self._go("LHLO")
        self._reply(self.lhlo_reply)

    def _mail(self, args: bytes | None) -> None:
        if (self._state, "MAIL") not in TRANSITIONS:
            self._bad(self._out_of_sequence("MAIL"))
            return
        try:
            parsed = grammar.parse_mail(args)
            size = self._check_mail_params(parsed.params)
        except GrammarError as exc:
            self._bad(_GRAMMAR_REPLIES[exc.problem])
            return
        except _Unsupported:
            self._bad(R.UNKNOWN_PARAMETER)
            return
        self._good()
        if size is not None and size > self.max_message_size:
            self._reply(R.MESSAGE_TOO_BIG)  # RFC 1870 §6.1
            return
        self._pending_smtputf8 = "SMTPUTF8" in parsed.params
        self._events.append(MailFrom(parsed.path, parsed.params))

    def _check_mail_params(self, params: dict[str, str | None]) -> int | None:
        """The declared SIZE, if any; GrammarError for a bad value, _Unsupported for an unknown keyword."""
        size = None
        for keyword, value in params.items():
            if keyword == "SIZE":
                size = grammar.parse_size_value(value)
            elif keyword == "BODY":
                if value is None or value.upper() not in grammar.BODY_VALUES:
                    raise GrammarError(Problem.ARGUMENTS, "BODY must be 7BIT or 8BITMIME")
            elif keyword == "SMTPUTF8":
                if value is not None:
                    raise GrammarError(Problem.ARGUMENTS, "SMTPUTF8 takes no value (RFC 6531 §3.4)")
            elif keyword not in self.mail_params:
                raise _Unsupported(keyword)
        return size

    def _rcpt(self, args: bytes | None) -> None:
        if (self._state, "RCPT") not in TRANSITIONS:
            self._bad(self._out_of_sequence("RCPT"))
            return
        try:
            parsed = grammar.parse_rcpt(args, utf8=self._smtputf8)
        except GrammarError as exc:
            self._bad(_GRAMMAR_REPLIES[exc.problem])
            return
        if any(keyword not in self.rcpt_params for keyword in parsed.params):
            self._bad(R.UNKNOWN_PARAMETER)
            return
        self._good()
        if self._recipients >= self.max_recipients:
            self._reply(R.TOO_MANY_RECIPIENTS)  # RFC 5321 §4.5.3.1.10
            return
        self._events.append(RcptTo(parsed.path, parsed.params))

    def _data(self, args: bytes | None) -> None:
        if (self._state, "DATA") not in TRANSITIONS:
            self._bad(self._out_of_sequence("DATA"))
            return
        if args is not None:
            self._bad(R.INVALID_ARGUMENTS)
            return
        self._good()
        self._go("DATA")
        self._phase = _BODY
        self._line_start = True
        self._reply(R.START_DATA)

    def _bdat(self, args: bytes | None) -> None:
        try:
            size, last = grammar.parse_bdat(args)
        except GrammarError as exc:
            self._bad(_GRAMMAR_REPLIES[exc.problem])
            self._drop(exc.chunk_size or 0)
            return
        if (self._state, "BDAT") not in TRANSITIONS:
            self._bad(self._out_of_sequence("BDAT"))
            self._drop(size)
            return
        self._good()
        if self._size + size > self.max_message_size:
            recipients = self._recipients
            self._events.append(MessageEnd(recipients, R.MESSAGE_TOO_BIG))
            self._reply(R.MESSAGE_TOO_BIG, recipients if last else 1)
            self._end_transaction()
            self._drop(size)
            return
        self._go("BDAT")
        self._chunk_left, self._chunk_last = size, last
        self._phase = _CHUNK

    def _drop(self, size: int) -> None:
        if size and self._state != CLOSED:
            self._chunk_left = size
            self._phase = _DROP

    def _rset(self, args: bytes | None) -> None:
        if args is not None:
            self._bad(R.INVALID_ARGUMENTS)
            return
        self._good()
        self._reset_transaction()
        self._go("RSET")
        self._reply(R.OK)

    def _noop(self, args: bytes | None) -> None:
        self._good()
        self._reply(R.OK)

    def _vrfy(self, args: bytes | None) -> None:
        if not args:
            self._bad(R.INVALID_ARGUMENTS)
            return
        self._good()
        self._reply(R.CANNOT_VRFY)

    def _help(self, args: bytes | None) -> None:
        self._good()
        self._reply(R.HELP)

    def _quit(self, args: bytes | None) -> None:
        if args is not None:
            self._bad(R.INVALID_ARGUMENTS)
            return
        self._good()
        self._reply(R.CLOSING)
        self._close(QUIT)

    # -- the body

    def _read_body(self) -> bool:
        """One step through a DATA body: find line starts, unstuff dots, spot the end."""
        buffer = self._buffer
        if not buffer:
            return False
        if self._line_start and buffer[0] == 0x2E:  # "."
            head = bytes(buffer[:3])
            if head == b".\r\n":
                del buffer[:3]
                self._end_body()
                return True
            if len(head) < 3 and b".\r\n".startswith(head):
                return False
            del buffer[:1]  # RFC 5321 §4.5.2: drop the first of a line's leading dots
            self._line_start = False
            return True
        # Take up to the next line that starts with a dot (which may be the end),
        # looking at no more than the current MessageData has room for.
        window = min(len(buffer), max(self.max_chunk - len(self._out), 3))
        found = buffer.find(b"\r\n.", 0, window)
        if found >= 0:
            cut = found + 2
        else:
            cut = window
            if buffer[cut - 1] == 0x0D:  # "\r": may be the CR of a CRLF still to come
                cut -= 1
                if cut == 0:
                    return False
        segment = bytes(buffer[:cut])
        del buffer[:cut]
        self._line_start = segment.endswith(b"\r\n")
        if self._refused is None:
            crlf = segment.count(b"\r\n")
            if segment.count(b"\r") == crlf and segment.count(b"\n") == crlf:
                self._take(segment)
            else:
                # Segments never split a CRLF, so any other CR or LF is bare.
                self._take(segment[: _first_bare(segment)])
                if self._refused is None:
                    self._refuse(R.BARE_LINE_END_IN_MESSAGE)
        return True

    def _end_body(self) -> None:
        self._phase = _COMMAND
        self._finish_message()

    def _finish_message(self) -> None:
        recipients = self._recipients
        if self._refused is None:
            if self._out:
                self._events.append(MessageData(bytes(self._out)))
                self._out.clear()
            self._events.append(MessageEnd(recipients))  # the app's replies end the transaction
            return
        refused = self._refused
        self._events.append(MessageEnd(recipients, refused))
        self._reply(refused, recipients)
        self._end_transaction()

    def _take(self, data: bytes) -> None:
        """Add message octets: cut into MessageData of max_chunk, refuse past max_message_size."""
        room = self.max_message_size - self._size
        if len(data) > room:
            self._take(data[:room])
            self._refuse(R.MESSAGE_TOO_BIG)
            return
        self._size += len(data)
        out, limit = self._out, self.max_chunk
        view = memoryview(data)
        while view:
            space = limit - len(out)
            out += view[:space]
            view = view[space:]
            if len(out) == limit:
                self._events.append(MessageData(bytes(out)))
                out.clear()

    def _refuse(self, reply: Reply) -> None:
        self._refused = reply
        self._out.clear()

    # -- BDAT chunks

    def _read_chunk(self) -> bool:
        if self._chunk_left:
            take = min(self._chunk_left, len(self._buffer), max(self.max_chunk - len(self._out), 1))
            if take == 0:
                return False
            self._take(bytes(self._buffer[:take]))
            del self._buffer[:take]
            self._chunk_left -= take
            if self._chunk_left:
                return True
        self._phase = _COMMAND
        if self._chunk_last:
            self._finish_message()
            return True
        if self._out:
            self._events.append(MessageData(bytes(self._out)))
            self._out.clear()
        self._reply(R.chunk_received(self._size))
        return True

    def _drop_chunk(self) -> bool:
        take = min(self._chunk_left, len(self._buffer))
        if take == 0:
            return False
        del self._buffer[:take]
        self._chunk_left -= take
        if not self._chunk_left:
            self._phase = _COMMAND
        return True


class _Unsupported(Exception):
    """An ESMTP keyword the server does not implement (555 5.5.4)."""


_HANDLERS = {
    "LHLO": LmtpServer._lhlo,
    "MAIL": LmtpServer._mail,
    "RCPT": LmtpServer._rcpt,
    "DATA": LmtpServer._data,
    "BDAT": LmtpServer._bdat,
    "RSET": LmtpServer._rset,
    "NOOP": LmtpServer._noop,
    "VRFY": LmtpServer._vrfy,
    "HELP": LmtpServer._help,
    "QUIT": LmtpServer._quit,
}


def _first_bare(segment: bytes) -> int:
    """Index of the first CR not followed by LF, or LF not preceded by CR."""
    position = 0
    while True:
        cr = segment.find(b"\r", position)
        lf = segment.find(b"\n", position)
        if lf >= 0 and (cr < 0 or lf < cr):
            return lf  # an LF before any CR: its CR is missing
        if cr < 0:
            return len(segment)  # no bare one after all
        if segment[cr + 1 : cr + 2] != b"\n":
            return cr
        position = cr + 2


def _check_answer(reply: object, what: str, *, allow_421: bool) -> None:
    if not isinstance(reply, Reply):
        raise LocalProtocolError(f"{what} must be a Reply, got {reply!r}")
    if 300 <= reply.code < 400:
        raise LocalProtocolError(f"{what} cannot be a 3xx reply: {reply}")
    if reply.code == 421 and not allow_421:
        raise LocalProtocolError(f"{what} cannot be 421: use a 4xx like 451 4.3.0")
    if reply.enhanced is None:
        raise LocalProtocolError(f"{what} needs an enhanced status code (we announce ENHANCEDSTATUSCODES)")


def _check_limit(name: str, value: object, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _keywords(name: str, keywords: Iterable[str]) -> frozenset[str]:
    result = set()
    for keyword in keywords:
        if not grammar.is_esmtp_keyword(keyword):
            raise ValueError(f"{name}: {keyword!r} is not an esmtp-keyword")
        result.add(keyword.upper())
    return frozenset(result)
