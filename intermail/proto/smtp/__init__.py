"""SMTP-family protocols, sans-I/O: the grammar, the replies and the LMTP server machine.

Owns the wire side of SMTP and LMTP (RFC 5321, RFC 2033) for intermail's own
servers: :mod:`.grammar` parses command lines (each regex beside the ABNF it
implements), :mod:`.replies` builds and parses reply lines and holds the
standard replies and the one ``ErrorKind`` -> reply table, and
:mod:`.lmtp_server` is the LMTP server machine the message stores (``mssN``)
speak to the MTAs.  The MTA's inbound SMTP front end is aiosmtpd, not this
package (LIBRARIES.md §1).

Invariants: like everything in :mod:`intermail.proto`, nothing here does I/O
or imports anything but the standard library, :mod:`intermail.errors` and
:mod:`intermail.ids`; addresses are returned as the client wrote them
(canonicalisation belongs to the directory's address layer).

Logs: nothing.
"""

from __future__ import annotations
