"""What every access session shares: the configuration, the directory, the stores, TLS, metrics, logins.

Owns: :class:`AccessContext` (built once per access server by
:class:`intermail.apps.access.AccessApp`, handed to each session) and the
login policy both protocols follow (:class:`LoginGuard`):

- a login goes to the directory (``authenticate``), which verifies the
  password, throttles guessing per account and per client address, and
  says where the account's mail is (``Account.mss``);
- on one connection, after ``limits.auth_failures_before_delay`` failures
  each further failure is answered only after ``access.auth_failure_delay``
  seconds, and after ``access.max_auth_failures`` the connection is closed;
- without TLS a login is refused unless ``tls.auth_without_tls`` (the
  password would cross the network in clear).

Invariants: a password is never logged; the outcome a client sees is
"wrong credentials" for an unknown user and a bad password alike (the
directory makes them cost the same).

Logs: ``access.login`` (user, protocol, result) per attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from typing import Any

from intermail.config import Config
from intermail.directory.client import DirectoryClient
from intermail.directory.db import Account
from intermail.errors import ErrorKind, MailError
from intermail.log import log_event, register_events
from intermail.access.stores import StoreClients

__all__ = ["AccessContext", "LoginGuard", "LoginRefused"]

log = logging.getLogger("intermail.access")

register_events({
    "access.login": "a login attempt ended (user, protocol, result)",
})


@dataclasses.dataclass
class AccessContext:
    """One access server's shared parts, handed to every session."""

    config: Config
    directory: DirectoryClient
    stores: StoreClients
    instance: str = ""
    hostname: str = "localhost"
    tls_context: ssl.SSLContext | None = None
    metrics: Any = None  # the app's counters (AccessMetrics), or None in tests

    @property
    def login_needs_tls(self) -> bool:
        return not self.config.tls.auth_without_tls

    def count(self, name: str, *labels: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name, *labels)


class LoginRefused(Exception):
    """A login failed: ``kind`` says why (PERM: wrong credentials; UNAVAILABLE/TEMP: try later;
    LIMIT: throttled); ``close`` is True when the connection must end now."""

    def __init__(self, error: MailError, close: bool):
        super().__init__(error.safe)
        self.error = error
        self.close = close

    @property
    def kind(self) -> ErrorKind:
        return self.error.kind


class LoginGuard:
    """The login policy of one connection (see the module docstring)."""

    def __init__(self, ctx: AccessContext, protocol: str, peer_ip: str):
        self.ctx = ctx
        self.protocol = protocol
        self.peer_ip = peer_ip
        self.failures = 0

    async def login(self, user: str, password: str) -> Account:
        """The account, or :class:`LoginRefused` after the failure's delay."""
        try:
            account = await self.ctx.directory.authenticate(user, password, self.peer_ip)
        except MailError as exc:
            result = {ErrorKind.PERM: "refused", ErrorKind.LIMIT: "throttled",
                      ErrorKind.INVALID: "refused"}.get(exc.kind, "unavailable")
            log_event(log, "access.login", user=user[:256], protocol=self.protocol, result=result)
            self.ctx.count("logins", result)
            if result == "unavailable":
                raise LoginRefused(exc, close=False) from None
            self.failures += 1
            limits = self.ctx.config.limits
            if self.failures > limits.auth_failures_before_delay:
                await asyncio.sleep(self.ctx.config.access.auth_failure_delay)
            if exc.kind is ErrorKind.INVALID:
                exc = MailError(ErrorKind.PERM, safe="Authentication failed")
            raise LoginRefused(exc, close=self.failures >= self.ctx.config.access.max_auth_failures) from None
        log_event(log, "access.login", user=account.address, protocol=self.protocol, result="ok")
        self.ctx.count("logins", "ok")
        return account
