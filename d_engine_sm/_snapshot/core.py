"""ManagerCore: the state and guards every snapshot operation shares.

The handler's snapshot orchestration is split by concern: this core (start-up
recovery, the in-process guard and directory lock, recording and pruning,
disk-error translation), ``create`` (capture, pack, publish), ``outbound``
(serve an archive as chunks) and ``install`` (receive or read an archive,
then swap the state for it). ``manager.SnapshotManager`` joins them.

Create and install exclude each other in-process through ``_guard``
(non-blocking: a second caller fails at once) and across processes through
the store's ``.lock``.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._fs import FileOps
from d_engine_sm._metrics import Metrics
from d_engine_sm._policy import SnapshotPolicy
from d_engine_sm._snapshot.partial import NAMES as PARTIAL_NAMES
from d_engine_sm._snapshot.partial import PartialStore
from d_engine_sm._snapshot.store import ArchiveInfo, SnapshotStore
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import LogId
from d_engine_sm.errors import (
    HandlerClosed,
    InsufficientSpace,
    ReadOnlySnapshotDir,
    SnapshotError,
    SnapshotInProgress,
)
from d_engine_sm.proto import storage_pb2

_log = logging.getLogger("d_engine_sm.snapshot")

SnapshotMetadata = storage_pb2.SnapshotMetadata


class ManagerCore:
    """State, guards and shared steps of the snapshot lifecycle. Thread-safe."""

    def __init__(
        self,
        sm: StateMachine,
        config: SnapshotConfig,
        *,
        node_id: int,
        policy: SnapshotPolicy,
        metrics: Metrics,
        pause_applies: threading.Lock,
        applied: Callable[[], LogId],
        publish_applied: Callable[[LogId], None],
        notify_applied: Callable[[int], None],
        file_ops: FileOps,
    ) -> None:
        self._sm = sm
        self._config = config
        self._node_id = node_id
        self._policy = policy
        self._metrics = metrics
        self._pause = pause_applies
        self._applied = applied
        self._publish_applied = publish_applied  # under the pause: jump + wake waiters
        self._notify_applied = notify_applied  # after it: listeners (user code)
        self._fs = file_ops
        self._store = SnapshotStore(
            config.snapshots_dir,
            config.snapshots_dir_prefix,
            fs=file_ops,
            fsync=config.fsync,
            keep_broken=config.keep_broken,
        )
        self._partials = PartialStore(
            self._store, ttl=config.resume_ttl, max_bytes=config.resume_max_bytes
        )
        self._guard = threading.Lock()
        self._guard_owner: int | None = None  # thread running a create or receive
        self._closed = False
        self._meta_lock = threading.Lock()
        self._latest: SnapshotMetadata | None = self._recover()

    # -- start-up ----------------------------------------------------------
    def _recover(self) -> SnapshotMetadata | None:
        """Find the newest valid archive; tidy the directory only when we may write.

        Tidying (removing leftovers, moving corrupt archives aside) needs a
        writable directory, the writer lock and a handler that may write. On a
        read-only directory or handler, or while another process writes (its
        temp files are live), only look:
        verify newest first, skip what fails, change nothing.
        """
        store = self._store
        if not store.directory.is_dir():
            return None
        found: tuple[ArchiveInfo, bytes] | None
        if self._config.read_only or not store.is_writable():
            _log.info("recover without tidying (read-only) dir=%s", store.directory)
            found = store.recover(tidy=False)
        else:
            try:
                with store.writer_lock():
                    # A fresh partial transfer survives start-up; a stale one goes.
                    fresh = self._partials.load() is not None
                    found = store.recover(keep=PARTIAL_NAMES if fresh else frozenset())
            except (SnapshotInProgress, ReadOnlySnapshotDir) as exc:
                _log.info("recover without tidying dir=%s reason=%s", store.directory, exc)
                found = store.recover(tidy=False)
        if found is None:
            return None
        info, digest = found
        _log.info("recovered snapshot index=%d term=%d path=%s", info.index, info.term, info.path)
        return snapshot_metadata(info.index, info.term, digest)

    # -- queries -------------------------------------------------------------
    def in_progress(self) -> bool:
        return self._guard.locked()

    def latest_metadata(self) -> SnapshotMetadata | None:
        with self._meta_lock:
            if self._latest is None:
                return None
            copy = SnapshotMetadata()
            copy.CopyFrom(self._latest)
            return copy

    def _set_latest(self, meta: SnapshotMetadata) -> None:
        with self._meta_lock:
            current = self._latest
            if current is None or meta.last_included.index >= current.last_included.index:
                self._latest = meta

    # -- guards, close ---------------------------------------------------------
    def _check_writer(self, directory: Path) -> None:
        if self._config.read_only:
            raise ReadOnlySnapshotDir(
                str(directory), "read-only handler: SnapshotConfig(read_only=True)"
            )

    def _exclusive(self) -> ExitStack:
        """Guard + directory lock, or SnapshotInProgress at once."""
        self._check_writer(self._store.directory)
        if not self._guard.acquire(blocking=False):
            if self._closed:
                raise HandlerClosed("handler is closed")
            raise SnapshotInProgress("a snapshot create or install is already running")
        stack = ExitStack()
        stack.callback(self._release_guard)
        self._guard_owner = threading.get_ident()
        try:
            if self._closed:  # set before close() waits for the guard: checked after taking it
                raise HandlerClosed("handler is closed")
            stack.enter_context(self._store.writer_lock())  # creates the directory
        except BaseException:
            stack.close()
            raise
        return stack

    def _release_guard(self) -> None:
        self._guard_owner = None
        self._guard.release()

    def close(self) -> None:
        """Refuse new creates/receives; wait for the one in flight (see the handler's)."""
        self._closed = True
        if self._guard_owner == threading.get_ident():
            return
        with self._guard:  # the create or receive in flight holds it
            pass

    def after_fork_in_child(self, pause_applies: threading.Lock) -> None:
        """Closed, with fresh locks: the parent's threads that held them are gone."""
        self._closed, self._guard_owner, self._pause = True, None, pause_applies
        self._guard, self._meta_lock = threading.Lock(), threading.Lock()

    # -- record, prune -------------------------------------------------------
    def _flush_state(self) -> None:
        """Make the state durable before an archive of it is published.

        After a power loss the newest archive must never be ahead of the
        state (with ``durability="normal"`` SQLite does not fsync its WAL at
        commit): the state an archive reflects is flushed first.
        """
        try:
            self._sm.flush()
        except Exception as exc:
            raise SnapshotError(f"flushing the state machine failed: {exc}") from exc

    def _record(self, meta: SnapshotMetadata) -> None:
        if self._closed:  # closed from a callback of this very operation: no more writes
            _log.info("handler closed; snapshot metadata not recorded in the state machine")
            self._set_latest(meta)
            return
        try:
            self._fs.announce("record")
            self._sm.update_last_snapshot_metadata(meta)
            self._sm.persist_last_snapshot_metadata(meta)
        except Exception as exc:
            # The archive is published and valid; the state machine's record of
            # it is advisory (start-up recovery reads the directory).
            _log.warning("recording snapshot metadata failed error=%r", exc)
        self._set_latest(meta)
        self._partials.discard_if_older(meta.last_included.index)

    def _prune_quietly(self) -> None:
        try:
            self._store.prune(self._config.cleanup_retain_count)
        except OSError as exc:
            _log.warning("prune after snapshot failed error=%r", exc)

    # -- cleanup ---------------------------------------------------------------
    def cleanup(
        self, retain_count: int, snapshot_dir: Path | None, prefix: str | None
    ) -> list[Path]:
        if isinstance(retain_count, bool) or not isinstance(retain_count, int):
            raise TypeError("retain_count must be an int")
        if retain_count < 1:
            raise ValueError(f"retain_count must be >= 1, got {retain_count}")
        self._check_writer(
            Path(snapshot_dir) if snapshot_dir is not None else self._store.directory
        )
        store = self._store
        if snapshot_dir is not None or prefix is not None:
            store = SnapshotStore(
                Path(snapshot_dir) if snapshot_dir is not None else store.directory,
                prefix if prefix is not None else store.prefix,
                fs=self._fs,
                fsync=self._config.fsync,
                keep_broken=self._config.keep_broken,
            )
        if not store.directory.is_dir():
            return []
        try:
            with store.writer_lock():
                return store.prune(retain_count)
        except OSError as exc:
            raise SnapshotError(f"cleanup failed in {store.directory}: {exc}") from exc

    def _disk_error(self, exc: OSError, needed: int, doing: str) -> SnapshotError:
        """``ENOSPC`` becomes InsufficientSpace (with what is free now), the rest SnapshotError."""
        directory = self._store.directory
        if exc.errno == errno.ENOSPC:
            try:
                free = self._fs.disk_free(directory)
            except OSError:
                free = 0
            return InsufficientSpace(str(directory), needed, free)
        return SnapshotError(f"{doing} failed in {directory}: {exc}")


def snapshot_metadata(index: int, term: int, digest: bytes) -> SnapshotMetadata:
    return SnapshotMetadata(last_included=LogId(index=index, term=term), checksum=digest)
