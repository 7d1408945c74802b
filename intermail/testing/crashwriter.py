"""A writer process for the storage crash, power-cut and fencing tests.

Run as ``python -m intermail.testing.crashwriter --mirrors D0,D1 --run N``.
It opens the store with :class:`~intermail.testing.kv.KvApplier` and runs
``--tasks`` concurrent asyncio tasks that commit forever (or, with
``--count``, until that many commits returned, then close and exit 0):

- a PUT of a unique id ``r{run}-t{task}-{n}`` with a body of a random size
  in ``0..--blob-max`` (about one in ten has no body at all); the body is
  :func:`body_for` ``(id, size)`` and the item's value records the size
  (``"-"``: no body), so a checker can regenerate every byte;
- now and then (``--delete-ratio``) a DEL of one of the task's own earlier
  ids, freeing its body.

Every ``--checkpoint-every`` commits it runs ``checkpoint()`` (every third
time ``compact()``) in the background, as a server would.

What it prints on stdout, one line each, flushed at once:

``READY <epoch>``           the store is open
``OK <id>``                 the PUT of ``id`` was committed (commit() returned)
``DELETING <id>``           a DEL of ``id`` is about to be committed: if the process
                            dies before its ``DEL`` line, ``id`` may be present or not
``DEL <id>``                the DEL of ``id`` was committed
``FENCED``                  a commit raised FencedError: exit code 3, nothing more
``ERROR <kind> <detail>``   any other store failure: exit code 4
``DONE``                    ``--count`` commits reached and the store closed: exit 0

A line is printed only after what it reports happened (``DELETING``:
before), so every ``OK`` and ``DEL`` before a kill is a promise the store
has to keep; :class:`Ledger` holds a reopened store to those promises.

With ``--power-log`` the file layer's observer also prints every durability
point, after it happened (:mod:`intermail.storage.fileops`):
``CREATE <path>``, ``SYNC <path> <size>``, ``DIRSYNC <dir>``,
``RENAME <src> <dst>`` and ``REMOVE <path>``.  All lines go through one lock
(the observer runs on the engine's writer and mirror threads), so the order
on stdout is the order in which things became durable;
:mod:`intermail.testing.powercut` replays it.

Logs: nothing (stderr gets Python's warnings and tracebacks only).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import re
import sys
import threading

from intermail.errors import FencedError, MailError
from intermail.storage import Store, StoreOptions
from intermail.storage.fileops import FileOps
from intermail.testing import kv

EXIT_FENCED = 3
EXIT_ERROR = 4


def body_for(item_id: str, size: int) -> bytes:
    """The body the writer stores for ``item_id`` (deterministic, so checkers can compare bytes)."""
    if size <= 0:
        return b""
    return hashlib.shake_256(item_id.encode()).digest(size)


def value_for(size: int | None) -> str:
    return "-" if size is None else str(size)


def size_from_value(value: str) -> int | None:
    return None if value == "-" else int(value)


ID_RE = re.compile(r"^r(\d+)-t(\d+)-(\d+)$")


def run_of(item_id: str) -> int | None:
    m = ID_RE.match(item_id)
    return int(m.group(1)) if m else None


class Ledger:
    """What writers promised, across runs, and the check of a store against it.

    Feed it the complete output lines of each writer run (``feed``), then
    ``check`` the ids present in the reopened store (``kv.counts``): it
    returns the broken promises and then resolves what was uncertain (a
    delete in flight at the kill; a PUT that became durable without its
    ``OK``), so that the next run is checked against exact expectations.
    """

    def __init__(self) -> None:
        self.present: set[str] = set()  # must be there, exactly once
        self.deleted: set[str] = set()  # must not be there, ever again
        self.maybe_deleted: set[str] = set()  # a DELETING without its DEL
        self.fresh_runs: set[int] = set()  # runs whose unacknowledged PUTs may show up

    def feed(self, lines, run: int | None = None) -> None:
        if run is not None:
            self.fresh_runs.add(run)
        for line in lines:
            word, _, item_id = line.partition(" ")
            if word == "OK":
                self.present.add(item_id)
            elif word == "DELETING":
                self.maybe_deleted.add(item_id)
            elif word == "DEL":
                self.maybe_deleted.discard(item_id)
                self.present.discard(item_id)
                self.deleted.add(item_id)

    def forget(self, item_id: str) -> None:
        """The checker itself deleted ``item_id``."""
        self.present.discard(item_id)
        self.deleted.add(item_id)

    def check(self, counts: dict[str, int]) -> list[str]:
        problems = []
        for item_id, n in counts.items():
            if n != 1:
                problems.append(f"{item_id} present {n} times")
            if item_id in self.deleted:
                problems.append(f"{item_id} deleted (acknowledged) but present")
            elif item_id not in self.present and item_id not in self.maybe_deleted \
                    and run_of(item_id) not in self.fresh_runs:
                problems.append(f"{item_id} present but never written in a run under check")
        for item_id in self.present:
            if item_id not in counts and item_id not in self.maybe_deleted:
                problems.append(f"{item_id} acknowledged but missing")
        # Resolve: from now on what is there must stay, what is not must never come back.
        for item_id in self.maybe_deleted:
            if item_id not in counts:
                self.present.discard(item_id)
                self.deleted.add(item_id)
        self.maybe_deleted.clear()
        self.present.update(i for i in counts if i not in self.deleted)
        self.fresh_runs.clear()
        return problems


class Output:
    """Serialised, flushed, line-at-a-time stdout (callable from any thread)."""

    def __init__(self, stream=None):
        self._out = stream or sys.stdout.buffer
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        data = (text + "\n").encode()
        with self._lock:
            self._out.write(data)
            self._out.flush()


class PowerLog:
    """A fileops observer that prints each durability point once it happened."""

    def __init__(self, out: Output):
        self.out = out

    def created(self, path: str) -> None:
        self.out.line(f"CREATE {path}")

    def synced(self, path: str, size: int) -> None:
        self.out.line(f"SYNC {path} {size}")

    def dir_synced(self, path: str) -> None:
        self.out.line(f"DIRSYNC {path}")

    def renamed(self, src: str, dst: str) -> None:
        self.out.line(f"RENAME {src} {dst}")

    def removed(self, path: str) -> None:
        self.out.line(f"REMOVE {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m intermail.testing.crashwriter", description=__doc__.split("\n")[0])
    p.add_argument("--mirrors", required=True, help="comma-separated mirror directories")
    p.add_argument("--run", type=int, required=True, help="run number, part of every id")
    p.add_argument("--tasks", type=int, default=32, help="concurrent committing tasks")
    p.add_argument("--power-log", action="store_true", help="print every durability point")
    p.add_argument("--segment-bytes", type=int, default=1 << 20)
    p.add_argument("--auto-checkpoint-bytes", type=int, default=0,
                   help="engine auto checkpoint threshold (0: off, the periodic one below still runs)")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="commits between background checkpoint()/compact() calls (0: never)")
    p.add_argument("--delete-ratio", type=float, default=0.1)
    p.add_argument("--blob-max", type=int, default=20000)
    p.add_argument("--no-preallocate", action="store_true", help="StoreOptions(preallocate=False)")
    p.add_argument("--count", type=int, default=0, help="stop after this many commits, close, exit 0")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


class Writer:
    def __init__(self, args: argparse.Namespace, out: Output):
        self.args = args
        self.out = out
        self.rng = random.Random(args.seed if args.seed is not None else args.run)
        self.store: Store | None = None
        self.commits = 0
        self.maintenance: asyncio.Task | None = None
        self.maintenance_runs = 0
        self.done = asyncio.Event()

    def options(self) -> StoreOptions:
        mirrors = tuple(os.path.abspath(m) for m in self.args.mirrors.split(",") if m)
        kwargs = {}
        if self.args.no_preallocate:
            kwargs["preallocate"] = False
        return StoreOptions(mirrors=mirrors, segment_bytes=self.args.segment_bytes,
                            auto_checkpoint_bytes=self.args.auto_checkpoint_bytes, **kwargs)

    def fail(self, exc: BaseException) -> None:
        """A store failure ends the process at once: nothing more is printed or written."""
        if isinstance(exc, FencedError):
            self.out.line("FENCED")
            os._exit(EXIT_FENCED)
        if isinstance(exc, MailError):
            self.out.line(f"ERROR {exc.kind.value} {exc.detail}".replace("\n", " "))
        else:
            self.out.line(f"ERROR exception {exc!r}".replace("\n", " "))
        os._exit(EXIT_ERROR)

    def counted(self) -> bool:
        """Count one returned commit; True once ``--count`` is reached."""
        self.commits += 1
        every = self.args.checkpoint_every
        if every and self.commits % every == 0 and (self.maintenance is None or self.maintenance.done()):
            self.maintenance_runs += 1
            self.maintenance = asyncio.get_running_loop().create_task(self.maintain(self.maintenance_runs))
        if self.args.count and self.commits >= self.args.count:
            self.done.set()
            return True
        return False

    async def maintain(self, n: int) -> None:
        try:
            if n % 3 == 0:
                await self.store.compact()
            else:
                await self.store.checkpoint()
        except BaseException as exc:  # noqa: BLE001 - any failure ends the writer
            self.fail(exc)

    async def task(self, t: int) -> None:
        args = self.args
        rng = random.Random(self.rng.random())
        mine: list[tuple[str, int]] = []
        n = 0
        store = self.store
        while not self.done.is_set():
            try:
                if mine and rng.random() < args.delete_ratio:
                    i = rng.randrange(len(mine))
                    mine[i], mine[-1] = mine[-1], mine[i]
                    item_id, blob = mine.pop()
                    # Announced first: if the process dies while this commit is in
                    # flight, the delete may or may not have become durable.
                    self.out.line(f"DELETING {item_id}")
                    txn = store.transaction()
                    kv.delete(txn, item_id, blob)
                    await txn.commit()
                    self.out.line(f"DEL {item_id}")
                else:
                    item_id = f"r{args.run}-t{t}-{n}"
                    n += 1
                    size = None if rng.random() < 0.1 else rng.randint(0, args.blob_max)
                    txn = store.transaction()
                    blob = kv.put(txn, item_id, None if size is None else body_for(item_id, size),
                                  value=value_for(size))
                    await txn.commit()
                    self.out.line(f"OK {item_id}")
                    mine.append((item_id, blob))
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, asyncio.CancelledError):
                    raise
                self.fail(exc)
            if self.counted():
                return

    async def run(self) -> int:
        fileops = FileOps(observer=PowerLog(self.out)) if self.args.power_log else FileOps()
        try:
            self.store = await Store.open(self.options(), kv.KvApplier(), fileops=fileops)
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc)
        self.out.line(f"READY {self.store.epoch}")
        await asyncio.gather(*(self.task(t) for t in range(self.args.tasks)))
        if self.maintenance is not None:
            await self.maintenance
        await self.store.close()
        self.out.line("DONE")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.power_log and any(c.isspace() for c in args.mirrors):
        print("--power-log needs mirror paths without whitespace", file=sys.stderr)
        return 2
    return asyncio.run(Writer(args, Output()).run())


if __name__ == "__main__":
    sys.exit(main())
