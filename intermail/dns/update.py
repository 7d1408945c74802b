"""The client side of RFC 2136: add and delete addresses of a name, signed with the cluster's TSIG key.

Owns: :func:`update` (one signed UPDATE over TCP), :func:`addresses`
(what a server holds for a name, asked over TCP), and :class:`Membership`,
the callable the monitor uses to keep a service name (``mta``, ``imap``,
``pop``, ``dir``) in step with the instances that answer::

    key = load_key(config)                           # intermail.dns.tsig
    await update(("127.0.1.1", 5353), "intermail.test", key, "mta", add=["127.0.3.2"])
    membership = membership_from_config(config)
    await membership("delete", "mta", "127.0.3.2")   # -> the addresses left

The messages are plain RFC 2136 + TSIG (HMAC-SHA256), what BIND and Knot
accept: ``dns.update.UpdateMessage`` sent with ``dns.asyncquery.tcp``.

Invariants:

- Every failure is a :class:`MailError`: ``UNAVAILABLE`` when the server
  cannot be reached or does not answer within ``timeout``; ``PERM`` when it
  refuses (REFUSED, NOTAUTH, NOTZONE, FORMERR, a TSIG error: a wrong key
  will not get better by retrying); ``TEMP`` for SERVFAIL and for a failed
  prerequisite (:class:`PrerequisiteFailed`: someone changed the name
  meanwhile).  The server's reply must carry a valid TSIG of the same key
  (dnspython checks it), so a forged NOERROR is not believed.
- :class:`Membership` never removes the **last** address of a name: the
  deletion goes out with a value-dependent prerequisite (the name's
  RRset is exactly what was just read, RFC 2136 section 2.4.2), so two
  monitors removing the last two addresses at once cannot both succeed; a
  failed prerequisite is read again and retried a few times.  The DNS
  server itself would allow it (it knows no "service").
- With several DNS servers (the zone can be served by two ``dnsd``), a
  change goes to each, concurrently; it counts as done when one took it,
  and fails only if all failed.

Logs: ``dns.kept_last_address`` (a removal skipped: it would have left the
name without an address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence

import dns.asyncquery
import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdataset
import dns.tsig
import dns.update

from intermail.config import Config
from intermail.dns.tsig import TsigKey, load_key
from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events
from intermail.net.runner import read_ready_file

__all__ = ["update", "addresses", "Membership", "membership_from_config", "PrerequisiteFailed", "dns_servers"]

log = logging.getLogger("intermail.dns.update")

register_events({
    "dns.kept_last_address": "a removal from a name was skipped: it would have left the name without an address",
})

Server = tuple[str, int]
DEFAULT_TIMEOUT = 5.0
PREREQUISITE_RETRIES = 3
_REFUSALS = {dns.rcode.REFUSED, dns.rcode.NOTAUTH, dns.rcode.NOTZONE, dns.rcode.FORMERR, dns.rcode.NOTIMP}
_PREREQUISITE_RCODES = {dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.YXDOMAIN}


class PrerequisiteFailed(MailError):
    """The server refused an update because a prerequisite did not hold (the name changed meanwhile)."""

    def __init__(self, detail: str):
        super().__init__(ErrorKind.TEMP, safe="DNS name changed meanwhile", detail=detail)


def _rdtype_of(address: str) -> dns.rdatatype.RdataType:
    try:
        family = dns.inet.af_for_address(address)
    except ValueError:
        raise MailError(ErrorKind.INVALID, safe="not an IP address", detail=f"not an IP address: {address!r}") from None
    return dns.rdatatype.AAAA if family == dns.inet.AF_INET6 else dns.rdatatype.A


def _absolute(name: str, zone: dns.name.Name) -> dns.name.Name:
    """``mta`` -> ``mta.<zone>.``; an absolute name (final dot) is taken as it is."""
    try:
        return dns.name.from_text(name, zone)
    except dns.exception.DNSException as exc:
        raise MailError(ErrorKind.INVALID, safe="not a DNS name", detail=f"{name!r}: {exc}") from None


async def update(server: Server, zone: str, key: TsigKey, name: str, *, add: Iterable[str] = (),
                 delete: Iterable[str] = (), ttl: int = 5, expect: Sequence[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
    """One signed UPDATE to ``server``: delete then add addresses of ``name`` (relative to ``zone``).

    ``expect``, when given, is a prerequisite: the name's addresses of the
    family of the first address changed are exactly ``expect`` (empty: it
    has none), else :class:`PrerequisiteFailed`.
    """
    origin = dns.name.from_text(zone)
    owner = _absolute(name, origin)
    message = dns.update.UpdateMessage(origin, keyring=key.keyring, keyname=dns.name.from_text(key.name),
                                       keyalgorithm=key.algorithm)
    add, delete = list(add), list(delete)
    if expect is not None and (add or delete):
        rdtype = _rdtype_of((delete or add)[0])
        if expect:
            message.present(owner, dns.rdataset.from_text(dns.rdataclass.IN, rdtype, 0, *expect))
        else:
            message.absent(owner, rdtype)
    for address in delete:
        message.delete(owner, _rdtype_of(address), address)
    for address in add:
        message.add(owner, ttl, _rdtype_of(address), address)
    reply = await _exchange(message, server, timeout, what=f"update of {owner}")
    rcode = reply.rcode()
    if rcode == dns.rcode.NOERROR:
        return
    text = f"{server[0]}:{server[1]} answered {dns.rcode.to_text(rcode)} to the update of {owner}"
    if rcode in _PREREQUISITE_RCODES:
        raise PrerequisiteFailed(text)
    if rcode in _REFUSALS:
        raise MailError(ErrorKind.PERM, safe="DNS update refused", detail=text)
    raise MailError(ErrorKind.TEMP, safe="DNS update failed", detail=text)


async def addresses(server: Server, zone: str, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """The A then AAAA addresses ``server`` holds for ``name`` (asked over TCP: never truncated)."""
    owner = _absolute(name, dns.name.from_text(zone))
    found: list[str] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        reply = await _exchange(dns.message.make_query(owner, rdtype), server, timeout, what=f"lookup of {owner}")
        rcode = reply.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return []
        if rcode != dns.rcode.NOERROR:
            raise MailError(ErrorKind.UNAVAILABLE, safe="DNS lookup failed",
                            detail=f"{server[0]}:{server[1]} answered {dns.rcode.to_text(rcode)} for {owner}")
        for rrset in reply.answer:
            if rrset.rdtype == rdtype and rrset.name == owner:
                found += [rdata.to_text() for rdata in rrset]
    return found


async def _exchange(message: dns.message.Message, server: Server, timeout: float, *, what: str) -> dns.message.Message:
    try:
        return await dns.asyncquery.tcp(message, server[0], timeout=timeout, port=server[1])
    except dns.tsig.PeerError as exc:
        raise MailError(ErrorKind.PERM, safe="DNS update key refused",
                        detail=f"{server[0]}:{server[1]} refused the TSIG key for the {what}: {type(exc).__name__}") from None
    except (dns.exception.DNSException, OSError, EOFError, TimeoutError) as exc:
        raise MailError(ErrorKind.UNAVAILABLE, safe="DNS server unavailable",
                        detail=f"{server[0]}:{server[1]}, {what}: {type(exc).__name__}: {exc}"[:300]) from None


class Membership:
    """``await membership(action, name, address)`` -> the name's addresses after; see the module doc."""

    def __init__(self, servers: Sequence[Server] | Callable[[], Sequence[Server]], zone: str,
                 key: TsigKey | Callable[[], TsigKey], *, ttl: int = 5, timeout: float = DEFAULT_TIMEOUT):
        self._servers = servers
        self.zone = zone
        self._key = key
        self.ttl = ttl
        self.timeout = timeout

    @property
    def servers(self) -> list[Server]:
        servers = self._servers() if callable(self._servers) else self._servers
        return list(servers)

    @property
    def key(self) -> TsigKey:
        if callable(self._key):
            self._key = self._key()  # read once it exists (dnsd --init creates it)
        return self._key

    async def __call__(self, action: str, name: str, address: str) -> list[str]:
        if action not in ("add", "delete"):
            raise ValueError(f"action must be 'add' or 'delete', not {action!r}")
        _rdtype_of(address)
        servers = self.servers
        if not servers:
            raise MailError(ErrorKind.UNAVAILABLE, safe="no DNS server", detail="no DNS server address known")
        key = self.key
        change = self._add if action == "add" else self._delete
        results = await asyncio.gather(*(change(server, key, name, address) for server in servers),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, list):
                return result
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, MailError):
                raise error
        raise errors[0]

    async def _add(self, server: Server, key: TsigKey, name: str, address: str) -> list[str]:
        await update(server, self.zone, key, name, add=[address], ttl=self.ttl, timeout=self.timeout)
        return await addresses(server, self.zone, name, timeout=self.timeout)

    async def _delete(self, server: Server, key: TsigKey, name: str, address: str) -> list[str]:
        rdtype = _rdtype_of(address)
        for attempt in range(PREREQUISITE_RETRIES):
            current = await addresses(server, self.zone, name, timeout=self.timeout)
            if not _holds(current, address):
                return current
            if len(current) <= 1:
                log_event(log, "dns.kept_last_address", level=logging.WARNING, name=name, address=address,
                          server=f"{server[0]}:{server[1]}")
                return current
            same_family = [a for a in current if _rdtype_of(a) == rdtype]
            try:
                await update(server, self.zone, key, name, delete=[address], expect=same_family,
                             timeout=self.timeout)
            except PrerequisiteFailed:
                if attempt == PREREQUISITE_RETRIES - 1:
                    raise
                continue
            return [a for a in current if not _same_address(a, address)]
        raise AssertionError("unreachable")  # pragma: no cover


def _same_address(a: str, b: str) -> bool:
    with contextlib.suppress(ValueError):
        return dns.inet.inet_pton(dns.inet.af_for_address(a), a) == dns.inet.inet_pton(dns.inet.af_for_address(b), b)
    return a == b


def _holds(current: list[str], address: str) -> bool:
    return any(_same_address(a, address) for a in current)


def dns_servers(config: Config) -> list[Server]:
    """The (address, port) of every dns instance: its fixed port, or the one in its ready file."""
    out = []
    for inst in config.instances_of("dns"):
        port = inst.ports.get("dns", 0)
        if not port:
            with contextlib.suppress(OSError, ValueError, KeyError):
                port = read_ready_file(config.ready_file(inst.name))["dns"][1]
        if port:
            out.append((inst.address, port))
    return out


def membership_from_config(config: Config, *, timeout: float | None = None) -> Membership:
    """The monitor's membership changer for the cluster's DNS servers, key and zone."""
    return Membership(lambda: dns_servers(config), config.cluster.zone, lambda: load_key(config),
                      ttl=config.dns.ttl, timeout=timeout if timeout is not None else max(1.0, config.monitor.timeout * 4))
