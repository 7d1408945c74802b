"""The directory as real processes: a primary and two replicas of ``services.dird`` on loopback.

Provisioning goes through the ``intermail`` CLI, lookups and logins through
:class:`DirectoryClient`; failures are real SIGKILLs and SIGSTOPs.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intermail.directory.client import DirectoryClient
from intermail.directory.db import Account, AliasExpansion, Unknown
from intermail.directory.service import PRIMARY_DOWN
from intermail.errors import ErrorKind, MailError
from intermail.rpc.client import RpcClient
from intermail.testing.procs import TestCluster, free_port, loopback_address

pytestmark = pytest.mark.timeout(240)

CHEAP = {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1,
         "replica_poll_interval": 0.5, "request_timeout": 2.0, "write_wait": 5.0}


def make_cluster(path: Path, **directory: object) -> TestCluster:
    cluster = TestCluster(path, sections={"directory": {**CHEAP, **directory}, "log": {"level": "INFO"}})
    # Every directory instance on its own address and one shared port, as in
    # a real cluster where `dir.<zone>` lists the addresses.
    addresses = [loopback_address() for _ in range(3)]
    port = free_port(addresses[0])
    for n, (address, role) in enumerate(zip(addresses, ("primary", "replica", "replica"), strict=True)):
        cluster.add(f"dir{n + 1}", "directory", role=role, address=address, ports={"rpc": port, "metrics": 0})
    cluster.add("mss1", "mss", identity="mss1", ports={"lmtp": 0})
    cluster.add("mss2", "mss", identity="mss2", ports={"lmtp": 0})
    cluster.write()
    return cluster


@pytest.fixture
def cluster(tmp_path: Path):
    c = make_cluster(tmp_path / "data")
    for name in ("dir1", "dir2", "dir3"):
        c.start(name)
    for name in ("dir1", "dir2", "dir3"):
        c.procs[name].wait_ready()
    yield c
    c.stop_all()


def cli(cluster: TestCluster, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                          capture_output=True, text=True, input=stdin, timeout=60)


def client_of(cluster: TestCluster, *names: str, **kwargs) -> DirectoryClient:
    addresses = [cluster.address(n, "rpc") for n in names]

    async def fixed():
        return addresses, float("inf")
    return DirectoryClient(fixed, addresses, request_timeout=kwargs.pop("request_timeout", 2.0), **kwargs)


async def status(cluster: TestCluster, name: str) -> dict:
    async with RpcClient([cluster.address(name, "rpc")], reconnect_window=1.0) as rpc:
        return await rpc.call("status", idempotent=True)


async def wait_caught_up(cluster: TestCluster, names: list[str], seq: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for name in names:
        while (await status(cluster, name))["last_seq"] < seq:
            assert time.monotonic() < deadline, f"{name} did not reach seq {seq}"
            await asyncio.sleep(0.05)


def provision(cluster: TestCluster) -> None:
    for argv in (("domain", "add", "example.org"),
                 ("user", "add", "Bob@Example.org", "--password", "bob-pw"),
                 ("user", "add", "alice@example.org", "--password", "alice-pw", "--quota", "1G"),
                 ("user", "add", "carol@example.org", "--mss", "mss2", "--password", "carol-pw"),
                 ("alias", "add", "team@example.org", "bob@example.org", "alice@example.org",
                  "friend@elsewhere.net"),
                 ("alias", "add", "@example.org", "carol@example.org")):
        done = cli(cluster, *argv)
        assert done.returncode == 0, (argv, done.stderr)


# -- 1. provision through the CLI, use through the client ------------------------------


def test_provision_with_the_cli_then_resolve_and_authenticate_on_every_instance(cluster):
    provision(cluster)
    listed = cli(cluster, "user", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    import json
    accounts = {a["address"]: a for a in json.loads(listed.stdout)["accounts"]}
    assert set(accounts) == {"alice@example.org", "bob@example.org", "carol@example.org"}
    # placement: bob and alice spread over the two stores, carol where she was put
    assert {accounts["bob@example.org"]["mss"], accounts["alice@example.org"]["mss"]} == {"mss1", "mss2"}
    assert accounts["carol@example.org"]["mss"] == "mss2"
    assert accounts["alice@example.org"]["quota_bytes"] == 1 << 30
    assert cli(cluster, "domain", "add", "example.org").stderr.strip() == "intermail: domain already exists"
    # password from stdin, as a script would give it
    assert cli(cluster, "user", "passwd", "carol@example.org", stdin="new-carol\n").returncode == 0

    async def check() -> None:
        seq = (await status(cluster, "dir1"))["last_seq"]
        await wait_caught_up(cluster, ["dir2", "dir3"], seq)
        for name in ("dir1", "dir2", "dir3"):
            async with client_of(cluster, name) as client:
                team = await client.resolve("TEAM@example.ORG")
                assert isinstance(team, AliasExpansion)
                assert [a.address for a in team.accounts] == ["bob@example.org", "alice@example.org"]
                assert team.remote == ("friend@elsewhere.net",)
                caught = await client.resolve("whoever@example.org")
                assert isinstance(caught, AliasExpansion) and caught.via_catch_all
                assert isinstance(await client.resolve("x@not-hosted.org"), Unknown)
                bob = await client.authenticate("bob@example.org", "bob-pw")
                assert isinstance(bob, Account) and bob.address == "bob@example.org"
                await client.authenticate("carol@example.org", "new-carol")
                with pytest.raises(MailError) as refused:
                    await client.authenticate("carol@example.org", "carol-pw")
                assert refused.value.kind is ErrorKind.PERM
                assert refused.value.safe == "authentication failed"
    asyncio.run(check())


def test_the_client_finds_every_directory_through_dns(cluster):
    from intermail.resolve import Resolver
    from intermail.testing.dnsstub import DnsStub
    provision(cluster)

    async def check() -> None:
        port = cluster.address("dir1", "rpc")[1]
        dead = loopback_address()  # nobody listens there: refused, next address
        listed = [dead, cluster.address("dir2", "rpc")[0], cluster.address("dir3", "rpc")[0]]
        stub = DnsStub({"dir.intermail.test": listed})
        host, dns_port = await stub.start("127.0.0.1", 0)
        try:
            resolver = Resolver([(host, dns_port)])
            async with DirectoryClient.via_dns(resolver, "dir.intermail.test", port,
                                               request_timeout=2.0) as client:
                assert isinstance(await client.resolve("bob@example.org"), Account)
                assert client.addresses == [(a, port) for a in listed]
                await client.authenticate("bob@example.org", "bob-pw")
        finally:
            stub.stop()
    asyncio.run(check())


# -- 2. the primary dies and comes back --------------------------------------------------


def test_killing_the_primary_under_writes_loses_no_acknowledged_write(cluster):
    provision(cluster)
    rng = random.Random(int(os.environ.get("INTERMAIL_CRASH_SEED", "0")) or None)
    acknowledged: list[str] = []
    uncertain: list[str] = []

    async def writer(client: DirectoryClient, stop: asyncio.Event, prefix: str) -> None:
        i = 0
        while not stop.is_set():
            address = f"{prefix}{i}@example.org"
            i += 1
            try:
                await client.call("user.add", {"address": address, "password": "pw"})
                acknowledged.append(address)
            except MailError as exc:
                if exc.kind is ErrorKind.EXISTS:  # a retried write that had run
                    acknowledged.append(address)
                else:
                    assert exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TEMP), exc
                    uncertain.append(address)
                    await asyncio.sleep(0.05)

    async def scenario() -> None:
        for cycle in range(3):
            stop = asyncio.Event()
            clients = [client_of(cluster, "dir1", "dir2"), client_of(cluster, "dir2", "dir3"),
                       client_of(cluster, "dir3", "dir1")]
            tasks = [asyncio.create_task(writer(c, stop, f"c{cycle}w{n}u")) for n, c in enumerate(clients)]
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            cluster.procs["dir1"].kill()
            # Replicas keep serving lookups and logins; writes are refused clearly.
            for name in ("dir2", "dir3"):
                async with client_of(cluster, name) as reader:
                    assert isinstance(await reader.resolve("bob@example.org"), Account)
                    await reader.authenticate("alice@example.org", "alice-pw")
                    with pytest.raises(MailError) as refused:
                        await reader.call("domain.add", {"name": f"new{cycle}.org"})
                    assert refused.value.kind is ErrorKind.UNAVAILABLE
                    assert refused.value.safe == PRIMARY_DOWN
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            cluster.procs["dir1"].start().wait_ready()
            await asyncio.sleep(rng.uniform(0.2, 0.5))
            stop.set()
            await asyncio.gather(*tasks)
            for c in clients:
                await c.close()
        primary_seq = (await status(cluster, "dir1"))["last_seq"]
        await wait_caught_up(cluster, ["dir2", "dir3"], primary_seq)
        assert len(acknowledged) > 20, "the writers barely ran"
        for name in ("dir1", "dir2", "dir3"):
            async with client_of(cluster, name) as reader:
                users = {a["address"] for a in (await reader.call("user.list", {"domain": "example.org"}))["accounts"]}
                missing = [a for a in acknowledged if a not in users]
                assert not missing, f"{name} lost acknowledged writes: {missing[:5]}"
                # an uncertain write either happened or did not: nothing else exists
                extra = users - set(acknowledged) - set(uncertain) - {
                    "alice@example.org", "bob@example.org", "carol@example.org"}
                assert not extra, f"{name} has writes nobody made: {sorted(extra)[:5]}"
        # every replica holds exactly the primary's change log
        statuses = [await status(cluster, n) for n in ("dir1", "dir2", "dir3")]
        assert len({(s["origin"], s["last_seq"]) for s in statuses}) == 1
    asyncio.run(scenario())


def test_cli_writes_fail_clearly_while_the_primary_is_down(cluster):
    provision(cluster)
    cluster.procs["dir1"].kill()
    done = cli(cluster, "user", "add", "dave@example.org", "--password", "pw", "--timeout", "3")
    assert done.returncode == 3
    assert done.stderr.strip() == f"intermail: {PRIMARY_DOWN}"
    shown = cli(cluster, "user", "show", "bob@example.org")
    assert shown.returncode == 0 and "mss" in shown.stdout


def test_a_replica_restarted_while_the_primary_is_down_serves_what_it_had_then_catches_up(cluster):
    provision(cluster)

    async def scenario() -> None:
        seq = (await status(cluster, "dir1"))["last_seq"]
        await wait_caught_up(cluster, ["dir2"], seq)
        cluster.procs["dir2"].kill()
        async with client_of(cluster, "dir1") as primary:
            await primary.call("user.add", {"address": "late@example.org", "password": "pw"})
        cluster.procs["dir1"].kill()
        cluster.procs["dir2"].start().wait_ready()
        async with client_of(cluster, "dir2") as replica:
            assert isinstance(await replica.resolve("bob@example.org"), Account)
            assert isinstance(await replica.resolve("late@example.org"), AliasExpansion)  # not yet: catch-all
            cluster.procs["dir1"].start().wait_ready()
            await wait_caught_up(cluster, ["dir2"], seq + 1)
            replica.invalidate()
            assert isinstance(await replica.resolve("late@example.org"), Account)
    asyncio.run(scenario())


# -- 3. a replica dies ----------------------------------------------------------------------


def test_lookups_keep_succeeding_when_a_replica_is_killed(cluster):
    provision(cluster)

    async def scenario() -> float:
        seq = (await status(cluster, "dir1"))["last_seq"]
        await wait_caught_up(cluster, ["dir2", "dir3"], seq)
        async with client_of(cluster, "dir2", "dir3", "dir1", cache_ttl=0) as client:
            assert isinstance(await client.resolve("bob@example.org"), Account)
            failures = 0
            killed_at = None
            gap = None
            for i in range(400):
                if i == 100:
                    cluster.procs["dir2"].kill()
                    killed_at = time.perf_counter()
                try:
                    assert isinstance(await client.resolve("bob@example.org"), Account)
                except MailError:
                    failures += 1
                if killed_at is not None and gap is None:
                    gap = time.perf_counter() - killed_at
            assert failures == 0
            assert client.addresses[0] != cluster.address("dir2", "rpc") or client._rpc.address != \
                cluster.address("dir2", "rpc")
            return gap
    gap = asyncio.run(scenario())
    print(f"failover after SIGKILL of a replica: first lookup answered {gap * 1000:.1f} ms after the kill")


def test_a_hung_replica_is_given_up_after_the_request_timeout(cluster):
    provision(cluster)

    async def scenario() -> float:
        seq = (await status(cluster, "dir1"))["last_seq"]
        await wait_caught_up(cluster, ["dir2", "dir3"], seq)
        async with client_of(cluster, "dir2", "dir3", cache_ttl=0, request_timeout=1.0) as client:
            assert isinstance(await client.resolve("bob@example.org"), Account)
            os.kill(cluster.procs["dir2"].proc.pid, signal.SIGSTOP)
            try:
                began = time.perf_counter()
                assert isinstance(await client.resolve("bob@example.org"), Account)
                took = time.perf_counter() - began
                assert client.stats["failovers"] == 1
                assert isinstance(await client.resolve("alice@example.org"), Account)
            finally:
                os.kill(cluster.procs["dir2"].proc.pid, signal.SIGCONT)
            return took
    took = asyncio.run(scenario())
    print(f"failover from a stopped replica: {took * 1000:.0f} ms (request_timeout 1 s)")


# -- 4. bad input ----------------------------------------------------------------------------


def test_bad_requests_get_clear_errors_and_write_nothing(cluster):
    provision(cluster)

    async def scenario() -> None:
        before = (await status(cluster, "dir1"))["last_seq"]
        async with RpcClient([cluster.address("dir2", "rpc")]) as rpc:
            cases = [
                ("no.such.method", {}, ErrorKind.INVALID, "unknown method"),
                ("user.add", {"address": "bad address@example.org", "password": "x"}, ErrorKind.INVALID, None),
                ("user.add", {"address": "a@example.org"}, ErrorKind.INVALID, "missing argument 'password'"),
                ("user.add", {"address": "a@example.org", "password": "x", "quota": "big"},
                 ErrorKind.INVALID, None),
                ("user.add", {"address": "a@example.org", "password": "x", "colour": "red"},
                 ErrorKind.INVALID, "unknown argument 'colour'"),
                ("user.add", {"address": "a" * 5000 + "@example.org", "password": "x"}, ErrorKind.LIMIT, None),
                ("domain.add", {"name": "-bad-.org"}, ErrorKind.INVALID, None),
                ("domain.add", {"name": 7}, ErrorKind.INVALID, "argument 'name' must be text"),
                ("resolve", {"address": "<@a,@b:x@example.org>"}, ErrorKind.INVALID, None),
                ("resolve", {"address": ["x"]}, ErrorKind.INVALID, None),
                ("alias.add", {"address": "l@example.org", "targets": []}, ErrorKind.INVALID, None),
                ("authenticate", {"user": "bob@example.org", "password": "p" * 5000}, ErrorKind.LIMIT, None),
                ("changes", {"since": -1}, ErrorKind.INVALID, None),
            ]
            for method, args, kind, text in cases:
                with pytest.raises(MailError) as refused:
                    await rpc.call(method, args)
                assert refused.value.kind is kind, (method, args, refused.value)
                if text is not None:
                    assert refused.value.safe == text
        # garbage on the wire: the connection is dropped, the server carries on
        for name in ("dir1", "dir2"):
            for junk in (b"\x00" * 64, os.urandom(4096), b"GET / HTTP/1.0\r\n\r\n", b"\xff\xff\xff\xff" + b"x" * 100):
                with socket.create_connection(cluster.address(name, "rpc"), timeout=5) as sock:
                    sock.sendall(junk)
                    sock.settimeout(5)
                    try:
                        while sock.recv(65536):
                            pass
                    except (ConnectionResetError, TimeoutError):
                        pass
            assert cluster.procs[name].alive
        assert (await status(cluster, "dir1"))["last_seq"] == before
        async with client_of(cluster, "dir2") as client:
            assert isinstance(await client.resolve("bob@example.org"), Account)
    asyncio.run(scenario())
    bad = cli(cluster, "user", "add", "not an address", "--password", "x")
    assert bad.returncode == 1 and bad.stderr.startswith("intermail: ")


def test_health_and_metrics_endpoints(cluster):
    import json
    import urllib.request
    provision(cluster)
    host, port = cluster.address("dir2", "metrics")
    health = json.loads(urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5).read())
    assert health["status"] == "ok" and health["role"] == "replica" and health["kind"] == "directory"
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    assert "intermail_directory_change_seq" in text
    cluster.procs["dir1"].kill()
    deadline = time.monotonic() + 20
    while True:
        health = json.loads(urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5).read())
        if health["warnings"]:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health["status"] == "ok" and "primary unreachable" in health["warnings"][0]


def test_a_primary_that_lost_its_database_refuses_to_start_empty(cluster):
    provision(cluster)
    cluster.procs["dir1"].kill()
    db = cluster.data / "dir1" / "directory.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with pytest.raises(RuntimeError) as refused:
        cluster.procs["dir1"].start().wait_ready()
    assert "--init" in str(refused.value)

    async def replicas_still_answer() -> None:
        async with client_of(cluster, "dir2", "dir3") as client:
            assert isinstance(await client.resolve("bob@example.org"), Account)
    asyncio.run(replicas_still_answer())
