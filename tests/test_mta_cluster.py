"""The MTA as real processes: ``services.mtad`` with ``dird`` and ``mssd`` on loopback.

Mail goes in with real clients (smtplib, aiosmtplib, swaks), is delivered over
LMTP to a real store, or relayed by MX to a sink SMTP server behind a real DNS
server; crash tests SIGKILL the MTA and the store at random moments.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from intermail.errors import ErrorKind, MailError
from intermail.mailstore import mime
from intermail.rpc.client import RpcClient
from intermail.testing.dnsstub import DnsStub
from intermail.testing.procs import TestCluster, free_port, loopback_address

pytestmark = pytest.mark.timeout(300)

USERS = [f"user{i}@example.org" for i in range(6)]


def make_cluster(path: Path, **queue: object) -> TestCluster:
    dns_address = loopback_address()
    # where remote MX hosts listen in these tests: a sink the test runs on this address and port
    sink = (loopback_address(), 0)
    sink = (sink[0], free_port(sink[0]))
    cluster = TestCluster(path, sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "queue": {"retry_base": 0.3, "retry_max": 1.0, "connect_timeout": 2.0, "data_timeout": 10.0,
                  "smtp_port": sink[1], **queue},
        "tls": {"auth_without_tls": True}, "log": {"level": "INFO"}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mta1", "mta", ports={"smtp": 0, "submission": 0, "rpc": 0})
    # a DNS server the test runs itself (never started as a process)
    cluster.add("dns1", "dns", address=dns_address, ports={"dns": free_port(dns_address)})
    cluster.write()
    cluster.sink = sink  # type: ignore[attr-defined]
    return cluster


def cli(cluster: TestCluster, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (argv, done.stderr)
    return done


@pytest.fixture
def cluster(tmp_path: Path):
    c = make_cluster(tmp_path / "data")
    c.start_all(["dir1", "mss1", "mta1"])
    cli(c, "domain", "add", "example.org")
    for user in USERS:
        cli(c, "user", "add", user, "--password", "secret", "--mss", "mss1")
    cli(c, "alias", "add", "team@example.org", USERS[0], USERS[1])
    yield c
    c.stop_all()


def message(ident: str, sender: str = "alice@remote.test", size: int = 800) -> bytes:
    head = f"From: <{sender}>\r\nTo: someone@example.org\r\nSubject: {ident}\r\nMessage-ID: <{ident}@t>\r\n\r\n"
    return head.encode() + b"Some text of the message body.\r\n" * max(1, size // 32)


async def inbox(cluster: TestCluster, user: str, name: str = "INBOX") -> list[tuple[str, bytes]]:
    """(subject, first header line) of every message in the mailbox."""
    async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
        try:
            _, body = await rpc.call_stream("message.fetch", {"user": user, "name": name, "uids": [[1, -1]]},
                                            idempotent=True)
        except MailError as exc:
            if exc.kind is ErrorKind.NOTFOUND:  # no mail yet: the store has not created the mailbox
                return []
            raise
        rows = [json.loads(line) for line in (await body.read()).splitlines()]
        out = []
        for row in rows:
            _, raw = await rpc.call_stream("message.body", {"user": user, "name": name, "uid": row["uid"],
                                                            "length": 200}, idempotent=True)
            out.append((mime.from_json(row["info"]).envelope.subject, (await raw.read()).split(b"\r\n")[0]))
        return out


async def wait_for(predicate, timeout: float = 20.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(step)


# -- 1. real clients in, real store out ------------------------------------------------------


def test_smtplib_aiosmtplib_and_swaks_deliver_exactly_once_with_our_received_header(cluster):
    host, port = cluster.address("mta1", "smtp")
    with smtplib.SMTP(host, port) as smtp:
        smtp.ehlo("client.test")
        assert smtp.sendmail("alice@remote.test", [USERS[0], "team@example.org"], message("by smtplib")) == {}

    async def by_aiosmtplib() -> None:
        await aiosmtplib.send(message("by aiosmtplib"), sender="alice@remote.test", recipients=[USERS[2]],
                              hostname=host, port=port, start_tls=False)
    asyncio.run(by_aiosmtplib())
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by .ci/run"
    done = subprocess.run([swaks, "--server", host, "--port", str(port), "--from", "alice@remote.test",
                           "--to", USERS[3], "--header", "Subject: by swaks", "--body", "hello"],
                          capture_output=True, text=True, timeout=60)
    assert "250 2.0.0" in done.stdout and "queued as" in done.stdout, done.stdout

    async def check() -> None:
        # team = user0 + user1: user0 gets the message once, although named twice
        first = await wait_for(lambda: inbox(cluster, USERS[0]))
        assert [s for s, _ in first] == ["by smtplib"]
        assert first[0][1].startswith(b"Received: from client.test")
        assert [s for s, _ in await wait_for(lambda: inbox(cluster, USERS[1]))] == ["by smtplib"]
        assert [s for s, _ in await wait_for(lambda: inbox(cluster, USERS[2]))] == ["by aiosmtplib"]
        assert [s for s, _ in await wait_for(lambda: inbox(cluster, USERS[3]))] == ["by swaks"]
        await asyncio.sleep(1.0)  # nothing more arrives
        assert len(await inbox(cluster, USERS[0])) == 1
    asyncio.run(check())
    listed = cli(cluster, "queue", "list", "--json")
    assert all(not answer["entries"] for answer in json.loads(listed.stdout).values())


# -- 2. relay by MX to a remote domain --------------------------------------------------------


def test_authenticated_submission_relays_by_mx_and_strangers_do_not(cluster):
    from aiosmtpd.smtp import SMTP as SinkSMTP

    received: list[tuple[str, list[str], bytes]] = []

    class Sink:
        async def handle_DATA(self, server, session, envelope):
            received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            return "250 2.0.0 sunk"

    async def scenario() -> None:
        sink_address, sink_port = cluster.sink
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SinkSMTP(Sink(), hostname="mx.remote.test"),
                                          sink_address, sink_port)
        dns_host, dns_port = cluster.address("dns1", "dns")
        stub = DnsStub({"mx.remote.test": [sink_address]}, mx={"remote.test": [(10, "mx.remote.test")]})
        await stub.start(dns_host, dns_port)
        try:
            host, port = cluster.address("mta1", "smtp")
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await aiosmtplib.send(message("stranger"), sender="x@evil.test", recipients=["bob@remote.test"],
                                      hostname=host, port=port, start_tls=False)
            assert refused.value.recipients[0].code == 554
            sub_host, sub_port = cluster.address("mta1", "submission")
            await aiosmtplib.send(message("relayed", sender=USERS[4]), sender=USERS[4],
                                  recipients=["bob@remote.test"], hostname=sub_host, port=sub_port,
                                  username=USERS[4], password="secret", start_tls=False)
            await wait_for(lambda: asyncio.sleep(0, result=received))
        finally:
            stub.stop()
            server.close()
    asyncio.run(scenario())
    assert received[0][0] == USERS[4] and received[0][1] == ["bob@remote.test"]
    assert b"Subject: relayed" in received[0][2]


# -- 3. SIGKILL of the MTA under load -----------------------------------------------------------


def test_sigkill_of_the_mta_under_load_delivers_every_acknowledged_message_exactly_once(cluster):
    kills = int(os.environ.get("INTERMAIL_MTA_KILLS", "5"))
    seed = int(os.environ.get("INTERMAIL_CRASH_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    host, port = cluster.address("mta1", "smtp")
    acked: dict[str, str] = {}  # message id -> recipient
    stop = asyncio.Event()

    async def client(n: int) -> None:
        """Each attempt is a new message (an SMTP client cannot know whether a lost 250 was sent)."""
        made = attempt = 0
        while not stop.is_set() or made < 20:
            ident = f"c{n}a{attempt}"
            rcpt = USERS[(n + attempt) % len(USERS)]
            attempt += 1
            try:
                await aiosmtplib.send(message(ident), sender="alice@remote.test", recipients=[rcpt], hostname=host,
                                      port=port, start_tls=False, timeout=5)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.sleep(0.05)
                continue  # no 250 seen: this attempt may or may not have been queued
            acked[ident] = rcpt
            made += 1

    async def killer() -> None:
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            cluster.procs["mta1"].kill()
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            await asyncio.to_thread(lambda: cluster.procs["mta1"].start().wait_ready())
        stop.set()

    async def scenario() -> None:
        await asyncio.gather(killer(), *(client(n) for n in range(20)))

        async def all_arrived() -> bool:
            got = {u: [s for s, _ in await inbox(cluster, u)] for u in USERS}
            return all(ident in got[rcpt] for ident, rcpt in acked.items())
        await wait_for(all_arrived, timeout=60, step=0.5)
        await asyncio.sleep(1.0)
        for user in USERS:  # acknowledged or not, no attempt arrives twice
            subjects = [s for s, _ in await inbox(cluster, user)]
            doubled = {s for s in subjects if subjects.count(s) > 1}
            assert not doubled, f"seed {seed}: doubles for {user}: {sorted(doubled)[:5]}"
    asyncio.run(scenario())
    print(f"{kills} kills of mtad, {len(acked)} messages acknowledged and delivered once, seed {seed}")


# -- 5. the store goes away and comes back; permanent failures bounce ---------------------------


def test_store_down_defers_then_delivers_and_a_permanent_failure_bounces(cluster):
    host, port = cluster.address("mta1", "smtp")
    cluster.procs["mss1"].kill()
    with smtplib.SMTP(host, port) as smtp:
        smtp.sendmail("alice@remote.test", [USERS[5]], message("while the store was down"))

    async def deferred() -> bool:
        listed = json.loads(cli(cluster, "queue", "list", "--json").stdout)
        entries = [e for answer in listed.values() for e in answer["entries"]]
        return bool(entries) and entries[0]["state"] == "deferred" and entries[0]["attempts"] >= 1
    asyncio.run(wait_for(deferred))
    cluster.procs["mss1"].start().wait_ready()

    async def delivered() -> bool:
        return [s for s, _ in await inbox(cluster, USERS[5])] == ["while the store was down"]
    asyncio.run(wait_for(delivered, timeout=30))

    # accepted for user4, who is then deleted: the store answers 550 and the sender (user3) gets a bounce
    cluster.procs["mss1"].kill()
    with smtplib.SMTP(host, port) as smtp:
        smtp.sendmail(USERS[3], [USERS[4]], message("to a user about to go", sender=USERS[3]))
    cli(cluster, "user", "del", USERS[4])
    cluster.procs["mss1"].start().wait_ready()

    async def bounced() -> bool:
        return any("Undelivered" in s for s, _ in await inbox(cluster, USERS[3]))
    asyncio.run(wait_for(bounced, timeout=30))


# -- 4. a queue mirror fills up under load ------------------------------------------------------


def test_a_queue_mirror_failing_under_load_costs_no_client_an_error_and_loses_nothing(tmp_path):
    from intermail.testing import fs
    try:
        mount = fs.tiny_tmpfs(tmp_path / "small", "3m")
        small = mount.__enter__()
    except fs.MountUnavailable as exc:
        pytest.skip(str(exc))
    try:
        cluster = TestCluster(tmp_path / "data", sections={
            "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
            "storage": {"segment_bytes": 1 << 20},
            "queue": {"retry_base": 0.3, "retry_max": 1.0}, "log": {"level": "INFO"}})
        cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
        cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
        cluster.add("mta1", "mta", ports={"smtp": 0, "rpc": 0, "metrics": 0},
                    store_dirs=[str(tmp_path / "queue-a"), str(small / "queue-b")])
        cluster.write()
        cluster.start_all(["dir1", "mss1", "mta1"])
        try:
            cli(cluster, "domain", "add", "example.org")
            cli(cluster, "user", "add", USERS[0], "--password", "pw", "--mss", "mss1")
            host, port = cluster.address("mta1", "smtp")

            async def scenario() -> None:
                async def send(n: int) -> None:
                    for i in range(15):
                        await aiosmtplib.send(message(f"s{n}m{i}", size=30_000), sender="a@remote.test",
                                              recipients=[USERS[0]], hostname=host, port=port, start_tls=False)
                await asyncio.gather(*(send(n) for n in range(10)))  # 150 x 30 KB: far more than 3 MB

                async def all_there() -> bool:
                    return len(await inbox(cluster, USERS[0])) >= 150
                await wait_for(all_there, timeout=60)
                subjects = [s for s, _ in await inbox(cluster, USERS[0])]
                assert sorted(subjects) == sorted(f"s{n}m{i}" for n in range(10) for i in range(15))
            asyncio.run(scenario())
            import urllib.request
            mhost, mport = cluster.address("mta1", "metrics")
            health = json.loads(urllib.request.urlopen(f"http://{mhost}:{mport}/health", timeout=5).read())
            mirrors = {m["path"]: m["healthy"] for m in health["mirrors"]}
            assert mirrors[str(small / "queue-b")] is False and mirrors[str(tmp_path / "queue-a")] is True
        finally:
            cluster.stop_all()
    finally:
        mount.__exit__(None, None, None)


def test_submission_with_auth_over_starttls_using_the_configured_certificate(tmp_path):
    import ssl

    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for blob in cert.cert_chain_pems[1:]:
        with open(cert_file, "ab") as fh:
            fh.write(blob.bytes())
    cluster = TestCluster(tmp_path / "data", sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "tls": {"cert_file": str(cert_file), "key_file": str(key_file)}, "queue": {"retry_base": 0.3}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("mta1", "mta", ports={"smtp": 0, "submission": 0, "rpc": 0})
    cluster.write()
    cluster.start_all(["dir1", "mss1", "mta1"])
    try:
        cli(cluster, "domain", "add", "example.org")
        cli(cluster, "user", "add", USERS[0], "--password", "s3cret", "--mss", "mss1")
        cli(cluster, "user", "add", USERS[1], "--password", "pw", "--mss", "mss1")
        host, port = cluster.address("mta1", "submission")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.check_hostname = False
        with smtplib.SMTP(host, port) as smtp:
            smtp.ehlo("laptop.test")
            with pytest.raises(smtplib.SMTPException):
                smtp.login(USERS[0], "s3cret")  # no AUTH before TLS
            smtp.starttls(context=context)
            smtp.ehlo("laptop.test")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login(USERS[0], "wrong")
            smtp.login(USERS[0], "s3cret")
            assert smtp.sendmail(USERS[0], [USERS[1]], message("over tls", sender=USERS[0])) == {}

        async def check() -> None:
            got = await wait_for(lambda: inbox(cluster, USERS[1]))
            assert got[0][0] == "over tls"
            async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
                _, body = await rpc.call_stream("message.body", {"user": USERS[1], "name": "INBOX", "uid": 1,
                                                                 "length": 300})
                head = await body.read()
            assert b"with ESMTPSA" in head  # TLS and AUTH, as RFC 3848 names it
        asyncio.run(check())
    finally:
        cluster.stop_all()
