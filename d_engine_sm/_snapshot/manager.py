"""SnapshotManager: the handler's snapshot orchestration (create, prune,
load, receive, install, start-up recovery).

It owns ordering and error translation only; bytes on the wire are decided
by ``receiver``/``chunks``, archives by ``archive`` and the directory by
``store``. Create and install exclude each other in-process through
``_guard`` (non-blocking: a second caller fails at once) and across
processes through the store's ``.lock``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Final

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._fs import FileOps
from d_engine_sm._metrics import Metrics
from d_engine_sm._policy import SnapshotPolicy
from d_engine_sm._snapshot import archive, chunks, naming
from d_engine_sm._snapshot.inbound import receive_archive, send_ack
from d_engine_sm._snapshot.manifest import new_manifest
from d_engine_sm._snapshot.partial import NAMES as PARTIAL_NAMES
from d_engine_sm._snapshot.partial import PartialStore
from d_engine_sm._snapshot.receiver import ReceiveAbort, SnapshotReceiver
from d_engine_sm._snapshot.store import ArchiveInfo, SnapshotStore
from d_engine_sm._snapshot.streams import (
    ChunkStream,
    ChunkTimeout,
    ProgressFn,
    StreamError,
    report,
)
from d_engine_sm._state_machine import StateMachine, declared_format, overrides_prepare
from d_engine_sm._values import LogId
from d_engine_sm.errors import (
    ChunkOutOfRange,
    DEngineError,
    HandlerClosed,
    InsufficientSpace,
    ReadOnlySnapshotDir,
    SnapshotError,
    SnapshotInProgress,
    SnapshotMetadataError,
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
)
from d_engine_sm.proto import storage_pb2

_log = logging.getLogger("d_engine_sm.snapshot")

AckFn = Callable[[storage_pb2.SnapshotAck], None]
SnapshotMetadata = storage_pb2.SnapshotMetadata

_SPACE_MARGIN: Final = 64 * 1024  # gzip/tar overhead over the raw bytes, worst case


class SnapshotManager:
    """Snapshot lifecycle for one handler. Thread-safe."""

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

    @property
    def store(self) -> SnapshotStore:
        return self._store

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
        return _metadata(info.index, info.term, digest)

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

    # -- create ----------------------------------------------------------------
    def create(self, *, progress: ProgressFn | None = None) -> tuple[SnapshotMetadata, Path]:
        started = time.perf_counter()
        try:
            with self._exclusive():
                meta, path = self._create_locked(progress)
        except SnapshotInProgress:
            self._policy.mark_snapshot_skipped()  # no snapshot: no cooldown either
            raise
        except OSError as exc:  # any disk step not translated nearer to it
            self._metrics.incr("snapshot_create_errors")
            raise self._disk_error(exc, 0, "creating snapshot") from exc
        except BaseException:
            self._metrics.incr("snapshot_create_errors")
            raise
        self._metrics.incr("snapshot_creates")
        self._metrics.observe("snapshot_create_seconds", time.perf_counter() - started)
        return meta, path

    def _create_locked(self, progress: ProgressFn | None) -> tuple[SnapshotMetadata, Path]:
        store = self._store
        work_dir = store.new_temp_path("work")
        try:
            self._fs.announce("create:work_dir")
            self._fs.mkdir(work_dir)
            captured = self._capture(work_dir)
            if isinstance(captured, ArchiveInfo):  # already snapshotted at this LogId
                existing = self._existing(captured)
                # Record it too: a create that failed after its rename (say, the
                # directory fsync) published this archive without recording it.
                self._record(existing)
                return existing, captured.path
            last_included, keys = captured
            meta, final = self._pack_and_publish(work_dir, last_included, keys, progress)
        finally:
            store.remove_quietly(work_dir)
        self._record(meta)
        self._prune_quietly()
        self._policy.mark_snapshot_created()
        _log.info(
            "snapshot created index=%d term=%d path=%s",
            meta.last_included.index,
            meta.last_included.term,
            final,
        )
        return meta, final

    def _capture(self, work_dir: Path) -> tuple[LogId, int | None] | ArchiveInfo:
        """Write the state into ``work_dir``; returns the exact LogId it reflects
        and the number of keys at it (for the manifest).

        Applies are paused while the LogId is read and the state captured, so
        the data is exactly the state at that LogId. With a ``prepare_snapshot``
        override only the capture is paused; generate runs alongside applies.
        Returns the existing archive instead when one is already published for
        that LogId (hashing it is left to the caller: not under the pause).
        """
        two_phase = overrides_prepare(self._sm)
        self._pause.acquire()
        paused = True
        try:
            last_included = self._applied()
            existing = self._store.find(last_included.index, last_included.term)
            if existing is not None:
                return existing
            keys = _count_keys(self._sm)  # paused: the state prepare/generate capture
            if two_phase:
                try:
                    self._sm.prepare_snapshot()
                except Exception as exc:
                    raise SnapshotError(f"prepare_snapshot failed: {exc}") from exc
                self._pause.release()
                paused = False
            self._fs.announce("create:generate")
            try:
                self._sm.generate_snapshot_data(work_dir, last_included)
            except Exception as exc:
                raise SnapshotError(f"generate_snapshot_data failed: {exc}") from exc
        finally:
            if paused:
                self._pause.release()
        return last_included, keys

    def _existing(self, info: ArchiveInfo) -> SnapshotMetadata:
        latest = self.latest_metadata()
        lid = latest.last_included if latest is not None else None
        if lid is not None and (lid.index, lid.term) == (info.index, info.term):
            return latest  # type: ignore[return-value]  # checked just above
        return _metadata(info.index, info.term, archive.sha256_file(info.path))

    def _pack_and_publish(
        self, work_dir: Path, last_included: LogId, keys: int | None, progress: ProgressFn | None
    ) -> tuple[SnapshotMetadata, Path]:
        store = self._store
        generated = _tree_size(work_dir)
        manifest = new_manifest(self._sm, keys, generated)
        report(progress, "generate", generated, generated)
        needed = generated + _SPACE_MARGIN
        store.check_space(needed)
        try:
            with store.temp_archive("create") as (temp, out):
                self._fs.announce("create:pack")
                digest, _size = archive.pack(
                    work_dir,
                    out,
                    level=self._config.compression_level,
                    progress=progress,
                    manifest=manifest,
                )
            try:
                self._fs.announce("create:flush")
                self._flush_state()
                final = store.publish(temp, last_included.index, last_included.term)
            except BaseException:
                if not temp.exists():
                    # Renamed, then the directory fsync failed: un-publish, so a
                    # failed create changes nothing (the archive was never recorded).
                    store.remove_quietly(
                        store.archive_path(last_included.index, last_included.term)
                    )
                store.remove_quietly(temp)
                raise
        except OSError as exc:
            raise self._disk_error(exc, needed, "writing snapshot archive") from exc
        return _metadata(last_included.index, last_included.term, digest), final

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

    # -- send ------------------------------------------------------------------
    def _find(self, metadata: SnapshotMetadata) -> ArchiveInfo:
        if not isinstance(metadata, SnapshotMetadata):
            raise TypeError("metadata must be a SnapshotMetadata")
        if not metadata.HasField("last_included"):
            raise SnapshotError("snapshot metadata has no last_included")
        lid = metadata.last_included
        info = self._store.find(lid.index, lid.term)
        if info is None:
            raise SnapshotNotFound(str(self._store.archive_path(lid.index, lid.term)))
        return info

    def _wire_metadata(self, metadata: SnapshotMetadata) -> SnapshotMetadata:
        """The metadata to send: the caller's, with our checksum when it has none."""
        out = SnapshotMetadata()
        out.CopyFrom(metadata)
        if not out.checksum:
            latest = self.latest_metadata()
            if latest is not None and latest.last_included == metadata.last_included:
                out.checksum = latest.checksum
        return out

    def load_data(
        self,
        metadata: SnapshotMetadata,
        *,
        leader_term: int | None,
        progress: ProgressFn | None,
    ) -> Iterator[storage_pb2.SnapshotChunk]:
        info = self._find(metadata)
        term = metadata.last_included.term if leader_term is None else leader_term
        stack = ExitStack()
        try:
            reader = stack.enter_context(self._store.open_reader(info))
        except BaseException:
            stack.close()
            raise
        return ChunkStream(
            stack,
            reader,
            chunk_size=self._config.chunk_size,
            leader_term=term,
            leader_id=self._node_id,
            metadata=self._wire_metadata(metadata),
            metrics=self._metrics,
            progress=progress,
        )

    def load_chunk(
        self, metadata: SnapshotMetadata, seq: int, *, leader_term: int | None
    ) -> storage_pb2.SnapshotChunk:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be an int >= 0, got {seq!r}")
        info = self._find(metadata)
        term = metadata.last_included.term if leader_term is None else leader_term
        size_chunk = self._config.chunk_size
        with self._store.open_reader(info) as reader:
            total = chunks.chunk_count(reader.size, size_chunk)
            if seq >= total:
                raise ChunkOutOfRange(seq, total)
            start, end = chunks.chunk_bounds(seq, reader.size, size_chunk)
            data = reader.read(start, end)
        return chunks.make_chunk(
            seq=seq,
            total=total,
            data=data,
            leader_term=term,
            leader_id=self._node_id,
            metadata=self._wire_metadata(metadata) if seq == 0 else None,
        )

    # -- receive ---------------------------------------------------------------
    def receive(
        self,
        current_term: int,
        stream: Iterable[storage_pb2.SnapshotChunk],
        ack: AckFn,
        config: SnapshotConfig,
        *,
        progress: ProgressFn | None,
    ) -> SnapshotMetadata:
        started = time.perf_counter()
        try:
            exclusive = self._exclusive()
        except SnapshotError:  # in progress, or a read-only directory
            send_ack(ack, _ack(0, storage_pb2.SnapshotAck.FAILED, 0))
            self._metrics.incr("snapshot_receive_errors")
            raise
        with exclusive:
            try:
                meta, size = self._receive_locked(current_term, stream, ack, config, progress)
            except BaseException:
                self._metrics.incr("snapshot_receive_errors")
                raise
        self._metrics.incr("snapshot_receives")
        self._metrics.incr("snapshot_received_bytes", size)
        self._metrics.observe("snapshot_receive_seconds", time.perf_counter() - started)
        return meta

    def install_from_file(
        self,
        path: Path,
        config: SnapshotConfig,
        *,
        last_included: LogId | None,
        checksum: bytes | None,
        progress: ProgressFn | None,
    ) -> SnapshotMetadata:
        """Install a local archive through the receive path (same checks, same install)."""
        lid = last_included if last_included is not None else _log_id_from_name(path, config)
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise SnapshotNotFound(str(path), f"cannot read archive: {exc}") from exc
        digest = checksum if checksum is not None else archive.sha256_file(path)
        meta = _metadata(lid.index, lid.term, digest)
        return self.receive(
            0,
            _file_chunks(path, size, meta, config.chunk_size),
            lambda _ack: None,
            config,
            progress=progress,
        )

    def _receive_locked(
        self,
        current_term: int,
        stream: Iterable[storage_pb2.SnapshotChunk],
        ack: AckFn,
        config: SnapshotConfig,
        progress: ProgressFn | None,
    ) -> tuple[SnapshotMetadata, int]:
        last_applied = self._applied().index
        with ExitStack() as cleanup:
            received, rx = receive_archive(
                cleanup,
                store=self._store,
                partials=self._partials,
                config=config,
                stream=stream,
                ack=ack,
                last_applied=last_applied,
                progress=progress,
                expected_format=declared_format(self._sm),
                closed=lambda: self._closed,
                on_error=lambda exc, abort, rx: self._receive_error(exc, abort, rx, last_applied),
            )
            meta = received.metadata
            self._install(
                meta,
                received.archive,
                received.unpack_dir,
                progress,
                lambda reason: _send_fail(ack, rx, reason),
            )
            return meta, received.size
        raise AssertionError("unreachable")  # pragma: no cover

    def _receive_error(
        self,
        exc: BaseException,
        abort: ReceiveAbort | None,
        rx: SnapshotReceiver,
        last_applied: int,
    ) -> BaseException:
        """The public error for a failed receive (the final ack was already sent)."""
        error: SnapshotError
        if isinstance(exc, OSError):
            error = self._disk_error(exc, rx.expected_bytes, "receiving snapshot")
        elif isinstance(exc, StreamError):
            error = SnapshotTransferError(f"stream error: {exc.__cause__!r}", seq=rx.received)
            exc = exc.__cause__ or exc
        elif isinstance(exc, TypeError):  # the stream yielded something else than chunks
            error = SnapshotTransferError(str(exc), seq=rx.received)
        elif isinstance(exc, MemoryError):  # still a final ack and a library error
            error = SnapshotTransferError("out of memory", seq=rx.received)
        elif isinstance(exc, (ReceiveAbort, ChunkTimeout)) and abort is not None:
            return _translate(abort, last_applied)
        else:
            return exc
        error.__cause__ = exc
        return error

    def _install(
        self,
        meta: SnapshotMetadata,
        temp: Path,
        unpack_dir: Path,
        progress: ProgressFn | None,
        fail: Callable[[str], None],
    ) -> None:
        """Swap the state for the unpacked snapshot, then keep the archive as the newest."""
        store = self._store
        lid = meta.last_included
        failure: DEngineError | None = None
        try:
            self._fs.announce("install:apply")
        except OSError as exc:
            fail(str(exc))
            raise self._disk_error(exc, 0, "installing snapshot") from exc
        with self._pause:
            applied = self._applied()
            if self._closed:
                failure = HandlerClosed("handler closed before the snapshot was installed")
            elif lid.index <= applied.index:
                failure = StaleSnapshotError(lid.index, applied.index)
            else:
                try:
                    self._sm.apply_snapshot_from_file(meta, unpack_dir)
                except Exception as exc:
                    failure = SnapshotError(f"apply_snapshot_from_file failed: {exc}")
                    failure.__cause__ = exc
                else:
                    self._publish_applied(LogId(index=lid.index, term=lid.term))
        # Acks and listeners are user code: called only after the pause ends.
        if failure is not None:
            fail(str(failure))
            raise failure
        self._notify_applied(lid.index)
        size = os.path.getsize(temp)
        report(progress, "install", size, size)
        try:
            self._fs.announce("install:flush")
            self._flush_state()
        except (OSError, SnapshotError) as exc:
            _log.warning("installed state not flushed; archive not kept error=%r", exc)
            return
        try:
            self._fs.announce("install:publish")
            final = store.publish(temp, lid.index, lid.term)
        except OSError as exc:
            # Installed but not kept: the state is right; only serving it onward waits
            # for the next local snapshot.
            _log.warning("keeping received archive failed index=%d error=%r", lid.index, exc)
            return
        kept = SnapshotMetadata()
        kept.CopyFrom(meta)
        if len(kept.checksum) != 32:
            kept.checksum = archive.sha256_file(final)
        self._record(kept)
        self._prune_quietly()
        _log.info("snapshot installed index=%d term=%d path=%s", lid.index, lid.term, final)

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


# -- helpers ---------------------------------------------------------------------
def _metadata(index: int, term: int, digest: bytes) -> SnapshotMetadata:
    return SnapshotMetadata(last_included=LogId(index=index, term=term), checksum=digest)


def _ack(seq: int, status: int, next_requested: int) -> storage_pb2.SnapshotAck:
    return storage_pb2.SnapshotAck(seq=seq, status=status, next_requested=next_requested)  # type: ignore[arg-type]


def _send_fail(ack: AckFn, rx: SnapshotReceiver, reason: str) -> None:
    abort = rx.fail(reason)
    if abort.ack is not None:
        send_ack(ack, abort.ack)


def _translate(abort: ReceiveAbort, last_applied: int) -> SnapshotTransferError:
    if abort.stale:
        return StaleSnapshotError(abort.snapshot_index, last_applied)
    if abort.bad_field is not None:
        return SnapshotMetadataError(abort.bad_field, abort.reason)
    return SnapshotTransferError(abort.reason, seq=abort.seq, status=abort.status)


def _count_keys(sm: StateMachine) -> int | None:
    try:
        return len(sm)
    except Exception:  # a manifest without a key count is still a manifest
        return None


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _log_id_from_name(path: Path, config: SnapshotConfig) -> LogId:
    """The LogId in an archive's name: ours, or any ``…<index>-<term>.tar.gz``."""
    found = naming.parse_archive_name(path.name, config.snapshots_dir_prefix)
    if found is None:
        match = re.search(r"(\d+)-(\d+)\.tar\.gz$", path.name)
        if match is None:
            raise ValueError(
                f"cannot tell the LogId of {path.name!r}: name it <prefix><index>-<term>.tar.gz"
                " or pass last_included"
            )
        found = int(match.group(1)), int(match.group(2))
    return LogId(index=found[0], term=found[1])


def _file_chunks(
    path: Path, size: int, meta: SnapshotMetadata, chunk_size: int
) -> Iterator[storage_pb2.SnapshotChunk]:
    """A local archive as the chunk stream a leader would send (seq 0 carries ``meta``)."""
    total = chunks.chunk_count(size, chunk_size)
    term = meta.last_included.term
    with open(path, "rb") as src:
        for seq in range(total):
            yield chunks.make_chunk(
                seq=seq,
                total=total,
                data=src.read(chunk_size),
                leader_term=term,
                leader_id=0,
                metadata=meta if seq == 0 else None,
            )
