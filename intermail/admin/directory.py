"""``intermail domain|user|alias``: provisioning through the directory RPC.

Owns: the admin verbs of the directory and how they print::

    intermail domain add example.org          intermail domain del|list
    intermail user add bob@example.org --password P [--mss mss1] [--quota 1G]
    intermail user del|show ADDR              intermail user list [--domain D]
    intermail user passwd ADDR [--password P] intermail user enable|disable ADDR
    intermail user quota ADDR SIZE            intermail alias add ADDR TARGET...
    intermail alias del ADDR [TARGET]         intermail alias list [--domain D]

Each acts on the cluster in ``--data`` (:mod:`.cluster`), or on the
directory at ``--directory HOST:PORT``; ``--json`` prints the answer as
JSON.  Writes go to the primary first, then to any replica (which forwards
them, or says the primary is unavailable).  ``user add`` places the account
on the mss with the fewest accounts unless ``--mss`` is given.  A password
not given with ``--password`` is read from the terminal, or from the first
line of standard input when that is not a terminal.

Exit status: 0 done; 1 the directory refused (the reason on stderr, e.g.
``intermail: domain already exists``); 3 no directory answered.

Logs: nothing (prints).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import re
import sys
from typing import Any

from intermail.admin.cluster import listener, load_cluster
from intermail.apps.directory import primary_of
from intermail.directory.client import DirectoryClient
from intermail.errors import ErrorKind, MailError

EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``10M``, ``512KiB``, ``2G``, ``1048576``; ``0`` or ``unlimited`` = no limit."""
    text = text.strip()
    if text.lower() in ("unlimited", "none"):
        return 0
    match = _SIZE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 2G, unlimited)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _client(args: argparse.Namespace) -> DirectoryClient:
    if args.directory:
        addresses = list(args.directory)
    else:
        config = load_cluster(args.data)
        primary = primary_of(config).name
        names = [primary] + [i.name for i in config.instances_of("directory") if i.name != primary]
        addresses = [a for a in (listener(config, n, "rpc") for n in names) if a is not None]
        if not addresses:
            raise MailError(ErrorKind.UNAVAILABLE, safe="no directory instance is running")

    async def fixed() -> tuple[list[tuple[str, int]], float]:
        return addresses, float("inf")
    return DirectoryClient(fixed, addresses, instance="admin", request_timeout=args.timeout, cache_ttl=0)


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return args.password
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise MailError(ErrorKind.INVALID, safe="the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


# -- what each verb asks and prints ---------------------------------------------------------


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    noun, verb = args.noun, args.verb_name
    if noun == "domain":
        return f"domain.{verb}", ({} if verb == "list" else {"name": args.name})
    if noun == "alias":
        if verb == "add":
            return "alias.add", {"address": args.address, "targets": args.targets}
        if verb == "del":
            return "alias.del", {"address": args.address, **({"target": args.target} if args.target else {})}
        return "alias.list", ({"domain": args.domain} if args.domain else {})
    if verb == "add":
        request: dict[str, Any] = {"address": args.address, "password": _password(args), "quota": args.quota}
        if args.mss:
            request["mss"] = args.mss
        return "user.add", request
    if verb in ("enable", "disable"):
        return "user.status", {"address": args.address, "status": "active" if verb == "enable" else "disabled"}
    if verb == "passwd":
        return "user.passwd", {"address": args.address, "password": _password(args)}
    if verb == "quota":
        return "user.quota", {"address": args.address, "quota": args.size}
    if verb == "list":
        return "user.list", ({"domain": args.domain} if args.domain else {})
    return f"user.{verb}", {"address": args.address}


def _size_text(size: int) -> str:
    if size == 0:
        return "unlimited"
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _print_human(method: str, answer: dict[str, Any]) -> None:
    if method == "domain.list":
        for name in answer["domains"]:
            print(name)
    elif method == "user.list":
        for a in answer["accounts"]:
            print(f"{a['address']}\t{a['mss']}\t{a['status']}\t{_size_text(a['quota_bytes'])}")
    elif method == "alias.list":
        for alias in answer["aliases"]:
            print(f"{alias['address']} -> {', '.join(alias['targets'])}")
    elif "account" in answer:
        a = answer["account"]
        print(f"address: {a['address']}\nmss:     {a['mss']}\nstatus:  {a['status']}\n"
              f"quota:   {_size_text(a['quota_bytes'])}")
    elif "alias" in answer:
        print(f"{answer['alias']['address']} -> {', '.join(answer['alias']['targets'])}")
    elif "domain" in answer:
        print(answer["domain"])


def _run(args: argparse.Namespace) -> int:
    try:
        method, request = _request(args)

        async def ask() -> dict[str, Any]:
            async with _client(args) as client:
                return await client.call(method, request)
        answer = asyncio.run(ask())
    except MailError as exc:
        print(f"intermail: {exc.safe}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TEMP) else EXIT_REFUSED
    if args.json:
        print(json.dumps(answer, sort_keys=True))
    else:
        _print_human(method, answer)
    return 0


# -- parsers --------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print the directory's answer as JSON")
    parser.add_argument("--directory", metavar="HOST:PORT", type=_address, action="append",
                        help="ask this directory instead of the cluster in --data (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the directory")
    parser.set_defaults(run=_run)
    return parser


def register(subparsers: Any) -> None:
    domain = subparsers.add_parser("domain", help="add, delete or list hosted domains")
    verbs = domain.add_subparsers(dest="verb_name", metavar="{add,del,list}", required=True)
    for verb in ("add", "del"):
        _common(verbs.add_parser(verb, help=f"{verb} a hosted domain")).add_argument("name")
    _common(verbs.add_parser("list", help="list hosted domains"))
    domain.set_defaults(noun="domain")

    user = subparsers.add_parser("user", help="manage accounts")
    verbs = user.add_subparsers(dest="verb_name", required=True,
                                metavar="{add,del,passwd,enable,disable,quota,show,list}")
    add = _common(verbs.add_parser("add", help="create an account"))
    add.add_argument("address")
    add.add_argument("--password", help="the password (default: ask, or read a line from stdin)")
    add.add_argument("--mss", help="the mail store to place it on (default: the one with fewest accounts)")
    add.add_argument("--quota", type=parse_size, default=0, help="mailbox quota, e.g. 1G (default unlimited)")
    passwd = _common(verbs.add_parser("passwd", help="set an account's password"))
    passwd.add_argument("address")
    passwd.add_argument("--password", help="the new password (default: ask, or read a line from stdin)")
    quota = _common(verbs.add_parser("quota", help="set an account's quota"))
    quota.add_argument("address")
    quota.add_argument("size", type=parse_size, help="e.g. 500M, 2G, unlimited")
    for verb, text in (("del", "delete an account"), ("show", "show an account"),
                       ("enable", "allow an account to log in"), ("disable", "refuse an account's logins")):
        _common(verbs.add_parser(verb, help=text)).add_argument("address")
    _common(verbs.add_parser("list", help="list accounts")).add_argument("--domain")
    user.set_defaults(noun="user")

    alias = subparsers.add_parser("alias", help="manage aliases (use @domain for a catch-all)")
    verbs = alias.add_subparsers(dest="verb_name", metavar="{add,del,list}", required=True)
    add = _common(verbs.add_parser("add", help="add targets to an alias"))
    add.add_argument("address")
    add.add_argument("targets", nargs="+")
    delete = _common(verbs.add_parser("del", help="delete an alias, or one of its targets"))
    delete.add_argument("address")
    delete.add_argument("target", nargs="?")
    _common(verbs.add_parser("list", help="list aliases")).add_argument("--domain")
    alias.set_defaults(noun="alias")
