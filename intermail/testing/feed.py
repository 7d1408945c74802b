"""The one parser contract check: same events whatever the input split.

``events_whole``, ``events_split`` and ``events_bytewise`` feed a fresh
machine the same bytes in different slices and collect everything it emits
(an escaping :class:`RemoteProtocolError` is recorded as a final
``("error", text)`` item, any other exception propagates and fails the test).
``assert_split_invariant`` checks that all three, and every two-way split,
agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from intermail.errors import RemoteProtocolError
from intermail.proto import NEED_DATA, Machine


def _drain(machine: Machine, out: list) -> bool:
    """Collect events until NEED_DATA; False once the machine raised."""
    while True:
        try:
            event = machine.next_event()
        except RemoteProtocolError as exc:
            out.append(("error", exc.text))
            return False
        if event is NEED_DATA:
            return True
        out.append(event)


def events_for_chunks(make: Callable[[], Machine], chunks: Iterable[bytes]) -> list:
    machine = make()
    out: list = []
    for chunk in chunks:
        machine.receive_data(chunk)
        if not _drain(machine, out):
            break
    return out


def events_whole(make: Callable[[], Machine], data: bytes) -> list:
    return events_for_chunks(make, [data])


def events_bytewise(make: Callable[[], Machine], data: bytes) -> list:
    return events_for_chunks(make, [data[i : i + 1] for i in range(len(data))])


def events_split(make: Callable[[], Machine], data: bytes, at: int) -> list:
    return events_for_chunks(make, [data[:at], data[at:]])


def assert_split_invariant(make: Callable[[], Machine], data: bytes, every_split: bool = True) -> list:
    """Check whole == byte-at-a-time == every two-way split; return the events."""
    whole = events_whole(make, data)
    assert events_bytewise(make, data) == whole, "byte-at-a-time feed differs from whole feed"
    if every_split:
        for at in range(1, len(data)):
            assert events_split(make, data, at) == whole, f"split at byte {at} differs"
    return whole
