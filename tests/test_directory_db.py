"""The directory store: writes and their error kinds, resolution, change log replay."""

from __future__ import annotations

import itertools
import sqlite3

import pytest

from intermail.directory.db import (
    Account, Alias, AliasExpansion, Change, DirectoryDB, Unknown)
from intermail.errors import ErrorKind, MailError

HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA"
HASH2 = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$b3RoZXI"
MSS = ("mss1", "mss2", "mss3")


def fails(kind: ErrorKind, call, *args, **kwargs) -> MailError:
    with pytest.raises(MailError) as info:
        call(*args, **kwargs)
    assert info.value.kind is kind, info.value
    return info.value


@pytest.fixture
def clock():
    ticks = itertools.count(1_700_000_000)
    return lambda: float(next(ticks))


@pytest.fixture
def db(tmp_path, clock):
    with DirectoryDB(tmp_path / "primary.sqlite", clock=clock) as database:
        database.add_domain("example.org")
        yield database


def test_durability_pragmas(db, tmp_path):
    conn = sqlite3.connect(tmp_path / "primary.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_domains(db):
    assert db.add_domain("Bücher.Example") == "xn--bcher-kva.example"
    assert db.list_domains() == ["example.org", "xn--bcher-kva.example"]
    fails(ErrorKind.EXISTS, db.add_domain, "EXAMPLE.org")
    fails(ErrorKind.INVALID, db.add_domain, "example.org.")
    fails(ErrorKind.INVALID, db.add_domain, "[192.0.2.1]")
    fails(ErrorKind.NOTFOUND, db.del_domain, "nowhere.org")
    db.del_domain("bücher.example")
    assert db.list_domains() == ["example.org"]


def test_domain_with_accounts_or_aliases_not_deleted(db):
    db.add_user("a@example.org", HASH, mss="mss1")
    fails(ErrorKind.PERM, db.del_domain, "example.org")
    db.del_user("a@example.org")
    db.add_alias("@example.org", ["x@remote.net"])
    fails(ErrorKind.PERM, db.del_domain, "example.org")
    db.del_alias("@example.org")
    db.del_domain("example.org")


def test_user_lifecycle(db):
    account = db.add_user("Alice@Example.org", HASH, mss="mss2", quota_bytes=10_000)
    assert account == Account("alice@example.org", "mss2", "active", 10_000, account.created, HASH)
    assert HASH not in repr(account)
    assert db.show_user("ALICE@example.org") == account
    fails(ErrorKind.EXISTS, db.add_user, "alice@EXAMPLE.org", HASH, mss="mss1")
    fails(ErrorKind.NOTFOUND, db.add_user, "bob@other.org", HASH, mss="mss1")
    db.set_password("alice@example.org", HASH2)
    db.set_status("alice@example.org", "disabled")
    db.set_quota("alice@example.org", 0)
    shown = db.show_user("alice@example.org")
    assert (shown.password_hash, shown.status, shown.active, shown.quota_bytes) == (HASH2, "disabled", False, 0)
    assert [a.address for a in db.list_users()] == ["alice@example.org"]
    assert db.list_users("other.org") == []
    db.del_user("alice@example.org")
    fails(ErrorKind.NOTFOUND, db.show_user, "alice@example.org")
    fails(ErrorKind.NOTFOUND, db.del_user, "alice@example.org")
    fails(ErrorKind.NOTFOUND, db.set_status, "alice@example.org", "active")


async def test_writes_from_many_threads(db):
    import asyncio
    await asyncio.gather(*(asyncio.to_thread(db.add_user, f"u{i}@example.org", HASH, mss_candidates=MSS)
                           for i in range(30)))
    assert db.mss_load() == {"mss1": 10, "mss2": 10, "mss3": 10}
    assert [c.seq for c in db.changes_since(0)] == list(range(1, 32))


def test_quoted_local_part_kept_verbatim(db):
    db.add_user('"John Smith"@example.org', HASH, mss="mss1")
    assert isinstance(db.resolve('"John Smith"@example.org'), Account)
    assert isinstance(db.resolve('"john smith"@example.org'), Unknown)


@pytest.mark.parametrize("kwargs", [
    {"password_hash": "plaintext"}, {"password_hash": ""}, {"password_hash": "$argon2id$" + "x" * 600},
    {"quota_bytes": -1}, {"quota_bytes": 1.5}, {"quota_bytes": True}, {"quota_bytes": 2**63},
    {"status": "frozen"}, {"mss": "MSS 1"}, {"mss": ""}, {"mss": None, "mss_candidates": ()},
    {"mss": None, "mss_candidates": ("ok", "bad name")},
])
def test_add_user_validates_and_writes_nothing(db, kwargs):
    args = {"password_hash": HASH, "mss": "mss1", **kwargs}
    seq = db.last_seq()
    fails(ErrorKind.INVALID, db.add_user, "a@example.org", **args)
    fails(ErrorKind.INVALID, db.add_user, "not an address", HASH, mss="mss1")
    fails(ErrorKind.INVALID, db.add_user, "a@[192.0.2.1]", HASH, mss="mss1")
    assert db.last_seq() == seq and db.list_users() == []


def test_placement_least_loaded_ties_to_first(db):
    placed = [db.add_user(f"u{i}@example.org", HASH, mss_candidates=MSS).mss for i in range(6)]
    assert placed == ["mss1", "mss2", "mss3", "mss1", "mss2", "mss3"]
    db.add_user("pinned@example.org", HASH, mss="mss3", mss_candidates=MSS)
    assert db.add_user("next@example.org", HASH, mss_candidates=MSS).mss == "mss1"
    assert db.add_user("new@example.org", HASH, mss_candidates=("mss2", "mss4")).mss == "mss4"
    assert db.mss_load(["mss4", "mss5"]) == {"mss1": 3, "mss2": 2, "mss3": 3, "mss4": 1, "mss5": 0}


def test_aliases_crud(db):
    alias = db.add_alias("Team@example.org", ["a@example.org", "B@Remote.net"])
    assert alias == Alias("team@example.org", ("a@example.org", "b@remote.net"))
    assert db.add_alias("team@example.org", ["c@example.org", "a@example.org"]).targets == (
        "a@example.org", "b@remote.net", "c@example.org")
    fails(ErrorKind.EXISTS, db.add_alias, "team@example.org", ["a@example.org"])
    fails(ErrorKind.INVALID, db.add_alias, "team@example.org", [])
    fails(ErrorKind.INVALID, db.add_alias, "team@example.org", ["TEAM@example.org"])
    fails(ErrorKind.INVALID, db.add_alias, "team@example.org", ["bad address"])
    fails(ErrorKind.NOTFOUND, db.add_alias, "x@other.org", ["a@example.org"])
    db.add_user("a@example.org", HASH, mss="mss1")
    fails(ErrorKind.EXISTS, db.add_alias, "a@example.org", ["b@example.org"])
    fails(ErrorKind.EXISTS, db.add_user, "team@example.org", HASH, mss="mss1")
    db.del_alias("team@example.org", "B@remote.net")
    fails(ErrorKind.NOTFOUND, db.del_alias, "team@example.org", "b@remote.net")
    assert db.list_aliases("example.org") == [Alias("team@example.org", ("a@example.org", "c@example.org"))]
    db.del_alias("team@example.org")
    fails(ErrorKind.NOTFOUND, db.del_alias, "team@example.org")
    assert db.list_aliases() == []


def test_alias_target_limit(tmp_path):
    with DirectoryDB(tmp_path / "d.sqlite", max_alias_targets=3) as db:
        db.add_domain("example.org")
        db.add_alias("l@example.org", ["a@x.net", "b@x.net", "c@x.net"])
        fails(ErrorKind.LIMIT, db.add_alias, "l@example.org", ["d@x.net"])


def test_resolve(db):
    alice = db.add_user("alice@example.org", HASH, mss="mss1")
    bob = db.add_user("bob@example.org", HASH, mss="mss2")
    db.add_alias("team@example.org", ["alice@example.org", "sub@example.org", "out@remote.net",
                                      "ghost@example.org"])
    db.add_alias("sub@example.org", ["bob@example.org", "alice@example.org"])
    assert db.resolve("ALICE@example.org") == alice
    assert db.resolve("team@example.org") == AliasExpansion(
        "team@example.org", (alice, bob), ("out@remote.net",), ("ghost@example.org",), False)
    assert db.resolve("nobody@example.org") == Unknown("nobody@example.org")
    assert db.resolve("alice@remote.net") == Unknown("alice@remote.net", hosted=False)
    fails(ErrorKind.INVALID, db.resolve, "alice@@example.org")


def test_catch_all_is_last_resort_and_not_applied_to_targets(db):
    alice = db.add_user("alice@example.org", HASH, mss="mss1")
    db.add_alias("@example.org", ["alice@example.org", "missing@example.org"])
    assert db.resolve("alice@example.org") == alice
    assert db.resolve("whoever@example.org") == AliasExpansion(
        "whoever@example.org", (alice,), (), ("missing@example.org",), True)


def test_alias_loops_and_depth(tmp_path):
    with DirectoryDB(tmp_path / "d.sqlite", max_alias_depth=3) as db:
        db.add_domain("example.org")
        db.add_alias("a@example.org", ["b@example.org"])
        db.add_alias("b@example.org", ["a@example.org"])
        assert fails(ErrorKind.PERM, db.resolve, "a@example.org").safe == "alias loop"
        db.add_alias("l1@example.org", ["l2@example.org"])
        db.add_alias("l2@example.org", ["l3@example.org"])
        db.add_alias("l3@example.org", ["out@remote.net"])
        assert db.resolve("l1@example.org").remote == ("out@remote.net",)
        db.add_alias("l3@example.org", ["l4@example.org"])
        db.add_alias("l4@example.org", ["out@remote.net"])
        fails(ErrorKind.LIMIT, db.resolve, "l1@example.org")
        # a diamond is not a loop: the shared target is delivered once
        db.add_alias("d@example.org", ["e@example.org", "f@example.org"])
        db.add_alias("e@example.org", ["g@remote.net"])
        db.add_alias("f@example.org", ["g@remote.net"])
        assert db.resolve("d@example.org").remote == ("g@remote.net",)


def test_change_log_and_replica_equals_primary(db, tmp_path):
    db.add_domain("other.net")
    db.add_user("alice@example.org", HASH, mss_candidates=MSS)
    db.add_user("bob@example.org", HASH, mss_candidates=MSS, quota_bytes=5)
    db.add_user("carol@other.net", HASH, mss_candidates=MSS)
    db.add_alias("team@example.org", ["alice@example.org", "bob@example.org", "x@far.away"])
    db.add_alias("@other.net", ["carol@other.net"])
    db.set_password("bob@example.org", HASH2)
    db.set_status("alice@example.org", "disabled")
    db.add_user("tmp@example.org", HASH, mss="mss9")
    db.del_user("tmp@example.org")
    db.del_alias("team@example.org", "x@far.away")
    db.set_quota("carol@other.net", 77)

    changes = db.changes_since(0)
    assert [c.seq for c in changes] == list(range(1, db.last_seq() + 1))
    assert db.changes_since(db.last_seq()) == []
    assert [c.seq for c in db.changes_since(3, limit=2)] == [4, 5]

    replica = DirectoryDB(tmp_path / "replica.sqlite", replica=True)
    half = len(changes) // 2
    assert all(replica.apply_change(c) for c in changes[:half])
    assert not any(replica.apply_change(c) for c in changes[:half])  # idempotent by seq
    assert all(replica.apply_change(c) for c in changes[half:])
    replica.close()
    replica = DirectoryDB(tmp_path / "replica.sqlite", replica=True)  # survives a restart
    assert replica.last_seq() == db.last_seq()
    assert replica.changes_since(0) == changes

    probes = ["alice@example.org", "bob@example.org", "team@example.org", "tmp@example.org",
              "anyone@other.net", "carol@other.net", "nobody@example.org", "x@far.away"]
    assert [replica.resolve(p) for p in probes] == [db.resolve(p) for p in probes]
    assert replica.list_domains() == db.list_domains()
    assert replica.list_users() == db.list_users()
    assert replica.list_aliases() == db.list_aliases()
    replica.close()


def test_replica_refuses_writes_gaps_and_garbage(db, tmp_path):
    db.add_user("alice@example.org", HASH, mss="mss1")
    changes = db.changes_since(0)
    with DirectoryDB(tmp_path / "replica.sqlite", replica=True) as replica:
        assert fails(ErrorKind.PERM, replica.add_domain, "x.org").safe.startswith("this directory is a read-only")
        fails(ErrorKind.INVALID, replica.apply_change, changes[1])  # gap: seq 2 before 1
        fails(ErrorKind.INVALID, replica.apply_change, Change(1, "user.drop", {}))
        fails(ErrorKind.INVALID, replica.apply_change, Change(1, "domain.add", {"nom": "x"}))
        fails(ErrorKind.INVALID, replica.apply_change, Change(1, "user.add", changes[1].payload))  # no domain
        assert replica.last_seq() == 0 and replica.list_domains() == []
        assert replica.apply_change(changes[0]) and replica.apply_change(changes[1])
        assert replica.resolve("alice@example.org") == db.resolve("alice@example.org")


def test_failed_write_leaves_no_change(db):
    seq = db.last_seq()
    fails(ErrorKind.EXISTS, db.add_domain, "example.org")
    fails(ErrorKind.NOTFOUND, db.set_quota, "nobody@example.org", 1)
    assert db.last_seq() == seq


def test_reopen_keeps_data(tmp_path, clock):
    with DirectoryDB(tmp_path / "d.sqlite", clock=clock) as db:
        db.add_domain("example.org")
        db.add_user("a@example.org", HASH, mss="mss1")
    with DirectoryDB(tmp_path / "d.sqlite") as db:
        assert db.show_user("a@example.org").mss == "mss1"
        assert db.last_seq() == 2
