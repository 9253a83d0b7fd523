"""The built-in key/value snapshot file: safe to parse, fast both ways (pure).

Snapshot data arrives from the network, so parsing must never execute code
(no pickle/marshal) and must reject inconsistent input. The pairs go in
protobuf pages (``kv_snapshot.proto``): encoding and decoding run in C,
and a page's ``repeated bytes`` becomes Python bytes with no per-item Python
code. Layout::

    magic  b"DESMKV02"
    pages  repeated: <u64 little-endian length> <KvPage bytes>

Pages hold at most ``_PAGE_PAIRS`` pairs (and about ``_PAGE_BYTES`` bytes),
so no million-item list is built while writing: the garbage collector, which
a concurrent apply may trigger, never scans one while holding the
interpreter lock.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Mapping
from itertools import islice
from typing import BinaryIO, Final, cast

from google.protobuf.message import DecodeError

from d_engine_sm.proto import kv_snapshot_pb2

MAGIC: Final = b"DESMKV02"
_LEN: Final = struct.Struct("<Q")
_PAGE_PAIRS: Final = 16_384
_PAGE_BYTES: Final = 32 << 20
_MAX_PAGE: Final = (1 << 31) - 1  # protobuf's message size limit


def write(out: BinaryIO, data: Mapping[bytes, bytes], expiry: Mapping[bytes, float]) -> None:
    """Write ``data`` (and the expiries of its keys) to ``out``.

    Raises:
        ValueError: a single pair does not fit in one page (over 2 GiB).
    """
    out.write(MAGIC)
    for page in _pages(data, expiry):
        raw = page.SerializeToString()
        out.write(_LEN.pack(len(raw)))
        out.write(raw)


def _pages(
    data: Mapping[bytes, bytes], expiry: Mapping[bytes, float]
) -> Iterator[kv_snapshot_pb2.KvPage]:
    keys_it, values_it = iter(data.keys()), iter(data.values())  # same order
    while keys := list(islice(keys_it, _PAGE_PAIRS)):
        yield from _split_page(keys, list(islice(values_it, len(keys))), expiry)


def _split_page(
    keys: list[bytes], values: list[bytes], expiry: Mapping[bytes, float]
) -> Iterator[kv_snapshot_pb2.KvPage]:
    size = sum(map(len, keys)) + sum(map(len, values))
    if size > _PAGE_BYTES and len(keys) > 1:  # large pairs (rare): halve the page
        mid = len(keys) // 2
        yield from _split_page(keys[:mid], values[:mid], expiry)
        yield from _split_page(keys[mid:], values[mid:], expiry)
        return
    if size > _MAX_PAGE:
        raise ValueError("a key/value pair over 2 GiB cannot be stored")
    page = kv_snapshot_pb2.KvPage(keys=keys, values=values)
    if expiry:
        for pos, key in enumerate(keys):
            at = expiry.get(key)
            if at is not None:
                page.ttl_positions.append(pos)
                page.ttl_expiry.append(at)
    yield page


def read(blob: bytes | memoryview | mmap.mmap) -> tuple[dict[bytes, bytes], dict[bytes, float]]:
    """Parse :func:`write`'s output. Raises ValueError on any inconsistency.

    From an mmap, pages already parsed are handed back to the kernel as the
    parse goes: a mapped file counts in the process's resident memory, and
    the state being built is already a second copy of it.
    """
    release = _Release(blob) if isinstance(blob, mmap.mmap) else None
    view = memoryview(blob)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise ValueError("not a key/value snapshot (bad magic)")
    # All pairs are gathered first and the dict built in one go: updating one
    # growing dict page by page is about twice as slow (resizes, cache misses).
    all_keys: list[bytes] = []
    all_values: list[bytes] = []
    expiry: dict[bytes, float] = {}
    pos = len(MAGIC)
    while pos < len(view):
        if pos + _LEN.size > len(view):
            raise ValueError("key/value snapshot truncated inside a page header")
        (size,) = _LEN.unpack_from(view, pos)
        pos += _LEN.size
        if size > _MAX_PAGE or pos + size > len(view):
            raise ValueError(f"key/value snapshot page of {size} bytes overruns the file")
        page = kv_snapshot_pb2.KvPage()  # a fresh page parses faster than a cleared one
        try:
            page.ParseFromString(cast(bytes, view[pos : pos + size]))  # buffers parse too
        except DecodeError as exc:
            raise ValueError(f"key/value snapshot page does not decode: {exc}") from exc
        pos += size
        if release is not None:
            release.upto(pos)
        keys, values = page.keys, page.values
        if len(keys) != len(values) or len(page.ttl_positions) != len(page.ttl_expiry):
            raise ValueError("key/value snapshot page has unpaired entries")
        all_keys.extend(keys)
        all_values.extend(values)
        for at_pos, at in zip(page.ttl_positions, page.ttl_expiry, strict=True):
            if at_pos >= len(keys):
                raise ValueError(f"ttl entry points at pair {at_pos} of a {len(keys)}-pair page")
            expiry[keys[at_pos]] = at
    data = dict(zip(all_keys, all_values, strict=True))
    if len(data) != len(all_keys):
        raise ValueError("key/value snapshot has duplicate keys")
    return data, expiry


class _Release:
    """Drops the mapped pages of a file below an offset (``MADV_DONTNEED``).

    The mapping stays valid: on a file mapping, a page touched again is read
    back from the file, so this only ever costs time, never correctness.
    """

    _STEP: Final = 8 << 20  # bytes between two madvise calls

    def __init__(self, mapped: mmap.mmap) -> None:
        self._mapped = mapped
        self._done = 0
        self._advice = getattr(mmap, "MADV_DONTNEED", None)

    def upto(self, offset: int) -> None:
        end = offset - offset % mmap.PAGESIZE
        if self._advice is None or end - self._done < self._STEP:
            return
        try:
            self._mapped.madvise(self._advice, self._done, end - self._done)
        except (OSError, ValueError):  # advice only: keep parsing
            self._advice = None
            return
        self._done = end
