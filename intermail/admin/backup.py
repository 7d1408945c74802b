"""``intermail backup|restore|fsck``: online backups of a store, point-in-time restore, checks.

Owns the verbs::

    intermail backup full --store mss1 --to DIR [--rate MB/s]   (default: [backup] rate_mb)
    intermail backup incremental --store mss1 --to DIR [--base DIR]
    intermail restore --from FULL [--from INCR ...] [--to-seq N] --store-dir NEW [--mirrors K]
    intermail fsck --store-dir DIR [--repair] [--json]
    intermail backup directory --to DIR
    intermail restore directory --from DIR (--to FILE | [--instance NAME]) [--force]

``backup`` asks the running mssd of the identity (store RPC ``store.backup``)
to write the backup into DIR while it serves (I-7); an incremental's base is
the store's previous backup (recorded in the store) unless ``--base DIR``.
``restore`` writes a new store (``NEW/mirror-1..K``, default K = the
cluster's ``storage.mirrors``, else 2) from a full and its incrementals, cut
at ``--to-seq`` (default: the last one), builds its index by replay and
checks it; serve it with ``mssd --store-dir NEW`` (``intermail start mss1
--store-dir NEW``).  A ``--from`` directory without a manifest stands for
the backups inside it.  ``fsck`` is :mod:`intermail.mailstore.fsck`.
``backup directory`` asks the directory primary (RPC ``directory.backup``);
``restore directory`` writes a database file (default: the primary's own
``<data>/<name>/directory.db``, which must not exist unless ``--force``) that
the primary starts on without ``--init``, under a new change-log id
(:mod:`intermail.directory.backup`).

Exit status: 0 done (fsck: no problem left); 1 refused or problems found;
3 the store did not answer.

Logs: nothing (prints).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from intermail.errors import ErrorKind, MailError

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3


def store_rpc_address(data: str, identity: str) -> tuple[str, int]:
    """Where the identity's store RPC listens (its active instance's address)."""
    from intermail.admin.cluster import listener, load_cluster
    config = load_cluster(data)
    owners = [i for i in config.instances_of("mss") if (i.identity or i.name) == identity and i.role in ("active", "")]
    if not owners:
        raise MailError(ErrorKind.NOTFOUND, safe=f"no store identity {identity!r} in the cluster")
    address = listener(config, owners[0].name, "rpc")
    if address is None:
        raise MailError(ErrorKind.UNAVAILABLE, safe=f"{identity} is not running")
    return address


async def request_backup(address: tuple[str, int], kind: str, to: str, *, base: dict | None = None,
                         rate: int | None = None, timeout: float = 3600.0) -> dict:
    from intermail.rpc.client import RpcClient
    request: dict[str, Any] = {"kind": kind, "to": os.path.abspath(to)}
    if base is not None:
        request["base"] = base
    if rate is not None:  # None: the store's [backup] rate_mb
        request["rate"] = rate
    async with RpcClient([address], instance="admin", reconnect_window=1.0, request_timeout=timeout) as rpc:
        return await rpc.call("store.backup", request)


def restore_store(sources: list[str], store_dir: str, to_seq: int | None = None, mirrors: int = 2) -> dict:
    """Restore into ``store_dir/mirror-1..mirrors``, build the index by replay, check it with fsck."""
    from intermail.mailstore.fsck import fsck
    from intermail.mailstore.store import Mailstore
    from intermail.storage import StoreOptions
    from intermail.storage.backup import restore
    dirs = [os.path.join(os.path.abspath(store_dir), f"mirror-{i + 1}") for i in range(mirrors)]
    report = restore(sources, dirs, to_seq)

    async def build_index() -> int:
        mail = await Mailstore.open(StoreOptions(mirrors=tuple(dirs)))
        try:
            return mail.store.applied_seq
        finally:
            await mail.close()

    applied = asyncio.run(build_index())
    if applied != report["seq"]:
        raise MailError(ErrorKind.TEMP, detail=f"restored store opened at seq {applied}, not {report['seq']}")
    check = fsck(store_dir)
    return {**report, "store_dir": os.path.abspath(store_dir), "mirrors": dirs, "fsck": check}


def directory_primary_address(data: str) -> tuple[str, int]:
    """Where the directory primary's RPC listens."""
    from intermail.admin.cluster import listener, load_cluster
    from intermail.apps.directory import primary_of
    config = load_cluster(data)
    primary = primary_of(config)
    address = listener(config, primary.name, "rpc")
    if address is None:
        raise MailError(ErrorKind.UNAVAILABLE, safe=f"the directory primary {primary.name} is not running")
    return address


async def request_directory_backup(address: tuple[str, int], to: str, timeout: float = 600.0) -> dict:
    from intermail.rpc.client import RpcClient
    async with RpcClient([address], instance="admin", reconnect_window=1.0, request_timeout=timeout) as rpc:
        return await rpc.call("directory.backup", {"to": os.path.abspath(to)})


def directory_db_path(data: str, instance: str | None) -> str:
    """``<data>/<instance>/directory.db`` (default instance: the cluster's directory primary)."""
    from intermail.admin.cluster import load_cluster
    from intermail.apps.directory import DB_NAME, primary_of
    config = load_cluster(data)
    name = instance or primary_of(config).name
    if config.instance(name).kind != "directory":
        raise MailError(ErrorKind.INVALID, safe=f"{name} is not a directory instance")
    return str(config.state_dir(name) / DB_NAME)


# -- verbs ------------------------------------------------------------------------------------


def _run_backup_directory(args: argparse.Namespace) -> int:
    try:
        manifest = asyncio.run(request_directory_backup(directory_primary_address(args.data), args.to))
    except MailError as exc:
        print(f"intermail backup: {exc.safe or exc.detail}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TEMP) else EXIT_FAILED
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        print(f"directory backup at change {manifest['seq']}: {manifest['bytes']} bytes in"
              f" {manifest.get('seconds', 0)} s, verified, in {os.path.abspath(args.to)}")
    return 0


def _run_restore_directory(args: argparse.Namespace) -> int:
    from intermail.directory.backup import restore_database
    if len(args.sources) != 1 or args.store_dir or args.to_seq is not None:
        print("intermail restore directory: one --from DIR, and --to FILE or --instance NAME", file=sys.stderr)
        return EXIT_FAILED
    try:
        target = args.to or directory_db_path(args.data, args.instance)
        report = restore_database(args.sources[0], target, force=args.force)
    except MailError as exc:
        print(f"intermail restore: {exc.safe or exc.detail}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"restored the directory at change {report['seq']} ({report['accounts']} accounts) into"
              f" {report['file']} under the new change-log id {report['origin']}")
    return 0


def _run_backup(args: argparse.Namespace) -> int:
    from intermail.storage.backup import read_manifest
    base = None
    if getattr(args, "base", None):
        manifest = read_manifest(args.base)
        base = {"id": manifest["id"], "seq": manifest["seq"]}
    try:
        address = store_rpc_address(args.data, args.store)
        manifest = asyncio.run(request_backup(address, args.kind, args.to, base=base,
                                              rate=None if args.rate is None else int(args.rate * 1e6)))
    except MailError as exc:
        print(f"intermail backup: {exc.safe or exc.detail}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TEMP) else EXIT_FAILED
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        print(f"{manifest['kind']} backup of {args.store} at seq {manifest['seq']}"
              f" (from {manifest['first_seq']}): {manifest['bytes']} bytes in {manifest.get('seconds', 0)} s,"
              f" verified, in {os.path.abspath(args.to)}")
    return 0


def _cluster_mirrors(data: str) -> int:
    try:
        from intermail.admin.cluster import load_cluster
        return load_cluster(data).storage.mirrors
    except Exception:
        return 2


def _run_restore(args: argparse.Namespace) -> int:
    if args.what == "directory":
        return _run_restore_directory(args)
    if not args.store_dir or args.to or args.instance or args.force:
        print("intermail restore: a store restore wants --store-dir NEW (--to/--instance/--force are for"
              " `restore directory`)", file=sys.stderr)
        return EXIT_FAILED
    try:
        report = restore_store(args.sources, args.store_dir, args.to_seq, args.mirrors or _cluster_mirrors(args.data))
    except MailError as exc:
        print(f"intermail restore: {exc.safe or exc.detail}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        boxes = report["fsck"]["mailboxes"]
        print(f"restored seq {report['seq']} from {len(report['backups'])} backup(s) into {report['store_dir']}:"
              f" {len(boxes)} mailboxes, {sum(b['messages'] for b in boxes)} messages;"
              f" fsck {'ok' if report['fsck']['ok'] else 'FOUND PROBLEMS'}")
    return 0 if report["fsck"]["ok"] else EXIT_FAILED


def _run_fsck(args: argparse.Namespace) -> int:
    from intermail.mailstore.fsck import fsck
    report = fsck(args.store_dir, do_repair=args.repair)
    if args.json:
        print(json.dumps(report))
    else:
        for text in report["repaired"]:
            print(f"repaired: {text}")
        for p in report["problems"]:
            print(f"{p['kind']}: {p['detail']}")
        boxes = report["mailboxes"]
        print(f"{'ok' if report['ok'] else 'PROBLEMS'}: seq {report['seq']}, {len(boxes)} mailboxes,"
              f" {sum(b['messages'] for b in boxes)} messages, {len(report['problems'])} problems")
    return 0 if report["ok"] else EXIT_FAILED


def register(subparsers: Any) -> None:
    backup = subparsers.add_parser("backup", help="online backup of a store (full or incremental)")
    kinds = backup.add_subparsers(dest="kind", metavar="{full,incremental,directory}", required=True)
    p = kinds.add_parser("directory", help="backup of the directory primary's database")
    p.add_argument("--to", required=True, metavar="DIR", help="new directory for the backup")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(run=_run_backup_directory)
    for kind in ("full", "incremental"):
        p = kinds.add_parser(kind, help=f"{kind} backup of a running store")
        p.add_argument("--store", required=True, help="store identity, e.g. mss1")
        p.add_argument("--to", required=True, metavar="DIR", help="new directory for the backup")
        if kind == "incremental":
            p.add_argument("--base", metavar="DIR", help="the backup to build on (default: the store's last)")
        p.add_argument("--rate", type=float, default=None, metavar="MB/s",
                       help="bound the copy rate (0: none; default: the store's [backup] rate_mb)")
        p.add_argument("--json", action="store_true", help="print the manifest")
        p.set_defaults(run=_run_backup, kind=kind)
    restore = subparsers.add_parser("restore", help="write a new store from backups, to any seq;"
                                    " or a directory database (restore directory)")
    restore.add_argument("what", nargs="?", choices=("store", "directory"), default="store",
                         help="what to restore (default: a store)")
    restore.add_argument("--from", dest="sources", action="append", required=True, metavar="DIR",
                         help="a full backup, then incrementals (or a directory of backups)")
    restore.add_argument("--to-seq", type=int, default=None, metavar="N", help="point in time (journal seq)")
    restore.add_argument("--store-dir", metavar="NEW", help="the new store's directory")
    restore.add_argument("--to", metavar="FILE", help="directory: the database file to write")
    restore.add_argument("--instance", metavar="NAME",
                         help="directory: write <data>/NAME/directory.db (default: the primary's)")
    restore.add_argument("--force", action="store_true",
                         help="directory: replace an existing database (the instance must be stopped)")
    restore.add_argument("--mirrors", type=int, default=0, help="mirror directories to write (default: config)")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(run=_run_restore)
    fsck = subparsers.add_parser("fsck", help="check a stopped store against its journal; --repair mends")
    fsck.add_argument("--store-dir", required=True, metavar="DIR", help="store root (mirror-N inside) or a mirror")
    fsck.add_argument("--repair", action="store_true", help="rebuild what is damaged (the store must be stopped)")
    fsck.add_argument("--json", action="store_true")
    fsck.set_defaults(run=_run_fsck)
