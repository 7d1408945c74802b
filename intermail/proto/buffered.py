"""The bytes-in half shared by the line-based server machines (LMTP, POP3, IMAP).

A subclass keeps ``_buffer`` (a bytearray), ``_eof``, ``_events`` (a deque of
events its parser queued) and ``_close_reason``, and provides
``_input_closed()`` (True once the session is over: later input is ignored),
``_step()`` (consume input; False when nothing can be done without more
bytes) and ``_close(reason)``.  What the app owes after each event stays the
subclass's: its ``next_event`` checks that, then takes :meth:`_next_queued`
(and :meth:`_nothing_queued` when that has nothing).

Logs: nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from intermail.errors import LocalProtocolError
from intermail.proto import NEED_DATA

__all__ = ["BufferedInput"]


class BufferedInput:
    _buffer: bytearray
    _eof: bool
    _events: deque
    _close_reason: str

    def _input_closed(self) -> bool:
        raise NotImplementedError

    def _step(self) -> bool:
        raise NotImplementedError

    def _close(self, reason: str) -> None:
        raise NotImplementedError

    def pending_bytes(self) -> int:
        """Received octets that no event has consumed yet (the pump's STARTTLS check)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data after the end of the stream")
            if not self._input_closed():  # after our close, input is ignored
                self._buffer += data
        else:
            self._eof = True

    def _next_queued(self, peer_closed: str) -> object | None:
        """The next queued event, parsing more input as needed; None when there is none: the
        session is over (``_input_closed()``) or the parser needs more bytes."""
        while not self._events:
            if self._input_closed():
                return None
            if not self._step():
                if not self._eof:
                    return None
                self._close(peer_closed)
        return self._events.popleft()

    def _nothing_queued(self, closed: Callable[[str], object]) -> object:
        """What ``next_event`` returns when :meth:`_next_queued` had nothing: ``closed(reason)`` or NEED_DATA."""
        return closed(self._close_reason) if self._input_closed() else NEED_DATA
