"""Authentication throttling for the directory: per user and per client address.

Owns the in-memory record of recent failed logins, kept separately for each
user and for each client address (two *dimensions*), and the one decision
made from it: may an attempt proceed now, or in how many seconds?
Pure and synchronous: no I/O, no asyncio, time from an injected clock.  Not
thread-safe; it lives on the event loop thread of the service that owns it.

Invariants:

- **Blocking rule.** A key is blocked while it has at least its limit of
  failures within the last ``window`` seconds: a failure at ``t`` counts
  while ``now < t + window``.  :meth:`AuthThrottle.check` returns the
  retry-after of the most restrictive dimension: the seconds until enough of
  that key's failures age out to leave it below its limit, or ``0.0``.
- **Bounded per key.** A key stores at most ``limit`` timestamps (a deque
  with ``maxlen``).  That is exact, not an approximation: with failures in
  time order, "``limit`` or more failures in the window" holds exactly when
  the latest ``limit`` are all in it, and the block ends when the oldest of
  those ages out.  An attacker hammering one key cannot grow its memory.
- **Bounded overall.** At most ``max_entries`` keys across both dimensions.
  Each dimension keeps its keys in order of last failure (the clock is made
  non-decreasing, so appending keeps the order), hence expired keys are
  always at the front: each call drops up to ``_SWEEP_STEP`` of them (O(1),
  and faster than the two keys one call can add), and a key read by
  :meth:`check` that has fully aged out is dropped on the spot.  When full,
  the front key with the oldest last failure goes: it is an expired one if
  any exists (pruning), else the least recently failing live key (eviction,
  counted in ``stats()["evicted"]``).  Eviction only ever *loses* failure
  history, so it errs toward allowing an attempt, never toward refusing a
  legitimate user; a flood of distinct keys large enough to force it is
  itself visible in the stats.
- **Refused attempts are not failures.** The caller does not verify the
  password of an attempt that :meth:`check` refused, so it cannot report it
  as failed: a blocked attacker cannot extend its own block, and the block
  ends when its failures age out (``window``, 300 s by default).  That is
  acceptable because the attacker gets no verified guess while blocked: it
  gains at most ``limit`` guesses per ``window`` per key, which is the rate
  the limits are set to allow.
- :meth:`AuthThrottle.succeeded` clears the user's failures but not the
  address's: one good account must not reset an address that is guessing
  others.
- A limit of ``0`` disables its dimension; the address ``""`` (unknown, e.g. a
  local socket) is never tracked.  Users are compared exactly as given: the
  caller canonicalises addresses first (:mod:`.address`).

Logs: nothing; the caller logs refused and failed logins, and exports
:meth:`AuthThrottle.stats` as metrics.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

DEFAULT_USER_FAILURES = 10
DEFAULT_IP_FAILURES = 30
DEFAULT_WINDOW = 300.0
DEFAULT_MAX_ENTRIES = 100_000
_SWEEP_STEP = 4  # expired keys dropped per call: more than one failed() can add


def retry_after(times: deque[float], limit: int, window: float, now: float) -> float:
    """Seconds until a key with these failure ``times`` drops below ``limit``; 0.0 if it is.

    ``times`` is in time order and holds at most ``limit`` entries.
    """
    if limit <= 0 or len(times) < limit:
        return 0.0
    unblocked_at = times[0] + window
    # For floats a > b implies a - b > 0, so a blocked key never reports 0.0.
    return unblocked_at - now if now < unblocked_at else 0.0


class _FailureLog:
    """One dimension (users or addresses): key -> its latest failure times, oldest last failure first."""

    def __init__(self, limit: int, window: float):
        self.limit = limit
        self.window = window
        self.keys: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def expired(self, times: deque[float], now: float) -> bool:
        return times[-1] + self.window <= now

    def retry_after(self, key: str, now: float) -> float:
        times = self.keys.get(key)
        if times is None:
            return 0.0
        if self.expired(times, now):
            del self.keys[key]
            return 0.0
        return retry_after(times, self.limit, self.window, now)

    def record(self, key: str, now: float) -> None:
        times = self.keys.get(key)
        if times is None:
            self.keys[key] = deque((now,), maxlen=self.limit)
            return
        times.append(now)
        self.keys.move_to_end(key)

    def forget(self, key: str) -> None:
        self.keys.pop(key, None)

    def oldest_last_failure(self) -> float | None:
        if not self.keys:
            return None
        return self.keys[next(iter(self.keys))][-1]

    def pop_oldest(self, now: float) -> bool:
        """Drop the key with the oldest last failure; True if it had not expired."""
        _, times = self.keys.popitem(last=False)
        return not self.expired(times, now)

    def sweep(self, now: float, budget: int) -> None:
        while budget > 0 and self.keys:
            if not self.expired(self.keys[next(iter(self.keys))], now):
                return
            self.keys.popitem(last=False)
            budget -= 1

    def blocked(self, now: float) -> int:
        return sum(1 for times in self.keys.values() if retry_after(times, self.limit, self.window, now) > 0)

    def stored_failures(self) -> int:
        return sum(len(times) for times in self.keys.values())


class AuthThrottle:
    """Refuses logins for a user or a client address after too many recent failures."""

    def __init__(
        self,
        *,
        user_failures: int = DEFAULT_USER_FAILURES,
        ip_failures: int = DEFAULT_IP_FAILURES,
        window: float = DEFAULT_WINDOW,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ):
        if user_failures < 0 or ip_failures < 0:
            raise ValueError(f"failure limits must be >= 0, got {user_failures} and {ip_failures}")
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._users = _FailureLog(user_failures, window)
        self._ips = _FailureLog(ip_failures, window)
        self._max_entries = max_entries
        self._clock = clock
        self._latest = float("-inf")
        self._evicted = 0

    def check(self, user: str, ip: str) -> float:
        """0.0 if an attempt by ``user`` from ``ip`` may proceed, else seconds until it may."""
        now = self._now()
        self._sweep(now)
        return max((log.retry_after(key, now) for log, key in self._tracked(user, ip)), default=0.0)

    def failed(self, user: str, ip: str) -> None:
        """Record one failed attempt against the user and against the address."""
        now = self._now()
        self._sweep(now)
        for log, key in self._tracked(user, ip):
            if key not in log:
                self._make_room(now)
            log.record(key, now)

    def succeeded(self, user: str, ip: str) -> None:
        """Clear the user's failures; the address keeps its own (see the module docstring)."""
        now = self._now()
        self._sweep(now)
        self._users.forget(user)

    def stats(self) -> dict[str, int]:
        """Keys tracked and keys blocked now, per dimension; O(entries), for metrics."""
        now = self._now()
        return {
            "entries": len(self._users) + len(self._ips),
            "users": len(self._users),
            "ips": len(self._ips),
            "blocked_users": self._users.blocked(now),
            "blocked_ips": self._ips.blocked(now),
            "stored_failures": self._users.stored_failures() + self._ips.stored_failures(),
            "evicted": self._evicted,
        }

    def _now(self) -> float:
        # Never step back: the order of each log by last failure relies on it.
        self._latest = max(self._latest, self._clock())
        return self._latest

    def _tracked(self, user: str, ip: str) -> Iterator[tuple[_FailureLog, str]]:
        if self._users.limit > 0:
            yield self._users, user
        if self._ips.limit > 0 and ip:
            yield self._ips, ip

    def _sweep(self, now: float) -> None:
        self._users.sweep(now, _SWEEP_STEP)
        self._ips.sweep(now, _SWEEP_STEP)

    def _make_room(self, now: float) -> None:
        while len(self._users) + len(self._ips) >= self._max_entries:
            victim = _oldest_front(self._users, self._ips)
            if victim.pop_oldest(now):
                self._evicted += 1


def _oldest_front(a: _FailureLog, b: _FailureLog) -> _FailureLog:
    """The non-empty log whose first key failed longest ago (``a`` on a tie)."""
    a_last, b_last = a.oldest_last_failure(), b.oldest_last_failure()
    if a_last is None:
        return b
    if b_last is None or a_last <= b_last:
        return a
    return b
