"""Authentication throttling: limits at their edge, exact retry-after, bounded memory, reference model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from intermail.directory.throttle import AuthThrottle
from intermail.testing.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def throttle(clock: FakeClock, **limits) -> AuthThrottle:
    return AuthThrottle(clock=clock, **limits)


def fail(t: AuthThrottle, user: str, ip: str, times: int) -> None:
    for _ in range(times):
        t.failed(user, ip)


# -- limits at their edge ---------------------------------------------------------------


def test_user_limit_minus_one_allowed_limit_blocks(clock):
    t = throttle(clock, user_failures=3, ip_failures=0)
    fail(t, "a@example.org", "192.0.2.1", 2)
    assert t.check("a@example.org", "192.0.2.1") == 0.0
    t.failed("a@example.org", "192.0.2.1")
    assert t.check("a@example.org", "192.0.2.1") == 300.0
    assert t.check("a@example.org", "198.51.100.7") == 300.0  # the user is blocked from anywhere
    assert t.check("b@example.org", "192.0.2.1") == 0.0  # ip dimension disabled


def test_ip_limit_minus_one_allowed_limit_blocks(clock):
    t = throttle(clock, user_failures=0, ip_failures=4)
    for n in range(3):
        t.failed(f"u{n}@example.org", "192.0.2.1")
    assert t.check("other@example.org", "192.0.2.1") == 0.0
    t.failed("u3@example.org", "192.0.2.1")
    assert t.check("other@example.org", "192.0.2.1") == 300.0
    assert t.check("other@example.org", "192.0.2.2") == 0.0


def test_limit_of_one(clock):
    t = throttle(clock, user_failures=1, ip_failures=0, window=10.0)
    assert t.check("a", "") == 0.0
    t.failed("a", "")
    assert t.check("a", "") == 10.0


def test_defaults(clock):
    t = throttle(clock)
    fail(t, "a", "192.0.2.1", 9)
    assert t.check("a", "192.0.2.1") == 0.0
    t.failed("a", "192.0.2.1")
    assert t.check("a", "192.0.2.1") == 300.0
    for n in range(19):
        t.failed(f"u{n}", "192.0.2.1")
    assert t.check("fresh", "192.0.2.1") == 0.0  # 29 failures from the address
    t.failed("u19", "192.0.2.1")
    assert t.check("fresh", "192.0.2.1") == 300.0


# -- retry-after and ageing out -----------------------------------------------------------


def test_retry_after_is_exact_and_failures_age_out(clock):
    t = throttle(clock, user_failures=3, ip_failures=0, window=300.0)
    for step in (0.0, 10.0, 10.0):  # failures at 1000, 1010, 1020
        clock.advance(step)
        t.failed("a", "192.0.2.1")
    assert t.check("a", "192.0.2.1") == 280.0  # until the one at 1000 ages out
    clock.now = 1299.5
    assert t.check("a", "192.0.2.1") == 0.5
    clock.now = 1300.0  # the failure at 1000 no longer counts: 2 < 3
    assert t.check("a", "192.0.2.1") == 0.0
    t.failed("a", "192.0.2.1")  # 1010, 1020, 1300
    assert t.check("a", "192.0.2.1") == 10.0
    clock.now = 1320.0
    assert t.check("a", "192.0.2.1") == 0.0  # 1010 and 1020 gone: one left
    clock.now = 1600.0
    assert t.check("a", "192.0.2.1") == 0.0
    assert t.stats()["entries"] == 0  # fully aged-out keys are dropped


def test_retry_after_with_more_failures_than_the_limit(clock):
    t = throttle(clock, user_failures=2, ip_failures=0, window=100.0)
    for _ in range(5):  # at 1000, 1001, 1002, 1003, 1004
        t.failed("a", "")
        clock.advance(1.0)
    # five in the window; it drops below 2 once four have aged out: at 1003 + 100
    assert t.check("a", "") == 1103.0 - 1005.0


def test_check_reports_the_most_restrictive_dimension(clock):
    t = throttle(clock, user_failures=3, ip_failures=2, window=100.0)
    t.failed("x", "192.0.2.1")  # 1000
    clock.now = 1010.0
    t.failed("y", "192.0.2.1")  # the address is blocked until 1100
    for now, ip in ((1020.0, "192.0.2.2"), (1030.0, "192.0.2.3"), (1040.0, "192.0.2.4")):
        clock.now = now
        t.failed("a", ip)  # the user is blocked until 1120
    assert t.check("a", "192.0.2.1") == 80.0
    assert t.check("a", "192.0.2.9") == 80.0
    assert t.check("z", "192.0.2.1") == 60.0
    clock.now = 1105.0
    assert t.check("a", "192.0.2.1") == 15.0
    assert t.check("z", "192.0.2.1") == 0.0


def test_refused_checks_do_not_extend_a_block(clock):
    t = throttle(clock, user_failures=2, ip_failures=0, window=60.0)
    fail(t, "a", "", 2)
    for _ in range(59):
        clock.advance(1.0)
        assert t.check("a", "") > 0.0
    clock.advance(1.0)
    assert t.check("a", "") == 0.0


def test_clock_stepping_back_is_treated_as_standing_still(clock):
    t = throttle(clock, user_failures=1, ip_failures=0, window=10.0)
    t.failed("a", "")
    clock.now -= 50.0
    assert t.check("a", "") == 10.0


# -- success, disabling, empty address ------------------------------------------------------


def test_success_clears_the_user_but_not_the_ip(clock):
    t = throttle(clock, user_failures=3, ip_failures=3)
    fail(t, "a", "192.0.2.1", 2)
    t.succeeded("a", "192.0.2.1")
    t.failed("a", "192.0.2.9")
    assert t.check("a", "192.0.2.9") == 0.0  # user back to one failure
    t.failed("b", "192.0.2.1")  # third failure from the address
    assert t.check("a", "192.0.2.1") == 300.0
    t.succeeded("a", "192.0.2.1")
    assert t.check("a", "192.0.2.1") == 300.0  # a good account does not reset the address
    assert t.check("a", "192.0.2.2") == 0.0


def test_success_for_an_unknown_user_is_harmless(clock):
    t = throttle(clock)
    t.succeeded("nobody", "")
    assert t.stats()["entries"] == 0


def test_zero_disables_both_dimensions(clock):
    t = throttle(clock, user_failures=0, ip_failures=0)
    fail(t, "a", "192.0.2.1", 1000)
    assert t.check("a", "192.0.2.1") == 0.0
    assert t.stats()["entries"] == 0


def test_zero_user_limit_still_tracks_ip(clock):
    t = throttle(clock, user_failures=0, ip_failures=2)
    fail(t, "a", "192.0.2.1", 2)
    assert t.check("a", "192.0.2.1") == 300.0
    assert t.check("a", "192.0.2.2") == 0.0
    assert t.stats()["users"] == 0


def test_empty_ip_is_not_tracked(clock):
    t = throttle(clock, user_failures=5, ip_failures=1)
    for n in range(10):
        t.failed(f"u{n}", "")
    assert t.check("fresh", "") == 0.0
    assert t.stats()["ips"] == 0
    assert t.stats()["users"] == 10


def test_users_are_compared_as_given(clock):
    t = throttle(clock, user_failures=1, ip_failures=0)
    t.failed("A@Example.org", "")
    assert t.check("A@Example.org", "") > 0.0
    assert t.check("a@example.org", "") == 0.0


@pytest.mark.parametrize("kwargs", [
    {"user_failures": -1}, {"ip_failures": -1}, {"window": 0.0}, {"window": -1.0},
    {"window": float("nan")}, {"max_entries": 0},
])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        AuthThrottle(**kwargs)


# -- memory bounds ------------------------------------------------------------------------------


def test_one_key_stores_at_most_limit_timestamps(clock):
    t = throttle(clock, user_failures=5, ip_failures=7)
    for _ in range(10_000):
        t.failed("a", "192.0.2.1")
        clock.advance(0.001)
    assert t.stats()["stored_failures"] == 5 + 7


def test_entry_bound_holds_under_ten_times_max_entries_distinct_keys(clock):
    max_entries = 100
    t = throttle(clock, user_failures=1, ip_failures=1, max_entries=max_entries)
    for n in range(10 * max_entries):
        t.failed(f"user{n}", f"10.0.{n // 256}.{n % 256}")
        clock.advance(0.01)
        assert t.stats()["entries"] <= max_entries
    stats = t.stats()
    assert stats["entries"] == max_entries
    assert stats["evicted"] == 2 * 10 * max_entries - max_entries
    last = 10 * max_entries - 1
    assert t.check(f"user{last}", "") > 0.0  # the most recent failures are the ones kept
    assert t.check("user0", "") == 0.0  # the oldest were evicted: that errs toward allowing


def test_full_table_prunes_expired_before_evicting(clock):
    t = throttle(clock, user_failures=1, ip_failures=0, window=10.0, max_entries=50)
    for n in range(50):
        t.failed(f"old{n}", "")
    clock.advance(10.0)  # all expired, but nothing has swept them yet beyond a step
    for n in range(50):
        t.failed(f"new{n}", "")
        assert t.stats()["entries"] <= 50
    assert t.stats()["evicted"] == 0
    assert all(t.check(f"new{n}", "") > 0.0 for n in range(50))


def test_eviction_takes_the_oldest_last_failure_across_both_maps(clock):
    t = throttle(clock, user_failures=2, ip_failures=2, max_entries=2)
    t.failed("a", "192.0.2.1")  # a and 192.0.2.1 at 1000
    clock.advance(1.0)
    t.failed("a", "")  # a now last failed at 1001
    clock.advance(1.0)
    t.failed("b", "")  # table full: 192.0.2.1 (1000) goes, not a (1001)
    stats = t.stats()
    assert (stats["users"], stats["ips"], stats["evicted"]) == (2, 0, 1)
    assert t.check("a", "") > 0.0


def test_a_new_failure_makes_a_key_recent_again(clock):
    t = throttle(clock, user_failures=2, ip_failures=0, max_entries=2)
    t.failed("a", "")  # 1000
    clock.advance(1.0)
    t.failed("b", "")  # 1001
    clock.advance(1.0)
    t.failed("a", "")  # 1002: a is blocked, and now the most recent
    clock.advance(1.0)
    t.failed("c", "")  # full: b (last failed 1001) goes, not a
    assert t.check("a", "") == 297.0  # until its failure at 1000 ages out
    assert t.stats()["users"] == 2


def test_sweep_drops_expired_keys_without_their_being_read(clock):
    t = throttle(clock, user_failures=3, ip_failures=0, window=5.0)
    for n in range(100):
        t.failed(f"u{n}", "")
    clock.advance(5.0)
    for _ in range(25):  # each call drops a bounded batch
        t.check("someone-else", "")
    assert t.stats()["entries"] == 0


# -- against a naive reference model ---------------------------------------------------------


class Reference:
    """Every failure as (dimension, key, time); the rules of the module docstring, literally."""

    def __init__(self, user_failures: int, ip_failures: int, window: float):
        self.limits = {"user": user_failures, "ip": ip_failures}
        self.window = window
        self.failures: list[tuple[str, str, float]] = []

    def keys(self, user: str, ip: str) -> list[tuple[str, str]]:
        keys = [("user", user)] if self.limits["user"] > 0 else []
        if self.limits["ip"] > 0 and ip:
            keys.append(("ip", ip))
        return keys

    def failed(self, user: str, ip: str, now: float) -> None:
        self.failures += [(dim, key, now) for dim, key in self.keys(user, ip)]

    def succeeded(self, user: str) -> None:
        self.failures = [f for f in self.failures if f[:2] != ("user", user)]

    def check(self, user: str, ip: str, now: float) -> float:
        result = 0.0
        for dim, key in self.keys(user, ip):
            live = sorted(t for d, k, t in self.failures if (d, k) == (dim, key) and now < t + self.window)
            excess = len(live) - self.limits[dim]
            if excess >= 0:
                result = max(result, live[excess] + self.window - now)
        return result


USERS = st.sampled_from(["alice", "bob", "carol", "dave"])
IPS = st.sampled_from(["", "192.0.2.1", "192.0.2.2", "2001:db8::1"])
STEPS = st.integers(min_value=0, max_value=48).map(lambda quarter_seconds: quarter_seconds / 4)


class ThrottleMachine(RuleBasedStateMachine):
    """With room for every key, check() equals the reference model exactly."""

    max_entries = 1000

    @initialize(
        user_failures=st.integers(0, 4), ip_failures=st.integers(0, 5),
        window=st.sampled_from([1.0, 2.5, 5.0, 10.0]),
    )
    def setup(self, user_failures, ip_failures, window):
        self.clock = FakeClock(0.0)
        self.throttle = AuthThrottle(
            user_failures=user_failures, ip_failures=ip_failures, window=window,
            max_entries=self.max_entries, clock=self.clock,
        )
        self.model = Reference(user_failures, ip_failures, window)

    @rule(seconds=STEPS)
    def wait(self, seconds):
        self.clock.advance(seconds)

    @rule(user=USERS, ip=IPS)
    def fail(self, user, ip):
        self.throttle.failed(user, ip)
        self.model.failed(user, ip, self.clock.now)

    @rule(user=USERS, ip=IPS)
    def attempt(self, user, ip):
        """What a caller does: check, and report a failure only if allowed."""
        if self.compare(user, ip) == 0.0:
            self.fail(user, ip)

    @rule(user=USERS, ip=IPS)
    def succeed(self, user, ip):
        self.throttle.succeeded(user, ip)
        self.model.succeeded(user)

    @rule(user=USERS, ip=IPS)
    def check(self, user, ip):
        self.compare(user, ip)

    def compare(self, user: str, ip: str) -> float:
        got = self.throttle.check(user, ip)
        assert got == self.model.check(user, ip, self.clock.now)
        return got

    @invariant()
    def bounded(self):
        if hasattr(self, "throttle"):
            assert self.throttle.stats()["entries"] <= self.max_entries


class EvictingThrottleMachine(ThrottleMachine):
    """With too little room, eviction only loses history: never stricter than the reference."""

    max_entries = 3

    def compare(self, user: str, ip: str) -> float:
        got = self.throttle.check(user, ip)
        assert 0.0 <= got <= self.model.check(user, ip, self.clock.now)
        return got

    @invariant()
    def blocked_keys_are_tracked(self):
        if not hasattr(self, "throttle"):
            return
        stats = self.throttle.stats()
        assert stats["blocked_users"] <= stats["users"] and stats["blocked_ips"] <= stats["ips"]


TestThrottleMatchesReference = ThrottleMachine.TestCase
TestThrottleMatchesReference.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestEvictionErrsTowardAllowing = EvictingThrottleMachine.TestCase
TestEvictionErrsTowardAllowing.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
