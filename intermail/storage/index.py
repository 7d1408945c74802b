"""The SQLite index: a derived view of the journal (I-3).

The index holds the consumer's tables (created and filled by its
:class:`Applier`), the engine's blob locations, and ``applied_seq``: the seq
of the last frame whose records are in it.  Frames are applied in seq order,
each batch in one ``BEGIN IMMEDIATE`` transaction that also advances
``applied_seq``, so the index is always the state after some prefix of the
journal, never a mixture.  Because it is derived it may lag (WAL with
``synchronous=NORMAL``: a power cut can lose its last transactions, replay
restores them) and it can be thrown away and rebuilt from checkpoint +
journal at any time.

Fencing (I-6): ``_engine.epoch`` holds the owner's epoch; every apply checks
it inside its transaction, so a fenced former owner cannot apply anything
once the new owner has opened the index.

Logs: nothing; the engine logs.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
from collections.abc import Iterable, Iterator
from typing import Protocol

from intermail.errors import FencedError
from intermail.storage import records as rec

ENGINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS _engine(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS _blobs(
    id INTEGER PRIMARY KEY,
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    sha256 BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS _blobs_segment ON _blobs(segment);
"""
PUT_BLOB = "INSERT OR REPLACE INTO _blobs(id, segment, offset, length, sha256) VALUES (?,?,?,?,?)"


class Applier(Protocol):
    """What a consumer of the engine (mail store, MTA queue) provides.

    ``apply`` must be deterministic: replaying the same records onto the
    same state gives the same rows.  It may raise only for records it could
    never have written (a bug): the engine then stops, rather than skip.
    """

    def create_schema(self, conn: sqlite3.Connection) -> None: ...

    def apply(self, conn: sqlite3.Connection, seq: int, rtype: int, payload: bytes) -> None: ...

    def snapshot(self, conn: sqlite3.Connection) -> Iterable[tuple[int, bytes]]:
        """Records that, applied to an empty index, recreate the consumer's state."""
        ...


def connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                               isolation_level=None)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: durable enough for a derived index; the journal is the truth.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def record_positions(records: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(type, payload, payload offset within its frame)``."""
    pos = rec.FRAME_HEADER_SIZE
    for rtype, payload in records:
        pos += rec.RECORD_HEADER_SIZE
        yield rtype, payload, pos
        pos += len(payload)


class Index:
    """The writer's connection to the index.  Used from the engine's writer thread only."""

    def __init__(self, path: str, applier: Applier):
        self.path = path
        self.applier = applier
        self.conn: sqlite3.Connection | None = None
        self.applied_seq = 0
        self._next_blob = 1

    def open(self, verify: bool = False) -> None:
        """Open (creating if needed); with ``verify``, raise DatabaseError unless quick_check passes."""
        self.conn = connect(self.path)
        if verify:
            problems = [row[0] for row in self.conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"index {self.path} damaged: {'; '.join(problems[:5])}")
        self.conn.executescript(ENGINE_SCHEMA)
        self.applier.create_schema(self.conn)
        self.applied_seq = self.get("applied_seq")

    def get(self, key: str, default: int = 0) -> int:
        row = self.conn.execute("SELECT value FROM _engine WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set(self, key: str, value: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO _engine(key, value) VALUES (?, ?)", (key, value))

    def claim(self, epoch: int, busy_ms: int = 10000) -> None:
        """Record the new owner's epoch; older owners' applies fail from now on."""
        self.conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        finally:
            self.conn.execute("PRAGMA busy_timeout=10000")
        try:
            current = self.get("epoch")
            if current > epoch:
                raise FencedError(f"index already owned by epoch {current}")
            self._set("epoch", epoch)
            self.conn.execute("INSERT OR IGNORE INTO _engine(key, value) VALUES ('applied_seq', 0), "
                              "('next_blob_id', 1)")
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def apply_batch(self, frames: Iterable[tuple[int, int, int, list[tuple[int, bytes]]]], epoch: int) -> None:
        """Apply frames ``(seq, segment, frame_offset, records)`` past ``applied_seq``, atomically."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            owner = self.get("epoch")
            if owner != epoch:
                raise FencedError(f"index owned by epoch {owner}, we are {epoch}")
            applied = self.get("applied_seq")
            self._next_blob = self.get("next_blob_id", 1)
            next_blob = self._next_blob
            for seq, segment, frame_offset, records in frames:
                if seq <= applied:
                    continue  # applied already (by us before a crash, or by a former owner)
                self._apply_records(seq, segment, frame_offset, records)
                applied = seq
            self._set("applied_seq", applied)
            if self._next_blob != next_blob:
                self._set("next_blob_id", self._next_blob)
            conn.execute("COMMIT")
            self.applied_seq = applied
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _apply_records(self, seq: int, segment: int, frame_offset: int, records) -> None:
        conn = self.conn
        for rtype, payload, pos in record_positions(records):
            if rtype == rec.REC_BLOB:
                blob_id, digest, length = rec.parse_blob(payload)
                offset = frame_offset + pos + rec.BLOB_HEAD_SIZE
                conn.execute(PUT_BLOB, (blob_id, segment, offset, length, digest))
                if blob_id >= self._next_blob:
                    self._next_blob = blob_id + 1
            elif rtype == rec.REC_MOVE:
                # Compaction copied a body: point at the copy, unless it was freed
                # since compaction read it (then the copy is garbage).
                blob_id, digest, length = rec.parse_blob(payload)
                conn.execute("UPDATE _blobs SET segment = ?, offset = ? WHERE id = ? AND sha256 = ?",
                             (segment, frame_offset + pos + rec.BLOB_HEAD_SIZE, blob_id, digest))
            elif rtype == rec.REC_FREE:
                conn.executemany("DELETE FROM _blobs WHERE id = ?", [(i,) for i in rec.parse_free(payload)])
            elif rtype == rec.REC_BLOBLOC:
                conn.execute(PUT_BLOB, rec.parse_blobloc(payload))
            elif rtype in (rec.REC_END, rec.REC_NEXT_BLOB):
                pass  # checkpoint-only records
            elif rtype >= rec.FIRST_CONSUMER_TYPE:
                self.applier.apply(conn, seq, rtype, payload)
            else:
                raise ValueError(f"unknown engine record type {rtype} in frame {seq}")

    def load_checkpoint(self, seq: int, records: Iterable[tuple[int, bytes]], epoch: int) -> None:
        """Fill an empty index from a checkpoint's records; ``applied_seq`` becomes ``seq``."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._set("epoch", epoch)
            for rtype, payload in records:
                if rtype == rec.REC_BLOBLOC:
                    conn.execute(PUT_BLOB, rec.parse_blobloc(payload))
                elif rtype == rec.REC_NEXT_BLOB:
                    self._set("next_blob_id", struct.unpack("<Q", payload)[0])
                elif rtype >= rec.FIRST_CONSUMER_TYPE:
                    self.applier.apply(conn, seq, rtype, payload)
            self._set("applied_seq", seq)
            conn.execute("COMMIT")
            self.applied_seq = seq
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def live_segments(self) -> dict[int, tuple[int, int]]:
        """segment -> (live blobs, live bytes)."""
        rows = self.conn.execute("SELECT segment, count(*), sum(length) FROM _blobs GROUP BY segment")
        return {seg: (n, size) for seg, n, size in rows}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def snapshot_records(conn: sqlite3.Connection, applier: Applier) -> Iterator[tuple[int, bytes]]:
    """The engine's and the consumer's state as records (call inside a read transaction)."""
    row = conn.execute("SELECT value FROM _engine WHERE key = 'next_blob_id'").fetchone()
    yield rec.REC_NEXT_BLOB, struct.pack("<Q", row[0] if row else 1)
    for row in conn.execute("SELECT id, segment, offset, length, sha256 FROM _blobs ORDER BY id"):
        yield rec.REC_BLOBLOC, rec.blobloc_payload(*row)
    yield from applier.snapshot(conn)


def digest(conn: sqlite3.Connection) -> str:
    """A hash of every table's rows, in a canonical order; ``_engine.epoch`` excluded.

    Two indexes with the same digest hold the same state: this is how tests
    check that the live index equals ``rebuild()``.
    """
    h = hashlib.sha256()
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    for table in tables:
        h.update(table.encode() + b"\0")
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
        order = ", ".join(f'"{c}"' for c in cols)
        where = " WHERE key != 'epoch'" if table == "_engine" else ""
        for row in conn.execute(f'SELECT {order} FROM "{table}"{where} ORDER BY {order}'):
            h.update(repr(row).encode() + b"\n")
    return h.hexdigest()


def remove_index_files(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
