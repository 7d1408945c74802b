"""The cluster's authoritative DNS server (``dnsd``) and the client of its RFC 2136 updates.

Modules, each doing one thing:

- :mod:`intermail.dns.zone`: the zone data (an immutable snapshot of
  RRsets), built from the Config on first start, kept in a master file
  written atomically and durably;
- :mod:`intermail.dns.server`: the sans-I/O authority -- bytes in, bytes
  out: answers (round-robin rotation, NXDOMAIN/NODATA with the SOA,
  truncation), RFC 2136 UPDATE with prerequisites, TSIG;
- :mod:`intermail.dns.listeners`: the asyncio UDP and TCP front ends, which
  make an UPDATE durable before answering it;
- :mod:`intermail.dns.tsig`: the TSIG key file (BIND's format);
- :mod:`intermail.dns.update`: the client side of UPDATE, which the monitor
  uses to keep service names (``mta``, ``imap``, ``pop``, ``dir``) in step
  with the instances that answer.

The package name shadows nothing: inside it ``import dns.message`` is an
absolute import of dnspython.  It imports no apps, admin, testing or
services (import-linter contract in pyproject.toml).
"""
