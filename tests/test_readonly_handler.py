"""``SnapshotConfig(read_only=True)``: a handler that only reads its snapshots directory.

Even on a writable directory it changes nothing (no leftover removed, no
corrupt archive moved aside, no ``.lock`` created), and every writer fails
with ReadOnlySnapshotDir saying the handler is read-only. ``d-engine-sm send``
opens its handler that way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _cli_helpers import cli, serve
from conftest import puts

from d_engine_sm import (
    MemoryStateMachine,
    NewCommitData,
    ReadOnlySnapshotDir,
    SnapshotConfig,
    SnapshotError,
    StateMachineHandler,
)
from d_engine_sm.proto import storage_pb2

LEFTOVER = "temp-create-1-abcd"
CORRUPT = "snapshot-99-1.tar.gz"  # newer than the good one: recovery would quarantine it
GOOD = "snapshot-40-1.tar.gz"


def _config(directory: Path, **kw: object) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=directory, chunk_size=4096, fsync=False, **kw)  # type: ignore[arg-type]


def fingerprint(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry's (size, mtime_ns), and the directory's own mtime (it moves on any
    create, remove or rename inside)."""
    found = {".": (0, directory.stat().st_mtime_ns)}
    for entry in os.scandir(directory):
        st = entry.stat(follow_symlinks=False)
        found[entry.name] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture
def messy_dir(tmp_path: Path) -> Path:
    """A writable snapshots directory holding a good archive, a newer corrupt one and a
    temp leftover (what a crash leaves), without the writer's ``.lock``."""
    snaps = tmp_path / "snaps"
    with StateMachineHandler(MemoryStateMachine(), _config(snaps)) as h:
        h.apply_chunk(puts(1, 20))
        h.create_snapshot()
        h.apply_chunk(puts(21, 20))
        h.create_snapshot()
    (snaps / "snapshot-20-1.tar.gz").unlink()
    (snaps / ".lock").unlink()
    (snaps / CORRUPT).write_bytes(b"not a gzip file")
    (snaps / LEFTOVER).write_bytes(b"left by a crash")
    os.utime(snaps / GOOD, ns=(1_000_000_000, 1_000_000_000))  # an mtime a copy would not keep
    assert sorted(p.name for p in snaps.iterdir()) == sorted([CORRUPT, GOOD, LEFTOVER])
    return snaps


def test_config_validates_read_only() -> None:
    assert SnapshotConfig().read_only is False
    with pytest.raises(TypeError, match="read_only"):
        SnapshotConfig(read_only="yes")  # type: ignore[arg-type]


def test_read_only_handler_reads_and_changes_nothing(messy_dir: Path, tmp_path: Path) -> None:
    before = fingerprint(messy_dir)
    with StateMachineHandler(MemoryStateMachine(), _config(messy_dir, read_only=True)) as h:
        meta = h.get_latest_snapshot_metadata()
        assert meta is not None and meta.last_included.index == 40  # the corrupt 99 skipped
        stream = list(h.load_snapshot_data(meta))
        assert h.load_snapshot_chunk(meta, 0).data == stream[0].data
    assert fingerprint(messy_dir) == before
    # What it read installs on a writable follower.
    with StateMachineHandler(MemoryStateMachine(), _config(tmp_path / "f")) as follower:
        follower.apply_snapshot_stream_from_leader(1, stream, lambda ack: None)
        assert follower.last_applied() == 40


def test_writers_fail_saying_the_handler_is_read_only(messy_dir: Path, tmp_path: Path) -> None:
    with StateMachineHandler(MemoryStateMachine(), _config(tmp_path / "src")) as source:
        source.apply_chunk(puts(1, 60))
        _, path = source.create_snapshot()
        stream = list(source.load_snapshot_data(source.get_latest_snapshot_metadata()))  # type: ignore[arg-type]
    assert path.is_file()
    before = fingerprint(messy_dir)
    with StateMachineHandler(MemoryStateMachine(), _config(messy_dir, read_only=True)) as h:
        h.apply_chunk(puts(1, 50))
        with pytest.raises(ReadOnlySnapshotDir, match="read-only handler") as info:
            h.create_snapshot()
        assert isinstance(info.value, SnapshotError) and str(messy_dir) in str(info.value)
        with pytest.raises(ReadOnlySnapshotDir, match="read-only handler"):
            h.cleanup_snapshot(1)
        with pytest.raises(ReadOnlySnapshotDir, match="read-only handler"):
            h.cleanup_snapshot(1, snapshot_dir=tmp_path / "src")
    # The policy never asks a read-only handler for a snapshot (a writer would be asked).
    commit = NewCommitData(new_commit_index=50, role=1, current_term=1)
    eager = {"max_log_entries_before_snapshot": 1, "snapshot_cool_down_since_last_check": 0}
    for read_only, expected in ((True, False), (False, True)):
        config = _config(tmp_path / "eager", read_only=read_only, **eager)
        with StateMachineHandler(MemoryStateMachine(), config) as h:
            h.apply_chunk(puts(1, 50))
            assert h.should_snapshot(commit) is expected
    with StateMachineHandler(MemoryStateMachine(), _config(messy_dir, read_only=True)) as fresh:
        acks: list[storage_pb2.SnapshotAck] = []
        with pytest.raises(ReadOnlySnapshotDir, match="read-only handler"):
            fresh.apply_snapshot_stream_from_leader(1, stream, acks.append)
        assert [a.status for a in acks] == [storage_pb2.SnapshotAck.FAILED]
        assert fresh.last_applied() == 0
    assert fingerprint(messy_dir) == before
    assert sorted(p.name for p in (tmp_path / "src").iterdir() if p.name != ".lock") == [path.name]


def test_a_writing_handler_still_tidies(messy_dir: Path) -> None:
    """The contrast that makes the tests above able to fail."""
    with StateMachineHandler(MemoryStateMachine(), _config(messy_dir)) as h:
        assert h.get_latest_snapshot_metadata() is not None
    names = sorted(p.name for p in messy_dir.iterdir())
    assert LEFTOVER not in names and CORRUPT not in names and CORRUPT + ".broken" in names


@pytest.mark.timeout(120)
def test_cli_send_leaves_a_writable_dir_untouched(messy_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    before = fingerprint(messy_dir)
    with serve(tmp_path / "srv") as peer:
        sent = cli("send", "--dir", str(messy_dir), "--to", peer.address, "--timeout", "30")
        assert sent.returncode == 0, sent.stderr
        assert "sent snapshot index 40 term 1" in sent.stdout and "installed" in sent.stdout
    assert (tmp_path / "srv" / GOOD).read_bytes() == (messy_dir / GOOD).read_bytes()
    assert fingerprint(messy_dir) == before
    # The read-only commands leave it as found too.
    for argv in (["list", str(messy_dir)], ["inspect", str(messy_dir / GOOD)]):
        assert cli("snapshot", *argv).returncode == 0
    assert cli("snapshot", "verify", str(messy_dir)).returncode == 1  # reports the corrupt one
    assert fingerprint(messy_dir) == before
