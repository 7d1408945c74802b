"""intermail.queue.bounce: delivery status notifications (RFC 3464, 3461, 3463, 6522, 6533)."""

from __future__ import annotations

import email
import email.policy
import quopri
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intermail.queue import bounce
from intermail.queue.bounce import FailedRecipient, build_dsn
from intermail.errors import ErrorKind, MailError

NOW = 1_700_000_000.0
ARRIVAL = NOW - 3600
SEED = b"test-seed"

ORIGINAL = (
    b"Received: from client.example.com by mx1.example.net\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"\r\n"
    b"Shall we meet at noon?\r\n"
)
ORIGINAL_HEADER = ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def failed(address="bob@example.org", **kw) -> FailedRecipient:
    kw.setdefault("status", "5.1.1")
    kw.setdefault("diagnostic", "smtp; 550 5.1.1 <bob@example.org>: No such user")
    return FailedRecipient(address, **kw)


def dsn(recipients=None, **kw) -> bytes | None:
    args = dict(
        reporting_mta="mx1.example.net",
        sender="alice@example.com",
        recipients=[failed()] if recipients is None else recipients,
        original=ORIGINAL,
        queue_id="0ABCDEFGHJKMNPQRSTVW",
        arrival=ARRIVAL,
        now=NOW,
        seed=SEED,
        message_id_domain="example.net",
    )
    args.update(kw)
    return build_dsn(**args)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def raw_parts(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (header, content) octets of each top-level part, split on the boundary."""
    boundary = parse(data).get_boundary().encode("ascii")
    body = data.split(b"\r\n\r\n", 1)[1]
    chunks = body.split(b"\r\n--" + boundary)
    assert chunks[-1] == b"--\r\n"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, sep, content = chunk[2:].partition(b"\r\n\r\n")
        assert sep
        parts.append((head + b"\r\n", content))
    return parts


def top_header(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def report_blocks(data: bytes) -> list[dict[str, str]]:
    """The report's blocks as {field: unfolded value}, in order."""
    content = raw_parts(data)[1][1].decode("utf-8")
    blocks = []
    for block in content.split("\r\n\r\n"):
        unfolded = block.replace("\r\n ", " ")
        fields = {}
        for line in unfolded.split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                assert name not in fields
                fields[name] = value.strip()
        blocks.append(fields)
    return blocks


def field_names(data: bytes, block: int) -> list[str]:
    content = raw_parts(data)[1][1].decode("utf-8")
    lines = content.split("\r\n\r\n")[block].split("\r\n")
    return [line.split(":", 1)[0] for line in lines if line and not line.startswith(" ")]


def explanation(data: bytes) -> str:
    return parse(data).get_payload()[0].get_content()


def assert_wire_safe(data: bytes) -> None:
    """CRLF line ends only, every line within 998 octets (RFC 5322 §2.1.1)."""
    assert data.endswith(b"\r\n")
    stripped = data.replace(b"\r\n", b"")
    assert b"\r" not in stripped and b"\n" not in stripped
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


# ---------------------------------------------------------------------------
# Structure and every field


def test_structure_and_top_level_header():
    out = dsn()
    assert_wire_safe(out)
    msg = parse(out)
    assert msg.defects == []
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx1.example.net>"
    assert b"\r\nTo: <alice@example.com>\r\n" in top_header(out)
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    message_id = msg["Message-ID"]
    assert message_id.startswith("<0ABCDEFGHJKMNPQRSTVW.") and message_id.endswith("@example.net>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    kinds = [part.get_content_type() for part in msg.get_payload()]
    assert kinds == ["text/plain", "message/delivery-status", "message/rfc822"]
    assert top_header(out).isascii()
    assert all(len(line) <= 78 for line in top_header(out).split(b"\r\n"))
    for part in msg.walk():
        assert part.defects == []


def test_per_message_fields():
    out = dsn(envid="QQ314159")
    fields = report_blocks(out)[0]
    assert fields["Original-Envelope-Id"] == "QQ314159"
    assert fields["Reporting-MTA"] == "dns; mx1.example.net"
    assert parsedate_to_datetime(fields["Arrival-Date"]).timestamp() == ARRIVAL
    assert fields["X-Queue-Id"] == "0ABCDEFGHJKMNPQRSTVW"
    # RFC 3464 §2.2 order; extension fields last.
    assert field_names(out, 0) == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date", "X-Queue-Id"]
    assert "Original-Envelope-Id" not in report_blocks(dsn())[0]


def test_per_recipient_fields():
    rcpt = failed(
        original_recipient="rfc822;Bob@Example.ORG",
        remote_mta="mx.example.org",
        last_attempt=NOW - 10,
    )
    out = dsn([rcpt])
    blocks = report_blocks(out)
    assert len(blocks) == 2
    fields = blocks[1]
    assert fields == {
        "Original-Recipient": "rfc822;Bob@Example.ORG",
        "Final-Recipient": "rfc822; bob@example.org",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.org",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.org>: No such user",
        "Last-Attempt-Date": fields["Last-Attempt-Date"],
    }
    assert parsedate_to_datetime(fields["Last-Attempt-Date"]).timestamp() == NOW - 10
    # RFC 3464 §2.3 order.
    assert field_names(out, 1) == [
        "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
        "Diagnostic-Code", "Last-Attempt-Date",
    ]
    # Python's email reads the same fields out of message/delivery-status.
    report = parse(out).get_payload()[1]
    python_blocks = report.get_payload()
    assert python_blocks[0]["Reporting-MTA"] == "dns; mx1.example.net"
    assert python_blocks[1]["Status"] == "5.1.1"
    assert python_blocks[1]["Final-Recipient"] == "rfc822; bob@example.org"


def test_optional_recipient_fields_left_out():
    out = dsn([failed(diagnostic="")])
    assert report_blocks(out)[1] == {
        "Final-Recipient": "rfc822; bob@example.org", "Action": "failed", "Status": "5.1.1",
    }


def test_untyped_diagnostic_and_typed_remote_mta():
    out = dsn([failed(diagnostic="connection refused", remote_mta="dns; [192.0.2.7]")])
    fields = report_blocks(out)[1]
    assert fields["Diagnostic-Code"] == "X-Intermail; connection refused"
    assert fields["Remote-MTA"] == "dns; [192.0.2.7]"


def test_explanation_lists_recipients_and_diagnostics():
    rcpts = [failed(), failed("carol@example.org", status="5.2.2", diagnostic="smtp; 552 5.2.2 Mailbox full",
                              remote_mta="mx.example.org")]
    text = explanation(dsn(rcpts))
    assert "mx1.example.net" in text
    assert "<bob@example.org>" in text and "<carol@example.org>" in text
    assert "550 5.1.1 <bob@example.org>: No such user" in text
    assert "552 5.2.2 Mailbox full" in text
    assert "mx.example.org" in text
    assert "attached" in text
    assert all(len(line) <= 76 for line in text.splitlines())


# ---------------------------------------------------------------------------
# RET and the returned copy


def test_full_return_by_default():
    parts = raw_parts(dsn())
    assert b"Content-Type: message/rfc822\r\n" in parts[2][0]
    assert parts[2][1] == ORIGINAL
    inner = parse(dsn()).get_payload()[2].get_payload()[0]
    assert inner["Subject"] == "lunch"


def test_ret_full_and_hdrs():
    assert raw_parts(dsn(ret="FULL"))[2][1] == ORIGINAL
    out = dsn(ret="HDRS")
    head, content = raw_parts(out)[2]
    assert b"Content-Type: text/rfc822-headers\r\n" in head
    assert content == ORIGINAL_HEADER
    assert parse(out).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert "header of your message" in explanation(out)
    assert raw_parts(dsn(ret="hdrs"))[2][1] == ORIGINAL_HEADER  # keywords are case-insensitive


def test_size_limit_falls_back_to_headers():
    size = len(ORIGINAL)
    assert raw_parts(dsn(max_returned=size))[2][1] == ORIGINAL
    for ret in (None, "FULL"):
        out = dsn(max_returned=size - 1, ret=ret)
        head, content = raw_parts(out)[2]
        assert b"text/rfc822-headers" in head
        assert content == ORIGINAL_HEADER
        assert f"larger than {size - 1} octets" in explanation(out)


def test_size_counts_crlf_normalised_octets():
    lf_only = ORIGINAL.replace(b"\r\n", b"\n")
    assert raw_parts(dsn(original=lf_only, max_returned=len(ORIGINAL)))[2][1] == ORIGINAL
    out = dsn(original=lf_only, max_returned=len(lf_only))  # fits raw, not with CRLF
    assert raw_parts(out)[2][1] == ORIGINAL_HEADER


def test_header_only_copy_keeps_whole_fields_within_the_limit():
    budget = len(ORIGINAL_HEADER) - 1  # the last field no longer fits
    content = raw_parts(dsn(ret="HDRS", max_returned=budget))[2][1]
    fields = ORIGINAL_HEADER.split(b"\r\n")[:-1]
    assert content == b"".join(f + b"\r\n" for f in fields[:-1])
    folded = b"Subject: a\r\n very long\r\nTo: b@example.org\r\n\r\nbody\r\n"
    assert raw_parts(dsn(ret="HDRS", original=folded, max_returned=14))[2][1] == b""
    assert raw_parts(dsn(ret="HDRS", original=folded, max_returned=26))[2][1] == b"Subject: a\r\n very long\r\n"


def test_huge_original_returns_headers_without_reading_it_all():
    huge = ORIGINAL + b"x" * 10_000_000
    out = dsn(original=huge)
    assert raw_parts(out)[2][1] == ORIGINAL_HEADER
    assert len(out) < 10_000


def test_original_without_header_body_separator():
    no_body = b"Subject: only headers\r\nFrom: a@example.com"
    assert raw_parts(dsn(original=no_body))[2][1] == no_body
    assert raw_parts(dsn(original=no_body, ret="HDRS"))[2][1] == no_body + b"\r\n"
    # The header block ends at the first line that is no field.
    mixed = b"Subject: x\r\nthis is body text\r\nFrom: not a header\r\n"
    assert raw_parts(dsn(original=mixed, ret="HDRS"))[2][1] == b"Subject: x\r\n"
    body_only = b"hello\r\nworld\r\n"
    out = dsn(original=body_only, ret="HDRS")
    assert raw_parts(out)[2][1] == b""
    assert [p.get_content_type() for p in parse(out).get_payload()][2] == "text/rfc822-headers"
    assert raw_parts(dsn(original=b""))[2][1] == b""


def test_bare_line_ends_become_crlf():
    out = dsn(original=b"Subject: x\nFrom: y\r\rbody\rmore\n")
    assert_wire_safe(out)
    assert raw_parts(out)[2][1] == b"Subject: x\r\nFrom: y\r\n\r\nbody\r\nmore\r\n"


def test_original_with_8bit_octets():
    original = "Subject: caf\u00e9\r\nFrom: a@example.com\r\n\r\nGr\u00fc\u00dfe\r\n".encode("utf-8")
    out = dsn(original=original)
    assert_wire_safe(out)
    head, content = raw_parts(out)[2]
    assert content == original
    assert b"Content-Transfer-Encoding: 8bit" in head
    assert parse(out)["Content-Transfer-Encoding"] == "8bit"  # RFC 2045 §6.4
    assert top_header(out).isascii()
    assert raw_parts(out)[1][1].isascii()
    out = dsn(original=original, ret="HDRS")
    head, content = raw_parts(out)[2]
    assert content == "Subject: caf\u00e9\r\nFrom: a@example.com\r\n".encode("utf-8")
    assert b"Content-Transfer-Encoding: 8bit" in head
    latin1 = b"Subject: \xe9t\xe9\r\n\r\n\xff\xfe\x80\r\n"
    assert raw_parts(dsn(original=latin1))[2][1] == latin1


def test_nul_or_overlong_lines_are_not_returned_whole():
    for body in (b"a\0b\r\n", b"x" * 999 + b"\r\n"):
        out = dsn(original=b"Subject: s\r\n\r\n" + body)
        assert_wire_safe(out)
        assert raw_parts(out)[2][1] == b"Subject: s\r\n"
        assert "cannot be sent back" in explanation(out)
    assert raw_parts(dsn(original=b"Subject: s\r\n\r\n" + b"x" * 998 + b"\r\n"))[2][1].endswith(b"x" * 998 + b"\r\n")
    out = dsn(original=b"Subject: " + b"y" * 3000 + b"\0\r\n\r\nbody", ret="HDRS")
    assert_wire_safe(out)
    content = raw_parts(out)[2][1]
    assert b"\0" not in content
    assert content.replace(b"\r\n ", b"") == b"Subject: " + b"y" * 3000 + b"\r\n"


# ---------------------------------------------------------------------------
# Who gets a DSN at all


@pytest.mark.parametrize("sender", ["", "<>"])
def test_null_sender_gets_nothing(sender):
    assert dsn(sender=sender) is None
    assert dsn(sender=sender, recipients=[failed(action="delayed", status="4.4.1")]) is None


def test_notify_filters_recipients():
    assert dsn([failed(notify=frozenset({"NEVER"}))]) is None
    assert dsn([failed(notify=frozenset({"SUCCESS", "DELAY"}))]) is None
    assert dsn([failed(action="delayed", status="4.4.1", notify=frozenset({"FAILURE"}))]) is None
    # Default FAILURE,DELAY: no success reports.
    assert dsn([failed(action="delivered", status="2.0.0")]) is None
    assert dsn([failed(action="relayed", status="2.0.0")]) is None
    out = dsn([
        failed("a@example.org"),
        failed("b@example.org", notify=frozenset({"NEVER"})),
        failed("c@example.org", action="delayed", status="4.4.1"),
        failed("d@example.org", action="delivered", status="2.0.0"),
        failed("e@example.org", action="delivered", status="2.0.0", notify=frozenset({"success"})),
    ])
    finals = [b["Final-Recipient"] for b in report_blocks(out)[1:]]
    assert finals == ["rfc822; a@example.org", "rfc822; c@example.org", "rfc822; e@example.org"]
    assert "<b@example.org>" not in explanation(out) and "<d@example.org>" not in explanation(out)
    assert "<e@example.org>" in explanation(out)


def test_success_report_returns_headers_only():
    rcpt = failed(action="delivered", status="2.0.0", diagnostic="smtp; 250 2.0.0 OK",
                  notify=frozenset({"SUCCESS"}))
    out = dsn([rcpt], ret="FULL")
    msg = parse(out)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert report_blocks(out)[1]["Action"] == "delivered"
    assert raw_parts(out)[2][1] == ORIGINAL_HEADER  # RFC 3461 §4.3: RET is for failures


def test_mixed_delay_and_success_subject():
    out = dsn([failed(action="delayed", status="4.4.1"),
               failed("e@example.org", action="expanded", status="2.0.0", notify=frozenset({"SUCCESS"}))])
    assert parse(out)["Subject"] == "Delivery Status Notification"
    assert [b["Action"] for b in report_blocks(out)[1:]] == ["delayed", "expanded"]


@pytest.mark.parametrize("notify", [frozenset(), frozenset({"NEVER", "FAILURE"}), frozenset({"SOMETIMES"}),
                                    "FAILURE"])
def test_bad_notify_is_invalid(notify):
    with pytest.raises(MailError) as info:
        failed(notify=notify)
    assert info.value.kind is ErrorKind.INVALID


def test_multiple_recipients_keep_their_order():
    rcpts = [failed(f"user{i}@example.org", status=f"5.{i % 8}.1", diagnostic=f"smtp; 550 user{i} is gone")
             for i in range(12)]
    out = dsn(rcpts)
    blocks = report_blocks(out)[1:]
    assert [b["Final-Recipient"] for b in blocks] == [f"rfc822; user{i}@example.org" for i in range(12)]
    assert [b["Status"] for b in blocks] == [f"5.{i % 8}.1" for i in range(12)]
    text = explanation(out)
    assert all(f"user{i} is gone" in text for i in range(12))


def test_delayed_notice():
    rcpt = failed(action="delayed", status="4.4.1", diagnostic="smtp; 451 4.4.1 try again later",
                  last_attempt=NOW - 60, will_retry_until=NOW + 4 * 86400)
    out = dsn([rcpt])
    msg = parse(out)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    fields = report_blocks(out)[1]
    assert fields["Action"] == "delayed"
    assert fields["Status"] == "4.4.1"
    assert parsedate_to_datetime(fields["Will-Retry-Until"]).timestamp() == NOW + 4 * 86400
    assert field_names(out, 1)[-1] == "Will-Retry-Until"
    assert raw_parts(out)[2][1] == ORIGINAL_HEADER
    text = explanation(out)
    assert "keep trying" in text and "Retrying until" in text


def test_mixed_failed_and_delayed_is_a_bounce():
    out = dsn([failed(), failed("c@example.org", action="delayed", status="4.4.1")])
    assert parse(out)["Subject"] == "Undelivered Mail Returned to Sender"
    assert raw_parts(out)[2][1] == ORIGINAL
    # Will-Retry-Until belongs to delayed reports only.
    assert "Will-Retry-Until" not in report_blocks(dsn([failed(will_retry_until=NOW)]))[1]


# ---------------------------------------------------------------------------
# Line lengths, folding, escaping


def test_long_diagnostic_is_folded_at_spaces():
    words = " ".join(f"word{i}" for i in range(200))  # ~1300 characters, within max_diagnostic
    out = dsn([failed(diagnostic=f"smtp; 550-5.7.1 {words}", remote_mta="mx.example.org")])
    assert_wire_safe(out)
    report = raw_parts(out)[1][1]
    assert all(len(line) <= 78 for line in report.split(b"\r\n"))
    assert report_blocks(out)[1]["Diagnostic-Code"] == f"smtp; 550-5.7.1 {words}"
    assert all(len(line) <= 78 for line in top_header(out).split(b"\r\n"))


def test_unbreakable_diagnostic_is_cut_within_998():
    token = "z" * 1900
    out = dsn([failed(diagnostic=f"smtp; 550 {token}")])
    assert_wire_safe(out)
    value = report_blocks(out)[1]["Diagnostic-Code"]
    assert value.replace(" ", "") == f"smtp;550{token}"


def test_diagnostic_is_cut_at_max_diagnostic():
    out = dsn([failed(diagnostic="smtp; 550 " + "blah " * 2000)], max_diagnostic=100)
    value = report_blocks(out)[1]["Diagnostic-Code"]
    assert len(value) <= 100 and value.endswith("...")


def test_multiline_diagnostic_cannot_inject_fields():
    diagnostic = "smtp; 550-5.1.1 first\r\n550 5.1.1 second\r\nX-Injected: yes\n\rStatus: 2.0.0\x00\x0b"
    out = dsn([failed(diagnostic=diagnostic, remote_mta="mx\r\nX-Bad: 1")])
    assert_wire_safe(out)
    assert b"\r\nX-Injected" not in out and b"\r\nStatus: 2.0.0" not in out and b"\r\nX-Bad" not in out
    fields = report_blocks(out)[1]
    assert fields["Diagnostic-Code"] == "smtp; 550-5.1.1 first 550 5.1.1 second X-Injected: yes Status: 2.0.0"
    assert fields["Remote-MTA"] == "dns; mx X-Bad: 1"


def test_non_ascii_recipient_in_a_7bit_dsn():
    address = "j\u00f6rg+tag@b\u00fccher.example"
    rcpt = failed(address, diagnostic="smtp; 550 Benutzer unbekannt: j\u00f6rg", original_recipient=f"utf-8;{address}")
    out = dsn([rcpt])
    assert_wire_safe(out)
    assert top_header(out).isascii()
    report = raw_parts(out)[1][1]
    assert report.isascii()
    fields = report_blocks(out)[1]
    # RFC 6533 §3 utf-8-addr-xtext: non-ASCII, "+", "=", "\" as \x{HEX}
    assert fields["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}tag@b\\x{FC}cher.example"
    assert fields["Original-Recipient"] == "utf-8;j\\x{F6}rg\\x{2B}tag@b\\x{FC}cher.example"
    assert fields["Diagnostic-Code"] == "smtp; 550 Benutzer unbekannt: j\\x{F6}rg"
    head, body = raw_parts(out)[0]
    assert b"charset=utf-8" in head and b"quoted-printable" in head
    assert body.isascii()
    assert f"<{address}>" in quopri.decodestring(body).decode("utf-8")
    assert f"<{address}>" in explanation(out)


def test_quoted_addresses_keep_their_spaces():
    sender = '"john   doe"@example.com'
    out = dsn([failed(original_recipient='rfc822;"bob   the  builder"@example.org')], sender=sender)
    assert f"\r\nTo: <{sender}>\r\n".encode("ascii") in top_header(out)
    assert report_blocks(out)[1]["Original-Recipient"] == 'rfc822;"bob   the  builder"@example.org'


def test_xtext_escapes_astral_and_backslash():
    out = dsn([failed("\U0001f600\\=@example.org")])
    assert report_blocks(out)[1]["Final-Recipient"] == "utf-8; \\x{1F600}\\x{5C}\\x{3D}@example.org"


@pytest.mark.parametrize("orcpt", [
    "utf-8;j\u00f6rg+tag@example.org",  # utf-8-address (a plain Mailbox)
    "utf-8;j\u00f6rg\\x{2B}tag@example.org",  # utf-8-addr-unitext
    "utf-8;j\\x{F6}rg\\x{2B}tag@example.org",  # utf-8-addr-xtext
    "rfc822;j\u00f6rg+tag@example.org",  # not ASCII, so not really rfc822
])
def test_every_orcpt_form_comes_out_in_the_reports_form(orcpt):
    rcpt = failed("bob@example.org", original_recipient=orcpt)
    assert report_blocks(dsn([rcpt]))[1]["Original-Recipient"] == "utf-8;j\\x{F6}rg\\x{2B}tag@example.org"
    global_form = report_blocks(dsn([rcpt], smtputf8=True))[1]["Original-Recipient"]
    assert global_form == "utf-8;j\u00f6rg\\x{2B}tag@example.org"
    assert "Originally addressed to: j\u00f6rg+tag@example.org" in explanation(dsn([rcpt]))


def test_internationalized_dsn_for_smtputf8():
    sender = "\u00e5sa@exempel.example"
    address = "\u7528\u6237@\u4f8b\u5b50.example"
    original = f"From: <{sender}>\r\nTo: <{address}>\r\nSubject: \u4f60\u597d\r\n\r\nhi\r\n".encode("utf-8")
    rcpt = failed(address, diagnostic="smtp; 550 5.1.1 \u7528\u6237\u4e0d\u5b58\u5728")
    for out in (dsn([rcpt], sender=sender, original=original),
                dsn([rcpt], original=original, smtputf8=True)):
        assert_wire_safe(out)
        msg = parse(out)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "global-delivery-status"
        parts = raw_parts(out)
        assert b"Content-Type: message/global-delivery-status\r\n" in parts[1][0]
        assert b"Content-Transfer-Encoding: 8bit" in parts[1][0]
        fields = report_blocks(out)[1]
        assert fields["Final-Recipient"] == f"utf-8; {address}"
        assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 \u7528\u6237\u4e0d\u5b58\u5728"
        assert b"Content-Type: message/global\r\n" in parts[2][0]
        assert parts[2][1] == original
        assert f"<{address}>" in parts[0][1].decode("utf-8")
        assert msg["Content-Transfer-Encoding"] == "8bit"
    assert f"To: <{sender}>".encode("utf-8") in top_header(dsn([rcpt], sender=sender))
    hdrs = raw_parts(dsn([rcpt], original=original, smtputf8=True, ret="HDRS"))[2]
    assert b"Content-Type: message/global-headers\r\n" in hdrs[0]


# ---------------------------------------------------------------------------
# Determinism, boundary, Message-ID


def test_deterministic_with_now_and_seed():
    assert dsn() == dsn()
    other = dsn(seed=b"another seed")
    assert other != dsn()
    assert parse(other).get_boundary() != parse(dsn()).get_boundary()
    assert parse(other)["Message-ID"] != parse(dsn())["Message-ID"]
    randomised = {parse(dsn(seed=None))["Message-ID"] for _ in range(20)}
    assert len(randomised) == 20
    assert dsn(now=NOW + 1) != dsn()


def test_boundary_never_occurs_in_the_content():
    first = parse(dsn()).get_boundary()
    original = ORIGINAL + f"--{first}\r\n--{first}--\r\n{first}\r\n".encode("ascii")
    out = dsn(original=original)
    boundary = parse(out).get_boundary()
    assert boundary != first
    for _head, content in raw_parts(out):
        assert boundary.encode("ascii") not in content
    assert raw_parts(out)[2][1] == original


# ---------------------------------------------------------------------------
# Contract violations


@pytest.mark.parametrize("kw", [
    dict(status="5.1"), dict(status="3.1.1"), dict(status="5.1.1234"), dict(status=" 5.1.1"),
    dict(action="bounced"), dict(address=""), dict(address="bob@example.org\r\nX: y"),
    dict(address="a" * 300 + "@example.org"), dict(original_recipient="no-type"),
    dict(original_recipient=";x@y"), dict(original_recipient="rfc822;"), dict(last_attempt=float("nan")),
    dict(will_retry_until=1e300), dict(diagnostic=None),
])
def test_bad_recipient_is_invalid(kw):
    args = dict(address="bob@example.org", status="5.1.1", diagnostic="x")
    args.update(kw)
    with pytest.raises(MailError) as info:
        FailedRecipient(**args)
    assert info.value.kind is ErrorKind.INVALID


@pytest.mark.parametrize("kw", [
    dict(ret="NONE"), dict(envid="bad\r\nid"), dict(envid="x" * 101), dict(reporting_mta="not a host"),
    dict(message_id_domain=""), dict(queue_id="a b"), dict(queue_id=""), dict(sender="a@b\n"),
    dict(recipients=[]), dict(recipients=["bob@example.org"]), dict(original="text"),
    dict(max_returned=-1), dict(arrival=float("inf")), dict(now="now"),
])
def test_bad_arguments_are_invalid(kw):
    with pytest.raises(MailError) as info:
        dsn(**kw)
    assert info.value.kind is ErrorKind.INVALID


def test_action_and_notify_case_is_normalised():
    rcpt = failed(action="FAILED", notify=["failure", "Delay"])
    assert rcpt.action == "failed"
    assert rcpt.notify == frozenset({"FAILURE", "DELAY"})
    assert bounce.ACTIONS[0] == "failed"


# ---------------------------------------------------------------------------
# Fuzz: arbitrary originals and remote text never break the DSN

header_line = st.builds(
    lambda name, value: name + b": " + value,
    st.sampled_from([b"Subject", b"From", b"To", b"Content-Type", b"X-\xff", b"Bad Name"]),
    st.binary(max_size=120),
)
structured_original = st.builds(
    lambda headers, sep, body: sep.join(headers) + sep + sep + body,
    st.lists(header_line, max_size=6),
    st.sampled_from([b"\r\n", b"\n", b"\r"]),
    st.binary(max_size=400),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    original=st.one_of(st.binary(max_size=2000), structured_original),
    diagnostic=st.text(max_size=1500),
    remote_mta=st.one_of(st.none(), st.text(max_size=80)),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    max_returned=st.integers(min_value=0, max_value=3000),
    smtputf8=st.booleans(),
    action=st.sampled_from(["failed", "delayed"]),
    seed=st.binary(max_size=8),
)
def test_fuzz_always_a_parseable_report(original, diagnostic, remote_mta, ret, max_returned, smtputf8,
                                        action, seed):
    rcpt = FailedRecipient("bob@example.org", "5.0.0" if action == "failed" else "4.0.0", diagnostic,
                           action=action, remote_mta=remote_mta)
    out = dsn([rcpt], original=original, ret=ret, max_returned=max_returned, smtputf8=smtputf8, seed=seed)
    assert_wire_safe(out)
    msg = parse(out)
    assert msg.get_content_type() == "multipart/report"
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    kinds = [part.get_content_type() for part in parts]
    if smtputf8:
        assert kinds[:2] == ["text/plain", "message/global-delivery-status"]
        assert kinds[2] in ("message/global", "message/global-headers")
    else:
        assert kinds[:2] == ["text/plain", "message/delivery-status"]
        assert kinds[2] in ("message/rfc822", "text/rfc822-headers")
        assert top_header(out).isascii()
        assert raw_parts(out)[1][1].isascii()
        assert raw_parts(out)[0][1].isascii()
        assert all(len(line) <= 78 for line in top_header(out).split(b"\r\n"))
    raw = raw_parts(out)
    boundary = msg.get_boundary().encode("ascii")
    assert all(boundary not in content for _head, content in raw)
    copy = raw[2][1]
    assert len(copy) <= max_returned
    if kinds[2] in ("message/rfc822", "message/global"):
        assert copy == original.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    fields = report_blocks(out)[1]
    assert fields["Status"] == rcpt.status
