"""The POP3 server machine (RFC 1939, with RFC 2449, 2595, 3206, 5034, 6856): how a mail client reads a maildrop.

Owns the server side of one POP3 connection from a mail client to an access
server: command lines, the AUTHORIZATION / TRANSACTION / UPDATE states
(RFC 1939 §3), USER/PASS and SASL PLAIN (RFC 5034, RFC 4616), STLS (RFC
2595), CAPA (RFC 2449), the UTF8 command (RFC 6856), the wire form of every
response -- response codes (RFC 2449 §8, RFC 3206), dot-stuffed multi-line
answers -- the limits, and every reply the protocol itself decides.  It does
not know users, passwords or mailboxes: the app (the access server's POP3
session) decides each login and answers each maildrop command, knowing which
messages exist and which are marked deleted.  It follows the contract of
:mod:`intermail.proto`; the pump drives it.

Invariants:

- One response per command, in command order (RFC 2449 §6.6 PIPELINING):
  the app owes at most one answer at a time, the machine does not look at
  pipelined input behind a command until it is answered, and ``send``
  refuses anything but the answer owed.
- A multi-line answer always goes out as CRLF lines, every line that starts
  with ``.`` gets another one (RFC 1939 §3), and it always ends with
  ``.CRLF`` on a line of its own, whatever the app hands over and however it
  chunks it; a streamed answer is byte for byte the one-piece answer.
- The events and the output depend only on the bytes received, never on how
  they were split -- with one exception by nature: whether bytes behind an
  ``STLS`` arrived before the machine read it (see STLS below).
- Nothing the peer sends is buffered without bound: an over-long line is
  answered as soon as ``max_line`` is passed and the rest of it dropped
  unread.
- No input makes the machine raise (``RemoteProtocolError`` is allowed by
  the contract and never needed): whatever the client sends becomes a
  ``-ERR`` and the session stays usable.  A ``LocalProtocolError`` from
  ``send`` leaves the machine unchanged.
- Passwords never show in a repr (:class:`UserPass`, :class:`AuthPlain`).

Logs: nothing (no I/O here; the session that drives the machine logs).

Conversation with the app
=========================

The app's first ``send`` is :class:`Greeting` (``+OK <text>``), or
``Err(text, code, close=True)`` to turn the client away (e.g. ``[SYS/TEMP]``
when the directory is down).  Then it loops on ``next_event``:

================== =====================================================
event              the app must
================== =====================================================
AutoReply          pass it to ``send`` unchanged: the machine answered
                   a command itself (CAPA, USER, QUIT before login, an
                   AUTH continuation, a -ERR ...)
StartTls           upgrade the transport: ``pump.start_tls(ctx,
                   reply=event)`` (the pump sends it, which writes the
                   ``+OK``, and refuses plaintext pipelined behind it); or
                   ``send`` an :class:`Err` to refuse
UserPass,          check the credentials: :class:`Ok` logs in (the machine
AuthPlain          enters TRANSACTION), :class:`Err` refuses (codes
                   ``AUTH``, ``SYS/TEMP``, ``IN-USE``, ``LOGIN-DELAY``...)
Stat, Dele, Noop,  ``send`` one :class:`Ok` (``Ok("2 320")`` for STAT) or
Rset, List(n),     :class:`Err`
Uidl(n)
List(), Uidl(),    ``send`` one :class:`MultiLine`, or a streamed one
Retr, Top          (:class:`MultiLineStart`, any :class:`MultiLineData`,
                   :class:`MultiLineEnd`), or an :class:`Err`
Quit               (TRANSACTION only; the machine is in UPDATE) remove the
                   messages marked deleted, then ``send`` Ok or Err (``-ERR
                   some deleted messages not removed``); the machine closes
ConnectionClosed   close the connection (``reason`` says why).  If no Quit
                   came first, nothing is removed (RFC 1939 §6)
================== =====================================================

Every :class:`Err` may carry ``close=True``: the machine closes after it
(``ConnectionClosed("closed by the app")``; after Quit the reason stays
``"quit"``), e.g. after too many failed logins.  Message numbers are checked for syntax only (a positive decimal
of at most :data:`MAX_NUMBER`); whether message *n* exists or is marked
deleted is for the app to say (``Err("no such message")``).  The text of an
Ok/Err must not start with ``[`` unless it has a code (a client would read
it as one, RFC 2449 §8).  :func:`err_for_error` maps the error taxonomy
to an Err with safe text.

Session states
==============

:data:`TRANSITIONS` says which command is legal in which state and where it
leads; a pair that is not a row is a sequence error (``-ERR``).  ``logged
in`` is the app's +OK to UserPass or AuthPlain; ``quit answered`` the app's
answer to Quit.  Rendered by :func:`render_state_table`:

    state          step           next
    -------------  -------------  -------------
    authorization  CAPA           authorization
    authorization  USER           authorization
    authorization  PASS           authorization
    authorization  AUTH           authorization
    authorization  STLS           authorization
    authorization  UTF8           authorization
    authorization  QUIT           closed
    authorization  logged in      transaction
    transaction    CAPA           transaction
    transaction    STAT           transaction
    transaction    LIST           transaction
    transaction    UIDL           transaction
    transaction    RETR           transaction
    transaction    TOP            transaction
    transaction    DELE           transaction
    transaction    NOOP           transaction
    transaction    RSET           transaction
    transaction    QUIT           update
    update         quit answered  closed

Commands
========

Command lines end with CRLF only (a bare CR or LF inside a line is a
``-ERR``); the keyword is case-insensitive; arguments are separated by one
space, with nothing after the last (RFC 1939 §3).  Only the arguments of
USER and PASS may be UTF-8 (RFC 6856, announced as ``UTF8 USER``); PASS
takes the rest of the line, spaces included (RFC 1939 §7).  No command
argument may hold a control character.

- USER/PASS: USER is answered ``+OK`` by the machine whatever the name (no
  user enumeration); PASS must come right after it (any other command,
  STLS included, forgets the USER), and only then the app gets
  :class:`UserPass`.  With ``user_command=False`` both are refused.
- AUTH (RFC 5034): ``AUTH PLAIN <base64>`` or ``AUTH PLAIN =`` (empty
  initial response), or ``AUTH PLAIN`` and the response on the next line
  after the machine's ``+ `` continuation.  ``*`` cancels; bad base64
  (strict: padding required, nothing after it) or a PLAIN message that is
  not ``[authzid] NUL authcid NUL passwd`` in UTF-8 with a non-empty authcid
  and password (RFC 4616 §2) is a ``-ERR``.  A bare ``AUTH`` lists the
  mechanisms (the RFC 1734 form some clients still send).  ``authzid`` is
  ``""`` when the client gave none.
- CAPA is answered by the machine from its configuration, the same list in
  both states (RFC 2449 §5: what AUTHORIZATION offers is announced in both):
  TOP, UIDL, USER (if enabled), SASL (if any mechanism), RESP-CODES,
  AUTH-RESP-CODE, PIPELINING, UTF8 (with USER if enabled), STLS (if
  available and not in TLS yet), IMPLEMENTATION (if set).  EXPIRE and
  LOGIN-DELAY are not announced: the app has no policy to announce.
- UTF8 (RFC 6856 §2, AUTHORIZATION only): answered by the machine; the app
  reads :attr:`Pop3Server.utf8` to know whether it may hand out SMTPUTF8
  messages unconverted.
- APOP, LANG and anything else: ``-ERR`` unknown command.  (APOP is MD5
  over a plaintext-equivalent secret; we do not store one.)

STLS
====

STLS is legal in AUTHORIZATION, when ``stls_available`` and TLS is not on
yet.  If any byte arrived behind the STLS line when the machine reads it,
STLS is refused with ``-ERR`` and the bytes are read as the plaintext
commands they are: taken as sent inside TLS they would be the RFC 2595
§3.1 / CVE-2011-0411 injection.  Bytes that arrive *after* the machine has
read STLS are the pump's to catch (``Pump.start_tls`` checks
:meth:`Pop3Server.pending_bytes` and its own buffer, and aborts); this is
why STLS is the one place where the split of the input matters.  Once the
StartTls event is sent, TLS is on: the USER and UTF8 state are forgotten
(RFC 2595 §4) and CAPA no longer lists STLS.

Multi-line answers
==================

:class:`MultiLine` takes the body either as ``bytes`` (a message: RETR,
TOP) or as a sequence of lines without line ends (``str`` or ``bytes``: a
LIST or UIDL listing).  Line ends go out as CRLF: a bare LF or bare CR in
``bytes`` becomes CRLF (the store's messages are CRLF already, LMTP refuses
anything else; an imported message might not be), so no client can
disagree with us about where a line, or the answer, ends.  A body that does
not end with a line end gets one before the final ``.CRLF``.  The streamed
form keeps the line-start and held-back-CR state across MultiLineData
chunks, so any chunking gives the same bytes.  The machine neither counts
nor cuts lines: TOP's header-plus-n-lines is the app's (it knows the
message's structure), as are the sizes in LIST (which must be those of the
CRLF form, RFC 1939 §5).

Limits and errors
=================

``max_line`` bounds every line from the client, CRLF included: commands
and AUTH continuation lines alike.  The default is 512 octets: RFC 2449 §4
allows commands of 255 octets with CRLF (the lowest accepted value here),
and AUTH continuation lines have no limit in RFC 5034 -- 512 lets a PLAIN
message of up to 381 octets through on a continuation line (372 in an
initial response; RFC 5034 §4 has clients move longer ones there anyway).  A longer line
gets ``-ERR`` as soon as the limit is passed and the rest of it is dropped
up to its CRLF (an AUTH exchange in progress is over).  Every ``-ERR`` the
machine decides itself counts as a bad command (unknown or out-of-sequence
commands, bad arguments, too-long lines, refused STLS, bad or cancelled
AUTH); any other command resets the count; the bad command after
``max_bad_commands`` in a row gets ``-ERR`` and the machine closes.  The
app's own Err (a wrong password) does not count: throttling logins is the
directory's job.  Responses the machine or the app build are at most 512
octets per status line with CRLF (RFC 1939 §3); building a longer one is a
``LocalProtocolError``.
"""

from __future__ import annotations

import binascii
import collections
import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

from intermail.errors import ErrorKind, LocalProtocolError, MailError
from intermail.proto.buffered import BufferedInput
from intermail.proto.dotstuff import DotStuffer, stuff_body

__all__ = [
    "DEFAULT_MAX_LINE",
    "MIN_MAX_LINE",
    "DEFAULT_MAX_BAD_COMMANDS",
    "MAX_RESPONSE_LINE",
    "MAX_NUMBER",
    "MAX_PARAM",
    "SUPPORTED_MECHANISMS",
    "Greeting",
    "Ok",
    "Err",
    "MultiLine",
    "MultiLineStart",
    "MultiLineData",
    "MultiLineEnd",
    "Challenge",
    "AutoReply",
    "StartTls",
    "UserPass",
    "AuthPlain",
    "Stat",
    "List",
    "Uidl",
    "Retr",
    "Top",
    "Dele",
    "Noop",
    "Rset",
    "Quit",
    "ConnectionClosed",
    "ERROR_CODES",
    "err_for_error",
    "stuff_body",
    "TRANSITIONS",
    "Pop3Server",
    "render_state_table",
]

DEFAULT_MAX_LINE = 512  # any client line, octets with CRLF (see "Limits and errors")
MIN_MAX_LINE = 255  # RFC 2449 §4: commands of up to 255 octets with CRLF
DEFAULT_MAX_BAD_COMMANDS = 10
MAX_RESPONSE_LINE = 512  # RFC 1939 §3: a status line is at most 512 octets with CRLF
MAX_PARAM = 40  # RFC 2449 §4: a command argument is at most 40 octets
MAX_NUMBER = 2**31 - 1  # largest message number or TOP line count we pass on
SUPPORTED_MECHANISMS = frozenset({"PLAIN"})

# Reasons of ConnectionClosed
PEER_CLOSED = "peer closed"
QUIT = "quit"
TOO_MANY_ERRORS = "too many errors"
APP_CLOSED = "closed by the app"


# ---------------------------------------------------------------------------
# Responses: the app's answers and their wire form

# RFC 2449 §8
#   single-line = status [SP text] CRLF        ; at most 512 octets (RFC 1939 §3)
#   status      = "+OK" / "-ERR"
#   text        = *schar / resp-code *CHAR
#   schar       = %x21-5A / %x5C-7F            ; printable ASCII, excluding "["
#   resp-code   = "[" resp-level *("/" resp-level) "]"
#   resp-level  = 1*rchar
#   rchar       = %x21-2E / %x30-5C / %x5E-7F  ; printable ASCII, excluding "/" and "]"
# Our text may also carry UTF-8 (RFC 6856 §2); control characters never.
_BAD_TEXT = re.compile(r"[\x00-\x1f\x7f]")
_RESP_CODE = re.compile(r"[\x21-\x2e\x30-\x5c\x5e-\x7e]+(?:/[\x21-\x2e\x30-\x5c\x5e-\x7e]+)*")


def _status_line(status: str, text: str, code: str | None = None) -> bytes:
    """One checked status line; LocalProtocolError if it could not be sent as is."""
    if not isinstance(text, str):
        raise LocalProtocolError(f"response text must be a str, got {text!r}")
    if _BAD_TEXT.search(text):
        raise LocalProtocolError(f"response text contains a control character: {text!r}")
    if code is None:
        if text.startswith("["):
            raise LocalProtocolError(f"response text starting with '[' reads as a response code: {text!r}")
        line = f"{status} {text}" if text else status
    else:
        if not isinstance(code, str) or not _RESP_CODE.fullmatch(code):
            raise LocalProtocolError(f"not a response code (RFC 2449 §8): {code!r}")
        line = f"{status} [{code}] {text}" if text else f"{status} [{code}]"
    data = line.encode("utf-8") + b"\r\n"
    if len(data) > MAX_RESPONSE_LINE:
        raise LocalProtocolError(f"status line of {len(data)} octets, more than {MAX_RESPONSE_LINE} (RFC 1939 §3)")
    return data


@dataclasses.dataclass(frozen=True)
class Greeting:
    """Ours, sent first: ``+OK <text>``."""

    text: str = "POP3 server ready"

    def __post_init__(self) -> None:
        _status_line("+OK", self.text)


@dataclasses.dataclass(frozen=True)
class Ok:
    """A positive single-line answer: ``+OK <text>``."""

    text: str = ""

    def __post_init__(self) -> None:
        _status_line("+OK", self.text)

    def encode(self) -> bytes:
        return _status_line("+OK", self.text)


@dataclasses.dataclass(frozen=True)
class Err:
    """A negative answer: ``-ERR [<code>] <text>``; ``close=True`` ends the session after it.

    ``code`` is a response code without its brackets (RFC 2449 §8, RFC 3206):
    ``"AUTH"``, ``"SYS/TEMP"``, ``"SYS/PERM"``, ``"IN-USE"``, ``"LOGIN-DELAY"``.
    """

    text: str = ""
    code: str | None = None
    close: bool = False

    def __post_init__(self) -> None:
        _status_line("-ERR", self.text, self.code)
        if not isinstance(self.close, bool):
            raise LocalProtocolError(f"Err.close must be a bool, got {self.close!r}")

    def encode(self) -> bytes:
        return _status_line("-ERR", self.text, self.code)


@dataclasses.dataclass(frozen=True)
class MultiLine:
    """A positive multi-line answer: ``+OK <first_line>``, the body dot-stuffed, ``.``.

    ``body`` is ``bytes`` (a message, any line ends) or a sequence of lines
    without line ends (``str`` as UTF-8, or ``bytes``), kept as a tuple.
    """

    first_line: str = ""
    body: bytes | tuple[str | bytes, ...] = b""

    def __post_init__(self) -> None:
        _status_line("+OK", self.first_line)
        body = self.body
        if isinstance(body, (bytearray, memoryview)):
            object.__setattr__(self, "body", bytes(body))
        elif isinstance(body, bytes):
            pass
        elif isinstance(body, Sequence) and not isinstance(body, str):
            lines = tuple(body)
            for line in lines:
                if not isinstance(line, (str, bytes)):
                    raise LocalProtocolError(f"a MultiLine line must be str or bytes, got {line!r}")
                if ("\r" in line or "\n" in line) if isinstance(line, str) else (b"\r" in line or b"\n" in line):
                    raise LocalProtocolError(f"a MultiLine line must not contain CR or LF: {line!r}")
            object.__setattr__(self, "body", lines)
        else:
            raise LocalProtocolError(f"MultiLine.body must be bytes or a sequence of lines, got {body!r}")

    def body_bytes(self) -> bytes:
        """The body as it is before stuffing (lines joined with CRLF)."""
        if isinstance(self.body, bytes):
            return self.body
        return b"".join((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n" for line in self.body)

    def encode(self) -> bytes:
        return _status_line("+OK", self.first_line) + stuff_body(self.body_bytes())


@dataclasses.dataclass(frozen=True)
class MultiLineStart:
    """Ours: the status line of a streamed multi-line answer; MultiLineData chunks follow."""

    first_line: str = ""

    def __post_init__(self) -> None:
        _status_line("+OK", self.first_line)


@dataclasses.dataclass(frozen=True)
class MultiLineData:
    """Ours: the next piece of a streamed body, as stored (any chunking; the machine stuffs it)."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class MultiLineEnd:
    """Ours: the streamed body is complete (the machine adds the final ``.CRLF``)."""


@dataclasses.dataclass(frozen=True)
class Challenge:
    """The machine's AUTH continuation: ``+ <base64>`` (empty for PLAIN, RFC 5034 §4)."""

    data: str = ""

    def encode(self) -> bytes:
        return f"+ {self.data}".encode("ascii") + b"\r\n"


# The error taxonomy as POP3 response codes (RFC 3206 §4); the text is always the safe one.
ERROR_CODES: dict[ErrorKind, str | None] = {
    ErrorKind.TEMP: "SYS/TEMP",
    ErrorKind.UNAVAILABLE: "SYS/TEMP",
    ErrorKind.NOTFOUND: None,
    ErrorKind.EXISTS: None,
    ErrorKind.PERM: "SYS/PERM",
    ErrorKind.NOQUOTA: "SYS/PERM",
    ErrorKind.LIMIT: "SYS/TEMP",
    ErrorKind.INVALID: None,
    ErrorKind.FENCED: "SYS/TEMP",
    ErrorKind.CORRUPT: "SYS/PERM",
}


def err_for_error(error: MailError, *, close: bool = False) -> Err:
    """The Err for a MailError: its kind's code and its safe text (the detail is for the log)."""
    return Err(error.safe, ERROR_CODES[error.kind], close)


# ---------------------------------------------------------------------------
# Events from the machine


@dataclasses.dataclass(frozen=True)
class AutoReply:
    """The machine answered a command itself: ``send`` this event to get the bytes."""

    reply: Ok | Err | MultiLine | Challenge


@dataclasses.dataclass(frozen=True)
class StartTls:
    """``STLS`` accepted by the machine: ``send`` it (via ``Pump.start_tls``) for the +OK, or an Err."""

    text: str = "Begin TLS negotiation"


@dataclasses.dataclass(frozen=True)
class UserPass:
    """USER then PASS: the app answers Ok (logged in) or Err."""

    user: str
    password: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class AuthPlain:
    """AUTH PLAIN (RFC 4616): the app answers Ok (logged in) or Err.  ``authzid`` "" when not given."""

    authzid: str
    authcid: str
    password: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Stat:
    """STAT: ``Ok("<count> <octets>")`` (RFC 1939 §5) or Err."""


@dataclasses.dataclass(frozen=True)
class List:
    """LIST [msg]: with ``msg`` an Ok(``"<msg> <octets>"``), without one a MultiLine scan listing."""

    msg: int | None = None


@dataclasses.dataclass(frozen=True)
class Uidl:
    """UIDL [msg] (RFC 1939 §7): like List, with unique-ids instead of sizes."""

    msg: int | None = None


@dataclasses.dataclass(frozen=True)
class Retr:
    """RETR msg: a MultiLine (or streamed) message, or Err."""

    msg: int


@dataclasses.dataclass(frozen=True)
class Top:
    """TOP msg lines (RFC 1939 §7): the header, the blank line and ``lines`` body lines; or Err."""

    msg: int
    lines: int


@dataclasses.dataclass(frozen=True)
class Dele:
    """DELE msg: mark it deleted (removed only at Quit); Ok or Err."""

    msg: int


@dataclasses.dataclass(frozen=True)
class Noop:
    """NOOP (TRANSACTION): Ok."""


@dataclasses.dataclass(frozen=True)
class Rset:
    """RSET: unmark every message marked deleted; Ok or Err."""


@dataclasses.dataclass(frozen=True)
class Quit:
    """QUIT in TRANSACTION: the UPDATE state -- remove the marked messages, then Ok or Err; then closed."""


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The session is over: the peer closed, QUIT, too many errors, or an Err(close=True)."""

    reason: str = PEER_CLOSED


# ---------------------------------------------------------------------------
# Session states: the one table (see the module docstring)

AUTHORIZATION = "authorization"
TRANSACTION = "transaction"
UPDATE = "update"
CLOSED = "closed"

LOGGED_IN = "logged in"
QUIT_ANSWERED = "quit answered"

TRANSITIONS: dict[tuple[str, str], str] = {
    # state          step             next
    (AUTHORIZATION, "CAPA"):         AUTHORIZATION,
    (AUTHORIZATION, "USER"):         AUTHORIZATION,
    (AUTHORIZATION, "PASS"):         AUTHORIZATION,
    (AUTHORIZATION, "AUTH"):         AUTHORIZATION,
    (AUTHORIZATION, "STLS"):         AUTHORIZATION,
    (AUTHORIZATION, "UTF8"):         AUTHORIZATION,
    (AUTHORIZATION, "QUIT"):         CLOSED,
    (AUTHORIZATION, LOGGED_IN):      TRANSACTION,
    (TRANSACTION,   "CAPA"):         TRANSACTION,
    (TRANSACTION,   "STAT"):         TRANSACTION,
    (TRANSACTION,   "LIST"):         TRANSACTION,
    (TRANSACTION,   "UIDL"):         TRANSACTION,
    (TRANSACTION,   "RETR"):         TRANSACTION,
    (TRANSACTION,   "TOP"):          TRANSACTION,
    (TRANSACTION,   "DELE"):         TRANSACTION,
    (TRANSACTION,   "NOOP"):         TRANSACTION,
    (TRANSACTION,   "RSET"):         TRANSACTION,
    (TRANSACTION,   "QUIT"):         UPDATE,
    (UPDATE,        QUIT_ANSWERED):  CLOSED,
}  # fmt: skip


def render_state_table() -> str:
    """The :data:`TRANSITIONS` table as the text shown in the module docstring."""
    rows = [("state", "step", "next"), ("-" * 13, "-" * 13, "-" * 13)]
    rows += [(state, step, nxt) for (state, step), nxt in TRANSITIONS.items()]
    return "\n".join(f"{a:<13}  {b:<13}  {c}".rstrip() for a, b, c in rows)


# The machine's own -ERR texts.
_UNKNOWN_COMMAND = "Unknown command"
_INVALID_ARGUMENTS = "Invalid arguments"
_INVALID_CHARACTERS = "Invalid characters in command"
_LINE_TOO_LONG = "Line too long"
_TOO_MANY_ERRORS = "Too many bad commands, closing connection"
_NOT_AUTHENTICATED = "Not authenticated yet"
_ALREADY_AUTHENTICATED = "Already authenticated"
_SEND_USER_FIRST = "Send USER first"
_USER_DISABLED = "USER/PASS not supported, use AUTH"
_BAD_MESSAGE_NUMBER = "Invalid message number"
_BAD_LINE_COUNT = "Invalid line count"
_UNSUPPORTED_MECHANISM = "Unsupported authentication mechanism"
_AUTH_CANCELLED = "Authentication cancelled"
_BAD_BASE64 = "Invalid base64 data"
_BAD_PLAIN = "Malformed PLAIN response"
_TLS_UNAVAILABLE = "STLS not available"
_TLS_ACTIVE = "Already using TLS"
_TLS_PIPELINED = "Nothing may follow STLS before the TLS handshake"

# Argument grammars, RFC 1939 §3 with RFC 2449 §4 (ABNF in RFC 2449 §9):
#   command   = keyword *(SP param) CRLF   ; at most 255 octets (we: max_line)
#   keyword   = 3*4VCHAR                   ; case-insensitive
#   param     = 1*VCHAR                    ; at most 40 octets
#   msg       = 1*DIGIT                    ; a message-number (RFC 1939 §5); we: 1..MAX_NUMBER
_KEYWORD = re.compile(rb"[A-Za-z0-9]{3,4}")
_DIGITS = re.compile(rb"[0-9]{1,%d}" % MAX_PARAM)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# RFC 5034 §4 and RFC 4422 §3.1:
#   auth-command     = "AUTH" SP sasl-mech [SP initial-response] ...
#   initial-response = base64 / "="
#   sasl-mech        = 1*20(UPPER-ALPHA / DIGIT / "-" / "_")   ; we accept lower case too
#   cancel-response  = "*"
_SASL_MECH = re.compile(rb"[A-Za-z0-9_-]{1,20}")

# Input phases: what the next line is.
_COMMAND = "command"
_AUTH_RESPONSE = "auth response"  # the client's answer to our "+ " continuation
_SKIP_LINE = "skip line"  # the rest of an over-long line

# What the app owes.
_GREETING = "the Greeting (or Err(close=True))"
_AUTO = "the pending AutoReply"
_STLS = "the pending StartTls (or an Err)"
_ANSWER = "an answer to {}"
_STREAM = "the rest of the streamed answer (MultiLineData..., MultiLineEnd)"

# Which answers each decision event takes besides Err: one line, or a multi-line answer.
_SINGLE = "Ok"
_MULTI = "MultiLine or MultiLineStart"


def _answer_form(event: object) -> str:
    if isinstance(event, (List, Uidl)):
        return _SINGLE if event.msg is not None else _MULTI
    return _MULTI if isinstance(event, (Retr, Top)) else _SINGLE


class _Bad(Exception):
    """A command the machine refuses itself; ``text`` is the -ERR text."""

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)


class Pop3Server(BufferedInput):
    """The server end of one POP3 connection; see the module docstring for the rules.

    Limits: ``max_line`` (any client line, octets with CRLF, at least
    :data:`MIN_MAX_LINE`), ``max_bad_commands`` (machine -ERRs in a row
    before it closes).  ``stls_available``: STLS is offered (a listener with
    a certificate and no implicit TLS).  ``auth_mechanisms``: SASL
    mechanisms offered, a subset of :data:`SUPPORTED_MECHANISMS` (may be
    empty).  ``user_command``: USER/PASS are offered.  ``implementation``:
    the CAPA IMPLEMENTATION text, or None to leave it out.
    """

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_bad_commands: int = DEFAULT_MAX_BAD_COMMANDS,
        stls_available: bool,
        auth_mechanisms: Iterable[str] = ("PLAIN",),
        user_command: bool = True,
        implementation: str | None = "intermail",
    ):
        _check_limit("max_line", max_line, MIN_MAX_LINE)
        _check_limit("max_bad_commands", max_bad_commands, 0)
        for name, flag in (("stls_available", stls_available), ("user_command", user_command)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if isinstance(auth_mechanisms, (str, bytes)):
            raise ValueError("auth_mechanisms must be a collection of names, not one string")
        mechanisms: list[str] = []
        for mechanism in auth_mechanisms:
            if not isinstance(mechanism, str) or mechanism.upper() not in SUPPORTED_MECHANISMS:
                supported = sorted(SUPPORTED_MECHANISMS)
                raise ValueError(f"unsupported SASL mechanism {mechanism!r} (supported: {supported})")
            if mechanism.upper() not in mechanisms:
                mechanisms.append(mechanism.upper())
        if not mechanisms and not user_command:
            raise ValueError("no way to log in: enable user_command or a SASL mechanism")
        if implementation is not None:
            if (not isinstance(implementation, str) or not implementation or _BAD_TEXT.search(implementation)
                    or len(implementation.encode("utf-8")) > 200):
                raise ValueError(f"implementation must be a short single-line text, got {implementation!r}")
        self.max_line = max_line
        self.max_bad_commands = max_bad_commands
        self.stls_available = stls_available
        self.auth_mechanisms: tuple[str, ...] = tuple(mechanisms)
        self.user_command = user_command
        self.implementation = implementation

        self._buffer = bytearray()
        self._eof = False
        self._events: collections.deque[object] = collections.deque()
        self._state = AUTHORIZATION
        self._phase = _COMMAND
        self._close_reason = ""
        self._owed: str | None = _GREETING
        self._owed_event: object | None = None
        self._bad_in_a_row = 0
        self._user: str | None = None  # a USER answered +OK: PASS may follow at once
        self._tls = False
        self._utf8 = False
        self._stuffer: DotStuffer | None = None

    # -- what the app may look at

    @property
    def state(self) -> str:
        """The session state: a :data:`TRANSITIONS` state name, or ``"closed"``."""
        return self._state

    @property
    def tls(self) -> bool:
        """True once a StartTls was sent (TLS begun through STLS)."""
        return self._tls

    @property
    def utf8(self) -> bool:
        """True once the client sent UTF8 (RFC 6856): SMTPUTF8 messages may go out unconverted."""
        return self._utf8

    @property
    def owed(self) -> str | None:
        """What the app must send before the next event, if anything (for error messages and logs)."""
        return self._owed

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The CAPA lines as of now (RFC 2449 §5; the same in both states)."""
        lines = ["TOP", "UIDL"]
        if self.user_command:
            lines.append("USER")
        if self.auth_mechanisms:
            lines.append("SASL " + " ".join(self.auth_mechanisms))
        lines += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "UTF8 USER" if self.user_command else "UTF8"]
        if self.stls_available and not self._tls:
            lines.append("STLS")
        if self.implementation is not None:
            lines.append(f"IMPLEMENTATION {self.implementation}")
        return tuple(lines)

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
            self._owed = _AUTO
        elif isinstance(event, StartTls):
            self._owed = _STLS
        else:
            self._owed = _ANSWER.format(type(event).__name__)
        self._owed_event = event
        return event

    def _step(self) -> bool:
        """Consume input for the current phase; False if nothing can be done without more bytes."""
        if self._phase == _SKIP_LINE:
            return self._skip_line()
        return self._read_line()

    # -- events out

    def send(self, event: object) -> bytes:
        """Wire bytes for ``event``; LocalProtocolError (machine unchanged) if it is not owed now."""
        if isinstance(event, AutoReply):
            if self._owed != _AUTO or event != self._owed_event:
                raise LocalProtocolError(f"this AutoReply is not the one pending (owed: {self._owed})")
            self._owed = self._owed_event = None
            return event.reply.encode()
        if isinstance(event, StartTls):
            if self._owed != _STLS or event != self._owed_event:
                raise LocalProtocolError(f"this StartTls is not the one pending (owed: {self._owed})")
            data = _status_line("+OK", event.text)
            self._owed = self._owed_event = None
            self._start_tls()
            return data
        if isinstance(event, Greeting):
            if self._owed != _GREETING:
                raise LocalProtocolError("the Greeting is sent once, before anything else")
            self._owed = None
            return _status_line("+OK", event.text)
        if isinstance(event, (Ok, Err, MultiLine, MultiLineStart)):
            return self._send_answer(event)
        if isinstance(event, MultiLineData):
            if self._owed != _STREAM or self._stuffer is None:
                raise LocalProtocolError(f"no streamed answer is open (owed: {self._owed})")
            if not isinstance(event.data, (bytes, bytearray, memoryview)):
                raise LocalProtocolError(f"MultiLineData.data must be bytes, got {event.data!r}")
            return self._stuffer.feed(bytes(event.data))
        if isinstance(event, MultiLineEnd):
            if self._owed != _STREAM or self._stuffer is None:
                raise LocalProtocolError(f"no streamed answer is open (owed: {self._owed})")
            data = self._stuffer.end()
            self._stuffer = None
            self._owed = None
            return data
        raise LocalProtocolError(f"not a POP3 server event: {event!r}")

    def _send_answer(self, answer: Ok | Err | MultiLine | MultiLineStart) -> bytes:
        owed, asked = self._owed, self._owed_event
        if owed == _GREETING:
            if not (isinstance(answer, Err) and answer.close):
                raise LocalProtocolError("send the Greeting first, or Err(close=True) to turn the client away")
            self._owed = None
            self._close(APP_CLOSED)
            return answer.encode()
        if owed == _STLS and isinstance(answer, Err):
            self._owed = self._owed_event = None
            if answer.close:
                self._close(APP_CLOSED)
            return answer.encode()
        if owed is None or asked is None or owed in (_AUTO, _STLS, _STREAM):
            raise LocalProtocolError(f"no answer is owed now (owed: {owed})")
        form = _answer_form(asked)
        if not isinstance(answer, Err):
            allowed = isinstance(answer, Ok) if form == _SINGLE else isinstance(answer, (MultiLine, MultiLineStart))
            if not allowed:
                raise LocalProtocolError(
                    f"{type(asked).__name__} is answered with {form} or Err, not {type(answer).__name__}"
                )
        self._owed = self._owed_event = None
        if isinstance(answer, MultiLineStart):
            self._owed = _STREAM
            self._stuffer = DotStuffer()
            return _status_line("+OK", answer.first_line)
        data = answer.encode()
        if isinstance(asked, (UserPass, AuthPlain)) and isinstance(answer, Ok):
            self._go(LOGGED_IN)
        if isinstance(asked, Quit):
            self._go(QUIT_ANSWERED)
            self._close(QUIT)
        elif isinstance(answer, Err) and answer.close:
            self._close(APP_CLOSED)
        return data

    # -- state helpers

    def _go(self, step: str) -> None:
        self._state = TRANSITIONS[(self._state, step)]

    def _start_tls(self) -> None:
        # RFC 2595 §4: forget what the client told us in plaintext.
        self._tls = True
        self._user = None
        self._utf8 = False

    def _close(self, reason: str) -> None:
        self._state = CLOSED
        self._close_reason = reason
        self._buffer.clear()
        self._phase = _COMMAND

    def _reply(self, reply: Ok | Err | MultiLine | Challenge) -> None:
        self._events.append(AutoReply(reply))

    def _good(self) -> None:
        self._bad_in_a_row = 0

    def _bad(self, text: str) -> None:
        """Answer a bad command, or close if there have been too many in a row."""
        if self._bad_in_a_row >= self.max_bad_commands:
            self._reply(Err(_TOO_MANY_ERRORS, close=True))
            self._close(TOO_MANY_ERRORS)
        else:
            self._bad_in_a_row += 1
            self._reply(Err(text))

    # -- lines

    def _read_line(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n", 0, self.max_line)
        if end < 0:
            if len(buffer) < self.max_line:
                return False
            # Over the limit with no CRLF in sight: answer now, drop the rest of
            # the line unread.  The last octet is kept: it may be the CR of CRLF.
            del buffer[: self.max_line - 1]
            self._phase = _SKIP_LINE
            self._user = None
            self._bad(_LINE_TOO_LONG)
            return True
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        if self._phase == _AUTH_RESPONSE:
            self._phase = _COMMAND
            self._auth_response(line)
        else:
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

    # -- commands

    def _command(self, line: bytes) -> None:
        user, self._user = self._user, None  # PASS must come right after USER (RFC 1939 §7)
        verb, space, rest = line.partition(b" ")
        args = rest if space else None
        name = verb.decode("ascii").upper() if _KEYWORD.fullmatch(verb) else None
        spec = _COMMANDS.get(name) if name is not None else None
        if spec is None:
            self._bad(_UNKNOWN_COMMAND)
            return
        if args is not None and _CONTROL.search(args):
            self._bad(_INVALID_CHARACTERS)
            return
        if (self._state, name) not in TRANSITIONS:
            self._bad(_NOT_AUTHENTICATED if self._state == AUTHORIZATION else _ALREADY_AUTHENTICATED)
            return
        try:
            spec(self, args, user)
        except _Bad as bad:
            self._bad(bad.text)

    def _capa(self, args: bytes | None, user: str | None) -> None:
        _no_arguments(args)
        self._good()
        self._reply(MultiLine("Capability list follows", self.capabilities))

    def _user_command(self, args: bytes | None, user: str | None) -> None:
        if not self.user_command:
            raise _Bad(_USER_DISABLED)
        name = _utf8_argument(args)
        self._good()
        self._user = name
        self._reply(Ok())

    def _pass(self, args: bytes | None, user: str | None) -> None:
        if not self.user_command:
            raise _Bad(_USER_DISABLED)
        if user is None:
            raise _Bad(_SEND_USER_FIRST)
        password = _utf8_argument(args)
        self._good()
        self._events.append(UserPass(user, password))

    def _auth(self, args: bytes | None, user: str | None) -> None:
        if args is None:
            self._good()
            self._reply(MultiLine("Supported mechanisms", self.auth_mechanisms))
            return
        mechanism, space, initial = args.partition(b" ")
        if not _SASL_MECH.fullmatch(mechanism):
            raise _Bad(_INVALID_ARGUMENTS)
        if mechanism.decode("ascii").upper() not in self.auth_mechanisms:
            raise _Bad(_UNSUPPORTED_MECHANISM)
        if not space:
            self._good()
            self._phase = _AUTH_RESPONSE
            self._reply(Challenge())
            return
        if not initial or b" " in initial:
            raise _Bad(_INVALID_ARGUMENTS)
        self._plain(b"" if initial == b"=" else _base64(initial))

    def _auth_response(self, line: bytes) -> None:
        if line == b"*":
            self._bad(_AUTH_CANCELLED)
            return
        try:
            self._plain(_base64(line))
        except _Bad as bad:
            self._bad(bad.text)

    def _plain(self, message: bytes) -> None:
        """RFC 4616 §2: message = [authzid] UTF8NUL authcid UTF8NUL passwd."""
        parts = message.split(b"\x00")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise _Bad(_BAD_PLAIN)
        try:
            authzid, authcid, password = (part.decode("utf-8") for part in parts)
        except UnicodeDecodeError:
            raise _Bad(_BAD_PLAIN) from None
        self._good()
        self._events.append(AuthPlain(authzid, authcid, password))

    def _stls(self, args: bytes | None, user: str | None) -> None:
        _no_arguments(args)
        if self._tls:
            raise _Bad(_TLS_ACTIVE)
        if not self.stls_available:
            raise _Bad(_TLS_UNAVAILABLE)
        if self._buffer:
            raise _Bad(_TLS_PIPELINED)  # RFC 2595 §3.1: never take plaintext as sent inside TLS
        self._good()
        self._events.append(StartTls())

    def _utf8_command(self, args: bytes | None, user: str | None) -> None:
        _no_arguments(args)
        self._good()
        self._utf8 = True
        self._reply(Ok("UTF8 enabled"))

    def _quit(self, args: bytes | None, user: str | None) -> None:
        _no_arguments(args)
        self._good()
        if self._state == AUTHORIZATION:
            self._reply(Ok("Bye"))  # RFC 1939 §4: no UPDATE state without a login
            self._close(QUIT)
            return
        self._go("QUIT")
        self._events.append(Quit())

    def _decide(self, event: object) -> None:
        self._good()
        self._events.append(event)


_Handler = Callable[[Pop3Server, bytes | None, str | None], None]


def _maildrop_command(build: Callable[[bytes | None], object]) -> _Handler:
    """A TRANSACTION command whose event the app answers: parse the arguments, pass the event on."""

    def handler(server: Pop3Server, args: bytes | None, user: str | None) -> None:
        server._decide(build(args))

    return handler


def _no_arguments(args: bytes | None) -> None:
    if args is not None:
        raise _Bad(_INVALID_ARGUMENTS)


def _utf8_argument(args: bytes | None) -> str:
    """The rest of the line as one non-empty UTF-8 argument (USER, PASS: RFC 6856 "UTF8 USER")."""
    if not args:
        raise _Bad(_INVALID_ARGUMENTS)
    try:
        return args.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(_INVALID_ARGUMENTS) from None


def _number(arg: bytes, minimum: int, problem: str) -> int:
    """A decimal argument of at most 40 octets (RFC 2449 §4), no sign, within minimum..MAX_NUMBER."""
    if not _DIGITS.fullmatch(arg):
        raise _Bad(problem)
    value = int(arg)
    if not minimum <= value <= MAX_NUMBER:
        raise _Bad(problem)
    return value


def _msg(args: bytes | None) -> int:
    if args is None:
        raise _Bad(_INVALID_ARGUMENTS)
    return _number(args, 1, _BAD_MESSAGE_NUMBER)


def _optional_msg(args: bytes | None) -> int | None:
    return None if args is None else _msg(args)


def _top_arguments(args: bytes | None) -> Top:
    if args is None:
        raise _Bad(_INVALID_ARGUMENTS)
    msg, space, lines = args.partition(b" ")
    if not space:
        raise _Bad(_INVALID_ARGUMENTS)
    return Top(_number(msg, 1, _BAD_MESSAGE_NUMBER), _number(lines, 0, _BAD_LINE_COUNT))


def _none(event: object) -> Callable[[bytes | None], object]:
    def build(args: bytes | None) -> object:
        _no_arguments(args)
        return event

    return build


def _base64(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        raise _Bad(_BAD_BASE64) from None


def _check_limit(name: str, value: object, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# The command table: keyword -> handler(server, args, pending USER).  Which
# state allows which keyword is TRANSITIONS' business, not the handler's.
_COMMANDS: dict[str, _Handler] = {
    "CAPA": Pop3Server._capa,
    "USER": Pop3Server._user_command,
    "PASS": Pop3Server._pass,
    "AUTH": Pop3Server._auth,
    "STLS": Pop3Server._stls,
    "UTF8": Pop3Server._utf8_command,
    "QUIT": Pop3Server._quit,
    "STAT": _maildrop_command(_none(Stat())),
    "LIST": _maildrop_command(lambda args: List(_optional_msg(args))),
    "UIDL": _maildrop_command(lambda args: Uidl(_optional_msg(args))),
    "RETR": _maildrop_command(lambda args: Retr(_msg(args))),
    "TOP": _maildrop_command(_top_arguments),
    "DELE": _maildrop_command(lambda args: Dele(_msg(args))),
    "NOOP": _maildrop_command(_none(Noop())),
    "RSET": _maildrop_command(_none(Rset())),
}
