"""The kept partial transfer (``temp-resume-data`` + ``temp-resume-state``) and its sidecar.

A stream cut because the peer went away keeps its verified prefix for a later
transfer of the same snapshot to resume from. Only a valid, fresh sidecar over
enough data is trusted at start-up: anything else (too big, not JSON, wrong
types or counts, stale, from the future, data shorter than recorded) is removed
with both files. A sidecar that cannot be written leaves nothing behind.
All in-process through the handler, no transport needed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._fs import FileOps
from d_engine_sm._kv import command_entry, insert
from d_engine_sm._snapshot.partial import DATA_NAME, STATE_NAME, PartialStore
from d_engine_sm._snapshot.receiver import Partial
from d_engine_sm._snapshot.store import SnapshotStore
from d_engine_sm.errors import SnapshotTransferError
from d_engine_sm.proto import storage_pb2

CHUNK = 1024
CUT_AT = 5  # chunks received before the connection drops
TTL = 600.0
PARTIAL = [DATA_NAME, STATE_NAME]


def config(directory: Path, **overrides: Any) -> SnapshotConfig:
    return SnapshotConfig(
        snapshots_dir=directory, chunk_size=CHUNK, fsync=False, resume_ttl=TTL, **overrides
    )


@pytest.fixture(scope="module")
def leader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateMachineHandler]:
    """A snapshot of incompressible values, a dozen or more chunks long."""
    rng = random.Random(7)
    directory = tmp_path_factory.mktemp("leader")
    with StateMachineHandler(MemoryStateMachine(), config(directory), node_id=1) as handler:
        handler.apply_chunk(
            [command_entry(i, 1, insert(b"k%d" % i, rng.randbytes(200))) for i in range(1, 81)]
        )
        handler.create_snapshot()
        yield handler


def chunks(leader: StateMachineHandler) -> list[storage_pb2.SnapshotChunk]:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    return list(leader.load_snapshot_data(meta))


def cut(leader: StateMachineHandler) -> Iterator[storage_pb2.SnapshotChunk]:
    """The leader's chunks until the connection drops."""
    for chunk in chunks(leader):
        if chunk.seq == CUT_AT:
            raise ConnectionResetError("peer went away")
        yield chunk


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("temp-*"))


def start_up(directory: Path) -> None:
    StateMachineHandler(MemoryStateMachine(), config(directory), node_id=2).close()


@pytest.fixture
def kept(tmp_path: Path, leader: StateMachineHandler) -> Path:
    """A follower directory holding a real partial: CUT_AT chunks, kept by the cut."""
    directory = tmp_path / "follower"
    with StateMachineHandler(MemoryStateMachine(), config(directory), node_id=2) as follower:
        with pytest.raises(SnapshotTransferError, match="peer went away"):
            follower.apply_snapshot_stream_from_leader(1, cut(leader), lambda _: None)
        assert follower.last_applied() == 0
    assert leftovers(directory) == PARTIAL
    return directory


def test_a_cut_transfer_keeps_its_verified_prefix(
    kept: Path, leader: StateMachineHandler, caplog: pytest.LogCaptureFixture
) -> None:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    doc = json.loads((kept / STATE_NAME).read_text())
    total = len(chunks(leader))
    assert total > CUT_AT + 1
    assert doc["index"] == meta.last_included.index and doc["term"] == meta.last_included.term
    assert bytes.fromhex(doc["checksum"]) == meta.checksum
    assert (doc["chunks"], doc["total_chunks"], doc["chunk_size"]) == (CUT_AT, total, CHUNK)
    assert abs(doc["saved_at"] - time.time()) < 60
    assert (kept / DATA_NAME).stat().st_size == CUT_AT * CHUNK
    # A fresh, valid partial survives start-up, and the next transfer completes from it.
    start_up(kept)
    assert leftovers(kept) == PARTIAL
    with (
        caplog.at_level(logging.INFO, logger="d_engine_sm.snapshot"),
        StateMachineHandler(MemoryStateMachine(), config(kept), node_id=2) as follower,
    ):
        installed = follower.apply_snapshot_stream_from_leader(1, chunks(leader), lambda _: None)
        assert installed.checksum == meta.checksum
        assert follower.last_applied() == meta.last_included.index
    assert f"resuming transfer index={meta.last_included.index} at chunk={CUT_AT}" in caplog.text
    assert leftovers(kept) == []


def _set(**fields: object) -> Callable[[dict[str, Any]], object]:
    return lambda doc: doc | fields


def _drop(key: str) -> Callable[[dict[str, Any]], object]:
    return lambda doc: {k: v for k, v in doc.items() if k != key}


SIDECAR_DAMAGE: dict[str, Callable[[dict[str, Any]], object]] = {
    "oversized": _set(note="x" * 5000),  # the sidecar is capped at 4 KiB
    "not an object": lambda doc: list(doc.values()),
    "bool index": _set(index=True),
    "negative chunks": _set(chunks=-1),
    "float term": _set(term=1.5),
    "missing chunk_size": _drop("chunk_size"),
    "short checksum": _set(checksum="ab" * 16),
    "checksum not hex": _set(checksum="zz" * 32),
    "no chunks": _set(chunks=0),
    "all chunks": lambda doc: doc | {"chunks": doc["total_chunks"]},
    "chunk_size zero": _set(chunk_size=0),
    "saved_at missing": _drop("saved_at"),
    "saved_at not a number": _set(saved_at="yesterday"),
    "older than the ttl": lambda doc: doc | {"saved_at": time.time() - TTL - 60},
    "from the future": lambda doc: doc | {"saved_at": time.time() + 3600},
    "more data than on disk": lambda doc: doc | {"chunks": doc["chunks"] + 1},
}


@pytest.mark.parametrize("damage", sorted(SIDECAR_DAMAGE))
def test_start_up_removes_a_partial_whose_sidecar_is_not_trusted(
    kept: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = kept / STATE_NAME
    state.write_text(json.dumps(SIDECAR_DAMAGE[damage](json.loads(state.read_text()))))
    with caplog.at_level(logging.INFO, logger="d_engine_sm.snapshot"):
        start_up(kept)
    assert leftovers(kept) == []
    assert "discarded partial transfer" in caplog.text
    assert "reason=no valid sidecar" in caplog.text


def test_start_up_removes_a_sidecar_that_is_not_json(kept: Path) -> None:
    (kept / STATE_NAME).write_bytes(b'{"index": 12, "term"')
    start_up(kept)
    assert leftovers(kept) == []


def test_start_up_removes_a_partial_whose_data_was_cut_short(kept: Path) -> None:
    os.truncate(kept / DATA_NAME, (CUT_AT - 1) * CHUNK)
    start_up(kept)
    assert leftovers(kept) == []


def test_start_up_removes_data_without_a_sidecar(kept: Path) -> None:
    (kept / STATE_NAME).unlink()  # a receive that crashed before committing the sidecar
    start_up(kept)
    assert leftovers(kept) == []


class _NoSidecar(FileOps):
    """The sidecar's rename fails (a full or failing disk)."""

    def replace(self, src: Path, dst: Path) -> None:
        if dst.name == STATE_NAME:
            raise OSError(28, "No space left on device", str(dst))
        super().replace(src, dst)


def test_a_sidecar_that_cannot_be_written_leaves_nothing(
    tmp_path: Path, leader: StateMachineHandler, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "follower"
    follower = StateMachineHandler(
        MemoryStateMachine(), config(directory), node_id=2, file_ops=_NoSidecar()
    )
    with follower, pytest.raises(SnapshotTransferError, match="peer went away"):
        follower.apply_snapshot_stream_from_leader(1, cut(leader), lambda _: None)
    assert leftovers(directory) == []  # neither the data, the sidecar nor its temp file
    assert "keeping partial transfer failed" in caplog.text
    assert "No space left on device" in caplog.text


def test_reading_back_a_prefix_that_shrank_raises(tmp_path: Path) -> None:
    # Under the writer lock the data is never shorter than the sidecar says (start-up
    # checks it; resuming cuts the file to it). If it ever is, reading stops, loudly.
    store = SnapshotStore(tmp_path, "snapshot-", fsync=False)
    partials = PartialStore(store, ttl=TTL, max_bytes=1 << 20)
    partial = Partial(
        index=9, term=1, checksum=b"\x01" * 32, total_chunks=4, chunk_size=100, chunks=3
    )
    (tmp_path / DATA_NAME).write_bytes(b"d" * 250)
    reader = partials.read_prefix(partial)
    assert next(reader) == b"d" * 250
    with pytest.raises(OSError, match=r"partial transfer .*temp-resume-data is shorter than"):
        next(reader)
