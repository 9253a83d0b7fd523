"""The gRPC servicer: I/O glue between d-engine's ``SnapshotService`` and a handler.

Protocol decisions live in the sans-IO receiver (InstallSnapshot, through the
handler's receive path) and sender (StreamSnapshot); this module moves
messages, maps errors to statuses (each error class names its own,
``DEngineError.grpc_status``) and logs.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, NoReturn

import grpc

from d_engine_sm._snapshot.sender import (
    Abort,
    Decision,
    Finish,
    Probe,
    Resend,
    Send,
    SnapshotSender,
)
from d_engine_sm._snapshot.streams import ChunkStream
from d_engine_sm.errors import DEngineError, SnapshotTransferError
from d_engine_sm.proto import storage_pb2, storage_pb2_grpc

if TYPE_CHECKING:
    from d_engine_sm._handler import StateMachineHandler

_log = logging.getLogger("d_engine_sm.transport")

NEXT_CHUNK_KEY: Final = "d-engine-sm-next-chunk"
LAST_APPLIED_KEY: Final = "d-engine-sm-last-applied"
ERROR_KEY: Final = "d-engine-sm-error"
DEFAULT_WINDOW: Final = 4
_CUT_OFF_WAIT: Final = 0.2  # seconds for a cancellation to follow an early end of stream

SnapshotAck = storage_pb2.SnapshotAck
SnapshotChunk = storage_pb2.SnapshotChunk
SnapshotMetadata = storage_pb2.SnapshotMetadata
SnapshotResponse = storage_pb2.SnapshotResponse
TermSource = Callable[[], int] | int


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status an error ends a call with (its class's ``grpc_status``)."""
    name = exc.grpc_status if isinstance(exc, DEngineError) else "INTERNAL"
    code: grpc.StatusCode = getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)
    return code


def _status_name(status: int) -> str:
    try:
        return SnapshotAck.ChunkStatus.Name(status)
    except ValueError:
        return str(status)


def _call_ended(context: grpc.ServicerContext) -> threading.Event:
    """Set once the call terminates (cancelled, deadline, done)."""
    ended = threading.Event()
    if not context.add_callback(ended.set):  # False: it already has
        ended.set()
    return ended


class _Peeked(Iterator[SnapshotChunk]):
    """Passes a request stream through, noting whether it was only a resume header.

    gRPC may end the request stream of a call whose client or connection died
    as if the client had half-closed, the cancellation arriving just after.
    An early end is therefore turned into a ``ConnectionResetError`` when the
    call terminates within ``_CUT_OFF_WAIT`` (a half-close leaves it active),
    so the receive keeps what it verified.
    """

    def __init__(self, chunks: Iterator[SnapshotChunk], context: grpc.ServicerContext) -> None:
        self._chunks = chunks
        self._ended = _call_ended(context)
        self.count = 0
        self.header_first = False

    def __next__(self) -> SnapshotChunk:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            if not self.probe and self._ended.wait(_CUT_OFF_WAIT):
                raise ConnectionResetError("the call was cancelled mid-stream") from None
            raise
        if self.count == 0:
            self.header_first = chunk.seq == 0 and not chunk.data and chunk.HasField("metadata")
        self.count += 1
        return chunk

    @property
    def probe(self) -> bool:
        return self.header_first and self.count == 1


class SnapshotServicer(storage_pb2_grpc.SnapshotServiceServicer):
    """d-engine's ``SnapshotService`` backed by one handler.

    Thread-safe: gRPC runs each call on its own pool thread. InstallSnapshot
    blocks its thread for the whole receive and install; StreamSnapshot
    holds the archive (shared lock) until the call ends.

    Args:
        handler: the node's handler (receives pushes, serves pulls).
        current_term: this node's term, or a callable returning it; sent as
            ``SnapshotResponse.term`` and passed to the receive path.
            StreamSnapshot chunks carry it as ``leader_term`` when > 0 (else
            d-engine's choice, ``last_included.term``).
        window: StreamSnapshot chunks in flight before an ack is awaited
            (1 = strict ping-pong).
        max_retries: resends of one chunk before StreamSnapshot gives up;
            default ``handler.config.max_chunk_retries``.
        ack_timeout: seconds StreamSnapshot waits for an ack; default
            ``handler.config.chunk_timeout``.

    Raises:
        ValueError: ``window < 1``, ``max_retries < 0`` or ``ack_timeout <= 0``.
    """

    def __init__(
        self,
        handler: StateMachineHandler,
        *,
        current_term: TermSource = 0,
        window: int = DEFAULT_WINDOW,
        max_retries: int | None = None,
        ack_timeout: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if ack_timeout is not None and not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0, got {ack_timeout}")
        self._handler = handler
        self._term = current_term
        self._window = window
        self._max_retries = handler.config.max_chunk_retries if max_retries is None else max_retries
        self._ack_timeout = handler.config.chunk_timeout if ack_timeout is None else ack_timeout

    def current_term(self) -> int:
        """This node's term as configured (calls the callable if one was given)."""
        return self._term() if callable(self._term) else self._term

    # -- InstallSnapshot ---------------------------------------------------------
    def InstallSnapshot(
        self, request_iterator: Iterator[SnapshotChunk], context: grpc.ServicerContext
    ) -> SnapshotResponse:
        """Receive and install a pushed snapshot; see the package docstring for replies.

        Blocks until the install finished or failed. A cancelled call or an
        expired deadline ends the request iterator with an error, so the
        receive fails (keeping what it verified to resume from).
        """
        term = self.current_term()
        peer = context.peer()
        last: list[SnapshotAck] = []
        chunks = _Peeked(request_iterator, context)

        def ack(message: SnapshotAck) -> None:
            # Client streaming: the leader cannot read acks, so they only log.
            last[:] = [message]
            _log.debug(
                "ack peer=%s seq=%d status=%s next=%d",
                peer,
                message.seq,
                _status_name(message.status),
                message.next_requested,
            )

        try:
            meta = self._handler.apply_snapshot_stream_from_leader(term, chunks, ack)
        except Exception as exc:
            next_chunk = last[0].next_requested if last else 0
            if chunks.probe and type(exc) is SnapshotTransferError:
                # A header alone asks where to resume: not a failure.
                _log.info("InstallSnapshot probe peer=%s next_chunk=%d", peer, next_chunk)
                return SnapshotResponse(term=term, success=False, next_chunk=next_chunk)
            return self._refuse(context, exc, term, next_chunk, peer)
        total = last[0].next_requested if last else 0
        lid = meta.last_included
        _log.info(
            "InstallSnapshot done peer=%s index=%d term=%d chunks=%d",
            peer,
            lid.index,
            lid.term,
            total,
        )
        return SnapshotResponse(term=term, success=True, next_chunk=total)

    def _refuse(
        self, context: grpc.ServicerContext, exc: Exception, term: int, next_chunk: int, peer: str
    ) -> SnapshotResponse:
        # ``peer`` was read when the call began: asking a cancelled call during a
        # server's shutdown can block until the shutdown is over.
        code = status_for(exc)
        _log.warning(
            "InstallSnapshot failed peer=%s code=%s next_chunk=%d error=%s",
            peer,
            code.name,
            next_chunk,
            exc,
        )
        context.set_code(code)
        context.set_details(f"{type(exc).__name__}: {exc}")
        context.set_trailing_metadata(
            (
                (NEXT_CHUNK_KEY, str(next_chunk)),
                (LAST_APPLIED_KEY, str(self._handler.last_applied())),
                (ERROR_KEY, type(exc).__name__),
            )
        )
        return SnapshotResponse(term=term, success=False, next_chunk=next_chunk)

    # -- StreamSnapshot ----------------------------------------------------------
    def StreamSnapshot(
        self, request_iterator: Iterator[SnapshotAck], context: grpc.ServicerContext
    ) -> Iterator[SnapshotChunk]:
        """Stream the newest snapshot to a learner, driven by its acks.

        Chunk 0 goes first, alone: its ack says where the learner resumes.
        Ends with NOT_FOUND when there is no snapshot, ABORTED when the
        learner reports FAILED/OUT_OF_ORDER, closes its acks early or a
        chunk needs more than ``max_retries`` resends, DEADLINE_EXCEEDED when
        no ack arrives within ``ack_timeout``, INVALID_ARGUMENT on a
        nonsensical ack.
        """
        handler = self._handler
        meta = handler.get_latest_snapshot_metadata()
        if meta is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"node {handler.node_id} has no snapshot")
        term = self.current_term() or None
        try:
            source = handler.load_snapshot_data(meta, leader_term=term)
        except DEngineError as exc:  # pruned since we looked, closed, …
            _abort(context, status_for(exc), f"{type(exc).__name__}: {exc}")
        if not isinstance(source, ChunkStream):  # pragma: no cover - the handler's own type
            _abort(context, grpc.StatusCode.INTERNAL, "unexpected chunk stream")
        with contextlib.closing(source):
            if source.total_chunks < 1:
                _abort(context, grpc.StatusCode.INTERNAL, "snapshot archive is empty")
            ended = _call_ended(context)
            acks = _AckReader(request_iterator)
            yield from self._stream(meta, source, acks, context, ended)

    def _stream(
        self,
        meta: SnapshotMetadata,
        source: ChunkStream,
        acks: _AckReader,
        context: grpc.ServicerContext,
        ended: threading.Event,
    ) -> Iterator[SnapshotChunk]:
        peer = context.peer()
        sender = SnapshotSender(
            source.total_chunks,
            window=self._window,
            max_retries=self._max_retries,
            ack_timeout=self._ack_timeout,
        )
        decision: Decision | None = sender.start(time.monotonic())
        while decision is not None and not isinstance(decision, (Finish, Abort)):
            if isinstance(decision, Probe):
                yield source.chunk(0)
            elif isinstance(decision, Send):
                if isinstance(decision, Resend):
                    _log.debug("resending peer=%s seq=%d", peer, decision.seqs.start)
                yield from map(source.chunk, decision.seqs)
            decision = _next_decision(sender, acks, peer)
        if decision is None:
            return  # the call ended (cancelled, deadline): nothing to answer
        if isinstance(decision, Abort):
            # gRPC may end the acks of a cancelled call as if the learner had
            # half-closed, the cancellation arriving just after: nothing to answer.
            if ended.wait(_CUT_OFF_WAIT if acks.closed else 0):
                _log.info("StreamSnapshot ended by peer=%s: the call was cancelled", peer)
                return
            _log.info("StreamSnapshot to peer=%s aborted: %s", peer, decision.reason)
            _abort(context, getattr(grpc.StatusCode, decision.status), decision.reason)
        source.complete()
        lid = meta.last_included
        _log.info(
            "StreamSnapshot done peer=%s index=%d term=%d chunks=%d resumed_at=%d resends=%d",
            peer,
            lid.index,
            lid.term,
            source.total_chunks,
            sender.resumed_at,
            decision.resends,
        )


def _next_decision(sender: SnapshotSender, acks: _AckReader, peer: str) -> Decision | None:
    """Wait for the next ack (or the sender's deadline) and let the sender decide."""
    ack = acks.get(max(0.0, sender.until - time.monotonic()))
    now = time.monotonic()
    if ack is None:
        return sender.on_tick(now)
    if isinstance(ack, BaseException):
        _log.info("StreamSnapshot ended by peer=%s: %r", peer, ack)
        return None
    if ack is _AckReader.END:
        return sender.on_end(now)
    _log.debug(
        "ack peer=%s seq=%d status=%s next=%d",
        peer,
        ack.seq,
        _status_name(ack.status),
        ack.next_requested,
    )
    return sender.on_ack(ack, now)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover


class _AckReader:
    """Pulls a learner's acks on a daemon thread so waits can time out.

    The thread ends when the client half-closes or the call ends (gRPC's
    request iterator then raises).
    """

    END: Final = SnapshotAck()  # identity sentinel: the client closed its stream

    def __init__(self, request_iterator: Iterator[SnapshotAck]) -> None:
        self._queue: queue.SimpleQueue[SnapshotAck | BaseException] = queue.SimpleQueue()
        self._it = request_iterator
        self.closed = False  # the learner's ack stream ended (half-close, or so it seemed)
        threading.Thread(target=self._run, name="d-engine-sm-grpc-acks", daemon=True).start()

    def _run(self) -> None:
        try:
            for ack in self._it:
                self._queue.put(ack)
            self.closed = True
            self._queue.put(self.END)
        except Exception as exc:  # grpc.RpcError: cancelled, deadline, connection lost
            self._queue.put(exc)

    def get(self, timeout: float) -> SnapshotAck | BaseException | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


__all__ = ["DEFAULT_WINDOW", "SnapshotServicer", "status_for"]
