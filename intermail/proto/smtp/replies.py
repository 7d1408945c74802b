"""SMTP/LMTP replies: the Reply value, its wire form, the standard replies, the error table.

Owns: what a reply looks like on the wire (RFC 5321 §4.2), with enhanced
status codes (RFC 3463, RFC 2034), and the one table that turns an
:class:`~intermail.errors.ErrorKind` into an SMTP/LMTP reply
(:func:`reply_for_error`), so that every front end refuses the same failure
with the same code and only ever shows the client the *safe* text.

Invariants:

- A :class:`Reply` that exists is sendable: the code, the enhanced code and
  every line are checked when it is built (``LocalProtocolError``: building
  a bad reply is our own code's fault), so ``encode()`` cannot fail.
- ``parse_reply(r.encode()) == r`` for every reply whose first text line
  does not itself start with something shaped like an enhanced code (the
  wire form cannot tell those apart); the tests check it with hypothesis.
- The enhanced code, when present, is repeated on every line of a
  multi-line reply (what RFC 2034 §3 asks of servers that announce
  ENHANCEDSTATUSCODES).

Logs: nothing.
"""

from __future__ import annotations

import dataclasses
import re

from intermail.errors import ErrorKind, LocalProtocolError, MailError, RemoteProtocolError

__all__ = [
    "MAX_REPLY_LINE",
    "Reply",
    "parse_reply",
    "reply_for_error",
    "chunk_received",
    "ERROR_REPLIES",
    "GREETING_CODE",
    "OK", "SENDER_OK", "RECIPIENT_OK", "DELIVERED", "CLOSING", "HELP", "CANNOT_VRFY", "START_DATA",
    "UNKNOWN_COMMAND", "USE_LHLO", "LINE_TOO_LONG", "BARE_LINE_END_IN_COMMAND", "SYNTAX_ERROR",
    "INVALID_ARGUMENTS", "BAD_SENDER_SYNTAX", "BAD_RECIPIENT_SYNTAX", "BAD_SEQUENCE", "NON_ASCII_ADDRESS",
    "UNKNOWN_PARAMETER", "TOO_MANY_RECIPIENTS", "MESSAGE_TOO_BIG", "BARE_LINE_END_IN_MESSAGE",
    "TOO_MANY_ERRORS", "SHUTTING_DOWN",
]

MAX_REPLY_LINE = 512  # octets including the code and CRLF, RFC 5321 §4.5.3.1.5

# RFC 5321 §4.2
#   Reply-line = *( Reply-code "-" [ textstring ] CRLF )
#                Reply-code [ SP textstring ] CRLF
#   Reply-code = %x32-35 %x30-35 %x30-39
#   textstring = 1*(%d09 / %d32-126) ; HT, SP, Printable US-ASCII
# Our text may also carry UTF-8 (an SMTPUTF8 address quoted back to the
# client); control characters other than HT never.
_REPLY_CODE = re.compile(r"[2-5][0-5][0-9]")
_BAD_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# RFC 3463 §2
#   status-code = class "." subject "." detail
#   class       = "2" / "4" / "5"
#   subject     = 1*3digit
#   detail      = 1*3digit
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")

# One wire line: code, separator, rest (RFC 5321 §4.2 as above).
_WIRE_LINE = re.compile(rb"([2-5][0-5][0-9])([- ]?)(.*)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Reply:
    """One reply: ``code`` (e.g. 250), ``enhanced`` (e.g. ``"2.1.5"``, or None), text lines.

    ``lines`` may be given as a single string; it is stored as a tuple.
    ``Reply(250, "2.0.0", "Ok")`` is ``250 2.0.0 Ok``;
    ``Reply(250, None, ("mss1", "PIPELINING"))`` is ``250-mss1`` / ``250 PIPELINING``.
    """

    code: int
    enhanced: str | None = None
    lines: tuple[str, ...] = ("",)

    def __post_init__(self) -> None:
        lines = self.lines
        if isinstance(lines, str):
            lines = (lines,)
            object.__setattr__(self, "lines", lines)
        code, enhanced = self.code, self.enhanced
        if type(code) is not int or not _REPLY_CODE.fullmatch(str(code)):
            raise LocalProtocolError(f"reply code must be an integer 200..559 (RFC 5321 §4.2), got {code!r}")
        if enhanced is not None:
            if not isinstance(enhanced, str) or not _ENHANCED.fullmatch(enhanced):
                raise LocalProtocolError(f"enhanced status code must look like 2.1.5 (RFC 3463), got {enhanced!r}")
            if enhanced[0] != str(code)[0]:
                raise LocalProtocolError(f"enhanced status code {enhanced} does not match reply code {code}")
        if not isinstance(lines, tuple) or not lines:
            raise LocalProtocolError("a reply needs at least one line of text (may be empty)")
        for line in lines:
            if not isinstance(line, str):
                raise LocalProtocolError(f"reply text must be str, got {type(line).__name__}")
            if _BAD_TEXT.search(line):
                raise LocalProtocolError(f"reply text contains a control character: {line[:60]!r}")
            if len(_wire_line(code, "-", enhanced, line)) > MAX_REPLY_LINE:
                raise LocalProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets: {line[:60]!r}...")

    @property
    def accepted(self) -> bool:
        """2xx: the command succeeded (for RCPT: the recipient is accepted)."""
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        """4xx: a temporary failure; the client may retry."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """5xx: a permanent failure."""
        return self.code >= 500

    @property
    def text(self) -> str:
        """All text lines, joined with newlines (for logs)."""
        return "\n".join(self.lines)

    def encode(self) -> bytes:
        """The wire form: one CRLF-terminated line per text line, ``-`` on all but the last."""
        last = len(self.lines) - 1
        return b"".join(
            _wire_line(self.code, "-" if i < last else " ", self.enhanced, line)
            for i, line in enumerate(self.lines)
        )

    def __str__(self) -> str:
        return self.encode().decode("utf-8").replace("\r\n", " | ").removesuffix(" | ")


def _wire_line(code: int, separator: str, enhanced: str | None, line: str) -> bytes:
    body = f"{enhanced} {line}" if enhanced and line else (enhanced or line)
    if separator == " " and not body:
        return f"{code}\r\n".encode()
    return f"{code}{separator}{body}\r\n".encode("utf-8")


def parse_reply(data: bytes) -> Reply:
    """The one complete reply in ``data`` (all its lines, each ending in CRLF).

    The enhanced code is recognised when every line starts with the same
    one and its class matches the reply code (RFC 3463 §2); otherwise the
    text is taken as it is.  Raises RemoteProtocolError on anything else.
    """
    if not data.endswith(b"\r\n"):
        raise RemoteProtocolError("a reply must end in CRLF")
    raw_lines = data[:-2].split(b"\r\n")
    code: bytes | None = None
    texts: list[str] = []
    for index, raw in enumerate(raw_lines):
        match = _WIRE_LINE.fullmatch(raw)
        if match is None:
            raise RemoteProtocolError(f"malformed reply line {raw[:40]!r}")
        if code is not None and match.group(1) != code:
            raise RemoteProtocolError("reply lines with different codes")
        code = match.group(1)
        separator, rest = match.group(2), match.group(3)
        if index < len(raw_lines) - 1:
            well_formed = separator == b"-"
        else:
            well_formed = separator == b" " or not (separator or rest)
        if not well_formed:
            raise RemoteProtocolError(f"bad continuation marker in reply line {raw[:40]!r}")
        try:
            texts.append(rest.decode("utf-8"))
        except UnicodeDecodeError:
            raise RemoteProtocolError("reply text is not valid UTF-8") from None
    assert code is not None  # data[:-2].split() yields at least one line
    enhanced = _common_enhanced(code.decode(), texts)
    if enhanced is not None:
        texts = [text[len(enhanced) + 1 :] for text in texts]
    try:
        return Reply(int(code), enhanced, tuple(texts))
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid reply: {exc.text}") from None


def _common_enhanced(code: str, texts: list[str]) -> str | None:
    first, _, _ = texts[0].partition(" ")
    if not _ENHANCED.fullmatch(first) or first[0] != code[0]:
        return None
    for text in texts:
        if text != first and not text.startswith(first + " "):
            return None
    return first


# ---------------------------------------------------------------------------
# Standard replies (the machine's own, and common ones for the app)

GREETING_CODE = 220

OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
DELIVERED = Reply(250, "2.0.0", "Delivered")
CLOSING = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "Commands: LHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP")
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")

UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
USE_LHLO = Reply(500, "5.5.1", "This is LMTP: use LHLO (RFC 2033)")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
BARE_LINE_END_IN_COMMAND = Reply(500, "5.5.2", "Syntax error: bare CR or LF in command line")
SYNTAX_ERROR = Reply(501, "5.5.2", "Syntax error")
INVALID_ARGUMENTS = Reply(501, "5.5.4", "Invalid command arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")

TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_END_IN_MESSAGE = Reply(554, "5.6.0", "Message contains bare CR or LF")

TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")


def chunk_received(total: int) -> Reply:
    """The reply to a BDAT chunk that is not the last (RFC 3030 §2)."""
    return Reply(250, "2.0.0", f"{total} octets received")


# ---------------------------------------------------------------------------
# ErrorKind -> reply: the one SMTP/LMTP row of the error taxonomy (STYLE.md 8).
# Temporary kinds map to 4xx so that the MTA retries (FENCED: the store moved
# to its spare, the retry reaches the new owner).  The text is always the
# error's safe text, never its detail.  A duplicate delivery (I-4) is not an
# error: the app answers it with a 2xx reply itself.

ERROR_REPLIES: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.TEMP: (451, "4.3.0"),
    ErrorKind.UNAVAILABLE: (451, "4.3.0"),
    ErrorKind.NOTFOUND: (550, "5.1.1"),
    ErrorKind.EXISTS: (550, "5.0.0"),
    ErrorKind.PERM: (550, "5.0.0"),
    ErrorKind.NOQUOTA: (552, "5.2.2"),
    ErrorKind.LIMIT: (451, "4.3.0"),
    ErrorKind.INVALID: (501, "5.5.4"),
    ErrorKind.FENCED: (451, "4.3.0"),
    ErrorKind.CORRUPT: (451, "4.3.0"),
}


def reply_for_error(error: MailError) -> Reply:
    """The reply that refuses a command (or one recipient) because of ``error``."""
    code, enhanced = ERROR_REPLIES[error.kind]
    return Reply(code, enhanced, error.safe)
