"""StateMachineHandler: applies committed entries, serves reads and waits,
and orchestrates the snapshot lifecycle.

Theory of operation
-------------------
Locks, in the only order they are ever nested:

1. ``_apply_lock`` — the state machine's write path. Held by ``apply_chunk``
   for a whole batch, by snapshot install while the state is replaced, and by
   ``create_snapshot`` while it captures a point-in-time view (applies paused).
   Exactly one apply runs at a time, so batches reach the state machine in log
   order.
2. ``_cond`` (a Condition) — guards ``_applied_index/_applied_term`` and
   ``_closed``. Held only for a few assignments; ``wait_applied`` sleeps on
   it. It is notified after the state machine returns, so a woken waiter
   always reads state that includes its target.

``_pending_lock`` guards only ``_pending``. Reads take no lock: the state
machine's ``get`` must tolerate a concurrent apply. No lock is held while
user code runs (acks, listeners, watch consumers pull from their own queues).

Snapshot create and install are mutually exclusive through the snapshot
manager's non-blocking guard plus the directory's ``.lock`` (see
``_snapshot/core.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

from d_engine_sm import _kv
from d_engine_sm._closing import Closing
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._fs import DEFAULT_FILE_OPS, FileOps
from d_engine_sm._metrics import new_handler_metrics
from d_engine_sm._policy import LogSizePolicy, SnapshotPolicy
from d_engine_sm._snapshot.manager import AckFn, SnapshotManager
from d_engine_sm._snapshot.streams import ProgressFn
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import ApplyResult, LogId, NewCommitData, SnapshotContext
from d_engine_sm._watch import Watcher, WatchHub
from d_engine_sm.errors import ApplyError, ApplyOrderError, ApplyTimeout, HandlerClosed
from d_engine_sm.proto import client_pb2, common_pb2, storage_pb2

_log = logging.getLogger("d_engine_sm.handler")

AppliedListener = Callable[[int], None]
DEFAULT_WATCH_QUEUE: Final = 1024


class StateMachineHandler(Closing):
    """The state-machine side of a Raft node (d-engine's ``StateMachineHandler``).

    Every method is a plain blocking call, safe to call from many threads.

    Args:
        state_machine: the user's state machine (owned by the caller: the
            handler neither starts nor stops it).
        config: snapshot settings.
        node_id: this node's id; sent as ``leader_id`` in snapshot chunks.
        snapshot_policy: decides ``should_snapshot``; default
            ``LogSizePolicy(config.max_log_entries_before_snapshot,
            config.snapshot_cool_down_since_last_check)``.
        last_applied_index: overrides the state machine's own applied index.
        file_ops: the disk seam (tests inject faults through it).

    Start-up: a state behind the newest archive in ``snapshots_dir`` (a state
    machine that keeps nothing across restarts, or a durable one that lost
    its last commits) is *reported, not repaired*: a log line (warning when
    the state is not empty) and :attr:`state_behind_snapshot`, also in
    :meth:`metrics`. The Raft engine decides: replay its log, or install a
    snapshot (this node's own archive or the leader's).
    """

    def __init__(
        self,
        state_machine: StateMachine,
        config: SnapshotConfig,
        *,
        node_id: int = 0,
        snapshot_policy: SnapshotPolicy | None = None,
        last_applied_index: int | None = None,
        file_ops: FileOps = DEFAULT_FILE_OPS,
    ) -> None:
        if not isinstance(state_machine, StateMachine):
            raise TypeError("state_machine must be a d_engine_sm.StateMachine")
        if not isinstance(config, SnapshotConfig):
            raise TypeError("config must be a SnapshotConfig")
        if isinstance(node_id, bool) or not isinstance(node_id, int) or node_id < 0:
            raise ValueError(f"node_id must be an int >= 0, got {node_id!r}")
        self._sm = state_machine
        self._config = config
        self._node_id = node_id
        self._policy = snapshot_policy or LogSizePolicy(
            config.max_log_entries_before_snapshot, config.snapshot_cool_down_since_last_check
        )
        self._apply_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._pending_lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self._forked = False  # this object was inherited by a forked child process
        sm_applied = state_machine.last_applied()
        if last_applied_index is None:
            self._applied_index, self._applied_term = sm_applied.index, sm_applied.term
        else:
            if isinstance(last_applied_index, bool) or not isinstance(last_applied_index, int):
                raise TypeError("last_applied_index must be an int")
            if last_applied_index < 0:
                raise ValueError(f"last_applied_index must be >= 0, got {last_applied_index}")
            self._applied_index = last_applied_index
            same = last_applied_index == sm_applied.index
            self._applied_term = sm_applied.term if same else 0
        self._listeners: tuple[AppliedListener, ...] = ()
        self._close_listeners: tuple[Callable[[], None], ...] = ()
        self._watch = WatchHub()
        self._metrics = new_handler_metrics()
        _live_handlers.add(self)
        self._snapshots = SnapshotManager(
            state_machine,
            config,
            node_id=node_id,
            policy=self._policy,
            metrics=self._metrics,
            pause_applies=self._apply_lock,
            applied=self._applied_log_id,
            publish_applied=lambda lid: self._publish_applied(lid.index, lid.term),
            notify_applied=self._notify_listeners,
            file_ops=file_ops,
        )
        self._report_behind()

    def _report_behind(self) -> None:
        behind = self.state_behind_snapshot
        if behind:
            latest = self._snapshots.latest_metadata()
            assert latest is not None
            _log.log(
                logging.WARNING if self._applied_index else logging.INFO,
                "state is behind the newest snapshot applied=%d snapshot=%d dir=%s"
                " (reported, not reinstalled)",
                self._applied_index,
                latest.last_included.index,
                self._config.snapshots_dir,
            )

    @property
    def state_behind_snapshot(self) -> int:
        """Entries the state lacks to reach the newest archive's index (0 when it does).

        Positive only when the state machine came up behind its own newest
        archive; applying or installing past that index brings it back to 0.
        """
        latest = self._snapshots.latest_metadata()
        if latest is None:
            return 0
        return max(0, latest.last_included.index - self._applied_index)

    @property
    def node_id(self) -> int:
        """This node's id. Non-blocking."""
        return self._node_id

    @property
    def config(self) -> SnapshotConfig:
        """The snapshot configuration (read-only after construction). Non-blocking."""
        return self._config

    @property
    def state_machine(self) -> StateMachine:
        """The user's state machine this handler drives. Non-blocking."""
        return self._sm

    # -- applied index ---------------------------------------------------
    def last_applied(self) -> int:
        """The highest applied log index. Non-blocking."""
        return self._applied_index

    def _applied_log_id(self) -> LogId:
        with self._cond:
            return LogId(index=self._applied_index, term=self._applied_term)

    def pending_commit(self) -> int:
        """The highest commit index passed to :meth:`update_pending`."""
        return self._pending

    def update_pending(self, new_commit: int) -> None:
        """Raise the pending commit index to ``new_commit``; never lowers it."""
        if isinstance(new_commit, bool) or not isinstance(new_commit, int) or new_commit < 0:
            raise ValueError(f"new_commit must be an int >= 0, got {new_commit!r}")
        with self._pending_lock:
            self._pending = max(self._pending, new_commit)

    def pending_range(self) -> range | None:
        """``range(last_applied + 1, pending + 1)``, or None when nothing is pending."""
        pending = self._pending
        applied = self._applied_index
        return range(applied + 1, pending + 1) if pending > applied else None

    def wait_applied(self, target: int, timeout: float | None) -> None:
        """Block until ``last_applied() >= target``.

        Blocks the calling thread on a condition variable (no polling); returns
        at once when the target is already applied.

        Args:
            target: the log index to wait for.
            timeout: seconds to wait at most; None waits indefinitely.

        Raises:
            ApplyTimeout: not applied within ``timeout`` (names target and current).
            HandlerClosed: the handler was closed before the target was applied.
        """
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"target must be an int, got {type(target).__name__}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        if self._applied_index >= target:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._applied_index >= target, timeout)
            if self._applied_index >= target:
                return
            if self._closed:
                raise self._closed_error(f"handler closed while waiting for index {target}")
            raise ApplyTimeout(target, self._applied_index, timeout)

    def add_applied_listener(self, listener: AppliedListener) -> Callable[[], None]:
        """Call ``listener(last_applied)`` after every advance; returns a remover.

        The listener runs on the applying thread with no lock held; it must
        be quick and must not block. Its exceptions are logged.
        """
        with self._cond:
            self._listeners = (*self._listeners, listener)

        def remove() -> None:
            with self._cond:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return remove

    def add_close_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` once when the handler closes; returns a remover.

        Called at once if the handler is already closed.
        """
        with self._cond:
            closed = self._closed
            if not closed:
                self._close_listeners = (*self._close_listeners, listener)
        if closed:
            listener()

        def remove() -> None:
            with self._cond:
                self._close_listeners = tuple(x for x in self._close_listeners if x is not listener)

        return remove

    def _publish_applied(self, index: int, term: int) -> None:
        with self._cond:
            self._applied_index = index
            self._applied_term = term
            self._cond.notify_all()

    def _notify_listeners(self, index: int) -> None:
        for listener in self._listeners:
            try:
                listener(index)
            except Exception:
                _log.exception("applied listener failed index=%d", index)

    # -- apply -----------------------------------------------------------
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        """Apply committed entries, in order, to the state machine.

        Blocks while another apply, or a snapshot capture/install, runs.

        Args:
            entries: contiguous entries starting at ``last_applied() + 1``.

        Returns:
            One result per entry, in order (``[]`` for no entries).

        Raises:
            ApplyOrderError: entries not contiguous from ``last_applied() + 1``;
                nothing was applied.
            ApplyError: the state machine raised (cause chained) or returned a
                wrong number of results; ``last_applied`` did not move.
            HandlerClosed: the handler is closed.
        """
        if not isinstance(entries, Sequence):
            entries = list(entries)
        if not entries:
            return []
        with self._apply_lock:
            if self._closed:
                raise self._closed_error()
            _check_contiguous(entries, self._applied_index + 1)
            first, last = entries[0], entries[-1]
            started = time.perf_counter()
            try:
                results = self._sm.apply_chunk(entries)
            except Exception as exc:
                self._metrics.incr("apply_errors")
                raise ApplyError(first.index, last.index, f"{type(exc).__name__}: {exc}") from exc
            if len(results) != len(entries):
                self._metrics.incr("apply_errors")
                raise ApplyError(
                    first.index,
                    last.index,
                    f"state machine returned {len(results)} results for {len(entries)} entries",
                )
            self._publish_applied(last.index, last.term)
            if self._watch.active:
                delivered, dropped = self._watch.publish(_kv.watch_events(entries, results))
                self._metrics.incr("watch_events", delivered)
                if dropped:
                    self._metrics.incr("watch_dropped", dropped)
            self._metrics.applied(len(entries), time.perf_counter() - started)
        if self._listeners:
            self._notify_listeners(last.index)
        return results

    # -- reads -----------------------------------------------------------
    def read_from_state_machine(
        self, keys: Iterable[bytes]
    ) -> list[client_pb2.ClientResult] | None:
        """Values of the keys that exist, in request order; None when none exist.

        Runs concurrently with applies (no lock taken).

        Raises:
            HandlerClosed: the handler is closed.
        """
        if self._closed:
            raise self._closed_error()
        keys = keys if isinstance(keys, Sequence) else list(keys)
        found = [
            client_pb2.ClientResult(key=key, value=value)
            for key, value in zip(keys, self._sm.get_many(keys), strict=True)
            if value is not None
        ]
        return found or None

    def watch(self, key: bytes | None = None, *, maxsize: int = DEFAULT_WATCH_QUEUE) -> Watcher:
        """Events for every applied change of ``key`` (all keys when None).

        Fire-and-forget: a slow watcher never blocks apply; when its queue of
        ``maxsize`` is full the oldest events are dropped (``Watcher.dropped``).
        """
        return self._watch.watch(key, maxsize)

    def metrics(self) -> dict[str, int | dict[str, float]]:
        """Counters and latency summaries (``*_seconds``: count/sum/max/p50/p99)."""
        out = self._metrics.snapshot()
        out["last_applied"] = self._applied_index
        out["pending_commit"] = self._pending
        out["state_behind_snapshot"] = self.state_behind_snapshot
        return out

    # -- snapshots -------------------------------------------------------
    def should_snapshot(self, new_commit_data: NewCommitData) -> bool:
        """Whether the policy asks for a snapshot now (False when disabled, read-only or busy)."""
        if not self._config.enable or self._config.read_only or self._snapshots.in_progress():
            return False
        latest = self._snapshots.latest_metadata()
        included = latest.last_included if latest is not None else LogId(term=0, index=0)
        ctx = SnapshotContext(
            role=new_commit_data.role,
            last_included=included,
            last_applied=self._applied_log_id(),
            current_term=new_commit_data.current_term,
        )
        return self._policy.should_trigger(ctx)

    def snapshot_in_progress(self) -> bool:
        """True while a snapshot is being created. Non-blocking, thread-safe."""
        return self._snapshots.in_progress()

    def create_snapshot(
        self, *, progress: ProgressFn | None = None
    ) -> tuple[storage_pb2.SnapshotMetadata, Path]:
        """Snapshot the state at the exact applied LogId: generate, pack, fsync, publish, prune.

        Pauses applies only for ``prepare_snapshot`` (for the whole generate
        when the state machine has no ``prepare_snapshot``).

        Raises:
            SnapshotInProgress: another create/install runs (this process or another).
            ReadOnlySnapshotDir: the directory or the handler is read-only.
            SnapshotError: generating or writing failed (cause chained);
                nothing was published.
            HandlerClosed: the handler is closed.
        """
        self._check_open()
        return self._snapshots.create(progress=progress)

    def cleanup_snapshot(
        self, retain_count: int, snapshot_dir: Path | None = None, prefix: str | None = None
    ) -> list[Path]:
        """Delete all but the newest ``retain_count`` archives; returns what was removed.

        Never removes the newest archive or one being read.

        Raises:
            ValueError: ``retain_count < 1``.
            SnapshotInProgress: another writer holds the directory lock.
            ReadOnlySnapshotDir: the directory or the handler is read-only.
        """
        return self._snapshots.cleanup(retain_count, snapshot_dir, prefix)

    def get_latest_snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None:
        """Metadata of the newest valid archive (None when there is none)."""
        return self._snapshots.latest_metadata()

    def load_snapshot_data(
        self,
        metadata: storage_pb2.SnapshotMetadata,
        *,
        leader_term: int | None = None,
        progress: ProgressFn | None = None,
    ) -> Iterator[storage_pb2.SnapshotChunk]:
        """The archive for ``metadata`` as ``chunk_size`` chunks.

        The archive is held (shared lock) until the iterator ends or is closed.

        Raises:
            SnapshotNotFound: no archive for ``metadata``.
            SnapshotError: ``metadata`` has no ``last_included``.
        """
        return self._snapshots.load_data(metadata, leader_term=leader_term, progress=progress)

    def load_snapshot_chunk(
        self, metadata: storage_pb2.SnapshotMetadata, seq: int, *, leader_term: int | None = None
    ) -> storage_pb2.SnapshotChunk:
        """One chunk of the archive for ``metadata``.

        Raises:
            ChunkOutOfRange: ``seq >= total_chunks``.
            SnapshotNotFound: no archive for ``metadata``.
        """
        return self._snapshots.load_chunk(metadata, seq, leader_term=leader_term)

    def apply_snapshot_stream_from_leader(
        self,
        current_term: int,
        stream: Iterable[storage_pb2.SnapshotChunk],
        ack: AckFn,
        config: SnapshotConfig | None = None,
        *,
        progress: ProgressFn | None = None,
    ) -> storage_pb2.SnapshotMetadata:
        """Receive, verify (CRC32 per chunk, SHA-256 whole) and install a leader's snapshot.

        ``ack`` is called (no lock held) once per chunk and with a final
        ``FAILED``/``OUT_OF_ORDER`` ack on failure. On success the state
        machine holds the snapshot's state, ``last_applied()`` is its index,
        waiters are woken and the archive is kept as the newest snapshot.

        Raises:
            SnapshotTransferError: the stream was invalid or incomplete.
            StaleSnapshotError: the snapshot is not newer than ``last_applied()``.
            UnsafeArchiveError / CorruptSnapshotError: the archive was refused.
            SnapshotInProgress: another create/install runs.
            ReadOnlySnapshotDir: the directory or the handler is read-only.
            SnapshotError: writing or installing failed; nothing changed.
        """
        self._check_open()
        return self._snapshots.receive(
            current_term, stream, ack, config or self._config, progress=progress
        )

    def install_snapshot_from_file(
        self,
        path: str | os.PathLike[str],
        *,
        last_included: LogId | None = None,
        checksum: bytes | None = None,
        progress: ProgressFn | None = None,
    ) -> storage_pb2.SnapshotMetadata:
        """Install a local archive (a backup, a copy) exactly as a received one.

        The file is streamed through the receive path, so it gets the same
        checks (size, SHA-256, safe unpack, not older than ``last_applied()``)
        and the same all-or-nothing install; the file itself is left alone.

        Args:
            path: the archive.
            last_included: its LogId; default parsed from the name
                (``…<index>-<term>.tar.gz``).
            checksum: its expected SHA-256; default computed from the file
                (then only the archive's own integrity is checked).
            progress: called with (phase, done_bytes, total_bytes).

        Raises:
            ValueError: no LogId given and none in the name.
            SnapshotNotFound: the file cannot be read.
            StaleSnapshotError: not newer than ``last_applied()``.
            SnapshotTransferError / CorruptSnapshotError / UnsafeArchiveError:
                the archive was refused; nothing changed.
            SnapshotInProgress: another create/install runs.
        """
        self._check_open()
        return self._snapshots.install_from_file(
            Path(path),
            self._config,
            last_included=last_included,
            checksum=checksum,
            progress=progress,
        )

    # -- lifecycle -------------------------------------------------------
    def _closed_error(self, message: str = "handler is closed") -> HandlerClosed:
        if self._forked:
            message = FORKED_MESSAGE
        return HandlerClosed(message)

    def _after_fork_in_child(self) -> None:
        """In a forked child: closed, with fresh locks (the parent's threads that
        may have held them do not exist here), so every call fails at once."""
        self._forked = True
        self._closed = True
        self._cond = threading.Condition(threading.Lock())
        self._pending_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._listeners = self._close_listeners = ()
        self._snapshots.after_fork_in_child(self._apply_lock)

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called. Non-blocking, thread-safe."""
        return self._closed

    def close(self) -> None:
        """Stop using the state machine; wake waiters with ``HandlerClosed``. Idempotent.

        Once ``close()`` returns, the handler never writes to the state machine
        again: it waits for an apply batch, a snapshot create or an install in
        flight on other threads, and a receive still reading chunks is aborted
        at its next chunk (a final ``FAILED`` ack; nothing installed; a stalled
        stream is noticed within ``chunk_timeout``). Later calls raise
        ``HandlerClosed``. Blocking (bounded by the operation in flight); every
        call waits the same way, so a second ``close()`` also returns only
        once nothing runs. Called from an ``ack`` or ``progress`` callback of
        a receive or create, it does not wait for that operation, which stops
        before its next write. Must not be called from the state machine's own
        methods (it would wait for itself).

        Does not stop the state machine (the caller owns it).
        """
        with self._cond:
            first = not self._closed
            self._closed = True
            self._cond.notify_all()
            close_listeners, self._close_listeners = self._close_listeners, ()
        if first:
            for listener in close_listeners:
                try:
                    listener()
                except Exception:
                    _log.exception("close listener failed")
            self._watch.close_all()
        self._snapshots.close()  # waits for a create or receive/install in flight
        with self._apply_lock:  # waits for an apply batch in flight; later ones see _closed
            pass


# Fork: a child inherits handlers whose locks may be held by parent threads that
# do not exist in the child (an apply in flight would deadlock it forever). So
# inherited handlers are closed in the child with fresh locks: any use raises
# HandlerClosed naming the fork. A child makes its own handler (and its own
# state machine connection) instead.
FORKED_MESSAGE: Final = (
    "handler was created in the parent process before os.fork(); create a new one in the child"
)
_live_handlers: weakref.WeakSet[StateMachineHandler] = weakref.WeakSet()


def _handlers_after_fork() -> None:
    for handler in list(_live_handlers):
        handler._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_handlers_after_fork)


def _check_contiguous(entries: Sequence[common_pb2.Entry], expected: int) -> None:
    for offset, entry in enumerate(entries):
        if entry.index != expected + offset:
            detail = "first entry" if offset == 0 else f"entry #{offset} breaks the sequence"
            raise ApplyOrderError(expected + offset, entry.index, detail)
