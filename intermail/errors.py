"""The one error taxonomy of intermail.

Every failure that crosses a module boundary is a :class:`MailError` carrying
one :class:`ErrorKind`.  Protocol front ends map the kind to a reply in one
table per protocol (SMTP, LMTP, IMAP, POP3, RPC); the client only ever sees
the *safe* text, the log gets the *detail*.

Protocol machines additionally raise :class:`RemoteProtocolError` (the peer
sent something we cannot accept) and :class:`LocalProtocolError` (our own
code asked the machine to do something the protocol forbids).  The fuzz
invariant for every parser is: parse it, or raise ``RemoteProtocolError`` —
never anything else.

Logs: nothing; this module only defines types.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What went wrong, from the caller's point of view."""

    TEMP = "temp"  # transient: retry later may succeed
    UNAVAILABLE = "unavailable"  # a dependency (directory, store, mirror set) is down
    NOTFOUND = "notfound"  # the named thing does not exist
    EXISTS = "exists"  # the thing to create exists already
    PERM = "perm"  # permanent refusal: retrying will not help
    NOQUOTA = "noquota"  # over quota
    LIMIT = "limit"  # a configured limit was hit (size, count, rate)
    INVALID = "invalid"  # malformed request or argument
    FENCED = "fenced"  # this process lost ownership of a store (I-6)
    CORRUPT = "corrupt"  # stored data failed its checksum on every copy


_SAFE_TEXT = {
    ErrorKind.TEMP: "temporary failure, try again later",
    ErrorKind.UNAVAILABLE: "service temporarily unavailable",
    ErrorKind.NOTFOUND: "no such object",
    ErrorKind.EXISTS: "object already exists",
    ErrorKind.PERM: "request refused",
    ErrorKind.NOQUOTA: "quota exceeded",
    ErrorKind.LIMIT: "limit exceeded",
    ErrorKind.INVALID: "invalid request",
    ErrorKind.FENCED: "store ownership moved, try again later",
    ErrorKind.CORRUPT: "stored data damaged",
}


class MailError(Exception):
    """A failure of one kind, with a text safe for clients and a detail for logs."""

    def __init__(self, kind: ErrorKind, safe: str | None = None, detail: str | None = None):
        self.kind = kind
        self.safe = safe if safe is not None else _SAFE_TEXT[kind]
        self.detail = detail if detail is not None else self.safe
        super().__init__(f"{kind.value}: {self.detail}")

    @property
    def temporary(self) -> bool:
        return self.kind in (ErrorKind.TEMP, ErrorKind.UNAVAILABLE, ErrorKind.FENCED)


class FencedError(MailError):
    """This process no longer owns the store: it must stop writing and exit."""

    def __init__(self, detail: str):
        super().__init__(ErrorKind.FENCED, detail=detail)


class CorruptError(MailError):
    """Stored bytes failed verification and no good copy was found."""

    def __init__(self, detail: str):
        super().__init__(ErrorKind.CORRUPT, detail=detail)


class ProtocolError(Exception):
    """Base of the two protocol-machine errors; ``text`` is safe to send."""

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol. The only exception a parser may raise."""


class LocalProtocolError(ProtocolError):
    """Our own code drove a machine into a state the protocol forbids."""
