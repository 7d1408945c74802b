"""fsck for a message store: every index row checked against journal and blobs; repair by rebuilding.

Owns: the offline check of one store's mirror directories (``intermail
fsck --store-dir DIR [--repair] [--json]``).  The check writes nothing: it
scans every segment on every mirror (frame CRCs, seqs +1), replays
checkpoint + journal into a scratch index (the truth, I-3), compares the
store's own index with it (missing, damaged, or different rows), and checks
the replayed state: each blob's SHA-256 on every mirror, UIDs below UIDNEXT
and MODSEQs below HIGHESTMODSEQ, messages whose blob is gone, blobs no
message uses (orphans), each message's size against its blob (quota usage is
the sum of sizes).

``--repair`` (the store must not be served meanwhile: it takes the store
over, as a spare would) rewrites damaged frames from a mirror holding a good
copy, removes temp files, rebuilds the index from checkpoint + journal, and
frees orphan blobs; then checks again.  What no mirror holds intact cannot
be repaired (restore it from a backup).

Report (``--json``)::

    {"ok": true, "problems": [{"kind": "...", "detail": "...", "repairable": bool}],
     "repaired": [...], "seq": N,
     "mailboxes": [{"user": "a@x", "mailbox": "INBOX", "messages": 30, "uidvalidity": N, "uidnext": N}]}

Logs: nothing (a CLI tool: the report is its output).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field

from intermail.mailstore.index import MailIndex
from intermail.storage import checkpoint as ckpt
from intermail.storage import records as rec
from intermail.storage.backup import iter_frames, store_mirrors
from intermail.storage.index import Index, connect, digest, remove_index_files
from intermail.storage.journal import MIRRORS_FILE, SEALS_FILE, parse_segment_name, segment_name

__all__ = ["fsck", "check", "repair"]

INDEX_FILE = "index.sqlite"


@dataclass
class _Damage:
    mirror: str
    segment: int
    offset: int  # first bad byte on that mirror (a frame start)
    good: str | None  # a mirror with the valid frame there
    length: int = 0  # bytes of the good frame


@dataclass
class Report:
    problems: list[dict] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    mailboxes: list[dict] = field(default_factory=list)
    seq: int = 0
    damage: list[_Damage] = field(default_factory=list)
    orphan_blobs: list[int] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str, repairable: bool = True) -> None:
        self.problems.append({"kind": kind, "detail": detail, "repairable": repairable})

    def as_dict(self) -> dict:
        return {"ok": not self.problems, "problems": self.problems, "repaired": self.repaired,
                "seq": self.seq, "mailboxes": self.mailboxes}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _segment_ends(mirrors: list[str], numbers: list[int]) -> dict[int, int | None]:
    """The sealed end of each segment (None: the last one, which ends at its last valid frame)."""
    seals: dict[int, int] = {}
    for m in mirrors:
        seals.update({int(k): int(v) for k, v in _read_json(os.path.join(m, SEALS_FILE)).items()})
    ends: dict[int, int | None] = {}
    for i, n in enumerate(numbers):
        if i + 1 == len(numbers):
            ends[n] = None
        elif numbers[i + 1] == n + 1:
            ends[n] = None
            for m in mirrors:
                try:
                    with open(os.path.join(m, segment_name(n + 1)), "rb") as f:
                        ends[n] = rec.SegmentHeader.decode(f.read(rec.SEG_HEADER_SIZE)).prev_end
                        break
                except (OSError, rec.FrameError):
                    continue
        else:
            ends[n] = seals.get(n)
    return ends


def _scan_mirror(path: str, end: int | None) -> tuple[list, int]:
    """Valid frames of one copy of a segment and where they stop."""
    frames = []
    stop = rec.SEG_HEADER_SIZE
    try:
        with open(path, "rb") as f:
            rec.SegmentHeader.decode(f.read(rec.SEG_HEADER_SIZE))
    except (OSError, rec.FrameError):
        return [], 0
    for frame in iter_frames(path, rec.SEG_HEADER_SIZE, None):
        if end is not None and frame.offset + frame.size > end:
            break
        frames.append(frame)
        stop = frame.offset + frame.size
    return frames, stop


def _usable_mirrors(mirrors: list[str]) -> list[str]:
    """Mirrors not recorded as degraded by another one (their files are not trusted)."""
    degraded: set[str] = set()
    for m in mirrors:
        state = _read_json(os.path.join(m, MIRRORS_FILE))
        degraded |= {p for p in state if p != m}
    usable = [m for m in mirrors if os.path.isdir(m) and m not in degraded]
    return usable or [m for m in mirrors if os.path.isdir(m)]


def check(mirrors: list[str] | tuple[str, ...], index_path: str | None = None) -> Report:
    """Check a store that nobody writes; writes nothing."""
    mirrors = [os.path.abspath(m) for m in mirrors]
    report = Report()
    usable = _usable_mirrors(mirrors)
    if not usable:
        report.add("store_missing", f"no mirror directory exists: {mirrors}", repairable=False)
        return report
    for m in mirrors:
        if m not in usable:
            report.add("mirror_unusable", f"{m}: missing or recorded as degraded", repairable=True)
    numbers = sorted({n for m in usable for n in map(parse_segment_name, os.listdir(m)) if n is not None})
    for m in usable:
        report.temp_files += [os.path.join(m, n) for n in os.listdir(m) if n.endswith(".tmp")]
    for path in report.temp_files:
        report.add("orphan_file", f"{path}: a temp file left by a crash")
    ends = _segment_ends(usable, numbers)
    journal: list[tuple[int, str, int, int, int]] = []  # (seq, mirror, segment, offset, size)
    for n in numbers:
        copies = {m: _scan_mirror(os.path.join(m, segment_name(n)), ends[n]) for m in usable}
        best = max(usable, key=lambda m: copies[m][1])
        frames, stop = copies[best]
        target = ends[n] if ends[n] is not None else stop
        if stop < target:
            report.add("journal_corrupt", f"segment {n}: no mirror holds a valid frame at offset {stop}"
                       f" (sealed end {target}); frames after it are lost", repairable=False)
        for m in usable:
            if m is best or copies[m][1] >= stop:
                continue
            bad = copies[m][1]
            frame = next((f for f in frames if f.offset == bad), None)
            if not os.path.exists(os.path.join(m, segment_name(n))):
                bad = 0
            report.damage.append(_Damage(m, n, bad, best, frame.size if frame else 0))
            report.add("frame_corrupt" if bad else "segment_missing",
                       f"{m}: segment {n}: " + (f"invalid frame at offset {bad} (valid copy on {best})" if bad
                                                else f"missing (copy on {best})"))
        journal += [(f.seq, best, n, f.offset, f.size) for f in frames]
    _check_seqs(report, journal, usable)
    with tempfile.TemporaryDirectory(prefix="fsck-") as tmp:
        _check_index(report, usable, journal, index_path or os.path.join(mirrors[0], INDEX_FILE), tmp)
    return report


def _check_seqs(report: Report, journal: list, mirrors: list[str]) -> None:
    cps = ckpt.list_seqs(_FileOpsLite(), mirrors)
    floor = cps[-1] if cps else 0
    expected = None
    for seq, _, n, offset, _ in journal:
        if expected is not None and seq != expected and seq > floor:
            report.add("journal_gap", f"segment {n} offset {offset}: seq {seq} where {expected} was expected",
                       repairable=False)
            return
        expected = seq + 1


class _FileOpsLite:
    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_all(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()


def _frames_for_apply(journal: list, after: int, upto: int | None):
    handles: dict[tuple[str, int], int] = {}
    try:
        for seq, mirror, n, offset, size in journal:
            if seq <= after:
                continue
            if upto is not None and seq > upto:
                break
            key = (mirror, n)
            if key not in handles:
                handles[key] = os.open(os.path.join(mirror, segment_name(n)), os.O_RDONLY)
            frame = rec.decode_frame(os.pread(handles[key], size, offset))
            yield seq, n, offset, [(r.rtype, r.payload) for r in frame.records]
    finally:
        for fd in handles.values():
            os.close(fd)


def _replay(index: Index, journal: list, upto: int | None) -> None:
    batch = []
    for item in _frames_for_apply(journal, index.applied_seq, upto):
        batch.append(item)
        if len(batch) >= 1000:
            index.apply_batch(batch, 1)
            batch = []
    if batch:
        index.apply_batch(batch, 1)


def _reference(mirrors: list[str], journal: list, path: str, report: Report) -> Index:
    index = Index(path, MailIndex())
    index.open()
    index.claim(1)
    for seq in reversed(ckpt.list_seqs(_FileOpsLite(), mirrors)):
        for m in mirrors:
            try:
                records = ckpt.read(_FileOpsLite(), m, seq)
            except (OSError, rec.FrameError):
                report.add("checkpoint_corrupt", f"{m}: checkpoint {seq} unreadable")
                continue
            index.load_checkpoint(seq, records, 1)
            return index
    return index


def _check_index(report: Report, mirrors: list[str], journal: list, index_path: str, tmp: str) -> None:
    ref = _reference(mirrors, journal, os.path.join(tmp, "reference.sqlite"), report)
    last = journal[-1][0] if journal else ref.applied_seq
    # The store's own index, on a copy (opening it could change it: WAL recovery).
    if not os.path.exists(index_path):
        report.add("index_missing", f"{index_path}: missing (rebuilt by --repair)")
        own = None
    else:
        copy = os.path.join(tmp, "index.sqlite")
        for suffix in ("", "-wal"):
            if os.path.exists(index_path + suffix):
                shutil.copyfile(index_path + suffix, copy + suffix)
        own = None
        try:
            own = connect(copy)
            problems = [r[0] for r in own.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            row = own.execute("SELECT value FROM _engine WHERE key='applied_seq'").fetchone()
            applied = row[0] if row else 0
        except sqlite3.DatabaseError as exc:
            report.add("index_damaged", f"{index_path}: {exc} (rebuilt by --repair)")
            if own is not None:
                own.close()
            own = None
    if own is not None:
        if applied > last:
            report.add("index_ahead", f"{index_path}: at seq {applied}, the journal ends at {last}")
        elif applied < ref.applied_seq:
            report.add("index_behind_checkpoint", f"{index_path}: at seq {applied}, the checkpoint at {ref.applied_seq}")
        else:
            _replay(ref, journal, applied)
            if digest(own) != digest(ref.conn):
                report.add("index_mismatch", f"{index_path}: rows differ from the journal at seq {applied}: "
                           + _row_diff(own, ref.conn))
        own.close()
    _replay(ref, journal, None)
    report.seq = ref.applied_seq
    _check_state(report, mirrors, ref.conn)
    ref.close()


def _row_diff(a: sqlite3.Connection, b: sqlite3.Connection) -> str:
    out = []
    for table, cols in (("messages", "mailbox, uid, blob, size, modseq, flags"),
                        ("mailboxes", "id, user, name, uidvalidity, uidnext, highestmodseq"),
                        ("_blobs", "id, segment, offset, length")):
        try:
            ra = set(a.execute(f"SELECT {cols} FROM {table}"))
        except sqlite3.Error:
            ra = set()
        rb = set(b.execute(f"SELECT {cols} FROM {table}"))
        if ra != rb:
            out.append(f"{table}: {len(ra - rb)} extra, {len(rb - ra)} missing"
                       f" (e.g. {sorted(ra - rb)[:2]} / {sorted(rb - ra)[:2]})")
    return "; ".join(out) or "engine counters"


def _check_state(report: Report, mirrors: list[str], conn: sqlite3.Connection) -> None:
    boxes = {row[0]: row for row in conn.execute(
        "SELECT id, user, name, uidvalidity, uidnext, highestmodseq FROM mailboxes")}
    counts = dict(conn.execute("SELECT mailbox, count(*) FROM messages GROUP BY mailbox"))
    for box_id, user, name, uidvalidity, uidnext, _ in sorted(boxes.values(), key=lambda r: (r[1], r[2])):
        report.mailboxes.append({"user": user, "mailbox": name, "messages": counts.get(box_id, 0),
                                 "uidvalidity": uidvalidity, "uidnext": uidnext})
    for mailbox, uid, modseq in conn.execute("SELECT mailbox, uid, modseq FROM messages"):
        box = boxes.get(mailbox)
        if box is None:
            report.add("message_orphan", f"message uid {uid} in mailbox id {mailbox}, which does not exist",
                       repairable=False)
        elif not 0 < uid < box[4] or modseq > box[5]:
            report.add("uid_order", f"{box[1]} {box[2]}: uid {uid} (uidnext {box[4]}), modseq {modseq}"
                       f" (highest {box[5]})", repairable=False)
    validities = [b[3] for b in boxes.values()]
    if len(set(validities)) != len(validities):
        report.add("uidvalidity_reused", "two mailboxes share a UIDVALIDITY", repairable=False)
    for mailbox, uid, blob in conn.execute(
            "SELECT m.mailbox, m.uid, m.blob FROM messages m LEFT JOIN _blobs b ON b.id = m.blob WHERE b.id IS NULL"):
        report.add("blob_missing", f"mailbox id {mailbox} uid {uid}: blob {blob} is not in the journal",
                   repairable=False)
    for (blob,) in conn.execute(
            "SELECT b.id FROM _blobs b WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.blob = b.id)"):
        report.orphan_blobs.append(blob)
        report.add("blob_orphan", f"blob {blob} is used by no message (freed by --repair)")
    for mailbox, uid, size, length in conn.execute(
            "SELECT m.mailbox, m.uid, m.size, b.length FROM messages m JOIN _blobs b ON b.id = m.blob"
            " WHERE m.size != b.length"):
        report.add("quota_size", f"mailbox id {mailbox} uid {uid}: size {size} but blob length {length}"
                   " (quota usage is wrong)", repairable=False)
    fds: dict[tuple[str, int], int] = {}
    try:
        for blob, segment, offset, length, sha in conn.execute(
                "SELECT id, segment, offset, length, sha256 FROM _blobs ORDER BY segment, offset"):
            good = []
            bad = []
            for m in mirrors:
                key = (m, segment)
                try:
                    if key not in fds:
                        fds[key] = os.open(os.path.join(m, segment_name(segment)), os.O_RDONLY)
                    ok = hashlib.sha256(os.pread(fds[key], length, offset)).digest() == sha
                except OSError:
                    ok = False
                (good if ok else bad).append(m)
            for m in bad:
                report.add("blob_corrupt", f"{m}: blob {blob} (segment {segment} offset {offset}): checksum"
                           + (f" mismatch (good copy on {good[0]})" if good else " mismatch on every mirror"),
                           repairable=bool(good))
    finally:
        for fd in fds.values():
            os.close(fd)


# -- repair ---------------------------------------------------------------------------------------


def _in_use(mirrors: list[str]) -> list[int]:
    """Pids of processes holding files open in the store (Linux /proc)."""
    pids = []
    prefixes = tuple(os.path.join(os.path.realpath(m), "") for m in mirrors)
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefixes):
                    pids.append(int(pid))
                    break
        except OSError:
            continue
    return pids


def _repair_frames(report: Report) -> None:
    for d in report.damage:
        if d.good is None:
            continue
        src = os.path.join(d.good, segment_name(d.segment))
        dst = os.path.join(d.mirror, segment_name(d.segment))
        if d.offset == 0 or not os.path.exists(dst):
            shutil.copyfile(src, dst)
        else:
            # Copy from the first bad frame to the good copy's end: later frames were never checked here.
            size = os.path.getsize(src)
            with open(src, "rb") as s, open(dst, "r+b") as f:
                s.seek(d.offset)
                f.seek(d.offset)
                shutil.copyfileobj(s, f, 1 << 20)
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
        report.repaired.append(f"{d.mirror}: segment {d.segment} rewritten from offset {d.offset} from {d.good}")


async def _rebuild(mirrors: list[str], orphan_blobs: list[int], index_path: str | None) -> list[str]:
    from intermail.storage import StoreOptions
    from intermail.storage.engine import Store
    done = []
    options = StoreOptions(mirrors=tuple(mirrors), index_path=index_path)
    remove_index_files(options.index_file())
    store = await Store.open(options, MailIndex())
    try:
        done.append(f"index rebuilt from checkpoint + journal (seq {store.applied_seq})")
        # Blobs whose every copy is bad on some mirror: reading repairs them from a good one.
        ids = await store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM _blobs")])
        for blob in ids:
            await store.read_blob(blob)
        if orphan_blobs:
            txn = store.transaction()
            for blob in orphan_blobs:
                txn.free_blob(blob)
            await txn.commit()
            done.append(f"{len(orphan_blobs)} orphan blobs freed")
    finally:
        await store.close()
    return done


def repair(mirrors: list[str] | tuple[str, ...], index_path: str | None = None) -> Report:
    mirrors = [os.path.abspath(m) for m in mirrors]
    users = _in_use(mirrors)
    if users:
        report = Report()
        report.add("store_in_use", f"processes {users} have the store open: stop its mssd first",
                   repairable=False)
        return report
    first = check(mirrors, index_path)
    if not first.problems:
        return first
    for path in first.temp_files:
        os.unlink(path)
        first.repaired.append(f"{path} removed")
    _repair_frames(first)
    done = asyncio.run(_rebuild(_usable_mirrors(mirrors), first.orphan_blobs, index_path))
    after = check(mirrors, index_path)
    after.repaired = first.repaired + done
    return after


def fsck(store_dir: str | list[str], *, do_repair: bool = False) -> dict:
    """``intermail fsck``: check (and with ``do_repair``, mend) the store at ``store_dir``."""
    mirrors = list(store_mirrors(store_dir))
    report = repair(mirrors) if do_repair else check(mirrors)
    return report.as_dict()


def reference_digest(store_dir: str, upto: int | None = None) -> str:
    """Digest of the state replayed from checkpoint + journal (to ``upto``): the truth the index must equal."""
    mirrors = _usable_mirrors([os.path.abspath(m) for m in store_mirrors(store_dir)])
    numbers = sorted({n for m in mirrors for n in map(parse_segment_name, os.listdir(m)) if n is not None})
    ends = _segment_ends(mirrors, numbers)
    journal = []
    for n in numbers:
        frames, _ = _scan_mirror(os.path.join(mirrors[0], segment_name(n)), ends[n])
        journal += [(f.seq, mirrors[0], n, f.offset, f.size) for f in frames]
    with tempfile.TemporaryDirectory(prefix="fsck-") as tmp:
        ref = _reference(mirrors, journal, os.path.join(tmp, "ref.sqlite"), Report())
        _replay(ref, journal, upto)
        try:
            return digest(ref.conn)
        finally:
            ref.close()
