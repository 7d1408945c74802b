"""The directory RPC's methods and how their arguments and results look on the wire.

Owns: the method names the directory serves, the checks every argument goes
through before anything reads the database, and the one encoding of
accounts, alias expansions and change-log entries as JSON-able dicts (the
service encodes, the client and the replica decode, so the two ends cannot
drift apart).

Methods (all answers are dicts; failures are ``MailError`` kinds)::

    resolve        {address}                      -> {"result": "account"|"alias"|"unknown", ...}
    authenticate   {user, password, client?}      -> {"account": {...}}
    domain.list    {}                             -> {"domains": [...]}
    user.show      {address}                      -> {"account": {...}}
    user.list      {domain?}                      -> {"accounts": [...]}
    alias.list     {domain?}                      -> {"aliases": [{"address", "targets"}]}
    changes        {since, limit?, chain?}        -> {"origin", "last_seq", "changes": [[seq, op, payload]]}
    status         {}                             -> {"role", "last_seq", "origin", ...}
    domain.add     {name}                         -> {"domain", "seq"}          (writes: primary,
    domain.del     {name}                         -> {"seq"}                     forwarded by replicas)
    user.add       {address, password, mss?, quota?} -> {"account", "seq"}
    user.del       {address}                      -> {"seq"}
    user.passwd    {address, password}            -> {"seq"}
    user.status    {address, status}              -> {"seq"}
    user.quota     {address, quota}               -> {"seq"}
    alias.add      {address, targets}             -> {"alias", "seq"}
    alias.del      {address, target?}             -> {"seq"}

Invariants:

- An argument is checked for presence, type and size (``max_field_bytes``)
  before use; anything else is INVALID with a text naming the argument.
  Unknown arguments are refused too: a typo must not be ignored.
- Password hashes never leave the directory: an encoded account carries
  address, mss, status, quota and creation time only (the change log, which
  replicas need, is the one exception and is served to replicas only as
  data to apply).

Logs: nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from intermail.directory.db import Account, AliasExpansion, Change, Resolution, Unknown
from intermail.errors import ErrorKind, MailError

READS = frozenset({"resolve", "authenticate", "domain.list", "user.show", "user.list", "alias.list",
                   "changes", "status"})
WRITES = frozenset({"domain.add", "domain.del", "user.add", "user.del", "user.passwd", "user.status",
                    "user.quota", "alias.add", "alias.del"})
ADMIN = frozenset({"directory.backup"})  # the primary only; a replica refuses (PERM)
MAX_CHANGES = 1000  # per `changes` answer
NOT_SYNCED = "this directory replica has not synchronised with its primary yet"  # clients try elsewhere
MAX_TARGETS = 1000  # per `alias.add` request


def invalid(text: str) -> MailError:
    return MailError(ErrorKind.INVALID, safe=text)


class Args:
    """Checked access to one request's arguments."""

    def __init__(self, args: Mapping[str, Any], allowed: frozenset[str] | set[str], max_bytes: int):
        unknown = set(args) - set(allowed)
        if unknown:
            raise invalid(f"unknown argument {sorted(unknown)[0][:40]!r}")
        self._args = args
        self._max = max_bytes

    def text(self, name: str, *, required: bool = True) -> str | None:
        value = self._args.get(name)
        if value is None:
            if required:
                raise invalid(f"missing argument {name!r}")
            return None
        if not isinstance(value, str):
            raise invalid(f"argument {name!r} must be text")
        if len(value.encode("utf-8", "surrogatepass")) > self._max:
            raise MailError(ErrorKind.LIMIT, safe=f"argument {name!r} is too long")
        if not value:
            raise invalid(f"argument {name!r} is empty")
        return value

    def integer(self, name: str, *, default: int | None = None, minimum: int = 0,
                maximum: int = 2**62) -> int:
        value = self._args.get(name, default)
        if value is None:
            raise invalid(f"missing argument {name!r}")
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise invalid(f"argument {name!r} must be an integer from {minimum} to {maximum}")
        return value

    def texts(self, name: str, *, most: int) -> list[str]:
        value = self._args.get(name)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise invalid(f"argument {name!r} must be a non-empty list of text")
        if len(value) > most:
            raise MailError(ErrorKind.LIMIT, safe=f"argument {name!r} has too many items")
        out = []
        for item in value:
            if not isinstance(item, str) or not item:
                raise invalid(f"argument {name!r} must be a non-empty list of text")
            if len(item.encode("utf-8", "surrogatepass")) > self._max:
                raise MailError(ErrorKind.LIMIT, safe=f"an item of {name!r} is too long")
            out.append(item)
        return out


# -- encoding ---------------------------------------------------------------------------


def encode_account(account: Account) -> dict[str, Any]:
    return {"address": account.address, "mss": account.mss, "status": account.status,
            "quota_bytes": account.quota_bytes, "created": account.created}


def decode_account(data: Mapping[str, Any]) -> Account:
    try:
        return Account(address=str(data["address"]), mss=str(data["mss"]), status=str(data["status"]),
                       quota_bytes=int(data["quota_bytes"]), created=float(data["created"]),
                       password_hash="")
    except (KeyError, TypeError, ValueError) as exc:
        raise MailError(ErrorKind.TEMP, safe="malformed directory answer", detail=repr(exc)) from None


def encode_resolution(resolution: Resolution) -> dict[str, Any]:
    if isinstance(resolution, Account):
        return {"result": "account", "account": encode_account(resolution)}
    if isinstance(resolution, AliasExpansion):
        return {"result": "alias", "address": resolution.address,
                "accounts": [encode_account(a) for a in resolution.accounts],
                "remote": list(resolution.remote), "unknown": list(resolution.unknown),
                "via_catch_all": resolution.via_catch_all}
    return {"result": "unknown", "address": resolution.address, "hosted": resolution.hosted}


def decode_resolution(data: Mapping[str, Any]) -> Resolution:
    try:
        kind = data["result"]
        if kind == "account":
            return decode_account(data["account"])
        if kind == "alias":
            return AliasExpansion(str(data["address"]), tuple(decode_account(a) for a in data["accounts"]),
                                  tuple(map(str, data["remote"])), tuple(map(str, data["unknown"])),
                                  bool(data["via_catch_all"]))
        if kind == "unknown":
            return Unknown(str(data["address"]), bool(data.get("hosted", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise MailError(ErrorKind.TEMP, safe="malformed directory answer", detail=repr(exc)) from None
    raise MailError(ErrorKind.TEMP, safe="malformed directory answer", detail=f"result {kind!r}")


def encode_changes(changes: list[Change]) -> list[list[Any]]:
    return [[c.seq, c.op, c.payload] for c in changes]


def decode_changes(data: Any) -> list[Change]:
    try:
        return [Change(int(seq), str(op), dict(payload)) for seq, op, payload in data]
    except (TypeError, ValueError) as exc:
        raise MailError(ErrorKind.TEMP, safe="malformed change log answer", detail=repr(exc)) from None
