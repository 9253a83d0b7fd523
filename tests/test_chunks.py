"""Chunk math and wire format: d-engine's B100-B108 (the in-memory part) and G060."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d_engine_sm._compress import HAVE_ISAL
from d_engine_sm._snapshot.chunks import (
    checksum,
    chunk_bounds,
    chunk_count,
    make_chunk,
    verify_chunk,
)
from d_engine_sm._values import log_id
from d_engine_sm.errors import ChunkOutOfRange
from d_engine_sm.proto import storage_pb2


def meta(index: int, term: int, digest: bytes = b"") -> storage_pb2.SnapshotMetadata:
    return storage_pb2.SnapshotMetadata(last_included=log_id(index, term), checksum=digest)


def split(
    data: bytes, chunk_size: int, metadata: storage_pb2.SnapshotMetadata
) -> list[storage_pb2.SnapshotChunk]:
    """What a sender does with these helpers: metadata on seq 0 only."""
    total = chunk_count(len(data), chunk_size)
    chunks = []
    for seq in range(total):
        start, end = chunk_bounds(seq, len(data), chunk_size)
        chunks.append(
            make_chunk(
                seq=seq,
                total=total,
                data=data[start:end],
                leader_term=metadata.last_included.term,
                leader_id=1,
                metadata=metadata if seq == 0 else None,
            )
        )
    return chunks


def crc_be(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


# -- B100-B105 -----------------------------------------------------------------


def test_b100_single_chunk() -> None:
    data = b"Hello World"
    md = meta(1, 1)
    [chunk] = split(data, 1024, md)
    assert (chunk.leader_term, chunk.leader_id, chunk.seq, chunk.total_chunks) == (1, 1, 0, 1)
    assert chunk.data == data
    assert chunk.chunk_checksum == crc_be(data) == bytes.fromhex("4a17b156")
    assert chunk.HasField("metadata")
    assert chunk.metadata == md


def test_b101_multi_chunk_metadata_only_on_first() -> None:
    data = b"1234567890ABCDEF"
    chunks = split(data, 4, meta(2, 1))
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert all(c.total_chunks == 4 for c in chunks)
    assert [c.HasField("metadata") for c in chunks] == [True, False, False, False]
    assert b"".join(c.data for c in chunks) == data
    assert all(verify_chunk(c) for c in chunks)


def test_b102_metadata_without_last_included_refused() -> None:
    with pytest.raises(ValueError, match="last_included"):
        make_chunk(
            seq=0,
            total=1,
            data=b"x",
            leader_term=1,
            leader_id=1,
            metadata=storage_pb2.SnapshotMetadata(),
        )


def test_b103_checksum_is_crc32_big_endian() -> None:
    [chunk] = split(b"Validate me", 1024, meta(5, 1))
    assert chunk.chunk_checksum == crc_be(b"Validate me") == bytes.fromhex("d967330f")
    assert len(chunk.chunk_checksum) == 4


def test_b105_last_chunk_short() -> None:
    data = b"Test content for multiple chunks"
    assert len(data) == 32
    chunks = split(data, 10, meta(1, 1))
    assert [len(c.data) for c in chunks] == [10, 10, 10, 2]
    assert [c.HasField("metadata") for c in chunks] == [True, False, False, False]


def test_b106_bounds_are_exact_slices() -> None:
    data = b"The quick brown fox jumps over the lazy dog!"
    assert len(data) == 44
    assert chunk_bounds(0, 44, 44) == (0, 44)
    assert [data[slice(*chunk_bounds(s, 44, 20))] for s in range(3)] == [
        data[0:20],
        data[20:40],
        data[40:44],
    ]


def test_b108_g060_out_of_range() -> None:
    with pytest.raises(ChunkOutOfRange) as info:
        chunk_bounds(1, 5, 1000)
    assert (info.value.seq, info.value.total) == (1, 1)
    # A 0-byte archive has no chunks: every seq is out of range.
    assert chunk_count(0, 1024) == 0
    with pytest.raises(ChunkOutOfRange) as info:
        chunk_bounds(0, 0, 1024)
    assert (info.value.seq, info.value.total) == (0, 0)
    assert isinstance(info.value, IndexError)


# -- chunk_count / chunk_bounds ---------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk_size", "count"),
    [(0, 1, 0), (1, 1, 1), (1, 1024, 1), (1024, 1024, 1), (1025, 1024, 2), (4096, 1024, 4)],
)
def test_chunk_count(size: int, chunk_size: int, count: int) -> None:
    assert chunk_count(size, chunk_size) == count


@given(size=st.integers(0, 10**7), chunk_size=st.integers(1, 10**5))
def test_bounds_tile_the_file(size: int, chunk_size: int) -> None:
    total = chunk_count(size, chunk_size)
    bounds = [chunk_bounds(s, size, chunk_size) for s in range(min(total, 50))]
    for seq, (start, end) in enumerate(bounds):
        assert start == seq * chunk_size
        assert end - start == (chunk_size if seq < total - 1 else size - start)
        assert 0 < end - start <= chunk_size
    if total:
        assert chunk_bounds(total - 1, size, chunk_size)[1] == size
    with pytest.raises(ChunkOutOfRange):
        chunk_bounds(total, size, chunk_size)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((-1, 10), ValueError, "size"),
        ((10, 0), ValueError, "chunk_size"),
        ((10, -5), ValueError, "chunk_size"),
        ((10.0, 10), TypeError, "size"),
        ((10, True), TypeError, "chunk_size"),
        ((2**32, 1), ValueError, "uint32"),
    ],
)
def test_chunk_count_bad_args(
    args: tuple[object, object], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        chunk_count(*args)  # type: ignore[arg-type]


def test_chunk_count_uint32_edge() -> None:
    assert chunk_count(2**32 - 1, 1) == 2**32 - 1


def test_chunk_bounds_negative_seq() -> None:
    with pytest.raises(ValueError, match="seq"):
        chunk_bounds(-1, 10, 1)


# -- checksum ------------------------------------------------------------------


@given(data=st.binary(max_size=4096))
def test_checksum_matches_zlib(data: bytes) -> None:
    assert checksum(data) == crc_be(data)
    assert checksum(memoryview(data)) == crc_be(data)
    assert checksum(bytearray(data)) == crc_be(data)


@pytest.mark.skipif(not HAVE_ISAL, reason="python-isal not installed")
@given(data=st.binary(max_size=4096))
def test_isal_crc_equals_zlib(data: bytes) -> None:
    from isal import isal_zlib

    assert isal_zlib.crc32(data) == zlib.crc32(data)


def test_checksum_large_and_high_bit() -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    assert checksum(data) == crc_be(data)
    # A CRC with the top bit set must still be 4 unsigned bytes.
    assert checksum(b"\xff" * 4) == crc_be(b"\xff" * 4)
    assert checksum(b"") == b"\x00\x00\x00\x00"


def test_checksum_without_isal() -> None:
    # A real interpreter where `import isal` fails: the zlib path must agree.
    code = (
        "import sys; sys.modules['isal'] = None\n"
        "import zlib\n"
        "from d_engine_sm._compress import HAVE_ISAL\n"
        "from d_engine_sm._snapshot.chunks import checksum\n"
        "assert not HAVE_ISAL\n"
        "for d in (b'', b'Validate me', bytes(range(256)) * 300):\n"
        "    assert checksum(d) == zlib.crc32(d).to_bytes(4, 'big')\n"
        "print(checksum(b'Validate me').hex())\n"
    )
    out = subprocess.run(  # the environment's d_engine_sm, installed or on PYTHONPATH
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "d967330f"


# -- verify_chunk ---------------------------------------------------------------


def test_verify_chunk() -> None:
    [chunk] = split(b"payload bytes", 1024, meta(3, 2))
    assert verify_chunk(chunk)
    flipped = storage_pb2.SnapshotChunk()
    flipped.CopyFrom(chunk)
    flipped.data = b"Payload bytes"
    assert not verify_chunk(flipped)


@pytest.mark.parametrize("bad", [b"", b"\x00", b"\xde\xad\xbe\xef", b"\x00" * 5])
def test_verify_chunk_wrong_checksum_or_length(bad: bytes) -> None:
    chunk = storage_pb2.SnapshotChunk(data=b"bad data", chunk_checksum=bad)
    assert not verify_chunk(chunk)


def test_verify_chunk_checksum_longer_than_four_bytes() -> None:
    # d-engine compares 4 bytes exactly: a valid CRC plus padding fails.
    chunk = storage_pb2.SnapshotChunk(data=b"abc", chunk_checksum=crc_be(b"abc") + b"\x00")
    assert not verify_chunk(chunk)


def test_empty_data_chunk() -> None:
    chunk = make_chunk(seq=0, total=1, data=b"", leader_term=0, leader_id=0, metadata=None)
    assert chunk.chunk_checksum == b"\x00\x00\x00\x00"
    assert verify_chunk(chunk)
    assert not chunk.HasField("metadata")


# -- make_chunk ----------------------------------------------------------------


def test_make_chunk_copies_metadata() -> None:
    md = meta(9, 4, b"\x01" * 32)
    chunk = make_chunk(seq=0, total=2, data=b"ab", leader_term=7, leader_id=3, metadata=md)
    md.last_included.index = 1  # the caller's object is not aliased
    assert chunk.metadata.last_included.index == 9
    assert chunk.metadata.checksum == b"\x01" * 32
    assert (chunk.leader_term, chunk.leader_id, chunk.seq, chunk.total_chunks) == (7, 3, 0, 2)
    # Round-trips through the wire format.
    assert storage_pb2.SnapshotChunk.FromString(chunk.SerializeToString()) == chunk


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"seq": 1, "total": 1}, ValueError, "seq"),
        ({"seq": -1}, ValueError, "seq"),
        ({"total": 0}, ValueError, "total"),
        ({"total": 2**32}, ValueError, "total"),
        ({"leader_term": -1}, ValueError, "leader_term"),
        ({"leader_term": 2**64}, ValueError, "leader_term"),
        ({"leader_id": 2**32}, ValueError, "leader_id"),
        ({"data": "text"}, TypeError, "data"),
        ({"data": memoryview(b"x")}, TypeError, "data"),
        ({"metadata": b"md"}, TypeError, "metadata"),
        ({"seq": True}, TypeError, "seq"),
    ],
)
def test_make_chunk_bad_args(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    args: dict[str, object] = {
        "seq": 0,
        "total": 1,
        "data": b"x",
        "leader_term": 1,
        "leader_id": 1,
        "metadata": None,
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        make_chunk(**args)  # type: ignore[arg-type]
