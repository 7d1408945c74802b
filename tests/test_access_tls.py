"""IMAP STARTTLS against a real accessd whose [tls] names a certificate (trustme CA).

Without TLS the server announces LOGINDISABLED and refuses LOGIN and
AUTHENTICATE (the password would cross in clear); after STARTTLS it
announces AUTH=PLAIN and logins work; STARTTLS is not offered twice.
"""

from __future__ import annotations

import imaplib
import smtplib
import ssl
import subprocess
import sys

import pytest

from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(120)

USER = "tls@example.org"


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    base = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = base / "cert.pem", base / "key.pem", base / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    cluster = TestCluster(base / "data", sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "tls": {"cert_file": str(cert_file), "key_file": str(key_file)}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0, "pop3": 0})
    cluster.write()
    cluster.start_all()
    for argv in (("domain", "add", "example.org"), ("user", "add", USER, "--password", "pw", "--mss", "mss1")):
        done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    with smtplib.LMTP(*cluster.address("mss1", "lmtp")) as lmtp:
        lmtp.sendmail("s@remote.test", [USER], b"Subject: secret\r\n\r\nover TLS\r\n")
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    yield cluster, context
    cluster.stop_all()


def test_imap_login_needs_starttls(tls_cluster):
    cluster, context = tls_cluster
    imap = imaplib.IMAP4(*cluster.address("access1", "imap"), timeout=30)
    try:
        assert "LOGINDISABLED" in imap.capabilities and "STARTTLS" in imap.capabilities
        assert "AUTH=PLAIN" not in imap.capabilities
        typ, data = imap._simple_command("LOGIN", USER, "pw")  # refused without TLS
        assert typ == "NO" and b"[PRIVACYREQUIRED]" in data[0], data
    except BaseException:
        imap.shutdown()
        raise
    imap.starttls(ssl_context=context)
    typ, caps = imap.capability()
    assert b"AUTH=PLAIN" in caps[0] and b"STARTTLS" not in caps[0] and b"LOGINDISABLED" not in caps[0]
    imap.login(USER, "pw")
    imap.select("INBOX", readonly=True)
    typ, data = imap.fetch("1", "(BODY.PEEK[TEXT])")
    assert data[0][1] == b"over TLS\r\n"
    imap.state = "NONAUTH"  # imaplib would not even send it: we want the server's answer
    with pytest.raises(imaplib.IMAP4.error, match="BAD.*not valid in this state"):
        imap._simple_command("STARTTLS")
    imap.state = "SELECTED"
    imap.logout()
