"""Protocol-level probes: does an instance answer the question its protocol allows?

Owns one probe per port name -- a TCP connect is not enough: a process can
accept connections and still be wedged, so each probe waits for a real
answer::

    ok, detail = await probe("smtp", ("127.0.1.1", 25), timeout=0.5)

=========== ================================================================
port        probe
=========== ================================================================
smtp,       the ``220`` banner, then ``NOOP`` answered ``250``, then QUIT
submission
lmtp        the ``220`` banner, then ``LHLO`` answered ``250``, then QUIT
imap        the ``* OK`` greeting, then ``CAPABILITY`` answered OK, LOGOUT
pop3        the ``+OK`` greeting, then ``CAPA`` answered ``+OK`` ... ``.``, QUIT
rpc         an RPC ``ping`` (HELLO exchange included)
dns         an SOA query for the zone answered NOERROR
=========== ================================================================

Invariants: a probe never raises; it returns ``(False, why)`` on any error
or when ``timeout`` (the whole exchange) passes.

Logs: nothing (the monitor logs state changes, not probes).
"""

from __future__ import annotations

import asyncio
import contextlib

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from intermail.errors import MailError
from intermail.rpc.client import RpcClient

__all__ = ["probe", "PROBED_PORTS"]

PROBED_PORTS = ("smtp", "submission", "lmtp", "imap", "pop3", "rpc", "dns")


class _Bad(Exception):
    pass


async def _line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    if not line:
        raise _Bad("connection closed")
    return line


async def _smtp_reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of a (multi-line) SMTP reply."""
    while True:
        line = await _line(reader)
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def _smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: bytes) -> None:
    if not (await _smtp_reply(reader)).startswith(b"220"):
        raise _Bad("no 220 banner")
    writer.write(command + b"\r\n")
    reply = await _smtp_reply(reader)
    if not reply.startswith(b"250"):
        raise _Bad(f"{command.split()[0].decode()} answered {reply[:40]!r}")
    writer.write(b"QUIT\r\n")


async def _imap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if not (await _line(reader)).startswith(b"* OK"):
        raise _Bad("no * OK greeting")
    writer.write(b"m1 CAPABILITY\r\n")
    while True:
        line = await _line(reader)
        if line.startswith(b"m1 "):
            if not line.startswith(b"m1 OK"):
                raise _Bad(f"CAPABILITY answered {line[:40]!r}")
            break
    writer.write(b"m2 LOGOUT\r\n")


async def _pop3(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if not (await _line(reader)).startswith(b"+OK"):
        raise _Bad("no +OK greeting")
    writer.write(b"CAPA\r\n")
    if not (await _line(reader)).startswith(b"+OK"):
        raise _Bad("CAPA refused")
    while (await _line(reader)) != b".\r\n":
        pass
    writer.write(b"QUIT\r\n")


_STREAM_PROBES = {
    "smtp": lambda r, w: _smtp(r, w, b"NOOP"),
    "submission": lambda r, w: _smtp(r, w, b"NOOP"),
    "lmtp": lambda r, w: _smtp(r, w, b"LHLO monitor"),
    "imap": _imap,
    "pop3": _pop3,
}


async def _stream_probe(port_name: str, address: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        await _STREAM_PROBES[port_name](reader, writer)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def _rpc_probe(address: tuple[str, int], timeout: float) -> None:
    client = RpcClient([address], instance="monitor", connect_timeout=timeout, request_timeout=timeout,
                       reconnect_window=0.0, keepalive=None)
    try:
        await client.call("ping")
    finally:
        await client.close()


async def _dns_probe(address: tuple[str, int], zone: str, timeout: float) -> None:
    query = dns.message.make_query(zone, dns.rdatatype.SOA)
    answer = await dns.asyncquery.udp(query, address[0], port=address[1], timeout=timeout)
    if answer.rcode() != dns.rcode.NOERROR:
        raise _Bad(f"SOA query answered {dns.rcode.to_text(answer.rcode())}")


async def probe(port_name: str, address: tuple[str, int], *, timeout: float, zone: str = "intermail.test"
                ) -> tuple[bool, str]:
    """``(True, "")`` if the instance answered properly within ``timeout`` s, else ``(False, why)``."""
    try:
        async with asyncio.timeout(timeout):
            if port_name == "rpc":
                await _rpc_probe(address, timeout)
            elif port_name == "dns":
                await _dns_probe(address, zone, timeout)
            elif port_name in _STREAM_PROBES:
                await _stream_probe(port_name, address)
            else:
                return False, f"no probe for port {port_name!r}"
    except TimeoutError:
        return False, f"no answer in {timeout:g} s"
    except (_Bad, MailError) as exc:
        return False, str(exc)[:200]
    except (OSError, EOFError, ValueError, dns.exception.DNSException) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:200]
    return True, ""
