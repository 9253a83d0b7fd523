"""A read-only snapshots directory (a real read-only mount: root ignores chmod).

Readers (handler construction, latest metadata, load_snapshot_data, the CLI's
list/verify/inspect and send) work and change nothing; writers (create,
install, cleanup) fail with ReadOnlySnapshotDir, a SnapshotError that says so.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli_helpers import cli, serve
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm.errors import ReadOnlySnapshotDir, SnapshotError
from d_engine_sm.proto import storage_pb2


def _mount(args: list[str]) -> bool:
    return subprocess.run(args, capture_output=True, timeout=30, check=False).returncode == 0


def _fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "d"
        for p in sorted(root.rglob("*"))
    }


def _config(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=directory, chunk_size=4096, fsync=False)


@pytest.fixture
def ro_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding two archives, a temp leftover and a corrupt newest archive,
    remounted read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)]):
        pytest.skip("cannot mount a tmpfs here")
    try:
        snaps = mnt / "snaps"
        with StateMachineHandler(MemoryStateMachine(), _config(snaps)) as h:
            h.apply_chunk(puts(1, 20))
            h.create_snapshot()
            h.apply_chunk(puts(21, 20))
            h.create_snapshot()
        (snaps / "snapshot-99-1.tar.gz").write_bytes(b"not a gzip file")
        (snaps / "temp-create-1-abcd").write_bytes(b"left by a crash")
        if not _mount(["mount", "-o", "remount,ro", str(mnt)]):
            pytest.skip("cannot remount read-only here")
        yield snaps
    finally:
        _mount(["umount", "-l", str(mnt)])


def test_handler_reads_without_touching(ro_dir: Path, tmp_path: Path) -> None:
    before = _fingerprint(ro_dir)
    with StateMachineHandler(MemoryStateMachine(), _config(ro_dir)) as h:
        meta = h.get_latest_snapshot_metadata()
        assert meta is not None and meta.last_included.index == 40  # the corrupt 99 skipped
        chunks = list(h.load_snapshot_data(meta))
        assert h.load_snapshot_chunk(meta, 0).data == chunks[0].data
        # What it sends installs on a writable follower.
        acks: list[storage_pb2.SnapshotAck] = []
        with StateMachineHandler(MemoryStateMachine(), _config(tmp_path / "f")) as follower:
            follower.apply_snapshot_stream_from_leader(1, chunks, acks.append)
            assert follower.last_applied() == 40
    assert _fingerprint(ro_dir) == before


def test_writers_fail_saying_read_only(ro_dir: Path) -> None:
    before = _fingerprint(ro_dir)
    with StateMachineHandler(MemoryStateMachine(), _config(ro_dir)) as h:
        h.apply_chunk(puts(1, 50))
        with pytest.raises(ReadOnlySnapshotDir, match="read-only") as info:
            h.create_snapshot()
        assert isinstance(info.value, SnapshotError)
        with pytest.raises(ReadOnlySnapshotDir, match="read-only"):
            h.cleanup_snapshot(1)
        source = h.get_latest_snapshot_metadata()
        assert source is not None
        stream = list(h.load_snapshot_data(source))
    with StateMachineHandler(MemoryStateMachine(), _config(ro_dir)) as fresh:
        acks: list[storage_pb2.SnapshotAck] = []
        with pytest.raises(ReadOnlySnapshotDir, match="read-only"):
            fresh.apply_snapshot_stream_from_leader(1, stream, acks.append)
        assert [a.status for a in acks] == [storage_pb2.SnapshotAck.FAILED]
        assert fresh.last_applied() == 0
    assert _fingerprint(ro_dir) == before


def test_missing_dir_under_read_only_parent(ro_dir: Path) -> None:
    missing = ro_dir / "not-there"
    with StateMachineHandler(MemoryStateMachine(), _config(missing)) as h:
        assert h.get_latest_snapshot_metadata() is None
        h.apply_chunk(puts(1, 3))
        with pytest.raises(ReadOnlySnapshotDir, match="read-only"):
            h.create_snapshot()
    assert not missing.exists()


def test_cli_read_commands(ro_dir: Path) -> None:
    before = _fingerprint(ro_dir)
    listing = cli("snapshot", "list", str(ro_dir))
    assert listing.returncode == 0, listing.stderr
    assert "snapshot-40-1.tar.gz" in listing.stdout and "temp-create-1-abcd" in listing.stdout
    inspect = cli("snapshot", "inspect", str(ro_dir / "snapshot-40-1.tar.gz"))
    assert inspect.returncode == 0, inspect.stderr
    verify = cli("snapshot", "verify", str(ro_dir))
    assert verify.returncode == 1  # the corrupt archive is reported, not moved
    assert "CORRUPT  snapshot-99-1.tar.gz" in verify.stdout
    assert "ok       snapshot-40-1.tar.gz" in verify.stdout
    assert _fingerprint(ro_dir) == before


@pytest.mark.timeout(120)
def test_cli_send_from_read_only_dir(ro_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    before = _fingerprint(ro_dir)
    with serve(tmp_path / "srv") as peer:
        sent = cli("send", "--dir", str(ro_dir), "--to", peer.address, "--timeout", "30")
        assert sent.returncode == 0, sent.stderr
        assert "sent snapshot index 40 term 1" in sent.stdout
    assert (tmp_path / "srv" / "snapshot-40-1.tar.gz").read_bytes() == (
        ro_dir / "snapshot-40-1.tar.gz"
    ).read_bytes()
    assert _fingerprint(ro_dir) == before
