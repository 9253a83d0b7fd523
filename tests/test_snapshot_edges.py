"""Snapshot API misuse and failures in user code: precise errors, the follower unchanged."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._values import LogId, log_id
from d_engine_sm.errors import SnapshotError
from d_engine_sm.proto import storage_pb2

ACCEPTED = storage_pb2.SnapshotAck.ACCEPTED


def _handler(
    tmp_path: Path, name: str, sm: MemoryStateMachine | None = None
) -> StateMachineHandler:
    config = SnapshotConfig(snapshots_dir=tmp_path / name, chunk_size=256, fsync=False)
    return StateMachineHandler(sm if sm is not None else MemoryStateMachine(), config, node_id=1)


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with _handler(tmp_path, "leader") as h:
        h.apply_chunk(puts(1, 40))
        h.create_snapshot()
        yield h


@pytest.mark.parametrize(
    ("count", "error", "message"),
    [(True, TypeError, "retain_count must be an int"), (0, ValueError, "must be >= 1, got 0")],
)
def test_cleanup_argument_checks(
    leader: StateMachineHandler, count: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        leader.cleanup_snapshot(count)  # type: ignore[arg-type]


def test_load_argument_checks(leader: StateMachineHandler) -> None:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    with pytest.raises(TypeError, match="metadata must be a SnapshotMetadata"):
        leader.load_snapshot_data(object())  # type: ignore[arg-type]
    with pytest.raises(SnapshotError, match="has no last_included"):
        leader.load_snapshot_data(storage_pb2.SnapshotMetadata())
    for seq in (-1, True, 1.0):
        with pytest.raises(ValueError, match="seq must be an int >= 0"):
            leader.load_snapshot_chunk(meta, seq)  # type: ignore[arg-type]


def test_chunks_carry_the_recorded_checksum_when_asked_without_one(
    leader: StateMachineHandler,
) -> None:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None and meta.checksum
    bare = storage_pb2.SnapshotMetadata(last_included=meta.last_included)
    chunk = leader.load_snapshot_chunk(bare, 0, leader_term=9)
    assert chunk.metadata.checksum == meta.checksum
    assert chunk.leader_term == 9


class _RefusesInstall(MemoryStateMachine):
    def apply_snapshot_from_file(self, metadata: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        raise OSError("state machine cannot load it")


def test_a_state_machine_that_fails_to_install_leaves_the_follower_unchanged(
    tmp_path: Path, leader: StateMachineHandler
) -> None:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    with _handler(tmp_path, "follower", _RefusesInstall()) as follower:
        follower.apply_chunk(puts(1, 2))
        acks: list[storage_pb2.SnapshotAck] = []
        with pytest.raises(SnapshotError, match="apply_snapshot_from_file failed") as info:
            follower.apply_snapshot_stream_from_leader(
                1, leader.load_snapshot_data(meta), acks.append
            )
        assert isinstance(info.value.__cause__, OSError)
        assert follower.last_applied() == 2
        assert follower.get_latest_snapshot_metadata() is None
        assert follower.metrics()["snapshot_receive_errors"] == 1
        assert not any(p.name.startswith("temp-") for p in (tmp_path / "follower").iterdir())


def test_a_failing_ack_callback_is_logged_and_the_install_completes(
    tmp_path: Path, leader: StateMachineHandler, caplog: pytest.LogCaptureFixture
) -> None:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    calls = 0

    def ack(message: storage_pb2.SnapshotAck) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("peer went away")

    with (
        _handler(tmp_path, "follower") as follower,
        caplog.at_level(logging.ERROR, logger="d_engine_sm.snapshot"),
    ):
        follower.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), ack)
        assert follower.last_applied() == 40
        got = follower.get_latest_snapshot_metadata()
        assert got is not None and got.last_included == log_id(40, 1)
    assert calls > 1 and "ack callback failed seq=0" in caplog.text
    assert LogId(index=40, term=1) == got.last_included
