from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm.proto import common_pb2


def put(index: int, key: bytes, value: bytes, term: int = 1, ttl: int = 0) -> common_pb2.Entry:
    return _kv.command_entry(index, term, _kv.insert(key, value, ttl))


def puts(first: int, count: int, term: int = 1, prefix: bytes = b"k") -> list[common_pb2.Entry]:
    return [
        put(i, prefix + str(i).encode(), b"v" + str(i).encode(), term)
        for i in range(first, first + count)
    ]


@pytest.fixture
def config(tmp_path: Path) -> SnapshotConfig:
    """d-engine's test config, in our units (fsync off: tests don't need durability)."""
    return SnapshotConfig(
        snapshots_dir=tmp_path / "snapshots",
        chunk_size=1024,
        cleanup_retain_count=2,
        retained_log_entries=1,
        max_log_entries_before_snapshot=1,
        snapshot_cool_down_since_last_check=0,
        chunk_timeout=5.0,
        fsync=False,
    )


@pytest.fixture
def handler(config: SnapshotConfig) -> Iterator[object]:
    from d_engine_sm import MemoryStateMachine
    from d_engine_sm._handler import StateMachineHandler

    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as h:
        yield h


def memory_snapshots(directory: Path, indexes: tuple[int, ...] = (40, 100)) -> Path:
    """``directory`` holding one archive per index (memory state machine, keys ``k1``…)."""
    from d_engine_sm import MemoryStateMachine
    from d_engine_sm._handler import StateMachineHandler

    config = SnapshotConfig(snapshots_dir=directory, fsync=False, cleanup_retain_count=5)
    with StateMachineHandler(MemoryStateMachine(), config) as handler:
        applied = 0
        for index in indexes:
            handler.apply_chunk(puts(applied + 1, index - applied))
            applied = index
            handler.create_snapshot()
    return directory
