"""Sans-I/O protocol machines: bytes in, frozen-dataclass events out.

Every machine here follows one contract (after h11):

- ``receive_data(data: bytes) -> None`` buffers bytes from the peer
  (``b""`` means the peer closed its side);
- ``next_event()`` returns the next event, or :data:`NEED_DATA` when more
  bytes are needed, and raises only :class:`intermail.errors.RemoteProtocolError`
  on bad input;
- ``send(event) -> bytes`` turns an event of ours into wire bytes.

Modules here import nothing but the standard library, ``intermail.errors``
and ``intermail.ids``. The shared pump in :mod:`intermail.net.pump` drives any
of them over an asyncio stream; :mod:`intermail.testing.feed` checks that a
machine yields the same events whatever the input split.
"""

from __future__ import annotations

import typing


class _NeedData:
    """Sentinel type: the machine needs more bytes before it can emit an event."""

    _instance: "_NeedData | None" = None

    def __new__(cls) -> "_NeedData":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Machine(typing.Protocol):
    """The contract every sans-I/O machine implements."""

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...

    def send(self, event: object) -> bytes: ...
