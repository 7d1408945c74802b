"""Delivery status notifications: the bounce, delay or success notice an MTA sends back.

Owns the bytes of a DSN.  :func:`build_dsn` turns the outcome of one queue
entry (a :class:`FailedRecipient` per recipient reported on), the original
message and the envelope's RFC 3461 parameters into a complete message, ready
to be queued to the envelope sender with a null reverse-path:

- ``multipart/report; report-type=delivery-status`` (RFC 6522 §3) with three
  parts: a ``text/plain`` explanation for people; a
  ``message/delivery-status`` report (RFC 3464 §2, status codes RFC 3463);
  and the original as ``message/rfc822``, or only its header block as
  ``text/rfc822-headers`` (RFC 6522 §4);
- the internationalized form (RFC 6533) when the original was sent with
  SMTPUTF8 (``smtputf8=True``) or the sender's address is not ASCII (such a
  DSN can only be delivered over SMTPUTF8 anyway): ``report-type=
  global-delivery-status``, ``message/global-delivery-status`` with UTF-8
  addresses (``utf-8;`` address type, §3) and diagnostics, and
  ``message/global`` (RFC 6532 §3.7) or ``message/global-headers`` (RFC 6533
  §6.3) for the returned copy.

Decisions (RFC 3461, RFC 5321):

- Never bounce a bounce: a null reverse-path sender (``""``, or ``"<>"``)
  gets no DSN (RFC 5321 §4.5.5, §6.1): :func:`build_dsn` returns ``None``.
- NOTIFY (RFC 3461 §4.1) filters recipients: "failed" is reported under
  FAILURE, "delayed" under DELAY, "delivered", "relayed" and "expanded" under
  SUCCESS; NEVER reports nothing.  Without NOTIFY the default is
  FAILURE,DELAY.  No recipient left: ``None``.
- RET (RFC 3461 §4.3) applies to failure reports: a DSN that reports no
  "failed" recipient returns the header block only.  Otherwise HDRS returns the
  header block, FULL or no RET the whole message, provided it is returnable
  intact: at most ``max_returned`` octets (RET=FULL too: a size limit protects
  the sender's mailbox and ours against amplification), no NUL and no line
  over 998 octets (RFC 5322 §2.1.1).  If not, the header block is returned.
- The returned copy has its line ends made CRLF (bare CR and bare LF become
  CRLF), as SMTP carries them.  The header block is the original's lines up to
  the first empty line, or up to the first line that is neither a header field
  nor a continuation (Python's ``email`` does the same), or the whole message
  when it has no body.  A header-only copy drops NUL octets, breaks a line
  over 998 octets with CRLF SP, and keeps whole fields within
  ``max_returned`` octets.

Invariants:

- Every line of the output ends with CRLF and holds at most 998 octets.
  Header fields, at the top and in the report, are folded at spaces to at
  most 78 octets a line where a space allows it; a word that cannot fit one
  998-octet line is cut with CRLF SP (so unfolding adds a space there: this
  only happens to diagnostics longer than any reply line, or to absurd
  ORCPT values).
- 7-bit headers: outside the internationalized form, the top-level header and
  the report are US-ASCII.  Non-ASCII recipient addresses are written with
  the ``utf-8`` address type in the 7-bit ``utf-8-addr-xtext`` form (RFC 6533
  §3: each non-ASCII character, and ``\\ + =`` and controls, as
  ``\\x{HEX}``); non-ASCII in a diagnostic is written the same way.  The
  explanation is UTF-8 quoted-printable when it is not ASCII.
- 8-bit content is labelled, not hidden: a returned copy holding octets over
  127 is sent as is with ``Content-Transfer-Encoding: 8bit``, and so is the
  whole ``multipart/report`` (RFC 2045 §6.4).  Such a DSN needs BODY=8BITMIME
  (an internationalized one SMTPUTF8) to travel, as the original did.
- The MIME boundary occurs nowhere in the content of any part.
- Deterministic: the same arguments, including ``now`` and ``seed``, give the
  same bytes.  Without a seed, the boundary and the Message-ID are random.
- Nothing escapes but ``MailError(INVALID)``, and only for an argument that
  breaks its documented contract (an unknown action or RET, a status that is
  not RFC 3463 syntax, an address with control characters...).  Text from
  remote servers (diagnostics, remote MTA names) and the original's bytes
  never make it fail: they are cleaned, escaped, cut, or not returned.

Limitations: the internationalized form is chosen by the caller's flag, not
guessed from 8-bit header bytes; it does not downgrade itself for a 7-bit
path (RFC 6533 §6 allows base64 or quoted-printable for that).  Returned
8-bit content is not re-encoded for a path without 8BITMIME.

Logs: nothing; the queue logs the DSN it enqueues, with the queue id.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import math
import re
import secrets
import textwrap
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from intermail.errors import ErrorKind, MailError

__all__ = [
    "FailedRecipient",
    "build_dsn",
    "ACTIONS",
    "NOTIFY_WORDS",
    "DEFAULT_NOTIFY",
    "MAX_RETURNED",
    "MAX_DIAGNOSTIC",
    "MAX_ADDRESS",
    "MAX_ORCPT",
    "MAX_ENVID",
]

MAX_RETURNED = 256 * 1024  # octets of the original returned in a DSN
MAX_DIAGNOSTIC = 2000  # characters of one diagnostic kept (after cleaning)
MAX_ADDRESS = 256  # octets of an address: RFC 5321 §4.5.3.1.3 path limit
MAX_ORCPT = 500  # characters of ORCPT: RFC 3461 §4.2
MAX_ENVID = 100  # characters of ENVID: RFC 3461 §4.4

LINE_LIMIT = 998  # octets a line, CRLF excluded: RFC 5322 §2.1.1
FOLD_WIDTH = 78  # octets a header line should stay within: RFC 5322 §2.1.1
TEXT_WIDTH = 76  # columns of the explanation

# RFC 3464 §2.3.3: action-value = "failed" / "delayed" / "delivered" / "relayed" / "expanded"
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
# RFC 3461 §4.1: "NOTIFY=" ("NEVER" / 1#notify-list-element); element = "SUCCESS" / "FAILURE" / "DELAY"
NOTIFY_WORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})
_NOTIFY_FOR_ACTION = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}
_SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})

# RFC 3463 §2: status-code = class "." subject "." detail
#   class = "2" / "4" / "5";  subject = 1*3digit;  detail = 1*3digit
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# RFC 5322 §3.2.3: atext = ALPHA / DIGIT / "!" / "#" / ... ; atom = 1*atext
# (RFC 3461 §4.2 addr-type and RFC 3464 §2.1.2 diagnostic-type are atoms)
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# RFC 3464 §2.3.6: diagnostic-code-field = "Diagnostic-Code" ":" diagnostic-type ";" *text
_TYPED_TEXT = re.compile(r"\s*([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)\s*;\s*(.*)", re.DOTALL)
# RFC 1035 §2.3.1 host names (letter-digit-hyphen labels), or an RFC 5321 §4.1.3 address literal
_HOST = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[A-Za-z0-9:.]{1,60}\]"
)
# The left part of a Message-ID must be dot-atom-text (RFC 5322 §3.6.4); ours are plain ids.
_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# RFC 5322 §3.6.8: ftext = %d33-57 / %d59-126; obs-optional allows WSP before the colon
_FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_WORDS = re.compile(r"( *)([^ ]+)")
# RFC 6533 §3: EmbeddedUnicodeChar = %x5C.78 "{" HEXPOINT "}"
_EMBEDDED_CHAR = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
# Characters that may not appear literally in one line of header text
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


# ---------------------------------------------------------------------------
# The data model


def _invalid(detail: str) -> MailError:
    return MailError(ErrorKind.INVALID, detail=detail)


def _has_bad_chars(text: str) -> bool:
    return any(unicodedata.category(ch) in _BAD_CATEGORIES for ch in text)


def _check_address(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid(f"{what} must be a non-empty string")
    if _has_bad_chars(value):
        raise _invalid(f"{what} holds control characters: {value!r}")
    if len(value.encode("utf-8")) > MAX_ADDRESS:
        raise _invalid(f"{what} is longer than {MAX_ADDRESS} octets")
    return value


def _check_time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"{what} must be a finite POSIX timestamp, not {value!r}")
    try:
        datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise _invalid(f"{what} is out of range: {value!r}") from exc
    return float(value)


@dataclass(frozen=True)
class FailedRecipient:
    """What happened to one recipient, as a DSN reports it (RFC 3464 §2.3).

    ``status`` is an RFC 3463 code (``"5.1.1"``); ``diagnostic`` is the
    remote or local text, ideally typed (``"smtp; 550 5.1.1 No such user"``;
    untyped text is reported as ``X-Intermail;``), and may be empty.
    ``original_recipient`` is the xtext-decoded ORCPT (``"rfc822;x@y"``, RFC
    3461 §4.2).  ``notify`` is the RCPT NOTIFY list (RFC 3461 §4.1), ``None``
    when the client gave none.  Times are POSIX timestamps.  Construction
    checks the contract and normalises the case of ``action`` and ``notify``;
    it raises ``MailError(INVALID)``.
    """

    address: str
    status: str
    diagnostic: str
    action: str = "failed"
    original_recipient: str | None = None
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None
    notify: frozenset[str] | None = None

    def __post_init__(self) -> None:
        _check_address(self.address, "recipient address")
        if not isinstance(self.status, str) or not _STATUS.fullmatch(self.status):
            raise _invalid(f"status is not an RFC 3463 code: {self.status!r}")
        if not isinstance(self.diagnostic, str):
            raise _invalid("diagnostic must be a string")
        if not isinstance(self.action, str) or self.action.lower() not in ACTIONS:
            raise _invalid(f"action must be one of {ACTIONS}, not {self.action!r}")
        object.__setattr__(self, "action", self.action.lower())
        if self.original_recipient is not None:
            _split_orcpt(self.original_recipient)
        if self.remote_mta is not None and not isinstance(self.remote_mta, str):
            raise _invalid("remote_mta must be a string")
        for name in ("last_attempt", "will_retry_until"):
            value = getattr(self, name)
            if value is not None:
                _check_time(value, name)
        if self.notify is not None:
            object.__setattr__(self, "notify", _check_notify(self.notify))

    def wanted(self) -> bool:
        """True when the recipient's NOTIFY asks for a DSN with this action."""
        notify = DEFAULT_NOTIFY if self.notify is None else self.notify
        return _NOTIFY_FOR_ACTION[self.action] in notify


def _check_notify(value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, (set, frozenset, list, tuple)):
        raise _invalid(f"notify must be a set of words, not {value!r}")
    words = set()
    for word in value:
        if not isinstance(word, str) or word.upper() not in NOTIFY_WORDS:
            raise _invalid(f"unknown NOTIFY word {word!r}")
        words.add(word.upper())
    # RFC 3461 §4.1: NEVER stands alone; a list has at least one element.
    if not words or ("NEVER" in words and len(words) > 1):
        raise _invalid(f"NOTIFY must be NEVER alone or a non-empty list: {sorted(words)}")
    return frozenset(words)


def _split_orcpt(value: object) -> tuple[str, str]:
    """``"rfc822;x@y"`` -> ``("rfc822", "x@y")``: RFC 3461 §4.2 orcpt-parameter, decoded."""
    if not isinstance(value, str) or len(value) > MAX_ORCPT:
        raise _invalid(f"original_recipient must be a string of at most {MAX_ORCPT} characters")
    addr_type, sep, address = value.partition(";")
    addr_type, address = addr_type.strip(), address.strip()
    if not sep or not _ATOM.fullmatch(addr_type) or not address or _has_bad_chars(address):
        raise _invalid(f"original_recipient is not addr-type;address: {value!r}")
    return addr_type, address


# ---------------------------------------------------------------------------
# Text cleaning and header folding


def _clean_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category == "Cs":
        return "\ufffd"  # a lone surrogate has no UTF-8 form
    return " " if category in _BAD_CATEGORIES else ch


def _one_line(text: str, limit: int | None = None) -> str:
    """Remote text as one line: controls and line breaks become spaces, runs of space one space."""
    text = " ".join("".join(map(_clean_char, text)).split())
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)].rstrip() + "..."
    return text


def _hexpoint(ch: str) -> str:
    # RFC 6533 §3: EmbeddedUnicodeChar = %x5C.78 "{" HEXPOINT "}"; upper case, at least 2 digits
    return f"\\x{{{ord(ch):02X}}}"


def _escape_non_ascii(text: str) -> str:
    """Non-ASCII characters as ``\\x{HEX}`` (RFC 6533 notation), for 7-bit report fields."""
    return "".join(ch if ord(ch) < 0x80 else _hexpoint(ch) for ch in text)


def _utf8_addr(address: str, *, seven_bit: bool) -> str:
    """RFC 6533 §3: utf-8-addr-xtext (7-bit) or utf-8-addr-unitext.

    QCHAR = %x21-2a / %x2c-3c / %x3e-5b / %x5d-7e  (printable ASCII but SP, "+", "=", "\\")
    QUCHAR = QCHAR / UTF8-2 / UTF8-3 / UTF8-4
    """
    out = []
    for ch in address:
        code = ord(ch)
        literal = (0x21 <= code <= 0x7E and ch not in "+=\\") or (code >= 0x80 and not seven_bit)
        out.append(ch if literal else _hexpoint(ch))
    return "".join(out)


def _typed_address(address: str, *, seven_bit: bool) -> str:
    """An address as an RFC 3464 §2.3.2 Final-Recipient value."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr(address, seven_bit=seven_bit)}"


def _unescape_utf8_addr(text: str) -> str:
    """A utf-8 address in any RFC 6533 §3 form back to plain Unicode (``\\x{HEX}`` decoded)."""
    def decode(match: re.Match[str]) -> str:
        code = int(match.group(1), 16)
        valid = code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF
        return chr(code) if valid else match.group(0)

    return _EMBEDDED_CHAR.sub(decode, text)


def _orcpt_address(value: str) -> tuple[str, str]:
    """The decoded ORCPT's type and its address, utf-8 addresses unescaped."""
    addr_type, address = _split_orcpt(value)
    if addr_type.lower() == "utf-8":
        address = _unescape_utf8_addr(address)
    return addr_type, address


def _typed_orcpt(value: str, *, seven_bit: bool) -> str:
    """The decoded ORCPT as an RFC 3464 §2.3.1 Original-Recipient value.

    An ASCII address keeps the client's type and spelling; a utf-8 one (or a
    non-ASCII address under another type) is written as utf-8-addr-xtext in
    a 7-bit report, utf-8-addr-unitext in a global one (RFC 6533 §3).
    """
    addr_type, address = _orcpt_address(value)
    if addr_type.lower() != "utf-8" and address.isascii():
        return f"{addr_type};{address}"
    return f"utf-8;{_utf8_addr(address, seven_bit=seven_bit)}"


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _chunks(word: str, size: int) -> list[str]:
    """Cut ``word`` into pieces of at most ``size`` UTF-8 octets, on character boundaries."""
    pieces, current, used = [], [], 0
    for ch in word:
        width = _octets(ch)
        if current and used + width > size:
            pieces.append("".join(current))
            current, used = [], 0
        current.append(ch)
        used += width
    pieces.append("".join(current))
    return pieces


def _field(name: str, value: str) -> str:
    """``Name: value`` CRLF, folded before runs of spaces (RFC 5322 §2.2.3).

    ``value`` is one line.  Unfolding gives it back, except where a word too
    long for one 998-octet line had to be cut.  Lines stay within 78 octets
    where a space allows.
    """
    hard = LINE_LIMIT - len(name) - 2  # room for one word on the field's first line
    lines: list[str] = []
    current, has_word = f"{name}:", False
    for spaces, word in _WORDS.findall(value):
        # Runs of spaces only survive inside quoted address parts, far shorter than this.
        lead = spaces[: LINE_LIMIT // 2] if has_word else " "
        for index, piece in enumerate(_chunks(word, hard - len(lead))):
            addition = (lead if index == 0 else " ") + piece
            if has_word and _octets(current) + _octets(addition) > FOLD_WIDTH:
                lines.append(current)
                current = addition  # starts with a space: a continuation line
            else:
                current += addition
            has_word = True
    lines.append(current)
    return "".join(line + "\r\n" for line in lines)


def _date(timestamp: float) -> str:
    """RFC 5322 §3.3 date-time, in UTC."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


# ---------------------------------------------------------------------------
# The returned original


def _normalise(data: bytes) -> bytes:
    return _LINE_END.sub(b"\r\n", data)


def _header_lines(lines: list[bytes]) -> list[bytes]:
    """The lines of the header block: up to an empty line or a line that is no field."""
    block: list[bytes] = []
    for line in lines:
        if not line:
            break
        if _FIELD_LINE.match(line) or (block and line[:1] in (b" ", b"\t")):
            block.append(line)
        else:
            break
    return block


def _safe_header_line(line: bytes) -> bytes:
    line = line.replace(b"\0", b"")
    if len(line) <= LINE_LIMIT:
        return line + b"\r\n"
    # Keep every line within the limit: the rest continues as a folded line.
    pieces = [line[:LINE_LIMIT]]
    pieces += [b" " + line[i:i + LINE_LIMIT - 1] for i in range(LINE_LIMIT, len(line), LINE_LIMIT - 1)]
    return b"".join(piece + b"\r\n" for piece in pieces)


def _header_block(original: bytes, budget: int) -> bytes:
    """The original's header fields (CRLF, no NUL, lines <= 998), whole fields within ``budget``.

    Only a prefix of the original is read: a huge message costs no more than
    a small one.
    """
    window = original[: budget + LINE_LIMIT + 2]
    lines = _normalise(window).split(b"\r\n")
    # The last piece is "" after a line end, else a line without its end: that
    # line is complete only when the window holds the whole original.
    last = lines.pop()
    if last and len(window) == len(original):
        lines.append(last)
    fields: list[bytes] = []
    for line in _header_lines(lines):
        safe = _safe_header_line(line)
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += safe
        else:
            fields.append(safe)
    out, used = [], 0
    for field in fields:
        if used + len(field) > budget:
            break
        out.append(field)
        used += len(field)
    return b"".join(out)


def _returnable(original: bytes, max_returned: int) -> tuple[bytes | None, str]:
    """The whole original with CRLF line ends, or None and why it cannot go back intact."""
    if len(original) > max_returned:
        return None, "size"
    data = _normalise(original)
    if len(data) > max_returned:
        return None, "size"
    if b"\0" in data or any(len(line) > LINE_LIMIT for line in data.split(b"\r\n")):
        return None, "unsafe"
    return data, "full"


# ---------------------------------------------------------------------------
# The three parts


def _explanation(
    *,
    reporting_mta: str,
    reported: Sequence[FailedRecipient],
    returned: str,
    max_returned: int,
    max_diagnostic: int,
) -> str:
    """The human-readable first part, as text with LF line ends."""
    groups = (
        (("failed",), (
            "Your message could not be delivered to the recipients below. "
            "The mail system gave up; the reasons are given with each address."
        )),
        (("delayed",), (
            "Your message has not yet been delivered to the recipients below. "
            "The mail system will keep trying until the time shown; "
            "you do not need to send it again."
        )),
        (tuple(sorted(_SUCCESS_ACTIONS)), (
            "Your message was delivered or passed on to the recipients below, "
            "as you asked to be told."
        )),
    )
    out = [f"This is the mail delivery system at {reporting_mta}.", ""]
    for actions, intro in groups:
        members = [r for r in reported if r.action in actions]
        if not members:
            continue
        out += textwrap.wrap(intro, TEXT_WIDTH) + [""]
        for rcpt in members:
            out += _explain_recipient(rcpt, max_diagnostic)
            out.append("")
    notes = {
        "full": "Your message is attached below.",
        "hdrs": "The header of your message is attached below.",
        "size": f"Your message is larger than {max_returned} octets, "
        "so only its header is attached below.",
        "unsafe": "Your message cannot be sent back as it is (it holds NUL octets or "
        "overlong lines), so only its header is attached below.",
    }
    out += textwrap.wrap(notes[returned], TEXT_WIDTH)
    return "\n".join(out) + "\n"


def _explain_recipient(rcpt: FailedRecipient, max_diagnostic: int) -> list[str]:
    def item(label: str, text: str) -> list[str]:
        return textwrap.wrap(
            f"{label}: {text}", TEXT_WIDTH, initial_indent="    ", subsequent_indent="        ",
            break_on_hyphens=False,
        )

    lines = textwrap.wrap(f"<{rcpt.address}>", TEXT_WIDTH, break_on_hyphens=False)
    if rcpt.original_recipient is not None:
        orcpt = _one_line(_orcpt_address(rcpt.original_recipient)[1])
        if orcpt != rcpt.address:
            lines += item("Originally addressed to", orcpt)
    lines += item("Status", f"{rcpt.action} ({rcpt.status})")
    if rcpt.remote_mta:
        remote = _one_line(rcpt.remote_mta, LINE_LIMIT // 4)
        if remote:
            lines += item("Remote server", remote)
    diagnostic = _one_line(rcpt.diagnostic, max_diagnostic)
    if diagnostic:
        lines += item("Reason", diagnostic)
    if rcpt.last_attempt is not None:
        lines += item("Last attempt", _date(rcpt.last_attempt))
    if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
        lines += item("Retrying until", _date(rcpt.will_retry_until))
    return lines


def _report(
    *,
    reporting_mta: str,
    queue_id: str,
    arrival: float,
    envid: str | None,
    reported: Sequence[FailedRecipient],
    seven_bit: bool,
    max_diagnostic: int,
) -> str:
    """The machine-readable second part: RFC 3464 §2.2 and §2.3 fields, in ABNF order."""
    def text(value: str, limit: int | None = None) -> str:
        value = _one_line(value, limit)
        return _escape_non_ascii(value) if seven_bit else value

    blocks = []
    fields = []
    if envid is not None:
        fields.append(_field("Original-Envelope-Id", envid))
    fields.append(_field("Reporting-MTA", f"dns; {reporting_mta}"))
    fields.append(_field("Arrival-Date", _date(arrival)))
    fields.append(_field("X-Queue-Id", queue_id))
    blocks.append("".join(fields))
    for rcpt in reported:
        fields = []
        if rcpt.original_recipient is not None:
            fields.append(_field("Original-Recipient", _typed_orcpt(rcpt.original_recipient, seven_bit=seven_bit)))
        fields.append(_field("Final-Recipient", _typed_address(rcpt.address, seven_bit=seven_bit)))
        fields.append(_field("Action", rcpt.action))
        fields.append(_field("Status", rcpt.status))
        if rcpt.remote_mta is not None:
            remote = text(rcpt.remote_mta, LINE_LIMIT // 4)
            if remote:
                typed = _TYPED_TEXT.fullmatch(remote)
                fields.append(_field("Remote-MTA", remote if typed else f"dns; {remote}"))
        diagnostic = text(rcpt.diagnostic, max_diagnostic)
        if diagnostic:
            typed = _TYPED_TEXT.fullmatch(diagnostic)
            if typed:
                diagnostic = f"{typed.group(1)}; {typed.group(2)}".rstrip()
            else:
                diagnostic = f"X-Intermail; {diagnostic}"
            fields.append(_field("Diagnostic-Code", diagnostic))
        if rcpt.last_attempt is not None:
            fields.append(_field("Last-Attempt-Date", _date(rcpt.last_attempt)))
        if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
            fields.append(_field("Will-Retry-Until", _date(rcpt.will_retry_until)))
        blocks.append("".join(fields))
    return "\r\n".join(blocks)


def _text_part(text: str, *, seven_bit: bool) -> tuple[list[str], bytes, bool]:
    """Headers, body and 8-bit-ness of the explanation part."""
    if text.isascii():
        headers = ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        return headers, text.replace("\n", "\r\n").encode("ascii"), False
    data = text.encode("utf-8")
    if seven_bit:
        body = binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
        headers = ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"]
        return headers, body, False
    headers = ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    return headers, data.replace(b"\n", b"\r\n"), True


# ---------------------------------------------------------------------------
# Assembly


def _token(seed: bytes, purpose: bytes, counter: int) -> str:
    return hashlib.sha256(b"intermail-dsn\0" + purpose + b"\0" + str(counter).encode() + b"\0" + seed).hexdigest()


def _pick_boundary(seed: bytes, bodies: Sequence[bytes]) -> str:
    # "=_" cannot occur in quoted-printable text; the check covers every part anyway.
    # Terminates: each candidate is new and the content holds finitely many substrings.
    for counter in itertools.count():
        boundary = "=_dsn_" + _token(seed, b"boundary", counter)[:32]
        needle = boundary.encode("ascii")
        if not any(needle in body for body in bodies):
            return boundary
    raise AssertionError("unreachable")


def _subject(reported: Sequence[FailedRecipient]) -> str:
    actions = {r.action for r in reported}
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if actions == {"delayed"}:
        return "Delayed Mail (still being retried)"
    if "delayed" not in actions:
        return "Successful Mail Delivery Report"
    return "Delivery Status Notification"


def _check_arguments(
    *, reporting_mta: object, message_id_domain: object, queue_id: object, original: object,
    ret: object, envid: object, max_returned: object, max_diagnostic: object, seed: object,
) -> str | None:
    """Raise MailError(INVALID) unless the message-level arguments keep their contract; the RET keyword."""
    for value, what in ((reporting_mta, "reporting_mta"), (message_id_domain, "message_id_domain")):
        if not isinstance(value, str) or not _HOST.fullmatch(value):
            raise _invalid(f"{what} must be a host name or address literal, not {value!r}")
    if not isinstance(queue_id, str) or not _QUEUE_ID.fullmatch(queue_id):
        raise _invalid(f"queue_id must be a plain id, not {queue_id!r}")
    if not isinstance(original, bytes):
        raise _invalid("original must be bytes")
    if envid is not None and (
        not isinstance(envid, str) or not envid or len(envid) > MAX_ENVID
        or not all(0x20 <= ord(ch) <= 0x7E for ch in envid)
    ):
        raise _invalid(f"envid must be 1 to {MAX_ENVID} printable ASCII characters")
    for value, what in ((max_returned, "max_returned"), (max_diagnostic, "max_diagnostic")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _invalid(f"{what} must be a non-negative integer")
    if seed is not None and not isinstance(seed, bytes):
        raise _invalid("seed must be bytes")
    if ret is None:
        return None
    if not isinstance(ret, str) or ret.upper() not in ("FULL", "HDRS"):
        raise _invalid(f"ret must be FULL, HDRS or None, not {ret!r}")
    return ret.upper()


def _check_recipients(recipients: object) -> list[FailedRecipient]:
    try:
        listed = [] if isinstance(recipients, (str, bytes)) else list(recipients)  # type: ignore[call-overload]
    except TypeError:
        listed = []
    if not listed or not all(isinstance(r, FailedRecipient) for r in listed):
        raise _invalid("recipients must be a non-empty sequence of FailedRecipient")
    return listed


def _copy_part(
    original: bytes, reported: Sequence[FailedRecipient], ret: str | None, max_returned: int, seven_bit: bool,
) -> tuple[str, list[str], bytes]:
    """Part 3 (RFC 3461 §4.3): why this copy, its MIME header lines, its content."""
    returned, copy = "hdrs", None
    if any(r.action == "failed" for r in reported) and ret != "HDRS":
        copy, returned = _returnable(original, max_returned)
    if copy is None:
        copy = _header_block(original, max_returned)
        content_type = "text/rfc822-headers" if seven_bit else "message/global-headers"
        description = "Header of the original message"
    else:
        content_type = "message/rfc822" if seven_bit else "message/global"
        description = "Original message"
    headers = [
        f"Content-Type: {content_type}",
        f"Content-Transfer-Encoding: {'7bit' if copy.isascii() else '8bit'}",
        f"Content-Description: {description}",
    ]
    return returned, headers, copy


def _assemble(fields: list[tuple[str, str]], parts: list[tuple[list[str], bytes]], boundary: str) -> bytes:
    """Header fields, a preamble, then each part between boundary lines (RFC 2046 §5.1.1)."""
    out = [_field(name, value).encode("utf-8") for name, value in fields]
    out += [b"\r\n", b"This is a MIME-encapsulated delivery status notification.\r\n"]
    dash = b"--" + boundary.encode("ascii")
    for headers, body in parts:
        out += [b"\r\n", dash, b"\r\n"]
        out += [line.encode("ascii") + b"\r\n" for line in headers]
        out += [b"\r\n", body]
    out += [b"\r\n", dash, b"--\r\n"]
    return b"".join(out)


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    queue_id: str,
    arrival: float,
    message_id_domain: str,
    ret: str | None = None,
    envid: str | None = None,
    max_returned: int = MAX_RETURNED,
    max_diagnostic: int = MAX_DIAGNOSTIC,
    smtputf8: bool = False,
    now: float | None = None,
    seed: bytes | None = None,
) -> bytes | None:
    """The DSN for ``sender`` about ``recipients``, or None when none may be sent.

    ``reporting_mta`` and ``message_id_domain`` are host names (or address
    literals); ``queue_id`` names the original's queue entry (in the report's
    ``X-Queue-Id`` and in the Message-ID).  ``ret`` is RFC 3461 RET
    (``"FULL"``, ``"HDRS"``, ``None``; any case), ``envid`` the xtext-decoded
    ENVID (printable ASCII, RFC 3461 §4.4).  ``smtputf8`` asks for the
    internationalized form (RFC 6533).  ``now`` (default: the clock) dates
    the DSN; ``seed`` makes the boundary and Message-ID reproducible.

    Returns ``None`` for a null reverse-path and when NOTIFY leaves no
    recipient to report on.  Raises ``MailError(INVALID)`` for an argument
    outside its contract.
    """
    if not isinstance(sender, str):
        raise _invalid("sender must be a string")
    if sender.strip() in ("", "<>"):
        return None  # RFC 5321 §6.1: never send a notification to the null reverse-path
    _check_address(sender, "sender")
    ret = _check_arguments(
        reporting_mta=reporting_mta, message_id_domain=message_id_domain, queue_id=queue_id,
        original=original, ret=ret, envid=envid, max_returned=max_returned,
        max_diagnostic=max_diagnostic, seed=seed,
    )
    arrival = _check_time(arrival, "arrival")
    now = time.time() if now is None else _check_time(now, "now")
    reported = [r for r in _check_recipients(recipients) if r.wanted()]
    if not reported:
        return None
    seven_bit = not smtputf8 and sender.isascii()
    seed = secrets.token_bytes(16) if seed is None else seed

    returned, copy_headers, copy = _copy_part(original, reported, ret, max_returned, seven_bit)
    text_headers, text_body, text_8bit = _text_part(
        _explanation(
            reporting_mta=reporting_mta, reported=reported, returned=returned,
            max_returned=max_returned, max_diagnostic=max_diagnostic,
        ),
        seven_bit=seven_bit,
    )
    report = _report(
        reporting_mta=reporting_mta, queue_id=queue_id, arrival=arrival, envid=envid,
        reported=reported, seven_bit=seven_bit, max_diagnostic=max_diagnostic,
    ).encode("utf-8")
    report_type = "delivery-status" if seven_bit else "global-delivery-status"
    parts = [
        (text_headers + ["Content-Description: Notification"], text_body),
        ([f"Content-Type: message/{report_type}",
          f"Content-Transfer-Encoding: {'7bit' if report.isascii() else '8bit'}",
          "Content-Description: Delivery report"], report),
        (copy_headers, copy),
    ]
    boundary = _pick_boundary(seed, [body for _headers, body in parts])
    eight_bit = text_8bit or not report.isascii() or not copy.isascii()
    message_id = f"<{queue_id}.dsn.{_token(seed, b'message-id', 0)[:20]}@{message_id_domain}>"
    return _assemble([
        ("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
        ("To", f"<{sender}>"),
        ("Subject", _subject(reported)),
        ("Date", _date(now)),
        ("Message-ID", message_id),
        ("Auto-Submitted", "auto-replied"),  # RFC 3834 §5
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/report; report-type={report_type}; boundary="{boundary}"'),
        ("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),  # RFC 2045 §6.4
    ], parts, boundary)
