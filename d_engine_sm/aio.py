"""asyncio adapters for the blocking core.

:class:`AsyncStateMachineHandler` exposes every handler method as a
coroutine. Blocking ones run in an executor (the loop's default one unless
given); cheap ones (``last_applied``, ``pending_range``, ...) run inline.
``wait_applied`` parks no thread: one applied-listener on the handler keeps a
heap of waiters and resolves their futures with ``call_soon_threadsafe``, so
ten thousand concurrent waiters cost ten thousand futures, not threads.

:class:`AsyncApplyWorker` wraps :class:`~d_engine_sm._worker.ApplyWorker`:
``submit`` awaits back-pressure in the executor and events arrive on an
``asyncio.Queue``::

    async with AsyncApplyWorker(handler) as worker:
        await worker.submit(entries, commit)
        event = await worker.events.get()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import heapq
import inspect
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from d_engine_sm._closing import AsyncClosing
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._snapshot.streams import ProgressFn
from d_engine_sm._values import ApplyResult, NewCommitData
from d_engine_sm._watch import Watcher
from d_engine_sm._worker import ApplyWorker, WorkerEvent
from d_engine_sm.errors import ApplyTimeout, HandlerClosed, SubmitTimeout
from d_engine_sm.proto import client_pb2, common_pb2, storage_pb2

_log = logging.getLogger("d_engine_sm.aio")

_T = TypeVar("_T")
AsyncAckFn = Callable[[storage_pb2.SnapshotAck], "Awaitable[None] | None"]
BRIDGE_BUFFER: Final = 4  # chunks buffered between the loop and the receiving thread


class _Waiter:
    """One pending ``wait_applied``; ``done`` is set under the heap lock once
    the waiter left the heap (popped by the listener or by close)."""

    __slots__ = ("done", "future", "loop", "target")

    def __init__(self, target: int, loop: asyncio.AbstractEventLoop) -> None:
        self.target = target
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.done = False


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


def _fail_all(futures: list[asyncio.Future[None]], message: str) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(HandlerClosed(message))


def _by_loop(waiters: list[_Waiter]) -> dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]]:
    out: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for w in waiters:
        out.setdefault(w.loop, []).append(w.future)
    return out


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is left to wake
        _log.debug("event loop closed; dropped %d wake-ups", len(args[0]) if args else 0)


class AsyncStateMachineHandler(AsyncClosing):
    """:class:`~d_engine_sm.StateMachineHandler` for asyncio.

    Safe to share between tasks and between event loops (each waiter is woken
    on its own loop). Closing this wrapper closes the handler.

    Args:
        handler: the blocking handler to wrap.
        executor: runs the blocking calls; None uses the loop's default.
    """

    def __init__(
        self,
        handler: StateMachineHandler,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if not isinstance(handler, StateMachineHandler):
            raise TypeError("handler must be a StateMachineHandler")
        self._handler = handler
        self._executor = executor
        self._lock = threading.Lock()
        self._heap: list[tuple[int, int, _Waiter]] = []  # (target, seq, waiter)
        self._dead = 0  # cancelled waiters still in the heap (lazy deletion)
        self._seq = itertools.count()
        self._remove_applied = handler.add_applied_listener(self._on_applied)
        self._remove_close = handler.add_close_listener(self._on_close)

    @property
    def handler(self) -> StateMachineHandler:
        """The wrapped blocking handler. Non-blocking."""
        return self._handler

    @property
    def node_id(self) -> int:
        """This node's id, as given to the handler. Non-blocking."""
        return self._handler.node_id

    @property
    def config(self) -> SnapshotConfig:
        """The handler's snapshot configuration. Non-blocking."""
        return self._handler.config

    @property
    def closed(self) -> bool:
        """True once the handler is closed. Non-blocking, thread-safe."""
        return self._handler.closed

    def pending_waiters(self) -> int:
        """Waiters in the heap, cancelled ones not yet compacted included."""
        with self._lock:
            return len(self._heap)

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await loop.run_in_executor(self._executor, call)

    # -- cheap, inline -------------------------------------------------------
    async def last_applied(self) -> int:
        """The highest applied log index. Inline, non-blocking."""
        return self._handler.last_applied()

    async def pending_commit(self) -> int:
        """The highest commit index announced and not yet applied. Inline, non-blocking."""
        return self._handler.pending_commit()

    async def update_pending(self, new_commit: int) -> None:
        """Record a newly committed index (never lowers it). Inline, non-blocking."""
        self._handler.update_pending(new_commit)

    async def pending_range(self) -> range | None:
        """Indexes committed but not yet applied, or None. Inline, non-blocking."""
        return self._handler.pending_range()

    async def should_snapshot(self, new_commit_data: NewCommitData) -> bool:
        """Whether the snapshot policy asks for a snapshot now. Inline, non-blocking."""
        return self._handler.should_snapshot(new_commit_data)

    async def snapshot_in_progress(self) -> bool:
        """True while a snapshot is being created. Inline, non-blocking."""
        return self._handler.snapshot_in_progress()

    async def get_latest_snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None:
        """Metadata of the newest published snapshot, or None. Inline, non-blocking."""
        return self._handler.get_latest_snapshot_metadata()

    async def metrics(self) -> dict[str, int | dict[str, float]]:
        """A point-in-time copy of the handler's metrics. Inline, non-blocking."""
        return self._handler.metrics()

    # -- blocking, in the executor ---------------------------------------------
    async def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        """See ``StateMachineHandler.apply_chunk``; runs in the executor."""
        return await self._run(self._handler.apply_chunk, entries)

    async def read_from_state_machine(
        self, keys: Iterable[bytes]
    ) -> list[client_pb2.ClientResult] | None:
        """Read ``keys``; None if the state machine is not running.

        Runs in the executor; the loop is never blocked. Safe from any task.
        """
        return await self._run(self._handler.read_from_state_machine, list(keys))

    async def create_snapshot(
        self, *, progress: ProgressFn | None = None
    ) -> tuple[storage_pb2.SnapshotMetadata, Path]:
        """Create, publish and prune a snapshot; returns its metadata and path.

        Runs in the executor; the loop is never blocked. Safe from any task.
        """
        return await self._run(self._handler.create_snapshot, progress=progress)

    async def cleanup_snapshot(
        self, retain_count: int, snapshot_dir: Path | None = None, prefix: str | None = None
    ) -> list[Path]:
        """Remove all but the ``retain_count`` newest snapshots; returns the removed paths.

        Runs in the executor; the loop is never blocked. Safe from any task.
        """
        return await self._run(self._handler.cleanup_snapshot, retain_count, snapshot_dir, prefix)

    async def load_snapshot_chunk(
        self, metadata: storage_pb2.SnapshotMetadata, seq: int, *, leader_term: int | None = None
    ) -> storage_pb2.SnapshotChunk:
        """Read chunk ``seq`` of the snapshot described by ``metadata``.

        Runs in the executor; the loop is never blocked. Safe from any task.
        """
        return await self._run(
            self._handler.load_snapshot_chunk, metadata, seq, leader_term=leader_term
        )

    async def close(self) -> None:
        """Close the handler (waiters get ``HandlerClosed``). Idempotent."""
        await self._run(self._handler.close)
        self.detach()

    def detach(self) -> None:
        """Unregister from the handler without closing it. Idempotent."""
        self._remove_applied()
        self._remove_close()

    # -- wait_applied: native, no thread parked ----------------------------------
    async def wait_applied(self, target: int, timeout: float | None) -> None:
        """Wait until ``last_applied() >= target`` without parking a thread.

        Args:
            target: the log index to wait for.
            timeout: seconds to wait at most; None waits indefinitely.

        Raises:
            ApplyTimeout: not applied within ``timeout`` (same message as the
                blocking call).
            HandlerClosed: the handler closed before the target was applied.
        """
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"target must be an int, got {type(target).__name__}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        handler = self._handler
        if handler.last_applied() >= target:
            return
        if handler.closed:
            raise HandlerClosed(f"handler closed while waiting for index {target}")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(target, loop)
        with self._lock:
            heapq.heappush(self._heap, (target, next(self._seq), waiter))
        # Re-check after registering: an apply or close may have happened
        # between the first check and the push, with its listener already run.
        # Its future is cancelled: a wake-up or a close failure already posted for
        # it must not leave an exception nobody retrieves (asyncio would log it).
        if handler.last_applied() >= target:
            self._forget(waiter)
            waiter.future.cancel()
            return
        if handler.closed:
            self._forget(waiter)
            waiter.future.cancel()
            raise HandlerClosed(f"handler closed while waiting for index {target}")
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, self._expire, waiter, timeout)
        try:
            await waiter.future
        finally:
            if timer is not None:
                timer.cancel()
            self._forget(waiter)

    def _expire(self, waiter: _Waiter, timeout: float) -> None:
        if waiter.future.done():
            return
        current = self._handler.last_applied()
        if current >= waiter.target:
            waiter.future.set_result(None)
        else:
            waiter.future.set_exception(ApplyTimeout(waiter.target, current, timeout))

    def _forget(self, waiter: _Waiter) -> None:
        """Take a finished/cancelled waiter out of the heap (amortised O(log n))."""
        with self._lock:
            if waiter.done:
                return
            waiter.done = True
            heap = self._heap
            if heap and heap[0][2] is waiter:
                heapq.heappop(heap)
            else:
                self._dead += 1
            while heap and heap[0][2].done:  # dead entries that reached the top
                heapq.heappop(heap)
                self._dead -= 1
            if self._dead and self._dead * 2 >= len(heap):  # dead >= live: compact
                heap[:] = [item for item in heap if not item[2].done]
                heapq.heapify(heap)
                self._dead = 0

    def _on_applied(self, index: int) -> None:
        # Runs on the applying thread after every advance: must be quick.
        heap = self._heap
        try:
            if heap[0][0] > index:  # lock-free peek: a waiter re-checks after pushing
                return
        except IndexError:
            return
        ready: list[_Waiter] = []
        with self._lock:
            while heap and heap[0][0] <= index:
                waiter = heapq.heappop(heap)[2]
                if waiter.done:
                    self._dead -= 1
                    continue
                waiter.done = True
                ready.append(waiter)
        for loop, futures in _by_loop(ready).items():
            _post(loop, _resolve_all, futures)

    def _on_close(self) -> None:
        with self._lock:
            waiters = [item[2] for item in self._heap if not item[2].done]
            for w in waiters:
                w.done = True
            self._heap.clear()
            self._dead = 0
        for loop, futures in _by_loop(waiters).items():
            _post(loop, _fail_all, futures, "handler closed while waiting for the applied index")

    # -- snapshots: streams ----------------------------------------------------
    async def load_snapshot_data(
        self,
        metadata: storage_pb2.SnapshotMetadata,
        *,
        leader_term: int | None = None,
        progress: ProgressFn | None = None,
    ) -> AsyncIterator[storage_pb2.SnapshotChunk]:
        """The archive for ``metadata`` as chunks; each read runs in the executor.

        An async generator: errors (``SnapshotNotFound``) surface on the first
        iteration. The archive stays held until the iteration ends or
        ``aclose()`` is awaited.
        """
        chunks = await self._run(
            self._handler.load_snapshot_data, metadata, leader_term=leader_term, progress=progress
        )
        end = object()
        try:
            while True:
                chunk = await self._run(next, chunks, end)
                if chunk is end:
                    return
                yield cast(storage_pb2.SnapshotChunk, chunk)  # not the sentinel
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # releases a file and a shared lock: quick

    async def apply_snapshot_stream_from_leader(
        self,
        current_term: int,
        stream: AsyncIterable[storage_pb2.SnapshotChunk] | Iterable[storage_pb2.SnapshotChunk],
        ack: AsyncAckFn,
        config: SnapshotConfig | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> storage_pb2.SnapshotMetadata:
        """Receive and install a snapshot; see the blocking method for the contract.

        ``stream`` may be an async or a plain iterable; an async one is pulled
        on this loop into a small bounded buffer that the receiving thread (in
        the executor) drains. ``ack`` may be sync or async; it always runs on
        this loop, one at a time and in order (the receiver waits for each).
        Cancelling the call aborts the transfer (a final ``FAILED`` ack).

        Raises:
            The blocking method's errors.
        """
        loop = asyncio.get_running_loop()
        cfg = config or self._handler.config
        sync_ack = _loop_ack(loop, ack, cfg.chunk_timeout)
        if not isinstance(stream, AsyncIterable):
            return await self._run(
                self._handler.apply_snapshot_stream_from_leader,
                current_term,
                stream,
                sync_ack,
                config,
                progress=progress,
            )
        bridge = _StreamBridge(loop, BRIDGE_BUFFER)
        feeder = loop.create_task(bridge.feed(stream))
        try:
            return await self._run(
                self._handler.apply_snapshot_stream_from_leader,
                current_term,
                bridge,
                sync_ack,
                config,
                progress=progress,
            )
        finally:
            feeder.cancel()
            bridge.close()  # unblocks the receiving side if it stopped early

    def watch(self, key: bytes | None = None, *, maxsize: int = 1024) -> AsyncWatcher:
        """Watch applied changes; see ``StateMachineHandler.watch``."""
        return AsyncWatcher(self._handler.watch(key, maxsize=maxsize), self._executor)


class AsyncWatcher:
    """Async view of a :class:`~d_engine_sm.Watcher`.

    ``get`` waits in the executor, so a waiting consumer occupies one
    executor thread (watchers are few, unlike ``wait_applied`` callers).
    """

    def __init__(self, watcher: Watcher, executor: concurrent.futures.Executor | None) -> None:
        self.watcher = watcher
        self._executor = executor

    async def get(self, timeout: float | None = None) -> client_pb2.WatchResponse:
        """The next event; raises ``queue.Empty`` after ``timeout`` or once closed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.watcher.get, timeout)

    def __aiter__(self) -> AsyncWatcher:
        return self

    async def __anext__(self) -> client_pb2.WatchResponse:
        try:
            return await self.get()
        except queue.Empty:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop watching; a waiting ``get`` ends. Non-blocking, idempotent."""
        self.watcher.close()


def _loop_ack(
    loop: asyncio.AbstractEventLoop, ack: AsyncAckFn, timeout: float
) -> Callable[[storage_pb2.SnapshotAck], None]:
    async def call(message: storage_pb2.SnapshotAck) -> None:
        result = ack(message)
        if inspect.isawaitable(result):
            await result

    def sync_ack(message: storage_pb2.SnapshotAck) -> None:
        # Called on the receiving thread; waiting keeps acks ordered and lets a
        # failing ack reach the receiver (which logs it).
        asyncio.run_coroutine_threadsafe(call(message), loop).result(timeout)

    return sync_ack


class _StreamBridge:
    """Async iterable (pulled on the loop) -> blocking iterator (read on a thread).

    Bounded without parking a thread: the feeder takes a slot from an
    ``asyncio.Semaphore`` per chunk; the consumer gives it back through
    ``call_soon_threadsafe`` once it took the chunk.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._loop = loop
        self._slots = asyncio.Semaphore(size)
        self._items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    async def feed(self, stream: AsyncIterable[storage_pb2.SnapshotChunk]) -> None:
        try:
            async for chunk in stream:
                await self._slots.acquire()
                self._items.put(("chunk", chunk))
            self._items.put(("end", None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the caller's stream failed: hand it over
            self._items.put(("error", exc))

    def close(self) -> None:
        self._items.put(("error", ConnectionAbortedError("snapshot receive ended")))

    def _release(self) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: the feeder is gone too
            self._loop.call_soon_threadsafe(self._slots.release)

    def __iter__(self) -> _StreamBridge:
        return self

    def __next__(self) -> storage_pb2.SnapshotChunk:
        kind, value = self._items.get()
        if kind == "chunk":
            self._release()
            return value  # type: ignore[no-any-return]
        if kind == "error":
            self._items.put((kind, value))  # stay failed for any later pull
            raise value
        self._items.put((kind, value))
        raise StopIteration


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A cancelled caller no longer awaits the shielded submit: log its failure
    # here instead of asyncio's "exception was never retrieved".
    if not fut.cancelled() and fut.exception() is not None:
        _log.debug("abandoned submit failed error=%s", fut.exception())


class AsyncApplyWorker(AsyncClosing):
    """:class:`~d_engine_sm._worker.ApplyWorker` for asyncio.

    Events are delivered to :attr:`events` (an unbounded ``asyncio.Queue``,
    filled from the apply thread with ``call_soon_threadsafe``; read it).
    ``submit`` returns at once when there is room, else waits in the
    executor. Await each ``submit`` before the next: batches must arrive in
    log order. Cancelling a waiting ``submit`` does not withdraw its batch:
    it is queued once there is room.

    Args:
        handler: a handler or an :class:`AsyncStateMachineHandler`.
        executor: for back-pressure waits and shutdown; None: the loop's default.
        **worker_options: passed to ``ApplyWorker`` (``max_batch_entries``, ...).
    """

    def __init__(
        self,
        handler: StateMachineHandler | AsyncStateMachineHandler,
        *,
        executor: concurrent.futures.Executor | None = None,
        **worker_options: int,
    ) -> None:
        if isinstance(handler, AsyncStateMachineHandler):
            handler = handler.handler
        self.events: asyncio.Queue[WorkerEvent] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = executor
        self._worker = ApplyWorker(handler, self._deliver, **worker_options)

    @property
    def worker(self) -> ApplyWorker:
        """The wrapped thread-based worker. Non-blocking."""
        return self._worker

    def _deliver(self, event: WorkerEvent) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("AsyncApplyWorker.start() was not called in a running loop")
        loop.call_soon_threadsafe(self.events.put_nowait, event)

    def start(self) -> None:
        """Start applying; call from a coroutine (binds the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._worker.start()

    async def submit(
        self,
        entries: Iterable[common_pb2.Entry],
        commit: NewCommitData | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Queue entries; waits for room without blocking the loop.

        Raises:
            ApplyOrderError, SubmitTimeout, WorkerStopped: as ``ApplyWorker.submit``.
        """
        batch = list(entries)
        try:
            self._worker.submit(batch, commit, timeout=0)
            return
        except SubmitTimeout:
            if timeout == 0:
                raise
        loop = asyncio.get_running_loop()
        call = functools.partial(self._worker.submit, batch, commit, timeout=timeout)
        inner = loop.run_in_executor(self._executor, call)
        inner.add_done_callback(_retrieve)
        await asyncio.shield(inner)

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """``ApplyWorker.shutdown`` in the executor; events keep arriving until it returns."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self._worker.shutdown, drain, timeout)
        return await loop.run_in_executor(self._executor, call)

    async def close(self) -> None:
        """``shutdown(drain=True)``: what leaving ``async with`` does."""
        await self.shutdown(drain=True)

    async def __aenter__(self) -> AsyncApplyWorker:
        self.start()
        return self


__all__ = ["AsyncApplyWorker", "AsyncStateMachineHandler", "AsyncWatcher"]
