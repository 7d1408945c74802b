"""``intermail load --verify``: every injected message accounted for over IMAP, once.

Owns: the :class:`Ledger` of tokens (one per SMTP message the load sends:
``<run>-<serial>``, carried in an ``X-Load-Token`` header and the
subject) and the check after the run (:func:`verify`), which reads the
mailboxes of the load accounts over IMAP with the standard library's
``imaplib`` (an independent client, in threads) until every accepted
token has arrived or ``timeout`` passes.

Outcomes of one message, as the client saw them:

- *accepted*: the server answered 250 after the dot -- it must arrive
  exactly once (I-1, I-4): missing = **lost**, more than once = **doubled**;
- *refused*: a definite non-250 reply -- it must not arrive;
- *unconfirmed*: the body went out but no reply came (the connection
  broke): it may arrive, at most once (more is doubled too).

Invariants: only tokens of this run count (the run id is random), so
mailboxes may hold older mail; a mailbox is read incrementally by UID
(from scratch again if its UIDVALIDITY changes), one connection per
account kept open between polls, from a source address of its own when
the server is on loopback (per-address connection limits).

Logs: nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import ipaddress
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

TOKEN_HEADER = "X-Load-Token"
POLL_INTERVAL = 1.0  # seconds between two reads of every mailbox while mail is still missing
GRACE = 2.0  # seconds to read once more after everything arrived (a late double would show up)
VERIFY_CLIENT_NET = "127.251"  # source addresses of the verifying IMAP connections on loopback
_UID = re.compile(rb"UID (\d+)")
_TOKEN = re.compile(rb"X-Load-Token:[ \t]*([A-Za-z0-9-]+)", re.IGNORECASE)


@dataclass
class Ledger:
    """Every token sent in this run and what the sender saw of it."""

    run: str
    rcpt: dict[str, str] = field(default_factory=dict)  # token -> recipient
    accepted: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)

    def sent(self, token: str, rcpt: str) -> None:
        """The body is on its way: from now on the message may arrive."""
        self.rcpt[token] = rcpt

    def acknowledged(self, token: str) -> None:
        self.accepted.add(token)

    def rejected(self, token: str) -> None:
        self.refused.add(token)

    @property
    def unconfirmed(self) -> set[str]:
        return set(self.rcpt) - self.accepted - self.refused


class _Imap(imaplib.IMAP4):
    """imaplib's client, connecting from a chosen source address."""

    def __init__(self, host: str, port: int, source: str | None, timeout: float):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):  # imaplib's hook for the connection
        source = (self._source, 0) if self._source else None
        return socket.create_connection((self.host, self.port), timeout, source_address=source)


@dataclass
class _Mailbox:
    """What has been read of one account's INBOX so far."""

    user: str
    uidvalidity: int = 0
    last_uid: int = 0
    tokens: Counter = field(default_factory=Counter)
    client: _Imap | None = None
    source: str | None = None

    def read(self, locate: Callable[[], tuple[str, int]], password: str, prefix: bytes) -> None:
        """Read the messages that came since the last read (blocking: run in a thread)."""
        if self.client is None:
            host, port = locate()
            loopback = ipaddress.ip_address(host).is_loopback if _is_ip(host) else False
            self.client = _Imap(host, port, self.source if loopback else None, timeout=30)
            self.client.login(self.user, password)
        typ, data = self.client.select("INBOX", readonly=True)
        if typ != "OK":
            raise imaplib.IMAP4.error(f"SELECT: {data!r}")
        uidvalidity = int((self.client.response("UIDVALIDITY")[1] or [b"0"])[-1] or 0)
        if uidvalidity != self.uidvalidity:
            self.uidvalidity, self.last_uid, self.tokens = uidvalidity, 0, Counter()
        if int(data[0] or 0) == 0:
            return
        typ, data = self.client.uid("FETCH", f"{self.last_uid + 1}:*",
                                    f"(UID BODY.PEEK[HEADER.FIELDS ({TOKEN_HEADER})])")
        if typ != "OK":
            raise imaplib.IMAP4.error(f"UID FETCH: {data!r}")
        newest = self.last_uid
        for part in data:
            if not isinstance(part, tuple):
                continue
            uid_match = _UID.search(part[0])
            if uid_match is None or int(uid_match.group(1)) <= self.last_uid:
                continue  # "n:*" names the last message even when no UID reaches n
            newest = max(newest, int(uid_match.group(1)))
            token = _TOKEN.search(part[1] or b"")
            if token and token.group(1).startswith(prefix):
                self.tokens[token.group(1).decode("ascii")] += 1
        self.last_uid = newest

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.logout()
            self.client = None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def verify(ledger: Ledger, users: list[str], password: str,
                 locate: Callable[[], Awaitable[tuple[str, int]]], timeout: float,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Read every load mailbox until each accepted token is there (or ``timeout``); the verdict."""
    loop = asyncio.get_running_loop()
    prefix = f"{ledger.run}-".encode()
    mailboxes = [_Mailbox(user, source=f"{VERIFY_CLIENT_NET}.{n // 250 % 250}.{n % 250 + 1}")
                 for n, user in enumerate(users)]
    began = time.monotonic()
    settled_at: float | None = None
    errors: Counter = Counter()
    limit = asyncio.Semaphore(8)

    async def read(box: _Mailbox) -> None:
        async with limit:
            address = await locate()
            try:
                await loop.run_in_executor(None, box.read, lambda: address, password, prefix)
            except (OSError, imaplib.IMAP4.error, EOFError, ValueError) as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                await loop.run_in_executor(None, box.close)

    try:
        while True:
            await asyncio.gather(*(read(box) for box in mailboxes))
            found: Counter = Counter()
            for box in mailboxes:
                found.update(box.tokens)
            arrived = sum(1 for t in ledger.accepted if found[t])
            if progress is not None:
                progress(arrived, len(ledger.accepted))
            now = time.monotonic()
            if arrived == len(ledger.accepted):
                if settled_at is None:
                    settled_at = now
                if now - settled_at >= GRACE:
                    break
            elif now - began > timeout:
                break
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        await asyncio.gather(*(loop.run_in_executor(None, box.close) for box in mailboxes))
    lost = sorted(t for t in ledger.accepted if not found[t])
    doubled = sorted(t for t, n in found.items() if n > 1)
    unconfirmed = ledger.unconfirmed
    return {
        "accepted": len(ledger.accepted),
        "found": sum(1 for t in ledger.accepted if found[t] == 1),
        "lost": len(lost),
        "doubled": len(doubled),
        "extra_copies": sum(found[t] - 1 for t in doubled),
        "unconfirmed": len(unconfirmed),
        "unconfirmed_delivered": sum(1 for t in unconfirmed if found[t]),
        "refused": len(ledger.refused),
        "delivered_after_refusal": sum(1 for t in ledger.refused if found[t]),
        "unknown_tokens": sum(1 for t in found if t not in ledger.rcpt),
        "settled": settled_at is not None,
        "settle_seconds": round((settled_at or time.monotonic()) - began, 3),
        "lost_tokens": lost[:100],
        "doubled_tokens": doubled[:100],
        "read_errors": dict(errors.most_common(10)),
    }
