"""A clock for tests: pass ``clock`` where code takes ``clock=time.monotonic``, then ``clock.advance(s)``."""

from __future__ import annotations


class FakeClock:
    """Monotonic time that moves only when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
