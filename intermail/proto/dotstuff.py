"""Dot-stuffing of a body sent as CRLF lines ended by ``.CRLF`` (SMTP DATA, POP3 multi-line).

One rule for both: every CR or LF not part of a CRLF goes out as CRLF, a
line starting with ``.`` gets a second one (RFC 5321 §4.5.2, RFC 1939 §3),
a missing final line end is added, then ``.CRLF``.  :class:`DotStuffer`
keeps its state across chunks, so any chunking gives the bytes of
:func:`stuff_body`.

Logs: nothing.
"""

from __future__ import annotations

__all__ = ["DotStuffer", "stuff_body"]


def stuff_body(data: bytes) -> bytes:
    """A whole body in its wire form: CRLF line ends, dots stuffed, ``.CRLF`` at the end."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.end()


class DotStuffer:
    """Dot-stuffing and line-end repair across chunks.

    A trailing CR is held back until the next chunk says whether an LF
    follows; every CR or LF that is not part of a CRLF goes out as CRLF.
    """

    def __init__(self) -> None:
        self.line_start = True
        self.held_cr = False

    def feed(self, data: bytes) -> bytes:
        if self.held_cr:
            data = b"\r" + data
            self.held_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self.held_cr = True
        if not data:
            return b""
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self.line_start and data.startswith(b"."):
            data = b"." + data
        self.line_start = data.endswith(b"\r\n")
        return data

    def end(self) -> bytes:
        tail = b""
        if self.held_cr:
            self.held_cr = False
            tail = b"\r\n"  # a bare CR at the very end: a line end
            self.line_start = True
        if not self.line_start:
            tail += b"\r\n"
        self.line_start = True
        return tail + b".\r\n"
