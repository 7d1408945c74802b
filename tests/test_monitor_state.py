"""The monitor's UP / SUSPECT / DOWN decision, exhaustively and by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intermail.monitor.state import DOWN, SUSPECT, UNKNOWN, UP, Change, Tracker


def run(results: list[bool], **kw) -> tuple[Tracker, list[Change]]:
    tracker = Tracker(**kw)
    changes = [c for i, ok in enumerate(results) if (c := tracker.observe(ok, float(i))) is not None]
    return tracker, changes


def test_first_success_is_up_first_failure_suspect():
    assert run([True])[0].state == UP
    assert run([False])[0].state == SUSPECT
    assert Tracker().state == UNKNOWN


def test_down_after_n_failures_in_a_row_and_back_up_after_m_successes():
    tracker, changes = run([True, False, False, False], down_after=3)
    assert tracker.state == DOWN
    assert [(c.old, c.new) for c in changes] == [(UNKNOWN, UP), (UP, SUSPECT), (SUSPECT, DOWN)]
    assert tracker.down_since == 1.0 and changes[-1].at == 3.0
    assert tracker.observe(True, 4.0) is None and tracker.state == DOWN  # one success is not enough
    assert tracker.observe(True, 5.0) == Change(DOWN, UP, 5.0)


def test_a_success_while_suspect_clears_it():
    tracker, changes = run([True, False, False, True, False, False], down_after=3)
    assert tracker.state == SUSPECT
    assert [c.new for c in changes] == [UP, SUSPECT, UP, SUSPECT]


def test_down_after_one_goes_straight_down():
    assert run([True, False], down_after=1)[0].state == DOWN


@pytest.mark.parametrize("bad", [{"down_after": 0}, {"up_after": 0}])
def test_thresholds_must_be_positive(bad):
    with pytest.raises(ValueError):
        Tracker(**bad)


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_state_follows_the_rules(results, down_after, up_after):
    tracker, changes = run(results, down_after=down_after, up_after=up_after)
    # every change starts where the previous one ended, and never repeats a state
    state = UNKNOWN
    for change in changes:
        assert change.old == state and change.new != state
        state = change.new
    assert state == tracker.state
    # the tail of the sequence decides
    run_length = 0
    for ok in reversed(results):
        if ok == results[-1]:
            run_length += 1
        else:
            break
    if results and not results[-1] and run_length >= down_after:
        assert tracker.state == DOWN
    if results and results[-1] and run_length >= up_after:
        assert tracker.state == UP
    if results and results[-1] and tracker.state != UP:
        assert tracker.state == DOWN and run_length < up_after
