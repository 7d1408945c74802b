"""The cluster zone: its data, how it is first built from the Config, and its file.

Owns: :class:`Zone`, an immutable snapshot of every RRset of the zone
(SOA, NS, A, AAAA, MX, TXT), with the order of each RRset's records as
they were added (the server rotates from that order); :class:`ZoneEditor`,
the working copy a change is made on; :func:`zone_from_config`, the zone
of a new cluster; :func:`save_zone` / :func:`load_zone`, its master file.

What a new zone holds (``<zone>`` is ``cluster.zone``, every TTL ``dns.ttl``)::

    <zone>          SOA  <first dns instance>.<zone> hostmaster.<zone> ...
    <zone>          NS   <each dns instance>.<zone>
    <zone>          MX   10 mta.<zone>                  (when there is an mta)
    mta.<zone>      A    every mta instance
    imap.<zone>     A    every access instance with an imap port
    pop.<zone>      A    every access instance with a pop3 port
    dir.<zone>      A    every directory instance (primary and replicas)
    mssN.<zone>     A    the address of identity mssN's active instance
    <name>.<zone>   A    each instance's own address (unless a name above took it)

(AAAA instead of A for an IPv6 address.)  From then on the file is the
truth: the membership the monitor changes with UPDATE survives restarts,
and the Config is not read again for the zone's content.

Invariants:

- A :class:`Zone` never changes; a change builds a new one
  (:meth:`ZoneEditor.finish`), so a query always sees one consistent
  version, and a change that fails to be saved leaves nothing behind.
- Every change bumps the SOA serial (RFC 1982 arithmetic): to the current
  Unix time if that is later, else by one -- serials keep growing even
  across a zone rebuilt from scratch.
- The file is written whole or not at all: a temporary file in the same
  directory, fsynced, renamed over the old one, then the directory fsynced
  -- only then is the new zone durable, and only then may an UPDATE be
  answered NOERROR.  A crash leaves the old file or the new one.
- A file that cannot be read, does not parse, or is the zone of another
  origin is an error (:class:`~intermail.config.ConfigError`): dnsd then
  refuses to start rather than serve an empty or foreign zone.

Logs: nothing (the server logs what it loads and changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import dns.exception
import dns.inet
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset
import dns.zone

from intermail.config import Config, ConfigError

__all__ = ["Zone", "ZoneEditor", "RecordSet", "SUPPORTED_TYPES", "SERVICE_NAMES", "zone_from_config",
           "save_zone", "load_zone", "zone_file_path", "next_serial", "serial_after"]

RdataType = dns.rdatatype.RdataType
Key = tuple[dns.name.Name, RdataType]

SUPPORTED_TYPES = frozenset({RdataType.SOA, RdataType.NS, RdataType.A, RdataType.AAAA, RdataType.MX,
                             RdataType.TXT})
# the service names of the zone, and which instances each holds: kind, and the port it needs (None: any)
SERVICE_NAMES: dict[str, tuple[str, str | None]] = {
    "mta": ("mta", None),
    "imap": ("access", "imap"),
    "pop": ("access", "pop3"),
    "dir": ("directory", None),
}
MX_PREFERENCE = 10
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 60, 30, 3600  # for a secondary, should one ever follow this zone
SERIAL_BITS = 32
_TYPE_ORDER = {RdataType.SOA: 0, RdataType.NS: 1}  # apex records first in the file, the rest by type number


@dataclasses.dataclass(frozen=True, slots=True)
class RecordSet:
    """The records of one (name, type), in the order they were added."""

    name: dns.name.Name
    rdtype: RdataType
    ttl: int
    rdatas: tuple[dns.rdata.Rdata, ...]

    def to_rrset(self, *, start: int = 0, owner: dns.name.Name | None = None) -> dns.rrset.RRset:
        """The RRset, its records rotated to begin at index ``start`` (modulo their number)."""
        rdatas = self.rdatas
        if len(rdatas) > 1 and start % len(rdatas):
            k = start % len(rdatas)
            rdatas = rdatas[k:] + rdatas[:k]
        return dns.rrset.from_rdata_list(owner or self.name, self.ttl, rdatas)

    def to_text(self) -> str:
        return self.to_rrset().to_text()


class Zone:
    """One immutable version of the zone (see the module doc)."""

    def __init__(self, origin: dns.name.Name | str, recordsets: Iterable[RecordSet]):
        self.origin = _canonical(origin)
        sets: dict[Key, RecordSet] = {}
        for rs in recordsets:
            name = rs.name.canonicalize()
            if not name.is_subdomain(self.origin):
                raise ValueError(f"{name} is outside the zone {self.origin}")
            if rs.rdatas:
                sets[(name, rs.rdtype)] = dataclasses.replace(rs, name=name)
        soa = sets.get((self.origin, RdataType.SOA))
        if soa is None or len(soa.rdatas) != 1:
            raise ValueError(f"the zone {self.origin} needs exactly one SOA record at its apex")
        if (self.origin, RdataType.NS) not in sets:
            raise ValueError(f"the zone {self.origin} needs NS records at its apex")
        self._sets = sets
        by_name: dict[dns.name.Name, list[RecordSet]] = {}
        for key in sorted(sets, key=_sort_key):
            by_name.setdefault(key[0], []).append(sets[key])
        self._by_name = {name: tuple(found) for name, found in by_name.items()}
        # every owner name and its ancestors inside the zone: those names
        # exist (an ancestor without records of its own is an empty
        # non-terminal: NODATA, not NXDOMAIN, RFC 8020)
        existing = set()
        for name in self._by_name:
            while name != self.origin and name not in existing:
                existing.add(name)
                name = name.parent()
        existing.add(self.origin)
        self._existing = frozenset(existing)

    # -- reading ---------------------------------------------------------------------

    @property
    def soa(self) -> RecordSet:
        return self._sets[(self.origin, RdataType.SOA)]

    @property
    def serial(self) -> int:
        return self.soa_rdata.serial

    @property
    def soa_rdata(self) -> dns.rdtypes.ANY.SOA.SOA:
        return self.soa.rdatas[0]  # type: ignore[return-value]

    def contains(self, name: dns.name.Name) -> bool:
        """Whether ``name`` is at or below the origin (this server is authoritative for it)."""
        return name.is_subdomain(self.origin)

    def exists(self, name: dns.name.Name) -> bool:
        """Whether ``name`` owns records or has a descendant that does."""
        return name.canonicalize() in self._existing

    def get(self, name: dns.name.Name, rdtype: int) -> RecordSet | None:
        return self._sets.get((name.canonicalize(), RdataType.make(rdtype)))

    def at(self, name: dns.name.Name) -> tuple[RecordSet, ...]:
        """Every RRset owned by ``name`` (SOA, NS first, then by type)."""
        return self._by_name.get(name.canonicalize(), ())

    def addresses(self, name: dns.name.Name | str) -> list[str]:
        """The A then AAAA addresses of ``name``, in stored order."""
        key = _canonical(name) if isinstance(name, str) else name
        out = []
        for rdtype in (RdataType.A, RdataType.AAAA):
            rs = self.get(key, rdtype)
            out += [rd.to_text() for rd in rs.rdatas] if rs else []
        return out

    def recordsets(self) -> Iterator[RecordSet]:
        """Every RRset, apex first, names in DNSSEC canonical order."""
        for records in self._by_name.values():
            yield from records

    def keys(self) -> frozenset[Key]:
        return frozenset(self._sets)

    def __len__(self) -> int:
        """The number of records (not RRsets)."""
        return sum(len(rs.rdatas) for rs in self._sets.values())

    def editor(self) -> ZoneEditor:
        return ZoneEditor(self)

    # -- master file -----------------------------------------------------------------

    def to_text(self) -> str:
        """The zone as an RFC 1035 master file, absolute names (BIND and Knot can load it)."""
        lines = [f"; zone {self.origin.to_text()} serial {self.serial}, written by intermail dnsd",
                 f"$ORIGIN {self.origin.to_text()}"]
        lines += [rs.to_text() for rs in self.recordsets()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, origin: dns.name.Name | str) -> Zone:
        """Parse a master file of the zone ``origin`` (ValueError if it is not one)."""
        origin = _canonical(origin)
        try:
            parsed = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=True)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(f"not a master file of {origin}: {exc}") from None
        recordsets = []
        for name, node in parsed.nodes.items():
            for rdataset in node.rdatasets:
                recordsets.append(RecordSet(name, rdataset.rdtype, rdataset.ttl, tuple(rdataset)))
        return cls(origin, recordsets)


class ZoneEditor:
    """A mutable copy of a :class:`Zone`; :meth:`finish` makes the next version.

    It knows nothing of RFC 2136's rules (the apex's SOA and NS, which
    types are allowed): :mod:`intermail.dns.server` applies them.
    """

    def __init__(self, zone: Zone):
        self.base = zone
        self._sets: dict[Key, tuple[int, list[dns.rdata.Rdata]]] = {
            key: (rs.ttl, list(rs.rdatas)) for key, rs in zone._sets.items()}
        self.changes: list[str] = []  # one line per change, for the log

    def records(self, name: dns.name.Name, rdtype: int) -> list[dns.rdata.Rdata]:
        return list(self._sets.get((name.canonicalize(), RdataType.make(rdtype)), (0, []))[1])

    def types_at(self, name: dns.name.Name) -> list[RdataType]:
        name = name.canonicalize()
        return [rdtype for (owner, rdtype), (_, rdatas) in self._sets.items() if owner == name and rdatas]

    def name_in_use(self, name: dns.name.Name) -> bool:
        """RFC 2136 section 2.4.4: the name owns at least one record."""
        return bool(self.types_at(name))

    def add(self, name: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> bool:
        """Add one record (a duplicate is ignored); a new TTL applies to the whole RRset."""
        key = (name.canonicalize(), RdataType.make(rdata.rdtype))
        old_ttl, rdatas = self._sets.get(key, (ttl, []))
        if rdata in rdatas:
            if old_ttl == ttl:
                return False
            self._sets[key] = (ttl, rdatas)
            self.changes.append(f"ttl {key[0]} {key[1].name} {ttl}")
            return True
        self._sets[key] = (ttl, [*rdatas, rdata])
        self.changes.append(f"add {key[0]} {ttl} {key[1].name} {rdata.to_text()}")
        return True

    def replace(self, name: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> bool:
        """Make ``rdata`` the only record of its type at ``name`` (the SOA)."""
        key = (name.canonicalize(), RdataType.make(rdata.rdtype))
        if self._sets.get(key) == (ttl, [rdata]):
            return False
        self._sets[key] = (ttl, [rdata])
        self.changes.append(f"set {key[0]} {ttl} {key[1].name} {rdata.to_text()}")
        return True

    def delete_rdata(self, name: dns.name.Name, rdata: dns.rdata.Rdata) -> bool:
        key = (name.canonicalize(), RdataType.make(rdata.rdtype))
        ttl, rdatas = self._sets.get(key, (0, []))
        if rdata not in rdatas:
            return False
        self._sets[key] = (ttl, [rd for rd in rdatas if rd != rdata])
        self.changes.append(f"delete {key[0]} {key[1].name} {rdata.to_text()}")
        return True

    def delete_rrset(self, name: dns.name.Name, rdtype: int) -> bool:
        key = (name.canonicalize(), RdataType.make(rdtype))
        if not self._sets.get(key, (0, []))[1]:
            return False
        del self._sets[key]
        self.changes.append(f"delete {key[0]} {key[1].name}")
        return True

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def finish(self, *, bump_serial: bool = True, now: float | None = None) -> Zone:
        """The new version; with ``bump_serial`` and changes made, its SOA serial is :func:`next_serial`."""
        origin = self.base.origin
        if bump_serial and self.changed:
            ttl, (soa,) = self._sets[(origin, RdataType.SOA)]
            self._sets[(origin, RdataType.SOA)] = (ttl, [soa.replace(serial=next_serial(soa.serial, now))])
        return Zone(origin, (RecordSet(name, rdtype, ttl, tuple(rdatas))
                             for (name, rdtype), (ttl, rdatas) in self._sets.items()))


# -- serial numbers (RFC 1982) ----------------------------------------------------------


def serial_after(new: int, old: int) -> bool:
    """Whether serial ``new`` is later than ``old`` in RFC 1982 arithmetic."""
    diff = (new - old) % (1 << SERIAL_BITS)
    return 0 < diff < (1 << (SERIAL_BITS - 1))


def next_serial(old: int, now: float | None = None) -> int:
    """The serial after ``old``: the current Unix time if that is later, else ``old + 1``."""
    clock = int(time.time() if now is None else now) % (1 << SERIAL_BITS)
    return clock if serial_after(clock, old) else (old + 1) % (1 << SERIAL_BITS)


# -- the zone of a new cluster ----------------------------------------------------------


def zone_from_config(config: Config, *, now: float | None = None) -> Zone:
    """The zone a new cluster starts with (see the module doc)."""
    origin = _canonical(config.cluster.zone)
    ttl = config.dns.ttl
    addresses: dict[dns.name.Name, list[str]] = {}

    def publish(label: str, address: str) -> None:
        try:
            dns.inet.af_for_address(address)
            name = dns.name.from_text(label, origin).canonicalize()
        except (ValueError, dns.exception.DNSException):
            return  # not an IP address (a host name) or not a label: nothing to publish
        found = addresses.setdefault(name, [])
        if address not in found:
            found.append(address)

    for service, (kind, port) in SERVICE_NAMES.items():
        for inst in config.instances_of(kind):
            if port is None or port in inst.ports:
                publish(service, inst.address)
    for inst in config.instances_of("mss"):
        if inst.role in ("active", ""):
            publish(inst.identity or inst.name, inst.address)
    taken = set(addresses)
    for inst in config.instances:
        with contextlib.suppress(dns.exception.DNSException):
            if dns.name.from_text(inst.name, origin).canonicalize() in taken:
                continue  # a service or identity name wins over an instance of the same name
        publish(inst.name, inst.address)

    servers = [dns.name.from_text(i.name, origin) for i in config.instances_of("dns")] or \
        [dns.name.from_text("ns", origin)]
    soa_text = (f"{servers[0]} hostmaster.{origin} {next_serial(0, now)} "
                f"{SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {ttl}")
    records = [RecordSet(origin, RdataType.SOA, ttl, (_rdata(RdataType.SOA, soa_text),)),
               RecordSet(origin, RdataType.NS, ttl, tuple(_rdata(RdataType.NS, str(s)) for s in servers))]
    mta = dns.name.from_text("mta", origin)
    if mta in addresses:
        records.append(RecordSet(origin, RdataType.MX, ttl, (_rdata(RdataType.MX, f"{MX_PREFERENCE} {mta}"),)))
    for name, found in addresses.items():
        for rdtype, family in ((RdataType.A, 4), (RdataType.AAAA, 6)):
            chosen = [a for a in found if (":" in a) == (family == 6)]
            if chosen:
                records.append(RecordSet(name, rdtype, ttl, tuple(_rdata(rdtype, a) for a in chosen)))
    return Zone(origin, records)


# -- the file ---------------------------------------------------------------------------


def zone_file_path(config: Config, name: str) -> Path:
    """Where dns instance ``name`` keeps its zone: ``<data_dir>/<name>/<zone>.zone``."""
    return config.state_dir(name) / f"{_canonical(config.cluster.zone).to_text(omit_final_dot=True)}.zone"


def save_zone(zone: Zone, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
    """Write the zone's master file atomically and (with ``fsync``) durably; see the module doc."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(zone.to_text())
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())  # the content is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        # the rename itself is durable only once the directory is
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_zone(path: str | os.PathLike[str], origin: dns.name.Name | str) -> Zone:
    """The zone in the file at ``path``; ConfigError if it is missing, unreadable or not ``origin``'s."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no zone file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the zone file: {exc}") from None
    try:
        return Zone.from_text(text, origin)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _canonical(name: dns.name.Name | str) -> dns.name.Name:
    if isinstance(name, str):
        name = dns.name.from_text(name)
    return name.canonicalize()


def _rdata(rdtype: RdataType, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


def _sort_key(key: Key) -> tuple[dns.name.Name, int, int]:
    name, rdtype = key
    return (name, _TYPE_ORDER.get(rdtype, 2), int(rdtype))
