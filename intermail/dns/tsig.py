"""The TSIG key that signs updates of the cluster zone: its file, its creation, keyrings.

Owns: the key file's format and location, creating it once (``dnsd
--init``), and turning it into what dnspython wants (a keyring for the
server, key name + algorithm for a client).

The file is BIND's key clause, exactly what ``tsig-keygen`` prints, so the
same file can be ``include``d by named.conf or read by ``nsupdate -k``::

    key "intermail-update" {
        algorithm hmac-sha256;
        secret "3q2+7w...";
    };

Invariants:

- A key file is created whole or not at all: the content goes to a
  temporary file (mode 0600, fsynced), which is then hard-linked to the
  final name -- ``link`` fails if the name exists, so two instances
  initialising at once never overwrite each other's key, and nobody ever
  reads half a key -- and the directory is fsynced.
- The secret is 32 random bytes (256 bits, the HMAC-SHA256 block output
  size, RFC 8945 section 6).
- A file that is not one well-formed key clause is an error
  (:class:`~intermail.config.ConfigError`), never an empty keyring.

Logs: nothing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import os
import re
import secrets
from pathlib import Path

import dns.name
import dns.tsig

from intermail.config import Config, ConfigError

__all__ = ["TsigKey", "key_file_path", "create_key_file", "read_key_file", "format_key", "load_key"]

DEFAULT_ALGORITHM = "hmac-sha256"
SECRET_BYTES = 32
DEFAULT_KEY_FILE = Path("keys") / "dns-update.key"  # under the data directory

_KEY_CLAUSE = re.compile(
    r'\s*key\s+"?(?P<name>[A-Za-z0-9_.-]+)"?\s*\{(?P<body>[^{}]*)\}\s*;\s*', re.DOTALL)
_ALGORITHM = re.compile(r'\balgorithm\s+"?(?P<algorithm>[A-Za-z0-9-]+)"?\s*;')
_SECRET = re.compile(r'\bsecret\s+"(?P<secret>[A-Za-z0-9+/=\s]+)"\s*;')
_COMMENT = re.compile(r"(#|//)[^\n]*")


@dataclasses.dataclass(frozen=True)
class TsigKey:
    """One TSIG key: its (absolute) name, its secret, its algorithm."""

    name: str
    secret: bytes = dataclasses.field(repr=False)
    algorithm: str = DEFAULT_ALGORITHM

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", dns.name.from_text(self.name).canonicalize().to_text())
        algorithm = dns.name.from_text(self.algorithm)
        if algorithm not in dns.tsig.mac_sizes or algorithm == dns.tsig.GSS_TSIG:
            raise ValueError(f"TSIG algorithm {self.algorithm!r} is not supported")
        if not self.secret:
            raise ValueError("a TSIG key needs a secret")

    @property
    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm)

    @property
    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        """A one-key keyring for ``dns.message.from_wire`` and ``use_tsig``."""
        key = self.dns_key
        return {key.name: key}


def key_file_path(config: Config) -> Path:
    """Where the cluster's update key lives: ``dns.tsig_key_file`` (relative to the data dir) or the default."""
    base = Path(config.cluster.data_dir or ".")
    path = Path(config.dns.tsig_key_file) if config.dns.tsig_key_file else DEFAULT_KEY_FILE
    return path if path.is_absolute() else base / path


def format_key(key: TsigKey) -> str:
    """The key as a BIND key clause (what ``tsig-keygen`` prints)."""
    name = key.name.rstrip(".")
    secret = base64.b64encode(key.secret).decode("ascii")
    algorithm = dns.name.from_text(key.algorithm).to_text(omit_final_dot=True)
    return f'key "{name}" {{\n\talgorithm {algorithm};\n\tsecret "{secret}";\n}};\n'


def parse_key(text: str, *, source: str = "<key>") -> TsigKey:
    """The one key clause in ``text``; ConfigError naming ``source`` if it is anything else."""
    text = _COMMENT.sub("", text)
    match = _KEY_CLAUSE.fullmatch(text)
    if match is None:
        raise ConfigError(f"{source}: not a TSIG key file (expected one BIND key clause: key \"name\" {{ ... }};)")
    algorithm = _ALGORITHM.search(match["body"])
    secret = _SECRET.search(match["body"])
    if algorithm is None or secret is None:
        raise ConfigError(f"{source}: the key clause needs an algorithm and a secret")
    try:
        raw = base64.b64decode("".join(secret["secret"].split()), validate=True)
        return TsigKey(match["name"], raw, algorithm["algorithm"].lower())
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{source}: bad TSIG key: {exc}") from None


def read_key_file(path: str | os.PathLike[str]) -> TsigKey:
    """The key in the file at ``path`` (ConfigError if it is missing or malformed)."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no TSIG key file (dnsd --init creates one)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the TSIG key: {exc}") from None
    return parse_key(text, source=str(path))


def load_key(config: Config) -> TsigKey:
    """The cluster's update key, checked against ``dns.tsig_key_name``."""
    path = key_file_path(config)
    key = read_key_file(path)
    wanted = dns.name.from_text(config.dns.tsig_key_name).canonicalize().to_text()
    if key.name != wanted:
        raise ConfigError(f"{path}: the key is named {key.name!r}, dns.tsig_key_name says {wanted!r}")
    return key


def create_key_file(path: str | os.PathLike[str], name: str, *, fsync: bool = True) -> bool:
    """Create a new random key named ``name`` at ``path`` unless a file is there; True if created."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = TsigKey(name, secrets.token_bytes(SECRET_BYTES))
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(format_key(key))
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        try:
            # link, not rename: it fails if the name exists, so a key another
            # process created meanwhile is never replaced.
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if created and fsync:
        _fsync_dir(path.parent)
    return created


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
