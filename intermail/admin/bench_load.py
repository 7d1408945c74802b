"""What the load benchmarks send: realistic messages of exact sizes, raw or ready for DATA.

- :func:`wire_message`: one plain-text message of an exact size,
  dot-stuffed with its final ``.`` line and split where a serial goes (the
  LMTP and SMTP benches send it over and over).
- :func:`mailbox_mix`: the messages of one mailbox (raw, CRLF): a repeating
  mix of sizes, senders and MIME structures -- short notes, a newsletter, a
  text + HTML alternative, a report with a base64 attachment, a quoting
  reply -- the same for every server a bench compares (the IMAP and POP3
  benches deliver it to both).
- :func:`draft_message`: a small message a client stores (IMAP APPEND).

Logs: nothing.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
from pathlib import Path

from intermail.proto.dotstuff import stuff_body

LINE = "The quick brown fox jumps over the lazy dog while the queue flushes.  \r\n"
DOT_LINE = ".A line that starts with a dot, stuffed on the wire.\r\n"


def size_label(size: int) -> str:
    return f"{size // 1024}KiB" if size % 1024 == 0 else f"{size}B"


def _fill(text: str, size: int, first: str = DOT_LINE, line: str = LINE) -> str:
    """``text`` plus ``first`` and then ``line`` repeated, cut to exactly ``size`` octets (CRLF kept)."""
    if size < len(text) + len(first):
        raise ValueError(f"message size {size} is below the {len(text) + len(first)} octets of its headers")
    missing = size - len(text) - len(first)
    body = text + first + line * -(-missing // len(line))  # whole lines up to size or just past it
    if len(body) > size:  # cut the last line short, keeping its CRLF (and no bare CR)
        cut = body[:size - 2]
        body = (cut[:-1] + " " if cut.endswith("\r") else cut) + "\r\n"
    return body


def wire_message(head: str, size: int) -> tuple[bytes, bytes]:
    """``head`` (with ``{serial}`` where a 12-digit serial goes, first occurrence kept open) plus
    plain text lines to ``size`` octets -- one line starts with a dot, so the stuffing is
    exercised -- dot-stuffed with its final ``.`` line, split at the serial: (before, after).
    """
    marker = "@" * 12
    text = head.replace("{serial}", marker, 1).replace("{serial}", "0" * 12)
    wire = stuff_body(_fill(text, size).encode("ascii"))
    before, after = wire.split(marker.encode(), 1)
    return before, after


# -- a mailbox's worth of mail ----------------------------------------------------------

_PEOPLE = (("Alice Example", "alice@example.org"), ("Bob Builder", "bob@builders.test"),
           ("Carol Danvers", "carol@example.net"), ("Dave Lister", "dave@red-dwarf.test"))


def _headers(n: int, who: int, to: str, subject: str, content_type: str, extra: str = "") -> str:
    name, address = _PEOPLE[who % len(_PEOPLE)]
    day = 1 + n % 28
    return (f"Return-Path: <{address}>\r\n"
            f"Received: from mx.{address.split('@')[1]} (mx.{address.split('@')[1]} [192.0.2.{1 + n % 200}])\r\n"
            f"\tby mta1.intermail.test (intermail) with ESMTPS id M{n:012d}\r\n"
            f"\tfor <{to}>; {day:02d} Nov 2026 09:{n % 60:02d}:00 +0000\r\n"
            f"From: {name} <{address}>\r\n"
            f"To: Bench User <{to}>\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {day:02d} Nov 2026 09:{n % 60:02d}:00 +0000\r\n"
            f"Message-ID: <{n:012d}.{who}@{address.split('@')[1]}>\r\n"
            f"MIME-Version: 1.0\r\n{extra}"
            f"Content-Type: {content_type}\r\n")


def _note(n: int, to: str, size: int) -> str:
    head = _headers(n, 0, to, f"Lunch on Friday? ({n})", "text/plain; charset=utf-8",
                    "Content-Transfer-Encoding: 7bit\r\n") + "\r\n"
    return _fill(head + "Hi,\r\n\r\nare you free on Friday?\r\n\r\n", size)


def _newsletter(n: int, to: str, size: int) -> str:
    head = _headers(n, 1, to, f"Builders weekly #{n}", "text/plain; charset=utf-8",
                    "List-Id: <weekly.builders.test>\r\nContent-Transfer-Encoding: 7bit\r\n") + "\r\n"
    return _fill(head, size)


def _alternative(n: int, to: str, size: int) -> str:
    boundary = f"=_alt_{n:08d}"
    head = _headers(n, 2, to, f"Re: the plan for next week ({n})", f'multipart/alternative; boundary="{boundary}"')
    text = _fill(f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n", max(400, size // 3))
    close = f"--{boundary}--\r\n"
    html_head = f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body>\r\n"
    html = _fill(html_head, size - len(head) - 2 - len(text) - len(close) - len("</body></html>\r\n"),
                 first="<p>The plan, in HTML.</p>\r\n", line="<p>" + LINE.strip() + "</p>\r\n")
    return head + "\r\n" + text + html + "</body></html>\r\n" + close


def _with_attachment(n: int, to: str, size: int) -> str:
    boundary = f"=_mix_{n:08d}"
    head = _headers(n, 0, to, f"Quarterly report {n}", f'multipart/mixed; boundary="{boundary}"')
    text = _fill(f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe report is attached.\r\n",
                 1200)
    part = (f"--{boundary}\r\nContent-Type: application/pdf; name=\"report-{n}.pdf\"\r\n"
            f"Content-Disposition: attachment; filename=\"report-{n}.pdf\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n")
    close = f"--{boundary}--\r\n"
    room = size - len(head) - 2 - len(text) - len(part) - len(close)
    lines = max(1, room // 78)  # 76 base64 characters and CRLF per line
    raw = random.Random(n).randbytes(lines * 57)
    encoded = base64.encodebytes(raw).decode("ascii").replace("\n", "\r\n")
    return _pad_preamble(head + "\r\n" + text + part + encoded + close, head, size)


def _pad_preamble(message: str, head: str, size: int) -> str:
    """``message`` grown to ``size`` octets with a multipart preamble (text clients never show)."""
    missing = size - len(message)
    if missing < 4:
        return message
    filler = ("x" * (missing - 2)) + "\r\n"
    return head + "\r\n" + filler + message[len(head) + 2:]


def _reply(n: int, to: str, size: int) -> str:
    head = _headers(n, 3, to, f"Re: Re: smeg ({n})", "text/plain; charset=utf-8",
                    f"In-Reply-To: <{n - 1:012d}.3@red-dwarf.test>\r\n") + "\r\n"
    return _fill(head + "Agreed.\r\n\r\nOn Monday you wrote:\r\n", size, first="> " + LINE,
                 line="> " + LINE)


# (size, builder): the repeating mix; about 13 KiB a message on average
MIX = ((2048, _note), (4096, _newsletter), (8192, _alternative), (40960, _with_attachment), (12288, _reply))


def mailbox_mix(count: int, to: str) -> list[bytes]:
    """``count`` messages for the mailbox of ``to`` (raw, CRLF line ends), cycling through :data:`MIX`."""
    return [MIX[n % len(MIX)][1](n, to, MIX[n % len(MIX)][0]).encode("ascii") for n in range(count)]


def draft_message(to: str, serial: int, size: int = 4096) -> bytes:
    """A message a client saves with IMAP APPEND (a draft), ``size`` octets."""
    head = _headers(serial, 2, to, f"Draft {serial}", "text/plain; charset=utf-8") + "\r\n"
    return _fill(head + "Not sent yet.\r\n", size).encode("ascii")


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still there (zombies aside)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{name}/stat").read_bytes()
                fields = stat[stat.rindex(b")") + 2:].split()
                if int(fields[2]) == pgid and fields[0] != b"Z":
                    return True
    return False
