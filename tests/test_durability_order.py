"""Durable state before publish, checked on the system calls themselves (strace).

With ``durability="normal"`` SQLite does not fsync its WAL at commit. An
archive says "the state is at N"; after a power loss that must never be
ahead of the state, so the state's files are fsynced before the archive is
renamed into place: for create and for install. Skipped without strace.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")

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
