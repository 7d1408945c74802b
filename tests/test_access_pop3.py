"""POP3 of the access server as real processes: ``accessd`` with ``mssd`` and ``dird`` on loopback.

Real clients (poplib, fetchmail, raw sockets) against a real cluster; the
maildrop lock across sessions and access servers; SIGKILLs of mssd and of
accessd during UPDATE (all of a session's deletions or none); the limits at
their edges.  Also the store RPC methods POP3 rests on (``maildrop.lock`` /
``maildrop.unlock`` leases, ``message.expunge`` with ``any_flags``), called
on a running mssd, and the pure helpers of :mod:`intermail.access.pop3`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import poplib
import random
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from intermail.access.pop3 import TopCut, uid_runs
from intermail.errors import ErrorKind, MailError
from intermail.rpc.client import RpcClient
from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(300)

LEASE = 2.0  # access.pop3_lock_lease of the main cluster: renewals every 0.67 s
WINDOW = 4.0  # access.failover_window of the main cluster
CHEAP_HASHES = {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1}
LINE = 300  # limits.line_length of the limits cluster
IDLE = 1.0  # access.pop3_idle_timeout of the limits cluster
MAX_AUTH_FAILURES = 3
MAX_BAD = 4

MAIN_USERS = ["get", "top", "uidl", "fm", "lock", "gone", "crash", "crash2", "auth", "junk"]


def address_of(name: str) -> str:
    return f"{name}@example.org"


# -- helpers --------------------------------------------------------------------------------


def cli(cluster: TestCluster, *argv: str) -> None:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (argv, done.stderr)


def add_users(cluster: TestCluster, users: list[str]) -> None:
    cli(cluster, "domain", "add", "example.org")
    procs = [subprocess.Popen([sys.executable, "-m", "intermail", "user", "add", address_of(u), "--password", "pw",
                               "--mss", "mss1", "--data", str(cluster.data)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for u in users]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err


def ensure_running(cluster: TestCluster) -> None:
    """Start again whatever an earlier (failed) test left dead."""
    dead = [p for p in cluster.procs.values() if not p.alive]
    for proc in dead:
        proc.start()
    for proc in dead:
        proc.wait_ready()


def deliver(cluster: TestCluster, user: str, *messages: bytes) -> None:
    with smtplib.LMTP(*cluster.address("mss1", "lmtp")) as lmtp:
        lmtp.ehlo("mta.test")
        for data in messages:
            assert lmtp.sendmail("sender@remote.test", [address_of(user)], data,
                                 mail_options=["BODY=8BITMIME"]) == {}


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (f"From: Sender <sender@remote.test>\r\nTo: someone@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n\r\n").encode() + body


def pop(cluster: TestCluster, user: str, instance: str = "access1") -> poplib.POP3:
    client = poplib.POP3(*cluster.address(instance, "pop3"), timeout=60)
    client.user(address_of(user))
    client.pass_("pw")
    return client


def pop_retrying(cluster: TestCluster, user: str, instance: str = "access1", wait: float = 10.0) -> poplib.POP3:
    """Log in, trying again while the maildrop is still locked or the store is coming back."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return pop(cluster, user, instance)
        except (poplib.error_proto, OSError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"no login for {user} in {wait} s: {exc}") from None
            time.sleep(0.1)


def retr(client: poplib.POP3, n: int) -> bytes:
    _, lines, _ = client.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


def uidls(client: poplib.POP3) -> dict[int, str]:
    _, lines, _ = client.uidl()
    return {int(n): uid.decode() for n, uid in (line.split() for line in lines)}


def empty_maildrop(cluster: TestCluster, user: str) -> None:
    client = pop_retrying(cluster, user)
    for n in range(1, client.stat()[0] + 1):
        client.dele(n)
    assert client.quit().startswith(b"+OK")


class Raw:
    """A POP3 connection on a bare socket: exact bytes out, lines back."""

    def __init__(self, address: tuple[str, int], timeout: float = 60.0):
        self.sock: socket.socket = socket.create_connection(address, timeout=timeout)
        self.buffer = b""
        self.eof = False
        self.greeting = self.line()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            assert data, f"closed after {len(self.buffer)} of {size} bytes: {self.buffer[-200:]!r}"
            self.buffer += data
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def line(self) -> bytes:
        """The next line without its CRLF; b"" once the server has closed."""
        while b"\r\n" not in self.buffer:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionError):
                data = b""
            if not data:
                self.eof = True
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def cmd(self, text: bytes | str) -> bytes:
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.line()

    def multi(self) -> list[bytes]:
        lines = []
        while (line := self.line()) != b".":
            assert not self.eof, "closed in the middle of a multi-line answer"
            lines.append(line)
        return lines

    def login(self, user: str, password: str = "pw") -> bytes:
        assert self.cmd(f"USER {address_of(user)}") == b"+OK"
        return self.cmd(f"PASS {password}")

    def stls(self, context: ssl.SSLContext) -> None:
        assert self.cmd("STLS").startswith(b"+OK")
        self.sock = context.wrap_socket(self.sock)

    def is_closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def errors_logged(cluster: TestCluster, name: str) -> list[dict]:
    """The error lines of ``name``'s log."""
    found = []
    for line in cluster.procs[name].log_file.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            found.append({"line": line})  # not ours: a traceback on stderr
            continue
        if entry.get("level") in ("error", "critical"):
            found.append(entry)
    return found


# -- the clusters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    cluster = TestCluster(tmp_path_factory.mktemp("pop3") / "data", sections={
        "directory": CHEAP_HASHES, "tls": {"auth_without_tls": True},
        "access": {"pop3_lock_lease": LEASE, "failover_window": WINDOW}, "log": {"level": "INFO"}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0, "pop3": 0, "metrics": 0})
    cluster.add("access2", "access", ports={"pop3": 0})
    cluster.write()
    cluster.start_all()
    try:
        add_users(cluster, MAIN_USERS)
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def cluster(main):
    ensure_running(main)
    return main


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    where = tmp_path_factory.mktemp("tls")
    cert_file, key_file = where / "cert.pem", where / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    return cert_file, key_file, context


@pytest.fixture(scope="module")
def strict(tmp_path_factory, tls_files):
    """A cluster with small limits, STLS, and logins over TLS only."""
    cert_file, key_file, _ = tls_files
    cluster = TestCluster(tmp_path_factory.mktemp("pop3limits") / "data", sections={
        "directory": CHEAP_HASHES, "tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
        "limits": {"line_length": LINE},
        "access": {"pop3_idle_timeout": IDLE, "max_auth_failures": MAX_AUTH_FAILURES, "auth_failure_delay": 0.05,
                   "pop3_max_bad_commands": MAX_BAD}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("access1", "access", ports={"pop3": 0})
    cluster.write()
    cluster.start_all()
    try:
        add_users(cluster, ["lim", "idle", "fail"])
        yield cluster
    finally:
        cluster.stop_all()


# -- the pure helpers -----------------------------------------------------------------------

TOP_MESSAGE = b"Subject: t\r\nX-A: 1\r\n\r\nl1\r\nl2\r\n.l3\r\nl4"


@pytest.mark.parametrize("lines, expect", [
    (0, b"Subject: t\r\nX-A: 1\r\n\r\n"),
    (1, b"Subject: t\r\nX-A: 1\r\n\r\nl1\r\n"),
    (3, b"Subject: t\r\nX-A: 1\r\n\r\nl1\r\nl2\r\n.l3\r\n"),
    (4, TOP_MESSAGE),
    (50, TOP_MESSAGE),
])
def test_top_cut_gives_the_same_bytes_however_the_message_is_chunked(lines, expect):
    for size in range(1, len(TOP_MESSAGE) + 1):
        cut = TopCut(lines)
        out = b"".join(cut.feed(TOP_MESSAGE[i:i + size]) for i in range(0, len(TOP_MESSAGE), size))
        assert out == expect, size
        assert cut.done == (expect != TOP_MESSAGE)  # else the message simply ended


def test_top_cut_of_a_message_without_a_body_or_with_an_empty_header():
    assert TopCut(0).feed(b"Subject: only a header\r\nX: y\r\n") == b"Subject: only a header\r\nX: y\r\n"
    cut = TopCut(1)
    assert cut.feed(b"\r\nfirst\r\nsecond\r\n") == b"\r\nfirst\r\n" and cut.done


def test_uid_runs_cover_runs_of_the_view_only():
    view = [2, 3, 5, 9, 10, 11, 20]
    assert uid_runs(view, {3, 5, 9, 11, 20}) == [[3, 9], [11, 20]]
    assert uid_runs(view, {2, 5, 10, 20}) == [[2, 2], [5, 5], [10, 10], [20, 20]]
    assert uid_runs(view, set()) == []
    assert uid_runs(view, set(view)) == [[2, 20]]


# -- the store RPC under POP3 ---------------------------------------------------------------


def test_maildrop_lock_leases_renewal_unlock_and_release_on_close(cluster):
    rpc_address = cluster.address("mss1", "rpc")
    user = "svc-lock@example.org"

    async def scenario() -> None:
        async with RpcClient([rpc_address]) as a, RpcClient([rpc_address]) as b:
            async def lock(client: RpcClient, owner: str, lease: object) -> bool:
                answer = await client.call("maildrop.lock", {"user": user, "owner": owner, "lease": lease})
                return answer["acquired"]

            assert await lock(a, "A", 0.5)
            assert not await lock(b, "B", 10)
            for _ in range(3):  # renewed by the same owner, the lease outlives its first 0.5 s
                await asyncio.sleep(0.3)
                assert await lock(a, "A", 0.5)
            assert not await lock(b, "B", 10)
            await asyncio.sleep(0.7)  # not renewed: expired
            assert await lock(b, "B", 10)
            assert not await lock(a, "A", 10)
            # only the owner releases it
            assert (await a.call("maildrop.unlock", {"user": user, "owner": "A"})) == {"released": False}
            assert not await lock(a, "A", 10)
            assert (await b.call("maildrop.unlock", {"user": user, "owner": "B"})) == {"released": True}
            assert await lock(a, "A", 10)
            for bad in (0, -1, 3601, "ten", True, None):
                with pytest.raises(MailError) as refused:
                    await lock(b, "B", bad)
                assert refused.value.kind is ErrorKind.INVALID
            with pytest.raises(MailError):
                await a.call("maildrop.lock", {"user": user, "owner": "A", "lease": 5, "extra": 1})
            # a lease held by a connection that closes is gone with it
            assert await lock(b, "B2", 60) is False
        async with RpcClient([rpc_address]) as c:
            deadline = time.monotonic() + 3
            while not await lock(c, "C", 60):
                assert time.monotonic() < deadline, "the lock outlived the connection that took it"
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_expunge_any_flags_removes_exactly_the_uids_given_and_needs_them(cluster):
    rpc_address = cluster.address("mss1", "rpc")
    user = "svc-expunge@example.org"

    async def scenario() -> None:
        async with RpcClient([rpc_address]) as rpc:
            base = {"user": user, "name": "INBOX"}
            for i in range(6):
                await rpc.call("message.append", base, body=message(f"e{i}"))
            await rpc.call("message.store", {**base, "uids": [[6, 6]], "mode": "+", "flags": ["\\Deleted"]})
            assert await rpc.call("message.expunge", {**base, "uids": [[1, 2], [4, 4]], "any_flags": True}) == \
                {"uids": [1, 2, 4]}
            # again (a retry after a lost answer): nothing more goes
            assert await rpc.call("message.expunge", {**base, "uids": [[1, 2], [4, 4]], "any_flags": True}) == \
                {"uids": []}
            for bad in ({"any_flags": True}, {"any_flags": "yes", "uids": [[3, 3]]}):
                with pytest.raises(MailError) as refused:
                    await rpc.call("message.expunge", {**base, **bad})
                assert refused.value.kind is ErrorKind.INVALID
            # without any_flags only \Deleted ones go, even inside the set
            assert await rpc.call("message.expunge", {**base, "uids": [[1, -1]]}) == {"uids": [6]}
            status = await rpc.call("mailbox.status", base)
            assert status["messages"] == 2

    asyncio.run(scenario())


def test_expunge_any_flags_is_all_or_nothing_across_a_sigkill_of_mssd(cluster):
    seed = int(os.environ.get("INTERMAIL_CRASH_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    rpc_address = cluster.address("mss1", "rpc")
    user = "svc-atomic@example.org"
    base = {"user": user, "name": "INBOX"}

    async def scenario(delay: float) -> None:
        async with RpcClient([rpc_address], reconnect_window=0.5) as rpc:
            await asyncio.gather(*(rpc.call("message.append", base, body=message(f"a{i}")) for i in range(40)))
            _, body = await rpc.call_stream("mailbox.select", base, idempotent=True)
            uids = [json.loads(line)[0] for line in (await body.read()).splitlines() if line]
            doomed = uids[::2]  # 20 ranges of one UID each
            call = asyncio.create_task(rpc.call("message.expunge", {
                **base, "uids": [[u, u] for u in doomed], "any_flags": True}))
            await asyncio.sleep(delay)
            cluster.procs["mss1"].kill()
            try:
                acknowledged = (await call)["uids"] == doomed
            except (MailError, ConnectionError):
                acknowledged = False
        cluster.procs["mss1"].start().wait_ready()
        async with RpcClient([rpc_address]) as rpc:
            _, body = await rpc.call_stream("mailbox.select", base, idempotent=True)
            left = [json.loads(line)[0] for line in (await body.read()).splitlines() if line]
            assert left in (uids, [u for u in uids if u not in doomed]), (seed, delay, left)
            if acknowledged:
                assert left == [u for u in uids if u not in doomed]
            if left:
                await rpc.call("message.expunge", {**base, "uids": [[1, -1]], "any_flags": True})

    for _ in range(2):
        asyncio.run(scenario(rng.uniform(0.0, 0.01)))


# -- 1. poplib ------------------------------------------------------------------------------


def test_poplib_retrieves_exactly_what_was_delivered_and_deletes_it(cluster):
    dots = message("dots", b".\r\n..\r\n.leading dot\r\n...three\r\nplain\r\n. \r\n.\r\nend\r\n")
    eight_bit = message("8bit", "Grüße, naïve café — 日本語\r\n".encode() +
                        bytes(b for b in range(0x80, 0x100)) + b"\r\n\x01\x7f tail\r\n")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-_=+()[]{}\r\n"
    big = message("big", line * (5 * 1024 * 1024 // len(line)))
    sent = [dots, eight_bit, big]
    deliver(cluster, "get", *sent)

    client = pop(cluster, "get")
    assert client.stat() == (3, sum(map(len, sent)))
    _, scan, _ = client.list()
    assert scan == [f"{n} {len(m)}".encode() for n, m in enumerate(sent, 1)]
    assert client.list(3).split()[1:] == [b"3", str(len(big)).encode()]
    for n, data in enumerate(sent, 1):
        assert retr(client, n) == data
    # TOP of the big one reads only its header and one line
    _, lines, octets = client.top(3, 1)
    assert lines[-2:] == [b"", line.rstrip(b"\r\n")] and octets < 400
    # ending without QUIT removes nothing (RFC 1939 §6)
    client.dele(1)
    client.close()  # no QUIT
    client = pop_retrying(cluster, "get")
    assert client.stat()[0] == 3
    client.dele(1)
    client.dele(3)
    assert client.stat() == (1, len(eight_bit))
    with pytest.raises(poplib.error_proto, match="already deleted"):
        client.retr(1)
    with pytest.raises(poplib.error_proto, match="no such message"):
        client.retr(4)
    assert client.rset().startswith(b"+OK")
    assert client.stat()[0] == 3
    before = uidls(client)
    client.dele(1)
    client.dele(3)
    assert client.quit().startswith(b"+OK")

    client = pop(cluster, "get")
    assert client.stat() == (1, len(eight_bit))
    assert retr(client, 1) == eight_bit
    assert uidls(client) == {1: before[2]}
    client.dele(1)
    client.quit()


def test_top_gives_the_header_and_the_first_lines(cluster):
    data = message("top", b"l1\r\nl2\r\n.l3\r\nl4\r\n")
    deliver(cluster, "top", data)
    client = pop(cluster, "top")
    header = data.split(b"\r\n\r\n")[0].split(b"\r\n")
    for lines, body in ((0, []), (2, [b"l1", b"l2"]), (3, [b"l1", b"l2", b".l3"]),
                        (4, [b"l1", b"l2", b".l3", b"l4"]), (99, [b"l1", b"l2", b".l3", b"l4"])):
        assert client.top(1, lines)[1] == header + [b""] + body
    with pytest.raises(poplib.error_proto):
        client.top(2, 0)
    client.quit()
    # on the wire: the status line, the message dot-stuffed, the final dot
    raw = Raw(cluster.address("access1", "pop3"))
    assert raw.login("top").startswith(b"+OK")
    raw.send("RETR 1\r\nTOP 1 2\r\n")
    expected = (f"+OK {len(data)} octets\r\n".encode() + data.replace(b"\r\n.", b"\r\n..") + b".\r\n" +
                b"+OK top of message follows\r\n" + data.split(b"\r\n\r\n")[0] + b"\r\n\r\nl1\r\nl2\r\n.\r\n")
    assert raw.read_exactly(len(expected)) == expected
    assert raw.cmd("QUIT").startswith(b"+OK")


def test_uidl_is_stable_across_sessions_access_servers_and_an_mssd_restart(cluster):
    deliver(cluster, "uidl", *(message(f"u{i}") for i in range(3)))
    client = pop(cluster, "uidl")
    first = uidls(client)
    client.quit()
    assert len(set(first.values())) == 3 and all(re.fullmatch(r"\d+\.\d+", u) for u in first.values())
    client = pop(cluster, "uidl", "access2")
    assert uidls(client) == first
    assert client.uidl(2).split()[1:] == [b"2", first[2].encode()]
    client.quit()
    cluster.procs["mss1"].kill()
    cluster.procs["mss1"].start().wait_ready()
    client = pop_retrying(cluster, "uidl")
    assert uidls(client) == first
    client.dele(2)
    assert client.quit().startswith(b"+OK")
    client = pop(cluster, "uidl")
    assert uidls(client) == {1: first[1], 2: first[3]}
    client.quit()
    empty_maildrop(cluster, "uidl")


def test_auth_plain_pipelining_and_a_message_removed_by_another_session(cluster):
    deliver(cluster, "auth", *(message(f"p{i}") for i in range(3)))
    raw = Raw(cluster.address("access1", "pop3"))
    plain = base64.b64encode(f"\0{address_of('auth')}\0pw".encode()).decode()
    assert raw.cmd(f"AUTH PLAIN {plain}").startswith(b"+OK")
    raw.send("STAT\r\nLIST\r\nUIDL 1\r\nNOOP\r\n")  # pipelined (RFC 2449 PIPELINING)
    assert raw.line().startswith(b"+OK 3 ")
    assert raw.line().startswith(b"+OK") and len(raw.multi()) == 3
    assert raw.line().startswith(b"+OK 1 ")
    assert raw.line() == b"+OK"
    # message 2 goes away meanwhile (an IMAP client expunged it): -ERR for it, the rest works
    uid = int(raw.cmd("UIDL 2").split()[2].split(b".")[1])

    async def expunge() -> None:
        async with RpcClient([cluster.address("mss1", "rpc")]) as rpc:
            await rpc.call("message.expunge", {"user": address_of("auth"), "name": "INBOX",
                                               "uids": [[uid, uid]], "any_flags": True})
    asyncio.run(expunge())
    assert raw.cmd("RETR 2").startswith(b"-ERR")
    assert raw.cmd("TOP 2 0").startswith(b"-ERR")
    assert raw.cmd("RETR 3").startswith(b"+OK") and b"Subject: p2" in raw.multi()
    assert raw.cmd("DELE 2") == b"+OK message 2 deleted"
    assert raw.cmd("QUIT").startswith(b"+OK")
    assert raw.is_closed()
    # AUTH PLAIN with the response on a continuation line
    raw = Raw(cluster.address("access2", "pop3"))
    assert raw.cmd("AUTH PLAIN") == b"+ "
    assert raw.cmd(plain).startswith(b"+OK maildrop has 2 messages")
    assert raw.cmd("QUIT").startswith(b"+OK")
    empty_maildrop(cluster, "auth")


# -- 2. fetchmail ---------------------------------------------------------------------------


def fetchmail_binary() -> str:
    found = shutil.which("fetchmail")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "fetchmail"]
    if subprocess.run(install, capture_output=True, env=env, timeout=300, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300, check=False)
        subprocess.run(install, capture_output=True, env=env, timeout=300, check=False)
    found = shutil.which("fetchmail")
    if not found:
        pytest.skip("fetchmail is not installed and `apt-get install fetchmail` failed")
    return found


def test_fetchmail_retrieves_every_message_into_an_mda_and_deletes_them(cluster, tmp_path):
    binary = fetchmail_binary()
    sent = [message(f"fm{i}", b".dot\r\n..two\r\n8bit: \xc3\xa9\xff\r\n" + b"x" * 70 * i + b"\r\nend\r\n")
            for i in range(5)]
    deliver(cluster, "fm", *sent)
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    host, port = cluster.address("access1", "pop3")
    rc = home / ".fetchmailrc"
    rc.write_text(f'set no bouncemail\npoll {host} protocol POP3 port {port} auth password\n'
                  f'  user "{address_of("fm")}" there with password "pw" is root here\n')
    rc.chmod(0o600)
    done = subprocess.run([binary, "-f", str(rc), "--nodetach", "--all", "--nokeep", "--norewrite",
                           "--sslproto", "", "--pidfile", str(home / "pid"), "--mda", f"cat > {out}/msg.$$"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)})
    assert done.returncode == 0, done.stdout + done.stderr
    delivered = [p.read_bytes() for p in out.iterdir()]
    assert len(delivered) == len(sent)
    # the MDA gets LF line ends and fetchmail's Received line on top; the rest is the message as sent
    for data in sent:
        assert sum(d.endswith(b"\n" + data.replace(b"\r\n", b"\n")) for d in delivered) == 1, data
    client = pop(cluster, "fm")
    assert client.stat() == (0, 0)
    client.quit()


# -- 3. the maildrop lock -------------------------------------------------------------------


def test_one_session_per_maildrop_across_access_servers_until_quit_or_a_crash(cluster):
    deliver(cluster, "lock", message("locked"))
    holder = pop(cluster, "lock", "access1")
    for instance in ("access1", "access2"):
        with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\] maildrop already locked"):
            pop(cluster, "lock", instance)
    time.sleep(LEASE * 1.5)  # the holder's renewals keep it
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        pop(cluster, "lock", "access2")
    assert holder.stat()[0] == 1
    holder.quit()
    pop(cluster, "lock", "access2").quit()  # at once after QUIT
    # the holder's access server dies: its RPC connection closes and the lock with it
    holder = pop(cluster, "lock", "access1")
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        pop(cluster, "lock", "access2")
    cluster.procs["access1"].kill()
    began = time.monotonic()
    pop_retrying(cluster, "lock", "access2", wait=5).quit()
    assert time.monotonic() - began < LEASE * 0.6  # not the lease running out: the last renewal left >= 2/3 of it
    holder.close()
    cluster.procs["access1"].start().wait_ready()
    pop(cluster, "lock", "access1").quit()


# -- 4. crashes during UPDATE ---------------------------------------------------------------


def crash_round(cluster: TestCluster, user: str, victim: str, rng: random.Random, restart_at_once: bool,
                seed: int) -> None:
    """DELE 8 of 12 messages, QUIT, SIGKILL ``victim`` around it: afterwards all 8 are gone or none is.

    ``restart_at_once``: the victim comes back while the session waits
    (within the failover window: the session's store calls are retried);
    otherwise only after QUIT was answered (or the connection dropped).
    """
    deliver(cluster, user, *(message(f"c{i}") for i in range(12)))
    via, check_via = ("access2", "access1") if victim == "access2" else ("access1", "access2")
    deadline = time.monotonic() + 10
    while True:  # the previous round's store restart may not be noticed yet
        raw = Raw(cluster.address(via, "pop3"))
        answer = raw.login(user)
        if answer.startswith(b"+OK") or time.monotonic() > deadline:
            break
        raw.close()
        time.sleep(0.1)
    assert answer.startswith(b"+OK maildrop has 12 messages"), answer
    assert raw.cmd("UIDL").startswith(b"+OK")
    everything = {line.split()[1] for line in raw.multi()}
    raw.send("".join(f"DELE {n}\r\n" for n in range(1, 9)))
    assert [raw.line() for _ in range(8)] == [f"+OK message {n} deleted".encode() for n in range(1, 9)]
    assert raw.cmd("UIDL").startswith(b"+OK")
    kept = {line.split()[1] for line in raw.multi()}
    delay = rng.uniform(-0.003, 0.02)
    if delay < 0:
        cluster.procs[victim].kill()
        raw.send("QUIT\r\n")
    else:
        raw.send("QUIT\r\n")
        time.sleep(delay)
        cluster.procs[victim].kill()
    if restart_at_once:
        cluster.procs[victim].start().wait_ready()
    t0 = time.monotonic()
    answer = raw.line()  # +OK (after a retry on the new store), -ERR, or b"" (our access server died)
    took = time.monotonic() - t0
    raw.close()
    if not restart_at_once:
        cluster.procs[victim].start().wait_ready()
    client = pop_retrying(cluster, user, check_via)
    _, lines, _ = client.uidl()
    client.quit()
    left = {line.split()[1] for line in lines}
    assert left in (everything, kept), (seed, victim, delay, answer, took, len(left))
    if answer.startswith(b"+OK"):
        assert left == kept, (seed, victim, delay, answer, took)
    empty_maildrop(cluster, user)


def test_sigkill_of_mssd_during_update_removes_all_or_none(cluster):
    seed = int(os.environ.get("INTERMAIL_CRASH_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    rounds = int(os.environ.get("INTERMAIL_POP3_CRASH_ROUNDS", "3"))
    for i in range(rounds):
        crash_round(cluster, "crash", "mss1", rng, restart_at_once=i % 2 == 0, seed=seed)


def test_sigkill_of_accessd_during_update_removes_all_or_none(cluster):
    seed = int(os.environ.get("INTERMAIL_CRASH_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    rounds = int(os.environ.get("INTERMAIL_POP3_CRASH_ROUNDS", "3"))
    for _ in range(rounds):
        crash_round(cluster, "crash2", "access2", rng, restart_at_once=True, seed=seed)


# -- 5. limits, bad input -------------------------------------------------------------------


def test_a_line_of_line_length_is_read_and_one_byte_more_is_refused(strict):
    raw = Raw(strict.address("access1", "pop3"))
    assert raw.greeting.startswith(b"+OK")
    exact = b"USER " + b"a" * (LINE - len(b"USER ") - 2)
    assert len(exact) + 2 == LINE
    assert raw.cmd(exact) == b"+OK"
    assert raw.cmd(exact + b"a") == b"-ERR Line too long"
    assert raw.cmd("CAPA").startswith(b"+OK")  # the session goes on
    capabilities = raw.multi()
    assert b"STLS" in capabilities and b"SASL PLAIN" in capabilities
    raw.close()


def test_logins_need_tls_there_and_stls_refuses_injected_commands(strict, tls_files):
    _, _, context = tls_files
    deliver(strict, "lim", message("over tls"))
    client = poplib.POP3(*strict.address("access1", "pop3"), timeout=30)
    client.user(address_of("lim"))
    with pytest.raises(poplib.error_proto, match="STLS first"):
        client.pass_("pw")
    client.stls(context)
    client.user(address_of("lim"))
    assert client.pass_("pw").startswith(b"+OK maildrop has 1 messages")
    assert b"Subject: over tls" in retr(client, 1)
    client.quit()
    raw = Raw(strict.address("access1", "pop3"))
    raw.send("STLS\r\nCAPA\r\n")  # RFC 2595 §3.1: nothing may follow STLS in the same packet
    assert raw.line().startswith(b"-ERR")
    assert raw.line().startswith(b"+OK")
    raw.close()


def test_idle_timeout_closes_the_session_and_frees_the_maildrop(strict, tls_files):
    _, _, context = tls_files
    raw = Raw(strict.address("access1", "pop3"))
    began = time.monotonic()
    assert raw.is_closed(timeout=IDLE * 5)
    assert IDLE * 0.9 <= time.monotonic() - began < IDLE * 4
    client = poplib.POP3(*strict.address("access1", "pop3"), timeout=30)
    client.stls(context)
    client.user(address_of("idle"))
    client.pass_("pw")
    time.sleep(IDLE * 1.5)
    with pytest.raises((poplib.error_proto, OSError)):
        client.noop()
    client = poplib.POP3(*strict.address("access1", "pop3"), timeout=30)
    client.stls(context)
    client.user(address_of("idle"))
    assert client.pass_("pw").startswith(b"+OK")  # the lock went with the idle session
    client.quit()


def test_failed_logins_get_auth_and_the_last_one_closes(strict, tls_files):
    _, _, context = tls_files
    raw = Raw(strict.address("access1", "pop3"))
    raw.stls(context)
    for attempt in range(1, MAX_AUTH_FAILURES + 1):
        assert raw.login("fail", "wrong") == b"-ERR [AUTH] Authentication failed", attempt
    assert raw.is_closed()
    raw = Raw(strict.address("access1", "pop3"))
    raw.stls(context)
    assert raw.login("nobody-here", "pw") == b"-ERR [AUTH] Authentication failed"  # same answer
    assert raw.login("fail").startswith(b"+OK")
    raw.cmd("QUIT")


def test_bad_commands_get_err_and_too_many_in_a_row_close(strict):
    raw = Raw(strict.address("access1", "pop3"))
    for bad in ("FOO", "STAT", "RETR 1", "APOP x y"):
        assert raw.cmd(bad).startswith(b"-ERR"), bad
    assert raw.cmd("CAPA").startswith(b"+OK")  # the session goes on, the count starts again
    raw.multi()
    for _ in range(MAX_BAD):
        assert raw.cmd("NONSENSE").startswith(b"-ERR")
    assert raw.cmd("NONSENSE").startswith(b"-ERR")
    assert raw.is_closed()


def garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
    if kind == 1:
        return b"\r\n".join(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
                            for _ in range(rng.randrange(1, 30))) + b"\r\n"
    if kind == 2:
        return b"A" * rng.randrange(1, 200_000)  # one endless line
    if kind == 3:
        return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200)  # a TLS ClientHello
    if kind == 4:
        words = [b"USER", b"PASS", b"AUTH PLAIN", b"AUTH", b"*", b"=", b"TOP 1", b"TOP 1 -1", b"RETR 0",
                 b"LIST 99999999999999999999", b"UIDL", b"\x00", b"\xff\xfe", b"STLS", b"CAPA", b"UTF8", b"\r", b"\n"]
        return b"".join(rng.choice(words) + rng.choice([b" ", b"\r\n", b"", b"\t"]) for _ in range(60))
    return b"\r\n" * rng.randrange(1, 50) + b"\n\r" * rng.randrange(1, 50)


def throw_garbage(address: tuple[str, int], rng: random.Random, connections: int, login: str | None = None) -> None:
    for _ in range(connections):
        raw = Raw(address, timeout=5)
        deadline = time.monotonic() + 5
        while login is not None and not raw.login(login).startswith(b"+OK"):
            assert time.monotonic() < deadline, "no login"  # the previous session may not be over yet
            time.sleep(0.05)
        try:
            for _ in range(rng.randrange(1, 4)):
                raw.send(garbage(rng))
            raw.sock.settimeout(0.2)
            with_answer = True
            while with_answer:
                try:
                    with_answer = bool(raw.sock.recv(1 << 16))
                except (TimeoutError, ConnectionError):
                    break
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            raw.close()


def test_garbage_never_crashes_accessd(strict, cluster):
    seed = int(os.environ.get("INTERMAIL_FUZZ_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    deliver(cluster, "junk", message("junk", b"j\r\n" * 10))
    throw_garbage(strict.address("access1", "pop3"), rng, 25)
    throw_garbage(cluster.address("access1", "pop3"), rng, 12, login="junk")
    for name, c in (("strict", strict), ("main", cluster)):
        assert c.procs["access1"].alive, (name, seed)
        assert errors_logged(c, "access1") == [], (name, seed)
    client = pop_retrying(cluster, "junk")
    assert client.stat()[0] == 1  # garbage never reached UPDATE with a DELE
    client.quit()
    raw = Raw(strict.address("access1", "pop3"))
    assert raw.cmd("CAPA").startswith(b"+OK")
    raw.close()
