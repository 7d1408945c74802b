"""The delivery-time MIME scan: offsets, BODYSTRUCTURE, ENVELOPE, SEARCH keys, sections, JSON.

Expected IMAP strings are written by hand after RFC 3501 §7.4.2 (whose own
FETCH and BODYSTRUCTURE examples are reproduced byte for byte); offsets are
checked by slicing the original bytes.
"""

from __future__ import annotations

import datetime
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.errors import ErrorKind, LocalProtocolError, MailError
from intermail.mailstore.mime import (
    Address,
    Envelope,
    MessageInfo,
    Part,
    Scanner,
    bodystructure,
    envelope_text,
    from_json,
    scan,
    section,
    to_json,
)

# ---------------------------------------------------------------------------
# helpers


def filler(size: int, lines: int, width: int = 40) -> bytes:
    """``size`` octets holding exactly ``lines`` CRLFs, not ending in one (no "--" anywhere)."""
    out = (b"a" * width + b"\r\n") * lines
    assert len(out) < size
    return out + b"b" * (size - len(out))


def feed_split(data: bytes, cuts, **limits) -> MessageInfo:
    scanner = Scanner(**limits)
    last = 0
    for cut in sorted(set(cuts)):
        scanner.feed(data[last:cut])
        last = cut
    scanner.feed(data[last:])
    return scanner.finish()


def part_paths(info: MessageInfo):
    """Every numeric section spec with the Part it names (RFC 3501 §6.4.5 numbering)."""

    def inside(root: Part, prefix: str):
        if root.is_multipart:
            for k, child in enumerate(root.children, 1):
                yield from below(child, f"{prefix}{k}")
        else:
            yield from below(root, f"{prefix}1", root_itself=True)

    def below(part: Part, spec: str, root_itself: bool = False):
        yield spec, part
        if part.is_multipart and not root_itself:
            for k, child in enumerate(part.children, 1):
                yield from below(child, f"{spec}.{k}")
        elif part.message is not None:
            yield from inside(part.message, spec + ".")

    yield from inside(info.part, "")


def check_invariants(info: MessageInfo, data: bytes) -> None:
    """Offsets are exact, nested and consistent; every renderer and the JSON form work."""
    assert info.size == len(data)
    top = info.part
    assert top.header_offset == 0 and top.end == len(data)

    def walk(p: Part, lo: int, hi: int) -> None:
        assert lo <= p.header_offset <= p.body_offset <= p.end <= hi
        assert p.header_offset + p.header_size == p.body_offset
        assert p.body_size >= 0 and p.lines == data[p.body_offset : p.end].count(b"\n")
        assert (p.message is not None) == (p.type == "message" and p.subtype in ("rfc822", "global"))
        assert (p.envelope is not None) == (p.message is not None)
        if not p.is_multipart:
            assert p.children == ()
        previous = p.body_offset
        for child in p.children:
            assert child.header_offset >= previous
            walk(child, p.body_offset, p.end)
            previous = child.end
        if p.message is not None:
            assert p.message.header_offset == p.body_offset and p.message.end == p.end
            walk(p.message, p.body_offset, p.end)

    walk(top, 0, len(data))
    for spec, part in part_paths(info):
        assert section(info, spec) == (part.body_offset, part.body_size)
        assert section(info, spec + ".MIME") == (part.header_offset, part.header_size)
    bodystructure(info).encode("utf-8", "surrogateescape")
    bodystructure(info, extended=False, utf8=True).encode("utf-8", "surrogateescape")
    envelope_text(info).encode("utf-8", "surrogateescape")
    assert from_json(to_json(info)) == info
    to_json(info).encode("ascii")


def sliced(data: bytes, info: MessageInfo, spec: str) -> bytes | None:
    found = section(info, spec)
    return None if found is None else data[found[0] : found[0] + found[1]]


# ---------------------------------------------------------------------------
# the table of real-world-shaped messages

SIMPLE = (  # RFC 3501 §6.3.11's APPEND example
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n"
    b"From: Fred Foobar <foobar@Blurdybloop.example>\r\n"
    b"Subject: afternoon meeting\r\n"
    b"To: mooch@owatagu.siam.edu.example\r\n"
    b"Message-Id: <B27397-0100000@Blurdybloop.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
    b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n"
)

ALTERNATIVE = (
    b"From: a@example.com\r\n"
    b"Subject: alt\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="==alt=="\r\n'
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--==alt==\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Caf=C3=A9\r\n"
    b"\r\n"
    b"--==alt==\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Caf\xc3\xa9</p>\r\n"
    b"--==alt==--\r\n"
    b"epilogue\r\n"
)

MIXED = (
    b"From: Carol <carol@example.com>\r\n"
    b"To: Dave <dave@example.com>\r\n"
    b"Subject: report\r\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n"
    b"--XYZ\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Language: en\r\n"
    b"\r\n"
    b"See attached.\r\n"
    b"--XYZ\r\n"
    b'Content-Type: application/pdf; name="report.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment;\r\n"
    b" filename*0*=utf-8''r%C3%A9;\r\n"
    b" filename*1=port.pdf\r\n"
    b"Content-ID: <part2@example.com>\r\n"
    b"Content-Description: The report\r\n"
    b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n"
    b"Content-Location: http://example.com/report.pdf\r\n"
    b"Content-Language: en, fr\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"JSVFT0YK\r\n"
    b"--XYZ--\r\n"
)

NESTED = (  # the inner boundary has the outer one as a prefix: the longest match wins
    b"Subject: nested\r\n"
    b"Content-Type: multipart/mixed; boundary=outer\r\n"
    b"\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=outer-inner\r\n"
    b"\r\n"
    b"--outer-inner\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"plain\r\n"
    b"--outer-inner\r\n"
    b"Content-Type: text/html\r\n"
    b"\r\n"
    b"<b>html</b>\r\n"
    b"--outer-inner--\r\n"
    b"\r\n"
    b"--outer\r\n"
    b"Content-Type: image/png\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"iVBORw0KGgo=\r\n"
    b"--outer--\r\n"
)

INNER_HEADER = (
    b"From: Frank <frank@example.org>\r\n"
    b"To: eve@example.com\r\n"
    b"Subject: hello\r\n"
    b"Date: Tue, 1 Jan 2002 10:00:00 +0000\r\n"
    b"Message-ID: <inner@example.org>\r\n"
    b"Content-Type: multipart/alternative; boundary=in\r\n"
    b"\r\n"
)
INNER_BODY = b"--in\r\n\r\nhi\r\n--in\r\nContent-Type: text/html\r\n\r\n<i>hi</i>\r\n--in--"
FORWARD = (
    b"From: Eve <eve@example.com>\r\n"
    b"Subject: Fwd: hello\r\n"
    b"Content-Type: multipart/mixed; boundary=fwd\r\n"
    b"\r\n"
    b"--fwd\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Forwarded message below.\r\n"
    b"--fwd\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Disposition: inline\r\n"
    b"\r\n" + INNER_HEADER + INNER_BODY + b"\r\n"
    b"--fwd--\r\n"
)

DIGEST = (
    b"Subject: digest\r\n"
    b"Content-Type: multipart/digest; boundary=d\r\n"
    b"\r\n"
    b"--d\r\n"
    b"\r\n"
    b"From: g@example.com\r\n"
    b"Subject: one\r\n"
    b"\r\n"
    b"first\r\n"
    b"--d\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"not a message\r\n"
    b"--d--\r\n"
)

UNCLOSED = (
    b"Content-Type: multipart/mixed; boundary=t\r\n"
    b"\r\n"
    b"--t\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"one\r\n"
    b"--t\r\n"
    b"\r\n"
    b"two\r\n"
    b"still two\r\n"
)

NO_HEADERS = b"\r\nJust a body.\r\n"

LF_ONLY = (
    b"Subject: lf\n"
    b"Content-Type: multipart/mixed; boundary=lf\n"
    b"\n"
    b"--lf\n"
    b"Content-Type: text/plain\n"
    b"\n"
    b"line one\n"
    b"line two\n"
    b"--lf\n"
    b"\n"
    b"x\n"
    b"--lf--\n"
)

GROUPS = (
    b"From: Sales <sales@example.com>\r\n"
    b"To: undisclosed-recipients:;\r\n"
    b'Cc: Team: Ann <ann@example.com>, bob@example.com;, "Doe, John" <john@example.com>\r\n'
    b"Bcc: (Hidden Boss) boss@example.com\r\n"
    b"Reply-To: \r\n"
    b"Sender: <@relay.example:post@example.net>\r\n"
    b"\r\n"
    b"body\r\n"
)

ENCODED = (  # RFC 2047 §8
    b"From: =?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?= <keld@dkuug.dk>\r\n"
    b"To: =?US-ASCII?Q?Keith_Moore?= <moore@cs.utk.edu>\r\n"
    b"CC: =?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>\r\n"
    b"Subject: =?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=\r\n"
    b"    =?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?=\r\n"
    b"\r\n"
    b"x\r\n"
)

RFC_FETCH = (  # RFC 3501 §7.4.2's FETCH response example
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n" + filler(3028, 92, width=30)
)

RFC_BODYSTRUCTURE = (  # the shape of RFC 3501 §7.4.2's BODYSTRUCTURE example
    b"From: gray@cac.washington.edu\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: MULTIPART/MIXED; BOUNDARY=\"cac\"\r\n"
    b"\r\n"
    b"--cac\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n" + filler(1152, 23) + b"\r\n"
    b"--cac\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME=cc.diff\r\n"
    b"Content-ID: <960723163407.20117h@cac.washington.edu>\r\n"
    b"Content-Description: Compiled diff\r\n"
    b"Content-Transfer-Encoding: BASE64\r\n"
    b"\r\n" + filler(4554, 73, width=60) + b"\r\n"
    b"--cac--\r\n"
)

TERRY = '"Terry Gray" NIL "gray" "cac.washington.edu"'

CASES = {
    "simple": dict(
        data=SIMPLE,
        bodystructure='("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 55 1 NIL NIL NIL NIL)',
        body='("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 55 1)',
        envelope='("Mon, 7 Feb 1994 21:52:25 -0800 (PST)" "afternoon meeting"'
        ' (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) (("Fred Foobar" NIL "foobar" "Blurdybloop.example"))'
        ' (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) ((NIL NIL "mooch" "owatagu.siam.edu.example"))'
        ' NIL NIL NIL "<B27397-0100000@Blurdybloop.example>")',
        sections={
            "1": b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n",
            "TEXT": b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n",
            "1.MIME": SIMPLE[: SIMPLE.index(b"\r\n\r\n") + 4],
            "HEADER": SIMPLE[: SIMPLE.index(b"\r\n\r\n") + 4],
            "HEADER.FIELDS (FROM)": SIMPLE[: SIMPLE.index(b"\r\n\r\n") + 4],
            "": SIMPLE,
            "2": None,
            "1.1": None,
            "1.HEADER": None,
        },
    ),
    "alternative": dict(
        data=ALTERNATIVE,
        bodystructure='(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 11 1 NIL NIL NIL NIL)'
        '("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 12 0 NIL NIL NIL NIL)'
        ' "ALTERNATIVE" ("BOUNDARY" "==alt==") NIL NIL NIL)',
        body='(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 11 1)'
        '("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 12 0) "ALTERNATIVE")',
        envelope='(NIL "alt" ((NIL NIL "a" "example.com")) ((NIL NIL "a" "example.com"))'
        ' ((NIL NIL "a" "example.com")) NIL NIL NIL NIL NIL)',
        sections={
            "1": b"Caf=C3=A9\r\n",
            "1.MIME": b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
            "2": b"<p>Caf\xc3\xa9</p>",
            "2.MIME": b"Content-Type: text/html; charset=utf-8\r\n\r\n",
            "TEXT": ALTERNATIVE[ALTERNATIVE.index(b"This is") :],
            "3": None,
        },
    ),
    "mixed-attachment": dict(
        data=MIXED,
        bodystructure='(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 13 0 NIL NIL "en" NIL)'
        '("APPLICATION" "PDF" ("NAME" "report.pdf") "<part2@example.com>" "The report" "BASE64" 22'
        ' "Q2hlY2sgSW50ZWdyaXR5IQ==" ("ATTACHMENT" ("FILENAME*" "utf-8\'\'r%C3%A9port.pdf")) ("en" "fr")'
        ' "http://example.com/report.pdf") "MIXED" ("BOUNDARY" "XYZ") NIL NIL NIL)',
        body='(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 13 0)'
        '("APPLICATION" "PDF" ("NAME" "report.pdf") "<part2@example.com>" "The report" "BASE64" 22) "MIXED")',
        envelope='(NIL "report" (("Carol" NIL "carol" "example.com")) (("Carol" NIL "carol" "example.com"))'
        ' (("Carol" NIL "carol" "example.com")) (("Dave" NIL "dave" "example.com")) NIL NIL NIL NIL)',
        sections={
            "1": b"See attached.",
            "2": b"JVBERi0xLjQK\r\nJSVFT0YK",
            "2.MIME": MIXED[MIXED.index(b"Content-Type: application") : MIXED.index(b"JVBERi")],
        },
    ),
    "nested": dict(
        data=NESTED,
        bodystructure='((("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 5 0 NIL NIL NIL NIL)'
        '("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "7BIT" 11 0 NIL NIL NIL NIL)'
        ' "ALTERNATIVE" ("BOUNDARY" "outer-inner") NIL NIL NIL)'
        '("IMAGE" "PNG" NIL NIL NIL "BASE64" 12 NIL NIL NIL NIL) "MIXED" ("BOUNDARY" "outer") NIL NIL NIL)',
        body='((("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 5 0)'
        '("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "7BIT" 11 0) "ALTERNATIVE")'
        '("IMAGE" "PNG" NIL NIL NIL "BASE64" 12) "MIXED")',
        envelope='(NIL "nested" NIL NIL NIL NIL NIL NIL NIL NIL)',
        sections={
            "1": NESTED[NESTED.index(b"--outer-inner\r\n") : NESTED.index(b"--outer-inner--") + 17],
            "1.1": b"plain",
            "1.2": b"<b>html</b>",
            "1.2.MIME": b"Content-Type: text/html\r\n\r\n",
            "2": b"iVBORw0KGgo=",
            "3": None,
            "1.3": None,
            "2.1": None,
            "1.TEXT": None,
        },
    ),
    "message-rfc822": dict(
        data=FORWARD,
        bodystructure='(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 24 0 NIL NIL NIL NIL)'
        '("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 255'
        ' ("Tue, 1 Jan 2002 10:00:00 +0000" "hello" (("Frank" NIL "frank" "example.org"))'
        ' (("Frank" NIL "frank" "example.org")) (("Frank" NIL "frank" "example.org"))'
        ' ((NIL NIL "eve" "example.com")) NIL NIL NIL "<inner@example.org>")'
        ' (("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 2 0 NIL NIL NIL NIL)'
        '("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "7BIT" 9 0 NIL NIL NIL NIL)'
        ' "ALTERNATIVE" ("BOUNDARY" "in") NIL NIL NIL)'
        ' 14 NIL ("INLINE" NIL) NIL NIL) "MIXED" ("BOUNDARY" "fwd") NIL NIL NIL)',
        body='(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 24 0)'
        '("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 255'
        ' ("Tue, 1 Jan 2002 10:00:00 +0000" "hello" (("Frank" NIL "frank" "example.org"))'
        ' (("Frank" NIL "frank" "example.org")) (("Frank" NIL "frank" "example.org"))'
        ' ((NIL NIL "eve" "example.com")) NIL NIL NIL "<inner@example.org>")'
        ' (("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 2 0)'
        '("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "7BIT" 9 0) "ALTERNATIVE") 14) "MIXED")',
        envelope='(NIL "Fwd: hello" (("Eve" NIL "eve" "example.com")) (("Eve" NIL "eve" "example.com"))'
        ' (("Eve" NIL "eve" "example.com")) NIL NIL NIL NIL NIL)',
        sections={
            "1": b"Forwarded message below.",
            "2": INNER_HEADER + INNER_BODY,
            "2.MIME": b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n",
            "2.HEADER": INNER_HEADER,
            "2.HEADER.FIELDS.NOT": INNER_HEADER,
            "2.TEXT": INNER_BODY,
            "2.1": b"hi",
            "2.1.MIME": b"\r\n",
            "2.2": b"<i>hi</i>",
            "2.2.MIME": b"Content-Type: text/html\r\n\r\n",
            "2.3": None,
            "1.HEADER": None,
            "2.1.HEADER": None,
        },
    ),
    "digest": dict(
        data=DIGEST,
        bodystructure='(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 42'
        ' (NIL "one" ((NIL NIL "g" "example.com")) ((NIL NIL "g" "example.com")) ((NIL NIL "g" "example.com"))'
        ' NIL NIL NIL NIL NIL) ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 5 0 NIL NIL NIL NIL)'
        ' 3 NIL NIL NIL NIL)("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 13 0 NIL NIL NIL NIL)'
        ' "DIGEST" ("BOUNDARY" "d") NIL NIL NIL)',
        envelope='(NIL "digest" NIL NIL NIL NIL NIL NIL NIL NIL)',
        sections={
            "1": b"From: g@example.com\r\nSubject: one\r\n\r\nfirst",
            "1.MIME": b"\r\n",
            "1.HEADER": b"From: g@example.com\r\nSubject: one\r\n\r\n",
            "1.TEXT": b"first",
            "1.1": b"first",
            "1.1.MIME": b"From: g@example.com\r\nSubject: one\r\n\r\n",
            "2": b"not a message",
        },
    ),
    "missing-close-boundary": dict(
        data=UNCLOSED,
        bodystructure='(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 3 0 NIL NIL NIL NIL)'
        '("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 16 2 NIL NIL NIL NIL)'
        ' "MIXED" ("BOUNDARY" "t") NIL NIL NIL)',
        envelope="(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)",
        sections={"1": b"one", "2": b"two\r\nstill two\r\n", "2.MIME": b"\r\n"},
    ),
    "no-headers": dict(
        data=NO_HEADERS,
        bodystructure='("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 14 1 NIL NIL NIL NIL)',
        envelope="(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)",
        sections={"HEADER": b"\r\n", "TEXT": b"Just a body.\r\n", "1": b"Just a body.\r\n"},
    ),
    "lf-only": dict(
        data=LF_ONLY,
        bodystructure='(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 17 1 NIL NIL NIL NIL)'
        '("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 1 0 NIL NIL NIL NIL)'
        ' "MIXED" ("BOUNDARY" "lf") NIL NIL NIL)',
        envelope='(NIL "lf" NIL NIL NIL NIL NIL NIL NIL NIL)',
        sections={
            "HEADER": b"Subject: lf\nContent-Type: multipart/mixed; boundary=lf\n\n",
            "1": b"line one\nline two",
            "1.MIME": b"Content-Type: text/plain\n\n",
            "2": b"x",
            "2.MIME": b"\n",
        },
    ),
    "group-addresses": dict(
        data=GROUPS,
        bodystructure='("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 6 1 NIL NIL NIL NIL)',
        envelope='(NIL NIL (("Sales" NIL "sales" "example.com")) ((NIL "@relay.example" "post" "example.net"))'
        ' (("Sales" NIL "sales" "example.com")) ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'
        ' ((NIL NIL "Team" NIL)("Ann" NIL "ann" "example.com")(NIL NIL "bob" "example.com")(NIL NIL NIL NIL)'
        '("Doe, John" NIL "john" "example.com")) (("Hidden Boss" NIL "boss" "example.com")) NIL NIL)',
        sections={},
    ),
    "encoded-words": dict(
        data=ENCODED,
        bodystructure='("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 3 1 NIL NIL NIL NIL)',
        envelope='(NIL "=?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=    '
        '=?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?="'
        ' (("=?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?=" NIL "keld" "dkuug.dk"))'
        ' (("=?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?=" NIL "keld" "dkuug.dk"))'
        ' (("=?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?=" NIL "keld" "dkuug.dk"))'
        ' (("=?US-ASCII?Q?Keith_Moore?=" NIL "moore" "cs.utk.edu"))'
        ' (("=?ISO-8859-1?Q?Andr=E9?= Pirard" NIL "PIRARD" "vm1.ulg.ac.be")) NIL NIL NIL)',
        sections={},
    ),
    "rfc3501-fetch-example": dict(
        data=RFC_FETCH,
        body='("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)',
        envelope=f'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes"'
        f" (({TERRY})) (({TERRY})) (({TERRY})) ((NIL NIL \"imap\" \"cac.washington.edu\"))"
        ' ((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU"))'
        ' NIL NIL "<B27397-0100000@cac.washington.edu>")',
        sections={},
    ),
    "rfc3501-bodystructure-example": dict(
        data=RFC_BODYSTRUCTURE,
        body='(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        '("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff")'
        ' "<960723163407.20117h@cac.washington.edu>" "Compiled diff" "BASE64" 4554 73) "MIXED")',
        bodystructure='(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23 NIL NIL NIL NIL)'
        '("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff")'
        ' "<960723163407.20117h@cac.washington.edu>" "Compiled diff" "BASE64" 4554 73 NIL NIL NIL NIL)'
        ' "MIXED" ("BOUNDARY" "cac") NIL NIL NIL)',
        sections={"1": filler(1152, 23), "2": filler(4554, 73, width=60)},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_table(name):
    case = CASES[name]
    data = case["data"]
    info = scan(data)
    check_invariants(info, data)
    if "bodystructure" in case:
        assert bodystructure(info) == case["bodystructure"]
    if "body" in case:
        assert bodystructure(info, extended=False) == case["body"]
    assert envelope_text(info) == case.get("envelope", envelope_text(info))
    for spec, expected in case["sections"].items():
        assert sliced(data, info, spec) == expected, spec


@pytest.mark.parametrize("name", [n for n in CASES if len(CASES[n]["data"]) < 2000])
def test_table_every_split_and_bytewise(name):
    data = CASES[name]["data"]
    whole = scan(data)
    for cut in range(len(data) + 1):
        assert feed_split(data, [cut]) == whole, cut
    scanner = Scanner()
    for k in range(len(data)):
        scanner.feed(data[k : k + 1])
    assert scanner.finish() == whole


def test_rfc_bodystructure_example_text_is_verbatim():
    info = scan(RFC_BODYSTRUCTURE)
    # RFC 3501 §7.4.2, the BODYSTRUCTURE example, character for character.
    rfc = (
        '(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME"'
        ' "cc.diff") "<960723163407.20117h@cac.washington.edu>" "Compiled diff" "BASE64" 4554 73) "MIXED")'
    )
    assert bodystructure(info, extended=False) == rfc


# ---------------------------------------------------------------------------
# structure details


def test_multipart_offsets_and_crlf_ownership():
    info = scan(ALTERNATIVE)
    top = info.part
    assert (top.type, top.subtype, top.param("BOUNDARY")) == ("multipart", "alternative", "==alt==")
    text, html = top.children
    # the CRLF before "--==alt==" belongs to the boundary, so part 1 keeps one CRLF (its blank line's).
    assert ALTERNATIVE[text.end : text.end + 11] == b"\r\n--==alt=="
    assert ALTERNATIVE[html.end : html.end + 13] == b"\r\n--==alt==--"
    # preamble and epilogue are in the multipart's body but in no part
    assert top.body_offset < text.header_offset and html.end < top.end
    assert ALTERNATIVE[top.body_offset : text.header_offset].startswith(b"This is a multi-part")
    assert ALTERNATIVE[html.end :].endswith(b"epilogue\r\n")


def test_header_interrupted_by_boundary_gives_its_newline_to_the_boundary():
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/html\r\n--b--\r\n"
    part = scan(data).part.children[0]
    assert data[part.header_offset : part.body_offset] == b"Content-Type: text/html"
    assert (part.type, part.subtype, part.body_size, part.lines) == ("text", "html", 0, 0)


def test_empty_part_body_keeps_its_blank_line_in_the_header():
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n--b--\r\n"
    part = scan(data).part.children[0]
    assert data[part.header_offset : part.body_offset] == b"Content-Type: text/html\r\n\r\n"
    assert part.body_size == 0


def test_outer_boundary_closes_unterminated_inner_parts():
    data = (
        b"Content-Type: multipart/mixed; boundary=o\r\n\r\n"
        b"--o\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n"
        b"--i\r\n\r\ninner, never closed\r\n"
        b"--o\r\n\r\nsecond\r\n--o--\r\n"
    )
    info = scan(data)
    first, second = info.part.children
    assert first.is_multipart and len(first.children) == 1
    assert sliced(data, info, "1.1") == b"inner, never closed"
    assert sliced(data, info, "2") == b"second"


def test_close_delimiter_then_epilogue_lines_that_look_like_boundaries():
    data = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\n\r\none\r\n--b--\r\n--b\r\n\r\nnot a part\r\n"
    )
    info = scan(data)
    assert len(info.part.children) == 1
    assert sliced(data, info, "1") == b"one"


def test_boundary_line_with_trailing_junk_and_blanks():
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b  \r\n\r\none\r\n--b-- junk\r\nepilogue"
    info = scan(data)
    assert [sliced(data, info, "1")] == [b"one"]


def test_multipart_without_any_part_renders_one_empty_text_part():
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\nno boundary line at all\r\n"
    info = scan(data)
    assert info.part.children == ()
    assert bodystructure(info, extended=False) == (
        '(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 0 0) "MIXED")'
    )
    assert section(info, "1") is None


@pytest.mark.parametrize(
    "content_type",
    [b"text", b"/plain", b"text/", b"text/plain/x", b";;;", b"te xt/plain", b"multipart/mixed",
     b'multipart/mixed; boundary=""', b"multipart/mixed; boundary=" + b"x" * 999, b"\xff/\xfe"],
)
def test_bad_content_type_becomes_text_plain(content_type):
    data = b"Content-Type: " + content_type + b"\r\n\r\n--x\r\nbody\r\n"
    part = scan(data).part
    assert (part.type, part.subtype, part.params, part.children) == ("text", "plain", (("charset", "us-ascii"),), ())
    assert part.body_size == len(b"--x\r\nbody\r\n")


def test_content_type_parameters():
    data = (
        b"Content-Type: Text/HTML (comment) ; Format=flowed; name=\"a \\\"q\\\"; b.txt\";"
        b" title*0*=us-ascii'en'This%20is; title*1*=%20fun; title*2=\" 100%\"; FORMAT=second\r\n\r\n"
    )
    part = scan(data).part
    assert (part.type, part.subtype) == ("text", "html")
    assert part.params == (
        ("charset", "us-ascii"),
        ("format", "flowed"),
        ("name", 'a "q"; b.txt'),
        ("title*", "us-ascii'en'This%20is%20fun%20100%25"),
    )


def test_unquoted_boundary_with_equals_and_missing_semicolon_space():
    data = (
        b"Content-Type: multipart/mixed;boundary=----=_Part_0_1.2\r\n\r\n"
        b"------=_Part_0_1.2\r\n\r\nx\r\n------=_Part_0_1.2--\r\n"
    )
    info = scan(data)
    assert info.part.param("boundary") == "----=_Part_0_1.2"
    assert sliced(data, info, "1") == b"x"


def test_transfer_encoding_disposition_and_defaults():
    data = (
        b"Content-Type: image/gif\r\nContent-Transfer-Encoding: Base64 (yes)\r\n"
        b"Content-Disposition: INLINE\r\nContent-Language: (none) en-US\r\n\r\nR0lG"
    )
    part = scan(data).part
    assert (part.encoding, part.disposition, part.disposition_params, part.language) == (
        "base64", "inline", (), ("en-US",))
    assert scan(b"\r\n").part.encoding == "7bit"
    assert scan(b"Content-Transfer-Encoding: \r\n\r\n").part.encoding == "7bit"


def test_no_blank_line_all_header_and_no_header_at_all():
    info = scan(b"Subject: only headers\r\nFrom: x@y")
    assert info.part.header_size == len(b"Subject: only headers\r\nFrom: x@y") and info.part.body_size == 0
    assert info.envelope.subject == "only headers"
    assert info.envelope.from_ == (Address(None, None, "x", "y"),)
    data = b"no header here\r\nsecond\r\n"
    info = scan(data)
    assert (info.part.header_size, info.part.body_size, info.part.lines) == (0, len(data), 2)


def test_continuation_lines_unfold_and_first_field_wins():
    data = b"Subject: one\r\n two\r\n\tthree\r\nSubject: ignored\r\nX-Other: a\r\n b\r\n\r\n"
    assert scan(data).envelope.subject == "one two\tthree"


def test_whitespace_before_colon_and_odd_field_names_are_header_lines():
    data = b"Subject : spaced\r\nX-\xc3\xa9t\xc3\xa9: 8bit name\r\n\r\nbody"
    info = scan(data)
    assert info.envelope.subject == "spaced"
    assert sliced(data, info, "TEXT") == b"body"


def test_empty_data():
    info = scan(b"")
    assert (info.size, info.part.header_size, info.part.body_size) == (0, 0, 0)
    assert envelope_text(info) == "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert section(info, "") == (0, 0)


def test_message_rfc822_without_body_still_has_envelope_and_part():
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n--b--\r\n"
    info = scan(data)
    inner = info.part.children[0]
    assert inner.message is not None and inner.envelope == Envelope()
    assert '"MESSAGE" "RFC822" NIL NIL NIL "7BIT" 0 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)' in bodystructure(info)


def test_message_global_is_encapsulated_too():
    data = b"Content-Type: message/global\r\n\r\nSubject: inner\r\n\r\nhi"
    info = scan(data)
    assert info.part.envelope.subject == "inner"
    assert sliced(data, info, "1.TEXT") == b"hi"
    assert sliced(data, info, "1.1") == b"hi"


# ---------------------------------------------------------------------------
# ENVELOPE details and SEARCH keys


def test_envelope_reply_to_and_sender_default_to_from():
    info = scan(b"From: A <a@x>\r\nSender:\r\n\r\n")
    assert info.envelope.sender == info.envelope.reply_to == info.envelope.from_ == (Address("A", None, "a", "x"),)


@pytest.mark.parametrize(
    "header, expected",
    [
        ("John Q. Public <jqp@example.com>", [("John Q. Public", None, "jqp", "example.com")]),
        ('"Giant; \\"Big\\" Box" <sysservices@example.net>',
         [('Giant; "Big" Box', None, "sysservices", "example.net")]),
        ("jdoe@machine.example (John Doe)", [("John Doe", None, "jdoe", "machine.example")]),
        ("Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>",
         [("Pete", None, "pete", "silly.test")]),
        ('"john doe"@example.com', [(None, None, '"john doe"', "example.com")]),
        ("John Doe john@example.com", [("John Doe", None, "john", "example.com")]),
        ("postmaster", [(None, None, "postmaster", "")]),
        ("<>", [(None, None, "", "")]),
        ("a@[192.0.2.1], <b@c", [(None, None, "a", "[192.0.2.1]"), (None, None, "b", "c")]),
        ("Group: a@b", [(None, None, "Group", None), (None, None, "a", "b"), (None, None, None, None)]),
        ("A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;",
         [(None, None, "A Group", None), ("Ed Jones", None, "c", "a.test"), (None, None, "joe", "where.test"),
          ("John", None, "jdoe", "one.test"), (None, None, None, None)]),
        (",,,", None),
        ("", None),
    ],
)
def test_address_parsing(header, expected):
    info = scan(b"To: " + header.encode() + b"\r\n\r\n")
    assert info.envelope.to == (None if expected is None else tuple(Address(*a) for a in expected))


def test_search_keys_are_decoded_and_lower_cased():
    info = scan(ENCODED)
    assert info.search.subject == "if you can read this you understand the example."
    assert info.search.from_ == "keld jørn simonsen <keld@dkuug.dk>"
    assert info.search.to == "keith moore <moore@cs.utk.edu>"
    assert info.search.cc == "andré pirard <pirard@vm1.ulg.ac.be>"
    assert info.search.bcc == ""


def test_search_date_is_utc_with_the_senders_zone():
    info = scan(SIMPLE)
    expected = datetime.datetime(1994, 2, 8, 5, 52, 25, tzinfo=datetime.timezone.utc).timestamp()
    assert (info.search.date, info.search.date_tz) == (expected, -480)
    assert info.search.message_id == "<B27397-0100000@Blurdybloop.example>"
    for bad in (b"yesterday", b"Mon, 45 Foo 2000 10:00:00 +0000", b"", b"31 Feb 99999999999 00:00 +0000"):
        assert scan(b"Date: " + bad + b"\r\n\r\n").search.date is None
    no_zone = scan(b"Date: 1 Jan 2000 00:00:00 -0000\r\n\r\n").search
    assert (no_zone.date, no_zone.date_tz) == (946684800, 0)


def test_undecodable_encoded_words_stay_as_written():
    info = scan(b"Subject: =?x-unknown?q?caf=E9?= =?utf-8?b?###?= =?utf-8?q?ok?=\r\n\r\n")
    assert info.search.subject == "caf\ufffd =?utf-8?b?###?= ok"


def test_eight_bit_headers_round_trip_exactly_as_literals():
    utf8 = "Subject: Grüße\r\nFrom: Jörg <joerg@example.de>\r\n\r\nx".encode()
    info = scan(utf8)
    assert info.envelope.subject == "Grüße" and info.search.subject == "grüße"
    text = envelope_text(info)
    assert text.startswith("(NIL {7}\r\nGrüße (({5}\r\nJörg NIL \"joerg\" \"example.de\"))")
    assert envelope_text(info, utf8=True).startswith('(NIL "Grüße" (("Jörg" NIL "joerg" "example.de"))')
    latin1 = b"Subject: Gr\xfc\xdfe\r\n\r\n"
    info = scan(latin1)
    assert info.search.subject == "grüße"
    wire = envelope_text(info, utf8=True).encode("utf-8", "surrogateescape")
    assert wire.startswith(b"(NIL {5}\r\nGr\xfc\xdfe NIL")  # not valid UTF-8: a literal even with utf8=True
    assert from_json(to_json(info)) == info


def test_string_quoting_rules():
    info = scan(b'Subject: say "hi" \\o/\r\nIn-Reply-To: a\rb\r\nMessage-ID: <\x00>\r\n\r\n')
    text = envelope_text(info)
    assert '"say \\"hi\\" \\\\o/"' in text
    assert "{3}\r\na\rb" in text
    assert "{5}\r\n<\ufffd>" in text


# ---------------------------------------------------------------------------
# section syntax


@pytest.mark.parametrize("spec", ["0", "1.0", "01", "MIME", "FOO", "1.FOO", "1..2", "HEADER.1", "1.MIME.2", "١"])
def test_section_syntax_errors(spec):
    with pytest.raises(MailError) as caught:
        section(scan(SIMPLE), spec)
    assert caught.value.kind is ErrorKind.INVALID


def test_section_is_case_insensitive():
    info = scan(FORWARD)
    assert section(info, "2.header") == section(info, "2.HEADER")
    assert section(info, "text") == section(info, "TEXT")


# ---------------------------------------------------------------------------
# limits and bounded memory


def test_max_header_edge():
    line = b"Subject: " + b"s" * 40 + b"\r\n"  # 51 octets
    data = line + b"From: a@b\r\n\r\nbody"
    exact = scan(data, max_header=len(line) + 11)
    assert exact.envelope.subject == "s" * 40 and exact.envelope.from_ == (Address(None, None, "a", "b"),)
    over = scan(data, max_header=len(line) + 10)
    assert over.envelope.subject == "s" * 40 and over.envelope.from_ is None
    assert over.part.header_size == exact.part.header_size == len(data) - 4
    tiny = scan(data, max_header=10)
    assert tiny.envelope.subject is None and sliced(data, tiny, "TEXT") == b"body"
    for cut in range(len(data) + 1):
        assert feed_split(data, [cut], max_header=len(line) + 10) == over


def test_max_depth_turns_deep_structure_into_octet_stream():
    depth = 6
    data = b""
    for level in range(depth):
        data += b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
    data += b"\r\nleaf\r\n"
    info = scan(data, max_depth=3)
    part = info.part
    for _ in range(3):
        assert part.is_multipart
        part = part.children[0]
    assert (part.type, part.subtype, part.params, part.children) == ("application", "octet-stream", (), ())
    check_invariants(info, data)
    deep = b"Content-Type: message/rfc822\r\n\r\n" * 500 + b"x"
    info = scan(deep)  # default MAX_DEPTH = 100: rendering and JSON stay far from the recursion limit
    check_invariants(info, deep)


def test_max_parts_caps_the_tree():
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 50 + b"--b--\r\n"
    info = scan(data, max_parts=10)
    assert len(info.part.children) == 9  # the top entity counts as one
    assert sliced(data, info, "9").startswith(b"x\r\n--b\r\n")
    check_invariants(info, data)


def test_memory_stays_bounded_for_huge_bodies_and_lines():
    chunk = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" * 2 + b"\r\n") * 1000
    head = b"Content-Type: multipart/mixed; boundary=big\r\n\r\n--big\r\nContent-Type: application/zip\r\n\r\n"
    long_line = b"x" * 60_000
    long_header = b"h" * 10_000
    tracemalloc.start()
    try:
        scanner = Scanner(max_header=4096)
        scanner.feed(head)
        for _ in range(150):  # ~11 MB of body
            scanner.feed(chunk)
        for _ in range(50):  # one 3 MB line
            scanner.feed(long_line)
        scanner.feed(b"\r\n--big\r\nSubject: ")  # a 1 MB header line, past max_header
        for _ in range(100):
            scanner.feed(long_header)
        scanner.feed(b"\r\n\r\ntail\r\n--big--\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    info = scanner.finish()
    assert peak < 300_000  # about one 74 KB chunk plus the scanner, never the body
    assert len(info.part.children) == 2
    assert info.part.children[0].body_size == 150 * len(chunk) + 3_000_000
    assert info.part.children[1].header_size == len(b"Subject: ") + 1_000_000 + 4
    assert info.part.children[0].lines == 150 * 1000


def test_scanner_contract():
    scanner = Scanner()
    scanner.feed(SIMPLE)
    first = scanner.finish()
    assert scanner.finish() is first
    with pytest.raises(LocalProtocolError):
        scanner.feed(b"more")
    assert scan(memoryview(SIMPLE)) == scan(bytearray(SIMPLE)) == first


# ---------------------------------------------------------------------------
# JSON


@pytest.mark.parametrize("name", list(CASES))
def test_json_round_trip(name):
    info = scan(CASES[name]["data"])
    text = to_json(info)
    assert from_json(text) == info and from_json(text.encode()) == info
    assert bodystructure(from_json(text)) == bodystructure(info)


@pytest.mark.parametrize("text", ["", "[]", "{}", "[2,0,null,null,null]", "[1,0,[],[],[]]", "nope", "[1,2,3,4,5]"])
def test_json_damage_is_corrupt(text):
    with pytest.raises(MailError) as caught:
        from_json(text)
    assert caught.value.kind is ErrorKind.CORRUPT


# ---------------------------------------------------------------------------
# hypothesis: never raise; incremental == whole for any split

FRAGMENTS = [
    b"\r\n", b"\n", b"\r", b"--", b"--b", b"--b--", b"--bc", b"--c", b"--c--", b" ", b"\t", b"x", b":", b"\x00",
    b"\xff", b"Content-Type: multipart/mixed; boundary=b", b"Content-Type: multipart/digest; boundary=c",
    b"Content-Type: multipart/alternative; boundary=bc", b"Content-Type: message/rfc822",
    b"Content-Type: message/global", b"Content-Type: text/plain", b"From: a@b", b"Subject: =?utf-8?q?x?=",
    b"To: g: a, <b@c>;", b"Date: 1 Jan 2000 00:00 +0100",
]
structured = st.lists(st.sampled_from(FRAGMENTS), max_size=80).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=600), structured)
LIMITS = [{}, {"max_header": 24, "max_depth": 3, "max_parts": 6}]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_bytes, limits=st.sampled_from(LIMITS))
def test_fuzz_never_raises_and_invariants_hold(data, limits):
    info = scan(data, **limits)
    check_invariants(info, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_incremental_equals_whole(draw):
    data = draw.draw(any_bytes)
    limits = draw.draw(st.sampled_from(LIMITS))
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=8))
    assert feed_split(data, cuts, **limits) == scan(data, **limits)


# Generated MIME trees: we know every leaf's body, so the scan is checked against the truth.

leaf_lines = st.lists(st.text("abc xyz=.;<>", max_size=12).map(str.encode), max_size=4)


def _trees():
    leaf = st.tuples(st.just("leaf"), st.sampled_from([None, b"text/plain; charset=utf-8", b"image/png"]), leaf_lines)
    return st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.tuples(st.just("multi"), st.lists(kids, min_size=1, max_size=3), leaf_lines, leaf_lines, st.booleans()),
            st.tuples(st.just("message"), kids),
        ),
        max_leaves=8,
    )


class _Builder:
    def __init__(self, nl: bytes):
        self.nl = nl
        self.count = 0

    def entity(self, node, extra_header: bool) -> tuple[bytes, object]:
        """Serialise ``node``; return (bytes, expectation) where leaves expect their body bytes."""
        nl = self.nl
        headers = [b"Subject: generated"] if extra_header else []
        kind = node[0]
        if kind == "leaf":
            if node[1] is not None:
                headers.append(b"Content-Type: " + node[1])
            body = nl.join(node[2])
            expect = ("leaf", body)
        elif kind == "message":
            headers.append(b"Content-Type: message/rfc822")
            body, inner = self.entity(node[1], extra_header=True)
            expect = ("message", inner)
        else:
            _, children, preamble, epilogue, closed = node
            self.count += 1
            boundary = b"=_%d_=" % self.count
            headers.append(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"')
            body = nl.join(preamble)
            expects = []
            for child in children:
                child_bytes, child_expect = self.entity(child, extra_header=False)
                body += (nl if body else b"") + b"--" + boundary + nl + child_bytes
                expects.append(child_expect)
            if closed:
                body += nl + b"--" + boundary + b"--"
                if epilogue:
                    body += nl + nl.join(epilogue)
            expect = ("multi", expects)
        return b"".join(h + nl for h in headers) + nl + body, expect


def _check_tree(data: bytes, part: Part, expect) -> None:
    kind = expect[0]
    if kind == "leaf":
        assert not part.is_multipart and part.message is None
        assert data[part.body_offset : part.end] == expect[1]
    elif kind == "message":
        assert part.message is not None
        _check_tree(data, part.message, expect[1])
    else:
        assert part.is_multipart and len(part.children) == len(expect[1])
        for child, child_expect in zip(part.children, expect[1], strict=True):
            _check_tree(data, child, child_expect)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees(), nl=st.sampled_from([b"\r\n", b"\n"]), draw=st.data())
def test_generated_mime_trees(tree, nl, draw):
    data, expect = _Builder(nl).entity(tree, extra_header=True)
    info = scan(data)
    _check_tree(data, info.part, expect)
    check_invariants(info, data)
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=6))
    assert feed_split(data, cuts) == info


# ---------------------------------------------------------------------------
# throughput (printed, not asserted)


def ten_kb_multipart() -> bytes:
    head = b"".join(
        b"Received: from mx%d.example.net (mx%d.example.net [192.0.2.%d]) by mail.example.com"
        b" with ESMTPS id ABC%d for <bob@example.com>; Tue, 1 Jan 2002 10:00:0%d +0000\r\n" % (k, k, k, k, k)
        for k in range(4)
    ) + (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sel; h=from:to:subject:date;\r\n"
        b" bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=" + b"A" * 300 + b"\r\n"
        b"From: \"Alice Example\" <alice@example.net>\r\n"
        b"To: Bob <bob@example.com>, carol@example.com\r\n"
        b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.de>\r\n"
        b"Subject: =?utf-8?q?Quarterly_report_=E2=80=94_draft?=\r\n"
        b"Date: Tue, 1 Jan 2002 10:00:00 +0100\r\n"
        b"Message-ID: <20020101100000.12345@example.net>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="----=_Part_1"\r\n\r\n'
    )
    text = b"Hello Bob, please find the report attached.\r\n" * 60
    html = b"<p>Hello Bob, please find the report attached.</p>\r\n" * 50
    attachment = b"JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSL0Zp\r\n" * 50
    return (
        head
        + b'------=_Part_1\r\nContent-Type: multipart/alternative; boundary="----=_Part_2"\r\n\r\n'
        + b"------=_Part_2\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        + text + b"\r\n------=_Part_2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        + html + b"\r\n------=_Part_2--\r\n\r\n------=_Part_1\r\n"
        + b'Content-Type: application/pdf; name="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
        + b'Content-Disposition: attachment; filename="report.pdf"\r\n\r\n'
        + attachment + b"\r\n------=_Part_1--\r\n"
    )


def test_throughput_print(capsys):
    data = ten_kb_multipart()
    info = scan(data)
    check_invariants(info, data)
    assert [c.subtype for c in info.part.children] == ["alternative", "pdf"]
    rounds = 500
    start = time.perf_counter()
    for _ in range(rounds):
        scan(data)
    per_message = (time.perf_counter() - start) / rounds * 1e6
    start = time.perf_counter()
    for _ in range(rounds):
        to_json(info)
        bodystructure(info)
        envelope_text(info)
    per_render = (time.perf_counter() - start) / rounds * 1e6
    with capsys.disabled():
        print(f"\n[mime] scan of a {len(data)} B multipart: {per_message:.0f} us/message;"
              f" to_json + BODYSTRUCTURE + ENVELOPE: {per_render:.0f} us")
