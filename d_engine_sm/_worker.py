"""ApplyWorker: the apply pipeline a Raft commit loop feeds.

Theory of operation
-------------------
``ApplyWorker`` is a thin facade over ``_Pipeline``, which holds all state.
The apply thread holds the pipeline strongly and the facade only through a
weakref (CPython ``concurrent.futures`` style), so a forgotten worker can be
collected; its weakref callback asks the thread to drain and exit.

``_Pipeline._cond`` guards the queue of submitted batches, the queued-entry
count, the next expected index, the lifecycle state and the snapshot flag.
It is never held while the handler applies, while a snapshot runs, or while
``on_event`` runs. States::

    NEW -> RUNNING -> DRAINING -> (thread exits)      shutdown(drain=True)
                   -> STOPPING -> (thread exits)      shutdown(drain=False)
                   -> FAILED                          the state machine failed
    any            -> FORKED                          in a child after os.fork()

Only NEW and RUNNING accept ``submit``; FAILED is final ("failed stays
failed"). Policy snapshots run on a small ThreadPoolExecutor, at most one at
a time (``_snapshot_running``), never on the apply thread.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import inspect
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol, TypeAlias

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
from d_engine_sm.proto import common_pb2, storage_pb2

_log = logging.getLogger("d_engine_sm.worker")

DEFAULT_MAX_BATCH: Final = 2_000
ATEXIT_DRAIN_TIMEOUT: Final = 10.0  # seconds, shared by all live workers
SIGNAL_SLICE: Final = 0.2  # seconds: how late a main thread waiting in shutdown sees Ctrl-C

_NEW: Final = "new"
_RUNNING: Final = "running"
_DRAINING: Final = "draining"
_STOPPING: Final = "stopping"
_FAILED: Final = "failed"
_FORKED: Final = "forked"  # inherited by a forked child: its threads are gone


# -- events ------------------------------------------------------------------------
@dataclass(frozen=True)
class ApplyCompleted:
    """One ``apply_chunk`` call succeeded: results for every entry, in log order."""

    last_index: int
    results: list[ApplyResult]


@dataclass(frozen=True)
class FatalError:
    """The worker stopped: ``error`` is the ``ApplyError`` (source ``"StateMachine"``)
    or, for anything unexpected (handler closed, order broken from outside),
    that error with source ``"ApplyWorker"``."""

    source: str
    error: BaseException


@dataclass(frozen=True)
class SnapshotCreated:
    """A policy-triggered snapshot was written."""

    metadata: storage_pb2.SnapshotMetadata
    path: Path


@dataclass(frozen=True)
class SnapshotFailed:
    """A policy-triggered snapshot failed (logged; the worker keeps applying)."""

    error: BaseException


@dataclass(frozen=True)
class SnapshotSkipped:
    """A policy-triggered snapshot was not taken: another writer (a snapshot
    create or install in this process, or another process holding the
    directory's ``.lock``) was at work. No cooldown started: the next applied
    batch that carries a commit asks the policy again."""

    reason: str


WorkerEvent: TypeAlias = (
    ApplyCompleted | FatalError | SnapshotCreated | SnapshotFailed | SnapshotSkipped
)
EventFn: TypeAlias = Callable[[WorkerEvent], Any]


class _HasPut(Protocol):
    def put(self, item: WorkerEvent, /) -> Any: ...


def _event_sink(on_event: EventFn | _HasPut) -> EventFn:
    put = getattr(on_event, "put", None)
    if put is not None and callable(put):
        if inspect.iscoroutinefunction(put):
            raise TypeError(
                "on_event.put is a coroutine (an asyncio.Queue?): use "
                "d_engine_sm.aio.AsyncApplyWorker, or a callable that calls "
                "loop.call_soon_threadsafe(queue.put_nowait, event)"
            )
        return put  # type: ignore[no-any-return]
    if callable(on_event):
        return on_event
    raise TypeError(f"on_event must be callable or have put(), got {type(on_event).__name__}")


class _Batch(NamedTuple):
    entries: list[common_pb2.Entry]
    commit: NewCommitData | None


# -- the pipeline (all state) ------------------------------------------------------
class _Pipeline:
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
        self.cond = threading.Condition(threading.Lock())
        self.queue: deque[_Batch] = deque()
        self.queued = 0
        self.in_flight = False
        self.next_index: int | None = None  # last submitted index + 1
        self.state = _NEW
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

    def submit(self, batch: _Batch, timeout: float | None) -> None:
        entries = batch.entries
        first, n = entries[0].index, len(entries)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._check_accepting()
            self.check_order(first)  # fail fast, before waiting for room

            def has_room() -> bool:
                if self.state not in (_NEW, _RUNNING):
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
        if self.state == _FORKED:
            raise WorkerStopped(
                "apply worker was started in the parent process before os.fork(); "
                "create a new one in the child"
            )
        if self.state == _FAILED:
            raise WorkerStopped("apply worker stopped after a fatal state machine error")
        if self.state not in (_NEW, _RUNNING):
            raise WorkerStopped("apply worker is shut down")

    # -- apply thread side ---------------------------------------------------
    def next_batch(self) -> _Batch | None:
        """Block for work; coalesce queued batches. None: the thread must exit."""
        with self.cond:
            self.cond.wait_for(lambda: bool(self.queue) or self.state not in (_NEW, _RUNNING))
            if self.state in (_STOPPING, _FAILED) or not self.queue:
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
        return _Batch(entries, commit)

    def _discard_locked(self) -> None:
        if self.queued:
            # Asked for by shutdown(drain=False): info; after a failure: a warning.
            level = logging.WARNING if self.state == _FAILED else logging.INFO
            _log.log(
                level,
                "apply worker stopped; discarded batches=%d entries=%d",
                len(self.queue),
                self.queued,
            )
        self.queue.clear()
        self.queued = 0
        self.cond.notify_all()

    def apply(self, batch: _Batch) -> bool:
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
        for _attempt in range(2):
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
                # A snapshot install may have jumped last_applied between the
                # trim and the apply: trim again once; anything else is a bug.
                if self.handler.last_applied() < entries[0].index:
                    raise
        return self.handler.apply_chunk(entries), entries

    def _fail(self, source: str, exc: BaseException) -> None:
        with self.cond:
            self.state = _FAILED
            self.in_flight = False
            self._discard_locked()
        self.emit(FatalError(source, exc))

    def emit(self, event: WorkerEvent) -> None:
        try:
            self.sink(event)
        except Exception:
            _log.exception("on_event failed event=%s", type(event).__name__)

    # -- policy snapshots ----------------------------------------------------
    def _maybe_snapshot(self, commit: NewCommitData) -> None:
        with self.cond:
            if self.snapshot_running or self.state in (_STOPPING, _FAILED):
                return
        try:
            wanted = self.handler.should_snapshot(commit)
        except Exception:
            _log.exception("should_snapshot failed")
            return
        if not wanted:
            return
        with self.cond:
            if self.snapshot_running:
                return
            self.snapshot_running = True
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
        self.cond = threading.Condition(threading.Lock())
        self.state = _FORKED
        self.queue.clear()
        self.queued = 0
        self.in_flight = self.snapshot_running = False
        self.thread_done = True
        self.snapshot_thread = None
        self.executor = None

    def abandon(self) -> None:
        """The facade was garbage-collected: drain what was submitted, then exit."""
        with self.cond:
            if self.state == _RUNNING:
                self.state = _DRAINING
                self.cond.notify_all()


def _apply_loop(owner: weakref.ReferenceType[ApplyWorker], pipeline: _Pipeline) -> None:
    name = threading.current_thread().name
    _log.info("apply worker started thread=%s", name)
    try:
        while True:
            batch = pipeline.next_batch()
            if batch is None or not pipeline.apply(batch):
                break
            del batch  # hold no entries while blocked on the next wait
    except BaseException:
        _log.exception("apply worker thread crashed thread=%s", name)
        with pipeline.cond:
            pipeline.state = _FAILED
            pipeline._discard_locked()
        raise
    finally:
        _log.info("apply worker exited thread=%s owner_alive=%s", name, owner() is not None)
        with pipeline.cond:
            pipeline.thread_done = True
            pipeline.cond.notify_all()


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
        on_event: EventFn | _HasPut,
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
        self._p = _Pipeline(
            handler, _event_sink(on_event), max_batch_entries, max_queued_entries, snapshot_workers
        )

    @property
    def handler(self) -> StateMachineHandler:
        return self._p.handler

    @property
    def queued_entries(self) -> int:
        """Entries submitted and not yet taken by the apply thread."""
        return self._p.queued

    @property
    def failed(self) -> bool:
        """True once a fatal error stopped the worker."""
        return self._p.state == _FAILED

    def start(self) -> None:
        """Start the apply thread. Idempotent; non-blocking.

        Raises:
            WorkerStopped: the worker was already shut down.
        """
        p = self._p
        with p.cond:
            if p.state != _NEW:
                if p.state == _RUNNING:
                    return
                raise WorkerStopped("apply worker is shut down; create a new one")
            p.state = _RUNNING
            self._start_thread_locked()
        _live_workers.add(self)

    def _start_thread_locked(self) -> None:
        p = self._p
        pipeline = p
        owner = weakref.ref(self, lambda _ref: pipeline.abandon())
        p.thread = threading.Thread(
            target=_apply_loop,
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
        self._p.submit(_Batch(batch, commit), timeout)

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
        with p.cond:
            if p.state == _NEW:
                if drain and p.queue:
                    self._start_thread_locked()  # apply what was submitted before start()
                    p.state = _DRAINING
                else:
                    p.state = _STOPPING
                    p._discard_locked()
            elif p.state == _RUNNING:
                p.state = _DRAINING if drain else _STOPPING
            elif p.state == _DRAINING and not drain:
                p.state = _STOPPING
            p.cond.notify_all()
            thread = p.thread
        here = threading.get_ident()
        if thread is not None and thread.ident == here:
            return False  # called from on_event: the thread exits after this batch
        with p.cond:
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
