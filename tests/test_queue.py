"""Tests of the MTA queue: the store (intermail.queue.store) and the one mover (intermail.queue.manager).

The store runs on real mirrored journals in ``tmp_path`` (small segments, no
fsync, no preallocation).  The manager runs against scripted peers: a
:class:`ScriptedRouter` standing for the directory and a
:class:`ScriptedTransport` standing for the LMTP stores and remote SMTP
servers (the real transports are tested elsewhere).  Both record their calls
and answer per recipient; a fake clock drives backoff and expiry, so nothing
here waits for real retry delays.

What is held: enqueue is durable and visible; record() writes outcomes,
bounces and the removal of a finished message in one transaction; the index
equals one rebuilt from the journal; the manager delivers, groups by
destination, combines alias targets, bounces, defers with capped exponential
backoff, expires, respects its limits, never runs one entry twice at once,
drains on stop() and redelivers what a crash left unrecorded.

Bugs found are kept as strict xfails at the end of the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from intermail.errors import ErrorKind, MailError
from intermail.queue.manager import QueueManager, Reply3, Route, Settings, TransientFailure
from intermail.queue.store import STATES, Entry, Envelope, Outcome, QueueApplier, QueueStore, RecipientSpec
from intermail.storage import Store, StoreOptions, rebuild_index
from intermail.storage.fileops import FaultyFileOps

OK = Reply3(250, "2.0.0", "ok")
LATER = Reply3(451, "4.2.0", "mailbox busy")
NO_USER = Reply3(550, "5.1.1", "no such user")
DIRECTORY_DOWN = Reply3(451, "4.3.0", "directory unavailable")
T0 = 1_000_000.0


def options_for(tmp_path) -> StoreOptions:
    return StoreOptions(mirrors=(str(tmp_path / "q1"), str(tmp_path / "q2")), fsync=False, segment_bytes=1 << 20,
                        preallocate=False)


class FakeClock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def queue(tmp_path, clock):
    q = await QueueStore.open(options_for(tmp_path), clock=clock)
    holder = [q]
    q.holder = holder  # tests that reopen the store put the new one here, so that teardown closes it
    yield q
    await holder[0].close()


async def reopen(queue: QueueStore, tmp_path, clock) -> QueueStore:
    await queue.close()
    new = await QueueStore.open(options_for(tmp_path), clock=clock)
    queue.holder[0] = new
    new.holder = queue.holder
    return new


def env(sender: str = "alice@example.org", *recipients: str, **params) -> Envelope:
    return Envelope(sender, [RecipientSpec(r) for r in (recipients or ("bob@example.com",))], params)


async def blob_ids(queue: QueueStore) -> set[int]:
    return await queue.store.read(lambda c: {r[0] for r in c.execute("SELECT id FROM _blobs")})


async def all_entries(queue: QueueStore) -> list[Entry]:
    return await queue.entries(limit=100_000)


async def eventually(predicate, timeout: float = 5.0, what: str = "condition"):
    """Poll an (async or plain) predicate until it returns something true; return that."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def gone(queue: QueueStore, qid: str) -> bool:
    return await queue.get(qid) is None


async def attempts_reach(queue: QueueStore, qid: str, n: int) -> Entry | None:
    entry = await queue.get(qid)
    return entry if entry is not None and entry.attempts >= n else None


async def settled(manager: QueueManager, quiet: float = 0.05) -> None:
    """Wait until no attempt has started or run for ``quiet`` seconds.

    Needed where an entry stays deferred: the manager may re-attempt it at
    once from a stale snapshot (see the strict xfail
    ``test_an_entry_is_not_reattempted_from_a_stale_snapshot``); tests of
    other properties wait for that to pass and do not count transport calls
    exactly.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    last = (manager.stats.attempts, loop.time())
    while True:
        now = loop.time()
        if manager.stats.in_flight or manager.stats.attempts != last[0]:
            last = (manager.stats.attempts, now)
        elif now - last[1] >= quiet:
            return
        if now > deadline:
            raise AssertionError("the manager did not settle")
        await asyncio.sleep(0.002)


async def attempts_reach_all(queue: QueueStore, n: int) -> list[Entry] | None:
    entries = await all_entries(queue)
    return entries if entries and all(e.attempts >= n for e in entries) else None


# -- scripted peers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    kind: str
    destination: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    key: str


class ScriptedRouter:
    """The directory: a recipient goes to lmtp:mss1 unless ``routes`` says otherwise (list, Reply3)."""

    def __init__(self, routes: dict | None = None):
        self.routes = dict(routes or {})
        self.calls: list[str] = []

    async def route(self, address: str):
        self.calls.append(address)
        answer = self.routes.get(address)
        if answer is None:
            return [Route("lmtp", "mss1", (address,))]
        return answer


class ScriptedTransport:
    """A peer: answers per recipient (Reply3, or an exception to raise); counts concurrent transactions."""

    def __init__(self, kind: str = "lmtp", answers: dict | None = None, *, delay: float = 0.0,
                 log: list[Call] | None = None):
        self.kind = kind
        self.answers = dict(answers or {})
        self.down: dict[str, str] = {}  # destination -> TransientFailure reason
        self.delay = delay
        self.gates: dict[str, asyncio.Event] = {}  # queue id (key) -> released when set
        self.calls: list[Call] = [] if log is None else log
        self.entered = asyncio.Event()
        self.current = 0
        self.max_current = 0
        self.current_by_destination: Counter = Counter()
        self.max_by_destination: Counter = Counter()
        self.current_by_key: Counter = Counter()
        self.max_by_key = 0

    async def deliver(self, destination, sender, recipients, data, key, params=None):
        self.calls.append(Call(self.kind, destination, sender, tuple(recipients), data, key))
        self.current += 1
        self.current_by_destination[destination] += 1
        self.current_by_key[key] += 1
        self.max_current = max(self.max_current, self.current)
        self.max_by_destination[destination] = max(self.max_by_destination[destination],
                                                   self.current_by_destination[destination])
        self.max_by_key = max(self.max_by_key, self.current_by_key[key])
        self.entered.set()
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if key in self.gates:
                await self.gates[key].wait()
            if destination in self.down:
                raise TransientFailure(self.down[destination])
            replies = {}
            for address in recipients:
                answer = self.answers.get(address, OK)
                if isinstance(answer, BaseException):
                    raise answer
                replies[address] = answer
            return replies
        finally:
            self.current -= 1
            self.current_by_destination[destination] -= 1
            self.current_by_key[key] -= 1

    def delivered_to(self, address: str) -> list[Call]:
        return [c for c in self.calls if address in c.recipients]


def make_bounce():
    """The bounce maker: one message from the null sender back to the original sender."""
    calls: list[tuple[Entry, list[tuple[str, Reply3]], bytes]] = []

    async def bounce(entry, failed, data):
        calls.append((entry, list(failed), data))
        return Envelope("", [RecipientSpec(entry.sender)]), b"bounce bytes"

    bounce.calls = calls
    return bounce


SMALL = Settings(concurrency=8, per_destination=4, retry_base=10.0, retry_max=80.0, lifetime=10_000.0, batch=32)


@pytest.fixture
async def run_manager(clock):
    """``await run_manager(queue, router, transports, settings)``: a started manager, stopped at teardown."""
    started: list[QueueManager] = []

    async def start(queue, router=None, transports=None, settings: Settings = SMALL, bounce=None):
        transports = transports if transports is not None else {"lmtp": ScriptedTransport()}
        manager = QueueManager(queue, router or ScriptedRouter(), transports, settings,
                               bounce=bounce if bounce is not None else make_bounce(), clock=clock)
        await manager.start()
        started.append(manager)
        return manager

    yield start
    for manager in started:
        await manager.stop(timeout=2.0)


# == the store ==========================================================================================


async def test_enqueue_is_visible_and_durable(queue, tmp_path, clock):
    qid = await queue.enqueue(env("alice@example.org", "bob@example.com"), b"Subject: hi\r\n\r\nbody\r\n")
    entry = await queue.get(qid)
    assert entry is not None
    assert (entry.sender, entry.state, entry.attempts, entry.last_error) == ("alice@example.org", "incoming", 0, "")
    assert entry.arrival == entry.next_attempt == T0
    assert entry.size == len(b"Subject: hi\r\n\r\nbody\r\n")
    assert [(r.idx, r.address, r.status) for r in entry.recipients] == [(0, "bob@example.com", "pending")]
    assert [e.id for e in await all_entries(queue)] == [qid]
    assert await queue.counts() == {s: (1 if s == "incoming" else 0) for s in STATES}
    assert await queue.next_due() == T0
    assert await queue.read_message(entry) == b"Subject: hi\r\n\r\nbody\r\n"
    assert entry.blob in await blob_ids(queue)

    queue = await reopen(queue, tmp_path, clock)  # acknowledged = durable (I-1)
    assert await queue.get(qid) == entry
    assert await queue.read_message(entry) == b"Subject: hi\r\n\r\nbody\r\n"


async def test_envelope_params_and_recipients_round_trip(queue, tmp_path, clock):
    params = {"RET": "HDRS", "ENVID": "QQ314159", "SMTPUTF8": True, "BODY": "8BITMIME", "size": 12345,
              "auth": None, "nested": {"list": [1, "two", 3.5]}}
    recipients = [RecipientSpec("bob@example.com", orcpt="rfc822;bob@example.com", notify="SUCCESS,FAILURE"),
                  RecipientSpec("ünïcødé@exämple.org"),
                  RecipientSpec("carol@example.net", notify="NEVER")]
    qid = await queue.enqueue(Envelope("", recipients, params), b"x" * 3000, queue_id="QFIXEDID0000000000001")
    assert qid == "QFIXEDID0000000000001"
    for reopening in (False, True):
        q = await reopen(queue, tmp_path, clock) if reopening else queue
        entry = await q.get(qid)
        assert entry.sender == ""
        assert entry.params == params
        assert [(r.address, r.orcpt, r.notify) for r in entry.recipients] == [
            (r.address, r.orcpt, r.notify) for r in recipients]
        assert [r.idx for r in entry.recipients] == [0, 1, 2]
        assert len(entry.pending) == 3


async def test_enqueue_refuses_an_empty_recipient_list(queue):
    with pytest.raises(MailError) as info:
        await queue.enqueue(Envelope("alice@example.org", []), b"data")
    assert info.value.kind is ErrorKind.INVALID
    assert await all_entries(queue) == []
    assert await blob_ids(queue) == set()


async def test_entries_filters_by_state_and_due_time(queue, clock):
    early = await queue.enqueue(env(), b"1")
    clock.t = T0 + 100
    late = await queue.enqueue(env(), b"2")
    held = await queue.enqueue(env(), b"3")
    await queue.set_state(held, "hold")
    assert [e.id for e in await queue.entries(due_before=T0 + 50)] == [early]
    assert {e.id for e in await queue.entries(states=("incoming",))} == {early, late}
    assert [e.id for e in await queue.entries(states=("hold",))] == [held]
    assert len(await queue.entries(limit=2)) == 2
    assert await queue.counts() == {"incoming": 2, "active": 0, "deferred": 0, "hold": 1, "corrupt": 0}


async def test_entries_pages_through_every_entry_with_after(queue, clock):
    ids = {}
    for name, t in (("QB", T0 + 1), ("QC", T0), ("QA", T0 + 2)):  # id order differs from next_attempt order
        clock.t = t
        ids[name] = await queue.enqueue(env(), b"m", queue_id=name)
    seen, after = [], ""
    while page := await queue.entries(limit=1, after=after):
        seen.append(page[0].id)
        after = page[-1].id
    assert sorted(seen) == ["QA", "QB", "QC"]


async def test_record_writes_outcomes_state_and_bounce_in_one_step(queue, tmp_path, clock):
    qid = await queue.enqueue(env("alice@example.org", "a@x", "b@x", "c@x"), b"message")
    entry = await queue.get(qid)
    bounce_env = Envelope("", [RecipientSpec("alice@example.org")], {"bounce_for": qid})
    bounce_ids = await queue.record(entry, [Outcome(0, "delivered", str(OK)), Outcome(1, "failed", str(NO_USER)),
                                            Outcome(2, "pending", str(LATER))],
                                    state="deferred", next_attempt=T0 + 60, error=str(LATER),
                                    bounces=[(bounce_env, b"bounce bytes")])
    assert len(bounce_ids) == 1
    for reopening in (False, True):  # both survive: one transaction
        q = await reopen(queue, tmp_path, clock) if reopening else queue
        entry = await q.get(qid)
        assert [(r.status, r.reply) for r in entry.recipients] == [
            ("delivered", str(OK)), ("failed", str(NO_USER)), ("pending", str(LATER))]
        assert (entry.state, entry.next_attempt, entry.attempts, entry.last_error) == (
            "deferred", T0 + 60, 1, str(LATER))
        assert [r.address for r in entry.pending] == ["c@x"]
        bounce = await q.get(bounce_ids[0])
        assert (bounce.sender, [r.address for r in bounce.recipients], bounce.params) == (
            "", ["alice@example.org"], {"bounce_for": qid})
        assert bounce.state == "incoming"
        assert await q.read_message(bounce) == b"bounce bytes"
    queue = q

    # The last pending recipient decided: the message goes, with its blob; the bounce stays.
    entry = await queue.get(qid)
    assert await queue.record(entry, [Outcome(2, "delivered", str(OK))], state="active", next_attempt=T0) == []
    assert await queue.get(qid) is None
    blobs = await blob_ids(queue)
    assert entry.blob not in blobs and bounce.blob in blobs
    assert [e.id for e in await all_entries(queue)] == [bounce_ids[0]]
    queue = await reopen(queue, tmp_path, clock)
    assert await queue.get(qid) is None and entry.blob not in await blob_ids(queue)


async def test_record_counts_attempts_and_moves_next_attempt(queue):
    qid = await queue.enqueue(env("s@x", "a@x"), b"m")
    for n in range(1, 4):
        entry = await queue.get(qid)
        await queue.record(entry, [Outcome(0, "pending", str(LATER))], state="deferred",
                           next_attempt=T0 + 10 * n, error=f"try {n}")
        entry = await queue.get(qid)
        assert (entry.attempts, entry.next_attempt, entry.state, entry.last_error) == (n, T0 + 10 * n, "deferred",
                                                                                         f"try {n}")
        assert await queue.next_due() == T0 + 10 * n
        assert await queue.counts() == {s: (1 if s == "deferred" else 0) for s in STATES}


async def test_record_with_no_outcome_left_pending_removes_the_message(queue):
    qid = await queue.enqueue(env("s@x", "a@x", "b@x"), b"m")
    entry = await queue.get(qid)
    await queue.record(entry, [Outcome(0, "failed", str(NO_USER)), Outcome(1, "delivered", str(OK))],
                       state="active", next_attempt=T0)
    assert await queue.get(qid) is None
    assert await blob_ids(queue) == set()
    assert await queue.next_due() is None
    assert sum((await queue.counts()).values()) == 0


async def test_a_failed_record_leaves_neither_outcome_nor_bounce(tmp_path, clock):
    """The bounce exists iff the failure that caused it was recorded: a commit that fails writes neither."""
    options = options_for(tmp_path)
    fileops = FaultyFileOps(fsync=False)
    queue = QueueStore(await Store.open(options, QueueApplier(), fileops=fileops), clock)
    try:
        qid = await queue.enqueue(env("alice@example.org", "a@x"), b"m")
        entry = await queue.get(qid)
        for mirror in options.mirrors:
            fileops.fail(mirror, errno.EIO)
        with pytest.raises(MailError):
            await queue.record(entry, [Outcome(0, "failed", str(NO_USER))], state="active", next_attempt=T0,
                               bounces=[(Envelope("", [RecipientSpec("alice@example.org")]), b"bounce bytes")])
    finally:
        await queue.close()
    queue = await QueueStore.open(options, clock=clock)
    try:
        assert [(e.id, e.attempts, [r.status for r in e.recipients]) for e in await all_entries(queue)] == [
            (qid, 0, ["pending"])]
    finally:
        await queue.close()


async def test_hold_release_and_delete(queue, tmp_path, clock):
    qid = await queue.enqueue(env(), b"m")
    other = await queue.enqueue(env(), b"n")
    await queue.set_state(qid, "hold")
    assert (await queue.get(qid)).state == "hold"
    assert [e.id for e in await queue.entries(states=("incoming", "deferred"), due_before=T0)] == [other]
    await queue.delete(other)
    assert await queue.next_due() is None  # a held entry is never due
    await queue.set_state(qid, "deferred", next_attempt=T0 + 5)  # release
    entry = await queue.get(qid)
    assert (entry.state, entry.next_attempt) == ("deferred", T0 + 5)
    assert await queue.next_due() == T0 + 5

    with pytest.raises(MailError) as info:
        await queue.set_state(qid, "sleeping")
    assert info.value.kind is ErrorKind.INVALID
    with pytest.raises(MailError) as info:
        await queue.set_state("QNOSUCHENTRY", "hold")
    assert info.value.kind is ErrorKind.NOTFOUND

    await queue.delete(qid)
    assert await queue.get(qid) is None
    assert await blob_ids(queue) == set()
    with pytest.raises(MailError) as info:
        await queue.delete(qid)
    assert info.value.kind is ErrorKind.NOTFOUND
    queue = await reopen(queue, tmp_path, clock)
    assert await all_entries(queue) == []


async def test_index_equals_rebuild_after_random_operations(queue, tmp_path, clock):
    """A seeded mix of every operation (with a checkpoint midway); reopen and rebuild give the same state."""
    rng = random.Random(20240611)
    for step in range(160):
        clock.t = T0 + step
        live = await all_entries(queue)
        choice = rng.random()
        if step == 80:
            await queue.store.checkpoint()  # the rebuild then starts from the applier's snapshot
        if choice < 0.4 or not live:
            rcpts = [f"u{rng.randrange(50)}@d{rng.randrange(3)}.example" for _ in range(rng.randint(1, 4))]
            params = rng.choice([{}, {"RET": "FULL"}, {"ENVID": f"e{step}", "SMTPUTF8": True}])
            sender = rng.choice(["", "s@x.example"])
            await queue.enqueue(env(sender, *rcpts, **params), rng.randbytes(rng.randint(1, 3000)))
            continue
        entry = rng.choice(live)
        if choice < 0.75 and entry.pending:
            outcomes = [Outcome(r.idx, rng.choice(["delivered", "failed", "pending"]), f"reply {step}")
                        for r in entry.pending if rng.random() < 0.8]
            bounces = [(Envelope("", [RecipientSpec(entry.sender or "postmaster@x")]), b"b" * step)] \
                if any(o.status == "failed" for o in outcomes) else []
            await queue.record(entry, outcomes, state="deferred", next_attempt=clock.t + rng.random() * 100,
                               error=f"e{step}", bounces=bounces)
        elif choice < 0.9:
            await queue.set_state(entry.id, rng.choice(["hold", "deferred", "incoming", "corrupt"]),
                                  next_attempt=rng.choice([None, clock.t + 7]))
        else:
            await queue.delete(entry.id)
    digest = await queue.store.digest()
    before = [(e, await queue.read_message(e)) for e in await all_entries(queue)]
    assert len(before) > 10

    queue = await reopen(queue, tmp_path, clock)
    assert await queue.store.digest() == digest
    await queue.close()
    rebuilt = await rebuild_index(options_for(tmp_path), QueueApplier())
    try:
        assert rebuilt.report.index_rebuilt
        assert await rebuilt.digest() == digest
        q = QueueStore(rebuilt, clock)
        assert [(e, await q.read_message(e)) for e in await all_entries(q)] == before
    finally:
        await rebuilt.close()
    queue.holder[0] = await QueueStore.open(options_for(tmp_path), clock=clock)  # for teardown


# == the manager ========================================================================================


async def test_a_due_message_is_delivered_and_removed(queue, run_manager):
    transport = ScriptedTransport()
    router = ScriptedRouter()
    qid = await queue.enqueue(env("alice@example.org", "bob@example.com"), b"the message")
    manager = await run_manager(queue, router, {"lmtp": transport})
    await eventually(lambda: gone(queue, qid), what="delivery")
    assert transport.calls == [Call("lmtp", "mss1", "alice@example.org", ("bob@example.com",), b"the message", qid)]
    assert router.calls == ["bob@example.com"]
    assert await blob_ids(queue) == set()
    assert manager.stats.delivered == 1 and manager.stats.failed == 0


async def test_recipients_are_grouped_by_transport_and_destination(queue, run_manager):
    calls: list[Call] = []
    lmtp, smtp = ScriptedTransport("lmtp", log=calls), ScriptedTransport("smtp", log=calls)
    router = ScriptedRouter({
        "a@local": [Route("lmtp", "mss1", ("a@local",))],
        "b@local": [Route("lmtp", "mss1", ("b@local",))],
        "c@local": [Route("lmtp", "mss2", ("c@local",))],
        "x@remote": [Route("smtp", "remote.example", ("x@remote",))],
        "y@remote": [Route("smtp", "remote.example", ("y@remote",))],
        "z@other": [Route("smtp", "other.example", ("z@other",))],
    })
    qid = await queue.enqueue(env("s@x", "a@local", "x@remote", "b@local", "c@local", "y@remote", "z@other"), b"m")
    await run_manager(queue, router, {"lmtp": lmtp, "smtp": smtp})
    await eventually(lambda: gone(queue, qid), what="delivery")
    assert sorted((c.kind, c.destination, c.recipients) for c in calls) == [
        ("lmtp", "mss1", ("a@local", "b@local")),
        ("lmtp", "mss2", ("c@local",)),
        ("smtp", "other.example", ("z@other",)),
        ("smtp", "remote.example", ("x@remote", "y@remote")),
    ]
    assert {c.key for c in calls} == {qid}  # the delivery key (I-4)


@pytest.mark.parametrize("answers, status", [
    ({}, None),  # every target 2xx: delivered
    ({"u3@y": NO_USER}, "failed"),
    ({"u2@x": LATER, "u3@y": NO_USER}, "pending"),  # a temporary failure beats a permanent one
    ({"u1@x": LATER}, "pending"),
])
async def test_alias_routes_are_decided_by_all_their_targets(queue, run_manager, answers, status):
    transport = ScriptedTransport(answers=answers)
    router = ScriptedRouter({"list@x": [Route("lmtp", "mss1", ("u1@x", "u2@x")), Route("lmtp", "mss2", ("u3@y",))]})
    bounce = make_bounce()
    qid = await queue.enqueue(env("s@x", "list@x", "solo@x"), b"m")
    manager = await run_manager(queue, router, {"lmtp": transport}, bounce=bounce)
    await eventually(lambda: gone(queue, qid) if status != "pending" else attempts_reach(queue, qid, 1))
    await settled(manager)
    assert sorted((c.destination, c.recipients) for c in transport.calls[:2]) == [
        ("mss1", ("u1@x", "u2@x", "solo@x")), ("mss2", ("u3@y",))]
    # Members are decided one by one: a delivered or failed member is never sent again,
    # a failed member is bounced by its own address, the alias stays pending while any member does.
    failed_members = [(a, r) for a, r in answers.items() if r == NO_USER]
    if status == "pending":
        entry = await queue.get(qid)
        assert [r.status for r in entry.recipients] == ["pending", "delivered"]
        assert entry.recipients[0].reply == str(LATER)
        assert set(entry.recipients[0].done) == {"u1@x", "u2@x", "u3@y"} - set(
            a for a, r in answers.items() if r == LATER)
    if failed_members:
        assert [(a, r) for a, r in bounce.calls[0][1]] == failed_members
    else:
        assert bounce.calls == []


async def test_an_alias_that_expands_to_nothing_fails(queue, run_manager):
    bounce = make_bounce()
    qid = await queue.enqueue(env("s@x", "empty@x"), b"m")
    await run_manager(queue, ScriptedRouter({"empty@x": [Route("lmtp", "mss1", ())]}), bounce=bounce)
    await eventually(lambda: gone(queue, qid))
    assert bounce.calls[0][1][0][1].code == 550


async def test_a_5xx_fails_the_recipient_and_bounces_once_to_the_sender(queue, run_manager):
    transport = ScriptedTransport(answers={"nobody@x": NO_USER})
    # The bounce's own recipient waits in the queue (directory "down" for it), so it can be inspected.
    router = ScriptedRouter({"alice@example.org": DIRECTORY_DOWN})
    bounce = make_bounce()
    qid = await queue.enqueue(env("alice@example.org", "nobody@x", "bob@x"), b"original")
    manager = await run_manager(queue, router, {"lmtp": transport}, bounce=bounce)
    await eventually(lambda: gone(queue, qid))
    (entry, failed, data), = bounce.calls
    assert (entry.id, failed, data) == (qid, [("nobody@x", NO_USER)], b"original")
    bounces = await eventually(lambda: attempts_reach_all(queue, 1))
    assert [(b.sender, [r.address for r in b.recipients], b.state) for b in bounces] == [
        ("", ["alice@example.org"], "deferred")]
    assert await queue.read_message(bounces[0]) == b"bounce bytes"
    assert [c.recipients for c in transport.calls] == [("nobody@x", "bob@x")]
    assert manager.stats.failed == 1 and manager.stats.delivered == 1


async def test_a_router_5xx_fails_without_calling_a_transport(queue, run_manager):
    transport = ScriptedTransport()
    bounce = make_bounce()
    qid = await queue.enqueue(env("alice@example.org", "unknown@x"), b"m")
    await run_manager(queue, ScriptedRouter({"unknown@x": NO_USER}), {"lmtp": transport}, bounce=bounce)
    await eventually(lambda: len(transport.calls) >= 1, what="the bounce's delivery")
    assert [(c.sender, c.recipients, c.data) for c in transport.calls] == [("", ("alice@example.org",),
                                                                             b"bounce bytes")]
    assert await gone(queue, qid)
    assert bounce.calls[0][1] == [("unknown@x", NO_USER)]


async def test_no_bounce_to_the_null_sender(queue, run_manager):
    transport = ScriptedTransport(answers={"nobody@x": NO_USER})
    bounce = make_bounce()
    qid = await queue.enqueue(env("", "nobody@x"), b"a bounce that bounces")
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport}, bounce=bounce)
    await eventually(lambda: gone(queue, qid))
    await asyncio.sleep(0.05)
    assert bounce.calls == []
    assert await all_entries(queue) == []
    assert len(transport.calls) == 1 and manager.stats.failed == 1


@pytest.mark.parametrize("failure", ["4xx", "transient"])
async def test_temporary_failures_defer_with_capped_exponential_backoff(queue, run_manager, clock, failure):
    transport = ScriptedTransport(answers={"a@x": LATER})
    if failure == "transient":
        transport.down["mss1"] = "connection refused"
    settings = Settings(retry_base=10.0, retry_max=50.0, lifetime=10_000.0)
    qid = await queue.enqueue(env("s@x", "a@x", "b@x"), b"m")
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport}, settings)
    for attempt in range(5):
        await eventually(lambda n=attempt + 1: attempts_reach(queue, qid, n), what=f"attempt {attempt + 1}")
        await settled(manager)
        entry = await queue.get(qid)
        assert entry.attempts == attempt + 1 and entry.state == "deferred"
        expected = min(50.0, 10.0 * 2 ** attempt)  # 10, 20, 40, 50 (capped), 50
        delay = entry.next_attempt - clock.t
        assert 0.9 * expected <= delay <= 1.1 * expected, (attempt, delay)
        assert entry.last_error.startswith("451 4.")
        assert [r.status for r in entry.recipients] == ["pending"] * (2 if failure == "transient" else 1) + \
            ["delivered"] * (0 if failure == "transient" else 1)
        assert await queue.next_due() == entry.next_attempt
        calls = len(transport.calls)
        manager.kick()
        await asyncio.sleep(0.03)
        assert len(transport.calls) == calls  # not retried before it is due
        clock.t = entry.next_attempt
        manager.kick()
    assert await eventually(lambda: attempts_reach(queue, qid, 6))
    if failure == "4xx":
        assert transport.calls[0].recipients == ("a@x", "b@x")
        assert all(c.recipients == ("a@x",) for c in transport.calls[-4:])  # a decided recipient is not sent again
    else:
        assert "connection refused" in (await queue.get(qid)).recipients[0].reply


async def test_expiry_fails_pending_recipients_with_4_4_7_and_bounces(queue, run_manager, clock):
    transport = ScriptedTransport(answers={"a@x": LATER})
    settings = Settings(retry_base=10.0, retry_max=50.0, lifetime=100.0)
    router = ScriptedRouter({"alice@example.org": DIRECTORY_DOWN})  # keep the bounce queued
    bounce = make_bounce()
    qid = await queue.enqueue(env("alice@example.org", "a@x"), b"m")
    manager = await run_manager(queue, router, {"lmtp": transport}, settings, bounce=bounce)
    await eventually(lambda: attempts_reach(queue, qid, 1))
    await settled(manager)
    assert bounce.calls == []
    calls = len(transport.calls)
    clock.t = T0 + 100  # the lifetime has run out at the next attempt
    manager.kick()
    await eventually(lambda: gone(queue, qid), what="expiry")
    (_, failed, _), = bounce.calls
    (address, reply), = failed
    assert address == "a@x" and reply.status == "4.4.7" and reply.code == 451
    assert "expired" in reply.text and str(LATER) in reply.text
    assert len(transport.calls) == calls + 1
    assert [(e.sender, e.recipients[0].address) for e in await all_entries(queue)] == [("", "alice@example.org")]


async def test_a_directory_outage_defers(queue, run_manager):
    transport = ScriptedTransport()
    bounce = make_bounce()
    qid = await queue.enqueue(env("s@x", "a@x", "b@x"), b"m")
    manager = await run_manager(queue, ScriptedRouter({"a@x": DIRECTORY_DOWN}), {"lmtp": transport}, bounce=bounce)
    await eventually(lambda: attempts_reach(queue, qid, 1))
    await settled(manager)
    entry = await queue.get(qid)
    assert entry.state == "deferred"
    assert [(r.status, r.reply) for r in entry.recipients] == [("pending", str(DIRECTORY_DOWN)), ("delivered", str(OK))]
    assert {c.recipients for c in transport.calls} == {("b@x",)}  # a@x never reaches a transport
    assert bounce.calls == []


async def test_a_missing_transport_defers(queue, run_manager):
    qid = await queue.enqueue(env("s@x", "r@remote"), b"m")
    await run_manager(queue, ScriptedRouter({"r@remote": [Route("smtp", "remote", ("r@remote",))]}),
                      {"lmtp": ScriptedTransport()})
    entry = await eventually(lambda: attempts_reach(queue, qid, 1))
    assert entry.state == "deferred" and entry.recipients[0].status == "pending"


async def test_an_entry_is_never_attempted_by_two_tasks_at_once(queue, run_manager):
    transport = ScriptedTransport(delay=0.15)
    ids = [await queue.enqueue(env("s@x", f"r{i}@x"), b"m") for i in range(3)]
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport})
    for _ in range(40):
        manager.kick()
        await asyncio.sleep(0.005)
    for qid in ids:
        await eventually(lambda q=qid: gone(queue, q))
    assert transport.max_by_key == 1
    assert sorted(c.recipients for c in transport.calls) == [(f"r{i}@x",) for i in range(3)]


@pytest.mark.parametrize("concurrency, per_destination, destinations", [(3, 10, 6), (8, 2, 2)])
async def test_concurrency_limits(queue, run_manager, concurrency, per_destination, destinations):
    transport = ScriptedTransport(delay=0.05)
    router = ScriptedRouter({f"r{i}@x": [Route("lmtp", f"mss{i % destinations}", (f"r{i}@x",))] for i in range(12)})
    ids = [await queue.enqueue(env("s@x", f"r{i}@x"), b"m") for i in range(12)]
    await run_manager(queue, router, {"lmtp": transport},
                      Settings(concurrency=concurrency, per_destination=per_destination, retry_base=10.0))
    for qid in ids:
        await eventually(lambda q=qid: gone(queue, q))
    # Never above the limits, and up to them (every entry is due at once, each delivery takes a while).
    assert transport.max_current == min(concurrency, per_destination * destinations)
    assert max(transport.max_by_destination.values()) <= per_destination
    if per_destination < concurrency:
        assert set(transport.max_by_destination.values()) == {per_destination}
    assert len(transport.calls) == 12


async def test_stop_waits_for_attempts_in_flight(queue, run_manager):
    transport = ScriptedTransport(delay=0.3)
    qid = await queue.enqueue(env("s@x", "a@x"), b"m")
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport})
    await asyncio.wait_for(transport.entered.wait(), 5)
    await manager.stop()
    assert transport.current == 0 and manager.stats.in_flight == 0
    assert await queue.get(qid) is None  # the attempt finished and was recorded before stop() returned
    later = await queue.enqueue(env("s@x", "b@x"), b"n")
    manager.kick()
    await asyncio.sleep(0.05)
    assert len(transport.calls) == 1 and await queue.get(later) is not None  # nothing new after stop()


async def test_an_unexpected_transport_error_defers_the_entry(queue, run_manager):
    transport = ScriptedTransport(answers={"boom@x": RuntimeError("transport bug")})
    bad = await queue.enqueue(env("s@x", "boom@x"), b"m")
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport})
    await eventually(lambda: transport.delivered_to("boom@x"))
    good = await queue.enqueue(env("s@x", "fine@x"), b"n")
    manager.kick()
    await eventually(lambda: gone(queue, good), what="the manager to keep delivering")
    entry = await queue.get(bad)
    # recorded as a temporary failure: it counts as an attempt, so the message can still expire
    assert entry is not None and entry.recipients[0].status == "pending" and entry.attempts >= 1
    assert entry.state == "deferred" and "internal error" in entry.last_error


async def test_flush_makes_deferred_entries_due(queue, run_manager, clock):
    transport = ScriptedTransport(answers={"a@x": LATER, "b@x": LATER})
    ids = [await queue.enqueue(env("s@x", r), b"m") for r in ("a@x", "b@x")]
    held = await queue.enqueue(env("s@x", "c@x"), b"m")
    await queue.set_state(held, "hold")
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport},
                                Settings(retry_base=1000.0, retry_max=5000.0))
    for qid in ids:
        await eventually(lambda q=qid: attempts_reach(queue, q, 1))
    await settled(manager)
    for qid in ids:
        assert (await queue.get(qid)).next_attempt > clock.t + 800
    transport.answers.clear()
    assert await manager.flush() == 2
    for qid in ids:
        await eventually(lambda q=qid: gone(queue, q), what="delivery after flush")
    assert (await queue.get(held)).state == "hold"  # flush does not release held entries
    assert not transport.delivered_to("c@x")


async def test_pending_recipients_are_attempted_again_after_a_crash(queue, run_manager, tmp_path, clock):
    """At least once from the queue's side: what was not recorded is attempted again, with the same key."""
    first = ScriptedTransport(answers={"b@x": LATER})
    qid = await queue.enqueue(env("s@x", "a@x", "b@x", "c@x"), b"m")
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": first})
    await eventually(lambda: attempts_reach(queue, qid, 1))  # a and c delivered, b deferred
    await settled(manager)
    calls = len(first.calls)
    first.gates[qid] = asyncio.Event()  # the next attempt hangs in the transport ...
    clock.t += 100
    manager.kick()
    await eventually(lambda: len(first.calls) == calls + 1)
    assert first.calls[-1].recipients == ("b@x",)
    await manager.stop(timeout=0.05)  # ... and the process dies: nothing recorded
    queue = await reopen(queue, tmp_path, clock)
    entry = await queue.get(qid)
    assert (entry.attempts, [r.status for r in entry.recipients]) == (1, ["delivered", "pending", "delivered"])

    second = ScriptedTransport()
    await run_manager(queue, ScriptedRouter(), {"lmtp": second})
    await eventually(lambda: gone(queue, qid))
    assert [(c.recipients, c.key) for c in second.calls] == [(("b@x",), qid)]


# == bugs found by these tests ============================================================================


async def test_the_manager_does_not_spin_while_an_attempt_is_in_flight(queue, run_manager):
    transport = ScriptedTransport(delay=0.3)
    scans = 0
    real_entries = queue.entries

    async def counting_entries(*args, **kwargs):
        nonlocal scans
        scans += 1
        return await real_entries(*args, **kwargs)

    queue.entries = counting_entries
    qid = await queue.enqueue(env("s@x", "a@x"), b"m")
    await run_manager(queue, ScriptedRouter(), {"lmtp": transport})
    await eventually(lambda: gone(queue, qid))
    assert scans <= 10, f"{scans} scans during one 0.3 s delivery"


async def test_an_entry_is_not_reattempted_from_a_stale_snapshot(tmp_path, run_manager):
    queue_clock = FakeClock()
    queue = await QueueStore.open(options_for(tmp_path), clock=queue_clock)
    manager = None
    try:
        transport = ScriptedTransport(answers={"b@x": LATER})
        first = await queue.enqueue(env("s@x", "a@x", "b@x"), b"m")
        transport.gates[first] = asyncio.Event()
        manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport},
                                    Settings(concurrency=1, retry_base=10.0))
        await asyncio.wait_for(transport.entered.wait(), 5)
        queue_clock.t = T0 - 500  # arrived "earlier": it sorts before the entry in flight
        second = await queue.enqueue(env("s@x", "c@x"), b"n")
        await asyncio.sleep(0.1)  # a scan sees [second, first] and waits for the only slot
        transport.gates[first].set()
        await eventually(lambda: gone(queue, second))
        await asyncio.sleep(0.2)
        assert len(transport.delivered_to("a@x")) == 1
        assert (await queue.get(first)).attempts == 1
    finally:
        if manager is not None:
            await manager.stop()
        await queue.close()


async def test_flush_survives_an_entry_delivered_meanwhile(queue, run_manager, clock):
    transport = ScriptedTransport(answers={"a@x": LATER, "b@x": LATER})
    soon, later = [await queue.enqueue(env("s@x", r), b"m") for r in ("a@x", "b@x")]
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport}, Settings(retry_base=10.0))
    for qid in (soon, later):
        await eventually(lambda q=qid: attempts_reach(queue, q, 1))
    await settled(manager)
    await queue.set_state(later, "deferred", next_attempt=T0 + 10_000)
    transport.answers.clear()
    transport.gates[soon] = asyncio.Event()
    clock.t = (await queue.get(soon)).next_attempt
    manager.kick()
    await eventually(lambda: transport.current == 1, what="the retry of `soon` in flight")
    real_set_state = queue.set_state

    async def set_state_after_delivery(qid, *args, **kwargs):
        if qid == soon:  # the attempt in flight ends between flush's listing and this call
            transport.gates[soon].set()
            await eventually(lambda: gone(queue, soon))
        return await real_set_state(qid, *args, **kwargs)

    queue.set_state = set_state_after_delivery
    await manager.flush()
    assert (await queue.get(later)).next_attempt == clock.t


async def test_a_duplicate_queue_id_is_refused_without_breaking_the_queue(queue):
    await queue.enqueue(env("s@x", "a@x"), b"first", queue_id="QDUPLICATE")
    try:
        await queue.enqueue(env("s@x", "b@x"), b"second", queue_id="QDUPLICATE")
        refused = None
    except MailError as exc:
        refused = exc
    assert refused is not None and refused.kind is ErrorKind.EXISTS, "a duplicate queue id was acknowledged"
    assert await queue.read_message(await queue.get("QDUPLICATE")) == b"first"


# -- found in review: alias members, big expansions, unrecordable outcomes, holds --------------------


async def test_an_alias_member_already_delivered_is_never_sent_again(queue, run_manager, clock):
    lmtp = ScriptedTransport(answers={"u1@x": LATER})
    smtp = ScriptedTransport("smtp", log=lmtp.calls)
    router = ScriptedRouter({"list@x": [Route("lmtp", "mss1", ("u1@x",)), Route("smtp", "remote", ("r@remote",))]})
    qid = await queue.enqueue(env("s@x", "list@x"), b"m")
    manager = await run_manager(queue, router, {"lmtp": lmtp, "smtp": smtp})
    await eventually(lambda: attempts_reach(queue, qid, 1))
    await settled(manager)
    assert (await queue.get(qid)).recipients[0].done == ("r@remote",)
    for _ in range(3):  # retries: only the member still pending is sent
        clock.t += 100.0
        manager.kick()
        await settled(manager)
    assert len(smtp.delivered_to("r@remote")) == 1
    assert len(lmtp.delivered_to("u1@x")) >= 2
    lmtp.answers.clear()
    clock.t += 100.0
    manager.kick()
    await eventually(lambda: gone(queue, qid))
    assert len(smtp.delivered_to("r@remote")) == 1


async def test_a_big_expansion_goes_out_in_transactions_of_at_most_max_recipients(queue, run_manager):
    members = tuple(f"m{i}@x" for i in range(250))
    transport = ScriptedTransport()
    qid = await queue.enqueue(env("s@x", "all@x"), b"m")
    await run_manager(queue, ScriptedRouter({"all@x": [Route("lmtp", "mss1", members)]}), {"lmtp": transport},
                      dataclasses.replace(SMALL, max_recipients=100))
    await eventually(lambda: gone(queue, qid))
    assert [len(c.recipients) for c in transport.calls] == [100, 100, 50]


async def test_an_outcome_that_cannot_be_recorded_is_not_retried_at_once(queue, run_manager, clock):
    transport = ScriptedTransport(kind="smtp")
    qid = await queue.enqueue(env("s@x", "r@remote"), b"m")
    real_record = queue.record

    async def failing_record(*args, **kwargs):
        raise MailError(ErrorKind.UNAVAILABLE, safe="queue disks failing")
    queue.record = failing_record
    manager = await run_manager(queue, ScriptedRouter({"r@remote": [Route("smtp", "remote", ("r@remote",))]}),
                                {"smtp": transport})
    await eventually(lambda: transport.calls)
    await asyncio.sleep(0.3)
    assert len(transport.calls) == 1  # held back in memory, not re-delivered in a loop
    queue.record = real_record
    clock.t += 1000.0
    manager.kick()
    await eventually(lambda: gone(queue, qid))


async def test_a_message_put_on_hold_during_its_attempt_stays_on_hold(queue, run_manager):
    transport = ScriptedTransport(answers={"a@x": LATER})
    qid = await queue.enqueue(env("s@x", "a@x"), b"m")
    transport.gates[qid] = asyncio.Event()
    manager = await run_manager(queue, ScriptedRouter(), {"lmtp": transport})
    await asyncio.wait_for(transport.entered.wait(), 5)
    await queue.set_state(qid, "hold")
    transport.gates[qid].set()
    await settled(manager)
    assert (await queue.get(qid)).state == "hold"
