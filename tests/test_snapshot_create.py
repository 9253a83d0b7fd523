"""Handler-level snapshot create, cleanup and start-up recovery (d-engine B070-B093).

Real files, real threads, a real second process for the directory lock.
Where d-engine differs from our contract (DESIGN.md), the contract wins:
``last_included`` is exactly the applied LogId, a concurrent create fails at
once, the same LogId twice returns the existing archive.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from _seams import FullDiskFile

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._fs import FileOps
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._policy import SnapshotPolicy
from d_engine_sm._snapshot import archive
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import LogId, NewCommitData, SnapshotContext
from d_engine_sm.errors import InsufficientSpace, SnapshotError, SnapshotInProgress
from d_engine_sm.proto import common_pb2, storage_pb2

WAIT = 10.0  # generous bound on event waits (never a timing assertion)


# -- helpers ---------------------------------------------------------------------
def cfg(tmp_path: Path, **kw: Any) -> SnapshotConfig:
    base: dict[str, Any] = {
        "snapshots_dir": tmp_path / "snaps",
        "chunk_size": 1024,
        "fsync": False,
        "chunk_timeout": 5.0,
    }
    base.update(kw)
    return SnapshotConfig(**base)


def puts(first: int, count: int, term: int = 1) -> list[common_pb2.Entry]:
    return [
        _kv.command_entry(i, term, _kv.insert(b"k%d" % i, b"v%d" % i))
        for i in range(first, first + count)
    ]


def apply_n(h: StateMachineHandler, count: int, term: int = 1) -> None:
    h.apply_chunk(puts(h.last_applied() + 1, count, term))


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def temps(directory: Path) -> list[str]:
    return [n for n in names(directory) if n.startswith("temp-")]


def tar_names(directory: Path) -> list[str]:
    return [n for n in names(directory) if n.endswith(".tar.gz")]


def sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


class BlockingGenerate(MemoryStateMachine):
    """Two-phase (inherits prepare_snapshot); generate waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.generated = 0

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        self.entered.set()
        assert self.release.wait(WAIT)
        self.generated += 1
        super().generate_snapshot_data(dir, last_included)


class NoPrepare(BlockingGenerate):
    """Does not override prepare_snapshot: generate runs with applies paused."""

    prepare_snapshot = StateMachine.prepare_snapshot


class FailingGenerate(MemoryStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        (dir / "partial.bin").write_bytes(b"half written")
        if self.fail:
            raise RuntimeError("disk on fire")
        super().generate_snapshot_data(dir, last_included)


class FailingPrepare(MemoryStateMachine):
    def prepare_snapshot(self) -> None:
        raise RuntimeError("no capture today")


class CountingPolicy(SnapshotPolicy):
    def __init__(self) -> None:
        self.marked = 0

    def should_trigger(self, ctx: SnapshotContext) -> bool:
        return True

    def mark_snapshot_created(self) -> None:
        self.marked += 1


class DiskOps(FileOps):
    """FileOps with a switchable small disk: ``free`` bytes, ENOSPC after ``budget``."""

    def __init__(self) -> None:
        self.free: int | None = None
        self.budget: int | None = None

    def disk_free(self, path: Path) -> int:
        return super().disk_free(path) if self.free is None else self.free

    def open_write(self, path: Path) -> BinaryIO:
        f = super().open_write(path)
        if self.budget is None:
            return f
        return FullDiskFile(f, self.budget)  # type: ignore[return-value]


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path), node_id=1) as h:
        yield h


# -- create: labels, checksum, record (B070-B074) --------------------------------
def test_create_labels_exactly_the_applied_logid(tmp_path: Path) -> None:
    config = cfg(tmp_path, retained_log_entries=3)
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        apply_n(h, 5, term=1)
        apply_n(h, 3, term=2)
        meta, path = h.create_snapshot()
    # d-engine labels last_applied - retained_log_entries; we never shift.
    assert (meta.last_included.index, meta.last_included.term) == (8, 2)
    assert path == config.snapshots_dir / "snapshot-8-2.tar.gz"
    assert path.is_file()


def test_create_makes_a_missing_snapshots_dir(tmp_path: Path) -> None:
    config = cfg(tmp_path, snapshots_dir=tmp_path / "a" / "b" / "snaps")
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        apply_n(h, 2)
        _, path = h.create_snapshot()
    assert path.parent == config.snapshots_dir


def test_checksum_is_sha256_and_metadata_is_recorded(handler: StateMachineHandler) -> None:
    apply_n(handler, 20)
    meta, path = handler.create_snapshot()
    assert meta.checksum == sha(path)
    assert len(meta.checksum) == 32
    assert handler.state_machine.snapshot_metadata() == meta
    assert handler.get_latest_snapshot_metadata() == meta
    assert archive.verify(path) == meta.checksum


def test_archive_is_standard_tar_gz(handler: StateMachineHandler) -> None:
    apply_n(handler, 20)
    _, path = handler.create_snapshot()
    with tarfile.open(path, "r:gz") as tar:
        # The manifest first (what the archive holds), then the state's files.
        names = [m.name for m in tar.getmembers() if m.isfile()]
        assert names == ["MANIFEST.d-engine-sm.json", "kv.bin"]
    gnu_tar = shutil.which("tar")
    if gnu_tar is not None:
        listed = subprocess.run([gnu_tar, "tzf", str(path)], capture_output=True, check=True)
        assert b"kv.bin" in listed.stdout


def test_create_reports_progress(handler: StateMachineHandler) -> None:
    apply_n(handler, 50)
    seen: list[tuple[str, int, int]] = []
    handler.create_snapshot(progress=lambda *a: seen.append(a))
    phases = {p for p, _, _ in seen}
    assert {"generate", "pack"} <= phases
    last_pack = [(d, t) for p, d, t in seen if p == "pack"][-1]
    assert last_pack[0] == last_pack[1] > 0


def test_same_logid_twice_returns_existing_archive_unchanged(tmp_path: Path) -> None:
    sm = BlockingGenerate()
    sm.release.set()
    with StateMachineHandler(sm, cfg(tmp_path)) as h:
        apply_n(h, 10)
        meta1, path1 = h.create_snapshot()
        before = path1.stat()
        meta2, path2 = h.create_snapshot()
        after = path2.stat()
    assert (meta2, path2) == (meta1, path1)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert sm.generated == 1
    assert temps(path1.parent) == []


# -- create: exclusion (B076, G044) -------------------------------------------------
def test_concurrent_create_fails_at_once(tmp_path: Path) -> None:
    sm = BlockingGenerate()
    with StateMachineHandler(sm, cfg(tmp_path)) as h:
        apply_n(h, 10)
        results: list[object] = []
        first = threading.Thread(target=lambda: results.append(h.create_snapshot()))
        first.start()
        try:
            assert sm.entered.wait(WAIT)
            assert h.snapshot_in_progress()
            commit = NewCommitData(new_commit_index=10, role=3, current_term=1)
            assert h.should_snapshot(commit) is False
            # Fails while the first is still blocked in generate: no waiting.
            with pytest.raises(SnapshotInProgress):
                h.create_snapshot()
            assert first.is_alive() and not sm.release.is_set()
        finally:
            sm.release.set()
            first.join(WAIT)
        assert len(results) == 1
        assert not h.snapshot_in_progress()
        h.create_snapshot()  # the flag was cleared


def test_dir_lock_held_by_another_process_is_in_progress(tmp_path: Path) -> None:
    config = cfg(tmp_path)
    config.snapshots_dir.mkdir()
    holder = (
        "import sys, filelock\n"
        "lock = filelock.FileLock(sys.argv[1]); lock.acquire()\n"
        "print('locked', flush=True); sys.stdin.readline()\n"
    )
    lock_path = str(config.snapshots_dir / ".lock")
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, lock_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "locked"
        with StateMachineHandler(MemoryStateMachine(), config) as h:
            apply_n(h, 5)
            with pytest.raises(SnapshotInProgress):
                h.create_snapshot()
            with pytest.raises(SnapshotInProgress):
                h.cleanup_snapshot(1)
            assert not h.snapshot_in_progress()
            assert tar_names(config.snapshots_dir) == []
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.wait(WAIT) == 0
            meta, _ = h.create_snapshot()
            assert meta.last_included.index == 5
    finally:
        proc.kill()
        proc.wait(WAIT)


# -- create: failures leave nothing (G043) ---------------------------------------------
def test_generate_failure_leaves_nothing_and_clears_the_flag(tmp_path: Path) -> None:
    sm = FailingGenerate()
    config = cfg(tmp_path)
    with StateMachineHandler(sm, config) as h:
        apply_n(h, 10)
        with pytest.raises(SnapshotError) as info:
            h.create_snapshot()
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "disk on fire" in str(info.value)
        assert temps(config.snapshots_dir) == []
        assert tar_names(config.snapshots_dir) == []
        assert not h.snapshot_in_progress()
        assert h.get_latest_snapshot_metadata() is None
        assert sm.snapshot_metadata() is None
        assert h.metrics()["snapshot_create_errors"] == 1
        sm.fail = False
        meta, path = h.create_snapshot()
        assert path.is_file() and meta.last_included.index == 10


def test_prepare_failure_is_a_snapshot_error(tmp_path: Path) -> None:
    config = cfg(tmp_path)
    with StateMachineHandler(FailingPrepare(), config) as h:
        apply_n(h, 3)
        with pytest.raises(SnapshotError) as info:
            h.create_snapshot()
        assert isinstance(info.value.__cause__, RuntimeError)
        assert temps(config.snapshots_dir) == [] and tar_names(config.snapshots_dir) == []
        apply_n(h, 1)  # applies were un-paused


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    ops = DiskOps()
    config = cfg(tmp_path)
    with StateMachineHandler(MemoryStateMachine(), config, file_ops=ops) as h:
        apply_n(h, 100)
        ops.free = 10
        with pytest.raises(InsufficientSpace) as info:
            h.create_snapshot()
        assert info.value.available == 10 and info.value.needed > 10
        assert temps(config.snapshots_dir) == [] and tar_names(config.snapshots_dir) == []
        assert not h.snapshot_in_progress()


def test_enospc_midway_removes_temp_and_keeps_previous_archives(tmp_path: Path) -> None:
    ops = DiskOps()
    config = cfg(tmp_path, compression_level=0)
    with StateMachineHandler(MemoryStateMachine(), config, file_ops=ops) as h:
        apply_n(h, 200)
        meta1, path1 = h.create_snapshot()
        digest1 = sha(path1)
        apply_n(h, 200)
        ops.budget = 1000  # the archive is several KiB: fails part-way
        with pytest.raises(SnapshotError) as info:
            h.create_snapshot()
        assert isinstance(info.value, InsufficientSpace)
        assert info.value.__cause__ is not None
        assert temps(config.snapshots_dir) == []
        assert tar_names(config.snapshots_dir) == [path1.name]
        assert sha(path1) == digest1
        assert h.get_latest_snapshot_metadata() == meta1
        ops.budget = None
        meta2, path2 = h.create_snapshot()
        assert meta2.last_included.index == 400 and archive.verify(path2) == meta2.checksum


# -- prune and policy (B075, G034) -------------------------------------------------------
def test_each_create_prunes_to_retain_count_and_tells_the_policy(tmp_path: Path) -> None:
    policy = CountingPolicy()
    config = cfg(tmp_path, cleanup_retain_count=2)
    with StateMachineHandler(MemoryStateMachine(), config, snapshot_policy=policy) as h:
        for round_ in range(1, 5):
            apply_n(h, 10)
            h.create_snapshot()
            assert policy.marked == round_
            expected = [
                f"snapshot-{10 * i}-1.tar.gz" for i in range(max(1, round_ - 1), round_ + 1)
            ]
            assert sorted(tar_names(config.snapshots_dir)) == sorted(expected)


def test_policy_not_told_when_create_fails(tmp_path: Path) -> None:
    policy = CountingPolicy()
    with StateMachineHandler(FailingGenerate(), cfg(tmp_path), snapshot_policy=policy) as h:
        apply_n(h, 2)
        with pytest.raises(SnapshotError):
            h.create_snapshot()
    assert policy.marked == 0


# -- consistency while applies continue ------------------------------------------------------
def _workload(count: int) -> list[common_pb2.Entry]:
    """Overwrites, deletes and CAS over a small key space, so order matters."""
    out = []
    for i in range(1, count + 1):
        key = b"k%d" % (i % 37)
        if i % 7 == 0:
            cmd = _kv.delete(key)
        elif i % 5 == 0:
            cmd = _kv.compare_and_swap(key, b"v%d" % (i - 1), b"cas%d" % i)
        else:
            cmd = _kv.insert(key, b"v%d" % i)
        out.append(_kv.command_entry(i, 1 + i // 500, cmd))
    return out


def _model(entries: list[common_pb2.Entry]) -> dict[bytes, bytes]:
    sm = MemoryStateMachine()
    for e in entries:
        sm.apply_chunk([e])
    return sm.items()


def _install_into_fresh(
    leader: StateMachineHandler, meta: storage_pb2.SnapshotMetadata, tmp: Path
) -> MemoryStateMachine:
    follower_sm = MemoryStateMachine()
    with StateMachineHandler(follower_sm, cfg(tmp), node_id=2) as follower:
        stream = leader.load_snapshot_data(meta)
        follower.apply_snapshot_stream_from_leader(1, stream, lambda a: None)
        assert follower.last_applied() == meta.last_included.index
    return follower_sm


def test_snapshot_during_continuous_applies_is_exactly_the_state_at_last_included(
    tmp_path: Path,
) -> None:
    entries = _workload(30_000)
    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "leader")) as h:
        started = threading.Event()
        stop = threading.Event()

        def applier() -> None:
            for e in entries:
                h.apply_chunk([e])
                if e.index == 200:
                    started.set()
                if stop.is_set():
                    return

        t = threading.Thread(target=applier)
        t.start()
        try:
            assert started.wait(WAIT)
            metas = [h.create_snapshot()[0]]
            h.wait_applied(metas[0].last_included.index + 100, WAIT)
            metas.append(h.create_snapshot()[0])
        finally:
            stop.set()
            t.join(WAIT)
        assert metas[0].last_included.index < metas[1].last_included.index
        for n, meta in enumerate(metas):
            upto = meta.last_included.index
            assert upto >= 200
            assert meta.last_included.term == entries[upto - 1].term
            got = _install_into_fresh(h, meta, tmp_path / f"follower{n}")
            assert got.items() == _model(entries[:upto])


def test_without_prepare_generate_runs_with_applies_paused(tmp_path: Path) -> None:
    sm = NoPrepare()
    with StateMachineHandler(sm, cfg(tmp_path)) as h:
        apply_n(h, 10)
        creator = threading.Thread(target=h.create_snapshot)
        creator.start()
        attempted = threading.Event()
        applied = threading.Event()

        def apply_one() -> None:
            attempted.set()
            h.apply_chunk(puts(11, 1))
            applied.set()

        applier = threading.Thread(target=apply_one)
        try:
            assert sm.entered.wait(WAIT)
            applier.start()
            assert attempted.wait(WAIT)
            # The apply is parked on the paused write path while generate runs.
            assert not applied.wait(0.2)
            assert h.last_applied() == 10
        finally:
            sm.release.set()
            creator.join(WAIT)
            applier.join(WAIT)
        assert applied.is_set() and h.last_applied() == 11
        meta = h.get_latest_snapshot_metadata()
        assert meta is not None and meta.last_included.index == 10
        follower = _install_into_fresh(h, meta, tmp_path / "f")
        assert b"k11" not in follower.items() and b"k10" in follower.items()


@pytest.mark.slow
@pytest.mark.timeout(180)  # a million keys: over a minute on a loaded 2-core machine
def test_two_phase_generate_runs_while_applies_complete_1m_keys(tmp_path: Path) -> None:
    """1M keys: an apply completes between prepare and the end of generate.

    The stall itself is measured by benchmarks/bench_snapshot.py (no timed
    assertions in tests); here we prove the structure that bounds it.
    """
    sm = BlockingGenerate()
    value = b"x" * 100
    with StateMachineHandler(sm, cfg(tmp_path, chunk_size=1 << 20)) as h:
        batch = 50_000
        for first in range(1, 1_000_001, batch):
            h.apply_chunk(
                [
                    _kv.command_entry(i, 1, _kv.insert(b"%08d" % i, value))
                    for i in range(first, first + batch)
                ]
            )
        result: list[storage_pb2.SnapshotMetadata] = []
        creator = threading.Thread(target=lambda: result.append(h.create_snapshot()[0]))
        creator.start()
        try:
            assert sm.entered.wait(WAIT * 3)
            h.apply_chunk(puts(1_000_001, 1))  # completes while generate is blocked
            assert creator.is_alive()
            assert h.last_applied() == 1_000_001
        finally:
            sm.release.set()
            creator.join(WAIT * 3)
        assert result and result[0].last_included.index == 1_000_000
        follower = _install_into_fresh(h, result[0], tmp_path / "f")
        assert len(follower) == 1_000_000 and follower.get(b"k1000001") is None


# -- cleanup (B090-B093) ----------------------------------------------------------------------
def test_cleanup_rejects_retain_below_one(handler: StateMachineHandler) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="retain"):
            handler.cleanup_snapshot(bad)


def _three_snapshots(h: StateMachineHandler) -> list[Path]:
    paths = []
    for _ in range(3):
        apply_n(h, 10)
        paths.append(h.create_snapshot()[1])
    return paths


def test_cleanup_keeps_newest_by_index_and_ignores_other_names(tmp_path: Path) -> None:
    config = cfg(tmp_path, cleanup_retain_count=10)
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        paths = _three_snapshots(h)
        d = config.snapshots_dir
        for odd in ("snapshot-x-1.tar.gz", "notes.txt", "snapshot-5-1.tar.gz.broken"):
            (d / odd).write_bytes(b"x")
        removed = h.cleanup_snapshot(1)
        assert sorted(removed) == sorted(paths[:2])
        assert tar_names(d) == [paths[2].name, "snapshot-x-1.tar.gz"]
        assert (d / "notes.txt").exists() and (d / "snapshot-5-1.tar.gz.broken").exists()
        assert h.cleanup_snapshot(1) == []  # never the newest


def test_cleanup_with_custom_dir_and_prefix(tmp_path: Path) -> None:
    config = cfg(tmp_path, cleanup_retain_count=10)
    other = tmp_path / "elsewhere"
    other.mkdir()
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        paths = _three_snapshots(h)
        for p, index in zip(paths, (9, 100, 1000), strict=True):
            shutil.copy(p, other / f"my-long-prefix-{index}-1.tar.gz")
        (other / "snapshot-1-1.tar.gz").write_bytes(b"other prefix: untouched")
        removed = h.cleanup_snapshot(1, other, "my-long-prefix-")
        assert sorted(p.name for p in removed) == [
            "my-long-prefix-100-1.tar.gz",
            "my-long-prefix-9-1.tar.gz",
        ]
        assert names(other) == [".lock", "my-long-prefix-1000-1.tar.gz", "snapshot-1-1.tar.gz"]
        assert tar_names(config.snapshots_dir) == sorted(p.name for p in paths)


def test_cleanup_never_deletes_an_archive_being_read(tmp_path: Path) -> None:
    config = cfg(tmp_path, cleanup_retain_count=10, chunk_size=64)
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        paths = _three_snapshots(h)
        oldest = storage_pb2.SnapshotMetadata(last_included=LogId(index=10, term=1))
        stream = h.load_snapshot_data(oldest)
        first = next(stream)
        assert first.seq == 0
        assert h.cleanup_snapshot(1) == [paths[1]]
        assert paths[0].exists()
        rest = list(stream)  # still readable, whole
        data = first.data + b"".join(c.data for c in rest)
        assert data == paths[0].read_bytes()
        assert h.cleanup_snapshot(1) == [paths[0]]  # released when the iterator ended

        second = h.load_snapshot_data(h.get_latest_snapshot_metadata())  # type: ignore[arg-type]
        next(second)
        apply_n(h, 10)
        h.create_snapshot()
        assert h.cleanup_snapshot(1) == []
        second.close()  # type: ignore[attr-defined]
        assert h.cleanup_snapshot(1) == [paths[2]]


# -- start-up recovery --------------------------------------------------------------------------
def test_recovery_removes_temps_and_falls_back_past_a_corrupt_newest(tmp_path: Path) -> None:
    config = cfg(tmp_path, cleanup_retain_count=10)
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        paths = _three_snapshots(h)
        metas = []
        for p in paths:
            metas.append(sha(p))
    d = config.snapshots_dir
    (d / "temp-create-123-abc").write_bytes(b"half an archive")
    (d / "temp-work-123-def").mkdir()
    (d / "temp-work-123-def" / "kv.bin").write_bytes(b"state")
    newest = paths[2]
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))

    fresh = MemoryStateMachine()  # knows of no snapshot at all
    with StateMachineHandler(fresh, config) as h2:
        assert temps(d) == []
        assert (d / (newest.name + ".broken")).is_file()
        assert not newest.exists()
        latest = h2.get_latest_snapshot_metadata()
        assert latest is not None
        assert (latest.last_included.index, latest.last_included.term) == (20, 1)
        assert latest.checksum == metas[1]
        assert fresh.snapshot_metadata() is None


def test_recovery_of_a_missing_dir_creates_nothing(tmp_path: Path) -> None:
    config = cfg(tmp_path)
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        assert h.get_latest_snapshot_metadata() is None
    assert not config.snapshots_dir.exists()


def test_recovery_keeps_at_most_keep_broken(tmp_path: Path) -> None:
    config = cfg(tmp_path, keep_broken=2)
    d = config.snapshots_dir
    d.mkdir()
    for i in range(1, 5):
        (d / f"snapshot-{i}-1.tar.gz").write_bytes(b"not a gzip file %d" % i)
        os.utime(d / f"snapshot-{i}-1.tar.gz", ns=(i * 10**9, i * 10**9))
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        assert h.get_latest_snapshot_metadata() is None
    broken = [n for n in names(d) if n.endswith(".broken")]
    assert len(broken) == 2 and tar_names(d) == []


def test_create_progress_reports_bytes(tmp_path: Path) -> None:
    h = StateMachineHandler(MemoryStateMachine(), cfg(tmp_path))
    apply_n(h, 500)
    calls: list[tuple[str, int, int]] = []
    h.create_snapshot(progress=lambda *a: calls.append(a))
    phases = [phase for phase, _, _ in calls]
    assert phases[0] == "generate" and "pack" in phases
    generated = calls[0][1]
    assert generated > 0 and calls[0] == ("generate", generated, generated)
    last_pack = [c for c in calls if c[0] == "pack"][-1]
    assert last_pack[1] == last_pack[2] == generated  # pack counts the generated files' bytes
    assert all(done <= total for _, done, total in calls)
