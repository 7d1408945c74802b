"""The mail store's records and the SQLite index the engine derives from them.

Owns: the consumer record types the mail store writes to the durable log,
their JSON payloads, and :class:`MailIndex`, the engine applier that turns
them into rows (``create_schema`` / ``apply`` / ``snapshot``).

Invariants:

- Every value a record implies is *in* the record: UIDs, MODSEQs,
  UIDVALIDITY, mailbox ids, blob ids and internal dates are decided by the
  writer (:mod:`.store`) before the commit, so ``apply`` is a pure function
  of the record and the current rows, and a replay (I-3) or a rebuild from a
  checkpoint gives the same rows (the engine tests this by digest).
- ``apply`` raises only for a record the store could never have written.
  A record naming a mailbox that a *later-committed but earlier-applied*
  change removed cannot occur: records are applied in commit order.
- ``uidnext`` and ``highestmodseq`` only grow (``max``), whatever order of
  record kinds touches a mailbox.
- ``snapshot`` emits the same record kinds (with every column spelled out),
  so there is one apply path for live records, replays and checkpoints.

Tables: ``mailboxes`` (id, user, name, uidvalidity, uidnext, highestmodseq,
special_use), ``messages`` (mailbox, uid, blob, size, internaldate, modseq,
flags, info, search columns), ``deliveries`` (delivery key -> mailbox, uid,
time: I-4; kept after the message is expunged or moved, so a late retry of
the same delivery is still recognised, until pruned by age),
``subscriptions`` (user, name), ``counters``.

Logs: nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from intermail.storage import FIRST_CONSUMER_TYPE

MBOX_CREATE = FIRST_CONSUMER_TYPE          # {id, user, name, uidvalidity, special_use, [uidnext, highestmodseq]}
MBOX_DELETE = FIRST_CONSUMER_TYPE + 1      # {id}
MBOX_RENAME = FIRST_CONSUMER_TYPE + 2      # {renames: [[id, new name], ...]}
SUBSCRIBE = FIRST_CONSUMER_TYPE + 3        # {user, name, on}
MSG_ADD = FIRST_CONSUMER_TYPE + 4          # {mailbox, uid, blob, size, date, modseq, flags, info, key, search}
MSG_FLAGS = FIRST_CONSUMER_TYPE + 5        # {mailbox, modseq, changes: [[uid, flags], ...]}
MSG_EXPUNGE = FIRST_CONSUMER_TYPE + 6      # {mailbox, modseq, uids: [...]}
MSG_COPY = FIRST_CONSUMER_TYPE + 7         # {src, dst, modseq, pairs: [[src uid, dst uid], ...], move}
COUNTERS = FIRST_CONSUMER_TYPE + 8         # {name: value, ...}
DELIVERY_KEYS = FIRST_CONSUMER_TYPE + 9    # {keys: [[key, mailbox, uid, time], ...]} (snapshots)
PRUNE_KEYS = FIRST_CONSUMER_TYPE + 10      # {before: time}

SEARCH_COLUMNS = ("h_from", "h_to", "h_cc", "h_bcc", "h_subject", "h_msgid", "sent_date")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailboxes (
    id             INTEGER PRIMARY KEY,
    user           TEXT NOT NULL,
    name           TEXT NOT NULL,
    uidvalidity    INTEGER NOT NULL,
    uidnext        INTEGER NOT NULL,
    highestmodseq  INTEGER NOT NULL,
    special_use    TEXT NOT NULL,
    UNIQUE (user, name)
);
CREATE TABLE IF NOT EXISTS messages (
    mailbox       INTEGER NOT NULL,
    uid           INTEGER NOT NULL,
    blob          INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    internaldate  REAL NOT NULL,
    modseq        INTEGER NOT NULL,
    flags         TEXT NOT NULL,
    info          TEXT NOT NULL,
    h_from        TEXT NOT NULL,
    h_to          TEXT NOT NULL,
    h_cc          TEXT NOT NULL,
    h_bcc         TEXT NOT NULL,
    h_subject     TEXT NOT NULL,
    h_msgid       TEXT NOT NULL,
    sent_date     REAL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_blob ON messages(blob);
CREATE INDEX IF NOT EXISTS messages_by_modseq ON messages(mailbox, modseq);
CREATE TABLE IF NOT EXISTS deliveries (
    key      TEXT PRIMARY KEY,
    mailbox  INTEGER NOT NULL,
    uid      INTEGER NOT NULL,
    time     REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries(time);
CREATE TABLE IF NOT EXISTS subscriptions (
    user  TEXT NOT NULL,
    name  TEXT NOT NULL,
    PRIMARY KEY (user, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
) WITHOUT ROWID;
"""


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def flags_text(flags: Iterable[str]) -> str:
    """Flags as stored: sorted, space-separated (so equal sets are equal strings)."""
    return " ".join(sorted(set(flags)))


class MailIndex:
    """The engine applier of the mail store."""

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)

    def apply(self, conn: sqlite3.Connection, seq: int, rtype: int, payload: bytes) -> None:
        doc = json.loads(payload)
        handler = _APPLY.get(rtype)
        if handler is None:
            raise ValueError(f"unknown mail store record type {rtype}")
        handler(conn, doc)

    def snapshot(self, conn: sqlite3.Connection) -> Iterable[tuple[int, bytes]]:
        return _snapshot(conn)


def _bump(conn: sqlite3.Connection, mailbox: int, uidnext: int | None, modseq: int | None) -> None:
    if uidnext is not None:
        conn.execute("UPDATE mailboxes SET uidnext = MAX(uidnext, ?) WHERE id = ?", (uidnext, mailbox))
    if modseq is not None:
        conn.execute("UPDATE mailboxes SET highestmodseq = MAX(highestmodseq, ?) WHERE id = ?", (modseq, mailbox))


def _mbox_create(conn: sqlite3.Connection, d: dict) -> None:
    conn.execute("INSERT INTO mailboxes (id, user, name, uidvalidity, uidnext, highestmodseq, special_use)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (d["id"], d["user"], d["name"], d["uidvalidity"], d.get("uidnext", 1),
                  d.get("highestmodseq", 0), d.get("special_use", "")))


def _mbox_delete(conn: sqlite3.Connection, d: dict) -> None:
    conn.execute("DELETE FROM messages WHERE mailbox = ?", (d["id"],))
    conn.execute("DELETE FROM mailboxes WHERE id = ?", (d["id"],))


def _mbox_rename(conn: sqlite3.Connection, d: dict) -> None:
    # Two steps, so that swapping names within one record cannot collide.
    for mailbox, _ in d["renames"]:
        # a control character can never start a real name (names.mailbox_name refuses them)
        conn.execute("UPDATE mailboxes SET name = ? WHERE id = ?", (f"\x7frenaming-{mailbox}", mailbox))
    for mailbox, name in d["renames"]:
        conn.execute("UPDATE mailboxes SET name = ? WHERE id = ?", (name, mailbox))


def _subscribe(conn: sqlite3.Connection, d: dict) -> None:
    if d["on"]:
        conn.execute("INSERT OR IGNORE INTO subscriptions (user, name) VALUES (?, ?)", (d["user"], d["name"]))
    else:
        conn.execute("DELETE FROM subscriptions WHERE user = ? AND name = ?", (d["user"], d["name"]))


def _msg_add(conn: sqlite3.Connection, d: dict) -> None:
    s = d.get("search") or {}
    conn.execute(
        "INSERT INTO messages (mailbox, uid, blob, size, internaldate, modseq, flags, info,"
        " h_from, h_to, h_cc, h_bcc, h_subject, h_msgid, sent_date)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (d["mailbox"], d["uid"], d["blob"], d["size"], d["date"], d["modseq"], d["flags"], d["info"],
         s.get("from", ""), s.get("to", ""), s.get("cc", ""), s.get("bcc", ""),
         s.get("subject", ""), s.get("message_id", ""), s.get("date")))
    if d.get("key"):
        conn.execute("INSERT INTO deliveries (key, mailbox, uid, time) VALUES (?, ?, ?, ?)",
                     (d["key"], d["mailbox"], d["uid"], d.get("key_time", d["date"])))
    _bump(conn, d["mailbox"], d["uid"] + 1, d["modseq"])


def _msg_flags(conn: sqlite3.Connection, d: dict) -> None:
    conn.executemany("UPDATE messages SET flags = ?, modseq = ? WHERE mailbox = ? AND uid = ?",
                     [(flags, d["modseq"], d["mailbox"], uid) for uid, flags in d["changes"]])
    _bump(conn, d["mailbox"], None, d["modseq"])


def _msg_expunge(conn: sqlite3.Connection, d: dict) -> None:
    rows = [(d["mailbox"], uid) for uid in d["uids"]]
    conn.executemany("DELETE FROM messages WHERE mailbox = ? AND uid = ?", rows)
    _bump(conn, d["mailbox"], None, d["modseq"])


def _msg_copy(conn: sqlite3.Connection, d: dict) -> None:
    src, dst, modseq = d["src"], d["dst"], d["modseq"]
    for src_uid, dst_uid in d["pairs"]:
        conn.execute(
            "INSERT INTO messages (mailbox, uid, blob, size, internaldate, modseq, flags, info,"
            " h_from, h_to, h_cc, h_bcc, h_subject, h_msgid, sent_date)"
            " SELECT ?, ?, blob, size, internaldate, ?, flags, info,"
            " h_from, h_to, h_cc, h_bcc, h_subject, h_msgid, sent_date"
            " FROM messages WHERE mailbox = ? AND uid = ?", (dst, dst_uid, modseq, src, src_uid))
        _bump(conn, dst, dst_uid + 1, None)
    _bump(conn, dst, None, modseq)
    if d.get("move"):
        _msg_expunge(conn, {"mailbox": src, "modseq": d["src_modseq"], "uids": [p[0] for p in d["pairs"]]})


def _counters(conn: sqlite3.Connection, d: dict) -> None:
    for name, value in d.items():
        conn.execute("INSERT INTO counters (name, value) VALUES (?, ?)"
                     " ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)", (name, value))


def _delivery_keys(conn: sqlite3.Connection, d: dict) -> None:
    conn.executemany("INSERT INTO deliveries (key, mailbox, uid, time) VALUES (?, ?, ?, ?)", d["keys"])


def _prune_keys(conn: sqlite3.Connection, d: dict) -> None:
    conn.execute("DELETE FROM deliveries WHERE time < ?", (d["before"],))


_APPLY = {
    MBOX_CREATE: _mbox_create,
    MBOX_DELETE: _mbox_delete,
    MBOX_RENAME: _mbox_rename,
    SUBSCRIBE: _subscribe,
    MSG_ADD: _msg_add,
    MSG_FLAGS: _msg_flags,
    MSG_EXPUNGE: _msg_expunge,
    MSG_COPY: _msg_copy,
    COUNTERS: _counters,
    DELIVERY_KEYS: _delivery_keys,
    PRUNE_KEYS: _prune_keys,
}


def _snapshot(conn: sqlite3.Connection) -> Iterator[tuple[int, bytes]]:
    counters = dict(conn.execute("SELECT name, value FROM counters"))
    if counters:
        yield COUNTERS, encode(counters)
    for row in conn.execute("SELECT id, user, name, uidvalidity, uidnext, highestmodseq, special_use"
                            " FROM mailboxes ORDER BY id"):
        yield MBOX_CREATE, encode(dict(zip(("id", "user", "name", "uidvalidity", "uidnext", "highestmodseq",
                                            "special_use"), row, strict=True)))
    for user, name in conn.execute("SELECT user, name FROM subscriptions ORDER BY user, name"):
        yield SUBSCRIBE, encode({"user": user, "name": name, "on": True})
    for row in conn.execute("SELECT mailbox, uid, blob, size, internaldate, modseq, flags, info,"
                            " h_from, h_to, h_cc, h_bcc, h_subject, h_msgid, sent_date"
                            " FROM messages ORDER BY mailbox, uid"):
        (mailbox, uid, blob, size, date, modseq, flags, info,
         h_from, h_to, h_cc, h_bcc, h_subject, h_msgid, sent_date) = row
        doc = {"mailbox": mailbox, "uid": uid, "blob": blob, "size": size, "date": date, "modseq": modseq,
               "flags": flags, "info": info,
               "search": {"from": h_from, "to": h_to, "cc": h_cc, "bcc": h_bcc, "subject": h_subject,
                          "message_id": h_msgid, "date": sent_date}}
        yield MSG_ADD, encode(doc)
    keys: list[list] = []
    for row in conn.execute("SELECT key, mailbox, uid, time FROM deliveries ORDER BY key"):
        keys.append(list(row))
        if len(keys) == 1000:
            yield DELIVERY_KEYS, encode({"keys": keys})
            keys = []
    if keys:
        yield DELIVERY_KEYS, encode({"keys": keys})
