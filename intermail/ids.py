"""Identifiers: queue ids and session ids that are short, sortable and unique.

An id is Crockford base32 (``0-9`` and ``A-Z`` without ``I L O U``), upper
case, fixed length: 10 characters of milliseconds since the Unix epoch
followed by random characters (10 for queue ids, 6 for session ids).

Invariants:

- **Sortable.** The alphabet is in ASCII order and the time part comes first
  with a fixed width, so ``sorted()`` on ids is creation order: a directory
  listing or an index on the queue id is also the arrival order.
- **Unique within a process, always.** Ids from one generator strictly
  increase: within one millisecond (or when the wall clock steps back) the
  random part is incremented instead of redrawn, as ULIDs do.
- **Unique across processes, with overwhelming probability.** Queue ids are
  half of the exactly-once key (I-4: queue id + recipient), so two MTAs must
  not mint the same one: 50 random bits per millisecond make a collision
  between two instances about 1 in 10^15 per millisecond in which both mint.
  A forked child reseeds, so it does not replay its parent's sequence.

Logs: nothing.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {ch: i for i, ch in enumerate(ALPHABET)}
TIME_CHARS = 10  # 50 bits of milliseconds: good until the year 37648
QUEUE_RANDOM_CHARS = 10  # 50 bits: cross-instance uniqueness of the I-4 key
SESSION_RANDOM_CHARS = 6  # 30 bits: session ids only need to tell log lines apart


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _decode(text: str) -> int:
    value = 0
    for ch in text:
        value = (value << 5) | _DECODE[ch]
    return value


class IdGenerator:
    """Mints strictly increasing ids of one random width; thread- and fork-safe."""

    def __init__(
        self,
        random_chars: int,
        *,
        clock_ms: Callable[[], int] | None = None,
        randbits: Callable[[int], int] = secrets.randbits,
    ):
        if random_chars < 1:
            raise ValueError("random_chars must be at least 1")
        self.random_chars = random_chars
        self._random_bits = 5 * random_chars
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._randbits = randbits
        # Executor threads mint ids too (storage work runs off the loop).
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0
        # A forked child starts with its parent's state; without a reseed its
        # next id in the same millisecond would equal the parent's.
        # A weak reference: fork hooks cannot be unregistered, and must not
        # keep every generator ever made alive.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (gen := ref()) is not None and gen._reseed())

    def _reseed(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1

    def new(self) -> str:
        with self._lock:
            now = self._clock_ms()
            if now > self._last_ms:
                self._last_ms = now
                self._last_random = self._randbits(self._random_bits)
            else:
                # Same millisecond, or the wall clock stepped back: keep the
                # last time and count up, so ids still strictly increase.
                self._last_random += 1
                if self._last_random >> self._random_bits:
                    self._last_ms += 1
                    self._last_random = self._randbits(self._random_bits - 1)
            return _encode(self._last_ms, TIME_CHARS) + _encode(self._last_random, self.random_chars)


_queue_ids = IdGenerator(QUEUE_RANDOM_CHARS)
_session_ids = IdGenerator(SESSION_RANDOM_CHARS)


def new_queue_id() -> str:
    """A new 20-character queue id (also the idempotency key's first half)."""
    return _queue_ids.new()


def new_session_id() -> str:
    """A new 16-character session id for one client connection."""
    return _session_ids.new()


def is_valid(text: str) -> bool:
    """True when ``text`` has the shape of an id minted here (any random width)."""
    return len(text) > TIME_CHARS and all(ch in _DECODE for ch in text)


def timestamp_ms(text: str) -> int:
    """Milliseconds since the epoch at which the id was minted."""
    if not is_valid(text):
        raise ValueError(f"not an intermail id: {text!r}")
    return _decode(text[:TIME_CHARS])
