"""``_kvfile.read`` on hostile input: every inconsistency is a ValueError, never anything else.

Snapshot data arrives from the network. Each rejection branch of ``read``
has a hand-built witness; hypothesis then throws truncations, bit flips,
false page sizes and forged pages at it. Whatever is accepted must be the
data written (or, for a cut exactly between pages, the pages before it:
the archive's SHA-256 is what catches that).
"""

from __future__ import annotations

import io
import mmap
import struct
from pathlib import Path

import pytest
from _hypothesis_profiles import PROFILE
from hypothesis import assume, given
from hypothesis import strategies as st

from d_engine_sm import _kvfile
from d_engine_sm.proto import kv_snapshot_pb2

_LEN = struct.Struct("<Q")

pairs = st.dictionaries(st.binary(min_size=0, max_size=12), st.binary(max_size=24), max_size=12)


def _encode(data: dict[bytes, bytes], expiry: dict[bytes, float]) -> bytes:
    out = io.BytesIO()
    _kvfile.write(out, data, expiry)
    return out.getvalue()


def _page(page: kv_snapshot_pb2.KvPage) -> bytes:
    raw = page.SerializeToString()
    return _LEN.pack(len(raw)) + raw


def _pages(blob: bytes) -> list[int]:
    """Offsets where each page (and the end) starts: the cuts that parse."""
    ends, pos = [len(_kvfile.MAGIC)], len(_kvfile.MAGIC)
    while pos < len(blob):
        (size,) = _LEN.unpack_from(blob, pos)
        pos += _LEN.size + size
        ends.append(pos)
    return ends


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[dict[bytes, bytes], dict[bytes, float]]:
    data = draw(pairs)
    keys = sorted(data)
    with_ttl = draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
    expiry = {k: draw(st.floats(0, 2e9, allow_nan=False)) for k in with_ttl}
    return data, expiry


# -- each rejection, by hand -------------------------------------------------------


@pytest.mark.parametrize("blob", [b"", b"DESMKV0", b"DESMKV01" + b"\0" * 8, b"x" * 64])
def test_bad_magic(blob: bytes) -> None:
    with pytest.raises(ValueError, match="bad magic"):
        _kvfile.read(blob)


@pytest.mark.parametrize("extra", [1, 4, 7])
def test_truncated_page_header(extra: int) -> None:
    with pytest.raises(ValueError, match="inside a page header"):
        _kvfile.read(_kvfile.MAGIC + b"\x05" * extra)


@pytest.mark.parametrize("size", [4, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 64) - 1])
def test_declared_page_size_larger_than_the_data(size: int) -> None:
    with pytest.raises(ValueError, match="overruns the file"):
        _kvfile.read(_kvfile.MAGIC + _LEN.pack(size) + b"\x0a\x01k")


def test_page_that_does_not_decode() -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length far past the page
    with pytest.raises(ValueError, match="does not decode"):
        _kvfile.read(_kvfile.MAGIC + _LEN.pack(len(garbage)) + garbage)


@pytest.mark.parametrize(
    "page",
    [
        kv_snapshot_pb2.KvPage(keys=[b"a", b"b"], values=[b"1"]),
        kv_snapshot_pb2.KvPage(keys=[b"a"], values=[b"1", b"2"]),
        kv_snapshot_pb2.KvPage(keys=[b"a"], values=[b"1"], ttl_positions=[0]),
        kv_snapshot_pb2.KvPage(keys=[b"a"], values=[b"1"], ttl_expiry=[1.0]),
    ],
)
def test_unpaired_entries(page: kv_snapshot_pb2.KvPage) -> None:
    with pytest.raises(ValueError, match="unpaired"):
        _kvfile.read(_kvfile.MAGIC + _page(page))


def test_ttl_position_past_the_page() -> None:
    page = kv_snapshot_pb2.KvPage(keys=[b"a"], values=[b"1"], ttl_positions=[1], ttl_expiry=[5.0])
    with pytest.raises(ValueError, match="ttl entry points at pair 1 of a 1-pair page"):
        _kvfile.read(_kvfile.MAGIC + _page(page))


@pytest.mark.parametrize("split", [False, True])
def test_duplicate_keys(split: bool) -> None:
    if split:  # across two pages
        blob = _page(kv_snapshot_pb2.KvPage(keys=[b"a"], values=[b"1"])) * 2
    else:
        blob = _page(kv_snapshot_pb2.KvPage(keys=[b"a", b"a"], values=[b"1", b"2"]))
    with pytest.raises(ValueError, match="duplicate keys"):
        _kvfile.read(_kvfile.MAGIC + blob)


def test_reads_bytes_memoryview_and_mmap(tmp_path: Path) -> None:
    data = {b"k%d" % i: b"v" * i for i in range(50)}
    blob = _encode(data, {b"k3": 12.5})
    path = tmp_path / "kv"
    path.write_bytes(blob)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for source in (blob, memoryview(blob), mapped):
            assert _kvfile.read(source) == (data, {b"k3": 12.5})


def test_a_pair_over_the_page_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kvfile, "_MAX_PAGE", 10)
    with pytest.raises(ValueError, match="over 2 GiB"):
        _encode({b"key": b"a value too long"}, {})


def test_large_pairs_split_into_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kvfile, "_PAGE_BYTES", 64)
    data = {b"k%d" % i: bytes([i]) * 40 for i in range(9)}
    blob = _encode(data, {b"k8": 1.0})
    assert len(_pages(blob)) > 4  # split by size, not by count
    assert _kvfile.read(blob) == (data, {b"k8": 1.0})


# -- fuzzing -----------------------------------------------------------------------


@PROFILE
@given(snapshots())
def test_round_trip(snapshot: tuple[dict[bytes, bytes], dict[bytes, float]]) -> None:
    data, expiry = snapshot
    assert _kvfile.read(_encode(data, expiry)) == (data, expiry)


@PROFILE
@given(snapshots(), st.data())
def test_any_truncation_is_refused_or_whole_pages(
    snapshot: tuple[dict[bytes, bytes], dict[bytes, float]], draw: st.DataObject
) -> None:
    data, expiry = snapshot
    blob = _encode(data, expiry)
    cut = draw.draw(st.integers(0, len(blob) - 1), label="cut")
    try:
        got, got_expiry = _kvfile.read(blob[:cut])
    except ValueError:
        assert cut not in _pages(blob)
        return
    assert cut in _pages(blob)  # only a cut between pages parses, to a prefix
    assert got.items() <= data.items() and got_expiry.items() <= expiry.items()


@PROFILE
@given(snapshots(), st.data())
def test_bit_flips_are_refused_or_parse_consistently(
    snapshot: tuple[dict[bytes, bytes], dict[bytes, float]], draw: st.DataObject
) -> None:
    data, expiry = snapshot
    blob = bytearray(_encode(data, expiry))
    flips = draw.draw(st.lists(st.integers(0, len(blob) * 8 - 1), min_size=1, max_size=4))
    for bit in flips:
        blob[bit // 8] ^= 1 << (bit % 8)
    try:
        got, got_expiry = _kvfile.read(bytes(blob))
    except ValueError:
        return
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in got.items())
    assert set(got_expiry) <= set(got)
    assert all(isinstance(at, float) for at in got_expiry.values())


@PROFILE
@given(snapshots(), st.data())
def test_false_page_sizes_are_refused(
    snapshot: tuple[dict[bytes, bytes], dict[bytes, float]], draw: st.DataObject
) -> None:
    data, expiry = snapshot
    assume(data)
    blob = bytearray(_encode(data, expiry))
    starts = _pages(bytes(blob))[:-1]
    at = draw.draw(st.sampled_from(starts), label="page")
    (size,) = _LEN.unpack_from(blob, at)
    larger = draw.draw(st.integers(len(blob) - at - _LEN.size + 1, (1 << 64) - 1), label="size")
    _LEN.pack_into(blob, at, larger)
    with pytest.raises(ValueError, match="overruns"):
        _kvfile.read(bytes(blob))
    smaller = draw.draw(st.integers(0, size - 1), label="smaller") if size else None
    if smaller is not None:
        _LEN.pack_into(blob, at, smaller)
        try:  # the rest of the page is then read as the next header: parsing must stay sane
            got, _ = _kvfile.read(bytes(blob))
        except ValueError:
            return
        assert all(isinstance(k, bytes) for k in got)


@PROFILE
@given(
    st.lists(st.binary(max_size=6), max_size=6),
    st.lists(st.binary(max_size=6), max_size=6),
    st.lists(st.integers(0, 2**32 - 1), max_size=4),
    st.lists(st.floats(allow_nan=False), max_size=4),
)
def test_forged_pages_are_refused_or_consistent(
    keys: list[bytes], values: list[bytes], positions: list[int], expiries: list[float]
) -> None:
    page = kv_snapshot_pb2.KvPage(
        keys=keys, values=values, ttl_positions=positions, ttl_expiry=expiries
    )
    try:
        data, expiry = _kvfile.read(_kvfile.MAGIC + _page(page))
    except ValueError:
        ok = (
            len(keys) == len(values)
            and len(positions) == len(expiries)
            and all(p < len(keys) for p in positions)
            and len(set(keys)) == len(keys)
        )
        assert not ok
        return
    assert data == dict(zip(keys, values, strict=True)) and len(data) == len(keys)
    assert expiry == {keys[p]: at for p, at in zip(positions, expiries, strict=True)}
