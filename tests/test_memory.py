from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import pytest
from conftest import put

from d_engine_sm import MemoryStateMachine, _kv, _kvfile
from d_engine_sm._values import ApplyResult
from d_engine_sm.proto import common_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_insert_delete_and_order() -> None:
    sm = MemoryStateMachine()
    results = sm.apply_chunk(
        [
            put(1, b"k1", b"v1"),
            put(2, b"k2", b"v2"),
            _kv.command_entry(3, 1, _kv.delete(b"k1")),
            put(4, b"k3", b"v3"),
        ]
    )
    assert results == [ApplyResult(i, True) for i in range(1, 5)]
    assert (sm.get(b"k1"), sm.get(b"k2"), sm.get(b"k3")) == (None, b"v2", b"v3")
    assert (sm.last_applied().index, sm.last_applied().term) == (4, 1)
    assert len(sm) == 2


def test_compare_and_swap() -> None:
    sm = MemoryStateMachine()
    cas = _kv.compare_and_swap
    results = sm.apply_chunk(
        [
            _kv.command_entry(1, 1, cas(b"lock", None, b"owner1")),
            _kv.command_entry(2, 1, cas(b"lock", None, b"owner9")),  # exists: fails
            _kv.command_entry(3, 1, cas(b"lock", b"owner1", b"owner2")),
            _kv.command_entry(4, 1, cas(b"lock", b"wrong", b"owner3")),
            _kv.command_entry(5, 1, cas(b"new", b"", b"x")),  # empty != absent
        ]
    )
    assert [r.succeeded for r in results] == [True, False, True, False, False]
    assert sm.get(b"lock") == b"owner2"
    assert sm.get(b"new") is None


def test_noop_config_and_garbage() -> None:
    sm = MemoryStateMachine()
    config = common_pb2.Entry(
        index=2, term=1, payload=common_pb2.EntryPayload(config=common_pb2.MembershipChange())
    )
    results = sm.apply_chunk(
        [
            _kv.noop_entry(1, 1),
            config,
            _kv.command_entry(3, 1, b"\xff\xff\xff"),
            _kv.command_entry(4, 1, b""),
            common_pb2.Entry(index=5, term=1),  # no payload at all
        ]
    )
    assert [r.succeeded for r in results] == [True, True, False, False, True]
    assert len(sm) == 0
    assert sm.last_applied().index == 5


def test_ttl_expiry_and_cleanup() -> None:
    clock = Clock()
    sm = MemoryStateMachine(clock=clock)
    sm.apply_chunk([put(1, b"t", b"1", ttl=10), put(2, b"p", b"2"), put(3, b"u", b"3", ttl=5)])
    assert sm.get(b"t") == b"1"
    clock.now += 5
    assert sm.get(b"u") is None  # expiry is inclusive
    assert sm.get(b"t") == b"1"
    clock.now += 5
    assert sm.get(b"t") is None
    assert sorted(sm.lease_background_cleanup()) == [b"t", b"u"]
    assert len(sm) == 1 and sm.lease_background_cleanup() == []


def test_overwrite_clears_ttl_and_cas_sees_expired_as_absent() -> None:
    clock = Clock()
    sm = MemoryStateMachine(clock=clock)
    sm.apply_chunk([put(1, b"a", b"1", ttl=1), put(2, b"a", b"2"), put(3, b"b", b"x", ttl=1)])
    clock.now += 100
    assert sm.get(b"a") == b"2"
    r = sm.apply_chunk([_kv.command_entry(4, 1, _kv.compare_and_swap(b"b", None, b"y"))])
    assert r[0].succeeded and sm.get(b"b") == b"y"


def test_entry_term_tracks_term_changes() -> None:
    sm = MemoryStateMachine()
    sm.apply_chunk([put(1, b"a", b"", 1), put(2, b"a", b"", 1), put(3, b"a", b"", 3)])
    sm.apply_chunk([put(4, b"a", b"", 3), put(5, b"a", b"", 4)])
    assert [sm.entry_term(i) for i in range(0, 7)] == [None, 1, 1, 3, 3, 4, None]


def test_snapshot_round_trip_into_fresh_instance(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    clock = Clock()
    a = MemoryStateMachine(clock=clock)
    a.apply_chunk([put(1, b"x", b"1"), put(2, b"y", b"2", ttl=50)])
    a.prepare_snapshot()
    a.apply_chunk([put(3, b"z", b"after")])  # not in the capture
    lid = _kv_log_id(2, 1)
    a.generate_snapshot_data(d, lid)
    b = MemoryStateMachine(clock=clock)
    b.apply_chunk([put(1, b"old", b"gone")])
    from d_engine_sm.proto import storage_pb2

    meta = storage_pb2.SnapshotMetadata(last_included=lid)
    b.apply_snapshot_from_file(meta, d)
    assert b.items() == {b"x": b"1", b"y": b"2"}
    assert b.last_applied() == lid and b.snapshot_metadata() == meta
    clock.now += 50
    assert b.get(b"y") is None


def test_reset() -> None:
    sm = MemoryStateMachine()
    sm.apply_chunk([put(1, b"a", b"1")])
    sm.reset()
    assert len(sm) == 0 and sm.last_applied().index == 0 and sm.snapshot_metadata() is None
    assert sm.is_running()
    sm.apply_chunk([put(1, b"a", b"1")])
    assert sm.last_applied().index == 1


def _kv_log_id(index: int, term: int) -> common_pb2.LogId:
    return common_pb2.LogId(index=index, term=term)


def test_kvfile_round_trip_and_rejects_garbage() -> None:
    data = {b"k%d" % i: b"v" * i for i in range(300)}
    expiry = {b"k7": 123.5, b"k250": 9.0, b"missing": 1.0}
    buf = io.BytesIO()
    _kvfile.write(buf, data, expiry)
    blob = buf.getvalue()
    back, back_expiry = _kvfile.read(blob)
    assert back == data and back_expiry == {b"k7": 123.5, b"k250": 9.0}
    for bad in (b"", blob[:10], b"X" + blob[1:], blob + b"\0", blob[:-1]):
        with pytest.raises(ValueError):
            _kvfile.read(bad)


def _mapped_rss_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = head[-1] == path
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_kvfile_read_from_mmap_hands_parsed_pages_back(tmp_path: Path) -> None:
    # About 40 MiB over several pages: the parse must not keep the whole
    # mapping resident (it would double the memory an install needs).
    data = {b"key-%08d" % i: (b"%08d" % i) * 128 for i in range(40_000)}
    expiry = {b"key-%08d" % i: 1e9 + i for i in range(0, 40_000, 997)}
    path = tmp_path / "kv.bin"
    with open(path, "wb") as out:
        _kvfile.write(out, data, expiry)
    size = path.stat().st_size
    assert size > 32 << 20
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        back, back_expiry = _kvfile.read(mapped)
        resident = _mapped_rss_kib(str(path)) * 1024
    assert back == data and back_expiry == expiry
    assert resident <= size // 2, f"{resident} of {size} mapped bytes still resident"


def test_kvfile_read_from_mmap_still_rejects_a_cut_file(tmp_path: Path) -> None:
    data = {b"key-%08d" % i: b"v" * 1000 for i in range(20_000)}  # ~20 MiB, several pages
    whole = io.BytesIO()
    _kvfile.write(whole, data, {})
    path = tmp_path / "kv.bin"
    path.write_bytes(whole.getvalue()[:-100])
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        pytest.raises(ValueError, match="overruns"),
    ):
        _kvfile.read(mapped)
