"""Subprocess half of tests/test_snapshot_crash.py (run as a script, never imported by pytest).

    python tests/crash_child.py create  DIR STEP
    python tests/crash_child.py install DIR STEP LEADER_DIR [SQLITE_PATH]
    python tests/crash_child.py recover DIR STEP
    python tests/crash_child.py hold    DIR

create/install/recover run the operation with a FileOps whose ``announce``
SIGKILLs this process the first time STEP is announced; reaching the end
without meeting STEP exits with status 3. With SQLITE_PATH the installing
follower is a SqliteStateMachine there (durability "normal", same FileOps)
that first applies five entries ``child<i> = c``, so its WAL holds frames.
``hold`` sits inside a create (directory lock held) printing ``holding``,
until a line arrives on stdin.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._fs import FileOps
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import LogId

NOT_REACHED = 3


class KillAt(FileOps):
    def __init__(self, step: str) -> None:
        self.step = step

    def announce(self, step: str) -> None:
        if step == self.step:
            _save_coverage()
            os.kill(os.getpid(), signal.SIGKILL)


def _save_coverage() -> None:
    """Under coverage measurement, keep what this child ran before its SIGKILL."""
    try:
        import coverage
    except ImportError:
        return
    current = coverage.Coverage.current()
    if current is not None:
        current.save()


class HoldInGenerate(MemoryStateMachine):
    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        print("holding", flush=True)
        sys.stdin.readline()
        super().generate_snapshot_data(dir, last_included)


def config(directory: str) -> SnapshotConfig:
    # fsync on: the fsync steps are announced only when they happen.
    return SnapshotConfig(
        snapshots_dir=Path(directory), chunk_size=512, cleanup_retain_count=2, keep_broken=3
    )


def fill(h: StateMachineHandler, count: int) -> None:
    first = h.last_applied() + 1
    h.apply_chunk(
        [
            _kv.command_entry(i, 1, _kv.insert(b"k%d" % i, os.urandom(40)))
            for i in range(first, first + count)
        ]
    )


def main(argv: list[str]) -> int:
    mode, directory = argv[0], argv[1]
    if mode == "hold":
        with StateMachineHandler(HoldInGenerate(), config(directory)) as h:
            fill(h, 50)
            h.create_snapshot()
        return 0
    ops = KillAt(argv[2])
    if mode == "create":
        with StateMachineHandler(MemoryStateMachine(), config(directory), file_ops=ops) as h:
            for _ in range(3):  # the third create prunes the first
                fill(h, 50)
                h.create_snapshot()
    elif mode == "install":
        leader_cfg = config(argv[3])
        sm: StateMachine = MemoryStateMachine()
        if len(argv) > 4:
            sm = SqliteStateMachine(argv[4], durability="normal", file_ops=ops)
        with (
            StateMachineHandler(MemoryStateMachine(), leader_cfg, node_id=1) as leader,
            StateMachineHandler(sm, config(directory), node_id=2, file_ops=ops) as follower,
        ):
            meta = leader.get_latest_snapshot_metadata()
            assert meta is not None
            if len(argv) > 4:
                first = follower.last_applied() + 1
                follower.apply_chunk(
                    [
                        _kv.command_entry(i, 1, _kv.insert(b"child%d" % i, b"c"))
                        for i in range(first, first + 5)
                    ]
                )
            follower.apply_snapshot_stream_from_leader(
                1, leader.load_snapshot_data(meta), lambda ack: None
            )
    elif mode == "recover":
        StateMachineHandler(MemoryStateMachine(), config(directory), file_ops=ops).close()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return NOT_REACHED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
