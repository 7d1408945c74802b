"""A small, real authoritative DNS server for tests: UDP and TCP on one port.

Owns: :class:`DnsStub`, which answers A, AAAA, MX and CNAME questions from
dictionaries a test sets up and changes as it goes, over real sockets, with
dnspython's wire functions (LIBRARIES.md section 5)::

    stub = DnsStub({"mx1.example.test": ["192.0.2.1"]},
                   mx={"example.test": [(10, "mx1.example.test")]})
    host, port = await stub.start()          # port 0: a free port, UDP and TCP
    resolver = Resolver([(host, port)])
    ...
    stub.mute = True                          # a dead server: queries are dropped
    stub.stop()

Invariants:

- It is authoritative for every name (AA set): a name it has no data for is
  NXDOMAIN, a known name without records of the type asked is NODATA.  With
  ``negative_ttl`` set, both carry an SOA of ``zone`` (or of the root, for a
  name outside it) whose MINIMUM is that value (RFC 2308).
- Records go out in the order they were set: ``to_wire(want_shuffle=False)``
  (dnspython shuffles by default).  With ``rotate=True`` every address
  answer moves the list on by one, as the cluster DNS server does.
- A UDP answer larger than the query allows (512 bytes, or the EDNS payload
  the query announced) goes out empty with TC set; the full answer is there
  over TCP (RFC 7766 two-byte length framing).
- ``mute`` drops every query, over UDP and TCP alike (TCP connections stay
  open and silent).  ``set_rcode`` makes a name answer SERVFAIL, REFUSED...
- Counters: ``queries`` (answered), ``tcp_queries`` (of which over TCP),
  ``truncated`` (UDP answers sent empty with TC), ``dropped`` (while muted);
  ``questions`` lists (transport, name, type) of every answered query.

Logs: nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Iterable
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

_ADDRESS_TYPES = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}
_MAX_CNAME_CHAIN = 8
_BIND_ATTEMPTS = 20  # port 0: times to look for a port free for both UDP and TCP


class DnsStub:
    """An authoritative DNS server over real UDP and TCP sockets, driven by a test."""

    def __init__(self, records: dict[str, list[str]] | None = None,
                 mx: dict[str, list[tuple[int, str]]] | None = None, *, ttl: int = 300,
                 cname: dict[str, str] | None = None, zone: str = "test.",
                 negative_ttl: int | None = None, rotate: bool = False):
        """``records`` maps a name to its addresses (IPv4 for A, IPv6 for AAAA, mixed freely)."""
        self.ttl = ttl
        self.zone = dns.name.from_text(zone)
        self.negative_ttl = negative_ttl
        self.rotate = rotate
        self.mute = False
        self.queries = 0
        self.tcp_queries = 0
        self.truncated = 0
        self.dropped = 0
        self.questions: list[tuple[str, str, str]] = []
        self._addresses: dict[dns.name.Name, list[str]] = {}
        self._mx: dict[dns.name.Name, list[tuple[int, dns.name.Name]]] = {}
        self._cname: dict[dns.name.Name, dns.name.Name] = {}
        self._rcode: dict[dns.name.Name, dns.rcode.Rcode] = {}
        self._ttl: dict[dns.name.Name, int] = {}
        for name, addresses in (records or {}).items():
            self.set_a(name, addresses)
        for name, exchangers in (mx or {}).items():
            self.set_mx(name, exchangers)
        for alias, target in (cname or {}).items():
            self.set_cname(alias, target)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] | None = None

    # -- data -----------------------------------------------------------------

    def set_a(self, name: str, addresses: Iterable[str], *, ttl: int | None = None) -> None:
        """Replace the addresses of ``name`` (an empty list: the name exists, with no address)."""
        key = _name(name)
        self._addresses[key] = list(addresses)
        self._set_ttl(key, ttl)

    def set_mx(self, name: str, exchangers: Iterable[tuple[int, str]], *, ttl: int | None = None) -> None:
        """Replace the MX records of ``name``; ``[(0, ".")]`` is a null MX (RFC 7505)."""
        key = _name(name)
        self._mx[key] = [(preference, _name(host)) for preference, host in exchangers]
        self._set_ttl(key, ttl)

    def set_cname(self, alias: str, target: str) -> None:
        self._cname[_name(alias)] = _name(target)

    def set_rcode(self, name: str, rcode: dns.rcode.Rcode | None) -> None:
        """Answer every question about ``name`` with ``rcode`` (None: answer normally again)."""
        key = _name(name)
        if rcode is None:
            self._rcode.pop(key, None)
        else:
            self._rcode[key] = rcode

    def remove(self, name: str) -> None:
        """Forget everything about ``name``: it is NXDOMAIN from now on."""
        key = _name(name)
        for table in (self._addresses, self._mx, self._cname, self._rcode, self._ttl):
            table.pop(key, None)

    def _set_ttl(self, key: dns.name.Name, ttl: int | None) -> None:
        if ttl is None:
            self._ttl.pop(key, None)
        else:
            self._ttl[key] = ttl

    # -- sockets --------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on UDP and TCP ``port`` of ``host`` (0: one port free for both); the address."""
        loop = asyncio.get_running_loop()
        for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
            udp, _protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port))
            bound = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError as exc:
                udp.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the UDP port is taken over TCP: pick another
                raise
            self._udp = udp
            self.address = (host, bound)
            return self.address
        raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")

    def stop(self) -> None:
        """Close both listeners and every open TCP connection."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for writer in list(self._writers):
            writer.close()

    async def __aenter__(self) -> DnsStub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    reply = self.answer(await reader.readexactly(size), tcp=True)
                    if reply is not None:
                        writer.write(len(reply).to_bytes(2, "big") + reply)
                        await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()

    # -- answers --------------------------------------------------------------

    def answer(self, wire: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to one query in wire format, or None to send nothing."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth a FORMERR in a test server
        if self.mute:
            self.dropped += 1
            return None
        self.queries += 1
        self.tcp_queries += int(tcp)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
        else:
            question = query.question[0]
            self.questions.append(("tcp" if tcp else "udp", question.name.to_text(omit_final_dot=True),
                                   dns.rdatatype.to_text(question.rdtype)))
            self._fill(response, question.name.canonicalize(), question.rdtype)
        limit = 65535 if tcp else (max(512, query.payload) if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            self.truncated += 1
            empty = dns.message.make_response(query)
            empty.flags |= dns.flags.AA | dns.flags.TC
            return empty.to_wire(max_size=limit)

    def _fill(self, response: dns.message.Message, name: dns.name.Name, rdtype: int) -> None:
        """Put the answer for (name, rdtype) into ``response``, following CNAMEs."""
        for _ in range(_MAX_CNAME_CHAIN):
            if name in self._rcode:
                response.set_rcode(self._rcode[name])
                return
            target = self._cname.get(name)
            if target is None or rdtype == dns.rdatatype.CNAME:
                break
            response.answer.append(self._rrset(name, dns.rdatatype.CNAME, [target.to_text()]))
            name = target
        records = self._records(name, rdtype)
        if records:
            response.answer.append(self._rrset(name, rdtype, records))
            return
        exists = name in self._addresses or name in self._mx or name in self._cname
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        if self.negative_ttl is not None:
            response.authority.append(self._soa(name))

    def _records(self, name: dns.name.Name, rdtype: int) -> list[str]:
        if rdtype == dns.rdatatype.MX:
            return [f"{preference} {host.to_text()}" for preference, host in self._mx.get(name, [])]
        if rdtype == dns.rdatatype.CNAME and name in self._cname:
            return [self._cname[name].to_text()]
        version = _ADDRESS_TYPES.get(rdtype)
        if version is None:
            return []
        every = self._addresses.get(name, [])
        addresses = [address for address in every if (":" in address) == (version == 6)]
        if addresses and self.rotate:
            first = every.index(addresses[0])
            every.append(every.pop(first))  # the next answer starts one further on
        return addresses

    def _rrset(self, name: dns.name.Name, rdtype: int, texts: list[str]) -> dns.rrset.RRset:
        ttl = self._ttl.get(name, self.ttl)
        return dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, rdtype, texts)

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        owner = self.zone if name.is_subdomain(self.zone) else dns.name.root
        text = f"ns.invalid. hostmaster.invalid. 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text_list(owner, self.negative_ttl, dns.rdataclass.IN, dns.rdatatype.SOA, [text])


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, stub: DnsStub):
        self.stub = stub
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.stub.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text).canonicalize()
