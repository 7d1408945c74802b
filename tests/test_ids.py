"""intermail.ids: short, sortable, unique queue and session ids."""

from __future__ import annotations

import os
import threading

from hypothesis import given
from hypothesis import strategies as st

from intermail import ids
from intermail.ids import IdGenerator


def test_shapes():
    qid, sid = ids.new_queue_id(), ids.new_session_id()
    assert len(qid) == 20 and len(sid) == 16
    for value in (qid, sid):
        assert ids.is_valid(value)
        assert set(value) <= set(ids.ALPHABET)
    assert not ids.is_valid("short")
    assert not ids.is_valid("0123456789ILOU")  # letters Crockford leaves out


def test_alphabet_sorts_like_its_values():
    assert list(ids.ALPHABET) == sorted(ids.ALPHABET)


def test_many_ids_are_unique_and_increasing():
    made = [ids.new_queue_id() for _ in range(20000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_same_millisecond_counts_up():
    gen = IdGenerator(4, clock_ms=lambda: 1000, randbits=lambda bits: 5)
    a, b, c = gen.new(), gen.new(), gen.new()
    assert a < b < c
    assert ids.timestamp_ms(a) == 1000


def test_clock_stepping_back_keeps_order():
    times = iter([5000, 4000, 4000, 6000])
    gen = IdGenerator(4, clock_ms=lambda: next(times), randbits=lambda bits: 0)
    made = [gen.new() for _ in range(4)]
    assert made == sorted(made) and len(set(made)) == 4
    assert [ids.timestamp_ms(m) for m in made] == [5000, 5000, 5000, 6000]


def test_random_part_overflow_moves_to_next_millisecond():
    gen = IdGenerator(1, clock_ms=lambda: 10, randbits=lambda bits: (1 << bits) - 1)
    first, second = gen.new(), gen.new()
    assert first < second
    assert ids.timestamp_ms(second) == 11


def test_timestamp_is_now():
    import time

    ms = ids.timestamp_ms(ids.new_session_id())
    assert abs(ms - time.time() * 1000) < 60_000


@given(st.lists(st.integers(min_value=0, max_value=2**48), min_size=2, max_size=50))
def test_order_follows_time(times):
    ordered = sorted(times)
    it = iter(ordered)
    gen = IdGenerator(6, clock_ms=lambda: next(it))
    made = [gen.new() for _ in ordered]
    assert made == sorted(made)
    assert [ids.timestamp_ms(m) for m in made] == ordered


def test_threads_never_collide():
    gen = IdGenerator(6)
    out: list[list[str]] = [[] for _ in range(4)]

    def mint(slot: list[str]) -> None:
        slot.extend(gen.new() for _ in range(5000))

    threads = [threading.Thread(target=mint, args=(slot,)) for slot in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for slot in out for i in slot]
    assert len(set(everything)) == len(everything)


def test_forked_child_does_not_replay_parent():
    gen = IdGenerator(10, clock_ms=lambda: 42)
    gen.new()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next id and leave without running pytest's teardown
        os.close(read_fd)
        os.write(write_fd, gen.new().encode())
        os._exit(0)
    os.close(write_fd)
    child_id = os.read(read_fd, 100).decode()
    os.close(read_fd)
    os.waitpid(pid, 0)
    parent_id = gen.new()
    assert child_id != parent_id
