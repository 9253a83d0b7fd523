"""Sans-IO receive state machine for a snapshot stream from a leader.

Theory of operation
-------------------
The receiver turns chunks into decisions: which ack to send and which bytes
to append to the archive. It never opens a file, starts a thread or reads a
clock; the driver (the handler) does all of that and calls in here once per
event: a chunk arrived (``feed``), the stream ended (``end_of_stream``), no
chunk came in time (``timed_out``) or something on its side broke (``fail``).

States::

    AWAIT_FIRST --chunk 0 valid, total > 1--> RECEIVING --last chunk--> COMPLETE
    AWAIT_FIRST --chunk 0 valid, total == 1----------------------------> COMPLETE
    any state --violation / timed_out / fail--> ABORTED
    AWAIT_FIRST, RECEIVING --end_of_stream--> ABORTED
    COMPLETE --end_of_stream--> COMPLETE (returns the metadata)

- AWAIT_FIRST: nothing kept yet. The first chunk must be seq 0, carry
  ``metadata.last_included``, have ``total_chunks >= 1`` and be newer than
  ``last_applied_index`` (else the stream is refused before any byte is
  written). A chunk 0 that fails its CRC is answered CHECKSUM_MISMATCH and
  captures nothing: its resend is judged afresh.
- RECEIVING: leader term and id, ``total_chunks`` and the largest chunk size
  are fixed by chunk 0. The next expected seq is ``received``; a lower seq is
  a duplicate (re-acked, not written), a higher one a gap (abort). A CRC
  failure asks for a resend of the same seq, at most ``max_retries`` times.
- COMPLETE: every chunk accepted; duplicates are still re-acked, anything
  past ``total_chunks`` aborts. ``end_of_stream`` hands back the metadata.
- ABORTED: terminal. The abort that caused it carried the final ack; every
  later call raises a ReceiveAbort with ``ack=None`` (nothing more to send).

Why the largest chunk is fixed by chunk 0: ``expected_bytes`` (what the
driver checks free space against) must be a real upper bound, so a later
chunk longer than the first is refused. d-engine senders cut fixed-size
chunks with only the last one short, so they never trip it.

``current_term`` is deliberately not checked: d-engine senders put
``last_included.term`` in ``leader_term``, so comparing it with the
receiver's term would refuse valid peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from d_engine_sm._snapshot.chunks import verify_chunk
from d_engine_sm.proto import storage_pb2

SnapshotAck = storage_pb2.SnapshotAck
SnapshotChunk = storage_pb2.SnapshotChunk
SnapshotMetadata = storage_pb2.SnapshotMetadata

AWAIT_FIRST: Final = "AWAIT_FIRST"
RECEIVING: Final = "RECEIVING"
COMPLETE: Final = "COMPLETE"
ABORTED: Final = "ABORTED"

_ACCEPTED: Final = SnapshotAck.ACCEPTED
_CHECKSUM_MISMATCH: Final = SnapshotAck.CHECKSUM_MISMATCH
_OUT_OF_ORDER: Final = SnapshotAck.OUT_OF_ORDER
_FAILED: Final = SnapshotAck.FAILED


@dataclass(frozen=True)
class Step:
    """What the driver must do after one accepted or re-requested chunk.

    Attributes:
        ack: the ack to send (None: send nothing).
        data: bytes to append to the archive, strictly in seq order (None:
            nothing to write).
    """

    ack: SnapshotAck | None
    data: bytes | None


class ReceiveAbort(Exception):
    """The stream is refused; internal, the handler translates it into public errors.

    Attributes:
        reason: what went wrong, for the error message.
        status: ``"FAILED"``, ``"OUT_OF_ORDER"`` or ``"CHECKSUM_MISMATCH"``.
        seq: the chunk concerned (or the count received, for stream-level failures).
        ack: the final ack to send; None when one was already sent.
        stale: True when refused as not newer than ``last_applied_index``.
        snapshot_index: ``last_included.index`` when known, else 0.
    """

    def __init__(
        self,
        reason: str,
        status: str,
        seq: int,
        ack: SnapshotAck | None,
        *,
        stale: bool = False,
        snapshot_index: int = 0,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.seq = seq
        self.ack = ack
        self.stale = stale
        self.snapshot_index = snapshot_index

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword-only facts travel as state (BaseException.__setstate__).
        args = (self.reason, self.status, self.seq, self.ack)
        return (type(self), args, {"stale": self.stale, "snapshot_index": self.snapshot_index})


def _ack(seq: int, status: SnapshotAck.ChunkStatus, next_requested: int) -> SnapshotAck:
    return SnapshotAck(seq=seq, status=status, next_requested=next_requested)


class SnapshotReceiver:
    """Validates one incoming snapshot stream, chunk by chunk (see the module docstring).

    Not thread-safe: one driver feeds one receiver. Never blocks, never does I/O.

    Args:
        last_applied_index: this node's applied index; a snapshot whose
            ``last_included.index`` is not above it is refused as stale.
        max_retries: CHECKSUM_MISMATCH resends accepted per chunk; one more
            mismatch of the same seq aborts.

    Raises:
        TypeError: a non-int argument.
        ValueError: a negative argument.
    """

    def __init__(self, *, last_applied_index: int, max_retries: int = 3) -> None:
        for name, value in (
            ("last_applied_index", last_applied_index),
            ("max_retries", max_retries),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self._last_applied_index = last_applied_index
        self._max_retries = max_retries
        self._state: str = AWAIT_FIRST
        self._metadata: SnapshotMetadata | None = None
        self._total = 0
        self._term = 0
        self._leader = 0
        self._max_chunk = 0
        self._received = 0
        self._received_bytes = 0
        self._mismatches = 0  # CRC failures of the seq currently expected
        self._abort: ReceiveAbort | None = None

    # -- read-only view for the driver -------------------------------------

    @property
    def state(self) -> str:
        """``"AWAIT_FIRST"``, ``"RECEIVING"``, ``"COMPLETE"`` or ``"ABORTED"``."""
        return self._state

    @property
    def metadata(self) -> SnapshotMetadata | None:
        """Chunk 0's metadata once accepted (do not mutate), else None."""
        return self._metadata

    @property
    def total_chunks(self) -> int:
        """``total_chunks`` of chunk 0 once accepted, else 0."""
        return self._total

    @property
    def leader_term(self) -> int:
        """Chunk 0's ``leader_term`` once accepted, else 0."""
        return self._term

    @property
    def leader_id(self) -> int:
        """Chunk 0's ``leader_id`` once accepted, else 0."""
        return self._leader

    @property
    def received(self) -> int:
        """Chunks accepted so far (also the next expected seq)."""
        return self._received

    @property
    def received_bytes(self) -> int:
        """Bytes handed to the driver so far."""
        return self._received_bytes

    @property
    def expected_bytes(self) -> int:
        """Upper bound on the archive size: ``total_chunks`` times chunk 0's size."""
        return self._total * self._max_chunk

    @property
    def snapshot_index(self) -> int:
        """``last_included.index`` once chunk 0 is accepted, else 0."""
        return self._metadata.last_included.index if self._metadata is not None else 0

    # -- events ------------------------------------------------------------

    def feed(self, chunk: SnapshotChunk) -> Step:
        """Judge one chunk.

        Args:
            chunk: the next chunk from the stream.

        Returns:
            The ack to send and the bytes (if any) to append to the archive.

        Raises:
            ReceiveAbort: the stream is refused (the receiver is now ABORTED);
                its ``ack`` is the final ack to send, None if already sent.
            TypeError: ``chunk`` is not a ``SnapshotChunk`` (state unchanged).
        """
        if not isinstance(chunk, SnapshotChunk):
            raise TypeError(f"chunk must be a SnapshotChunk, got {type(chunk).__name__}")
        if self._abort is not None:
            raise self._refusal()
        if self._state == AWAIT_FIRST:
            return self._feed_first(chunk)
        return self._feed_next(chunk)

    def end_of_stream(self) -> SnapshotMetadata:
        """The stream ended; succeed only if every chunk was accepted.

        Returns:
            The snapshot's metadata (from chunk 0).

        Raises:
            ReceiveAbort: the stream was empty, ended early, or had already failed.
        """
        if self._abort is not None:
            raise self._refusal()
        if self._state == COMPLETE:
            assert self._metadata is not None
            return self._metadata
        if self._state == AWAIT_FIRST:
            raise self._fail("missing metadata in snapshot stream (no chunk 0 accepted)", 0, 0)
        n = self._received
        raise self._fail(f"stream ended after {n} of {self._total} chunks", n, n)

    def timed_out(self, seconds: float) -> ReceiveAbort:
        """No chunk arrived within ``seconds``: abort with a FAILED ack.

        Args:
            seconds: the timeout that expired, for the message.

        Returns:
            The abort for the driver to raise (``ack=None`` if already aborted).

        Raises:
            TypeError: ``seconds`` is not a number (state unchanged).
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"seconds must be a number, got {type(seconds).__name__}")
        if self._abort is not None:
            return self._refusal()
        n = self._received
        return self._fail(f"no chunk received for {seconds:g} seconds", n, n)

    def fail(self, reason: str) -> ReceiveAbort:
        """The driver failed (disk error, bad archive, transport error): abort with a FAILED ack.

        Args:
            reason: what failed, for the message.

        Returns:
            The abort for the driver to raise (``ack=None`` if already aborted).
        """
        if self._abort is not None:
            return self._refusal()
        n = self._received
        return self._fail(str(reason), n, n)

    # -- internals -----------------------------------------------------------

    def _feed_first(self, chunk: SnapshotChunk) -> Step:
        seq = chunk.seq
        if not (chunk.HasField("metadata") and chunk.metadata.HasField("last_included")):
            raise self._fail("missing metadata in first snapshot chunk", seq, 0)
        if seq != 0:
            raise self._fail(f"first chunk has seq {seq}, expected 0", seq, 0)
        if chunk.total_chunks < 1:
            raise self._fail("first chunk has total_chunks 0", seq, 0)
        index = chunk.metadata.last_included.index
        if index <= self._last_applied_index:
            raise self._fail(
                f"stale snapshot: last_included index {index} is not newer than "
                f"last_applied {self._last_applied_index}",
                seq,
                0,
                stale=True,
                snapshot_index=index,
            )
        if not verify_chunk(chunk):
            return self._mismatch(seq, snapshot_index=index)
        # Copy: the caller owns the chunk and may reuse it.
        metadata = SnapshotMetadata()
        metadata.CopyFrom(chunk.metadata)
        self._metadata = metadata
        self._total = chunk.total_chunks
        self._term = chunk.leader_term
        self._leader = chunk.leader_id
        self._max_chunk = len(chunk.data)
        return self._accept(chunk)

    def _feed_next(self, chunk: SnapshotChunk) -> Step:
        seq, expected = chunk.seq, self._received
        if chunk.leader_term != self._term or chunk.leader_id != self._leader:
            raise self._fail(
                f"leader changed during transfer: term/id {chunk.leader_term}/{chunk.leader_id}, "
                f"stream started by {self._term}/{self._leader}",
                seq,
                expected,
                status=_OUT_OF_ORDER,
            )
        if chunk.total_chunks != self._total:
            raise self._fail(
                f"chunk {seq} says total_chunks {chunk.total_chunks}, chunk 0 said {self._total}",
                seq,
                expected,
            )
        if seq >= self._total:
            raise self._fail(f"chunk {seq} is beyond total_chunks {self._total}", seq, expected)
        if seq < expected:  # a resend of an accepted chunk: already written
            return Step(ack=_ack(seq, _ACCEPTED, expected), data=None)
        if seq > expected:
            raise self._fail(f"gap: got chunk {seq}, expected {expected}", seq, expected)
        if len(chunk.data) > self._max_chunk:
            raise self._fail(
                f"chunk {seq} has {len(chunk.data)} bytes, more than chunk 0's {self._max_chunk}",
                seq,
                expected,
            )
        if not verify_chunk(chunk):
            return self._mismatch(seq, snapshot_index=self.snapshot_index)
        return self._accept(chunk)

    def _accept(self, chunk: SnapshotChunk) -> Step:
        seq = chunk.seq
        self._received = seq + 1
        self._received_bytes += len(chunk.data)
        self._mismatches = 0
        self._state = COMPLETE if self._received == self._total else RECEIVING
        return Step(ack=_ack(seq, _ACCEPTED, seq + 1), data=chunk.data)

    def _mismatch(self, seq: int, *, snapshot_index: int) -> Step:
        self._mismatches += 1
        if self._mismatches > self._max_retries:
            raise self._fail(
                f"chunk {seq} failed its checksum {self._mismatches} times "
                f"(max_retries {self._max_retries})",
                seq,
                seq,
                snapshot_index=snapshot_index,
            )
        return Step(ack=_ack(seq, _CHECKSUM_MISMATCH, seq), data=None)

    def _fail(
        self,
        reason: str,
        seq: int,
        next_requested: int,
        *,
        status: SnapshotAck.ChunkStatus = _FAILED,
        stale: bool = False,
        snapshot_index: int | None = None,
    ) -> ReceiveAbort:
        index = self.snapshot_index if snapshot_index is None else snapshot_index
        name = SnapshotAck.ChunkStatus.Name(status)
        ack = _ack(seq, status, next_requested)
        abort = ReceiveAbort(reason, name, seq, ack, stale=stale, snapshot_index=index)
        self._state = ABORTED
        self._abort = abort
        return abort

    def _refusal(self) -> ReceiveAbort:
        # Failed stays failed: same facts, but the final ack was already sent.
        first = self._abort
        assert first is not None
        return ReceiveAbort(
            f"receiver already aborted: {first.reason}",
            first.status,
            first.seq,
            None,
            stale=first.stale,
            snapshot_index=first.snapshot_index,
        )


__all__ = [
    "ABORTED",
    "AWAIT_FIRST",
    "COMPLETE",
    "RECEIVING",
    "ReceiveAbort",
    "SnapshotReceiver",
    "Step",
]
