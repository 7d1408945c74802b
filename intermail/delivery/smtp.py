"""Remote delivery over SMTP: MX lookup, then aiosmtplib to the best host that answers.

Owns: the queue manager's ``smtp`` transport -- a domain's MX hosts in
preference order (RFC 5321 §5.1: no MX means the domain itself; a null MX
means the domain takes no mail), each host's addresses, opportunistic
STARTTLS, and turning what the remote server says into one reply per
recipient::

    transport = SmtpTransport(resolver, hostname="mta1.example.org")
    replies = await transport.deliver("remote.test", sender, ["a@remote.test"], data, queue_id)

Invariants:

- Only a remote reply decides a recipient: 2xx delivered, 5xx failed.
  Anything else -- no MX answer, no host reachable, a timeout, a dropped
  connection, a 4xx -- is temporary: ``TransientFailure`` (for all) or a 4xx
  per recipient, and the queue retries.
- A domain that does not exist (NXDOMAIN) fails its recipients with
  ``550 5.1.2``; a null MX with ``556 5.1.10`` (RFC 7505).
- Opportunistic TLS: STARTTLS when offered, without certificate checks
  (RFC 7435); a failed handshake is retried on a new connection without it
  (never in cleartext on the same connection).
- Only replies to MAIL, RCPT and DATA decide recipients; a refusal while
  setting up the session (greeting, EHLO -- with a HELO fallback) moves on
  to the next host.

Logs: ``delivery.smtp_host_failed`` (debug, per host tried).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import aiosmtplib

from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events
from intermail.queue.manager import Reply3, TransientFailure
from intermail.resolve import Resolver

__all__ = ["SmtpTransport"]

log = logging.getLogger("intermail.delivery.smtp")

register_events({"delivery.smtp_host_failed": "a remote MX host could not take a message (host, error)"})


def _opportunistic_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _reply(code: int, message: str) -> Reply3:
    text = (message or "").strip().replace("\r", " ").replace("\n", " ")
    status, _, rest = text.partition(" ")
    if len(status) >= 5 and status[0] in "245" and status[1] == ".":
        return Reply3(code, status, rest)
    return Reply3(code, "", text)


class SmtpTransport:
    """The ``smtp`` transport of the queue manager."""

    def __init__(self, resolver: Resolver, *, hostname: str, port: int = 25, connect_timeout: float = 30.0,
                 timeout: float = 600.0):
        self.resolver = resolver
        self.hostname = hostname
        self.port = port
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._tls = _opportunistic_context()

    async def _hosts(self, domain: str) -> list[str]:
        try:
            return [host for _, host in await self.resolver.mx(domain, allow_stale=True)]
        except MailError as exc:
            if exc.kind is ErrorKind.NOTFOUND:
                raise _Decided(Reply3(550, "5.1.2", f"domain {domain} does not exist")) from None
            if exc.kind is ErrorKind.PERM:
                raise _Decided(Reply3(556, "5.1.10", f"domain {domain} accepts no mail (null MX)")) from None
            raise TransientFailure(f"MX lookup for {domain} failed: {exc.safe}") from None

    async def deliver(self, destination: str, sender: str, recipients: Sequence[str], data: bytes,
                      key: str, params: dict | None = None) -> dict[str, Reply3]:
        params = params or {}
        options = (["SMTPUTF8"] if params.get("SMTPUTF8") else []) + (
            ["BODY=8BITMIME"] if params.get("BODY") == "8BITMIME" else [])
        try:
            hosts = await self._hosts(destination)
        except _Decided as decided:
            return {r: decided.reply for r in recipients}
        errors = []
        for host in hosts:
            try:
                addresses = (await self.resolver.addresses(host, allow_stale=True)).addresses
            except MailError as exc:
                errors.append(f"{host}: {exc.safe}")
                continue
            for address in addresses:
                for tls in (True, False):  # opportunistic: a failed handshake is retried in cleartext
                    try:
                        return await self._send(address, sender, recipients, data, options, tls)
                    except _TlsFailed as exc:
                        errors.append(f"{host} [{address}]: TLS failed: {exc}")
                        continue
                    except (OSError, TimeoutError, aiosmtplib.SMTPException, ssl.SSLError) as exc:
                        # Anything before MAIL (connect, greeting, EHLO/HELO) is this host's
                        # problem, not the message's: the next host is tried.
                        errors.append(f"{host} [{address}]: {type(exc).__name__}: {exc}")
                        log_event(log, "delivery.smtp_host_failed", level=logging.DEBUG, host=host,
                                  address=address, error=errors[-1])
                        break
        raise TransientFailure("; ".join(errors[-3:]) or f"no host for {destination}")

    async def _send(self, address: str, sender: str, recipients: Sequence[str], data: bytes,
                    options: list[str], tls: bool) -> dict[str, Reply3]:
        smtp = aiosmtplib.SMTP(hostname=address, port=self.port, local_hostname=self.hostname,
                               timeout=self.connect_timeout, start_tls=False, use_tls=False)
        await smtp.connect()
        try:
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError:
                await smtp.helo()  # RFC 5321 §4.1.4: an old server that knows only HELO
            if tls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(tls_context=self._tls)
                    await smtp.ehlo()
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    raise _TlsFailed(f"{type(exc).__name__}: {exc}") from None
            try:
                refused, _ = await smtp.sendmail(sender, list(recipients), data, mail_options=options,
                                                 timeout=self.timeout)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                return {e.recipient: _reply(e.code, e.message) for e in exc.recipients}
            except aiosmtplib.SMTPSenderRefused as exc:
                return {r: _reply(exc.code, exc.message) for r in recipients}
            except aiosmtplib.SMTPDataError as exc:
                return {r: _reply(exc.code, exc.message) for r in recipients}
            out = {r: Reply3(250, "2.0.0", f"accepted by {address}") for r in recipients}
            for r, response in refused.items():
                out[r] = _reply(response.code, response.message)
            return out
        finally:
            try:
                await smtp.quit()
            except (OSError, aiosmtplib.SMTPException):
                smtp.close()


class _TlsFailed(Exception):
    """STARTTLS was offered but failed: try the same host again without it."""


class _Decided(Exception):
    def __init__(self, reply: Reply3):
        super().__init__(str(reply))
        self.reply = reply
