"""Sans-IO receive state machine for a snapshot stream from a leader.

Theory of operation
-------------------
The receiver turns chunks into decisions: which ack to send and which bytes
to append to the archive. It never opens a file, starts a thread or reads a
clock (``now`` is passed in); the driver (the handler) does all of that and
calls in here once per event: a chunk arrived (``feed``), the stream ended
(``end_of_stream``), a wait expired (``tick``/``timed_out``) or something on
its side broke (``fail``).

States::

    AWAIT_FIRST --chunk 0 or header valid, more to come--> RECEIVING --last chunk--> COMPLETE
    AWAIT_FIRST --chunk 0 valid, total == 1 (or resumed to the end)-----------> COMPLETE
    any state --violation / deadline / fail--> ABORTED
    AWAIT_FIRST, RECEIVING --end_of_stream--> ABORTED
    COMPLETE --end_of_stream--> COMPLETE (returns the metadata)

- AWAIT_FIRST: nothing kept yet. The first chunk must be seq 0, carry
  ``metadata.last_included``, have ``total_chunks >= 1``, a
  ``metadata.checksum`` that is empty or 32 bytes (SHA-256), and be newer
  than ``last_applied_index`` (else the stream is refused before any byte is
  written). A chunk 0 that fails its CRC is answered CHECKSUM_MISMATCH and
  captures nothing: its resend is judged afresh.
- Resuming: the driver may hand in a :class:`Partial` (the verified prefix
  of an earlier, interrupted transfer). A first chunk for the same snapshot
  (LogId, 32-byte checksum, ``total_chunks``, and chunk 0's size when it has
  data) resumes after it: the step's ``resume_from`` says how many chunks the
  driver takes from the partial, and the ack's ``next_requested`` tells the
  sender where to go on. A *header* (seq 0 with metadata and no data; no
  archive has an empty chunk 0) asks only that: it is answered REQUESTED
  with ``next_requested`` = the first chunk missing (0 without a match).
- RECEIVING: leader term and id, ``total_chunks`` and the largest chunk size
  are fixed by the first chunk. The next expected seq is ``received``; a
  lower seq is a duplicate (re-acked, not written), a higher one a gap
  (abort) -- except while a CHECKSUM_MISMATCH resend is awaited: chunks
  behind the bad one were already in flight (go-back-N) and are dropped
  without an ack. A CRC failure asks for a resend of the same seq, at most
  ``max_retries`` times. Duplicates and drops together are bounded by
  ``(max_retries + 1) * total_chunks``, so a peer repeating itself cannot
  hold the receive open; nor can a slow one: no new chunk for
  ``idle_timeout`` seconds, or a transfer longer than ``deadline`` seconds,
  aborts.
- COMPLETE: every chunk accepted; duplicates are still re-acked, anything
  past ``total_chunks`` aborts. ``end_of_stream`` hands back the metadata.
- ABORTED: terminal. The abort that caused it carried the final ack; every
  later call raises a ReceiveAbort with ``ack=None`` (nothing more to send).
  ``ReceiveAbort.resumable`` says whether the failure was the peer's or the
  connection's going away (a deadline, or the driver's ``fail(resumable=True)``
  for a broken stream) rather than wrong data or a deliberate stop (a stream
  that simply ends early): only then is the verified prefix worth keeping.

The first data chunk fixes the largest chunk size so that ``expected_bytes``
(checked against free space) is an upper bound; d-engine senders cut
fixed-size chunks with only the last one short. ``current_term`` is not
checked: d-engine senders put ``last_included.term`` in ``leader_term``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from d_engine_sm._snapshot.chunks import check_int, check_seconds, verify_chunk
from d_engine_sm.proto import storage_pb2

SnapshotAck = storage_pb2.SnapshotAck
SnapshotChunk = storage_pb2.SnapshotChunk
SnapshotMetadata = storage_pb2.SnapshotMetadata

AWAIT_FIRST: Final = "AWAIT_FIRST"
RECEIVING: Final = "RECEIVING"
COMPLETE: Final = "COMPLETE"
ABORTED: Final = "ABORTED"

SHA256_LEN: Final = 32

_ACCEPTED: Final = SnapshotAck.ACCEPTED
_CHECKSUM_MISMATCH: Final = SnapshotAck.CHECKSUM_MISMATCH
_OUT_OF_ORDER: Final = SnapshotAck.OUT_OF_ORDER
_REQUESTED: Final = SnapshotAck.REQUESTED
_FAILED: Final = SnapshotAck.FAILED


@dataclass(frozen=True)
class Step:
    """What the driver must do after one chunk.

    Attributes:
        ack: the ack to send (None: send nothing).
        data: bytes to append to the archive, strictly in seq order (None:
            nothing to write).
        resume_from: when > 0, first take this many chunks (their bytes) from
            the partial transfer handed to the receiver, before ``data``.
    """

    ack: SnapshotAck | None
    data: bytes | None
    resume_from: int = 0


@dataclass(frozen=True)
class Partial:
    """The verified prefix of an interrupted transfer (what resuming needs to know).

    Attributes:
        index, term: the snapshot's ``last_included``.
        checksum: its 32-byte SHA-256 (``metadata.checksum``).
        total_chunks: the transfer's chunk count.
        chunk_size: the size of every chunk but the last.
        chunks: chunks verified and kept, ``1 <= chunks <= total_chunks``.
    """

    index: int
    term: int
    checksum: bytes
    total_chunks: int
    chunk_size: int
    chunks: int

    def matches(self, metadata: SnapshotMetadata, total: int) -> bool:
        """Same snapshot and the same cut into chunks (the size is checked by the caller)."""
        lid = metadata.last_included
        return (
            len(self.checksum) == SHA256_LEN
            and (lid.index, lid.term, metadata.checksum, total)
            == (self.index, self.term, self.checksum, self.total_chunks)
            and 0 < self.chunks <= total
        )


class ReceiveAbort(Exception):
    """The stream is refused; internal, the handler translates it into public errors.

    Attributes:
        reason: what went wrong, for the error message.
        status: ``"FAILED"``, ``"OUT_OF_ORDER"`` or ``"CHECKSUM_MISMATCH"``.
        seq: the chunk concerned (or the count received, for stream-level failures).
        ack: the final ack to send; None when one was already sent.
        stale: True when refused as not newer than ``last_applied_index``.
        snapshot_index: ``last_included.index`` when known, else 0.
        bad_field: the malformed metadata field, when that was the reason.
        resumable: the peer or the connection went away (nothing was wrong
            with the data): the verified prefix may be kept for a retry.
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
        bad_field: str | None = None,
        resumable: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.seq = seq
        self.ack = ack
        self.stale = stale
        self.snapshot_index = snapshot_index
        self.bad_field = bad_field
        self.resumable = resumable

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword-only facts travel as state (BaseException.__setstate__).
        return (type(self), (self.reason, self.status, self.seq, self.ack), self.__dict__)


def _ack(seq: int, status: SnapshotAck.ChunkStatus, next_requested: int) -> SnapshotAck:
    return SnapshotAck(seq=seq, status=status, next_requested=next_requested)


def _is_header(chunk: SnapshotChunk) -> bool:
    return chunk.seq == 0 and not chunk.data and chunk.HasField("metadata")


class SnapshotReceiver:
    """Validates one incoming snapshot stream, chunk by chunk (see the module docstring).

    Not thread-safe: one driver feeds one receiver. Never blocks, never does I/O.

    Args:
        last_applied_index: this node's applied index; a snapshot whose
            ``last_included.index`` is not above it is refused as stale.
        max_retries: CHECKSUM_MISMATCH resends accepted per chunk; one more
            mismatch of the same seq aborts.
        partial: an interrupted transfer's verified prefix to resume from.
        require_checksum: refuse a first chunk whose ``metadata.checksum`` is
            empty (by default an empty one means "the sender gave none").
        idle_timeout: seconds without a new chunk accepted before aborting
            (None: no limit). Checked only when ``now`` is passed.
        deadline: seconds the whole transfer may take (None: no limit),
            counted from the first ``now`` seen.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a negative count or a non-positive time.
    """

    def __init__(
        self,
        *,
        last_applied_index: int,
        max_retries: int = 3,
        partial: Partial | None = None,
        require_checksum: bool = False,
        idle_timeout: float | None = None,
        deadline: float | None = None,
    ) -> None:
        check_int("last_applied_index", last_applied_index, 0)
        check_int("max_retries", max_retries, 0)
        check_seconds("idle_timeout", idle_timeout)
        check_seconds("deadline", deadline)
        if partial is not None and not isinstance(partial, Partial):
            raise TypeError(f"partial must be a Partial, got {type(partial).__name__}")
        self._last_applied_index = last_applied_index
        self._max_retries = max_retries
        self._partial = partial
        self._require_checksum = require_checksum
        self._idle_timeout = idle_timeout
        self._deadline = deadline
        self._started: float | None = None
        self._progressed: float | None = None
        self._state: str = AWAIT_FIRST
        self._metadata: SnapshotMetadata | None = None
        self._total = 0
        self._term = 0
        self._leader = 0
        self._max_chunk: int | None = None  # fixed by the first data chunk
        self._received = 0
        self._resumed = 0
        self._received_bytes = 0
        self._mismatches = 0  # CRC failures of the seq currently expected
        self._awaiting: int | None = None  # seq whose resend was asked for
        self._noise = 0  # duplicates and dropped in-flight chunks
        self._abort: ReceiveAbort | None = None

    # -- read-only view for the driver -------------------------------------

    @property
    def state(self) -> str:
        """``"AWAIT_FIRST"``, ``"RECEIVING"``, ``"COMPLETE"`` or ``"ABORTED"``."""
        return self._state

    @property
    def metadata(self) -> SnapshotMetadata | None:
        """The first chunk's metadata once accepted (do not mutate), else None."""
        return self._metadata

    @property
    def total_chunks(self) -> int:
        """``total_chunks`` of the first chunk once accepted, else 0."""
        return self._total

    @property
    def leader_term(self) -> int:
        """The first chunk's ``leader_term`` once accepted, else 0."""
        return self._term

    @property
    def leader_id(self) -> int:
        """The first chunk's ``leader_id`` once accepted, else 0."""
        return self._leader

    @property
    def received(self) -> int:
        """Chunks held so far, resumed ones included (also the next expected seq)."""
        return self._received

    @property
    def resumed(self) -> int:
        """Chunks taken from the partial transfer (0: a fresh transfer)."""
        return self._resumed

    @property
    def chunk_size(self) -> int:
        """The size of every chunk but the last, once known, else 0."""
        return self._max_chunk or 0

    @property
    def received_bytes(self) -> int:
        """Bytes handed to the driver so far (resumed ones not counted)."""
        return self._received_bytes

    @property
    def expected_bytes(self) -> int:
        """Upper bound on the archive size: ``total_chunks`` times the chunk size."""
        return self._total * (self._max_chunk or 0)

    @property
    def snapshot_index(self) -> int:
        """``last_included.index`` once the first chunk is accepted, else 0."""
        return self._metadata.last_included.index if self._metadata is not None else 0

    # -- events ------------------------------------------------------------

    def feed(self, chunk: SnapshotChunk, now: float | None = None) -> Step:
        """Judge one chunk.

        Args:
            chunk: the next chunk from the stream.
            now: the driver's clock (monotonic seconds), for the deadlines.

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
        late = self.tick(now)
        if late is not None:
            raise late
        if self._state == AWAIT_FIRST:
            return self._feed_first(chunk, now)
        return self._feed_next(chunk, now)

    def tick(self, now: float | None) -> ReceiveAbort | None:
        """Check the idle and overall deadlines at ``now``.

        Returns:
            The abort for the driver to raise when one passed (the receiver is
            then ABORTED), else None.
        """
        if now is None or self._abort is not None:
            return None
        if self._started is None:
            self._started = self._progressed = now
        assert self._progressed is not None
        n = self._received
        if self._deadline is not None and now - self._started > self._deadline:
            reason = f"transfer took more than {self._deadline:g} seconds"
            return self._fail(reason, n, n, resumable=True)
        if self._idle_timeout is not None and now - self._progressed > self._idle_timeout:
            reason = f"no new chunk accepted for {self._idle_timeout:g} seconds"
            return self._fail(reason, n, n, resumable=True)
        return None

    def end_of_stream(self) -> SnapshotMetadata:
        """The stream ended; succeed only if every chunk was accepted.

        Returns:
            The snapshot's metadata (from the first chunk).

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
        return self._fail(f"no chunk received for {seconds:g} seconds", n, n, resumable=True)

    def fail(self, reason: str, *, resumable: bool = False) -> ReceiveAbort:
        """The driver failed (disk error, bad archive, transport error): abort with a FAILED ack.

        Args:
            reason: what failed, for the message.
            resumable: the connection went away (the data so far is good).

        Returns:
            The abort for the driver to raise (``ack=None`` if already aborted).
        """
        if self._abort is not None:
            return self._refusal()
        n = self._received
        return self._fail(str(reason), n, n, resumable=resumable)

    # -- internals -----------------------------------------------------------

    def _feed_first(self, chunk: SnapshotChunk, now: float | None) -> Step:
        seq = chunk.seq
        if self._awaiting is not None and seq > self._awaiting:
            return self._drop(seq)
        if not (chunk.HasField("metadata") and chunk.metadata.HasField("last_included")):
            raise self._fail("missing metadata in first snapshot chunk", seq, 0)
        if seq != 0:
            raise self._fail(f"first chunk has seq {seq}, expected 0", seq, 0)
        if chunk.total_chunks < 1:
            raise self._fail("first chunk has total_chunks 0", seq, 0)
        self._check_metadata(chunk.metadata)
        if not verify_chunk(chunk):
            self._awaiting = 0
            return self._mismatch(seq, snapshot_index=chunk.metadata.last_included.index)
        # Copy: the caller owns the chunk and may reuse it.
        metadata = SnapshotMetadata()
        metadata.CopyFrom(chunk.metadata)
        self._metadata = metadata
        self._total = chunk.total_chunks
        self._term = chunk.leader_term
        self._leader = chunk.leader_id
        self._state = RECEIVING
        partial = self._matching_partial(chunk)
        if _is_header(chunk):
            resume = partial.chunks if partial is not None else 0
            return self._resume(resume, _ack(0, _REQUESTED, resume), partial, now)
        if partial is not None:
            return self._resume(partial.chunks, _ack(0, _ACCEPTED, partial.chunks), partial, now)
        return self._accept(chunk, now)

    def _check_metadata(self, metadata: SnapshotMetadata) -> None:
        index = metadata.last_included.index
        if index <= self._last_applied_index:
            raise self._fail(
                f"stale snapshot: last_included index {index} is not newer than "
                f"last_applied {self._last_applied_index}",
                0,
                0,
                stale=True,
                snapshot_index=index,
            )
        size = len(metadata.checksum)
        if size not in (0, SHA256_LEN) or (size == 0 and self._require_checksum):
            what = "empty (required)" if size == 0 else f"{size} bytes"
            raise self._fail(
                f"metadata.checksum must be a {SHA256_LEN}-byte SHA-256, got {what}",
                0,
                0,
                snapshot_index=index,
                bad_field="checksum",
            )

    def _matching_partial(self, chunk: SnapshotChunk) -> Partial | None:
        partial = self._partial
        if partial is None or not partial.matches(chunk.metadata, chunk.total_chunks):
            return None
        if chunk.data and len(chunk.data) != partial.chunk_size and partial.total_chunks > 1:
            return None  # cut into chunks of another size: start again
        return partial

    def _resume(
        self, chunks: int, ack: SnapshotAck, partial: Partial | None, now: float | None
    ) -> Step:
        if partial is not None:
            self._max_chunk = partial.chunk_size
        self._received = self._resumed = chunks
        self._progressed = now
        self._mismatches = 0
        self._awaiting = None
        if chunks == self._total:
            self._state = COMPLETE
        return Step(ack=ack, data=None, resume_from=chunks)

    def _feed_next(self, chunk: SnapshotChunk, now: float | None) -> Step:
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
            self._count_noise(seq)
            return Step(ack=_ack(seq, _ACCEPTED, expected), data=None)
        if seq > expected:
            if self._awaiting is not None:
                return self._drop(seq)
            raise self._fail(f"gap: got chunk {seq}, expected {expected}", seq, expected)
        limit = self._max_chunk
        if limit is not None and len(chunk.data) > limit:
            raise self._fail(
                f"chunk {seq} has {len(chunk.data)} bytes, more than chunk 0's {limit}",
                seq,
                expected,
            )
        if not verify_chunk(chunk):
            self._awaiting = seq
            return self._mismatch(seq, snapshot_index=self.snapshot_index)
        return self._accept(chunk, now)

    def _accept(self, chunk: SnapshotChunk, now: float | None) -> Step:
        seq = chunk.seq
        if self._max_chunk is None:
            self._max_chunk = len(chunk.data)
        self._received = seq + 1
        self._received_bytes += len(chunk.data)
        self._mismatches = 0
        self._awaiting = None
        self._progressed = now
        self._state = COMPLETE if self._received == self._total else RECEIVING
        return Step(ack=_ack(seq, _ACCEPTED, seq + 1), data=chunk.data)

    def _drop(self, seq: int) -> Step:
        # Sent before the sender read our CHECKSUM_MISMATCH: it will come again.
        self._count_noise(seq)
        return Step(ack=None, data=None)

    def _count_noise(self, seq: int) -> None:
        self._noise += 1
        budget = (self._max_retries + 1) * max(self._total, 1)
        if self._noise > budget:
            n = self._received
            raise self._fail(
                f"{self._noise} duplicate or out-of-turn chunks (last seq {seq}), "
                f"more than the {budget} allowed",
                seq,
                n,
            )

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
        bad_field: str | None = None,
        resumable: bool = False,
    ) -> ReceiveAbort:
        index = self.snapshot_index if snapshot_index is None else snapshot_index
        name = SnapshotAck.ChunkStatus.Name(status)
        facts: dict[str, Any] = {"stale": stale, "bad_field": bad_field, "resumable": resumable}
        ack = _ack(seq, status, next_requested)
        abort = ReceiveAbort(reason, name, seq, ack, snapshot_index=index, **facts)
        self._state = ABORTED
        self._abort = abort
        return abort

    def _refusal(self) -> ReceiveAbort:
        # Failed stays failed: same facts, but the final ack was already sent.
        first = self._abort
        assert first is not None
        refusal = ReceiveAbort(f"receiver already aborted: {first.reason}", first.status, 0, None)
        refusal.__dict__.update(
            {k: v for k, v in first.__dict__.items() if k not in ("reason", "ack")}
        )
        return refusal


__all__ = [
    "ABORTED",
    "AWAIT_FIRST",
    "COMPLETE",
    "RECEIVING",
    "Partial",
    "ReceiveAbort",
    "SnapshotReceiver",
    "Step",
]
