"""The on-disk formats of the durable log (acceptance 5): frames, segment headers, checkpoints.

Property tests (hypothesis) over :mod:`intermail.storage.records` and
:mod:`intermail.storage.checkpoint`: every encoding round-trips, and any
single damaged byte or any truncation is reported as ``FrameError`` —
never read as a different valid frame.  Then the engine-level consequence:
a segment whose last frame is torn at any offset reopens with exactly the
frames before it.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from intermail.storage import Store, StoreOptions
from intermail.storage import checkpoint as ckpt
from intermail.storage import records as rec
from intermail.storage.fileops import FileOps
from intermail.testing import kv

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
U32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
RECORDS = st.lists(st.tuples(st.integers(min_value=1, max_value=255), st.binary(max_size=300)), max_size=8)
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- frames ---------------------------------------------------------------------------------------


@PROPS
@given(seq=U64, epoch=U64, records=RECORDS, prefix=st.binary(max_size=40))
@example(seq=0, epoch=0, records=[], prefix=b"")
def test_frame_round_trip(seq, epoch, records, prefix):
    data = rec.encode_frame(seq, epoch, records)
    assert rec.frame_header(data) == (seq, epoch, len(data))
    for buf, pos in ((data, 0), (prefix + data + b"\0" * 7, len(prefix)), (memoryview(prefix + data), len(prefix))):
        frame = rec.decode_frame(buf, pos)
        assert (frame.seq, frame.epoch, frame.size) == (seq, epoch, len(data))
        assert [(r.rtype, r.payload) for r in frame.records] == [(t, bytes(p)) for t, p in records]
        # payload_offsets locate each payload inside the frame (the engine derives blob positions from them)
        for r, off in zip(frame.records, frame.payload_offsets):
            assert data[off : off + len(r.payload)] == r.payload


@PROPS
@given(seq=U64, epoch=U64, records=RECORDS, data=st.data())
def test_frame_any_flipped_byte_is_detected(seq, epoch, records, data):
    frame = bytearray(rec.encode_frame(seq, epoch, records))
    pos = data.draw(st.integers(min_value=0, max_value=len(frame) - 1), label="position")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    frame[pos] ^= flip
    with pytest.raises(rec.FrameError):
        rec.decode_frame(bytes(frame))


def test_frame_every_flipped_bit_is_detected():
    """Exhaustively, on one small frame: every bit of every byte."""
    frame = rec.encode_frame(7, 3, [(rec.REC_BLOB, rec.blob_payload(9, b"hello")), (16, b'{"id":"x"}')])
    for pos in range(len(frame)):
        for bit in range(8):
            damaged = bytearray(frame)
            damaged[pos] ^= 1 << bit
            with pytest.raises(rec.FrameError):
                rec.decode_frame(bytes(damaged))


@PROPS
@given(seq=U64, epoch=U64, records=RECORDS, data=st.data())
def test_frame_any_truncation_is_detected(seq, epoch, records, data):
    frame = rec.encode_frame(seq, epoch, records)
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1), label="cut")
    with pytest.raises(rec.FrameError):
        rec.decode_frame(frame[:cut])
    # ... also when zeros (preallocated space) follow the cut, unless the cut-off
    # bytes were zeros anyway.  (A frame of seq 0 with no records ends in
    # "CMIT" + eight zero bytes of seq + crc32(b"") == 0: zeros would complete
    # it.  The engine never writes seq 0: journal and checkpoint frames count from 1.)
    padded = frame[:cut] + bytes(len(frame) - cut)
    if padded != frame and not (seq == 0 and not records):
        with pytest.raises(rec.FrameError):
            rec.decode_frame(padded)


def test_frame_every_truncation_of_a_small_frame():
    frame = rec.encode_frame(1, 1, [(16, b"abc")])
    for cut in range(len(frame)):
        with pytest.raises(rec.FrameError):
            rec.decode_frame(frame[:cut])


def test_frame_refuses_bad_record_types():
    for bad in (0, 256, -1):
        with pytest.raises(ValueError):
            rec.encode_frame(1, 1, [(bad, b"")])


@PROPS
@given(frames=st.lists(st.tuples(U64, RECORDS), min_size=1, max_size=5))
def test_frames_back_to_back(frames):
    """A batch is frames written back to back; each decodes at the previous one's end."""
    data = b"".join(rec.encode_frame(seq, 1, records) for seq, records in frames)
    pos = 0
    for seq, records in frames:
        frame = rec.decode_frame(data, pos)
        assert frame.seq == seq and len(frame.records) == len(records)
        pos += frame.size
    assert pos == len(data)


# -- engine record payloads -------------------------------------------------------------------------


@PROPS
@given(blob_id=U64, body=st.binary(max_size=500))
def test_blob_payload_round_trip(blob_id, body):
    payload = rec.blob_payload(blob_id, body)
    got_id, digest, length = rec.parse_blob(payload)
    assert (got_id, length) == (blob_id, len(body))
    assert payload[rec.BLOB_HEAD_SIZE :] == body
    import hashlib

    assert digest == hashlib.sha256(body).digest()


@PROPS
@given(ids=st.lists(U64, max_size=20))
def test_free_payload_round_trip(ids):
    assert list(rec.parse_free(rec.free_payload(ids))) == ids


@PROPS
@given(blob_id=U64, segment=U32, offset=U64, length=U64, digest=st.binary(min_size=32, max_size=32))
def test_blobloc_payload_round_trip(blob_id, segment, offset, length, digest):
    payload = rec.blobloc_payload(blob_id, segment, offset, length, digest)
    assert rec.parse_blobloc(payload) == (blob_id, segment, offset, length, digest)
    with pytest.raises(rec.FrameError):
        rec.parse_blobloc(payload[:-1])


# -- segment headers ------------------------------------------------------------------------------------


HEADERS = st.builds(rec.SegmentHeader, kind=st.sampled_from([rec.KIND_JOURNAL, rec.KIND_CHECKPOINT]),
                    segment=U32, first_seq=U64, epoch=U64, prev_end=U64,
                    created_ns=st.integers(min_value=1, max_value=(1 << 64) - 1))


@PROPS
@given(header=HEADERS)
def test_segment_header_round_trip(header):
    data = header.encode()
    assert len(data) == rec.SEG_HEADER_SIZE
    assert rec.SegmentHeader.decode(data) == header
    assert rec.SegmentHeader.decode(data + b"frames follow") == header


@PROPS
@given(header=HEADERS, data=st.data())
def test_segment_header_corruption_is_detected(header, data):
    raw = bytearray(header.encode())
    pos = data.draw(st.integers(min_value=0, max_value=rec.SEG_HEADER_SIZE - 1), label="position")
    raw[pos] ^= data.draw(st.integers(min_value=1, max_value=255), label="xor")
    with pytest.raises(rec.FrameError):
        rec.SegmentHeader.decode(bytes(raw))
    cut = data.draw(st.integers(min_value=0, max_value=rec.SEG_HEADER_SIZE - 1), label="cut")
    with pytest.raises(rec.FrameError):
        rec.SegmentHeader.decode(header.encode()[:cut])


def test_segment_header_of_zeros_is_not_a_header():
    """A preallocated file whose header never got written must not pass for a segment."""
    with pytest.raises(rec.FrameError):
        rec.SegmentHeader.decode(bytes(rec.SEG_HEADER_SIZE))


# -- checkpoints ----------------------------------------------------------------------------------------------


class BytesFileOps(FileOps):
    """read_all from memory: checkpoint parsing without a file per hypothesis example."""

    def __init__(self, data: bytes):
        super().__init__()
        self.data = data

    def read_all(self, path: str) -> bytes:
        return self.data


CKPT_RECORDS = st.lists(st.tuples(st.integers(min_value=rec.FIRST_CONSUMER_TYPE, max_value=255)
                                  | st.sampled_from([rec.REC_BLOBLOC, rec.REC_NEXT_BLOB]),
                                  st.binary(max_size=200)), max_size=12)


@PROPS
@given(seq=U64, epoch=U64, records=CKPT_RECORDS)
def test_checkpoint_round_trip(seq, epoch, records):
    data = b"".join(ckpt.encode(seq, epoch, iter(records)))
    assert ckpt.read(BytesFileOps(data), "/m", seq) == [(t, bytes(p)) for t, p in records]
    with pytest.raises(rec.FrameError):
        ckpt.read(BytesFileOps(data), "/m", seq + 1 if seq < (1 << 64) - 1 else seq - 1)  # named for another seq


@PROPS
@given(seq=U64, records=CKPT_RECORDS, data=st.data())
def test_checkpoint_truncation_and_damage_are_detected(seq, records, data):
    raw = b"".join(ckpt.encode(seq, 1, iter(records)))
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="cut")
    with pytest.raises(rec.FrameError):
        ckpt.read(BytesFileOps(raw[:cut]), "/m", seq)
    damaged = bytearray(raw)
    pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="position")
    damaged[pos] ^= data.draw(st.integers(min_value=1, max_value=255), label="xor")
    with pytest.raises(rec.FrameError):
        ckpt.read(BytesFileOps(bytes(damaged)), "/m", seq)
    with pytest.raises(rec.FrameError):
        ckpt.read(BytesFileOps(raw + rec.encode_frame(99, 1, [(16, b"x")])), "/m", seq)  # bytes after END


def test_checkpoint_multi_frame_file_round_trip_and_every_frame_boundary_cut(tmp_path):
    """A checkpoint bigger than one frame, written and read through real files."""
    records = [(16, bytes([i % 251]) * 70000) for i in range(40)] + [(rec.REC_NEXT_BLOB, struct.pack("<Q", 5))]
    pieces = list(ckpt.encode(1234, 7, iter(records)))
    assert len(pieces) > 3  # header + several frames
    mirror = str(tmp_path)
    ckpt.write(FileOps(), mirror, 1234, pieces)
    assert ckpt.list_seqs(FileOps(), [mirror]) == [1234]
    assert not os.path.exists(os.path.join(mirror, ckpt.name(1234) + ".tmp"))
    assert ckpt.read(FileOps(), mirror, 1234) == records
    raw = b"".join(pieces)
    boundaries = [sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces))]
    for cut in boundaries + [b + 1 for b in boundaries] + [len(raw) - 1]:
        with pytest.raises(rec.FrameError):
            ckpt.read(BytesFileOps(raw[:cut]), mirror, 1234)


# -- the engine and a torn last frame -----------------------------------------------------------------------


def _frames(path: str) -> list[tuple[int, int]]:
    """(offset, size) of every valid frame of a segment file."""
    with open(path, "rb") as f:
        data = f.read()
    rec.SegmentHeader.decode(data)
    out, pos = [], rec.SEG_HEADER_SIZE
    while True:
        try:
            frame = rec.decode_frame(data, pos)
        except rec.FrameError:
            return out
        out.append((pos, frame.size))
        pos += frame.size


def _last_segment(mirror: str) -> str:
    names = sorted(n for n in os.listdir(mirror) if n.endswith(".seg"))
    return os.path.join(mirror, names[-1])


@pytest.mark.parametrize("preallocate", [True, False])
async def test_torn_last_frame_reopens_with_the_earlier_frames(tmp_path, preallocate):
    """A frame torn at any offset is a frame that never became durable, so never applied either:
    the index is the one from before it (or gone), and recovery ends the journal before it."""
    template = tmp_path / "template"
    mirrors = (str(template / "m0"), str(template / "m1"))
    options = StoreOptions(mirrors=mirrors, segment_bytes=64 << 10, preallocate=preallocate)
    store = await Store.open(options, kv.KvApplier())
    for i in range(5):
        if i == 4:  # keep the index as it was before the last frame was applied
            await store.close()
            shutil.copytree(template / "m0", tmp_path / "index-before", ignore=lambda d, names: [
                n for n in names if not n.startswith("index.sqlite")])
            store = await Store.open(options, kv.KvApplier())
        txn = store.transaction()
        kv.put(txn, f"item{i}")  # no body: a small frame
        await txn.commit()
    await store.close()
    start, size = _frames(_last_segment(mirrors[0]))[-1]
    assert size < 200
    earlier = {f"item{i}": 1 for i in range(4)}
    for cut in range(start + 1, start + size):
        work = tmp_path / f"cut{cut}"
        shutil.copytree(template, work)
        wm = (str(work / "m0"), str(work / "m1"))
        for m in wm:  # torn identically on both mirrors: nothing to repair from
            seg = _last_segment(m)
            with open(seg, "r+b") as f:
                f.seek(cut)
                rest = f.read(start + size - cut)
                if cut % 2 or not any(rest):
                    f.truncate(cut)  # the file ends inside the frame
                else:
                    f.seek(cut)  # the rest of the frame never reached the disk (zeros follow)
                    f.write(bytes(len(rest)))
        for name in os.listdir(work / "m0"):
            if name.startswith("index.sqlite"):
                os.unlink(work / "m0" / name)
        if cut % 3:  # else: no index at all, the state comes from the journal alone
            for name in os.listdir(tmp_path / "index-before"):
                shutil.copy(tmp_path / "index-before" / name, work / "m0" / name)
        reopened = await Store.open(StoreOptions(mirrors=wm, segment_bytes=64 << 10, preallocate=preallocate),
                                    kv.KvApplier())
        try:
            assert await reopened.read(kv.counts) == earlier, f"cut at {cut}"
            assert reopened.report.tail_cut_bytes > 0, f"cut at {cut}: {reopened.report}"
            assert reopened.report.last_seq == 4
            txn = reopened.transaction()
            kv.put(txn, "after")
            assert await txn.commit() == 5  # the torn frame never existed: its seq is free
        finally:
            await reopened.close()
        shutil.rmtree(work)


async def test_torn_last_frame_on_one_mirror_is_repaired_from_the_other(tmp_path):
    mirrors = (str(tmp_path / "m0"), str(tmp_path / "m1"))
    options = StoreOptions(mirrors=mirrors, segment_bytes=64 << 10)
    store = await Store.open(options, kv.KvApplier())
    for i in range(5):
        txn = store.transaction()
        kv.put(txn, f"item{i}", b"body%d" % i)
        await txn.commit()
    await store.close()
    seg0 = _last_segment(mirrors[0])
    start, size = _frames(seg0)[-1]
    with open(seg0, "r+b") as f:
        f.truncate(start + size // 2)
    store = await Store.open(options, kv.KvApplier())
    try:
        assert await store.read(kv.counts) == {f"item{i}": 1 for i in range(5)}
        assert store.report.repairs >= 1
        assert store.report.tail_cut_bytes == 0
    finally:
        await store.close()
    name = os.path.basename(seg0)
    with open(os.path.join(mirrors[0], name), "rb") as a, open(os.path.join(mirrors[1], name), "rb") as b:
        assert a.read(start + size) == b.read(start + size)
