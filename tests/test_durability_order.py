"""Durable state before publish, checked on the system calls themselves (strace).

With ``durability="normal"`` SQLite does not fsync its WAL at commit. An
archive says "the state is at N"; after a power loss that must never be
ahead of the state, so the state's files are fsynced before the archive is
renamed into place: for create and for install (skipped without strace).
At start-up, a state behind its own newest archive is reported.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import put

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._sqlite import SqliteStateMachine

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")

CHILD = """
import sys
from pathlib import Path
from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._sqlite import SqliteStateMachine

mode, root = sys.argv[1], Path(sys.argv[2])

def entries(first, count):
    return [_kv.command_entry(i, 1, _kv.insert(b"k%d" % i, b"v" * 50))
            for i in range(first, first + count)]

def node(name, durability):
    sm = SqliteStateMachine(root / (name + ".db"), durability=durability)
    return sm, StateMachineHandler(sm, SnapshotConfig(snapshots_dir=root / name))

if mode == "create":
    sm, h = node("leader", "normal")
    h.apply_chunk(entries(1, 50))
    h.create_snapshot()
else:
    lsm, leader = node("leader", "off")
    leader.apply_chunk(entries(1, 100))
    meta, _ = leader.create_snapshot()
    sm, h = node("follower", "normal")
    h.apply_chunk(entries(1, 20))
    print("install-start", flush=True)
    h.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), lambda ack: None)
"""

SYSCALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)$")
FD_PATH = re.compile(r"^\d+<([^>]*)>")


def trace(tmp_path: Path, mode: str) -> list[tuple[str, str]]:
    """(syscall, path) in order: the fd's path, or a rename's destination."""
    out = tmp_path / "trace.txt"
    subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-s",
            "0",
            "-o",
            str(out),
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2,pwrite64,write",
            sys.executable,
            "-c",
            CHILD,
            mode,
            str(tmp_path),
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    calls = []
    for line in out.read_text().splitlines():
        found = SYSCALL.match(line)
        if found is None:
            continue
        name, rest = found.groups()
        if name.startswith("rename"):
            quoted = re.findall(r'"([^"]*)"', rest)
            if quoted:
                calls.append((name, quoted[-1]))
        else:
            fd = FD_PATH.match(rest)
            if fd is not None:
                calls.append((name, fd.group(1)))
    return calls


def _index(calls: list[tuple[str, str]], pred: object, start: int = 0) -> int:
    for i in range(start, len(calls)):
        if pred(*calls[i]):  # type: ignore[operator]
            return i
    raise AssertionError(f"no matching call after #{start}")


def _is_sync(name: str) -> bool:
    return name in ("fsync", "fdatasync")


def _archive_rename(name: str, path: str) -> bool:
    return name.startswith("rename") and re.search(r"/snapshot-\d+-\d+\.tar\.gz$", path) is not None


@needs_strace
def test_create_fsyncs_the_wal_before_publishing(tmp_path: Path) -> None:
    calls = trace(tmp_path, "create")
    db = str(tmp_path / "leader.db")
    publish = _index(calls, _archive_rename)
    last_write = max(
        i
        for i, (name, path) in enumerate(calls[:publish])
        if name in ("write", "pwrite64") and path in (db, db + "-wal")
    )
    synced = [
        i
        for i, (name, path) in enumerate(calls)
        if last_write < i < publish and _is_sync(name) and path in (db, db + "-wal")
    ]
    assert synced, (
        f"state written at #{last_write}, archive renamed at #{publish}, no fsync between"
    )
    assert calls[last_write][1] in [calls[i][1] for i in synced]


@needs_strace
def test_install_makes_the_new_state_durable_before_publishing(tmp_path: Path) -> None:
    calls = trace(tmp_path, "install")
    db = str(tmp_path / "follower.db")
    follower_dir = str(tmp_path / "follower")
    # The leader publishes first; the follower's archive is the last one renamed.
    publish = max(
        i for i, call in enumerate(calls) if _archive_rename(*call) and follower_dir in call[1]
    )
    swap = _index(calls, lambda name, path: name.startswith("rename") and path == db)

    def is_received(path: str) -> bool:
        return path.endswith("/state.sqlite3") and follower_dir in path

    last_write = max(
        i
        for i, (name, path) in enumerate(calls[:swap])
        if name in ("write", "pwrite64") and is_received(path)
    )
    assert any(_is_sync(name) and is_received(path) for name, path in calls[last_write:swap]), (
        "the received file was renamed over the database before it was fsynced"
    )
    dir_sync = _index(calls, lambda name, path: _is_sync(name) and path == str(tmp_path), swap)
    assert swap < dir_sync < publish, (swap, dir_sync, publish)


def test_start_up_reports_a_state_behind_its_newest_archive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A power loss that kept the archive but not the last commits, simulated by
    putting back a copy of the database taken before them."""
    db, cfg = tmp_path / "state.db", SnapshotConfig(snapshots_dir=tmp_path / "snaps", fsync=False)
    with SqliteStateMachine(db) as sm, StateMachineHandler(sm, cfg) as h:
        h.apply_chunk([put(i, b"k%d" % i, b"v") for i in range(1, 11)])
        sm.flush()
        shutil.copyfile(db, tmp_path / "at-10.db")
        h.apply_chunk([put(i, b"k%d" % i, b"v") for i in range(11, 31)])
        h.create_snapshot()
        assert h.state_behind_snapshot == 0
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "at-10.db", db)
    with (
        caplog.at_level(logging.INFO, logger="d_engine_sm"),
        SqliteStateMachine(db) as sm,
        StateMachineHandler(sm, cfg) as h,
    ):
        assert sm.last_applied().index == 10
        assert h.state_behind_snapshot == 20
        assert h.metrics()["state_behind_snapshot"] == 20
        warned = [r for r in caplog.records if "behind the newest snapshot" in r.getMessage()]
        assert [r.levelno for r in warned] == [logging.WARNING]
        assert "applied=10 snapshot=30" in warned[0].getMessage()
        h.apply_chunk([put(i, b"k%d" % i, b"again") for i in range(11, 31)])
        assert h.state_behind_snapshot == 0  # caught up by replaying the log
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="d_engine_sm"):
        with StateMachineHandler(MemoryStateMachine(), cfg) as h:  # keeps nothing: info only
            assert h.state_behind_snapshot == 30
        levels = [r.levelno for r in caplog.records if "behind" in r.getMessage()]
        assert levels == [logging.INFO]
