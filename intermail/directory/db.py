"""The directory's durable store: domains, accounts, aliases and the change log.

Owns the SQLite database of a directory primary (and the copy each replica
keeps), and the one function per change that mutates it.  Synchronous API:
the asyncio services call it in a thread (``asyncio.to_thread``).

Invariants:

- **One write path.** Every change is a :class:`Change` (``seq``, ``op``,
  JSON ``payload``).  The primary validates a request, checks its
  preconditions, then applies the change with the same ``_APPLY`` function a
  replica uses and appends it to the ``changes`` table *in the same
  transaction*: a change is in the log if and only if it is in the tables.
  So a replica built from ``changes_since(0)`` + :meth:`DirectoryDB.apply_change`
  holds exactly the primary's data (payloads carry everything decided on the
  primary: timestamps, placement, password hashes).
- **Durable on return.** WAL journal with ``synchronous=FULL``: a write
  method that returned is on disk and survives a power cut.
- ``apply_change`` is idempotent by ``seq``: a change at or below the last
  applied seq is skipped; a gap (seq > last + 1) is refused, never papered
  over.  A replica (``replica=True``) refuses local writes with PERM.
- Keys are canonical addresses (:mod:`.address`): lower-case A-label domains,
  dot-atom local parts lowercased, quoted local parts verbatim.  An alias key
  is an address or ``@domain`` (the domain's catch-all).

Resolution (:meth:`DirectoryDB.resolve`): an account wins; else the alias of
that exact address; else the domain's catch-all.  Alias targets expand
recursively up to ``max_alias_depth`` (LIMIT beyond it); a target seen twice
through different branches is delivered once; a target that leads back to an
address on its own expansion path is a loop (PERM).  The catch-all applies
only to the address being resolved, never to alias targets, so a catch-all
cannot loop onto itself.  Targets outside the hosted domains are *remote*;
hosted targets that are neither account nor alias are *unknown*.

Quota ``0`` means unlimited.  A domain is deleted only when no account or
alias uses it (PERM otherwise): deleting mail by accident is not a feature.

Logs: nothing; ``dird`` logs the requests and their outcome.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intermail.directory.address import Address, parse, parse_domain
from intermail.errors import ErrorKind, MailError

SCHEMA_VERSION = 1
STATUSES = frozenset({"active", "disabled"})
MAX_QUOTA_BYTES = 2**62
MAX_HASH_CHARS = 512
_MSS_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_HASH_PREFIX = "$argon2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name     TEXT PRIMARY KEY,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    address        TEXT PRIMARY KEY,
    domain         TEXT NOT NULL REFERENCES domains(name),
    password_hash  TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    quota_bytes    INTEGER NOT NULL CHECK (quota_bytes >= 0),
    mss            TEXT NOT NULL,
    created        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS accounts_by_domain ON accounts(domain);
CREATE INDEX IF NOT EXISTS accounts_by_mss ON accounts(mss);
CREATE TABLE IF NOT EXISTS aliases (
    address  TEXT NOT NULL,
    domain   TEXT NOT NULL REFERENCES domains(name),
    target   TEXT NOT NULL,
    PRIMARY KEY (address, target)
);
CREATE INDEX IF NOT EXISTS aliases_by_domain ON aliases(domain);
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    op       TEXT NOT NULL,
    payload  TEXT NOT NULL,
    chain    TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Account:
    """One mailbox: where it lives, whether it may log in, how much it may hold."""

    address: str
    mss: str
    status: str
    quota_bytes: int
    created: float
    password_hash: str = field(repr=False)

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class AliasExpansion:
    """What an alias (or the catch-all) expands to, deduplicated, in order."""

    address: str
    accounts: tuple[Account, ...]
    remote: tuple[str, ...]  # targets outside the hosted domains
    unknown: tuple[str, ...]  # hosted targets that are neither account nor alias
    via_catch_all: bool = False


@dataclass(frozen=True)
class Unknown:
    """No account, alias or catch-all for this address; ``hosted`` False: a domain we do not host."""

    address: str
    hosted: bool = True


Resolution = Account | AliasExpansion | Unknown


@dataclass(frozen=True)
class Alias:
    address: str  # canonical address, or "@domain" for the catch-all
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    """One entry of the change log, as a replica receives it."""

    seq: int
    op: str
    payload: dict[str, Any]


def _invalid(safe: str, detail: str | None = None) -> MailError:
    return MailError(ErrorKind.INVALID, safe=safe, detail=detail)


# -- the one write path: op -> mutation (shared by primary and replicas) -----------

def _apply_domain_add(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.execute("INSERT INTO domains (name, created) VALUES (?, ?)", (p["name"], float(p["created"])))


def _apply_domain_del(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.execute("DELETE FROM domains WHERE name = ?", (p["name"],))


def _apply_user_add(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO accounts (address, domain, password_hash, status, quota_bytes, mss, created)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (p["address"], p["domain"], p["password_hash"], p["status"], int(p["quota_bytes"]),
         p["mss"], float(p["created"])))


def _apply_user_del(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.execute("DELETE FROM accounts WHERE address = ?", (p["address"],))


def _apply_user_passwd(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.execute("UPDATE accounts SET password_hash = ? WHERE address = ?", (p["password_hash"], p["address"]))


def _apply_user_status(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.execute("UPDATE accounts SET status = ? WHERE address = ?", (p["status"], p["address"]))


def _apply_user_quota(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.execute("UPDATE accounts SET quota_bytes = ? WHERE address = ?", (int(p["quota_bytes"]), p["address"]))


def _apply_alias_add(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    conn.executemany("INSERT OR IGNORE INTO aliases (address, domain, target) VALUES (?, ?, ?)",
                     [(p["address"], p["domain"], target) for target in p["targets"]])


def _apply_alias_del(conn: sqlite3.Connection, p: dict[str, Any]) -> None:
    if p.get("target") is None:
        conn.execute("DELETE FROM aliases WHERE address = ?", (p["address"],))
    else:
        conn.execute("DELETE FROM aliases WHERE address = ? AND target = ?", (p["address"], p["target"]))


_APPLY: dict[str, Callable[[sqlite3.Connection, dict[str, Any]], None]] = {
    "domain.add": _apply_domain_add,
    "domain.del": _apply_domain_del,
    "user.add": _apply_user_add,
    "user.del": _apply_user_del,
    "user.passwd": _apply_user_passwd,
    "user.status": _apply_user_status,
    "user.quota": _apply_user_quota,
    "alias.add": _apply_alias_add,
    "alias.del": _apply_alias_del,
}
OPS = frozenset(_APPLY)


class DirectoryDB:
    """The directory's SQLite store; see the module docstring for the rules."""

    def __init__(self, path: str | Path, *, replica: bool = False, max_alias_depth: int = 8,
                 max_alias_targets: int = 1000, clock: Callable[[], float] = time.time):
        if max_alias_depth < 1 or max_alias_targets < 1:
            raise _invalid("alias limits must be at least 1")
        self.replica = replica
        self.max_alias_depth = max_alias_depth
        self.max_alias_targets = max_alias_targets
        self._clock = clock
        self._lock = threading.Lock()  # one connection, shared by the caller's threads
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        # WAL: readers do not block the writer; FULL: fsync of the WAL at every
        # commit, so an acknowledged write survives power loss, not just a crash.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            self._conn.close()
            raise _invalid("unsupported directory database", f"schema version {version} in {path}")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if not replica:
            # A primary names its change log once; replicas adopt the name of
            # the log they follow and refuse to mix in another one.
            self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('origin', ?)",
                               (uuid.uuid4().hex,))

    @property
    def restored_from(self) -> dict[str, Any] | None:
        """``{"origin", "seq", "chain", "backup"}`` when this log was restored from a backup of another one."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'restored_from'").fetchone()
        return None if row is None else json.loads(row[0])

    def backup_into(self, path: str | Path) -> dict[str, Any]:
        """Copy the whole database into the new file ``path`` (SQLite's online backup API), consistently.

        Runs under the connection's lock, so no write of this process lands
        mid-copy (every write goes through this connection): the copy is the
        database after change ``seq`` exactly.  Returns ``{"origin", "seq",
        "chain"}`` of that point.  The caller fsyncs and verifies the file.
        """
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                seq = _last_seq(conn)
                chain = _chain_at(conn, seq)
                row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
            finally:
                conn.execute("COMMIT")
            dest = sqlite3.connect(str(path), isolation_level=None)
            try:
                conn.backup(dest)  # all pages in one step: the directory is small, and we hold the lock
                dest.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            finally:
                dest.close()
        return {"origin": None if row is None else row[0], "seq": seq, "chain": chain}

    @property
    def origin(self) -> str | None:
        """The id of the change log this database holds (None: a replica that never synced)."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> DirectoryDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions --------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    @contextmanager
    def _write(self, *, local: bool = True) -> Iterator[sqlite3.Connection]:
        if local and self.replica:
            raise MailError(ErrorKind.PERM, safe="this directory is a read-only replica; write to the primary")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @staticmethod
    def _record(conn: sqlite3.Connection, op: str, payload: dict[str, Any], seq: int | None = None) -> int:
        _APPLY[op](conn, payload)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        if seq is None:
            seq = _last_seq(conn) + 1
        chain = _chain(_chain_at(conn, seq - 1), seq, op, text)
        cursor = conn.execute("INSERT INTO changes (seq, op, payload, chain) VALUES (?, ?, ?, ?)",
                              (seq, op, text, chain))
        return int(cursor.lastrowid)

    # -- domains -------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        domain = _hosted_domain_name(name)
        with self._write() as conn:
            if _domain_exists(conn, domain):
                raise MailError(ErrorKind.EXISTS, safe="domain already exists")
            self._record(conn, "domain.add", {"name": domain, "created": self._clock()})
        return domain

    def del_domain(self, name: str) -> None:
        domain = _hosted_domain_name(name)
        with self._write() as conn:
            if not _domain_exists(conn, domain):
                raise MailError(ErrorKind.NOTFOUND, safe="no such domain")
            in_use = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM accounts WHERE domain = ?)"
                " OR EXISTS (SELECT 1 FROM aliases WHERE domain = ?)", (domain, domain)).fetchone()[0]
            if in_use:
                raise MailError(ErrorKind.PERM, safe="domain still has accounts or aliases")
            self._record(conn, "domain.del", {"name": domain})

    def list_domains(self) -> list[str]:
        with self._read() as conn:
            return [row[0] for row in conn.execute("SELECT name FROM domains ORDER BY name")]

    # -- accounts ------------------------------------------------------------------

    def add_user(self, address: str | Address, password_hash: str, *, mss: str | None = None,
                 mss_candidates: Sequence[str] = (), quota_bytes: int = 0,
                 status: str = "active") -> Account:
        """Create an account; placed on ``mss``, else the least-loaded candidate."""
        addr = _account_address(address)
        _check_hash(password_hash)
        _check_quota(quota_bytes)
        _check_status(status)
        if mss is not None:
            _check_mss(mss)
        else:
            if not mss_candidates:
                raise _invalid("no mailbox server to place the account on")
            for candidate in mss_candidates:
                _check_mss(candidate)
        key = str(addr)
        with self._write() as conn:
            if not _domain_exists(conn, addr.domain):
                raise MailError(ErrorKind.NOTFOUND, safe="no such domain")
            if _account_row(conn, key) is not None or _alias_targets(conn, key):
                raise MailError(ErrorKind.EXISTS, safe="address already exists")
            if mss is None:
                mss = _least_loaded(conn, mss_candidates)
            payload = {"address": key, "domain": addr.domain, "password_hash": password_hash,
                       "status": status, "quota_bytes": quota_bytes, "mss": mss,
                       "created": self._clock()}
            self._record(conn, "user.add", payload)
            return _account(_account_row(conn, key))

    def del_user(self, address: str | Address) -> None:
        self._update_user(address, "user.del", {})

    def set_password(self, address: str | Address, password_hash: str) -> None:
        _check_hash(password_hash)
        self._update_user(address, "user.passwd", {"password_hash": password_hash})

    def set_status(self, address: str | Address, status: str) -> None:
        _check_status(status)
        self._update_user(address, "user.status", {"status": status})

    def set_quota(self, address: str | Address, quota_bytes: int) -> None:
        _check_quota(quota_bytes)
        self._update_user(address, "user.quota", {"quota_bytes": quota_bytes})

    def _update_user(self, address: str | Address, op: str, fields: dict[str, Any]) -> None:
        key = str(_account_address(address))
        with self._write() as conn:
            if _account_row(conn, key) is None:
                raise MailError(ErrorKind.NOTFOUND, safe="no such account")
            self._record(conn, op, {"address": key, **fields})

    def show_user(self, address: str | Address) -> Account:
        key = str(_account_address(address))
        with self._read() as conn:
            row = _account_row(conn, key)
        if row is None:
            raise MailError(ErrorKind.NOTFOUND, safe="no such account")
        return _account(row)

    def list_users(self, domain: str | None = None) -> list[Account]:
        with self._read() as conn:
            if domain is None:
                rows = conn.execute("SELECT * FROM accounts ORDER BY address")
            else:
                rows = conn.execute("SELECT * FROM accounts WHERE domain = ? ORDER BY address",
                                    (_hosted_domain_name(domain),))
            return [_account(row) for row in rows]

    def mss_load(self, identities: Iterable[str] = ()) -> dict[str, int]:
        """Accounts per MSS identity (every given identity appears, even at 0)."""
        with self._read() as conn:
            load = {name: 0 for name in identities}
            for row in conn.execute("SELECT mss, COUNT(*) FROM accounts GROUP BY mss"):
                load[row[0]] = row[1]
            return load

    # -- aliases -------------------------------------------------------------------

    def add_alias(self, address: str, targets: Iterable[str | Address]) -> Alias:
        """Add ``targets`` to the alias ``address`` (``@domain`` for the catch-all)."""
        key, domain = _alias_key(address)
        if isinstance(targets, (str, Address)):
            targets = [targets]
        wanted = list(dict.fromkeys(str(_target(t)) for t in targets))
        if not wanted:
            raise _invalid("an alias needs at least one target")
        if key in wanted:
            raise _invalid("an alias cannot point to itself")
        with self._write() as conn:
            if not _domain_exists(conn, domain):
                raise MailError(ErrorKind.NOTFOUND, safe="no such domain")
            if not key.startswith("@") and _account_row(conn, key) is not None:
                raise MailError(ErrorKind.EXISTS, safe="an account has this address")
            present = set(_alias_targets(conn, key))
            new = [t for t in wanted if t not in present]
            if not new:
                raise MailError(ErrorKind.EXISTS, safe="alias already has these targets")
            if len(present) + len(new) > self.max_alias_targets:
                raise MailError(ErrorKind.LIMIT, safe="too many alias targets")
            self._record(conn, "alias.add", {"address": key, "domain": domain, "targets": new})
            return Alias(key, tuple(_alias_targets(conn, key)))

    def del_alias(self, address: str, target: str | Address | None = None) -> None:
        """Remove one target of an alias, or the whole alias when ``target`` is None."""
        key, _ = _alias_key(address)
        target_key = None if target is None else str(_target(target))
        with self._write() as conn:
            present = _alias_targets(conn, key)
            if not present or (target_key is not None and target_key not in present):
                raise MailError(ErrorKind.NOTFOUND, safe="no such alias")
            self._record(conn, "alias.del", {"address": key, "target": target_key})

    def list_aliases(self, domain: str | None = None) -> list[Alias]:
        with self._read() as conn:
            if domain is None:
                rows = conn.execute("SELECT address, target FROM aliases ORDER BY address, rowid")
            else:
                rows = conn.execute("SELECT address, target FROM aliases WHERE domain = ?"
                                    " ORDER BY address, rowid", (_hosted_domain_name(domain),))
            grouped: dict[str, list[str]] = {}
            for row in rows:
                grouped.setdefault(row[0], []).append(row[1])
        return [Alias(address, tuple(targets)) for address, targets in grouped.items()]

    # -- resolution ----------------------------------------------------------------

    def resolve(self, address: str | Address) -> Resolution:
        """Account, alias expansion, or Unknown for one address (INVALID if malformed)."""
        addr = address if isinstance(address, Address) else parse(address)
        key = str(addr)
        with self._read() as conn:
            if not _domain_exists(conn, addr.domain):
                return Unknown(key, hosted=False)
            row = _account_row(conn, key)
            if row is not None:
                return _account(row)
            targets = _alias_targets(conn, key)
            via_catch_all = False
            if not targets:
                targets = _alias_targets(conn, "@" + addr.domain)
                via_catch_all = bool(targets)
            if not targets:
                return Unknown(key)
            expansion = _Expansion(conn, self.max_alias_depth, self.max_alias_targets)
            expansion.expand(targets, depth=1, path=frozenset({key}))
        return AliasExpansion(key, tuple(expansion.accounts), tuple(expansion.remote),
                              tuple(expansion.unknown), via_catch_all)

    # -- change log ----------------------------------------------------------------

    def last_seq(self) -> int:
        with self._read() as conn:
            return _last_seq(conn)

    def chain_at(self, seq: int) -> str:
        """The history hash after change ``seq`` ("" for 0); INVALID past the end of the log."""
        with self._read() as conn:
            return _chain_at(conn, seq)

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        """Changes with a sequence number above ``seq``, oldest first, at most ``limit``."""
        if not isinstance(seq, int) or seq < 0 or not isinstance(limit, int) or limit < 1:
            raise _invalid("bad change log position")
        with self._read() as conn:
            rows = conn.execute("SELECT seq, op, payload FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                                (seq, limit)).fetchall()
        return [Change(row[0], row[1], json.loads(row[2])) for row in rows]

    def adopt_restored_origin(self, old: str, new: str, restored_from: dict[str, Any]) -> None:
        """A replica whose log is a prefix of ``restored_from`` follows the restored primary (origin ``new``).

        The caller checked the prefix: the primary accepted this replica's
        chain hash at its position, and that position is at or before the
        restore point.
        """
        with self._write(local=False) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
            if row is None or row[0] != old:
                raise MailError(ErrorKind.CORRUPT, safe="this replica follows another directory primary")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'origin'", (new,))
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('restored_from', ?)",
                         (json.dumps(restored_from, sort_keys=True),))

    def apply_change(self, change: Change) -> bool:
        """Apply one change from the primary; False if it was applied already."""
        return self.apply_changes([change]) == 1

    def apply_changes(self, changes: Sequence[Change], origin: str | None = None, *,
                      reseed: bool = False) -> int:
        """Apply changes from the primary in one transaction (one fsync); returns how many were new.

        ``origin``: the primary's change-log id; a database that follows
        another log refuses (CORRUPT), one that never synced adopts it.
        ``reseed``: first empty the database (tables, log, origin) in the
        same transaction -- a replica re-copying a primary restored from a
        backup of its log -- so it never serves an empty directory.
        All or nothing: a malformed change or a gap rolls the batch back.
        """
        for change in changes:
            if not isinstance(change.seq, int) or change.seq < 1 or change.op not in _APPLY \
                    or not isinstance(change.payload, dict):
                raise _invalid("malformed change", repr(change))
        applied = 0
        with self._write(local=False) as conn:
            if reseed:
                for table in ("aliases", "accounts", "domains", "changes"):
                    conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
                conn.execute("DELETE FROM meta WHERE key IN ('origin', 'restored_from')")
            if origin is not None:
                _adopt_origin(conn, origin)
            last = _last_seq(conn)
            for change in changes:
                if change.seq <= last:
                    continue
                if change.seq != last + 1:
                    raise _invalid("change log gap", f"have {last}, got {change.seq}")
                try:
                    self._record(conn, change.op, change.payload, seq=change.seq)
                except (KeyError, TypeError, ValueError, sqlite3.IntegrityError) as exc:
                    # seq and op only: a payload may hold a password hash
                    raise _invalid("malformed change",
                                   f"seq {change.seq} op {change.op}: {type(exc).__name__}") from None
                last = change.seq
                applied += 1
        return applied


class _Expansion:
    """Depth-first alias expansion with dedup, loop detection and limits."""

    def __init__(self, conn: sqlite3.Connection, max_depth: int, max_targets: int):
        self._conn = conn
        self._max_depth = max_depth
        self._max_targets = max_targets
        self._seen: set[str] = set()
        self._hosted: dict[str, bool] = {}
        self.accounts: list[Account] = []
        self.remote: list[str] = []
        self.unknown: list[str] = []

    def expand(self, targets: list[str], depth: int, path: frozenset[str]) -> None:
        if depth > self._max_depth:
            raise MailError(ErrorKind.LIMIT, safe="alias expansion too deep")
        for target in targets:
            if target in path:
                raise MailError(ErrorKind.PERM, safe="alias loop", detail=f"alias loop at {target}")
            if target in self._seen:
                continue
            self._seen.add(target)
            if len(self._seen) > self._max_targets:
                raise MailError(ErrorKind.LIMIT, safe="alias expands to too many targets")
            domain = parse(target).domain
            if domain not in self._hosted:
                self._hosted[domain] = _domain_exists(self._conn, domain)
            if not self._hosted[domain]:
                self.remote.append(target)
                continue
            row = _account_row(self._conn, target)
            if row is not None:
                self.accounts.append(_account(row))
                continue
            sub_targets = _alias_targets(self._conn, target)
            if sub_targets:
                self.expand(sub_targets, depth + 1, path | {target})
            else:
                self.unknown.append(target)


# -- validation and row helpers ------------------------------------------------------

def _hosted_domain_name(name: str) -> str:
    domain = parse_domain(name)
    if domain.startswith("["):
        raise _invalid("a hosted domain must be a name, not an address literal")
    return domain


def _account_address(address: str | Address) -> Address:
    addr = address if isinstance(address, Address) else parse(address)
    if addr.is_literal:
        raise _invalid("an account must be in a hosted domain, not an address literal")
    return addr


def _target(target: str | Address) -> Address:
    return target if isinstance(target, Address) else parse(target)


def _alias_key(address: str) -> tuple[str, str]:
    if isinstance(address, str) and address.startswith("@"):
        domain = _hosted_domain_name(address[1:])
        return "@" + domain, domain
    addr = _account_address(address)
    return str(addr), addr.domain


def _check_hash(password_hash: object) -> None:
    if not isinstance(password_hash, str) or not password_hash.startswith(_HASH_PREFIX) \
            or len(password_hash) > MAX_HASH_CHARS or not password_hash.isascii():
        raise _invalid("password hash must be an argon2 PHC string")


def _check_quota(quota_bytes: object) -> None:
    if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int):
        raise _invalid("quota must be a whole number of bytes")
    if not 0 <= quota_bytes <= MAX_QUOTA_BYTES:
        raise _invalid("quota out of range")


def _check_status(status: object) -> None:
    if status not in STATUSES:
        raise _invalid("status must be active or disabled")


def _check_mss(name: object) -> None:
    if not isinstance(name, str) or not _MSS_NAME.fullmatch(name):
        raise _invalid("invalid mailbox server name")


def _least_loaded(conn: sqlite3.Connection, candidates: Sequence[str]) -> str:
    counts = dict(conn.execute("SELECT mss, COUNT(*) FROM accounts GROUP BY mss").fetchall())
    # ties go to the earlier candidate, so placement is deterministic
    return min(candidates, key=lambda name: (counts.get(name, 0), candidates.index(name)))


def _domain_exists(conn: sqlite3.Connection, domain: str) -> bool:
    return conn.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is not None


def _account_row(conn: sqlite3.Connection, key: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM accounts WHERE address = ?", (key,)).fetchone()


def _alias_targets(conn: sqlite3.Connection, key: str) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT target FROM aliases WHERE address = ? ORDER BY rowid", (key,))]


def _adopt_origin(conn: sqlite3.Connection, origin: str) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('origin', ?)", (origin,))
    elif row[0] != origin:
        raise MailError(ErrorKind.CORRUPT, safe="this replica follows another directory primary",
                        detail=f"replica holds change log {row[0]}, primary serves {origin}")


def _chain(previous: str, seq: int, op: str, payload_text: str) -> str:
    """The history hash after change ``seq``: equal on two databases iff their logs are equal up to it."""
    return hashlib.sha256(f"{previous}\n{seq}\n{op}\n{payload_text}".encode("utf-8", "surrogatepass")).hexdigest()


def _chain_at(conn: sqlite3.Connection, seq: int) -> str:
    if seq <= 0:
        return ""
    row = conn.execute("SELECT chain FROM changes WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        raise _invalid("change log gap", f"no change {seq}")
    return row[0]


def _last_seq(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]


def _account(row: sqlite3.Row) -> Account:
    return Account(address=row["address"], mss=row["mss"], status=row["status"],
                   quota_bytes=row["quota_bytes"], created=row["created"],
                   password_hash=row["password_hash"])
