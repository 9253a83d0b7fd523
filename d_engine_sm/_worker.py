"""ApplyWorker: the apply pipeline a Raft commit loop feeds.

Theory of operation
-------------------
``ApplyWorker`` is a thin facade over ``_pipeline.Pipeline``, which holds all
state and runs the apply thread (``apply_loop``); events live in ``_events``.
The apply thread holds the pipeline strongly and the facade only through a
weakref (CPython ``concurrent.futures`` style), so a forgotten worker can be
collected; its weakref callback asks the thread to drain and exit.

``Pipeline.cond`` guards the queue of submitted batches, the queued-entry
count, the next expected index, the lifecycle state and the snapshot flag.
It is never held while the handler applies, while a snapshot runs, or while
``on_event`` runs. States::

    NEW -> RUNNING -> DRAINING -> (thread exits)      shutdown(drain=True)
                   -> STOPPING -> (thread exits)      shutdown(drain=False)
                   -> FAILED                          the state machine failed
    any            -> FORKED                          in a child after os.fork()

Only NEW and RUNNING accept ``submit``; FAILED is final ("failed stays
failed"). Policy snapshots run on a small ThreadPoolExecutor, at most one at
a time (``snapshot_running``), never on the apply thread. ``shutdown``
waits on ``cond`` for ``thread_done`` (set last by the apply loop), not with
``Thread.join`` alone, so that a ``KeyboardInterrupt`` cannot make it return
while the thread still applies.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Final

from d_engine_sm._events import (
    ApplyCompleted,
    EventFn,
    FatalError,
    HasPut,
    SnapshotCreated,
    SnapshotFailed,
    SnapshotSkipped,
    WorkerEvent,
    event_sink,
)
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._pipeline import (
    DRAINING,
    FAILED,
    NEW,
    RUNNING,
    STOPPING,
    Batch,
    Pipeline,
    apply_loop,
)
from d_engine_sm._values import NewCommitData
from d_engine_sm.errors import (
    ApplyOrderError,
    WorkerStopped,
)
from d_engine_sm.proto import common_pb2

_log = logging.getLogger("d_engine_sm.worker")

DEFAULT_MAX_BATCH: Final = 2_000
ATEXIT_DRAIN_TIMEOUT: Final = 10.0  # seconds, shared by all live workers
SIGNAL_SLICE: Final = 0.2  # seconds: how late a main thread waiting in shutdown sees Ctrl-C


# -- the public facade -------------------------------------------------------------
class ApplyWorker:
    """Applies committed entries on its own thread, strictly in log order.

    Queued batches are coalesced into one ``apply_chunk`` call of up to
    ``max_batch_entries`` (a single larger batch is applied whole). Emits
    :class:`ApplyCompleted` per apply call, :class:`FatalError` when the state
    machine fails (then stops: ``submit`` raises ``WorkerStopped``),
    :class:`SnapshotCreated` / :class:`SnapshotFailed` / :class:`SnapshotSkipped`
    for policy snapshots, which run on a small thread pool, never on the
    apply thread.

    All methods are thread-safe. ``on_event`` is called with no lock held, on
    the apply thread or a snapshot thread; it must be quick (a ``queue.Queue``
    with a ``maxsize`` blocks the apply thread when full). Its exceptions are
    logged and never stop the worker.

    Args:
        handler: the handler whose ``apply_chunk`` is driven.
        on_event: a callable taking an event, or any object with ``put``
            (``queue.Queue``, ``queue.SimpleQueue``).
        max_batch_entries: the most entries coalesced into one apply call
            (a larger batch submitted whole is applied whole). The default is
            where per-entry apply cost bottoms out: bigger batches lose to
            cache misses (measured: 1-2k entries best, 10k about 15% slower).
        max_queued_entries: back-pressure bound on submitted, unapplied entries.
        snapshot_workers: threads of the snapshot pool.

    Raises:
        TypeError: bad ``handler`` or ``on_event``.
        ValueError: a limit below 1.
    """

    def __init__(
        self,
        handler: StateMachineHandler,
        on_event: EventFn | HasPut,
        *,
        max_batch_entries: int = DEFAULT_MAX_BATCH,
        max_queued_entries: int = 100_000,
        snapshot_workers: int = 1,
    ) -> None:
        if not isinstance(handler, StateMachineHandler):
            raise TypeError("handler must be a StateMachineHandler")
        for name, value in (
            ("max_batch_entries", max_batch_entries),
            ("max_queued_entries", max_queued_entries),
            ("snapshot_workers", snapshot_workers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._p = Pipeline(
            handler, event_sink(on_event), max_batch_entries, max_queued_entries, snapshot_workers
        )

    @property
    def handler(self) -> StateMachineHandler:
        """The handler this worker applies to. Non-blocking."""
        return self._p.handler

    @property
    def queued_entries(self) -> int:
        """Entries submitted and not yet taken by the apply thread."""
        return self._p.queued

    @property
    def failed(self) -> bool:
        """True once a fatal error stopped the worker."""
        return self._p.state == FAILED

    def start(self) -> None:
        """Start the apply thread. Idempotent; non-blocking.

        Raises:
            WorkerStopped: the worker was already shut down.
        """
        p = self._p
        with p.lock:  # not p.cond: see Pipeline.lock
            if p.state != NEW:
                if p.state == RUNNING:
                    return
                raise WorkerStopped("apply worker is shut down; create a new one")
            p.state = RUNNING
            self._start_thread_locked()
        _live_workers.add(self)

    def _start_thread_locked(self) -> None:
        p = self._p
        pipeline = p
        owner = weakref.ref(self, lambda _ref: pipeline.abandon())
        p.thread = threading.Thread(
            target=apply_loop,
            args=(owner, p),
            name=f"d-engine-sm-apply-{p.handler.node_id}",
            daemon=True,
        )
        p.thread.start()

    def submit(
        self,
        entries: Iterable[common_pb2.Entry],
        commit: NewCommitData | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Queue committed entries for applying.

        Blocks while the queue is full (``max_queued_entries``; a batch larger
        than the bound is admitted once the queue is empty). May be called
        before :meth:`start` (the batch waits for the thread). An empty batch
        is ignored, its ``commit`` too.

        Args:
            entries: contiguous entries continuing the last submitted batch
                (or starting at ``handler.last_applied() + 1`` while the
                worker is idle).
            commit: the commit data that made these entries committed; after
                the batch is applied the worker asks ``should_snapshot`` with it.
            timeout: seconds to wait for room; None waits indefinitely.

        Raises:
            ApplyOrderError: a gap or overlap; nothing was queued.
            SubmitTimeout: no room within ``timeout``.
            WorkerStopped: the worker is shut down or failed.
        """
        if commit is not None and not isinstance(commit, NewCommitData):
            raise TypeError(f"commit must be NewCommitData or None, got {type(commit).__name__}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        batch = list(entries)
        if not batch:
            return
        _check_contiguous(batch)
        self._p.submit(Batch(batch, commit), timeout)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop the worker; idempotent.

        With ``drain`` every batch already submitted is applied first; without
        it the worker stops after the batch in flight and discards the rest
        (the count is logged). Also waits for a running policy snapshot. A
        later call with ``drain=False`` cuts a drain short. Blocking (bounded
        by ``timeout``); called from ``on_event`` it does not wait.

        Args:
            drain: apply everything already submitted before stopping.
            timeout: seconds to wait at most; None waits until stopped.

        A ``KeyboardInterrupt`` while it waits turns a drain into a stop: the
        batch in flight and a running snapshot are still waited for, so the
        handler can be closed safely next, and then the interrupt is
        re-raised (a second interrupt during that wait is not held back).

        Returns:
            True when the apply thread and any snapshot finished in time.
        """
        try:
            return self._shutdown(drain, timeout)
        except KeyboardInterrupt:
            self._shutdown(False, timeout)
            raise

    def _shutdown(self, drain: bool, timeout: float | None) -> bool:
        p = self._p
        deadline = None if timeout is None else time.monotonic() + timeout
        with p.lock:  # not p.cond: see Pipeline.lock
            if p.state == NEW:
                if drain and p.queue:
                    self._start_thread_locked()  # apply what was submitted before start()
                    p.state = DRAINING
                else:
                    p.state = STOPPING
                    p._discard_locked()
            elif p.state == RUNNING:
                p.state = DRAINING if drain else STOPPING
            elif p.state == DRAINING and not drain:
                p.state = STOPPING
            p.cond.notify_all()
            thread = p.thread
        here = threading.get_ident()
        if thread is not None and thread.ident == here:
            return False  # called from on_event: the thread exits after this batch
        with p.lock:  # not p.cond: see Pipeline.lock
            # Not Thread.join: on CPython 3.11 a KeyboardInterrupt inside join()
            # can mark a still-running thread stopped, and a second join returns
            # at once. A condition wait survives the interrupt intact.
            if thread is not None and not _wait_for(p.cond, lambda: p.thread_done, deadline):
                return False
            if p.snapshot_thread == here:
                return False
            if not _wait_for(p.cond, lambda: not p.snapshot_running, deadline):
                return False
            executor, p.executor = p.executor, None
        if thread is not None:
            thread.join(_remaining(deadline))  # its loop returned: only its exit is left
        if executor is not None:
            executor.shutdown(wait=True)  # idle: returns once its threads exit
        _live_workers.discard(self)
        return True

    def __enter__(self) -> ApplyWorker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(drain=True)


def _check_contiguous(batch: list[common_pb2.Entry]) -> None:
    first = batch[0].index
    indexes = [e.index for e in batch]  # one pass; cheap next to the apply itself
    if indexes != list(range(first, first + len(batch))):
        at = next(i for i, got in enumerate(indexes) if got != first + i)
        raise ApplyOrderError(first + at, indexes[at], f"entry #{at} breaks the sequence")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _wait_for(
    cond: threading.Condition, predicate: Callable[[], bool], deadline: float | None
) -> bool:
    """``cond.wait_for`` until ``deadline``; lock held. On the main thread it wakes
    every ``SIGNAL_SLICE`` seconds: a signal that lands just before a lock wait
    blocks is otherwise handled (Ctrl-C raised) only when the wait ends."""
    if threading.current_thread() is not threading.main_thread():
        return cond.wait_for(predicate, _remaining(deadline))
    while not predicate():
        remaining = _remaining(deadline)
        if remaining == 0.0:
            return False
        cond.wait(SIGNAL_SLICE if remaining is None else min(remaining, SIGNAL_SLICE))
    return True


# Apply threads are daemons so a forgotten worker never blocks interpreter
# exit, but daemon threads are frozen mid-apply during finalization. This hook
# drains the live workers first, with a bounded total timeout. CPython's own
# executors use the private threading._register_atexit; we don't rely on it.
_live_workers: weakref.WeakSet[ApplyWorker] = weakref.WeakSet()


def _drain_at_exit(timeout: float = ATEXIT_DRAIN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for worker in list(_live_workers):
        try:
            if not worker.shutdown(drain=True, timeout=_remaining(deadline)):
                _log.warning("apply worker did not drain before exit")
        except Exception:
            _log.exception("apply worker drain at exit failed")


atexit.register(_drain_at_exit)


def _workers_after_fork() -> None:
    for worker in list(_live_workers):
        worker._p.after_fork_in_child()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_workers_after_fork)

__all__ = [
    "ApplyCompleted",
    "ApplyWorker",
    "EventFn",
    "FatalError",
    "SnapshotCreated",
    "SnapshotFailed",
    "SnapshotSkipped",
    "WorkerEvent",
]
