"""A real terminal mail client against ``accessd``: mutt, driven headless through tmux.

The cluster (``dird`` + ``mssd`` + ``accessd``) runs as real processes;
mail is delivered over LMTP; mutt logs in over plaintext IMAP
(``tls.auth_without_tls``), lists the INBOX, opens a message and quits.
What mutt shows is read with ``tmux capture-pane`` and polled until a
deadline -- no fixed sleeps.  The packages (``mutt``, or ``neomutt``, and
``tmux``) come from Debian; the test installs them if they are missing and
skips, saying why, only when they cannot be installed.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from intermail.testing.procs import TestCluster

pytestmark = pytest.mark.timeout(180)

USER = "mutt.user@example.org"
PASSWORD = "mutt pass 1"
MESSAGES = [  # (subject as sent, as mutt shows it, a line of its body)
    ("Quarterly numbers", "Quarterly numbers", "The numbers are in the attached sheet."),
    ("Lunch on Friday", "Lunch on Friday", "Shall we meet at noon at the usual place?"),
    ("=?UTF-8?Q?Caf=C3=A9_menu?=", "Café menu", "Espresso, cappuccino and croissants."),
]


def _client_program() -> str | None:
    return shutil.which("mutt") or shutil.which("neomutt")


def _install(packages: list[str]) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600, check=False)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    return done.stderr[-500:] if done.returncode != 0 else ""


@pytest.fixture(scope="module")
def programs() -> tuple[str, str]:
    """(mutt or neomutt, tmux): installed with apt-get when missing; skip if that cannot be done."""
    missing = [name for name, present in (("mutt", _client_program()), ("tmux", shutil.which("tmux")))
               if not present]
    if missing:
        if shutil.which("apt-get") is None:
            pytest.skip(f"{' and '.join(missing)} not installed, and no apt-get to install them")
        error = _install(missing)
        if _client_program() is None or shutil.which("tmux") is None:
            pytest.skip(f"cannot install {' and '.join(missing)} with apt-get: {error or 'not found after install'}")
    return _client_program(), shutil.which("tmux")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = TestCluster(tmp_path_factory.mktemp("mutt") / "data", sections={
        "directory": {"hash_time_cost": 1, "hash_memory_kib": 8, "hash_parallelism": 1},
        "tls": {"auth_without_tls": True}})
    cluster.add("dir1", "directory", role="primary", ports={"rpc": 0})
    cluster.add("mss1", "mss", identity="mss1", role="active", ports={"lmtp": 0, "rpc": 0})
    cluster.add("access1", "access", ports={"imap": 0})
    cluster.write()
    cluster.start_all()
    try:
        for argv in (("domain", "add", "example.org"), ("user", "add", USER, "--password", PASSWORD, "--mss", "mss1")):
            done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(cluster.data)],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
        with smtplib.LMTP(*cluster.address("mss1", "lmtp")) as lmtp:
            for i, (subject, _, body) in enumerate(MESSAGES):
                raw = (f"From: Sender {i} <sender{i}@remote.test>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
                       f"Date: Mon, 0{i + 2} Mar 2026 10:00:00 +0000\r\nMessage-ID: <mutt{i}@remote.test>\r\n"
                       f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n")
                assert not lmtp.sendmail("sender@remote.test", [USER], raw.encode())
        yield cluster
    finally:
        cluster.stop_all()


class Tmux:
    """One tmux server of our own (its own socket) running one program in a detached session."""

    def __init__(self, tmux: str, workdir: Path):
        self.tmux = tmux
        self.socket = f"intermail-test-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "HOME": str(workdir), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm"}
        self.env.pop("TMUX", None)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.tmux, "-u", "-L", self.socket, *args], capture_output=True, text=True,
                              env=self.env, timeout=30, check=check)

    def start(self, command: list[str]) -> None:
        self.run("new-session", "-d", "-s", "mutt", "-x", "160", "-y", "45", " ".join(command))

    def screen(self) -> str:
        done = self.run("capture-pane", "-p", "-t", "mutt", check=False)
        return done.stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "mutt", *keys)

    def alive(self) -> bool:
        return self.run("has-session", "-t", "mutt", check=False).returncode == 0

    def wait_for(self, what: str, predicate, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"mutt did not show {what} within {timeout} s; the screen:\n{screen}")

    def kill(self) -> None:
        self.run("kill-server", check=False)


def test_mutt_lists_opens_and_quits(programs, cluster, tmp_path):
    mutt, tmux_program = programs
    host, port = cluster.address("access1", "imap")
    url = f"imap://{USER.replace('@', '%40')}@{host}:{port}"
    muttrc = tmp_path / "muttrc"
    muttrc.write_text("\n".join([
        f'set folder = "{url}/"',
        f'set spoolfile = "{url}/INBOX"',
        f'set imap_pass = "{PASSWORD}"',
        "set ssl_starttls = no",
        "set ssl_force_tls = no",
        "unset header_cache",
        "unset message_cachedir",
        "set imap_check_subscribed = no",
        "set imap_idle = no",
        "set move = no",
        "set quit = yes",
        "set wait_key = no",
        "set confirmappend = no",
        'set record = ""',
        'set postponed = ""',
        "set sort = date-sent",
        "set pager_stop = yes",
        "set charset = utf-8",
        'set index_format = "%4C %Z %-24.24L %s"',
        "",
    ]))
    tmux = Tmux(tmux_program, tmp_path)
    try:
        tmux.start([mutt, "-n", "-F", str(muttrc)])
        index = tmux.wait_for("the INBOX index with every subject",
                              lambda s: all(shown in s for _, shown, _ in MESSAGES))
        assert "Sender 0" in index and "Sender 2" in index
        first = next(line for line in index.splitlines() if "Quarterly numbers" in line)
        assert " 1 " in first[:8]  # sorted by date: message 1 is the oldest

        tmux.keys("1", "Enter")  # jump to message 1 in the index (mutt asks "Jump to message:")
        tmux.wait_for("the jump done", lambda s: "Jump to" not in s, timeout=10)
        tmux.keys("Enter")  # open it
        pager = tmux.wait_for("message 1 in the pager", lambda s: MESSAGES[0][2] in s)
        assert "Subject: Quarterly numbers" in pager and "sender0@remote.test" in pager

        tmux.keys("q")  # back to the index
        tmux.wait_for("the index again", lambda s: "Lunch on Friday" in s and MESSAGES[0][2] not in s)
        tmux.keys("q")  # quit (quit = yes: no question); mutt writes \Seen back to the server
        deadline = time.monotonic() + 30
        while tmux.alive():
            assert time.monotonic() < deadline, "mutt did not quit:\n" + tmux.screen()
            time.sleep(0.1)
    finally:
        tmux.kill()

    # what mutt did is visible on the server: the message it showed is \Seen, the others are not
    conn = imaplib.IMAP4(host, port, timeout=15)
    try:
        conn.login(USER, PASSWORD)
        conn.select("INBOX", readonly=True)
        typ, data = conn.search(None, "SEEN")
        assert typ == "OK" and data == [b"1"], data
        typ, data = conn.search(None, "UNSEEN")
        assert data == [b"2 3"], data
    finally:
        conn.logout()
    assert cluster.procs["access1"].alive
