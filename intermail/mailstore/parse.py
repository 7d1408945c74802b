"""What the store keeps of a message besides its bytes: the scan of :mod:`.mime`, as stored.

Owns the one call the store makes at delivery and append: scan the message
once, and return the JSON the index keeps (FETCH renders ENVELOPE and
BODYSTRUCTURE and finds section offsets from it, never re-parsing) and the
search columns.

Logs: nothing.
"""

from __future__ import annotations

from typing import Any

from intermail.mailstore import mime


def parse_message(data: bytes) -> tuple[str, dict[str, Any]]:
    """(info JSON, search columns) for ``data``; never raises for malformed mail."""
    info = mime.scan(data)
    s = info.search
    # SENT* compare the header's own calendar day (RFC 3501 §6.4.4): keep its
    # wall-clock time (UTC plus the header's zone), so day arithmetic in UTC works.
    sent = None if s.date is None else s.date + 60 * (s.date_tz or 0)
    search = {"from": s.from_, "to": s.to, "cc": s.cc, "bcc": s.bcc, "subject": s.subject,
              "message_id": (s.message_id or "").lower(), "date": sent}
    return mime.to_json(info), search
