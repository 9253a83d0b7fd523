"""``demo``: the main job end to end on the embedded default.

A leader handler applies N key/value writes through an ``ApplyWorker``,
snapshots per policy, streams its newest snapshot to a follower, which
installs it; both states are compared key by key.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from d_engine_sm import _kv
from d_engine_sm._cli.common import (
    INTERRUPTS,
    StateSpec,
    Subparsers,
    _Failure,
    add_command,
    close_state_machine,
    log,
    make_state_machine,
    non_negative_int,
    positive_int,
    short_hex,
)
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._progress import Reporter, fmt_count, fmt_mb
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import NewCommitData
from d_engine_sm._worker import (
    ApplyCompleted,
    ApplyWorker,
    FatalError,
    SnapshotCreated,
    SnapshotFailed,
    WorkerEvent,
)
from d_engine_sm.errors import DEngineError
from d_engine_sm.proto import common_pb2, storage_pb2

DEFAULT_ENTRIES: Final = 200_000
_READ_BATCH: Final = 4096  # keys per read_from_state_machine call in the compare step
_POLL: Final = 0.2  # seconds: at most this late, the apply step notices Ctrl-C


def register(subparsers: Subparsers) -> None:
    demo = add_command(
        subparsers,
        "demo",
        help="apply N writes on a leader, snapshot, stream to a follower, compare",
        description="Leader applies N key/value writes through an ApplyWorker, snapshots per "
        "policy, streams its newest snapshot to a follower, which installs it; both states "
        "are compared key by key.",
    )
    demo.add_argument("--entries", type=positive_int, default=DEFAULT_ENTRIES, metavar="N")
    demo.add_argument("--dir", type=Path, help="work here (must be empty); default: a temp dir")
    demo.add_argument("--state", choices=("sqlite", "memory"), default="sqlite")
    demo.add_argument("--batch", type=positive_int, default=1000, help="entries per submit")
    demo.add_argument("--value-size", type=non_negative_int, default=100, metavar="BYTES")
    demo.set_defaults(func=_cmd_demo, handles_interrupts=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.dir is not None:
        base: Path = args.dir
        if base.exists() and (not base.is_dir() or any(base.iterdir())):
            raise _Failure(f"demo directory must be empty or not exist: {base}")
        base.mkdir(parents=True, exist_ok=True)
        return _Demo(args, base, Reporter(sys.stdout)).run()
    base = Path(tempfile.mkdtemp(prefix="d-engine-sm-demo-"))
    try:
        return _Demo(args, base, Reporter(sys.stdout)).run()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _key(i: int) -> bytes:
    return b"key-%010d" % i


class _Stoppable(Iterator[storage_pb2.SnapshotChunk]):
    """The leader's chunks until :meth:`stop` (called from the SIGINT handler, so a
    plain attribute: no lock the interrupted main thread might hold)."""

    def __init__(self, chunks: Iterator[storage_pb2.SnapshotChunk]) -> None:
        self.chunks = chunks
        self.stopped = False

    def __next__(self) -> storage_pb2.SnapshotChunk:
        if self.stopped:
            raise ConnectionAbortedError("transfer interrupted")
        return next(self.chunks)

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


class _Stop:
    """Set from the SIGINT handler, so a plain attribute (see :class:`_Stoppable`)."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True


class _ApplyEvents:
    """The demo's ``on_event``: what the apply step reports afterwards."""

    def __init__(self, progress: Callable[[int], None]) -> None:
        self.progress = progress
        self.fatal: list[BaseException] = []
        self.failed: list[BaseException] = []
        self.snapshots = 0
        self.last_done = 0.0

    def __call__(self, event: WorkerEvent) -> None:
        if isinstance(event, ApplyCompleted):
            self.last_done = time.perf_counter()
            self.progress(event.last_index)
        elif isinstance(event, FatalError):
            self.fatal.append(event.error)
        elif isinstance(event, SnapshotCreated):
            self.snapshots += 1
        elif isinstance(event, SnapshotFailed):
            self.failed.append(event.error)


class _Demo:
    """One demo run: leader apply -> snapshot -> transfer -> install -> compare."""

    def __init__(self, args: argparse.Namespace, base: Path, out: Reporter) -> None:
        self.n: int = args.entries
        self.batch: int = args.batch
        self.value_size: int = args.value_size
        self.state: str = args.state
        self.keep = args.dir is not None
        self.base = base
        self.out = out
        self.problems: list[str] = []

    def _machine(self, node: str) -> StateMachine:
        if self.state == "memory":
            return MemoryStateMachine()
        return make_state_machine(StateSpec("sqlite", self.base / node / "state.sqlite3"), "normal")

    def run(self) -> int:
        state = "sqlite (durability normal)" if self.state == "sqlite" else "memory"
        self.out.line(
            f"demo: {fmt_count(self.n)} writes of {self.value_size}-byte values, "
            f"{state} state, {'in ' + str(self.base) if self.keep else 'temporary directory'}"
        )
        threshold = max(1, self.n // 4)
        leader_cfg = SnapshotConfig(
            snapshots_dir=self.base / "leader" / "snapshots",
            max_log_entries_before_snapshot=threshold,
            snapshot_cool_down_since_last_check=0.0,
        )
        follower_cfg = SnapshotConfig(snapshots_dir=self.base / "follower" / "snapshots")
        leader_sm = self._machine("leader")
        try:
            follower_sm = self._machine("follower")
            try:
                with (
                    StateMachineHandler(leader_sm, leader_cfg, node_id=1) as leader,
                    StateMachineHandler(follower_sm, follower_cfg, node_id=2) as follower,
                ):
                    try:
                        self._steps(leader, follower, threshold)
                    except DEngineError as exc:  # reported in the verdict, then exit 1
                        log.debug("demo step failed", exc_info=True)
                        INTERRUPTS.check()  # a step cancelled by Ctrl-C: no verdict
                        self.problems.append(f"{type(exc).__name__}: {exc}")
            finally:
                close_state_machine(follower_sm)
        finally:
            close_state_machine(leader_sm)
        if self.problems:
            self.out.line(f"verdict   FAILED: {'; '.join(self.problems)}")
            raise _Failure(f"demo failed: {self.problems[0]}")
        self.out.line("verdict   OK: the follower's state is identical to the leader's")
        if self.keep:
            self.out.line(
                f"files     leader {self.base / 'leader'}, follower {self.base / 'follower'}"
            )
        return 0

    def _steps(
        self, leader: StateMachineHandler, follower: StateMachineHandler, threshold: int
    ) -> None:
        if not self._apply(leader, threshold):
            return
        meta, path = self._snapshot(leader)
        self._transfer(leader, follower, meta, path)
        self._compare(leader, follower)

    # -- step 1: apply through an ApplyWorker ----------------------------------------
    def _entries(self) -> list[list[common_pb2.Entry]]:
        """The N Insert entries in submit batches; random (incompressible) values."""
        started = time.perf_counter()
        rng = random.Random(0x5EED)
        size, n = self.value_size, self.n
        batches = [
            [
                _kv.command_entry(i, 1, _kv.insert(_key(i), rng.randbytes(size)))
                for i in range(first, min(n, first + self.batch - 1) + 1)
            ]
            for first in range(1, n + 1, self.batch)
        ]
        self.out.line(
            f"prepare   {fmt_count(n)} entries built in {time.perf_counter() - started:.2f} s"
        )
        return batches

    def _apply(self, leader: StateMachineHandler, threshold: int) -> bool:
        # Built up front so the figure measures applying, not protobuf encoding.
        batches = self._entries()
        bar = self.out.bar(
            "apply",
            self.n,
            start=f"{fmt_count(self.n)} entries in batches of {fmt_count(self.batch)}",
            unit="entries",
        )
        events = _ApplyEvents(bar.update)
        worker = ApplyWorker(leader, events, max_queued_entries=max(100_000, 4 * self.batch))
        stop = _Stop()
        started = time.perf_counter()
        worker.start()
        try:
            # Ctrl-C sets a flag, never raises here: a KeyboardInterrupt raised inside
            # the worker's locking code (submit, shutdown) can leave its lock held, and
            # the shutdown below would then wait forever. KeyboardInterrupt follows the block.
            with INTERRUPTS.cancelling(stop.request):
                self._submit_all(worker, batches, events, stop)
                # Drains; also waits for a policy snapshot in flight.
                while not stop.requested and not worker.shutdown(drain=True, timeout=_POLL):
                    pass
        finally:
            # After Ctrl-C or an error: stop after the batch in flight, and wait for a
            # policy snapshot, before anything is closed (a no-op after the drain).
            worker.shutdown(drain=False)
            bar.close()
        return self._report_apply(leader, events, max(events.last_done - started, 1e-9), threshold)

    def _submit_all(
        self,
        worker: ApplyWorker,
        batches: list[list[common_pb2.Entry]],
        events: _ApplyEvents,
        stop: _Stop,
    ) -> None:
        try:
            for entries in batches:
                if events.fatal or stop.requested:
                    break
                last = entries[-1].index
                worker.submit(entries, NewCommitData(last, common_pb2.NODE_ROLE_LEADER, 1))
        except DEngineError as exc:  # WorkerStopped after a fatal error
            if not events.fatal:
                raise
            log.debug("submit stopped: %s", exc)

    def _report_apply(
        self, leader: StateMachineHandler, events: _ApplyEvents, seconds: float, threshold: int
    ) -> bool:
        if events.fatal:
            self.problems.append(f"apply failed: {events.fatal[0]}")
            return False
        applied = leader.last_applied()
        self.out.line(
            f"apply     {fmt_count(applied)} entries in {seconds:.2f} s: "
            f"{fmt_count(int(applied / seconds))} entries/s"
        )
        if applied != self.n:
            self.problems.append(f"leader applied {applied} of {self.n} entries")
            return False
        stats = leader.metrics()["snapshot_create_seconds"]
        assert isinstance(stats, dict)
        if events.snapshots:
            mean = stats["sum"] / max(1, stats["count"])
            self.out.line(
                f"policy    {events.snapshots} snapshot(s), one per {fmt_count(threshold)} "
                f"entries, taken while applying: create {mean:.2f} s mean, {stats['max']:.2f} s max"
            )
        for error in events.failed:
            self.problems.append(f"policy snapshot failed: {error}")
        return True

    # -- step 2: the final snapshot -----------------------------------------------------
    def _snapshot(self, leader: StateMachineHandler) -> tuple[storage_pb2.SnapshotMetadata, Path]:
        before = leader.get_latest_snapshot_metadata()
        started = time.perf_counter()
        meta, path = leader.create_snapshot()
        seconds = time.perf_counter() - started
        lid = meta.last_included
        size = path.stat().st_size
        fresh = before is None or before.last_included != lid
        how = f"created in {seconds:.2f} s" if fresh else "already taken by the policy"
        self.out.line(
            f"snapshot  index {lid.index} term {lid.term}: {fmt_mb(size)}, {how} "
            f"(sha256 {short_hex(meta.checksum)})"
        )
        return meta, path

    # -- step 3: stream to the follower, which installs ---------------------------------
    def _transfer(
        self,
        leader: StateMachineHandler,
        follower: StateMachineHandler,
        meta: storage_pb2.SnapshotMetadata,
        path: Path,
    ) -> None:
        size = path.stat().st_size
        bar = self.out.bar(
            "transfer", size, start=f"streaming {fmt_mb(size)} to the follower", fmt=fmt_mb
        )
        acks: list[storage_pb2.SnapshotAck] = []
        received_at: list[float] = []

        def progress(phase: str, done: int, total: int) -> None:
            if phase == "receive":
                bar.update(done, total)
                if done >= total and not received_at:
                    received_at.append(time.perf_counter())
            elif not received_at:
                received_at.append(time.perf_counter())

        started = time.perf_counter()
        chunks = _Stoppable(leader.load_snapshot_data(meta))
        try:
            # Ctrl-C ends the stream (the follower aborts, FAILED ack, nothing installed);
            # an install already running finishes first.
            with INTERRUPTS.cancelling(chunks.stop):
                installed = follower.apply_snapshot_stream_from_leader(
                    1, chunks, acks.append, progress=progress
                )
        finally:
            chunks.close()
            bar.close()
        ended = time.perf_counter()
        received = received_at[0] if received_at else ended
        transfer_s = max(received - started, 1e-9)
        bad = [a for a in acks if a.status != storage_pb2.SnapshotAck.ACCEPTED]
        self.out.line(
            f"transfer  {fmt_mb(size)} in {len(acks)} chunks: {transfer_s:.2f} s, "
            f"{size / transfer_s / 1e6:.1f} MB/s"
        )
        self.out.line(f"install   {ended - received:.2f} s (unpack + replace the follower's state)")
        if bad:
            self.problems.append(f"{len(bad)} chunk(s) not accepted")
        if installed.last_included != meta.last_included or installed.checksum != meta.checksum:
            self.problems.append("the follower installed different snapshot metadata")

    # -- step 4: compare through the read path ------------------------------------------
    def _compare(self, leader: StateMachineHandler, follower: StateMachineHandler) -> None:
        with INTERRUPTS.interruptible():  # reads only
            self._compare_reads(leader, follower)

    def _compare_reads(self, leader: StateMachineHandler, follower: StateMachineHandler) -> None:
        started = time.perf_counter()
        if follower.last_applied() != leader.last_applied():
            self.problems.append(
                f"last_applied differs: leader {leader.last_applied()}, "
                f"follower {follower.last_applied()}"
            )
        differing = 0
        first_diff: bytes | None = None
        for lo in range(1, self.n + 1, _READ_BATCH):
            keys = [_key(i) for i in range(lo, min(self.n + 1, lo + _READ_BATCH))]
            a = {r.key: r.value for r in leader.read_from_state_machine(keys) or ()}
            b = {r.key: r.value for r in follower.read_from_state_machine(keys) or ()}
            for key in keys:
                if key not in a or a.get(key) != b.get(key):
                    differing += 1
                    first_diff = first_diff or key
        leader_len, follower_len = len(leader.state_machine), len(follower.state_machine)
        seconds = time.perf_counter() - started
        if differing:
            self.problems.append(f"{differing} key(s) differ, first {first_diff!r}")
        if leader_len != follower_len or leader_len != self.n:
            self.problems.append(
                f"key counts differ: written {self.n}, leader {leader_len}, follower {follower_len}"
            )
        verdict = "identical" if not differing and leader_len == follower_len else "DIFFERENT"
        self.out.line(
            f"compare   {fmt_count(self.n)} keys read on both nodes in {seconds:.2f} s: {verdict}"
        )
