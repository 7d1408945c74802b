"""Outbound delivery transports of the MTA.

:mod:`.lmtp` delivers one message to a message store over LMTP (RFC 2033),
or to an SMTP server (a test sink), driving the sans-I/O client machine
:mod:`intermail.proto.smtp.client` with the shared pump
(:mod:`intermail.net.pump`).  The queue decides what to deliver where and
what a result means; this package only carries the message and reports, per
recipient, what the server answered.

Logs: nothing; results are returned for the queue manager to log.
"""

from __future__ import annotations
