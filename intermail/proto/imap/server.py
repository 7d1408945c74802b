"""The IMAP server machine: command framing, literals, IDLE, AUTHENTICATE, and responses.

Owns the server side of one IMAP connection at the protocol layer (RFC
9051, RFC 3501): cutting the byte stream into commands (lines and the
literals between them), asking the app before a synchronizing literal is
sent, taking non-synchronizing literals (LITERAL+ / LITERAL-, RFC 7888),
the DONE that ends IDLE (RFC 2177), the client's lines of an AUTHENTICATE
exchange, the limits, and serializing the app's responses.  It does not
know mailboxes, users or session states (which commands are valid when is
:attr:`.commands.Capability.STATES` and friends, for the app to check); it
follows the contract of :mod:`intermail.proto`, and the pump drives it.

Invariants:

- A :class:`Command` is emitted only once the whole command, every literal
  included, has arrived and parsed; the app never sees half a command.
- Events depend only on the bytes received and the app's answers, never on
  how the bytes were split.
- Nothing the peer sends is buffered without bound: a command's lines are
  limited by ``max_line`` together, its literals by ``max_literal``
  together, its messages (APPEND) by ``max_append`` each and
  ``max_append_total`` together; a literal over its limit is never read
  into memory (a synchronizing one is refused before the client sends it,
  a non-synchronizing one is read and dropped).
- The bytes of a literal are never taken for commands, even when the
  command around it is refused: a refused command's non-synchronizing
  literals and continuation lines are dropped up to the command's end.
- No input makes ``next_event`` raise: every syntax error is a
  :class:`BadCommand` (``RemoteProtocolError`` is allowed by the contract
  and never needed).  ``LocalProtocolError`` from ``send`` leaves the
  machine unchanged.

Logs: nothing (no I/O here; the session that drives the machine logs).

Conversation with the app
=========================

The app sends the greeting (an :class:`Untagged` ``OK``), then loops on
``next_event`` and answers with :class:`Tagged`, :class:`Untagged` and
:class:`Continuation` responses through ``send``:

================ ==========================================================
event            the app must
================ ==========================================================
Command          carry the command out and send its responses, ending with
                 a Tagged one.  Commands may be answered in any order and
                 pipelined ones need not wait, except ``Idle`` and
                 ``Authenticate``, which need a decision first (below).
BadCommand       send ``event.response`` (tagged BAD, or ``* BAD`` when the
                 tag was unreadable); the session goes on
LiteralRequest   decide before anything else: ``send(event.accept())`` (a
                 ``+`` continuation, the client then sends the literal)
                 or a Tagged ``NO``/``BAD`` for ``event.tag`` (e.g.
                 ``event.refuse()``: ``NO [TOOBIG]``); the client then
                 abandons the command
LiteralTooBig    send ``event.response``: the machine already refused the
                 literal (over ``max_literal``/``max_append``, or over
                 4096 octets non-synchronizing under LITERAL-)
IdleDone         the client sent DONE (or, with ``error``, something else):
                 send the IDLE's tagged response (``event.response``)
AuthResponse     one client line of an AUTHENTICATE exchange, decoded;
                 ``data`` None means the client cancelled (answer BAD)
ConnectionClosed close the connection: the peer closed, LOGOUT was read
                 (send BYE and the tagged OK first), or too many bad
                 commands in a row (send ``* BYE``)
================ ==========================================================

Decisions.  Three events leave the next bytes' meaning open until the app
has answered, so ``next_event`` raises ``LocalProtocolError`` until it has
(and the machine does not look at pipelined input meanwhile):

- ``LiteralRequest``: Continuation (take the literal) or Tagged NO/BAD.
- ``Command(tag, Idle())``: Continuation (``+ idling``; the machine then
  waits for DONE) or a Tagged refusal.
- ``Command(tag, Authenticate(...))`` and each ``AuthResponse`` with data:
  Continuation (a challenge, :meth:`Continuation.challenge`; the machine
  then reads one client line) or the Tagged result of the exchange.

So the app refuses a literal it does not want *before* the client sends it
(RFC 9051, RFC 7889: ``NO [TOOBIG]`` for an APPEND over the user's
limit, or any refusal before login); every synchronizing literal comes
through the app for that reason, not only APPEND's.  Untagged responses may
be sent at any time, also while a decision is owed or during IDLE.

Literals
========

- ``{n}`` (synchronizing): :class:`LiteralRequest` first (or
  :class:`LiteralTooBig` over the limit).
- ``{n+}`` (non-synchronizing, RFC 7888): taken without asking; with
  ``literal_plus=False`` (the server announces LITERAL- instead of
  LITERAL+) one over 4096 octets is refused with ``BAD [TOOBIG]`` and its
  octets dropped (RFC 7888).  Over ``max_literal``/``max_append`` it is
  refused the same way (``NO [TOOBIG]`` for an APPEND message).
- ``~{n}`` (literal8, RFC 3516): only as APPEND data; may hold NUL, which
  no other literal may.
- ``max_literal`` counts all literals of one command together, except
  APPEND messages: those count against ``max_append`` each and
  ``max_append_total`` together (MULTIAPPEND, RFC 3502).

Errors
======

A command whose syntax is wrong becomes ``BadCommand(tag, text)``; if it
ended in a non-synchronizing literal, that literal and the rest of the
command are dropped unread.  A command longer than ``max_line`` (its lines
with their CRLFs, literals not counted) gets ``BadCommand(tag, "Command
line too long")`` as soon as the limit is passed and is dropped up to its
end.  Bad commands are counted; a good one resets the count; the bad
command after ``max_bad_commands`` in a row closes the machine with
``ConnectionClosed("too many errors")``.  An unreadable AUTHENTICATE line
is a BadCommand for the exchange's tag (which ends it); a line other than
DONE during IDLE is ``IdleDone(tag, error=...)`` (which ends the IDLE and
counts as a bad command).

LOGOUT: once ``Command(tag, Logout())`` is emitted the machine reads no
more input; the next event is ``ConnectionClosed("logout")``.

STARTTLS: after ``Command(tag, StartTls())`` the machine has not looked
past that command; :meth:`ImapServer.pending_bytes` tells the pump whether
plaintext was pipelined behind it (then the pump refuses to switch).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import re
from typing import Any

from intermail.errors import LocalProtocolError
from intermail.proto.buffered import BufferedInput
from intermail.proto.imap import commands
from intermail.proto.imap import render as _render
from intermail.proto.imap.grammar import (
    DEFAULT_MAX_DEPTH,
    LITERAL_AT_END,
    GrammarError,
    LiteralSpec,
    decode_base64,
    is_tag,
)

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_LITERAL",
    "DEFAULT_MAX_APPEND",
    "DEFAULT_MAX_BAD_COMMANDS",
    "MIN_MAX_LINE",
    "MAX_MAX_DEPTH",
    "LITERAL_MINUS_MAX",
    "PEER_CLOSED",
    "LOGOUT",
    "TOO_MANY_ERRORS",
    "Command",
    "BadCommand",
    "LiteralRequest",
    "LiteralTooBig",
    "IdleDone",
    "AuthResponse",
    "ConnectionClosed",
    "Tagged",
    "Untagged",
    "Continuation",
    "ImapServer",
]

DEFAULT_MAX_LINE = 64 * 1024  # a command's lines, CRLFs included, literals not (RFC 7162 §4 asks for >= 8192)
MIN_MAX_LINE = 64
MAX_MAX_DEPTH = 200
DEFAULT_MAX_LITERAL = 64 * 1024  # all literals of one command but APPEND messages
DEFAULT_MAX_APPEND = 32 * 1024 * 1024  # one APPEND message (advertise as APPENDLIMIT, RFC 7889)
DEFAULT_MAX_BAD_COMMANDS = 10
LITERAL_MINUS_MAX = 4096  # LITERAL- (RFC 7888)

# Reasons of ConnectionClosed
PEER_CLOSED = "peer closed"
LOGOUT = "logout"
TOO_MANY_ERRORS = "too many errors"

_STATUSES = ("OK", "NO", "BAD")
_UNTAGGED_STATUSES = ("OK", "NO", "BAD", "BYE", "PREAUTH")
_CONTROL = re.compile(r"[\r\n\x00]")
_TAIL = 32  # octets of a dropped line kept to spot a literal's size at its end


# ---------------------------------------------------------------------------
# Our responses


def _check_text(text: object, what: str, *, empty: bool = False) -> str:
    if not isinstance(text, str):
        raise LocalProtocolError(f"{what} must be a str, got {text!r}")
    if _CONTROL.search(text):
        raise LocalProtocolError(f"{what} holds CR, LF or NUL: {text!r}")
    if not text and not empty:
        raise LocalProtocolError(f"{what} must not be empty")
    return text


def _check_code(code: object) -> None:
    _check_text(code, "response code")
    assert isinstance(code, str)
    if "]" in code or code.startswith(" "):
        raise LocalProtocolError(f"response code holds ']' or starts with a space: {code!r}")


def _resp_text(text: str, code: str | None) -> str:
    """resp-text = ["[" resp-text-code "]" SP] text   (RFC 9051 §9)."""
    if code is not None:
        return f"[{code}] {text}"
    if text.startswith("["):
        raise LocalProtocolError("response text starting with '[' would read as a response code")
    return text


@dataclasses.dataclass(frozen=True)
class Tagged:
    """Ours: ``tag OK|NO|BAD [code] text`` -- the end of a command."""

    tag: str
    status: str
    text: str
    code: str | None = None

    def __post_init__(self) -> None:
        if not is_tag(self.tag):
            raise LocalProtocolError(f"not a tag: {self.tag!r}")
        if self.status not in _STATUSES:
            raise LocalProtocolError(f"tagged status must be OK, NO or BAD, got {self.status!r}")
        _check_text(self.text, "response text")
        if self.code is not None:
            _check_code(self.code)
        _resp_text(self.text, self.code)

    def encode(self) -> bytes:
        return f"{self.tag} {self.status} {_resp_text(self.text, self.code)}\r\n".encode()


@dataclasses.dataclass(frozen=True)
class Untagged:
    """Ours: ``* data``.

    ``data`` is text (``"3 EXISTS"``, ``"OK [UIDNEXT 5] Predicted"``),
    bytes from :mod:`.render` (may hold literals), or a tuple of values
    rendered by :func:`.render.values` when sent (strings then follow the
    machine's UTF-8 setting).
    """

    data: str | bytes | tuple[Any, ...]

    def __post_init__(self) -> None:
        data = self.data
        if isinstance(data, str):
            _check_text(data, "untagged data")
        elif isinstance(data, bytes):
            if not data:
                raise LocalProtocolError("untagged data must not be empty")
            _render.check_response_data(data)
        elif not isinstance(data, tuple) or not data:
            raise LocalProtocolError(f"untagged data must be str, bytes or a non-empty tuple, got {data!r}")

    @classmethod
    def status(cls, status: str, text: str, code: str | None = None) -> Untagged:
        """``* OK|NO|BAD|BYE|PREAUTH [code] text``."""
        if status not in _UNTAGGED_STATUSES:
            raise LocalProtocolError(f"untagged status must be one of {_UNTAGGED_STATUSES}, got {status!r}")
        _check_text(text, "response text")
        if code is not None:
            _check_code(code)
        return cls(f"{status} {_resp_text(text, code)}")


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Ours: ``+ text`` -- go on: send the literal, idle, or the next SASL response."""

    text: str = ""

    def __post_init__(self) -> None:
        _check_text(self.text, "continuation text", empty=True)

    @classmethod
    def challenge(cls, data: bytes) -> Continuation:
        """A SASL challenge, base64-encoded (``+ `` alone for an empty one)."""
        return cls(base64.b64encode(data).decode("ascii"))

    def encode(self) -> bytes:
        return f"+ {self.text}\r\n".encode()


# ---------------------------------------------------------------------------
# Events


@dataclasses.dataclass(frozen=True)
class Command:
    """A whole command, literals included: ``command`` is a dataclass of :mod:`.commands`."""

    tag: str
    command: Any


@dataclasses.dataclass(frozen=True)
class BadCommand:
    """A command the machine could not parse.  ``tag`` is ``"*"`` when it had none."""

    tag: str
    text: str

    @property
    def response(self) -> Tagged | Untagged:
        if self.tag == "*":
            return Untagged.status("BAD", self.text)
        return Tagged(self.tag, "BAD", self.text)


@dataclasses.dataclass(frozen=True)
class LiteralRequest:
    """The client announced a synchronizing literal and waits: the app decides (see the module docstring).

    ``name`` is the command (``APPEND``, ``LOGIN``...); ``message`` is
    True for an APPEND message, whose mailbox is then ``mailbox``.
    """

    tag: str
    name: str
    size: int
    message: bool = False
    mailbox: str | None = None
    binary: bool = False

    def accept(self, text: str = "Ready for literal data") -> Continuation:
        return Continuation(text)

    def refuse(self, text: str = "Literal too big", status: str = "NO", code: str | None = "TOOBIG") -> Tagged:
        return Tagged(self.tag, status, text, code)


@dataclasses.dataclass(frozen=True)
class LiteralTooBig:
    """The machine refused a literal over ``limit``; the command is dropped.  Send ``response``.

    ``synchronizing`` False: the client sent the octets anyway, and the
    machine is dropping them.
    """

    tag: str
    name: str
    size: int
    limit: int
    synchronizing: bool
    message: bool = False

    @property
    def response(self) -> Tagged:
        # RFC 7889 / RFC 9051 §7.1: NO [TOOBIG] for a message; BAD [TOOBIG] for any other literal
        # (RFC 7888).
        if self.message:
            return Tagged(self.tag, "NO", "Message too big", "TOOBIG")
        return Tagged(self.tag, "BAD", "Literal too big", "TOOBIG")


@dataclasses.dataclass(frozen=True)
class IdleDone:
    """The IDLE of ``tag`` is over: the client sent DONE, or (``error``) some other line."""

    tag: str
    error: str | None = None

    @property
    def response(self) -> Tagged:
        if self.error is not None:
            return Tagged(self.tag, "BAD", self.error)
        return Tagged(self.tag, "OK", "IDLE terminated")


@dataclasses.dataclass(frozen=True)
class AuthResponse:
    """One client line of the AUTHENTICATE of ``tag``, base64-decoded; None: the client sent ``*`` (cancel)."""

    tag: str
    data: bytes | None


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """Nothing more will come: ``reason`` is PEER_CLOSED, LOGOUT or TOO_MANY_ERRORS."""

    reason: str = PEER_CLOSED


# ---------------------------------------------------------------------------
# The machine

# Input phases: what the next bytes are.
_LINE = "line"  # a command line (or the line after a literal)
_LITERAL = "literal"  # a literal's octets
_WAIT = "wait"  # nothing until the app decides
_IDLE = "idle"  # the DONE that ends IDLE
_AUTH = "auth"  # a client line of AUTHENTICATE
_DISCARD_LINE = "discard line"  # the rest of a refused command's line
_DISCARD_LITERAL = "discard literal"  # a refused non-synchronizing literal
_CLOSED = "closed"

# Decisions the app owes.
_DECIDE_LITERAL = "a Continuation or a tagged NO/BAD for the literal"
_DECIDE_IDLE = "a Continuation or a tagged refusal for IDLE"
_DECIDE_AUTH = "a Continuation or the tagged result for AUTHENTICATE"


@dataclasses.dataclass(frozen=True)
class _Decision:
    kind: str
    tag: str


class ImapServer(BufferedInput):
    """The server end of one IMAP connection; see the module docstring for the rules.

    Limits: ``max_line`` (octets of one command's lines, CRLFs included,
    literals not), ``max_literal`` (octets of one command's literals
    together, APPEND messages excepted), ``max_append`` (one APPEND
    message), ``max_append_total`` (all messages of one APPEND together;
    default ``max_append``), ``max_bad_commands`` (in a row, before the
    machine closes), ``max_depth`` (nesting of search keys, at most
    :data:`MAX_MAX_DEPTH`).
    ``literal_plus``: True when the server announces LITERAL+, False for
    LITERAL-.  ``utf8``: mailbox names and quoted strings are UTF-8
    (IMAP4rev2 or ``ENABLE UTF8=ACCEPT``); settable later with the
    :attr:`utf8` property, and commands read afterwards follow it.
    """

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
        max_append: int = DEFAULT_MAX_APPEND,
        max_append_total: int | None = None,
        max_bad_commands: int = DEFAULT_MAX_BAD_COMMANDS,
        max_depth: int = DEFAULT_MAX_DEPTH,
        literal_plus: bool = True,
        utf8: bool = False,
    ):
        _check_limit("max_line", max_line, MIN_MAX_LINE)
        _check_limit("max_literal", max_literal, 0)
        _check_limit("max_append", max_append, 1)
        if max_append_total is None:
            max_append_total = max_append
        _check_limit("max_append_total", max_append_total, max_append)
        _check_limit("max_bad_commands", max_bad_commands, 0)
        _check_limit("max_depth", max_depth, 1)
        if max_depth > MAX_MAX_DEPTH:  # each level is a parser frame: stay far from the recursion limit
            raise ValueError(f"max_depth must be <= {MAX_MAX_DEPTH}, got {max_depth}")
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_append = max_append
        self.max_append_total = max_append_total
        self.max_bad_commands = max_bad_commands
        self.max_depth = max_depth
        self.literal_plus = bool(literal_plus)
        self._utf8 = bool(utf8)

        self._buffer = bytearray()
        self._eof = False
        self._events: collections.deque[object] = collections.deque()
        self._phase = _LINE
        self._close_reason = ""
        self._decision: _Decision | None = None
        self._bad_in_a_row = 0
        # the command being read
        self._parser: Any = None  # the parse generator, while a command spans literals
        self._command_tag: str | None = None
        self._line_used = 0  # octets of its lines so far
        self._literal_octets = 0  # of its literals (messages excepted)
        self._message_octets = 0  # of its APPEND messages
        self._literal_left = 0
        self._literal_data = bytearray()
        self._payload: bytes | None = None  # the literal just read, for the parser
        # refused input being dropped
        self._discard_left = 0
        self._tail = b""
        # IDLE and AUTHENTICATE in progress
        self._idle_tag: str | None = None
        self._auth_tag: str | None = None

    # -- what the app may look at and set

    @property
    def utf8(self) -> bool:
        return self._utf8

    @utf8.setter
    def utf8(self, value: bool) -> None:
        self._utf8 = bool(value)

    @property
    def phase(self) -> str:
        """What the machine reads next: ``line``, ``literal``, ``idle``, ``auth``, ``wait``, ``closed``..."""
        return self._phase

    @property
    def owed(self) -> str | None:
        """The decision the app must send before the next event, if any."""
        if self._decision is None:
            return None
        return f"{self._decision.kind} of {self._decision.tag}"

    # -- bytes in: pending_bytes and receive_data are BufferedInput's

    def _input_closed(self) -> bool:
        return self._phase == _CLOSED

    def next_event(self) -> object:
        """The next event or NEED_DATA; ``LocalProtocolError`` while the app owes a decision."""
        if self._decision is not None:
            raise LocalProtocolError(f"send {self.owed} before asking for the next event")
        event = self._next_queued(PEER_CLOSED)
        if event is None:
            return self._nothing_queued(ConnectionClosed)
        if isinstance(event, LiteralRequest):
            self._decision = _Decision(_DECIDE_LITERAL, event.tag)
        elif isinstance(event, Command) and isinstance(event.command, commands.Idle):
            self._decision = _Decision(_DECIDE_IDLE, event.tag)
        elif (isinstance(event, Command) and isinstance(event.command, commands.Authenticate)) or (
            isinstance(event, AuthResponse) and event.data is not None
        ):
            self._decision = _Decision(_DECIDE_AUTH, event.tag)
        return event

    def _step(self) -> bool:
        """Consume input for the current phase; False if nothing can be done without more bytes.

        Every True return has consumed bytes, changed phase or queued an event.
        """
        phase = self._phase
        if phase == _LINE:
            return self._read_line()
        if phase == _LITERAL:
            return self._read_literal()
        if phase == _DISCARD_LINE:
            return self._discard_line()
        if phase == _DISCARD_LITERAL:
            return self._discard_literal()
        if phase == _IDLE:
            return self._read_idle()
        if phase == _AUTH:
            return self._read_auth()
        return False  # _WAIT: unreachable, next_event checks the decision first

    # -- responses out

    def send(self, event: object) -> bytes:
        """Wire bytes for one of our responses; LocalProtocolError (machine unchanged) if not allowed now."""
        if isinstance(event, Untagged):
            data = event.data
            if isinstance(data, tuple):
                data = _render.values(data, utf8=self._utf8)
                _render.check_response_data(data)
            elif isinstance(data, str):
                data = data.encode("utf-8")
            return b"* " + data + b"\r\n"
        if isinstance(event, Tagged):
            return self._send_tagged(event)
        if isinstance(event, Continuation):
            return self._send_continuation(event)
        raise LocalProtocolError(f"not an IMAP server response: {event!r}")

    def _send_tagged(self, event: Tagged) -> bytes:
        data = event.encode()
        decision = self._decision
        if decision is not None and decision.tag == event.tag:
            if decision.kind == _DECIDE_LITERAL:
                if event.status == "OK":
                    raise LocalProtocolError("accept a literal with a Continuation; refuse it with NO or BAD")
                self._abandon_command()
            self._phase = _LINE
            self._decision = None
        elif self._phase == _IDLE and event.tag == self._idle_tag:
            raise LocalProtocolError("IDLE ends when the client sends DONE (IdleDone); answer it then")
        elif self._phase == _AUTH and event.tag == self._auth_tag:
            raise LocalProtocolError("the client's AUTHENTICATE response is awaited (AuthResponse)")
        elif self._parser is not None and event.tag == self._command_tag:
            raise LocalProtocolError(f"command {event.tag} is still being read (its literals are coming)")
        return data

    def _send_continuation(self, event: Continuation) -> bytes:
        decision = self._decision
        if decision is None:
            raise LocalProtocolError("no continuation is expected now (only after LiteralRequest, IDLE, "
                                     "AUTHENTICATE or AuthResponse)")
        data = event.encode()
        if decision.kind == _DECIDE_LITERAL:
            self._phase = _LITERAL
        elif decision.kind == _DECIDE_IDLE:
            self._phase, self._idle_tag = _IDLE, decision.tag
        else:
            self._phase, self._auth_tag = _AUTH, decision.tag
        self._decision = None
        return data

    # -- helpers

    def _close(self, reason: str) -> None:
        self._abandon_command()
        self._phase = _CLOSED
        self._close_reason = reason
        self._buffer.clear()

    def _abandon_command(self) -> None:
        """Forget the command being read (refused, finished, or its line was too long)."""
        if self._parser is not None:
            self._parser.close()
            self._parser = None
        self._command_tag = None
        self._line_used = 0
        self._literal_octets = self._message_octets = 0
        self._literal_left = 0
        self._literal_data = bytearray()
        self._payload = None

    def _good(self) -> None:
        self._bad_in_a_row = 0

    def _bad(self, event: object) -> None:
        """Emit a bad-command event, or close if there have been too many in a row."""
        if self._bad_in_a_row >= self.max_bad_commands:
            self._close(TOO_MANY_ERRORS)
        else:
            self._bad_in_a_row += 1
            self._events.append(event)

    def _read_one_line(self) -> bytes | None:
        """A line of at most max_line octets with its CRLF (IDLE, AUTHENTICATE); None: need more.

        An over-long line is dropped (DISCARD_LINE) and returned as b"\\0" --
        never a valid DONE or base64 line.
        """
        buffer = self._buffer
        end = buffer.find(b"\r\n", 0, self.max_line)
        if end < 0:
            if len(buffer) < self.max_line:
                return None
            del buffer[: self.max_line - 1]
            self._tail = b""
            return b"\x00"
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        return line

    # -- command lines

    def _read_line(self) -> bool:
        buffer = self._buffer
        budget = self.max_line - self._line_used
        end = buffer.find(b"\r\n", 0, budget)
        if end < 0:
            if len(buffer) < budget:
                return False
            # Over the limit with no CRLF in sight: answer now, drop the rest of
            # the line unread.  The last octet is kept (it may be the CR of CRLF),
            # and the end of what is dropped too (it may be a literal's size).
            # (A line after a literal may have a budget below 2: then it cannot
            # fit whatever comes, and is refused before any of it arrives.)
            tag = self._command_tag or _tag_of(buffer, budget)
            cut = max(budget - 1, 0)
            self._tail = bytes(buffer[max(0, cut - _TAIL) : cut])
            del buffer[:cut]
            self._abandon_command()
            self._phase = _DISCARD_LINE
            self._bad(BadCommand(tag, "Command line too long"))
            return True
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        self._line_used += end + 2
        return self._parse_line(line)

    def _parse_line(self, line: bytes) -> bool:
        try:
            if self._parser is None:
                self._parser = commands.parse_command(line, utf8=self._utf8, max_depth=self.max_depth)
                spec = next(self._parser)
            else:
                payload, self._payload = self._payload, None
                spec = self._parser.send((payload, line))
        except StopIteration as stop:
            self._parser = None
            self._abandon_command()
            tag, command = stop.value
            self._good()
            self._events.append(Command(tag, command))
            if isinstance(command, commands.Logout):
                self._close(LOGOUT)
            elif isinstance(command, (commands.Idle, commands.Authenticate)):
                self._phase = _WAIT
            return True
        except GrammarError as exc:
            self._parser = None
            self._abandon_command()
            self._drop_rest_of_command(line)
            self._bad(BadCommand(exc.tag or "*", exc.text))
            return True
        self._command_tag = spec.tag
        return self._literal_announced(spec)

    def _drop_rest_of_command(self, line: bytes) -> None:
        """After a refused line: if it announced a non-synchronizing literal, drop it and what follows."""
        marker = LITERAL_AT_END.search(line)
        if marker is not None and marker.group(3):
            self._discard_left = int(marker.group(2))
            self._phase = _DISCARD_LITERAL
        # A synchronizing literal is never sent: our BAD is the client's answer.

    def _literal_announced(self, spec: LiteralSpec) -> bool:
        size = spec.size
        if spec.message:
            limit = min(self.max_append, self.max_append_total - self._message_octets)
        else:
            limit = self.max_literal - self._literal_octets
        if not spec.synchronizing and not self.literal_plus and size > LITERAL_MINUS_MAX:
            limit = min(limit, LITERAL_MINUS_MAX)
        if size > limit:
            self._abandon_command()
            if spec.synchronizing:
                self._phase = _LINE  # the client waits for our answer and abandons the command
            else:
                self._discard_left = size
                self._phase = _DISCARD_LITERAL
            self._events.append(LiteralTooBig(spec.tag, spec.name, size, limit, spec.synchronizing, spec.message))
            return True
        if spec.message:
            self._message_octets += size
        else:
            self._literal_octets += size
        self._literal_left = size
        if spec.synchronizing:
            self._phase = _WAIT
            self._events.append(LiteralRequest(spec.tag, spec.name, size, spec.message, spec.mailbox, spec.binary))
        else:
            self._phase = _LITERAL
        return True

    def _read_literal(self) -> bool:
        buffer, left = self._buffer, self._literal_left
        if left and not buffer:
            return False
        if not self._literal_data and len(buffer) >= left:
            self._payload = bytes(buffer[:left])  # all here: one copy
            del buffer[:left]
        else:
            take = min(left, len(buffer))
            self._literal_data += buffer[:take]
            del buffer[:take]
            self._literal_left = left = left - take
            if left:
                return True
            self._payload = bytes(self._literal_data)
            self._literal_data = bytearray()
        self._literal_left = 0
        self._phase = _LINE
        return True

    # -- refused input

    def _discard_literal(self) -> bool:
        take = min(self._discard_left, len(self._buffer))
        if take == 0 and self._discard_left:
            return False
        del self._buffer[:take]
        self._discard_left -= take
        if not self._discard_left:
            self._tail = b""
            self._phase = _DISCARD_LINE
        return True

    def _discard_line(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if end >= 0:
            tail = (self._tail + bytes(buffer[max(0, end - _TAIL) : end]))[-_TAIL:]
            del buffer[: end + 2]
            self._tail = b""
            self._line_used = 0
            self._phase = _LINE
            self._drop_rest_of_command(tail)
            return True
        keep = 1 if buffer.endswith(b"\r") else 0
        if len(buffer) <= keep:
            return False
        cut = len(buffer) - keep
        self._tail = (self._tail + bytes(buffer[max(0, cut - _TAIL) : cut]))[-_TAIL:]
        del buffer[:cut]
        return True

    # -- IDLE and AUTHENTICATE

    def _read_idle(self) -> bool:
        line = self._read_one_line()
        if line is None:
            return False
        tag = self._idle_tag
        assert tag is not None
        self._idle_tag = None
        self._phase = _DISCARD_LINE if line == b"\x00" else _LINE
        if line.upper() == b"DONE":
            self._good()
            self._events.append(IdleDone(tag))
        else:
            self._bad(IdleDone(tag, "Expected DONE"))
        return True

    def _read_auth(self) -> bool:
        line = self._read_one_line()
        if line is None:
            return False
        tag = self._auth_tag
        assert tag is not None
        self._auth_tag = None
        if line == b"\x00":
            self._phase = _DISCARD_LINE
            self._bad(BadCommand(tag, "SASL response too long"))
            return True
        if line == b"*":  # RFC 9051 §6.2.2: the client cancels; the answer is BAD
            self._phase = _LINE
            self._events.append(AuthResponse(tag, None))
            return True
        try:
            data = decode_base64(line)
        except GrammarError as exc:
            self._phase = _LINE
            self._bad(BadCommand(tag, exc.text))
            return True
        self._phase = _WAIT
        self._events.append(AuthResponse(tag, data))
        return True


def _tag_of(buffer: bytearray, end: int) -> str:
    """The tag at the start of an over-long command line, or ``"*"``.

    Only the first ``end`` octets (the line's budget) are looked at: what
    follows may or may not have arrived yet.
    """
    space = buffer.find(b" ", 0, min(end, 256))
    if space > 0:
        candidate = bytes(buffer[:space]).decode("latin-1")
        if is_tag(candidate):
            return candidate
    return "*"


def _check_limit(name: str, value: object, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
