"""The one typed configuration: frozen dataclasses loaded once from the topology TOML.

Owns: the schema of the topology file (every key, its type, its default and a
one-line doc beside it), loading and checking it, and :func:`describe` for
``intermail config defaults``.

Invariants:

- Every key has a default, so ``load(None)`` (no file) is a complete, valid
  configuration (the embedded single-machine cluster starts from it).
  The only exceptions are the ``name`` and ``kind`` of an ``[[instance]]``
  entry, which mean nothing without a value.
- A key the schema does not know is an error, never silently ignored: a typo
  in ``segment_bytes`` must not leave a store running on the default.
- Values are checked when a :class:`Config` is built, whether from a file or
  in code, so a ``Config`` that exists is valid.
- A ``Config`` is immutable (frozen dataclasses, tuples, read-only mappings)
  and passed down to whoever needs it; nothing keeps one in a module global.

Logs: nothing; errors are raised as :class:`ConfigError` naming the file and
the key.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intermail.errors import ErrorKind, MailError

MiB = 1024 * 1024

INSTANCE_KINDS = frozenset({"mta", "access", "directory", "mss", "dns", "monitor"})
INSTANCE_ROLES = frozenset({"", "active", "spare", "primary", "replica"})
PORT_NAMES = frozenset({"smtp", "submission", "lmtp", "imap", "pop3", "rpc", "dns", "metrics"})
LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
LOG_FORMATS = frozenset({"json", "text"})
LOOPS = frozenset({"auto", "asyncio", "uvloop"})
_DNS_NAME = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")


class ConfigError(MailError):
    """The topology file (or a Config built in code) is unreadable or invalid."""

    def __init__(self, detail: str):
        super().__init__(ErrorKind.INVALID, safe="invalid configuration", detail=detail)

    def __str__(self) -> str:
        return self.detail


class _Invalid(ConfigError):
    """One key failed its check; :func:`from_dict` re-raises it naming the file."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


def _key(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING,
         minimum: float | None = None, choices: frozenset[str] | None = None,
         required: bool = False) -> Any:
    """A schema field: default, one-line doc, and the checks its value must pass."""
    metadata = {"doc": doc, "min": minimum, "choices": choices, "required": required}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_fields(obj: Any, prefix: str) -> None:
    """Run the per-field checks declared in the metadata (min, choices, required)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        _check_type(key, value, hints[f.name])
        if f.metadata.get("required") and value == "":
            raise _Invalid(key, "is required")
        minimum = f.metadata.get("min")
        if minimum is not None and value < minimum:
            raise _Invalid(key, f"must be at least {minimum}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise _Invalid(key, f"must be one of {sorted(choices)}, got {value!r}")


@dataclass(frozen=True)
class ClusterConfig:
    zone: str = _key("intermail.test", "DNS zone that names the cluster (mta., imap., pop., dir., mssN.)")
    data_dir: str = _key("", "directory for cluster state; empty: the --data option, $INTERMAIL_DATA or ./intermail-data")

    def __post_init__(self) -> None:
        _check_fields(self, "cluster.")
        if not self.zone or self.zone.startswith(".") or " " in self.zone:
            raise _Invalid("cluster.zone", f"not a DNS name: {self.zone!r}")


@dataclass(frozen=True)
class StorageConfig:
    segment_bytes: int = _key(64 * MiB, "journal segment size before rolling over to a new segment file", minimum=4096)
    mirrors: int = _key(2, "number of mirror directories the MTA queue writes to (I-5)", minimum=1)
    group_commit_max_records: int = _key(4096, "most journal records one fsync may commit (I-2)", minimum=1)
    group_commit_max_bytes: int = _key(8 * MiB, "most journal bytes one fsync may commit (I-2)", minimum=1)
    checkpoint_interval_bytes: int = _key(256 * MiB, "journal bytes between index checkpoints (bounds replay time)", minimum=1)
    fsync: bool = _key(True, "fsync files and directories before acknowledging; false only for throw-away tests")

    def __post_init__(self) -> None:
        _check_fields(self, "storage.")


@dataclass(frozen=True)
class LogConfig:
    level: str = _key("INFO", "lowest level written: DEBUG, INFO, WARNING, ERROR or CRITICAL", choices=LOG_LEVELS)
    format: str = _key("json", "json: one JSON object per line; text: human-readable lines", choices=LOG_FORMATS)

    def __post_init__(self) -> None:
        _check_fields(self, "log.")

    @property
    def level_number(self) -> int:
        return logging.getLevelName(self.level)


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int = _key(32 * MiB, "largest message accepted, in bytes (SMTP SIZE, IMAP APPEND)", minimum=1)
    line_length: int = _key(1000, "longest protocol line accepted, in bytes including CRLF (RFC 5321 4.5.3.1.6)", minimum=80)
    recipients: int = _key(1000, "most recipients per message", minimum=1)
    connections_per_ip: int = _key(20, "most simultaneous connections from one client address", minimum=1)
    command_timeout: float = _key(300.0, "seconds a client may take to finish one command (RFC 5321 4.5.3.2)", minimum=0.001)
    idle_timeout: float = _key(1800.0, "seconds an authenticated session may sit idle (RFC 9051 5.4)", minimum=0.001)
    auth_failures_before_delay: int = _key(3, "failed logins on one connection before replies are delayed", minimum=0)
    quota_temporary: bool = _key(False, "answer an over-quota recipient 452 4.2.2 (retry) instead of 552 5.2.2 (bounce)")

    def __post_init__(self) -> None:
        _check_fields(self, "limits.")


@dataclass(frozen=True)
class DirectoryConfig:
    hash_time_cost: int = _key(3, "argon2id passes for new password hashes (RFC 9106 low-memory profile: 3)", minimum=1)
    hash_memory_kib: int = _key(65536, "argon2id memory per hash, KiB (64 MiB); each login verify costs this much", minimum=8)
    hash_parallelism: int = _key(4, "argon2id lanes per hash", minimum=1)
    auth_user_failures: int = _key(10, "failed logins for one account within auth_window before it is refused; 0: no limit", minimum=0)
    auth_ip_failures: int = _key(30, "failed logins from one client address within auth_window before it is refused; 0: no limit", minimum=0)
    auth_window: float = _key(300.0, "seconds a failed login counts against the account and the client address", minimum=1.0)
    max_alias_depth: int = _key(8, "most levels of alias-to-alias expansion", minimum=1)
    max_alias_targets: int = _key(1000, "most addresses one alias expands to", minimum=1)
    max_field_bytes: int = _key(1024, "longest text field (address, password, name) a directory request may carry", minimum=64)
    replica_poll_interval: float = _key(5.0, "seconds between a replica's change-log polls (pushes make it follow sooner)", minimum=0.05)
    write_wait: float = _key(2.0, "seconds a replica that forwarded a write waits to have applied it before answering", minimum=0.0)
    cache_ttl: float = _key(30.0, "seconds a directory client caches a lookup", minimum=0.0)
    negative_ttl: float = _key(5.0, "seconds a directory client caches an unknown address", minimum=0.0)
    stale_ttl: float = _key(600.0, "seconds an expired cached lookup may still be used while no directory answers", minimum=0.0)
    request_timeout: float = _key(5.0, "seconds a directory client waits for one answer before trying elsewhere", minimum=0.01)

    def __post_init__(self) -> None:
        _check_fields(self, "directory.")


@dataclass(frozen=True)
class QueueConfig:
    concurrency: int = _key(64, "messages the queue manager attempts at once", minimum=1)
    per_destination: int = _key(32, "transactions at once per destination (a store, a remote domain)", minimum=1)
    retry_base: float = _key(60.0, "seconds before the first retry; doubled after each attempt", minimum=0.01)
    retry_max: float = _key(3600.0, "longest wait between two attempts, seconds", minimum=0.01)
    lifetime: float = _key(5 * 86400.0, "seconds a message may stay queued before its pending recipients bounce (4.4.7)", minimum=1.0)
    smtp_port: int = _key(25, "port of remote MX hosts (tests point it at a sink)", minimum=1)
    connect_timeout: float = _key(30.0, "seconds to open a connection to a store or a remote MX", minimum=0.01)
    data_timeout: float = _key(600.0, "seconds for a whole delivery transaction", minimum=0.01)

    def __post_init__(self) -> None:
        _check_fields(self, "queue.")


@dataclass(frozen=True)
class AccessConfig:
    failover_window: float = _key(30.0, "seconds an access server keeps retrying a store that went away (a take-over) before a session sees an error", minimum=0.0)
    store_timeout: float = _key(30.0, "seconds an access server waits for one store answer", minimum=0.01)
    imap_max_line: int = _key(65536, "longest IMAP command line, bytes, literals not counted (RFC 7162 asks for at least 8192)", minimum=1000)
    imap_max_literal: int = _key(65536, "largest total of an IMAP command's literals other than APPEND messages, bytes", minimum=1)
    imap_max_bad_commands: int = _key(10, "bad IMAP commands in a row before the session is closed", minimum=1)
    pop3_idle_timeout: float = _key(600.0, "seconds a POP3 session may sit idle (RFC 1939 asks for at least 10 minutes)", minimum=0.001)
    pop3_max_bad_commands: int = _key(10, "bad POP3 commands in a row before the session is closed", minimum=0)
    pop3_lock_lease: float = _key(60.0, "seconds a POP3 maildrop lock lives without renewal (renewed while the session lives)", minimum=1.0)
    auth_failure_delay: float = _key(2.0, "seconds each failed login is delayed once auth_failures_before_delay is reached", minimum=0.0)
    max_auth_failures: int = _key(5, "failed logins on one connection before it is closed", minimum=1)

    def __post_init__(self) -> None:
        _check_fields(self, "access.")


@dataclass(frozen=True)
class MonitorConfig:
    interval: float = _key(0.2, "seconds between two probe rounds of the monitor", minimum=0.01)
    timeout: float = _key(0.5, "seconds one probe may take before it counts as failed", minimum=0.01)
    down_after: int = _key(3, "failed probes in a row before an instance is DOWN (and acted upon)", minimum=1)
    up_after: int = _key(2, "good probes in a row before a DOWN instance is UP again", minimum=1)
    takeover_timeout: float = _key(10.0, "seconds a spare may take to take a store identity over", minimum=0.1)
    startup_grace: float = _key(10.0, "seconds after the monitor starts before it takes over a store it has not yet seen up (it may be starting)", minimum=0.0)

    def __post_init__(self) -> None:
        _check_fields(self, "monitor.")


@dataclass(frozen=True)
class DnsConfig:
    ttl: int = _key(5, "TTL of every record the cluster DNS server publishes, and its negative-answer TTL (SOA minimum), seconds", minimum=0)
    tsig_key_name: str = _key("intermail-update", "name of the TSIG key (HMAC-SHA256) that signs RFC 2136 updates of the zone", required=True)
    tsig_key_file: str = _key("", "the TSIG key, in BIND key-file format; empty: <data_dir>/keys/dns-update.key (created by dnsd --init)")
    max_udp_payload: int = _key(1232, "largest UDP answer the DNS server sends (EDNS payload it announces); larger ones are truncated (TC)", minimum=512)
    tcp_idle_timeout: float = _key(10.0, "seconds a DNS client's TCP connection may stay idle before the server closes it (RFC 7766)", minimum=0.01)

    def __post_init__(self) -> None:
        _check_fields(self, "dns.")
        if not _DNS_NAME.fullmatch(self.tsig_key_name):
            raise _Invalid("dns.tsig_key_name", f"not a DNS name: {self.tsig_key_name!r}")
        if self.max_udp_payload > 65535:
            raise _Invalid("dns.max_udp_payload", f"must be at most 65535, got {self.max_udp_payload}")


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = _key("", "PEM certificate chain for STARTTLS (SMTP, submission, IMAP, POP3); empty: no STARTTLS")
    key_file: str = _key("", "PEM private key of cert_file")
    auth_without_tls: bool = _key(False, "allow AUTH/LOGIN over plaintext (only for test clusters on loopback)")

    def __post_init__(self) -> None:
        _check_fields(self, "tls.")
        if bool(self.cert_file) != bool(self.key_file):
            raise _Invalid("tls.key_file", "cert_file and key_file go together")


@dataclass(frozen=True)
class BackupConfig:
    dir: str = _key("", "where scheduled backups go (<dir>/<identity>/<time>-full|incr, <dir>/<directory primary>/<time>); empty: <data_dir>/backups")
    full_interval: float = _key(0.0, "seconds between scheduled full backups of each store and of the directory; 0: none", minimum=0.0)
    incremental_interval: float = _key(0.0, "seconds between scheduled incremental backups of each store (after its first full); 0: none", minimum=0.0)
    keep: int = _key(2, "full backup chains (a full and its incrementals) kept per store, directory backups kept; older ones are deleted", minimum=1)
    rate_mb: float = _key(10.0, "bound on a store backup's copy rate, MB/s (scheduled ones, and on-demand ones that give none), so serving keeps its pace; 0: none", minimum=0.0)

    def __post_init__(self) -> None:
        _check_fields(self, "backup.")


@dataclass(frozen=True)
class RunnerConfig:
    loop: str = _key("auto", "event loop: auto (uvloop when installed), asyncio or uvloop", choices=LOOPS)
    drain_timeout: float = _key(10.0, "seconds live connections get to finish after SIGTERM before they are cancelled", minimum=0.0)

    def __post_init__(self) -> None:
        _check_fields(self, "runner.")


@dataclass(frozen=True)
class InstanceConfig:
    name: str = _key("", "unique instance name, e.g. mta1", required=True)
    kind: str = _key("", "server kind: mta, access, directory, mss, dns or monitor", required=True,
                     choices=INSTANCE_KINDS | {""})
    address: str = _key("127.0.0.1", "IP address the instance binds (its own 127.0.n.k on one machine)")
    ports: Mapping[str, int] = _key(doc="port per service name (smtp, submission, lmtp, imap, pop3, rpc, dns, metrics); 0 = any free port",
                                    factory=lambda: types.MappingProxyType({}))
    role: str = _key("", "active, spare, primary or replica; empty when the kind has no roles", choices=INSTANCE_ROLES)
    identity: str = _key("", "store identity an mss instance serves (mss1); empty for other kinds")
    store_dirs: tuple[str, ...] = _key((), "store or queue directories, one per mirror; the first is the primary copy")

    def __post_init__(self) -> None:
        # Callers building instances in code may pass a plain dict or list;
        # freeze them so the Config stays immutable all the way down.
        object.__setattr__(self, "ports", types.MappingProxyType(dict(self.ports)))
        object.__setattr__(self, "store_dirs", tuple(self.store_dirs))
        prefix = f"instance[{self.name or '?'}]."
        _check_fields(self, prefix)
        for port_name, port in self.ports.items():
            if port_name not in PORT_NAMES:
                raise _Invalid(f"{prefix}ports.{port_name}", f"unknown port name; known: {sorted(PORT_NAMES)}")
            if not 0 <= port <= 65535:
                raise _Invalid(f"{prefix}ports.{port_name}", f"must be 0..65535, got {port}")
        if self.identity and self.kind != "mss":
            raise _Invalid(f"{prefix}identity", "only an mss instance has a store identity")


@dataclass(frozen=True)
class Config:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    instances: tuple[InstanceConfig, ...] = ()
    source: str | None = field(default=None, compare=False)  # file it came from; None = defaults

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", tuple(self.instances))
        seen: set[str] = set()
        for inst in self.instances:
            if inst.name in seen:
                raise _Invalid(f"instance[{inst.name}].name", "duplicate instance name")
            seen.add(inst.name)

    def instance(self, name: str) -> InstanceConfig:
        """The ``[[instance]]`` entry called ``name`` (KeyError when there is none)."""
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(name)

    def instances_of(self, kind: str) -> tuple[InstanceConfig, ...]:
        """The ``[[instance]]`` entries of one kind, in file order."""
        return tuple(inst for inst in self.instances if inst.kind == kind)

    def state_dir(self, name: str) -> Path:
        """Where instance ``name`` keeps its state: ``<data_dir>/<name>``."""
        return Path(self.cluster.data_dir or ".") / name

    def ready_file(self, name: str) -> Path:
        """Where instance ``name`` publishes its bound ports: ``<data_dir>/run/<name>.ready``."""
        return Path(self.cluster.data_dir or ".") / "run" / f"{name}.ready"

    def with_data_dir(self, data_dir: str) -> Config:
        """A copy whose ``cluster.data_dir`` is ``data_dir`` (the CLI's --data wins over the file)."""
        return dataclasses.replace(self, cluster=dataclasses.replace(self.cluster, data_dir=data_dir))


# Top-level TOML tables and the dataclass each one fills.  ``[[instance]]`` is
# the one array of tables; it fills Config.instances.
SECTIONS: dict[str, type] = {
    "cluster": ClusterConfig,
    "storage": StorageConfig,
    "log": LogConfig,
    "limits": LimitsConfig,
    "runner": RunnerConfig,
    "directory": DirectoryConfig,
    "queue": QueueConfig,
    "access": AccessConfig,
    "monitor": MonitorConfig,
    "dns": DnsConfig,
    "tls": TlsConfig,
    "backup": BackupConfig,
}
INSTANCE_TABLE = "instance"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is tuple:
        return f"an array of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    if origin in (Mapping, dict):
        return f"a table of {_type_name(typing.get_args(tp)[1]).split(' ', 1)[1]}s"
    return str(tp)


def _check_type(key: str, value: Any, tp: Any) -> None:
    """Raise _Invalid unless ``value`` (already converted) has type ``tp``."""
    origin = typing.get_origin(tp)
    # bool is an int subclass: `segment_bytes = true` must not pass as 1.
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp in (bool, str):
        ok = isinstance(value, tp)
    elif origin is tuple:
        item = typing.get_args(tp)[0]
        ok = isinstance(value, tuple)
        if ok:
            for i, element in enumerate(value):
                _check_type(f"{key}[{i}]", element, item)
    elif origin in (Mapping, dict):
        item = typing.get_args(tp)[1]
        ok = isinstance(value, Mapping)
        if ok:
            for sub, element in value.items():
                _check_type(f"{key}.{sub}", element, item)
    else:  # pragma: no cover - a schema type this checker was not taught
        raise TypeError(f"config schema type {tp!r} of {key} is not supported")
    if not ok:
        raise _Invalid(key, f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Turn a TOML value into the schema's immutable type, checking it."""
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        value = tuple(value)
    elif origin in (Mapping, dict) and isinstance(value, dict):
        value = types.MappingProxyType(dict(value))
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    _check_type(key, value, tp)
    return value


def _build(cls: type, table: Any, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise _Invalid(prefix.rstrip("."), f"must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in table.items():
        if name not in known:
            raise _Invalid(f"{prefix}{name}", f"unknown key; known keys: {', '.join(sorted(known))}")
        kwargs[name] = _convert(f"{prefix}{name}", value, hints[name])
    for name, f in known.items():
        if f.metadata.get("required") and name not in kwargs:
            raise _Invalid(f"{prefix}{name}", "is required")
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any], source: str | None = None) -> Config:
    """Build a Config from parsed TOML; raises ConfigError naming ``source`` and the key."""
    where = source or "<config>"
    try:
        sections = {}
        instances: list[InstanceConfig] = []
        for name, value in data.items():
            if name in SECTIONS:
                sections[name] = _build(SECTIONS[name], value, f"{name}.")
            elif name == INSTANCE_TABLE:
                if not isinstance(value, list):
                    raise _Invalid(name, "must be an array of tables: write [[instance]]")
                for i, entry in enumerate(value):
                    label = entry.get("name", i) if isinstance(entry, dict) else i
                    instances.append(_build(InstanceConfig, entry, f"instance[{label}]."))
            else:
                known = sorted([*SECTIONS, INSTANCE_TABLE])
                raise _Invalid(name, f"unknown section or key; known: {', '.join(known)}")
        return Config(**sections, instances=tuple(instances), source=source)
    except _Invalid as exc:
        raise ConfigError(f"{where}: {exc.key}: {exc.problem}") from None


def load(path: str | Path | None) -> Config:
    """Load the topology file at ``path``; ``None`` gives the all-defaults Config."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, source=str(path))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dict(value) if isinstance(value, Mapping) else value
    return None


def describe() -> list[tuple[str, Any, str]]:
    """Every key as ``(dotted key, default, doc)``, in file order.

    Instance keys are listed as ``instance[].key``; a required key's default
    is shown as ``None``.
    """
    rows: list[tuple[str, Any, str]] = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", _default_of(f), f.metadata["doc"]))
    for f in dataclasses.fields(InstanceConfig):
        default = None if f.metadata.get("required") else _default_of(f)
        rows.append((f"{INSTANCE_TABLE}[].{f.name}", default, f.metadata["doc"]))
    return rows
