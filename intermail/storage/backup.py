"""Online backup and point-in-time restore of a journaled store (I-7).

Owns: the backup directory format, taking a backup from a running
:class:`~intermail.storage.engine.Store` without stopping its writers, and
writing a new store directory from a chain of backups cut at any seq.

A backup is a directory holding byte ranges ("extents") of journal segment
files, at most one checkpoint file, and ``MANIFEST.json``, written last (a
backup without its manifest does not exist)::

    {"format": 1, "kind": "full"|"incremental", "id": "...", "store": "mss1",
     "created": 1700000000.0, "epoch": 4,
     "first_seq": C,        # full: the checkpoint's seq (0: none); incremental: base seq
     "seq": S,              # the consistent point: every frame <= S, nothing after
     "base": null | {"id": "...", "seq": B},
     "checkpoint": null | {"file": "c….ckpt", "seq": C, "bytes": N, "sha256": "..."},
     "extents": [{"segment": n, "start": off, "end": off, "file": "...",
                  "first_seq": a, "last_seq": b, "bytes": N, "sha256": "..."}],
     "verified": true}

Consistency: the point is ``S`` = the last acknowledged seq when the backup
starts, so the backup holds exactly the acknowledged state at ``S`` (I-1:
every frame <= S is synced).  Segments before the current one never change
once sealed, and the current one only grows, so the copy runs beside the
writers on its own thread; retirement is held off meanwhile
(``Store._no_retire``).  A full backup is the latest checkpoint at or before
``S`` plus every segment present (what ``Store.open`` itself needs); an
incremental holds the frames after its base's seq.  So that those frames
are still there at the next incremental, the store keeps (``BACKUP`` file in
each mirror, read by retirement) every segment holding frames after its
last backup's seq.

Restore lays the extents of a full and its incrementals back at their
offsets (segment numbers and offsets are the original ones, so the
checkpoint's blob locations stay valid), cuts the journal after the wanted
seq, and lets ``Store.open`` rebuild the index by replay (I-3).

Every extent is verified while it is copied (each frame's CRCs, seqs +1)
and again after it is written (its SHA-256 re-read from disk).

Logs: ``storage.backup`` (kind, seq, bytes, seconds), ``storage.restored``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from intermail.errors import ErrorKind, MailError
from intermail.storage import checkpoint as ckpt
from intermail.storage import records as rec
from intermail.storage.fence import EPOCH_FILE
from intermail.storage.journal import SEALS_FILE, segment_name

log = logging.getLogger("intermail.storage")

FORMAT = 1
MANIFEST = "MANIFEST.json"
STATE_FILE = "BACKUP"  # in each mirror: the store's last backup {"id", "seq", "dir", "kind", "time"}
CHUNK = 4 << 20


class BackupError(MailError):
    def __init__(self, detail: str):
        super().__init__(ErrorKind.INVALID, safe=detail, detail=detail)


# -- reading frames from files -------------------------------------------------------------------


@dataclass(frozen=True)
class FramePos:
    seq: int
    offset: int
    size: int


def iter_frames(path: str, start: int, end: int | None = None, *, verify: bool = True) -> Iterator[FramePos]:
    """Frames of a segment file from ``start`` up to ``end`` (None: until the first invalid frame).

    With ``end``, a frame that is invalid (or crosses ``end``) before it raises
    ``rec.FrameError``.  ``verify`` checks body CRCs too (else headers only).
    """
    with open(path, "rb", buffering=0) as f:
        buf = b""
        buf_at = start  # file offset of buf[0]
        pos = start
        while end is None or pos < end:
            need = pos - buf_at + rec.FRAME_HEADER_SIZE
            if len(buf) < need:
                buf = buf[pos - buf_at:] + _pread(f, pos + len(buf) - (pos - buf_at), max(CHUNK, rec.FRAME_HEADER_SIZE))
                buf_at = pos
            try:
                seq, _, size = rec.frame_header(buf, pos - buf_at)
                if end is not None and pos + size > end:
                    raise rec.FrameError("frame crosses the end")
                if len(buf) - (pos - buf_at) < size:
                    buf = buf[pos - buf_at:]
                    buf_at = pos
                    buf += _pread(f, pos + len(buf), max(CHUNK, size - len(buf)))
                    if len(buf) < size:
                        raise rec.FrameError("frame truncated")
                if verify:
                    rec.decode_frame(memoryview(buf)[pos - buf_at: pos - buf_at + size])
            except rec.FrameError:
                if end is None:
                    return
                raise
            yield FramePos(seq, pos, size)
            pos += size


def _pread(f, offset: int, length: int) -> bytes:
    return os.pread(f.fileno(), length, offset)


def segment_first_seq(path: str) -> int:
    with open(path, "rb") as f:
        return rec.SegmentHeader.decode(f.read(rec.SEG_HEADER_SIZE)).first_seq


def sha256_file(path: str, start: int = 0, end: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        pos = start
        while end is None or pos < end:
            data = os.pread(f.fileno(), CHUNK if end is None else min(CHUNK, end - pos), pos)
            if not data:
                break
            h.update(data)
            pos += len(data)
    return h.hexdigest()


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise BackupError(f"{directory}: not a backup (no {MANIFEST})") from None
    except ValueError as exc:
        raise BackupError(f"{path}: unreadable manifest: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: unsupported backup format {manifest.get('format')}")
    manifest["dir"] = os.path.abspath(directory)
    return manifest


def read_state(mirrors: list[str]) -> dict | None:
    """The store's last backup (the latest ``BACKUP`` file among the mirrors), or None."""
    best = None
    for mirror in mirrors:
        try:
            with open(os.path.join(mirror, STATE_FILE)) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if best is None or doc.get("seq", 0) > best.get("seq", 0):
            best = doc
    return best


def retention_seq(mirrors: list[str]) -> int | None:
    """Segments holding frames after this seq must be kept for the next incremental (None: no pin)."""
    state = read_state(mirrors)
    return int(state["seq"]) if state else None


# -- taking a backup (inside the store's process) -------------------------------------------------


@dataclass
class _Plan:
    seq: int
    epoch: int
    source: list[str]  # healthy mirror directories (the first is read; the others are fallbacks)
    segments: list[tuple[int, int, int]]  # (number, first_seq, end) in number order
    checkpoint_seq: int


async def take_backup(store, dest: str, kind: str, *, base: dict | None = None, identity: str = "",
                      rate_bytes: int = 0) -> dict:
    """Write a backup of the running ``store`` into ``dest``; return its manifest.

    ``kind`` is ``full`` or ``incremental``; an incremental's ``base``
    (``{"id", "seq"}``) defaults to the store's last backup.  ``rate_bytes``
    (bytes/s, 0: unlimited) bounds the copy, to spare the writers' disk.
    """
    import asyncio

    if kind not in ("full", "incremental"):
        raise BackupError(f"unknown backup kind {kind!r}")
    store._check_usable()
    mirror_paths = [m.path for m in store.journal.healthy()]
    if kind == "incremental":
        if base is None:
            base = read_state(mirror_paths)
            if base is None:
                raise BackupError("no previous backup of this store: take a full backup first (or give a base)")
        base = {"id": base.get("id", ""), "seq": int(base["seq"])}
    began = time.monotonic()
    store._no_retire += 1  # first: no checkpoint or segment we may need goes from now on
    try:
        seq = store._acked_seq  # every frame up to here is synced on every healthy mirror (I-1)
        if kind == "incremental" and base["seq"] > seq:
            raise BackupError(f"base seq {base['seq']} is past the store's last seq {seq}")
        plan = await asyncio.to_thread(_plan, store, seq)
        manifest = await asyncio.to_thread(_write_backup, plan, dest, kind, base, identity, rate_bytes)
        store._check_fence()  # a fenced owner records nothing (I-6)
        state = {"id": manifest["id"], "seq": seq, "kind": kind, "dir": os.path.abspath(dest),
                 "time": manifest["created"]}
        payload = json.dumps(state).encode()
        for mirror in store.journal.healthy():
            store.fileops.write_atomic(os.path.join(mirror.path, STATE_FILE), payload)
    finally:
        store._no_retire -= 1
    seconds = time.monotonic() - began
    manifest["seconds"] = round(seconds, 3)
    log.info("storage.backup", extra={"event": "storage.backup", "kind": kind, "seq": seq,
                                      "bytes": manifest["bytes"], "seconds": round(seconds, 3)})
    return manifest


def _plan(store, seq: int) -> _Plan:
    with store._io_lock:  # a moment: the segment list and the current end, consistent
        journal = store.journal
        segments = []
        for n in sorted(journal.segments):
            s = journal.segments[n]
            end = s.end if s is not journal.current else journal.current.end
            segments.append((n, s.first_seq, end))
        source = [m.path for m in journal.healthy()]
    ckpts = [c for c in ckpt.list_seqs(store.fileops, source) if c <= seq]
    return _Plan(seq, store.epoch, source, segments, ckpts[-1] if ckpts else 0)


class _Throttle:
    def __init__(self, rate: int):
        self.rate = rate
        self.began = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        if self.rate:
            ahead = self.done / self.rate - (time.monotonic() - self.began)
            if ahead > 0:
                time.sleep(ahead)


def _write_backup(plan: _Plan, dest: str, kind: str, base: dict | None, identity: str, rate: int) -> dict:
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise BackupError(f"{dest} is not empty: a backup goes into a new directory")
    throttle = _Throttle(rate)
    after = base["seq"] if base else None
    segs = [s for s in plan.segments if s[1] <= plan.seq]
    if after is not None and after >= plan.seq:
        segs = []  # nothing new since the base (an idle store): an empty incremental
    elif after is not None:
        # Segments holding frames after the base: every one whose successor starts past base+1.
        wanted = []
        for i, (n, first, end) in enumerate(segs):
            nxt = segs[i + 1][1] if i + 1 < len(segs) else None
            if nxt is None or nxt > after + 1:
                wanted.append((n, first, end))
        if not wanted or wanted[0][1] > after + 1:
            raise BackupError(f"the journal after seq {after} is no longer complete (retired);"
                              " take a full backup")
        segs = wanted
    extents = []
    total = 0
    for n, first, end in segs:
        extent = _copy_extent(plan, dest, n, end, after, throttle)
        if extent is not None:
            extents.append(extent)
            total += extent["bytes"]
    checkpoint = None
    if kind == "full" and plan.checkpoint_seq:
        name = ckpt.name(plan.checkpoint_seq)
        data = _read_any(plan.source, name)
        ckpt_path = os.path.join(dest, name)
        with open(ckpt_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        checkpoint = {"file": name, "seq": plan.checkpoint_seq, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()}
        total += len(data)
    _fsync_path(dest, directory=True)
    manifest = {
        "format": FORMAT, "kind": kind, "id": uuid.uuid4().hex, "store": identity,
        "created": time.time(), "epoch": plan.epoch, "seq": plan.seq,
        "first_seq": after if after is not None else plan.checkpoint_seq,
        "base": base, "checkpoint": checkpoint, "extents": extents, "bytes": total,
        "segment_format": rec.FORMAT_VERSION,
    }
    if kind == "full":
        _check_full_chain(manifest)
    verify_backup({**manifest, "dir": dest}, deep=False)  # re-read from disk: sizes and SHA-256
    manifest["verified"] = True
    write_json_atomic(os.path.join(dest, MANIFEST), manifest)
    return manifest


def _check_full_chain(manifest: dict) -> None:
    frames = [(e["first_seq"], e["last_seq"]) for e in manifest["extents"] if e["last_seq"]]
    if manifest["seq"] and (not frames or frames[-1][1] != manifest["seq"]):
        raise BackupError(f"backup does not reach seq {manifest['seq']}")


def _read_any(sources: list[str], name: str) -> bytes:
    errors = []
    for mirror in sources:
        try:
            with open(os.path.join(mirror, name), "rb") as f:
                return f.read()
        except OSError as exc:
            errors.append(str(exc))
    raise MailError(ErrorKind.TEMP, detail=f"{name}: unreadable on every mirror: {errors}")


def _copy_extent(plan: _Plan, dest: str, segment: int, end: int, after: int | None,
                 throttle: _Throttle) -> dict | None:
    """Copy segment ``segment`` (frames after ``after``, up to seq ``plan.seq``), verified frame by frame."""
    name = segment_name(segment)
    errors = []
    for mirror in plan.source:
        path = os.path.join(mirror, name)
        try:
            start = 0
            first = last = 0
            stop = None
            for frame in iter_frames(path, rec.SEG_HEADER_SIZE, end):
                if after is not None and frame.seq <= after:
                    start = frame.offset + frame.size
                    continue
                if frame.seq > plan.seq:
                    stop = frame.offset
                    break
                first = first or frame.seq
                last = frame.seq
            stop = end if stop is None else stop
            if after is not None and start == 0 and segment_first_seq(path) <= after:
                start = rec.SEG_HEADER_SIZE  # the header (and no frame after the base) came before
            if after is not None and first == 0 and start >= stop:
                return None  # nothing after the base in this segment
            out_name = f"{name}@{start}"
            out = os.path.join(dest, out_name)
            h = hashlib.sha256()
            with open(path, "rb", buffering=0) as src, open(out, "wb") as dst:
                pos = start
                while pos < stop:
                    data = os.pread(src.fileno(), min(CHUNK, stop - pos), pos)
                    if not data:
                        raise OSError(f"{path} shorter than {stop}")
                    dst.write(data)
                    h.update(data)
                    pos += len(data)
                    throttle.add(len(data))
                dst.flush()
                os.fsync(dst.fileno())
            # The bytes copied are the bytes verified only if the file did not change
            # under us: sealed ranges never do; check the copy's frames again.
            for _ in iter_frames(out, 0 if start else rec.SEG_HEADER_SIZE, stop - start):
                pass
            return {"segment": segment, "start": start, "end": stop, "file": out_name,
                    "first_seq": first, "last_seq": last, "bytes": stop - start, "sha256": h.hexdigest()}
        except (OSError, rec.FrameError) as exc:
            errors.append(f"{path}: {exc}")
    raise MailError(ErrorKind.TEMP, detail=f"segment {segment}: no intact copy: {'; '.join(errors)}")


def verify_backup(manifest: dict, deep: bool = True) -> None:
    """Check every file of a backup against its manifest; ``deep`` also checks every frame."""
    directory = manifest["dir"]
    for extent in manifest["extents"]:
        path = os.path.join(directory, extent["file"])
        try:
            size = os.path.getsize(path)
        except OSError:
            raise BackupError(f"{path}: missing") from None
        if size != extent["bytes"] or sha256_file(path) != extent["sha256"]:
            raise BackupError(f"{path}: checksum mismatch")
        if deep:
            expected = extent["first_seq"]
            try:
                for frame in iter_frames(path, 0 if extent["start"] else rec.SEG_HEADER_SIZE, size):
                    if frame.seq != expected:
                        raise BackupError(f"{path}: seq {frame.seq} where {expected} was expected")
                    expected += 1
            except rec.FrameError as exc:
                raise BackupError(f"{path}: {exc}") from None
    cp = manifest.get("checkpoint")
    if cp:
        path = os.path.join(directory, cp["file"])
        if not os.path.exists(path) or sha256_file(path) != cp["sha256"]:
            raise BackupError(f"{path}: checksum mismatch")


# -- restore (offline) -------------------------------------------------------------------------


def expand_sources(sources: list[str]) -> list[dict]:
    """Manifests of ``sources``; a directory without a manifest stands for the backups inside it."""
    manifests = []
    for source in sources:
        if os.path.exists(os.path.join(source, MANIFEST)):
            manifests.append(read_manifest(source))
            continue
        inner = sorted(os.path.join(source, d) for d in os.listdir(source)
                       if os.path.exists(os.path.join(source, d, MANIFEST))) if os.path.isdir(source) else []
        if not inner:
            raise BackupError(f"{source}: not a backup (no {MANIFEST})")
        manifests += [read_manifest(d) for d in inner]
    return manifests


def backup_chain(manifests: list[dict], to_seq: int | None = None) -> tuple[list[dict], int]:
    """Order a full and its incrementals into a chain reaching ``to_seq``; return (chain, seq)."""
    fulls = [m for m in manifests if m["kind"] == "full"]
    if not fulls:
        raise BackupError("no full backup among the sources")
    incrementals = sorted((m for m in manifests if m["kind"] == "incremental"), key=lambda m: m["base"]["seq"])
    # The latest full that can serve to_seq, then the incrementals that follow it.
    fulls.sort(key=lambda m: m["seq"])
    usable = [f for f in fulls if to_seq is None or f["first_seq"] <= to_seq]
    if not usable:
        raise BackupError(f"no full backup reaches back to seq {to_seq} (earliest: {fulls[0]['first_seq']})")
    full = usable[-1]
    chain = [full]
    while to_seq is None or chain[-1]["seq"] < to_seq:
        last = chain[-1]
        nxt = [m for m in incrementals if m["base"]["seq"] == last["seq"]
               and (not m["base"].get("id") or m["base"]["id"] == last["id"])]
        if not nxt:
            break
        chain.append(nxt[0])
    seq = chain[-1]["seq"] if to_seq is None else to_seq
    if seq > chain[-1]["seq"]:
        raise BackupError(f"the backups reach seq {chain[-1]['seq']}, not {seq} (an incremental is missing?)")
    if seq < full["first_seq"]:
        raise BackupError(f"seq {seq} is before the full backup's checkpoint ({full['first_seq']})")
    return chain, seq


def restore(sources: list[str], mirrors: list[str], to_seq: int | None = None) -> dict:
    """Write a new store into ``mirrors`` (empty or missing) from backups, cut at ``to_seq``.

    The index is not written here: the first ``Store.open`` rebuilds it by
    replay.  Returns ``{"seq", "backups", "segments", "bytes"}``.
    """
    chain, seq = backup_chain(expand_sources(sources), to_seq)
    for manifest in chain:
        verify_backup(manifest, deep=True)
    for mirror in mirrors:
        if os.path.isdir(mirror) and os.listdir(mirror):
            raise BackupError(f"{mirror} is not empty: restore writes a new store")
    os.makedirs(mirrors[0], exist_ok=True)
    work = mirrors[0]
    written = 0
    sizes: dict[int, int] = {}
    for manifest in chain:
        for extent in manifest["extents"]:
            n = extent["segment"]
            if extent["first_seq"] and extent["first_seq"] > seq:
                continue
            have = sizes.get(n, 0)
            if extent["start"] != have:
                if extent["start"] < have and n in sizes:
                    raise BackupError(f"segment {n}: overlapping extents in {manifest['dir']}")
                raise BackupError(f"segment {n}: bytes {have}..{extent['start']} are in no backup of the chain")
            path = os.path.join(work, segment_name(n))
            with open(os.path.join(manifest["dir"], extent["file"]), "rb") as src, open(path, "ab") as dst:
                while True:
                    data = src.read(CHUNK)
                    if not data:
                        break
                    dst.write(data)
                    written += len(data)
            sizes[n] = extent["end"]
    # Cut the journal after `seq`: later frames, and segments that start after it, go.
    kept = []
    for n in sorted(sizes):
        path = os.path.join(work, segment_name(n))
        if segment_first_seq(path) > seq:
            os.unlink(path)
            continue
        cut = None
        for frame in iter_frames(path, rec.SEG_HEADER_SIZE, sizes[n]):
            if frame.seq > seq:
                cut = frame.offset
                break
        if cut is not None:
            os.truncate(path, cut)
            sizes[n] = cut
        kept.append(n)
    full = chain[0]
    if full.get("checkpoint"):
        cp = full["checkpoint"]
        with open(os.path.join(full["dir"], cp["file"]), "rb") as src, \
                open(os.path.join(work, cp["file"]), "wb") as dst:
            dst.write(src.read())
    # Seals of segments whose successor is not there (retired in the source).
    seals = {str(n): sizes[n] for i, n in enumerate(kept[:-1]) if kept[i + 1] != n + 1}
    with open(os.path.join(work, SEALS_FILE), "w") as f:
        json.dump(seals, f)
    epoch = max(m["epoch"] for m in chain)
    with open(os.path.join(work, EPOCH_FILE), "w") as f:
        f.write(f"{epoch}\n")
    for name in os.listdir(work):
        _fsync_path(os.path.join(work, name))
    _fsync_path(work, directory=True)
    for mirror in mirrors[1:]:
        os.makedirs(mirror, exist_ok=True)
        for name in os.listdir(work):
            with open(os.path.join(work, name), "rb") as src, open(os.path.join(mirror, name), "wb") as dst:
                while True:
                    data = src.read(CHUNK)
                    if not data:
                        break
                    dst.write(data)
                dst.flush()
                os.fsync(dst.fileno())
        _fsync_path(mirror, directory=True)
    report = {"seq": seq, "backups": [m["dir"] for m in chain], "segments": len(kept), "bytes": written}
    log.info("storage.restored", extra={"event": "storage.restored", **report})
    return report


def store_mirrors(paths: list[str] | str) -> tuple[str, ...]:
    """The mirror directories of a store given as its root or its mirrors.

    A directory holding ``mirror-*`` subdirectories (the default layout,
    ``<data>/stores/<identity>/mirror-N``, and what ``restore`` writes) stands
    for those; any other directory is one mirror.
    """
    if isinstance(paths, str):
        paths = [paths]
    out: list[str] = []
    for path in paths:
        subs = sorted(d for d in (os.listdir(path) if os.path.isdir(path) else []) if d.startswith("mirror-")
                      and os.path.isdir(os.path.join(path, d)))
        out += [os.path.abspath(os.path.join(path, d)) for d in subs] if subs else [os.path.abspath(path)]
    return tuple(out)
