"""The tick-thread side of the PySyncObj integration.

Theory of operation
-------------------
PySyncObj runs everything on one tick thread: elections, replication, and
applying committed entries. Anything slow there stalls heartbeats and starts
elections, so this module keeps the tick thread's work to bookkeeping:

* ``Forwarder.on_regular`` is the one ``@replicated`` method's body: it
  records the command under its index (``raftLastApplied + 1``, PySyncObj's
  ordering) and returns the index, which PySyncObj hands to the proposer's
  callback.
* ``Forwarder.on_tick`` turns every log index up to ``raftLastApplied`` into
  exactly one ``Entry`` with the log's own term (PySyncObj's no-op,
  membership and version entries become no-ops) and submits them in one
  batch to the ``ApplyWorker``; the apply runs on the worker's thread.
  Indexes the state machine already holds (a restart replaying the journal)
  are never forwarded again.
* When the entries the state machine needs were compacted away (a wiped or
  far-behind follower got the leader's dump), forwarding pauses and a
  background thread fetches the newest archive over gRPC (or installs a
  local one), verified by SHA-256, then forwarding resumes after it.
* ``Compaction`` plugs PySyncObj's custom ``serializer``/``deserializer``/
  ``serializeChecker``: log compaction starts a background job that waits
  until the state machine has applied the compaction point, creates this
  library's archive, then durably writes the small dump (``_dump``) that
  PySyncObj stores and sends. Until the job reports SUCCESS PySyncObj keeps
  its journal, so the journal never drops an entry the state machine lacks.
  Requests that come faster than archives can be made cheaply are
  coalesced: the job waits ``ARCHIVE_SPACING`` times the last create's
  duration, then archives everything applied by then (past the requested
  point), so compaction every few thousand entries does not mean an archive
  every few thousand entries. ``hurry`` (a forced compaction) skips the wait.

Thread ownership: ``_forwarded`` belongs to the tick thread; the tick thread
only adds recorded commands and a feeder thread takes them (building entries
and submitting them, which may block on back-pressure, happens there); jobs
hand their outcome back through attributes read by the tick thread under
``_lock``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pysyncobj.config import SERIALIZER_STATE  # type: ignore[import-untyped]
from pysyncobj.node import TCPNode  # type: ignore[import-untyped]
from pysyncobj.pickle import loads as pysyncobj_loads  # type: ignore[import-untyped]

from d_engine_sm import _kv
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._snapshot.naming import archive_name
from d_engine_sm._values import LogId
from d_engine_sm._worker import ApplyWorker
from d_engine_sm.errors import DEngineError, StaleSnapshotError
from d_engine_sm.integrations import _dump
from d_engine_sm.proto import common_pb2

_log = logging.getLogger("d_engine_sm.pysyncobj")

REGULAR: Final = 0  # PySyncObj's _COMMAND_TYPE.REGULAR
MAX_FORWARD_PER_TICK: Final = 4_000
MAX_QUEUED: Final = 200_000
SNAPSHOT_WAIT: Final = 600.0  # seconds a compaction waits for applies to reach its point
FAILED_BACKOFF: Final = 1.0
# After an archive that took T seconds, the next one starts no sooner than
# ARCHIVE_SPACING * T later (at most ARCHIVE_MAX_DEFER): archive work stays a
# fraction of the node's CPU however small logCompactionMinEntries is.
ARCHIVE_SPACING: Final = 3.0
ARCHIVE_MAX_DEFER: Final = 30.0
FETCH_TIMEOUT: Final = 3600.0  # whole transfer; chunk_timeout bounds a stuck peer
BARRIER: Final = None  # the replicated argument of a barrier (becomes a no-op entry)


@dataclass
class Stats:
    snapshots_created: int = 0
    snapshots_installed: int = 0
    snapshot_create_seconds: float = 0.0
    catch_up_seconds: float = 0.0
    max_hook_seconds: float = 0.0  # CPU time of one hook call on the tick thread
    max_hook_wall_seconds: float = 0.0  # the same call's wall time (includes GIL waits)
    max_tick_gap_seconds: float = 0.0
    elections_seen: int = 0
    catch_up_term_changes: int = 0  # term moves while an archive was being fetched/installed

    def hook(self, started: tuple[float, float]) -> None:
        cpu, wall = time.thread_time() - started[0], time.perf_counter() - started[1]
        self.max_hook_seconds = max(self.max_hook_seconds, cpu)
        self.max_hook_wall_seconds = max(self.max_hook_wall_seconds, wall)


def _now() -> tuple[float, float]:
    return time.thread_time(), time.perf_counter()


class Forwarder:
    """Maps PySyncObj's applied log onto the handler's entries (tick thread)."""

    def __init__(
        self,
        handler: StateMachineHandler,
        worker: ApplyWorker,
        engine: Callable[[], Any],
        stats: Stats,
        fetch: Callable[[int], None],
    ) -> None:
        self._handler = handler
        self._worker = worker
        self._engine = engine
        self._stats = stats
        self._fetch = fetch  # starts a catch-up to at least the given index
        self._commands: dict[int, bytes | None] = {}
        self._forwarded = handler.last_applied()
        self._lock = threading.Lock()
        self._resume_at: int | None = None  # set by a finished catch-up
        self.catching_up = False
        self.failed: str | None = None
        self._last_tick = time.perf_counter()
        self._last_term = -1
        self._catch_up_term = 0
        # Entries handed to the feeder and entries it submitted: each written by one thread.
        self._fed = 0
        self._submitted = 0
        self._feed: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._feeder_thread = threading.Thread(
            target=self._feeder, name="d-engine-sm-feeder", daemon=True
        )
        self._feeder_thread.start()

    @property
    def forwarded(self) -> int:
        return self._forwarded

    def on_regular(self, command: bytes | None) -> int:
        index: int = self._engine().raftLastApplied + 1
        self._commands[index] = command
        return index

    def resume(self, applied: int) -> None:
        """A catch-up finished (any thread): forwarding continues after ``applied``."""
        with self._lock:
            self._resume_at = applied

    def on_tick(self) -> None:
        started = _now()
        gap = started[1] - self._last_tick
        self._last_tick = started[1]
        self._stats.max_tick_gap_seconds = max(self._stats.max_tick_gap_seconds, gap)
        engine = self._engine()
        term = engine.raftCurrentTerm
        if term != self._last_term:
            if self._last_term >= 0:
                self._stats.elections_seen += term - self._last_term
            self._last_term = term
        try:
            self._forward(engine)
        finally:
            self._stats.hook(started)

    def _forward(self, engine: Any) -> None:
        if self.failed is not None:
            return
        with self._lock:
            resume, self._resume_at = self._resume_at, None
        if resume is not None:
            self.catching_up = False
            self._stats.catch_up_term_changes += engine.raftCurrentTerm - self._catch_up_term
            self._forwarded = max(self._forwarded, resume)
            self._feed.put(_Drop(self._forwarded))
        if self.catching_up:
            return
        high = engine.raftLastApplied
        low = self._forwarded + 1
        if low > high or self._fed - self._submitted + self._worker.queued_entries > MAX_QUEUED:
            return
        log = engine._SyncObj__raftLog
        first = log[0][1]
        if low < first:
            # The journal no longer holds what the state machine needs: PySyncObj
            # loaded a dump. Fetch an archive at or past the dump's point.
            self.catching_up = True
            self._catch_up_term = engine.raftCurrentTerm
            _log.info("catch-up needed applied=%d journal_first=%d", low - 1, first)
            self._fetch(first)
            return
        count = min(high - low + 1, MAX_FORWARD_PER_TICK)
        # One C-level slice here; building entries and submitting happen on the
        # feeder thread, off the tick thread.
        rows = log[low - first : low - first + count]
        # PySyncObj truncates and re-appends a follower's log on a resend, so for a
        # moment its journal can end below raftLastApplied: forward only what is there.
        if not rows or rows[0][1] != low:
            return
        self._fed += len(rows)
        self._feed.put(rows)
        self._forwarded = rows[-1][1]

    def _feeder(self) -> None:
        while True:
            item = self._feed.get()
            if item is None:
                return
            if isinstance(item, _Drop):
                for stale in [i for i in list(self._commands) if i <= item.upto]:
                    self._commands.pop(stale, None)
                continue
            try:
                entries = [self._entry(row) for row in item]
                self._worker.submit(entries)
            except DEngineError as exc:  # the worker stopped (its FatalError says why)
                self.failed = f"apply worker: {exc}"
                _log.error("forwarding stopped: %s", exc)
                return
            finally:
                self._submitted += len(item)

    def close(self, timeout: float) -> None:
        """Submit what was handed over, then stop the feeder (after the tick thread ended)."""
        self._feed.put(None)
        self._feeder_thread.join(timeout)

    def _entry(self, row: tuple[bytes, int, int]) -> common_pb2.Entry:
        raw, index, term = row
        command = self._commands.pop(index, _MISSING)
        if command is _MISSING:
            command = _decode_regular(raw)
        if command is None:
            return _kv.noop_entry(index, term)
        assert isinstance(command, bytes)
        return _kv.command_entry(index, term, command)


@dataclass(frozen=True)
class _Drop:
    """Feeder message: forget recorded commands up to ``upto`` (covered by an install)."""

    upto: int


_MISSING: Final = object()


def _decode_regular(raw: bytes) -> object:
    """Our command from a REGULAR journal entry; None (a no-op) for the rest."""
    if not raw or raw[0] != REGULAR:
        return None
    call = pysyncobj_loads(raw[1:])
    if isinstance(call, tuple) and len(call) >= 2 and len(call[1]) == 1:
        arg = call[1][0]
        return arg if isinstance(arg, bytes) else None
    return None


def check_journal(handler: StateMachineHandler, log: Any) -> str | None:
    """Why the state machine does not belong to this journal, or None.

    The state's last applied LogId must appear in the journal with the same
    term whenever the journal covers that index.
    """
    applied: LogId = handler.state_machine.last_applied()
    if applied.index == 0 or len(log) == 0:
        return None
    first, last = log[0][1], log[len(log) - 1][1]
    if first <= applied.index <= last:
        term = log[applied.index - first][2]
        if term != applied.term:
            return (
                f"the state machine applied index {applied.index} at term {applied.term},"
                f" but this node's Raft log has term {term} there"
            )
    return None


class Compaction:
    """PySyncObj's custom serializer/deserializer/serializeChecker."""

    def __init__(
        self,
        handler: StateMachineHandler,
        dump_path: Path,
        cluster_id: str,
        source: str | None,
        stats: Stats,
        *,
        engine: Callable[[], Any] = lambda: None,
    ) -> None:
        self._handler = handler
        self._engine = engine
        self._dump_path = dump_path
        self._cluster_id = cluster_id
        self.source = source
        self._stats = stats
        self._lock = threading.Lock()
        self._state = SERIALIZER_STATE.NOT_SERIALIZING
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()  # cuts a deferral short (hurry or close)
        self._next_at = 0.0  # monotonic time before which no archive starts
        self.loaded: _dump.Dump | None = None  # the dump PySyncObj loaded last

    # -- PySyncObj's hooks (tick thread) ------------------------------------
    def serializer(self, _tmp_file: str, data: tuple[Any, Any, Any]) -> None:
        started = _now()
        last, prev, cluster = data
        members = tuple(sorted(str(node.address) for node in cluster))
        with self._lock:
            self._state = SERIALIZER_STATE.SERIALIZING
        self._thread = threading.Thread(
            target=self._job,
            args=(tuple(last), tuple(prev), members),
            name="d-engine-sm-compaction",
            daemon=True,
        )
        self._thread.start()
        self._stats.hook(started)
        # Raising keeps PySyncObj from renaming its temp file over the dump:
        # the job writes the dump itself, durably, once the archive exists.
        raise _Deferred("archive is created in the background")

    def checker(self) -> int:
        with self._lock:
            state = self._state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._state = SERIALIZER_STATE.NOT_SERIALIZING
            return int(state)

    def deserializer(self, file_name: str) -> tuple[Any, Any, Any]:
        started = _now()
        try:
            dump = _dump.read(Path(file_name))
            if dump.cluster_id != self._cluster_id:
                raise _dump.ClusterMismatch(
                    f"dump {file_name} belongs to cluster {dump.cluster_id!r},"
                    f" this node to {self._cluster_id!r}"
                )
            self.loaded = dump
            _log.info(
                "dump loaded index=%d archive=%d-%d source=%s",
                dump.last[1],
                dump.archive_index,
                dump.archive_term,
                dump.source,
            )
            members = [TCPNode(m) for m in dump.members]
            return dump.last, dump.prev, members
        except Exception:
            _log.exception("refusing dump path=%s", file_name)
            raise
        finally:
            self._stats.hook(started)

    def hurry(self) -> None:
        """The next (or a deferred) archive starts at once (any thread)."""
        self._next_at = 0.0
        self._wake.set()

    # -- the background job ----------------------------------------------------
    def _job(self, last: _dump.LogEntry, prev: _dump.LogEntry, members: Sequence[str]) -> None:
        outcome = SERIALIZER_STATE.FAILED
        try:
            delay = self._next_at - time.monotonic()
            if delay > 0 and self._wake.wait(delay):
                _log.debug("compaction deferral cut short")
            self._wake.clear()
            if self._closed.is_set():
                raise _Closing("node is closing")
            self._handler.wait_applied(last[1], SNAPSHOT_WAIT)
            started = time.perf_counter()
            meta, path = self._handler.create_snapshot()
            lid = meta.last_included
            last, prev = self._advance(last, prev, lid.index)
            dump = _dump.Dump(
                cluster_id=self._cluster_id,
                last=last,
                prev=prev,
                members=tuple(members),
                archive_index=lid.index,
                archive_term=lid.term,
                archive_sha256=bytes(meta.checksum),
                source=self.source,
            )
            _dump.write_durably(self._dump_path, dump)
            self._stats.snapshots_created += 1
            seconds = time.perf_counter() - started
            self._stats.snapshot_create_seconds = seconds
            self._next_at = time.monotonic() + min(ARCHIVE_MAX_DEFER, ARCHIVE_SPACING * seconds)
            _log.info("compacted upto=%d archive=%s", last[1], path.name)
            outcome = SERIALIZER_STATE.SUCCESS
        except (DEngineError, _Closing) as exc:
            _log.warning("compaction at index=%d failed: %s", last[1], exc)
        except Exception:
            _log.exception("compaction at index=%d failed", last[1])
        if outcome == SERIALIZER_STATE.FAILED:
            self._closed.wait(FAILED_BACKOFF)  # PySyncObj retries at once otherwise
        with self._lock:
            if outcome == SERIALIZER_STATE.SUCCESS:
                # PySyncObj trims its journal up to this index once it sees SUCCESS.
                self._set_point(prev[1])
            self._state = outcome

    def _advance(
        self, last: _dump.LogEntry, prev: _dump.LogEntry, index: int
    ) -> tuple[_dump.LogEntry, _dump.LogEntry]:
        """The compaction point moved up to the archive's ``index`` when the journal holds it.

        PySyncObj rewrites the entries it keeps after a compaction on its tick
        thread; after a deferral those would be every entry since the request.
        Entries up to ``raftLastApplied`` are committed, and PySyncObj trims
        nothing while this job runs, so reading them here is safe.
        """
        engine = self._engine()
        if engine is None or index <= last[1] or index > engine.raftLastApplied:
            return last, prev
        log = engine._SyncObj__raftLog
        pos = index - log[0][1]
        if pos < 1 or pos >= len(log):
            return last, prev
        new_prev, new_last = tuple(log[pos - 1]), tuple(log[pos])
        if new_last[1] != index or new_prev[1] != index - 1:
            return last, prev
        return new_last, new_prev

    def _set_point(self, index: int) -> None:
        engine = self._engine()
        if engine is not None:
            engine._SyncObj__serializer._Serializer__currentID = index

    def close(self, timeout: float) -> None:
        self._closed.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


class _Closing(Exception):
    """A deferred compaction gave up because the node is closing."""


class _Deferred(Exception):
    """Raised by the serializer so PySyncObj leaves the dump file to the job."""


class CatchUp:
    """Brings the state machine to an archive past a compaction point (own thread)."""

    def __init__(
        self,
        handler: StateMachineHandler,
        worker_applied: Callable[[], int],
        sources: Callable[[], list[str]],
        on_done: Callable[[int], None],
        stats: Stats,
    ) -> None:
        self._handler = handler
        self._worker_applied = worker_applied
        self._sources = sources
        self._on_done = on_done
        self._stats = stats
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, needed: int) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(needed,), name="d-engine-sm-catch-up", daemon=True
        )
        self._thread.start()

    def _run(self, needed: int) -> None:
        started = time.perf_counter()
        handler = self._handler
        try:
            # What was already forwarded is applied first: the install must not
            # race queued entries below it.
            handler.wait_applied(self._worker_applied(), SNAPSHOT_WAIT)
            while not self._closed.is_set() and handler.last_applied() < needed - 1:
                if not self._try_once(needed):
                    self._closed.wait(FAILED_BACKOFF)
        except DEngineError as exc:
            _log.error("catch-up stopped: %s", exc)
            return
        self._stats.catch_up_seconds = time.perf_counter() - started
        _log.info(
            "caught up applied=%d seconds=%.3f",
            handler.last_applied(),
            self._stats.catch_up_seconds,
        )
        self._on_done(handler.last_applied())

    def _try_once(self, needed: int) -> bool:
        handler = self._handler
        local = handler.get_latest_snapshot_metadata()
        lid = None if local is None else local.last_included
        if lid is not None and lid.index >= needed - 1 and lid.index > handler.last_applied():
            _log.info("installing local archive index=%d", lid.index)
            self._install_local(lid.index, lid.term)
            return handler.last_applied() >= needed - 1
        from d_engine_sm.transport.grpc import pull_snapshot

        for source in self._sources():
            try:
                meta = pull_snapshot(source, handler, timeout=FETCH_TIMEOUT)
            except StaleSnapshotError:
                continue
            except DEngineError as exc:
                _log.warning("catch-up from %s failed: %s", source, exc)
                continue
            self._stats.snapshots_installed += 1
            _log.info(
                "catch-up archive installed index=%d from=%s", meta.last_included.index, source
            )
            if handler.last_applied() >= needed - 1:
                return True
        return False

    def _install_local(self, index: int, term: int) -> None:
        config = self._handler.config
        path = Path(config.snapshots_dir) / archive_name(config.snapshots_dir_prefix, index, term)
        try:
            self._handler.install_snapshot_from_file(
                path, last_included=LogId(index=index, term=term)
            )
        except DEngineError as exc:
            _log.warning("installing local archive %s failed: %s", path, exc)
            return
        self._stats.snapshots_installed += 1

    def close(self, timeout: float) -> None:
        self._closed.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
