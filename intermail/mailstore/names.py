"""Mailbox names, flags and UID sets: the small value rules of the mail store.

Owns: what a valid mailbox name is (hierarchy delimiter ``/``, ``INBOX``
case-insensitive), the canonical spelling of flags, and UID ranges as the
store takes them.  Pure functions; failures are ``MailError(INVALID)``.

Decisions:

- Names are UTF-8 text (IMAP4rev2); the access server converts modified
  UTF-7 for IMAP4rev1 clients.  A name is at most :data:`MAX_NAME` bytes,
  has no control characters, no ``*`` or ``%`` (LIST wildcards), no empty
  level (``a//b``, leading or trailing ``/``).  ``inbox`` in any case is
  ``INBOX``; so is the first level of ``inbox/x``.
- System flags are spelled canonically (``\\Seen``); an unknown
  backslash flag is refused.  Keywords are atoms (RFC 3501 ``flag-keyword``)
  and compared case-insensitively, kept as first given.  ``\\Recent`` is
  session state, never stored.
- A UID set is a list of ``(low, high)`` ranges, inclusive; ``high = -1``
  means ``*`` (the largest UID in the mailbox, per RFC 3501 §6.4.8 also
  when it is below ``low``).

Logs: nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from intermail.errors import ErrorKind, MailError

MAX_NAME = 512
DELIMITER = "/"
INBOX = "INBOX"
SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}
SPECIAL_USE = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive", "\\All", "\\Flagged")
DEFAULT_FOLDERS = (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"), ("Junk", "\\Junk"),
                   ("Archive", "\\Archive"))
MAX_FLAGS = 128  # keywords per message
_KEYWORD = re.compile(r"[!#$&'+-\[^-z|}~]{1,128}")  # atom-chars minus resp-specials  (RFC 3501 §9 flag-keyword)
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f*%]")

UidRanges = Sequence[tuple[int, int]]


def _invalid(text: str) -> MailError:
    return MailError(ErrorKind.INVALID, safe=text)


def mailbox_name(name: object) -> str:
    """The canonical form of a mailbox name (INVALID when it cannot be one)."""
    if not isinstance(name, str) or not name:
        raise _invalid("mailbox name must be non-empty text")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise MailError(ErrorKind.LIMIT, safe="mailbox name too long")
    if _BAD_NAME.search(name):
        raise _invalid("mailbox name has a forbidden character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("mailbox name is not valid text") from None
    levels = name.split(DELIMITER)
    if any(level == "" for level in levels):
        raise _invalid("mailbox name has an empty level")
    if levels[0].upper() == INBOX:
        levels[0] = INBOX
    return DELIMITER.join(levels)


def parents(name: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    levels = name.split(DELIMITER)
    return [DELIMITER.join(levels[:i]) for i in range(1, len(levels))]


def is_inferior(name: str, of: str) -> bool:
    return name.startswith(of + DELIMITER)


def flag(text: object) -> str:
    """One flag in its stored spelling."""
    if not isinstance(text, str) or not text:
        raise _invalid("flag must be non-empty text")
    if text.startswith("\\"):
        canonical = SYSTEM_FLAGS.get(text.lower())
        if canonical is None:
            raise _invalid(f"unknown system flag {text[:40]}")
        return canonical
    if not _KEYWORD.fullmatch(text):
        raise _invalid("malformed keyword")
    return text


def flags(texts: Iterable[object]) -> list[str]:
    """Canonical, case-insensitively deduplicated flags, in first-given order."""
    out: dict[str, str] = {}
    for text in texts:
        f = flag(text)
        out.setdefault(f.lower(), f)
    if len(out) > MAX_FLAGS:
        raise MailError(ErrorKind.LIMIT, safe="too many flags")
    return list(out.values())


def split_flags(stored: str) -> list[str]:
    return stored.split(" ") if stored else []


def uid_ranges(value: object) -> list[tuple[int, int]]:
    """Check a UID set given as ``[[low, high], ...]`` (``high = -1``: ``*``)."""
    if not isinstance(value, (list, tuple)) or len(value) > 10_000:
        raise _invalid("UID set must be a list of at most 10000 ranges")
    out = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise _invalid("UID range must be [low, high]")
        low, high = item
        for v in (low, high):
            if not isinstance(v, int) or isinstance(v, bool) or v < -1 or v > 2**32 - 1:
                raise _invalid("UID out of range")
        if low < 1 or high == 0:
            raise _invalid("UID out of range")
        out.append((low, high))
    return out


def resolve_ranges(ranges: UidRanges, max_uid: int) -> list[tuple[int, int]]:
    """Turn ``*`` into ``max_uid`` and order each range (RFC 3501: ``4:2`` is ``2:4``)."""
    out = []
    for low, high in ranges:
        high = max_uid if high == -1 else high
        if low == -1:
            low = max_uid
        out.append((min(low, high), max(low, high)))
    return out
