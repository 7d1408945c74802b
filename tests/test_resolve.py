"""intermail.resolve against a real DNS server (intermail.testing.dnsstub) on loopback.

Every scenario runs on a fresh loop of each kind we support (asyncio, and
uvloop when installed), with a hard deadline so a bug hangs nothing.  Cache
time is a fake clock the test moves; network timeouts are real but short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.resolver
import pytest

from intermail.errors import ErrorKind, MailError
from intermail.resolve import Answer, Resolver
from intermail.testing.dnsstub import DnsStub
from intermail.testing.loops import run_bounded
from intermail.testing.clock import FakeClock

DEADLINE = 20.0


def run(loop_name, scenario):
    return run_bounded(loop_name, scenario, DEADLINE)


@contextlib.asynccontextmanager
async def serving(*stubs: DnsStub):
    """Start each stub on loopback, port 0; yield their addresses; stop them all."""
    try:
        yield [await stub.start() for stub in stubs]
    finally:
        for stub in stubs:
            stub.stop()


async def expect_error(kind: ErrorKind, awaitable) -> MailError:
    with pytest.raises(MailError) as info:
        await awaitable
    assert info.value.kind is kind, info.value
    return info.value


# -- A records ------------------------------------------------------------------


def test_a_lookup_keeps_the_servers_order(loop_name):
    stub = DnsStub({"mx1.example.test": ["192.0.2.3", "192.0.2.1", "192.0.2.2"]}, ttl=120)
    clock = FakeClock()

    async def scenario():
        async with serving(stub) as servers:
            answer = await Resolver(servers, clock=clock).addresses("mx1.example.test")
        assert answer == Answer(("192.0.2.3", "192.0.2.1", "192.0.2.2"), ttl=120.0, expires=clock.now + 120)
        assert stub.questions == [("udp", "mx1.example.test", "A")]

    run(loop_name, scenario)


def test_rotation_by_the_server_is_passed_on(loop_name):
    stub = DnsStub({"pool.test": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}, rotate=True)

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers)
            first = await resolver.addresses("pool.test")
            resolver.invalidate("pool.test")
            second = await resolver.addresses("POOL.test.")
        assert first.addresses == ("10.0.0.1", "10.0.0.2", "10.0.0.3")
        assert second.addresses == ("10.0.0.2", "10.0.0.3", "10.0.0.1")

    run(loop_name, scenario)


def test_cache_hit_then_expiry(loop_name):
    stub = DnsStub({"host.test": ["192.0.2.1"]}, ttl=60)
    clock = FakeClock()

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, clock=clock)
            first = await resolver.addresses("host.test")
            clock.advance(59)
            stub.set_a("host.test", ["192.0.2.2"])
            assert await resolver.addresses("host.test") == first
            assert await resolver.addresses("HOST.TEST.") == first  # one entry whatever the spelling
            assert stub.queries == 1
            clock.advance(2)
            renewed = await resolver.addresses("host.test")
            assert stub.queries == 2
        assert renewed.addresses == ("192.0.2.2",)
        assert renewed.expires == clock.now + 60

    run(loop_name, scenario)


def test_nxdomain_is_notfound_and_negatively_cached(loop_name):
    stub = DnsStub({"host.test": ["192.0.2.1"]})
    clock = FakeClock()

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, clock=clock)
            error = await expect_error(ErrorKind.NOTFOUND, resolver.addresses("nowhere.test"))
            assert "NXDOMAIN" in error.detail and "nowhere.test" not in error.safe
            clock.advance(4.9)
            stub.set_a("nowhere.test", ["192.0.2.9"])
            await expect_error(ErrorKind.NOTFOUND, resolver.addresses("nowhere.test"))
            assert stub.queries == 1
            clock.advance(0.2)  # past the 5 s default without an SOA
            assert (await resolver.addresses("nowhere.test")).addresses == ("192.0.2.9",)
            assert stub.queries == 2

    run(loop_name, scenario)


def test_negative_ttl_comes_from_the_soa_minimum(loop_name):
    stub = DnsStub({"nodata.example.test": []}, negative_ttl=30, zone="example.test.")
    clock = FakeClock()

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, clock=clock)
            await expect_error(ErrorKind.NOTFOUND, resolver.addresses("gone.example.test"))
            await expect_error(ErrorKind.NOTFOUND, resolver.addresses("nodata.example.test"))
            clock.advance(29)
            await expect_error(ErrorKind.NOTFOUND, resolver.addresses("gone.example.test"))
            assert stub.queries == 2
            clock.advance(2)
            await expect_error(ErrorKind.NOTFOUND, resolver.addresses("gone.example.test"))
            assert stub.queries == 3

    run(loop_name, scenario)


def test_nodata_is_notfound(loop_name):
    stub = DnsStub({"v6only.test": ["2001:db8::1"], "empty.test": []})

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers)
            error = await expect_error(ErrorKind.NOTFOUND, resolver.addresses("v6only.test"))
            assert "no A records" in error.detail
            await expect_error(ErrorKind.NOTFOUND, resolver.addresses("empty.test"))
            answer = await resolver.addresses("v6only.test", want_ipv6=True)
        assert answer.addresses == ("2001:db8::1",)

    run(loop_name, scenario)


def test_want_ipv6_gives_ipv4_then_ipv6(loop_name):
    stub = DnsStub({"dual.test": ["2001:db8::7", "192.0.2.7", "2001:db8::8", "192.0.2.8"]})

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers)
            answer = await resolver.addresses("dual.test", want_ipv6=True)
            assert (await resolver.addresses("dual.test")).addresses == ("192.0.2.7", "192.0.2.8")
        assert answer.addresses == ("192.0.2.7", "192.0.2.8", "2001:db8::7", "2001:db8::8")
        assert sorted(q[2] for q in stub.questions) == ["A", "AAAA"]

    run(loop_name, scenario)


def test_cname_is_followed_with_the_smallest_ttl(loop_name):
    stub = DnsStub({"real.test": ["192.0.2.5"]}, cname={"alias.test": "real.test"}, ttl=300)
    stub.set_a("real.test", ["192.0.2.5"], ttl=40)

    async def scenario():
        async with serving(stub) as servers:
            answer = await Resolver(servers).addresses("alias.test")
        assert answer.addresses == ("192.0.2.5",)
        assert answer.ttl == 40

    run(loop_name, scenario)


def test_concurrent_lookups_share_one_query(loop_name):
    stub = DnsStub({"busy.test": ["192.0.2.1"]})

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers)
            answers = await asyncio.gather(*(resolver.addresses("busy.test") for _ in range(10)))
        assert {answer.addresses for answer in answers} == {("192.0.2.1",)}
        assert stub.queries == 1

    run(loop_name, scenario)


def test_truncated_udp_answer_is_asked_again_over_tcp(loop_name):
    many = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(150)]  # ~2.4 kB: above the 1232 EDNS payload
    stub = DnsStub({"big.test": many})

    async def scenario():
        async with serving(stub) as servers:
            answer = await Resolver(servers).addresses("big.test")
        assert answer.addresses == tuple(many)
        assert stub.truncated == 1 and stub.tcp_queries == 1
        assert [q[0] for q in stub.questions] == ["udp", "tcp"]

    run(loop_name, scenario)


def test_stub_truncates_at_512_bytes_without_edns(loop_name):
    stub = DnsStub({"mid.test": [f"10.2.0.{i}" for i in range(1, 41)]})  # ~700 bytes

    async def scenario():
        async with serving(stub) as servers:
            host, port = servers[0]
            plain = dns.message.make_query("mid.test", "A")
            reply = await dns.asyncquery.udp(plain, host, port=port, timeout=2)
            assert reply.flags & dns.flags.TC and not reply.answer
            edns = dns.message.make_query("mid.test", "A", use_edns=0, payload=1232)
            reply = await dns.asyncquery.udp(edns, host, port=port, timeout=2)
            assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 40

    run(loop_name, scenario)


def test_cache_is_bounded_least_recently_used_first(loop_name):
    stub = DnsStub({f"h{i}.test": [f"192.0.2.{i}"] for i in range(1, 4)})

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, cache_max=2)
            await resolver.addresses("h1.test")
            await resolver.addresses("h2.test")
            await resolver.addresses("h1.test")  # h1 is now the most recently used
            await resolver.addresses("h3.test")  # evicts h2
            assert resolver.cache_size == 2 and stub.queries == 3
            await resolver.addresses("h1.test")
            await resolver.addresses("h3.test")
            assert stub.queries == 3
            await resolver.addresses("h2.test")
            assert stub.queries == 4 and resolver.cache_size == 2

    run(loop_name, scenario)


def test_invalid_names_are_refused_without_a_query(loop_name):
    stub = DnsStub()

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers)
            for bad in ["", ".", "a..b", " x.test", "x y.test", "x" * 64 + ".test"]:
                await expect_error(ErrorKind.INVALID, resolver.addresses(bad))
            await expect_error(ErrorKind.INVALID, resolver.mx("a..b"))
        assert stub.queries == 0

    run(loop_name, scenario)


# -- failures and failover ------------------------------------------------------


def test_muted_server_is_unavailable_within_the_lifetime(loop_name, caplog):
    stub = DnsStub({"host.test": ["192.0.2.1"]})
    stub.mute = True

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, timeout=0.2, lifetime=0.6)
            started = time.monotonic()
            error = await expect_error(ErrorKind.UNAVAILABLE, resolver.addresses("host.test"))
            elapsed = time.monotonic() - started
        assert 0.55 <= elapsed < 1.0, elapsed
        assert "timeout" in error.detail
        assert stub.dropped >= 2  # asked again after the first timeout

    with caplog.at_level(logging.INFO, logger="intermail.resolve"):
        run(loop_name, scenario)
    events = [record.im_event for record in caplog.records]
    assert events.count("resolve.server_down") == 1
    assert events.count("resolve.unavailable") == 1


def test_unavailable_is_not_cached(loop_name):
    stub = DnsStub({"host.test": ["192.0.2.1"]})
    stub.mute = True

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, timeout=0.1, lifetime=0.2)
            await expect_error(ErrorKind.UNAVAILABLE, resolver.addresses("host.test"))
            stub.mute = False
            assert (await resolver.addresses("host.test")).addresses == ("192.0.2.1",)

    run(loop_name, scenario)


def test_stale_answer_only_with_allow_stale(loop_name, caplog):
    stub = DnsStub({"host.test": ["192.0.2.1"]}, mx={"example.test": [(10, "host.test")]}, ttl=60)
    clock = FakeClock()

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, clock=clock, timeout=0.1, lifetime=0.2, max_stale=3600)
            fresh = await resolver.addresses("host.test")
            assert await resolver.mx("example.test") == [(10, "host.test")]
            stub.mute = True
            clock.advance(61)
            await expect_error(ErrorKind.UNAVAILABLE, resolver.addresses("host.test"))
            stale = await resolver.addresses("host.test", allow_stale=True)
            assert stale == Answer(fresh.addresses, fresh.ttl, fresh.expires, stale=True)
            assert await resolver.mx("example.test", allow_stale=True) == [(10, "host.test")]
            clock.advance(3600)  # now more than max_stale past expiry
            await expect_error(ErrorKind.UNAVAILABLE, resolver.addresses("host.test", allow_stale=True))
            await expect_error(ErrorKind.UNAVAILABLE, resolver.addresses("never-seen.test", allow_stale=True))

    with caplog.at_level(logging.INFO, logger="intermail.resolve"):
        run(loop_name, scenario)
    assert [r.im_event for r in caplog.records].count("resolve.stale_answer") == 2


def test_first_nameserver_muted_second_answers_and_first_is_held_down(loop_name, caplog):
    dead = DnsStub({"host.test": ["192.0.2.66"], "other.test": ["192.0.2.67"]})
    dead.mute = True
    alive = DnsStub({"host.test": ["192.0.2.1"], "other.test": ["192.0.2.2"]})
    clock = FakeClock()

    async def scenario():
        async with serving(dead, alive) as servers:
            resolver = Resolver(servers, timeout=0.3, lifetime=3, clock=clock, holddown=30)
            started = time.monotonic()
            answer = await resolver.addresses("host.test")
            assert time.monotonic() - started >= 0.3
            assert answer.addresses == ("192.0.2.1",) and dead.dropped == 1
            started = time.monotonic()
            assert (await resolver.addresses("other.test")).addresses == ("192.0.2.2",)
            assert time.monotonic() - started < 0.3 and dead.dropped == 1  # held down: asked last
            dead.mute = False
            clock.advance(31)  # hold-down over: the first server is first again
            assert (await resolver.addresses("host.test")).addresses == ("192.0.2.1",)  # cached
            resolver.invalidate("host.test")
            assert (await resolver.addresses("host.test")).addresses == ("192.0.2.66",)

    with caplog.at_level(logging.INFO, logger="intermail.resolve"):
        run(loop_name, scenario)
    events = [record.im_event for record in caplog.records]
    assert events.count("resolve.server_down") == 1 and events.count("resolve.server_up") == 1


def test_stopped_nameserver_fails_over_at_once(loop_name):
    gone = DnsStub()
    alive = DnsStub({"host.test": ["192.0.2.1"]})

    async def scenario():
        async with serving(gone, alive) as servers:
            gone.stop()  # the port is closed: the kernel refuses at once
            resolver = Resolver(servers, timeout=1.5, lifetime=3)
            started = time.monotonic()
            answer = await resolver.addresses("host.test")
            assert time.monotonic() - started < 1.0  # no wait for the timeout
        assert answer.addresses == ("192.0.2.1",)

    run(loop_name, scenario)


def test_servfail_tries_the_next_server_then_gives_up_quickly(loop_name):
    failing = DnsStub({"host.test": ["192.0.2.66"]})
    failing.set_rcode("host.test", dns.rcode.SERVFAIL)
    alive = DnsStub({"host.test": ["192.0.2.1"]})

    async def scenario():
        async with serving(failing, alive) as servers:
            assert (await Resolver(servers).addresses("host.test")).addresses == ("192.0.2.1",)
            alive.set_rcode("host.test", dns.rcode.REFUSED)
            started = time.monotonic()
            error = await expect_error(ErrorKind.UNAVAILABLE, Resolver(servers, lifetime=5).addresses("host.test"))
            assert time.monotonic() - started < 1.0  # an error rcode is not retried in the lookup
        assert "SERVFAIL" in error.detail and "REFUSED" in error.detail
        assert failing.queries == 2 and alive.queries == 2

    run(loop_name, scenario)


# -- MX -------------------------------------------------------------------------


def test_mx_sorted_by_preference_equal_ones_in_server_order(loop_name):
    stub = DnsStub(mx={"example.test": [(20, "mx3.example.test"), (10, "MX1.example.test"),
                                        (20, "mx2.example.test"), (5, "mx0.example.test.")]})
    clock = FakeClock()

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, clock=clock)
            first = await resolver.mx("example.test")
            first.append((99, "caller.mutates.test"))
            second = await resolver.mx("Example.Test.")
        assert second == [(5, "mx0.example.test"), (10, "mx1.example.test"),
                          (20, "mx3.example.test"), (20, "mx2.example.test")]
        assert stub.queries == 1

    run(loop_name, scenario)


def test_implicit_mx_when_the_domain_has_none(loop_name):
    stub = DnsStub({"plain.test": ["192.0.2.1"], "target.test": ["192.0.2.2"]},
                   cname={"alias.test": "target.test"})

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers)
            assert await resolver.mx("plain.test") == [(0, "plain.test")]
            assert await resolver.mx("alias.test") == [(0, "target.test")]  # RFC 5321 5.1: after CNAME
            await expect_error(ErrorKind.NOTFOUND, resolver.mx("nowhere.test"))

    run(loop_name, scenario)


def test_null_mx_is_perm_and_cached(loop_name):
    stub = DnsStub({"nomail.test": ["192.0.2.1"]}, mx={"nomail.test": [(0, ".")]})

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers)
            error = await expect_error(ErrorKind.PERM, resolver.mx("nomail.test"))
            assert "null MX" in error.detail
            await expect_error(ErrorKind.PERM, resolver.mx("nomail.test", allow_stale=True))
            assert stub.queries == 1
            assert not error.temporary

    run(loop_name, scenario)


def test_mx_failure_maps_like_addresses(loop_name):
    stub = DnsStub(mx={"example.test": [(10, "mx.example.test")]})
    stub.mute = True

    async def scenario():
        async with serving(stub) as servers:
            resolver = Resolver(servers, timeout=0.1, lifetime=0.2)
            await expect_error(ErrorKind.UNAVAILABLE, resolver.mx("example.test"))

    run(loop_name, scenario)


# -- construction ---------------------------------------------------------------


def test_nameservers_are_checked():
    for bad in ([], [("dns.example", 53)], [("127.0.0.1", 0)], [("127.0.0.1", True)], [("127.0.0.1", 70000)]):
        with pytest.raises(ValueError):
            Resolver(bad)
    with pytest.raises(ValueError):
        Resolver([("127.0.0.1", 53)], timeout=0)
    assert Resolver([("127.0.0.1", 5353), ("::1", 53)]).nameservers == (("127.0.0.1", 5353), ("::1", 53))


def test_system_configuration_is_read_with_ports(tmp_path, monkeypatch):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver ::1\n")
    real = dns.resolver.Resolver
    monkeypatch.setattr(dns.resolver, "Resolver", lambda configure=True: real(filename=str(conf)))
    assert Resolver().nameservers == (("127.0.0.53", 53), ("::1", 53))
    conf.write_text("search example.test\n")
    with pytest.raises(MailError) as info:
        Resolver()
    assert info.value.kind is ErrorKind.UNAVAILABLE
