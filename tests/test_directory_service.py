"""The directory over real sockets: the service, the replica follower and the client library.

Everything runs in one event loop (pytest-asyncio): each directory instance
is a :class:`DirectoryService` behind an :class:`RpcServer` on
``asyncio.start_server`` at 127.0.0.1 port 0, with its SQLite database in
``tmp_path``.  Clocks that decide cache and throttle expiry are fake, so
nothing waits for a TTL; network timeouts are short and real.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable
from typing import Any

import pytest
from argon2 import profiles

from intermail.directory import wire
from intermail.directory.client import DirectoryClient
from intermail.directory.db import Account, AliasExpansion, DirectoryDB, Unknown
from intermail.directory.passwords import PasswordHashing
from intermail.directory.replica import ReplicaFollower
from intermail.directory.service import NOT_SYNCED, PRIMARY_DOWN, DirectoryService
from intermail.directory.throttle import AuthThrottle
from intermail.errors import ErrorKind, MailError
from intermail.resolve import Resolver
from intermail.rpc.client import RpcClient
from intermail.rpc.server import RpcServer
from intermail.testing.dnsstub import DnsStub
from intermail.testing.clock import FakeClock

HOST = "127.0.0.1"
MSS = ("mss1", "mss2")
PRIMARY_DOWN_TEXT = "the directory primary is unavailable; writes are refused until it is back"
SYNC_WAIT = 4.0  # seconds a replica may take to apply what it was told about

pytestmark = pytest.mark.timeout(20)  # a hang fails the test; none should come near this


async def fails(kind: ErrorKind, call: Awaitable[Any]) -> MailError:
    with pytest.raises(MailError) as info:
        await call
    assert info.value.kind is kind, info.value
    return info.value


async def eventually(predicate, timeout: float = SYNC_WAIT, step: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(step)


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- one directory instance on a real socket ---------------------------------------------


class Dird:
    """A DirectoryService (and, on a replica, its ReplicaFollower) served on a socket.

    ``calls`` counts the requests each method received; ``overrides`` replaces
    handlers (to make one hang, say) before the server starts.
    """

    def __init__(self, db: DirectoryDB, service: DirectoryService, follower: ReplicaFollower | None = None):
        self.db = db
        self.service = service
        self.follower = follower
        self.calls: collections.Counter[str] = collections.Counter()
        self.overrides: dict[str, Any] = {}
        self.rpc: RpcServer | None = None
        self.listener: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] = (HOST, 0)
        self._closed = False

    def _handlers(self) -> dict[str, Any]:
        table = {**self.service.handlers(), **self.overrides}

        def counted(method, handler):
            async def handle(ctx, args):
                self.calls[method] += 1
                return await handler(ctx, args)
            return handle

        return {method: counted(method, handler) for method, handler in table.items()}

    async def serve(self, port: int = 0, host: str = HOST) -> Dird:
        self.rpc = RpcServer(self._handlers(), instance=self.service.instance)
        self.service.push = self.rpc.push

        async def handle(reader, writer):
            self.writers.add(writer)
            try:
                await self.rpc.handle_connection(reader, writer)
            finally:
                self.writers.discard(writer)

        self.listener = await asyncio.start_server(handle, host, port)
        self.address = (host, self.listener.sockets[0].getsockname()[1])
        return self

    async def stop_serving(self) -> None:
        """Like SIGTERM: stop listening, GOODBYE, drain."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.rpc is not None:
            await self.rpc.stop(timeout=1.0)
            self.rpc = None
        self.service.push = None

    async def kill(self) -> None:
        """Like SIGKILL of the server: stop listening and reset every connection."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for writer in list(self.writers):
            writer.transport.abort()
        await asyncio.sleep(0.05)  # let the aborted connections unwind

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.stop_serving()
        if self.follower is not None:
            await self.follower.stop()
        await self.service.stop()
        self.db.close()

    async def seq(self) -> int:
        return await self.service.in_db(self.db.last_seq)


class Env:
    """Builds instances and clients for one test and tears them all down."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.stack = contextlib.AsyncExitStack()

    async def primary(self, name: str = "dir1", *, db_file: str | None = None, port: int = 0,
                      throttle: AuthThrottle | None = None, serve: bool = True,
                      overrides: dict[str, Any] | None = None, **kwargs: Any) -> Dird:
        db = DirectoryDB(self.tmp_path / (db_file or f"{name}.sqlite"))
        service = DirectoryService(db, role="primary", instance=name, hashing=PasswordHashing(profiles.CHEAPEST),
                                   throttle=throttle, mss_candidates=MSS, **kwargs)
        await service.start()
        dird = Dird(db, service)
        dird.overrides.update(overrides or {})
        self.stack.push_async_callback(dird.close)
        if serve:
            await dird.serve(port)
        return dird

    async def replica(self, primary_address: tuple[str, int], name: str = "dir2", *,
                      poll_interval: float = 0.2, throttle: AuthThrottle | None = None,
                      serve: bool = True, **kwargs: Any) -> Dird:
        db = DirectoryDB(self.tmp_path / f"{name}.sqlite", replica=True)
        upstream = RpcClient([primary_address], instance=name, request_timeout=2.0, reconnect_window=0.5,
                             connect_timeout=0.5, keepalive=None)
        service = DirectoryService(db, role="replica", instance=name, hashing=PasswordHashing(profiles.CHEAPEST),
                                   throttle=throttle, primary=upstream, write_wait=2.0, **kwargs)
        await service.start()
        follower = ReplicaFollower(service, upstream, poll_interval=poll_interval)
        await follower.start()
        dird = Dird(db, service, follower)
        self.stack.push_async_callback(dird.close)
        if serve:
            await dird.serve()
        return dird

    def rpc(self, dird: Dird, **kwargs: Any) -> RpcClient:
        options = {"request_timeout": 3.0, "reconnect_window": 0.5, "connect_timeout": 0.5, "keepalive": None,
                   **kwargs}
        client = RpcClient([dird.address], instance="test", **options)
        self.stack.push_async_callback(client.close)
        return client

    def client(self, *dirds: Dird | tuple[str, int], **kwargs: Any) -> DirectoryClient:
        """A DirectoryClient over these instances, tried in the order given."""
        addresses = [d if isinstance(d, tuple) else d.address for d in dirds]

        async def fixed():
            return list(addresses), float("inf")

        options = {"request_timeout": 0.5, **kwargs}
        client = DirectoryClient(fixed, addresses, instance="mta-test", **options)
        self.stack.push_async_callback(client.close)
        return client


@pytest.fixture
async def env(tmp_path):
    environment = Env(tmp_path)
    async with environment.stack:
        yield environment


async def populate(rpc: RpcClient) -> int:
    """example.org with bob, carol, a team alias and a catch-all; returns the last seq."""
    await rpc.call("domain.add", {"name": "example.org"})
    await rpc.call("user.add", {"address": "bob@example.org", "password": "bob-password"})
    await rpc.call("user.add", {"address": "carol@example.org", "password": "carol-password", "mss": "mss2"})
    await rpc.call("alias.add", {"address": "team@example.org",
                                 "targets": ["bob@example.org", "carol@example.org", "x@remote.test"]})
    answer = await rpc.call("alias.add", {"address": "@example.org", "targets": ["bob@example.org"]})
    return answer["seq"]


async def last_seq(rpc: RpcClient) -> int:
    return (await rpc.call("status"))["last_seq"]


# == 1. the primary: writes answer their seq, reads see them ===============================


async def test_primary_writes_return_seq_and_reads_see_them(env):
    primary = await env.primary()
    rpc = env.rpc(primary)

    assert await rpc.call("domain.add", {"name": "Example.ORG"}) == {"domain": "example.org", "seq": 1}
    added = await rpc.call("user.add", {"address": "Bob@Example.org", "password": "bob-password"})
    assert added["seq"] == 2
    assert added["account"]["address"] == "bob@example.org"
    assert added["account"]["mss"] == "mss1" and added["account"]["status"] == "active"
    assert set(added["account"]) == {"address", "mss", "status", "quota_bytes", "created"}  # no hash
    added = await rpc.call("user.add", {"address": "carol@example.org", "password": "pw", "quota": 1000})
    assert added["seq"] == 3
    assert added["account"]["mss"] == "mss2"  # least loaded candidate
    alias = await rpc.call("alias.add", {"address": "team@example.org",
                                         "targets": ["bob@example.org", "carol@example.org", "x@remote.test"]})
    assert alias == {"seq": 4, "alias": {"address": "team@example.org",
                                         "targets": ["bob@example.org", "carol@example.org", "x@remote.test"]}}
    catch_all = await rpc.call("alias.add", {"address": "@example.org", "targets": "bob@example.org"})
    assert catch_all == {"seq": 5, "alias": {"address": "@example.org", "targets": ["bob@example.org"]}}

    bob = await rpc.call("resolve", {"address": "BOB@example.org"})
    assert bob["result"] == "account" and bob["account"]["address"] == "bob@example.org"
    assert isinstance(wire.decode_resolution(bob), Account)
    team = wire.decode_resolution(await rpc.call("resolve", {"address": "team@example.org"}))
    assert isinstance(team, AliasExpansion) and not team.via_catch_all
    assert [a.address for a in team.accounts] == ["bob@example.org", "carol@example.org"]
    assert team.remote == ("x@remote.test",) and team.unknown == ()
    anyone = wire.decode_resolution(await rpc.call("resolve", {"address": "anyone@example.org"}))
    assert isinstance(anyone, AliasExpansion) and anyone.via_catch_all
    assert [a.address for a in anyone.accounts] == ["bob@example.org"]
    assert await rpc.call("resolve", {"address": "who@elsewhere.test"}) == {
        "result": "unknown", "address": "who@elsewhere.test", "hosted": False}

    carol = (await rpc.call("user.show", {"address": "carol@example.org"}))["account"]
    assert (carol["quota_bytes"], carol["mss"], carol["status"]) == (1000, "mss2", "active")
    users = (await rpc.call("user.list", {}))["accounts"]
    assert [u["address"] for u in users] == ["bob@example.org", "carol@example.org"]
    assert (await rpc.call("user.list", {"domain": "example.org"}))["accounts"] == users
    assert await rpc.call("alias.list", {}) == {"aliases": [
        {"address": "@example.org", "targets": ["bob@example.org"]},
        {"address": "team@example.org", "targets": ["bob@example.org", "carol@example.org", "x@remote.test"]},
    ]}
    assert await rpc.call("domain.list", {}) == {"domains": ["example.org"]}

    # The remaining writes, each with its own seq.
    assert await rpc.call("user.passwd", {"address": "carol@example.org", "password": "new-pw"}) == {"seq": 6}
    assert await rpc.call("user.status", {"address": "carol@example.org", "status": "disabled"}) == {"seq": 7}
    assert await rpc.call("user.quota", {"address": "carol@example.org", "quota": 5}) == {"seq": 8}
    carol = (await rpc.call("user.show", {"address": "carol@example.org"}))["account"]
    assert (carol["quota_bytes"], carol["status"]) == (5, "disabled")
    assert await rpc.call("alias.del", {"address": "team@example.org", "target": "x@remote.test"}) == {"seq": 9}
    assert await rpc.call("alias.del", {"address": "team@example.org"}) == {"seq": 10}
    assert await rpc.call("alias.del", {"address": "@example.org"}) == {"seq": 11}
    assert await rpc.call("user.del", {"address": "carol@example.org"}) == {"seq": 12}
    assert await rpc.call("user.del", {"address": "bob@example.org"}) == {"seq": 13}
    assert await rpc.call("domain.del", {"name": "example.org"}) == {"seq": 14}
    assert await rpc.call("domain.list", {}) == {"domains": []}

    status = await rpc.call("status")
    assert (status["role"], status["instance"], status["last_seq"]) == ("primary", "dir1", 14)
    assert status["origin"] == primary.db.origin


async def test_answers_carry_no_password_hash(env):
    primary = await env.primary()
    rpc = env.rpc(primary)
    await populate(rpc)
    answers = [
        await rpc.call("resolve", {"address": "bob@example.org"}),
        await rpc.call("resolve", {"address": "team@example.org"}),
        await rpc.call("user.show", {"address": "bob@example.org"}),
        await rpc.call("user.list", {}),
        await rpc.call("authenticate", {"user": "bob@example.org", "password": "bob-password"}),
    ]
    text = json.dumps(answers)
    assert "$argon2" not in text and "password" not in text


@pytest.mark.parametrize("method, args, kind, safe", [
    ("domain.add", {"name": "example.org"}, ErrorKind.EXISTS, "domain already exists"),
    ("domain.del", {"name": "nowhere.test"}, ErrorKind.NOTFOUND, "no such domain"),
    ("domain.del", {"name": "example.org"}, ErrorKind.PERM, "domain still has accounts or aliases"),
    ("user.add", {"address": "bob@example.org", "password": "pw"}, ErrorKind.EXISTS, "address already exists"),
    ("user.add", {"address": "team@example.org", "password": "pw"}, ErrorKind.EXISTS, "address already exists"),
    ("user.add", {"address": "x@nowhere.test", "password": "pw"}, ErrorKind.NOTFOUND, "no such domain"),
    ("user.show", {"address": "nobody@example.org"}, ErrorKind.NOTFOUND, "no such account"),
    ("user.del", {"address": "nobody@example.org"}, ErrorKind.NOTFOUND, "no such account"),
    ("user.passwd", {"address": "nobody@example.org", "password": "pw"}, ErrorKind.NOTFOUND, "no such account"),
    ("alias.add", {"address": "bob@example.org", "targets": ["carol@example.org"]}, ErrorKind.EXISTS,
     "an account has this address"),
    ("alias.add", {"address": "team@example.org", "targets": ["bob@example.org"]}, ErrorKind.EXISTS,
     "alias already has these targets"),
    ("alias.del", {"address": "none@example.org"}, ErrorKind.NOTFOUND, "no such alias"),
    ("alias.del", {"address": "team@example.org", "target": "z@remote.test"}, ErrorKind.NOTFOUND, "no such alias"),
])
async def test_store_errors_pass_through_with_their_safe_text(env, method, args, kind, safe):
    primary = await env.primary()
    rpc = env.rpc(primary)
    before = await populate(rpc)
    error = await fails(kind, rpc.call(method, args))
    assert error.safe == safe
    assert await last_seq(rpc) == before


# == 2. bad input: a clear error kind, nothing written =====================================


LONG_TEXT = "x" * 1025  # max_field_bytes is 1024 by default


@pytest.mark.parametrize("method, args, kind, safe", [
    ("no.such.method", {}, ErrorKind.INVALID, "unknown method"),
    ("domain.add", {"name": "new.test", "colour": "blue"}, ErrorKind.INVALID, "unknown argument 'colour'"),
    ("resolve", {"address": "bob@example.org", "extra": 1}, ErrorKind.INVALID, "unknown argument 'extra'"),
    ("user.add", {"address": "new@example.org"}, ErrorKind.INVALID, "missing argument 'password'"),
    ("user.add", {"password": "pw"}, ErrorKind.INVALID, "missing argument 'address'"),
    ("resolve", {}, ErrorKind.INVALID, "missing argument 'address'"),
    ("authenticate", {"user": "bob@example.org"}, ErrorKind.INVALID, "missing argument 'password'"),
    ("user.quota", {"address": "bob@example.org"}, ErrorKind.INVALID, "missing argument 'quota'"),
    ("domain.add", {"name": 42}, ErrorKind.INVALID, "argument 'name' must be text"),
    ("domain.add", {"name": ""}, ErrorKind.INVALID, "argument 'name' is empty"),
    ("user.add", {"address": ["new@example.org"], "password": "pw"}, ErrorKind.INVALID,
     "argument 'address' must be text"),
    ("user.passwd", {"address": "bob@example.org", "password": {"a": 1}}, ErrorKind.INVALID,
     "argument 'password' must be text"),
    ("resolve", {"address": None}, ErrorKind.INVALID, "missing argument 'address'"),
    ("user.quota", {"address": "bob@example.org", "quota": True}, ErrorKind.INVALID,
     "argument 'quota' must be an integer from 0 to 4611686018427387904"),
    ("user.add", {"address": "new@example.org", "password": "pw", "quota": False}, ErrorKind.INVALID,
     "argument 'quota' must be an integer from 0 to 4611686018427387904"),
    ("user.quota", {"address": "bob@example.org", "quota": -1}, ErrorKind.INVALID,
     "argument 'quota' must be an integer from 0 to 4611686018427387904"),
    ("user.quota", {"address": "bob@example.org", "quota": "100"}, ErrorKind.INVALID,
     "argument 'quota' must be an integer from 0 to 4611686018427387904"),
    ("user.quota", {"address": "bob@example.org", "quota": 1.5}, ErrorKind.INVALID,
     "argument 'quota' must be an integer from 0 to 4611686018427387904"),
    ("user.status", {"address": "bob@example.org", "status": "frozen"}, ErrorKind.INVALID,
     "status must be active or disabled"),
    ("user.add", {"address": "new@example.org", "password": LONG_TEXT}, ErrorKind.LIMIT,
     "argument 'password' is too long"),
    ("user.add", {"address": "new@example.org", "password": "é" * 513}, ErrorKind.LIMIT,  # 1026 bytes
     "argument 'password' is too long"),
    ("resolve", {"address": LONG_TEXT + "@example.org"}, ErrorKind.LIMIT, "argument 'address' is too long"),
    ("domain.add", {"name": LONG_TEXT}, ErrorKind.LIMIT, "argument 'name' is too long"),
    ("alias.add", {"address": "list@example.org", "targets": ["bob@example.org", LONG_TEXT]}, ErrorKind.LIMIT,
     "an item of 'targets' is too long"),
    ("alias.add", {"address": "list@example.org", "targets": [f"u{i}@remote.test" for i in range(1001)]},
     ErrorKind.LIMIT, "argument 'targets' has too many items"),
    ("alias.add", {"address": "list@example.org", "targets": []}, ErrorKind.INVALID,
     "argument 'targets' must be a non-empty list of text"),
    ("alias.add", {"address": "list@example.org", "targets": ["bob@example.org", 7]}, ErrorKind.INVALID,
     "argument 'targets' must be a non-empty list of text"),
    ("alias.add", {"address": "list@example.org", "targets": {"bob@example.org": 1}}, ErrorKind.INVALID,
     "argument 'targets' must be a non-empty list of text"),
    ("changes", {"since": -1}, ErrorKind.INVALID, "argument 'since' must be an integer from 0 to 4611686018427387904"),
    ("changes", {"since": 0, "limit": 1001}, ErrorKind.INVALID, "argument 'limit' must be an integer from 1 to 1000"),
])
async def test_bad_arguments_are_refused_and_nothing_is_written(env, method, args, kind, safe):
    primary = await env.primary()
    rpc = env.rpc(primary)
    before = await populate(rpc)
    error = await fails(kind, rpc.call(method, args))
    assert error.safe == safe
    assert await last_seq(rpc) == before
    assert await primary.seq() == before


@pytest.mark.parametrize("method, args", [
    ("resolve", {"address": "not-an-address"}),
    ("resolve", {"address": "bob@@example.org"}),
    ("user.show", {"address": "bob"}),
    ("user.add", {"address": "no at sign", "password": "pw"}),
    ("user.del", {"address": "bob@example..org"}),
    ("alias.add", {"address": "list@example.org", "targets": ["not an address"]}),
    ("alias.add", {"address": "list@example.org", "targets": ["list@example.org"]}),  # points to itself
    ("domain.add", {"name": "bad domain"}),
    ("domain.add", {"name": "[192.0.2.1]"}),
])
async def test_malformed_addresses_are_invalid_and_nothing_is_written(env, method, args):
    primary = await env.primary()
    rpc = env.rpc(primary)
    before = await populate(rpc)
    hashes = []
    real_ahash = primary.service.hashing.ahash

    async def counting_ahash(password):
        hashes.append(password)
        return await real_ahash(password)

    primary.service.hashing.ahash = counting_ahash
    error = await fails(ErrorKind.INVALID, rpc.call(method, args))
    assert error.safe and "Traceback" not in error.safe
    assert await last_seq(rpc) == before
    assert hashes == []  # refused before the costly hash


async def test_field_size_limit_edge_counts_utf8_bytes(env):
    primary = await env.primary(max_field_bytes=64)
    rpc = env.rpc(primary)
    await rpc.call("domain.add", {"name": "example.org"})
    at_limit = "p" * 64
    over_limit = "é" * 33  # 33 characters, 66 bytes
    await rpc.call("user.add", {"address": "edge@example.org", "password": at_limit})
    seq = await last_seq(rpc)
    error = await fails(ErrorKind.LIMIT, rpc.call("user.passwd", {"address": "edge@example.org",
                                                                  "password": over_limit}))
    assert error.safe == "argument 'password' is too long"
    assert await last_seq(rpc) == seq
    account = await rpc.call("authenticate", {"user": "edge@example.org", "password": at_limit})
    assert account["account"]["address"] == "edge@example.org"


class FakeCtx:
    peer = "192.0.2.1:40000"


@pytest.mark.parametrize("method", sorted(wire.READS | wire.WRITES | wire.ADMIN))
async def test_arguments_that_are_not_a_map_are_invalid(env, method):
    # The RPC machine only carries maps, so this is what a direct caller of the table gets.
    primary = await env.primary(serve=False)
    before = await primary.seq()
    handlers = primary.service.handlers()
    assert set(handlers) == wire.READS | wire.WRITES | wire.ADMIN
    for args in (["address", "bob@example.org"], "bob@example.org", None, 7):
        error = await fails(ErrorKind.INVALID, handlers[method](FakeCtx(), args))
        assert error.safe == "arguments must be a map"
    assert await primary.seq() == before


# == 3. authentication ======================================================================


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def auth(rpc: RpcClient, user: str, password: str, client: str | None = None) -> dict:
    args = {"user": user, "password": password}
    if client is not None:
        args["client"] = client
    return await rpc.call("authenticate", args)


def count_verifies(service: DirectoryService) -> list[str]:
    """Wrap the service's password verify; returns the stored hashes it was asked to check."""
    seen: list[str] = []
    real = service.hashing.averify

    async def averify(stored: str, password: str) -> bool:
        seen.append(stored)
        return await real(stored, password)

    service.hashing.averify = averify
    return seen


async def test_authenticate_success_returns_the_account(env):
    primary = await env.primary()
    rpc = env.rpc(primary)
    await populate(rpc)
    answer = await auth(rpc, "Bob@EXAMPLE.org", "bob-password")
    assert answer["account"]["address"] == "bob@example.org"
    assert answer["account"]["mss"] == "mss1"
    assert wire.decode_account(answer["account"]).active


async def test_wrong_password_and_unknown_user_fail_alike_and_both_verify(env):
    primary = await env.primary()
    rpc = env.rpc(primary)
    await populate(rpc)
    verifies = count_verifies(primary.service)

    wrong = await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "not-bobs-password"))
    unknown = await fails(ErrorKind.PERM, auth(rpc, "nobody@example.org", "whatever"))
    no_domain = await fails(ErrorKind.PERM, auth(rpc, "bob@elsewhere.test", "whatever"))
    malformed = await fails(ErrorKind.PERM, auth(rpc, "not an address", "whatever"))
    assert wrong.safe == unknown.safe == no_domain.safe == malformed.safe == "authentication failed"
    assert len(verifies) == 4  # the unknown users cost a verify too
    bob_hash = primary.db.show_user("bob@example.org").password_hash
    dummy = verifies[1]
    assert verifies[0] == bob_hash and dummy != bob_hash
    assert verifies[2] == verifies[3] == dummy
    # The dummy hash has the same cost parameters as a real one: same time to verify.
    assert dummy.split("$")[1:4] == bob_hash.split("$")[1:4]


async def test_disabled_account_refused_only_with_the_right_password(env):
    primary = await env.primary()
    rpc = env.rpc(primary)
    await populate(rpc)
    await rpc.call("user.status", {"address": "bob@example.org", "status": "disabled"})
    wrong = await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "guess"))
    assert wrong.safe == "authentication failed"  # a guesser learns nothing about the account
    right = await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "bob-password"))
    assert right.safe == "account disabled"
    await rpc.call("user.status", {"address": "bob@example.org", "status": "active"})
    assert (await auth(rpc, "bob@example.org", "bob-password"))["account"]["status"] == "active"


async def test_throttle_per_user_then_the_window_passes(env, clock):
    primary = await env.primary(throttle=AuthThrottle(user_failures=3, ip_failures=0, window=60.0, clock=clock))
    rpc = env.rpc(primary)
    await populate(rpc)
    verifies = count_verifies(primary.service)
    for n in range(3):
        await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", f"guess-{n}", client=f"192.0.2.{n}"))
    assert len(verifies) == 3
    throttled = await fails(ErrorKind.LIMIT, auth(rpc, "BOB@example.org", "bob-password", client="198.51.100.1"))
    assert throttled.safe.startswith("too many failed logins; try again in ")
    assert len(verifies) == 3  # refused without a verify
    # Other users are not affected.
    assert (await auth(rpc, "carol@example.org", "carol-password"))["account"]["address"] == "carol@example.org"
    clock.advance(59.0)
    await fails(ErrorKind.LIMIT, auth(rpc, "bob@example.org", "bob-password"))
    clock.advance(1.0)
    assert (await auth(rpc, "bob@example.org", "bob-password"))["account"]["address"] == "bob@example.org"
    status = await rpc.call("status")
    assert status["throttle"]["blocked_users"] == 0


async def test_throttle_per_client_address(env, clock):
    primary = await env.primary(throttle=AuthThrottle(user_failures=0, ip_failures=3, window=60.0, clock=clock))
    rpc = env.rpc(primary)
    await populate(rpc)
    for n in range(3):
        await fails(ErrorKind.PERM, auth(rpc, f"user{n}@example.org", "guess", client="192.0.2.7"))
    error = await fails(ErrorKind.LIMIT, auth(rpc, "bob@example.org", "bob-password", client="192.0.2.7"))
    assert error.safe.startswith("too many failed logins")
    assert (await auth(rpc, "bob@example.org", "bob-password", client="192.0.2.8"))["account"]
    # The address stays blocked for every account until its failures age out.
    await fails(ErrorKind.LIMIT, auth(rpc, "carol@example.org", "carol-password", client="192.0.2.7"))
    clock.advance(60.0)
    assert (await auth(rpc, "carol@example.org", "carol-password", client="192.0.2.7"))["account"]


async def test_throttle_uses_the_peer_address_without_a_client_argument(env, clock):
    primary = await env.primary(throttle=AuthThrottle(user_failures=0, ip_failures=2, window=60.0, clock=clock))
    rpc = env.rpc(primary)
    await populate(rpc)
    for n in range(2):
        await fails(ErrorKind.PERM, auth(rpc, f"user{n}@example.org", "guess"))  # from 127.0.0.1
    await fails(ErrorKind.LIMIT, auth(rpc, "bob@example.org", "bob-password"))
    await fails(ErrorKind.LIMIT, auth(rpc, "bob@example.org", "bob-password", client=HOST))
    assert (await auth(rpc, "bob@example.org", "bob-password", client="192.0.2.1"))["account"]


async def test_success_clears_the_users_failures(env, clock):
    primary = await env.primary(throttle=AuthThrottle(user_failures=3, ip_failures=0, window=60.0, clock=clock))
    rpc = env.rpc(primary)
    await populate(rpc)
    for _ in range(2):
        await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "guess"))
    await auth(rpc, "bob@example.org", "bob-password")
    for _ in range(2):
        await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "guess"))
    # 4 failures in the window, but the success in between reset the count to 2.
    assert (await auth(rpc, "bob@example.org", "bob-password"))["account"]
    await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "guess"))
    await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "guess"))
    await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", "guess"))
    await fails(ErrorKind.LIMIT, auth(rpc, "bob@example.org", "bob-password"))


async def test_no_password_in_any_log_record(env, clock, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = ["Tr0ub4dor&3-bob", "correct-horse-carol", "wrong-guess-Z9", "new-secret-Q7", "unknown-user-pw"]
    primary = await env.primary(throttle=AuthThrottle(user_failures=2, ip_failures=0, window=60.0, clock=clock))
    replica = await env.replica(primary.address)
    rpc, via_replica = env.rpc(primary), env.rpc(replica)
    await rpc.call("domain.add", {"name": "example.org"})
    await rpc.call("user.add", {"address": "bob@example.org", "password": secrets[0]})
    await via_replica.call("user.add", {"address": "carol@example.org", "password": secrets[1]})
    await auth(rpc, "bob@example.org", secrets[0])
    await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", secrets[2]))
    await fails(ErrorKind.PERM, auth(rpc, "nobody@example.org", secrets[4]))
    await fails(ErrorKind.PERM, auth(rpc, "bob@example.org", secrets[2]))
    await fails(ErrorKind.LIMIT, auth(rpc, "bob@example.org", secrets[0]))
    await rpc.call("user.passwd", {"address": "carol@example.org", "password": secrets[3]})
    await fails(ErrorKind.LIMIT, rpc.call("user.passwd", {"address": "carol@example.org", "password": "p" * 2000}))
    await rpc.call("user.status", {"address": "carol@example.org", "status": "disabled"})
    await fails(ErrorKind.PERM, auth(rpc, "carol@example.org", secrets[3]))
    assert await replica.follower.wait_applied(await primary.seq(), SYNC_WAIT)
    await auth(via_replica, "bob@example.org", secrets[0])

    events = [getattr(r, "im_event", None) for r in caplog.records]
    assert "dir.auth_failed" in events and "dir.auth_throttled" in events and "dir.write" in events
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        for secret in secrets + ["p" * 2000]:
            assert secret not in text, (record.name, getattr(record, "im_event", None))
    failed = [r for r in caplog.records if getattr(r, "im_event", None) == "dir.auth_failed"]
    assert {r.im_fields.get("reason") for r in failed} == {"wrong password", "unknown account", "account disabled"}


# == 4. replicas ===========================================================================


async def test_replica_follows_the_primary(env):
    primary = await env.primary()
    replica = await env.replica(primary.address)
    rpc, via_replica = env.rpc(primary), env.rpc(replica)
    seq = await populate(rpc)
    assert await replica.follower.wait_applied(seq, SYNC_WAIT)
    bob = await via_replica.call("resolve", {"address": "bob@example.org"})
    assert bob == await rpc.call("resolve", {"address": "bob@example.org"})
    for method in ("domain.list", "user.list", "alias.list"):
        assert await via_replica.call(method, {}) == await rpc.call(method, {})
    assert (await auth(via_replica, "carol@example.org", "carol-password"))["account"]["mss"] == "mss2"
    status = await via_replica.call("status")
    assert status["role"] == "replica" and status["last_seq"] == seq
    assert status["origin"] == primary.db.origin
    assert (status["lag"], status["sync_error"], status["primary_reachable"]) == (0, None, True)
    assert status["primary_seq"] == seq


async def test_pushes_wake_the_replica_without_waiting_for_the_poll(env):
    primary = await env.primary()
    replica = await env.replica(primary.address, poll_interval=60.0)
    rpc, via_replica = env.rpc(primary), env.rpc(replica)
    await eventually(lambda: _true(replica.db.origin is not None))  # the first pull, at start
    await eventually(lambda: _true(bool(primary.rpc.connections) and any(
        c.subscriptions for c in primary.rpc.connections)))
    seq = await populate(rpc)
    # No wait_applied here: that would kick a pull itself.
    await eventually(lambda: _true(replica.follower.applied >= seq), timeout=2.0)
    assert (await via_replica.call("resolve", {"address": "bob@example.org"}))["result"] == "account"


async def _true(value: bool) -> bool:
    return value


async def test_write_through_a_replica_is_forwarded_and_readable_at_once(env):
    primary = await env.primary()
    replica = await env.replica(primary.address, poll_interval=60.0)
    rpc, via_replica = env.rpc(primary), env.rpc(replica)
    await populate(rpc)
    added = await via_replica.call("user.add", {"address": "dave@example.org", "password": "dave-password"})
    assert added["seq"] == await primary.seq()
    assert added["account"]["address"] == "dave@example.org"
    assert (await via_replica.call("resolve", {"address": "dave@example.org"}))["result"] == "account"
    assert (await auth(via_replica, "dave@example.org", "dave-password"))["account"]
    assert primary.calls["user.add"] == 3  # 2 in populate, 1 forwarded
    assert replica.calls["user.add"] == 1
    # The primary's own refusals reach the caller unchanged, and nothing is written.
    seq = await primary.seq()
    exists = await fails(ErrorKind.EXISTS, via_replica.call("domain.add", {"name": "example.org"}))
    assert exists.safe == "domain already exists"
    missing = await fails(ErrorKind.NOTFOUND, via_replica.call("user.del", {"address": "zed@example.org"}))
    assert missing.safe == "no such account"
    bad = await fails(ErrorKind.INVALID, via_replica.call("domain.add", {"name": "x.test", "bogus": 1}))
    assert bad.safe == "unknown argument 'bogus'"
    assert await primary.seq() == seq and await replica.seq() == seq


async def test_replica_that_never_synced_answers_unavailable(env):
    replica = await env.replica((HOST, free_port()))
    via_replica = env.rpc(replica)
    for method, args in [("resolve", {"address": "bob@example.org"}), ("user.show", {"address": "bob@example.org"}),
                         ("user.list", {}), ("alias.list", {}), ("domain.list", {}),
                         ("authenticate", {"user": "bob@example.org", "password": "pw"}),
                         ("changes", {"since": 0})]:
        error = await fails(ErrorKind.UNAVAILABLE, via_replica.call(method, args))
        assert error.safe == NOT_SYNCED, method
    write = await fails(ErrorKind.UNAVAILABLE, via_replica.call("domain.add", {"name": "example.org"}))
    assert write.safe == PRIMARY_DOWN_TEXT
    status = await via_replica.call("status")  # status still answers, and says why
    assert status["origin"] is None and status["primary_reachable"] is False
    # Bad input is still refused as bad input.
    await fails(ErrorKind.INVALID, via_replica.call("resolve", {}))


async def test_replica_serves_while_the_primary_is_down_and_catches_up_after(env, tmp_path):
    primary = await env.primary(db_file="primary.sqlite")
    port = primary.address[1]
    replica = await env.replica(primary.address)
    rpc, via_replica = env.rpc(primary), env.rpc(replica)
    seq = await populate(rpc)
    assert await replica.follower.wait_applied(seq, SYNC_WAIT)

    await primary.close()  # the primary process stops
    assert (await via_replica.call("resolve", {"address": "bob@example.org"}))["result"] == "account"
    assert (await via_replica.call("resolve", {"address": "team@example.org"}))["result"] == "alias"
    assert (await auth(via_replica, "bob@example.org", "bob-password"))["account"]["address"] == "bob@example.org"
    await fails(ErrorKind.PERM, auth(via_replica, "bob@example.org", "wrong"))
    for method, args in [("user.add", {"address": "erin@example.org", "password": "pw"}),
                         ("domain.add", {"name": "new.test"}),
                         ("user.del", {"address": "bob@example.org"})]:
        error = await fails(ErrorKind.UNAVAILABLE, via_replica.call(method, args))
        assert error.safe == PRIMARY_DOWN_TEXT == PRIMARY_DOWN
    assert await replica.seq() == seq

    async def noticed() -> bool:
        status = await via_replica.call("status")
        return status["primary_reachable"] is False and status["sync_error"] is not None
    await eventually(noticed)

    # Meanwhile, on the primary's host, changes are made to its database (an offline admin tool).
    with DirectoryDB(tmp_path / "primary.sqlite") as offline:
        offline.add_domain("later.test")
        offline.del_user("carol@example.org")
        new_seq = offline.last_seq()
    assert new_seq == seq + 2

    restarted = await env.primary("dir1-restarted", db_file="primary.sqlite", port=port)
    assert restarted.address == (HOST, port)
    assert await replica.follower.wait_applied(new_seq, SYNC_WAIT)
    assert (await via_replica.call("resolve", {"address": "carol@example.org"}))["result"] == "alias"  # catch-all
    assert (await via_replica.call("domain.list", {}))["domains"] == ["example.org", "later.test"]

    async def healthy() -> bool:
        status = await via_replica.call("status")
        return status["primary_reachable"] is True and status["sync_error"] is None and status["lag"] == 0
    await eventually(healthy)
    added = await via_replica.call("user.add", {"address": "erin@example.org", "password": "pw"})
    assert added["seq"] == new_seq + 1
    assert (await via_replica.call("resolve", {"address": "erin@example.org"}))["result"] == "account"


async def _replica_meets_another_primary(env, writes_on_new_primary: int):
    """A replica synced with one primary; then a primary rebuilt from scratch takes its port."""
    primary = await env.primary(db_file="primary.sqlite")
    port = primary.address[1]
    replica = await env.replica(primary.address)
    rpc, via_replica = env.rpc(primary), env.rpc(replica)
    seq = await populate(rpc)
    assert await replica.follower.wait_applied(seq, SYNC_WAIT)
    old_origin = primary.db.origin
    await primary.close()

    impostor = await env.primary("dir1-rebuilt", db_file="rebuilt.sqlite", port=port, serve=False)
    for n in range(writes_on_new_primary):
        await impostor.service.in_db(impostor.db.add_domain, f"d{n}.test")
    await impostor.serve(port)
    assert impostor.db.origin != old_origin
    return impostor, replica, via_replica, seq, old_origin


async def _refuses_the_other_history(replica, via_replica, seq, old_origin):
    async def conflict_reported() -> bool:
        status = await via_replica.call("status")
        return status["sync_error"] is not None
    with contextlib.suppress(TimeoutError):
        await eventually(conflict_reported, timeout=2.0)  # several polls and pushes
    status = await via_replica.call("status")
    assert status["sync_error"] is not None and status["primary_reachable"] is False, status
    assert status["origin"] == old_origin and status["last_seq"] == seq
    # It keeps serving what it had, and mixed nothing in.
    assert (await via_replica.call("resolve", {"address": "bob@example.org"}))["result"] == "account"
    assert (await via_replica.call("domain.list", {}))["domains"] == ["example.org"]
    assert (await auth(via_replica, "bob@example.org", "bob-password"))["account"]
    assert await replica.seq() == seq


async def test_replica_refuses_to_follow_another_primary_with_a_longer_log(env):
    impostor, replica, via_replica, seq, old_origin = await _replica_meets_another_primary(env, 8)
    assert await impostor.seq() > seq
    await _refuses_the_other_history(replica, via_replica, seq, old_origin)


async def test_replica_refuses_to_follow_a_fresh_primary(env):
    impostor, replica, via_replica, seq, old_origin = await _replica_meets_another_primary(env, 0)
    await _refuses_the_other_history(replica, via_replica, seq, old_origin)


async def test_replica_does_not_forward_writes_to_another_primary(env):
    impostor, replica, via_replica, seq, old_origin = await _replica_meets_another_primary(env, 1)
    await asyncio.sleep(0.5)  # several polls
    await fails(ErrorKind.UNAVAILABLE, via_replica.call("domain.add", {"name": "lost.test"}))


# == 5. the client library ===================================================================


async def test_client_cache_hit_avoids_the_request(env, clock):
    primary = await env.primary()
    await populate(env.rpc(primary))
    client = env.client(primary, cache_ttl=30.0, clock=clock)
    first = await client.resolve("Bob@Example.ORG")
    assert isinstance(first, Account) and first.address == "bob@example.org"
    assert first.password_hash == ""
    assert await client.resolve("bob@example.org") == first  # same canonical key
    clock.advance(29.9)
    assert await client.resolve("BOB@example.org") == first
    assert primary.calls["resolve"] == 1
    assert client.stats["hits"] == 2 and client.stats["misses"] == 1
    samples = primary.service.registry.get_sample_value(
        "intermail_directory_requests_total", {"method": "resolve", "outcome": "ok"})
    assert samples == 1
    clock.advance(0.1)  # expired
    assert await client.resolve("bob@example.org") == first
    assert primary.calls["resolve"] == 2
    client.invalidate("BOB@example.org")
    await client.resolve("bob@example.org")
    assert primary.calls["resolve"] == 3


async def test_client_resolves_aliases_and_authenticates_uncached(env, clock):
    primary = await env.primary()
    await populate(env.rpc(primary))
    client = env.client(primary, clock=clock)
    team = await client.resolve("team@example.org")
    assert isinstance(team, AliasExpansion)
    assert [a.address for a in team.accounts] == ["bob@example.org", "carol@example.org"]
    account = await client.authenticate("bob@example.org", "bob-password", client="192.0.2.7")
    assert account.address == "bob@example.org"
    await client.authenticate("bob@example.org", "bob-password")
    assert primary.calls["authenticate"] == 2  # never cached
    error = await fails(ErrorKind.PERM, client.authenticate("bob@example.org", "wrong"))
    assert error.safe == "authentication failed"


async def test_client_negative_cache_expires_after_negative_ttl(env, clock):
    primary = await env.primary()
    rpc = env.rpc(primary)
    await populate(rpc)
    await rpc.call("alias.del", {"address": "@example.org"})  # no catch-all
    client = env.client(primary, cache_ttl=300.0, negative_ttl=5.0, clock=clock)
    assert await client.resolve("new@example.org") == Unknown("new@example.org")
    await rpc.call("user.add", {"address": "new@example.org", "password": "pw"})
    clock.advance(4.9)
    assert await client.resolve("new@example.org") == Unknown("new@example.org")  # still cached
    assert primary.calls["resolve"] == 1
    clock.advance(0.1)
    found = await client.resolve("new@example.org")
    assert isinstance(found, Account) and found.address == "new@example.org"
    assert primary.calls["resolve"] == 2


async def test_client_serves_a_stale_positive_answer_while_no_directory_answers(env, clock, caplog):
    caplog.set_level(logging.WARNING)
    primary = await env.primary()
    await populate(env.rpc(primary))
    client = env.client(primary, cache_ttl=10.0, stale_ttl=100.0, clock=clock, request_timeout=0.3)
    bob = await client.resolve("bob@example.org")
    team = await client.resolve("team@example.org")
    await primary.stop_serving()

    clock.advance(50.0)  # expired, within stale_ttl
    assert await client.resolve("bob@example.org") == bob
    assert await client.resolve("team@example.org") == team
    assert client.stats["stale"] == 2
    assert "dir.client_stale" in [getattr(r, "im_event", None) for r in caplog.records]
    # Something never looked up is not invented.
    error = await fails(ErrorKind.UNAVAILABLE, client.resolve("carol@example.org"))
    assert error.safe != ""

    clock.advance(60.1)  # past cache_ttl + stale_ttl
    await fails(ErrorKind.UNAVAILABLE, client.resolve("bob@example.org"))
    assert client.stats["stale"] == 2


async def test_client_never_serves_a_stale_unknown(env, clock):
    primary = await env.primary()
    rpc = env.rpc(primary)
    await populate(rpc)
    await rpc.call("alias.del", {"address": "@example.org"})
    client = env.client(primary, negative_ttl=5.0, stale_ttl=600.0, clock=clock, request_timeout=0.3)
    assert isinstance(await client.resolve("new@example.org"), Unknown)
    await primary.kill()
    clock.advance(1.0)
    assert isinstance(await client.resolve("new@example.org"), Unknown)  # fresh: from the cache
    clock.advance(4.0)
    await fails(ErrorKind.UNAVAILABLE, client.resolve("new@example.org"))
    assert client.stats["stale"] == 0


async def test_client_refuses_a_malformed_address_without_asking(env, clock):
    primary = await env.primary()
    client = env.client(primary, clock=clock)
    for bad in ("not-an-address", "bob@@example.org", "", "bob@example..org", "x" * 2000 + "@example.org"):
        await fails(ErrorKind.INVALID, client.resolve(bad))
    assert primary.calls == {}
    assert client._rpc.address is None  # not even connected


async def test_client_concurrent_lookups_of_one_address_share_one_request(env, clock):
    primary = await env.primary(serve=False)
    release = asyncio.Event()
    real_resolve = primary.service.handlers()["resolve"]

    async def slow_resolve(ctx, args):
        await release.wait()
        return await real_resolve(ctx, args)

    primary.overrides["resolve"] = slow_resolve
    await primary.serve()
    await populate(env.rpc(primary))
    client = env.client(primary, clock=clock, request_timeout=2.0)
    lookups = [asyncio.ensure_future(client.resolve(a)) for a in
               ["bob@example.org", "BOB@example.org", "bob@EXAMPLE.org", "bob@example.org", "carol@example.org"]]
    await eventually(lambda: _true(primary.calls["resolve"] == 2))
    release.set()
    results = await asyncio.gather(*lookups)
    assert results[0] == results[1] == results[2] == results[3]
    assert results[0].address == "bob@example.org" and results[4].address == "carol@example.org"
    assert primary.calls["resolve"] == 2  # one per distinct address


async def test_client_concurrent_lookups_share_a_failure(env, clock):
    port = free_port()
    client = env.client((HOST, port), clock=clock, request_timeout=0.3)
    results = await asyncio.gather(*[client.resolve("bob@example.org") for _ in range(3)],
                                   return_exceptions=True)
    assert all(isinstance(r, MailError) and r.kind is ErrorKind.UNAVAILABLE for r in results)
    assert client._inflight == {}


async def test_client_cancelling_one_lookup_does_not_cancel_the_others(env, clock):
    primary = await env.primary(serve=False)
    release = asyncio.Event()
    real_resolve = primary.service.handlers()["resolve"]

    async def slow_resolve(ctx, args):
        await release.wait()
        return await real_resolve(ctx, args)

    primary.overrides["resolve"] = slow_resolve
    await primary.serve()
    await populate(env.rpc(primary))
    client = env.client(primary, clock=clock, request_timeout=2.0)
    first = asyncio.ensure_future(client.resolve("bob@example.org"))
    await eventually(lambda: _true(primary.calls["resolve"] == 1))
    second = asyncio.ensure_future(client.resolve("bob@example.org"))
    await asyncio.sleep(0.01)
    first.cancel()
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    try:
        result = await second  # the second caller was not cancelled: it gets the answer
    except asyncio.CancelledError:
        pytest.fail("a lookup that nobody cancelled raised CancelledError")
    assert isinstance(result, Account)


async def _pair(env, overrides: dict[str, Any] | None = None) -> tuple[Dird, Dird]:
    """A primary (with these handler overrides) and a synced replica, both populated."""
    primary = await env.primary(overrides=overrides)
    replica = await env.replica(primary.address)
    seq = await populate(env.rpc(primary))
    assert await replica.follower.wait_applied(seq, SYNC_WAIT)
    return primary, replica


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_client_fails_over_when_the_first_directory_goes_away(env, clock, how):
    first, second = await _pair(env)
    client = env.client(first, second, cache_ttl=0.0, clock=clock)
    assert isinstance(await client.resolve("bob@example.org"), Account)
    assert (first.calls["resolve"], second.calls["resolve"]) == (1, 0)
    assert client._rpc.address == first.address
    if how == "stop":
        await first.stop_serving()
    else:
        await first.kill()
    assert isinstance(await client.resolve("bob@example.org"), Account)
    assert isinstance(await client.resolve("team@example.org"), AliasExpansion)
    assert (await client.authenticate("carol@example.org", "carol-password")).address == "carol@example.org"
    assert (first.calls["resolve"], second.calls["resolve"]) == (1, 2)
    assert client._rpc.address == second.address


async def test_client_demotes_a_hung_directory(env, clock):
    hung_calls = []

    async def hung_resolve(ctx, args):
        hung_calls.append(args)
        await asyncio.sleep(10)
        return {}

    first, second = await _pair(env, overrides={"resolve": hung_resolve})
    client = env.client(first, second, cache_ttl=0.0, clock=clock, request_timeout=0.3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    bob = await client.resolve("bob@example.org")
    assert isinstance(bob, Account) and bob.address == "bob@example.org"
    assert loop.time() - began < 2.0
    assert len(hung_calls) == 1 and second.calls["resolve"] == 1
    assert client.stats["failovers"] == 1
    assert client.addresses == [second.address, first.address]  # tried last from now on
    assert isinstance(await client.resolve("carol@example.org"), Account)
    assert len(hung_calls) == 1 and second.calls["resolve"] == 2


async def test_client_write_is_not_retried_elsewhere(env, clock):
    first, second = await _pair(env)
    client = env.client(first, second, clock=clock)
    answer = await client.call("domain.add", {"name": "other.test"})
    assert answer["seq"] == await first.seq()
    assert first.calls["domain.add"] == 2  # populate's and ours


# -- via DNS -------------------------------------------------------------------------------


async def _same_port_on_two_addresses(first: Dird, second: Dird) -> int:
    """Serve ``first`` on 127.0.0.1 and ``second`` on 127.0.0.2, on one port."""
    for _ in range(20):
        await first.serve()
        port = first.address[1]
        try:
            await second.serve(port, host="127.0.0.2")
            return port
        except OSError:
            await first.stop_serving()
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


async def test_client_via_dns_uses_every_a_record_and_fails_over(env, clock):
    first = await env.primary(serve=False)
    second = await env.primary("dir2", db_file="dir1.sqlite", serve=False)  # one database, two instances
    port = await _same_port_on_two_addresses(first, second)
    await populate(env.rpc(first))
    async with DnsStub({"dir.test": ["127.0.0.1", "127.0.0.2"]}, ttl=60) as stub:
        resolver = Resolver([stub.address], timeout=0.3, lifetime=0.6, clock=clock)
        client = DirectoryClient.via_dns(resolver, "dir.test", port, instance="mta-test", clock=clock,
                                         request_timeout=0.5, cache_ttl=0.0)
        env.stack.push_async_callback(client.close)

        assert isinstance(await client.resolve("bob@example.org"), Account)
        assert client.addresses == [("127.0.0.1", port), ("127.0.0.2", port)]
        assert stub.questions == [("udp", "dir.test", "A")]
        assert (first.calls["resolve"], second.calls["resolve"]) == (1, 0)

        await first.kill()
        assert isinstance(await client.resolve("carol@example.org"), Account)
        assert (first.calls["resolve"], second.calls["resolve"]) == (1, 1)
        assert stub.queries == 1  # the list is still valid: no new lookup

        # The TTL passes and the DNS server does not answer: the old list is kept.
        stub.mute = True
        clock.advance(61.0)
        assert isinstance(await client.resolve("team@example.org"), AliasExpansion)
        assert client.addresses == [("127.0.0.1", port), ("127.0.0.2", port)]
        assert stub.dropped >= 1


async def test_client_via_dns_follows_a_changed_address_list(env, clock):
    first = await env.primary(serve=False)
    second = await env.primary("dir2", db_file="dir1.sqlite", serve=False)
    port = await _same_port_on_two_addresses(first, second)
    await populate(env.rpc(first))
    async with DnsStub({"dir.test": ["127.0.0.1"]}, ttl=30) as stub:
        resolver = Resolver([stub.address], timeout=0.3, lifetime=0.6, clock=clock)
        client = DirectoryClient.via_dns(resolver, "dir.test", port, clock=clock, request_timeout=0.5,
                                         cache_ttl=0.0)
        env.stack.push_async_callback(client.close)
        await client.resolve("bob@example.org")
        assert client.addresses == [("127.0.0.1", port)]
        stub.set_a("dir.test", ["127.0.0.2", "127.0.0.1"])
        clock.advance(29.0)
        await client.resolve("bob@example.org")
        assert client.addresses == [("127.0.0.1", port)] and stub.queries == 1
        clock.advance(2.0)
        await client.resolve("bob@example.org")
        assert client.addresses == [("127.0.0.2", port), ("127.0.0.1", port)] and stub.queries == 2
        # The live connection (to 127.0.0.1) still serves; a new one walks the new order.
        await first.kill()
        await client.resolve("carol@example.org")
        assert second.calls["resolve"] == 1


async def test_client_via_dns_without_the_name_is_unavailable(env, clock):
    async with DnsStub({"other.test": ["127.0.0.1"]}) as stub:
        resolver = Resolver([stub.address], timeout=0.3, lifetime=0.6, clock=clock)
        client = DirectoryClient.via_dns(resolver, "dir.test", 7100, clock=clock, request_timeout=0.5)
        env.stack.push_async_callback(client.close)
        error = await fails(ErrorKind.UNAVAILABLE, client.resolve("bob@example.org"))
        assert error.safe == "directory not found"
        await fails(ErrorKind.INVALID, client.resolve("not an address"))  # still decided locally


# == 6. found in review: histories, a dying follow loop, uncertain forwards, login bursts ====


async def test_a_replica_refuses_a_promoted_primary_that_was_behind_it(env, tmp_path):
    """dir2 stops at seq 5, dir3 follows to 7; dir2 is promoted and writes 6..8: dir3 must not mix them."""
    primary = await env.primary()
    rpc = env.rpc(primary)
    await populate(rpc)  # seq 5
    behind = DirectoryDB(tmp_path / "behind.sqlite", replica=True)
    behind.apply_changes(primary.db.changes_since(0), primary.db.origin)
    behind.close()
    await rpc.call("domain.add", {"name": "old-a.test"})
    await rpc.call("domain.add", {"name": "old-b.test"})  # seq 7
    follower = await env.replica(primary.address, "dir3")
    assert await follower.follower.wait_applied(7, SYNC_WAIT)
    await primary.kill()
    promoted = await env.primary("dir2", db_file="behind.sqlite", port=primary.address[1])
    assert promoted.db.origin == primary.db.origin  # a promotion keeps the log's id
    via_promoted = env.rpc(promoted)
    for name in ("new-a.test", "new-b.test", "new-c.test"):
        await via_promoted.call("domain.add", {"name": name})  # seq 6, 7, 8
    deadline = asyncio.get_running_loop().time() + SYNC_WAIT
    while not follower.follower.conflict:
        assert asyncio.get_running_loop().time() < deadline, follower.follower.status()
        await asyncio.sleep(0.05)
    domains = await env.rpc(follower).call("domain.list")
    assert "old-b.test" in domains["domains"] and "new-c.test" not in domains["domains"]
    status = await env.rpc(follower).call("status")
    assert status["history_conflict"] is True and status["primary_reachable"] is False
    await fails(ErrorKind.UNAVAILABLE, env.rpc(follower).call("domain.add", {"name": "x.test"}))


async def test_a_replica_ahead_of_its_primary_stops_following(env, tmp_path):
    primary = await env.primary()
    await populate(env.rpc(primary))
    replica = await env.replica(primary.address)
    assert await replica.follower.wait_applied(5, SYNC_WAIT)
    origin = primary.db.origin
    await primary.kill()
    await primary.close()
    (tmp_path / "dir1.sqlite").rename(tmp_path / "gone.sqlite")
    # a primary restored from an older copy: the same origin, a shorter log
    old = DirectoryDB(tmp_path / "older.sqlite", replica=True)
    old.apply_changes(DirectoryDB(tmp_path / "gone.sqlite").changes_since(0, limit=3), origin)
    old.close()
    await env.primary("dir1", db_file="older.sqlite", port=primary.address[1])
    deadline = asyncio.get_running_loop().time() + SYNC_WAIT
    while not replica.follower.conflict:
        assert asyncio.get_running_loop().time() < deadline, replica.follower.status()
        await asyncio.sleep(0.05)


async def test_the_follow_loop_survives_a_database_error(env, monkeypatch):
    import sqlite3
    primary = await env.primary()
    rpc = env.rpc(primary)
    replica = await env.replica(primary.address)
    await populate(rpc)
    assert await replica.follower.wait_applied(5, SYNC_WAIT)
    real = replica.db.apply_changes
    failures = []

    def full_disk(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args, **kwargs)
    monkeypatch.setattr(replica.db, "apply_changes", full_disk)
    await rpc.call("domain.add", {"name": "later.test"})
    assert await replica.follower.wait_applied(6, SYNC_WAIT)
    assert failures == [1]
    assert (await env.rpc(replica).call("status"))["sync_error"] is None


async def test_a_forwarded_write_that_times_out_is_reported_as_uncertain(env):
    async def slow_domain_del(ctx, args):
        await asyncio.sleep(2.0)
        return {"seq": 0}
    primary = await env.primary(overrides={"domain.del": slow_domain_del})
    replica = await env.replica(primary.address)
    replica.service.primary.request_timeout = 0.3
    await populate(env.rpc(primary))
    assert await replica.follower.wait_applied(5, SYNC_WAIT)
    error = await fails(ErrorKind.UNAVAILABLE, env.rpc(replica).call("domain.del", {"name": "slow.test"}))
    assert error.safe == "lost the directory primary during the write; it may or may not have been done"


async def test_a_client_skips_a_replica_that_never_synchronised(env):
    primary = await env.primary()
    await populate(env.rpc(primary))
    lonely = await env.replica((HOST, free_port()), "dir9")  # its primary is nowhere
    client = env.client(lonely, primary)
    assert isinstance(await client.resolve("bob@example.org"), Account)
    assert client.stats["failovers"] == 1
    await client.authenticate("bob@example.org", "bob-password")


async def test_a_burst_of_parallel_guesses_is_capped(env, clock):
    primary = await env.primary(throttle=AuthThrottle(user_failures=5, ip_failures=0, window=300.0, clock=clock),
                                max_user_attempts=2)
    rpc = env.rpc(primary)
    await populate(rpc)
    verifies = 0
    real = primary.service.hashing.averify

    async def counted(stored, password):
        nonlocal verifies
        verifies += 1
        await asyncio.sleep(0.05)
        return await real(stored, password)
    primary.service.hashing.averify = counted
    results = await asyncio.gather(*(auth(rpc, "bob@example.org", f"guess-{i}") for i in range(200)),
                                   return_exceptions=True)
    kinds = collections.Counter(r.kind for r in results if isinstance(r, MailError))
    assert kinds[ErrorKind.PERM] == verifies
    assert verifies <= 5 + 2  # the limit, plus what was in flight when it was reached
    assert kinds[ErrorKind.LIMIT] == 200 - verifies


def test_a_malformed_change_never_logs_its_payload(tmp_path):
    from intermail.directory.db import Change
    replica = DirectoryDB(tmp_path / "r.sqlite", replica=True)
    secret_hash = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
    bad = Change(1, "user.add", {"address": "x@nowhere.test", "domain": "nowhere.test",
                                  "password_hash": secret_hash, "status": "active", "quota_bytes": 0,
                                  "mss": "mss1", "created": 0.0})
    with pytest.raises(MailError) as refused:
        replica.apply_changes([bad], "origin")
    assert secret_hash not in (refused.value.detail or "") and "seq 1 op user.add" in refused.value.detail
