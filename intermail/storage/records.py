"""On-disk formats of the durable log: segment headers, frames and records.

Pure functions over bytes; no I/O.  A *segment* is one file of the journal;
a *frame* is one committed transaction; a *record* is one typed entry inside
a frame.  A position is ``(segment, offset)``.

Segment header (64 bytes, little-endian)::

    off size field
      0    6 magic        b"IMJSEG"
      6    2 version      FORMAT_VERSION
      8    1 kind         0 = journal segment, 1 = checkpoint
      9    3 reserved     zero
     12    4 segment      segment number (journal), 0 (checkpoint)
     16    8 first_seq    seq of the first frame (journal) / state seq (checkpoint)
     24    8 epoch        owner epoch that wrote the file (I-6)
     32    8 prev_end     valid length of the previous segment: the seal (I-6)
     40    8 created_ns   wall clock at creation, for operators
     48   12 reserved     zero
     60    4 crc          CRC-32 of bytes 0..59

Frame (one transaction)::

     0    4 magic        b"IMJF"
     4    1 version
     5    3 reserved     zero
     8    8 seq          strictly +1 from the previous frame
    16    8 epoch        the writer's epoch
    24    4 body_len     bytes of records that follow
    28    4 hdr_crc      CRC-32 of bytes 0..27
    32    … body         records: type u8 | length u32 | payload
    …    16 commit       b"CMIT" | body CRC-32 u32 | seq u64

A frame without its commit marker does not exist: the reader accepts a frame
only when the header CRC, the body CRC and the commit marker (with the same
seq) all check.  Anything else at the end of the last segment is a torn tail.

Record types below 16 belong to the engine; consumers (queue, mail store)
use 16 and up.
"""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from dataclasses import dataclass

FORMAT_VERSION = 1

SEG_MAGIC = b"IMJSEG"
SEG_HEADER = struct.Struct("<6sHB3xIQQQQ12xI")
SEG_HEADER_SIZE = 64
assert SEG_HEADER.size == SEG_HEADER_SIZE

KIND_JOURNAL = 0
KIND_CHECKPOINT = 1

FRAME_MAGIC = b"IMJF"
FRAME_HEADER = struct.Struct("<4sB3xQQII")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 32
COMMIT = struct.Struct("<4sIQ")
COMMIT_MAGIC = b"CMIT"
COMMIT_SIZE = COMMIT.size  # 16
RECORD_HEADER = struct.Struct("<BI")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 5

MAX_BODY = 1 << 31  # a frame body is at most 2 GiB; bigger transactions are refused

# Engine record types (consumers use 16..255).
REC_BLOB = 1  # blob_id u64 | sha256 32 | data  — a body stored in the journal
REC_FREE = 2  # blob_id u64 * n                 — those bodies are no longer referenced
REC_BLOBLOC = 3  # blob_id u64 | segment u32 | offset u64 | length u64 | sha256 (checkpoints)
REC_END = 4  # records u64                      — last frame of a checkpoint
REC_NEXT_BLOB = 5  # next blob id u64              — blob ids are never reused (checkpoints)
REC_MOVE = 6  # blob_id u64 | sha256 32 | data  — compaction's copy of a body; ignored if freed
FIRST_CONSUMER_TYPE = 16

BLOB_HEAD = struct.Struct("<Q32s")
BLOB_HEAD_SIZE = BLOB_HEAD.size  # 40
BLOBLOC = struct.Struct("<QIQQ32s")


def numbered_name(prefix: str, number: int, width: int, suffix: str) -> str:
    """File names of the store: ``j0000000001.seg``, ``c…<seq>.ckpt``."""
    return f"{prefix}{number:0{width}d}{suffix}"


def parse_numbered_name(name: str, prefix: str, suffix: str) -> int | None:
    if name.startswith(prefix) and name.endswith(suffix):
        digits = name[len(prefix) : -len(suffix)]
        if digits.isdigit():
            return int(digits)
    return None


class FrameError(Exception):
    """Bytes at a position are not a valid frame (torn, corrupt or foreign)."""


@dataclass(frozen=True)
class SegmentHeader:
    kind: int
    segment: int
    first_seq: int
    epoch: int
    prev_end: int
    created_ns: int = 0
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        head = SEG_HEADER.pack(
            SEG_MAGIC, self.version, self.kind, self.segment, self.first_seq,
            self.epoch, self.prev_end, self.created_ns or time.time_ns(), 0,
        )[:-4]
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def decode(cls, data: bytes) -> "SegmentHeader":
        if len(data) < SEG_HEADER_SIZE:
            raise FrameError("segment header truncated")
        magic, version, kind, segment, first_seq, epoch, prev_end, created, crc = SEG_HEADER.unpack_from(data)
        if magic != SEG_MAGIC:
            raise FrameError("not a segment file")
        if zlib.crc32(data[: SEG_HEADER_SIZE - 4]) != crc:
            raise FrameError("segment header checksum mismatch")
        if version != FORMAT_VERSION:
            raise FrameError(f"unsupported segment format version {version}")
        return cls(kind, segment, first_seq, epoch, prev_end, created, version)


@dataclass(frozen=True)
class Record:
    rtype: int
    payload: bytes


@dataclass(frozen=True)
class Frame:
    seq: int
    epoch: int
    records: tuple[Record, ...]
    size: int  # bytes on disk, header to commit marker
    # offset of each record's payload from the start of the frame
    payload_offsets: tuple[int, ...] = ()


def encode_frame_parts(seq: int, epoch: int, records: list[tuple[int, bytes]] | tuple) -> list[bytes]:
    """Serialise one transaction as a list of pieces (join them, or write them with pwritev).

    Payloads are not copied: the body CRC is computed piece by piece.
    """
    parts: list[bytes] = [b""]
    crc = 0
    body_len = 0
    for rtype, payload in records:
        if not 0 < rtype < 256:
            raise ValueError(f"record type {rtype} out of range")
        head = RECORD_HEADER.pack(rtype, len(payload))
        crc = zlib.crc32(payload, zlib.crc32(head, crc))
        body_len += RECORD_HEADER_SIZE + len(payload)
        parts.append(head)
        parts.append(payload)
    if body_len >= MAX_BODY:
        raise ValueError("transaction too large")
    head = FRAME_HEADER.pack(FRAME_MAGIC, FORMAT_VERSION, seq, epoch, body_len, 0)[:-4]
    parts[0] = head + struct.pack("<I", zlib.crc32(head))
    parts.append(COMMIT.pack(COMMIT_MAGIC, crc, seq))
    return parts


def encode_frame(seq: int, epoch: int, records: list[tuple[int, bytes]] | tuple) -> bytes:
    """Serialise one transaction.  ``records`` is a sequence of ``(type, payload)``."""
    return b"".join(encode_frame_parts(seq, epoch, records))


def frame_size(records: list[tuple[int, bytes]] | tuple) -> int:
    """Bytes ``encode_frame`` will produce for these records."""
    return FRAME_HEADER_SIZE + COMMIT_SIZE + sum(RECORD_HEADER_SIZE + len(p) for _, p in records)


def frame_header(data: bytes | memoryview, pos: int = 0) -> tuple[int, int, int]:
    """Check a frame header at ``pos``; return ``(seq, epoch, total_size)``."""
    if len(data) - pos < FRAME_HEADER_SIZE:
        raise FrameError("frame header truncated")
    magic, version, seq, epoch, body_len, crc = FRAME_HEADER.unpack_from(data, pos)
    if magic != FRAME_MAGIC:
        raise FrameError("no frame magic")
    if zlib.crc32(data[pos : pos + FRAME_HEADER_SIZE - 4]) != crc:
        raise FrameError("frame header checksum mismatch")
    if version != FORMAT_VERSION:
        raise FrameError(f"unsupported frame version {version}")
    if body_len >= MAX_BODY:
        raise FrameError("frame body length out of range")
    return seq, epoch, FRAME_HEADER_SIZE + body_len + COMMIT_SIZE


def decode_frame(data: bytes | memoryview, pos: int = 0) -> Frame:
    """Decode and verify the frame at ``pos``; raise FrameError unless it is whole and intact."""
    seq, epoch, size = frame_header(data, pos)
    if len(data) - pos < size:
        raise FrameError("frame truncated")
    body_start = pos + FRAME_HEADER_SIZE
    body_end = pos + size - COMMIT_SIZE
    magic, body_crc, seq2 = COMMIT.unpack_from(data, body_end)
    if magic != COMMIT_MAGIC or seq2 != seq:
        raise FrameError("commit marker missing")
    body = bytes(data[body_start:body_end])
    if zlib.crc32(body) != body_crc:
        raise FrameError("frame body checksum mismatch")
    records = []
    offsets = []
    i = 0
    while i < len(body):
        if len(body) - i < RECORD_HEADER_SIZE:
            raise FrameError("record header truncated")
        rtype, length = RECORD_HEADER.unpack_from(body, i)
        i += RECORD_HEADER_SIZE
        if rtype == 0 or i + length > len(body):
            raise FrameError("record out of bounds")
        offsets.append(FRAME_HEADER_SIZE + i)
        records.append(Record(rtype, body[i : i + length]))
        i += length
    return Frame(seq, epoch, tuple(records), size, tuple(offsets))


# -- engine record payloads ---------------------------------------------------


def blob_payload(blob_id: int, data: bytes) -> bytes:
    return BLOB_HEAD.pack(blob_id, hashlib.sha256(data).digest()) + data


def parse_blob(payload: bytes) -> tuple[int, bytes, int]:
    """Return ``(blob_id, sha256, length)`` of a REC_BLOB payload."""
    if len(payload) < BLOB_HEAD_SIZE:
        raise FrameError("blob record truncated")
    blob_id, digest = BLOB_HEAD.unpack_from(payload)
    return blob_id, digest, len(payload) - BLOB_HEAD_SIZE


def free_payload(blob_ids: list[int]) -> bytes:
    return struct.pack(f"<{len(blob_ids)}Q", *blob_ids)


def parse_free(payload: bytes) -> tuple[int, ...]:
    if len(payload) % 8:
        raise FrameError("free record length")
    return struct.unpack(f"<{len(payload) // 8}Q", payload)


def blobloc_payload(blob_id: int, segment: int, offset: int, length: int, digest: bytes) -> bytes:
    return BLOBLOC.pack(blob_id, segment, offset, length, digest)


def parse_blobloc(payload: bytes) -> tuple[int, int, int, int, bytes]:
    if len(payload) != BLOBLOC.size:
        raise FrameError("blob location record length")
    return BLOBLOC.unpack(payload)
