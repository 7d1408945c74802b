"""The authority for the cluster zone, sans I/O: a DNS message in, the reply out.

Owns: :class:`Authority`, which turns one wire-format message into the
wire-format reply (or nothing) -- answers to queries and RFC 2136 updates
-- with dnspython's message functions and no socket (LIBRARIES.md
section 5).  :mod:`intermail.dns.listeners` puts it on UDP and TCP.

Queries (opcode QUERY, one question, class IN):

- A name outside the zone: REFUSED (no recursion; RA never set).
- A name with records of the type asked: NOERROR, AA, the RRset.  Each
  answer **rotates** the RRset by one, per (name, type): the k-th answer
  starts with record k mod n, in the order the records were added -- a
  true round robin, not dnspython's default shuffle (``to_wire`` always
  gets ``want_shuffle=False``).  The addresses of the targets of MX and NS
  answers go in the additional section when they are in the zone.
- A name that exists without that type: NODATA (NOERROR, empty answer);
  a name that does not exist: NXDOMAIN.  Both carry the zone's SOA in the
  authority section with TTL min(SOA TTL, MINIMUM), RFC 2308.  A name
  with no records but names below it exists (an empty non-terminal,
  RFC 8020).
- qtype ANY: every RRset of the name.  AXFR/IXFR: REFUSED (no zone
  transfer); other meta types: NOTIMP.
- Over UDP an answer larger than the client allows -- 512 bytes without
  EDNS, else its EDNS payload capped at ``max_udp_payload`` -- loses its
  additional section first, and if still too large goes out empty with TC
  set; over TCP (RFC 7766) the whole answer goes, up to 65535 bytes.
- EDNS version above 0: BADVERS.

Updates (opcode UPDATE, RFC 2136):

- Only TSIG-signed updates with the configured key are taken: unsigned is
  REFUSED; an unknown key, a bad MAC or a time outside the fudge is NOTAUTH
  with the TSIG error BADKEY / BADSIG / BADTIME (RFC 8945 section 5.2; the
  error reply carries an empty MAC).  A zone section naming another zone is
  NOTAUTH.
- Prerequisites (section 3.2) are checked in full: name in use / not in use,
  RRset exists (value independent and value dependent) / does not exist,
  giving NXDOMAIN, YXDOMAIN, NXRRSET, YXRRSET, NOTZONE or FORMERR.
- The update section is prescanned (3.4.1) and then applied in order
  (3.4.2): add (a duplicate is ignored; a new TTL applies to the RRset),
  delete an RRset, every RRset of a name, or one record.  The apex's SOA
  and NS RRsets are never deleted whole, the last NS never goes, an SOA is
  replaced only by a later serial.  Policy on top of RFC 2136: only
  SOA/NS (at the apex), A, AAAA, MX and TXT may be added -- anything else
  is REFUSED, since this server would not answer it correctly (no CNAME,
  no delegation).
- Deleting the last address of a service name (``mta``...) is allowed here:
  DNS has no notion of "service"; the monitor's update client
  (:mod:`intermail.dns.update`) is what never removes the last address.
- An update that changes something comes back as a :class:`ZoneChange`
  carrying the new zone (serial bumped unless the update set the SOA
  itself) and both possible replies; the caller makes the new zone durable,
  then :meth:`Authority.commit` s it and sends ``reply`` -- or sends
  ``failed`` (SERVFAIL) and the zone stays as it was.  Nothing is answered
  NOERROR before it is on disk.  Updates must be handled one at a time
  (the listeners hold a lock): each is checked against the zone of the
  moment.

Anything that does not parse, with at least a 12-byte header and the QR
bit clear, is answered FORMERR (header only); shorter input and messages
with QR set (responses: answering them could loop) get nothing.  An
unknown opcode is NOTIMP.

Logs: nothing; the listeners log updates and failures.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
import time
from collections.abc import Callable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import dns.update

from intermail.dns.zone import SUPPORTED_TYPES, RecordSet, Zone, ZoneEditor, serial_after

__all__ = ["Authority", "ZoneChange", "Outcome", "is_update", "header_reply", "DEFAULT_UDP_PAYLOAD"]

RdataType = dns.rdatatype.RdataType
Rcode = dns.rcode.Rcode

DEFAULT_UDP_PAYLOAD = 1232  # DNS flag day 2020
MIN_UDP = 512  # RFC 1035 section 4.2.1, for a client without EDNS
MAX_TCP = 65535  # RFC 1035 section 4.2.2: two-byte length
HEADER = struct.Struct("!HHHHHH")
_QR, _OPCODE_MASK, _RD = 0x8000, 0x7800, 0x0100
_TRANSFER_TYPES = frozenset({RdataType.AXFR, RdataType.IXFR})
_NEVER_IN_UPDATE = frozenset({RdataType.AXFR, RdataType.IXFR, RdataType.MAILA, RdataType.MAILB})
# TSIG error codes (RFC 8945 section 3): BADSIG is 16, the number dnspython names BADVERS
BADSIG, BADKEY, BADTIME = 16, 17, 18
_TSIG_ERROR_NAMES = {BADSIG: "BADSIG", BADKEY: "BADKEY", BADTIME: "BADTIME"}
_TSIG_ERRORS: dict[type[Exception], int] = {
    dns.message.UnknownTSIGKey: BADKEY,
    dns.tsig.BadKey: BADKEY,
    dns.tsig.BadAlgorithm: BADKEY,
    dns.tsig.BadSignature: BADSIG,
    dns.tsig.PeerError: BADSIG,  # a request claiming a TSIG error itself
    dns.tsig.BadTime: BADTIME,
}


@dataclasses.dataclass(frozen=True)
class ZoneChange:
    """An accepted update: save ``after`` durably, then commit it and send ``reply``; else send ``failed``."""

    before: Zone
    after: Zone
    reply: bytes
    failed: bytes
    changes: tuple[str, ...]
    key: str


Outcome = bytes | ZoneChange | None  # a reply to send, a change to make durable first, or nothing


def is_update(wire: bytes) -> bool:
    """Whether ``wire`` claims to be an UPDATE request (from its header alone)."""
    if len(wire) < HEADER.size:
        return False
    flags = int.from_bytes(wire[2:4], "big")
    return not flags & _QR and (flags & _OPCODE_MASK) >> 11 == dns.opcode.UPDATE


class _Refuse(Exception):
    """Stop processing a request and answer it with ``rcode``."""

    def __init__(self, rcode: Rcode, why: str):
        super().__init__(why)
        self.rcode = rcode
        self.why = why


class Authority:
    """Answers for one zone (see the module doc)."""

    def __init__(self, zone: Zone, keyring: Mapping[dns.name.Name, dns.tsig.Key] | None = None, *,
                 max_udp_payload: int = DEFAULT_UDP_PAYLOAD, clock: Callable[[], float] = time.time):
        if not MIN_UDP <= max_udp_payload <= MAX_TCP:
            raise ValueError(f"max_udp_payload must be {MIN_UDP}..{MAX_TCP}")
        self._zone = zone
        self.keyring = dict(keyring or {})
        self.max_udp_payload = max_udp_payload
        self.clock = clock
        self._turns: dict[tuple[dns.name.Name, RdataType], int] = {}
        # ("query", "udp", "NOERROR"), ("truncated", "udp"), ("update", "NOERROR"), ("formerr",)...
        self.stats: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.last_refusal = ""  # why the last update was refused (for the log)

    @property
    def zone(self) -> Zone:
        return self._zone

    def commit(self, change: ZoneChange) -> None:
        """Make ``change`` (durable by now) the zone queries see."""
        if change.before is not self._zone:
            raise RuntimeError("zone changed under an update: updates must be handled one at a time")
        self._zone = change.after
        keys = change.after.keys()
        for key in [k for k in self._turns if k not in keys]:
            del self._turns[key]

    # -- entry point ---------------------------------------------------------------

    def handle(self, wire: bytes, *, tcp: bool = False) -> Outcome:
        """The reply to ``wire`` (see the module doc for what each request gets)."""
        transport = "tcp" if tcp else "udp"
        self.last_refusal = ""
        if len(wire) < HEADER.size:
            self.stats["dropped", transport] += 1
            return None
        flags = int.from_bytes(wire[2:4], "big")
        if flags & _QR:
            self.stats["dropped", transport] += 1
            return None
        opcode = (flags & _OPCODE_MASK) >> 11
        if opcode not in (dns.opcode.QUERY, dns.opcode.UPDATE):
            self.stats["query", transport, "NOTIMP"] += 1
            return header_reply(wire, Rcode.NOTIMP)
        try:
            message = dns.message.from_wire(wire, keyring=self.keyring)
        except tuple(_TSIG_ERRORS) as exc:
            error = next(code for cls, code in _TSIG_ERRORS.items() if isinstance(exc, cls))
            self.stats["tsig_error", _TSIG_ERROR_NAMES[error]] += 1
            self.last_refusal = f"TSIG {_TSIG_ERROR_NAMES[error]}: {type(exc).__name__}"
            return self._tsig_error_reply(wire, error, tcp)
        except Exception:  # noqa: BLE001 - whatever dnspython raises, the bytes were the peer's fault
            self.stats["query", transport, "FORMERR"] += 1
            self.last_refusal = "malformed message"
            return header_reply(wire, Rcode.FORMERR)
        if isinstance(message, dns.update.UpdateMessage):
            return self._update(message, tcp)
        return self._query(message, tcp)

    # -- queries -------------------------------------------------------------------

    def _query(self, query: dns.message.Message, tcp: bool) -> bytes:
        response = dns.message.make_response(query, our_payload=self.max_udp_payload)
        rcode = self._fill(query, response)
        response.set_rcode(rcode)
        self.stats["query", "tcp" if tcp else "udp", dns.rcode.to_text(rcode)] += 1
        return self._render(query, response, tcp)

    def _fill(self, query: dns.message.Message, response: dns.message.Message) -> Rcode:
        if query.edns > 0:
            return Rcode.BADVERS
        if len(query.question) != 1:
            return Rcode.FORMERR
        question = query.question[0]
        if question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            return Rcode.REFUSED
        zone = self._zone
        name = question.name.canonicalize()
        if not zone.contains(name):
            return Rcode.REFUSED
        rdtype = RdataType.make(question.rdtype)
        if rdtype in _TRANSFER_TYPES:
            return Rcode.REFUSED
        if dns.rdatatype.is_metatype(rdtype) and rdtype != RdataType.ANY:
            return Rcode.NOTIMP
        response.flags |= dns.flags.AA
        if rdtype == RdataType.ANY:
            found = list(zone.at(name))
        else:
            one = zone.get(name, rdtype)
            found = [one] if one is not None else []
        for recordset in found:
            response.answer.append(recordset.to_rrset(start=self._turn(recordset), owner=question.name))
            if recordset.rdtype in (RdataType.MX, RdataType.NS):
                self._add_glue(recordset, response)
        if found:
            return Rcode.NOERROR
        soa = zone.soa
        negative_ttl = min(soa.ttl, zone.soa_rdata.minimum)
        response.authority.append(dns.rrset.from_rdata_list(zone.origin, negative_ttl, soa.rdatas))
        return Rcode.NOERROR if zone.exists(name) else Rcode.NXDOMAIN

    def _turn(self, recordset: RecordSet) -> int:
        """The rotation of this answer of ``recordset``; the next answer starts one further on."""
        key = (recordset.name, recordset.rdtype)
        turn = self._turns.get(key, 0)
        self._turns[key] = (turn + 1) % max(1, len(recordset.rdatas))
        return turn

    def _add_glue(self, recordset: RecordSet, response: dns.message.Message) -> None:
        zone = self._zone
        for rdata in recordset.rdatas:
            target = getattr(rdata, "exchange", None) or getattr(rdata, "target", None)
            if target is None or not zone.contains(target):
                continue
            for rdtype in (RdataType.A, RdataType.AAAA):
                addresses = zone.get(target, rdtype)
                if addresses is not None:
                    # the order the next answer for the name itself would have, without using a turn
                    start = self._turns.get((addresses.name, addresses.rdtype), 0)
                    rrset = addresses.to_rrset(start=start)
                    if rrset not in response.additional:
                        response.additional.append(rrset)

    def _render(self, query: dns.message.Message, response: dns.message.Message, tcp: bool) -> bytes:
        if tcp:
            limit = MAX_TCP
        elif query.edns >= 0:
            limit = max(MIN_UDP, min(query.payload, self.max_udp_payload))
        else:
            limit = MIN_UDP
        try:
            return response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            pass
        if response.additional:
            response.additional = []  # RFC 2181 section 9: the additional section may go, no TC for it
            try:
                return response.to_wire(max_size=limit, want_shuffle=False)
            except dns.exception.TooBig:
                pass
        self.stats["truncated", "tcp" if tcp else "udp"] += 1
        empty = dns.message.make_response(query, our_payload=self.max_udp_payload)
        empty.flags |= (response.flags & dns.flags.AA) | dns.flags.TC
        empty.set_rcode(response.rcode())
        return empty.to_wire(max_size=limit)

    # -- updates -------------------------------------------------------------------

    def _update(self, update: dns.update.UpdateMessage, tcp: bool) -> Outcome:
        response = dns.message.make_response(update, our_payload=self.max_udp_payload)
        zone = self._zone
        try:
            if update.edns > 0:
                raise _Refuse(Rcode.BADVERS, "EDNS version")
            if len(update.zone) != 1:
                raise _Refuse(Rcode.FORMERR, "the zone section needs exactly one record")
            zone_rr = update.zone[0]
            if zone_rr.rdclass != dns.rdataclass.IN or zone_rr.name.canonicalize() != zone.origin:
                raise _Refuse(Rcode.NOTAUTH, f"not authoritative for {zone_rr.name}")
            if not update.had_tsig:
                raise _Refuse(Rcode.REFUSED, "unsigned update")
            editor = zone.editor()
            _check_prerequisites(update.prerequisite, editor, zone)
            _prescan(update.update, zone)
            soa_set = _apply(update.update, editor, zone)
        except _Refuse as refusal:
            self.last_refusal = refusal.why
            self.stats["update", dns.rcode.to_text(refusal.rcode)] += 1
            response.set_rcode(refusal.rcode)
            return self._render(update, response, tcp)
        self.stats["update", "NOERROR"] += 1
        if not editor.changed:
            return self._render(update, response, tcp)
        after = editor.finish(bump_serial=not soa_set, now=self.clock())
        reply = self._render(update, response, tcp)
        failed = dns.message.make_response(update, our_payload=self.max_udp_payload)
        failed.set_rcode(Rcode.SERVFAIL)
        return ZoneChange(before=zone, after=after, reply=reply, failed=self._render(update, failed, tcp),
                          changes=tuple(editor.changes), key=str(update.keyname))

    def _tsig_error_reply(self, wire: bytes, error: int, tcp: bool) -> bytes | None:
        """NOTAUTH with a TSIG record whose error field says what failed; its MAC is empty (RFC 8945 5.2)."""
        try:
            request = dns.message.from_wire(wire, keyring=False)  # read, without checking the MAC
            response = dns.message.make_response(request, our_payload=self.max_udp_payload)
        except Exception:  # noqa: BLE001
            return header_reply(wire, Rcode.FORMERR)
        response.set_rcode(Rcode.NOTAUTH)
        limit = MAX_TCP if tcp else MIN_UDP
        body = response.to_wire(max_size=limit)
        if request.tsig is None:
            return body
        tsig = request.tsig[0]
        now = int(self.clock())
        other = now.to_bytes(6, "big") if error == BADTIME else b""
        rdata = tsig.replace(time_signed=now, mac=b"", original_id=request.id, error=error, other=other)
        rdata_wire = rdata.to_wire()
        record = (request.tsig.name.to_wire() +
                  struct.pack("!HHIH", RdataType.TSIG, dns.rdataclass.ANY, 0, len(rdata_wire)) + rdata_wire)
        arcount = int.from_bytes(body[10:12], "big") + 1
        return body[:10] + arcount.to_bytes(2, "big") + body[12:] + record


# -- RFC 2136 section 3.2: prerequisites ---------------------------------------------------


def _check_prerequisites(prerequisites: list[dns.rrset.RRset], editor: ZoneEditor, zone: Zone) -> None:
    exact: dict[tuple[dns.name.Name, RdataType], set[dns.rdata.Rdata]] = {}
    for rr in prerequisites:
        name = rr.name.canonicalize()
        rdtype = RdataType.make(rr.rdtype)
        if rr.ttl != 0:
            raise _Refuse(Rcode.FORMERR, "a prerequisite with a TTL")
        if not zone.contains(name):
            raise _Refuse(Rcode.NOTZONE, f"prerequisite {name} outside the zone")
        if rr.deleting == dns.rdataclass.ANY:
            if rdtype == RdataType.ANY:
                if not editor.name_in_use(name):
                    raise _Refuse(Rcode.NXDOMAIN, f"prerequisite: {name} not in use")
            elif not editor.records(name, rdtype):
                raise _Refuse(Rcode.NXRRSET, f"prerequisite: no {rdtype.name} at {name}")
        elif rr.deleting == dns.rdataclass.NONE:
            if rdtype == RdataType.ANY:
                if editor.name_in_use(name):
                    raise _Refuse(Rcode.YXDOMAIN, f"prerequisite: {name} in use")
            elif editor.records(name, rdtype):
                raise _Refuse(Rcode.YXRRSET, f"prerequisite: {rdtype.name} at {name} exists")
        elif rr.deleting is None and rr.rdclass == dns.rdataclass.IN and not dns.rdatatype.is_metatype(rdtype):
            exact.setdefault((name, rdtype), set()).update(rr)
        else:
            raise _Refuse(Rcode.FORMERR, "a malformed prerequisite")
    for (name, rdtype), wanted in exact.items():
        if set(editor.records(name, rdtype)) != wanted:
            raise _Refuse(Rcode.NXRRSET, f"prerequisite: {rdtype.name} at {name} differs")


# -- RFC 2136 section 3.4: the update section -----------------------------------------------


def _prescan(updates: list[dns.rrset.RRset], zone: Zone) -> None:
    """Section 3.4.1: refuse the whole update before anything is changed."""
    for rr in updates:
        name = rr.name.canonicalize()
        rdtype = RdataType.make(rr.rdtype)
        if not zone.contains(name):
            raise _Refuse(Rcode.NOTZONE, f"update of {name} outside the zone")
        if rr.deleting is None:
            if rr.rdclass != dns.rdataclass.IN or dns.rdatatype.is_metatype(rdtype):
                raise _Refuse(Rcode.FORMERR, "a malformed record to add")
            if rdtype not in SUPPORTED_TYPES:
                raise _Refuse(Rcode.REFUSED, f"{rdtype.name} records are not served here")
            if rdtype in (RdataType.SOA, RdataType.NS) and name != zone.origin:
                raise _Refuse(Rcode.REFUSED, f"{rdtype.name} only at the zone apex (no delegation)")
        elif rr.deleting == dns.rdataclass.ANY:
            if rr.ttl != 0 or len(rr) or rdtype in _NEVER_IN_UPDATE:
                raise _Refuse(Rcode.FORMERR, "a malformed RRset deletion")
        elif rr.deleting == dns.rdataclass.NONE:
            if rr.ttl != 0 or dns.rdatatype.is_metatype(rdtype):
                raise _Refuse(Rcode.FORMERR, "a malformed record deletion")
        else:
            raise _Refuse(Rcode.FORMERR, "an update of an unknown class")


def _apply(updates: list[dns.rrset.RRset], editor: ZoneEditor, zone: Zone) -> bool:
    """Section 3.4.2, in order; True if the update set the SOA (its serial then stays as given)."""
    apex = zone.origin
    soa_set = False
    for rr in updates:
        name = rr.name.canonicalize()
        rdtype = RdataType.make(rr.rdtype)
        if rr.deleting is None:
            for rdata in rr:
                if rdtype == RdataType.SOA:
                    current = editor.records(apex, RdataType.SOA)[0]
                    if serial_after(rdata.serial, current.serial):
                        soa_set |= editor.replace(apex, rr.ttl, rdata)
                else:
                    editor.add(name, rr.ttl, rdata)
        elif rr.deleting == dns.rdataclass.ANY:
            types = editor.types_at(name) if rdtype == RdataType.ANY else [rdtype]
            for each in types:
                if name == apex and each in (RdataType.SOA, RdataType.NS):
                    continue
                editor.delete_rrset(name, each)
        else:  # class NONE: one record
            for rdata in rr:
                if rdtype == RdataType.SOA:
                    continue
                if rdtype == RdataType.NS and name == apex and editor.records(apex, RdataType.NS) == [rdata]:
                    continue  # the last NS stays
                editor.delete_rdata(name, rdata)
    return soa_set


def header_reply(wire: bytes, rcode: Rcode) -> bytes | None:
    """A reply of just a header (no question): for what could not be parsed, or an unknown opcode."""
    if len(wire) < HEADER.size:
        return None
    ident, flags = struct.unpack("!HH", wire[:4])
    if flags & _QR:
        return None
    return HEADER.pack(ident, _QR | (flags & (_OPCODE_MASK | _RD)) | int(rcode), 0, 0, 0, 0)
