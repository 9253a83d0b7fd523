"""Archive manifests: written first, read bounded, checked as soon as they arrive."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import puts

from d_engine_sm import (
    MemoryStateMachine,
    SnapshotConfig,
    SqliteStateMachine,
    StateMachineHandler,
    __version__,
)
from d_engine_sm._snapshot import archive, chunks, manifest
from d_engine_sm._snapshot.manifest import MANIFEST_NAME, Manifest, ManifestSniffer
from d_engine_sm.errors import (
    CorruptSnapshotError,
    SnapshotFormatMismatch,
    SnapshotTransferError,
    UnsafeArchiveError,
)
from d_engine_sm.proto import common_pb2, storage_pb2

FAILED = storage_pb2.SnapshotAck.FAILED
ACCEPTED = storage_pb2.SnapshotAck.ACCEPTED


def _config(directory: Path, **kw: Any) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=directory, chunk_size=1024, fsync=False, **kw)


def _memory_archive(tmp_path: Path, n: int = 30) -> tuple[storage_pb2.SnapshotMetadata, Path]:
    with StateMachineHandler(MemoryStateMachine(), _config(tmp_path / "leader")) as h:
        h.apply_chunk(puts(1, n))
        return h.create_snapshot()


def _stream(data: bytes, index: int = 10, size: int = 1024) -> list[storage_pb2.SnapshotChunk]:
    meta = storage_pb2.SnapshotMetadata(
        last_included=common_pb2.LogId(index=index, term=1),
        checksum=hashlib.sha256(data).digest(),
    )
    total = max(1, -(-len(data) // size))
    return [
        chunks.make_chunk(
            seq=i,
            total=total,
            data=data[i * size : (i + 1) * size],
            leader_term=1,
            leader_id=2,
            metadata=meta if i == 0 else None,
        )
        for i in range(total)
    ]


def _pack(src: Path, dst: Path, **kw: Any) -> Path:
    with open(dst, "wb") as f:
        archive.pack(src, f, **kw)
    return dst


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("temp-"))


# -- what is written ----------------------------------------------------------------------
def test_memory_snapshot_carries_its_manifest(tmp_path: Path) -> None:
    _, path = _memory_archive(tmp_path, n=30)
    found = archive.read_manifest(path)
    with tarfile.open(path, "r:gz") as tar:
        first, kv = tar.getmembers()[:2]
    assert first.name == MANIFEST_NAME
    assert found == Manifest(
        format="d_engine_sm.memory",
        format_version=1,
        keys=30,
        unpacked_bytes=kv.size,
        library_version=__version__,
    )
    assert manifest.describe(found)[0] == "format   d_engine_sm.memory v1"
    assert manifest.describe(None)[0].startswith("manifest none")


def test_sqlite_snapshot_carries_its_manifest(tmp_path: Path) -> None:
    sm = SqliteStateMachine(tmp_path / "state.db")
    try:
        with StateMachineHandler(sm, _config(tmp_path / "snaps")) as h:
            h.apply_chunk(puts(1, 12))
            _, path = h.create_snapshot()
    finally:
        sm.close()
    found = archive.read_manifest(path)
    assert found is not None
    assert (found.format, found.keys) == ("d_engine_sm.sqlite", 12)
    assert found.format_version == SqliteStateMachine.snapshot_format_version


def test_undeclared_state_machine_writes_a_null_format(tmp_path: Path) -> None:
    class Mine(MemoryStateMachine):
        snapshot_format = None

    with StateMachineHandler(Mine(), _config(tmp_path / "snaps")) as h:
        h.apply_chunk(puts(1, 3))
        _, path = h.create_snapshot()
    found = archive.read_manifest(path)
    assert found is not None and found.format is None and found.format_version is None
    manifest.check(found, ("d_engine_sm.sqlite", 1), 1 << 30)  # nothing to compare: passes


def test_manifest_is_not_unpacked_into_the_state(tmp_path: Path) -> None:
    _, path = _memory_archive(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.safe_unpack(path, dest, max_bytes=1 << 20, max_members=10)
    assert [p.name for p in dest.iterdir()] == ["kv.bin"]


def test_read_manifest_absent_for_an_old_archive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "kv.bin").write_bytes(b"x" * 100)
    assert archive.read_manifest(_pack(src, tmp_path / "old.tar.gz")) is None


# -- what a receiver does with it ---------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1024, 64])
def test_memory_snapshot_to_sqlite_node_fails_at_once(tmp_path: Path, chunk_size: int) -> None:
    _, path = _memory_archive(tmp_path, n=3000)
    data = path.read_bytes()
    stream = _stream(data, size=chunk_size)
    sm = SqliteStateMachine(tmp_path / "follower.db")
    snaps = tmp_path / "follower"
    acks: list[storage_pb2.SnapshotAck] = []
    try:
        with StateMachineHandler(sm, _config(snaps)) as h:
            with pytest.raises(SnapshotFormatMismatch) as info:
                h.apply_snapshot_stream_from_leader(1, stream, acks.append)
            assert h.last_applied() == 0
    finally:
        sm.close()
    err = info.value
    assert isinstance(err, SnapshotTransferError)
    assert "d_engine_sm.memory" in str(err) and "d_engine_sm.sqlite" in str(err)
    assert (err.expected, err.got) == ("d_engine_sm.sqlite v1", "d_engine_sm.memory v1")
    statuses = [a.status for a in acks]
    assert statuses[-1] == FAILED and all(s == ACCEPTED for s in statuses[:-1])
    # As soon as the manifest is in: the first chunk at 1 KiB, a few at 64 bytes.
    assert len(statuses) <= (1 if chunk_size == 1024 else 12), statuses
    assert len(stream) > 4 and len(statuses) < len(stream)
    assert _leftovers(snaps) == []
    assert [p.name for p in snaps.iterdir() if p.name != ".lock"] == []


def test_old_archive_without_manifest_still_installs(tmp_path: Path) -> None:
    """An archive made the way earlier versions made it: no manifest member."""
    leader = MemoryStateMachine()
    with StateMachineHandler(leader, _config(tmp_path / "leader")) as h:
        h.apply_chunk(puts(1, 25))
    work = tmp_path / "work"
    work.mkdir()
    leader.generate_snapshot_data(work, common_pb2.LogId(index=25, term=1))
    old = _pack(work, tmp_path / "old.tar.gz")
    assert archive.read_manifest(old) is None
    follower = MemoryStateMachine()
    with StateMachineHandler(follower, _config(tmp_path / "follower")) as h:
        h.apply_snapshot_stream_from_leader(1, _stream(old.read_bytes(), index=25), print)
        assert h.last_applied() == 25
    assert follower.get(b"k7") == b"v7"


def _archive_with_manifest(tmp_path: Path, body: bytes, payload: bytes = b"x" * 100) -> Path:
    """A tar.gz whose first member is ``body`` under the manifest's name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_NAME, body), ("kv.bin", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "crafted.tar.gz"
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    path.write_bytes(comp.compress(buf.getvalue()) + comp.flush())
    return path


def _good(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "manifest_version": 1,
        "format": "d_engine_sm.memory",
        "format_version": 1,
        "keys": 1,
        "unpacked_bytes": 100,
        "library_version": "0.1.0",
    }
    fields.update(changes)
    return fields


def test_declared_size_over_the_cap_is_refused_early(tmp_path: Path) -> None:
    path = _archive_with_manifest(tmp_path, json.dumps(_good(unpacked_bytes=1 << 40)).encode())
    acks: list[storage_pb2.SnapshotAck] = []
    snaps = tmp_path / "f"
    config = _config(snaps, max_unpacked_bytes=1 << 20)
    with (
        StateMachineHandler(MemoryStateMachine(), config) as h,
        pytest.raises(UnsafeArchiveError, match="declares"),
    ):
        h.apply_snapshot_stream_from_leader(1, _stream(path.read_bytes()), acks.append)
    assert [a.status for a in acks] == [FAILED]
    assert _leftovers(snaps) == []


def test_a_manifest_that_understates_is_not_trusted(tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    path = _archive_with_manifest(tmp_path, json.dumps(_good()).encode(), payload)
    acks: list[storage_pb2.SnapshotAck] = []
    snaps = tmp_path / "f"
    config = _config(snaps, max_unpacked_bytes=1 << 17)
    with (
        StateMachineHandler(MemoryStateMachine(), config) as h,
        pytest.raises(UnsafeArchiveError),
    ):
        h.apply_snapshot_stream_from_leader(1, _stream(path.read_bytes()), acks.append)
    assert acks[-1].status == FAILED
    assert _leftovers(snaps) == []


BAD_MANIFESTS = {
    "not json": b"{nope",
    "not an object": b"[1, 2]",
    "extra key": json.dumps(_good(extra=1)).encode(),
    "missing key": json.dumps({k: v for k, v in _good().items() if k != "keys"}).encode(),
    "string size": json.dumps(_good(unpacked_bytes="100")).encode(),
    "negative keys": json.dumps(_good(keys=-1)).encode(),
    "bool version": json.dumps(_good(format_version=True)).encode(),
    "float size": json.dumps(_good(unpacked_bytes=1.5)).encode(),
    "newer manifest": json.dumps(_good(manifest_version=2)).encode(),
    "huge string": json.dumps(_good(library_version="v" * 1000)).encode(),
    "too large": json.dumps(_good(library_version="v" * 200)).encode() + b" " * 5000,
    "not utf-8": b"\xff\xfe",
    "deep nesting": b"[" * 100_000,
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifests_are_refused(tmp_path: Path, case: str) -> None:
    path = _archive_with_manifest(tmp_path, BAD_MANIFESTS[case])
    with pytest.raises(CorruptSnapshotError, match="MANIFEST"):
        archive.read_manifest(path)
    with pytest.raises(CorruptSnapshotError, match="MANIFEST"):
        archive.verify(path)  # so start-up recovery never keeps one as the latest
    with pytest.raises(CorruptSnapshotError):
        archive.safe_unpack(path, _fresh(tmp_path / "d"), max_bytes=1 << 20, max_members=9)
    acks: list[storage_pb2.SnapshotAck] = []
    with StateMachineHandler(MemoryStateMachine(), _config(tmp_path / "f")) as h:
        with pytest.raises(CorruptSnapshotError):
            h.apply_snapshot_stream_from_leader(1, _stream(path.read_bytes()), acks.append)
        assert h.last_applied() == 0
    assert acks[-1].status == FAILED


def _fresh(path: Path) -> Path:
    path.mkdir()
    return path


def test_check_rules() -> None:
    m = Manifest("d_engine_sm.memory", 2, 1, 10, "0.1.0")
    manifest.check(m, None, 100)  # an undeclared receiver takes anything
    manifest.check(m, ("d_engine_sm.memory", 2), 100)
    manifest.check(m, ("d_engine_sm.memory", 3), 100)  # older versions are readable
    with pytest.raises(SnapshotFormatMismatch, match="v2"):
        manifest.check(m, ("d_engine_sm.memory", 1), 100)  # a newer one is not
    with pytest.raises(SnapshotFormatMismatch):
        manifest.check(m, ("d_engine_sm.sqlite", 2), 100)
    with pytest.raises(UnsafeArchiveError):
        manifest.check(m, None, 9)


# -- the sniffer: same answer however the bytes are cut, bounded on garbage ------------------
@pytest.mark.parametrize("piece", [1, 7, 100, 512, 4096, 1 << 20])
def test_sniffer_is_indifferent_to_chunking(tmp_path: Path, piece: int) -> None:
    _, path = _memory_archive(tmp_path, n=50)
    data = path.read_bytes()
    sniffer = ManifestSniffer("test")
    for i in range(0, len(data), piece):
        sniffer.feed(data[i : i + piece])
        if sniffer.done:
            break
    assert sniffer.done and sniffer.manifest == archive.read_manifest(path)


def test_sniffer_on_garbage_never_raises_anything_else() -> None:
    rng = random.Random(7)
    for _ in range(300):
        sniffer = ManifestSniffer("garbage")
        head = zlib.compressobj(6, zlib.DEFLATED, 31)
        data = head.compress(rng.randbytes(rng.randrange(0, 3000))) + head.flush()
        if rng.random() < 0.5:
            cut = rng.randrange(len(data))
            data = data[:cut] + rng.randbytes(rng.randrange(1, 50)) + data[cut + 1 :]
        try:
            for i in range(0, len(data), 333):
                sniffer.feed(data[i : i + 333])
        except CorruptSnapshotError:
            continue
        assert sniffer.manifest is None
