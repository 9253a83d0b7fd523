from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import d_engine_sm
from d_engine_sm import errors
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._values import ApplyResult, NewCommitData, SnapshotContext, log_id
from d_engine_sm.proto import common_pb2


def test_defaults_match_design() -> None:
    c = SnapshotConfig()
    assert c.enable is True
    assert c.max_log_entries_before_snapshot == 1000
    assert c.snapshot_cool_down_since_last_check == 3600.0
    assert c.cleanup_retain_count == 2
    assert c.snapshots_dir_prefix == "snapshot-"
    assert c.chunk_size == 1024 * 1024
    assert c.retained_log_entries == 1
    assert c.chunk_timeout == 10.0
    assert c.fsync is True


def test_snapshots_dir_accepts_str() -> None:
    config = SnapshotConfig(snapshots_dir="/x/y")  # type: ignore[arg-type]  # str accepted
    assert config.snapshots_dir == Path("/x/y")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_log_entries_before_snapshot", 0),
        ("cleanup_retain_count", 0),
        ("chunk_size", 0),
        ("chunk_size", -5),
        ("chunk_timeout", 0),
        ("chunk_timeout", float("nan")),
        ("snapshot_cool_down_since_last_check", -1),
        ("retained_log_entries", -1),
        ("snapshots_dir_prefix", ""),
        ("snapshots_dir_prefix", "a/b"),
        ("snapshots_dir_prefix", "temp-x"),
        ("compression_level", 10),
        ("max_unpacked_bytes", 0),
        ("max_archive_members", 0),
    ],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SnapshotConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("chunk_size", 1.5), ("chunk_size", True), ("enable", 1), ("snapshots_dir", 3)],
)
def test_wrong_types_raise_type_error(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=field):
        SnapshotConfig(**{field: value})  # type: ignore[arg-type]


def test_apply_result() -> None:
    assert ApplyResult.success(3) == ApplyResult(3, True)
    assert ApplyResult.failure(4).succeeded is False
    assert ApplyResult.failure(4).index == 4


def test_snapshot_context_is_leader() -> None:
    ctx = SnapshotContext(common_pb2.NODE_ROLE_LEADER, log_id(0, 0), log_id(5, 1), 1)
    assert ctx.is_leader()
    follower = SnapshotContext(common_pb2.NODE_ROLE_FOLLOWER, log_id(0, 0), log_id(5, 1), 1)
    assert not follower.is_leader()


def test_new_commit_data_validates() -> None:
    with pytest.raises(ValueError, match="current_term"):
        NewCommitData(1, common_pb2.NODE_ROLE_LEADER, -1)


ERRORS = [
    errors.ApplyTimeout(10, 5, 0.5),
    errors.ApplyOrderError(3, 7, "first entry"),
    errors.ApplyError(1, 4, "boom"),
    errors.HandlerClosed("closed"),
    errors.SnapshotError("x"),
    errors.SnapshotInProgress("busy"),
    errors.SnapshotNotFound("/p"),
    errors.ChunkOutOfRange(5, 3),
    errors.SnapshotTransferError("gap", seq=4, status="FAILED"),
    errors.StaleSnapshotError(3, 9),
    errors.UnsafeArchiveError("../x", "escapes"),
    errors.CorruptSnapshotError("/p", "bad crc"),
    errors.InsufficientSpace("/d", 10, 1),
    errors.WorkerStopped("stopped"),
    errors.SubmitTimeout(1.0, 99),
]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_facts(err: errors.DEngineError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__
    assert isinstance(back, errors.DEngineError)


def test_error_hierarchy() -> None:
    assert issubclass(errors.ApplyTimeout, TimeoutError)
    assert issubclass(errors.StaleSnapshotError, errors.SnapshotTransferError)
    assert issubclass(errors.ChunkOutOfRange, errors.SnapshotError)
    t = errors.ApplyTimeout(100, 5, 0.05)
    assert "100" in str(t) and "current_applied: 5" in str(t)
    assert (t.target, t.current) == (100, 5)


def test_every_design_name_is_exported() -> None:
    names = [
        "ApplyResult", "NewCommitData", "SnapshotContext", "SnapshotConfig", "StateMachine",
        "MemoryStateMachine", "SqliteStateMachine", "StateMachineHandler", "SnapshotPolicy",
        "LogSizePolicy", "TimeBasedPolicy", "CompositePolicy", "ApplyWorker", "ApplyCompleted",
        "FatalError", "SnapshotCreated", "Watcher", "DEngineError", "ApplyTimeout",
        "ApplyOrderError", "ApplyError", "HandlerClosed", "SnapshotError", "SnapshotInProgress",
        "SnapshotNotFound", "ChunkOutOfRange", "SnapshotTransferError", "StaleSnapshotError",
        "UnsafeArchiveError", "WorkerStopped",
    ]  # fmt: skip
    missing = [n for n in names if not hasattr(d_engine_sm, n)]
    assert missing == []
    assert sorted(d_engine_sm.__all__) == d_engine_sm.__all__
