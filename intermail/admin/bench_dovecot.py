"""A throw-away Dovecot for the benches' baselines: LMTP, IMAP and POP3 on loopback, everything in one directory.

Owns: finding Dovecot's binaries (installing the Debian packages that
serve the wanted protocols when they are missing), writing a
self-contained ``dovecot.conf`` (its own ``base_dir``, ``state_dir``,
``log_path`` and mail under one home directory; ``sdbox`` mailboxes;
default ``mail_fsync = optimized``), starting ``dovecot -F`` as root and
waiting for every listener's greeting, and stopping it.

Accounts: without ``users`` any address is accepted (static passdb,
``nopassword``), which is what LMTP needs; with ``users`` (address ->
password hash in a scheme Dovecot knows, e.g. ``{ARGON2ID}$argon2id$...``)
a ``passwd-file`` passdb knows exactly those, so IMAP and POP3 logins are
checked and LMTP refuses anyone else.  Mail always belongs to the
unprivileged ``nobody`` (Dovecot refuses uid 0 for mail).

With ``performance=True`` the login processes run in Dovecot's documented
high-performance mode (``service_count = 0``, ``process_min_avail`` = the
CPU count: a few long-lived login processes instead of one per
connection) and the imap and pop3 processes are reused for up to 100
sessions each instead of being started anew for every one; otherwise
Dovecot's defaults stand.

Logs: nothing; what Dovecot logs goes to ``<home>/dovecot.log``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from intermail.admin.bench_load import group_alive
from intermail.testing.procs import free_port

# protocol -> (Debian package, executable Dovecot starts for it, what its greeting starts with)
PROTOCOLS = {
    "lmtp": ("dovecot-lmtpd", "lmtp", b"220"),
    "imap": ("dovecot-imapd", "imap", b"* OK"),
    "pop3": ("dovecot-pop3d", "pop3", b"+OK"),
}
LIBEXEC = "/usr/lib/dovecot"  # where Debian puts the per-protocol executables


def _dovecot_binary() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("dovecot", path=path)


def _missing_packages(binary: str | None, protocols: Iterable[str]) -> list[str]:
    if binary is None:
        return [PROTOCOLS[p][0] for p in protocols]
    if not os.path.isdir(LIBEXEC):  # not Debian's layout: trust the binary
        return []
    return [PROTOCOLS[p][0] for p in protocols if not os.path.exists(os.path.join(LIBEXEC, PROTOCOLS[p][1]))]


def find_or_install_dovecot(notes: list[str], protocols: Iterable[str] = ("lmtp",)) -> str | None:
    """The ``dovecot`` binary, installing Debian's packages for ``protocols`` when missing; None if it cannot."""
    protocols = list(protocols)
    binary = _dovecot_binary()
    missing = _missing_packages(binary, protocols)
    if not missing:
        return binary
    wanted = " ".join(missing)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        notes.append(f"baseline unavailable: dovecot's {'/'.join(protocols).upper()} is not installed and cannot "
                     f"be installed here (needs root and apt-get: apt-get install {wanted})")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    binary = _dovecot_binary()
    if done.returncode != 0 or binary is None or _missing_packages(binary, protocols):
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        notes.append(f"baseline unavailable: apt-get install {wanted} failed: {tail}")
        return None
    notes.append(f"installed {wanted} with apt-get for the baseline")
    return binary


def dovecot_home(base: str, notes: list[str], prefix: str) -> tuple[str, str | None]:
    """Where Dovecot's files go, and a directory made for them alone (to remove), if any.

    Under ``base`` when Dovecot's mail user can reach it (``base`` is ours to
    open up; its parents are not), else a directory of its own in the
    system temp directory, named ``<prefix>dovecot-*``.
    """
    os.chmod(base, 0o711)
    if all(parent.stat().st_mode & 0o001 for parent in Path(base).resolve().parents):
        return os.path.join(base, "dovecot"), None
    own = tempfile.mkdtemp(prefix=f"{prefix}dovecot-")
    os.chmod(own, 0o711)
    notes.append("Dovecot's mailboxes are in the system temp directory: its mail user cannot reach --dir")
    return own, own


class Dovecot:
    """A throw-away Dovecot serving ``protocols`` on 127.0.0.1, everything under ``home``."""

    def __init__(self, binary: str, home: str, *, protocols: Iterable[str] = ("lmtp",), process_limit: int = 100,
                 users: dict[str, str] | None = None, performance: bool = False):
        self.binary = binary
        self.home = Path(home)
        self.protocols = list(protocols)
        self.process_limit = process_limit
        self.users = users
        self.performance = performance
        self.ports = {protocol: free_port("127.0.0.1") for protocol in self.protocols}
        self.proc: subprocess.Popen | None = None
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                      timeout=30).stdout.split(" ")[0].strip() or "?"

    def address_of(self, protocol: str) -> tuple[str, int]:
        return "127.0.0.1", self.ports[protocol]

    @property
    def address(self) -> tuple[str, int]:
        """The first protocol's listener (the LMTP one for an LMTP-only instance)."""
        return self.address_of(self.protocols[0])

    @property
    def log_file(self) -> Path:
        return self.home / "dovecot.log"

    def _auth(self, uid: int, gid: int) -> str:
        h = self.home
        userdb = f"userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={h}/mail/%u\n}}\n"
        if self.users is None:
            return "passdb {\n  driver = static\n  args = nopassword=y\n}\n" + userdb
        return ("disable_plaintext_auth = no\n"
                "auth_mechanisms = plain login\n"
                f"passdb {{\n  driver = passwd-file\n  args = {h}/users\n}}\n" + userdb)

    def _service(self, protocol: str) -> str:
        listener = f"  inet_listener {protocol} {{\n    address = 127.0.0.1\n    port = {self.ports[protocol]}\n  }}\n"
        if protocol == "lmtp":
            return f"service lmtp {{\n  process_limit = {self.process_limit}\n{listener}}}\n"
        secure = {"imap": "imaps", "pop3": "pop3s"}[protocol]
        login = [f"  inet_listener {secure} {{\n    port = 0\n  }}\n", listener]
        if self.performance:
            login.append(f"  service_count = 0\n  process_min_avail = {os.cpu_count() or 1}\n")
        session = f"  process_limit = {max(self.process_limit, 1024)}\n"
        if self.performance:
            session += "  service_count = 100\n"
        return (f"service {protocol}-login {{\n{''.join(login)}}}\n"
                f"service {protocol} {{\n{session}}}\n")

    def _config(self, uid: int, gid: int) -> str:
        h = self.home
        services = "".join(self._service(p) for p in self.protocols)
        return f"""# throw-away Dovecot for `intermail bench`: {' '.join(self.protocols)}, defaults otherwise
base_dir = {h}/run
state_dir = {h}/state
instance_name = intermail-bench-{os.getpid()}
protocols = {' '.join(self.protocols)}
listen = 127.0.0.1
ssl = no
log_path = {self.log_file}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = sdbox:{h}/mail/%u
mail_fsync = optimized
mail_max_userip_connections = {max(self.process_limit, 1024)}
lmtp_save_to_detail_mailbox = no
{self._auth(uid, gid)}{services}"""

    def start(self, timeout: float = 30.0) -> None:
        user = pwd.getpwnam("nobody")
        for sub in ("run", "state", "mail"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        os.chown(self.home / "mail", user.pw_uid, user.pw_gid)
        if self.users is not None:
            (self.home / "users").write_text("".join(f"{a}:{h}\n" for a, h in self.users.items()))
        conf = self.home / "dovecot.conf"
        conf.write_text(self._config(user.pw_uid, user.pw_gid))
        with open(self.home / "stderr.log", "wb") as stderr:
            # a session of its own: whatever of it outlives the master is found (and killed) by its group
            self.proc = subprocess.Popen([self.binary, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + timeout
        waiting = list(self.protocols)
        while waiting:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dovecot's {waiting[0].upper()} did not answer in {timeout:g} s: "
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(self.address_of(waiting[0]), timeout=1) as s:
                s.settimeout(2)
                if s.recv(512).startswith(PROTOCOLS[waiting[0]][2]):
                    waiting.pop(0)
                    continue
            time.sleep(0.05)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master (it stops its children), then make sure nothing of its process group is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + timeout
        while group_alive(self.proc.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def log_tail(self, lines: int = 3) -> str:
        text = ""
        for path in (self.log_file, self.home / "stderr.log"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])
