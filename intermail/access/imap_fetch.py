"""FETCH and SEARCH for the IMAP session: pure functions from stored metadata and bytes to IMAP data.

Owns: which bytes of a stored message each FETCH item names (RFC 9051
§6.4.5: ``BODY[section]<partial>``, ``HEADER.FIELDS[.NOT]``, ``MIME``,
``RFC822.*``, ``BINARY[...]`` with its transfer decoding, RFC 3516), the
rendering of every item into :mod:`intermail.proto.imap.render` values, and
the translation of an IMAP search program (:class:`~intermail.proto.imap.grammar.SearchKey`)
into the store's criteria tree (:mod:`intermail.mailstore.search`).

The store keeps a scan of each message made at delivery
(:mod:`intermail.mailstore.mime`): ENVELOPE and BODYSTRUCTURE are rendered
from it, and a section is a byte range of the stored message -- nothing is
parsed again here except the header lines ``HEADER.FIELDS`` filters.

Invariants: functions here do no I/O; a section that does not exist is the
empty string (RFC 9051 §6.4.5), never an error; a BINARY section whose
encoding cannot be decoded is ``UNKNOWN-CTE`` (RFC 3516 §4.3).

Logs: nothing.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import quopri
import re
from collections.abc import Sequence
from typing import Any

from intermail.errors import ErrorKind, MailError
from intermail.mailstore import mime
from intermail.proto.imap import render
from intermail.proto.imap.grammar import FetchAttribute, SearchKey, SequenceSet

__all__ = [
    "SIMPLE_ITEMS", "needs_info", "body_range", "header_fields", "decode_binary", "envelope", "bodystructure",
    "internaldate", "criteria", "UnknownCte", "ranges", "seq_uid_ranges",
]

# items answered from the message's row alone (no scan, no bytes)
SIMPLE_ITEMS = frozenset({"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})
_HEADER_LINE = re.compile(rb"([^:\s]+)[ \t]*:")


def needs_info(attributes: Sequence[FetchAttribute]) -> bool:
    """Whether any item needs the message's scan (its structure or a section's offsets)."""
    return any(a.name not in SIMPLE_ITEMS for a in attributes)


class UnknownCte(Exception):
    """A BINARY section whose Content-Transfer-Encoding we cannot decode."""


def _section_spec(attribute: FetchAttribute) -> str:
    name = attribute.name
    if name == "RFC822":
        return ""
    if name == "RFC822.HEADER":
        return "HEADER"
    if name == "RFC822.TEXT":
        return "TEXT"
    return str(attribute.section) if attribute.section is not None else ""


def body_range(info: mime.MessageInfo, attribute: FetchAttribute) -> tuple[int, int] | None:
    """``(offset, size)`` in the stored message of the item's section, before ``<partial>``; None: no such part."""
    try:
        return mime.section(info, _section_spec(attribute))
    except MailError:
        return None


def header_fields(block: bytes, names: Sequence[str], *, exclude: bool) -> bytes:
    """The lines of a header block whose field name is (``exclude``: is not) in ``names``, then the blank line.

    Continuation lines go with their field (RFC 5322 §2.2.3); the block's
    final empty line is always included (RFC 9051 §6.4.5).
    """
    wanted = {n.lower().encode("utf-8", "surrogateescape") for n in names}
    out: list[bytes] = []
    keep = False
    for line in block.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        match = _HEADER_LINE.match(line)
        name = match.group(1).lower() if match else b""
        keep = bool(match) and ((name in wanted) != exclude)
        if keep:
            out.append(line)
    return b"".join(out) + b"\r\n"


def decode_binary(data: bytes, encoding: str) -> bytes:
    """A part's body with its transfer encoding undone (RFC 3516); UnknownCte when it cannot be."""
    encoding = (encoding or "7bit").lower()
    if encoding in ("7bit", "8bit", "binary"):
        return data
    if encoding == "base64":
        try:
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", data) + b"==", validate=False)
        except (binascii.Error, ValueError):
            raise UnknownCte() from None
    if encoding == "quoted-printable":
        return quopri.decodestring(data)
    raise UnknownCte()


def envelope(info: mime.MessageInfo, utf8: bool) -> render.Raw:
    return render.Raw(mime.envelope_text(info, utf8).encode("utf-8", "surrogateescape"))


def bodystructure(info: mime.MessageInfo, extended: bool, utf8: bool) -> render.Raw:
    return render.Raw(mime.bodystructure(info, extended, utf8).encode("utf-8", "surrogateescape"))


def internaldate(seconds: float) -> str:
    return render.date_time(datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc))


# -- sequence numbers ---------------------------------------------------------------


def ranges(numbers: Sequence[int]) -> list[list[int]]:
    """``[[low, high], ...]`` covering ``numbers`` (any order, repeats allowed), runs of consecutive ones merged."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and out[-1][1] + 1 == n:
            out[-1][1] = n
        elif not out or out[-1][1] < n:
            out.append([n, n])
    return out


def seq_uid_ranges(uids: Sequence[int], numbers: Sequence[tuple[int, int]]) -> list[list[int]]:
    """UID ranges (``[[low, high]...]``) of the messages at sequence numbers ``numbers`` (1-based, in range)."""
    return ranges([uid for low, high in numbers for uid in uids[low - 1:high]])


# -- SEARCH -------------------------------------------------------------------------

_FLAG_KEYS = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft", "FLAGGED": "\\Flagged",
              "SEEN": "\\Seen"}
_HEADER_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_DATE_KEYS = {"BEFORE": "before", "ON": "on", "SINCE": "since", "SENTBEFORE": "sentbefore", "SENTON": "senton",
              "SENTSINCE": "sentsince"}
_NOTHING: list[Any] = ["not", ["all"]]


class SearchContext:
    """What a search program is resolved against: the session's view of the mailbox."""

    def __init__(self, uids: Sequence[int], uidnext: int, saved: Sequence[int] | None):
        self.uids = uids  # ascending: sequence number n is uids[n - 1]
        self.uidnext = uidnext
        self.saved = saved  # the SEARCHRES result ($), or None if nothing was saved

    def uid_set(self, sequence: SequenceSet, *, uid: bool) -> list[Any]:
        if sequence.saved:
            return ["uid", [[u, u] for u in (self.saved or ())]] if self.saved else list(_NOTHING)
        if uid:
            largest = self.uids[-1] if self.uids else 0
            ranges = [[a, b] for a, b in sequence.resolve(largest) if b >= 1]
            return ["uid", ranges] if ranges else list(_NOTHING)
        numbers = [(a, min(b, len(self.uids))) for a, b in sequence.resolve(len(self.uids)) if a <= len(self.uids)]
        ranges = seq_uid_ranges(self.uids, [(max(1, a), b) for a, b in numbers if b >= 1])
        return ["uid", ranges] if ranges else list(_NOTHING)


def _date(value: datetime.date) -> str:
    return value.strftime("%Y-%m-%d")


def criteria(keys: Sequence[SearchKey], ctx: SearchContext) -> list[Any]:
    """The store's criteria tree for a search program (the top-level keys all must match)."""
    nodes = [_key(k, ctx) for k in keys]
    return nodes[0] if len(nodes) == 1 else ["and", *nodes]


def _key(key: SearchKey, ctx: SearchContext) -> list[Any]:
    name, args = key.name, key.args
    if name == "ALL" or name == "OLD":
        return ["all"]
    if name in ("NEW", "RECENT"):  # no message is \Recent here (RFC 9051 dropped it)
        return list(_NOTHING)
    if name in _FLAG_KEYS:
        return ["flag", _FLAG_KEYS[name]]
    if name.startswith("UN") and name[2:] in _FLAG_KEYS:
        return ["unflag", _FLAG_KEYS[name[2:]]]
    if name == "KEYWORD":
        return ["flag", args[0]]
    if name == "UNKEYWORD":
        return ["unflag", args[0]]
    if name in _HEADER_KEYS:
        return ["header", _HEADER_KEYS[name], args[0]]
    if name == "HEADER":
        return ["header", str(args[0]).lower(), args[1]]
    if name == "BODY":
        return ["body", args[0]]
    if name == "TEXT":
        return ["text", args[0]]
    if name in _DATE_KEYS:
        return [_DATE_KEYS[name], _date(args[0])]
    if name == "LARGER":
        return ["larger", args[0]]
    if name == "SMALLER":
        return ["smaller", args[0]]
    if name == "NOT":
        return ["not", _key(args[0], ctx)]
    if name == "OR":
        return ["or", _key(args[0], ctx), _key(args[1], ctx)]
    if name == "AND":
        inner = [_key(k, ctx) for k in args]
        return inner[0] if len(inner) == 1 else ["and", *inner]
    if name == "UID":
        return ctx.uid_set(args[0], uid=True)
    if name == "SEQUENCE":
        return ctx.uid_set(args[0], uid=False)
    if name == "MODSEQ":
        return ["modseq", args[-1]]
    raise MailError(ErrorKind.INVALID, safe=f"search key {name} is not supported")


def uid_to_seq(uids: Sequence[int], uid: int) -> int | None:
    """The sequence number of ``uid`` in the view, or None."""
    i = bisect.bisect_left(uids, uid)
    return i + 1 if i < len(uids) and uids[i] == uid else None
