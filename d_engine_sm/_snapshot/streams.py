"""The stream plumbing of snapshot transfer, apart from its orchestration.

* :class:`Pump` pulls a caller's (possibly blocking) chunk iterable on a
  helper thread so ``chunk_timeout`` can be enforced.
* :class:`StreamingUnpack` unpacks a received archive on a helper thread
  while its bytes arrive.
* :class:`ChunkStream` serves an archive as chunks, holding the reader's
  shared lock until it ends or is closed.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Final, cast

from d_engine_sm._closing import Closing
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._metrics import Metrics
from d_engine_sm._snapshot import archive, chunks, manifest
from d_engine_sm._snapshot.pipe import BytePipe
from d_engine_sm._snapshot.store import SnapshotReader
from d_engine_sm.proto import storage_pb2

_log = logging.getLogger("d_engine_sm.snapshot")

ProgressFn = Callable[[str, int, int], None]

UNPACK_BUFFER: Final = 8 << 20  # bytes handed ahead to the unpacking thread
PREFETCH: Final = 4  # chunks pulled ahead of the writer (bounds receive memory)
_PAGE: Final = mmap.PAGESIZE
SnapshotMetadata = storage_pb2.SnapshotMetadata


def report(progress: ProgressFn | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        try:
            progress(phase, done, total)
        except Exception:
            _log.exception("progress callback failed phase=%s", phase)


class ChunkTimeout(Exception):
    pass


class StreamError(Exception):
    """The caller's chunk iterator raised (cause chained)."""


class StreamingUnpack:
    """Unpacks a received archive on a helper thread while its bytes arrive.

    The archive's own problems (an unsafe member, a corrupt stream, a full
    disk) are kept and raised by ``finish``, after the transfer's checks
    (count, SHA-256), so errors are reported in the same order as when
    unpacking followed the transfer. Nothing is installed before ``finish``.

    The manifest is the exception: ``feed`` reads it in the receiving thread
    as soon as its bytes arrive and raises at once when this node cannot
    install the snapshot (another format, or more unpacked bytes than the cap).
    """

    def __init__(
        self, dest: Path, config: SnapshotConfig, expected_format: tuple[str, int] | None = None
    ) -> None:
        self._dest = dest
        self._config = config
        self._expected = expected_format
        self._sniffer: manifest.ManifestSniffer | None = manifest.ManifestSniffer(
            f"received archive ({dest.name})"
        )
        self._pipe = BytePipe(UNPACK_BUFFER)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="d-engine-sm-unpack", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            archive.unpack_stream(
                cast(BinaryIO, self._pipe),
                self._dest,
                name=f"received archive ({self._dest.name})",
                max_bytes=self._config.max_unpacked_bytes,
                max_members=self._config.max_archive_members,
            )
        except BaseException as exc:  # handed to the receiving thread by finish()
            self._error = exc
        finally:
            self._pipe.stop_reader()  # a writer blocked on a full pipe moves on

    def feed(self, data: bytes) -> None:
        """Hand bytes to the unpacker.

        Raises:
            SnapshotFormatMismatch: the manifest names a format we cannot install.
            UnsafeArchiveError: the manifest declares more than the unpack cap.
            CorruptSnapshotError: the manifest is malformed.
        """
        sniffer = self._sniffer
        if sniffer is not None:
            sniffer.feed(data)
            if sniffer.done:
                self._sniffer = None
                if sniffer.manifest is not None:
                    manifest.check(
                        sniffer.manifest, self._expected, self._config.max_unpacked_bytes
                    )
        self._pipe.put(data)  # False once the reader stopped: its error waits for finish()

    def finish(self) -> None:
        self._pipe.close_writer()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """End the helper (it sees a truncated stream) before its directory is removed."""
        self._pipe.close_writer()
        if self._thread is not None:
            self._thread.join()


class Pump:
    """Iterates a possibly-blocking chunk source with a per-chunk deadline.

    A plain iterator cannot be interrupted, so it is pulled on a daemon
    thread into a small buffer; the consumer waits on a condition with the
    deadline. Lists and tuples never block and are iterated directly.
    """

    def __init__(self, source: Iterable[storage_pb2.SnapshotChunk], timeout: float) -> None:
        self._timeout = timeout
        self._direct: Iterator[storage_pb2.SnapshotChunk] | None = None
        if isinstance(source, Sequence):
            self._direct = iter(source)
            return
        self._source = source
        self._cond = threading.Condition()
        self._buffer: list[tuple[str, object]] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="d-engine-sm-recv", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        it = iter(self._source)
        try:
            for item in it:
                if not self._put(("chunk", item)):
                    break
            else:
                self._put(("end", None))
        except BaseException as exc:  # the caller's iterator failed: hand it over
            self._put(("error", exc))
        finally:
            # An abandoned sender (e.g. our own chunk stream) releases its
            # archive now rather than at garbage collection.
            close = getattr(it, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    def _put(self, item: tuple[str, object]) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._stopped or len(self._buffer) < PREFETCH)
            if self._stopped:
                return False
            self._buffer.append(item)
            self._cond.notify_all()
            return True

    def __iter__(self) -> Iterator[storage_pb2.SnapshotChunk]:
        if self._direct is not None:
            yield from self._direct
            return
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: bool(self._buffer), self._timeout):
                    raise ChunkTimeout
                kind, value = self._buffer.pop(0)
                self._cond.notify_all()
            if kind == "end":
                return
            if kind == "error":
                raise StreamError(str(value)) from value  # type: ignore[misc]
            yield value  # type: ignore[misc]

    def close(self) -> None:
        if self._direct is not None:
            return
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class ChunkStream(Closing, Iterator[storage_pb2.SnapshotChunk]):
    """The chunks of one archive; holds the reader's shared lock until closed."""

    def __init__(
        self,
        stack: ExitStack,
        reader: SnapshotReader,
        *,
        chunk_size: int,
        leader_term: int,
        leader_id: int,
        metadata: SnapshotMetadata,
        metrics: Metrics,
        progress: ProgressFn | None,
    ) -> None:
        self._stack = stack
        self._reader = reader
        self._size = reader.size
        self._released = 0  # mapped bytes already handed back to the kernel
        self._chunk_size = chunk_size
        self._total = chunks.chunk_count(self._size, chunk_size)
        self._leader_term = leader_term
        self._leader_id = leader_id
        self._metadata = metadata
        self._metrics = metrics
        self._progress = progress
        self._seq = 0
        self._started = time.perf_counter()
        self._closed = False

    @property
    def total_chunks(self) -> int:
        return self._total

    def __next__(self) -> storage_pb2.SnapshotChunk:
        if self._closed or self._seq >= self._total:
            self._finish(completed=not self._closed)
            raise StopIteration
        seq = self._seq
        start, end = chunks.chunk_bounds(seq, self._size, self._chunk_size)
        data = self._reader.read(start, end)
        self._release(end)
        self._seq += 1
        report(self._progress, "send", end, self._size)
        return self._make(seq, data)

    def chunk(self, seq: int) -> storage_pb2.SnapshotChunk:
        """Chunk ``seq`` (random access, for resends and resumed transfers).

        Raises:
            ValueError: the stream is closed or ``seq`` is out of range.
        """
        if self._closed or not 0 <= seq < self._total:
            raise ValueError(f"no chunk {seq} (total {self._total}, closed {self._closed})")
        start, end = chunks.chunk_bounds(seq, self._size, self._chunk_size)
        data = self._reader.read(start, end)
        self._release(end)
        report(self._progress, "send", end, self._size)
        return self._make(seq, data)

    def header(self) -> storage_pb2.SnapshotChunk:
        """Chunk 0's metadata without its data: asks a receiver where to resume."""
        return self._make(0, b"")

    def _make(self, seq: int, data: bytes) -> storage_pb2.SnapshotChunk:
        return chunks.make_chunk(
            seq=seq,
            total=self._total,
            data=data,
            leader_term=self._leader_term,
            leader_id=self._leader_id,
            metadata=self._metadata if seq == 0 else None,
        )

    def complete(self) -> None:
        """Every chunk was delivered (random access): count the send and release the archive."""
        self._finish(completed=not self._closed)

    def _release(self, upto: int) -> None:
        """Drop the mapped pages already sent, so RSS stays flat for any archive size.

        Without it every page read stays counted in this process's RSS until
        the map is closed: a 1 GiB archive would cost 1 GiB of RSS to send.
        """
        mapped = self._reader.mmap
        advise = getattr(mapped, "madvise", None)
        dontneed = getattr(mmap, "MADV_DONTNEED", None)
        end = upto - upto % _PAGE
        if end <= self._released:
            return
        if advise is None or dontneed is None or end - self._released < 8 * _PAGE:
            return
        with contextlib.suppress(OSError, ValueError):
            advise(dontneed, self._released, end - self._released)
        self._released = end

    def _finish(self, *, completed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._stack.close()
        if completed:
            self._metrics.incr("snapshot_sends")
            self._metrics.incr("snapshot_sent_bytes", self._size)
            self._metrics.observe("snapshot_send_seconds", time.perf_counter() - self._started)

    def close(self) -> None:
        """Release the archive early (an abandoned transfer)."""
        self._finish(completed=False)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._stack.close()
