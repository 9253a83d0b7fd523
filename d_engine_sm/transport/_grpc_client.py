"""The gRPC clients: push a snapshot (InstallSnapshot), pull one (StreamSnapshot).

I/O glue only. A push is driven by the sans-IO sender: its probe (a resume
header alone) learns from the receiver's ``SnapshotResponse.next_chunk``
where to start, then the chunks from there go in one call. A pull hands the
call's chunks to the handler's receive path, whose acks (``next_requested``)
drive the peer's sender, resuming included.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc

from d_engine_sm._snapshot.naming import archive_name
from d_engine_sm._snapshot.sender import Abort, Decision, Probe, Send, SnapshotSender
from d_engine_sm._snapshot.streams import ChunkStream
from d_engine_sm.errors import (
    CorruptSnapshotError,
    SnapshotError,
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
)
from d_engine_sm.proto import storage_pb2, storage_pb2_grpc
from d_engine_sm.transport._grpc_server import LAST_APPLIED_KEY, NEXT_CHUNK_KEY

if TYPE_CHECKING:
    from d_engine_sm._handler import StateMachineHandler

_log = logging.getLogger("d_engine_sm.transport")

_GRPC_DEFAULT_MESSAGE: Final = 4 * 1024 * 1024
_MESSAGE_OVERHEAD: Final = 64 * 1024  # chunk header + metadata, generously

# How a peer that knows no probe (d-engine, an older d_engine_sm) refuses one.
_PROBE_NOT_UNDERSTOOD: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

SnapshotAck = storage_pb2.SnapshotAck
SnapshotChunk = storage_pb2.SnapshotChunk
SnapshotMetadata = storage_pb2.SnapshotMetadata
SnapshotResponse = storage_pb2.SnapshotResponse
Interceptors = Sequence[grpc.StreamUnaryClientInterceptor | grpc.StreamStreamClientInterceptor]  # type: ignore[type-arg]


def message_limit(chunk_size: int) -> int:
    """Max gRPC message size for ``chunk_size`` chunks (never below gRPC's 4 MiB default)."""
    return max(chunk_size + _MESSAGE_OVERHEAD, _GRPC_DEFAULT_MESSAGE)


def options(limit: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]


@contextlib.contextmanager
def _stub(
    target: str,
    chunk_size: int,
    credentials: grpc.ChannelCredentials | None,
    interceptors: Interceptors,
) -> Iterator[Any]:
    """A SnapshotService stub on a new channel, closed on exit."""
    opts = options(message_limit(chunk_size))
    if credentials is None:
        raw = grpc.insecure_channel(target, options=opts)
    else:
        raw = grpc.secure_channel(target, credentials, options=opts)
    try:
        channel = grpc.intercept_channel(raw, *interceptors) if interceptors else raw
        yield storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
    finally:
        raw.close()


def _trailer(err: grpc.RpcError, key: str) -> int | None:
    try:
        pairs: Any = err.trailing_metadata() or ()
    except Exception:  # not a Call (no status): nothing to read
        return None
    for k, v in pairs:
        if k == key:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _describe(err: grpc.RpcError) -> str:
    try:
        return f"{err.code().name}: {err.details()}"
    except Exception:  # an RpcError without a status
        return repr(err)


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return err.code()
    except Exception:  # an RpcError without a status
        return None


class _Outgoing(Iterator[SnapshotChunk]):
    """The chunks of one push call, serialising ``next`` with ``close``.

    gRPC pulls request iterators on its own thread, which may still be inside
    ``next`` when the call fails; closing must wait for it.
    """

    def __init__(self, source: ChunkStream, seqs: range, *, header: bool) -> None:
        self._source = source
        self._seqs = iter(seqs)
        self._header = header
        self._lock = threading.Lock()
        self._closed = False
        self.sent = 0

    def __next__(self) -> SnapshotChunk:
        with self._lock:
            if self._closed:
                raise StopIteration
            if self._header:
                self._header = False
                return self._source.header()
            chunk = self._source.chunk(next(self._seqs))
            self.sent += 1
            return chunk

    def close(self) -> None:
        with self._lock:
            self._closed = True


def send_snapshot(
    target: str,
    handler: StateMachineHandler,
    metadata: SnapshotMetadata | None = None,
    *,
    leader_term: int,
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Interceptors = (),
    resume: bool = True,
) -> SnapshotResponse:
    """Push a snapshot of ``handler`` to the peer at ``target`` (InstallSnapshot).

    Blocks until the peer installed it, refused it or ``timeout`` expired.
    Thread-safe (one channel per call). The archive (and its shared lock)
    is always released before returning.

    With ``resume`` a data-less probe asks the peer for the first chunk it
    lacks of this snapshot (it may hold a prefix from an interrupted
    transfer); only the chunks from there are sent. A peer that does not
    answer the probe gets the whole snapshot.

    Args:
        target: ``host:port`` of the peer.
        handler: the sending node's handler.
        metadata: the snapshot to send; default the newest.
        leader_term: sent as every chunk's ``leader_term``.
        timeout: deadline for the whole push (probe included), in seconds.
        credentials: TLS channel credentials; plaintext when None.
        interceptors: gRPC client interceptors (tests corrupt chunks with them).
        resume: probe the peer and send only what it lacks.

    Returns:
        The peer's ``SnapshotResponse`` (``success`` True, ``next_chunk`` = total chunks).

    Raises:
        SnapshotNotFound: no snapshot to send.
        CorruptSnapshotError: the archive to send is empty (truncated on disk).
        StaleSnapshotError: the peer has applied past this snapshot.
        SnapshotTransferError: the peer refused or the call failed (status text
            in the message; ``seq`` = the peer's ``next_chunk`` when known).
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    meta = metadata if metadata is not None else handler.get_latest_snapshot_metadata()
    if meta is None:
        raise SnapshotNotFound(str(handler.config.snapshots_dir), "no snapshot to send")
    source = handler.load_snapshot_data(meta, leader_term=leader_term)
    if not isinstance(source, ChunkStream):  # pragma: no cover - the handler's own type
        raise TypeError("load_snapshot_data returned an unexpected stream")
    lid = meta.last_included
    with contextlib.closing(source):
        if source.total_chunks < 1:  # truncated on disk: no chunk 0 to name the snapshot
            config = handler.config
            name = archive_name(config.snapshots_dir_prefix, lid.index, lid.term)
            raise CorruptSnapshotError(str(config.snapshots_dir / name), "archive is empty")
        with _stub(target, handler.config.chunk_size, credentials, interceptors) as stub:
            response = _push(stub, source, meta=meta, target=target, timeout=timeout, resume=resume)
    _log.info(
        "sent snapshot target=%s index=%d term=%d chunks=%d",
        target,
        lid.index,
        lid.term,
        response.next_chunk,
    )
    return response


def _push(
    stub: Any,
    source: ChunkStream,
    *,
    meta: SnapshotMetadata,
    target: str,
    timeout: float,
    resume: bool,
) -> SnapshotResponse:
    total = source.total_chunks
    started = time.monotonic()
    end_by = started + timeout
    # The window is the whole snapshot: a push call cannot read acks midway.
    sender = SnapshotSender(
        total, window=total, max_retries=0, ack_timeout=timeout, deadline=timeout, probe=resume
    )
    decision: Decision = sender.start(started)
    if isinstance(decision, Probe):
        decision = _probe(stub, source, sender=sender, meta=meta, target=target, end_by=end_by)
    if not isinstance(decision, Send):
        raise _decision_error(decision, target)
    chunks = _Outgoing(source, decision.seqs, header=decision.seqs.start > 0)
    try:
        response: SnapshotResponse = stub.InstallSnapshot(
            chunks, timeout=max(0.001, end_by - time.monotonic())
        )
    except grpc.RpcError as err:
        raise _push_error(err, target, meta) from err
    finally:
        chunks.close()
    if not response.success:  # an OK status with success=false (not ours, but legal)
        raise SnapshotTransferError(
            f"peer {target} answered success=false", seq=response.next_chunk
        )
    if sender.resumed_at:
        _log.info("push resumed target=%s from=%d sent=%d", target, sender.resumed_at, chunks.sent)
    return response


def _probe(
    stub: Any,
    source: ChunkStream,
    *,
    sender: SnapshotSender,
    meta: SnapshotMetadata,
    target: str,
    end_by: float,
) -> Decision:
    """Ask the peer where to start (a header alone); a peer that does not resume gets all."""
    try:
        answer: SnapshotResponse = stub.InstallSnapshot(
            iter([source.header()]), timeout=max(0.001, end_by - time.monotonic())
        )
    except grpc.RpcError as err:
        if _code(err) not in _PROBE_NOT_UNDERSTOOD:  # stale, busy, unreachable: say so now
            raise _push_error(err, target, meta) from err
        _log.info("resume probe refused target=%s: %s", target, _describe(err))
        return sender.on_probe_refused(time.monotonic())
    if answer.success:  # a peer that installed from a header alone: not one of ours
        return sender.on_probe_refused(time.monotonic())
    ask = SnapshotAck(seq=0, status=SnapshotAck.REQUESTED, next_requested=answer.next_chunk)
    return sender.on_ack(ask, time.monotonic())


def _decision_error(decision: Decision, target: str) -> SnapshotTransferError:
    """The probe's answer leaves nothing to send: out of range, or every chunk (Finish)."""
    if isinstance(decision, Abort):
        return SnapshotTransferError(f"InstallSnapshot to {target}: {decision.reason}")
    # Holding every chunk yet not installed: a header alone would only be a probe again.
    return SnapshotTransferError(
        f"InstallSnapshot to {target}: the peer's answer to the probe claims every chunk, "
        "yet it installed nothing"
    )


def _push_error(err: grpc.RpcError, target: str, meta: SnapshotMetadata) -> SnapshotError:
    if _code(err) == grpc.StatusCode.FAILED_PRECONDITION:
        last_applied = _trailer(err, LAST_APPLIED_KEY)
        return StaleSnapshotError(
            meta.last_included.index, last_applied if last_applied is not None else -1
        )
    next_chunk = _trailer(err, NEXT_CHUNK_KEY) or 0
    return SnapshotTransferError(
        f"InstallSnapshot to {target} failed: {_describe(err)}", seq=next_chunk
    )


def pull_snapshot(
    target: str,
    handler: StateMachineHandler,
    *,
    timeout: float,
    current_term: int = 0,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Interceptors = (),
) -> SnapshotMetadata:
    """Pull the newest snapshot of the peer at ``target`` and install it (StreamSnapshot).

    Blocks until installed, refused or ``timeout`` expired; the call is
    cancelled on any failure, and nothing is installed then. When this node
    holds part of that very snapshot from an interrupted transfer, its ack of
    chunk 0 asks for the first chunk it lacks (``next_requested``) and the
    peer goes on from there. Thread-safe.

    Args:
        target: ``host:port`` of the leader.
        handler: the receiving node's handler.
        timeout: deadline for the whole call, in seconds.
        current_term: this node's term (passed to the receive path).
        credentials: TLS channel credentials; plaintext when None.
        interceptors: gRPC client interceptors (tests corrupt chunks with them).

    Returns:
        The installed snapshot's metadata.

    Raises:
        SnapshotNotFound: the peer has no snapshot.
        StaleSnapshotError: the peer's snapshot is not newer than ``last_applied()``.
        SnapshotTransferError: the transfer failed (status text in the message).
        UnsafeArchiveError / CorruptSnapshotError: the archive was refused.
        SnapshotInProgress: another create/install runs on ``handler``.
        SnapshotError: writing or installing failed.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    with _stub(target, handler.config.chunk_size, credentials, interceptors) as stub:
        meta = _pull(stub, handler, target, timeout, current_term)
    lid = meta.last_included
    _log.info("pulled snapshot target=%s index=%d term=%d", target, lid.index, lid.term)
    return meta


def _pull(
    stub: Any, handler: StateMachineHandler, target: str, timeout: float, current_term: int
) -> SnapshotMetadata:
    acks: queue.SimpleQueue[SnapshotAck | None] = queue.SimpleQueue()
    call = stub.StreamSnapshot(iter(acks.get, None), timeout=timeout)
    try:
        meta: SnapshotMetadata = handler.apply_snapshot_stream_from_leader(
            current_term, iter(call), acks.put
        )
    except SnapshotTransferError as exc:
        call.cancel()
        raise _pull_error(exc, target) from exc.__cause__
    except BaseException:
        call.cancel()
        raise
    finally:
        acks.put(None)
    return meta


def _pull_error(exc: SnapshotTransferError, target: str) -> SnapshotError:
    cause = exc.__cause__
    if not isinstance(cause, grpc.RpcError) or isinstance(exc, StaleSnapshotError):
        return exc
    if _code(cause) == grpc.StatusCode.NOT_FOUND:
        return SnapshotNotFound(target, "peer has no snapshot")
    return SnapshotTransferError(
        f"StreamSnapshot from {target} failed: {_describe(cause)}",
        seq=exc.seq,
        status=exc.status,
    )
