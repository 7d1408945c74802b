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


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_failover_trial(trial: Any) -> None:
    extra = ""
    if trial.phase == "monitor":
        extra = f"  (DOWN declared {_seconds(trial.down)} s, take-over answered {_seconds(trial.takeover)} s"
    else:
        extra = f"  (take-over answered {_seconds(trial.takeover)} s"
    extra += (f", spare's own {_seconds(trial.store_seconds)} s, "
              f"accessd reconnected {_seconds(trial.access_connected)} s)")
    print(f"{trial.phase:<8} trial {trial.index + 1:>3}: killed {trial.victim:<5} -> {trial.successor:<5} "
          f"LMTP 250 {_seconds(trial.lmtp)} s  IMAP FETCH {_seconds(trial.imap)} s{extra}  "
          f"delivered {trial.delivered}, in doubt {trial.in_doubt}, bye {trial.bye}"
          + (f", FETCH not OK {trial.imap_no}" if trial.imap_no else "")
          + (f"  FAILED: {trial.failure}" if trial.failure else ""), flush=True)


def _run_failover(args: argparse.Namespace) -> int:
    from intermail.admin.bench_failover import TARGET_MEDIAN, TARGET_P99, run_bench
    from intermail.net.runner import loop_factory

    baseline_trials = args.trials if args.baseline_trials is None else args.baseline_trials
    for name, value, least in (("trials", args.trials, 1), ("baseline-trials", baseline_trials, 0),
                               ("clients", args.clients, 1), ("users", args.users, 1),
                               ("down-after", args.down_after, 1)):
        if value < least:
            print(f"intermail: --{name} must be at least {least}", file=sys.stderr)
            return 2
    if args.interval <= 0 or args.timeout <= 0:
        print("intermail: --interval and --timeout must be positive", file=sys.stderr)
        return 2
    progress = None if args.json else _print_failover_trial
    if not args.json:
        print(f"failover bench: {args.trials} SIGKILLs of the active mssd under LMTP load ({args.clients} clients), "
              f"take-over by the monitor ([monitor] interval = {args.interval:g} s, timeout = {args.timeout:g} s, "
              f"down_after = {args.down_after}); baseline = {baseline_trials} kills with mss.takeover sent to the "
              f"spare at once (no detection); targets: median <= {TARGET_MEDIAN:g} s, p99 <= {TARGET_P99:g} s",
              flush=True)
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        report = runner.run(run_bench(args.trials, baseline_trials, args.clients, args.users, args.interval,
                                      args.timeout, args.down_after, args.seed, args.dir, progress, args.keep))
    if args.json:
        json.dump(report, sys.stdout)
        print()
        return 0
    for r in report["results"]:
        base = r["details"]["baseline"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['case']:<20} median {_seconds(r['median'])} s  p99 {_seconds(r['p99'])} s  "
              f"max {_seconds(r['max'])} s  ({r['trials']} trials)  baseline median {_seconds(r['baseline'])} s "
              f"p99 {_seconds(base['p99'])} s  ratio {ratio}  target {'met' if r['target_met'] else 'NOT met'}  "
              f"lost {r['lost']} doubled {r['doubled']} bye {r['bye']} FETCH not OK {r['imap_failed']}")
    d = report["deliveries"]
    print(f"deliveries: {d['acknowledged']} acknowledged, {d['stored']} stored, {d['in_doubt_retried']} cut off "
          f"after their end of DATA and retried with their key ({d['in_doubt_stored_once']} stored once)")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


def _print_backup_row(result: dict) -> None:
    base = "-" if result["baseline"] is None else f"{result['baseline']:,.1f}"
    ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}x"
    extra = "" if "target_met" not in result else f"  target {'met' if result['target_met'] else 'NOT met'}"
    print(f"{result['case']:<44} ours {result['ours']:>9,.1f} {result['metric']}  baseline {base}  ratio {ratio}{extra}",
          flush=True)


def _run_backup(args: argparse.Namespace) -> int:
    from intermail.admin.bench_backup import run_bench
    from intermail.net.runner import loop_factory

    progress = None if args.json else _print_backup_row
    if not args.json:
        print(f"backup bench: store filled with {args.messages} x {args.size} B over LMTP; full backup MB/s vs"
              f" cp -r + sync; LMTP deliveries/s (conc {args.concurrency}) during back-to-back full backups vs"
              " without", flush=True)
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        report = runner.run(run_bench(args.messages, args.size, args.concurrency, args.seconds, args.users,
                                      args.dir, progress))
    if args.json:
        json.dump(report, sys.stdout)
        print()
    else:
        for note in report["notes"]:
            print(f"note: {note}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark against a baseline measured in the same run")
    whats = parser.add_subparsers(dest="bench_what", metavar="{storage,directory,lmtp,smtp,imap,pop3,failover,backup}",
                                  required=True)
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

    failover = whats.add_parser("failover", help="seconds from a SIGKILL of the active store to LMTP and IMAP "
                                "served again by its spare (monitor take-over), lost/doubled mail counted")
    failover.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    failover.add_argument("--dir", default=None, help="where the throw-away cluster lives (default: temp)")
    failover.add_argument("--trials", type=int, default=20, help="kills with the monitor's take-over (default 20)")
    failover.add_argument("--baseline-trials", type=int, default=None,
                          help="kills with mss.takeover sent directly, no monitor (default: as many as --trials)")
    failover.add_argument("--clients", type=int, default=4, help="concurrent LMTP clients (default 4)")
    failover.add_argument("--users", type=int, default=4, help="accounts the clients deliver to (default 4)")
    failover.add_argument("--interval", type=float, default=0.1, help="[monitor] interval, seconds (default 0.1)")
    failover.add_argument("--timeout", type=float, default=0.3, help="[monitor] timeout, seconds (default 0.3)")
    failover.add_argument("--down-after", type=int, default=3, help="[monitor] down_after, probes (default 3)")
    failover.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: random)")
    failover.add_argument("--keep", action="store_true", help="keep the cluster's data directory (logs) afterwards")
    failover.set_defaults(run=_run_failover)

    backup = whats.add_parser("backup", help="full-backup MB/s vs cp, and LMTP deliveries/s during a backup vs"
                              " without (target: drop < 10 %%)")
    backup.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    backup.add_argument("--dir", default=None, help="where the throw-away cluster lives (default: temp)")
    backup.add_argument("--messages", type=int, default=5000, help="messages in the store (default 5000)")
    backup.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    backup.add_argument("--concurrency", type=int, default=16, help="LMTP connections (default 16)")
    backup.add_argument("--seconds", type=float, default=5.0, help="measuring time per LMTP case (default 5)")
    backup.add_argument("--users", type=int, default=64, help="accounts the recipients rotate over (default 64)")
    backup.set_defaults(run=_run_backup)
