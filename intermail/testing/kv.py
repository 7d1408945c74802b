"""A small consumer of the storage engine for tests and benchmarks.

Items keyed by a text id, each with an optional body (blob).  Record types:
``PUT`` (id, blob id or 0, value) and ``DEL`` (id).  Deliberately *not*
idempotent at the row level — a duplicate PUT adds a second row — so that the
crash tests can see a record applied twice.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from intermail.storage import FIRST_CONSUMER_TYPE

PUT = FIRST_CONSUMER_TYPE
DEL = FIRST_CONSUMER_TYPE + 1


class KvApplier:
    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS items(rowid INTEGER PRIMARY KEY, id TEXT NOT NULL, "
                     "blob INTEGER NOT NULL, value TEXT NOT NULL, seq INTEGER NOT NULL)")
        conn.execute("CREATE INDEX IF NOT EXISTS items_id ON items(id)")

    def apply(self, conn: sqlite3.Connection, seq: int, rtype: int, payload: bytes) -> None:
        doc = json.loads(payload)
        if rtype == PUT:
            # A snapshot PUT carries the row's rowid, so that a state rebuilt
            # from a checkpoint is row for row the live one (same digest).
            conn.execute("INSERT INTO items(rowid, id, blob, value, seq) VALUES (?, ?, ?, ?, ?)",
                         (doc.get("rowid"), doc["id"], doc.get("blob", 0), doc.get("value", ""),
                          doc.get("seq", seq)))
        elif rtype == DEL:
            conn.execute("DELETE FROM items WHERE id = ?", (doc["id"],))
        else:
            raise ValueError(f"unknown record type {rtype}")

    def snapshot(self, conn: sqlite3.Connection) -> Iterable[tuple[int, bytes]]:
        for rowid, id_, blob, value, seq in conn.execute(
                "SELECT rowid, id, blob, value, seq FROM items ORDER BY rowid"):
            yield PUT, json.dumps({"id": id_, "blob": blob, "value": value, "seq": seq,
                                   "rowid": rowid}).encode()


def put(txn, item_id: str, body: bytes | None = None, value: str = "") -> int:
    """Add a PUT (with an optional body) to ``txn``; return the blob id or 0."""
    blob = txn.put_blob(body) if body is not None else 0
    txn.add(PUT, json.dumps({"id": item_id, "blob": blob, "value": value}).encode())
    return blob


def delete(txn, item_id: str, blob: int = 0) -> None:
    txn.add(DEL, json.dumps({"id": item_id}).encode())
    if blob:
        txn.free_blob(blob)


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT id, count(*) FROM items GROUP BY id"))
