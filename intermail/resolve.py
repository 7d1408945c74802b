"""DNS lookups: A/AAAA and MX, a bounded TTL cache, failover between nameservers.

Owns: every DNS *lookup* intermail makes (an MTA's MX walk, the addresses of
a relay host, a client's round-robin A records), built on dnspython's
message functions and ``dns.asyncquery.tcp``; the cache of answers,
positive and negative; and the choice of nameserver per query::

    resolver = Resolver([("127.0.0.1", 5353), ("127.0.0.2", 5353)])
    for preference, host in await resolver.mx("example.test"):
        answer = await resolver.addresses(host)
        ...  # answer.addresses, in the order the server sent them

Nameservers are ``(address, port)`` pairs, each with its own port (the
cluster DNS server listens on a non-53 port on loopback); ``None`` reads the
system configuration (``resolv.conf``), port 53 unless it says otherwise.
``dns.asyncresolver`` could take per-server ports too
(``dns.nameserver.Do53Nameserver``), but it forgets a dead server between
lookups (each lookup waits ``timeout`` on it again), caches a negative answer
without SOA for 300 s and cannot serve a stale answer; the query loop here
is small and does exactly what the invariants below say.

Invariants:

- Every failure is a :class:`MailError`: ``NOTFOUND`` for NXDOMAIN and for
  NODATA (the name has no record of the type asked), ``PERM`` for a null MX
  (RFC 7505), ``UNAVAILABLE`` when no nameserver gave a usable answer within
  ``lifetime`` (timeouts, refused connections, SERVFAIL, REFUSED, malformed
  replies), ``INVALID`` for a string that is not a domain name.
- Names are always absolute (``example.test`` means ``example.test.``): no
  search list, as befits mail domains.  Hosts come back in lower case
  without the final dot.
- Order: records keep the order the server sent them in.  The cluster DNS
  server rotates its A records itself, so nothing here shuffles
  (LIBRARIES.md section 5).  An MX list is sorted by preference with a
  stable sort, so hosts of equal preference keep the server's order too.
- Queries go over UDP with EDNS0 (payload 1232, the DNS flag day 2020
  value), on a socket connected to the server, so that a server whose port
  is closed fails at once (ICMP) rather than after ``timeout``; a truncated
  (TC) answer is asked again over TCP of the same server (RFC 7766
  section 5).  Only a reply with the query's id and question is taken.
- Cache: one entry per (name, type), at most ``cache_max`` of them, least
  recently used evicted first.  A positive answer lives for its TTL (the
  smallest TTL of the CNAME chain and the answer, capped at
  :data:`MAX_TTL`); NXDOMAIN and NODATA for min(SOA TTL, SOA MINIMUM) of the
  authority section (RFC 2308 section 5), or ``negative_ttl`` without an SOA,
  capped at :data:`MAX_NEGATIVE_TTL`.  A null MX is cached like a positive
  answer and raises ``PERM`` each time.  ``UNAVAILABLE`` is never cached.
- Stale answers (serve-stale, RFC 8767): an expired positive answer stays in
  the cache until evicted.  When a lookup made with ``allow_stale=True``
  fails with ``UNAVAILABLE`` and an answer at most ``max_stale`` seconds past
  its expiry is cached, that answer is returned with ``stale=True`` instead
  of the error.  Without the flag the error is raised.  Negative answers are
  never served stale.
- Failover: each lookup walks the nameservers in order, each query bounded
  by ``timeout``, the whole lookup by ``lifetime``.  A server that answered
  with an error rcode is not asked again in that lookup; one that did not
  answer at all is asked again on the next walk, after a short backoff.  A
  server that did not answer goes to the end of the order for ``holddown``
  seconds, so a dead first server costs one timeout per hold-down, not one
  per lookup.
- Concurrent lookups of one (name, type) share one query; a caller that is
  cancelled does not cancel it for the others.  A Resolver belongs to one
  event loop.
- ``clock`` (monotonic seconds) drives cache expiry and hold-down only;
  network timeouts run on the event loop's clock, so a test can move cached
  time with a fake clock without waiting.

Logs: ``resolve.server_down`` (a nameserver did not answer; it is tried last
for a while), ``resolve.server_up`` (it answered again),
``resolve.unavailable`` (a lookup failed on every nameserver),
``resolve.stale_answer`` (an expired answer was served instead of an error).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import dns.asyncquery
import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset

from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events

log = logging.getLogger(__name__)

EDNS_PAYLOAD = 1232  # UDP payload we announce (DNS flag day 2020)
MAX_TTL = 86400.0  # a positive answer is cached at most a day, whatever its TTL
MAX_NEGATIVE_TTL = 10800.0  # RFC 2308 section 5: one to three hours work well
FIRST_BACKOFF = 0.05  # pause before the second walk over the nameservers
MAX_BACKOFF = 1.0  # the pause doubles per walk up to this

Server = tuple[str, int]
_Key = tuple[dns.name.Name, dns.rdatatype.RdataType]
_LOOKUP_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.MX)

register_events({
    "resolve.server_down": "a nameserver did not answer (timeout, refused, bad reply); it is tried last for a while",
    "resolve.server_up": "a nameserver that had stopped answering answered again",
    "resolve.unavailable": "a DNS lookup got no usable answer from any nameserver within its lifetime",
    "resolve.stale_answer": "a DNS lookup failed and an expired cached answer was served instead (allow_stale)",
})


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """The addresses of one name, in the server's order.

    ``ttl`` is the TTL the answer came with (seconds); ``expires`` is when
    its cache entry expires, on the resolver's clock.  ``stale`` is true
    only for an expired answer served by ``allow_stale=True``.
    """

    addresses: tuple[str, ...]
    ttl: float
    expires: float
    stale: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    """One cached result for one (name, type): records, or an error to raise."""

    values: tuple[Any, ...]  # address strings, or (preference, host) pairs for MX
    ttl: float
    expires: float
    error: ErrorKind | None = None  # NOTFOUND or PERM: this lookup's answer is that error
    safe: str = ""
    detail: str = ""

    def raise_error(self) -> None:
        if self.error is not None:
            raise MailError(self.error, self.safe, self.detail)


class _NoAnswer(Exception):
    """One nameserver did not answer one query (timeout, socket error, unusable reply)."""

    def __init__(self, reason: str, *, timed_out: bool = False):
        super().__init__(reason)
        self.timed_out = timed_out


class _Cache:
    """A bounded map (name, type) -> entry; the least recently used entry goes first."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: collections.OrderedDict[_Key, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _Key) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: _Key, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def drop(self, key: _Key) -> None:
        self._entries.pop(key, None)


class Resolver:
    """A/AAAA and MX lookups with a TTL cache and nameserver failover (see the module doc)."""

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None = None, *,
                 timeout: float = 2.0, lifetime: float = 5.0, cache_max: int = 4096,
                 clock: Callable[[], float] = time.monotonic, negative_ttl: float = 5.0,
                 max_stale: float = 86400.0, holddown: float = 30.0):
        """``timeout`` bounds one query to one server, ``lifetime`` one whole lookup.

        ``negative_ttl`` caches NXDOMAIN/NODATA that came without an SOA;
        ``max_stale`` is how long past its expiry an answer may still be
        served by ``allow_stale=True``; ``holddown`` is how long a server
        that did not answer is tried last.  ``None`` nameservers means the
        system configuration; a MailError ``UNAVAILABLE`` if it has none.
        """
        if timeout <= 0 or lifetime <= 0:
            raise ValueError("timeout and lifetime must be positive")
        if cache_max < 0 or negative_ttl < 0 or max_stale < 0 or holddown < 0:
            raise ValueError("cache_max, negative_ttl, max_stale and holddown must not be negative")
        self._servers = _system_nameservers() if nameservers is None else _checked_servers(nameservers)
        self.timeout = timeout
        self.lifetime = lifetime
        self.negative_ttl = min(negative_ttl, MAX_NEGATIVE_TTL)
        self.max_stale = max_stale
        self.holddown = holddown
        self._clock = clock
        self._cache = _Cache(cache_max)
        self._down_until: dict[Server, float] = {}
        self._inflight: dict[_Key, asyncio.Future[_Entry]] = {}

    @property
    def nameservers(self) -> tuple[Server, ...]:
        """The nameservers in their configured order."""
        return self._servers

    @property
    def cache_size(self) -> int:
        """Entries held in the cache now, expired ones included."""
        return len(self._cache)

    async def addresses(self, name: str, *, want_ipv6: bool = False, allow_stale: bool = False) -> Answer:
        """The A records of ``name`` (then its AAAA records, with ``want_ipv6``).

        With ``want_ipv6`` both types are asked at once: the answer holds the
        IPv4 addresses, then the IPv6 ones, with the smaller TTL and expiry;
        if one type fails but the other has addresses, those are returned.
        """
        qname = _domain(name)
        if not want_ipv6:
            return await self._addresses_of_type(qname, dns.rdatatype.A, allow_stale)
        results = await asyncio.gather(
            self._addresses_of_type(qname, dns.rdatatype.A, allow_stale),
            self._addresses_of_type(qname, dns.rdatatype.AAAA, allow_stale),
            return_exceptions=True,
        )
        return _merge_answers(results)

    async def mx(self, domain: str, *, allow_stale: bool = False) -> list[tuple[int, str]]:
        """The mail exchangers of ``domain`` as (preference, host), lowest preference first.

        RFC 5321 section 5.1: a domain without MX records (that exists) has
        the implicit MX ``[(0, domain)]`` (after any CNAME).  A null MX
        (RFC 7505: the only target is ".") raises ``PERM``.
        """
        entry, _ = await self._resolve(_domain(domain), dns.rdatatype.MX, allow_stale)
        return list(entry.values)

    def invalidate(self, name: str) -> None:
        """Forget every cached answer (A, AAAA, MX, stale or not) about ``name``."""
        qname = _domain(name)
        for rdtype in _LOOKUP_TYPES:
            self._cache.drop((qname, rdtype))

    async def _addresses_of_type(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                                 allow_stale: bool) -> Answer:
        entry, stale = await self._resolve(qname, rdtype, allow_stale)
        return Answer(addresses=entry.values, ttl=entry.ttl, expires=entry.expires, stale=stale)

    async def _resolve(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                       allow_stale: bool) -> tuple[_Entry, bool]:
        """The entry for (qname, rdtype), cached or fetched, and whether it is stale.

        Raises the entry's error (NOTFOUND, PERM), or UNAVAILABLE.
        """
        key = (qname, rdtype)
        cached = self._cache.get(key)
        if cached is not None and self._clock() < cached.expires:
            cached.raise_error()
            return cached, False
        try:
            entry = await self._shared_fetch(key)
        except MailError as exc:
            stale = self._stale_entry(key) if allow_stale and exc.kind is ErrorKind.UNAVAILABLE else None
            if stale is None:
                raise
            log_event(log, "resolve.stale_answer", level=logging.WARNING, qname=_host(qname),
                      qtype=dns.rdatatype.to_text(rdtype), expired_for=round(self._clock() - stale.expires, 3),
                      reason=exc.detail)
            return stale, True
        entry.raise_error()
        return entry, False

    def _stale_entry(self, key: _Key) -> _Entry | None:
        entry = self._cache.get(key)
        if entry is None or entry.error is not None:
            return None
        return entry if self._clock() - entry.expires <= self.max_stale else None

    async def _shared_fetch(self, key: _Key) -> _Entry:
        """Fetch (qname, rdtype), joining a fetch of the same key already under way."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(*key))
            self._inflight[key] = future
            future.add_done_callback(functools.partial(self._fetch_done, key))
        # shield: one caller giving up must not cancel the query for the others.
        return await asyncio.shield(future)

    def _fetch_done(self, key: _Key, future: asyncio.Future[_Entry]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved: every caller may have gone away

    async def _fetch(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Entry:
        message, chain = await self._query(qname, rdtype)
        entry = self._entry_from(qname, rdtype, message, chain)
        self._cache.put((qname, rdtype), entry)
        return entry

    def _entry_from(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                    message: dns.message.Message, chain: dns.message.ChainingResult) -> _Entry:
        now = self._clock()
        qtype = dns.rdatatype.to_text(rdtype)
        if message.rcode() == dns.rcode.NXDOMAIN or chain.answer is None:
            ttl = self._negative_ttl(message, chain)
            if message.rcode() == dns.rcode.NXDOMAIN:
                return _Entry((), ttl, now + ttl, ErrorKind.NOTFOUND, "no such domain",
                              f"{_host(qname)} does not exist (NXDOMAIN)")
            if rdtype == dns.rdatatype.MX:  # RFC 5321 section 5.1: the implicit MX
                return _Entry(((0, _host(chain.canonical_name)),), ttl, now + ttl)
            return _Entry((), ttl, now + ttl, ErrorKind.NOTFOUND, "no such host",
                          f"{_host(qname)} has no {qtype} records")
        ttl = min(float(chain.minimum_ttl), MAX_TTL)
        if rdtype != dns.rdatatype.MX:
            return _Entry(tuple(str(rdata.address) for rdata in chain.answer), ttl, now + ttl)
        exchangers = _mx_pairs(chain.answer)
        if not exchangers:
            return _Entry((), ttl, now + ttl, ErrorKind.PERM, "domain does not accept mail",
                          f"{_host(qname)} has a null MX (RFC 7505)")
        return _Entry(exchangers, ttl, now + ttl)

    def _negative_ttl(self, message: dns.message.Message, chain: dns.message.ChainingResult) -> float:
        """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM) of the zone; CNAMEs on the way count too."""
        ttls = [float(rrset.ttl) for rrset in chain.cnames]
        for rrset in message.authority:
            if rrset.rdtype == dns.rdatatype.SOA and chain.canonical_name.is_subdomain(rrset.name):
                ttls += [float(rrset.ttl), float(rrset[0].minimum)]
                break
        else:
            ttls.append(self.negative_ttl)
        return min(min(ttls), MAX_NEGATIVE_TTL)

    async def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
                     ) -> tuple[dns.message.Message, dns.message.ChainingResult]:
        """A usable answer (NOERROR or NXDOMAIN) from the first nameserver that gives one.

        Raises UNAVAILABLE when none did before the lookup's deadline.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lifetime
        failures: dict[Server, str] = {}  # the last failure of each server, for the log
        refused: set[Server] = set()  # answered with an error: not asked again in this lookup
        pause = FIRST_BACKOFF
        while True:
            for server in self._server_order():
                budget = min(self.timeout, deadline - loop.time())
                if server in refused or budget <= 0:
                    continue
                try:
                    message = await self._ask(server, qname, rdtype, budget)
                except _NoAnswer as exc:
                    failures[server] = str(exc)
                    # A timeout cut short by the lifetime says little about the server.
                    if not exc.timed_out or budget >= self.timeout:
                        self._mark_down(server, str(exc))
                    continue
                self._mark_up(server)
                try:
                    return message, _usable(message)
                except _NoAnswer as exc:
                    failures[server] = str(exc)
                    refused.add(server)
            remaining = deadline - loop.time()
            if remaining <= 0 or all(server in refused for server in self._servers):
                break
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, MAX_BACKOFF)
        raise self._unavailable(qname, rdtype, failures)

    def _unavailable(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                     failures: dict[Server, str]) -> MailError:
        """The UNAVAILABLE error of a failed lookup, logged."""
        qtype = dns.rdatatype.to_text(rdtype)
        why = "; ".join(f"{_server_text(s)} {reason}" for s, reason in failures.items()) or "no time left"
        log_event(log, "resolve.unavailable", level=logging.WARNING, qname=_host(qname), qtype=qtype,
                  failures=why)
        return MailError(ErrorKind.UNAVAILABLE, "DNS lookup failed, try again later",
                         f"DNS lookup of {_host(qname)} {qtype} failed: {why}")

    async def _ask(self, server: Server, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                   budget: float) -> dns.message.Message:
        """One query to one server within ``budget`` seconds: UDP, then TCP if truncated."""
        host, port = server
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        try:
            try:
                return await _ask_udp(query, host, port, budget)
            except dns.message.Truncated:
                pass
            left = deadline - loop.time()
            if left <= 0:
                raise dns.exception.Timeout
            return await dns.asyncquery.tcp(query, host, timeout=left, port=port)
        except (dns.exception.Timeout, TimeoutError) as exc:
            raise _NoAnswer("timeout", timed_out=True) from exc
        except (OSError, EOFError, dns.exception.DNSException) as exc:
            raise _NoAnswer(f"{type(exc).__name__}: {exc}") from exc

    def _server_order(self) -> list[Server]:
        """Configured order, servers in hold-down last (stable sort keeps their order too)."""
        now = self._clock()
        return sorted(self._servers, key=lambda server: self._down_until.get(server, 0.0) > now)

    def _mark_down(self, server: Server, reason: str) -> None:
        now = self._clock()
        held = self._down_until.get(server, 0.0) > now
        self._down_until[server] = now + self.holddown
        if not held:
            log_event(log, "resolve.server_down", level=logging.WARNING, server=_server_text(server),
                      reason=reason, holddown=self.holddown)

    def _mark_up(self, server: Server) -> None:
        if self._down_until.pop(server, None) is not None:
            log_event(log, "resolve.server_up", server=_server_text(server))


async def _ask_udp(query: dns.message.Message, host: str, port: int, timeout: float) -> dns.message.Message:
    """One UDP exchange on a socket *connected* to the server.

    ``dns.asyncquery.udp`` uses an unconnected socket, and the kernel reports
    an ICMP port unreachable (a nameserver process that is down) only to a
    connected one: with it, failover is at once instead of after ``timeout``.
    A connected socket also takes datagrams from that server only.  Raises
    ``dns.message.Truncated`` for a TC answer, TimeoutError, OSError.
    """
    loop = asyncio.get_running_loop()
    transport, exchange = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(query), remote_addr=(host, port))
    try:
        transport.sendto(query.to_wire())
        async with asyncio.timeout(timeout):
            return await exchange.answer
    finally:
        if not exchange.answer.done():
            exchange.answer.cancel()  # so closing cannot leave an exception nobody reads
        transport.close()


class _UdpExchange(asyncio.DatagramProtocol):
    """Waits for the answer to one query; anything that is not that answer is skipped."""

    def __init__(self, query: dns.message.Message):
        self.query = query
        self.answer: asyncio.Future[dns.message.Message] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.answer.done():
            return
        try:
            message = dns.message.from_wire(data, raise_on_truncation=True)
        except dns.message.Truncated as exc:
            if self.query.is_response(exc.message()):
                self.answer.set_exception(exc)
            return
        except Exception:  # noqa: BLE001 - garbage: wait for the real answer, as dnspython's ignore_errors
            return
        if self.query.is_response(message):  # same id and question
            self.answer.set_result(message)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or EOFError("UDP socket closed"))


def _usable(message: dns.message.Message) -> dns.message.ChainingResult:
    """The CNAME-followed answer of a NOERROR/NXDOMAIN reply; _NoAnswer for anything else."""
    rcode = message.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise _NoAnswer(dns.rcode.to_text(rcode))
    try:
        return message.resolve_chaining()
    except dns.exception.DNSException as exc:  # ChainTooLong, AnswerForNXDOMAIN, FormError
        raise _NoAnswer(f"bad answer: {type(exc).__name__}") from exc


def _mx_pairs(rrset: dns.rrset.RRset) -> tuple[tuple[int, str], ...]:
    """(preference, host) sorted by preference, stably; null-MX targets (".") left out."""
    pairs = [(int(rdata.preference), _host(rdata.exchange)) for rdata in rrset
             if rdata.exchange != dns.name.root]
    return tuple(sorted(pairs, key=lambda pair: pair[0]))


def _merge_answers(results: list[Answer | BaseException]) -> Answer:
    """A and AAAA answers into one; if neither has addresses, the more temporary error."""
    answers = [result for result in results if isinstance(result, Answer)]
    errors = [result for result in results if not isinstance(result, Answer)]
    for error in errors:
        if not isinstance(error, MailError):
            raise error
    if answers:
        return Answer(
            addresses=tuple(address for answer in answers for address in answer.addresses),
            ttl=min(answer.ttl for answer in answers),
            expires=min(answer.expires for answer in answers),
            stale=any(answer.stale for answer in answers),
        )
    # NOTFOUND for both types is NOTFOUND; anything else wins, so the caller retries.
    errors.sort(key=lambda error: error.kind is ErrorKind.NOTFOUND)
    raise errors[0]


def _domain(name: str) -> dns.name.Name:
    """``name`` as an absolute, lower-case dnspython name; INVALID if it is not one."""
    if not isinstance(name, str) or not name or any(char.isspace() for char in name):
        raise MailError(ErrorKind.INVALID, "invalid domain name", f"invalid domain name {name!r}")
    try:
        parsed = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise MailError(ErrorKind.INVALID, "invalid domain name",
                        f"invalid domain name {name!r}: {type(exc).__name__}") from exc
    if parsed == dns.name.root:
        raise MailError(ErrorKind.INVALID, "invalid domain name", "the root is not a domain to look up")
    return parsed.canonicalize()


def _host(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _server_text(server: Server) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _checked_servers(nameservers: Sequence[tuple[str, int]]) -> tuple[Server, ...]:
    servers = []
    for entry in nameservers:
        host, port = entry
        if not isinstance(host, str) or not dns.inet.is_address(host):
            raise ValueError(f"nameserver {host!r} is not an IP address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"nameserver port {port!r} is not a port number")
        servers.append((host, port))
    if not servers:
        raise ValueError("at least one nameserver is needed (None means the system's)")
    return tuple(servers)


def _system_nameservers() -> tuple[Server, ...]:
    """The plain-DNS nameservers of the system configuration, with their ports."""
    try:
        config = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration as exc:
        raise MailError(ErrorKind.UNAVAILABLE, detail=f"no system DNS configuration: {exc}") from exc
    servers: list[Server] = []
    for nameserver in config.nameservers:
        if isinstance(nameserver, str):
            servers.append((nameserver, config.nameserver_ports.get(nameserver, config.port)))
        elif isinstance(nameserver, dns.nameserver.Do53Nameserver):
            servers.append((nameserver.answer_nameserver(), nameserver.answer_port()))
    if not servers:
        raise MailError(ErrorKind.UNAVAILABLE, detail="the system DNS configuration has no plain-DNS nameserver")
    return tuple(servers)
