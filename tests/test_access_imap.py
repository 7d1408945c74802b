"""The IMAP server of ``accessd`` against real processes, driven by real clients.

A module-scoped cluster (``dird`` + ``mssd`` + ``accessd`` on loopback) is
shared by every test; each test gets an account of its own, so the tests
stay independent of each other and of their order.  Mail arrives over LMTP
(``smtplib.LMTP``) exactly as the MTA delivers it.  The clients are
``imaplib`` (the standard library), ``imapclient`` (what most Python mail
tools use) and :class:`Wire`, a raw socket client for what the libraries
hide: the exact untagged responses of one command, literals, pipelining and
broken input.  A second, small cluster has its limits set low to test them
at their edges (line length, idle time, connections per address, failed
logins).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import imaplib
import itertools
import os
import re
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import imapclient
import pytest
from imapclient.exceptions import IMAPClientError

from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(120)

PASSWORD = "s3cret pass"
CHEAP_HASH = {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1}


# -- the cluster ----------------------------------------------------------------------------


def make_cluster(path: Path, **sections: dict) -> TestCluster:
    cluster = TestCluster(path, sections={
        "directory": CHEAP_HASH, "tls": {"auth_without_tls": True}, "log": {"level": "INFO"}, **sections})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0, "pop3": 0})
    cluster.write()
    cluster.start_all()
    cli(cluster, "domain", "add", "example.org")
    return cluster


def cli(cluster: TestCluster, *argv: str) -> None:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (argv, done.stderr)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = make_cluster(tmp_path_factory.mktemp("imap") / "data")
    yield c
    try:
        assert c.procs["access1"].alive, "accessd died:\n" + c.procs["access1"].log_tail()
    finally:
        c.stop_all()


_numbers = itertools.count(1)


def add_user(cluster: TestCluster) -> str:
    address = f"u{next(_numbers)}x{os.getpid()}@example.org"
    cli(cluster, "user", "add", address, "--password", PASSWORD, "--mss", "mss1")
    return address


@pytest.fixture
def user(cluster) -> str:
    """A fresh account on mss1 (its mailboxes are this test's alone)."""
    return add_user(cluster)


def deliver(cluster: TestCluster, user: str, *messages: bytes) -> None:
    """Deliver ``messages`` to ``user`` over LMTP, exactly these bytes (each ends in CRLF)."""
    with smtplib.LMTP(*cluster.address("mss1", "lmtp")) as lmtp:
        for raw in messages:
            assert raw.endswith(b"\r\n")
            refused = lmtp.sendmail("sender@remote.test", [user], raw)
            assert not refused


def imap(cluster: TestCluster, user: str | None = None) -> imaplib.IMAP4:
    """An imaplib connection, logged in as ``user`` if given."""
    conn = imaplib.IMAP4(*cluster.address("access1", "imap"), timeout=15)
    if user is not None:
        typ, _ = conn.login(user, PASSWORD)
        assert typ == "OK"
    return conn


def client(cluster: TestCluster, user: str | None = None) -> imapclient.IMAPClient:
    """An IMAPClient connection (plaintext), logged in as ``user`` if given."""
    host, port = cluster.address("access1", "imap")
    conn = imapclient.IMAPClient(host, port, ssl=False, timeout=15)
    if user is not None:
        conn.login(user, PASSWORD)
    return conn


class Wire:
    """A raw IMAP client: sends bytes, returns every response line of a command (literals inlined)."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buffer = b""
        self.tags = (f"w{i}" for i in itertools.count(1))
        self.transcript: list[bytes] = []  # every response read
        self.greeting = self.response()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buffer += chunk

    def read_bytes(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def line(self) -> bytes:
        """One line without its CRLF."""
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def response(self) -> bytes:
        """One response: a line, with each literal it announces read and inlined."""
        out = b""
        while True:
            line = self.line()
            out += line
            match = re.search(rb"~?\{(\d+)\}$", line)
            if match is None:
                self.transcript.append(out)
                return out
            out += b"\r\n" + self.read_bytes(int(match.group(1)))

    def command(self, text: bytes | str, tag: str | None = None) -> tuple[list[bytes], bytes]:
        """Send ``tag text``; the untagged responses and the tagged one (the line)."""
        tag = tag or next(self.tags)
        self.send(tag.encode() + b" " + (text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> tuple[list[bytes], bytes]:
        untagged = []
        while True:
            resp = self.response()
            if resp.startswith(tag.encode() + b" "):
                return untagged, resp
            untagged.append(resp)

    def login(self, user: str) -> None:
        _, done = self.command(f'LOGIN "{user}" "{PASSWORD}"')
        assert b" OK " in done, done

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within ``timeout`` (what it sends first is kept)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


def wire(cluster: TestCluster, user: str | None = None) -> Wire:
    w = Wire(cluster.address("access1", "imap"))
    assert w.greeting.startswith(b"* OK"), w.greeting
    if user is not None:
        w.login(user)
    return w


def ok(result: tuple[str, list]) -> list:
    """imaplib: the data of a command that must succeed."""
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


# -- test messages ---------------------------------------------------------------------------

# A PDF-ish attachment: binary, with NULs and every byte value, so that BINARY must decode it.
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 3 + b"\x00\x00trailer\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) + b"\x00IEND"


def b64_lines(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"".join(text[i:i + 76] + b"\r\n" for i in range(0, len(text), 76))


def lines(*parts: str | bytes) -> bytes:
    """Header or body lines joined with CRLF (each line ends in CRLF)."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\r\n" for p in parts)


class Multipart:
    """The nested test message, kept in pieces so that each section's exact bytes are known.

    Sections: 1 multipart/alternative (1.1 text/plain quoted-printable, 1.2
    text/html), 2 application/pdf base64, 3 message/rfc822 (3.HEADER, 3.TEXT,
    3.1 text/plain, 3.2 image/png base64).
    """

    SUBJECT_WORD = "=?UTF-8?B?" + base64.b64encode("Grüße aus Köln".encode()).decode() + "?="
    FROM_WORD = "=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?="

    def __init__(self, tag: str = "m1"):
        self.plain = lines("Gr=C3=BC=C3=9Fe, this is the plain part with a soft=", "break and a tab=09char.")
        self.plain = self.plain[:-2]  # the CRLF before a boundary belongs to the boundary
        self.plain_decoded = "Grüße, this is the plain part with a softbreak and a tab\tchar.".encode()
        self.html = b"<p>Gr=C3=BC=C3=9Fe <b>html</b></p>"
        self.pdf_body = b64_lines(PDF)[:-2]
        self.inner_text = b"inner body text\r\nsecond line"
        self.png_body = b64_lines(PNG)[:-2]
        self.plain_mime = lines("Content-Type: text/plain; charset=utf-8",
                                "Content-Transfer-Encoding: quoted-printable", "")
        self.html_mime = lines("Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: quoted-printable",
                               "")
        self.alt_mime = lines('Content-Type: multipart/alternative; boundary="alt-b"', "")
        self.alt_body = (b"--alt-b\r\n" + self.plain_mime + self.plain + b"\r\n--alt-b\r\n" + self.html_mime
                         + self.html + b"\r\n--alt-b--")
        self.pdf_mime = lines('Content-Type: application/pdf; name="report.pdf"',
                              'Content-Disposition: attachment; filename="report.pdf"',
                              "Content-Transfer-Encoding: base64", "")
        self.inner_header = lines("From: Inner Sender <inner@remote.test>", "To: someone@example.org",
                                  "Subject: inner message", "Date: Sun, 01 Mar 2026 08:00:00 +0000",
                                  "Message-ID: <inner@remote.test>", "MIME-Version: 1.0",
                                  'Content-Type: multipart/mixed; boundary="in-b"', "")
        self.inner_plain_mime = lines("Content-Type: text/plain; charset=us-ascii", "")
        self.png_mime = lines("Content-Type: image/png", "Content-Transfer-Encoding: base64", "")
        self.inner_body = (b"--in-b\r\n" + self.inner_plain_mime + self.inner_text + b"\r\n--in-b\r\n"
                           + self.png_mime + self.png_body + b"\r\n--in-b--\r\n")
        self.inner = self.inner_header + self.inner_body
        self.rfc822_mime = lines("Content-Type: message/rfc822", "")
        self.header = lines(
            f"From: {self.FROM_WORD} <joerg@remote.test>",
            "To: Ann Example <ann@example.org>, bob@example.org",
            "Cc: Carol <carol@remote.test>",
            "Reply-To: replies@remote.test",
            f"Subject: {self.SUBJECT_WORD}",
            "Date: Mon, 02 Mar 2026 10:11:12 +0100",
            f"Message-ID: <{tag}@remote.test>",
            "In-Reply-To: <m0@remote.test>",
            "X-Long-Header: first part of a folded",
            "\tvalue on a second line",
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="out-b"', "")
        self.text = (b"This is a MIME message.\r\n--out-b\r\n" + self.alt_mime + self.alt_body + b"\r\n--out-b\r\n"
                     + self.pdf_mime + self.pdf_body + b"\r\n--out-b\r\n" + self.rfc822_mime + self.inner
                     + b"\r\n--out-b--\r\n")
        self.raw = self.header + self.text


def eightbit_message(tag: str = "m2") -> bytes:
    """A single-part message with raw UTF-8 in a header (RFC 6532) and an 8-bit body."""
    return lines("From: Zoë <zoe@remote.test>", "To: someone@example.org", "Subject: Café crème 8bit",
                 "Date: Tue, 03 Mar 2026 09:00:00 +0000", f"Message-ID: <{tag}@remote.test>", "MIME-Version: 1.0",
                 "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", "",
                 "Ünïcödé body: naïve café, Straße.", "Second line.")


def simple(subject: str, body: str = "hello", sender: str = "Sender <sender@remote.test>",
           date: str = "Wed, 04 Mar 2026 12:00:00 +0000", extra: tuple[str, ...] = ()) -> bytes:
    return lines(f"From: {sender}", "To: someone@example.org", f"Subject: {subject}", f"Date: {date}",
                 f"Message-ID: <{abs(hash((subject, body, date)))}@remote.test>", *extra, "", body)


def lower(value: object) -> object:
    """A parsed IMAP structure with every string lowercased (MIME names compare without case)."""
    if isinstance(value, bytes):
        return value.lower()
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, (tuple, list)):
        return tuple(lower(v) for v in value)
    return value


def status_pairs(line: bytes) -> dict[str, int]:
    """``* STATUS name (K v K v)`` -> {K: v}."""
    inner = line[line.rindex(b"(") + 1:line.rindex(b")")].split()
    return {inner[i].decode().upper(): int(inner[i + 1]) for i in range(0, len(inner), 2)}


def capability_list(w: Wire) -> list[str]:
    untagged, _ = w.command("CAPABILITY")
    return untagged[0].decode().split()[2:]


def codes(line: bytes) -> str:
    """The response code of a status response (``[...]``), or ''."""
    match = re.search(rb"\[([^\]]*)\]", line)
    return match.group(1).decode() if match else ""


def apply_expunges(uids: list[int], untagged: list[bytes]) -> list[int]:
    """The UIDs left after the ``* n EXPUNGE`` responses in ``untagged``, applied in order (RFC 9051 §7.5.1)."""
    left = list(uids)
    for resp in untagged:
        match = re.fullmatch(rb"\* (\d+) EXPUNGE", resp)
        if match:
            del left[int(match.group(1)) - 1]
    return left


# == 1. logging in ============================================================================


def test_capabilities_before_and_after_login(cluster, user):
    conn = imap(cluster)
    before = set(conn.capabilities)
    assert {"IMAP4REV1", "AUTH=PLAIN", "AUTH=LOGIN", "SASL-IR", "IDLE", "UIDPLUS", "MOVE", "CONDSTORE",
            "ESEARCH", "SEARCHRES", "LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "BINARY",
            "MULTIAPPEND", "UTF8=ACCEPT", "NAMESPACE", "ENABLE", "UNSELECT", "LITERAL+"} <= before
    assert "LOGINDISABLED" not in before  # tls.auth_without_tls: plaintext logins allowed
    assert any(c.startswith("APPENDLIMIT=") for c in before)
    typ, data = conn.login(user, PASSWORD)
    assert typ == "OK" and data[0].startswith(b"[CAPABILITY ")  # RFC 9051 §6.2.3: fresh list after login
    announced = set(data[0][1:data[0].index(b"]")].decode().upper().split()[1:])
    typ, data = conn.capability()
    assert typ == "OK"
    after = set(data[0].decode().upper().split())
    assert after == announced
    assert not any(c.startswith("AUTH=") for c in after)  # no more logins once logged in
    assert "IMAP4REV1" in after and "IDLE" in after
    conn.logout()

    with client(cluster) as conn:
        caps = conn.capabilities()
        assert b"AUTH=PLAIN" in caps and b"IMAP4REV1" in caps
        conn.login(user, PASSWORD)
        after = conn.capabilities()
        assert b"AUTH=PLAIN" not in after and b"MOVE" in after
        assert conn.has_capability("IDLE")


def test_login_with_imaplib_and_imapclient(cluster, user):
    conn = imap(cluster)
    assert conn.login(user.upper(), PASSWORD)[0] == "OK"  # addresses are case-insensitive
    assert conn.state == "AUTH"
    assert conn.logout()[0] == "BYE"

    conn = imap(cluster)  # AUTHENTICATE PLAIN, imaplib answering the empty challenge
    assert conn.authenticate("PLAIN", lambda _: f"\0{user}\0{PASSWORD}".encode())[0] == "OK"
    conn.logout()

    answers = iter([user.encode(), PASSWORD.encode()])
    conn = imap(cluster)  # AUTHENTICATE LOGIN: two challenges
    challenges = []

    def login_answer(challenge: bytes) -> bytes:
        challenges.append(challenge)
        return next(answers)
    assert conn.authenticate("LOGIN", login_answer)[0] == "OK"
    assert challenges == [b"Username:", b"Password:"]
    conn.logout()

    with client(cluster) as c:
        assert c.login(user, PASSWORD)
    with client(cluster) as c:
        assert c.plain_login(user, PASSWORD)
        assert c.list_folders()


def test_authenticate_on_the_wire(cluster, user):
    plain = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    with wire(cluster) as w:  # SASL-IR (RFC 4959): the response on the command line
        _, done = w.command(f"AUTHENTICATE PLAIN {plain}")
        assert re.match(rb"w\d+ OK \[CAPABILITY [^\]]*IMAP4rev1", done), done
    with wire(cluster) as w:  # without SASL-IR: an empty challenge first
        w.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert w.response().startswith(b"+")
        w.send(plain.encode() + b"\r\n")
        _, done = w.until("a1")
        assert done.startswith(b"a1 OK"), done
    with wire(cluster) as w:  # authzid = the user is allowed
        both = base64.b64encode(f"{user}\0{user}\0{PASSWORD}".encode()).decode()
        _, done = w.command(f"AUTHENTICATE PLAIN {both}")
        assert b" OK " in done, done
    with wire(cluster) as w:  # AUTHENTICATE LOGIN
        w.send(b"a1 AUTHENTICATE LOGIN\r\n")
        assert w.response() == b"+ " + base64.b64encode(b"Username:")
        w.send(base64.b64encode(user.encode()) + b"\r\n")
        assert w.response() == b"+ " + base64.b64encode(b"Password:")
        w.send(base64.b64encode(PASSWORD.encode()) + b"\r\n")
        _, done = w.until("a1")
        assert done.startswith(b"a1 OK"), done
        _, done = w.command("SELECT INBOX")
        assert b" OK " in done
    with wire(cluster) as w:  # the client cancels (RFC 9051 §6.2.2): BAD, and the session goes on
        w.send(b"a1 AUTHENTICATE PLAIN\r\n")
        assert w.response().startswith(b"+")
        w.send(b"*\r\n")
        _, done = w.until("a1")
        assert done.startswith(b"a1 BAD"), done
        _, done = w.command("NOOP")
        assert b" OK " in done
        _, done = w.command("AUTHENTICATE CRAM-MD5")
        assert b" NO " in done or b" BAD " in done  # not offered
        w.login(user)


def test_wrong_password_is_authenticationfailed(cluster, user):
    conn = imap(cluster)
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
        conn.login(user, "wr0ng-Secret-70")
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
        conn.login("nobody-here@example.org", PASSWORD)  # unknown user: the same answer
    assert conn.login(user, PASSWORD)[0] == "OK"  # the same connection may still log in
    conn.logout()

    with wire(cluster) as w:
        bad = base64.b64encode(f"\0{user}\0n0pe-Secret-71".encode()).decode()
        _, done = w.command(f"AUTHENTICATE PLAIN {bad}")
        assert re.match(rb"w\d+ NO \[AUTHENTICATIONFAILED\] ", done), done
        assert PASSWORD.encode() not in done and b"n0pe-Secret-71" not in done
        _, done = w.command("SELECT INBOX")
        assert b" BAD " in done  # still not authenticated
        w.login(user)

    with client(cluster) as c, pytest.raises(IMAPClientError, match="AUTHENTICATIONFAILED"):
        c.login(user, "wr0ng-Secret-72")

    log = (cluster.data / "run" / "access1.log").read_text()
    assert not re.search(r"Secret-7[012]", log) and PASSWORD not in log  # passwords are never logged


# == 2. mailboxes ===============================================================================

SPECIAL = {"Archive": "\\Archive", "Drafts": "\\Drafts", "Junk": "\\Junk", "Sent": "\\Sent", "Trash": "\\Trash"}


def list_lines(untagged: list[bytes], kind: bytes = b"LIST") -> dict[str, tuple[set[str], bytes]]:
    """``* LIST (attrs) "/" name [ext]`` lines -> {name: ({attributes lowercased}, rest after the name)}."""
    out = {}
    for line in untagged:
        match = re.match(rb'\* ' + kind + rb' \(([^)]*)\) (?:"/"|NIL) ("(?:[^"\\]|\\.)*"|[^ ]+)(.*)$', line)
        if match:
            name = match.group(2).decode("utf-8")
            name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\") if name.startswith('"') else name
            out[name] = ({a.lower() for a in match.group(1).decode().split()}, match.group(3))
    return out


def test_list_patterns_and_reference(cluster, user):
    with client(cluster, user) as c:
        for name in ("Work", "Work/Projects", "Work/Projects/2026", "Personal"):
            c.create_folder(name)
        everything = {name: set(flags) for flags, _, name in c.list_folders()}
        assert set(everything) == {"INBOX", *SPECIAL, "Work", "Work/Projects", "Work/Projects/2026", "Personal"}
        assert b"\\HasChildren" in everything["Work"] and b"\\HasNoChildren" in everything["Personal"]
        for name, use in SPECIAL.items():
            assert use.encode() in everything[name]
        assert all(delim == b"/" for _, delim, _ in c.list_folders())
        top = {name for _, _, name in c.list_folders(pattern="%")}
        assert top == {"INBOX", *SPECIAL, "Work", "Personal"}
        assert {name for _, _, name in c.list_folders("Work/", "%")} == {"Work/Projects"}
        assert {name for _, _, name in c.list_folders("Work/", "*")} == {"Work/Projects", "Work/Projects/2026"}
        assert {name for _, _, name in c.list_folders("", "Work/%/2026")} == {"Work/Projects/2026"}
        assert {name for _, _, name in c.list_folders("", "*Proj*")} == {"Work/Projects", "Work/Projects/2026"}
        assert {name for _, _, name in c.list_folders("", "inBox")} == {"INBOX"}  # INBOX is case-insensitive
        assert c.list_folders("", "Nothing*") == []

    with wire(cluster, user) as w:  # RFC 9051 §6.3.9: an empty pattern asks for the delimiter
        untagged, done = w.command('LIST "" ""')
        assert b" OK " in done
        assert untagged == [b'* LIST (\\Noselect) "/" ""']


def test_list_extended_lsub_and_subscriptions(cluster, user):
    deliver(cluster, user, simple("one"), simple("two"))
    with client(cluster, user) as c:
        for name in ("Work", "Work/Projects", "Personal"):
            c.create_folder(name)
        c.subscribe_folder("Work/Projects")
        c.subscribe_folder("Personal")
        c.unsubscribe_folder("Junk")
        with imapclient.IMAPClient(*cluster.address("access1", "imap"), ssl=False) as other:
            other.login(user, PASSWORD)
            other.select_folder("INBOX")
            other.add_flags([1], [imapclient.SEEN])

        subscribed = {name for _, _, name in c.list_sub_folders()}  # LSUB
        assert subscribed == {"INBOX", "Archive", "Drafts", "Sent", "Trash", "Work/Projects", "Personal"}

    with wire(cluster, user) as w:
        untagged, done = w.command('LIST (SUBSCRIBED) "" "*"')
        assert b" OK " in done
        found = list_lines(untagged)
        assert set(found) == {"INBOX", "Archive", "Drafts", "Sent", "Trash", "Work/Projects", "Personal"}
        assert all("\\subscribed" in attrs for attrs, _ in found.values())

        # RECURSIVEMATCH: a parent that is not subscribed itself comes with CHILDINFO (RFC 5258 §3.5)
        untagged, done = w.command('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
        assert b" OK " in done
        found = list_lines(untagged)
        assert "Work" in found and b'CHILDINFO ("SUBSCRIBED")' in found["Work"][1].upper()
        assert "\\subscribed" not in found["Work"][0]
        assert "Personal" in found and "Junk" not in found

        untagged, done = w.command('LIST (SPECIAL-USE) "" "*"')
        assert b" OK " in done
        found = list_lines(untagged)
        assert set(found) == set(SPECIAL)
        assert all(SPECIAL[name].lower() in attrs for name, (attrs, _) in found.items())

        # LIST-STATUS (RFC 5819): a STATUS after each selectable mailbox's LIST
        untagged, done = w.command('LIST "" "*" RETURN (CHILDREN SPECIAL-USE STATUS (MESSAGES UNSEEN))')
        assert b" OK " in done
        found = list_lines(untagged)
        assert set(found) == {"INBOX", *SPECIAL, "Work", "Work/Projects", "Personal"}
        assert "\\haschildren" in found["Work"][0] and "\\hasnochildren" in found["Personal"][0]
        assert "\\sent" in found["Sent"][0]
        statuses = {line.split(b" ")[2].decode(): status_pairs(line) for line in untagged
                    if line.startswith(b"* STATUS ")}
        assert statuses["INBOX"] == {"MESSAGES": 2, "UNSEEN": 1}
        assert statuses["Work/Projects"] == {"MESSAGES": 0, "UNSEEN": 0}
        assert set(statuses) == set(found)
        for i, line in enumerate(untagged):  # each STATUS right after its mailbox's LIST
            if line.startswith(b"* STATUS "):
                name = line.split(b" ")[2]
                assert untagged[i - 1].startswith(b"* LIST ") and untagged[i - 1].endswith(b" " + name)

        untagged, done = w.command('LIST "" "*" RETURN (SUBSCRIBED)')
        found = list_lines(untagged)
        assert "\\subscribed" in found["Personal"][0] and "\\subscribed" not in found["Junk"][0]

        untagged, done = w.command('LSUB "" "%"')
        assert b" OK " in done
        lsub = list_lines(untagged, b"LSUB")
        # RFC 3501 §6.3.9: "%" does not match Work/Projects; Work is returned \Noselect, as its child is subscribed
        assert {"INBOX", "Personal"} <= set(lsub) and "Work/Projects" not in lsub

        w.command("UNSUBSCRIBE Personal")
        untagged, _ = w.command('LSUB "" "*"')
        assert "Personal" not in list_lines(untagged, b"LSUB")


def test_namespace(cluster, user):
    with client(cluster, user) as c:
        ns = c.namespace()
        assert ns.personal == (("", "/"),)
        assert ns.other is None and ns.shared is None
    conn = imap(cluster, user)
    assert ok(conn.namespace()) == [b'(("" "/")) NIL NIL']
    conn.logout()


def test_create_delete_rename(cluster, user):
    with wire(cluster, user) as w:
        _, done = w.command("CREATE Old-Mail (USE (\\Archive))")  # RFC 6154 §3 CREATE-SPECIAL-USE
        assert b" OK " in done, done
        untagged, _ = w.command('LIST "" Old-Mail')
        assert "\\archive" in list_lines(untagged)["Old-Mail"][0]
        untagged, _ = w.command('LIST "" Old-Mail RETURN (SPECIAL-USE)')
        assert "\\archive" in list_lines(untagged)["Old-Mail"][0]
        _, done = w.command("CREATE Old-Mail")
        assert re.match(rb"w\d+ NO \[ALREADYEXISTS\]", done), done
        _, done = w.command("CREATE inbox")
        assert b" NO " in done
        _, done = w.command("DELETE Not-There")
        assert re.match(rb"w\d+ NO \[NONEXISTENT\]", done), done
        _, done = w.command("DELETE INBOX")
        assert b" NO " in done

    deliver(cluster, user, simple("in inbox 1"), simple("in inbox 2"))
    conn = imap(cluster, user)
    ok(conn.create("Work/Projects/Big"))  # the parents are created too (RFC 9051 §6.3.4)
    assert b'"/" Work' in b" ".join(ok(conn.list('""', "Work")))
    ok(conn.select("INBOX"))
    ok(conn.copy("1", "Work/Projects"))
    ok(conn.close())

    ok(conn.rename("Work", "Job"))  # inferior names move with it (RFC 9051 §6.3.6)
    names = {line.rsplit(b" ", 1)[1].decode() for line in ok(conn.list('""', "*"))}
    assert {"Job", "Job/Projects", "Job/Projects/Big"} <= names and not any(n.startswith("Work") for n in names)
    assert ok(conn.select("Job/Projects")) == [b"1"]  # the message moved along
    ok(conn.close())
    typ, data = conn.rename("Nope", "Nada")
    assert typ == "NO"
    typ, data = conn.rename("Job", "Sent")
    assert typ == "NO" and b"ALREADYEXISTS" in data[0]

    # a mailbox with inferiors: deleting it removes its messages, the name stays as \Noselect (RFC 3501 §6.3.4)
    ok(conn.delete("Job/Projects"))
    lines_ = ok(conn.list('""', "Job*"))
    flags = {line.rsplit(b" ", 1)[1].decode(): line for line in lines_}
    assert set(flags) == {"Job", "Job/Projects", "Job/Projects/Big"}
    assert b"\\Noselect" in flags["Job/Projects"]
    assert conn.select("Job/Projects")[0] == "NO"
    ok(conn.delete("Job/Projects/Big"))

    # RENAME INBOX moves its messages into the new mailbox and leaves INBOX empty (RFC 9051 §6.3.6)
    ok(conn.rename("INBOX", "Saved"))
    assert ok(conn.select("Saved")) == [b"2"]
    assert ok(conn.select("INBOX")) == [b"0"]
    conn.logout()


def test_create_with_an_unknown_special_use_is_useattr(cluster, user):
    with wire(cluster, user) as w:
        _, done = w.command("CREATE Other (USE (\\Nonsense))")
        # RFC 6154 §3: the CREATE fails, and SHOULD say USEATTR
        assert re.match(rb"w\d+ NO \[USEATTR\]", done), done
        untagged, _ = w.command('LIST "" Other')
        assert untagged == []


def test_create_with_a_trailing_delimiter(cluster, user):
    with wire(cluster, user) as w:
        # RFC 9051 §6.3.4 (RFC 3501 the same): a trailing hierarchy delimiter only declares that names will
        # be created under this one; a server that does not need the declaration MUST ignore it
        _, done = w.command("CREATE Trailing/")
        assert re.match(rb"w\d+ OK", done), done
        untagged, _ = w.command('LIST "" Trailing*')
        assert set(list_lines(untagged)) == {"Trailing"}


def test_mailbox_names_that_need_quoting(cluster, user):
    names = ['say "hi"', "back\\slash", "Sp ace", "Sp ace/Child", "{curly}", "paren (x)"]
    with client(cluster, user) as c:
        for name in names:
            c.create_folder(name)
        listed = {name for _, _, name in c.list_folders()}
        assert set(names) <= listed
        for name in names:
            c.append(name, simple(f"in {name}"))
            assert c.select_folder(name)[b"EXISTS"] == 1
        c.rename_folder("Sp ace", 'Sp "ace" 2')
        listed = {name for _, _, name in c.list_folders()}
        assert {'Sp "ace" 2', 'Sp "ace" 2/Child'} <= listed and "Sp ace" not in listed


def test_status_every_item(cluster, user):
    messages = [simple("s1", "a" * 100), simple("s2", "b" * 200), simple("s3", "c" * 300)]
    deliver(cluster, user, *messages)
    with client(cluster, user) as c:
        selected = c.select_folder("INBOX")
        c.add_flags([1], [imapclient.SEEN])
        c.add_flags([2], [imapclient.DELETED])
        c.unselect_folder()
        status = c.folder_status("INBOX", ["MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "RECENT"])
        assert status == {b"MESSAGES": 3, b"UIDNEXT": 4, b"UIDVALIDITY": selected[b"UIDVALIDITY"], b"UNSEEN": 2,
                          b"RECENT": 0}
    with wire(cluster, user) as w:
        untagged, done = w.command("STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE "
                                   "HIGHESTMODSEQ RECENT APPENDLIMIT)")
        assert b" OK " in done
        assert len(untagged) == 1 and untagged[0].startswith(b"* STATUS INBOX (")
        values = status_pairs(untagged[0])
        limit = next(int(c.split("=")[1]) for c in capability_list(w) if c.startswith("APPENDLIMIT="))
        assert values == {"MESSAGES": 3, "UIDNEXT": 4, "UIDVALIDITY": selected[b"UIDVALIDITY"], "UNSEEN": 2,
                          "DELETED": 1, "SIZE": sum(len(m) for m in messages), "HIGHESTMODSEQ": values["HIGHESTMODSEQ"],
                          "RECENT": 0, "APPENDLIMIT": limit}
        assert values["HIGHESTMODSEQ"] >= 1
        untagged, done = w.command("STATUS Nowhere (MESSAGES)")
        assert untagged == [] and re.match(rb"w\d+ NO \[NONEXISTENT\]", done), done
        _, done = w.command("STATUS INBOX (BOGUS)")
        assert b" BAD " in done


def test_non_ascii_mailbox_names(cluster, user):
    with client(cluster, user) as c:  # imapclient encodes names in modified UTF-7 (RFC 3501 §5.1.3)
        c.create_folder("Entwürfe/Übersicht")
        c.create_folder("日本語")
        names = {name for _, _, name in c.list_folders()}
        assert {"Entwürfe", "Entwürfe/Übersicht", "日本語"} <= names
        c.append("Entwürfe/Übersicht", simple("to a non-ASCII mailbox"))
        assert c.select_folder("Entwürfe/Übersicht")[b"EXISTS"] == 1
        c.rename_folder("日本語", "Ωmega & Co")
        assert "Ωmega & Co" in {name for _, _, name in c.list_folders()}
        assert c.folder_status("Ωmega & Co", ["MESSAGES"]) == {b"MESSAGES": 0}

    with wire(cluster, user) as w:
        untagged, _ = w.command('LIST "" "*"')
        raw = list_lines(untagged)
        assert {"Entw&APw-rfe", "Entw&APw-rfe/&ANw-bersicht", "&A6k-mega &- Co"} <= set(raw)
        _, done = w.command("SELECT Entw&APw-rfe/&ANw-bersicht")
        assert b" OK " in done
        _, done = w.command("UNSELECT")
        _, done = w.command("SELECT &Jjo-bad")  # not valid modified UTF-7
        assert b" BAD " in done or b" NO " in done
        _, done = w.command("CREATE \"caf\xc3\xa9\"".encode("latin-1"))  # 8-bit without UTF8=ACCEPT
        assert b" BAD " in done, done

    with wire(cluster, user) as w:  # RFC 6855: after ENABLE UTF8=ACCEPT names are UTF-8 on the wire
        untagged, done = w.command("ENABLE UTF8=ACCEPT")
        assert b" OK " in done and b"* ENABLED UTF8=ACCEPT" in untagged
        untagged, _ = w.command('LIST "" "*"')
        utf8 = list_lines(untagged)
        assert {"Entwürfe", "Entwürfe/Übersicht", "Ωmega & Co"} <= set(utf8)
        _, done = w.command('CREATE "Ордер/Café"'.encode())
        assert b" OK " in done, done
        untagged, done = w.command('SELECT "Entwürfe/Übersicht"'.encode())
        assert b" OK " in done and b"* 1 EXISTS" in untagged
        untagged, done = w.command('STATUS "Ордер/Café" (MESSAGES)'.encode())
        assert untagged == ['* STATUS "Ордер/Café" (MESSAGES 0)'.encode()]

    with client(cluster, user) as c:  # and a modified UTF-7 client sees the same mailbox
        assert "Ордер/Café" in {name for _, _, name in c.list_folders()}


# == 3. SELECT and EXAMINE =====================================================================


def test_select_and_examine_responses(cluster, user):
    deliver(cluster, user, simple("first"), simple("second"))
    with wire(cluster, user) as w:
        untagged, done = w.command("SELECT INBOX")
        assert re.match(rb"w\d+ OK \[READ-WRITE\]", done), done
        assert b"* 2 EXISTS" in untagged
        assert any(re.fullmatch(rb"\* FLAGS \(.*\\Seen.*\)", u) for u in untagged)
        permanent = next(codes(u) for u in untagged if b"[PERMANENTFLAGS" in u)
        assert set(permanent[len("PERMANENTFLAGS ("):-1].split()) >= {"\\Seen", "\\Deleted", "\\Flagged",
                                                                        "\\Answered", "\\Draft", "\\*"}
        uidvalidity = next(int(codes(u).split()[1]) for u in untagged if b"[UIDVALIDITY " in u)
        assert uidvalidity > 0
        assert any(codes(u) == "UIDNEXT 3" for u in untagged)
        assert not any(u.startswith(b"* ") and b"EXPUNGE" in u for u in untagged)

        untagged, done = w.command("EXAMINE INBOX")
        assert re.match(rb"w\d+ OK \[READ-ONLY\]", done), done
        assert b"* 2 EXISTS" in untagged
        assert any(codes(u) == f"UIDVALIDITY {uidvalidity}" for u in untagged)
        assert any(codes(u) == "PERMANENTFLAGS ()" for u in untagged)  # nothing can be changed
        _, done = w.command("STORE 1 +FLAGS (\\Flagged)")
        assert b" NO " in done, done
        _, done = w.command("EXPUNGE")
        assert b" NO " in done, done
        _, done = w.command("MOVE 1 Trash")
        assert b" NO " in done, done
        untagged, done = w.command("FETCH 1 (BODY[TEXT])")  # no \Seen set in EXAMINE (RFC 9051 §6.3.3)
        assert b" OK " in done
        untagged, _ = w.command("FETCH 1 (FLAGS)")
        assert untagged == [b"* 1 FETCH (FLAGS ())"]
        _, done = w.command("COPY 1 Archive")  # copying out of a read-only mailbox is fine
        assert b" OK " in done

        # a SELECT that fails leaves no mailbox selected (RFC 9051 §6.3.2)
        _, done = w.command("SELECT Missing")
        assert re.match(rb"w\d+ NO \[NONEXISTENT\]", done), done
        _, done = w.command("FETCH 1 (FLAGS)")
        assert b" BAD " in done

    with client(cluster, user) as c:
        info = c.select_folder("INBOX", readonly=True)
        assert info[b"EXISTS"] == 2 and info[b"UIDNEXT"] == 3 and info[b"READ-ONLY"] == [b""]
        assert info[b"UIDVALIDITY"] == uidvalidity
        with pytest.raises(IMAPClientError):
            c.add_flags([1], [imapclient.FLAGGED])
        info = c.select_folder("INBOX")
        assert b"READ-WRITE" in info
        assert b"\\*" in info[b"PERMANENTFLAGS"]
        assert c.add_flags([1], [imapclient.FLAGGED]) == {1: (b"\\Flagged",)}
    conn = imap(cluster, user)
    assert ok(conn.select("INBOX", readonly=True)) == [b"2"]
    typ, _ = conn.store("1", "+FLAGS", "(\\Seen)")
    assert typ == "NO"
    conn.logout()


# == 4. FETCH ===================================================================================


@pytest.fixture
def mime_box(cluster, user):
    """``user`` with the nested multipart (1) and the 8-bit message (2) delivered."""
    m = Multipart()
    deliver(cluster, user, m.raw, eightbit_message())
    return user, m


def _text_part(part: tuple, subtype: bytes, charset: bytes, encoding: bytes, body: bytes) -> None:
    assert lower(part[:7]) == (b"text", subtype, (b"charset", charset), None, None, encoding, len(body))
    crlfs = body.count(b"\r\n")
    # a body ending before a boundary has its last line without CRLF: count it or not, both are seen
    assert part[7] == crlfs if body.endswith(b"\r\n") else part[7] in (crlfs, crlfs + 1)


def test_fetch_bodystructure_and_envelope(cluster, mime_box):
    user, m = mime_box
    with client(cluster, user) as c:
        c.select_folder("INBOX")
        data = c.fetch([1], ["BODYSTRUCTURE", "BODY", "ENVELOPE", "RFC822.SIZE", "INTERNALDATE", "FLAGS", "UID"])[1]
        assert data[b"RFC822.SIZE"] == len(m.raw)
        assert data[b"SEQ"] == 1 and data[b"FLAGS"] == ()
        received = data[b"INTERNALDATE"]  # imapclient: local time, naive
        assert abs((datetime.datetime.now() - received).total_seconds()) < 120

        bs = data[b"BODYSTRUCTURE"]
        assert bs.is_multipart
        parts, subtype, params = bs[0], bs[1], bs[2]
        assert lower(subtype) == b"mixed" and lower(params) == (b"boundary", b"out-b")
        assert len(parts) == 3
        alternative = parts[0]
        assert alternative.is_multipart and lower(alternative[1]) == b"alternative"
        assert lower(alternative[2]) == (b"boundary", b"alt-b")
        _text_part(alternative[0][0], b"plain", b"utf-8", b"quoted-printable", m.plain)
        _text_part(alternative[0][1], b"html", b"utf-8", b"quoted-printable", m.html)
        pdf = parts[1]
        assert lower(pdf[:7]) == (b"application", b"pdf", (b"name", b"report.pdf"), None, None, b"base64",
                                  len(m.pdf_body))
        assert pdf[7] is None  # md5
        assert lower(pdf[8]) == (b"attachment", (b"filename", b"report.pdf"))  # disposition (RFC 2183)
        inner = parts[2]
        assert lower(inner[:7]) == (b"message", b"rfc822", None, None, None, b"7bit", len(m.inner))
        inner_envelope, inner_lines = inner[7], inner[9]
        inner_body = imapclient.response_types.BodyData.create(inner[8])  # imapclient leaves it raw
        assert inner_envelope[1] == b"inner message"
        assert inner_envelope[2][0][2:] == (b"inner", b"remote.test")
        assert inner_envelope[9] == b"<inner@remote.test>"
        assert inner_lines == m.inner.count(b"\r\n")
        assert lower(inner_body[1]) == b"mixed" and len(inner_body[0]) == 2
        _text_part(inner_body[0][0], b"plain", b"us-ascii", b"7bit", m.inner_text)
        assert lower(inner_body[0][1][:7]) == (b"image", b"png", None, None, None, b"base64", len(m.png_body))

        body = data[b"BODY"]  # BODY: the same structure without extension data
        assert body.is_multipart and len(body) == 2 and lower(body[1]) == b"mixed"
        assert len(body[0][1]) == 7  # a basic part: type ... size, nothing more

        env = data[b"ENVELOPE"]
        sent = datetime.datetime(2026, 3, 2, 10, 11, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
        assert env.date == sent.astimezone().replace(tzinfo=None)
        assert env.subject == Multipart.SUBJECT_WORD.encode()  # ENVELOPE carries the header as sent
        assert [(a.name, a.mailbox, a.host) for a in env.from_] == [(Multipart.FROM_WORD.encode(), b"joerg",
                                                                      b"remote.test")]
        assert env.sender == env.from_  # no Sender: field: the From (RFC 9051 §7.5.2)
        assert [(a.name, a.mailbox, a.host) for a in env.reply_to] == [(None, b"replies", b"remote.test")]
        assert [(a.name, a.mailbox, a.host) for a in env.to] == [(b"Ann Example", b"ann", b"example.org"),
                                                                 (None, b"bob", b"example.org")]
        assert [(a.name, a.mailbox, a.host) for a in env.cc] == [(b"Carol", b"carol", b"remote.test")]
        assert env.bcc is None
        assert env.in_reply_to == b"<m0@remote.test>" and env.message_id == b"<m1@remote.test>"

        eight = c.fetch([2], ["BODYSTRUCTURE", "ENVELOPE"])[2]
        body8 = eightbit_message().split(b"\r\n\r\n", 1)[1]
        _text_part(eight[b"BODYSTRUCTURE"], b"plain", b"utf-8", b"8bit", body8)
        assert eight[b"ENVELOPE"].subject == "Café crème 8bit".encode()
        assert eight[b"ENVELOPE"].from_[0].name == "Zoë".encode()


def test_envelope_groups_quoting_and_folding(cluster, user):
    deliver(cluster, user, lines('From: "Doe, John \\"JD\\"" <john@x.test>', "To: undisclosed-recipients:;",
                                 'Cc: Team: a@x.test, "B b" <b@x.test>;, solo@x.test',
                                 'Subject: a "quoted" \\ back', " folded here", "", "body"))
    with client(cluster, user) as c:
        c.select_folder("INBOX")
        env = c.fetch([1], ["ENVELOPE"])[1][b"ENVELOPE"]
        assert env.subject == b'a "quoted" \\ back folded here'  # unfolded (RFC 5322 §2.2.3)
        assert [(a.name, a.mailbox, a.host) for a in env.from_] == [(b'Doe, John "JD"', b"john", b"x.test")]
        # a group is a start marker (NIL NIL name NIL) and an end marker (NIL NIL NIL NIL) (RFC 9051 §7.5.2)
        assert [(a.name, a.route, a.mailbox, a.host) for a in env.to] == [
            (None, None, b"undisclosed-recipients", None), (None, None, None, None)]
        assert [(a.name, a.mailbox, a.host) for a in env.cc] == [
            (None, b"Team", None), (None, b"a", b"x.test"), (b"B b", b"b", b"x.test"), (None, None, None),
            (None, b"solo", b"x.test")]
        assert env.date is None  # no Date: NIL


def test_fetch_every_section(cluster, mime_box):
    user, m = mime_box
    eight = eightbit_message()
    wanted = {
        "BODY.PEEK[]": m.raw,
        "BODY.PEEK[HEADER]": m.header,
        "BODY.PEEK[TEXT]": m.text,
        "BODY.PEEK[1]": m.alt_body,
        "BODY.PEEK[1.MIME]": m.alt_mime,
        "BODY.PEEK[1.1]": m.plain,
        "BODY.PEEK[1.1.MIME]": m.plain_mime,
        "BODY.PEEK[1.2]": m.html,
        "BODY.PEEK[2]": m.pdf_body,
        "BODY.PEEK[2.MIME]": m.pdf_mime,
        "BODY.PEEK[3]": m.inner,  # message/rfc822: the whole encapsulated message
        "BODY.PEEK[3.MIME]": m.rfc822_mime,
        "BODY.PEEK[3.HEADER]": m.inner_header,
        "BODY.PEEK[3.TEXT]": m.inner_body,
        "BODY.PEEK[3.1]": m.inner_text,
        "BODY.PEEK[3.1.MIME]": m.inner_plain_mime,
        "BODY.PEEK[3.2]": m.png_body,
        "BODY.PEEK[HEADER.FIELDS (Subject From)]": lines(f"From: {Multipart.FROM_WORD} <joerg@remote.test>",
                                                          f"Subject: {Multipart.SUBJECT_WORD}", ""),
        "BODY.PEEK[HEADER.FIELDS (x-long-header)]": lines("X-Long-Header: first part of a folded",
                                                           "\tvalue on a second line", ""),
        "BODY.PEEK[HEADER.FIELDS (No-Such-Field)]": b"\r\n",
        "BODY.PEEK[3.HEADER.FIELDS (Subject)]": lines("Subject: inner message", ""),
        "BODY.PEEK[HEADER.FIELDS.NOT (Subject From To Cc Date Message-ID In-Reply-To X-Long-Header MIME-Version "
        "Content-Type)]": lines("Reply-To: replies@remote.test", ""),
        "RFC822.HEADER": m.header,
        "RFC822.SIZE": len(m.raw),
        "BINARY.PEEK[1.1]": m.plain_decoded,
        "BINARY.SIZE[1.1]": len(m.plain_decoded),
        "BINARY.SIZE[2]": len(PDF),
    }
    with client(cluster, user) as c:
        c.select_folder("INBOX")
        got = {key.upper(): value for key, value in c.fetch([1], list(wanted))[1].items()}
        for item, value in wanted.items():
            key = item.replace(".PEEK", "").upper().encode()
            assert key in got, (item, sorted(got))
            assert got[key] == value, item
        assert c.get_flags([1]) == {1: ()}  # PEEK, RFC822.HEADER and BINARY.PEEK leave \Seen alone

        partial = c.fetch([1], ["BODY.PEEK[TEXT]<0.10>", "BODY.PEEK[]<5.7>", "BODY.PEEK[1.1]<4.100000>",
                                "BODY.PEEK[2]<100000.10>"])[1]
        assert partial[b"BODY[TEXT]<0>"] == m.text[:10]
        assert partial[b"BODY[]<5>"] == m.raw[5:12]
        assert partial[b"BODY[1.1]<4>"] == m.plain[4:]
        assert partial[b"BODY[2]<100000>"] == b""  # past the end: empty (RFC 9051 §6.4.5)

        whole = c.fetch([1, 2], ["RFC822", "RFC822.TEXT"])  # RFC822 and RFC822.TEXT set \Seen
        assert whole[1][b"RFC822"] == m.raw and whole[1][b"RFC822.TEXT"] == m.text
        assert whole[2][b"RFC822"] == eight
        assert c.get_flags([1, 2]) == {1: (b"\\Seen",), 2: (b"\\Seen",)}

        by_uid = c.fetch([1, 2], ["BODY.PEEK[]"])  # imapclient uses UID FETCH
        assert by_uid[1][b"BODY[]"] == m.raw and by_uid[2][b"BODY[]"] == eight

    conn = imap(cluster, user)  # BINARY of the PDF: a literal8 with NULs (RFC 3516), which imaplib takes
    ok(conn.select("INBOX"))
    data = ok(conn.fetch("1", "(BINARY.PEEK[2] BINARY.PEEK[3.2] BINARY.SIZE[3.2])"))
    items = {}
    for piece in data:
        if isinstance(piece, tuple):
            items[re.search(rb"(BINARY\[[\d.]+\])\s*~?\{\d+\}$", piece[0]).group(1)] = piece[1]
    assert items[b"BINARY[2]"] == PDF
    assert items[b"BINARY[3.2]"] == PNG
    assert f"BINARY.SIZE[3.2] {len(PNG)}".encode() in b" ".join(p[0] if isinstance(p, tuple) else p for p in data)
    data = ok(conn.fetch("2", "(BINARY.PEEK[1] BODY.PEEK[1])"))  # a non-multipart message: part 1 is its body
    assert data[0][1] == eight.split(b"\r\n\r\n", 1)[1] == data[1][1]
    conn.logout()

    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        untagged, done = w.command("FETCH 1 (BINARY[2])")
        assert b" OK " in done
        assert untagged[0].startswith(b"* 1 FETCH (BINARY[2] ~{%d}\r\n" % len(PDF))  # NULs: literal8
        assert PDF in untagged[0]
        untagged, done = w.command("FETCH 1 (BINARY[9])")  # no such part (RFC 3516 §4.2)
        assert b" NO " in done or (b" OK " in done and untagged in ([b'* 1 FETCH (BINARY[9] "")'],
                                                                    [b'* 1 FETCH (BINARY[9] {0}\r\n)']))
        untagged, done = w.command("UID FETCH 1 (FLAGS)")  # UID FETCH always returns the UID
        assert re.fullmatch(rb"\* 1 FETCH \((?=.*UID 1\b)(?=.*FLAGS \().*\)", untagged[0]), untagged
        untagged, done = w.command("FETCH 1 (BODY[2.1])")  # a part of a non-multipart part: nothing there
        assert b" OK " in done and untagged in ([b'* 1 FETCH (BODY[2.1] "")'], [b'* 1 FETCH (BODY[2.1] {0}\r\n)'])


def test_fetch_macros_odd_sets_and_partial_binary(cluster, mime_box):
    user, m = mime_box
    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        untagged, _ = w.command("FETCH 1 FAST")  # = (FLAGS INTERNALDATE RFC822.SIZE)
        assert re.fullmatch(rb'\* 1 FETCH \((?=.*FLAGS \(\))(?=.*INTERNALDATE ")(?=.*RFC822.SIZE %d)'
                            rb'(?!.*ENVELOPE).*\)' % len(m.raw), untagged[0]), untagged
        untagged, _ = w.command("FETCH 1 ALL")  # FAST + ENVELOPE
        assert b"ENVELOPE (" in untagged[0] and b"RFC822.SIZE" in untagged[0] and b"BODY (" not in untagged[0]
        untagged, _ = w.command("FETCH 1 FULL")  # ALL + BODY
        assert b"ENVELOPE (" in untagged[0] and b"BODY (" in untagged[0]
        # UID ranges past the last UID: "100:*" still names the last message (RFC 9051 §6.4.8)
        untagged, _ = w.command("UID FETCH 100:* (FLAGS)")
        assert len(untagged) == 1 and untagged[0].startswith(b"* 2 FETCH ("), untagged
        untagged, done = w.command("UID FETCH 100:200 (FLAGS)")
        assert b" OK " in done and untagged == []
        untagged, _ = w.command("FETCH 2:1 (UID)")  # a range may be given high:low
        assert untagged == [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 2)"]
        untagged, _ = w.command("FETCH 1 (BINARY.PEEK[2]<10.20>)")  # partial BINARY: decoded octets 10-29
        assert untagged == [b"* 1 FETCH (BINARY[2]<10> ~{20}\r\n" + PDF[10:30] + b")"] or untagged == [
            b"* 1 FETCH (BINARY[2]<10> {20}\r\n" + PDF[10:30] + b")"], untagged
        # SEARCH $ with nothing saved is an empty set, not an error (RFC 5182 §2.1)
        untagged, done = w.command("SEARCH $")
        assert b" OK " in done and untagged == [b"* SEARCH"]


def test_body_sets_seen_and_peek_does_not(cluster, user):
    deliver(cluster, user, simple("one", "first body"), simple("two", "second body"))
    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        untagged, _ = w.command("FETCH 1 (BODY.PEEK[TEXT])")
        assert untagged == [b"* 1 FETCH (BODY[TEXT] {12}\r\nfirst body\r\n)"]
        untagged, _ = w.command("FETCH 1:2 (FLAGS)")
        assert untagged == [b"* 1 FETCH (FLAGS ())", b"* 2 FETCH (FLAGS ())"]
        # BODY[...] sets \Seen, and the FETCH says so even though FLAGS was not asked for (RFC 9051 §6.4.5)
        untagged, _ = w.command("FETCH 1 (BODY[TEXT])")
        assert len(untagged) == 1 and untagged[0].startswith(b"* 1 FETCH (")
        assert b"BODY[TEXT] {12}\r\nfirst body\r\n" in untagged[0] and b"FLAGS (\\Seen)" in untagged[0]
        untagged, _ = w.command("FETCH 1:2 (FLAGS)")
        assert untagged == [b"* 1 FETCH (FLAGS (\\Seen))", b"* 2 FETCH (FLAGS ())"]
        untagged, _ = w.command("FETCH 1 (BODY[TEXT])")  # already \Seen: no FLAGS needed now
        assert b"BODY[TEXT]" in untagged[0]
        untagged, _ = w.command("FETCH 2 (RFC822.HEADER)")  # = BODY.PEEK[HEADER]
        untagged, _ = w.command("FETCH 2 (FLAGS)")
        assert untagged == [b"* 2 FETCH (FLAGS ())"]
        untagged, _ = w.command("FETCH 2 (BINARY[1])")  # BINARY (not .PEEK) sets \Seen too (RFC 3516)
        assert b"\\Seen" in untagged[0]

    conn = imap(cluster, user)
    ok(conn.select("INBOX"))
    ok(conn.store("1:2", "-FLAGS", "(\\Seen)"))
    data = ok(conn.fetch("2", "(BODY.PEEK[])"))
    assert b"\\Seen" not in repr(data).encode()
    data = ok(conn.fetch("2", "(BODY[])"))
    assert b"FLAGS (\\Seen)" in b"".join(p if isinstance(p, bytes) else p[0] for p in data)
    conn.logout()


# == 5. SEARCH ==================================================================================

UTC = datetime.UTC


# The four appended messages are dated on days 1, 5, 7 and 10 of a month well before today (the delivered
# fifth is dated now), so that date searches do not depend on the clock.
_BASE = datetime.datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0) - datetime.timedelta(days=60)


def _at(day: int) -> datetime.datetime:
    return _BASE + datetime.timedelta(days=day - 1)


def _day(day: int) -> str:
    """``_at(day)`` as an IMAP date (RFC 9051 date: d-Mon-yyyy)."""
    return f"{_at(day).day}-{_at(day).strftime('%b-%Y')}"


@pytest.fixture
def search_box(cluster, user):
    """Five messages at sequence numbers 1-5 with UIDs 2-6 (UID 1 was expunged), each one told apart by some key."""
    now = datetime.datetime.now(UTC)
    deliver(cluster, user, simple("throw away"))
    with client(cluster, user) as c:
        c.append("INBOX", simple("alpha report", "the quarterly numbers", "Alice <alice@remote.test>",
                                 email.utils.format_datetime(_at(1))), [imapclient.SEEN], _at(1))
        c.append("INBOX", simple("beta", "nothing to see here", "Bob <bob@remote.test>",
                                 email.utils.format_datetime(_at(5))),
                 [imapclient.FLAGGED, imapclient.ANSWERED, "$Important"], _at(5))
        c.append("INBOX", lines("From: Carl <carl@remote.test>", "To: someone@example.org",
                                f"Subject: {Multipart.SUBJECT_WORD}", "Date: " + email.utils.format_datetime(_at(7)),
                                "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                                "Content-Transfer-Encoding: 8bit", "", "Viele Grüße aus der Straße"), [], _at(7))
        c.append("INBOX", simple("big one", "\r\n".join(["x" * 70] * 100), "Dora <dora@remote.test>",
                                 email.utils.format_datetime(_at(10)), ("X-Custom: magic-value",)),
                 [imapclient.DELETED, imapclient.DRAFT], _at(10))
    deliver(cluster, user, simple("fresh", "just delivered", "Eve <eve@remote.test>",
                                  email.utils.format_datetime(now)))
    with client(cluster, user) as c:
        c.select_folder("INBOX")
        c.add_flags([1], [imapclient.DELETED])
        c.expunge([1])  # UID EXPUNGE 1: UID 5 is \Deleted too, and stays
        assert c.search("ALL") == [2, 3, 4, 5, 6]
    return user


def esearch(untagged: list[bytes], tag: str) -> tuple[bool, dict[str, str]]:
    """The one ``* ESEARCH (TAG "tag") [UID] name value...`` response: (uid, {name: value}); the order is free."""
    assert len(untagged) == 1, untagged
    match = re.fullmatch(rb'\* ESEARCH \(TAG "' + tag.encode() + rb'"\)( UID)?((?: [A-Z]+ [\d:,]+)*)', untagged[0])
    assert match, untagged
    pairs = match.group(2).decode().split()
    return bool(match.group(1)), dict(zip(pairs[::2], pairs[1::2]))


def search(w: Wire, criteria: str | bytes) -> list[int]:
    untagged, done = w.command(b"SEARCH " + (criteria.encode() if isinstance(criteria, str) else criteria))
    assert b" OK " in done, (criteria, done)
    found = [u for u in untagged if u.startswith(b"* SEARCH")]
    assert len(found) == 1, untagged
    return [int(n) for n in found[0].split()[2:]]


def test_search_keys(cluster, search_box):
    user = search_box
    today = datetime.datetime.now(UTC).strftime("%d-%b-%Y")
    expected = {
        "ALL": [1, 2, 3, 4, 5],
        "SEEN": [1], "UNSEEN": [2, 3, 4, 5], "FLAGGED": [2], "UNFLAGGED": [1, 3, 4, 5],
        "ANSWERED": [2], "UNANSWERED": [1, 3, 4, 5], "DELETED": [4], "UNDELETED": [1, 2, 3, 5],
        "DRAFT": [4], "UNDRAFT": [1, 2, 3, 5], "KEYWORD $Important": [2], "UNKEYWORD $Important": [1, 3, 4, 5],
        "KEYWORD $NotThere": [],
        "FROM alice": [1], "FROM ALICE@REMOTE": [1], "FROM remote.test": [1, 2, 3, 4, 5], "TO someone": [1, 2, 3, 4, 5],
        "CC anybody": [], "BCC anybody": [],
        'SUBJECT "beta"': [2], "SUBJECT BETA": [2], 'SUBJECT "big one"': [4], "SUBJECT report": [1],
        "HEADER X-Custom magic": [4], 'HEADER X-Custom ""': [4], "HEADER x-custom MAGIC-VALUE": [4],
        "BODY quarterly": [1], "BODY alice": [], "TEXT alice": [1], "TEXT quarterly": [1], "TEXT nowhere": [],
        f"BEFORE {_day(5)}": [1], f"ON {_day(5)}": [2], f"SINCE {_day(7)}": [3, 4, 5], f"SINCE {_day(11)}": [5],
        f"ON {today}": [5], f"SINCE {today}": [5],
        f"SENTBEFORE {_day(5)}": [1], f"SENTON {_day(7)}": [3], f"SENTSINCE {_day(10)}": [4, 5],
        f"SENTON {_day(6)}": [],
        "LARGER 5000": [4], "SMALLER 5000": [1, 2, 3, 5], "LARGER 100000": [],
        "UID 3:4": [2, 3], "UID 5:*": [4, 5], "UID 1": [], "UID 2,6": [1, 5], "UID 4:2": [1, 2, 3],
        "2,4": [2, 4], "4:*": [4, 5], "*": [5], "1:2,5": [1, 2, 5], "3:2": [2, 3],
        "NOT SEEN": [2, 3, 4, 5], "OR FROM alice FROM bob": [1, 2], "NOT (OR SEEN FLAGGED)": [3, 4, 5],
        "(FROM bob FLAGGED)": [2], "SEEN FROM bob": [], "FROM bob FLAGGED ANSWERED": [2],
        "OR (SEEN SUBJECT alpha) (DELETED LARGER 5000)": [1, 4], "NOT NOT SEEN": [1], "1:3 UNSEEN": [2, 3],
        "OLD": [1, 2, 3, 4, 5], "NEW": [], "RECENT": [],
    }
    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        got = {criteria: search(w, criteria) for criteria in expected}
        assert got == expected
        # UID SEARCH answers UIDs
        untagged, done = w.command("UID SEARCH FROM alice")
        assert untagged == [b"* SEARCH 2"] and b" OK " in done
        untagged, _ = w.command("UID SEARCH UNSEEN")
        assert untagged == [b"* SEARCH 3 4 5 6"]
        # non-ASCII: a literal with CHARSET UTF-8; encoded-words (RFC 2047) are decoded before matching
        for key, text in (("SUBJECT", "Köln"), ("SUBJECT", "grüSSe"), ("BODY", "Straße"), ("TEXT", "Grüße")):
            data = text.encode()
            found = search(w, b"CHARSET UTF-8 %s {%d+}\r\n%s" % (key.encode(), len(data), data))
            assert found == ([3] if text != "grüSSe" else []), (key, text, found)
        assert search(w, b'CHARSET UTF-8 SUBJECT "aus"') == [3]
        assert search(w, b"CHARSET US-ASCII FROM carl") == [3]
        _, done = w.command("SEARCH CHARSET KOI8-R SUBJECT x")
        assert re.match(rb"w\d+ NO \[BADCHARSET", done), done
        _, done = w.command("SEARCH 9 ALL")  # past the last message: BAD
        assert b" BAD " in done or b" OK " in done
        _, done = w.command("SEARCH NOSUCHKEY")
        assert b" BAD " in done

    with client(cluster, user) as c:  # imapclient searches by UID
        c.select_folder("INBOX")
        assert c.search(["FROM", "bob"]) == [3]
        assert c.search(["SUBJECT", "Köln"], charset="UTF-8") == [4]
        assert c.search(["OR", "SEEN", "DELETED"]) == [2, 5]
        assert c.search(["SINCE", _at(7).date(), "UNDELETED"]) == [4, 6]
    conn = imap(cluster, user)  # imaplib: a synchronizing literal for the UTF-8 string
    ok(conn.select("INBOX"))
    conn.literal = "Straße".encode()
    assert ok(conn.search("UTF-8", "BODY")) == [b"3"]
    assert ok(conn.uid("SEARCH", "LARGER", "5000")) == [b"5"]
    conn.logout()


def test_search_header_with_an_empty_string_needs_the_field(cluster, user):
    deliver(cluster, user, lines("From: a@remote.test", "Subject: no cc, no message-id", "", "x"),
            lines("From: b@remote.test", "Cc: c@remote.test", "Message-ID: <b@remote.test>", "Subject: has both",
                  "", "y"))
    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        # RFC 3501 §6.4.4 / RFC 9051 §6.4.4: "If the string to search is zero-length, this matches all
        # messages that have a header line with the specified field-name regardless of the contents."
        assert search(w, 'HEADER X-Nope ""') == []
        assert search(w, 'HEADER Cc ""') == [2]
        assert search(w, 'HEADER Message-ID ""') == [2]
        assert search(w, 'HEADER To ""') == []


def test_searchres_save_with_min_saves_only_the_minimum(cluster, search_box):
    with wire(cluster, search_box) as w:
        w.command("SELECT INBOX")
        # RFC 5182 §2.1 (RFC 9051 §6.4.4.1): "If the SAVE result option is combined with the MIN or MAX
        # result option, and none of the other ESEARCH result options are present, the corresponding
        # MIN/MAX is saved."
        untagged, _ = w.command("SEARCH RETURN (SAVE MIN) UNSEEN", tag="e6")
        assert esearch(untagged, "e6") == (False, {"MIN": "2"})
        untagged, _ = w.command("FETCH $ (UID)")
        assert untagged == [b"* 2 FETCH (UID 3)"]
        untagged, _ = w.command("SEARCH RETURN (SAVE MIN MAX) UNSEEN", tag="e7")
        assert esearch(untagged, "e7") == (False, {"MIN": "2", "MAX": "5"})
        untagged, _ = w.command("FETCH $ (UID)")
        assert untagged == [b"* 2 FETCH (UID 3)", b"* 5 FETCH (UID 6)"]


def test_esearch_and_searchres(cluster, search_box):
    user = search_box
    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        untagged, done = w.command("SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN", tag="e1")
        assert b" OK " in done
        assert esearch(untagged, "e1") == (False, {"MIN": "2", "MAX": "5", "COUNT": "4", "ALL": "2:5"})
        untagged, _ = w.command("UID SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN", tag="e2")
        assert esearch(untagged, "e2") == (True, {"MIN": "3", "MAX": "6", "COUNT": "4", "ALL": "3:6"})
        untagged, _ = w.command("SEARCH RETURN () OR SEEN DELETED", tag="e3")  # () means ALL (RFC 4731 §3.1)
        assert esearch(untagged, "e3") == (False, {"ALL": "1,4"})
        untagged, _ = w.command("SEARCH RETURN (COUNT) FROM nobody", tag="e4")
        assert esearch(untagged, "e4") == (False, {"COUNT": "0"})
        untagged, _ = w.command("SEARCH RETURN (MIN MAX ALL) FROM nobody", tag="e5")
        assert esearch(untagged, "e5") == (False, {})  # nothing found: no MIN, MAX or ALL

        # SEARCHRES (RFC 5182): SAVE alone returns nothing, then $ names the result
        untagged, done = w.command("SEARCH RETURN (SAVE) OR FLAGGED DELETED")
        assert b" OK " in done and untagged == []
        untagged, _ = w.command("FETCH $ (UID)")
        assert untagged == [b"* 2 FETCH (UID 3)", b"* 4 FETCH (UID 5)"]
        assert search(w, "$") == [2, 4]
        assert search(w, "$ SEEN") == []
        untagged, _ = w.command("UID SEARCH UID $")
        assert untagged == [b"* SEARCH 3 5"]
        untagged, done = w.command("STORE $ +FLAGS (\\Seen)")
        assert b" OK " in done and len(untagged) == 2
        assert search(w, "SEEN") == [1, 2, 4]
        untagged, _ = w.command("UID FETCH $ (FLAGS)")
        assert [re.match(rb"\* (\d+) FETCH", u).group(1) for u in untagged] == [b"2", b"4"]
        _, done = w.command("COPY $ Archive")
        assert b" OK " in done and codes(done).startswith("COPYUID ")

        # SAVE with another option than MIN/MAX saves every match (RFC 5182 §2.1)
        untagged, _ = w.command("UID SEARCH RETURN (SAVE COUNT) UNSEEN", tag="e7")
        assert esearch(untagged, "e7") == (True, {"COUNT": "2"})
        untagged, _ = w.command("FETCH $ (UID)")
        assert untagged == [b"* 3 FETCH (UID 4)", b"* 5 FETCH (UID 6)"]


# == 6. STORE and CONDSTORE =====================================================================


def test_store_flags_and_keywords(cluster, user):
    deliver(cluster, user, simple("one"), simple("two"), simple("three"))
    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        untagged, done = w.command("STORE 1 +FLAGS (\\Flagged \\Seen)")
        assert b" OK " in done
        assert len(untagged) == 1 and untagged[0].startswith(b"* 1 FETCH (FLAGS (")
        assert set(re.search(rb"FLAGS \(([^)]*)\)", untagged[0]).group(1).split()) == {b"\\Flagged", b"\\Seen"}
        untagged, _ = w.command("STORE 1:2 +FLAGS.SILENT (\\Answered)")
        assert untagged == []  # .SILENT: no echo of our own change
        untagged, _ = w.command("STORE 1 -FLAGS (\\Seen)")
        assert len(untagged) == 1 and b"\\Seen" not in untagged[0] and b"\\Flagged" in untagged[0]
        untagged, _ = w.command("STORE 2 FLAGS (\\Draft $Label1 custom-keyword)")
        assert len(untagged) == 1
        flags = set(re.search(rb"FLAGS \(([^)]*)\)", untagged[0]).group(1).split())
        assert flags == {b"\\Draft", b"$Label1", b"custom-keyword"}  # FLAGS replaces: \Answered is gone
        untagged, _ = w.command("UID STORE 3 +FLAGS ($Important)")  # UID STORE answers with the UID
        assert re.fullmatch(rb"\* 3 FETCH \((?=.*UID 3\b)(?=.*FLAGS \(\$Important\)).*\)", untagged[0]), untagged
        untagged, _ = w.command("FETCH 1:3 (FLAGS)")
        got = [set(re.search(rb"FLAGS \(([^)]*)\)", u).group(1).split()) for u in untagged]
        assert got == [{b"\\Flagged", b"\\Answered"}, {b"\\Draft", b"$Label1", b"custom-keyword"}, {b"$Important"}]
        untagged, _ = w.command("STORE 2 -FLAGS.SILENT (custom-keyword)")
        assert untagged == []
        untagged, done = w.command("STORE 1 +FLAGS (\\Recent)")  # \Recent cannot be stored (RFC 3501 §2.3.2)
        assert b" BAD " in done or (b" OK " in done and b"\\Recent" not in b"".join(untagged))
        _, done = w.command("STORE 9 +FLAGS (\\Seen)")
        assert b" BAD " in done or b" NO " in done  # no message 9
        _, done = w.command("STORE 1 +FLAGS (\\Bogus)")
        assert b" BAD " in done or b" NO " in done  # not a system flag

        # flags are per message and survive a re-selection; a new keyword shows in FLAGS / PERMANENTFLAGS
        untagged, _ = w.command("SELECT INBOX")
        flags_line = next(u for u in untagged if u.startswith(b"* FLAGS"))
        assert b"\\Seen" in flags_line

    with client(cluster, user) as c:
        c.select_folder("INBOX")
        assert set(c.get_flags([1])[1]) == {b"\\Answered", b"\\Flagged"}
        assert set(c.add_flags([2], ["$Work"])[2]) == {b"\\Draft", b"$Label1", b"$Work"}
        assert c.remove_flags([2], ["$Work", "$Label1"]) == {2: (b"\\Draft",)}
        assert c.set_flags([3], [imapclient.SEEN]) == {3: (b"\\Seen",)}
        assert c.search(["KEYWORD", "$Important"]) == []
        assert c.search(["SEEN"]) == [3]
    conn = imap(cluster, user)
    ok(conn.select("INBOX"))
    data = ok(conn.store("1:3", "+FLAGS", "(\\Deleted)"))
    assert len(data) == 3 and all(b"\\Deleted" in d for d in data)
    conn.logout()


def test_condstore(cluster, user):
    deliver(cluster, user, simple("one"), simple("two"), simple("three"))
    with wire(cluster, user) as w:
        untagged, done = w.command("SELECT INBOX (CONDSTORE)")  # RFC 7162 §3.1.8
        assert b" OK " in done
        highest = next(int(codes(u).split()[1]) for u in untagged if b"[HIGHESTMODSEQ " in u)
        untagged, _ = w.command("FETCH 1:3 (MODSEQ)")
        modseqs = [int(re.search(rb"MODSEQ \((\d+)\)", u).group(1)) for u in untagged]
        assert len(modseqs) == 3 and max(modseqs) == highest and all(m > 0 for m in modseqs)

        untagged, done = w.command("STORE 2 +FLAGS (\\Flagged)")
        assert b" OK " in done
        changed = int(re.search(rb"MODSEQ \((\d+)\)", untagged[0]).group(1))  # CONDSTORE on: MODSEQ in the echo
        assert changed > highest
        untagged, _ = w.command(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})")
        assert len(untagged) == 1 and untagged[0].startswith(b"* 2 FETCH (")
        assert b"MODSEQ (%d)" % changed in untagged[0] and b"\\Flagged" in untagged[0]
        untagged, _ = w.command(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {changed})")
        assert untagged == []
        untagged, _ = w.command(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})")
        assert len(untagged) == 1 and b"UID 2" in untagged[0]

        # UNCHANGEDSINCE: message 2 changed after `highest`, so it is not stored and is named in MODIFIED
        untagged, done = w.command(f"STORE 1:2 (UNCHANGEDSINCE {highest}) +FLAGS (\\Seen)")
        assert re.match(rb"w\d+ OK \[MODIFIED 2\]", done), done
        assert len(untagged) == 1 and untagged[0].startswith(b"* 1 FETCH (") and b"\\Seen" in untagged[0]
        untagged, _ = w.command("FETCH 2 (FLAGS)")
        assert b"\\Seen" not in untagged[0]
        untagged, done = w.command(f"UID STORE 2,3 (UNCHANGEDSINCE {highest}) +FLAGS.SILENT (\\Answered)")
        assert re.match(rb"w\d+ OK \[MODIFIED 2\]", done), done  # UID STORE: a UID set
        assert len(untagged) == 1 and untagged[0].startswith(b"* 3 FETCH (")  # .SILENT still gives MODSEQ
        assert b"MODSEQ (" in untagged[0] and b"FLAGS" not in untagged[0]
        untagged, done = w.command(f"STORE 2 (UNCHANGEDSINCE {changed}) -FLAGS (\\Flagged)")
        assert re.match(rb"w\d+ OK STORE", done) and b"MODIFIED" not in done, done

        untagged, done = w.command(f"SEARCH MODSEQ {changed + 1}")
        assert b" OK " in done and untagged[0].startswith(b"* SEARCH ") and b"(MODSEQ " in untagged[0]
        untagged, _ = w.command("STATUS Archive (HIGHESTMODSEQ)")
        assert b"HIGHESTMODSEQ" in untagged[0]

    with client(cluster, user) as c:  # imapclient: CHANGEDSINCE as a FETCH modifier
        info = c.select_folder("INBOX")
        assert info[b"HIGHESTMODSEQ"] > changed
        assert c.fetch([1, 2, 3], ["FLAGS"], modifiers=[f"CHANGEDSINCE {info[b'HIGHESTMODSEQ']}"]) == {}
        assert set(c.fetch([1, 2, 3], ["FLAGS"], modifiers=[f"CHANGEDSINCE {highest}"])) == {1, 2, 3}


# == 7. COPY, MOVE, EXPUNGE, CLOSE, UNSELECT, APPEND ============================================


def test_copy_and_move(cluster, user):
    deliver(cluster, user, simple("one"), simple("two"), simple("three"), simple("four"))
    with wire(cluster, user) as w:
        untagged, _ = w.command("STATUS Archive (UIDVALIDITY UIDNEXT)")
        archive = status_pairs(untagged[0])
        w.command("SELECT INBOX")
        w.command("STORE 2 +FLAGS.SILENT (\\Flagged $Kept)")
        untagged, done = w.command("COPY 1:2 Archive")
        assert untagged == []
        next_uid = archive["UIDNEXT"]
        assert re.match(rb"w\d+ OK \[COPYUID %d 1:2 %d:%d\]" % (archive["UIDVALIDITY"], next_uid, next_uid + 1),
                        done), done
        _, done = w.command("UID COPY 4,3 Archive")  # UIDPLUS: the source set in order, the target in step
        assert re.match(rb"w\d+ OK \[COPYUID %d 3:4 %d:%d\]" % (archive["UIDVALIDITY"], next_uid + 2,
                                                                 next_uid + 3), done), done
        _, done = w.command("COPY 1 Nowhere")
        assert re.match(rb"w\d+ NO \[TRYCREATE\]", done), done

        # MOVE (RFC 6851): COPYUID in an untagged OK, then the EXPUNGE, then the tagged OK
        untagged, done = w.command("MOVE 2 Trash")
        assert b" OK " in done and b"COPYUID" not in done
        assert len(untagged) == 2, untagged
        assert untagged[0].startswith(b"* OK [COPYUID ") and codes(untagged[0]).split()[2] == "2"
        assert untagged[1] == b"* 2 EXPUNGE"
        untagged, done = w.command("UID MOVE 4 Trash")
        assert untagged[0].startswith(b"* OK [COPYUID ") and untagged[1] == b"* 3 EXPUNGE", untagged
        _, done = w.command("MOVE 1 Nowhere")
        assert re.match(rb"w\d+ NO \[TRYCREATE\]", done), done
        untagged, _ = w.command("FETCH 1:* (UID)")
        assert untagged == [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)"]

        untagged, _ = w.command("EXAMINE Archive")
        assert b"* 4 EXISTS" in untagged
        untagged, _ = w.command("FETCH 2 (FLAGS BODY.PEEK[HEADER.FIELDS (Subject)])")  # flags are copied too
        assert b"$Kept" in untagged[0] and b"\\Flagged" in untagged[0] and b"Subject: two" in untagged[0]

    with client(cluster, user) as c:
        c.select_folder("INBOX")
        c.copy([3], "Drafts")
        c.create_folder("Moved")
        c.move([1], "Moved")
        assert c.search("ALL") == [3]
        assert c.folder_status("Moved", ["MESSAGES"]) == {b"MESSAGES": 1}
        assert c.folder_status("Trash", ["MESSAGES"]) == {b"MESSAGES": 2}
    conn = imap(cluster, user)
    ok(conn.select("Archive"))
    typ, data = conn.copy("1:4", "Junk")
    assert typ == "OK" and data[0].startswith(b"[COPYUID ")
    conn.logout()


def test_expunge_close_unselect(cluster, user):
    deliver(cluster, user, *(simple(f"m{i}") for i in range(1, 7)))
    with wire(cluster, user) as w:
        w.command("SELECT INBOX")
        w.command("STORE 1,3,4 +FLAGS.SILENT (\\Deleted)")
        untagged, done = w.command("EXPUNGE")
        assert b" OK " in done
        assert apply_expunges([1, 2, 3, 4, 5, 6], untagged) == [2, 5, 6] and len(untagged) == 3, untagged
        untagged, _ = w.command("FETCH 1:* (UID)")
        assert untagged == [b"* 1 FETCH (UID 2)", b"* 2 FETCH (UID 5)", b"* 3 FETCH (UID 6)"]

        # UID EXPUNGE (UIDPLUS) removes only the named \Deleted messages
        w.command("STORE 1:3 +FLAGS.SILENT (\\Deleted)")
        untagged, done = w.command("UID EXPUNGE 5:6")
        assert b" OK " in done and apply_expunges([2, 5, 6], untagged) == [2], untagged
        untagged, _ = w.command("SEARCH DELETED")
        assert untagged == [b"* SEARCH 1"]
        untagged, done = w.command("UID EXPUNGE 100:200")
        assert b" OK " in done and untagged == []

        # UNSELECT: no expunge; CLOSE: a silent expunge (RFC 9051 §6.4.1)
        untagged, done = w.command("UNSELECT")
        assert b" OK " in done and untagged == []
        untagged, _ = w.command("STATUS INBOX (MESSAGES DELETED)")
        assert status_pairs(untagged[0]) == {"MESSAGES": 1, "DELETED": 1}
        _, done = w.command("FETCH 1 (FLAGS)")
        assert b" BAD " in done  # nothing selected any more
        w.command("EXAMINE INBOX")
        untagged, done = w.command("CLOSE")  # read-only: CLOSE expunges nothing
        assert b" OK " in done and untagged == []
        untagged, _ = w.command("STATUS INBOX (MESSAGES)")
        assert status_pairs(untagged[0]) == {"MESSAGES": 1}
        w.command("SELECT INBOX")
        untagged, done = w.command("CLOSE")
        assert b" OK " in done and not any(b"EXPUNGE" in u for u in untagged)
        untagged, _ = w.command("STATUS INBOX (MESSAGES)")
        assert status_pairs(untagged[0]) == {"MESSAGES": 0}
        _, done = w.command("CLOSE")
        assert b" BAD " in done

    deliver(cluster, user, simple("a"), simple("b"))
    conn = imap(cluster, user)
    ok(conn.select("INBOX"))
    ok(conn.store("1", "+FLAGS", "(\\Deleted)"))
    assert ok(conn.expunge()) == [b"1"]
    ok(conn.store("1", "+FLAGS", "(\\Deleted)"))
    assert ok(conn.unselect()) is not None
    assert ok(conn.select("INBOX")) == [b"1"]
    ok(conn.close())
    assert ok(conn.select("INBOX")) == [b"0"]
    conn.logout()
    with client(cluster, user) as c:
        deliver(cluster, user, simple("c"), simple("d"))
        c.select_folder("INBOX")
        uids = c.search("ALL")
        c.delete_messages(uids)
        assert c.uid_expunge([uids[0]])
        assert c.search("ALL") == [uids[1]]


def test_append(cluster, user):
    when = datetime.datetime(2025, 12, 24, 18, 30, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=-5)))
    message = simple("appended", "appended body")
    with client(cluster, user) as c:
        info = c.select_folder("Drafts")
        answer = c.append("Drafts", message, [imapclient.DRAFT, imapclient.SEEN, "$Pending"], when)
        assert answer.startswith(b"[APPENDUID %d 1]" % info[b"UIDVALIDITY"]), answer
        c.noop()
        data = c.fetch([1], ["FLAGS", "INTERNALDATE", "BODY.PEEK[]", "RFC822.SIZE"])[1]
        assert set(data[b"FLAGS"]) == {b"\\Draft", b"\\Seen", b"$Pending"}
        assert data[b"INTERNALDATE"] == when.astimezone().replace(tzinfo=None)
        assert data[b"BODY[]"] == message and data[b"RFC822.SIZE"] == len(message)
        with pytest.raises(IMAPClientError, match="TRYCREATE"):
            c.append("Missing", message)
    with wire(cluster, user) as w:
        untagged, _ = w.command("EXAMINE Drafts")
        assert b"* 1 EXISTS" in untagged
        untagged, _ = w.command("FETCH 1 (INTERNALDATE)")
        assert untagged == [b'* 1 FETCH (INTERNALDATE "24-Dec-2025 23:30:05 +0000")'] or b"-0500" in untagged[0]
        w.command("UNSELECT")

    conn = imap(cluster, user)
    typ, data = conn.append("INBOX", "(\\Flagged)", imaplib.Time2Internaldate(when), message)
    assert typ == "OK" and data[0].startswith(b"[APPENDUID ")
    typ, data = conn.append("Nowhere", None, None, message)
    assert typ == "NO" and data[0].startswith(b"[TRYCREATE]")
    conn.logout()


def test_pipelining_append_and_copy_to_the_selected_mailbox(cluster, user):
    with wire(cluster, user) as w:
        message = simple("pipelined")
        # several commands in one write: each answered, in order
        w.send(b"p1 SELECT INBOX\r\np2 APPEND INBOX {%d+}\r\n%s\r\np3 NOOP\r\np4 CHECK\r\np5 ID NIL\r\n"
               % (len(message), message))
        untagged1, done = w.until("p1")
        assert done.startswith(b"p1 OK") and b"* 0 EXISTS" in untagged1
        untagged2, done = w.until("p2")
        assert done.startswith(b"p2 OK [APPENDUID ")
        untagged3, done = w.until("p3")
        assert done.startswith(b"p3 OK")
        _, done = w.until("p4")
        assert done.startswith(b"p4 OK")
        untagged5, done = w.until("p5")
        assert done.startswith(b"p5 OK") and untagged5[0].startswith(b"* ID ")
        # appending to the selected mailbox: an EXISTS SHOULD follow at once (RFC 9051 §6.3.12), by the NOOP at
        # the latest
        untagged = untagged2 + untagged3 + untagged5
        deadline = time.monotonic() + 5
        while b"* 1 EXISTS" not in untagged:
            assert time.monotonic() < deadline, untagged
            untagged, _ = w.command("NOOP")
        untagged, done = w.command("COPY 1 INBOX")  # into itself: a new message, EXISTS follows
        assert b" OK " in done and codes(done).startswith("COPYUID ")
        deadline = time.monotonic() + 5
        while b"* 2 EXISTS" not in untagged:
            assert time.monotonic() < deadline, untagged
            untagged, _ = w.command("NOOP")
        w.send(b"z1 LOGOUT\r\n")  # BYE first, then the tagged OK, then the close (RFC 9051 §6.1.3)
        assert w.response().startswith(b"* BYE ")
        assert w.response().startswith(b"z1 OK")
        assert w.closed()


def test_multiappend_and_appendlimit(cluster, user):
    first, second, third = simple("multi 1"), simple("multi 2", "x" * 500), simple("multi 3")
    with wire(cluster, user) as w:
        untagged, _ = w.command("STATUS INBOX (UIDVALIDITY UIDNEXT)")
        before = status_pairs(untagged[0])
        # MULTIAPPEND (RFC 3502) with synchronizing literals: a continuation before each
        w.send(b'm1 APPEND INBOX (\\Seen) "01-Feb-2026 08:00:00 +0000" {%d}\r\n' % len(first))
        assert w.response().startswith(b"+")
        w.send(first + b" (\\Flagged) {%d}\r\n" % len(second))
        assert w.response().startswith(b"+")
        w.send(second + b"\r\n")
        untagged, done = w.until("m1")
        assert re.match(rb"m1 OK \[APPENDUID %d %d:%d\]" % (before["UIDVALIDITY"], before["UIDNEXT"],
                                                             before["UIDNEXT"] + 1), done), done
        # LITERAL+ (RFC 7888): no continuation to wait for
        w.send(b"m2 APPEND INBOX {%d+}\r\n" % len(first) + first + b" {%d+}\r\n" % len(third) + third + b"\r\n")
        _, done = w.until("m2")
        assert re.match(rb"m2 OK \[APPENDUID %d %d:%d\]" % (before["UIDVALIDITY"], before["UIDNEXT"] + 2,
                                                             before["UIDNEXT"] + 3), done), done
        w.command("SELECT INBOX")
        untagged, _ = w.command("FETCH 1:4 (FLAGS INTERNALDATE RFC822.SIZE)")
        assert b"\\Seen" in untagged[0] and b'" 1-Feb-2026 08:00:00 +0000"' in untagged[0]
        assert b"\\Flagged" in untagged[1] and b"RFC822.SIZE %d" % len(second) in untagged[1]
        assert b"RFC822.SIZE %d" % len(third) in untagged[3]
        untagged, _ = w.command("FETCH 2 (BODY.PEEK[])")
        assert untagged[0].endswith(second + b")")

        # MULTIAPPEND is all or nothing: the second message to a missing mailbox fails the whole command
        w.send(b"m3 APPEND Nowhere {%d+}\r\n" % len(first) + first + b" {%d+}\r\n" % len(third) + third + b"\r\n")
        _, done = w.until("m3")
        assert re.match(rb"m3 NO \[TRYCREATE\]", done), done

        # over APPENDLIMIT: refused before the literal is sent (RFC 7889), the session goes on
        limit = next(int(c.split("=")[1]) for c in capability_list(w) if c.startswith("APPENDLIMIT="))
        w.send(b"m4 APPEND INBOX {%d}\r\n" % (limit + 1))
        resp = w.response()
        assert resp.startswith((b"m4 NO [TOOBIG]", b"m4 NO [LIMIT]")), resp
        _, done = w.command("NOOP")
        assert b" OK " in done
        untagged, _ = w.command("STATUS INBOX (MESSAGES)")
        assert status_pairs(untagged[0]) == {"MESSAGES": 4}
        # a literal exactly at the limit is invited (then abandoned here by logging out)
        w.send(b"m5 APPEND INBOX {%d}\r\n" % limit)
        assert w.response().startswith(b"+")


# == 8. IDLE and changes from other sessions =====================================================


def idle_until(c: imapclient.IMAPClient, wanted, timeout: float = 5.0) -> tuple[list, float]:
    """idle_check until a response satisfies ``wanted``; (all responses, seconds it took)."""
    start = time.monotonic()
    seen: list = []
    while time.monotonic() - start < timeout:
        seen += c.idle_check(timeout=max(0.1, timeout - (time.monotonic() - start)))
        if any(wanted(r) for r in seen):
            return seen, time.monotonic() - start
    raise AssertionError(f"nothing wanted within {timeout} s: {seen}")


def test_idle_sees_a_delivery(cluster, user):
    deliver(cluster, user, simple("before"))
    with client(cluster, user) as c:
        c.select_folder("INBOX")
        c.idle()
        deliver(cluster, user, simple("while idling"))
        seen, took = idle_until(c, lambda r: r == (2, b"EXISTS"))
        assert took < 5.0
        assert not any(r[1] == b"EXPUNGE" for r in seen)
        c.idle_done()
        assert c.fetch([2], ["ENVELOPE"])[2][b"ENVELOPE"].subject == b"while idling"
        # a second IDLE in the same session works as well
        c.idle()
        deliver(cluster, user, simple("again"), simple("and again"))
        idle_until(c, lambda r: r == (4, b"EXISTS") or r == (3, b"EXISTS"))
        c.idle_done()
        assert len(c.search("ALL")) == 4


def test_idle_sees_expunge_and_flags_from_another_session(cluster, user):
    deliver(cluster, user, simple("one"), simple("two"), simple("three"))
    with client(cluster, user) as idler, client(cluster, user) as other:
        idler.select_folder("INBOX")
        other.select_folder("INBOX")
        idler.idle()
        other.add_flags([2], [imapclient.FLAGGED])
        seen, _ = idle_until(idler, lambda r: r[0] == 2 and r[1] == b"FETCH")
        fetch = next(r for r in seen if r[0] == 2 and r[1] == b"FETCH")
        assert b"\\Flagged" in fetch[2][fetch[2].index(b"FLAGS") + 1]
        other.delete_messages([1])
        other.expunge()
        seen, _ = idle_until(idler, lambda r: r == (1, b"EXPUNGE"))
        idler.idle_done()
        assert idler.search("ALL") == [2, 3]


def test_no_expunge_during_fetch_store_search_by_number(cluster, user):
    deliver(cluster, user, simple("one"), simple("two"), simple("three"))
    with wire(cluster, user) as a, wire(cluster, user) as b:
        a.command("SELECT INBOX")
        b.command("SELECT INBOX")
        b.command("STORE 2 +FLAGS.SILENT (\\Deleted)")
        _, done = b.command("EXPUNGE")
        assert b" OK " in done

        # A keeps using sequence numbers: no EXPUNGE may shift them under it (RFC 9051 §7.5.1)
        deadline = time.monotonic() + 5
        while True:
            untagged, done = a.command("FETCH 1:3 (UID FLAGS)")
            assert b" OK " in done
            assert not any(b"EXPUNGE" in u for u in untagged), untagged
            if not any(u.startswith(b"* 2 FETCH") for u in untagged):
                break  # the store has it gone: A's view still has a message 2 that cannot be fetched
            assert time.monotonic() < deadline, "the expunge never reached the store view"
            time.sleep(0.05)
        assert any(u.startswith(b"* 3 FETCH (UID 3") for u in untagged)  # numbers unchanged
        untagged, _ = a.command("STORE 3 +FLAGS (\\Seen)")
        assert not any(b"EXPUNGE" in u for u in untagged) and untagged[0].startswith(b"* 3 FETCH")
        untagged, _ = a.command("SEARCH ALL")
        assert not any(b"EXPUNGE" in u for u in untagged)
        untagged, done = a.command("NOOP")
        assert b"* 2 EXPUNGE" in untagged, untagged
        untagged, _ = a.command("FETCH 1:* (UID)")
        assert untagged == [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)"]

        # a UID command may carry the EXPUNGE (RFC 9051 §7.5.1)
        b.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
        b.command("EXPUNGE")
        deadline = time.monotonic() + 5
        while True:
            untagged, _ = a.command("UID FETCH 1:* (UID)")
            if b"* 1 EXPUNGE" in untagged:
                break
            assert time.monotonic() < deadline, untagged
            time.sleep(0.05)

        # a delivery shows up as EXISTS at the end of the next command
        deliver(cluster, user, simple("four"))
        deadline = time.monotonic() + 5
        while True:
            untagged, _ = a.command("NOOP")
            if b"* 2 EXISTS" in untagged:
                break
            assert time.monotonic() < deadline, untagged
            time.sleep(0.05)


# == 9. broken input ===========================================================================


def test_bad_input_gets_bad_and_the_session_goes_on(cluster, user):
    with wire(cluster) as w:
        w.send(b"garbage\r\n")
        resp = w.response()
        assert re.match(rb"(garbage|\*) BAD \S", resp), resp
        _, done = w.command("FROBNICATE now")  # unknown command
        assert re.match(rb"w\d+ BAD \S", done), done
        _, done = w.command("FETCH 1 (FLAGS)")  # valid, but not before login
        assert re.match(rb"w\d+ BAD .*state", done), done
        _, done = w.command("SELECT")  # missing argument
        assert re.match(rb"w\d+ BAD \S", done), done
        for broken in (b"{x NOOP", b"+ NOOP", b"a(b NOOP", b"\x00\xff\xfe junk", b"", b" NOOP"):
            w.send(broken + b"\r\n")
            resp = w.response()
            assert resp.startswith(b"* BAD ") and len(resp) > len(b"* BAD "), (broken, resp)
        w.send(b'q1 LOGIN "unterminated\r\n')
        assert w.response().startswith(b"q1 BAD ")
        w.send(b"q2 LOGIN {5}\r\n")  # a synchronizing literal, then a line that breaks the command
        assert w.response().startswith(b"+")
        w.send(b"abcde\r\n")
        assert w.response().startswith(b"q2 BAD ")
        _, done = w.command("NOOP")
        assert re.match(rb"w\d+ OK", done)
        w.login(user)
        _, done = w.command("FETCH 1 (FLAGS)")  # authenticated but nothing selected
        assert re.match(rb"w\d+ BAD ", done), done
        w.command("SELECT INBOX")
        _, done = w.command("FETCH 1 (FLAGS)")  # an empty mailbox has no message 1
        assert re.match(rb"w\d+ BAD ", done), done
        _, done = w.command("FETCH 1 (NOSUCHITEM)")
        assert re.match(rb"w\d+ BAD ", done), done
        _, done = w.command("FETCH 1:* (BODY[1.MIME.TEXT])")
        assert re.match(rb"w\d+ BAD ", done), done
        _, done = w.command("NOOP")
        assert re.match(rb"w\d+ OK", done)
        # clear texts, no internals (STYLE.md: clients get safe text)
        for resp in w.transcript:
            assert not re.search(rb"Traceback|Exception|Error:|SERVERBUG|Internal error|\.py\b", resp), resp
    # the server lives on
    assert cluster.procs["access1"].alive
    with wire(cluster, user) as w:
        _, done = w.command("LIST \"\" INBOX")
        assert b" OK " in done


def test_enable_imap4rev2(cluster, user):
    """RFC 9051 once enabled: ESEARCH only, no RECENT, a LIST in SELECT, OK [CLOSED], UTF-8 names."""
    deliver(cluster, user, simple("first"), simple("second"))
    with wire(cluster, user) as w:
        assert "IMAP4rev2" in capability_list(w)
        untagged, done = w.command("ENABLE IMAP4rev2")
        assert untagged == [b"* ENABLED IMAP4rev2"] and b" OK " in done
        untagged, done = w.command("SELECT INBOX")
        assert b"[READ-WRITE]" in done
        assert not any(b"RECENT" in u for u in untagged), untagged
        assert b'* LIST () "/" INBOX' in untagged
        assert b"* 2 EXISTS" in untagged
        untagged, done = w.command("SEARCH ALL")
        assert re.fullmatch(rb'\* ESEARCH \(TAG "w\d+"\) ALL 1:2', untagged[0]), untagged
        untagged, done = w.command('CREATE "Über/Straße"')
        assert b" OK " in done, done
        untagged, done = w.command('LIST "" "*"')
        assert any('"Über/Straße"'.encode() in u or "Über/Straße".encode() in u for u in untagged), untagged
        untagged, done = w.command('SELECT "Über/Straße"')
        assert untagged[0] == b"* OK [CLOSED] Previous mailbox closed", untagged
        untagged, done = w.command("APPEND INBOX UTF8 (~{13+}\r\nSubject: é\r\n)")
        assert b"[APPENDUID " in done, done


def test_too_many_bad_commands_get_bye(cluster):
    with wire(cluster) as w:  # 9 bad, a good one resets the count, 9 more bad: still open
        for i in range(9):
            _, done = w.command("BOGUS")
            assert b" BAD " in done
        _, done = w.command("NOOP")
        assert b" OK " in done
        for i in range(9):
            _, done = w.command("BOGUS")
            assert b" BAD " in done
        _, done = w.command("CAPABILITY")
        assert b" OK " in done
    with wire(cluster) as w:
        for i in range(10):  # access.imap_max_bad_commands = 10: those are answered
            w.send(b"b%d BOGUS\r\n" % i)
            assert w.response().startswith(b"b%d BAD " % i)
        w.send(b"b10 BOGUS\r\n")  # the one after: BYE, and the connection is closed
        assert w.response().startswith(b"* BYE ")
        assert w.closed()
    assert cluster.procs["access1"].alive


# == 10. limits at their edges (a cluster of its own) ==========================================

MAX_LINE = 1000  # the smallest access.imap_max_line allowed
IDLE_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    c = make_cluster(tmp_path_factory.mktemp("imap-tight") / "data",
                     access={"imap_max_line": MAX_LINE, "max_auth_failures": 2, "auth_failure_delay": 0.1},
                     limits={"idle_timeout": IDLE_TIMEOUT, "connections_per_ip": 2, "auth_failures_before_delay": 0})
    yield c
    try:
        assert c.procs["access1"].alive, "accessd died:\n" + c.procs["access1"].log_tail()
    finally:
        c.stop_all()


def tight_wire(cluster: TestCluster, user: str | None = None) -> Wire:
    """A connection to the tight cluster, waiting out the closes of earlier tests (2 per address)."""
    deadline = time.monotonic() + 10
    while True:
        w = Wire(cluster.address("access1", "imap"))
        if w.greeting.startswith(b"* OK"):
            break
        w.close()
        assert w.greeting.startswith(b"* BYE") and time.monotonic() < deadline, w.greeting
        time.sleep(0.05)
    if user is not None:
        w.login(user)
    return w


def test_command_line_length_edge(tight):
    with tight_wire(tight) as w:
        def id_line(size: int) -> bytes:
            head, tail = b'x1 ID ("name" "', b'")\r\n'
            return head + b"n" * (size - len(head) - len(tail)) + tail
        line = id_line(MAX_LINE)  # exactly imap_max_line octets, CRLF included: accepted
        assert len(line) == MAX_LINE
        w.send(line)
        _, done = w.until("x1")
        assert done.startswith(b"x1 OK"), done
        line = id_line(MAX_LINE + 1)  # one more: refused, and the rest of it is not taken for a command
        w.send(line.replace(b"x1 ", b"x2 "))
        _, done = w.until("x2")
        assert done.startswith(b"x2 BAD") and b"too long" in done.lower(), done
        _, done = w.command("NOOP")
        assert b" OK " in done
        w.send(b"x3 NOOP " + b"a" * 5000 + b"\r\n")  # far over: answered once, then the session goes on
        _, done = w.until("x3")
        assert done.startswith(b"x3 BAD"), done
        _, done = w.command("NOOP")
        assert b" OK " in done
    assert tight.procs["access1"].alive


def test_idle_timeout_logs_out(tight):
    user = add_user(tight)
    with tight_wire(tight, user) as w:
        w.command("SELECT INBOX")
        start = time.monotonic()
        assert w.closed(timeout=IDLE_TIMEOUT + 5)
        took = time.monotonic() - start
        assert IDLE_TIMEOUT - 0.2 <= took <= IDLE_TIMEOUT + 3, took
        assert w.buffer.startswith(b"* BYE "), w.buffer
    with tight_wire(tight, user) as w:  # the same in IDLE
        w.command("SELECT INBOX")
        w.send(b"i1 IDLE\r\n")
        assert w.response().startswith(b"+")
        start = time.monotonic()
        assert w.closed(timeout=IDLE_TIMEOUT + 5)
        assert time.monotonic() - start >= IDLE_TIMEOUT - 0.2
        assert w.buffer.startswith(b"* BYE "), w.buffer
    with tight_wire(tight, user) as w:  # activity keeps a session alive past the timeout
        for _ in range(4):
            time.sleep(IDLE_TIMEOUT / 2)
            _, done = w.command("NOOP")
            assert b" OK " in done


def test_connections_per_address(tight):
    first = tight_wire(tight)
    second = tight_wire(tight)
    try:
        with Wire(tight.address("access1", "imap")) as third:  # the third at once from 127.0.0.1
            assert third.greeting.startswith(b"* BYE "), third.greeting
            assert third.closed()
        _, done = first.command("NOOP")
        assert b" OK " in done
    finally:
        first.close()
        second.close()
    with tight_wire(tight) as again:  # a slot frees when a connection ends
        _, done = again.command("NOOP")
        assert b" OK " in done


def test_failed_logins_close_the_connection(tight):
    user = add_user(tight)
    with tight_wire(tight) as w:
        start = time.monotonic()
        _, done = w.command(f'LOGIN "{user}" "wrong-1"')
        assert re.match(rb"w\d+ NO \[AUTHENTICATIONFAILED\]", done), done
        assert time.monotonic() - start >= 0.1  # access.auth_failure_delay
        _, done = w.command(f'LOGIN "{user}" "wrong-2"')  # access.max_auth_failures = 2
        assert re.match(rb"w\d+ NO \[AUTHENTICATIONFAILED\]", done), done
        assert w.closed()
        assert b" OK " not in w.buffer
    with tight_wire(tight) as w:  # a fresh connection, and a right password, still log in
        bad = base64.b64encode(f"\0{user}\0wrong-3".encode()).decode()
        _, done = w.command(f"AUTHENTICATE PLAIN {bad}")
        assert re.match(rb"w\d+ NO \[AUTHENTICATIONFAILED\]", done), done
        w.login(user)
        _, done = w.command("SELECT INBOX")
        assert b" OK " in done
