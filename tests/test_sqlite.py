"""SqliteStateMachine: durability, crash recovery, snapshots, concurrency."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
from _seams import SQLITE_INSTALL_STEPS
from conftest import put

from d_engine_sm import _kv
from d_engine_sm._fs import FileOps
from d_engine_sm._sqlite import SNAPSHOT_FILE, SqliteStateMachine
from d_engine_sm._values import log_id
from d_engine_sm.errors import CorruptSnapshotError, SnapshotError
from d_engine_sm.proto import storage_pb2
from d_engine_sm.testing import crash_expected, run_until_killed

BATCH = 25


def make_sm(path: Path) -> SqliteStateMachine:
    """Factory for crash subprocesses: ``path`` is a directory."""
    return SqliteStateMachine(path / "state.db")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def meta_at(index: int, term: int) -> storage_pb2.SnapshotMetadata:
    return storage_pb2.SnapshotMetadata(last_included=log_id(index, term), checksum=b"\x07" * 32)


def test_rejects_bad_durability(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        SqliteStateMachine(tmp_path / "x.db", durability="sometimes")


def test_refuses_foreign_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a SQLite database"):
        SqliteStateMachine(garbage)
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other, isolation_level=None)) as db:
        db.execute("CREATE TABLE t(x)")
    with pytest.raises(ValueError, match="not a SqliteStateMachine database"):
        SqliteStateMachine(other)


@pytest.mark.parametrize("durability", ["full", "normal", "off"])
def test_reopen_restores_everything(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "nested" / "state.db"
    with SqliteStateMachine(path, durability=durability) as sm:
        sm.apply_chunk([put(1, b"a", b"1"), put(2, b"b", b"2", term=2)])
        sm.apply_chunk([put(3, b"ttl", b"t", term=3, ttl=3600), put(4, b"c", b"3", term=3)])
        sm.persist_last_snapshot_metadata(meta_at(2, 2))
        sm.flush()
    with SqliteStateMachine(path, durability=durability) as again:
        assert again.last_applied() == log_id(4, 3)
        assert again.snapshot_metadata() == meta_at(2, 2)
        assert again.items() == {b"a": b"1", b"b": b"2", b"ttl": b"t", b"c": b"3"}
        assert [again.entry_term(i) for i in range(6)] == [None, 1, 2, 3, 3, None]


@pytest.mark.parametrize(("durability", "synced"), [("normal", True), ("off", False)])
def test_flush_fsyncs_unless_durability_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, synced: bool
) -> None:
    calls: list[str] = []

    class Counting(FileOps):
        def fsync_dir(self, path: Path) -> None:
            calls.append("dir")
            super().fsync_dir(path)

    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append("file")
        real_fsync(fd)

    with SqliteStateMachine(tmp_path / "s.db", durability=durability, file_ops=Counting()) as sm:
        sm.apply_chunk([put(1, b"a", b"1")])
        calls.clear()
        monkeypatch.setattr(os, "fsync", counting_fsync)
        sm.flush()
        monkeypatch.undo()
    assert ("dir" in calls and "file" in calls) if synced else calls == []


def test_ttl_expiry_uses_the_clock_and_cleanup_returns_keys(tmp_path: Path) -> None:
    clock = Clock()
    with SqliteStateMachine(tmp_path / "s.db", clock=clock) as sm:
        sm.apply_chunk([put(1, b"short", b"s", ttl=10), put(2, b"keep", b"k")])
        assert sm.get(b"short") == b"s"
        clock.now += 10
        assert sm.get(b"short") is None
        assert len(sm) == 2  # expired but not yet cleaned, as in MemoryStateMachine
        assert sm.lease_background_cleanup() == [b"short"]
        assert len(sm) == 1
        assert sm.lease_background_cleanup() == []


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    sm = SqliteStateMachine(tmp_path / "s.db")
    sm.apply_chunk([put(1, b"a", b"1")])
    sm.stop()
    assert not sm.is_running()
    assert sm.get(b"a") == b"1"  # stop keeps the instance usable
    sm.start()
    sm.close()
    sm.close()
    assert not sm.is_running()
    with pytest.raises(ValueError, match="closed"):
        sm.get(b"a")
    with pytest.raises(ValueError, match="closed"):
        sm.apply_chunk([put(2, b"b", b"2")])


def test_failed_apply_rolls_back(tmp_path: Path) -> None:
    with SqliteStateMachine(tmp_path / "s.db") as sm:
        sm.apply_chunk([put(1, b"a", b"1")])
        # A trigger fails the batch part-way through its writes: nothing of it lands.
        bad = [put(2, b"a", b"2"), put(3, b"b", b"3")]
        sm._db.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON kv WHEN NEW.key = x'62'"
            " BEGIN SELECT RAISE(ABORT, 'injected'); END"
        )
        with pytest.raises(sqlite3.IntegrityError, match="injected"):
            sm.apply_chunk(bad)
        assert sm.last_applied() == log_id(1, 1)
        assert sm.items() == {b"a": b"1"}
        sm._db.execute("DROP TRIGGER boom")
        sm.apply_chunk(bad)
        assert sm.items() == {b"a": b"2", b"b": b"3"}


# -- crash recovery -------------------------------------------------------


def test_sigkill_mid_apply_loses_nothing_returned(tmp_path: Path) -> None:
    """The child prints each index after apply_chunk returns; after the kill
    we drain everything it printed. last_applied may exceed that by exactly
    one batch: the one committed whose print the kill pre-empted."""
    path = tmp_path / "crash"
    path.mkdir()
    for round_ in range(3):  # resume from the recovered state each time
        reported = run_until_killed(f"{__name__}:make_sm", path, batch=BATCH)
        with make_sm(path) as sm:
            last = sm.last_applied().index
            assert last in (reported, reported + BATCH), (round_, last, reported)
            assert sm.items() == crash_expected(last)


_INSTALL_CHILD = """
import os, signal, sys
from pathlib import Path
from d_engine_sm._fs import FileOps
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm.proto import storage_pb2

class KillAt(FileOps):
    def announce(self, step):
        if step == sys.argv[3]:
            os.kill(os.getpid(), signal.SIGKILL)

meta = storage_pb2.SnapshotMetadata()
meta.last_included.index, meta.last_included.term = 50, 4
sm = SqliteStateMachine(sys.argv[1], file_ops=KillAt())
sm.apply_snapshot_from_file(meta, Path(sys.argv[2]))
print("installed", flush=True)
"""


def _snapshot_of(tmp_path: Path, pairs: dict[bytes, bytes], last: int) -> Path:
    snap_dir = tmp_path / "snap"
    snap_dir.mkdir(parents=True)
    with SqliteStateMachine(tmp_path / "source.db", durability="off") as source:
        source.apply_chunk([put(i + 1, k, v) for i, (k, v) in enumerate(pairs.items())])
        source.apply_chunk([_kv.noop_entry(i, 1) for i in range(len(pairs) + 1, last + 1)])
        source.generate_snapshot_data(snap_dir, source.last_applied())
    return snap_dir


# Killed at these steps the new file is already in place.
_SWAPPED = {"sqlite:install:fsync_dir", "sqlite:install:reopen"}


@pytest.mark.parametrize("kill_at", SQLITE_INSTALL_STEPS)
def test_install_crash_leaves_old_or_new_state(tmp_path: Path, kill_at: str) -> None:
    old = {b"old%d" % i: b"o" * i for i in range(200)} | {b"shared": b"old"}
    new = {b"new%d" % i: b"n" * i for i in range(300)} | {b"shared": b"new"}
    target = tmp_path / "target.db"
    with SqliteStateMachine(target) as sm:
        sm.apply_chunk([put(i + 1, k, v) for i, (k, v) in enumerate(old.items())])
        sm.persist_last_snapshot_metadata(meta_at(5, 1))

    def run_child(kill_at: str, snap_dir: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _INSTALL_CHILD, str(target), str(snap_dir), kill_at],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    killed = run_child(kill_at, _snapshot_of(tmp_path / "first", new, 50))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with SqliteStateMachine(target) as sm:
        if kill_at in _SWAPPED:
            assert sm.items() == new and sm.last_applied() == log_id(50, 4)
        else:
            assert sm.items() == old
            assert sm.last_applied() == log_id(len(old), 1)
            assert sm.snapshot_metadata() == meta_at(5, 1)

    done = run_child("never", _snapshot_of(tmp_path / "second", new, 50))
    assert done.returncode == 0 and "installed" in done.stdout, done.stderr
    with SqliteStateMachine(target) as sm:
        assert sm.items() == new
        assert sm.last_applied() == log_id(50, 4)
        assert sm.snapshot_metadata() is not None
        assert sm.snapshot_metadata().last_included == log_id(50, 4)  # type: ignore[union-attr]
        assert sm.entry_term(50) == 4


@pytest.mark.parametrize("step", SQLITE_INSTALL_STEPS)
def test_failing_install_step(tmp_path: Path, step: str) -> None:
    """A step that fails before the rename changes nothing; after it, the install
    completes (a failed directory fsync is only logged) or the instance closes."""

    class FailAt(FileOps):
        def announce(self, announced: str) -> None:
            if announced == step:
                raise OSError(f"injected at {step}")

    snap_dir = _snapshot_of(tmp_path, {b"n": b"new"}, 9)
    path = tmp_path / "t.db"
    with SqliteStateMachine(path, file_ops=FailAt()) as sm:
        sm.apply_chunk([put(1, b"o", b"old")])
        if step == "sqlite:install:fsync_dir":
            sm.apply_snapshot_from_file(meta_at(9, 1), snap_dir)
            assert sm.items() == {b"n": b"new"} and sm.last_applied() == log_id(9, 1)
        elif step == "sqlite:install:reopen":
            with pytest.raises(SnapshotError, match="cannot reopen"):
                sm.apply_snapshot_from_file(meta_at(9, 1), snap_dir)
            assert not sm.is_running()
            with pytest.raises(ValueError, match="closed"):
                sm.get(b"n")
        else:
            with pytest.raises(OSError, match="injected"):
                sm.apply_snapshot_from_file(meta_at(9, 1), snap_dir)
            assert sm.items() == {b"o": b"old"}
            assert sm.last_applied() == log_id(1, 1)
            assert sm.snapshot_metadata() is None
            sm.apply_chunk([put(2, b"p", b"still works")])
            assert sm.get(b"p") == b"still works"
    with SqliteStateMachine(path) as again:
        swapped = step in _SWAPPED
        assert (again.get(b"n") == b"new") == swapped
        assert not Path(str(path) + "-incoming").exists()


def _bad_snapshot(tmp_path: Path, kind: str) -> Path:
    snap_dir = tmp_path / kind
    snap_dir.mkdir()
    target = snap_dir / SNAPSHOT_FILE
    if kind == "garbage":
        target.write_bytes(os.urandom(4096))
    elif kind == "foreign":
        with closing(sqlite3.connect(target, isolation_level=None)) as db:
            db.execute("CREATE TABLE kv(key, value)")
    elif kind == "typed":
        with SqliteStateMachine(target, durability="off") as sm:
            sm.apply_chunk([put(1, b"a", b"1")])
        with closing(sqlite3.connect(target, isolation_level=None)) as db:
            db.execute("INSERT INTO kv VALUES ('text-key', 42, NULL)")
            db.execute("PRAGMA journal_mode = DELETE")
    return snap_dir


@pytest.mark.parametrize("kind", ["missing", "garbage", "foreign", "typed"])
def test_install_refuses_bad_files(tmp_path: Path, kind: str) -> None:
    snap_dir = _bad_snapshot(tmp_path, kind)
    with SqliteStateMachine(tmp_path / "t.db") as sm:
        sm.apply_chunk([put(1, b"o", b"old")])
        with pytest.raises(CorruptSnapshotError):
            sm.apply_snapshot_from_file(meta_at(9, 1), snap_dir)
        assert sm.items() == {b"o": b"old"}
        assert sm.last_applied() == log_id(1, 1)
        sm.apply_chunk([put(2, b"p", b"2")])  # the ATTACH was undone
        assert sm.get(b"p") == b"2"


# -- snapshots while applies continue --------------------------------------


def test_snapshot_is_the_state_at_prepare_while_applies_continue(tmp_path: Path) -> None:
    with SqliteStateMachine(tmp_path / "leader.db") as leader:
        for first in range(1, 2001, 500):
            leader.apply_chunk(
                [put(i, b"k%d" % (i % 700), b"v%d" % i) for i in range(first, first + 500)]
            )
        expected = leader.items()
        at_prepare = leader.last_applied()
        leader.prepare_snapshot()
        # Applied after prepare, before generation starts: must not appear.
        leader.apply_chunk([put(2001, b"k1", b"late"), put(2002, b"late", b"x")])

        done = threading.Event()
        applied_during = [0]
        errors: list[BaseException] = []

        def keep_applying() -> None:
            try:
                index = 2003
                while not done.is_set():
                    leader.apply_chunk([put(index, b"k%d" % (index % 900), b"w")])
                    applied_during[0] += 1
                    index += 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        applier = threading.Thread(target=keep_applying)
        applier.start()
        try:
            snap_dir = tmp_path / "snap"
            snap_dir.mkdir()
            leader.generate_snapshot_data(snap_dir, at_prepare)
        finally:
            done.set()
            applier.join(timeout=30)
        assert not errors and not applier.is_alive()
        assert sorted(p.name for p in snap_dir.iterdir()) == [SNAPSHOT_FILE]

        with SqliteStateMachine(tmp_path / "follower.db") as follower:
            follower.apply_chunk([put(1, b"stale", b"s")])
            follower.apply_snapshot_from_file(meta_at(at_prepare.index, 1), snap_dir)
            assert follower.items() == expected
            assert follower.last_applied() == at_prepare
        assert leader.last_applied().index == 2002 + applied_during[0]


def test_snapshot_without_prepare_is_the_current_state(tmp_path: Path) -> None:
    with SqliteStateMachine(tmp_path / "a.db") as sm:
        sm.apply_chunk([put(1, b"a", b"1"), put(2, b"b", b"2")])
        snap_dir = tmp_path / "snap"
        snap_dir.mkdir()
        sm.generate_snapshot_data(snap_dir, sm.last_applied())
        with SqliteStateMachine(tmp_path / "b.db") as other:
            other.apply_snapshot_from_file(meta_at(2, 1), snap_dir)
            assert other.items() == {b"a": b"1", b"b": b"2"}


# -- concurrent readers ----------------------------------------------------


def test_readers_see_only_committed_batches(tmp_path: Path) -> None:
    """Each batch writes x twice (a transient value, then the batch number),
    adds key b and deletes key b-1: a reader that could see inside a batch
    would read the transient value, two live keys or none."""
    batches = 300
    with SqliteStateMachine(tmp_path / "c.db", durability="off") as sm:
        sm.apply_chunk([put(1, b"x", b"%08d" % 0), put(2, b"key0", b"")])
        stop = threading.Event()
        problems: list[str] = []
        reads = [0]

        def reader() -> None:
            last_seen = 0
            while not stop.is_set():
                floor = (sm.last_applied().index - 2) // 4  # batches committed by now
                value = sm.get(b"x")
                if value is None or value == b"transient":
                    problems.append(f"x={value!r}")
                    return
                seen = int(value)
                if seen < last_seen or seen < floor:
                    problems.append(f"x went from {last_seen} to {seen} (floor {floor})")
                    return
                last_seen = seen
                if len(sm) != 2:
                    problems.append(f"len={len(sm)}")
                    return
                reads[0] += 1

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            index = 3
            for b in range(1, batches + 1):
                sm.apply_chunk(
                    [
                        put(index, b"x", b"transient"),
                        put(index + 1, b"x", b"%08d" % b),
                        put(index + 2, b"key%d" % b, b""),
                        _kv.command_entry(index + 3, 1, _kv.delete(b"key%d" % (b - 1))),
                    ]
                )
                index += 4
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert problems == []
        assert reads[0] > 0
        assert sm.get(b"x") == b"%08d" % batches
