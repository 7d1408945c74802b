"""Simulated power loss over a store's mirror directories, from a durability log.

The writer (:mod:`intermail.testing.crashwriter` with ``--power-log``) prints
every durability point of the file layer in the order it happened:
``CREATE p``, ``SYNC p size``, ``DIRSYNC d``, ``RENAME src dst``,
``REMOVE p``.  After the writer was SIGKILLed, :func:`simulate_power_cut`
turns the files on disk (which hold everything the killed process wrote,
since the kernel's page cache survived the kill) into one state a machine
could hold after losing power at that moment.

The model (what a POSIX file system with ordinary semantics promises):

- **File data** is durable up to the last ``SYNC`` of that file (the size
  the observer reports is the extent written through the synced
  descriptor).  Bytes after it were written but not synced: each file
  independently keeps a random outcome for that tail — cut at the synced
  size; a random prefix of it kept; a random prefix kept with a random
  stretch of it replaced by garbage (a torn, partially written page); or
  the tail overwritten with zeros at the same size (what a preallocated
  file shows when the new data never reached the disk).
- **Names** created in this run (``CREATE``, or a ``RENAME`` onto a name
  that did not exist before) are durable only once a ``DIRSYNC`` of their
  directory followed.  A created name that never got one is deleted
  (usually; now and then it is kept, with its data cut as above — an entry
  the file system happened to commit on its own).  A rename that never got
  one is undone at random (the file goes back to its old name) or kept.
  A rename *over an existing* file is atomic on every journaling file
  system: after the cut the name holds the old or the new file, never
  nothing; we cannot restore the old bytes, so the new file stays — one of
  the two legal outcomes.
- **Removals** are taken as durable at once.  A removal whose directory was
  not yet synced could be undone by a real power cut; that would bring back
  an old file the engine had already given up (a retired segment, an old
  checkpoint or a spare), which we cannot recreate here: the model
  under-approximates that case.
- Files the log never mentions (written before this run, or outside the
  file layer such as ``LOCK``) are left alone: what happened before this run
  is taken as durable (the checker's own reopen closed the store cleanly).
- **The SQLite index** (``index.sqlite``, ``-wal``, ``-shm``) is left exactly
  as it is.  The engine applies a frame to the index only after the frame's
  flush (``fdatasync`` on every healthy mirror) returned, so the index is
  never ahead of the synced journal: whatever index state survives a power
  cut, it is the state after some prefix of what survives of the journal.
  It may lag (``synchronous=NORMAL``), which the engine's replay covers, and
  it is derived: a damaged index is thrown away and rebuilt from checkpoint
  plus journal.  Keeping it as is therefore only makes the test harder (the
  index holds everything up to the last applied frame, and recovery must
  agree with it).

Paths in the log must not contain whitespace (the writer refuses them).

Logs: nothing.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

INDEX_PREFIX = "index.sqlite"


@dataclass(frozen=True)
class Event:
    kind: str  # CREATE | SYNC | DIRSYNC | RENAME | REMOVE
    path: str
    other: str = ""  # RENAME: the destination
    size: int = 0  # SYNC: the synced extent


EVENT_KINDS = ("CREATE", "SYNC", "DIRSYNC", "RENAME", "REMOVE")


def parse_events(lines) -> list[Event]:
    """Durability events from the writer's output lines (other lines are ignored).

    ``lines`` are ``str`` or ``bytes``; an unterminated last line (the kill
    cut it) must already have been dropped by the caller.
    """
    events = []
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        parts = line.split()
        if not parts or parts[0] not in EVENT_KINDS:
            continue
        kind = parts[0]
        if kind == "SYNC" and len(parts) == 3:
            events.append(Event(kind, parts[1], size=int(parts[2])))
        elif kind == "RENAME" and len(parts) == 3:
            events.append(Event(kind, parts[1], other=parts[2]))
        elif kind in ("CREATE", "DIRSYNC", "REMOVE") and len(parts) == 2:
            events.append(Event(kind, parts[1]))
        else:
            raise ValueError(f"malformed durability line: {line!r}")
    return events


@dataclass
class _Name:
    """What the log says about one name."""

    durable: int | None = None  # synced extent; None: nothing synced through the log
    created: bool = False  # the file was created in this run
    pending: bool = False  # the name's directory entry is not yet synced
    renamed_from: str | None = None  # pending rename: the old name
    replaced: bool = False  # the pending rename replaced an existing file


@dataclass
class PowerCutReport:
    deleted: list[str] = field(default_factory=list)
    unrenamed: list[tuple[str, str]] = field(default_factory=list)
    tails: dict[str, str] = field(default_factory=dict)  # path -> what happened to its unsynced tail

    def summary(self) -> str:
        return (f"deleted={len(self.deleted)} unrenamed={len(self.unrenamed)} "
                f"tails={sorted(self.tails.items())}")


def _replay(events: list[Event], existing: set[str]) -> dict[str, _Name]:
    names: dict[str, _Name] = {}
    known = set(existing)  # names that exist (durably or not) at this point of the log
    for ev in events:
        if ev.kind == "CREATE":
            names[ev.path] = _Name(durable=0, created=True, pending=True)
            known.add(ev.path)
        elif ev.kind == "SYNC":
            state = names.setdefault(ev.path, _Name())
            state.durable = ev.size if state.durable is None else max(state.durable, ev.size)
        elif ev.kind == "DIRSYNC":
            d = os.path.normpath(ev.path)
            for path, state in names.items():
                if state.pending and os.path.dirname(os.path.normpath(path)) == d:
                    state.pending = False
                    state.renamed_from = None
                    state.replaced = False
        elif ev.kind == "RENAME":
            state = names.pop(ev.path, None) or _Name()
            replaced = ev.other in known and not (ev.other in names and names[ev.other].pending
                                                 and names[ev.other].created)
            was_pending_create = state.created and state.pending and state.renamed_from is None
            state.renamed_from = None if was_pending_create else ev.path
            state.replaced = replaced
            state.pending = True
            names[ev.other] = state
            known.discard(ev.path)
            known.add(ev.other)
        elif ev.kind == "REMOVE":
            names.pop(ev.path, None)
            known.discard(ev.path)
    return names


def _cut_tail(path: str, durable: int, rng: random.Random) -> str | None:
    """Give the bytes of ``path`` past ``durable`` a random power-loss outcome."""
    size = os.path.getsize(path)
    if size <= durable:
        return None
    mode = rng.choice(("cut", "prefix", "garble", "garble", "zeros"))
    if mode == "zeros":
        with open(path, "r+b") as f:
            f.seek(durable)
            left = size - durable
            while left:
                n = min(left, 1 << 20)
                f.write(bytes(n))
                left -= n
        return f"zeros {durable}..{size}"
    new_len = durable if mode == "cut" else rng.randint(durable, size)
    with open(path, "r+b") as f:
        f.truncate(new_len)
        if mode == "garble" and new_len > durable:
            start = rng.randint(durable, new_len - 1)
            end = rng.randint(start + 1, new_len)
            f.seek(start)
            f.write(rng.randbytes(end - start) if rng.random() < 0.8 else bytes(end - start))
            return f"garble keep {durable}..{new_len} of {size}, garbage {start}..{end}"
    return f"{mode} {durable}..{new_len} of {size}"


def _walk(mirror_dirs) -> list[str]:
    paths = []
    for top in mirror_dirs:
        for root, _dirs, files in os.walk(top):
            paths.extend(os.path.join(root, f) for f in files)
    return paths


def simulate_power_cut(events: list[Event], mirror_dirs, rng: random.Random,
                       existing: set[str] | None = None) -> PowerCutReport:
    """Make ``mirror_dirs`` look like a machine that lost power after ``events``.

    ``existing``: absolute paths that existed before the run (to tell a
    rename onto a new name from one over an existing file); by default the
    names the log does not create are taken as pre-existing.
    """
    report = PowerCutReport()
    mirror_dirs = [os.path.abspath(d) for d in mirror_dirs]
    on_disk = set(_walk(mirror_dirs))
    if existing is None:
        created = {ev.path for ev in events if ev.kind == "CREATE"} | {ev.other for ev in events
                                                                      if ev.kind == "RENAME"}
        existing = on_disk - created
    names = _replay(events, existing)

    def ours(path: str) -> bool:
        return any(path == d or path.startswith(d + os.sep) for d in mirror_dirs)

    # 1. Names whose directory entry never became durable.
    for path, state in sorted(names.items()):
        if not state.pending or not ours(path) or not os.path.exists(path):
            continue
        if state.renamed_from is not None and not state.replaced:
            if rng.random() < 0.5 and not os.path.exists(state.renamed_from):
                os.rename(path, state.renamed_from)  # the rename never reached the disk
                report.unrenamed.append((state.renamed_from, path))
                names[state.renamed_from] = state
                state.pending = False
            continue
        if state.replaced:
            continue  # atomic replacement: old or new; we keep the new (see the docstring)
        if state.created and rng.random() < 0.75:
            os.unlink(path)
            report.deleted.append(path)

    # 2. Unsynced tails.
    for path in _walk(mirror_dirs):
        if os.path.basename(path).startswith(INDEX_PREFIX):
            continue  # the derived index: see the docstring
        state = names.get(path)
        if state is None or state.durable is None:
            continue  # not written through the log in this run: durable as it is
        outcome = _cut_tail(path, state.durable, rng)
        if outcome:
            report.tails[path] = outcome
    return report


def read_complete_lines(path: str) -> list[str]:
    """The writer's output lines that were complete when it died (a kill can cut the last one)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        return []
    return data[:end].decode("utf-8", "replace").split("\n")
