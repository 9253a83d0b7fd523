"""The snapshots directory when files move under it, and creates and installs that
fail late: archives pruned or replaced between a listing and their use, a
snapshots path that is a file, a state machine that cannot flush, a disk that
fills up, a handler closed (or overtaken by applies) just before the install."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import portalocker
import pytest
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._fs import FileOps
from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.store import ArchiveInfo, SnapshotStore
from d_engine_sm.errors import (
    HandlerClosed,
    InsufficientSpace,
    SnapshotError,
    SnapshotNotFound,
    StaleSnapshotError,
)


def cfg(directory: Path, **overrides: Any) -> SnapshotConfig:
    return SnapshotConfig(
        snapshots_dir=directory, fsync=False, cleanup_retain_count=5, chunk_size=1024, **overrides
    )


def archives_at(directory: Path, *indexes: int) -> dict[int, Path]:
    """One archive per index (memory state machine), in ``directory``."""
    found = {}
    with StateMachineHandler(MemoryStateMachine(), cfg(directory)) as handler:
        applied = 0
        for index in indexes:
            handler.apply_chunk(puts(applied + 1, index - applied))
            applied = index
            found[index] = handler.create_snapshot()[1]
    return found


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock")


# -- files that move under the store ---------------------------------------------------------
def test_prune_skips_an_archive_removed_after_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = archives_at(tmp_path / "snaps", 10, 20, 30)
    real = SnapshotStore.list_archives

    def listing(self: SnapshotStore) -> list[ArchiveInfo]:
        found = real(self)
        paths[10].unlink(missing_ok=True)  # another cleanup got there first
        return found

    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "snaps")) as handler:
        monkeypatch.setattr(SnapshotStore, "list_archives", listing)
        assert handler.cleanup_snapshot(1) == [paths[20]]
    assert names(tmp_path / "snaps") == ["snapshot-30-1.tar.gz"]


@pytest.mark.parametrize("how", ["unlinked", "replaced"])
def test_a_reader_that_loses_the_race_with_prune_finds_it_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    directory = tmp_path / "snaps"
    path = archives_at(directory, 12)[12]
    store = SnapshotStore(directory, "snapshot-", fsync=False)
    real_lock = portalocker.lock

    def lock(f: Any, flags: portalocker.LockFlags) -> None:
        # Between this reader's open and its shared lock, a prune (holding the
        # exclusive lock) unlinked the file; a new create may reuse the name.
        path.unlink()
        if how == "replaced":
            path.write_bytes(b"another file under the same name")
        real_lock(f, flags)

    monkeypatch.setattr(portalocker, "lock", lock)  # the module the store locks through
    with (
        pytest.raises(SnapshotNotFound, match="snapshot archive was pruned") as info,
        store.open_reader(ArchiveInfo(12, 1, path)),
    ):
        pytest.fail("a pruned archive was opened")
    assert str(path) in str(info.value)


def test_recovery_passes_over_an_archive_removed_while_it_checks(tmp_path: Path) -> None:
    paths = archives_at(tmp_path / "snaps", 5, 15)
    store = SnapshotStore(tmp_path / "snaps", "snapshot-", fsync=False)
    checked: list[str] = []

    def verify(path: Path) -> bytes:
        checked.append(path.name)
        if path == paths[15]:
            path.unlink()  # pruned by another process meanwhile
        return archive.verify(path)

    found = store.recover(verify)
    assert found is not None
    info, digest = found
    assert (info.index, info.path) == (5, paths[5])
    assert digest == archive.sha256_file(paths[5])
    assert checked == ["snapshot-15-1.tar.gz", "snapshot-5-1.tar.gz"]
    assert names(tmp_path / "snaps") == ["snapshot-5-1.tar.gz"]  # nothing marked broken


def test_a_snapshots_path_that_is_a_file_fails_the_create(tmp_path: Path) -> None:
    target = tmp_path / "snaps"
    target.write_text("not a directory")
    with StateMachineHandler(MemoryStateMachine(), cfg(target)) as handler:
        handler.apply_chunk(puts(1, 3))
        with pytest.raises(SnapshotError, match="File exists") as info:
            handler.create_snapshot()
        assert str(target) in str(info.value)
        assert handler.get_latest_snapshot_metadata() is None
    assert target.read_text() == "not a directory"


# -- creates that fail late --------------------------------------------------------------------
class _NoFlush(MemoryStateMachine):
    def flush(self) -> None:
        raise OSError(errno.EIO, "I/O error flushing the state")


def test_a_state_machine_that_cannot_flush_publishes_no_archive(tmp_path: Path) -> None:
    directory = tmp_path / "snaps"
    with StateMachineHandler(_NoFlush(), cfg(directory)) as handler:
        handler.apply_chunk(puts(1, 4))
        with pytest.raises(SnapshotError, match=r"flushing the state machine failed: .*I/O error"):
            handler.create_snapshot()
        assert handler.get_latest_snapshot_metadata() is None
    assert names(directory) == []  # neither the archive nor a temp file


class _FullDisk(FileOps):
    """The disk fills up while the archive is written; then even statvfs fails."""

    def __init__(self) -> None:
        self.free_queries = 0

    def open_write(self, path: Path) -> Any:
        if path.name.startswith("temp-create"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return super().open_write(path)

    def disk_free(self, path: Path) -> int:
        self.free_queries += 1
        if self.free_queries > 1:  # the check before writing passed
            raise OSError(errno.EIO, "Input/output error", str(path))
        return 1 << 40


def test_a_full_disk_is_insufficient_space_even_when_free_space_is_unknown(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "snaps"
    fs = _FullDisk()
    with StateMachineHandler(MemoryStateMachine(), cfg(directory), file_ops=fs) as handler:
        handler.apply_chunk(puts(1, 4))
        with pytest.raises(InsufficientSpace) as info:
            handler.create_snapshot()
    assert info.value.available == 0 and info.value.needed > 0
    assert info.value.path == str(directory)
    assert fs.free_queries == 2
    assert [n for n in names(directory) if n.startswith("temp-")] == []


# -- installs ------------------------------------------------------------------------------------
@pytest.fixture
def leader_archive(tmp_path: Path) -> Iterator[Path]:
    yield archives_at(tmp_path / "leader", 30)[30]


def test_installing_a_missing_file_is_snapshot_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "snapshot-30-1.tar.gz"
    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "f")) as follower:
        with pytest.raises(SnapshotNotFound, match="cannot read archive") as info:
            follower.install_snapshot_from_file(missing)
        assert str(missing) in str(info.value)
        assert follower.last_applied() == 0


def test_an_archive_under_a_foreign_name_installs_at_the_log_id_in_it(
    tmp_path: Path, leader_archive: Path
) -> None:
    backup = tmp_path / "node3-backup-30-1.tar.gz"  # not this node's prefix
    backup.write_bytes(leader_archive.read_bytes())
    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "f")) as follower:
        meta = follower.install_snapshot_from_file(backup)
        assert (meta.last_included.index, meta.last_included.term) == (30, 1)
        assert meta.checksum == archive.sha256_file(backup)
        assert follower.last_applied() == 30
    assert backup.exists()  # the source is left alone
    assert names(tmp_path / "f") == ["snapshot-30-1.tar.gz"]


def test_a_handler_closed_just_before_the_install_installs_nothing(
    tmp_path: Path, leader_archive: Path
) -> None:
    follower = StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "f"))

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "unpack" and done == total:  # received and unpacked: install next
            follower.close()

    with pytest.raises(HandlerClosed, match="handler closed before the snapshot was installed"):
        follower.install_snapshot_from_file(leader_archive, progress=progress)
    assert follower.last_applied() == 0
    assert len(follower.state_machine) == 0
    assert names(tmp_path / "f") == []


def test_applies_that_overtake_a_receive_make_its_install_stale(
    tmp_path: Path, leader_archive: Path
) -> None:
    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "f")) as follower:

        def progress(phase: str, done: int, total: int) -> None:
            if phase == "unpack" and done == total and follower.last_applied() == 0:
                follower.apply_chunk(puts(1, 35))  # the log moved past index 30 meanwhile

        with pytest.raises(StaleSnapshotError) as info:
            follower.install_snapshot_from_file(leader_archive, progress=progress)
        assert "30" in str(info.value) and "35" in str(info.value)
        assert follower.last_applied() == 35
        assert follower.read_from_state_machine([b"k35"]) is not None
        assert follower.get_latest_snapshot_metadata() is None
    assert [n for n in names(tmp_path / "f") if not n.startswith("temp-")] == []


def test_no_flush_after_install_keeps_the_state_but_not_the_archive(
    tmp_path: Path, leader_archive: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with StateMachineHandler(_NoFlush(), cfg(tmp_path / "f")) as follower:
        caplog.set_level(logging.WARNING, logger="d_engine_sm.snapshot")
        follower.install_snapshot_from_file(leader_archive)
        assert follower.last_applied() == 30
        assert follower.get_latest_snapshot_metadata() is None
    assert "installed state not flushed; archive not kept" in caplog.text
    assert names(tmp_path / "f") == []
