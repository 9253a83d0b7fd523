"""Subprocess half of tests/test_interrupt.py (run as a script, never imported by pytest).

    python tests/interrupt_child.py PHASE demo [demo arguments...]

Runs the ``d-engine-sm`` command line (``main()``, as the program) with the
demo's state-machine factory as the seam: SqliteStateMachines that print
``phase PHASE`` on stdout the first time they reach PHASE and then block until
a line arrives on stdin, so the parent can send SIGINT while the child is
exactly there. Phases: ``policy`` (generating a policy snapshot, on the
snapshot thread, while the main thread submits or drains), ``final`` (the
main thread about to create the demo's final snapshot), ``receive`` (the
follower has two chunks of the transfer), ``install`` (the follower's
``apply_snapshot_from_file``). Any other PHASE never blocks.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from d_engine_sm._cli import demo, main
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._values import LogId
from d_engine_sm.proto import storage_pb2

PHASE = sys.argv[1]
_reached: set[str] = set()


def reach(phase: str) -> None:
    if phase != PHASE or phase in _reached:
        return
    _reached.add(phase)
    print(f"phase {phase}", flush=True)
    sys.stdin.readline()


class Announcing(SqliteStateMachine):
    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        if threading.current_thread() is not threading.main_thread():
            reach("policy")
        super().generate_snapshot_data(dir, last_included)

    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        reach("install")
        super().apply_snapshot_from_file(meta, dir)


def machine(self: demo._Demo, node: str) -> SqliteStateMachine:
    return Announcing(self.base / node / "state.sqlite3", durability="normal")


_snapshot = demo._Demo._snapshot


def snapshot(
    self: demo._Demo, leader: StateMachineHandler
) -> tuple[storage_pb2.SnapshotMetadata, Path]:
    reach("final")
    return _snapshot(self, leader)


class Chunks(demo._Stoppable):
    def __init__(self, chunks: Iterator[storage_pb2.SnapshotChunk]) -> None:
        super().__init__(chunks)
        self.sent = 0

    def __next__(self) -> storage_pb2.SnapshotChunk:
        self.sent += 1
        if self.sent == 3:  # two chunks received: the follower is mid-stream
            reach("receive")
        return super().__next__()


demo._Stoppable = Chunks  # type: ignore[misc]
demo._Demo._machine = machine  # type: ignore[method-assign]
demo._Demo._snapshot = snapshot  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    sys.exit(main())
