"""Token grammar of IMAP client commands: the values commands are made of.

Owns the lexical layer of RFC 9051 §9 (IMAP4rev2) and RFC 3501 §9
(IMAP4rev1) with the extensions the access server speaks: atoms, astrings,
strings (quoted, literal, literal8 -- RFC 3516/7888), nstrings, numbers,
sequence sets (with ``*`` and the SEARCHRES ``$``, RFC 5182), flags and flag
lists, dates and date-times, mailbox names (modified UTF-7, RFC 3501 §5.1.3,
or UTF-8 after ``ENABLE UTF8=ACCEPT``/``IMAP4rev2``, RFC 6855/9051), FETCH
attributes (``BODY[section]<partial>``, ``BODY.PEEK``, ``BINARY[...]``, the
macros), SEARCH keys (RFC 3501/9051 §6.4.4, ``MODSEQ`` of RFC 7162) and
STATUS items.  The commands built from these live in :mod:`.commands`.

How literals work here
======================

A command reaches the parser one line at a time.  A line that ends with a
literal's size (``{5}``, ``{5+}``, ``~{5}``) cannot be parsed further until
the literal's bytes are in, and for a synchronizing literal not before the
app has agreed to take them.  So every parse function that may meet a
string is a *generator*: at a literal it yields a :class:`LiteralSpec`
(who asks, how big, synchronizing or not, whether it is an APPEND message)
and expects to be sent back ``(payload, next_line)``.  The machine reads the
literal and the line after it and resumes the same generator, so a command
with many literals is still parsed once, in time linear in its size, and
no payload is ever copied.  Functions that cannot meet a literal (numbers,
sequence sets, flags, dates) are plain functions.

Invariants:

- Every parse function returns, yields a LiteralSpec, or raises
  :class:`GrammarError` (a ``RemoteProtocolError``), whatever the input --
  fuzzed in the tests.
- Regexes are possessive where they repeat, so no input makes the engine
  backtrack over what it matched; each sits next to the ABNF it implements.
- Numbers are bounded as the ABNF says (``number``/``nz-number``: 32 bits,
  ``number64`` and mod-sequences: 63 bits); nesting of search keys is
  bounded by ``max_depth``.
- Values come out typed and canonical where the protocol says case does not
  matter: keywords upper-cased, system flags spelled ``\\Seen``, ``INBOX``
  in any case is ``INBOX``; everything else as the client wrote it.

Logs: nothing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import re
from collections.abc import Generator, Iterable
from typing import Any, TypeVar

from intermail.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "GrammarError",
    "LiteralSpec",
    "Parse",
    "Reader",
    "SequenceSet",
    "Section",
    "FetchAttribute",
    "SearchKey",
    "SYSTEM_FLAGS",
    "SPECIAL_USE_ATTRIBUTES",
    "STATUS_ITEMS",
    "FETCH_MACROS",
    "SEARCH_RETURN_OPTIONS",
    "MAX_NUMBER",
    "MAX_NUMBER64",
    "DEFAULT_MAX_DEPTH",
    "decode_base64",
    "encode_mutf7",
    "decode_mutf7",
    "is_tag",
    "is_atom",
    "is_astring_atom",
    "run",
    "parse_sequence_set",
    "parse_string",
    "parse_astring",
    "parse_search_keys",
    "parse_fetch_attributes",
    "parse_date",
    "parse_date_time",
    "format_date_time",
]

T = TypeVar("T")

MAX_NUMBER = 2**32 - 1  # number, nz-number (RFC 9051 §9: "unsigned 32-bit integer")
MAX_NUMBER64 = 2**63 - 1  # number64, mod-sequence-value (RFC 9051 §9, RFC 7162 §7)
DEFAULT_MAX_DEPTH = 32  # nesting of search keys: "(", NOT, OR


class GrammarError(RemoteProtocolError):
    """The client's command does not match the grammar.

    ``tag`` is the command's tag once it has been read (None before: the
    answer is then an untagged BAD).
    """

    def __init__(self, text: str, tag: str | None = None):
        super().__init__(text)
        self.tag = tag


@dataclasses.dataclass(frozen=True)
class LiteralSpec:
    """What the parser yields at a literal: the bytes it needs next.

    ``message`` is True for the message of an APPEND (limited by the
    machine's ``max_append``; every other literal counts against
    ``max_literal``); ``mailbox`` is then the APPEND's target.
    """

    tag: str
    name: str  # the command, upper-case: "APPEND", "UID SEARCH", ...
    size: int
    synchronizing: bool
    binary: bool = False  # literal8, ~{n} (RFC 3516)
    message: bool = False
    mailbox: str | None = None


# What a parse function that may meet a literal returns: a generator that
# yields LiteralSpecs, is sent (payload, next_line) and returns a T.
Parse = Generator[LiteralSpec, tuple[bytes, bytes], T]


# ---------------------------------------------------------------------------
# Character classes (RFC 9051 §9)
#
#   atom-specials   = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials / resp-specials
#   list-wildcards  = "%" / "*"
#   quoted-specials = DQUOTE / "\"
#   resp-specials   = "]"
#   ATOM-CHAR       = <any CHAR except atom-specials>
#   ASTRING-CHAR    = ATOM-CHAR / resp-specials
#   list-char       = ATOM-CHAR / list-wildcards / resp-specials
#   tag             = 1*<any ASTRING-CHAR except "+">


def _char_class(exclude: str) -> bytes:
    allowed = bytes(c for c in range(0x21, 0x7F) if chr(c) not in exclude)
    return b"[" + b"".join(re.escape(bytes([c])) for c in allowed) + b"]"


_ATOM_CHAR = _char_class('(){%*"\\]')
_ASTRING_CHAR = _char_class('(){%*"\\')
_LIST_CHAR = _char_class('(){"\\')
_TAG_CHAR = _char_class('(){%*"\\+')

_ATOM = re.compile(_ATOM_CHAR + b"++")
_ASTRING_ATOM = re.compile(_ASTRING_CHAR + b"++")
_LIST_ATOM = re.compile(_LIST_CHAR + b"++")
_TAG = re.compile(_TAG_CHAR + b"++")
# Command names, search keys, fetch attribute names, options: letters, digits, "." and "-".
_WORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9.\-]*+")

# quoted = DQUOTE *QUOTED-CHAR DQUOTE
# QUOTED-CHAR = <any TEXT-CHAR except quoted-specials> / "\" quoted-specials / UTF8-2 / UTF8-3 / UTF8-4
# (TEXT-CHAR is any CHAR but CR and LF; 8-bit octets are checked as UTF-8 where text is decoded.)
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*+)"')
_UNESCAPE = re.compile(rb'\\(["\\])')

# literal  = "{" number64 ["+"] "}" CRLF *CHAR8        (RFC 9051 §9, RFC 7888)
# literal8 = "~{" number64 ["+"] "}" CRLF *OCTET       (RFC 3516, RFC 7888)
# The size is matched with up to 20 digits so that an absurd size is still
# seen as a literal (and refused as too big), never as garbage.
_LITERAL = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}")
LITERAL_AT_END = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")

# number = 1*DIGIT; nz-number = digit-nz *DIGIT
_NUMBER = re.compile(rb"[0-9]++")
# sequence-set = (seq-number / seq-range) ["," sequence-set] / "$"   (RFC 9051 §9, RFC 5182)
# seq-number = nz-number / "*"; seq-range = seq-number ":" seq-number
_SEQ_NUMBER = rb"(?:[0-9]++|\*)"
_SEQUENCE_SET = re.compile(
    rb"\$|" + _SEQ_NUMBER + rb"(?::" + _SEQ_NUMBER + rb")?+(?:," + _SEQ_NUMBER + rb"(?::" + _SEQ_NUMBER + rb")?+)*+"
)

# flag = "\Answered" / "\Flagged" / "\Deleted" / "\Seen" / "\Draft" / flag-keyword / flag-extension
# flag-keyword = "$MDNSent" / "$Forwarded" / ... / atom; flag-extension = "\" atom
_FLAG = re.compile(rb"\\?+" + _ATOM_CHAR + b"++")

# date = date-text / DQUOTE date-text DQUOTE; date-text = date-day "-" date-month "-" date-year
# date-day = 1*2DIGIT; date-year = 4DIGIT
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
# date-time = DQUOTE date-day-fixed "-" date-month "-" date-year SP time SP zone DQUOTE
# date-day-fixed = (SP DIGIT) / 2DIGIT; time = 2DIGIT ":" 2DIGIT ":" 2DIGIT; zone = ("+" / "-") 4DIGIT
_DATE_TIME = re.compile(
    rb'"([ 0-9][0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"'
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name.upper().encode(): index + 1 for index, name in enumerate(MONTHS)}

# section-part = nz-number *("." nz-number)
_SECTION_PART = re.compile(rb"[0-9]++(?:\.[0-9]++)*+")
# partial = "<" number64 "." nz-number64 ">"  (RFC 9051; RFC 3501: number "." nz-number)
_PARTIAL = re.compile(rb"<([0-9]{1,20})\.([0-9]{1,20})>")
# header-fld-name = astring; its text must be a field name (RFC 5322 ftext: %d33-57 / %d59-126)
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# base64 = *(4base64-char) [base64-terminal]  (RFC 9051 §9)
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?+")

SYSTEM_FLAGS = {name.lower(): name for name in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft",
                                                "\\Recent")}
# use-attr (RFC 6154 §6)
SPECIAL_USE_ATTRIBUTES = {name.lower(): name for name in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk",
                                                          "\\Sent", "\\Trash")}
# status-att (RFC 9051 §9; RECENT of RFC 3501; HIGHESTMODSEQ of RFC 7162; APPENDLIMIT of RFC 7889)
STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE",
                          "HIGHESTMODSEQ", "APPENDLIMIT"})
# search-return-opt (RFC 4731 §3.1, SAVE of RFC 5182)
SEARCH_RETURN_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})


def is_tag(text: object) -> bool:
    """Whether ``text`` is a valid command tag (and so safe to echo in a response)."""
    return isinstance(text, str) and text.isascii() and _TAG.fullmatch(text.encode()) is not None


def is_atom(text: object) -> bool:
    return isinstance(text, str) and text.isascii() and _ATOM.fullmatch(text.encode()) is not None


def is_astring_atom(data: bytes) -> bool:
    """Whether ``data`` can be sent as an astring without quotes (1*ASTRING-CHAR)."""
    return _ASTRING_ATOM.fullmatch(data) is not None


# ---------------------------------------------------------------------------
# Value types


@dataclasses.dataclass(frozen=True)
class SequenceSet:
    """A sequence set as written: ranges of message numbers or UIDs, ``None`` for ``*``.

    A single number ``5`` is the range ``(5, 5)``; ``4:2`` stays ``(4, 2)``
    (it means ``2:4``, RFC 9051 §9: see :meth:`resolve`).  ``saved`` is the
    SEARCHRES ``$``: the result of the last ``SEARCH RETURN (SAVE)``.
    """

    ranges: tuple[tuple[int | None, int | None], ...] = ()
    saved: bool = False

    def __str__(self) -> str:
        if self.saved:
            return "$"
        parts = []
        for low, high in self.ranges:
            a = "*" if low is None else str(low)
            parts.append(a if low == high else f"{a}:{'*' if high is None else high}")
        return ",".join(parts)

    def resolve(self, largest: int) -> tuple[tuple[int, int], ...]:
        """Ordered ``(low, high)`` ranges with ``*`` replaced by ``largest`` (0 in an empty mailbox).

        Ranges are returned sorted and merged; numbers above ``largest`` are
        kept (the caller decides whether they matter: a UID range may name
        UIDs that no longer exist).
        """
        if self.saved:
            raise LocalProtocolError("the saved search result ($) is resolved by the app")
        spans = []
        for low, high in self.ranges:
            a = largest if low is None else low
            b = largest if high is None else high
            spans.append((min(a, b), max(a, b)))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return tuple(merged)

    def contains(self, number: int, largest: int) -> bool:
        return any(a <= number <= b for a, b in self.resolve(largest))

    @classmethod
    def of(cls, numbers: Iterable[int]) -> SequenceSet:
        """The shortest set of ranges covering ``numbers`` (e.g. for ESEARCH ALL or COPYUID)."""
        ranges: list[tuple[int, int]] = []
        for number in sorted(set(numbers)):
            if type(number) is not int or not 1 <= number <= MAX_NUMBER:
                raise LocalProtocolError(f"not a message number or UID: {number!r}")
            if ranges and number == ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], number)
            else:
                ranges.append((number, number))
        return cls(tuple(ranges))


@dataclasses.dataclass(frozen=True)
class Section:
    """A FETCH body section (RFC 9051 §6.4.5): ``[1.2.HEADER.FIELDS (From To)]``.

    ``part`` is the section-part (``()`` for the whole message); ``text``
    one of ``HEADER``, ``HEADER.FIELDS``, ``HEADER.FIELDS.NOT``, ``TEXT``,
    ``MIME`` or None; ``fields`` the header-list, as written.
    """

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        pieces = [".".join(map(str, self.part))] if self.part else []
        if self.text:
            pieces.append(self.text)
        spec = ".".join(pieces)
        if self.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            spec += " (" + " ".join(_astring_text(name) for name in self.fields) + ")"
        return spec


def _astring_text(text: str) -> str:
    """``text`` as an atom when it is one, else as a quoted string (for names we echo)."""
    if text and _ASTRING_ATOM.fullmatch(text.encode("utf-8")):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclasses.dataclass(frozen=True)
class FetchAttribute:
    """One FETCH data item (RFC 9051 §6.4.5, RFC 3516 BINARY, RFC 7162 MODSEQ).

    ``name`` is upper-case: ``ENVELOPE``, ``FLAGS``, ``INTERNALDATE``,
    ``RFC822``, ``RFC822.HEADER``, ``RFC822.SIZE``, ``RFC822.TEXT``,
    ``BODY``, ``BODYSTRUCTURE``, ``UID``, ``MODSEQ``, or one with a section:
    ``BODY``, ``BODY.PEEK``, ``BINARY``, ``BINARY.PEEK``, ``BINARY.SIZE``.
    ``partial`` is ``(offset, count)``.
    """

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None

    @property
    def sets_seen(self) -> bool:
        """True for the items that set ``\\Seen`` (RFC 9051 §6.4.5): BODY[...], BINARY[...], RFC822, RFC822.TEXT."""
        return self.name in ("RFC822", "RFC822.TEXT") or (self.section is not None and self.name in ("BODY",
                                                                                                     "BINARY"))

    @property
    def response_name(self) -> str:
        """The item's name in the FETCH response: no ``.PEEK``, only the partial's origin."""
        name = self.name.removesuffix(".PEEK")
        if self.section is None:
            return name
        result = f"{name}[{self.section}]"
        if self.partial is not None:
            result += f"<{self.partial[0]}>"
        return result

    def __str__(self) -> str:
        if self.section is None:
            return self.name
        result = f"{self.name}[{self.section}]"
        if self.partial is not None:
            result += f"<{self.partial[0]}.{self.partial[1]}>"
        return result


# fetch macros (RFC 9051 §6.4.5)
FETCH_MACROS = {
    "ALL": (FetchAttribute("FLAGS"), FetchAttribute("INTERNALDATE"), FetchAttribute("RFC822.SIZE"),
            FetchAttribute("ENVELOPE")),
    "FAST": (FetchAttribute("FLAGS"), FetchAttribute("INTERNALDATE"), FetchAttribute("RFC822.SIZE")),
    "FULL": (FetchAttribute("FLAGS"), FetchAttribute("INTERNALDATE"), FetchAttribute("RFC822.SIZE"),
             FetchAttribute("ENVELOPE"), FetchAttribute("BODY")),
}
_SIMPLE_FETCH = frozenset({"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
                           "RFC822.TEXT", "BODYSTRUCTURE", "UID", "MODSEQ"})


@dataclasses.dataclass(frozen=True)
class SearchKey:
    """One node of a search program (RFC 9051 §6.4.4).

    ``name`` is the upper-case key (``SEEN``, ``FROM``, ``OR``...);
    ``args`` its arguments in wire order: ``str`` for strings (decoded, see
    :meth:`Reader.search_text`), ``datetime.date`` for dates, ``int`` for
    numbers, :class:`SequenceSet` for ``UID`` and for a bare sequence set
    (name ``SEQUENCE``), nested keys for ``NOT``/``OR``, and the members of
    a parenthesized list for ``AND``.  ``MODSEQ`` has ``(value,)`` or
    ``(entry_name, entry_type, value)`` (RFC 7162 §3.1.5).
    """

    name: str
    args: tuple[Any, ...] = ()


# search-key table: name -> argument kinds (RFC 9051 §9 search-key, RFC 3501 NEW/OLD/RECENT/UNKEYWORD...)
_ASTR, _DATE_ARG, _KEYWORD, _NUM64, _KEY, _SEQ, _FIELD = "astring", "date", "keyword", "number64", "key", "seq", "field"
_SEARCH_KEYS: dict[str, tuple[str, ...]] = {
    "ALL": (), "ANSWERED": (), "DELETED": (), "DRAFT": (), "FLAGGED": (), "SEEN": (),
    "UNANSWERED": (), "UNDELETED": (), "UNDRAFT": (), "UNFLAGGED": (), "UNSEEN": (),
    "NEW": (), "OLD": (), "RECENT": (),
    "BCC": (_ASTR,), "BODY": (_ASTR,), "CC": (_ASTR,), "FROM": (_ASTR,), "SUBJECT": (_ASTR,),
    "TEXT": (_ASTR,), "TO": (_ASTR,),
    "BEFORE": (_DATE_ARG,), "ON": (_DATE_ARG,), "SINCE": (_DATE_ARG,),
    "SENTBEFORE": (_DATE_ARG,), "SENTON": (_DATE_ARG,), "SENTSINCE": (_DATE_ARG,),
    "KEYWORD": (_KEYWORD,), "UNKEYWORD": (_KEYWORD,),
    "LARGER": (_NUM64,), "SMALLER": (_NUM64,),
    "HEADER": (_FIELD, _ASTR),
    "NOT": (_KEY,), "OR": (_KEY, _KEY),
    "UID": (_SEQ,),
}  # fmt: skip


def decode_base64(data: bytes) -> bytes:
    """A client's SASL response line (RFC 9051 §6.2.2): base64, or empty / ``=`` for no data."""
    if data in (b"", b"="):
        return b""
    if _BASE64.fullmatch(data) is None:
        raise GrammarError("Invalid base64 in SASL response")
    return base64.b64decode(data)


# ---------------------------------------------------------------------------
# Modified UTF-7 (RFC 3501 §5.1.3)
#
# Printable US-ASCII (0x20-0x7e) but "&" stands for itself; "&" is "&-";
# any other run of characters is "&" + modified BASE64 (RFC 2152 with ","
# for "/", no padding) of its UTF-16BE + "-".


def encode_mutf7(name: str) -> str:
    """``name`` in modified UTF-7; LocalProtocolError if it holds a lone surrogate."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            try:
                raw = "".join(run).encode("utf-16-be")
            except UnicodeEncodeError:
                raise LocalProtocolError(f"mailbox name {name!r} is not valid text") from None
            out.append("&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",").decode("ascii") + "-")
            run.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


_MUTF7_RUN = re.compile(r"&([A-Za-z0-9+,]*+)-")


def decode_mutf7(text: str) -> str:
    """Decode a modified UTF-7 name; GrammarError unless it is in the one canonical form.

    Canonical means what :func:`encode_mutf7` produces: no printable ASCII
    inside a BASE64 run, no two runs back to back, no stray padding bits.
    """
    out: list[str] = []
    position = 0
    while position < len(text):
        amp = text.find("&", position)
        plain = text[position:] if amp < 0 else text[position:amp]
        if any(not " " <= char <= "~" for char in plain):
            raise GrammarError("Mailbox name is not valid modified UTF-7")
        out.append(plain)
        if amp < 0:
            break
        match = _MUTF7_RUN.match(text, amp)
        if match is None:
            raise GrammarError("Mailbox name is not valid modified UTF-7")
        run = match.group(1)
        if not run:
            out.append("&")
        else:
            try:
                raw = base64.b64decode(run.replace(",", "/") + "=" * (-len(run) % 4), validate=True)
                out.append(raw.decode("utf-16-be"))
            except (binascii.Error, ValueError):
                raise GrammarError("Mailbox name is not valid modified UTF-7") from None
        position = match.end()
    result = "".join(out)
    try:
        canonical = encode_mutf7(result)
    except LocalProtocolError:
        canonical = None
    if canonical != text:
        raise GrammarError("Mailbox name is not canonical modified UTF-7")
    return result


# ---------------------------------------------------------------------------
# Dates


def _month(name: bytes) -> int:
    month = _MONTH_NUMBER.get(name.upper())
    if month is None:
        raise GrammarError("Invalid month in date")
    return month


def format_date_time(value: datetime.datetime) -> str:
    """``value`` as an IMAP date-time without the quotes: ``17-Jul-1996 02:44:25 -0700``."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise LocalProtocolError("an IMAP date-time needs a time zone")
    offset = value.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return (f"{value.day:2d}-{MONTHS[value.month - 1]}-{value.year:04d} "
            f"{value.hour:02d}:{value.minute:02d}:{value.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}")


# ---------------------------------------------------------------------------
# The reader


class Reader:
    """A cursor over one command: its current line, literals come through the generators.

    ``utf8`` says how mailbox names are encoded: UTF-8 (IMAP4rev2 and
    after ``ENABLE UTF8=ACCEPT``) or modified UTF-7.  ``tag`` and ``name``
    are set by the command parser as soon as it has read them; they go into
    every LiteralSpec and GrammarError.
    """

    def __init__(self, line: bytes, *, utf8: bool = False, max_depth: int = DEFAULT_MAX_DEPTH):
        self.line = line
        self.pos = 0
        self.utf8 = utf8
        self.max_depth = max_depth
        self.depth = 0
        self.tag: str | None = None
        self.name = ""
        self.last_literal_binary = False
        self._search_charset: str | None = None

    # -- basics

    def error(self, what: str) -> GrammarError:
        prefix = f"{self.name}: " if self.name else ""
        return GrammarError(f"{prefix}{what}", self.tag)

    def expected(self, what: str) -> GrammarError:
        if self.at_end():
            return self.error(f"missing {what}")
        return self.error(f"expected {what}")

    def at_end(self) -> bool:
        return self.pos >= len(self.line)

    def peek(self) -> int:
        """The next octet, or -1 at the end of the line."""
        return self.line[self.pos] if self.pos < len(self.line) else -1

    def take(self, regex: re.Pattern[bytes]) -> re.Match[bytes] | None:
        match = regex.match(self.line, self.pos)
        if match is not None:
            self.pos = match.end()
        return match

    def expect(self, token: bytes, what: str) -> None:
        if not self.line.startswith(token, self.pos):
            raise self.expected(what)
        self.pos += len(token)

    def sp(self) -> None:
        self.expect(b" ", "arguments" if self.at_end() else "a space")

    def open_paren(self, what: str) -> None:
        self.expect(b"(", what)

    def close_paren(self) -> None:
        self.expect(b")", '")"')

    def end(self) -> None:
        """The command must end here."""
        if not self.at_end():
            raise self.error("unexpected characters after the arguments")

    def word(self, what: str) -> str:
        """A keyword (command name, option, item), upper-cased."""
        match = self.take(_WORD)
        if match is None:
            raise self.expected(what)
        return match.group().decode("ascii").upper()

    def try_word(self, word: str) -> bool:
        """Consume ``word`` (case-insensitively) if it is next, as a whole word."""
        match = _WORD.match(self.line, self.pos)
        if match is not None and match.group().decode("ascii").upper() == word:
            self.pos = match.end()
            return True
        return False

    def tag_(self) -> str:
        """tag, which must be followed by SP or the end of the line (else the tag itself is garbled)."""
        match = self.take(_TAG)
        if match is None or self.peek() not in (0x20, -1):
            raise GrammarError("Invalid tag" if self.line else "Empty command line")
        self.tag = match.group().decode("ascii")
        return self.tag

    def atom(self, what: str = "an atom") -> str:
        match = self.take(_ATOM)
        if match is None:
            raise self.expected(what)
        return match.group().decode("ascii")

    # -- numbers

    def number(self, what: str = "a number", *, limit: int = MAX_NUMBER, minimum: int = 0) -> int:
        match = self.take(_NUMBER)
        if match is None:
            raise self.expected(what)
        digits = match.group()
        if len(digits) > 20 or not minimum <= int(digits) <= limit:
            raise self.error(f"{what} out of range")
        return int(digits)

    def nz_number(self, what: str = "a non-zero number") -> int:
        return self.number(what, minimum=1)

    def number64(self, what: str = "a number") -> int:
        return self.number(what, limit=MAX_NUMBER64)

    def mod_sequence(self, *, zero: bool) -> int:
        """mod-sequence-value (1..2^63-1), or mod-sequence-valzer (0..) when ``zero`` (RFC 7162 §7)."""
        return self.number("a mod-sequence", limit=MAX_NUMBER64, minimum=0 if zero else 1)

    def sequence_set(self) -> SequenceSet:
        match = self.take(_SEQUENCE_SET)
        if match is None:
            raise self.expected("a sequence set")
        text = match.group()
        if text == b"$":
            return SequenceSet(saved=True)
        ranges = []
        for item in text.split(b","):
            low, colon, high = item.partition(b":")
            first = self._seq_number(low)
            ranges.append((first, self._seq_number(high) if colon else first))
        return SequenceSet(tuple(ranges))

    def _seq_number(self, digits: bytes) -> int | None:
        if digits == b"*":
            return None
        if digits[:1] == b"0" or len(digits) > 10 or int(digits) > MAX_NUMBER:
            raise self.error("invalid number in sequence set")
        return int(digits)

    # -- strings

    def quoted(self) -> bytes:
        match = self.take(_QUOTED)
        if match is None:
            raise self.expected("a quoted string")
        return _UNESCAPE.sub(rb"\1", match.group(1))

    def literal(self, *, message: bool = False, mailbox: str | None = None, binary_ok: bool = False) -> Parse[bytes]:
        """A literal: yields its LiteralSpec, is sent (payload, next line), returns the payload."""
        match = _LITERAL.match(self.line, self.pos)
        if match is None:
            raise self.expected("a literal")
        binary = bool(match.group(1))
        if binary and not binary_ok:
            raise self.error("literal8 (~{n}) is only allowed for APPEND data")
        if match.end() != len(self.line):
            raise self.error("a literal's size must end the line")
        self.pos = match.end()
        size = int(match.group(2))
        spec = LiteralSpec(self.tag or "*", self.name, size, not match.group(3), binary, message, mailbox)
        payload, next_line = yield spec
        if len(payload) != size:
            raise LocalProtocolError(f"literal of {size} octets resumed with {len(payload)}")
        if not binary and b"\x00" in payload:
            raise self.error("NUL octet in a literal (use literal8)")
        self.line, self.pos = next_line, 0
        self.last_literal_binary = binary
        return payload

    def string(self) -> Parse[bytes]:
        """string = quoted / literal."""
        if self.peek() == 0x22:
            return self.quoted()
        if self.peek() in (0x7B, 0x7E):
            return (yield from self.literal())
        raise self.expected("a string")

    def astring(self) -> Parse[bytes]:
        """astring = 1*ASTRING-CHAR / string."""
        match = self.take(_ASTRING_ATOM)
        if match is not None:
            return match.group()
        return (yield from self.string())

    def nstring(self) -> Parse[bytes | None]:
        """nstring = string / nil."""
        if self.peek() not in (0x22, 0x7B) and self.try_word("NIL"):
            return None
        return (yield from self.string())

    def text(self, raw: bytes, what: str) -> str:
        """Decode UTF-8 text (a user name, a password, an ID value...)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    # -- mailboxes

    def mailbox(self) -> Parse[str]:
        """mailbox = "INBOX" / astring, decoded; ``INBOX`` in any case is ``INBOX``."""
        raw = yield from self.astring()
        name = self.decode_mailbox(raw)
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> Parse[str]:
        """list-mailbox = 1*list-char / string, decoded like a mailbox name (wildcards kept)."""
        match = self.take(_LIST_ATOM)
        raw = match.group() if match is not None else (yield from self.string())
        return self.decode_mailbox(raw)

    def decode_mailbox(self, raw: bytes) -> str:
        if self.utf8:
            name = self.text(raw, "mailbox name")
        else:
            if not raw.isascii():
                raise self.error("8-bit mailbox name without UTF8=ACCEPT (use modified UTF-7)")
            try:
                name = decode_mutf7(raw.decode("ascii"))
            except GrammarError as exc:
                raise self.error(exc.text) from None
        if "\x00" in name:
            raise self.error("NUL in mailbox name")
        return name

    # -- flags

    def flag(self) -> str:
        match = self.take(_FLAG)
        if match is None:
            raise self.expected("a flag")
        text = match.group().decode("ascii")
        if text.startswith("\\"):
            if len(text) == 1:
                raise self.error("a flag needs a name after the backslash")
            return SYSTEM_FLAGS.get(text.lower(), text)
        return text

    def flag_list(self) -> tuple[str, ...]:
        """flag-list = "(" [flag *(SP flag)] ")"."""
        self.open_paren("a flag list")
        flags = []
        if self.peek() != 0x29:
            flags.append(self.flag())
            while self.peek() == 0x20:
                self.pos += 1
                flags.append(self.flag())
        self.close_paren()
        return tuple(flags)

    # -- dates

    def date(self) -> datetime.date:
        """date = date-text / DQUOTE date-text DQUOTE."""
        quoted = self.peek() == 0x22
        if quoted:
            self.pos += 1
        match = self.take(_DATE)
        if match is None:
            raise self.expected("a date (dd-Mon-yyyy)")
        if quoted:
            self.expect(b'"', "the closing quote of the date")
        try:
            return datetime.date(int(match.group(3)), _month(match.group(2)), int(match.group(1)))
        except ValueError:
            raise self.error("no such date") from None

    def date_time(self) -> datetime.datetime:
        match = self.take(_DATE_TIME)
        if match is None:
            raise self.expected('a date-time ("dd-Mon-yyyy hh:mm:ss +zzzz")')
        day, month, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
        try:
            offset = datetime.timedelta(hours=int(zone_h), minutes=int(zone_m))
            if int(zone_m) > 59:
                raise ValueError("zone minutes")
            zone = datetime.timezone(-offset if sign == b"-" else offset)
            return datetime.datetime(int(year), _month(month), int(day.strip() or b"0"), int(hour), int(minute),
                                     int(second), tzinfo=zone)
        except ValueError:
            raise self.error("no such date-time") from None

    # -- lists

    def paren_words(self, what: str, *, allow_empty: bool = True) -> tuple[str, ...]:
        """ "(" [word *(SP word)] ")" -- options, capabilities, status items."""
        self.open_paren(f"a list of {what}")
        words = []
        if self.peek() != 0x29 or not allow_empty:
            words.append(self.word(what))
            while self.peek() == 0x20:
                self.pos += 1
                words.append(self.word(what))
        self.close_paren()
        return tuple(words)

    def status_items(self) -> tuple[str, ...]:
        """ "(" status-att *(SP status-att) ")" """
        items = self.paren_words("status items", allow_empty=False)
        for item in items:
            if item not in STATUS_ITEMS:
                raise self.error(f"unknown status item {item}")
        return items

    # -- FETCH

    def fetch_attribute(self) -> Parse[FetchAttribute]:
        """fetch-att (RFC 9051 §9, RFC 3516, RFC 7162)."""
        name = self.word("a fetch attribute")
        if name in _SIMPLE_FETCH:
            return FetchAttribute(name)
        if name == "BODY" and self.peek() != 0x5B:
            return FetchAttribute("BODY")
        if name in ("BODY", "BODY.PEEK"):
            section = yield from self.section()
            return FetchAttribute(name, section, self.partial())
        if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
            # section-binary = "[" [section-part] "]"
            self.expect(b"[", '"["')
            part = self.section_part() if self.peek() != 0x5D else ()
            self.expect(b"]", '"]"')
            partial = self.partial() if name != "BINARY.SIZE" else None
            return FetchAttribute(name, Section(part), partial)
        raise self.error(f"unknown fetch attribute {name}")

    def section_part(self) -> tuple[int, ...]:
        match = self.take(_SECTION_PART)
        if match is None:
            raise self.expected("a section part")
        numbers = []
        for digits in match.group().split(b"."):
            if digits[:1] == b"0" or len(digits) > 10 or int(digits) > MAX_NUMBER:
                raise self.error("invalid section part")
            numbers.append(int(digits))
        return tuple(numbers)

    def section(self) -> Parse[Section]:
        """section = "[" [section-spec] "]"

        section-spec = section-msgtext / (section-part ["." section-text])
        section-msgtext = "HEADER" / "HEADER.FIELDS" [".NOT"] SP header-list / "TEXT"
        section-text = section-msgtext / "MIME"
        """
        self.expect(b"[", '"["')
        part: tuple[int, ...] = ()
        text = None
        fields: tuple[str, ...] = ()
        if 0x30 <= self.peek() <= 0x39:
            part = self.section_part()
            if self.peek() == 0x2E:
                self.pos += 1
                text = self.word("a section text")
        elif self.peek() != 0x5D:
            text = self.word("a section text")
        if text is not None:
            if text not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME") or (
                text == "MIME" and not part
            ):
                raise self.error(f"invalid section {text}")
            if text.startswith("HEADER.FIELDS"):
                self.sp()
                fields = yield from self.header_list()
        self.expect(b"]", '"]"')
        return Section(part, text, fields)

    def header_list(self) -> Parse[tuple[str, ...]]:
        """header-list = "(" header-fld-name *(SP header-fld-name) ")"."""
        self.open_paren("a header list")
        names = [(yield from self.field_name())]
        while self.peek() == 0x20:
            self.pos += 1
            names.append((yield from self.field_name()))
        self.close_paren()
        return tuple(names)

    def field_name(self) -> Parse[str]:
        raw = yield from self.astring()
        name = raw.decode("latin-1")
        if not _FIELD_NAME.fullmatch(name):
            raise self.error("invalid header field name")
        return name

    def partial(self) -> tuple[int, int] | None:
        if self.peek() != 0x3C:
            return None
        match = self.take(_PARTIAL)
        if match is None:
            raise self.expected("a partial <offset.count>")
        offset, count = int(match.group(1)), int(match.group(2))
        if offset > MAX_NUMBER64 or not 1 <= count <= MAX_NUMBER64:
            raise self.error("invalid partial range")
        return offset, count

    def fetch_attributes(self) -> Parse[tuple[FetchAttribute, ...]]:
        """ "ALL" / "FULL" / "FAST" / fetch-att / "(" fetch-att *(SP fetch-att) ")" """
        if self.peek() == 0x28:
            self.pos += 1
            attributes = [(yield from self.fetch_attribute())]
            while self.peek() == 0x20:
                self.pos += 1
                attributes.append((yield from self.fetch_attribute()))
            self.close_paren()
            return tuple(attributes)
        for macro, expansion in FETCH_MACROS.items():
            if self.try_word(macro):
                return expansion
        return ((yield from self.fetch_attribute()),)

    # -- SEARCH

    def set_search_charset(self, charset: str | None) -> None:
        self._search_charset = charset

    def search_text(self, raw: bytes) -> str:
        """A search string as text.

        With no CHARSET, or UTF-8 / US-ASCII, it must be UTF-8.  With any
        other charset it is decoded as Latin-1, which maps each octet to one
        character: the app re-encodes with ``.encode("latin-1")`` and
        decodes with the charset it supports, or answers NO [BADCHARSET].
        """
        charset = (self._search_charset or "UTF-8").upper()
        if charset in ("UTF-8", "US-ASCII"):
            return self.text(raw, "search string")
        return raw.decode("latin-1")

    def search_keys(self) -> Parse[tuple[SearchKey, ...]]:
        """search-key *(SP search-key)  -- to the end of the command."""
        keys = [(yield from self.search_key())]
        while not self.at_end():
            self.sp()
            keys.append((yield from self.search_key()))
        return tuple(keys)

    def search_key(self) -> Parse[SearchKey]:
        char = self.peek()
        if char == 0x28:  # "(" search-key *(SP search-key) ")"
            self._deeper()
            self.pos += 1
            keys = [(yield from self.search_key())]
            while self.peek() == 0x20:
                self.pos += 1
                keys.append((yield from self.search_key()))
            self.close_paren()
            self.depth -= 1
            return SearchKey("AND", tuple(keys))
        if 0x30 <= char <= 0x39 or char in (0x2A, 0x24):  # digit, "*", "$": a sequence set
            return SearchKey("SEQUENCE", (self.sequence_set(),))
        name = self.word("a search key")
        if name == "MODSEQ":
            return self._search_modseq()
        kinds = _SEARCH_KEYS.get(name)
        if kinds is None:
            raise self.error(f"unknown search key {name}")
        args: list[Any] = []
        for kind in kinds:
            self.sp()
            if kind == _ASTR:
                args.append(self.search_text((yield from self.astring())))
            elif kind == _DATE_ARG:
                args.append(self.date())
            elif kind == _KEYWORD:
                args.append(self.atom("a keyword"))
            elif kind == _NUM64:
                args.append(self.number64())
            elif kind == _SEQ:
                args.append(self.sequence_set())
            elif kind == _FIELD:
                args.append((yield from self.field_name()))
            else:  # _KEY
                self._deeper()
                args.append((yield from self.search_key()))
                self.depth -= 1
        return SearchKey(name, tuple(args))

    def _search_modseq(self) -> SearchKey:
        """search-modsequence = "MODSEQ" [search-modseq-ext] SP mod-sequence-valzer

        search-modseq-ext = SP entry-name SP entry-type-req
        entry-name = DQUOTE "/flags/" attr-flag DQUOTE; entry-type-req = "priv" / "shared" / "all"
        """
        self.sp()
        if self.peek() == 0x22:
            entry = self.quoted().decode("latin-1")
            if not entry.lower().startswith("/flags/") or len(entry) == 7:
                raise self.error("MODSEQ entry name must be /flags/<flag>")
            self.sp()
            kind = self.word("an entry type").lower()
            if kind not in ("priv", "shared", "all"):
                raise self.error("MODSEQ entry type must be priv, shared or all")
            self.sp()
            return SearchKey("MODSEQ", (entry, kind, self.mod_sequence(zero=True)))
        return SearchKey("MODSEQ", (self.mod_sequence(zero=True),))

    def _deeper(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise self.error("search keys nested too deeply")

    # -- SASL

    def base64(self) -> bytes:
        """base64 (RFC 9051 §9); ``=`` is the empty initial response (RFC 4959)."""
        if self.line.startswith(b"=", self.pos) and self.pos + 1 == len(self.line):
            self.pos += 1
            return b""
        match = self.take(_BASE64)
        if match is None or not match.group():
            raise self.expected("base64 data")
        return base64.b64decode(match.group())


# ---------------------------------------------------------------------------
# Standalone parsing (tests, tools): drive a parse generator over wire bytes


def run(parse: Any, data: bytes, *, utf8: bool = False, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Apply ``parse(reader)`` to ``data`` as it appears on the wire, literals inline.

    The whole of ``data`` must be consumed; literals (``{n}\\r\\n...``) are
    taken from ``data`` as the machine would take them from the stream.
    Raises GrammarError for anything else.
    """
    end = data.find(b"\r\n")
    first, rest = (data, b"") if end < 0 else (data[:end], data[end + 2 :])
    if end >= 0 and not LITERAL_AT_END.search(first):
        raise GrammarError("unexpected CRLF")
    reader = Reader(first, utf8=utf8, max_depth=max_depth)
    result = parse(reader)
    if not isinstance(result, Generator):
        reader.end()
        if rest:
            raise GrammarError("unexpected data after the value")
        return result
    try:
        spec = next(result)
        while True:
            if len(rest) < spec.size:
                raise GrammarError("literal shorter than its size")
            payload, rest = rest[: spec.size], rest[spec.size :]
            end = rest.find(b"\r\n")
            line, rest = (rest, b"") if end < 0 else (rest[:end], rest[end + 2 :])
            if end >= 0 and not LITERAL_AT_END.search(line):
                raise GrammarError("unexpected CRLF")
            spec = result.send((payload, line))
    except StopIteration as stop:
        reader.end()
        if rest:
            raise GrammarError("unexpected data after the value") from None
        return stop.value


def parse_sequence_set(text: str | bytes) -> SequenceSet:
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    return run(Reader.sequence_set, data)


def parse_string(data: bytes) -> bytes:
    """A quoted string or literal, as rendered on the wire."""
    return run(Reader.string, data)


def parse_astring(data: bytes) -> bytes:
    return run(Reader.astring, data)


def parse_search_keys(data: bytes, *, charset: str | None = None, max_depth: int = DEFAULT_MAX_DEPTH
                      ) -> tuple[SearchKey, ...]:
    def parse(reader: Reader) -> Parse[tuple[SearchKey, ...]]:
        reader.set_search_charset(charset)
        return (yield from reader.search_keys())

    return run(parse, data, max_depth=max_depth)


def parse_fetch_attributes(data: bytes) -> tuple[FetchAttribute, ...]:
    return run(Reader.fetch_attributes, data)


def parse_date(data: bytes) -> datetime.date:
    return run(Reader.date, data)


def parse_date_time(data: bytes) -> datetime.datetime:
    return run(Reader.date_time, data)
