"""Checkpoint files: the whole state at one seq, so old journal segments can go.

A checkpoint ``c<seq>.ckpt`` is a segment-format file (header kind
``KIND_CHECKPOINT``, ``first_seq`` = the state's seq) holding frames of
records that recreate the index: blob locations (``REC_BLOBLOC``) and the
consumer's snapshot.  Its last frame holds a ``REC_END`` record with the
record count; a file without it does not exist.  It is written to a temp
name on every healthy mirror, synced, renamed and its directory synced;
only then may segments it covers be retired.

Logs: nothing; the engine logs ``storage.checkpoint``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator

from intermail.storage import records as rec
from intermail.storage.fileops import FileOps

SUFFIX = ".ckpt"
FRAME_TARGET = 1 << 20  # records are grouped into frames of about this size


def name(seq: int) -> str:
    return rec.numbered_name("c", seq, 20, SUFFIX)


def parse_name(filename: str) -> int | None:
    return rec.parse_numbered_name(filename, "c", SUFFIX)


def list_seqs(fileops: FileOps, mirrors: list[str]) -> list[int]:
    seqs: set[int] = set()
    for mirror in mirrors:
        try:
            names = fileops.listdir(mirror)
        except OSError:
            continue
        seqs.update(s for s in map(parse_name, names) if s is not None)
    return sorted(seqs)


def encode(seq: int, epoch: int, records: Iterable[tuple[int, bytes]]) -> Iterator[bytes]:
    """Yield the checkpoint file's bytes in pieces (header, then frames)."""
    yield rec.SegmentHeader(rec.KIND_CHECKPOINT, 0, seq, epoch, 0).encode()
    batch: list[tuple[int, bytes]] = []
    size = 0
    count = 0
    frame_no = 0
    for rtype, payload in records:
        batch.append((rtype, payload))
        size += len(payload)
        count += 1
        if size >= FRAME_TARGET:
            frame_no += 1
            yield rec.encode_frame(frame_no, epoch, batch)
            batch, size = [], 0
    batch.append((rec.REC_END, struct.pack("<Q", count)))
    yield rec.encode_frame(frame_no + 1, epoch, batch)


def write(fileops: FileOps, mirror: str, seq: int, pieces: list[bytes]) -> None:
    fileops.write_atomic(os.path.join(mirror, name(seq)), pieces)


def read(fileops: FileOps, mirror: str, seq: int) -> list[tuple[int, bytes]]:
    """Return the records of a complete, intact checkpoint, or raise FrameError."""
    data = fileops.read_all(os.path.join(mirror, name(seq)))
    header = rec.SegmentHeader.decode(data)
    if header.kind != rec.KIND_CHECKPOINT or header.first_seq != seq:
        raise rec.FrameError("not the checkpoint it is named for")
    out: list[tuple[int, bytes]] = []
    pos = rec.SEG_HEADER_SIZE
    expected = 1
    while pos < len(data):
        frame = rec.decode_frame(data, pos)
        if frame.seq != expected:
            raise rec.FrameError("checkpoint frames out of order")
        expected += 1
        pos += frame.size
        for record in frame.records:
            if record.rtype == rec.REC_END:
                (count,) = struct.unpack("<Q", record.payload)
                if count != len(out) or pos != len(data):
                    raise rec.FrameError("checkpoint record count mismatch")
                return out
            out.append((record.rtype, record.payload))
    raise rec.FrameError("checkpoint has no end record")
