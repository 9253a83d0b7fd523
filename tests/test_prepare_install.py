"""``StateMachine.prepare_install``: the slow part of an install runs while applies go on.

The handler calls it once a received archive is verified and unpacked,
before it pauses applies for ``apply_snapshot_from_file``. These tests hold
it (and SQLite's validation inside it) open and apply meanwhile; a failure in
it must install nothing; a snapshot that turned stale skips it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import puts

import d_engine_sm._sqlite as sqlite_module
from d_engine_sm import MemoryStateMachine, SqliteStateMachine, StateMachineHandler
from d_engine_sm._config import SnapshotConfig
from d_engine_sm.errors import SnapshotError, StaleSnapshotError
from d_engine_sm.proto import storage_pb2

WAIT = 30.0
FAILED = storage_pb2.SnapshotAck.FAILED


def cfg(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=directory, chunk_size=512, fsync=False, resume_ttl=0)


class HeldPrepare(MemoryStateMachine):
    """A memory machine whose ``prepare_install`` waits to be released (or fails)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []
        self.fail = fail

    def prepare_install(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        self.calls.append(meta.last_included.index)
        self.entered.set()
        assert self.release.wait(WAIT)
        if self.fail:
            raise RuntimeError("files do not add up")


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "leader"), node_id=1) as h:
        h.apply_chunk(puts(1, 200))
        h.create_snapshot()
        yield h


def stream_of(leader: StateMachineHandler) -> Any:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    return leader.load_snapshot_data(meta)


def test_applies_go_on_while_the_state_machine_prepares(
    leader: StateMachineHandler, tmp_path: Path
) -> None:
    sm = HeldPrepare()
    with StateMachineHandler(sm, cfg(tmp_path / "follower"), node_id=2) as follower:
        follower.apply_chunk(puts(1, 5))
        done: list[Any] = []
        receiving = threading.Thread(
            target=lambda: done.append(
                follower.apply_snapshot_stream_from_leader(1, stream_of(leader), lambda a: None)
            )
        )
        receiving.start()
        try:
            assert sm.entered.wait(WAIT)
            # Not paused: an apply (and a read) complete while prepare_install runs.
            results = follower.apply_chunk(puts(6, 3))
            assert [r.index for r in results] == [6, 7, 8]
            assert follower.last_applied() == 8
            assert follower.read_from_state_machine([b"k8"]) is not None
        finally:
            sm.release.set()
            receiving.join(WAIT)
        assert not receiving.is_alive()
        assert [m.last_included.index for m in done] == [200]
        assert follower.last_applied() == 200 and len(sm) == 200
        assert sm.calls == [200]


def test_a_failing_prepare_installs_nothing(leader: StateMachineHandler, tmp_path: Path) -> None:
    sm = HeldPrepare(fail=True)
    sm.release.set()
    acks: list[storage_pb2.SnapshotAck] = []
    directory = tmp_path / "follower"
    with StateMachineHandler(sm, cfg(directory), node_id=2) as follower:
        follower.apply_chunk(puts(1, 5))
        with pytest.raises(
            SnapshotError, match=r"^prepare_install failed: files do not add up$"
        ) as info:
            follower.apply_snapshot_stream_from_leader(1, stream_of(leader), acks.append)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert acks[-1].status == FAILED
        assert follower.last_applied() == 5 and len(sm) == 5
        assert follower.get_latest_snapshot_metadata() is None
    assert sorted(p.name for p in directory.iterdir()) == [".lock"]


def test_a_snapshot_that_turned_stale_is_not_prepared(
    leader: StateMachineHandler, tmp_path: Path
) -> None:
    sm = HeldPrepare()
    with StateMachineHandler(sm, cfg(tmp_path / "follower"), node_id=2) as follower:

        def overtaken() -> Iterator[storage_pb2.SnapshotChunk]:
            # While the chunks arrive, the log overtakes the snapshot (index 200).
            for i, chunk in enumerate(stream_of(leader)):
                if i == 1:
                    follower.apply_chunk(puts(1, 201))
                yield chunk

        with pytest.raises(StaleSnapshotError):
            follower.apply_snapshot_stream_from_leader(1, overtaken(), lambda a: None)
        assert sm.calls == []
        assert follower.last_applied() == 201


@pytest.mark.timeout(60)
def test_sqlite_validates_while_applies_go_on_and_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leader_sm = SqliteStateMachine(tmp_path / "leader.db", durability="off")
    with StateMachineHandler(leader_sm, cfg(tmp_path / "leader"), node_id=1) as leader:
        leader.apply_chunk(puts(1, 300))
        leader.create_snapshot()
        stages: list[Path] = []
        entered, release = threading.Event(), threading.Event()
        real_stage = sqlite_module.stage  # type: ignore[attr-defined]

        def held_stage(source: Path, meta: Any, **kw: Any) -> None:
            stages.append(source)
            entered.set()
            assert release.wait(WAIT)
            real_stage(source, meta, **kw)

        monkeypatch.setattr(sqlite_module, "stage", held_stage)
        sm = SqliteStateMachine(tmp_path / "follower.db", durability="off")
        with StateMachineHandler(sm, cfg(tmp_path / "follower"), node_id=2) as follower:
            follower.apply_chunk(puts(1, 5))
            receiving = threading.Thread(
                target=follower.apply_snapshot_stream_from_leader,
                args=(1, stream_of(leader), lambda a: None),
            )
            receiving.start()
            try:
                assert entered.wait(WAIT)
                assert [r.index for r in follower.apply_chunk(puts(6, 2))] == [6, 7]
            finally:
                release.set()
                receiving.join(WAIT)
            assert not receiving.is_alive()
            assert follower.last_applied() == 300 and len(sm) == 300
            # Validated and staged once, in the unpacked directory, before the pause.
            assert len(stages) == 1 and stages[0].name == "state.sqlite3"
            assert not stages[0].exists()  # renamed over the database
        sm.close()
    leader_sm.close()


def test_sqlite_stages_again_when_the_install_is_not_the_prepared_one(tmp_path: Path) -> None:
    source = SqliteStateMachine(tmp_path / "source.db", durability="off")
    target = SqliteStateMachine(tmp_path / "target" / "state.sqlite3", durability="off")
    try:
        source.apply_chunk(puts(1, 20))
        lid = source.last_applied()
        snap = tmp_path / "snap"
        snap.mkdir()
        source.prepare_snapshot()
        source.generate_snapshot_data(snap, lid)
        prepared = storage_pb2.SnapshotMetadata(last_included=lid, checksum=b"\x01" * 32)
        target.prepare_install(prepared, snap)
        # Installed with other metadata than prepared: validated and labelled anew.
        other = storage_pb2.SnapshotMetadata(last_included=lid, checksum=b"\x03" * 32)
        target.apply_snapshot_from_file(other, snap)
        assert target.snapshot_metadata() == other
        assert len(target) == 20 and target.last_applied() == lid
        with pytest.raises(ValueError, match="onto itself"):
            target.prepare_install(other, Path(target.path).parent)
    finally:
        source.close()
        target.close()


def memory_snapshot(tmp_path: Path, keys: int) -> tuple[Path, storage_pb2.SnapshotMetadata]:
    source = MemoryStateMachine()
    source.apply_chunk(puts(1, keys, term=3))
    snap = tmp_path / "snap"
    snap.mkdir()
    source.prepare_snapshot()
    source.generate_snapshot_data(snap, source.last_applied())
    meta = storage_pb2.SnapshotMetadata(last_included=source.last_applied(), checksum=b"\x04" * 32)
    return snap, meta


def test_memory_installs_what_it_prepared_without_reading_again(tmp_path: Path) -> None:
    snap, meta = memory_snapshot(tmp_path, 50)
    sm = MemoryStateMachine()
    sm.prepare_install(meta, snap)
    (snap / "kv.bin").unlink()  # the parsed state is what gets installed
    sm.apply_snapshot_from_file(meta, snap)
    assert len(sm) == 50 and sm.get(b"k50") == b"v50"
    assert sm.last_applied().index == 50 and sm.snapshot_metadata() == meta


@pytest.mark.parametrize("dropped_by", ["apply past it", "reset", "other metadata"])
def test_memory_drops_a_prepared_state_that_will_not_be_installed(
    tmp_path: Path, dropped_by: str
) -> None:
    snap, meta = memory_snapshot(tmp_path, 50)
    sm = MemoryStateMachine()
    sm.prepare_install(meta, snap)
    if dropped_by == "apply past it":  # the log overtook the snapshot
        sm.apply_chunk(puts(1, 50))
    elif dropped_by == "reset":
        sm.reset()
    else:  # an install of other metadata parses the file itself
        other = storage_pb2.SnapshotMetadata(
            last_included=meta.last_included, checksum=b"\x05" * 32
        )
        sm.apply_snapshot_from_file(other, snap)
        assert sm.snapshot_metadata() == other and len(sm) == 50
    (snap / "kv.bin").unlink()
    with pytest.raises(FileNotFoundError):  # nothing prepared is left to install
        sm.apply_snapshot_from_file(meta, snap)
