"""Crash safety: SIGKILL a subprocess at every announced step, then reopen.

tests/crash_child.py runs a create, an install or a start-up recovery with a
FileOps that kills the process at one step. The parent then reopens a
handler on the directory and checks the invariants: no ``temp-`` leftover,
every published archive verifies, the latest metadata is the newest valid
archive, and a new create succeeds. Also cross-process writer exclusion.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _seams import CREATE_STEPS, INSTALL_STEPS, SQLITE_INSTALL_STEPS

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._snapshot import archive
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._values import LogId
from d_engine_sm.errors import SnapshotInProgress

CHILD = Path(__file__).with_name("crash_child.py")
PACKAGE = Path(archive.__file__).parent
NOT_REACHED = 3
WAIT = 30.0

RECOVER_STEPS = [
    "recover:remove_temp",
    "recover:rename_broken",
    "recover:fsync_dir",
    "recover:remove_broken",
]


def cfg(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=directory, chunk_size=512, fsync=False)


def fill(h: StateMachineHandler, count: int) -> None:
    first = h.last_applied() + 1
    h.apply_chunk(
        [
            _kv.command_entry(i, 1, _kv.insert(b"k%d" % i, b"v%d" % i))
            for i in range(first, first + count)
        ]
    )


def run_child(*args: str) -> int:
    proc = subprocess.run(
        [sys.executable, str(CHILD), *args], capture_output=True, timeout=WAIT, check=False
    )
    assert proc.returncode in (-signal.SIGKILL, NOT_REACHED, 0), proc.stderr.decode()
    return proc.returncode


def check_recovered(directory: Path) -> None:
    """The invariants after any crash, checked through a freshly opened handler."""
    sm = MemoryStateMachine()
    with StateMachineHandler(sm, cfg(directory)) as h:
        if directory.is_dir():
            assert [p.name for p in directory.iterdir() if p.name.startswith("temp-")] == []
        published = sorted(
            (int(p.name.split("-")[1]), p)
            for p in (directory.glob("snapshot-*.tar.gz") if directory.is_dir() else [])
        )
        for _, path in published:
            archive.verify(path)  # raises if any published archive is not whole
        latest = h.get_latest_snapshot_metadata()
        if published:
            index, path = published[-1]
            assert latest is not None
            assert latest.last_included.index == index
            assert latest.checksum == hashlib.sha256(path.read_bytes()).digest()
        else:
            assert latest is None
        fill(h, 1000)
        meta, path = h.create_snapshot()
        assert meta.last_included.index == 1000 and archive.verify(path) == meta.checksum


def test_steps_cover_every_announce() -> None:
    """Every ``announce(...)`` in the snapshot package is crash-tested (and only those)."""
    text = "".join(path.read_text() for path in sorted(PACKAGE.glob("*.py")))
    found = re.findall(r'announce\((f?)"([^"]+)"\)', text)
    assert found, "no announce() calls found"
    steps = set(CREATE_STEPS + INSTALL_STEPS + RECOVER_STEPS)
    patterns = [
        re.compile(re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(s)) if f else re.escape(s))
        for f, s in found
    ]
    for pattern in patterns:
        assert any(pattern.fullmatch(s) for s in steps), f"untested step {pattern.pattern}"
    for step in steps:
        assert any(p.fullmatch(step) for p in patterns), f"{step} is never announced"
    sqlite = "".join(
        (PACKAGE.parent / name).read_text() for name in ("_sqlite.py", "_sqlite_schema.py")
    )
    assert set(re.findall(r'"(sqlite:[a-z_:]+)"', sqlite)) == set(SQLITE_INSTALL_STEPS)


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_kill_during_create(tmp_path: Path, step: str) -> None:
    directory = tmp_path / "snaps"
    assert run_child("create", str(directory), step) == -signal.SIGKILL
    check_recovered(directory)


def _two_old_snapshots(directory: Path) -> None:
    with StateMachineHandler(MemoryStateMachine(), cfg(directory)) as h:
        fill(h, 10)
        h.create_snapshot()
        fill(h, 10)
        h.create_snapshot()


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_kill_during_install(tmp_path: Path, step: str) -> None:
    leader_dir, directory = tmp_path / "leader", tmp_path / "follower"
    with StateMachineHandler(MemoryStateMachine(), cfg(leader_dir)) as leader:
        fill(leader, 200)
        leader.create_snapshot()
    _two_old_snapshots(directory)
    assert run_child("install", str(directory), step, str(leader_dir)) == -signal.SIGKILL
    check_recovered(directory)


@pytest.mark.parametrize("step", RECOVER_STEPS)
def test_kill_during_recovery(tmp_path: Path, step: str) -> None:
    directory = tmp_path / "snaps"
    _two_old_snapshots(directory)
    (directory / "snapshot-30-1.tar.gz").write_bytes(b"\x1f\x8b garbage, not an archive")
    (directory / "temp-create-1-aa").write_bytes(b"half")
    (directory / "temp-work-1-bb").mkdir()
    for i in range(4):
        (directory / f"snapshot-{i}-9.tar.gz.broken").write_bytes(b"old broken")
    assert run_child("recover", str(directory), step) == -signal.SIGKILL
    check_recovered(directory)
    assert len(list(directory.glob("*.broken"))) <= 3


def test_unknown_step_is_reported_not_reached(tmp_path: Path) -> None:
    assert run_child("create", str(tmp_path / "s"), "no-such-step") == NOT_REACHED


def test_writer_lock_excludes_other_processes(tmp_path: Path) -> None:
    """A create in another process (sitting in generate) locks out create, cleanup, install."""
    directory, leader_dir = tmp_path / "snaps", tmp_path / "leader"
    _two_old_snapshots(directory)
    with StateMachineHandler(MemoryStateMachine(), cfg(leader_dir), node_id=1) as leader:
        fill(leader, 100)
        meta, _ = leader.create_snapshot()
        child = subprocess.Popen(
            [sys.executable, str(CHILD), "hold", str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "holding"
            # Opened while the other process writes: recovery only looks.
            with StateMachineHandler(MemoryStateMachine(), cfg(directory), node_id=2) as h:
                latest = h.get_latest_snapshot_metadata()
                assert latest is not None and latest.last_included.index == 20
                assert any(p.name.startswith("temp-") for p in directory.iterdir())
                fill(h, 5)
                with pytest.raises(SnapshotInProgress):
                    h.create_snapshot()
                with pytest.raises(SnapshotInProgress):
                    h.cleanup_snapshot(1)
                acks: list[object] = []
                with pytest.raises(SnapshotInProgress):
                    h.apply_snapshot_stream_from_leader(
                        1, leader.load_snapshot_data(meta), acks.append
                    )
                assert len(acks) == 1 and h.last_applied() == 5
                child.stdin.write("go\n")
                child.stdin.flush()
                assert child.wait(WAIT) == 0
                h.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), acks.append)
                assert h.last_applied() == 100
                assert h.cleanup_snapshot(1) != []
        finally:
            child.kill()
            child.wait(WAIT)


def _sqlite_leader(tmp_path: Path) -> tuple[Path, dict[bytes, bytes]]:
    leader_dir = tmp_path / "leader"
    with (
        SqliteStateMachine(tmp_path / "leader.db", durability="off") as sm,
        StateMachineHandler(sm, cfg(leader_dir)) as leader,
    ):
        fill(leader, 200)
        leader.create_snapshot()
        return leader_dir, sm.items()


# Killed at these steps the install has renamed the new file into place.
NEW_STATE_STEPS = {"sqlite:install:fsync_dir", "sqlite:install:reopen"} | set(
    INSTALL_STEPS[INSTALL_STEPS.index("install:apply") + 1 :]
)


@pytest.mark.parametrize("step", INSTALL_STEPS + SQLITE_INSTALL_STEPS)
def test_kill_during_sqlite_install(tmp_path: Path, step: str) -> None:
    """After a kill at any step: the old state or the new one, whole, never a mix,
    never ahead of by the newest archive; no side file of one applied to the other."""
    leader_dir, new = _sqlite_leader(tmp_path)
    directory, db = tmp_path / "follower", tmp_path / "follower.db"
    with (
        SqliteStateMachine(db, durability="normal") as sm,
        StateMachineHandler(sm, cfg(directory)) as h,
    ):
        _two_old_snapshots_of(h)
        first = h.last_applied() + 1
        h.apply_chunk([_kv.command_entry(first, 1, _kv.insert(b"k1", b"overwritten"))])
        old, old_applied = sm.items(), sm.last_applied()
    # The child first applies five entries (left in its WAL), then installs.
    first = old_applied.index + 1
    old |= {b"child%d" % i: b"c" for i in range(first, first + 5)}
    old_applied = LogId(index=old_applied.index + 5, term=1)
    child = run_child("install", str(directory), step, str(leader_dir), str(db))
    assert child == -signal.SIGKILL
    assert not (tmp_path / "follower.db-incoming").exists()
    with SqliteStateMachine(db) as sm:
        assert sm._db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        state, applied = sm.items(), sm.last_applied()
        assert (applied.index == 200) == (step in NEW_STATE_STEPS)
        if applied.index == 200:
            assert state == new
            assert sm.snapshot_metadata() is not None
        else:
            assert (state, applied) == (old, old_applied)
        newest = max(int(p.name.split("-")[1]) for p in directory.glob("snapshot-*.tar.gz"))
        assert newest <= applied.index  # the state is never behind its newest archive
        with StateMachineHandler(sm, cfg(directory)) as h:
            assert h.state_behind_snapshot == 0
            fill(h, 5)
            h.create_snapshot()
    check_recovered(directory)


def _two_old_snapshots_of(h: StateMachineHandler) -> None:
    fill(h, 10)
    h.create_snapshot()
    fill(h, 10)
    h.create_snapshot()
