"""dnsd, the cluster's authoritative DNS server: zone, answers, RFC 2136 updates, and the real process.

Layers:

- the zone (:mod:`intermail.dns.zone`): built from a Config, edited, saved
  and loaded again;
- the sans-I/O authority (:mod:`intermail.dns.server`), driven with wire
  bytes: rotation, REFUSED, NXDOMAIN/NODATA, truncation, updates with
  prerequisites and TSIG, and a hypothesis fuzz test;
- the listeners on real loopback sockets in-process, with dnspython's
  client, our Resolver and the update client (:mod:`intermail.dns.update`);
- ``python -m services.dnsd`` started by TestCluster and driven with
  ``dig`` and ``nsupdate`` (BIND's own clients), SIGKILLed and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import time
import unittest.mock
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.tsig
import dns.update
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.apps.dns import DnsApp
from intermail.config import ClusterConfig, Config, ConfigError, DnsConfig, InstanceConfig, from_dict
from intermail.dns.listeners import DnsServer
from intermail.dns.server import Authority, ZoneChange
from intermail.dns.tsig import (
    TsigKey,
    create_key_file,
    format_key,
    key_file_path,
    load_key,
    parse_key,
    read_key_file,
)
from intermail.dns.update import Membership, PrerequisiteFailed, addresses, membership_from_config, update
from intermail.dns.zone import (
    RecordSet,
    Zone,
    load_zone,
    next_serial,
    save_zone,
    serial_after,
    zone_file_path,
    zone_from_config,
)
from intermail.errors import ErrorKind, MailError
from intermail.net.runner import EXIT_START_FAILED, Runner
from intermail.resolve import Resolver
from intermail.testing.loops import run_on
from intermail.testing.procs import TestCluster

ZONE = "intermail.test"
ORIGIN = dns.name.from_text(ZONE)
KEY = TsigKey("intermail-update", b"k" * 32)
OTHER_KEY = TsigKey("intermail-update", b"x" * 32)  # same name, wrong secret
STRANGER = TsigKey("someone-else", b"k" * 32)  # a name the server does not know

MTAS = ["127.0.3.1", "127.0.3.2", "127.0.3.3"]


def cluster_config(data_dir: str = "", **dns_keys) -> Config:
    return Config(
        cluster=ClusterConfig(zone=ZONE, data_dir=data_dir),
        dns=DnsConfig(**dns_keys),
        instances=(
            InstanceConfig(name="dns1", kind="dns", address="127.0.1.1", ports={"dns": 0}),
            InstanceConfig(name="dns2", kind="dns", address="127.0.1.2", ports={"dns": 0}),
            InstanceConfig(name="dir1", kind="directory", role="primary", address="127.0.2.1", ports={"rpc": 7000}),
            InstanceConfig(name="dir2", kind="directory", role="replica", address="127.0.2.2", ports={"rpc": 7000}),
            *(InstanceConfig(name=f"mta{i + 1}", kind="mta", address=a, ports={"smtp": 25}) for i, a in enumerate(MTAS)),
            InstanceConfig(name="access1", kind="access", address="127.0.4.1", ports={"imap": 143, "pop3": 110}),
            InstanceConfig(name="access2", kind="access", address="127.0.4.2", ports={"imap": 143}),
            InstanceConfig(name="access6", kind="access", address="::1", ports={"pop3": 110}),
            InstanceConfig(name="mss1", kind="mss", identity="mss1", role="active", address="127.0.5.1"),
            InstanceConfig(name="mss1b", kind="mss", identity="mss1", role="spare", address="127.0.5.2"),
            InstanceConfig(name="store2", kind="mss", identity="mss2", address="127.0.5.3"),
            InstanceConfig(name="mon", kind="monitor", address="127.0.6.1"),
        ))


def texts(rrset) -> list[str]:
    return [rdata.to_text() for rdata in rrset]


def query(name: str, rdtype: str = "A", **kwargs) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()


def ask(authority: Authority, name: str, rdtype: str = "A", *, tcp: bool = False, **kwargs) -> dns.message.Message:
    reply = authority.handle(query(name, rdtype, **kwargs), tcp=tcp)
    assert isinstance(reply, bytes)
    return dns.message.from_wire(reply)


def signed_update(key: TsigKey | None = KEY, zone: str = ZONE) -> dns.update.UpdateMessage:
    if key is None:
        return dns.update.UpdateMessage(zone)
    return dns.update.UpdateMessage(zone, keyring=key.keyring, keyname=dns.name.from_text(key.name),
                                    keyalgorithm=key.algorithm)


def apply(authority: Authority, message: dns.update.UpdateMessage) -> dns.message.Message:
    """Send ``message`` to ``authority``; commit an accepted change (no file); the parsed reply."""
    outcome = authority.handle(message.to_wire())
    if isinstance(outcome, ZoneChange):
        authority.commit(outcome)
        outcome = outcome.reply
    assert isinstance(outcome, bytes)
    return dns.message.from_wire(outcome, keyring=False)


@pytest.fixture
def authority() -> Authority:
    return Authority(zone_from_config(cluster_config()), KEY.keyring)


# -- the zone ------------------------------------------------------------------------------


def test_the_zone_of_a_new_cluster():
    zone = zone_from_config(cluster_config(ttl=7))
    assert zone.origin == ORIGIN
    assert zone.addresses("mta.intermail.test") == MTAS
    assert zone.addresses("imap.intermail.test") == ["127.0.4.1", "127.0.4.2"]
    assert zone.addresses("pop.intermail.test") == ["127.0.4.1", "::1"]  # A, then AAAA
    assert zone.addresses("dir.intermail.test") == ["127.0.2.1", "127.0.2.2"]
    # a store identity is its active instance's address, never the spare's
    assert zone.addresses("mss1.intermail.test") == ["127.0.5.1"]
    assert zone.addresses("mss2.intermail.test") == ["127.0.5.3"]
    for name, address in (("mta2", "127.0.3.2"), ("mss1b", "127.0.5.2"), ("dns1", "127.0.1.1"), ("mon", "127.0.6.1")):
        assert zone.addresses(f"{name}.intermail.test") == [address]
    assert texts(zone.get(ORIGIN, dns.rdatatype.NS).to_rrset()) == ["dns1.intermail.test.", "dns2.intermail.test."]
    assert texts(zone.get(ORIGIN, dns.rdatatype.MX).to_rrset()) == ["10 mta.intermail.test."]
    soa = zone.soa_rdata
    assert soa.mname == dns.name.from_text("dns1.intermail.test") and soa.minimum == 7
    assert all(rs.ttl == 7 for rs in zone.recordsets())
    assert abs(zone.serial - time.time()) < 60


def test_serials_follow_rfc_1982():
    assert serial_after(2, 1) and not serial_after(1, 2) and not serial_after(5, 5)
    assert serial_after(0, 2**32 - 1)  # wraps
    assert next_serial(100, now=50) == 101  # the clock is behind: one more
    assert next_serial(100, now=5000) == 5000  # the clock is ahead: the clock
    assert next_serial(2**32 - 1, now=0) == 0


def test_a_zone_survives_its_file(tmp_path: Path):
    zone = zone_from_config(cluster_config())
    editor = zone.editor()
    editor.add(dns.name.from_text("big.intermail.test"), 5,
               dns.rdata.from_text("IN", "TXT", '"a b" "c;d" "\\"quoted\\""'))
    editor.delete_rdata(dns.name.from_text("mta.intermail.test"), dns.rdata.from_text("IN", "A", "127.0.3.1"))
    changed = editor.finish()
    assert changed.serial != zone.serial and serial_after(changed.serial, zone.serial)
    assert zone.addresses("mta.intermail.test") == MTAS  # the old version is untouched
    path = tmp_path / "dns1" / "intermail.test.zone"
    save_zone(changed, path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    again = load_zone(path, ZONE)
    assert again.to_text() == changed.to_text()
    assert again.addresses("mta.intermail.test") == ["127.0.3.2", "127.0.3.3"]
    with pytest.raises(ConfigError, match="no zone file"):
        load_zone(tmp_path / "missing.zone", ZONE)
    with pytest.raises(ConfigError):
        load_zone(path, "other.test")
    path.write_text("this is not a zone\n")
    with pytest.raises(ConfigError):
        load_zone(path, ZONE)


def test_a_zone_needs_its_soa_and_ns():
    soa = RecordSet(ORIGIN, dns.rdatatype.SOA, 5,
                    (dns.rdata.from_text("IN", "SOA", "ns.intermail.test. h.intermail.test. 1 2 3 4 5"),))
    with pytest.raises(ValueError, match="NS"):
        Zone(ORIGIN, [soa])
    with pytest.raises(ValueError, match="SOA"):
        Zone(ORIGIN, [])
    outside = RecordSet(dns.name.from_text("x.other.test"), dns.rdatatype.A, 5, (dns.rdata.from_text("IN", "A", "192.0.2.1"),))
    with pytest.raises(ValueError, match="outside"):
        Zone(ORIGIN, [soa, outside])


# -- the TSIG key file ---------------------------------------------------------------------


def test_key_file_is_created_once_0600_in_bind_format(tmp_path: Path):
    config = cluster_config(str(tmp_path))
    path = key_file_path(config)
    assert path == tmp_path / "keys" / "dns-update.key"
    assert create_key_file(path, "intermail-update")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert first.startswith('key "intermail-update" {') and "algorithm hmac-sha256;" in first
    assert not create_key_file(path, "intermail-update")  # never replaced
    assert path.read_text() == first
    key = load_key(config)
    assert key.name == "intermail-update." and len(key.secret) == 32
    assert parse_key(format_key(key)) == key
    with pytest.raises(ConfigError, match="named"):
        load_key(cluster_config(str(tmp_path), tsig_key_name="other"))
    (tmp_path / "bad.key").write_text("secret nonsense")
    with pytest.raises(ConfigError):
        read_key_file(tmp_path / "bad.key")
    with pytest.raises(ConfigError, match="no TSIG key"):
        read_key_file(tmp_path / "none.key")


def test_tsig_keygen_output_is_read():
    text = ('key "hm-key" {\n\talgorithm hmac-sha256;\n\tsecret "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";\n};\n'
            "# a comment\n")
    key = parse_key(text)
    assert key.name == "hm-key." and key.secret == b"secretsecretsecretsecretsecret12"


# -- queries ---------------------------------------------------------------------------------


def test_each_answer_rotates_the_rrset_by_one(authority: Authority):
    orders = [texts(ask(authority, "mta.intermail.test").answer[0]) for _ in range(4)]
    assert orders == [MTAS, MTAS[1:] + MTAS[:1], MTAS[2:] + MTAS[:2], MTAS]
    # each (name, type) has its own turn
    assert texts(ask(authority, "imap.intermail.test").answer[0]) == ["127.0.4.1", "127.0.4.2"]
    assert texts(ask(authority, "MTA.intermail.TEST").answer[0]) == MTAS[1:] + MTAS[:1]  # names ignore case
    reply = ask(authority, "mta.intermail.test")
    assert reply.flags & dns.flags.AA and not reply.flags & dns.flags.RA
    assert reply.answer[0].ttl == 5


def test_names_outside_the_zone_are_refused(authority: Authority):
    for name in ("example.com", "test", "intermail.test.example"):
        reply = ask(authority, name)
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer and not reply.flags & dns.flags.AA
    assert ask(authority, ZONE, "AXFR", tcp=True).rcode() == dns.rcode.REFUSED
    chaos = dns.message.make_query("version.bind", "TXT", rdclass="CH").to_wire()
    assert dns.message.from_wire(authority.handle(chaos)).rcode() == dns.rcode.REFUSED


def test_nxdomain_and_nodata_carry_the_soa(authority: Authority):
    nx = ask(authority, "nobody.intermail.test")
    assert nx.rcode() == dns.rcode.NXDOMAIN and not nx.answer
    assert nx.authority[0].rdtype == dns.rdatatype.SOA and nx.authority[0].name == ORIGIN
    nodata = ask(authority, "mta.intermail.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA and nodata.authority[0].ttl == 5
    assert nodata.flags & dns.flags.AA
    # an empty non-terminal exists (RFC 8020): NODATA, not NXDOMAIN
    message = signed_update()
    message.add("a.b", 5, "A", "192.0.2.7")
    assert apply(authority, message).rcode() == dns.rcode.NOERROR
    assert ask(authority, "b.intermail.test").rcode() == dns.rcode.NOERROR
    assert ask(authority, "c.b.intermail.test").rcode() == dns.rcode.NXDOMAIN


def test_any_mx_and_glue(authority: Authority):
    apex = ask(authority, ZONE, "ANY")
    assert {rrset.rdtype for rrset in apex.answer} == {dns.rdatatype.SOA, dns.rdatatype.NS, dns.rdatatype.MX}
    mx = ask(authority, ZONE, "MX")
    assert texts(mx.answer[0]) == ["10 mta.intermail.test."]
    assert sorted(texts(mx.additional[0])) == sorted(MTAS)  # the exchange's addresses, in the zone


def test_udp_answers_too_large_are_truncated_and_tcp_has_them_whole(authority: Authority):
    big = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(200)]  # 200 A records: ~3.2 kB
    message = signed_update()
    for address in big:
        message.add("big", 5, "A", address)
    message.add("txt", 5, "TXT", " ".join(f'"{"x" * 200}"' for _ in range(4)))
    assert apply(authority, message).rcode() == dns.rcode.NOERROR
    # 512 bytes without EDNS; with EDNS the client's payload, but 1232 (max_udp_payload) at most
    for name, rdtype, kwargs in (("big.intermail.test", "A", {}), ("txt.intermail.test", "TXT", {}),
                                 ("big.intermail.test", "A", {"use_edns": 0, "payload": 4096})):
        wire = authority.handle(query(name, rdtype, **kwargs))
        reply = dns.message.from_wire(wire)
        assert reply.flags & dns.flags.TC and not reply.answer and len(wire) <= 512, (name, kwargs)
        assert reply.question[0].name == dns.name.from_text(name) and reply.flags & dns.flags.AA
    whole = ask(authority, "big.intermail.test", tcp=True)
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 200
    fits = ask(authority, "txt.intermail.test", "TXT", use_edns=0, payload=1232)
    assert not fits.flags & dns.flags.TC and len(fits.answer[0]) == 1  # ~830 bytes: fits 1232, not 512
    assert authority.stats["truncated", "udp"] == 3


def test_edns_version_and_odd_requests(authority: Authority):
    assert ask(authority, "mta.intermail.test", use_edns=1).rcode() == dns.rcode.BADVERS
    notify = dns.message.make_query(ZONE, "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(authority.handle(notify.to_wire())).rcode() == dns.rcode.NOTIMP
    two = dns.message.make_query("mta.intermail.test", "A")
    two.question.append(dns.message.make_query("dir.intermail.test", "A").question[0])
    assert dns.message.from_wire(authority.handle(two.to_wire())).rcode() == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.make_query("mta.intermail.test", "A"))
    assert authority.handle(response.to_wire()) is None  # never answer an answer
    assert authority.handle(b"\x01\x02\x03") is None


def test_a_signed_query_gets_a_signed_answer(authority: Authority):
    q = dns.message.make_query("dir.intermail.test", "A")
    q.use_tsig(KEY.keyring, keyname=dns.name.from_text(KEY.name), algorithm=KEY.algorithm)
    wire = authority.handle(q.to_wire())
    reply = dns.message.from_wire(wire, keyring=KEY.keyring, request_mac=q.mac)  # verifies the MAC
    assert reply.had_tsig and texts(reply.answer[0]) == ["127.0.2.1", "127.0.2.2"]


# -- updates ---------------------------------------------------------------------------------


def test_a_signed_update_adds_and_deletes_and_bumps_the_serial(authority: Authority):
    before = authority.zone.serial
    message = signed_update()
    message.add("mta", 5, "A", "127.0.3.9")
    reply = apply(authority, message)
    assert reply.rcode() == dns.rcode.NOERROR and reply.had_tsig
    assert authority.zone.addresses("mta.intermail.test") == [*MTAS, "127.0.3.9"]
    added = authority.zone.serial
    assert serial_after(added, before)
    message = signed_update()
    message.delete("mta", "A", "127.0.3.1")
    assert apply(authority, message).rcode() == dns.rcode.NOERROR
    assert authority.zone.addresses("mta.intermail.test") == ["127.0.3.2", "127.0.3.3", "127.0.3.9"]
    assert serial_after(authority.zone.serial, added)
    # adding what is there changes nothing: no new serial
    unchanged = authority.zone.serial
    message = signed_update()
    message.add("mta", 5, "A", "127.0.3.2")
    outcome = authority.handle(message.to_wire())
    assert isinstance(outcome, bytes) and dns.message.from_wire(outcome, keyring=False).rcode() == dns.rcode.NOERROR
    assert authority.zone.serial == unchanged


def test_the_last_address_of_a_service_name_may_go_at_the_dns_level(authority: Authority):
    message = signed_update()
    for address in MTAS:
        message.delete("mta", "A", address)
    assert apply(authority, message).rcode() == dns.rcode.NOERROR
    assert ask(authority, "mta.intermail.test").rcode() == dns.rcode.NXDOMAIN


def test_unsigned_and_badly_signed_updates_are_refused(authority: Authority):
    serial = authority.zone.serial
    for key, rcode, tsig_error in ((None, dns.rcode.REFUSED, None), (OTHER_KEY, dns.rcode.NOTAUTH, 16),
                                   (STRANGER, dns.rcode.NOTAUTH, 17)):
        message = signed_update(key)
        message.add("mta", 5, "A", "192.0.2.66")
        outcome = authority.handle(message.to_wire())
        assert isinstance(outcome, bytes)
        reply = dns.message.from_wire(outcome, keyring=False)
        assert reply.rcode() == rcode, key
        if tsig_error is not None:
            assert reply.tsig[0].error == tsig_error and reply.tsig[0].mac == b""
    assert authority.zone.serial == serial and "192.0.2.66" not in authority.zone.addresses("mta.intermail.test")
    # a stale signature (outside the fudge) is BADTIME
    late = signed_update()
    late.add("mta", 5, "A", "192.0.2.66")
    late.use_tsig(KEY.keyring, keyname=dns.name.from_text(KEY.name), algorithm=KEY.algorithm, fudge=1)
    wire = late.to_wire()
    with unittest.mock.patch("time.time", return_value=time.time() + 600):
        reply = dns.message.from_wire(authority.handle(wire), keyring=False)
    assert reply.rcode() == dns.rcode.NOTAUTH and reply.tsig[0].error == 18


def test_update_of_another_zone_or_outside_names(authority: Authority):
    other = signed_update(zone="example.com")
    other.add("www", 5, "A", "192.0.2.1")
    assert apply(authority, other).rcode() == dns.rcode.NOTAUTH
    outside = signed_update()
    outside.add("www.example.com.", 5, "A", "192.0.2.1")
    assert apply(authority, outside).rcode() == dns.rcode.NOTZONE


def test_prerequisites(authority: Authority):
    def run(build) -> dns.rcode.Rcode:
        message = signed_update()
        build(message)
        message.add("flag", 5, "TXT", '"set"')
        return apply(authority, message).rcode()

    current = dns.rdataset.from_text("IN", "A", 0, *MTAS)
    assert run(lambda m: m.present("nobody")) == dns.rcode.NXDOMAIN
    assert run(lambda m: m.present("mta", "MX")) == dns.rcode.NXRRSET
    assert run(lambda m: m.absent("mta")) == dns.rcode.YXDOMAIN
    assert run(lambda m: m.absent("mta", "A")) == dns.rcode.YXRRSET
    assert run(lambda m: m.present("mta", dns.rdataset.from_text("IN", "A", 0, *MTAS[:2]))) == dns.rcode.NXRRSET
    assert run(lambda m: m.present("nobody.example.com.")) == dns.rcode.NOTZONE
    assert authority.zone.get(dns.name.from_text("flag", ORIGIN), dns.rdatatype.TXT) is None
    # all of them holding: the update is applied
    assert run(lambda m: (m.present("mta"), m.present("mta", "A"), m.absent("nobody"), m.absent("mta", "MX"),
                          m.present("mta", current))) == dns.rcode.NOERROR
    assert authority.zone.get(dns.name.from_text("flag", ORIGIN), dns.rdatatype.TXT) is not None


def test_the_apex_soa_and_ns_are_protected_and_policy_types(authority: Authority):
    ns = texts(authority.zone.get(ORIGIN, dns.rdatatype.NS).to_rrset())
    message = signed_update()
    message.delete(ZONE + ".")  # every RRset of the apex: SOA and NS stay
    message.delete(ZONE + ".", "NS", "dns1.intermail.test.")
    message.delete(ZONE + ".", "NS", "dns2.intermail.test.")  # the last NS stays
    assert apply(authority, message).rcode() == dns.rcode.NOERROR
    assert authority.zone.get(ORIGIN, dns.rdatatype.SOA) is not None
    assert texts(authority.zone.get(ORIGIN, dns.rdatatype.NS).to_rrset()) == ns[1:]
    assert authority.zone.get(ORIGIN, dns.rdatatype.MX) is None  # that one went
    for rdtype, text, where in (("CNAME", "mta.intermail.test.", "alias"), ("SRV", "0 0 25 mta.intermail.test.", "_smtp"),
                                ("NS", "ns.elsewhere.", "sub")):
        refused = signed_update()
        refused.add(where, 5, rdtype, text)
        assert apply(authority, refused).rcode() == dns.rcode.REFUSED, rdtype
    # an explicit SOA with a later serial is taken as given; an earlier one is ignored
    serial = authority.zone.serial
    soa = authority.zone.soa_rdata
    message = signed_update()
    message.add(ZONE + ".", 5, soa.replace(serial=serial + 1000))
    assert apply(authority, message).rcode() == dns.rcode.NOERROR
    assert authority.zone.serial == serial + 1000
    message = signed_update()
    message.add(ZONE + ".", 5, soa.replace(serial=serial - 1))
    apply(authority, message)
    assert authority.zone.serial == serial + 1000


# -- fuzz: never raises; garbage gets FORMERR (NOTIMP for an unknown opcode) or nothing ---------


def _check_reply(authority: Authority, wire: bytes) -> None:
    outcome = authority.handle(wire)
    assert outcome is None or isinstance(outcome, (bytes, ZoneChange))
    if isinstance(outcome, ZoneChange):  # only a correctly signed update could get here
        outcome = outcome.reply
    try:
        dns.message.from_wire(wire, keyring=False)
        parsed = True
    except Exception:  # noqa: BLE001
        parsed = False
    if outcome is None:
        assert len(wire) < 12 or wire[2] & 0x80  # short, or itself a response
        return
    assert outcome[:2] == wire[:2] and outcome[2] & 0x80  # our id, QR set
    opcode = (wire[2] >> 3) & 0x0F
    if opcode not in (dns.opcode.QUERY, dns.opcode.UPDATE):  # IQUERY, STATUS, NOTIFY, unassigned
        assert outcome[3] & 0x0F == dns.rcode.NOTIMP and outcome[4:] == b"\x00" * 8
    elif not parsed:
        assert outcome[3] & 0x0F == dns.rcode.FORMERR and outcome[4:] == b"\x00" * 8


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_never_raise(wire: bytes):
    _check_reply(Authority(zone_from_config(cluster_config()), KEY.keyring), wire)


_SEEDS = [query("mta.intermail.test"), query("x.intermail.test", "TXT", use_edns=0),
          dns.update.UpdateMessage(ZONE).to_wire()]
_signed = signed_update()
_signed.present("mta", "A")
_signed.delete("mta", "A", "127.0.3.1")
_SEEDS.append(_signed.to_wire())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=6),
       st.integers(0, 400))
def test_fuzz_mutated_messages_never_raise(seed: bytes, flips, cut):
    wire = bytearray(seed)
    for position, value in flips:
        wire[position % len(wire)] = value
    _check_reply(Authority(zone_from_config(cluster_config()), KEY.keyring), bytes(wire[: len(wire) - cut % 8]))


# -- real sockets, in process -------------------------------------------------------------------


def test_over_sockets_rotation_truncation_resolver_and_updates(loop_name, tmp_path: Path):
    async def scenario():
        path = tmp_path / "zone"
        server = DnsServer(Authority(zone_from_config(cluster_config()), KEY.keyring),
                           save=lambda zone: save_zone(zone, path))
        host, port = await server.start("127.0.0.1", 0)
        try:
            firsts = []
            for _ in range(3):
                reply = await dns.asyncquery.udp(dns.message.make_query("mta.intermail.test", "A"), host, port=port,
                                                 timeout=2)
                firsts.append(texts(reply.answer[0])[0])
            assert firsts == MTAS
            await update((host, port), ZONE, KEY, "big", add=[f"10.1.{i // 200}.{i % 200 + 1}" for i in range(150)])
            assert load_zone(path, ZONE).addresses("big.intermail.test")[:1] == ["10.1.0.1"]  # durable before NOERROR
            truncated = await dns.asyncquery.udp(dns.message.make_query("big.intermail.test", "A"), host, port=port,
                                                 timeout=2)
            assert truncated.flags & dns.flags.TC
            resolver = Resolver([(host, port)], timeout=1.0, lifetime=3.0)
            answer = await resolver.addresses("big.intermail.test")  # TC, then TCP
            assert len(answer.addresses) == 150
            assert (await resolver.addresses("dir.intermail.test")).addresses == ("127.0.2.1", "127.0.2.2")
            assert (await resolver.mx(ZONE)) == [(10, "mta.intermail.test")]
            with pytest.raises(MailError) as refused:
                await update((host, port), ZONE, OTHER_KEY, "mta", add=["192.0.2.1"])
            assert refused.value.kind is ErrorKind.PERM
            with pytest.raises(PrerequisiteFailed):
                await update((host, port), ZONE, KEY, "mta", delete=["127.0.3.1"], expect=["127.0.3.1"])
            await update((host, port), ZONE, KEY, "mta", delete=["127.0.3.1"], expect=MTAS)
            assert sorted(await addresses((host, port), ZONE, "mta")) == sorted(MTAS[1:])
            # over UDP, as nsupdate sends it
            message = signed_update()
            message.add("udp", 5, "A", "192.0.2.53")
            reply = await dns.asyncquery.udp(message, host, port=port, timeout=2)
            assert reply.rcode() == dns.rcode.NOERROR
            assert load_zone(path, ZONE).addresses("udp.intermail.test") == ["192.0.2.53"]
        finally:
            await server.stop()

    run_on(loop_name, scenario())


def test_a_failed_save_is_servfail_and_changes_nothing(loop_name):
    async def scenario():
        def broken(zone: Zone) -> None:
            raise OSError(28, "No space left on device")

        server = DnsServer(Authority(zone_from_config(cluster_config()), KEY.keyring), save=broken)
        host, port = await server.start("127.0.0.1", 0)
        try:
            serial = server.authority.zone.serial
            with pytest.raises(MailError) as failed:
                await update((host, port), ZONE, KEY, "mta", add=["192.0.2.9"])
            assert failed.value.kind is ErrorKind.TEMP and "SERVFAIL" in failed.value.detail
            assert server.authority.zone.serial == serial
            assert "192.0.2.9" not in await addresses((host, port), ZONE, "mta")
        finally:
            await server.stop()

    run_on(loop_name, scenario())


def test_membership_never_removes_the_last_address(loop_name):
    async def scenario():
        server = DnsServer(Authority(zone_from_config(cluster_config()), KEY.keyring))
        host, port = await server.start("127.0.0.1", 0)
        try:
            membership = Membership([(host, port)], ZONE, KEY)
            assert sorted(await membership("delete", "mta", "127.0.3.1")) == ["127.0.3.2", "127.0.3.3"]
            assert sorted(await membership("delete", "mta", "127.0.3.1")) == ["127.0.3.2", "127.0.3.3"]  # gone already
            # two removals at once of the last two: one of them must stay
            results = await asyncio.gather(membership("delete", "mta", "127.0.3.2"),
                                           membership("delete", "mta", "127.0.3.3"))
            assert len(server.authority.zone.addresses("mta.intermail.test")) == 1
            assert all(len(r) == 1 for r in results)
            assert sorted(await membership("add", "mta", "127.0.3.1")) == sorted(
                server.authority.zone.addresses("mta.intermail.test"))
            assert len(server.authority.zone.addresses("mta.intermail.test")) == 2
            # a dead second server does not make the change fail
            dead = socket.socket()
            dead.bind(("127.0.0.1", 0))
            both = Membership([(host, port), dead.getsockname()], ZONE, KEY, timeout=1.0)
            assert "127.0.3.7" in await both("add", "mta", "127.0.3.7")
            with pytest.raises(MailError) as unreachable:
                await Membership([dead.getsockname()], ZONE, KEY, timeout=1.0)("add", "mta", "127.0.3.8")
            assert unreachable.value.kind is ErrorKind.UNAVAILABLE
            dead.close()
        finally:
            await server.stop()

    run_on(loop_name, scenario())


def test_dns_app_on_the_runner(loop_name, tmp_path: Path):
    async def scenario():
        data = tmp_path / "data"
        config = cluster_config(str(data))
        app = DnsApp(config, "dns1", init=False)
        assert await Runner(app, install_signals=False).serve() == EXIT_START_FAILED  # no zone, no --init
        app = DnsApp(config, "dns1", init=True)
        runner = Runner(app, install_signals=False, ready_file=data / "run" / "dns1.ready")
        serving = asyncio.ensure_future(runner.serve())
        for _ in range(200):
            if "dns" in runner.addresses and "dns_udp" in runner.addresses:
                break
            await asyncio.sleep(0.01)
        assert runner.addresses["dns"] == runner.addresses["dns_udp"]  # one port, both transports
        host, port = runner.addresses["dns"]
        assert port and zone_file_path(config, "dns1").exists()
        assert stat.S_IMODE(key_file_path(config).stat().st_mode) == 0o600
        reply = await dns.asyncquery.udp(dns.message.make_query("mss1.intermail.test", "A"), host, port=port, timeout=2)
        assert texts(reply.answer[0]) == ["127.0.5.1"]
        reply = await dns.asyncquery.tcp(dns.message.make_query("mss2.intermail.test", "A"), host, port=port, timeout=2)
        assert texts(reply.answer[0]) == ["127.0.5.3"]
        # the monitor's view: servers from the ready file (port 0 in the Config), the key from its file
        membership = membership_from_config(config)
        assert membership.servers == [(host, port)]
        assert "127.0.3.4" in await membership("add", "mta", "127.0.3.4")
        health = await app.health()
        assert health["status"] == "ok" and health["serial"] == app.authority.zone.serial
        runner.request_stop()
        assert await asyncio.wait_for(serving, 10) == 0
        with pytest.raises((dns.exception.Timeout, OSError)):
            await dns.asyncquery.udp(dns.message.make_query("mta.intermail.test", "A"), host, port=port, timeout=0.3)
        assert "127.0.3.4" in load_zone(zone_file_path(config, "dns1"), ZONE).addresses("mta.intermail.test")

    run_on(loop_name, scenario())


# -- the real process, with BIND's clients --------------------------------------------------------


def need_dig() -> None:
    """dig and nsupdate (Debian's dnsutils); installed here when missing and we are root."""
    if shutil.which("dig") and shutil.which("nsupdate"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "dnsutils"]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
    if not (shutil.which("dig") and shutil.which("nsupdate")):
        pytest.skip("dig/nsupdate (dnsutils) not installed and cannot be installed")


def dig(server: tuple[str, int], name: str, rdtype: str = "A", *extra: str) -> list[str]:
    done = subprocess.run(["dig", f"@{server[0]}", "-p", str(server[1]), name, rdtype, "+short", "+time=2",
                           "+tries=1", *extra], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()


def nsupdate(server: tuple[str, int], key_file: Path | None, commands: str) -> subprocess.CompletedProcess:
    script = f"server {server[0]} {server[1]}\nzone {ZONE}\n{commands}\nsend\n"
    return subprocess.run(["nsupdate", *(["-k", str(key_file)] if key_file else [])], input=script,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(120)
def test_dnsd_process_with_dig_nsupdate_and_a_kill(tmp_path: Path):
    need_dig()
    cluster = TestCluster(tmp_path / "data", sections={"cluster": {"zone": ZONE}})
    cluster.add("dns1", "dns", ports={"dns": 0, "metrics": 0})
    mtas = [cluster.add(f"mta{i}", "mta", ports={"smtp": 0})["address"] for i in (1, 2, 3)]
    cluster.add("access1", "access", ports={"imap": 0, "pop3": 0})
    cluster.write()
    proc = cluster.procs["dns1"]
    try:
        proc.start().wait_ready()
        server = cluster.address("dns1", "dns")
        orders = [dig(server, f"mta.{ZONE}") for _ in range(3)]
        assert orders[0] == mtas and orders[1] == mtas[1:] + mtas[:1] and orders[2] == mtas[2:] + mtas[:2]
        assert dig(server, f"dns1.{ZONE}") == [server[0]]
        assert dig(server, "example.com") == []  # REFUSED: nothing to show
        assert dig(server, f"mta.{ZONE}", "A", "+tcp") == mtas  # the fourth answer: back to the start

        async def through_resolver_and_update() -> list[str]:
            resolver = Resolver([server], timeout=1.0, lifetime=5.0)
            assert list((await resolver.addresses(f"imap.{ZONE}")).addresses) == [
                cluster.address("access1", "imap")[0]]
            key = load_key(from_dict({"cluster": {"zone": ZONE, "data_dir": str(cluster.data)}}))
            await update(server, ZONE, key, "mta", add=["192.0.2.10"], delete=[mtas[0]])
            return await addresses(server, ZONE, "mta")

        after = asyncio.run(through_resolver_and_update())
        assert sorted(after) == sorted([*mtas[1:], "192.0.2.10"])
        assert sorted(dig(server, f"mta.{ZONE}")) == sorted(after)

        key_file = cluster.data / "keys" / "dns-update.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        done = nsupdate(server, key_file, f"update add extra.{ZONE} 5 TXT \"by nsupdate\"")
        assert done.returncode == 0, done.stderr
        assert dig(server, f"extra.{ZONE}", "TXT") == ['"by', 'nsupdate"']
        refused = nsupdate(server, None, f"update add evil.{ZONE} 5 A 192.0.2.66")
        assert refused.returncode != 0 and "REFUSED" in refused.stdout + refused.stderr
        (tmp_path / "wrong.key").write_text(format_key(TsigKey("intermail-update", b"w" * 32)))
        forged = nsupdate(server, tmp_path / "wrong.key", f"update add evil.{ZONE} 5 A 192.0.2.66")
        assert forged.returncode != 0 and "NOTAUTH" in forged.stdout + forged.stderr
        assert dig(server, f"evil.{ZONE}") == []

        serial = int(dig(server, ZONE, "SOA")[2])
        proc.kill()  # SIGKILL: what was acknowledged must be there after the restart
        proc.start().wait_ready()
        assert sorted(dig(server, f"mta.{ZONE}")) == sorted(after)
        assert dig(server, f"extra.{ZONE}", "TXT") == ['"by', 'nsupdate"']
        assert int(dig(server, ZONE, "SOA")[2]) == serial

        # a lost zone file is not silently rebuilt from the Config
        proc.stop()
        (cluster.data / "dns1" / f"{ZONE}.zone").unlink()
        proc.start()
        with pytest.raises(RuntimeError, match="exited with 1"):
            proc.wait_ready(timeout=30)
        assert "--init" in proc.log_tail()
    finally:
        cluster.stop_all()


@pytest.mark.timeout(120)
def test_bind_stands_in_with_the_same_key_zone_and_update_client(tmp_path: Path):
    """docs/dns.md's named.conf: BIND serves dnsd's zone file with dnsd's key and takes our updates."""
    named = shutil.which("named") or (shutil.which("named", path="/usr/sbin:/sbin"))
    if named is None:
        pytest.skip("BIND (bind9) is not installed")
    need_dig()
    port = _free_udp_and_tcp_port("127.0.0.1")  # BIND binds interface addresses only: not 127.x.y.z
    config = Config(cluster=ClusterConfig(zone=ZONE, data_dir=str(tmp_path)), instances=(
        InstanceConfig(name="dns1", kind="dns", address="127.0.0.1", ports={"dns": port}),
        *(InstanceConfig(name=f"mta{i + 1}", kind="mta", address=a) for i, a in enumerate(MTAS))))
    key_file = key_file_path(config)
    create_key_file(key_file, "intermail-update")
    zone_file = tmp_path / "intermail.test.zone"
    save_zone(zone_from_config(config), zone_file)
    (tmp_path / "named.conf").write_text(f'''
include "{key_file}";
options {{
    directory "{tmp_path}";
    pid-file "{tmp_path}/named.pid";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    allow-transfer {{ none; }};
    rrset-order {{ order cyclic; }};
}};
zone "{ZONE}" {{
    type primary;
    file "{zone_file}";
    allow-update {{ key "intermail-update"; }};
}};
''')
    log = open(tmp_path / "named.log", "wb")
    proc = subprocess.Popen([named, "-g", "-c", str(tmp_path / "named.conf")], stdout=log, stderr=log)
    server = ("127.0.0.1", port)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                if dig(server, f"mta.{ZONE}"):
                    break
            time.sleep(0.2)
        else:
            pytest.fail("named did not start:\n" + (tmp_path / "named.log").read_text(errors="replace")[-2000:])
        orders = [dig(server, f"mta.{ZONE}") for _ in range(3)]
        assert sorted(orders[0]) == sorted(MTAS) and len({tuple(o) for o in orders}) == 3  # cyclic

        async def drive() -> list[str]:
            membership = membership_from_config(config)
            await membership("add", "mta", "192.0.2.10")
            for address in MTAS:
                await membership("delete", "mta", address)
            left = await membership("delete", "mta", "192.0.2.10")  # the last one stays
            with pytest.raises(MailError) as wrong:
                await update(server, ZONE, OTHER_KEY, "mta", add=["192.0.2.66"])
            assert wrong.value.kind is ErrorKind.PERM
            return left

        assert asyncio.run(drive()) == ["192.0.2.10"]
        assert dig(server, f"mta.{ZONE}") == ["192.0.2.10"]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _free_udp_and_tcp_port(host: str) -> int:
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            try:
                udp.bind((host, tcp.getsockname()[1]))
            except OSError:
                continue
            return tcp.getsockname()[1]
    raise OSError("no port free for both UDP and TCP")
