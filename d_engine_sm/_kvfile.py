"""A compact, safe-to-parse file format for key/value snapshots (pure).

Chosen over pickle/marshal because snapshot data arrives from the network:
parsing must never execute code and must reject inconsistent input. Layout
(little-endian)::

    header   <8s Q Q Q Q>  magic, pair count, keys blob size, values blob size, ttl count
    klens    count x uint32
    vlens    count x uint32
    keys     concatenated key bytes
    values   concatenated value bytes
    ttls     ttl count x <Q d>  (pair position, wall-clock expiry)

Lengths go in arrays and bytes in blobs so both directions run at C speed.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from itertools import accumulate, islice, pairwise
from typing import BinaryIO, Final

MAGIC: Final = b"DESMKV01"
_HEADER: Final = struct.Struct("<8sQQQQ")
_TTL: Final = struct.Struct("<Qd")
_MAX_LEN: Final = 0xFFFF_FFFF
_SLICE: Final = 16_384


def _u32(values: list[int]) -> array[int]:
    arr = array("I", values)
    if arr.itemsize != 4:  # pragma: no cover - no mainstream platform
        raise RuntimeError("array('I') is not 32-bit here")
    return arr


def write(out: BinaryIO, data: Mapping[bytes, bytes], expiry: Mapping[bytes, float]) -> None:
    """Write ``data`` (and expiries of its keys) to ``out``.

    Streams in slices of ``_SLICE`` pairs: no million-item list is ever built,
    so the garbage collector (which any concurrent apply may trigger) never
    has to scan one while holding the interpreter lock, and no single call
    holds it for long. This runs alongside applies during a snapshot.
    """
    count = len(data)
    klens = _u32([])
    vlens = _u32([])
    for keys in _slices(data.keys()):
        klens.extend(map(len, keys))
    for values in _slices(data.values()):
        vlens.extend(map(len, values))
    if count and (max(klens) > _MAX_LEN or max(vlens) > _MAX_LEN):
        raise ValueError("key or value longer than 4 GiB cannot be stored")
    ttls = (
        [_TTL.pack(pos, expiry[key]) for pos, key in enumerate(data) if expiry and key in expiry]
        if expiry
        else []
    )
    out.write(_HEADER.pack(MAGIC, count, sum(klens), sum(vlens), len(ttls)))
    out.write(_le(klens))
    out.write(_le(vlens))
    for keys in _slices(data.keys()):
        out.write(b"".join(keys))
    for values in _slices(data.values()):
        out.write(b"".join(values))
    out.write(b"".join(ttls))


def _slices(items: Iterable[bytes]) -> Iterator[list[bytes]]:
    it = iter(items)
    while chunk := list(islice(it, _SLICE)):
        yield chunk


def _le(arr: array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


def read(blob: bytes) -> tuple[dict[bytes, bytes], dict[bytes, float]]:
    """Parse :func:`write`'s output. Raises ValueError on any inconsistency."""
    if len(blob) < _HEADER.size:
        raise ValueError("key/value snapshot truncated: no header")
    magic, count, ksize, vsize, nttl = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ValueError("not a key/value snapshot (bad magic)")
    expected = _HEADER.size + 8 * count + ksize + vsize + _TTL.size * nttl
    if expected != len(blob):
        raise ValueError(
            f"key/value snapshot size mismatch: header says {expected}, file has {len(blob)}"
        )
    pos = _HEADER.size
    klens = array("I")
    klens.frombytes(blob[pos : pos + 4 * count])
    pos += 4 * count
    vlens = array("I")
    vlens.frombytes(blob[pos : pos + 4 * count])
    pos += 4 * count
    if sys.byteorder == "big":  # pragma: no cover
        klens.byteswap()
        vlens.byteswap()
    if sum(klens) != ksize or sum(vlens) != vsize:
        raise ValueError("key/value snapshot lengths do not add up to the blob sizes")
    keys = _split(blob, pos, klens)
    pos += ksize
    values = _split(blob, pos, vlens)
    pos += vsize
    data = dict(zip(keys, values, strict=True))
    if len(data) != count:
        raise ValueError("key/value snapshot has duplicate keys")
    expiry: dict[bytes, float] = {}
    for i in range(nttl):
        index, at = _TTL.unpack_from(blob, pos + i * _TTL.size)
        if index >= count:
            raise ValueError(f"ttl entry points at pair {index} of {count}")
        expiry[keys[index]] = at
    return data, expiry


def _split(blob: bytes, start: int, lengths: array[int]) -> list[bytes]:
    ends = list(accumulate(lengths, initial=start))
    return [blob[a:b] for a, b in pairwise(ends)]
