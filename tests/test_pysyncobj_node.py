"""RaftNode in one process (a single-node PySyncObj cluster), its dump file,
its identity checks, and installing an archive from a local file."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pysyncobj")
pytest.importorskip("grpc")

from pysyncobj.config import SERIALIZER_STATE  # type: ignore[import-untyped]

from d_engine_sm import (
    SnapshotConfig,
    SqliteStateMachine,
    StateMachineHandler,
    commands,
)
from d_engine_sm._cli import main
from d_engine_sm.errors import SnapshotError, StaleSnapshotError
from d_engine_sm.integrations import _bridge, _dump
from d_engine_sm.integrations.pysyncobj import ClusterMismatch, RaftNode


def free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Box:
    """A node's state machine, handler and data dir, reopenable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sm = SqliteStateMachine(root / "state.db", durability="off")
        self.handler = StateMachineHandler(
            self.sm, SnapshotConfig(snapshots_dir=root / "snapshots", fsync=False)
        )

    def close(self) -> None:
        self.handler.close()
        self.sm.close()


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path / "n")
    yield b
    b.close()


@pytest.mark.timeout(60)
def test_single_node_propose_read_snapshot_restart(box: Box) -> None:
    addr = free_addr()
    opts: dict[str, Any] = {"logCompactionMinEntries": 20, "appendEntriesUseBatch": False}
    with RaftNode(addr, [], box.handler, box.root, **opts) as node:
        for i in range(50):
            assert node.propose(commands.insert(b"k%d" % i, b"v%d" % i), timeout=10).succeeded
        cas = node.propose(commands.compare_and_swap(b"k1", b"wrong", b"x"), timeout=10)
        assert cas.succeeded is False  # the result comes back by index
        found = node.read([b"k1", b"k49", b"absent"], timeout=10)
        assert found is not None and [r.value for r in found] == [b"v1", b"v49"]
        index = node.barrier(timeout=10)
        assert index > 51
        st = node.status()
        assert st["leader"] == addr and st["is_leader"]
        assert st["last_applied"] >= index - 1
        assert st["snapshots_created"] >= 1  # compaction every 20 entries
        assert st["max_hook_seconds"] < 1.0
        applied = st["last_applied"]
    dump = _dump.read(box.root / "raft.dump")
    assert dump.archive_index >= dump.last[1]  # the archive covers the compaction point
    box.close()
    again = Box(box.root)
    try:
        assert again.handler.last_applied() >= applied - 1
        with RaftNode(addr, [], again.handler, again.root) as node:
            assert node.status()["started_applied"] == again.handler.last_applied()
            assert node.propose(commands.insert(b"after", b"1"), timeout=10).succeeded
            assert node.read([b"k5"], timeout=10) is not None
            assert node.status()["failed"] is None  # no index applied twice
    finally:
        again.close()
        box.sm = again.sm
        box.handler = again.handler


def test_state_without_identity_is_refused(box: Box, tmp_path: Path) -> None:
    box.handler.apply_chunk([commands.entry(1, 1, commands.insert(b"a", b"1"))])
    with pytest.raises(ClusterMismatch, match="already applied index 1"):
        RaftNode(free_addr(), [], box.handler, tmp_path / "fresh")


def test_data_dir_of_another_cluster_is_refused(box: Box) -> None:
    (box.root / "cluster.json").write_text('{"cluster_id": "someone-else"}')
    with pytest.raises(ClusterMismatch, match="someone-else"):
        RaftNode(free_addr(), [], box.handler, box.root)


def test_reserved_options_are_refused(box: Box) -> None:
    with pytest.raises(ValueError, match="serializer"):
        RaftNode(free_addr(), [], box.handler, box.root, serializer=print)


# -- the dump file ----------------------------------------------------------------------
DUMP = _dump.Dump(
    cluster_id="c1",
    last=(b"\x00abc", 10, 2),
    prev=(b"\x01", 9, 2),
    members=("127.0.0.1:1", "127.0.0.1:2"),
    archive_index=12,
    archive_term=2,
    archive_sha256=bytes(range(32)),
    source="127.0.0.1:3",
)


def test_dump_round_trip() -> None:
    assert _dump.decode(_dump.encode(DUMP)) == DUMP


@pytest.mark.parametrize("cut", [0, 1, 10, -1, -33])
def test_truncated_dump_is_refused(cut: int) -> None:
    data = _dump.encode(DUMP)
    with pytest.raises(_dump.BadDump):
        _dump.decode(data[:cut])


def test_every_flipped_byte_is_caught() -> None:
    data = _dump.encode(DUMP)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(_dump.BadDump):
            _dump.decode(bytes(bad))


def test_dump_gap_is_caught() -> None:
    data = _dump.encode(DUMP)
    with pytest.raises(_dump.BadDump):
        _dump.decode(data[:40] + data[50:])  # PySyncObj's transfer can lose a piece


# -- installing a local archive -----------------------------------------------------------
def _archive(root: Path, n: int) -> tuple[Path, bytes]:
    src = Box(root)
    try:
        src.handler.apply_chunk(
            [commands.entry(i, 1, commands.insert(b"k%d" % i, b"v")) for i in range(1, n + 1)]
        )
        meta, path = src.handler.create_snapshot()
        return path, bytes(meta.checksum)
    finally:
        src.close()


def test_install_snapshot_from_file(box: Box, tmp_path: Path) -> None:
    path, digest = _archive(tmp_path / "src", 50)
    meta = box.handler.install_snapshot_from_file(path, checksum=digest)
    assert meta.last_included.index == 50
    assert box.handler.last_applied() == 50 and len(box.sm) == 50
    with pytest.raises(StaleSnapshotError):
        box.handler.install_snapshot_from_file(path)


def test_corrupt_local_archive_changes_nothing(box: Box, tmp_path: Path) -> None:
    path, digest = _archive(tmp_path / "src", 50)
    bad = tmp_path / "snapshot-50-1.tar.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        box.handler.install_snapshot_from_file(bad, checksum=digest)  # SHA-256 mismatch
    with pytest.raises(SnapshotError):
        box.handler.install_snapshot_from_file(bad)  # the archive's own integrity
    assert box.handler.last_applied() == 0 and len(box.sm) == 0
    with pytest.raises(ValueError, match="LogId"):
        box.handler.install_snapshot_from_file(tmp_path / "no-name.bin")


def test_snapshot_restore_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, digest = _archive(tmp_path / "src", 20)
    state = tmp_path / "restored" / "state.db"
    argv = ["snapshot", "restore", str(path), "--state", str(state), "--dir", str(tmp_path / "s")]
    assert main([*argv, "--sha256", digest.hex()]) == 0
    assert "index 20 term 1" in capsys.readouterr().out
    sm = SqliteStateMachine(state)
    try:
        assert len(sm) == 20 and sm.last_applied().index == 20
    finally:
        sm.close()
    assert main(argv) == 1  # the same archive again: not newer than the state
    assert capsys.readouterr().err.startswith("d-engine-sm: error:")
    assert main([*argv[:2], str(tmp_path / "missing.tar.gz"), *argv[3:]]) == 1


# -- compaction requests are coalesced ----------------------------------------------------
def _compact(comp: _bridge.Compaction, index: int) -> None:
    last, prev = (b"\x01", index, 1), (b"\x01", index - 1, 1)
    with pytest.raises(_bridge._Deferred):
        comp.serializer("unused", (last, prev, []))


def _outcome(comp: _bridge.Compaction, seconds: float) -> int:
    """The job's final state, polled as PySyncObj's tick does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = comp.checker()
        if state != SERIALIZER_STATE.SERIALIZING:
            return int(state)
        time.sleep(0.01)
    return int(SERIALIZER_STATE.SERIALIZING)


@pytest.mark.timeout(60)
def test_compaction_right_after_an_archive_is_deferred(
    box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bridge, "ARCHIVE_SPACING", 1e6)  # defer up to ARCHIVE_MAX_DEFER
    monkeypatch.setattr(_bridge, "ARCHIVE_MAX_DEFER", 50.0)
    box.handler.apply_chunk(
        [commands.entry(i, 1, commands.insert(b"k%d" % i, b"v")) for i in (1, 2)]
    )
    stats = _bridge.Stats()
    comp = _bridge.Compaction(box.handler, box.root / "raft.dump", "c1", None, stats)
    _compact(comp, 2)
    assert _outcome(comp, 30) == SERIALIZER_STATE.SUCCESS and stats.snapshots_created == 1
    # The next request waits (the journal is kept meanwhile) and then archives
    # everything applied by then, past its own point.
    _compact(comp, 2)
    box.handler.apply_chunk([commands.entry(3, 1, commands.insert(b"k3", b"v"))])
    assert _outcome(comp, 0.5) == SERIALIZER_STATE.SERIALIZING and stats.snapshots_created == 1
    comp.hurry()  # a forced compaction does not wait
    assert _outcome(comp, 30) == SERIALIZER_STATE.SUCCESS and stats.snapshots_created == 2
    dump = _dump.read(box.root / "raft.dump")
    assert (dump.last[1], dump.archive_index) == (2, 3)
    # Closing during a deferral ends the job at once, as a failure (journal kept).
    _compact(comp, 3)
    started = time.monotonic()
    comp.close(30)
    assert time.monotonic() - started < 5
    assert comp.checker() == SERIALIZER_STATE.FAILED and stats.snapshots_created == 2


@pytest.mark.timeout(60)
def test_deferred_compaction_trims_the_journal_to_its_archive(
    box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bridge, "ARCHIVE_SPACING", 1e6)
    monkeypatch.setattr(_bridge, "ARCHIVE_MAX_DEFER", 50.0)
    addr = free_addr()
    opts: dict[str, Any] = {"logCompactionMinEntries": 20, "appendEntriesUseBatch": False}
    with RaftNode(addr, [], box.handler, box.root, **opts) as node:
        for i in range(30):
            assert node.propose(commands.insert(b"a%d" % i, b"v"), timeout=10).succeeded
        deadline = time.monotonic() + 30
        while node.status()["snapshots_created"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The next request (past 20 more entries) is deferred; entries keep coming.
        for i in range(60):
            assert node.propose(commands.insert(b"b%d" % i, b"v"), timeout=10).succeeded
        assert node.status()["snapshots_created"] == 1
        node.force_compaction()  # cuts the deferral short
        while node.status()["snapshots_created"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        dump = _dump.read(box.root / "raft.dump")
        # The dump names the archive's own point, not the older request's, and
        # PySyncObj's journal starts there: nothing left to rewrite.
        assert dump.last[1] == dump.archive_index >= 80
        assert dump.last[2] == dump.archive_term
        engine: Any = node._engine
        log = engine._SyncObj__raftLog
        while log[0][1] != dump.prev[1] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (log[0], log[1]) == (dump.prev, dump.last)
        assert node.propose(commands.insert(b"after", b"v"), timeout=10).succeeded
    box.close()
    again = Box(box.root)  # a restart loads the advanced dump and replays the journal
    try:
        with RaftNode(addr, [], again.handler, again.root) as node:
            assert node.propose(commands.insert(b"again", b"v"), timeout=10).succeeded
            assert node.status()["failed"] is None
            assert len(again.sm) == 92
    finally:
        again.close()
        box.sm, box.handler = again.sm, again.handler
