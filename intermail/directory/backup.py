"""Backup and restore of the directory database (I-7 for ``dird``).

Owns: the directory backup format, taking one from a running primary, and
writing a database a primary starts on (without ``--init``) from it.

A backup is a directory holding ``directory.db`` -- a complete SQLite
database written by SQLite's online backup API while the primary serves --
and ``MANIFEST.json``, written last (a backup without its manifest does not
exist)::

    {"format": 1, "kind": "directory", "id": "...", "instance": "dir1",
     "created": 1700000000.0, "schema": 1,
     "origin": "...",   # the change log's id
     "seq": S,          # the copy holds the database after change S exactly
     "chain": "...",    # the change log's hash chain at S
     "file": "directory.db", "bytes": N, "sha256": "...", "verified": true}

Verification, before the manifest is written and again on restore: the
file's size and SHA-256, ``PRAGMA integrity_check``, and the copy's own last
seq, chain hash and origin equal to the manifest's.

Restore writes a new database file: the backup's copy under a **new
origin**, with ``meta.restored_from = {"origin", "seq", "chain", "backup"}``.
The new origin keeps the restored primary's history from mixing with the
one replicas followed (the changes after ``S`` that the restore drops):
a replica at or before ``S`` on the old log adopts the new origin and
carries on; one past ``S`` re-copies the log (see
:mod:`intermail.directory.replica`).

Logs: ``dir.backup`` (seq, bytes, seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from intermail.directory import db as dbmod
from intermail.errors import ErrorKind, MailError

__all__ = ["DB_FILE", "take_backup_sync", "verify_backup", "restore_database"]

FORMAT = 1
KIND = "directory"
DB_FILE = "directory.db"
MANIFEST = "MANIFEST.json"


class DirectoryBackupError(MailError):
    def __init__(self, detail: str):
        super().__init__(ErrorKind.INVALID, safe=detail, detail=detail)


# -- files (the same manners as the store's backups; the directory imports no storage) ----------


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DirectoryBackupError(f"{directory}: not a backup (no {MANIFEST})") from None
    except ValueError as exc:
        raise DirectoryBackupError(f"{path}: unreadable manifest: {exc}") from None
    manifest["dir"] = os.path.abspath(directory)
    return manifest


# -- taking and checking a backup -----------------------------------------------------------------


def copy_database(db: dbmod.DirectoryDB, dest: str) -> dict[str, Any]:
    """Step 1, on the database's thread: the consistent copy into ``dest/directory.db``."""
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise DirectoryBackupError(f"{dest} is not empty: a backup goes into a new directory")
    return db.backup_into(os.path.join(dest, DB_FILE))


def finish_backup(dest: str, point: dict[str, Any], instance: str = "") -> dict[str, Any]:
    """Step 2, off the database's thread: fsync, verify, write the manifest; returns it."""
    path = os.path.join(dest, DB_FILE)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    _fsync_path(dest, directory=True)
    manifest = {
        "format": FORMAT, "kind": KIND, "id": uuid.uuid4().hex, "instance": instance,
        "created": time.time(), "schema": dbmod.SCHEMA_VERSION,
        "origin": point["origin"], "seq": point["seq"], "chain": point["chain"],
        "file": DB_FILE, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
    }
    verify_backup({**manifest, "dir": dest})
    manifest["verified"] = True
    write_json_atomic(os.path.join(dest, MANIFEST), manifest)
    return manifest


def take_backup_sync(db: dbmod.DirectoryDB, dest: str, instance: str = "") -> dict[str, Any]:
    """Both steps in the caller's thread (tests, tools)."""
    return finish_backup(dest, copy_database(db, dest), instance)


def _inspect(path: str) -> dict[str, Any]:
    """What a database file holds: integrity, last seq, chain, origin (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        ok = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if ok != ["ok"]:
            raise DirectoryBackupError(f"{path}: integrity check failed: {'; '.join(ok[:5])}")
        seq = dbmod._last_seq(conn)
        chain = dbmod._chain_at(conn, seq)
        row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        schema = conn.execute("PRAGMA user_version").fetchone()[0]
        users = conn.execute("SELECT COUNT(*) FROM accounts").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise DirectoryBackupError(f"{path}: not a readable directory database: {exc}") from None
    finally:
        conn.close()
    return {"seq": seq, "chain": chain, "origin": None if row is None else row[0], "schema": schema,
            "accounts": users}


def verify_backup(manifest: dict[str, Any]) -> dict[str, Any]:
    """Check a backup's file against its manifest (size, SHA-256, integrity, seq/chain/origin)."""
    if manifest.get("kind") != KIND or manifest.get("format") != FORMAT:
        raise DirectoryBackupError(f"{manifest.get('dir')}: not a directory backup"
                                   f" (kind {manifest.get('kind')!r}, format {manifest.get('format')!r})")
    path = os.path.join(manifest["dir"], manifest["file"])
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DirectoryBackupError(f"{path}: missing") from None
    if size != manifest["bytes"] or sha256_file(path) != manifest["sha256"]:
        raise DirectoryBackupError(f"{path}: size or SHA-256 differs from the manifest")
    seen = _inspect(path)
    for key in ("seq", "chain", "origin", "schema"):
        if seen[key] != manifest[key]:
            raise DirectoryBackupError(f"{path}: {key} {seen[key]!r}, the manifest says {manifest[key]!r}")
    return seen


def restore_database(source: str, target: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the database file ``target`` from the backup in ``source``, under a new origin.

    ``target`` must not exist (nor its ``-wal``/``-shm``) unless ``force``,
    which replaces them: the directory instance using it must be stopped.
    """
    manifest = read_manifest(source)
    verify_backup(manifest)
    target = os.path.abspath(str(target))
    leftovers = [p for p in (target, target + "-wal", target + "-shm", target + "-journal") if os.path.exists(p)]
    if leftovers and not force:
        raise DirectoryBackupError(f"{target} exists: restore into a new file, or --force to replace it"
                                   " (with the directory instance stopped)")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".restore"
    with open(os.path.join(manifest["dir"], manifest["file"]), "rb") as src, open(tmp, "wb") as out:
        h = hashlib.sha256()
        while chunk := src.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != manifest["sha256"]:
        os.unlink(tmp)
        raise DirectoryBackupError(f"{source}: the file changed while it was copied")
    origin = uuid.uuid4().hex
    lineage = {"origin": manifest["origin"], "seq": manifest["seq"], "chain": manifest["chain"],
               "backup": manifest["id"]}
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('origin', ?)", (origin,))
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('restored_from', ?)",
                     (json.dumps(lineage, sort_keys=True),))
        conn.execute("COMMIT")
    finally:
        conn.close()
    for p in leftovers:
        os.unlink(p)
    os.replace(tmp, target)
    _fsync_path(os.path.dirname(target), directory=True)
    seen = _inspect(target)
    return {"file": target, "seq": seen["seq"], "origin": origin, "restored_from": lineage,
            "accounts": seen["accounts"], "backup": manifest["dir"]}
