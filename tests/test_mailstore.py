"""intermail.mailstore: the mail store in process, and its RPC over real loopback sockets.

Everything runs against the real durable-log engine (two mirror directories
under ``tmp_path``; ``fsync=False`` except where durability is the point).
The layers under test: :mod:`intermail.mailstore.store` (delivery, I-4 keys,
quota, UIDs/MODSEQ, flags, expunge, copy/move, mailboxes, notifications),
:mod:`.index` (records + applier: replay and rebuild give the same digest),
:mod:`.names`, :mod:`.search` (every criterion, SQL and Python paths agree)
and :mod:`.service` (every RPC method, argument checks, streamed bodies,
pushes).
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import hashlib
import itertools
import json
import random
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

import pytest

from intermail.errors import ErrorKind, MailError
from intermail.mailstore import names, search
from intermail.mailstore.index import MailIndex
from intermail.mailstore.service import MailstoreService
from intermail.mailstore.store import Delivered, Mailstore, Recipient
from intermail.rpc import RpcClient, RpcServer
from intermail.storage import StoreOptions
from intermail.storage.engine import rebuild_index
from intermail.testing.clock import FakeClock

U = "alice@example.com"
V = "bob@example.com"
W = "carol@example.com"
HOST = "127.0.0.1"
T0 = 1_700_000_000.0
SEGMENT_BYTES = 1 << 20
DEFAULT_BOXES = ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"]
SPECIAL = {"Archive": "\\Archive", "Drafts": "\\Drafts", "INBOX": "", "Junk": "\\Junk", "Sent": "\\Sent",
           "Trash": "\\Trash"}


# ---------------------------------------------------------------------------
# helpers


def message(subject: str = "hello", body: str = "hello world\r\n", *, sender: str = "Alice <alice@example.com>",
            to: str = "bob@example.com", date: str | None = "Fri, 01 Mar 2024 10:00:00 +0000",
            extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}"]
    if date is not None:
        lines.append(f"Date: {date}")
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


async def fails(kind: ErrorKind, call: Awaitable[Any]) -> MailError:
    with pytest.raises(MailError) as info:
        await call
    assert info.value.kind is kind, info.value
    return info.value


def only(results: list) -> Delivered:
    assert len(results) == 1 and isinstance(results[0], Delivered), results
    return results[0]


async def sql(mail: Mailstore, query: str, params: tuple = ()) -> list[tuple]:
    return await mail.store.read(lambda conn: conn.execute(query, params).fetchall())


async def blob_ids(mail: Mailstore) -> set[int]:
    return {row[0] for row in await sql(mail, "SELECT id FROM _blobs")}


async def blob_of(mail: Mailstore, user: str, name: str, uid: int) -> int:
    snap = await mail.select(user, name)
    rows = await sql(mail, "SELECT blob FROM messages WHERE mailbox = ? AND uid = ?", (snap.mailbox, uid))
    assert rows, (user, name, uid)
    return rows[0][0]


async def uids(mail: Mailstore, user: str, name: str) -> list[int]:
    return [m[0] for m in (await mail.select(user, name)).messages]


async def mark_deleted(mail: Mailstore, user: str, name: str, ranges=((1, -1),)) -> None:
    await mail.store_flags(user, name, list(ranges), "+", ["\\Deleted"])


async def check_invariants(mail: Mailstore, users) -> None:
    """Usage equals the stored sizes; every blob is referenced and every reference has its blob."""
    for user in users:
        used = await sql(mail, "SELECT COALESCE(SUM(m.size), 0) FROM messages m JOIN mailboxes b ON b.id = m.mailbox"
                               " WHERE b.user = ?", (user,))
        assert await mail.usage(user) == used[0][0], user
    referenced = {row[0] for row in await sql(mail, "SELECT DISTINCT blob FROM messages")}
    assert referenced == await blob_ids(mail)


async def capture(mail: Mailstore, users) -> dict:
    """Everything a client can observe of ``users``' mail, comparable with ``==``."""
    out = {}
    for user in users:
        boxes = await mail.list_mailboxes(user)
        per_box = {}
        for box in boxes:
            metas = await mail.fetch(user, box.name, [(1, -1)])
            bodies = [hashlib.sha256(await mail.read_message(user, box.name, m.uid)).hexdigest() for m in metas]
            per_box[box.name] = (await mail.select(user, box.name), await mail.status(user, box.name), metas, bodies)
        out[user] = (boxes, await mail.subscriptions(user), await mail.usage(user), per_box)
    return out


class Events:
    """A listener recording (mailbox id, event, commits acknowledged when it was called)."""

    def __init__(self, mail: Mailstore):
        self.mail = mail
        self.seen: list[tuple[int, dict, int]] = []

    def __call__(self, box_id: int, event: dict) -> None:
        self.seen.append((box_id, dict(event), self.mail.store.stats.commits))

    def kinds(self) -> list[str]:
        return [e["event"] for _, e, _ in self.seen]

    def events(self) -> list[dict]:
        return [e for _, e, _ in self.seen]


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def options(tmp_path) -> StoreOptions:
    # Small, not preallocated segments: the defaults zero-fill 64 MiB per mirror for every store opened
    # (gigabytes per run of this file); small segments also make the tests cross segment boundaries.
    return StoreOptions(mirrors=(str(tmp_path / "m1"), str(tmp_path / "m2")), fsync=False,
                        segment_bytes=SEGMENT_BYTES, preallocate=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def mail(options, clock):
    store = await Mailstore.open(options, clock=clock)
    try:
        yield store
    finally:
        await store.close()


# ---------------------------------------------------------------------------
# 1. ensure_user


async def test_ensure_user_creates_inbox_and_special_use_folders_all_subscribed(mail):
    await mail.ensure_user(U)
    boxes = await mail.list_mailboxes(U)
    assert [b.name for b in boxes] == DEFAULT_BOXES
    for b in boxes:
        assert b.special_use == SPECIAL[b.name]
        assert b.subscribed and not b.has_children
    assert await mail.subscriptions(U) == DEFAULT_BOXES
    ids = {b.name: (await mail.select(U, b.name)).mailbox for b in boxes}
    assert len(set(ids.values())) == 6
    # a second call changes nothing
    commits = mail.store.stats.commits
    await mail.ensure_user(U)
    assert mail.store.stats.commits == commits
    assert {b.name: (await mail.select(U, b.name)).mailbox for b in boxes} == ids
    status = await mail.status(U, "INBOX")
    assert (status.messages, status.uidnext, status.highestmodseq) == (0, 1, 0)


async def test_operations_on_a_new_account_create_its_folders_first(mail):
    assert [b.name for b in await mail.list_mailboxes(V)] == DEFAULT_BOXES
    assert (await mail.status(W, "Sent")).messages == 0
    uidvalidity, uid = await mail.append("dave@example.com", "Drafts", message())
    assert uid == 1 and uidvalidity == (await mail.select("dave@example.com", "Drafts")).uidvalidity


async def test_bad_user_names_are_invalid(mail):
    for user in ("", "x" * 321):
        await fails(ErrorKind.INVALID, mail.ensure_user(user))
    await fails(ErrorKind.INVALID, mail.ensure_user(None))  # type: ignore[arg-type]


async def test_concurrent_first_deliveries_create_the_folders_once(mail):
    results = await asyncio.gather(*(mail.deliver([Recipient(V), Recipient(W)], message(f"m{i}"))
                                     for i in range(12)))
    assert all(isinstance(r, Delivered) for rs in results for r in rs)
    for user in (V, W):
        rows = await sql(mail, "SELECT name FROM mailboxes WHERE user = ? ORDER BY name", (user,))
        assert [r[0] for r in rows] == DEFAULT_BOXES
        assert await uids(mail, user, "INBOX") == list(range(1, 13))
        assert await mail.subscriptions(user) == DEFAULT_BOXES
    all_ids = await sql(mail, "SELECT id FROM mailboxes")
    assert len(all_ids) == 12


async def test_custom_default_folders(options, clock):
    mail = await Mailstore.open(options, clock=clock, default_folders=(("Papierkorb", "\\Trash"),))
    try:
        boxes = await mail.list_mailboxes(U)
        assert [(b.name, b.special_use) for b in boxes] == [("INBOX", ""), ("Papierkorb", "\\Trash")]
    finally:
        await mail.close()


# ---------------------------------------------------------------------------
# 2. deliver: recipients, keys (I-4), quota, usage


async def test_deliver_to_several_recipients_is_one_transaction_with_one_result_each(mail):
    for user in (U, V, W):
        await mail.ensure_user(user)
    commits = mail.store.stats.commits
    blobs = await blob_ids(mail)
    data = message("to three")
    results = await mail.deliver([Recipient(U, key="Q1:a"), Recipient(V, key="Q1:b"), Recipient(W)], data,
                                 internaldate=utc(2024, 5, 1))
    assert mail.store.stats.commits == commits + 1
    assert [r.user for r in results] == [U, V, W]
    for r in results:
        assert isinstance(r, Delivered) and r.uid == 1 and not r.duplicate
        assert r.uidvalidity == (await mail.select(r.user, "INBOX")).uidvalidity
        assert await mail.read_message(r.user, "INBOX", 1) == data
        [meta] = await mail.fetch(r.user, "INBOX", [(1, 1)])
        assert (meta.size, meta.internaldate, meta.flags) == (len(data), utc(2024, 5, 1), "")
        assert await mail.usage(r.user) == len(data)
    # never one blob shared between users
    assert len(await blob_ids(mail) - blobs) == 3
    assert await mail.deliver([], data) == []


async def test_deliver_default_internal_date_is_the_clock(mail, clock):
    clock.advance(42.5)
    only(await mail.deliver([Recipient(U)], message()))
    [meta] = await mail.fetch(U, "INBOX", [(1, 1)])
    assert meta.internaldate == T0 + 42.5


async def test_same_key_again_is_a_duplicate_with_the_same_uid_and_no_second_copy(mail):
    first = only(await mail.deliver([Recipient(U, key="Q7:alice")], message("once")))
    commits = mail.store.stats.commits
    usage = await mail.usage(U)
    again = only(await mail.deliver([Recipient(U, key="Q7:alice")], message("once")))
    assert again.duplicate and (again.uid, again.uidvalidity, again.user) == (first.uid, first.uidvalidity, U)
    assert await uids(mail, U, "INBOX") == [first.uid]
    assert mail.store.stats.commits == commits
    assert await mail.usage(U) == usage
    # a different key is a different delivery
    other = only(await mail.deliver([Recipient(U, key="Q8:alice")], message("once")))
    assert not other.duplicate and other.uid == first.uid + 1


async def test_concurrent_deliveries_with_the_same_key_store_exactly_one_message(mail):
    await mail.ensure_user(U)
    data = message("race")
    results = await asyncio.gather(*(mail.deliver([Recipient(U, key="Q9:alice")], data) for _ in range(6)))
    delivered = [only(r) for r in results]
    assert sum(not d.duplicate for d in delivered) == 1
    assert {d.uid for d in delivered} == {1}
    assert await uids(mail, U, "INBOX") == [1]
    assert await mail.usage(U) == len(data)


async def test_concurrent_deliveries_with_overlapping_keys(mail):
    for user in (U, V, W):
        await mail.ensure_user(user)
    data = message("overlap")
    a, b = await asyncio.gather(
        mail.deliver([Recipient(U, key="K:u"), Recipient(V, key="K:v")], data),
        mail.deliver([Recipient(V, key="K:v"), Recipient(W, key="K:w")], data))
    assert not a[0].duplicate and not a[1].duplicate
    assert b[0].duplicate and b[0].uid == a[1].uid and not b[1].duplicate
    for user in (U, V, W):
        assert await uids(mail, user, "INBOX") == [1]


async def test_dedup_survives_expunge_move_and_reopen(options, clock):
    mail = await Mailstore.open(options, clock=clock)
    try:
        d1 = only(await mail.deliver([Recipient(U, key="E:1")], message("expunged")))
        d2 = only(await mail.deliver([Recipient(U, key="E:2")], message("moved")))
        await mark_deleted(mail, U, "INBOX", [(d1.uid, d1.uid)])
        assert await mail.expunge(U, "INBOX") == [d1.uid]
        await mail.copy(U, "INBOX", [(d2.uid, d2.uid)], "Archive", move=True)
        assert await uids(mail, U, "INBOX") == []
        again1 = only(await mail.deliver([Recipient(U, key="E:1")], message("expunged")))
        again2 = only(await mail.deliver([Recipient(U, key="E:2")], message("moved")))
        assert again1.duplicate and again1.uid == d1.uid
        assert again2.duplicate and again2.uid == d2.uid
        assert await uids(mail, U, "INBOX") == [] and await uids(mail, U, "Archive") == [1]
        await mail.store.checkpoint()
    finally:
        await mail.close()
    mail = await Mailstore.open(options, clock=clock)
    try:
        for key, uid in (("E:1", d1.uid), ("E:2", d2.uid)):
            again = only(await mail.deliver([Recipient(U, key=key)], message()))
            assert again.duplicate and again.uid == uid
        assert await uids(mail, U, "INBOX") == []
    finally:
        await mail.close()


async def test_without_a_key_every_delivery_is_stored(mail):
    data = message("no key")
    for _ in range(3):
        only(await mail.deliver([Recipient(U)], data))
    assert await uids(mail, U, "INBOX") == [1, 2, 3]


async def test_bad_keys_fail_only_their_recipient(mail):
    results = await mail.deliver([Recipient(U, key="B:1"), Recipient(W, key=""), Recipient(V, key="x" * 513),
                                  Recipient(V, key="x" * 512), Recipient(W, key=7)], message())  # type: ignore
    assert isinstance(results[0], Delivered) and isinstance(results[3], Delivered)
    for r in (results[1], results[2], results[4]):
        assert isinstance(r, MailError) and r.kind is ErrorKind.INVALID
    assert await uids(mail, U, "INBOX") == [1]
    assert await uids(mail, V, "INBOX") == [1]
    assert await uids(mail, W, "INBOX") == []


async def test_a_key_repeated_in_one_delivery_is_invalid_for_the_repeat(mail):
    results = await mail.deliver([Recipient(U, key="R:1"), Recipient(V, key="R:1")], message())
    assert isinstance(results[0], Delivered) and not results[0].duplicate
    assert isinstance(results[1], MailError) and results[1].kind is ErrorKind.INVALID
    assert await uids(mail, U, "INBOX") == [1]


async def test_delivery_into_a_named_mailbox_and_a_missing_one(mail):
    results = await mail.deliver([Recipient(U, mailbox="Junk"), Recipient(U, mailbox="No/Such"),
                                  Recipient(V, mailbox="junk")], message())
    assert isinstance(results[0], Delivered) and results[0].uid == 1
    assert isinstance(results[1], MailError) and results[1].kind is ErrorKind.NOTFOUND
    assert isinstance(results[2], MailError) and results[2].kind is ErrorKind.NOTFOUND  # only INBOX is case-free
    assert await uids(mail, U, "Junk") == [1]
    assert results[0].uidvalidity == (await mail.select(U, "Junk")).uidvalidity


async def test_over_quota_is_noquota_for_that_recipient_only(mail):
    data = message("quota", "x" * 1000)
    size = len(data)
    only(await mail.deliver([Recipient(U)], data))
    assert await mail.usage(U) == size
    results = await mail.deliver([Recipient(U, quota=size + size // 2, key="QQ:u"), Recipient(V, quota=size),
                                  Recipient(W, quota=size - 1)], data)
    assert isinstance(results[0], MailError) and results[0].kind is ErrorKind.NOQUOTA
    assert isinstance(results[1], Delivered)  # the edge: usage + size == quota is allowed
    assert isinstance(results[2], MailError) and results[2].kind is ErrorKind.NOQUOTA
    assert await uids(mail, U, "INBOX") == [1] and await mail.usage(U) == size
    assert await mail.usage(W) == 0 and await uids(mail, W, "INBOX") == []
    # the refused key is not remembered: a retry with room is stored
    assert not only(await mail.deliver([Recipient(U, quota=0, key="QQ:u")], data)).duplicate


async def test_quota_counts_earlier_recipients_of_the_same_delivery(mail):
    data = message("twice")
    results = await mail.deliver([Recipient(U, key="A:1", quota=len(data) * 2 - 1),
                                  Recipient(U, key="A:2", quota=len(data) * 2 - 1)], data)
    assert isinstance(results[0], Delivered)
    assert isinstance(results[1], MailError) and results[1].kind is ErrorKind.NOQUOTA


async def test_quota_on_append_and_copy(mail):
    data = message("q", "y" * 500)
    await mail.append(U, "INBOX", data)
    await fails(ErrorKind.NOQUOTA, mail.append(U, "INBOX", data, quota=len(data) * 2 - 1))
    await mail.append(U, "INBOX", data, quota=len(data) * 2)
    await fails(ErrorKind.NOQUOTA, mail.copy(U, "INBOX", [(1, -1)], "Archive", quota=len(data) * 3))
    assert await uids(mail, U, "Archive") == []
    # a move adds nothing, so no quota applies
    await mail.copy(U, "INBOX", [(1, 1)], "Archive", move=True)
    assert await mail.usage(U) == 2 * len(data)


async def test_usage_follows_deliver_append_copy_move_expunge_and_delete(options, clock):
    mail = await Mailstore.open(options, clock=clock)
    a, b = message("a", "a" * 100), message("b", "b" * 333)
    try:
        only(await mail.deliver([Recipient(U)], a))
        await mail.append(U, "INBOX", b)
        assert await mail.usage(U) == len(a) + len(b)
        await mail.copy(U, "INBOX", [(1, 2)], "Archive")  # a copy counts again
        assert await mail.usage(U) == 2 * (len(a) + len(b))
        await mail.copy(U, "Archive", [(1, 1)], "Trash", move=True)
        assert await mail.usage(U) == 2 * (len(a) + len(b))
        await mark_deleted(mail, U, "INBOX", [(2, 2)])
        await mail.expunge(U, "INBOX")
        assert await mail.usage(U) == 2 * len(a) + len(b)
        await mail.delete_mailbox(U, "Trash")
        assert await mail.usage(U) == len(a) + len(b)
        await mail.create_mailbox(U, "Keep/Deep")
        await mail.copy(U, "Archive", [(1, -1)], "Keep/Deep")
        usage = await mail.usage(U)
        assert usage == len(a) + 2 * len(b)
        await check_invariants(mail, [U])
    finally:
        await mail.close()
    mail = await Mailstore.open(options, clock=clock)
    try:
        assert await mail.usage(U) == usage
        await check_invariants(mail, [U])
    finally:
        await mail.close()


async def test_prune_keys_forgets_keys_older_than_the_retention(options):
    clock = FakeClock(T0)
    mail = await Mailstore.open(options, clock=clock, key_retention=100.0)
    try:
        only(await mail.deliver([Recipient(U, key="P:old")], message()))
        clock.advance(60)
        only(await mail.deliver([Recipient(U, key="P:new")], message()))
        clock.advance(50)  # P:old is 110 s old, P:new 50 s
        await mail.prune_keys()
        assert not only(await mail.deliver([Recipient(U, key="P:old")], message())).duplicate
        assert only(await mail.deliver([Recipient(U, key="P:new")], message())).duplicate
        assert await uids(mail, U, "INBOX") == [1, 2, 3]
    finally:
        await mail.close()


async def test_prune_keys_measures_key_age_from_the_delivery_not_the_internal_date(mail, clock):
    only(await mail.deliver([Recipient(U, key="P:backdated")], message(), internaldate=T0 - 30 * 86400))
    await mail.prune_keys()
    assert only(await mail.deliver([Recipient(U, key="P:backdated")], message())).duplicate
    assert await uids(mail, U, "INBOX") == [1]


async def test_delivery_racing_a_mailbox_delete_leaks_nothing(mail):
    await mail.ensure_user(U)
    real_read = mail.store.read
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_read(fn):  # the delete's read of its messages takes a while
        result = await real_read(fn)
        entered.set()
        await release.wait()
        return result

    mail.store.read = slow_read
    deleting = asyncio.create_task(mail.delete_mailbox(U, "Junk"))
    await entered.wait()
    mail.store.read = real_read
    delivering = asyncio.create_task(mail.deliver([Recipient(U, mailbox="Junk")], message("racing")))
    await asyncio.sleep(0.05)
    release.set()
    await deleting
    result = (await delivering)[0]
    if isinstance(result, Delivered):
        await check_invariants(mail, [U])
    else:
        assert isinstance(result, MailError) and result.kind is ErrorKind.NOTFOUND


# ---------------------------------------------------------------------------
# 3. UIDs, UIDVALIDITY, MODSEQ


async def test_uids_ascend_and_are_never_reused_after_expunge_and_reopen(options, clock):
    mail = await Mailstore.open(options, clock=clock)
    try:
        for i in range(3):
            assert only(await mail.deliver([Recipient(U)], message(f"{i}"))).uid == i + 1
        await mark_deleted(mail, U, "INBOX", [(2, 3)])
        assert await mail.expunge(U, "INBOX") == [2, 3]
        assert (await mail.append(U, "INBOX", message("after")))[1] == 4
        await mark_deleted(mail, U, "INBOX", [(4, 4)])
        await mail.expunge(U, "INBOX")
        assert (await mail.status(U, "INBOX")).uidnext == 5
    finally:
        await mail.close()
    mail = await Mailstore.open(options, clock=clock)
    try:
        assert (await mail.select(U, "INBOX")).uidnext == 5
        assert only(await mail.deliver([Recipient(U)], message())).uid == 5
        await mark_deleted(mail, U, "INBOX", [(5, 5)])
        await mail.expunge(U, "INBOX")
        await mail.store.checkpoint()
    finally:
        await mail.close()
    mail = await Mailstore.open(options, clock=clock)
    try:
        assert (await mail.append(U, "INBOX", message()))[1] == 6
        assert await uids(mail, U, "INBOX") == [1, 6]
    finally:
        await mail.close()


async def test_concurrent_deliveries_get_distinct_ascending_uids(mail):
    await mail.ensure_user(U)
    results = await asyncio.gather(*(mail.deliver([Recipient(U)], message(f"{i}")) for i in range(30)))
    got = sorted(only(r).uid for r in results)
    assert got == list(range(1, 31))
    snap = await mail.select(U, "INBOX")
    assert [m[0] for m in snap.messages] == got and snap.uidnext == 31
    # commit order = uid order = modseq order
    assert [m[2] for m in snap.messages] == sorted(m[2] for m in snap.messages)


async def test_uidvalidity_differs_for_a_deleted_and_recreated_name(options, clock):
    mail = await Mailstore.open(options, clock=clock)  # the clock stands still: same second every time
    try:
        await mail.create_mailbox(U, "Proj")
        seen = [(await mail.select(U, "Proj")).uidvalidity]
        for _ in range(3):
            await mail.delete_mailbox(U, "Proj")
            await mail.create_mailbox(U, "Proj")
            seen.append((await mail.select(U, "Proj")).uidvalidity)
        await mail.delete_mailbox(U, "Proj")
        everything = {row[0] for row in await sql(mail, "SELECT uidvalidity FROM mailboxes")}
    finally:
        await mail.close()
    assert len(set(seen)) == len(seen) and seen == sorted(seen)
    mail = await Mailstore.open(options, clock=clock)
    try:
        await mail.create_mailbox(U, "Proj")
        again = (await mail.select(U, "Proj")).uidvalidity
        assert again > max(seen) and again not in everything
    finally:
        await mail.close()


async def test_counters_restored_after_reopen_even_when_the_newest_mailbox_was_deleted(options, clock):
    mail = await Mailstore.open(options, clock=clock)
    try:
        await mail.create_mailbox(U, "Newest")
        newest = await mail.select(U, "Newest")
        await mail.store.checkpoint()
        await mail.create_mailbox(U, "Newer")
        newer = await mail.select(U, "Newer")
        await mail.delete_mailbox(U, "Newer")
        await mail.delete_mailbox(U, "Newest")
    finally:
        await mail.close()
    for rebuild in (False, True):
        if rebuild:
            store = await rebuild_index(options, MailIndex())
            await store.close()
        mail = await Mailstore.open(options, clock=clock)
        try:
            name = f"After{int(rebuild)}"
            await mail.create_mailbox(U, name)
            after = await mail.select(U, name)
            assert after.mailbox > newer.mailbox > newest.mailbox
            assert after.uidvalidity > newer.uidvalidity > newest.uidvalidity
            newer = after
        finally:
            await mail.close()


async def test_modseq_grows_with_every_change_and_highestmodseq_follows(mail):
    def top(snap):
        return max((m[2] for m in snap.messages), default=0)

    history = []

    async def step():
        inbox, archive = await mail.select(U, "INBOX"), await mail.select(U, "Archive")
        st = await mail.status(U, "INBOX")
        assert st.highestmodseq == inbox.highestmodseq >= top(inbox)
        history.append((inbox.highestmodseq, archive.highestmodseq))

    await mail.ensure_user(U)
    await step()
    only(await mail.deliver([Recipient(U)], message()))
    await step()
    await mail.append(U, "INBOX", message(), flags=["\\Seen"])
    await step()
    changed, _ = await mail.store_flags(U, "INBOX", [(1, 1)], "+", ["\\Flagged"])
    await step()
    assert changed[0][2] == history[-1][0] == top(await mail.select(U, "INBOX"))
    await mail.copy(U, "INBOX", [(1, 1)], "Archive")
    a = history[-1]
    await step()
    assert history[-1][1] > a[1] and history[-1][0] == a[0]  # a copy changes only the target
    await mail.copy(U, "INBOX", [(2, 2)], "Archive", move=True)
    a = history[-1]
    await step()
    assert history[-1][0] > a[0] and history[-1][1] > a[1]  # a move changes both
    await mark_deleted(mail, U, "INBOX")
    await step()
    await mail.expunge(U, "INBOX")
    await step()
    assert history[0][0] == 0
    # every step but the copy (which changes only Archive) raised INBOX's highestmodseq
    assert all(history[i][0] < history[i + 1][0] for i in (0, 1, 2, 4, 5, 6)), history
    # a no-op changes nothing
    before = (await mail.select(U, "Archive")).highestmodseq
    assert await mail.store_flags(U, "Archive", [(1, -1)], "-", ["\\Draft"]) == ([], [])
    assert await mail.expunge(U, "Archive") == []
    assert (await mail.select(U, "Archive")).highestmodseq == before


# ---------------------------------------------------------------------------
# 4. append, select, fetch, message bytes


async def test_append_with_flags_and_internal_date(mail):
    data = message("appended")
    when = utc(2020, 2, 29, 13, 14, 15) + 0.25
    uidvalidity, uid = await mail.append(U, "Drafts", data,
                                         flags=["\\seen", "$Label", "\\FLAGGED", "$label"], internaldate=when)
    snap = await mail.select(U, "Drafts")
    assert (uidvalidity, uid) == (snap.uidvalidity, 1)
    [meta] = await mail.fetch(U, "Drafts", [(1, 1)])
    assert meta.flags == "$Label \\Flagged \\Seen"
    assert meta.internaldate == when and meta.size == len(data) and meta.uid == 1
    info = json.loads(meta.info)
    assert info  # the stored scan of .mime: a JSON document
    assert await mail.read_message(U, "Drafts", 1) == data
    assert snap.messages == ((1, "$Label \\Flagged \\Seen", meta.modseq),)


async def test_append_errors(mail):
    await fails(ErrorKind.NOTFOUND, mail.append(U, "Nope", message()))
    await fails(ErrorKind.INVALID, mail.append(U, "INBOX", message(), flags=["\\Recent"]))
    await fails(ErrorKind.INVALID, mail.append(U, "INBOX", message(), flags=["\\Bogus"]))
    await fails(ErrorKind.INVALID, mail.append(U, "INBOX", message(), flags=["two words"]))
    await fails(ErrorKind.LIMIT, mail.append(U, "INBOX", message(), flags=[f"k{i}" for i in range(129)]))
    await mail.append(U, "INBOX", message(), flags=[f"k{i}" for i in range(128)])
    assert await uids(mail, U, "INBOX") == [1]


async def test_select_snapshot(mail):
    only(await mail.deliver([Recipient(U)], message("1")))
    await mail.append(U, "INBOX", message("2"), flags=["\\Answered"])
    only(await mail.deliver([Recipient(U)], message("3")))
    await mark_deleted(mail, U, "INBOX", [(3, 3)])
    await mail.expunge(U, "INBOX")
    snap = await mail.select(U, "inbox")
    assert snap.name == "INBOX" and snap.uidnext == 4
    assert [(m[0], m[1]) for m in snap.messages] == [(1, ""), (2, "\\Answered")]
    assert snap.highestmodseq == (await mail.status(U, "INBOX")).highestmodseq
    await fails(ErrorKind.NOTFOUND, mail.select(U, "Missing"))


async def test_fetch_by_uid_ranges_star_reversed_and_changed_since(mail):
    for i in range(6):
        await mail.append(U, "INBOX", message(f"m{i}"))
    await mark_deleted(mail, U, "INBOX", [(3, 3)])
    await mail.expunge(U, "INBOX")

    async def f(ranges, **kw):
        return [m.uid for m in await mail.fetch(U, "INBOX", ranges, **kw)]

    assert await f([(1, -1)]) == [1, 2, 4, 5, 6]
    assert await f([(2, 4)]) == [2, 4]
    assert await f([(4, 2)]) == [2, 4]
    assert await f([(5, -1)]) == [5, 6]
    assert await f([(10, -1)]) == [6]  # 10:* is 6:10
    assert await f([(1, 1), (6, 6), (5, 5)]) == [1, 5, 6]
    assert await f([(2, 3), (2, 4)]) == [2, 4]
    assert await f([(7, 100)]) == []
    assert await f([]) == []
    highest = (await mail.select(U, "INBOX")).highestmodseq
    await mail.store_flags(U, "INBOX", [(2, 2), (5, 5)], "+", ["\\Seen"])
    assert await f([(1, -1)], changed_since=highest) == [2, 5]
    assert await f([(3, 5)], changed_since=highest) == [5]
    assert await f([(1, -1)], changed_since=highest + 1) == []
    metas = await mail.fetch(U, "INBOX", [(1, 2)], with_info=False)
    assert [m.info for m in metas] == ["", ""]
    assert json.loads((await mail.fetch(U, "INBOX", [(1, 1)]))[0].info)
    await fails(ErrorKind.NOTFOUND, mail.fetch(U, "Nope", [(1, -1)]))


async def test_fetch_with_many_disjoint_ranges(mail):
    for i in range(4):
        await mail.append(U, "INBOX", message(f"{i}"))
    ranges = names.uid_ranges([[2 * i + 1, 2 * i + 1] for i in range(1500)])
    assert [m.uid for m in await mail.fetch(U, "INBOX", ranges)] == [1, 3]


async def test_iter_message_slices_equal_the_original_bytes(mail):
    rng = random.Random(7)
    small = message("small", "".join(f"line {i}\r\n" for i in range(300)))
    big = message("big", "".join(f"{i:08d} " + "z" * 70 + "\r\n" for i in range(13_500)))
    assert len(big) > 1 << 20
    only(await mail.deliver([Recipient(U)], small))
    only(await mail.deliver([Recipient(U)], big))
    assert await mail.read_message(U, "INBOX", 2) == big

    async def collect(uid, *args, **kwargs):
        return [piece async for piece in mail.iter_message(U, "INBOX", uid, *args, **kwargs)]

    whole = await collect(2)
    assert b"".join(whole) == big and len(whole) > 1 and all(whole)
    assert b"".join(await collect(1)) == small
    for uid, data in ((1, small), (2, big)):
        for _ in range(25):
            offset = rng.randrange(len(data) + 10)
            length = rng.choice([None, 0, 1, rng.randrange(1, 200_000)])
            chunk = rng.choice([1 << 10, 7_777, 64 << 10, 1 << 20])
            pieces = await collect(uid, offset, length, chunk=chunk)
            want = data[offset:] if length is None else data[offset:offset + length]
            assert b"".join(pieces) == want, (uid, offset, length, chunk)
            assert all(pieces)
    # chunks of a 1 MiB message arrive in order and bounded in size
    pieces = await collect(2, 0, None, chunk=100_000)
    assert len(pieces) == -(-len(big) // 100_000) and max(map(len, pieces)) <= 100_000
    await fails(ErrorKind.NOTFOUND, collect(9))


# ---------------------------------------------------------------------------
# 5. flags


async def test_store_flags_add_remove_replace(mail):
    for _ in range(3):
        await mail.append(U, "INBOX", message())
    changed, failed = await mail.store_flags(U, "INBOX", [(1, 2)], "+", ["\\Seen", "$Work"])
    m1 = changed[0][2]
    assert changed == [(1, "$Work \\Seen", m1), (2, "$Work \\Seen", m1)] and failed == []
    changed, _ = await mail.store_flags(U, "INBOX", [(1, -1)], "-", ["\\seen"])
    m2 = changed[0][2]
    assert m2 == m1 + 1
    assert changed == [(1, "$Work", m2), (2, "$Work", m2)]  # 3 had no \Seen: unchanged
    changed, _ = await mail.store_flags(U, "INBOX", [(2, 3)], "=", ["\\Draft", "\\Answered"])
    m3 = changed[0][2]
    assert changed == [(2, "\\Answered \\Draft", m3), (3, "\\Answered \\Draft", m3)]
    changed, _ = await mail.store_flags(U, "INBOX", [(2, 2)], "=", [])
    assert changed == [(2, "", m3 + 1)]
    snap = await mail.select(U, "INBOX")
    assert snap.messages == ((1, "$Work", m2), (2, "", m3 + 1), (3, "\\Answered \\Draft", m3))
    assert snap.highestmodseq == m3 + 1


async def test_keywords_and_system_flags_are_case_insensitive(mail):
    await mail.append(U, "INBOX", message(), flags=["$Work"])
    modseq = (await mail.select(U, "INBOX")).highestmodseq
    assert await mail.store_flags(U, "INBOX", [(1, 1)], "+", ["$WORK", "$work"]) == ([], [])
    assert (await mail.select(U, "INBOX")).highestmodseq == modseq
    changed, _ = await mail.store_flags(U, "INBOX", [(1, 1)], "+", ["\\SEEN", "\\seen"])
    assert changed[0][1] == "$Work \\Seen"
    changed, _ = await mail.store_flags(U, "INBOX", [(1, 1)], "-", ["$wORK"])
    assert changed[0][1] == "\\Seen"
    assert await mail.store_flags(U, "INBOX", [(1, 1)], "-", ["$work"]) == ([], [])


async def test_unchanged_since_fails_messages_modified_after_it(mail):
    for _ in range(3):
        await mail.append(U, "INBOX", message())
    base = (await mail.select(U, "INBOX")).highestmodseq
    await mail.store_flags(U, "INBOX", [(2, 2)], "+", ["$Touched"])
    changed, failed = await mail.store_flags(U, "INBOX", [(1, -1)], "+", ["\\Seen"], unchanged_since=base)
    assert [c[0] for c in changed] == [1, 3] and failed == [2]
    snap = await mail.select(U, "INBOX")
    assert snap.messages[1][1] == "$Touched"
    # messages with modseq > 0 always fail UNCHANGEDSINCE 0
    changed, failed = await mail.store_flags(U, "INBOX", [(1, -1)], "-", ["\\Seen"], unchanged_since=0)
    assert changed == [] and failed == [1, 2, 3]
    # a message that would not change still fails only if modified after it
    current = (await mail.select(U, "INBOX")).highestmodseq
    changed, failed = await mail.store_flags(U, "INBOX", [(1, 1), (3, 3)], "+", ["\\Seen"],
                                             unchanged_since=current)
    assert changed == [] and failed == []
    assert (await mail.select(U, "INBOX")).highestmodseq == current


@pytest.mark.parametrize("mode, flags, kind", [
    ("x", ["\\Seen"], ErrorKind.INVALID),
    ("", ["\\Seen"], ErrorKind.INVALID),
    ("+", ["\\Bogus"], ErrorKind.INVALID),
    ("+", ["\\Recent"], ErrorKind.INVALID),
    ("+", ["has space"], ErrorKind.INVALID),
    ("+", ["par(en"], ErrorKind.INVALID),
    ("+", ["wild*"], ErrorKind.INVALID),
    ("+", ["brack]et"], ErrorKind.INVALID),
    ("+", [""], ErrorKind.INVALID),
    ("+", [7], ErrorKind.INVALID),
    ("+", ["k" * 129], ErrorKind.INVALID),
    ("=", [f"kw{i}" for i in range(129)], ErrorKind.LIMIT),
])
async def test_invalid_flag_changes_are_refused_and_change_nothing(mail, mode, flags, kind):
    await mail.append(U, "INBOX", message())
    before = await mail.select(U, "INBOX")
    await fails(kind, mail.store_flags(U, "INBOX", [(1, -1)], mode, flags))
    assert await mail.select(U, "INBOX") == before


async def test_store_flags_on_a_missing_mailbox(mail):
    await fails(ErrorKind.NOTFOUND, mail.store_flags(U, "Gone", [(1, -1)], "+", ["\\Seen"]))


# ---------------------------------------------------------------------------
# 6. expunge and blob lifetime


async def test_expunge_all_deleted_and_by_uid_set(mail):
    for _ in range(6):
        await mail.append(U, "INBOX", message())
    await mark_deleted(mail, U, "INBOX", [(2, 2), (4, 6)])
    assert await mail.expunge(U, "INBOX", [(1, 4)]) == [2, 4]
    assert await uids(mail, U, "INBOX") == [1, 3, 5, 6]
    assert await mail.expunge(U, "INBOX", [(1, 1)]) == []
    assert await mail.expunge(U, "INBOX") == [5, 6]
    assert await uids(mail, U, "INBOX") == [1, 3]
    assert (await mail.status(U, "INBOX")).deleted == 0
    await fails(ErrorKind.NOTFOUND, mail.expunge(U, "Gone"))


async def test_a_blob_is_freed_with_its_last_message(mail):
    data = message("shared")
    only(await mail.deliver([Recipient(U)], data))
    blob = await blob_of(mail, U, "INBOX", 1)
    await mail.copy(U, "INBOX", [(1, 1)], "Archive")
    await mail.copy(U, "INBOX", [(1, 1)], "INBOX")  # a copy in the same mailbox
    assert await blob_of(mail, U, "Archive", 1) == blob == await blob_of(mail, U, "INBOX", 2)
    await mark_deleted(mail, U, "INBOX", [(1, 1)])
    await mail.expunge(U, "INBOX")
    assert await mail.read_message(U, "Archive", 1) == data
    assert await mail.read_message(U, "INBOX", 2) == data
    assert blob in await blob_ids(mail)
    await mark_deleted(mail, U, "INBOX")
    await mail.expunge(U, "INBOX")
    assert await mail.store.read_blob(blob) == data
    await mark_deleted(mail, U, "Archive")
    await mail.expunge(U, "Archive")
    assert blob not in await blob_ids(mail)
    await fails(ErrorKind.NOTFOUND, mail.store.read_blob(blob))
    await check_invariants(mail, [U])


async def test_deleting_a_mailbox_frees_only_blobs_nobody_else_references(mail):
    only(await mail.deliver([Recipient(U)], message("kept")))
    only(await mail.deliver([Recipient(U)], message("dropped")))
    await mail.create_mailbox(U, "Tmp")
    await mail.copy(U, "INBOX", [(1, 2)], "Tmp")
    await mark_deleted(mail, U, "INBOX", [(2, 2)])
    await mail.expunge(U, "INBOX")
    kept, dropped = await blob_of(mail, U, "Tmp", 1), await blob_of(mail, U, "Tmp", 2)
    await mail.delete_mailbox(U, "Tmp")
    assert kept in await blob_ids(mail) and dropped not in await blob_ids(mail)
    assert await mail.read_message(U, "INBOX", 1) == message("kept")
    await check_invariants(mail, [U])


# ---------------------------------------------------------------------------
# 7. copy and move


async def test_copy_returns_pairs_and_the_target_uidvalidity(mail):
    for i in range(4):
        await mail.append(U, "INBOX", message(f"c{i}"), flags=["\\Seen"] if i % 2 else [],
                          internaldate=utc(2024, 1, i + 1))
    await mail.append(U, "Archive", message("already there"))
    target = await mail.select(U, "Archive")
    uidvalidity, pairs = await mail.copy(U, "INBOX", [(2, 4)], "Archive")
    assert uidvalidity == target.uidvalidity
    assert pairs == [(2, 2), (3, 3), (4, 4)]
    src = await mail.fetch(U, "INBOX", [(2, 4)])
    dst = await mail.fetch(U, "Archive", [(2, 4)])
    for s, d in zip(src, dst, strict=True):
        assert (s.flags, s.internaldate, s.size, s.info) == (d.flags, d.internaldate, d.size, d.info)
        assert await mail.read_message(U, "INBOX", s.uid) == await mail.read_message(U, "Archive", d.uid)
    assert await uids(mail, U, "INBOX") == [1, 2, 3, 4]
    assert (await mail.status(U, "Archive")).uidnext == 5
    assert {m[2] for m in (await mail.select(U, "Archive")).messages[1:]} == {
        (await mail.select(U, "Archive")).highestmodseq}
    assert await mail.copy(U, "INBOX", [(50, 60)], "Archive") == (target.uidvalidity, [])
    await fails(ErrorKind.NOTFOUND, mail.copy(U, "INBOX", [(1, 1)], "Nowhere"))
    await fails(ErrorKind.NOTFOUND, mail.copy(U, "Nowhere", [(1, 1)], "INBOX"))


async def test_move_and_copy_within_one_mailbox(mail):
    for i in range(3):
        await mail.append(U, "INBOX", message(f"m{i}"))
    uidvalidity, pairs = await mail.copy(U, "INBOX", [(1, 2)], "Trash", move=True)
    assert uidvalidity == (await mail.select(U, "Trash")).uidvalidity and pairs == [(1, 1), (2, 2)]
    assert await uids(mail, U, "INBOX") == [3] and await uids(mail, U, "Trash") == [1, 2]
    assert await mail.read_message(U, "Trash", 2) == message("m1")
    before = await mail.select(U, "Trash")
    await fails(ErrorKind.INVALID, mail.copy(U, "Trash", [(1, -1)], "Trash", move=True))
    assert await mail.select(U, "Trash") == before
    _, pairs = await mail.copy(U, "Trash", [(1, 1)], "Trash")
    assert pairs == [(1, 3)]
    assert await uids(mail, U, "Trash") == [1, 2, 3]


# ---------------------------------------------------------------------------
# 8. mailboxes


def box_table(boxes) -> list[tuple[str, bool, bool]]:
    return [(b.name, b.subscribed, b.has_children) for b in boxes]


async def test_create_with_parents_and_errors(mail):
    await mail.create_mailbox(U, "Work/2024/Q1")
    names_ = [b.name for b in await mail.list_mailboxes(U)]
    assert {"Work", "Work/2024", "Work/2024/Q1"} <= set(names_)
    listed = {b.name: b for b in await mail.list_mailboxes(U)}
    assert listed["Work"].has_children and listed["Work/2024"].has_children
    assert not listed["Work/2024/Q1"].has_children and not listed["Work"].subscribed
    await fails(ErrorKind.EXISTS, mail.create_mailbox(U, "Work/2024"))
    await fails(ErrorKind.EXISTS, mail.create_mailbox(U, "inbox"))
    await fails(ErrorKind.INVALID, mail.create_mailbox(U, "Odd", "\\Bogus"))
    await mail.create_mailbox(U, "Everything", "\\All")
    assert listed.keys() < {b.name for b in await mail.list_mailboxes(U)}
    assert {b.name: b.special_use for b in await mail.list_mailboxes(U)}["Everything"] == "\\All"
    work = await mail.select(U, "Work")
    await mail.create_mailbox(U, "Work/2025")  # a parent that exists is not created again
    assert await mail.select(U, "Work") == work


async def test_delete_refuses_inbox_and_keeps_inferiors(mail):
    for name in ("INBOX", "inbox", "InBoX"):
        await fails(ErrorKind.PERM, mail.delete_mailbox(U, name))
    await mail.create_mailbox(U, "A/B")
    await mail.append(U, "A", message("in a"))
    await mail.append(U, "A/B", message("in a/b"))
    await mail.delete_mailbox(U, "A")
    listed = {b.name: b for b in await mail.list_mailboxes(U)}
    assert "A" not in listed and "A/B" in listed
    assert await mail.read_message(U, "A/B", 1) == message("in a/b")
    await fails(ErrorKind.NOTFOUND, mail.select(U, "A"))
    await fails(ErrorKind.NOTFOUND, mail.delete_mailbox(U, "A"))
    # the name can be made again, fresh
    await mail.create_mailbox(U, "A")
    assert (await mail.select(U, "A")).messages == ()
    assert {b.name: b for b in await mail.list_mailboxes(U)}["A"].has_children


async def test_rename_moves_inferiors_and_keeps_messages(mail):
    await mail.create_mailbox(U, "Old/Sub/Leaf")
    await mail.append(U, "Old", message("o"))
    await mail.append(U, "Old/Sub/Leaf", message("leaf"))
    before = {n: await mail.select(U, n) for n in ("Old", "Old/Sub", "Old/Sub/Leaf")}
    await mail.rename_mailbox(U, "Old", "New/Place")
    listed = [b.name for b in await mail.list_mailboxes(U)]
    assert "Old" not in listed and "Old/Sub" not in listed
    assert {"New", "New/Place", "New/Place/Sub", "New/Place/Sub/Leaf"} <= set(listed)
    for old, new in (("Old", "New/Place"), ("Old/Sub", "New/Place/Sub"), ("Old/Sub/Leaf", "New/Place/Sub/Leaf")):
        after = await mail.select(U, new)
        b = before[old]
        assert (after.mailbox, after.uidvalidity, after.uidnext, after.messages) == (
            b.mailbox, b.uidvalidity, b.uidnext, b.messages)
        await fails(ErrorKind.NOTFOUND, mail.select(U, old))
    assert await mail.read_message(U, "New/Place/Sub/Leaf", 1) == message("leaf")
    await fails(ErrorKind.INVALID, mail.rename_mailbox(U, "New", "New/Place/Inside"))
    await fails(ErrorKind.EXISTS, mail.rename_mailbox(U, "New/Place", "Sent"))
    await fails(ErrorKind.EXISTS, mail.rename_mailbox(U, "New/Place", "inbox"))
    await fails(ErrorKind.NOTFOUND, mail.rename_mailbox(U, "Ghost", "Spirit"))
    # the old name is free again
    await mail.create_mailbox(U, "Old")
    assert (await mail.select(U, "Old")).messages == ()


async def test_rename_onto_an_existing_inferior_name_is_refused(mail, options, clock):
    await mail.create_mailbox(U, "a/x")
    await mail.create_mailbox(U, "c/x")
    await mail.delete_mailbox(U, "c")
    with pytest.raises(MailError) as info:
        await mail.rename_mailbox(U, "a", "c")
    assert info.value.kind is ErrorKind.EXISTS
    assert mail.store.failure is None
    assert {"a", "a/x", "c/x"} <= {b.name for b in await mail.list_mailboxes(U)}


async def test_rename_inbox_moves_its_messages_and_inbox_keeps_receiving(mail):
    await mail.create_mailbox(U, "INBOX/Child")
    for i in range(3):
        only(await mail.deliver([Recipient(U, key=f"I:{i}")], message(f"i{i}")))
    await mark_deleted(mail, U, "INBOX", [(2, 2)])
    await mail.expunge(U, "INBOX")
    await mail.store_flags(U, "INBOX", [(3, 3)], "+", ["\\Seen"])
    inbox = await mail.select(U, "INBOX")
    await mail.rename_mailbox(U, "inbox", "Old Mail/2024")
    moved = await mail.select(U, "Old Mail/2024")
    assert [(m[0], m[1]) for m in moved.messages] == [(1, ""), (2, "\\Seen")]
    assert moved.uidnext == 3 and moved.uidvalidity != inbox.uidvalidity
    assert await mail.read_message(U, "Old Mail/2024", 2) == message("i2")
    after = await mail.select(U, "INBOX")
    assert after.messages == () and after.mailbox == inbox.mailbox
    assert after.uidvalidity == inbox.uidvalidity and after.uidnext == inbox.uidnext
    assert after.highestmodseq > inbox.highestmodseq
    assert "INBOX/Child" in {b.name for b in await mail.list_mailboxes(U)}  # inferiors of INBOX stay
    assert "Old Mail" in {b.name for b in await mail.list_mailboxes(U)}
    d = only(await mail.deliver([Recipient(U)], message("new")))
    assert d.uid == inbox.uidnext and d.uidvalidity == inbox.uidvalidity
    dup = only(await mail.deliver([Recipient(U, key="I:0")], message("i0")))
    assert dup.duplicate
    await fails(ErrorKind.INVALID, mail.rename_mailbox(U, "INBOX", "INBOX/Child2"))
    await fails(ErrorKind.EXISTS, mail.rename_mailbox(U, "INBOX", "Old Mail/2024"))
    # an empty INBOX renames too
    await mark_deleted(mail, U, "INBOX")
    await mail.expunge(U, "INBOX")
    await mail.rename_mailbox(U, "INBOX", "Empty")
    assert (await mail.select(U, "Empty")).messages == () and (await mail.select(U, "Empty")).uidnext == 1
    await check_invariants(mail, [U])


async def test_subscribe_and_unsubscribe(mail):
    await mail.ensure_user(U)
    await mail.subscribe(U, "Trash", False)
    await mail.subscribe(U, "inbox/Later")  # a name that does not exist (yet) may be subscribed
    await mail.subscribe(U, "Sent", True)  # twice is once
    subs = await mail.subscriptions(U)
    assert subs == sorted(set(DEFAULT_BOXES) - {"Trash"} | {"INBOX/Later"})
    listed = {b.name: b.subscribed for b in await mail.list_mailboxes(U)}
    assert listed["Trash"] is False and listed["Sent"] is True and "INBOX/Later" not in listed
    await mail.create_mailbox(U, "INBOX/Later")
    assert {b.name: b.subscribed for b in await mail.list_mailboxes(U)}["INBOX/Later"] is True
    await mail.subscribe(U, "Nothing", False)
    await fails(ErrorKind.INVALID, mail.subscribe(U, "bad*name"))
    await fails(ErrorKind.INVALID, mail.subscribe("", "INBOX"))
    assert await mail.subscriptions(V) == []


@pytest.mark.parametrize("name, kind", [
    ("", ErrorKind.INVALID),
    ("a//b", ErrorKind.INVALID),
    ("/a", ErrorKind.INVALID),
    ("a/", ErrorKind.INVALID),
    ("/", ErrorKind.INVALID),
    ("a*b", ErrorKind.INVALID),
    ("50%", ErrorKind.INVALID),
    ("tab\there", ErrorKind.INVALID),
    ("nul\x00", ErrorKind.INVALID),
    ("del\x7f", ErrorKind.INVALID),
    ("line\nbreak", ErrorKind.INVALID),
    ("half\ud800surrogate", ErrorKind.INVALID),
    ("x" * 513, ErrorKind.LIMIT),
    ("é" * 257, ErrorKind.LIMIT),  # 514 bytes of UTF-8
    (None, ErrorKind.INVALID),
    (5, ErrorKind.INVALID),
], ids=["empty", "empty-level", "leading-slash", "trailing-slash", "slash", "star", "percent", "tab", "nul", "del",
        "newline", "surrogate", "513-bytes", "514-utf8-bytes", "none", "int"])
async def test_bad_mailbox_names(mail, name, kind):
    await mail.ensure_user(U)
    await fails(kind, mail.create_mailbox(U, name))
    await fails(kind, mail.rename_mailbox(U, "Sent", name))
    await fails(kind, mail.subscribe(U, name))
    with pytest.raises(MailError) as info:
        names.mailbox_name(name)
    assert info.value.kind is kind
    assert [b.name for b in await mail.list_mailboxes(U)] == DEFAULT_BOXES


async def test_longest_name_and_unicode_names_are_fine(mail):
    longest = "é" * 256  # 512 bytes
    await mail.create_mailbox(U, longest)
    await mail.create_mailbox(U, "Ünïcødé/日本語")
    listed = {b.name for b in await mail.list_mailboxes(U)}
    assert {longest, "Ünïcødé", "Ünïcødé/日本語"} <= listed


async def test_inbox_is_case_insensitive_only_as_the_first_level(mail):
    only(await mail.deliver([Recipient(U)], message()))
    for spelling in ("inbox", "Inbox", "iNbOx"):
        assert (await mail.select(U, spelling)).name == "INBOX"
        assert (await mail.status(U, spelling)).messages == 1
    await mail.create_mailbox(U, "iNbOx/Sub")
    await mail.create_mailbox(U, "Inboxes")
    await mail.create_mailbox(U, "Other/inbox")
    listed = {b.name for b in await mail.list_mailboxes(U)}
    assert {"INBOX/Sub", "Inboxes", "Other/inbox"} <= listed
    assert "iNbOx/Sub" not in listed
    assert {b.name: b.has_children for b in await mail.list_mailboxes(U)}["INBOX"] is True
    await fails(ErrorKind.EXISTS, mail.create_mailbox(U, "inbox/Sub"))
    await mail.create_mailbox(U, "INBOX/sub")  # only the first level is folded
    assert names.mailbox_name("inbox/x/inbox") == "INBOX/x/inbox"


async def test_status_counts(mail):
    a, b, c = message("a"), message("bb", "b" * 50), message("ccc", "c" * 99)
    await mail.append(U, "INBOX", a, flags=["\\Seen"])
    await mail.append(U, "INBOX", b, flags=["\\Deleted", "\\Seen"])
    await mail.append(U, "INBOX", c, flags=["$Seen"])  # a keyword, not \Seen
    st = await mail.status(U, "INBOX")
    snap = await mail.select(U, "INBOX")
    assert (st.messages, st.unseen, st.deleted, st.size) == (3, 1, 1, len(a) + len(b) + len(c))
    assert (st.uidnext, st.uidvalidity, st.highestmodseq) == (snap.uidnext, snap.uidvalidity, snap.highestmodseq)
    await fails(ErrorKind.NOTFOUND, mail.status(U, "Missing"))


# ---------------------------------------------------------------------------
# 9. search

NEVER = ["body", "\x01 no such text \x01"]
B64_TEXT = base64.b64encode("Zebra crossing ahead, café included\r\n".encode()).decode()

CORPUS = [
    # 1: plain, \Seen
    (message("Quarterly report", "the numbers look good\r\n", sender="Alice <alice@example.com>",
             to="Bob <bob@example.com>", date="Fri, 01 Mar 2024 10:00:00 +0000"),
     ["\\Seen"], utc(2024, 3, 5, 12)),
    # 2: multipart, base64 text part, RFC 2047 subject, Cc
    (("From: Carol <carol@example.com>\r\nTo: bob@example.com\r\nCc: Dave <dave@example.com>\r\n"
      "Subject: =?utf-8?q?Caf=C3=A9_menu?=\r\nDate: Sun, 10 Mar 2024 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
      "Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n"
      "--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
      f"{B64_TEXT}\r\n"
      "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>menu of the day</p>\r\n--b1--\r\n").encode(),
     ["\\Flagged", "$Important"], utc(2024, 3, 10, 23, 59, 59)),
    # 3: quoted-printable, generic header, Bcc, Message-ID, large
    (("From: frank@example.com\r\nTo: bob@example.com\r\nBcc: eve@example.com\r\nSubject: drinks\r\n"
      "Date: Mon, 01 Apr 2024 00:00:00 +0000\r\nMessage-ID: <ABC.123@Example.COM>\r\nX-Mailer: Mutt/2.2\r\n"
      "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
      "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
      "I like caf=C3=A9 au lait and soft=\r\nbreaks\r\n" + "padding line\r\n" * 400).encode(),
     [], utc(2024, 4, 2)),
    # 4: old, \Deleted
    (message("other", "nothing to see\r\n", sender="Gina <gina@example.com>", to="bob@example.com",
             date="Sun, 31 Dec 2023 23:00:00 +0000"),
     ["\\Deleted"], utc(2023, 12, 31, 23)),
]


async def search_both(mail, criteria, box="INBOX") -> list[int]:
    """The SQL path and the row-by-row path must agree (``or`` with a body node forces the latter)."""
    direct = await mail.search(U, box, criteria)
    python = await mail.search(U, box, ["or", criteria, NEVER])
    assert direct == python, (criteria, direct, python)
    return direct


@pytest.fixture
async def corpus(mail):
    for data, flags, when in CORPUS:
        await mail.append(U, "INBOX", data, flags=flags, internaldate=when)
    changed, _ = await mail.store_flags(U, "INBOX", [(3, 3)], "+", ["$Later"])
    return SimpleNamespace(mail=mail, sizes={i + 1: len(c[0]) for i, c in enumerate(CORPUS)},
                           modseq3=changed[0][2])


async def test_search_flags_sizes_uid_modseq(corpus):
    mail, sizes = corpus.mail, corpus.sizes
    assert await search_both(mail, ["all"]) == [1, 2, 3, 4]
    assert await search_both(mail, ["flag", "\\Seen"]) == [1]
    assert await search_both(mail, ["flag", "\\SEEN"]) == [1]
    assert await search_both(mail, ["unflag", "\\Seen"]) == [2, 3, 4]
    assert await search_both(mail, ["flag", "$important"]) == [2]
    assert await search_both(mail, ["unflag", "$IMPORTANT"]) == [1, 3, 4]
    assert await search_both(mail, ["flag", "\\Deleted"]) == [4]
    assert await search_both(mail, ["flag", "$Later"]) == [3]
    assert await search_both(mail, ["flag", "\\Draft"]) == []
    biggest = max(sizes, key=sizes.get)
    smallest = min(sizes, key=sizes.get)
    assert await search_both(mail, ["larger", sizes[biggest] - 1]) == [biggest]
    assert await search_both(mail, ["larger", sizes[biggest]]) == []
    assert await search_both(mail, ["smaller", sizes[smallest] + 1]) == [smallest]
    assert await search_both(mail, ["smaller", sizes[smallest]]) == []
    assert await search_both(mail, ["larger", 0]) == [1, 2, 3, 4]
    assert await search_both(mail, ["uid", [[2, 3]]]) == [2, 3]
    assert await search_both(mail, ["uid", [[3, 2], [4, 4]]]) == [2, 3, 4]
    assert await search_both(mail, ["uid", [[3, -1]]]) == [3, 4]
    assert await search_both(mail, ["uid", [[9, -1]]]) == [4]
    assert await search_both(mail, ["uid", []]) == []
    assert await search_both(mail, ["modseq", corpus.modseq3]) == [3]
    assert await search_both(mail, ["modseq", corpus.modseq3 - 1]) == [3, 4]
    assert await search_both(mail, ["modseq", 0]) == [1, 2, 3, 4]
    assert await search_both(mail, ["modseq", corpus.modseq3 + 1]) == []


async def test_search_internal_and_sent_dates(corpus):
    mail = corpus.mail
    assert await search_both(mail, ["before", "2024-03-05"]) == [4]
    assert await search_both(mail, ["on", "2024-03-05"]) == [1]
    assert await search_both(mail, ["since", "2024-03-05"]) == [1, 2, 3]
    assert await search_both(mail, ["on", "2024-03-10"]) == [2]  # 23:59:59 is still that day
    assert await search_both(mail, ["on", "2024-03-11"]) == []
    assert await search_both(mail, ["on", "2024-04-02"]) == [3]  # midnight starts the day
    assert await search_both(mail, ["before", "2024-04-02"]) == [1, 2, 4]
    assert await search_both(mail, ["since", "2024-04-03"]) == []
    assert await search_both(mail, ["on", "2023-12-31"]) == [4]
    assert await search_both(mail, ["sentbefore", "2024-03-01"]) == [4]
    assert await search_both(mail, ["senton", "2024-03-01"]) == [1]
    assert await search_both(mail, ["sentsince", "2024-03-10"]) == [2, 3]
    assert await search_both(mail, ["senton", "2024-04-01"]) == [3]
    assert await search_both(mail, ["sentbefore", "2024-04-01"]) == [1, 2, 4]
    assert await search_both(mail, ["senton", "2024-03-05"]) == []


async def test_search_headers_body_and_text(corpus):
    mail = corpus.mail
    assert await search_both(mail, ["header", "from", "alice"]) == [1]
    assert await search_both(mail, ["header", "FROM", "ALICE@EXAMPLE"]) == [1]
    assert await search_both(mail, ["header", "to", "bob"]) == [1, 2, 3, 4]
    assert await search_both(mail, ["header", "cc", "dave"]) == [2]
    assert await search_both(mail, ["header", "bcc", "eve@"]) == [3]
    assert await search_both(mail, ["header", "subject", "QUARTERLY"]) == [1]
    assert await search_both(mail, ["header", "subject", "café menu"]) == [2]  # RFC 2047 decoded
    assert await search_both(mail, ["header", "message-id", "abc.123@example"]) == [3]
    assert await search_both(mail, ["header", "x-mailer", "mutt"]) == [3]
    assert await search_both(mail, ["header", "X-MAILER", ""]) == [3]  # "" matches where the field exists
    assert await search_both(mail, ["header", "received", ""]) == []
    assert await search_both(mail, ["header", "content-transfer-encoding", "base64"]) == []  # top level only
    assert await search_both(mail, ["header", "subject", ""]) == [1, 2, 3, 4]
    assert await search_both(mail, ["body", "zebra crossing"]) == [2]  # base64 decoded
    assert await search_both(mail, ["body", "café au lait"]) == [3]  # quoted-printable decoded
    assert await search_both(mail, ["body", "softbreaks"]) == [3]  # soft line break removed
    assert await search_both(mail, ["body", "café"]) == [2, 3]
    assert await search_both(mail, ["body", "MENU OF THE DAY"]) == [2]
    assert await search_both(mail, ["body", "alice"]) == []  # only in a header
    assert await search_both(mail, ["body", ""]) == [1, 2, 3, 4]
    assert await search_both(mail, ["text", "alice"]) == [1]
    assert await search_both(mail, ["text", "numbers look"]) == [1]
    assert await search_both(mail, ["text", "mutt/2.2"]) == [3]
    assert await search_both(mail, ["text", "café"]) == [2, 3]


async def test_search_and_or_not(corpus):
    mail = corpus.mail
    assert await search_both(mail, ["and"]) == [1, 2, 3, 4]
    assert await search_both(mail, ["and", ["flag", "\\Seen"], ["header", "from", "alice"]]) == [1]
    assert await search_both(mail, ["and", ["flag", "\\Seen"], ["header", "from", "carol"]]) == []
    assert await search_both(mail, ["or", ["flag", "\\Seen"], ["flag", "\\Flagged"]]) == [1, 2]
    assert await search_both(mail, ["not", ["flag", "\\Seen"]]) == [2, 3, 4]
    assert await search_both(mail, ["not", ["not", ["flag", "\\Seen"]]]) == [1]
    assert await search_both(mail, ["and", ["not", ["flag", "\\Deleted"]], ["text", "café"]]) == [2, 3]
    assert await search_both(mail, ["or", ["body", "zebra"], ["header", "x-mailer", "mutt"]]) == [2, 3]
    assert await search_both(mail, ["not", ["body", "café"]]) == [1, 4]
    assert await search_both(mail, ["and", ["uid", [[2, -1]]], ["not", ["body", "zebra"]],
                                    ["since", "2024-01-01"]]) == [3]
    assert await search_both(mail, ["or", ["and", ["larger", 1000], ["flag", "$Later"]],
                                    ["and", ["senton", "2024-03-01"], ["text", "quarterly"]]]) == [1, 3]
    assert await search_both(mail, ["not", ["on", "2024-03-10"]]) == [1, 3, 4]
    assert await search_both(mail, ["not", ["sentsince", "2024-03-10"]]) == [1, 4]
    assert await mail.search(U, "INBOX", ["and", *[["all"]] * 999]) == [1, 2, 3, 4]  # 1000 nodes: the limit
    assert await search_both(mail, ["all"], box="Archive") == []
    await fails(ErrorKind.NOTFOUND, mail.search(U, "Missing", ["all"]))


@pytest.mark.parametrize("criteria, kind", [
    (None, ErrorKind.INVALID),
    ("all", ErrorKind.INVALID),
    ([], ErrorKind.INVALID),
    ([1], ErrorKind.INVALID),
    (["nope"], ErrorKind.INVALID),
    (["all", 1], ErrorKind.INVALID),
    (["or", ["all"]], ErrorKind.INVALID),
    (["or", ["all"], ["all"], ["all"]], ErrorKind.INVALID),
    (["not"], ErrorKind.INVALID),
    (["not", ["all"], ["all"]], ErrorKind.INVALID),
    (["and", "all"], ErrorKind.INVALID),
    (["and", ["all"], ["bogus"]], ErrorKind.INVALID),
    (["flag", "\\Bogus"], ErrorKind.INVALID),
    (["flag", "\\Recent"], ErrorKind.INVALID),
    (["flag"], ErrorKind.INVALID),
    (["unflag", 3], ErrorKind.INVALID),
    (["larger", -1], ErrorKind.INVALID),
    (["larger", True], ErrorKind.INVALID),
    (["smaller", 1.5], ErrorKind.INVALID),
    (["modseq", 2 ** 63], ErrorKind.INVALID),
    (["since", "2024/01/01"], ErrorKind.INVALID),
    (["on", "2024-02-30"], ErrorKind.INVALID),
    (["sentbefore", 20240101], ErrorKind.INVALID),
    (["header", "", "x"], ErrorKind.INVALID),
    (["header", "h" * 257, "x"], ErrorKind.INVALID),
    (["header", 1, "x"], ErrorKind.INVALID),
    (["header", "from"], ErrorKind.INVALID),
    (["header", "from", None], ErrorKind.INVALID),
    (["body", "x" * 1025], ErrorKind.INVALID),
    (["text", 5], ErrorKind.INVALID),
    (["uid", [[0, 1]]], ErrorKind.INVALID),
    (["uid", [[1, 0]]], ErrorKind.INVALID),
    (["uid", [[1, 2 ** 32]]], ErrorKind.INVALID),
    (["uid", [[1]]], ErrorKind.INVALID),
    (["uid", "1:*"], ErrorKind.INVALID),
    (["uid", [[1, 1]] * 10_001], ErrorKind.INVALID),
    (["and", *[["all"]] * 1000], ErrorKind.LIMIT),
    (["or", ["and", *[["all"]] * 600], ["and", *[["all"]] * 600]], ErrorKind.LIMIT),
])
async def test_malformed_search_criteria(mail, criteria, kind):
    await mail.append(U, "INBOX", message())
    await fails(kind, mail.search(U, "INBOX", criteria))
    with pytest.raises(MailError):
        search.compile_search(criteria)


async def test_deeply_nested_search_is_answered_or_limited(mail):
    await mail.append(U, "INBOX", message())
    tree: list = ["flag", "\\Seen"]
    for _ in range(60):
        tree = ["not", tree]
    try:
        got = await mail.search(U, "INBOX", tree)
    except MailError as exc:
        assert exc.kind in (ErrorKind.LIMIT, ErrorKind.INVALID)
    else:
        assert got == [1]


async def test_not_sent_date_matches_messages_without_a_date_header(mail):
    await mail.append(U, "INBOX", message("undated", date=None))
    await mail.append(U, "INBOX", message("dated", date="Mon, 01 Jan 2024 10:00:00 +0000"))
    assert await search_both(mail, ["not", ["sentbefore", "2030-01-01"]]) == [1]
    assert await search_both(mail, ["not", ["senton", "2024-01-01"]]) == [1]


async def test_sent_dates_use_the_date_headers_own_day(mail):
    await mail.append(U, "INBOX", message("late", date="Mon, 1 Jan 2024 23:30:00 -0500"))
    assert await search_both(mail, ["senton", "2024-01-01"]) == [1]
    assert await search_both(mail, ["senton", "2024-01-02"]) == []


# ---------------------------------------------------------------------------
# 10. notifications


async def test_listen_receives_every_kind_of_change_after_its_commit(mail):
    await mail.ensure_user(U)
    inbox, everything = Events(mail), Events(mail)
    box_id, stop = mail.listen(U, "inbox", inbox)
    mail.listen_all(everything)
    assert box_id == (await mail.select(U, "INBOX")).mailbox

    commits = mail.store.stats.commits
    only(await mail.deliver([Recipient(U)], message()))
    assert inbox.seen[-1][1] == {"event": "exists", "uid": 1, "uidnext": 2}
    assert inbox.seen[-1][2] > commits  # sent after the commit was acknowledged
    await mail.append(U, "INBOX", message())
    assert inbox.events()[-1] == {"event": "exists", "uid": 2, "uidnext": 3}
    changed, _ = await mail.store_flags(U, "INBOX", [(1, 2)], "+", ["\\Deleted"])
    assert inbox.events()[-2:] == [{"event": "flags", "uid": u, "flags": "\\Deleted", "modseq": changed[0][2]}
                                   for u in (1, 2)]
    await mail.store_flags(U, "INBOX", [(2, 2)], "-", ["\\Deleted"])
    commits = mail.store.stats.commits
    await mail.expunge(U, "INBOX")
    assert inbox.events()[-1] == {"event": "expunge", "uids": [1]}
    assert inbox.seen[-1][2] > commits
    await mail.copy(U, "INBOX", [(2, 2)], "Archive", move=True)
    assert inbox.events()[-1] == {"event": "expunge", "uids": [2]}
    archive_id = (await mail.select(U, "Archive")).mailbox
    assert (archive_id, {"event": "exists", "uid": 1, "uidnext": 2}) in [(b, e) for b, e, _ in everything.seen]
    await mail.copy(U, "Archive", [(1, 1)], "INBOX")
    assert inbox.events()[-1] == {"event": "exists", "uid": 3, "uidnext": 4}
    n = len(inbox.seen)
    await mail.store_flags(U, "INBOX", [(3, 3)], "+", ["\\Deleted"])  # a no-op sends nothing
    await mail.store_flags(U, "INBOX", [(3, 3)], "+", ["\\Deleted"])
    assert len(inbox.seen) == n + 1
    stop()
    stop()  # twice is harmless
    only(await mail.deliver([Recipient(U)], message()))
    assert len(inbox.seen) == n + 1
    assert everything.seen[-1][:2] == (box_id, {"event": "exists", "uid": 4, "uidnext": 5})
    assert {b for b, _, _ in everything.seen} == {box_id, archive_id}
    # duplicates and refused deliveries send nothing
    n = len(everything.seen)
    await mail.deliver([Recipient(U, key="N:1")], message())
    await mail.deliver([Recipient(U, key="N:1")], message())
    await mail.deliver([Recipient(U, quota=1)], message())
    assert len(everything.seen) == n + 1


async def test_listeners_hear_gone_and_renamed(mail):
    await mail.create_mailbox(U, "P/Q")
    p, q, everything = Events(mail), Events(mail), Events(mail)
    p_id, _ = mail.listen(U, "P", p)
    q_id, _ = mail.listen(U, "P/Q", q)
    mail.listen_all(everything)
    await mail.rename_mailbox(U, "P", "R")
    assert p.events() == [{"event": "renamed", "name": "R"}]
    assert q.events() == [{"event": "renamed", "name": "R/Q"}]
    await mail.delete_mailbox(U, "R/Q")
    assert q.events()[-1] == {"event": "gone"}
    assert (q_id, {"event": "gone"}) in [(b, e) for b, e, _ in everything.seen]
    # a deleted mailbox's listeners are dropped: a new mailbox never reaches them
    await mail.create_mailbox(U, "R/Q")
    await mail.append(U, "R/Q", message())
    assert q.kinds() == ["renamed", "gone"]
    # renaming INBOX: its messages leave (expunge), INBOX itself is not renamed
    i = Events(mail)
    mail.listen(U, "INBOX", i)
    only(await mail.deliver([Recipient(U)], message()))
    await mail.rename_mailbox(U, "INBOX", "Saved")
    assert i.events()[-1] == {"event": "expunge", "uids": [1]}
    with pytest.raises(MailError) as info:
        mail.listen(U, "Nope", i)
    assert info.value.kind is ErrorKind.NOTFOUND


async def test_a_failing_listener_does_not_stop_the_others(mail, caplog):
    await mail.ensure_user(U)
    good = Events(mail)

    def bad(box_id, event):
        raise RuntimeError("listener bug")

    mail.listen_all(bad)
    mail.listen(U, "INBOX", good)
    only(await mail.deliver([Recipient(U)], message()))
    assert good.kinds() == ["exists"]
    assert any("listener failed" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# 11. durability and determinism


FLAG_POOL = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Work", "$work", "Junk", "NonJunk"]
RANDOM_USERS = ["r1@example.com", "r2@example.com"]
ALLOWED = {ErrorKind.NOTFOUND, ErrorKind.EXISTS, ErrorKind.PERM, ErrorKind.INVALID, ErrorKind.NOQUOTA}


def random_ranges(rng: random.Random, top: int) -> list[tuple[int, int]]:
    top = max(top, 1)
    choice = rng.randrange(4)
    if choice == 0:
        return [(1, -1)]
    if choice == 1:
        low = rng.randint(1, top + 1)
        return [(low, rng.choice([-1, rng.randint(1, top + 2)]))]
    return [(rng.randint(1, top + 1), rng.randint(1, top + 1)) for _ in range(rng.randint(1, 4))]


async def random_script(mail: Mailstore, rng: random.Random, clock: FakeClock, steps: int, tag: str = "") -> None:
    fresh = (f"{tag}{n}" for n in itertools.count())
    keys = [f"RQ{i}" for i in range(15)]
    ops = ["deliver", "append", "store", "expunge", "copy", "move", "create", "delete", "rename", "subscribe",
           "checkpoint", "concurrent"]
    weights = [14, 8, 12, 6, 5, 5, 5, 3, 3, 3, 2, 4]
    for _ in range(steps):
        clock.advance(rng.random() * 5)
        user = rng.choice(RANDOM_USERS)
        boxes = [b.name for b in await mail.list_mailboxes(user)]
        box = rng.choice(boxes)
        top = (await mail.status(user, box)).uidnext
        op = rng.choices(ops, weights)[0]
        data = message(f"s{rng.randrange(10**6)}", "r" * rng.randrange(2000))
        try:
            if op == "deliver":
                recipients = []
                for u in rng.sample(RANDOM_USERS, rng.randint(1, 2)):
                    quota = 0
                    if rng.random() < 0.2:
                        quota = await mail.usage(u) + rng.randrange(4000)
                    recipients.append(Recipient(u, key=rng.choice([None, *keys]), quota=quota,
                                                mailbox=rng.choice(["INBOX", "INBOX", box])))
                for r in await mail.deliver(recipients, data, internaldate=rng.choice([None, clock() - 50])):
                    assert isinstance(r, Delivered) or r.kind in ALLOWED, r
            elif op == "append":
                await mail.append(user, box, data, flags=rng.sample(FLAG_POOL, rng.randint(0, 3)),
                                  internaldate=rng.choice([None, float(rng.randrange(10**9))]))
            elif op == "store":
                await mail.store_flags(user, box, random_ranges(rng, top), rng.choice("+-="),
                                       rng.sample(FLAG_POOL, rng.randint(0, 3)),
                                       unchanged_since=rng.choice([None, None, rng.randrange(50)]))
            elif op == "expunge":
                await mail.expunge(user, box, rng.choice([None, random_ranges(rng, top)]))
            elif op in ("copy", "move"):
                await mail.copy(user, box, random_ranges(rng, top), rng.choice(boxes), move=op == "move",
                                quota=rng.choice([0, 0, await mail.usage(user) + 3000]))
            elif op == "create":
                parent = rng.choice([None, rng.choice(boxes)])
                name = rng.choice([f"C{next(fresh)}", box])
                await mail.create_mailbox(user, name if parent is None else f"{parent}/{name}")
            elif op == "delete":
                await mail.delete_mailbox(user, box)
            elif op == "rename":
                # fresh target names only: see test_rename_onto_an_existing_inferior_name_is_refused
                parent = rng.choice([None, rng.choice(boxes)])
                name = f"N{next(fresh)}"
                await mail.rename_mailbox(user, box, name if parent is None else f"{parent}/{name}")
            elif op == "subscribe":
                await mail.subscribe(user, rng.choice([*boxes, "Not/There"]), rng.random() < 0.6)
            elif op == "checkpoint":
                await mail.store.checkpoint()
            elif op == "concurrent":
                # deliveries (to INBOX only: see test_delivery_racing_a_mailbox_delete_leaks_nothing),
                # flag changes and appends in flight together
                key = rng.choice(keys)
                results = await asyncio.gather(
                    mail.deliver([Recipient(u, key=key) for u in RANDOM_USERS], data),
                    mail.deliver([Recipient(RANDOM_USERS[0], key=key)], data),
                    mail.deliver([Recipient(u) for u in RANDOM_USERS], data),
                    mail.store_flags(user, "INBOX", [(1, -1)], rng.choice("+-"), ["\\Seen"]),
                    mail.append(user, box, data),
                    return_exceptions=True)
                for r in results:
                    assert not isinstance(r, BaseException) or (isinstance(r, MailError) and r.kind in ALLOWED), r
        except MailError as exc:
            assert exc.kind in ALLOWED, (op, exc)


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_operations_survive_reopen_and_index_rebuild(options, seed):
    clock = FakeClock(T0)
    rng = random.Random(seed)
    mail = await Mailstore.open(options, clock=clock)
    try:
        await random_script(mail, rng, clock, 200)
        await check_invariants(mail, RANDOM_USERS)
        state = await capture(mail, RANDOM_USERS)
        digest = await mail.store.digest()
        counters = (mail._next_mailbox, mail._last_uidvalidity)
        assert sum(len(v[3]["INBOX"][2]) for v in state.values()) > 0
    finally:
        await mail.close()

    mail = await Mailstore.open(options, clock=clock)
    try:
        assert await capture(mail, RANDOM_USERS) == state
        assert await mail.store.digest() == digest
        assert (mail._next_mailbox, mail._last_uidvalidity) == counters
        await check_invariants(mail, RANDOM_USERS)
    finally:
        await mail.close()

    store = await rebuild_index(options, MailIndex())
    try:
        assert store.report.index_rebuilt
        assert await store.digest() == digest
    finally:
        await store.close()

    mail = await Mailstore.open(options, clock=clock)
    try:
        assert await capture(mail, RANDOM_USERS) == state
        assert (mail._next_mailbox, mail._last_uidvalidity) == counters
        # and it goes on from there, deterministically
        await random_script(mail, random.Random(seed + 100), clock, 20, tag="again")
        await check_invariants(mail, RANDOM_USERS)
        digest = await mail.store.digest()
    finally:
        await mail.close()
    store = await rebuild_index(options, MailIndex())
    try:
        assert await store.digest() == digest
    finally:
        await store.close()


async def test_acknowledged_operations_are_durable_with_fsync(tmp_path, clock):
    # fsync on (I-1), segments preallocated as in production, only smaller
    options = StoreOptions(mirrors=(str(tmp_path / "d1"), str(tmp_path / "d2")), segment_bytes=SEGMENT_BYTES)
    mail = await Mailstore.open(options, clock=clock)
    try:
        d = only(await mail.deliver([Recipient(U, key="D:1")], message("durable")))
        await mail.store_flags(U, "INBOX", [(1, 1)], "+", ["\\Seen"])
        await mail.create_mailbox(U, "Kept")
        state = await capture(mail, [U])
    finally:
        await mail.close()
    for mirror in ("d1", "d2"):
        assert any(p.suffix == ".seg" for p in (tmp_path / mirror).iterdir())
    mail = await Mailstore.open(options, clock=clock)
    try:
        assert await capture(mail, [U]) == state
        assert only(await mail.deliver([Recipient(U, key="D:1")], message("durable"))).uid == d.uid
    finally:
        await mail.close()


# ---------------------------------------------------------------------------
# 12. the store RPC


@pytest.fixture
async def rpc_env(mail):
    service = MailstoreService(mail, max_message=64 << 10)
    rpc = RpcServer(service.handlers(), instance="mss-test")
    service.attach(rpc)
    listener = await asyncio.start_server(rpc.handle_connection, HOST, 0)
    address = listener.sockets[0].getsockname()[:2]
    clients: list[RpcClient] = []

    def new_client() -> RpcClient:
        client = RpcClient([address], instance="imap-test", connect_timeout=2.0, request_timeout=5.0,
                           reconnect_window=1.0)
        clients.append(client)
        return client

    try:
        yield SimpleNamespace(mail=mail, rpc=rpc, service=service, client=new_client(), new_client=new_client)
    finally:
        for client in clients:
            await client.close()
        await rpc.stop(timeout=1.0)
        listener.close()


async def json_lines(client: RpcClient, method: str, args: dict) -> tuple[dict, list]:
    result, body = await client.call_stream(method, args)
    async with body:
        data = await body.read()
    assert data == b"" or data.endswith(b"\n")
    return result, [json.loads(line) for line in data.splitlines()]


async def eventually(predicate, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_rpc_mailbox_methods(rpc_env):
    c = rpc_env.client
    listed = (await c.call("mailbox.list", {"user": U}))["mailboxes"]
    assert [m["name"] for m in listed] == DEFAULT_BOXES
    assert listed[0] == {"name": "Archive", "special_use": "\\Archive", "subscribed": True, "children": False}
    assert await c.call("mailbox.create", {"user": U, "name": "Lists/python", "special_use": "\\Archive"}) == {}
    await c.call("mailbox.create", {"user": U, "name": "Plain"})
    assert await c.call("mailbox.rename", {"user": U, "name": "Lists", "new": "Groups"}) == {}
    listed = {m["name"]: m for m in (await c.call("mailbox.list", {"user": U}))["mailboxes"]}
    assert listed["Groups"]["children"] and listed["Groups/python"]["special_use"] == "\\Archive"
    assert await c.call("mailbox.subscribe", {"user": U, "name": "Groups/python", "on": True}) == {}
    await c.call("mailbox.subscribe", {"user": U, "name": "Trash", "on": False})
    await c.call("mailbox.subscribe", {"user": U, "name": "Plain"})  # "on" defaults to true
    names_ = (await c.call("mailbox.subscriptions", {"user": U}))["names"]
    assert names_ == sorted(set(DEFAULT_BOXES) - {"Trash"} | {"Groups/python", "Plain"})
    assert await c.call("mailbox.delete", {"user": U, "name": "Plain"}) == {}
    status = await c.call("mailbox.status", {"user": U, "name": "INBOX"})
    snap = await rpc_env.mail.select(U, "INBOX")
    assert status == {"messages": 0, "unseen": 0, "deleted": 0, "size": 0, "uidnext": 1,
                      "uidvalidity": snap.uidvalidity, "highestmodseq": 0}
    await fails(ErrorKind.PERM, c.call("mailbox.delete", {"user": U, "name": "inbox"}))
    await fails(ErrorKind.EXISTS, c.call("mailbox.create", {"user": U, "name": "Sent"}))
    await fails(ErrorKind.NOTFOUND, c.call("mailbox.status", {"user": U, "name": "Plain"}))
    err = await fails(ErrorKind.INVALID, c.call("mailbox.create", {"user": U, "name": "a//b"}))
    assert "empty level" in str(err.safe)
    await fails(ErrorKind.LIMIT, c.call("mailbox.create", {"user": U, "name": "x" * 600}))
    health = await c.call("store.health", {})
    assert health["mailboxes"] >= 8 and health["users"] == 1


async def test_rpc_message_methods(rpc_env):
    c, mail = rpc_env.client, rpc_env.mail
    data = message("via rpc", "".join(f"line {i}\r\n" for i in range(2000)))
    when = utc(2024, 6, 1, 8)
    appended = await c.call("message.append", {"user": U, "name": "INBOX", "flags": ["\\Seen", "$Rpc"],
                                               "date": when}, body=data)
    snap = await mail.select(U, "INBOX")
    assert appended == {"uidvalidity": snap.uidvalidity, "uid": 1}
    await c.call("message.append", {"user": U, "name": "INBOX", "quota": 0}, body=[data[:100], data[100:]])
    assert await mail.read_message(U, "INBOX", 2) == data

    result, rows = await json_lines(c, "mailbox.select", {"user": U, "name": "INBOX"})
    assert result == {"id": snap.mailbox, "name": "INBOX", "uidvalidity": snap.uidvalidity, "uidnext": 3,
                      "highestmodseq": 2, "count": 2}
    assert rows == [[1, "$Rpc \\Seen", 1], [2, "", 2]]

    result, rows = await json_lines(c, "message.fetch", {"user": U, "name": "INBOX", "uids": [[1, -1]]})
    assert result == {"count": 2}
    assert [r["uid"] for r in rows] == [1, 2]
    assert rows[0]["date"] == when and rows[0]["size"] == len(data) and rows[0]["flags"] == "$Rpc \\Seen"
    assert json.loads(rows[0]["info"])
    _, rows = await json_lines(c, "message.fetch", {"user": U, "name": "INBOX", "uids": [[1, -1]],
                                                    "changed_since": 1, "info": False})
    assert rows == [{"uid": 2, "flags": "", "date": rows[0]["date"], "size": len(data), "modseq": 2}]

    result, body = await c.call_stream("message.body", {"user": U, "name": "INBOX", "uid": 2})
    assert result == {} and await body.read() == data
    for offset, length in ((0, 10), (5000, 20000), (len(data) - 3, 100), (len(data) + 5, 10), (17, 0)):
        _, body = await c.call_stream("message.body", {"user": U, "name": "INBOX", "uid": 2, "offset": offset,
                                                       "length": length})
        assert await body.read() == data[offset:offset + length]
    _, body = await c.call_stream("message.body", {"user": U, "name": "INBOX", "uid": 1, "offset": 123})
    assert await body.read() == data[123:]
    await fails(ErrorKind.NOTFOUND, c.call_stream("message.body", {"user": U, "name": "INBOX", "uid": 9}))

    stored = await c.call("message.store", {"user": U, "name": "INBOX", "uids": [[1, 2]], "mode": "+",
                                            "flags": ["\\Deleted"], "unchanged_since": 1})
    assert stored == {"changed": [[1, "$Rpc \\Deleted \\Seen", 3]], "failed": [2]}
    _, rows = await json_lines(c, "message.search", {"user": U, "name": "INBOX", "criteria": ["flag", "\\Seen"]})
    assert rows == [1]
    result, rows = await json_lines(c, "message.search", {"user": U, "name": "INBOX",
                                                          "criteria": ["body", "line 1999"]})
    assert result == {"count": 2} and rows == [1, 2]

    copied = await c.call("message.copy", {"user": U, "name": "INBOX", "uids": [[1, -1]], "target": "Archive"})
    archive = await mail.select(U, "Archive")
    assert copied == {"uidvalidity": archive.uidvalidity, "pairs": [[1, 1], [2, 2]]}
    await fails(ErrorKind.NOQUOTA, c.call("message.copy", {"user": U, "name": "INBOX", "uids": [[1, -1]],
                                                           "target": "Archive", "quota": 1}))
    moved = await c.call("message.move", {"user": U, "name": "Archive", "uids": [[2, 2]], "target": "Trash"})
    assert moved == {"uidvalidity": (await mail.select(U, "Trash")).uidvalidity, "pairs": [[2, 1]]}
    await fails(ErrorKind.INVALID, c.call("message.move", {"user": U, "name": "Trash", "uids": [[1, 1]],
                                                           "target": "Trash"}))
    assert await c.call("message.expunge", {"user": U, "name": "INBOX", "uids": [[2, 2]]}) == {"uids": []}
    assert await c.call("message.expunge", {"user": U, "name": "INBOX"}) == {"uids": [1]}
    assert (await c.call("quota.usage", {"user": U}))["bytes"] == await mail.usage(U) == 3 * len(data)
    assert (await c.call("quota.usage", {"user": "nobody@example.com"}))["bytes"] == 0


async def test_rpc_long_lists_travel_as_json_lines(rpc_env):
    c, mail = rpc_env.client, rpc_env.mail
    await mail.ensure_user(U)
    await asyncio.gather(*(mail.deliver([Recipient(U)], message(f"{i}", "x" * 10)) for i in range(400)))
    result, rows = await json_lines(c, "mailbox.select", {"user": U, "name": "INBOX"})
    assert result["count"] == 400 and [r[0] for r in rows] == list(range(1, 401))
    result, rows = await json_lines(c, "message.fetch", {"user": U, "name": "INBOX", "uids": [[1, -1]]})
    assert result["count"] == 400 and len(rows) == 400 and all(json.loads(r["info"]) for r in rows)
    result, rows = await json_lines(c, "message.search", {"user": U, "name": "INBOX", "criteria": ["all"]})
    assert result["count"] == 400 and rows == list(range(1, 401))
    result, rows = await json_lines(c, "message.search", {"user": U, "name": "INBOX",
                                                          "criteria": ["header", "subject", "nothing"]})
    assert result == {"count": 0} and rows == []


async def test_rpc_append_limits_and_body_checks(rpc_env):
    c, mail = rpc_env.client, rpc_env.mail
    limit = rpc_env.service.max_message
    edge = message("edge", "e" * 100)
    edge += b"e" * (limit - len(edge))
    assert len(edge) == limit
    assert (await c.call("message.append", {"user": U, "name": "INBOX"}, body=edge))["uid"] == 1
    await fails(ErrorKind.LIMIT, c.call("message.append", {"user": U, "name": "INBOX"}, body=edge + b"!"))
    big = (edge[:1000] for _ in range(200))  # 200 kB streamed
    await fails(ErrorKind.LIMIT, c.call("message.append", {"user": U, "name": "INBOX"}, body=big))
    await fails(ErrorKind.INVALID, c.call("message.append", {"user": U, "name": "INBOX"}))
    await fails(ErrorKind.INVALID, c.call("message.append", {"user": U, "name": "INBOX"}, body=b""))
    await fails(ErrorKind.NOQUOTA, c.call("message.append", {"user": U, "name": "INBOX", "quota": limit + 1},
                                          body=message()))
    await fails(ErrorKind.NOTFOUND, c.call("message.append", {"user": U, "name": "Nope"}, body=message()))
    assert await uids(mail, U, "INBOX") == [1]
    # the connection is still fine after refusals
    assert (await c.call("ping"))["instance"] == "mss-test"


BAD_ARGS = [
    ("mailbox.list", {}),
    ("mailbox.list", {"user": U, "extra": 1}),
    ("mailbox.list", {"user": 5}),
    ("mailbox.list", {"user": ""}),
    ("mailbox.subscriptions", {"users": U}),
    ("mailbox.create", {"user": U}),
    ("mailbox.create", {"user": U, "name": ["INBOX"]}),
    ("mailbox.create", {"user": U, "name": "X", "special_use": 1}),
    ("mailbox.delete", {"name": "X"}),
    ("mailbox.rename", {"user": U, "name": "Sent"}),
    ("mailbox.rename", {"user": U, "name": "Sent", "new": 3}),
    ("mailbox.subscribe", {"user": U, "name": "Sent", "on": "yes"}),
    ("mailbox.subscribe", {"user": U, "name": "Sent", "on": 1}),
    ("mailbox.status", {"user": U, "name": "INBOX", "verbose": True}),
    ("mailbox.select", {"user": U}),
    ("message.fetch", {"user": U, "name": "INBOX"}),
    ("message.fetch", {"user": U, "name": "INBOX", "uids": "1:*"}),
    ("message.fetch", {"user": U, "name": "INBOX", "uids": [[0, 5]]}),
    ("message.fetch", {"user": U, "name": "INBOX", "uids": [[1, -2]]}),
    ("message.fetch", {"user": U, "name": "INBOX", "uids": [[1, True]]}),
    ("message.fetch", {"user": U, "name": "INBOX", "uids": [[1, -1]], "changed_since": -1}),
    ("message.fetch", {"user": U, "name": "INBOX", "uids": [[1, -1]], "changed_since": "1"}),
    ("message.fetch", {"user": U, "name": "INBOX", "uids": [[1, -1]], "info": "yes"}),
    ("message.body", {"user": U, "name": "INBOX", "uid": 0}),
    ("message.body", {"user": U, "name": "INBOX", "uid": "1"}),
    ("message.body", {"user": U, "name": "INBOX", "uid": 1, "offset": -1}),
    ("message.body", {"user": U, "name": "INBOX", "uid": 1, "length": 1.5}),
    ("message.store", {"user": U, "name": "INBOX", "uids": [[1, -1]], "flags": ["\\Seen"]}),
    ("message.store", {"user": U, "name": "INBOX", "uids": [[1, -1]], "mode": "!", "flags": ["\\Seen"]}),
    ("message.store", {"user": U, "name": "INBOX", "uids": [[1, -1]], "mode": "+", "flags": "\\Seen"}),
    ("message.store", {"user": U, "name": "INBOX", "uids": [[1, -1]], "mode": "+", "flags": [1]}),
    ("message.store", {"user": U, "name": "INBOX", "uids": [[1, -1]], "mode": "+", "flags": ["\\Seen"],
                       "unchanged_since": "5"}),
    ("message.store", {"user": U, "name": "INBOX", "mode": "+", "flags": ["\\Seen"]}),
    ("message.expunge", {"user": U, "name": "INBOX", "uids": [[1]]}),
    ("message.copy", {"user": U, "name": "INBOX", "uids": [[1, -1]]}),
    ("message.copy", {"user": U, "name": "INBOX", "uids": [[1, -1]], "target": "Sent", "quota": -5}),
    ("message.move", {"user": U, "name": "INBOX", "uids": [[1, -1]], "target": "Sent", "quota": 5}),
    ("message.search", {"user": U, "name": "INBOX"}),
    ("message.search", {"user": U, "name": "INBOX", "criteria": ["bogus"]}),
    ("message.search", {"user": U, "name": "INBOX", "criteria": "ALL"}),
    ("quota.usage", {}),
    ("quota.usage", {"user": None}),
    ("store.health", {"verbose": True}),
    ("no.such.method", {}),
]


@pytest.mark.parametrize("method, args", BAD_ARGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(BAD_ARGS)])
async def test_rpc_bad_arguments_are_invalid_and_change_nothing(rpc_env, method, args):
    mail = rpc_env.mail
    await mail.append(U, "INBOX", message())
    before = await capture(mail, [U])
    await fails(ErrorKind.INVALID, rpc_env.client.call(method, args))
    assert await capture(mail, [U]) == before


@pytest.mark.parametrize("method, args", [
    ("message.append", {"user": U, "name": "INBOX", "flags": "\\Seen"}),
    ("message.append", {"user": U, "name": "INBOX", "flags": [None]}),
    ("message.append", {"user": U, "name": "INBOX", "date": "yesterday"}),
    ("message.append", {"user": U, "name": "INBOX", "date": -1}),
    ("message.append", {"user": U, "name": "INBOX", "quota": "0"}),
    ("message.append", {"user": U, "name": "INBOX", "size": 3}),
    ("message.append", {"name": "INBOX"}),
])
async def test_rpc_bad_append_arguments_are_invalid(rpc_env, method, args):
    await fails(ErrorKind.INVALID, rpc_env.client.call(method, args, body=message()))
    assert await uids(rpc_env.mail, U, "INBOX") == []


async def test_rpc_message_body_without_uid_is_invalid(rpc_env):
    await rpc_env.mail.append(U, "INBOX", message())
    await fails(ErrorKind.INVALID, rpc_env.client.call_stream("message.body", {"user": U, "name": "INBOX"}))


async def test_rpc_two_subscribers_both_get_the_pushes(rpc_env):
    mail = rpc_env.mail
    first, second = rpc_env.client, rpc_env.new_client()
    result, _ = await json_lines(first, "mailbox.select", {"user": U, "name": "INBOX"})
    topic = f"mailbox:{result['id']}"
    got: dict[str, list] = {"first": [], "second": []}
    await first.subscribe([topic], lambda t, d: got["first"].append((t, d)))
    await second.subscribe([topic], lambda t, d: got["second"].append((t, d)))
    other = Events(mail)
    mail.listen(U, "Archive", other)

    only(await mail.deliver([Recipient(U)], message()))  # LMTP side, in process
    await first.call("message.append", {"user": U, "name": "INBOX"}, body=message())  # over RPC
    await first.call("message.store", {"user": U, "name": "INBOX", "uids": [[1, 1]], "mode": "+",
                                       "flags": ["\\Deleted"]})
    await second.call("message.expunge", {"user": U, "name": "INBOX"})
    await second.call("message.copy", {"user": U, "name": "INBOX", "uids": [[2, 2]], "target": "Archive"})
    expected = [
        {"event": "exists", "uid": 1, "uidnext": 2},
        {"event": "exists", "uid": 2, "uidnext": 3},
        {"event": "flags", "uid": 1, "flags": "\\Deleted", "modseq": 3},
        {"event": "expunge", "uids": [1]},
    ]
    await eventually(lambda: len(got["first"]) >= 4 and len(got["second"]) >= 4)
    await asyncio.sleep(0.05)
    for name in ("first", "second"):
        assert got[name] == [(topic, e) for e in expected], name
    assert other.kinds() == ["exists"]  # the Archive change went to its own topic only

    # renamed and gone reach subscribers of that mailbox's id
    await mail.create_mailbox(U, "Proj")
    result, _ = await json_lines(first, "mailbox.select", {"user": U, "name": "Proj"})
    proj = f"mailbox:{result['id']}"
    seen: list = []
    await second.subscribe([proj], lambda t, d: seen.append(d))
    await first.call("mailbox.rename", {"user": U, "name": "Proj", "new": "Project"})
    await first.call("mailbox.delete", {"user": U, "name": "Project"})
    await eventually(lambda: len(seen) >= 2)
    assert seen == [{"event": "renamed", "name": "Project"}, {"event": "gone"}]
