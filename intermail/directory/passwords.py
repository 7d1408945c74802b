"""Password hashing for the directory: argon2id through argon2-cffi.

Owns how a password becomes a stored hash and how a candidate is checked.

Invariants:

- Hashes are argon2id PHC strings (``$argon2id$v=19$m=...``); the cost
  parameters live in the string, so raising them later only makes
  :meth:`PasswordHashing.needs_rehash` true for old hashes, which the caller
  re-hashes on the next successful login.
- :meth:`PasswordHashing.verify` returns a bool and never raises, whatever the
  stored string holds (empty, truncated, another algorithm): a damaged hash is
  a failed login, not a crash.  The comparison inside argon2 is constant-time.
- Hashing is deliberately slow (tens of ms, 64 MiB with the default profile),
  so the ``a``-prefixed coroutines run it in an executor: the event loop is
  never blocked by a login.

Defaults: ``argon2.profiles.RFC_9106_LOW_MEMORY`` (t=3, m=64 MiB, p=4); tests
pass ``argon2.profiles.CHEAPEST``.

Logs: nothing; the caller logs the outcome of an authentication.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from argon2 import PasswordHasher, Type, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import Parameters

from intermail.errors import ErrorKind, MailError

DEFAULT_PARAMETERS = profiles.RFC_9106_LOW_MEMORY
MAX_PASSWORD_BYTES = 1024  # bounds the work an attacker can ask of one login
MAX_HASH_CHARS = 512  # a PHC string is ~100 chars; anything far longer is not ours


class PasswordHashing:
    """argon2id hashing with one set of cost parameters."""

    def __init__(self, parameters: Parameters = DEFAULT_PARAMETERS,
                 executor: Executor | None = None):
        if parameters.type is not Type.ID:
            raise MailError(ErrorKind.INVALID, safe="password hashing must be argon2id")
        self._hasher = PasswordHasher.from_parameters(parameters)
        self._executor = executor  # None: the loop's default thread pool

    def hash(self, password: str) -> str:
        """The PHC string to store for ``password``; INVALID if it is unusable."""
        _check_password(password)
        return self._hasher.hash(password)

    def verify(self, stored_hash: str, password: str) -> bool:
        """True when ``password`` matches ``stored_hash``; never raises."""
        if not isinstance(stored_hash, str) or not isinstance(password, str):
            return False
        if len(stored_hash) > MAX_HASH_CHARS or len(password.encode("utf-8", "replace")) > MAX_PASSWORD_BYTES:
            return False
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        except Exception:  # argon2 reports some malformed strings as other errors
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when ``stored_hash`` was made with other parameters (or is unreadable)."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except Exception:
            return True

    async def ahash(self, password: str) -> str:
        """:meth:`hash` in the executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.hash, password)

    async def averify(self, stored_hash: str, password: str) -> bool:
        """:meth:`verify` in the executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.verify, stored_hash, password)


def _check_password(password: object) -> None:
    if not isinstance(password, str):
        raise MailError(ErrorKind.INVALID, safe="password must be text")
    if not password:
        raise MailError(ErrorKind.INVALID, safe="empty password")
    try:
        encoded = password.encode("utf-8")
    except UnicodeEncodeError:
        raise MailError(ErrorKind.INVALID, safe="password is not valid text") from None
    if len(encoded) > MAX_PASSWORD_BYTES:
        raise MailError(ErrorKind.LIMIT, safe="password too long")
    if "\x00" in password:
        raise MailError(ErrorKind.INVALID, safe="password contains NUL")


_default = PasswordHashing()


def hash_password(password: str, hashing: PasswordHashing = _default) -> str:
    return hashing.hash(password)


def verify_password(stored_hash: str, password: str, hashing: PasswordHashing = _default) -> bool:
    return hashing.verify(stored_hash, password)


def needs_rehash(stored_hash: str, hashing: PasswordHashing = _default) -> bool:
    return hashing.needs_rehash(stored_hash)


async def ahash(password: str, hashing: PasswordHashing = _default) -> str:
    return await hashing.ahash(password)


async def averify(stored_hash: str, password: str, hashing: PasswordHashing = _default) -> bool:
    return await hashing.averify(stored_hash, password)
