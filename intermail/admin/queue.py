"""``intermail queue list|show|flush|hold|release|delete``: the MTAs' queues, through their control RPC.

Owns the queue verbs and how they print::

    intermail queue list [--state deferred] [--json]   every MTA's entries
    intermail queue show ID                            one entry with its recipients
    intermail queue flush                              retry every deferred entry now
    intermail queue hold|release|delete ID

They act on every MTA of the cluster in ``--data`` (or ``--mta HOST:PORT``):
``list`` and ``flush`` on all of them, the others on the one holding ``ID``.

Exit status: 0 done; 1 refused (e.g. no such queue entry); 3 no MTA answered.

Logs: nothing (prints).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from intermail.admin.cluster import listener, load_cluster
from intermail.admin.directory import _address
from intermail.errors import ErrorKind, MailError
from intermail.rpc.client import RpcClient

EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3


def _mtas(args: argparse.Namespace) -> list[tuple[str, tuple[str, int]]]:
    if args.mta:
        return [(f"{host}:{port}", (host, port)) for host, port in args.mta]
    config = load_cluster(args.data)
    out = []
    for inst in config.instances_of("mta"):
        address = listener(config, inst.name, "rpc")
        if address is not None:
            out.append((inst.name, address))
    if not out:
        raise MailError(ErrorKind.UNAVAILABLE, safe="no MTA is running")
    return out


async def _call_all(args: argparse.Namespace, method: str, request: dict) -> list[tuple[str, dict | MailError]]:
    async def one(name: str, address: tuple[str, int]) -> tuple[str, dict | MailError]:
        async with RpcClient([address], instance="admin", reconnect_window=1.0, request_timeout=args.timeout) as rpc:
            try:
                return name, await rpc.call(method, request)
            except MailError as exc:
                return name, exc
    return list(await asyncio.gather(*(one(n, a) for n, a in _mtas(args))))


def _print_entries(answers: list[tuple[str, dict | MailError]]) -> None:
    for mta, answer in answers:
        if isinstance(answer, MailError):
            print(f"{mta}: {answer.safe}", file=sys.stderr)
            continue
        for e in answer["entries"]:
            pending = [r["address"] for r in e["recipients"] if r["status"] == "pending"]
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["arrival"]))
            print(f"{e['id']}  {mta}  {e['state']:<8} {e['size']:>9}  {when}  <{e['sender']}> -> "
                  f"{', '.join(pending)}")
            if e["last_error"]:
                print(f"    {e['last_error']}")


def _run(args: argparse.Namespace) -> int:
    verb = args.verb_name
    try:
        if verb in ("list", "flush"):
            method = "queue.list" if verb == "list" else "queue.flush"
            request = {"state": args.state} if verb == "list" and args.state else {}
            answers = asyncio.run(_call_all(args, method, request))
            if all(isinstance(a, MailError) for _, a in answers):
                raise answers[0][1]  # type: ignore[misc]
            if args.json:
                print(json.dumps({name: (a if isinstance(a, dict) else {"error": a.safe}) for name, a in answers},
                                 sort_keys=True))
            elif verb == "list":
                _print_entries(answers)
            else:
                print(sum(a.get("flushed", 0) for _, a in answers if isinstance(a, dict)), "entries flushed")
            return 0
        method = {"show": "queue.show", "hold": "queue.hold", "release": "queue.release",
                  "delete": "queue.delete"}[verb]
        answers = asyncio.run(_call_all(args, method, {"id": args.id}))
        found = [(name, a) for name, a in answers if isinstance(a, dict)]
        if not found:
            errors = [a for _, a in answers if isinstance(a, MailError)]
            unavailable = [e for e in errors if e.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TEMP)]
            raise unavailable[0] if len(unavailable) == len(errors) else next(
                e for e in errors if e not in unavailable)
        name, answer = found[0]
        if args.json:
            print(json.dumps({"mta": name, **answer}, sort_keys=True))
        elif verb == "show":
            print(json.dumps({"mta": name, **answer["entry"]}, indent=2, sort_keys=True))
        return 0
    except MailError as exc:
        print(f"intermail: {exc.safe}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TEMP) else EXIT_REFUSED


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print the answers as JSON")
    parser.add_argument("--mta", metavar="HOST:PORT", type=_address, action="append",
                        help="ask this MTA's control port instead of the cluster in --data (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each MTA")
    parser.set_defaults(run=_run)
    return parser


def register(subparsers: Any) -> None:
    queue = subparsers.add_parser("queue", help="inspect and steer the MTAs' mail queues")
    verbs = queue.add_subparsers(dest="verb_name", metavar="{list,show,flush,hold,release,delete}", required=True)
    _common(verbs.add_parser("list", help="list queued messages")).add_argument(
        "--state", help="only entries in this state (incoming, deferred, hold, ...)")
    _common(verbs.add_parser("flush", help="retry every deferred message now"))
    for verb, text in (("show", "show one queued message"), ("hold", "stop delivering a message"),
                       ("release", "deliver a held message again"), ("delete", "drop a message without a bounce")):
        _common(verbs.add_parser(verb, help=text)).add_argument("id", help="queue id")
