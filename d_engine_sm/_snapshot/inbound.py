"""Receiving one snapshot stream into a verified, unpacked archive (the I/O driver).

The pure :class:`~d_engine_sm._snapshot.receiver.SnapshotReceiver` decides;
this module does what it says: pulls the caller's stream with a timeout,
sends acks, appends accepted bytes to the directory's partial-transfer file
(``partial.py``), hashes and unpacks them on the fly, and, when the stream
fails because the peer or connection went away, keeps the verified prefix
for a later transfer of the same snapshot to resume from. The install itself
is the manager's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._fs import FileOps
from d_engine_sm._snapshot.partial import PartialStore
from d_engine_sm._snapshot.receiver import Partial, ReceiveAbort, SnapshotReceiver
from d_engine_sm._snapshot.store import SnapshotStore
from d_engine_sm._snapshot.streams import (
    ChunkTimeout,
    ProgressFn,
    Pump,
    StreamError,
    StreamingUnpack,
    report,
)
from d_engine_sm.errors import DEngineError, HandlerClosed
from d_engine_sm.proto import storage_pb2

_log = logging.getLogger("d_engine_sm.snapshot")

AckFn = Callable[[storage_pb2.SnapshotAck], None]
SnapshotMetadata = storage_pb2.SnapshotMetadata


@dataclass(frozen=True)
class Received:
    """A complete, verified transfer: install ``unpack_dir``, then publish ``archive``."""

    metadata: SnapshotMetadata
    archive: Path
    unpack_dir: Path
    size: int


def send_ack(ack: AckFn, message: storage_pb2.SnapshotAck) -> None:
    """Deliver an ack; a failing ack callback is logged, never fatal."""
    try:
        ack(message)
    except Exception:
        _log.exception("ack callback failed seq=%d", message.seq)


class _Sink:
    """Where accepted bytes go: the partial file, the SHA-256 and the unpacker."""

    def __init__(
        self,
        cleanup: ExitStack,
        store: SnapshotStore,
        partials: PartialStore,
        config: SnapshotConfig,
        expected_format: tuple[str, int] | None,
    ) -> None:
        self._cleanup = cleanup
        self._store = store
        self._partials = partials
        self._fs: FileOps = store.fs
        self._config = config
        self._files = ExitStack()  # the data file: closed before install
        self.out: BinaryIO | None = None
        self.hasher = hashlib.sha256()
        self.unpack_dir = store.new_temp_path("unpack")
        self._unpacker = StreamingUnpack(self.unpack_dir, config, expected_format)
        cleanup.callback(_remove_if_there, store, self.unpack_dir)
        cleanup.callback(self._unpacker.abort)
        cleanup.callback(self._files.close)

    def start(self, rx: SnapshotReceiver, partial: Partial | None) -> None:
        """Open the data file: the partial's when resuming from it, else a fresh one."""
        held = partial.chunks * partial.chunk_size if partial is not None else 0
        self._store.check_space(max(0, rx.expected_bytes - held))
        if partial is not None:
            self.out = self._files.enter_context(self._partials.open_resumed(partial))
        else:
            self.out = self._files.enter_context(self._partials.open_fresh())
        self._fs.announce("install:unpack")
        self._fs.mkdir(self.unpack_dir)
        self._unpacker.start()
        if partial is not None:
            for block in self._partials.read_prefix(partial):
                self.hasher.update(block)
                self._unpacker.feed(block)
            _log.info("resuming transfer index=%d at chunk=%d", partial.index, partial.chunks)

    def write(self, data: bytes) -> None:
        assert self.out is not None
        self._fs.announce("receive:chunk")
        self.out.write(data)
        self.hasher.update(data)
        self._unpacker.feed(data)

    def finish(self) -> Path:
        """fsync and close the archive, then wait for the unpacker (its errors raise)."""
        assert self.out is not None
        if self._config.fsync:
            # Survives: a crash after the publishing rename must not lose data.
            self._fs.announce("receive:fsync")
            self._fs.fsync(self.out)
        self._files.close()
        path = self._partials.data_path
        # From here the file is a whole archive, never a partial: removed
        # unless the install publishes it (renamed away).
        self._cleanup.callback(self._store.remove_quietly, path)
        self._unpacker.finish()  # the archive's own problems, after the transfer's
        return path

    def abandon(self, rx: SnapshotReceiver, resumable: bool) -> None:
        """Keep the verified prefix when the failure was the peer's going away, else remove."""
        meta = rx.metadata
        out = self.out
        if out is None:
            return
        kept = False
        if resumable and meta is not None and 0 < rx.received < rx.total_chunks:
            lid = meta.last_included
            partial = Partial(
                lid.index, lid.term, meta.checksum, rx.total_chunks, rx.chunk_size, rx.received
            )
            try:
                kept = self._partials.keep(out, partial)
            except OSError as exc:
                _log.warning("keeping partial transfer failed error=%r", exc)
        self._files.close()
        if not kept:
            self._partials.discard("transfer failed")


def receive_archive(
    cleanup: ExitStack,
    *,
    store: SnapshotStore,
    partials: PartialStore,
    config: SnapshotConfig,
    stream: Iterable[storage_pb2.SnapshotChunk],
    ack: AckFn,
    last_applied: int,
    progress: ProgressFn | None,
    expected_format: tuple[str, int] | None,
    closed: Callable[[], bool],
    on_error: Callable[[BaseException, ReceiveAbort | None, SnapshotReceiver], BaseException],
) -> tuple[Received, SnapshotReceiver]:
    """Receive, verify and unpack one stream; temp files are owned by ``cleanup``.

    ``on_error(error, abort, receiver)`` turns a failure into the error to
    raise (the final ack was sent and the partial dealt with here).
    """
    partial = partials.load() if config.resume_ttl > 0 else None
    rx = SnapshotReceiver(
        last_applied_index=last_applied,
        max_retries=config.max_chunk_retries,
        partial=partial,
        require_checksum=config.require_checksum,
        idle_timeout=config.transfer_idle_timeout,
        deadline=config.transfer_timeout,
    )
    sink = _Sink(cleanup, store, partials, config, expected_format)
    pump = Pump(stream, config.chunk_timeout)
    cleanup.callback(pump.close)
    try:
        meta = _pump(rx, sink, pump, ack=ack, partial=partial, progress=progress, closed=closed)
        if len(meta.checksum) == 32 and sink.hasher.digest() != meta.checksum:
            raise rx.fail("archive SHA-256 does not match metadata.checksum")
        archive = sink.finish()
    except BaseException as exc:
        abort = _as_abort(rx, exc, config.chunk_timeout)
        if abort is not None and abort.ack is not None:
            send_ack(ack, abort.ack)
        sink.abandon(rx, abort is not None and abort.resumable)
        error = on_error(exc, abort, rx)
        raise error from error.__cause__
    report(progress, "unpack", rx.received_bytes, rx.received_bytes)
    verified = SnapshotMetadata()
    verified.CopyFrom(meta)
    if len(verified.checksum) != 32:  # the sender gave none: record what was verified
        verified.checksum = sink.hasher.digest()
    return Received(verified, archive, sink.unpack_dir, os.path.getsize(archive)), rx


def _pump(
    rx: SnapshotReceiver,
    sink: _Sink,
    pump: Pump,
    *,
    ack: AckFn,
    partial: Partial | None,
    progress: ProgressFn | None,
    closed: Callable[[], bool],
) -> SnapshotMetadata:
    for chunk in pump:
        if closed():
            raise HandlerClosed("handler closed during a snapshot receive")
        step = rx.feed(chunk, time.monotonic())
        if step.data is not None:
            if sink.out is None:  # started lazily: a probe touches no file
                sink.start(rx, partial if rx.resumed else None)
            # Written (and its manifest checked) before it is acked: a chunk
            # this node cannot use is never ACCEPTED.
            sink.write(step.data)
            report(progress, "receive", rx.received_bytes, rx.expected_bytes)
        if step.ack is not None:
            send_ack(ack, step.ack)
    return rx.end_of_stream()


def _as_abort(
    rx: SnapshotReceiver, exc: BaseException, chunk_timeout: float
) -> ReceiveAbort | None:
    """The receiver's view of a failure (None: not one the receiver can ack)."""
    if isinstance(exc, ReceiveAbort):
        return exc
    if isinstance(exc, ChunkTimeout):
        late = rx.tick(time.monotonic())
        return late if late is not None else rx.timed_out(chunk_timeout)
    if isinstance(exc, StreamError):
        # The connection or the peer went away (keep what was verified) -- unless
        # this side stopped it: Ctrl-C, or ECONNABORTED ("software caused
        # connection abort"), which callers raise to abandon a transfer.
        cause = exc.__cause__
        gone = isinstance(cause, Exception) and not isinstance(cause, ConnectionAbortedError)
        return rx.fail(f"stream error: {cause!r}", resumable=gone)
    if isinstance(exc, (DEngineError, OSError, TypeError, MemoryError)):
        return rx.fail(str(exc) or type(exc).__name__)
    return None


def _remove_if_there(store: SnapshotStore, path: Path) -> None:
    if os.path.lexists(path):
        store.remove_quietly(path)
