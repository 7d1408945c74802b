"""IMAP, sans-I/O: the grammar, the commands, the server machine and response rendering.

Owns the wire side of the access server's IMAP (RFC 9051 IMAP4rev2, RFC
3501 IMAP4rev1, and the extensions listed in :mod:`.commands`):
:mod:`.grammar` reads the tokens a command is made of (each regex beside
its ABNF), :mod:`.commands` holds one frozen dataclass per command and its
parser, :mod:`.server` is the machine that frames commands and their
literals and serializes responses, and :mod:`.render` renders response
data (strings, FETCH, LIST, STATUS, SEARCH).  Mailboxes, users, sessions
and the store are the access app's business, not this package's.

Invariants: like everything in :mod:`intermail.proto`, nothing here does
I/O or imports anything but the standard library, :mod:`intermail.errors`
and :mod:`intermail.ids`; the only exception a peer can cause is
``RemoteProtocolError`` (and the machine turns even those into events).

Logs: nothing.
"""

from __future__ import annotations
