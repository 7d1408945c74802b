"""argon2id hashing: verify never raises, rehash detection, off-loop wrappers."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from argon2 import Type, profiles

from intermail.directory.passwords import MAX_PASSWORD_BYTES, PasswordHashing, verify_password
from intermail.errors import ErrorKind, MailError


@pytest.fixture(scope="module")
def hashing() -> PasswordHashing:
    return PasswordHashing(profiles.CHEAPEST)


def test_hash_is_argon2id_and_verifies(hashing):
    stored = hashing.hash("correct horse")
    assert stored.startswith("$argon2id$")
    assert hashing.verify(stored, "correct horse")
    assert not hashing.verify(stored, "correct horsE")
    assert hashing.hash("correct horse") != stored  # salted


@pytest.mark.parametrize("stored", [
    "", "garbage", "$argon2id$", "$argon2id$v=19$m=8,t=1,p=1$", "$2b$12$abcdefghijklmnopqrstuv",
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$!!!!", "x" * 10_000, None, 42,
])
def test_verify_bad_hash_is_false_never_raises(hashing, stored):
    assert hashing.verify(stored, "pw") is False
    assert verify_password(stored, "pw") is False


def test_verify_odd_passwords_false(hashing):
    stored = hashing.hash("pw")
    for candidate in ("", "\ud800", "x" * (MAX_PASSWORD_BYTES + 1), None):
        assert hashing.verify(stored, candidate) is False


def test_hash_refuses_unusable_passwords(hashing):
    for bad, kind in (("", ErrorKind.INVALID), ("a\x00b", ErrorKind.INVALID), (None, ErrorKind.INVALID),
                      ("\ud800", ErrorKind.INVALID), ("é" * MAX_PASSWORD_BYTES, ErrorKind.LIMIT)):
        with pytest.raises(MailError) as info:
            hashing.hash(bad)
        assert info.value.kind is kind
    assert hashing.verify(hashing.hash("é" * (MAX_PASSWORD_BYTES // 2)), "é" * (MAX_PASSWORD_BYTES // 2))


def test_needs_rehash(hashing):
    cheap = hashing.hash("pw")
    assert not hashing.needs_rehash(cheap)
    stronger = PasswordHashing(dataclasses.replace(profiles.CHEAPEST, time_cost=2))
    assert stronger.needs_rehash(cheap)
    assert stronger.verify(cheap, "pw")  # old hashes still verify
    assert hashing.needs_rehash("garbage")


def test_default_profile_is_rfc9106_low_memory():
    from intermail.directory import passwords
    assert passwords.DEFAULT_PARAMETERS == profiles.RFC_9106_LOW_MEMORY


def test_only_argon2id():
    with pytest.raises(MailError):
        PasswordHashing(dataclasses.replace(profiles.CHEAPEST, type=Type.I))


async def test_async_wrappers_run_off_the_loop(hashing):
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = hashing.verify

    def spy(stored, password):
        seen.append(threading.get_ident())
        return original(stored, password)

    stored = await hashing.ahash("pw")
    hashing.verify = spy  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(hashing.averify(stored, "pw"), hashing.averify(stored, "no"),
                                       hashing.averify("junk", "pw"))
    finally:
        del hashing.verify
    assert results == [True, False, False]
    assert seen and loop_thread not in seen
