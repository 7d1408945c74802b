"""What the load benchmarks send: a realistic message of an exact size, ready for DATA.

Logs: nothing.
"""

from __future__ import annotations


def size_label(size: int) -> str:
    return f"{size // 1024}KiB" if size % 1024 == 0 else f"{size}B"


def wire_message(head: str, size: int) -> tuple[bytes, bytes]:
    """``head`` (with ``{serial}`` where a 12-digit serial goes, first occurrence kept open) plus
    plain text lines to ``size`` octets -- one line starts with a dot, so the stuffing is
    exercised -- dot-stuffed with its final ``.`` line, split at the serial: (before, after).
    """
    marker = "@" * 12
    text = head.replace("{serial}", marker, 1).replace("{serial}", "0" * 12)
    lines = [".A line that starts with a dot, stuffed on the wire.\r\n"]
    if size < len(text) + len(lines[0]):
        raise ValueError(f"message size {size} is below the {len(text) + len(lines[0])} octets of its headers")
    line = "The quick brown fox jumps over the lazy dog while the queue flushes.  \r\n"
    while len(text) + sum(map(len, lines)) < size:
        lines.append(line)
    body = text + "".join(lines)
    if len(body) > size:  # cut the last line short, keeping its CRLF (and no bare CR)
        cut = body[:size - 2]
        body = (cut[:-1] + " " if cut.endswith("\r") else cut) + "\r\n"
    stuffed = "\r\n".join("." + ln if ln.startswith(".") else ln for ln in body[:-2].split("\r\n"))
    wire = (stuffed + "\r\n.\r\n").encode("ascii")
    before, after = wire.split(marker.encode(), 1)
    return before, after
