"""SEARCH criteria for the mail store: a JSON tree, compiled to SQL where it can be.

Owns: the criteria language the store RPC carries (the IMAP front end turns
RFC 3501/9051 SEARCH keys into it, resolving sequence numbers and session
flags such as \\Recent itself) and its evaluation against one mailbox::

    ["and", ["flag", "\\\\Seen"], ["not", ["header", "from", "alice"]], ["since", "2026-11-01"]]

Nodes: ``["all"]``, ``["and", c...]``, ``["or", a, b]``, ``["not", c]``,
``["uid", [[low, high], ...]]``, ``["flag", f]``, ``["unflag", f]``,
``["larger", n]``, ``["smaller", n]``, ``["before"|"on"|"since", "YYYY-MM-DD"]``
(internal date), ``["sentbefore"|"senton"|"sentsince", "YYYY-MM-DD"]`` (Date
header), ``["header", name, text]``, ``["body", text]``, ``["text", text]``,
``["modseq", n]`` (CONDSTORE: modseq >= n).

Invariants:

- Matching follows RFC 3501 §6.4.4: strings are case-insensitive
  substrings (after RFC 2047 decoding for headers, transfer decoding for
  bodies); dates compare days in UTC, disregarding the time.
- Nodes on indexed columns (flags, sizes, dates, UIDs, modseq, From, To,
  Cc, Bcc, Subject, Message-ID) become SQL.  A tree with ``body``, ``text``
  or another header is pre-filtered by its SQL conjuncts and then checked
  row by row in Python, reading each candidate's body once.  So is a
  header criterion with the empty string, which matches the messages that
  have the field at all (the indexed columns cannot tell an empty field
  from a missing one).
- A malformed tree is INVALID, never a crash; the tree is bounded
  (:data:`MAX_NODES`).

Logs: nothing.
"""

from __future__ import annotations

import calendar
import datetime
import email
import email.header
import email.policy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intermail.errors import ErrorKind, MailError
from intermail.mailstore import names

MAX_NODES = 1000
MAX_DEPTH = 20  # nesting of and/or/not (SQLite's parser and our recursion both have limits)
MAX_TEXT = 1024
DAY = 86400
INDEXED_HEADERS = {"from": "h_from", "to": "h_to", "cc": "h_cc", "bcc": "h_bcc", "subject": "h_subject",
                   "message-id": "h_msgid"}
_DATE_OPS = {"before", "on", "since", "sentbefore", "senton", "sentsince"}


def _invalid(text: str) -> MailError:
    return MailError(ErrorKind.INVALID, safe=f"bad search: {text}")


@dataclass
class _Row:
    flags: str
    blob_text: Callable[[], tuple[str, str]]  # (headers text, body text), lower-cased, computed once


def _day(text: object) -> int:
    if not isinstance(text, str):
        raise _invalid("date must be YYYY-MM-DD")
    try:
        d = datetime.date.fromisoformat(text)
    except ValueError:
        raise _invalid("date must be YYYY-MM-DD") from None
    return calendar.timegm(d.timetuple())


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _invalid("search text must be text of at most 1024 characters")
    return value.lower()


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise _invalid("number out of range")
    return value


class Query:
    """A checked criteria tree."""

    def __init__(self, tree: Any):
        self._count = 0
        self.tree = self._check(tree, 0)
        self.needs_body = self._needs_body(self.tree)

    # -- checking ------------------------------------------------------------------

    def _check(self, node: Any, depth: int) -> list:
        self._count += 1
        if self._count > MAX_NODES or depth > MAX_DEPTH:
            raise MailError(ErrorKind.LIMIT, safe="search too complex")
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            raise _invalid("each criterion is a list starting with its name")
        op, args = node[0], node[1:]
        if op == "all" and not args:
            return [op]
        if op == "and":
            return [op, *(self._check(a, depth + 1) for a in args)]
        if op == "or" and len(args) == 2:
            return [op, self._check(args[0], depth + 1), self._check(args[1], depth + 1)]
        if op == "not" and len(args) == 1:
            return [op, self._check(args[0], depth + 1)]
        if op == "uid" and len(args) == 1:
            return [op, names.uid_ranges(args[0])]
        if op in ("flag", "unflag") and len(args) == 1:
            return [op, names.flag(args[0])]
        if op in ("larger", "smaller", "modseq") and len(args) == 1:
            return [op, _int(args[0])]
        if op in _DATE_OPS and len(args) == 1:
            return [op, _day(args[0])]
        if op == "header" and len(args) == 2:
            if not isinstance(args[0], str) or not 0 < len(args[0]) <= 256:
                raise _invalid("header name")
            return [op, args[0].lower(), _text(args[1])]
        if op in ("body", "text") and len(args) == 1:
            return [op, _text(args[0])]
        raise _invalid(f"unknown criterion {op[:32]!r} or wrong arguments")

    def _needs_body(self, node: list) -> bool:
        op = node[0]
        if op in ("body", "text"):
            return True
        if op == "header":  # "" asks whether the field is there at all: the columns cannot say
            return node[1] not in INDEXED_HEADERS or node[2] == ""
        if op in ("and", "or", "not"):
            return any(self._needs_body(n) for n in node[1:])
        return False

    # -- SQL -----------------------------------------------------------------------

    def sql(self, conn, box_id: int) -> tuple[str, tuple]:
        """A WHERE fragment (``" AND ..."``) selecting the candidates, and its arguments."""
        if not self.needs_body:
            text, args = self._sql(conn, box_id, self.tree)
            return f" AND ({text})", tuple(args)
        parts = self.tree[1:] if self.tree[0] == "and" else [self.tree]
        texts, args = [], []
        for node in parts:
            if not self._needs_body(node):
                t, a = self._sql(conn, box_id, node)
                texts.append(t)
                args += a
        return ("".join(f" AND ({t})" for t in texts), tuple(args))

    def _sql(self, conn, box_id: int, node: list) -> tuple[str, list]:
        op = node[0]
        if op == "all":
            return "1", []
        if op in ("and", "or"):
            pieces = [self._sql(conn, box_id, n) for n in node[1:]]
            if not pieces:
                return "1", []
            glue = " AND " if op == "and" else " OR "
            return glue.join(f"({t})" for t, _ in pieces), [a for _, args in pieces for a in args]
        if op == "not":
            t, a = self._sql(conn, box_id, node[1])
            return f"NOT ({t})", a
        if op == "uid":
            from intermail.mailstore.store import _range_clause  # one range rule for fetch and search
            clause, args = _range_clause(conn, box_id, node[1])
            return clause[len(" AND "):], list(args)
        if op in ("flag", "unflag"):
            test = "instr(' ' || lower(flags) || ' ', ?) > 0"
            return (test if op == "flag" else f"NOT ({test})"), [f" {node[1].lower()} "]
        if op == "larger":
            return "size > ?", [node[1]]
        if op == "smaller":
            return "size < ?", [node[1]]
        if op == "modseq":
            return "modseq >= ?", [node[1]]
        if op in _DATE_OPS:
            column = "sent_date" if op.startswith("sent") else "internaldate"
            kind = op[4:] if op.startswith("sent") else op
            day = node[1]
            # never NULL, so NOT(...) of a message without a Date header is true, as in Python
            if kind == "before":
                return f"COALESCE({column} < ?, 0)", [day]
            if kind == "since":
                return f"COALESCE({column} >= ?, 0)", [day]
            return f"COALESCE({column} >= ? AND {column} < ?, 0)", [day, day + DAY]
        if op == "header":
            return f"instr({INDEXED_HEADERS[node[1]]}, ?) > 0", [node[2]]
        raise AssertionError(op)  # body nodes never reach SQL

    # -- Python --------------------------------------------------------------------

    def match_body(self, data: bytes, row: dict[str, Any]) -> bool:
        """Evaluate the whole tree for one candidate (``row``: its columns)."""
        cache: dict[str, tuple[str, Any]] = {}

        def texts() -> tuple[str, Any]:
            if "t" not in cache:
                cache["t"] = _texts(data)
            return cache["t"]
        return self._match(self.tree, row, texts)

    def _match(self, node: list, row: dict[str, Any], texts: Callable[[], tuple[str, Any]]) -> bool:
        op = node[0]
        if op == "all":
            return True
        if op == "and":
            return all(self._match(n, row, texts) for n in node[1:])
        if op == "or":
            return self._match(node[1], row, texts) or self._match(node[2], row, texts)
        if op == "not":
            return not self._match(node[1], row, texts)
        if op == "uid":
            return any(low <= row["uid"] <= high for low, high in names.resolve_ranges(node[1], row["max_uid"]))
        if op in ("flag", "unflag"):
            present = node[1].lower() in {f.lower() for f in names.split_flags(row["flags"])}
            return present if op == "flag" else not present
        if op == "larger":
            return row["size"] > node[1]
        if op == "smaller":
            return row["size"] < node[1]
        if op == "modseq":
            return row["modseq"] >= node[1]
        if op in _DATE_OPS:
            value = row["sent_date"] if op.startswith("sent") else row["internaldate"]
            if value is None:
                return False
            kind = op[4:] if op.startswith("sent") else op
            day = node[1]
            return {"before": value < day, "since": value >= day}.get(kind, day <= value < day + DAY)
        if op == "header":
            column = INDEXED_HEADERS.get(node[1])
            if column is not None and node[2]:
                return node[2] in row[column]
            headers = texts()[1]
            return any(node[2] in value for value in headers.get(node[1], ()))
        if op == "body":
            return node[1] in texts()[0]
        if op == "text":
            body, headers = texts()
            return node[1] in body or any(node[1] in v for vs in headers.values() for v in vs)
        raise AssertionError(op)


def _decode_header(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def _texts(data: bytes) -> tuple[str, dict[str, list[str]]]:
    """(decoded text of the text/* parts, {header name: [decoded values]}), lower-cased."""
    message = email.message_from_bytes(bytes(data), policy=email.policy.compat32)
    headers: dict[str, list[str]] = {}
    for name, value in message.items():
        headers.setdefault(name.lower(), []).append(_decode_header(str(value)).lower())
    body = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "us-ascii"
        try:
            body.append(payload.decode(charset, "replace"))
        except LookupError:
            body.append(payload.decode("latin-1"))
    return "\n".join(body).lower(), headers


def compile_search(tree: Any, *, clock: Callable[[], float] | None = None) -> Query:
    """Check ``tree``; INVALID/LIMIT if it is not a criteria tree."""
    return Query(tree)
