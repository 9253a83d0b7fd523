"""The ApplyWorker's state and its apply thread (theory of operation: ``_worker``)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import weakref
from collections import deque
from typing import Any, Final, NamedTuple

from d_engine_sm._events import (
    ApplyCompleted,
    EventFn,
    FatalError,
    SnapshotCreated,
    SnapshotFailed,
    SnapshotSkipped,
    WorkerEvent,
)
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._values import ApplyResult, NewCommitData
from d_engine_sm.errors import (
    ApplyError,
    ApplyOrderError,
    HandlerClosed,
    SnapshotInProgress,
    SubmitTimeout,
    WorkerStopped,
)
from d_engine_sm.proto import common_pb2

_log = logging.getLogger("d_engine_sm.worker")

NEW: Final = "new"
RUNNING: Final = "running"
DRAINING: Final = "draining"
STOPPING: Final = "stopping"
FAILED: Final = "failed"
FORKED: Final = "forked"  # inherited by a forked child: its threads are gone


class Batch(NamedTuple):
    """Entries to apply, in log order, and the commit data that came with them."""

    entries: list[common_pb2.Entry]
    commit: NewCommitData | None


class Pipeline:
    """The queue and state an ``ApplyWorker`` shares with its apply thread; guarded by ``cond``."""

    def __init__(
        self,
        handler: StateMachineHandler,
        sink: EventFn,
        max_batch_entries: int,
        max_queued_entries: int,
        snapshot_workers: int,
    ) -> None:
        self.handler = handler
        self.sink = sink
        self.max_batch = max_batch_entries
        self.max_queued = max_queued_entries
        self.snapshot_workers = snapshot_workers
        # Callers' threads enter ``lock`` itself, not ``cond``: Condition.__enter__ is a
        # Python frame, and a KeyboardInterrupt raised there just after the acquire
        # (Ctrl-C on the main thread) would leave the lock held with no owner.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.queue: deque[Batch] = deque()
        self.queued = 0
        self.in_flight = False
        self.next_index: int | None = None  # last submitted index + 1
        self.state = NEW
        self.thread: threading.Thread | None = None
        self.thread_done = False  # the apply loop returned (set under cond, last thing it does)
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.snapshot_running = False
        self.snapshot_thread: int | None = None

    # -- submit side ---------------------------------------------------------
    def check_order(self, first: int) -> None:
        """Raise ApplyOrderError unless ``first`` continues the log. Lock held."""
        if first == self.next_index:
            return
        applied_next = self.handler.last_applied() + 1
        # Idle (nothing queued or applying): last_applied + 1 is accepted too,
        # for the first submit and after a snapshot install jumped last_applied.
        idle = not self.queue and not self.in_flight
        if idle and first == applied_next:
            return
        expected = self.next_index if self.next_index is not None else applied_next
        detail = "batch does not continue the last submitted one"
        if idle and expected != applied_next:
            detail += f" (or last_applied + 1 = {applied_next})"
        raise ApplyOrderError(expected, first, detail)

    def submit(self, batch: Batch, timeout: float | None) -> None:
        """Queue ``batch``, waiting up to ``timeout`` for room. Blocks; thread-safe."""
        entries = batch.entries
        first, n = entries[0].index, len(entries)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self._check_accepting()
            self.check_order(first)  # fail fast, before waiting for room

            def has_room() -> bool:
                if self.state not in (NEW, RUNNING):
                    return True  # wake up to raise WorkerStopped
                return self.queued == 0 or self.queued + n <= self.max_queued

            if not has_room():
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self.cond.wait_for(has_room, remaining):
                    raise SubmitTimeout(timeout if timeout is not None else 0.0, self.queued)
                self._check_accepting()
                self.check_order(first)  # another submitter may have gone first
            self.queue.append(batch)
            self.queued += n
            self.next_index = entries[-1].index + 1
            self.cond.notify_all()

    def _check_accepting(self) -> None:
        if self.state == FORKED:
            raise WorkerStopped(
                "apply worker was started in the parent process before os.fork(); "
                "create a new one in the child"
            )
        if self.state == FAILED:
            raise WorkerStopped("apply worker stopped after a fatal state machine error")
        if self.state not in (NEW, RUNNING):
            raise WorkerStopped("apply worker is shut down")

    # -- apply thread side ---------------------------------------------------
    def next_batch(self) -> Batch | None:
        """Block for work; coalesce queued batches. None: the thread must exit."""
        with self.cond:
            self.cond.wait_for(lambda: bool(self.queue) or self.state not in (NEW, RUNNING))
            if self.state in (STOPPING, FAILED) or not self.queue:
                self._discard_locked()
                return None
            first = self.queue.popleft()
            entries, commit, count = first.entries, first.commit, len(first.entries)
            if self.queue and count + len(self.queue[0].entries) <= self.max_batch:
                entries = list(entries)  # never extend the caller's batch in place
                while self.queue and count + len(self.queue[0].entries) <= self.max_batch:
                    more = self.queue.popleft()
                    entries.extend(more.entries)
                    count += len(more.entries)
                    if more.commit is not None:
                        commit = more.commit
            self.queued -= count
            self.in_flight = True
            self.cond.notify_all()  # room for blocked submitters
        return Batch(entries, commit)

    def _discard_locked(self) -> None:
        if self.queued:
            # Asked for by shutdown(drain=False): info; after a failure: a warning.
            level = logging.WARNING if self.state == FAILED else logging.INFO
            _log.log(
                level,
                "apply worker stopped; discarded batches=%d entries=%d",
                len(self.queue),
                self.queued,
            )
        self.queue.clear()
        self.queued = 0
        self.cond.notify_all()

    def apply(self, batch: Batch) -> bool:
        """Apply one coalesced batch and emit its event; False when the worker failed."""
        try:
            results, entries = self._apply_trimmed(batch.entries)
        except ApplyError as exc:
            _log.exception("state machine failed; apply worker stopping")
            self._fail("StateMachine", exc)
            return False
        except HandlerClosed as exc:  # closed under the worker: a shutdown order problem
            _log.warning("handler closed under the apply worker; stopping")
            self._fail("ApplyWorker", exc)
            return False
        except Exception as exc:
            _log.exception("apply worker failed unexpectedly; stopping")
            self._fail("ApplyWorker", exc)
            return False
        if entries:
            self.emit(ApplyCompleted(entries[-1].index, results))
            if batch.commit is not None:
                self._maybe_snapshot(batch.commit)
        with self.cond:
            self.in_flight = False
            self.cond.notify_all()
        return True

    def _apply_trimmed(
        self, entries: list[common_pb2.Entry]
    ) -> tuple[list[ApplyResult], list[common_pb2.Entry]]:
        while True:
            # Entries at or below last_applied are covered by an installed snapshot.
            applied = self.handler.last_applied()
            if entries and entries[0].index <= applied:
                skipped = min(len(entries), applied - entries[0].index + 1)
                _log.debug("skipping entries covered by a snapshot count=%d", skipped)
                entries = entries[skipped:]
            if not entries:
                return [], entries
            try:
                return self.handler.apply_chunk(entries), entries
            except ApplyOrderError:
                # A snapshot install jumped last_applied between the trim and the
                # apply: trim again (each retry drops at least one entry, so this
                # ends); any other order problem is a bug.
                if self.handler.last_applied() < entries[0].index:
                    raise

    def _fail(self, source: str, exc: BaseException) -> None:
        with self.cond:
            self.state = FAILED
            self.in_flight = False
            self._discard_locked()
        self.emit(FatalError(source, exc))

    def emit(self, event: WorkerEvent) -> None:
        """Deliver ``event`` to the sink; a failing sink is logged, never raised."""
        try:
            self.sink(event)
        except Exception:
            _log.exception("on_event failed event=%s", type(event).__name__)

    # -- policy snapshots ----------------------------------------------------
    def _maybe_snapshot(self, commit: NewCommitData) -> None:
        with self.cond:
            if self.snapshot_running or self.state in (STOPPING, FAILED):
                return
        try:
            wanted = self.handler.should_snapshot(commit)
        except Exception:
            _log.exception("should_snapshot failed")
            return
        if not wanted:
            return
        with self.cond:
            self.snapshot_running = True  # only this (the apply) thread sets it
            if self.executor is None:
                self.executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.snapshot_workers,
                    thread_name_prefix=f"d-engine-sm-snapshot-{self.handler.node_id}",
                )
            executor = self.executor
        try:
            executor.submit(self._snapshot_job)
        except RuntimeError:  # interpreter shutting down: no new threads
            _log.debug("snapshot not started: executor is shut down")
            self._snapshot_done()

    def _snapshot_job(self) -> None:
        with self.cond:
            self.snapshot_thread = threading.get_ident()
        try:
            event = self._policy_snapshot()
            with self.cond:
                # Before the event: whoever reacts to it may submit a batch that
                # triggers the next snapshot (shutdown still sees this thread).
                self.snapshot_running = False
                self.cond.notify_all()
            if event is not None:
                self.emit(event)
        finally:
            self._snapshot_done()

    def _policy_snapshot(self) -> WorkerEvent | None:
        try:
            meta, path = self.handler.create_snapshot()
        except SnapshotInProgress as exc:
            _log.info("policy snapshot skipped reason=%s", exc)
            return SnapshotSkipped(str(exc))
        except HandlerClosed:
            _log.debug("policy snapshot not taken: handler closed")
            return None
        except Exception as exc:
            _log.warning("policy snapshot failed error=%s", exc, exc_info=True)
            return SnapshotFailed(exc)
        return SnapshotCreated(meta, path)

    def _snapshot_done(self) -> None:
        with self.cond:
            self.snapshot_running = False
            self.snapshot_thread = None
            self.cond.notify_all()

    # -- lifecycle -----------------------------------------------------------
    def after_fork_in_child(self) -> None:
        """Stopped, with a fresh lock: the apply and snapshot threads (and any
        lock they held) exist only in the parent."""
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.state = FORKED
        self.queue.clear()
        self.queued = 0
        self.in_flight = self.snapshot_running = False
        self.thread_done = True
        self.snapshot_thread = None
        self.executor = None

    def abandon(self) -> None:
        """The facade was garbage-collected: drain what was submitted, then exit."""
        with self.cond:
            if self.state == RUNNING:
                self.state = DRAINING
                self.cond.notify_all()


def apply_loop(owner: weakref.ReferenceType[Any], pipeline: Pipeline) -> None:
    """The apply thread's body: take batches and apply them until shutdown."""
    name = threading.current_thread().name
    _log.info("apply worker started thread=%s", name)
    try:
        while True:
            batch = pipeline.next_batch()
            if batch is None or not pipeline.apply(batch):
                break
            del batch  # hold no entries while blocked on the next wait
    except BaseException as exc:  # SystemExit from the state machine, say
        _log.exception("apply worker thread crashed thread=%s", name)
        with pipeline.cond:
            pipeline.state = FAILED
            pipeline.in_flight = False
            pipeline._discard_locked()
        pipeline.emit(FatalError("ApplyWorker", exc))  # whoever waits on events learns it
        raise
    finally:
        _log.info("apply worker exited thread=%s owner_alive=%s", name, owner() is not None)
        with pipeline.cond:
            pipeline.thread_done = True
            pipeline.cond.notify_all()
