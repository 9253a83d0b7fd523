"""Splitting an archive into wire chunks and checking them (pure).

The wire checksum is d-engine's: CRC32 (IEEE) of the chunk's ``data`` as 4
big-endian bytes, computed through ISA-L when the ``fast`` extra is installed
(same polynomial, same result as ``zlib.crc32``).

>>> checksum(b"Validate me").hex()
'd967330f'
>>> chunk_count(32, 10), [chunk_bounds(s, 32, 10) for s in range(4)]
(4, [(0, 10), (10, 20), (20, 30), (30, 32)])
"""

from __future__ import annotations

from typing import Final

from d_engine_sm._compress import crc32
from d_engine_sm.errors import ChunkOutOfRange
from d_engine_sm.proto import storage_pb2

_U32_MAX: Final = 2**32 - 1


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``; else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_seconds(name: str, value: object) -> None:
    """None, or a number of seconds > 0; else TypeError/ValueError."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """The wire checksum of ``data``: CRC32 (IEEE) as 4 big-endian bytes.

    Args:
        data: a chunk's payload (any contiguous bytes-like object).

    Returns:
        4 bytes, equal to ``zlib.crc32(data).to_bytes(4, "big")``.

    Pure and thread-safe.
    """
    return (crc32(data, 0) & 0xFFFF_FFFF).to_bytes(4, "big")


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks an archive of ``size`` bytes takes: ``ceil(size / chunk_size)``.

    Args:
        size: archive size in bytes (0 gives 0 chunks).
        chunk_size: bytes per chunk, > 0.

    Returns:
        The chunk count (``total_chunks`` on the wire).

    Raises:
        TypeError: a non-int argument.
        ValueError: ``size < 0``, ``chunk_size < 1``, or more chunks than the
            wire's uint32 ``total_chunks`` can carry.

    Pure and thread-safe.
    """
    check_int("size", size, 0)
    check_int("chunk_size", chunk_size, 1)
    count = -(-size // chunk_size)
    if count > _U32_MAX:
        raise ValueError(
            f"{size} bytes in {chunk_size}-byte chunks is {count} chunks, "
            f"more than total_chunks (uint32) can carry"
        )
    return count


def chunk_bounds(seq: int, size: int, chunk_size: int) -> tuple[int, int]:
    """Byte range ``[start, end)`` of chunk ``seq``; only the last one may be short.

    Args:
        seq: chunk number, ``0 <= seq < chunk_count(size, chunk_size)``.
        size: archive size in bytes.
        chunk_size: bytes per chunk, > 0.

    Returns:
        ``(start, end)`` with ``end - start == chunk_size`` except for the last chunk.

    Raises:
        ChunkOutOfRange: ``seq >= chunk_count(size, chunk_size)`` (every seq
            for a 0-byte archive).
        TypeError: a non-int argument.
        ValueError: ``seq < 0``, or a bad size/chunk_size (see :func:`chunk_count`).

    Pure and thread-safe.
    """
    check_int("seq", seq, 0)
    total = chunk_count(size, chunk_size)
    if seq >= total:
        raise ChunkOutOfRange(seq, total)
    start = seq * chunk_size
    return start, min(start + chunk_size, size)


def make_chunk(
    *,
    seq: int,
    total: int,
    data: bytes,
    leader_term: int,
    leader_id: int,
    metadata: storage_pb2.SnapshotMetadata | None,
) -> storage_pb2.SnapshotChunk:
    """Build one wire chunk, its checksum computed.

    Args:
        seq: chunk number, ``0 <= seq < total``.
        total: ``total_chunks``, 1..2**32-1.
        data: the chunk's bytes.
        leader_term: the sender's term (d-engine sends ``last_included.term``).
        leader_id: the sender's node id (uint32).
        metadata: set on the chunk only when given (senders pass it for seq 0
            only); it must have ``last_included``.

    Returns:
        A new ``SnapshotChunk``.

    Raises:
        TypeError: a bad argument type.
        ValueError: ``seq``/``total`` out of range, ``leader_term``/``leader_id``
            out of their uint range, or metadata without ``last_included``.

    Pure and thread-safe.
    """
    check_int("total", total, 1)
    check_int("seq", seq, 0)
    if total > _U32_MAX:
        raise ValueError(f"total must fit uint32, got {total}")
    if seq >= total:
        raise ValueError(f"seq must be < total ({total}), got {seq}")
    check_int("leader_term", leader_term, 0)
    check_int("leader_id", leader_id, 0)
    if leader_term > 2**64 - 1:
        raise ValueError(f"leader_term must fit uint64, got {leader_term}")
    if leader_id > _U32_MAX:
        raise ValueError(f"leader_id must fit uint32, got {leader_id}")
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    chunk = storage_pb2.SnapshotChunk(
        leader_term=leader_term,
        leader_id=leader_id,
        seq=seq,
        total_chunks=total,
        chunk_checksum=checksum(data),
        data=data,
    )
    if metadata is not None:
        if not isinstance(metadata, storage_pb2.SnapshotMetadata):
            raise TypeError(f"metadata must be a SnapshotMetadata, got {type(metadata).__name__}")
        if not metadata.HasField("last_included"):
            raise ValueError("metadata has no last_included")
        chunk.metadata.CopyFrom(metadata)
    return chunk


def verify_chunk(chunk: storage_pb2.SnapshotChunk) -> bool:
    """True when the chunk's ``chunk_checksum`` is the CRC32 of its ``data``.

    A checksum of any length other than 4 bytes fails, as in d-engine.

    Pure and thread-safe.
    """
    return chunk.chunk_checksum == checksum(chunk.data)
