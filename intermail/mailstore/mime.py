"""Parse a message once, at delivery: MIME structure, ENVELOPE and SEARCH keys.

Owns the byte-level structure scan of a stored message and everything an IMAP
server derives from it, so that FETCH and SEARCH never parse a blob again:

- :func:`scan` (whole message) and :class:`Scanner` (sans-I/O, ``feed(chunk)``
  then ``finish()``) give a :class:`MessageInfo`: the size, the :class:`Part`
  tree with exact byte offsets, the top-level :class:`Envelope` and the
  :class:`SearchFields`;
- :func:`section` maps an RFC 3501 §6.4.5 section spec (``""``, ``HEADER``,
  ``TEXT``, ``1.2``, ``1.2.MIME``, ``3.HEADER.FIELDS``...) to an
  ``(offset, size)`` range of the stored blob: FETCH BODY[...] is a range read;
- :func:`bodystructure` (BODYSTRUCTURE, or BODY with ``extended=False``) and
  :func:`envelope_text` render the IMAP syntax (RFC 3501 §7.4.2, RFC 9051
  §7.5.2);
- :func:`to_json` / :func:`from_json`: the compact form kept in SQLite.

Invariants:

- ``scan(data)`` equals a :class:`Scanner` fed ``data`` in any split: every
  decision depends only on the bytes of one line (or the first
  ``4 + len(longest boundary)`` bytes of it) and on end of input.
- Memory is bounded whatever the message size: a header block keeps at most
  ``max_header`` bytes (default 256 KiB); body bytes are counted and searched
  for boundary lines, never kept (at most one boundary candidate, under 1 KiB,
  is buffered).  Nesting is capped at ``max_depth`` (100) and the part count at
  ``max_parts`` (10 000), like Dovecot's limits (CVE-2020-12100).
- Offsets are absolute in the original bytes, also inside encapsulated
  messages: ``header_offset + header_size == body_offset``; a child lies inside
  its parent's body; the top part spans ``[0, size)``; ``lines`` is the number
  of LF octets in ``[body_offset, body_offset + body_size)``.
- Nothing but :class:`~intermail.errors.LocalProtocolError` (``feed`` after
  ``finish``) escapes the scan, on any input; :func:`from_json` raises
  ``MailError(CORRUPT)``, :func:`section` ``MailError(INVALID)`` for a spec
  that is not RFC 3501 syntax.

Structure rules (RFC 2045, RFC 2046):

- The header block ends at the first empty line (``CRLF`` or bare ``LF``,
  included in ``header_size``), at a line that is neither a field nor a
  continuation (that line starts the body: Python's ``email`` does the same),
  at an enclosing boundary line, or at end of input.
- RFC 2046 §5.1.1: ``dash-boundary := "--" boundary``;
  ``delimiter := CRLF dash-boundary``; ``close-delimiter := delimiter "--"``.
  The CRLF before a boundary line belongs to the boundary, so it is not in
  the preceding part (nor in the preamble); a boundary line right at the
  start of a part or of a multipart body steals nothing.  Like Dovecot, a line
  is a boundary line when it *starts with* ``--boundary`` of any enclosing
  multipart (longest match wins, the innermost on a tie); a match closes
  every entity nested inside that multipart.  Preamble and epilogue are in the
  multipart's body but in no child.
- Defaults: no Content-Type means ``text/plain; charset=us-ascii`` (RFC 2045
  §5.2), ``message/rfc822`` directly inside ``multipart/digest`` (RFC 2046
  §5.1.5); no Content-Transfer-Encoding means ``7bit``.  A ``text/*`` type
  without a charset gets ``charset=us-ascii`` (first parameter).
- ``message/rfc822`` and ``message/global`` (RFC 6532 §3.7, RFC 9051) bodies
  are scanned as messages whatever their transfer encoding (like Dovecot).

Tolerances (malformed mail never raises; each choice is deterministic):

- A syntactically invalid Content-Type, and a ``multipart/*`` without a usable
  ``boundary`` (missing, empty, over 998 octets), become
  ``text/plain; charset=us-ascii`` (RFC 2045 §5.2).
- A missing close delimiter: open parts end at end of input.
- Bare LF line endings anywhere: lines are counted by LF; a bare CR is not a
  line end; offsets stay exact for the bytes as stored.  Sizes are physical
  octets (Dovecot reports CRLF-normalised ones): a store that must send CRLF
  on the wire should normalise LF-only mail before it is scanned and stored.
- Header lines: names may hold any octet but controls, space and colon, and
  may be followed by blanks before the colon (RFC 5322 §4.5 obs-optional); a
  continuation line before any field is ignored.  The first occurrence of a
  field wins.  Past ``max_header`` octets the rest of that header block is
  skipped (its size still counted) up to its end.
- 8-bit header octets: the raw forms (ENVELOPE, parameters, descriptions)
  are ``str`` decoded UTF-8 with ``surrogateescape``, so rendering gives back
  the exact octets; the search forms decode UTF-8, falling back to Latin-1,
  then RFC 2047 words with ``errors="replace"`` (an unknown charset is read
  as UTF-8; a word whose base64 is invalid stays as written).
- Addresses: unquoted display names before an addr-spec without angle
  brackets become the name; a comment is the name when there is no phrase
  (like UW c-client); an address without ``@`` has host ``""`` (NIL would mean
  a group); a group without ``;`` is closed at the end; quoted local parts keep
  their quotes.
- Depth or part-count over the limits: the multipart or message part becomes
  a leaf ``application/octet-stream`` (parameters dropped); boundary lines
  that would open a part past ``max_parts`` are body text.
- Rendering: NUL (forbidden even in literals) is sent as U+FFFD; a multipart
  without any child is rendered with one empty ``text/plain`` child (IMAP
  requires at least one), as Dovecot does.

Logs: nothing; pure functions over bytes.
"""

from __future__ import annotations

import binascii
import calendar
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_tz
from typing import NamedTuple

from intermail.errors import ErrorKind, LocalProtocolError, MailError

__all__ = [
    "Address",
    "Envelope",
    "MessageInfo",
    "Part",
    "Scanner",
    "SearchFields",
    "bodystructure",
    "decode_words",
    "envelope_text",
    "from_json",
    "parse_addresses",
    "scan",
    "section", "part_at",
    "to_json",
    "MAX_HEADER",
    "MAX_DEPTH",
    "MAX_PARTS",
    "MAX_BOUNDARY",
    "FORMAT_VERSION",
]

MAX_HEADER = 256 * 1024  # octets of one header block kept for parsing
MAX_DEPTH = 100  # nesting levels of multiparts / encapsulated messages
MAX_PARTS = 10_000  # entities in one message
MAX_BOUNDARY = 998  # longest usable boundary parameter (one RFC 5322 line)
FORMAT_VERSION = 1  # first element of the to_json() array

# ---------------------------------------------------------------------------
# The data model


class Address(NamedTuple):
    """One ENVELOPE address (RFC 3501 §7.4.2): raw text, encoded words untouched.

    A group is ``(None, None, "name", None)`` ... ``(None, None, None, None)``.
    """

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


@dataclass(frozen=True, slots=True)
class Envelope:
    """ENVELOPE fields: raw unfolded header values, ``None`` when absent.

    Address lists are ``None`` when absent or empty; ``sender`` and
    ``reply_to`` are already defaulted to ``from_`` (RFC 3501 §7.4.2).
    """

    date: str | None = None
    subject: str | None = None
    from_: tuple[Address, ...] | None = None
    sender: tuple[Address, ...] | None = None
    reply_to: tuple[Address, ...] | None = None
    to: tuple[Address, ...] | None = None
    cc: tuple[Address, ...] | None = None
    bcc: tuple[Address, ...] | None = None
    in_reply_to: str | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class SearchFields:
    """Keys for SEARCH FROM/TO/CC/BCC/SUBJECT (lower-cased, RFC 2047-decoded,
    ``""`` when absent) and SENTBEFORE/SENTON/SENTSINCE.

    ``date`` is the Date header as a UTC POSIX timestamp (``None`` when absent
    or unparsable); ``date_tz`` its zone in minutes east of UTC, since SENT*
    compare the header's own calendar day ("disregarding time and timezone"):
    ``date + 60 * date_tz`` is the sender's wall clock.
    """

    from_: str = ""
    to: str = ""
    cc: str = ""
    bcc: str = ""
    subject: str = ""
    date: int | None = None
    date_tz: int = 0
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """One MIME entity with its BODYSTRUCTURE fields and byte ranges.

    ``type``/``subtype``/``encoding``/``disposition`` and parameter names are
    lower-case; values are raw.  ``lines`` counts LFs in the body (wanted by
    BODYSTRUCTURE for ``text/*`` and ``message/rfc822``; computed for all).
    ``children`` is set for multiparts; ``envelope`` and ``message`` (the
    encapsulated message's top part) for ``message/rfc822|global`` parts.
    """

    type: str
    subtype: str
    params: tuple[tuple[str, str], ...]
    content_id: str | None
    description: str | None
    encoding: str
    disposition: str | None
    disposition_params: tuple[tuple[str, str], ...]
    language: tuple[str, ...] | None
    location: str | None
    md5: str | None
    header_offset: int
    header_size: int
    body_offset: int
    body_size: int
    lines: int
    children: tuple[Part, ...] = ()
    envelope: Envelope | None = None
    message: Part | None = None

    @property
    def is_multipart(self) -> bool:
        return self.type == "multipart"

    @property
    def end(self) -> int:
        """Offset just past this entity's body."""
        return self.body_offset + self.body_size

    def param(self, name: str) -> str | None:
        """The first Content-Type parameter called ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.params:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """Everything FETCH and SEARCH need about one stored message."""

    size: int
    part: Part
    envelope: Envelope
    search: SearchFields


# ---------------------------------------------------------------------------
# Header values: unfolding, decoding, parameters

_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")  # RFC 5322 §2.2.3: drop the CRLF, keep the WSP


def _unfold(raw: bytes | bytearray) -> bytes:
    return _UNFOLD.sub(b"", raw).strip(b" \t\r\n")


def _raw_text(raw: bytes | bytearray | None) -> str | None:
    """The raw form: unfolded, 8-bit octets kept exactly via surrogateescape."""
    if raw is None:
        return None
    return _unfold(raw).decode("utf-8", "surrogateescape")


def _search_text(raw: bytes | bytearray | None) -> str:
    """The search form: UTF-8 (else Latin-1), encoded words decoded, lower-cased."""
    if raw is None:
        return ""
    data = _unfold(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return decode_words(text).lower()


# RFC 2047 §2: encoded-word = "=?" charset "?" encoding "?" encoded-text "?="
# (RFC 2231 §5 lets the charset carry "*language").
_EWORD = re.compile(r"=\?([^?\s]+?)\?([bBqQ])\?([^?\s]*)\?=")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _decode_word(match: re.Match) -> str | None:
    """The decoded word, or None when it is not valid base64 (it then stays plain text)."""
    charset = match.group(1).split("*", 1)[0]
    text = match.group(3)
    try:
        if match.group(2) in "bB":
            if not _BASE64_TEXT.fullmatch(text):
                return None
            raw = binascii.a2b_base64(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4), strict_mode=True)
        else:
            raw = binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return None
    try:
        return raw.decode(charset, "replace")
    except Exception:  # unknown or non-text codec: fall back, never raise
        return raw.decode("utf-8", "replace")


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words; blanks between adjacent words vanish (§6.2)."""
    if "=?" not in text:
        return text
    out: list[str] = []
    pos = 0
    after_word = False
    for match in _EWORD.finditer(text):
        decoded = _decode_word(match)
        if decoded is None:  # left in place: it becomes part of the next gap
            continue
        gap = text[pos : match.start()]
        if not (after_word and not gap.strip(" \t")):
            out.append(gap)
        out.append(decoded)
        pos = match.end()
        after_word = True
    out.append(text[pos:])
    return "".join(out)


# RFC 2045 §5.1:
#   content := "Content-Type" ":" type "/" subtype *(";" parameter)
#   parameter := attribute "=" value
#   value := token / quoted-string
#   token := 1*<any (US-ASCII) CHAR except SPACE, CTLs, or tspecials>
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA = re.compile(rf"\s*({_TOKEN})\s*/\s*({_TOKEN})\s*(?:\(.*\))?\s*", re.S)
_FIRST_TOKEN = re.compile(rf"\s*({_TOKEN})\s*(?:\(.*\))?\s*", re.S)
_ATTRIBUTE = re.compile(_TOKEN)
# One ";"-separated segment; quoted strings may hold ";" (an unterminated one runs to the end).
_SEGMENT = re.compile(r'(?:[^";]|"(?:[^"\\]|\\.)*(?:"|\Z))*', re.S)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"?', re.S)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
# RFC 2231 §3/§4: name*N (continuation), name*N* (encoded continuation), name* (encoded).
_RFC2231 = re.compile(r"(.+?)\*([0-9]{1,3})(\*?)")
_ATTR_CHAR = frozenset("!#$&+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~")


def _segments(text: str) -> list[str]:
    out = []
    pos = 0
    while True:
        match = _SEGMENT.match(text, pos)
        out.append(match.group())
        pos = match.end() + 1
        if pos > len(text):
            return out


def _percent(text: str) -> str:
    """Escape a plain RFC 2231 segment joined into an encoded (``name*``) value."""
    return "".join(ch if ch in _ATTR_CHAR else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
                   for ch in text)


def _params(segments: list[str]) -> tuple[tuple[str, str], ...]:
    """Parameters in order of first appearance; RFC 2231 continuations joined.

    Continuations with any encoded section become one ``name*`` parameter whose
    value stays RFC 2231-encoded (``charset'lang'%XX...``): BODYSTRUCTURE stays
    ASCII and the client decodes it; plain sections joined into it are %-escaped.
    """
    plain: dict[str, str] = {}
    order: list[tuple[bool, str]] = []
    sections: dict[str, list[tuple[int, str, bool]]] = {}
    for segment in segments:
        attr, sep, value = segment.partition("=")
        attr = attr.strip().lower()
        if not sep or not _ATTRIBUTE.fullmatch(attr):
            continue
        value = value.strip()
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", _QUOTED.match(value).group(1))
        match = _RFC2231.fullmatch(attr)
        if match:
            base = match.group(1)
            if base not in sections:
                sections[base] = []
                order.append((True, base))
            sections[base].append((int(match.group(2)), value, bool(match.group(3))))
        elif attr not in plain:
            plain[attr] = value
            order.append((False, attr))
    out: dict[str, str] = {}
    for joined, name in order:
        if not joined:
            out.setdefault(name, plain[name])
            continue
        pieces = sorted(sections[name], key=lambda item: item[0])
        if any(encoded for _, _, encoded in pieces):
            value = "".join(v if encoded else _percent(v) for _, v, encoded in pieces)
            out.setdefault(name + "*", value)
        else:
            out.setdefault(name, "".join(v for _, v, _ in pieces))
    return tuple(out.items())


_US_ASCII = (("charset", "us-ascii"),)


def _content_type(raw: bytes | bytearray | None, in_digest: bool) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if raw is None:
        return ("message", "rfc822", ()) if in_digest else ("text", "plain", _US_ASCII)
    segments = _segments(_raw_text(raw))
    match = _MEDIA.fullmatch(segments[0])
    if match is None:
        return "text", "plain", _US_ASCII
    mtype, subtype = match.group(1).lower(), match.group(2).lower()
    params = _params(segments[1:])
    if mtype == "multipart":
        boundary = dict(params).get("boundary", "")
        if not boundary or len(boundary.encode("utf-8", "surrogateescape")) > MAX_BOUNDARY:
            return "text", "plain", _US_ASCII
    elif mtype == "text" and not any(key == "charset" for key, _ in params):
        params = _US_ASCII + params
    return mtype, subtype, params


def _disposition(raw: bytes | bytearray | None) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """RFC 2183: disposition := "Content-Disposition" ":" disposition-type *(";" disposition-parm)."""
    if raw is None:
        return None, ()
    segments = _segments(_raw_text(raw))
    match = _FIRST_TOKEN.fullmatch(segments[0])
    if match is None:
        return None, ()
    return match.group(1).lower(), _params(segments[1:])


def _encoding(raw: bytes | bytearray | None) -> str:
    """RFC 2045 §6.1: encoding := "Content-Transfer-Encoding" ":" mechanism; default 7bit."""
    if raw is None:
        return "7bit"
    match = _FIRST_TOKEN.fullmatch(_raw_text(raw))
    return match.group(1).lower() if match else "7bit"


_COMMENT = re.compile(r"\([^()]*\)")


def _language(raw: bytes | bytearray | None) -> tuple[str, ...] | None:
    """RFC 3282: Content-Language := Language-List (comma-separated tags)."""
    if raw is None:
        return None
    tags = tuple(tag.strip() for tag in _COMMENT.sub(" ", _raw_text(raw)).split(","))
    tags = tuple(tag for tag in tags if tag)
    return tags or None


def _parse_date(raw: bytes | bytearray | None) -> tuple[int | None, int]:
    """RFC 5322 §3.3 date-time → (UTC timestamp, zone minutes); (None, 0) if unparsable."""
    if raw is None:
        return None, 0
    try:
        parsed = parsedate_tz(_unfold(raw).decode("latin-1"))
        if parsed is None or not (1 <= parsed[1] <= 12 and 1 <= parsed[2] <= 31):
            return None, 0
        offset = parsed[9] or 0
        stamp = calendar.timegm((parsed[0], parsed[1], parsed[2], parsed[3], parsed[4], parsed[5], 0, 1, 0))
        return stamp - offset, offset // 60
    except Exception:  # parsedate_tz and timegm have raised on odd input in the past
        return None, 0


# ---------------------------------------------------------------------------
# Address lists (RFC 5322 §3.4, with the obsolete forms of §4.4)
#
#   address-list = address *("," address)
#   address      = mailbox / group
#   mailbox      = name-addr / addr-spec
#   name-addr    = [display-name] angle-addr
#   angle-addr   = [CFWS] "<" [obs-route] addr-spec ">" [CFWS]
#   obs-route    = obs-domain-list ":"          ; "@a,@b:" -> adl "@a,@b"
#   group        = display-name ":" [group-list] ";" [CFWS]
#   addr-spec    = local-part "@" domain

_ADDR_TOKEN = re.compile(
    r"""[ \t\r\n]+
      | "(?:[^"\\]|\\.)*(?:"|\Z)
      | \[(?:[^\]\\]|\\.)*(?:\]|\Z)
      | [<>@,;:.]
      | [^ \t\r\n"\[<>@,;:.(]+""",
    re.X | re.S,
)
_DOT = ("s", ".")
_AT = ("s", "@")


def _address_tokens(text: str) -> list[tuple[str, str]]:
    """Tokens: ("a", atom), ("q", quoted), ("l", literal), ("s", special), ("c", comment text)."""
    tokens: list[tuple[str, str]] = []
    pos, size = 0, len(text)
    while pos < size:
        if text[pos] == "(":
            depth, end = 0, pos
            while end < size:
                char = text[end]
                if char == "\\":
                    end += 2
                    continue
                if char == "(":
                    depth += 1
                elif char == ")":
                    depth -= 1
                    if depth == 0:
                        break
                end += 1
            tokens.append(("c", _QUOTED_PAIR.sub(r"\1", text[pos + 1 : end])))
            pos = end + 1
            continue
        match = _ADDR_TOKEN.match(text, pos)
        token = match.group()
        pos = match.end()
        first = token[0]
        if first in " \t\r\n":
            continue
        if first == '"':
            tokens.append(("q", token))
        elif first == "[":
            tokens.append(("l", token))
        elif first in "<>@,;:." and len(token) == 1:
            tokens.append(("s", token))
        else:
            tokens.append(("a", token))
    return tokens


def _unquote(token: str) -> str:
    return _QUOTED_PAIR.sub(r"\1", _QUOTED.match(token).group(1))


def _phrase(words: list[tuple[str, str]], raw: bool = False) -> str | None:
    """A display name: words joined by one blank, quotes removed, "." glued (obs-phrase)."""
    parts: list[str] = []
    for kind, text in words:
        if (kind, text) == _DOT and parts:
            parts[-1] += "."
        else:
            parts.append(_unquote(text) if kind == "q" and not raw else text)
    return " ".join(parts) or None


def _dot_run(words: list[tuple[str, str]], stop: int) -> int:
    """Start index of the dot-separated word run ending just before ``stop``."""
    start, want_word = stop, True
    while start > 0:
        kind, text = words[start - 1]
        if want_word and kind in ("a", "q", "l"):
            want_word = False
        elif (kind, text) == _DOT:
            want_word = True
        else:
            break
        start -= 1
    return start


def _domain(words: list[tuple[str, str]]) -> str:
    """The dot-separated run at the start of ``words`` (junk after it is dropped)."""
    out, want_word = [], True
    for kind, text in words:
        if want_word and kind in ("a", "l", "q"):
            want_word = False
        elif (kind, text) == _DOT:
            want_word = True
        else:
            break
        out.append(text)
    return "".join(out)


def _addr_spec(words: list[tuple[str, str]], comment: str | None) -> Address:
    at = max((k for k, word in enumerate(words) if word == _AT), default=-1)
    if at < 0:
        return Address(comment, None, _phrase(words, raw=True) or "", "")
    start = _dot_run(words, at)
    local = "".join(text for _, text in words[start:at])
    return Address(_phrase(words[:start]) or comment, None, local, _domain(words[at + 1 :]))


def _angle_addr(tokens: list[tuple[str, str]], pos: int) -> tuple[int, str | None, str, str]:
    inner: list[tuple[str, str]] = []
    route_open = pos < len(tokens) and tokens[pos] == _AT
    while pos < len(tokens):
        kind, text = tokens[pos]
        if kind == "s" and (text == ">" or (text in ",;" and not route_open)):
            if text == ">":
                pos += 1
            break
        if kind == "s" and text == ":":
            route_open = False
        if kind != "c":
            inner.append((kind, text))
        pos += 1
    route = None
    if inner and inner[0] == _AT and ("s", ":") in inner:
        colon = inner.index(("s", ":"))
        route = "".join(text for _, text in inner[:colon])
        inner = inner[colon + 1 :]
    at = max((k for k, word in enumerate(inner) if word == _AT), default=-1)
    if at < 0:
        return pos, route, "".join(text for _, text in inner), ""
    return pos, route, "".join(t for _, t in inner[:at]), "".join(t for _, t in inner[at + 1 :])


def parse_addresses(text: str | None) -> tuple[Address, ...] | None:
    """An address-list as ENVELOPE addresses (group syntax per RFC 3501); None if empty."""
    if text is None:
        return None
    tokens = _address_tokens(text)
    out: list[Address] = []
    words: list[tuple[str, str]] = []
    comment: str | None = None
    done = False  # an angle-addr ended this address: ignore junk up to the separator
    in_group = False
    pos = 0
    while pos < len(tokens):
        kind, text = tokens[pos]
        pos += 1
        if kind == "c":
            if done and out[-1].name is None:
                out[-1] = out[-1]._replace(name=text)
            elif comment is None:
                comment = text
            continue
        if kind == "s" and text in ",;":
            if words and not done:
                out.append(_addr_spec(words, comment))
            if text == ";" and in_group:
                out.append(Address(None, None, None, None))
                in_group = False
            words, comment, done = [], None, False
            continue
        if done:
            continue
        if kind == "s" and text == "<":
            pos, route, mailbox, host = _angle_addr(tokens, pos)
            out.append(Address(_phrase(words) or comment, route, mailbox, host))
            words, comment, done = [], None, True
            continue
        if kind == "s" and text == ":" and not in_group and _AT not in words:
            out.append(Address(None, None, _phrase(words) or "", None))
            words, comment, in_group = [], None, True
            continue
        words.append((kind, text))
    if words and not done:
        out.append(_addr_spec(words, comment))
    if in_group:
        out.append(Address(None, None, None, None))
    return tuple(out) or None


def _envelope(fields: dict[bytes, bytearray]) -> Envelope:
    get = fields.get
    from_ = parse_addresses(_raw_text(get(b"from")))
    return Envelope(
        date=_raw_text(get(b"date")),
        subject=_raw_text(get(b"subject")),
        from_=from_,
        sender=parse_addresses(_raw_text(get(b"sender"))) or from_,
        reply_to=parse_addresses(_raw_text(get(b"reply-to"))) or from_,
        to=parse_addresses(_raw_text(get(b"to"))),
        cc=parse_addresses(_raw_text(get(b"cc"))),
        bcc=parse_addresses(_raw_text(get(b"bcc"))),
        in_reply_to=_raw_text(get(b"in-reply-to")),
        message_id=_raw_text(get(b"message-id")),
    )


def _search(fields: dict[bytes, bytearray]) -> SearchFields:
    get = fields.get
    date, date_tz = _parse_date(get(b"date"))
    return SearchFields(
        from_=_search_text(get(b"from")),
        to=_search_text(get(b"to")),
        cc=_search_text(get(b"cc")),
        bcc=_search_text(get(b"bcc")),
        subject=_search_text(get(b"subject")),
        date=date,
        date_tz=date_tz,
        message_id=_raw_text(get(b"message-id")),
    )


# ---------------------------------------------------------------------------
# The scanner

_LF, _CR, _SP, _HT, _DASH = 10, 13, 32, 9, 45
# RFC 5322 §3.6.8 field-name = 1*ftext, plus obs-optional blanks before ":" (§4.5);
# we also accept 8-bit octets in the name.
_FIELD = re.compile(rb"([^\x00-\x20\x7f:]+)[ \t]*:")
_WANTED = frozenset(
    {
        b"date", b"subject", b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc", b"in-reply-to",
        b"message-id", b"content-type", b"content-transfer-encoding", b"content-id",
        b"content-description", b"content-disposition", b"content-language", b"content-location",
        b"content-md5",
    }
)
_LEAF, _MULTI, _MESSAGE = 0, 1, 2
_MESSAGE_TYPES = ("rfc822", "global")
_EMPTY_ENVELOPE = Envelope()


class _Entity:
    """A MIME entity still being scanned (mutable; frozen into a Part on close)."""

    __slots__ = (
        "parent", "depth", "is_message", "header_offset", "in_header", "overflow", "kept", "fields",
        "current", "body_offset", "body_lf", "mime", "kind", "boundary", "children", "message",
        "message_envelope", "envelope", "search",
    )

    def __init__(self, parent: _Entity | None, depth: int, is_message: bool, offset: int):
        self.parent = parent
        self.depth = depth
        self.is_message = is_message
        self.header_offset = offset
        self.in_header = True
        self.overflow = False
        self.kept = 0
        self.fields: dict[bytes, bytearray] | None = {}
        self.current: bytearray | None = None
        self.body_offset = offset
        self.body_lf = 0
        self.mime: tuple = ()
        self.kind = _LEAF
        self.boundary = b""
        self.children: list[Part] = []
        self.message: Part | None = None
        self.message_envelope: Envelope | None = None
        self.envelope: Envelope | None = None
        self.search: SearchFields | None = None


class Scanner:
    """Incremental scan: ``feed(chunk)`` any number of times, then ``finish()``.

    The result equals :func:`scan` of the concatenated chunks.  Memory stays
    bounded by ``max_header`` plus one chunk, whatever the message size.
    """

    def __init__(self, *, max_header: int = MAX_HEADER, max_depth: int = MAX_DEPTH, max_parts: int = MAX_PARTS):
        self._max_header = max_header
        self._max_depth = max_depth
        self._max_parts = max_parts
        self._buf = bytearray()
        self._base = 0  # absolute offset of _buf[0]; two octets before _pos are kept
        self._pos = 0  # absolute offset scanned so far
        self._lf = 0  # LF octets in data[:_pos]
        self._line_start = True
        self._skip: tuple[_Entity, bool] | None = None  # inside a boundary line: (owner, closing)
        self._stack = [_Entity(None, 0, True, 0)]
        self._bounds: list[tuple[bytes, _Entity]] = []  # open multiparts, outermost first
        self._look = 0  # octets needed to decide on a boundary candidate line
        self._nparts = 1
        self._top: Part | None = None
        self._top_entity = self._stack[0]
        self._result: MessageInfo | None = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._result is not None:
            raise LocalProtocolError("feed() after finish()")
        if chunk:
            self._buf += chunk
            self._run(final=False)

    def finish(self) -> MessageInfo:
        if self._result is None:
            self._run(final=True)
            end = self._base + len(self._buf)
            while self._stack:
                self._close(self._stack.pop(), end, self._lf)
            top = self._top_entity
            self._result = MessageInfo(end, self._top, top.envelope or _EMPTY_ENVELOPE, top.search or SearchFields())
            self._buf = bytearray()
        return self._result

    # -- the loop ----------------------------------------------------------

    def _run(self, final: bool) -> None:
        buf = self._buf
        size = len(buf)
        i = self._pos - self._base
        while True:
            if self._skip is not None:
                lf = buf.find(b"\n", i, size)
                if lf < 0:
                    i = size
                    if not final:
                        break
                else:
                    i = lf + 1
                    self._lf += 1
                owner, closing = self._skip
                self._skip = None
                self._line_start = True
                if not closing:
                    self._stack.append(_Entity(owner, owner.depth + 1, False, self._base + i))
                    self._nparts += 1
                continue
            entity = self._stack[-1]
            if entity.in_header:
                i, progress = self._header_step(entity, buf, i, size, final)
            else:
                i, progress = self._body_step(buf, i, size, final)
            if not progress:
                break
        self._pos = self._base + i
        if i > 2:
            del buf[: i - 2]
            self._base += i - 2

    def _boundary_at(self, buf: bytearray, i: int, size: int, final: bool):
        """At a line start: None (need more), False (no boundary) or (bounds index, closing)."""
        avail = size - i
        if avail < 2:
            if final or (avail == 1 and buf[i] != _DASH):
                return False
            return None
        if buf[i] != _DASH or buf[i + 1] != _DASH:
            return False
        look = self._look
        if avail < look and not final and buf.find(b"\n", i, size) < 0:
            return None
        stop = buf.find(b"\n", i, i + look)
        line = bytes(buf[i + 2 : stop if stop >= 0 else min(size, i + look)])
        bounds = self._bounds
        best, best_len = -1, -1
        for k in range(len(bounds) - 1, -1, -1):
            boundary = bounds[k][0]
            if len(boundary) > best_len and line.startswith(boundary):
                best, best_len = k, len(boundary)
        if best < 0:
            return False
        closing = line[best_len : best_len + 2] == b"--"
        if not closing and self._nparts >= self._max_parts:
            return False
        return best, closing

    def _boundary(self, buf: bytearray, i: int, found: tuple[int, bool]) -> None:
        """A boundary line starts at buf[i]: close what it ends, then skip the line."""
        index, closing = found
        q = self._base + i
        current = self._stack[-1]
        start = current.header_offset if current.in_header else current.body_offset
        newline = 0
        if q > start:  # the CRLF (or LF) before the boundary belongs to it
            newline = 2 if q - 2 >= start and buf[i - 2] == _CR else 1
        end, lf_end = q - newline, self._lf - (1 if newline else 0)
        bounds = self._bounds
        owner = bounds[index][1]
        while self._stack[-1] is not owner:
            self._close(self._stack.pop(), end, lf_end)
        del bounds[index + 1 if not closing else index :]
        self._look = 4 + max(len(b) for b, _ in bounds) if bounds else 0
        self._skip = (owner, closing)

    def _body_step(self, buf: bytearray, i: int, size: int, final: bool) -> tuple[int, bool]:
        if not self._bounds:
            self._lf += buf.count(b"\n", i, size)
            return size, False
        if self._line_start:
            found = self._boundary_at(buf, i, size, final)
            if found is None:
                return i, False
            if found is not False:
                self._boundary(buf, i, found)
                return i, True
            self._line_start = False
        candidate = buf.find(b"\n--", i, size)
        if candidate >= 0:
            self._lf += buf.count(b"\n", i, candidate + 1)
            self._line_start = True
            return candidate + 1, True
        last = buf.rfind(b"\n", i, size)
        if last >= 0:
            self._lf += buf.count(b"\n", i, last + 1)
            self._line_start = True
            return last + 1, last + 1 < size
        return size, False

    def _header_step(self, entity: _Entity, buf: bytearray, i: int, size: int, final: bool) -> tuple[int, bool]:
        if not self._line_start:  # skipping the tail of a line past max_header
            lf = buf.find(b"\n", i, size)
            if lf < 0:
                return size, False
            self._lf += 1
            self._line_start = True
            return lf + 1, True
        if self._bounds:
            found = self._boundary_at(buf, i, size, final)
            if found is None:
                return i, False
            if found is not False:
                self._boundary(buf, i, found)
                return i, True
        if i >= size:
            return i, False  # end of input closes the header in finish()
        first = buf[i]
        if first == _LF or (first == _CR and i + 1 < size and buf[i + 1] == _LF):
            width = 1 if first == _LF else 2
            self._lf += 1
            self._finish_header(entity, self._base + i + width, self._lf)
            self._open_body(entity)
            return i + width, True
        if first == _CR and i + 1 >= size and not final:
            return i, False
        lf = buf.find(b"\n", i, size)
        room = self._max_header - entity.kept
        if lf < 0 and not final and not entity.overflow and size - i <= room:
            return i, False
        end = lf + 1 if lf >= 0 else size
        if entity.overflow or end - i > room:
            entity.overflow = True
            entity.current = None
            if lf < 0:
                self._line_start = final
                return size, final
            self._lf += 1
            return end, True
        line = bytes(buf[i:end])
        if first == _SP or first == _HT:
            if entity.current is not None:
                entity.current += line
        else:
            match = _FIELD.match(line)
            if match is None:  # not a header line: the body starts here
                self._finish_header(entity, self._base + i, self._lf)
                self._open_body(entity)
                return i, True
            name = match.group(1).lower()
            entity.current = None
            if name in _WANTED and name not in entity.fields:
                entity.current = entity.fields[name] = bytearray(line[match.end() :])
        entity.kept += end - i
        if lf >= 0:
            self._lf += 1
        return end, True

    # -- entity transitions -----------------------------------------------

    def _finish_header(self, entity: _Entity, at: int, lf_at: int) -> None:
        entity.in_header = False
        entity.body_offset = at
        entity.body_lf = lf_at
        fields = entity.fields
        parent = entity.parent
        in_digest = parent is not None and parent.kind == _MULTI and parent.mime[1] == "digest"
        mtype, subtype, params = _content_type(fields.get(b"content-type"), in_digest)
        kind = _LEAF
        if mtype == "multipart" or (mtype == "message" and subtype in _MESSAGE_TYPES):
            capped = entity.depth >= self._max_depth or (mtype == "message" and self._nparts >= self._max_parts)
            if capped:
                mtype, subtype, params = "application", "octet-stream", ()
            elif mtype == "multipart":
                kind = _MULTI
                entity.boundary = dict(params)["boundary"].encode("utf-8", "surrogateescape")
            else:
                kind = _MESSAGE
        disposition, disposition_params = _disposition(fields.get(b"content-disposition"))
        entity.mime = (
            mtype, subtype, params, _raw_text(fields.get(b"content-id")),
            _raw_text(fields.get(b"content-description")), _encoding(fields.get(b"content-transfer-encoding")),
            disposition, disposition_params, _language(fields.get(b"content-language")),
            _raw_text(fields.get(b"content-location")), _raw_text(fields.get(b"content-md5")),
        )
        entity.kind = kind
        if entity.is_message:
            entity.envelope = _envelope(fields)
            if parent is None:
                entity.search = _search(fields)
        entity.fields = None
        entity.current = None

    def _open_body(self, entity: _Entity) -> None:
        self._line_start = True
        if entity.kind == _MULTI:
            self._bounds.append((entity.boundary, entity))
            self._look = max(self._look, 4 + len(entity.boundary))
        elif entity.kind == _MESSAGE:
            self._stack.append(_Entity(entity, entity.depth + 1, True, entity.body_offset))
            self._nparts += 1

    def _close(self, entity: _Entity, end: int, lf_end: int) -> None:
        if entity.in_header:
            self._finish_header(entity, end, lf_end)
        if entity.kind == _MESSAGE and entity.message is None:
            entity.message = _empty_part(entity.body_offset)
            entity.message_envelope = _EMPTY_ENVELOPE
        part = Part(
            *entity.mime,
            header_offset=entity.header_offset,
            header_size=entity.body_offset - entity.header_offset,
            body_offset=entity.body_offset,
            body_size=end - entity.body_offset,
            lines=lf_end - entity.body_lf,
            children=tuple(entity.children),
            envelope=entity.message_envelope,
            message=entity.message,
        )
        parent = entity.parent
        if parent is None:
            self._top = part
        elif parent.kind == _MULTI:
            parent.children.append(part)
        else:
            parent.message = part
            parent.message_envelope = entity.envelope or _EMPTY_ENVELOPE


def _empty_part(offset: int) -> Part:
    return Part("text", "plain", _US_ASCII, None, None, "7bit", None, (), None, None, None, offset, 0, offset, 0, 0)


def scan(
    data: bytes | bytearray | memoryview,
    *,
    max_header: int = MAX_HEADER,
    max_depth: int = MAX_DEPTH,
    max_parts: int = MAX_PARTS,
) -> MessageInfo:
    """Scan a whole message (fed in 1 MiB slices, so memory stays bounded)."""
    scanner = Scanner(max_header=max_header, max_depth=max_depth, max_parts=max_parts)
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    step = 1 << 20
    for start in range(0, len(view), step):
        scanner.feed(view[start : start + step])
    return scanner.finish()


# ---------------------------------------------------------------------------
# Section addressing (RFC 3501 §6.4.5, RFC 9051 §6.4.5)
#
#   section-spec    = section-msgtext / (section-part ["." section-text])
#   section-msgtext = "HEADER" / "HEADER.FIELDS" [".NOT"] SP header-list / "TEXT"
#   section-part    = nz-number *("." nz-number)
#   section-text    = section-msgtext / "MIME"

_SECTION_TEXTS = frozenset({"", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})
_NZ_NUMBER = re.compile(r"[1-9][0-9]*")


def _subpart(part: Part, is_root: bool, number: int) -> Part | None:
    """Part ``number`` inside ``part`` (a message root, a multipart or a message part)."""
    if not is_root and part.message is not None:
        part, is_root = part.message, True
    if part.type == "multipart":
        return part.children[number - 1] if number <= len(part.children) else None
    if is_root and number == 1:  # a non-multipart message has exactly a part 1: its body
        return part
    return None


def part_at(info: MessageInfo, numbers: Sequence[int]) -> Part | None:
    """The entity at part ``numbers`` (``()``: the message itself), or None if there is none."""
    part: Part | None = info.part
    is_root = True
    for number in numbers:
        part = _subpart(part, is_root, number) if part is not None and number >= 1 else None
        if part is None:
            return None
        is_root = False
    return part


def section(info: MessageInfo, spec: str) -> tuple[int, int] | None:
    """The ``(offset, size)`` of BODY[spec] in the stored message, or None if no such part.

    ``HEADER.FIELDS[.NOT]`` give the whole header block (the caller filters its
    lines); a header list after a blank is ignored.  ``spec`` is
    case-insensitive; a spec that is not RFC 3501 syntax raises MailError(INVALID).
    """
    head = spec.strip().split(" ", 1)[0]
    tokens = head.split(".") if head else []
    numbers: list[int] = []
    for token in tokens:
        if not token[:1].isdigit():
            break
        if not (token.isascii() and _NZ_NUMBER.fullmatch(token)):
            raise MailError(ErrorKind.INVALID, "invalid section", f"bad part number in section {spec!r}")
        numbers.append(int(token))
    text = ".".join(tokens[len(numbers) :]).upper()
    if text not in _SECTION_TEXTS or (text == "MIME" and not numbers):
        raise MailError(ErrorKind.INVALID, "invalid section", f"bad section {spec!r}")
    top = info.part
    if not numbers:
        if text == "":
            return 0, info.size
        if text == "TEXT":
            return top.body_offset, top.body_size
        return top.header_offset, top.header_size
    part: Part | None = top
    is_root = True
    for number in numbers:
        part = _subpart(part, is_root, number)
        if part is None:
            return None
        is_root = False
    if text == "":
        return part.body_offset, part.body_size
    if text == "MIME":
        return part.header_offset, part.header_size
    inner = part.message
    if inner is None:  # HEADER / TEXT need a message/rfc822 part
        return None
    if text == "TEXT":
        return inner.body_offset, inner.body_size
    return inner.header_offset, inner.header_size


# ---------------------------------------------------------------------------
# IMAP rendering (RFC 3501 §4.3 strings, §7.4.2 BODYSTRUCTURE / ENVELOPE)
#
#   quoted       = DQUOTE *QUOTED-CHAR DQUOTE
#   QUOTED-CHAR  = <any TEXT-CHAR except quoted-specials> / "\" quoted-specials
#                  (RFC 9051 adds UTF8-2 / UTF8-3 / UTF8-4)
#   literal      = "{" number "}" CRLF *CHAR8        ; CHAR8 = %x01-ff
#   nstring      = string / nil

_QUOTABLE = re.compile(r"[\x01-\x09\x0b\x0c\x0e-\x7f]*")
_QUOTABLE_UTF8 = re.compile(r"[^\x00\r\n\udc80-\udcff]*")


def _string(value: str | None, utf8: bool) -> str:
    if value is None:
        return "NIL"
    if _QUOTABLE.fullmatch(value) or (utf8 and _QUOTABLE_UTF8.fullmatch(value)):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    octets = value.encode("utf-8", "surrogateescape").replace(b"\x00", "\ufffd".encode())
    return "{%d}\r\n%s" % (len(octets), octets.decode("utf-8", "surrogateescape"))


def _param_list(params: tuple[tuple[str, str], ...], utf8: bool) -> str:
    if not params:
        return "NIL"
    return "(" + " ".join(_string(k.upper(), utf8) + " " + _string(v, utf8) for k, v in params) + ")"


def _addresses(addresses: tuple[Address, ...] | None, utf8: bool) -> str:
    if not addresses:
        return "NIL"
    return "(" + "".join("(" + " ".join(_string(f, utf8) for f in a) + ")" for a in addresses) + ")"


def _envelope_text(e: Envelope, utf8: bool) -> str:
    return "(%s)" % " ".join(
        (
            _string(e.date, utf8), _string(e.subject, utf8), _addresses(e.from_, utf8),
            _addresses(e.sender, utf8), _addresses(e.reply_to, utf8), _addresses(e.to, utf8),
            _addresses(e.cc, utf8), _addresses(e.bcc, utf8), _string(e.in_reply_to, utf8),
            _string(e.message_id, utf8),
        )
    )


def _extension(p: Part, utf8: bool) -> str:
    """body-fld-dsp SP body-fld-lang SP body-fld-loc."""
    if p.disposition is None:
        dsp = "NIL"
    else:
        dsp = "(" + _string(p.disposition.upper(), utf8) + " " + _param_list(p.disposition_params, utf8) + ")"
    if not p.language:
        lang = "NIL"
    elif len(p.language) == 1:
        lang = _string(p.language[0], utf8)
    else:
        lang = "(" + " ".join(_string(tag, utf8) for tag in p.language) + ")"
    return f"{dsp} {lang} {_string(p.location, utf8)}"


def _body(p: Part, extended: bool, utf8: bool) -> str:
    if p.type == "multipart":
        children = p.children or (_empty_part(p.body_offset),)
        out = "".join(_body(child, extended, utf8) for child in children) + " " + _string(p.subtype.upper(), utf8)
        if extended:
            out += " " + _param_list(p.params, utf8) + " " + _extension(p, utf8)
        return "(" + out + ")"
    fields = [
        _string(p.type.upper(), utf8), _string(p.subtype.upper(), utf8), _param_list(p.params, utf8),
        _string(p.content_id, utf8), _string(p.description, utf8), _string(p.encoding.upper(), utf8),
        str(p.body_size),
    ]
    if p.message is not None:
        fields += [_envelope_text(p.envelope or _EMPTY_ENVELOPE, utf8), _body(p.message, extended, utf8), str(p.lines)]
    elif p.type == "text":
        fields.append(str(p.lines))
    if extended:
        fields += [_string(p.md5, utf8), _extension(p, utf8)]
    return "(" + " ".join(fields) + ")"


def bodystructure(info: MessageInfo, extended: bool = True, utf8: bool = False) -> str:
    """BODYSTRUCTURE (or BODY with ``extended=False``) of the message.

    Type, subtype, encoding, disposition and parameter names are upper-case as
    in RFC 3501's examples; values are as written.  Strings that cannot be
    quoted are literals; the result is ``str`` holding the exact octets as
    UTF-8 with surrogateescape: encode it that way to send it (literal counts
    are octets of that encoding).  ``utf8=True`` allows UTF-8 in quoted
    strings (IMAP4rev2 / UTF8=ACCEPT).
    """
    return _body(info.part, extended, utf8)


def envelope_text(info: MessageInfo, utf8: bool = False) -> str:
    """ENVELOPE of the message (same string rules as :func:`bodystructure`)."""
    return _envelope_text(info.envelope, utf8)


# ---------------------------------------------------------------------------
# Compact serialisation (JSON arrays, positional; ASCII-only output)
#
#   info     = [FORMAT_VERSION, size, part, envelope, search]
#   part     = [type, subtype, params, id, description, encoding, disposition, dparams,
#               language|null, location, md5, header_offset, header_size, body_offset,
#               body_size, lines, [part...], envelope|null, part|null]
#   params   = [name, value, name, value...]
#   envelope = [date, subject, from, sender, reply_to, to, cc, bcc, in_reply_to, message_id]
#              (address lists: [[name, adl, mailbox, host]...] | null)
#   search   = [from, to, cc, bcc, subject, date, date_tz, message_id]


def _flat(params: tuple[tuple[str, str], ...]) -> list[str]:
    return [item for pair in params for item in pair]


def _pairs(flat: list[str]) -> tuple[tuple[str, str], ...]:
    if len(flat) % 2:
        raise ValueError("odd parameter list")
    return tuple((flat[k], flat[k + 1]) for k in range(0, len(flat), 2))


def _addrs_out(addresses: tuple[Address, ...] | None) -> list | None:
    return None if addresses is None else [list(a) for a in addresses]


def _addrs_in(value: list | None) -> tuple[Address, ...] | None:
    return None if value is None else tuple(Address(*a) for a in value)


def _envelope_out(e: Envelope | None) -> list | None:
    if e is None:
        return None
    return [e.date, e.subject, _addrs_out(e.from_), _addrs_out(e.sender), _addrs_out(e.reply_to),
            _addrs_out(e.to), _addrs_out(e.cc), _addrs_out(e.bcc), e.in_reply_to, e.message_id]


def _envelope_in(value: list | None) -> Envelope | None:
    if value is None:
        return None
    date, subject, from_, sender, reply_to, to, cc, bcc, in_reply_to, message_id = value
    return Envelope(date, subject, _addrs_in(from_), _addrs_in(sender), _addrs_in(reply_to), _addrs_in(to),
                    _addrs_in(cc), _addrs_in(bcc), in_reply_to, message_id)


def _part_out(p: Part) -> list:
    return [
        p.type, p.subtype, _flat(p.params), p.content_id, p.description, p.encoding, p.disposition,
        _flat(p.disposition_params), None if p.language is None else list(p.language), p.location, p.md5,
        p.header_offset, p.header_size, p.body_offset, p.body_size, p.lines,
        [_part_out(child) for child in p.children], _envelope_out(p.envelope),
        None if p.message is None else _part_out(p.message),
    ]


def _part_in(value: list) -> Part:
    (mtype, subtype, params, content_id, description, encoding, disposition, dparams, language, location,
     md5, header_offset, header_size, body_offset, body_size, lines, children, envelope, message) = value
    return Part(
        mtype, subtype, _pairs(params), content_id, description, encoding, disposition, _pairs(dparams),
        None if language is None else tuple(language), location, md5, header_offset, header_size,
        body_offset, body_size, lines, tuple(_part_in(child) for child in children), _envelope_in(envelope),
        None if message is None else _part_in(message),
    )


def to_json(info: MessageInfo) -> str:
    """The compact, ASCII-only JSON form (8-bit header octets survive as \\udcXX escapes)."""
    s = info.search
    search = [s.from_, s.to, s.cc, s.bcc, s.subject, s.date, s.date_tz, s.message_id]
    return json.dumps(
        [FORMAT_VERSION, info.size, _part_out(info.part), _envelope_out(info.envelope), search],
        separators=(",", ":"),
    )


def from_json(text: str | bytes) -> MessageInfo:
    """Inverse of :func:`to_json`; damaged or foreign input raises MailError(CORRUPT)."""
    try:
        version, size, part, envelope, search = json.loads(text)
        if version != FORMAT_VERSION:
            raise ValueError(f"format version {version!r}")
        return MessageInfo(size, _part_in(part), _envelope_in(envelope), SearchFields(*search))
    except (ValueError, TypeError, RecursionError) as exc:
        raise MailError(ErrorKind.CORRUPT, "stored data damaged", f"message info: {exc}") from exc
