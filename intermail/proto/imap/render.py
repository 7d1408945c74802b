"""Rendering IMAP response data: strings, lists, FETCH, LIST, STATUS and SEARCH responses.

Owns how values go on the wire in server responses (RFC 9051 §4 and §7):
a string is quoted when it can be, a literal when it must (CR, LF, NUL,
8-bit octets the client has not enabled, or longer than
:data:`MAX_QUOTED`); None is ``NIL``; a sequence is a parenthesized list;
mailbox names are modified UTF-7 (RFC 3501 §5.1.3) unless the client has
enabled UTF-8.  The app builds the payload of an
:class:`~.server.Untagged` response with these functions; the machine
checks the result once more before it goes out.

Values :func:`value` accepts:

============================ ==============================================
``None``                     ``NIL``
``int`` (>= 0)               a number
``str``                      a string (UTF-8), quoted or literal
``bytes``                    a string, quoted or literal
:class:`Atom`                its text as is (``\\Seen``, ``FLAGS``, ``BODY[1]``)
:class:`Literal`             a literal even if it could be quoted (``~{n}`` when binary)
:class:`Raw`                 pre-rendered bytes (an ENVELOPE stored at delivery)
``list`` / ``tuple``         ``(`` values separated by spaces ``)``
:class:`~.grammar.SequenceSet` its text (``1:3,7``)
============================ ==============================================

Invariants: the output of every function here parses back to the value
(checked by round-trip tests with :mod:`.grammar`); it never contains a CR
or LF outside a literal; a value that cannot be rendered is a
``LocalProtocolError`` (our bug, never the peer's).

Logs: nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable, Sequence

from intermail.errors import LocalProtocolError
from intermail.proto.imap.grammar import (
    SYSTEM_FLAGS,
    FetchAttribute,
    SequenceSet,
    encode_mutf7,
    format_date_time,
    is_astring_atom,
    is_atom,
)

__all__ = [
    "MAX_QUOTED",
    "Atom",
    "Literal",
    "Raw",
    "value",
    "values",
    "string",
    "astring",
    "nstring",
    "literal",
    "mailbox",
    "flags",
    "date_time",
    "fetch",
    "list_response",
    "status_response",
    "search_response",
    "esearch_response",
    "check_response_data",
]

MAX_QUOTED = 1024  # longer strings go as literals: cheaper for both sides to scan

_NEEDS_LITERAL_7BIT = re.compile(rb"[\x00\r\n\x80-\xff]")
_NEEDS_LITERAL_8BIT = re.compile(rb"[\x00\r\n]")
_ESCAPE = re.compile(rb'(["\\])')
_LITERAL_BEFORE = re.compile(rb"~?\{([0-9]{1,20})\}\Z")


@dataclasses.dataclass(frozen=True)
class Atom:
    """Text that goes on the wire as is: flag names, item names, keywords."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text or any(c in self.text for c in "\r\n\x00"):
            raise LocalProtocolError(f"not an atom: {self.text!r}")


@dataclasses.dataclass(frozen=True)
class Literal:
    """Octets to send as a literal whatever they hold; ``binary`` makes it a literal8 (``~{n}``)."""

    data: bytes
    binary: bool = False


@dataclasses.dataclass(frozen=True)
class Raw:
    """Bytes already rendered (e.g. an ENVELOPE or BODYSTRUCTURE computed at delivery)."""

    data: bytes


def literal(data: bytes, *, binary: bool = False) -> bytes:
    return (b"~{%d}\r\n" if binary else b"{%d}\r\n") % len(data) + data


def string(text: str | bytes, *, utf8: bool = False) -> bytes:
    """A string: quoted when it can be, else a literal.

    ``utf8`` says whether the client accepts UTF-8 in quoted strings
    (IMAP4rev2, UTF8=ACCEPT); without it (the default, safe for every
    client) 8-bit text goes as a literal.
    """
    data = _octets(text)
    pattern = _NEEDS_LITERAL_8BIT if utf8 else _NEEDS_LITERAL_7BIT
    if len(data) > MAX_QUOTED or pattern.search(data):
        return literal(data)
    if utf8 and not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return literal(data)
    return b'"' + _ESCAPE.sub(rb"\\\1", data) + b'"'


def astring(text: str | bytes, *, utf8: bool = False) -> bytes:
    """An atom when the text is one (``INBOX``), else a string."""
    data = _octets(text)
    if data and len(data) <= MAX_QUOTED and is_astring_atom(data) and data.upper() != b"NIL":
        return data
    return string(data, utf8=utf8)


def nstring(text: str | bytes | None, *, utf8: bool = False) -> bytes:
    return b"NIL" if text is None else string(text, utf8=utf8)


def mailbox(name: str, *, utf8: bool) -> bytes:
    """A mailbox name as the client expects it: modified UTF-7 unless it enabled UTF-8."""
    if not isinstance(name, str):
        raise LocalProtocolError(f"mailbox name must be str, got {name!r}")
    if utf8:
        try:
            return astring(name.encode("utf-8"), utf8=True)
        except UnicodeEncodeError:
            raise LocalProtocolError(f"mailbox name {name!r} is not valid text") from None
    return astring(encode_mutf7(name), utf8=False)


def flags(names: Iterable[str]) -> tuple[Atom, ...]:
    """A flag list as a value: ``(\\Seen $Forwarded)``."""
    result = []
    for name in names:
        if not isinstance(name, str) or not (is_atom(name.removeprefix("\\")) or name == "\\*"):
            raise LocalProtocolError(f"not a flag: {name!r}")
        result.append(Atom(SYSTEM_FLAGS.get(name.lower(), name)))
    return tuple(result)


def date_time(value_: datetime.datetime) -> str:
    """An INTERNALDATE as a value (a quoted string)."""
    return format_date_time(value_)


def value(item: object, *, utf8: bool = False) -> bytes:
    """One value rendered (see the module docstring for the types)."""
    if item is None:
        return b"NIL"
    if isinstance(item, bool):
        raise LocalProtocolError("a bool is not an IMAP value")
    if isinstance(item, int):
        if item < 0:
            raise LocalProtocolError(f"negative number {item}")
        return str(item).encode("ascii")
    if isinstance(item, (str, bytes)):
        return string(item, utf8=utf8)
    if isinstance(item, Atom):
        return item.text.encode("utf-8")
    if isinstance(item, Literal):
        return literal(item.data, binary=item.binary)
    if isinstance(item, Raw):
        return item.data
    if isinstance(item, SequenceSet):
        return str(item).encode("ascii")
    if isinstance(item, (list, tuple)):
        return b"(" + values(item, utf8=utf8) + b")"
    raise LocalProtocolError(f"cannot render {type(item).__name__} as IMAP data")


def values(items: Iterable[object], *, utf8: bool = False) -> bytes:
    """Values separated by spaces (no parentheses)."""
    return b" ".join(value(item, utf8=utf8) for item in items)


def fetch(number: int, items: Sequence[tuple[str | FetchAttribute, object]], *, utf8: bool = False) -> bytes:
    """``12 FETCH (UID 4 FLAGS (\\Seen) BODY[]<0> {5}...)`` -- the payload of an untagged FETCH.

    Each item is ``(name, value)``; ``name`` a FetchAttribute (its
    :attr:`~.grammar.FetchAttribute.response_name` is used) or the name as
    text.  FLAGS values come from :func:`flags`.
    """
    _check_number(number, "message number")
    rendered = []
    for name, item in items:
        label = name.response_name if isinstance(name, FetchAttribute) else name
        rendered.append(Atom(label).text.encode("utf-8") + b" " + value(item, utf8=utf8))
    return b"%d FETCH (" % number + b" ".join(rendered) + b")"


def list_response(attributes: Iterable[str], delimiter: str | None, name: str, *, utf8: bool,
                  extended: Sequence[tuple[str, object]] = (), kind: str = "LIST") -> bytes:
    """``LIST (\\HasNoChildren) "/" INBOX`` (RFC 9051), or LSUB with ``kind``.

    ``extended`` are mbox-list-extended items (RFC 5258), e.g.
    ``("CHILDINFO", ("SUBSCRIBED",))`` or ``("OLDNAME", ("old",))``.
    """
    if kind not in ("LIST", "LSUB"):
        raise LocalProtocolError(f"not a LIST kind: {kind!r}")
    parts = [kind.encode("ascii"), value(tuple(Atom(a) for a in attributes))]
    if delimiter is None:
        parts.append(b"NIL")
    else:
        if len(delimiter) != 1 or not " " <= delimiter <= "~":
            raise LocalProtocolError(f"a hierarchy delimiter is one ASCII character, got {delimiter!r}")
        parts.append(string(delimiter))
    parts.append(mailbox(name, utf8=utf8))
    if extended:
        parts.append(value(tuple(_extended_items(extended, utf8)), utf8=utf8))
    return b" ".join(parts)


def _extended_items(items: Sequence[tuple[str, object]], utf8: bool) -> Iterable[object]:
    for tag, data in items:
        yield Atom(tag)
        yield data


def status_response(name: str, items: Iterable[tuple[str, int]], *, utf8: bool) -> bytes:
    """``STATUS INBOX (MESSAGES 3 UIDNEXT 7)`` (RFC 9051)."""
    rendered = []
    for item, number in items:
        _check_number(number, item, limit=2**63 - 1)
        rendered.append(Atom(item))
        rendered.append(number)
    return b"STATUS " + mailbox(name, utf8=utf8) + b" " + value(tuple(rendered))


def search_response(numbers: Iterable[int], *, modseq: int | None = None) -> bytes:
    """``SEARCH 2 3 6`` (RFC 3501 §7.2.5), with ``(MODSEQ n)`` for CONDSTORE (RFC 7162 §3.1.5)."""
    data = b" ".join([b"SEARCH", *(b"%d" % _check_number(n, "number") for n in numbers)])
    if modseq is not None:
        data += b" (MODSEQ %d)" % _check_number(modseq, "modseq", limit=2**63 - 1)
    return data


def esearch_response(tag: str | None, *, uid: bool, results: Sequence[tuple[str, object]]) -> bytes:
    """``ESEARCH (TAG "a1") UID MIN 2 COUNT 3 ALL 2,4:5`` (RFC 4731, RFC 9051)."""
    parts = [b"ESEARCH"]
    if tag is not None:
        parts.append(b"(TAG " + string(tag) + b")")
    if uid:
        parts.append(b"UID")
    for name, item in results:
        parts.append(Atom(name).text.encode("utf-8"))
        parts.append(value(item))
    return b" ".join(parts)


def check_response_data(data: bytes) -> None:
    """LocalProtocolError unless every CR or LF in ``data`` is the CRLF after a literal's size.

    What a response line may hold between its start and its final CRLF:
    a stray line end would let data we send (a subject, a file name) end
    the response early and inject a response of its own.
    """
    position = 0
    while True:
        cr, lf = data.find(b"\r", position), data.find(b"\n", position)
        found = min(x for x in (cr, lf, len(data)) if x >= 0)
        if found == len(data):
            return
        match = _LITERAL_BEFORE.search(data, max(0, found - 24), found)
        if match is None or data[found : found + 2] != b"\r\n":
            raise LocalProtocolError("response data holds a line end outside a literal")
        position = found + 2 + int(match.group(1))
        if position > len(data):
            raise LocalProtocolError("response data holds a literal shorter than its size")


def _octets(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise LocalProtocolError(f"not valid text: {text!r}") from None
    raise LocalProtocolError(f"a string must be str or bytes, got {type(text).__name__}")


def _check_number(number: object, what: str, *, limit: int = 2**32 - 1) -> int:
    if type(number) is not int or not 0 <= number <= limit:
        raise LocalProtocolError(f"{what} must be an integer in 0..{limit}, got {number!r}")
    return number
