"""Install: receive (or read from a file) an archive, then swap the state for it.

The bytes of a receive are checked and written by ``inbound``; this module
orders the install under the applies pause and translates failures once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._snapshot import archive, chunks, naming
from d_engine_sm._snapshot.core import ManagerCore, SnapshotMetadata, snapshot_metadata
from d_engine_sm._snapshot.inbound import AckFn, receive_archive, send_ack
from d_engine_sm._snapshot.receiver import ReceiveAbort, SnapshotReceiver
from d_engine_sm._snapshot.streams import ChunkTimeout, ProgressFn, StreamError, report
from d_engine_sm._state_machine import declared_format
from d_engine_sm._values import LogId
from d_engine_sm.errors import (
    DEngineError,
    HandlerClosed,
    SnapshotError,
    SnapshotMetadataError,
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
)
from d_engine_sm.proto import storage_pb2

_log = logging.getLogger("d_engine_sm.snapshot")


class Installing(ManagerCore):
    """``receive`` and ``install_from_file``: both end in the same install."""

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
            send_ack(ack, storage_pb2.SnapshotAck(seq=0, status=storage_pb2.SnapshotAck.FAILED))
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
        meta = snapshot_metadata(lid.index, lid.term, digest)
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
        lid = meta.last_included
        failure: DEngineError | None = None
        try:
            self._fs.announce("install:apply")
        except OSError as exc:
            fail(str(exc))
            raise self._disk_error(exc, 0, "installing snapshot") from exc
        self._prepare(meta, unpack_dir, fail)
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
        self._keep_installed(meta, temp)

    def _prepare(
        self, meta: SnapshotMetadata, unpack_dir: Path, fail: Callable[[str], None]
    ) -> None:
        """The state machine's slow, state-independent part, with applies still running.

        Skipped when the install will be refused anyway (stale, closed): the
        paused step checks again and says why.
        """
        if self._closed or meta.last_included.index <= self._applied().index:
            return
        try:
            self._sm.prepare_install(meta, unpack_dir)
        except Exception as exc:
            failure = SnapshotError(f"prepare_install failed: {exc}")
            fail(str(failure))
            raise failure from exc

    def _keep_installed(self, meta: SnapshotMetadata, temp: Path) -> None:
        """Flush the installed state, then publish its archive as the newest."""
        lid = meta.last_included
        try:
            self._fs.announce("install:flush")
            self._flush_state()
        except (OSError, SnapshotError) as exc:
            _log.warning("installed state not flushed; archive not kept error=%r", exc)
            return
        try:
            self._fs.announce("install:publish")
            final = self._store.publish(temp, lid.index, lid.term)
        except OSError as exc:
            # Installed but not kept: the state is right; only serving it onward waits
            # for the next local snapshot.
            _log.warning("keeping received archive failed index=%d error=%r", lid.index, exc)
            return
        kept = SnapshotMetadata()
        kept.CopyFrom(meta)  # its checksum is the SHA-256 the receive verified
        self._record(kept)
        self._prune_quietly()
        _log.info("snapshot installed index=%d term=%d path=%s", lid.index, lid.term, final)


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
