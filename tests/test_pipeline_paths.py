"""ApplyWorker's pipeline off the common path: snapshot installs racing the apply
thread, unexpected errors, a crashed apply thread, and policy snapshots that
cannot start or find the handler closed."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._values import ApplyResult, NewCommitData
from d_engine_sm._worker import (
    ApplyCompleted,
    ApplyWorker,
    FatalError,
    SnapshotCreated,
    SnapshotFailed,
    WorkerEvent,
)
from d_engine_sm.errors import ApplyOrderError, WorkerStopped
from d_engine_sm.proto import common_pb2, storage_pb2

WAIT = 10.0
LEADER = NewCommitData(new_commit_index=0, role=common_pb2.NODE_ROLE_LEADER, current_term=1)
Chunks = list[storage_pb2.SnapshotChunk]


def next_event(events: queue.Queue[WorkerEvent]) -> WorkerEvent:
    return events.get(timeout=WAIT)


def rest(events: queue.Queue[WorkerEvent]) -> list[WorkerEvent]:
    found = []
    while not events.empty():
        found.append(events.get_nowait())
    return found


@pytest.fixture
def events() -> queue.Queue[WorkerEvent]:
    return queue.Queue()


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Chunks]]:
    """A leader's snapshots at indexes 20 and 25, as chunk lists to install."""
    config = SnapshotConfig(
        snapshots_dir=tmp_path_factory.mktemp("leader"), fsync=False, cleanup_retain_count=5
    )
    found: dict[int, Chunks] = {}
    with StateMachineHandler(MemoryStateMachine(), config, node_id=9) as leader:
        for first, count in ((1, 20), (21, 5)):
            leader.apply_chunk(puts(first, count))
            meta, _ = leader.create_snapshot()
            found[meta.last_included.index] = list(leader.load_snapshot_data(meta))
        yield found


def install(handler: StateMachineHandler, chunks: Chunks) -> None:
    handler.apply_snapshot_stream_from_leader(1, chunks, lambda _: None)


def racing(
    handler: StateMachineHandler, monkeypatch: pytest.MonkeyPatch, jumps: list[Callable[[], None]]
) -> list[list[int]]:
    """Run one jump of last_applied (an install) just before each of the next apply calls,
    as if it won the race between the worker's trim and its apply; returns the calls."""
    real = handler.apply_chunk
    calls: list[list[int]] = []

    def apply_chunk(entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        calls.append([e.index for e in entries])
        if jumps:
            jumps.pop(0)()
        return real(entries)

    monkeypatch.setattr(handler, "apply_chunk", apply_chunk)
    return calls


# -- installs racing the apply thread ---------------------------------------------------
def test_an_install_between_trim_and_apply_is_trimmed_again(
    config: SnapshotConfig,
    events: queue.Queue[WorkerEvent],
    snapshots: dict[int, Chunks],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as follower:
        calls = racing(follower, monkeypatch, [lambda: install(follower, snapshots[20])])
        with ApplyWorker(follower, events) as w:
            w.submit(puts(1, 24))
            event = next_event(events)
        assert isinstance(event, ApplyCompleted)
        assert event.last_index == 24
        assert event.results == [ApplyResult(i, True) for i in range(21, 25)]
        assert calls == [list(range(1, 25)), list(range(21, 25))]
        assert follower.last_applied() == 24 and not w.failed


def test_installs_winning_the_race_twice_are_trimmed_each_time(
    config: SnapshotConfig,
    events: queue.Queue[WorkerEvent],
    snapshots: dict[int, Chunks],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as follower:
        jumps = [lambda: install(follower, snapshots[20]), lambda: install(follower, snapshots[25])]
        calls = racing(follower, monkeypatch, jumps)
        with ApplyWorker(follower, events) as w:
            w.submit(puts(1, 30))
            event = next_event(events)
        assert isinstance(event, ApplyCompleted), event
        assert event.results == [ApplyResult(i, True) for i in range(26, 31)]
        assert calls == [list(range(1, 31)), list(range(21, 31)), list(range(26, 31))]
        assert follower.last_applied() == 30 and not w.failed
        assert rest(events) == []


def test_a_batch_an_install_covers_whole_is_dropped_without_an_event(
    config: SnapshotConfig,
    events: queue.Queue[WorkerEvent],
    snapshots: dict[int, Chunks],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as follower:
        calls = racing(follower, monkeypatch, [lambda: install(follower, snapshots[25])])
        w = ApplyWorker(follower, events)
        w.submit(puts(1, 10))
        w.submit(puts(11, 3))  # queued before start: coalesced into one apply call
        w.start()
        assert w.shutdown(timeout=WAIT)
        assert calls == [list(range(1, 14))]  # nothing left to apply after the trim
        assert follower.last_applied() == 25
        assert rest(events) == []  # no ApplyCompleted for entries applied by nobody
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as follower:
        install(follower, snapshots[20])
        with ApplyWorker(follower, events) as w:
            w.submit(puts(21, 2))  # idle at the jump: last_applied + 1 continues
            event = next_event(events)
        assert isinstance(event, ApplyCompleted) and event.last_index == 22


# -- errors that stop the worker -----------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("a bug in the handler"),
        ApplyOrderError(7, 1, "order broken from outside"),
    ],
    ids=["unexpected", "order-broken"],
)
def test_an_unexpected_error_stops_the_worker_with_a_fatal_event(
    config: SnapshotConfig,
    events: queue.Queue[WorkerEvent],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as handler:

        def apply_chunk(entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
            raise error

        monkeypatch.setattr(handler, "apply_chunk", apply_chunk)
        w = ApplyWorker(handler, events)
        w.start()
        w.submit(puts(1, 3))
        event = next_event(events)
        assert isinstance(event, FatalError)
        assert event.source == "ApplyWorker" and event.error is error
        assert w.failed
        with pytest.raises(WorkerStopped, match="fatal state machine error"):
            w.submit(puts(4, 1))
        assert w.shutdown(timeout=WAIT)
        assert handler.last_applied() == 0
    assert "apply worker failed unexpectedly; stopping" in caplog.text


class _Exiting(MemoryStateMachine):
    """Calls sys.exit() (a BaseException) while applying its second batch."""

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        if entries[0].index > 1:
            raise SystemExit(3)
        return super().apply_chunk(entries)


def test_a_crashed_apply_thread_fails_the_worker_and_says_so(
    config: SnapshotConfig,
    events: queue.Queue[WorkerEvent],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    with StateMachineHandler(_Exiting(), config, node_id=1) as handler:
        w = ApplyWorker(handler, events)
        w.start()
        w.submit(puts(1, 1))
        assert isinstance(next_event(events), ApplyCompleted)
        w.submit(puts(2, 2))
        event = next_event(events)
        assert isinstance(event, FatalError)
        assert event.source == "ApplyWorker"
        assert isinstance(event.error, SystemExit) and event.error.code == 3
        assert w.shutdown(timeout=WAIT)  # the thread is gone; nothing to wait for
        assert w.failed and w.queued_entries == 0
        with pytest.raises(WorkerStopped, match="fatal"):
            w.submit(puts(2, 1))
        assert handler.last_applied() == 1
    assert escaped == [event.error]  # still raised: the thread ends as it would
    assert "apply worker thread crashed" in caplog.text


# -- policy snapshots --------------------------------------------------------------------
def test_a_policy_snapshot_that_cannot_start_is_dropped_quietly(
    config: SnapshotConfig, events: queue.Queue[WorkerEvent]
) -> None:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as handler:
        w = ApplyWorker(handler, events)
        # The snapshot pool refuses work, as at interpreter shutdown.
        gone = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        gone.shutdown()
        w._p.executor = gone
        w.start()
        w.submit(puts(1, 3), LEADER)
        w.submit(puts(4, 2), LEADER)
        assert w.shutdown(timeout=WAIT)  # no snapshot left "running"
        found = rest(events)
        assert [type(e) for e in found] == [ApplyCompleted] * len(found)
        assert isinstance(found[-1], ApplyCompleted) and found[-1].last_index == 5
        assert handler.get_latest_snapshot_metadata() is None
        assert not config.snapshots_dir.exists() or not any(config.snapshots_dir.iterdir())


def test_a_policy_snapshot_finding_the_handler_closed_reports_nothing(
    config: SnapshotConfig, caplog: pytest.LogCaptureFixture
) -> None:
    handler = StateMachineHandler(MemoryStateMachine(), config, node_id=1)
    seen: queue.Queue[WorkerEvent] = queue.Queue()

    def on_event(event: WorkerEvent) -> None:
        seen.put(event)
        if isinstance(event, ApplyCompleted):
            handler.close()  # a shutdown-order mistake: the handler goes first

    caplog.set_level(logging.DEBUG, logger="d_engine_sm.worker")
    w = ApplyWorker(handler, on_event)
    w.start()
    w.submit(puts(1, 2), LEADER)
    assert isinstance(next_event(seen), ApplyCompleted)
    assert w.shutdown(timeout=WAIT)  # waits for the policy snapshot job too
    assert not any(isinstance(e, (SnapshotCreated, SnapshotFailed)) for e in rest(seen))
    assert "policy snapshot not taken: handler closed" in caplog.text
    assert not config.snapshots_dir.exists() or not any(config.snapshots_dir.iterdir())
