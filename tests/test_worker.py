"""ApplyWorker: d-engine's B140-B145 plus coalescing, back-pressure, ordering,
policy snapshots off the apply thread, callbacks and shutdown semantics."""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._values import ApplyResult, LogId, NewCommitData
from d_engine_sm._worker import (
    ApplyCompleted,
    ApplyWorker,
    FatalError,
    SnapshotCreated,
    SnapshotFailed,
    SnapshotSkipped,
    WorkerEvent,
)
from d_engine_sm.errors import (
    ApplyError,
    ApplyOrderError,
    HandlerClosed,
    SnapshotError,
    SubmitTimeout,
    WorkerStopped,
)
from d_engine_sm.proto import common_pb2

WAIT = 10.0  # generous bound for one event; tests normally finish in ms
LEADER = NewCommitData(new_commit_index=0, role=common_pb2.NODE_ROLE_LEADER, current_term=1)


class RecordingSM(MemoryStateMachine):
    """Records apply calls (sizes, thread names); can block until released."""

    def __init__(self, *, block: bool = False) -> None:
        super().__init__()
        self.calls: list[list[int]] = []
        self.apply_threads: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        self.calls.append([e.index for e in entries])
        self.apply_threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(WAIT), "test never released the state machine"
        return super().apply_chunk(entries)


class FailingSM(MemoryStateMachine):
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        raise OSError("Disk failure - cannot write to storage")


class SlowSnapshotSM(RecordingSM):
    """generate_snapshot_data blocks until released (applies keep running:
    MemoryStateMachine overrides prepare_snapshot)."""

    def __init__(self) -> None:
        super().__init__()
        self.generating = threading.Event()
        self.release_generate = threading.Event()
        self.generate_threads: list[str] = []

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        self.generate_threads.append(threading.current_thread().name)
        self.generating.set()
        assert self.release_generate.wait(WAIT)
        super().generate_snapshot_data(dir, last_included)


class BrokenSnapshotSM(MemoryStateMachine):
    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        raise OSError("no space for snapshot")


def next_event(events: queue.Queue[WorkerEvent]) -> WorkerEvent:
    return events.get(timeout=WAIT)


def completed(events: queue.Queue[WorkerEvent]) -> ApplyCompleted:
    event = next_event(events)
    assert isinstance(event, ApplyCompleted), event
    return event


def drain_events(events: queue.Queue[WorkerEvent]) -> list[WorkerEvent]:
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


@pytest.fixture
def events() -> queue.Queue[WorkerEvent]:
    return queue.Queue()


def make(config: SnapshotConfig, sm: MemoryStateMachine | None = None) -> StateMachineHandler:
    return StateMachineHandler(sm if sm is not None else RecordingSM(), config, node_id=1)


@pytest.fixture
def stopper() -> Iterator[list[ApplyWorker]]:
    """Workers appended here are shut down (no drain) after the test, even on failure."""
    workers: list[ApplyWorker] = []
    yield workers
    for w in workers:
        sm = w.handler.state_machine
        if isinstance(sm, RecordingSM):
            sm.release.set()
        if isinstance(sm, SlowSnapshotSM):
            sm.release_generate.set()
        assert w.shutdown(drain=False, timeout=WAIT)


# -- d-engine's worker behaviours --------------------------------------------------
def test_apply_completed_content(config: SnapshotConfig, events: queue.Queue[WorkerEvent]) -> None:
    # B140
    sm = RecordingSM()
    with ApplyWorker(make(config, sm), events) as w:
        w.submit(puts(1, 2))
        event = completed(events)
    assert event.last_index == 2
    assert event.results == [ApplyResult(1, True), ApplyResult(2, True)]
    assert sm.calls == [[1, 2]]


def test_fatal_error_then_stopped(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent], caplog: pytest.LogCaptureFixture
) -> None:
    # B141, plus "failed stays failed"
    handler = make(config, FailingSM())
    w = ApplyWorker(handler, events)
    w.start()
    w.submit(puts(1, 1))
    event = next_event(events)
    assert isinstance(event, FatalError)
    assert event.source == "StateMachine"
    assert isinstance(event.error, ApplyError)
    assert "Disk failure" in str(event.error)
    assert isinstance(event.error.__cause__, OSError)
    assert w.failed
    with pytest.raises(WorkerStopped, match="fatal"):
        w.submit(puts(1, 1))
    assert w.shutdown(timeout=WAIT)
    assert w.failed
    with pytest.raises(WorkerStopped, match="fatal"):
        w.submit(puts(1, 1))
    assert handler.last_applied() == 0
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


def test_shutdown_drains_queued_batches(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    # B142 made deterministic: batches 2 and 3 are queued behind a blocked apply
    # when the shutdown starts, so the drain path really runs.
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events, max_batch_entries=1)
    w.start()
    w.submit(puts(1, 1))
    assert sm.entered.wait(WAIT)
    w.submit(puts(2, 1))
    w.submit(puts(3, 1))
    assert w.shutdown(drain=True, timeout=0) is False  # draining, blocked behind apply 1
    with pytest.raises(WorkerStopped):
        w.submit(puts(4, 1))
    sm.release.set()
    assert w.shutdown(drain=True, timeout=WAIT) is True
    assert [completed(events).last_index for _ in range(3)] == [1, 2, 3]
    assert sm.calls == [[1], [2], [3]]
    assert drain_events(events) == []


def test_shutdown_without_work_applies_nothing(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    # B143 / B145: closing the input ends the worker cleanly with no apply calls
    sm = RecordingSM()
    w = ApplyWorker(make(config, sm), events)
    w.start()
    thread = w._p.thread
    assert thread is not None
    assert w.shutdown(timeout=WAIT)
    assert not thread.is_alive()
    assert sm.calls == []
    assert drain_events(events) == []


def test_batches_fifo_in_order(config: SnapshotConfig, events: queue.Queue[WorkerEvent]) -> None:
    # B144 (with coalescing capped at one batch's size, as d-engine never merges)
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events, max_batch_entries=2)
    w.start()
    for first in (1, 3, 5):
        w.submit(puts(first, 2))
    sm.release.set()
    assert [completed(events).last_index for _ in range(3)] == [2, 4, 6]
    assert w.shutdown(timeout=WAIT)
    assert sm.calls == [[1, 2], [3, 4], [5, 6]]


def test_thread_is_named_daemon(config: SnapshotConfig, events: queue.Queue[WorkerEvent]) -> None:
    with ApplyWorker(make(config), events) as w:
        thread = w._p.thread
        assert thread is not None
        assert thread.name == "d-engine-sm-apply-1"
        assert thread.daemon
    assert not thread.is_alive()


# -- coalescing --------------------------------------------------------------------
def test_coalescing_preserves_order_and_alignment(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    sm = RecordingSM(block=True)
    handler = make(config, sm)
    w = ApplyWorker(handler, events)
    w.start()
    w.submit(puts(1, 1))
    assert sm.entered.wait(WAIT)
    for first in range(2, 102, 2):  # 50 small batches queue behind the blocked apply
        w.submit(puts(first, 2))
    assert w.queued_entries == 100
    sm.release.set()
    assert w.shutdown(timeout=WAIT)
    got = drain_events(events)
    assert all(isinstance(e, ApplyCompleted) for e in got)
    assert len(sm.calls) == len(got) == 2 < 51
    results = [r for e in got for r in e.results]  # type: ignore[union-attr]
    assert results == [ApplyResult(i, True) for i in range(1, 102)]
    assert [e.last_index for e in got] == [1, 101]  # type: ignore[union-attr]
    assert handler.read_from_state_machine([b"k101"])[0].value == b"v101"  # type: ignore[index]


def test_coalescing_respects_max_batch_entries(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events, max_batch_entries=10)
    w.start()
    w.submit(puts(1, 1))
    assert sm.entered.wait(WAIT)
    for first in range(2, 102, 2):
        w.submit(puts(first, 2))
    w.submit(puts(102, 25))  # bigger than the cap: applied whole, never split
    sm.release.set()
    assert w.shutdown(timeout=WAIT)
    assert [len(c) for c in sm.calls] == [1] + [10] * 10 + [25]
    assert [i for c in sm.calls for i in c] == list(range(1, 127))


# -- back-pressure -----------------------------------------------------------------
def test_back_pressure_blocks_and_times_out(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent], stopper: list[ApplyWorker]
) -> None:
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events, max_queued_entries=10)
    stopper.append(w)
    w.start()
    w.submit(puts(1, 1))
    assert sm.entered.wait(WAIT)  # in flight: not counted as queued
    w.submit(puts(2, 6))
    w.submit(puts(8, 4))
    assert w.queued_entries == 10
    with pytest.raises(SubmitTimeout) as info:
        w.submit(puts(12, 1), timeout=0.05)
    assert info.value.queued == 10
    assert w.queued_entries == 10  # nothing queued by the failed submit

    done = threading.Event()
    errors: list[BaseException] = []

    def blocked_submit() -> None:
        try:
            w.submit(puts(12, 3))
        except BaseException as exc:
            errors.append(exc)
        done.set()

    t = threading.Thread(target=blocked_submit)
    t.start()
    assert not done.wait(0.05)  # still blocked: the bound holds
    assert w.queued_entries == 10
    sm.release.set()
    assert done.wait(WAIT)
    t.join(WAIT)
    assert errors == []
    assert w.shutdown(timeout=WAIT)
    assert w.handler.last_applied() == 14
    assert max(len(c) for c in sm.calls) <= 10


def test_oversized_batch_admitted_when_queue_empty(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    with ApplyWorker(make(config), events, max_queued_entries=10) as w:
        w.submit(puts(1, 25), timeout=0)
        assert completed(events).last_index == 25


def test_shutdown_wakes_blocked_submitter(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent], stopper: list[ApplyWorker]
) -> None:
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events, max_queued_entries=2)
    stopper.append(w)
    w.start()
    w.submit(puts(1, 1))
    assert sm.entered.wait(WAIT)
    w.submit(puts(2, 2))
    outcome: list[BaseException] = []
    t = threading.Thread(target=lambda: _capture(outcome, lambda: w.submit(puts(4, 1))))
    t.start()
    assert w.shutdown(drain=False, timeout=0) is False
    t.join(WAIT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], WorkerStopped)


def _capture(out: list[BaseException], fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:
        out.append(exc)


# -- ordering at submit ------------------------------------------------------------
def test_out_of_order_submits_rejected(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events)
    w.start()
    with pytest.raises(ApplyOrderError, match="expected index 1, got 2"):
        w.submit(puts(2, 1))  # first submit must start at last_applied + 1
    w.submit(puts(1, 2))
    assert sm.entered.wait(WAIT)
    with pytest.raises(ApplyOrderError, match="expected index 3, got 4"):
        w.submit(puts(4, 1))  # gap
    with pytest.raises(ApplyOrderError, match="expected index 3, got 2"):
        w.submit(puts(2, 2))  # overlap
    gapped = puts(3, 1) + puts(5, 1)
    with pytest.raises(ApplyOrderError, match="entry #1 breaks the sequence"):
        w.submit(gapped)
    assert w.queued_entries == 0
    w.submit([])  # empty: ignored
    w.submit(puts(3, 1))
    sm.release.set()
    assert w.shutdown(timeout=WAIT)
    assert [i for c in sm.calls for i in c] == [1, 2, 3]


def test_submit_after_snapshot_install_jump(
    config: SnapshotConfig, tmp_path: Path, events: queue.Queue[WorkerEvent]
) -> None:
    leader_cfg = SnapshotConfig(snapshots_dir=tmp_path / "leader", chunk_size=1024, fsync=False)
    with StateMachineHandler(MemoryStateMachine(), leader_cfg, node_id=2) as leader:
        leader.apply_chunk(puts(1, 20))
        meta, _ = leader.create_snapshot()
        follower = make(config)
        with ApplyWorker(follower, events) as w:
            w.submit(puts(1, 3))
            assert completed(events).last_index == 3
            acks: list[object] = []
            follower.apply_snapshot_stream_from_leader(
                1, leader.load_snapshot_data(meta), acks.append
            )
            assert follower.last_applied() == 20
            with pytest.raises(ApplyOrderError):
                w.submit(puts(22, 1))
            w.submit(puts(21, 2))  # idle: last_applied + 1 is accepted
            assert completed(events).last_index == 22
        assert follower.read_from_state_machine([b"k22", b"k20"]) is not None


def test_queued_entries_covered_by_snapshot_are_dropped(
    config: SnapshotConfig, tmp_path: Path, events: queue.Queue[WorkerEvent]
) -> None:
    # Submit before start (queued), install a snapshot that covers part of it,
    # then start: only the uncovered tail is applied.
    leader_cfg = SnapshotConfig(snapshots_dir=tmp_path / "leader", fsync=False)
    with StateMachineHandler(MemoryStateMachine(), leader_cfg) as leader:
        leader.apply_chunk(puts(1, 10))
        meta, _ = leader.create_snapshot()
        sm = RecordingSM()
        follower = make(config, sm)
        w = ApplyWorker(follower, events)
        w.submit(puts(1, 15))
        follower.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), print)
        w.start()
        assert completed(events).results == [ApplyResult(i, True) for i in range(11, 16)]
        assert w.shutdown(timeout=WAIT)
        assert sm.calls == [list(range(11, 16))]


# -- policy snapshots --------------------------------------------------------------
def test_policy_snapshot_off_apply_thread_and_applies_flow(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent], stopper: list[ApplyWorker]
) -> None:
    sm = SlowSnapshotSM()
    handler = make(config, sm)  # policy: lag >= 1, no cooldown
    w = ApplyWorker(handler, events)
    stopper.append(w)
    w.start()
    w.submit(puts(1, 5), LEADER)
    assert completed(events).last_index == 5
    assert sm.generating.wait(WAIT)
    # The snapshot is stuck generating; applies (with commits) keep flowing.
    for first in range(6, 26, 5):
        w.submit(puts(first, 5), LEADER)
        assert completed(events).last_index == first + 4
    assert handler.snapshot_in_progress()
    sm.release_generate.set()
    created = next_event(events)
    assert isinstance(created, SnapshotCreated)
    assert created.metadata.last_included.index == 5
    assert created.path.exists()
    assert sm.generate_threads == ["d-engine-sm-snapshot-1_0"]
    assert sm.apply_threads == {"d-engine-sm-apply-1"}
    assert w.shutdown(timeout=WAIT)


def test_at_most_one_policy_snapshot_and_shutdown_waits(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    sm = SlowSnapshotSM()
    w = ApplyWorker(make(config, sm), events)
    w.start()
    w.submit(puts(1, 1), LEADER)
    assert sm.generating.wait(WAIT)
    w.submit(puts(2, 1), LEADER)
    assert completed(events).last_index == 1
    assert completed(events).last_index == 2
    assert w.shutdown(timeout=0.05) is False  # the snapshot still runs
    sm.release_generate.set()
    assert w.shutdown(timeout=WAIT) is True
    rest = drain_events(events)
    assert [type(e) for e in rest] == [SnapshotCreated]
    assert len(sm.generate_threads) == 1


def test_policy_snapshot_failure_is_not_fatal(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    with ApplyWorker(make(config, BrokenSnapshotSM()), events) as w:
        w.submit(puts(1, 2), LEADER)
        assert completed(events).last_index == 2
        failed = next_event(events)
        assert isinstance(failed, SnapshotFailed)
        assert isinstance(failed.error, SnapshotError)
        w.submit(puts(3, 1))
        assert completed(events).last_index == 3
        assert not w.failed


def test_no_snapshot_without_commit(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    with ApplyWorker(make(config), events) as w:
        w.submit(puts(1, 5))
    assert [type(e) for e in drain_events(events)] == [ApplyCompleted]


# -- callbacks ---------------------------------------------------------------------
def test_on_event_exception_logged_worker_continues(
    config: SnapshotConfig, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[WorkerEvent] = []
    got = [threading.Event(), threading.Event()]

    def on_event(event: WorkerEvent) -> None:
        seen.append(event)
        got[len(seen) - 1].set()
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    with ApplyWorker(make(config), on_event) as w:
        w.submit(puts(1, 1))
        assert got[0].wait(WAIT)
        w.submit(puts(2, 1))
        assert got[1].wait(WAIT)
    assert [e.last_index for e in seen] == [1, 2]  # type: ignore[union-attr]
    assert any("on_event failed" in r.getMessage() for r in caplog.records)


def test_on_event_simple_queue(config: SnapshotConfig) -> None:
    sink: queue.SimpleQueue[WorkerEvent] = queue.SimpleQueue()
    with ApplyWorker(make(config), sink) as w:
        w.submit(puts(1, 3))
    event = sink.get(timeout=WAIT)
    assert isinstance(event, ApplyCompleted)
    assert event.last_index == 3


def test_on_event_asyncio_queue_rejected(config: SnapshotConfig) -> None:
    with pytest.raises(TypeError, match="AsyncApplyWorker"):
        ApplyWorker(make(config), asyncio.Queue())
    with pytest.raises(TypeError, match="on_event"):
        ApplyWorker(make(config), 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch_entries"):
        ApplyWorker(make(config), print, max_batch_entries=0)


# -- shutdown ----------------------------------------------------------------------
def test_shutdown_no_drain_discards(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="d_engine_sm.worker")  # a requested discard: INFO
    sm = RecordingSM(block=True)
    handler = make(config, sm)
    w = ApplyWorker(handler, events)
    w.start()
    w.submit(puts(1, 1))
    assert sm.entered.wait(WAIT)
    w.submit(puts(2, 1))
    w.submit(puts(3, 4))
    assert w.shutdown(drain=False, timeout=0) is False
    sm.release.set()
    assert w.shutdown(drain=False, timeout=WAIT) is True
    assert [e.last_index for e in drain_events(events)] == [1]  # type: ignore[union-attr]
    assert handler.last_applied() == 1
    assert any("entries=5" in r.getMessage() for r in caplog.records)


def test_drain_cut_short_by_no_drain(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events, max_batch_entries=1)
    w.start()
    w.submit(puts(1, 1))
    assert sm.entered.wait(WAIT)
    w.submit(puts(2, 1))
    assert w.shutdown(drain=True, timeout=0) is False
    assert w.shutdown(drain=False, timeout=0) is False
    sm.release.set()
    assert w.shutdown(timeout=WAIT)
    assert sm.calls == [[1]]


def test_shutdown_idempotent_and_final(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    w = ApplyWorker(make(config), events)
    w.start()
    w.start()  # idempotent
    w.submit(puts(1, 1))
    assert w.shutdown()
    assert w.shutdown()
    assert w.shutdown(drain=False, timeout=0)
    with pytest.raises(WorkerStopped, match="shut down"):
        w.submit(puts(2, 1))
    with pytest.raises(WorkerStopped):
        w.start()
    assert completed(events).last_index == 1


def test_submit_before_start_then_drain(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    handler = make(config)
    w = ApplyWorker(handler, events)
    w.submit(puts(1, 2))
    w.submit(puts(3, 2))
    assert w.shutdown(drain=True, timeout=WAIT)
    assert handler.last_applied() == 4


def test_shutdown_from_on_event_does_not_deadlock(config: SnapshotConfig) -> None:
    results: list[bool] = []
    done = threading.Event()
    holder: list[ApplyWorker] = []

    def on_event(event: WorkerEvent) -> None:
        results.append(holder[0].shutdown(timeout=WAIT))
        done.set()

    w = ApplyWorker(make(config), on_event)
    holder.append(w)
    w.start()
    w.submit(puts(1, 1))
    assert done.wait(WAIT)
    assert results == [False]
    assert w.shutdown(timeout=WAIT)


def test_handler_closed_is_fatal(config: SnapshotConfig, events: queue.Queue[WorkerEvent]) -> None:
    handler = make(config)
    handler.close()
    w = ApplyWorker(handler, events)
    w.start()
    w.submit(puts(1, 1))
    event = next_event(events)
    assert isinstance(event, FatalError)
    assert event.source == "ApplyWorker"
    assert isinstance(event.error, HandlerClosed)
    with pytest.raises(WorkerStopped):
        w.submit(puts(2, 1))
    assert w.shutdown(timeout=WAIT)


def test_collected_worker_drains_and_thread_exits(config: SnapshotConfig) -> None:
    handler = make(config)
    w = ApplyWorker(handler, lambda e: None)
    w.start()
    w.submit(puts(1, 10))
    thread = w._p.thread
    assert thread is not None
    del w
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert handler.last_applied() == 10


def test_atexit_hook_drains_live_workers(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import atexit, sys, time
        from pathlib import Path
        out = Path(sys.argv[1])
        state = {}
        # registered before the library's hook, so it runs after it (LIFO)
        atexit.register(lambda: out.write_text(str(state["h"].last_applied())))
        from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler, _kv
        from d_engine_sm._worker import ApplyWorker

        class Slow(MemoryStateMachine):
            def apply_chunk(self, entries):
                time.sleep(0.005)  # make work outlive the main thread
                return super().apply_chunk(entries)

        h = StateMachineHandler(Slow(), SnapshotConfig(snapshots_dir=out.parent / "s"))
        state["h"] = h
        w = ApplyWorker(h, lambda e: None, max_batch_entries=1)
        w.start()
        for i in range(1, 51):
            w.submit([_kv.command_entry(i, 1, _kv.insert(b"k", b"v"))])
        # exit without shutdown
        """
    )
    out = tmp_path / "applied.txt"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        check=False,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "50"


# -- a policy snapshot that meets another writer ---------------------------------------
CRASH_CHILD = Path(__file__).with_name("crash_child.py")


def test_snapshot_skipped_for_another_process_then_retried(
    tmp_path: Path, events: queue.Queue[WorkerEvent]
) -> None:
    directory = tmp_path / "shared"
    holder = subprocess.Popen(  # another process sits inside a create: .lock held
        [sys.executable, str(CRASH_CHILD), "hold", str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        # A cooldown of an hour: a skip that started it would block every retry below.
        cfg = SnapshotConfig(
            snapshots_dir=directory,
            max_log_entries_before_snapshot=10,
            snapshot_cool_down_since_last_check=3600,
            fsync=False,
        )
        with ApplyWorker(make(cfg, MemoryStateMachine()), events) as w:
            for first in (1, 21):  # each batch past the threshold tries, and is skipped
                w.submit(puts(first, 20), LEADER)
                assert isinstance(next_event(events), ApplyCompleted)
                skipped = next_event(events)
                assert isinstance(skipped, SnapshotSkipped), skipped
                assert ".lock" in skipped.reason
            assert w.handler.get_latest_snapshot_metadata() is None
            holder.communicate("go\n", timeout=WAIT)  # the other writer finishes and exits
            assert holder.returncode == 0
            w.submit(puts(41, 20), LEADER)
            assert isinstance(next_event(events), ApplyCompleted)
            created = next_event(events)
            assert isinstance(created, SnapshotCreated), created
            assert created.metadata.last_included.index == 60
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(WAIT)


# -- Ctrl-C inside shutdown ------------------------------------------------------------
def test_interrupt_inside_a_draining_shutdown_stops_now_and_waits(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    sm = RecordingSM(block=True)
    w = ApplyWorker(make(config, sm), events, max_batch_entries=10)
    w.start()
    for first in range(1, 100, 10):
        w.submit(puts(first, 10))
    assert sm.entered.wait(WAIT)  # batch 1-10 in flight, 90 entries queued
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main

    def interrupt() -> None:
        p = w._p
        with p.cond:  # shutdown(drain=True) has begun: state set before it waits
            assert p.cond.wait_for(lambda: p.state == "draining", WAIT)
        signal.pthread_kill(main, signal.SIGINT)  # KeyboardInterrupt in the main thread
        with p.cond:  # the interrupt turned the drain into a stop
            assert p.cond.wait_for(lambda: p.state == "stopping", WAIT), p.state
        sm.release.set()

    helper = threading.Thread(target=interrupt)
    helper.start()
    with pytest.raises(KeyboardInterrupt):
        w.shutdown(drain=True)
    helper.join(WAIT)
    # It returned only after the batch in flight: nothing runs, the rest was discarded.
    assert w._p.thread is not None and not w._p.thread.is_alive()
    assert sm.calls == [list(range(1, 11))]
    assert w.handler.last_applied() == 10
    assert w.shutdown(timeout=WAIT)


def test_an_interrupt_just_after_the_lock_is_taken_leaves_it_free(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    """Ctrl-C's KeyboardInterrupt can land on the main thread between any two
    bytecodes; inside ``Condition.__enter__`` (a Python frame) that is after the
    lock is taken but before a ``with`` block owns it, and the lock stays held.
    The calls a caller's thread makes must not enter the lock that way."""
    w = ApplyWorker(make(config, MemoryStateMachine()), events)
    w.start()

    class InterruptedOnEnter(threading.Condition):
        def __enter__(self) -> bool:
            entered = super().__enter__()
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt  # as if SIGINT's handler ran just here
            return entered

    w._p.cond.__class__ = InterruptedOnEnter
    try:
        w.submit(puts(1, 5))
        w.submit(puts(6, 5))
        assert w.shutdown(drain=True, timeout=WAIT)
    except KeyboardInterrupt:  # not raised out of the test: pytest would stop the run
        pytest.fail("interrupted inside Condition.__enter__: the worker's lock is left held")
    assert w.handler.last_applied() == 10
