"""The directory client library: lookups and logins for MTAs, access servers and tools.

Owns: finding a directory (``dir.<zone>`` through DNS, every A record, or a
fixed address list), failing over between instances, the lookup cache, and
the one way callers learn "unknown" apart from "unavailable"::

    client = DirectoryClient.via_dns(resolver, "dir.intermail.test", port=7100, instance="mta1")
    match await client.resolve("Bob@Example.org"):
        case Account(mss=mss): ...          # deliver to mss
        case AliasExpansion() as a: ...     # a.accounts, a.remote, a.unknown
        case Unknown(): ...                 # 550 5.1.1
    account = await client.authenticate("bob@example.org", password, client="192.0.2.7")

Invariants:

- ``resolve`` returns an :class:`Account`, an :class:`AliasExpansion` or
  :class:`Unknown`, or raises: INVALID for a malformed address (decided
  here, without a round trip), UNAVAILABLE when no directory answered and
  nothing usable is cached.  "Unknown" is only ever a directory's answer,
  never a guess: the MTA may bounce on it, and turns UNAVAILABLE into 4xx.
- Cache: an answer is reused for ``cache_ttl`` seconds (an unknown address
  for ``negative_ttl``).  While no directory answers, an expired *positive*
  answer is still used for up to ``stale_ttl`` seconds, so a directory
  outage does not stop mail to known users; an expired negative answer is
  not (a new user must not be bounced on a stale "unknown").  Concurrent
  lookups of one address share one request.  The cache is bounded (LRU).
- Failover: calls are idempotent reads, retried on another instance when a
  connection is lost or refused; an instance that does not answer within
  ``request_timeout``, or a replica that answers it has not synchronised
  yet, is demoted (tried last) and the call retried on the next one, each
  instance at most once.  With DNS, the address list is refreshed when its TTL expires,
  keeping the old list if the lookup fails.
- ``authenticate`` is never cached.  It raises PERM for wrong credentials
  or a disabled account, LIMIT when throttled, UNAVAILABLE/TEMP when the
  directory could not be asked.

Logs: ``dir.client_stale`` when a stale answer is served.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from intermail.directory import wire
from intermail.directory.address import Address, parse
from intermail.directory.db import Account, Resolution, Unknown
from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events
from intermail.rpc.client import RpcClient

__all__ = ["DirectoryClient", "Locator"]

log = logging.getLogger("intermail.directory.client")

register_events({"dir.client_stale": "no directory answered; an expired cached lookup was used"})

Locator = Callable[[], Awaitable[tuple[list[tuple[str, int]], float]]]  # addresses, seconds valid
_TRANSIENT = (ErrorKind.UNAVAILABLE, ErrorKind.TEMP)


@dataclass
class _Entry:
    resolution: Resolution
    fresh_until: float
    stale_until: float


class DirectoryClient:
    """Directory lookups with failover and a cache; see the module docstring."""

    def __init__(
        self,
        locate: Locator,
        initial: Sequence[tuple[str, int]],
        *,
        instance: str = "",
        cache_ttl: float = 30.0,
        negative_ttl: float = 5.0,
        stale_ttl: float = 600.0,
        request_timeout: float = 5.0,
        cache_max: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._locate = locate
        # Until the first DNS answer the list holds a placeholder nobody dials:
        # _refresh_addresses runs before every call and replaces it.
        self._located = bool(initial)
        self._rpc = RpcClient(list(initial) or [("0.0.0.0", 0)], instance=instance,
                              request_timeout=request_timeout, reconnect_window=request_timeout,
                              connect_timeout=min(request_timeout, 2.0))
        self._addresses_valid_until = clock() if not initial else float("inf")
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.stale_ttl = stale_ttl
        self.cache_max = cache_max
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Resolution]] = {}
        self.stats = {"hits": 0, "misses": 0, "stale": 0, "failovers": 0}

    # -- construction --------------------------------------------------------------

    @classmethod
    def static(cls, addresses: Sequence[tuple[str, int]], **kwargs: Any) -> DirectoryClient:
        """Every instance at a fixed address; each client starts at a random one (load spreads)."""
        if not addresses:
            raise ValueError("a directory client needs at least one address")
        start = random.randrange(len(addresses))
        ordered = list(addresses[start:]) + list(addresses[:start])

        async def fixed() -> tuple[list[tuple[str, int]], float]:
            return ordered, float("inf")
        return cls(fixed, ordered, **kwargs)

    @classmethod
    def via_dns(cls, resolver: Any, name: str, port: int, **kwargs: Any) -> DirectoryClient:
        """Every A record of ``name`` (``dir.<zone>``), in the order the DNS server gives them."""

        async def lookup() -> tuple[list[tuple[str, int]], float]:
            answer = await resolver.addresses(name, allow_stale=True)
            return [(a, port) for a in answer.addresses], max(answer.ttl, 1.0)
        return cls(lookup, [], **kwargs)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return list(self._rpc.addresses)

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._rpc.close()

    async def __aenter__(self) -> DirectoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- lookups -------------------------------------------------------------------

    async def resolve(self, address: str | Address) -> Resolution:
        """Account, alias expansion or Unknown for ``address``; see the module docstring."""
        key = str(address if isinstance(address, Address) else parse(address))
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and now < entry.fresh_until:
            self._cache.move_to_end(key)
            self.stats["hits"] += 1
            return entry.resolution
        self.stats["misses"] += 1
        fetch = self._inflight.get(key)
        if fetch is None:
            # Its own task, shielded from every caller: one caller giving up
            # (a timed-out SMTP session) must not cancel the others' answer.
            fetch = self._inflight[key] = asyncio.get_running_loop().create_task(self._fetch(key))
            fetch.add_done_callback(lambda task: self._fetch_done(key, task))
        return await asyncio.shield(fetch)

    def _fetch_done(self, key: str, task: asyncio.Task[Resolution]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even if every caller left

    async def _fetch(self, key: str) -> Resolution:
        try:
            answer = await self.call("resolve", {"address": key})
        except MailError as exc:
            if exc.kind not in _TRANSIENT:
                raise
            entry = self._cache.get(key)
            if entry is not None and not isinstance(entry.resolution, Unknown) \
                    and self._clock() < entry.stale_until:
                self.stats["stale"] += 1
                log_event(log, "dir.client_stale", level=logging.WARNING, address=key, error=exc.detail)
                return entry.resolution
            raise
        resolution = wire.decode_resolution(answer)
        self._remember(key, resolution)
        return resolution

    def _remember(self, key: str, resolution: Resolution) -> None:
        now = self._clock()
        if isinstance(resolution, Unknown):
            ttl, stale = self.negative_ttl, 0.0
        else:
            ttl, stale = self.cache_ttl, self.stale_ttl
        if ttl <= 0:
            self._cache.pop(key, None)
            return
        self._cache[key] = _Entry(resolution, now + ttl, now + ttl + stale)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)

    def invalidate(self, address: str | None = None) -> None:
        """Forget one cached address, or everything."""
        if address is None:
            self._cache.clear()
        else:
            self._cache.pop(str(parse(address)), None)

    async def authenticate(self, user: str, password: str, client: str = "") -> Account:
        """The account if the password is right; PERM, LIMIT, or UNAVAILABLE/TEMP (see module)."""
        args = {"user": user, "password": password}
        if client:
            args["client"] = client
        answer = await self.call("authenticate", args)
        return wire.decode_account(answer.get("account", {}))

    # -- raw calls -----------------------------------------------------------------

    async def call(self, method: str, args: dict | None = None) -> dict:
        """Call a directory method: reads fail over freely; writes are sent once."""
        await self._refresh_addresses()
        idempotent = method in wire.READS
        tries = len(self._rpc.addresses) if idempotent else 1
        for attempt in range(tries):
            try:
                return await self._rpc.call(method, args or {}, idempotent=idempotent)
            except MailError as exc:
                # Timed out (the instance is stuck: stopped, swapping, partitioned),
                # or it is a replica with nothing to serve yet: try another.
                elsewhere = exc.kind is ErrorKind.TEMP or (exc.kind is ErrorKind.UNAVAILABLE
                                                           and exc.safe == wire.NOT_SYNCED)
                if not elsewhere or attempt == tries - 1:
                    raise
            self.stats["failovers"] += 1
            self._rpc.demote_current()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh_addresses(self) -> None:
        if self._clock() < self._addresses_valid_until:
            return
        try:
            addresses, ttl = await self._locate()
        except MailError as exc:
            if not self._located:  # nothing to fall back on
                raise MailError(ErrorKind.UNAVAILABLE, safe="directory not found", detail=exc.detail) from None
            self._addresses_valid_until = self._clock() + 1.0  # keep the old list, ask again soon
            return
        if not addresses:
            if not self._located:
                raise MailError(ErrorKind.UNAVAILABLE, safe="directory not found", detail="no addresses")
        elif set(addresses) != set(self._rpc.addresses):
            self._rpc.addresses[:] = addresses  # same set: keep our order, demotions included
        self._located = self._located or bool(addresses)
        self._addresses_valid_until = self._clock() + ttl
