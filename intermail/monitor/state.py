"""UP / SUSPECT / DOWN: what a run of probe results means for one instance (pure code).

Owns the decision the monitor acts on, kept apart from any I/O so it can be
tested exhaustively::

    tracker = Tracker(down_after=3, up_after=2)
    change = tracker.observe(ok=False, now=12.5)   # None, or a Change(old, new)

Rules:

- A new tracker is ``UNKNOWN`` until its first result: a success makes it
  UP at once (an instance that answers is serving), a failure SUSPECT.
- From UP, a failure makes it SUSPECT; ``down_after`` failures in a row
  make it DOWN.  A success while SUSPECT makes it UP again.
- From DOWN, ``up_after`` successes in a row make it UP (one lucky answer
  from a flapping instance is not enough to route traffic back to it).
- ``since`` is when the current state began; ``down_since`` when the first
  failure of the current run was seen (the take-over clock starts there).

Invariants: the state depends only on the sequence of results; every
transition is reported exactly once, as a :class:`Change`.

Logs: nothing.
"""

from __future__ import annotations

import dataclasses

__all__ = ["UNKNOWN", "UP", "SUSPECT", "DOWN", "Change", "Tracker"]

UNKNOWN, UP, SUSPECT, DOWN = "unknown", "up", "suspect", "down"


@dataclasses.dataclass(frozen=True)
class Change:
    old: str
    new: str
    at: float


class Tracker:
    """The state of one probed instance."""

    def __init__(self, *, down_after: int = 3, up_after: int = 2):
        if down_after < 1 or up_after < 1:
            raise ValueError("down_after and up_after must be at least 1")
        self.down_after = down_after
        self.up_after = up_after
        self.state = UNKNOWN
        self.since = 0.0
        self.failures = 0  # in a row
        self.successes = 0  # in a row
        self.down_since: float | None = None  # first failure of the current run

    def observe(self, ok: bool, now: float) -> Change | None:
        """Take one probe result; the transition it caused, if any."""
        if ok:
            self.failures, self.successes = 0, self.successes + 1
            self.down_since = None
            if self.state in (UNKNOWN, SUSPECT) or (self.state == DOWN and self.successes >= self.up_after):
                return self._move(UP, now)
            return None
        self.successes, self.failures = 0, self.failures + 1
        if self.down_since is None:
            self.down_since = now
        if self.state != DOWN and self.failures >= self.down_after:
            return self._move(DOWN, now)
        if self.state in (UNKNOWN, UP):
            return self._move(SUSPECT, now)
        return None

    def _move(self, new: str, now: float) -> Change:
        change = Change(self.state, new, now)
        self.state, self.since = new, now
        return change
