"""How long do applies stall while a follower installs a snapshot?

Question: a follower on SqliteStateMachine (``--state sqlite``) or
MemoryStateMachine (``--state memory``) receives a snapshot of ``--keys``
keys while a thread keeps applying 10-entry batches, one per millisecond (the
log still arriving).
How long is the longest gap between two applies during the install, next
to the same install with the state machine's ``prepare_install`` disabled
(then the received file is validated or parsed with applies paused, as
before that hook existed)? Both in the same run, alternating, ``--repeat``
times.

Run::

    python benchmarks/bench_install_stall.py --keys 500000 --repeat 3
    python benchmarks/bench_install_stall.py --state memory --keys 500000
    python benchmarks/bench_install_stall.py --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from d_engine_sm import (
    MemoryStateMachine,
    SnapshotConfig,
    SqliteStateMachine,
    StateMachine,
    StateMachineHandler,
    _kv,
)
from d_engine_sm.errors import ApplyOrderError
from d_engine_sm.proto import common_pb2, storage_pb2


class PausedSqlite(SqliteStateMachine):
    """The baseline: nothing prepared, so validation runs with applies paused."""

    def prepare_install(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        return None


class PausedMemory(MemoryStateMachine):
    """The baseline: nothing prepared, so the file is parsed with applies paused."""

    def prepare_install(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        return None


PACE = 0.001  # seconds between two 10-entry batches: about 10,000 entries/s

STATES: dict[str, tuple[type[StateMachine], type[StateMachine]]] = {
    "sqlite": (SqliteStateMachine, PausedSqlite),
    "memory": (MemoryStateMachine, PausedMemory),
}


def make_state(cls: type[StateMachine], path: Path) -> StateMachine:
    if issubclass(cls, SqliteStateMachine):
        return cls(path, durability="off")
    return cls()


def dispose(sm: StateMachine) -> None:
    if isinstance(sm, SqliteStateMachine):
        sm.close()


def entries(first: int, count: int, value: bytes) -> list[common_pb2.Entry]:
    return [
        _kv.command_entry(i, 1, _kv.insert(b"key%010d" % i, value))
        for i in range(first, first + count)
    ]


def make_leader(root: Path, keys: int, cls: type[StateMachine]) -> StateMachineHandler:
    sm = make_state(cls, root / "leader.db")
    leader = StateMachineHandler(sm, config(root / "leader-snaps"), node_id=1)
    value = b"v" * 100
    for first in range(1, keys + 1, 10_000):
        leader.apply_chunk(entries(first, min(10_000, keys + 1 - first), value))
    leader.create_snapshot()
    return leader


def config(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=directory, chunk_size=1 << 20, fsync=False, resume_ttl=0)


def one_install(root: Path, leader: StateMachineHandler, cls: type[StateMachine]) -> Any:
    """Install while applying; the longest apply gap and the install's wall time."""
    work = Path(tempfile.mkdtemp(dir=root))
    sm = make_state(cls, work / "follower.db")
    follower = StateMachineHandler(sm, config(work / "snaps"), node_id=2)
    stop = threading.Event()
    gaps: list[float] = []
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    below = meta.last_included.index - 10  # the log stays behind the snapshot

    def apply_loop() -> None:
        index, last = 1, time.perf_counter()
        while not stop.is_set() and index <= below:
            try:
                follower.apply_chunk(entries(index, 10, b"x" * 100))
            except ApplyOrderError:  # the install moved past us (the wait counts): done
                gaps.append(time.perf_counter() - last)
                return
            now = time.perf_counter()
            gaps.append(now - last)
            index, last = index + 10, now
            time.sleep(PACE)  # the log arrives at a pace, as from a leader

    applier = threading.Thread(target=apply_loop)
    applier.start()
    try:
        time.sleep(0.05)  # applies under way before the install starts (not a synchronisation)
        started = time.perf_counter()
        stream = leader.load_snapshot_data(meta)
        follower.apply_snapshot_stream_from_leader(1, stream, lambda a: None)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        applier.join()
    follower.close()
    dispose(sm)
    shutil.rmtree(work)
    return {"install_seconds": seconds, "max_apply_gap_seconds": max(gaps, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--state", choices=sorted(STATES), default="sqlite")
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-install-stall-"))
    try:
        prepared, paused = STATES[args.state]
        leader = make_leader(root, args.keys, prepared)
        runs: dict[str, list[Any]] = {"prepared": [], "paused": []}
        for _ in range(args.repeat):
            runs["prepared"].append(one_install(root, leader, prepared))
            runs["paused"].append(one_install(root, leader, paused))
        leader.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {
        name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for name, rows in runs.items()
    }
    ratio = medians["paused"]["max_apply_gap_seconds"] / max(
        medians["prepared"]["max_apply_gap_seconds"], 1e-9
    )
    if args.json:
        doc = {"state": args.state, "keys": args.keys, "medians": medians, "stall_ratio": ratio}
        print(json.dumps(doc, indent=2))
        return
    for name, figures in medians.items():
        print(
            f"{name:<9} install {figures['install_seconds']:.3f} s   "
            f"longest apply gap {figures['max_apply_gap_seconds'] * 1000:.1f} ms"
        )
    print(f"longest apply gap, validation paused / prepared: {ratio:.1f}x")


if __name__ == "__main__":
    main()
