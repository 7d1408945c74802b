"""``intermail bench WHAT [--json]``: benchmarks that print our figure, a baseline from the same run, and the ratio.

Each benchmark lives in its own module (``bench_<what>.py``) and returns the
JSON contract of ARCHITECTURE.md: ``{"bench": ..., "results": [{"case",
"params", "metric", "ours", "baseline", "baseline_name", "ratio"}], "host":
{...}}``.  This module only parses arguments and prints.

Logs: nothing; prints a table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("values must be positive")
    return values


def _print_row(result: dict) -> None:
    ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}x"
    print(f"{result['case']:<40} ours {result['ours']:>12,.1f} {result['metric']:<10} "
          f"baseline {result['baseline']:>12,.1f}  ratio {ratio}", flush=True)


def _run_storage(args: argparse.Namespace) -> int:
    from intermail.admin.bench_storage import run_bench

    progress = None if args.json else _print_row
    if not args.json:
        print(f"storage bench: {args.size} B records, {args.seconds:g} s per case; baseline = "
              "pwrite+fdatasync per record, one writer, same directory", flush=True)
    report = asyncio.run(run_bench(args.dir, args.writers, args.mirrors, args.size, args.seconds, progress))
    if args.json:
        json.dump(report, sys.stdout)
        print()
    return 0


def _run_directory(args: argparse.Namespace) -> int:
    from intermail.admin.bench_directory import run_bench

    overrides = {key: value for key, value in (("hash_time_cost", args.time_cost),
                                               ("hash_memory_kib", args.memory_kib),
                                               ("hash_parallelism", args.parallelism)) if value is not None}
    progress = None if args.json else _print_row
    if not args.json:
        print(f"directory bench: primary + 2 replicas (dird processes), {args.users} accounts, "
              f"{args.seconds:g} s per case", flush=True)
    report = asyncio.run(run_bench(args.concurrency, args.auth_concurrency, args.users, args.seconds,
                                   overrides, args.dir, progress))
    if args.json:
        json.dump(report, sys.stdout)
        print()
    return 0


def _print_lmtp_row(result: dict) -> None:
    baseline = "unavailable" if result["baseline"] is None else f"{result['baseline']:>10,.1f}"
    ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}x"
    errors = result["errors"]
    print(f"{result['case']:<28} ours {result['ours']:>10,.1f} {result['metric']:<13} baseline {baseline}  "
          f"ratio {ratio}  errors {errors['ours']}/{'-' if errors['baseline'] is None else errors['baseline']}",
          flush=True)


def _run_lmtp(args: argparse.Namespace) -> int:
    from intermail.admin.bench_lmtp import message_parts, run_bench
    from intermail.net.runner import loop_factory

    try:
        message_parts(args.size)
    except ValueError as exc:
        print(f"intermail: {exc}", file=sys.stderr)
        return 2
    progress = None if args.json else _print_lmtp_row
    if not args.json:
        print(f"lmtp bench: {args.size} B messages, 1 recipient each, {args.seconds:g} s per case; ours = mssd "
              "(fsync on, 2 mirrors by default), baseline = Dovecot LMTP (sdbox, default fsync)", flush=True)
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        report = runner.run(run_bench(args.concurrency, args.seconds, args.size, args.users, args.dir, progress))
    if args.json:
        json.dump(report, sys.stdout)
        print()
    else:
        for note in report["notes"]:
            print(f"note: {note}")
    return 0


def _print_smtp_row(result: dict) -> None:
    baseline = "unavailable" if result["baseline"] is None else f"{result['baseline']:>8,.1f}"
    ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}x"
    errors = result["errors"]
    print(f"{result['case']:<40} ours {result['ours']:>8,.1f} {result['metric']:<12} baseline {baseline}  "
          f"ratio {ratio}  errors {errors['ours']}/{'-' if errors['baseline'] is None else errors['baseline']}",
          flush=True)


def _run_smtp(args: argparse.Namespace) -> int:
    from intermail.admin.bench_smtp import message_parts, run_bench
    from intermail.net.runner import loop_factory

    try:
        message_parts(args.size)
    except ValueError as exc:
        print(f"intermail: {exc}", file=sys.stderr)
        return 2
    for name in ("sessions", "users", "messages"):
        if getattr(args, name) <= 0:
            print(f"intermail: --{name} must be positive", file=sys.stderr)
            return 2
    progress = None if args.json else _print_smtp_row
    if not args.json:
        print(f"smtp bench: {args.size} B messages, 1 recipient each, {args.sessions} sessions; accept for "
              f"{args.seconds:g} s, end to end over {args.messages} messages; ours = mtad + mssd (fsync on, "
              "2 mirrors by default), baseline = Postfix (default fsync) relaying to the same mssd", flush=True)
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        report = runner.run(run_bench(args.sessions, args.seconds, args.size, args.users, args.messages, args.dir,
                                      progress))
    if args.json:
        json.dump(report, sys.stdout)
        print()
    else:
        sink = report["results"][-1]["details"].get("baseline_to_sink")
        if sink is not None:
            print(f"postfix end to end into smtp-sink (no store, for reference): {sink['delivered_per_s']} "
                  "delivered/s")
        for note in report["notes"]:
            print(f"note: {note}")
    return 0


def _print_access_row(result: dict) -> None:
    baseline = "unavailable" if result["baseline"] is None else f"{result['baseline']:>8,.1f}"
    ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}x"
    errors = result["errors"]
    details = result["details"]
    other = "sessions_per_s" if result["metric"] == "ops/s" else "ops_per_s"
    also = f"{details['ours'][other]:,.1f}" + (
        f"/{details['baseline'][other]:,.1f}" if details["baseline"] is not None else "")
    print(f"{result['case']:<24} ours {result['ours']:>8,.1f} {result['metric']:<10} baseline {baseline}  "
          f"ratio {ratio}  ({other.replace('_per_s', '/s')} {also})  "
          f"errors {errors['ours']}/{'-' if errors['baseline'] is None else errors['baseline']}", flush=True)


def _run_access(args: argparse.Namespace) -> int:
    from intermail.admin.bench_access import run_bench
    from intermail.net.runner import loop_factory

    for name in ("users", "messages"):
        if getattr(args, name) <= 0:
            print(f"intermail: --{name} must be positive", file=sys.stderr)
            return 2
    if args.users < max(args.concurrency):
        print(f"intermail: --users ({args.users}) must be at least the largest --concurrency "
              f"({max(args.concurrency)}): a session holds its account", file=sys.stderr)
        return 2
    protocol = args.bench_what
    progress = None if args.json else _print_access_row
    if not args.json:
        workload = ("LOGIN, SELECT, FETCH 1:* (FLAGS ENVELOPE), FETCH headers, 2x FETCH BODY[], UID SEARCH, STORE, "
                    "APPEND, UID STORE \\Deleted, UID EXPUNGE, LOGOUT" if protocol == "imap"
                    else "USER, PASS, STAT, UIDL, RETR of every message, QUIT (nothing deleted)")
        print(f"{protocol} bench: sessions of {workload}; {args.users} accounts of {args.messages} messages, "
              f"{args.seconds:g} s per case; ours = accessd + mssd + dird, baseline = Dovecot {protocol.upper()} "
              "(sdbox)", flush=True)
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        report = runner.run(run_bench(protocol, args.concurrency, args.seconds, args.users, args.messages, args.dir,
                                      progress))
    if args.json:
        json.dump(report, sys.stdout)
        print()
    else:
        for note in report["notes"]:
            print(f"note: {note}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark against a baseline measured in the same run")
    whats = parser.add_subparsers(dest="bench_what", metavar="{storage,directory,lmtp,smtp,imap,pop3}", required=True)
    storage = whats.add_parser("storage", help="durable log commits/s vs raw write+fdatasync of the same disk")
    storage.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    storage.add_argument("--dir", default=None,
                         help="directory on the disk to measure (default: the system temp directory)")
    storage.add_argument("--writers", type=_int_list, default=[1, 16, 128],
                         help="comma-separated concurrent writer counts (default 1,16,128)")
    storage.add_argument("--mirrors", type=_int_list, default=[1, 2],
                         help="comma-separated mirror counts (default 1,2)")
    storage.add_argument("--size", type=int, default=10240, help="record size in bytes (default 10240)")
    storage.add_argument("--seconds", type=float, default=3.0, help="measuring time per case (default 3)")
    storage.set_defaults(run=_run_storage)

    directory = whats.add_parser("directory", help="directory lookups/s and logins/s through the client library")
    directory.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    directory.add_argument("--dir", default=None, help="where the throw-away cluster lives (default: temp)")
    directory.add_argument("--concurrency", type=_int_list, default=[1, 16, 64],
                           help="comma-separated lookup concurrencies (default 1,16,64)")
    directory.add_argument("--auth-concurrency", type=int, default=4, help="concurrent logins (default 4)")
    directory.add_argument("--users", type=int, default=20, help="accounts to provision (default 20)")
    directory.add_argument("--seconds", type=float, default=3.0, help="measuring time per case (default 3)")
    directory.add_argument("--time-cost", type=int, default=None, help="argon2id passes (default: config's)")
    directory.add_argument("--memory-kib", type=int, default=None, help="argon2id memory in KiB (default: config's)")
    directory.add_argument("--parallelism", type=int, default=None, help="argon2id lanes (default: config's)")
    directory.set_defaults(run=_run_directory)

    lmtp = whats.add_parser("lmtp", help="LMTP deliveries/s into our mssd vs Dovecot's LMTP, same run")
    lmtp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    lmtp.add_argument("--dir", default=None, help="where the throw-away servers keep their data (default: temp)")
    lmtp.add_argument("--concurrency", type=_int_list, default=[1, 16, 64],
                      help="comma-separated LMTP connection counts (default 1,16,64)")
    lmtp.add_argument("--seconds", type=float, default=3.0, help="measuring time per case and server (default 3)")
    lmtp.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    lmtp.add_argument("--users", type=int, default=64, help="accounts the recipients rotate over (default 64)")
    lmtp.set_defaults(run=_run_lmtp)

    smtp = whats.add_parser("smtp", help="SMTP messages/s into our mtad vs Postfix, accepted and end to end")
    smtp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    smtp.add_argument("--dir", default=None, help="where the throw-away servers keep their data (default: temp)")
    smtp.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions (default 20)")
    smtp.add_argument("--seconds", type=float, default=3.0, help="accept: measuring time per server (default 3)")
    smtp.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    smtp.add_argument("--messages", type=int, default=2000,
                      help="end to end: messages sent per server, timed until the last is stored (default 2000)")
    smtp.add_argument("--users", type=int, default=64, help="accounts the recipients rotate over (default 64)")
    smtp.set_defaults(run=_run_smtp)

    for protocol, what in (("imap", "IMAP operations/s (12-command client sessions) into our accessd vs Dovecot"),
                           ("pop3", "POP3 sessions/s (log in, list, retrieve all) from our accessd vs Dovecot")):
        access = whats.add_parser(protocol, help=what)
        access.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        access.add_argument("--dir", default=None,
                            help="where the throw-away servers keep their data (default: temp)")
        access.add_argument("--concurrency", type=_int_list, default=[1, 16],
                            help="comma-separated concurrent session counts (default 1,16)")
        access.add_argument("--seconds", type=float, default=3.0,
                            help="measuring time per case and server (default 3)")
        access.add_argument("--users", type=int, default=64,
                            help="accounts the sessions rotate over, at least the largest concurrency (default 64)")
        access.add_argument("--messages", type=int, default=20,
                            help="messages in every account's INBOX, a mix of 2-40 KiB (default 20)")
        access.set_defaults(run=_run_access)
