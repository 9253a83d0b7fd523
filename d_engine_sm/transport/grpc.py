"""gRPC snapshot transport: d-engine's ``SnapshotService`` over HTTP/2.

The only module in the package that imports ``grpc`` (extra
``d_engine_sm[grpc]``). Method paths are d-engine's:

- ``/d_engine.server.storage.SnapshotService/InstallSnapshot`` — client
  streaming, leader → follower. The follower's reply says success only
  after the snapshot is installed.
- ``/d_engine.server.storage.SnapshotService/StreamSnapshot`` — bidirectional,
  a learner pulls the leader's newest snapshot; its ``SnapshotAck``s drive
  flow control (a window of chunks in flight) and retransmission.

InstallSnapshot outcome — the *status* is authoritative:

- status OK and ``SnapshotResponse(term, success=True, next_chunk=total)``:
  installed.
- any other status: refused, nothing installed. The status details say why;
  the trailing metadata carries ``d-engine-sm-next-chunk`` (the seq to resume
  from), ``d-engine-sm-last-applied`` and ``d-engine-sm-error`` (the error
  class). Codes: FAILED_PRECONDITION stale snapshot, ABORTED another snapshot
  create/install runs, INVALID_ARGUMENT bad stream or archive,
  RESOURCE_EXHAUSTED no disk space, UNAVAILABLE handler closed, INTERNAL
  anything else. (A ``SnapshotResponse(success=False)`` is attached too, but
  gRPC clients surface only the status.)

StreamSnapshot uses go-back-N: up to ``window`` chunks in flight; a
``CHECKSUM_MISMATCH``/``REQUESTED`` ack rewinds to ``next_requested``.
Because a receiver refuses a gap, :func:`pull_snapshot` drops the chunks
already in flight behind a corrupt one until its resend arrives.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any, Final

import grpc

from d_engine_sm._snapshot.chunks import verify_chunk
from d_engine_sm.errors import (
    CorruptSnapshotError,
    HandlerClosed,
    InsufficientSpace,
    SnapshotError,
    SnapshotInProgress,
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
    UnsafeArchiveError,
)
from d_engine_sm.proto import storage_pb2, storage_pb2_grpc

if TYPE_CHECKING:
    from d_engine_sm._handler import StateMachineHandler

_log = logging.getLogger("d_engine_sm.transport")

SERVICE_NAME: Final = "d_engine.server.storage.SnapshotService"
INSTALL_SNAPSHOT_METHOD: Final = f"/{SERVICE_NAME}/InstallSnapshot"
STREAM_SNAPSHOT_METHOD: Final = f"/{SERVICE_NAME}/StreamSnapshot"

NEXT_CHUNK_KEY: Final = "d-engine-sm-next-chunk"
LAST_APPLIED_KEY: Final = "d-engine-sm-last-applied"
ERROR_KEY: Final = "d-engine-sm-error"

DEFAULT_WINDOW: Final = 4
_GRPC_DEFAULT_MESSAGE: Final = 4 * 1024 * 1024
_MESSAGE_OVERHEAD: Final = 64 * 1024  # chunk header + metadata, generously

SnapshotAck = storage_pb2.SnapshotAck
SnapshotChunk = storage_pb2.SnapshotChunk
SnapshotMetadata = storage_pb2.SnapshotMetadata
SnapshotResponse = storage_pb2.SnapshotResponse
TermSource = Callable[[], int] | int
Interceptors = Sequence[grpc.StreamUnaryClientInterceptor | grpc.StreamStreamClientInterceptor]  # type: ignore[type-arg]

_ACCEPTED: Final = SnapshotAck.ACCEPTED
_RESEND: Final = (SnapshotAck.CHECKSUM_MISMATCH, SnapshotAck.REQUESTED)
_GIVE_UP: Final = (SnapshotAck.FAILED, SnapshotAck.OUT_OF_ORDER)


def message_limit(chunk_size: int) -> int:
    """Max gRPC message size for ``chunk_size`` chunks (never below gRPC's 4 MiB default)."""
    return max(chunk_size + _MESSAGE_OVERHEAD, _GRPC_DEFAULT_MESSAGE)


def _options(limit: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]


def _status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, StaleSnapshotError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, SnapshotInProgress):
        return grpc.StatusCode.ABORTED
    if isinstance(exc, (SnapshotTransferError, UnsafeArchiveError, CorruptSnapshotError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, InsufficientSpace):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, HandlerClosed):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


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
        """Receive and install a pushed snapshot; see the module docstring for replies.

        Blocks until the install finished or failed. A cancelled call or an
        expired deadline ends the request iterator with an error, so the
        receive fails and removes its temp files.
        """
        term = self.current_term()
        peer = context.peer()
        last: list[SnapshotAck] = []

        def ack(message: SnapshotAck) -> None:
            # Client streaming: the leader cannot read acks, so they only log.
            last[:] = [message]
            _log.debug(
                "ack peer=%s seq=%d status=%s next=%d",
                peer,
                message.seq,
                SnapshotAck.ChunkStatus.Name(message.status),
                message.next_requested,
            )

        try:
            meta = self._handler.apply_snapshot_stream_from_leader(term, request_iterator, ack)
        except Exception as exc:
            code = _status_for(exc)
            next_chunk = last[0].next_requested if last else 0
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

    # -- StreamSnapshot ----------------------------------------------------------
    def StreamSnapshot(
        self, request_iterator: Iterator[SnapshotAck], context: grpc.ServicerContext
    ) -> Iterator[SnapshotChunk]:
        """Stream the newest snapshot to a learner, driven by its acks.

        Ends with NOT_FOUND when there is no snapshot, ABORTED when the
        learner reports FAILED/OUT_OF_ORDER, closes its acks early or a
        chunk needs more than ``max_retries`` resends, DEADLINE_EXCEEDED when
        no ack arrives within ``ack_timeout``, INVALID_ARGUMENT on a
        nonsensical ack.
        """
        handler = self._handler
        meta = handler.get_latest_snapshot_metadata()
        if meta is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"node {handler.node_id} has no snapshot")
        term = self.current_term() or None
        try:
            source = handler.load_snapshot_data(meta, leader_term=term)
        except SnapshotNotFound as exc:  # pruned since we looked
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (HandlerClosed, SnapshotError) as exc:
            context.abort(_status_for(exc), f"{type(exc).__name__}: {exc}")
        try:
            acks = _AckReader(request_iterator)
            yield from self._stream(meta, term, source, acks, context)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _stream(
        self,
        meta: SnapshotMetadata,
        term: int | None,
        source: Iterator[SnapshotChunk],
        acks: _AckReader,
        context: grpc.ServicerContext,
    ) -> Iterator[SnapshotChunk]:
        peer = context.peer()
        first = next(source, None)
        if first is None:
            context.abort(grpc.StatusCode.INTERNAL, "snapshot archive is empty")
        total = first.total_chunks
        cache: dict[int, SnapshotChunk] = {0: first}  # sent, not yet accepted
        fresh = 1  # chunks taken from ``source`` so far (it is sequential)
        base = 0  # lowest seq not yet accepted
        nxt = 0  # next seq to send
        resends: Counter[int] = Counter()
        while base < total:
            while nxt < total and nxt - base < self._window:
                chunk = cache.get(nxt)
                if chunk is None:
                    if nxt == fresh:
                        chunk = next(source)
                        fresh += 1
                    else:  # asked for one already accepted and evicted
                        chunk = self._handler.load_snapshot_chunk(meta, nxt, leader_term=term)
                    cache[nxt] = chunk
                yield chunk
                nxt += 1
            ack = acks.get(self._ack_timeout)
            if ack is None:
                context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no ack within {self._ack_timeout:g}s (accepted {base} of {total} chunks)",
                )
            if isinstance(ack, BaseException):  # the call ended: cancelled or deadline
                _log.info("StreamSnapshot ended by peer=%s at %d/%d: %r", peer, base, total, ack)
                return
            if ack is _AckReader.END:
                context.abort(
                    grpc.StatusCode.ABORTED,
                    f"learner closed its acks after {base} of {total} chunks",
                )
            status, requested = ack.status, ack.next_requested
            _log.debug(
                "ack peer=%s seq=%d status=%s next=%d",
                peer,
                ack.seq,
                SnapshotAck.ChunkStatus.Name(status) if status in _KNOWN else status,
                requested,
            )
            if status == _ACCEPTED:
                if requested > nxt:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"ack accepts up to {requested} but only {nxt} chunks were sent",
                    )
                for seq in range(base, requested):
                    cache.pop(seq, None)
                base = max(base, requested)
            elif status in _RESEND:
                if requested >= total:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"resend of chunk {requested} requested, snapshot has {total}",
                    )
                resends[requested] += 1
                if resends[requested] > self._max_retries:
                    context.abort(
                        grpc.StatusCode.ABORTED,
                        f"chunk {requested} resent {self._max_retries} times, giving up",
                    )
                _log.debug(
                    "resending peer=%s seq=%d attempt=%d", peer, requested, resends[requested]
                )
                base = min(base, requested)
                nxt = requested  # go back N: the learner drops what followed
            elif status in _GIVE_UP:
                name = SnapshotAck.ChunkStatus.Name(status)
                _log.info("StreamSnapshot peer=%s reported %s at seq=%d", peer, name, ack.seq)
                context.abort(
                    grpc.StatusCode.ABORTED, f"learner reported {name} at chunk {ack.seq}"
                )
            else:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown ack status {status}")
        lid = meta.last_included
        _log.info(
            "StreamSnapshot done peer=%s index=%d term=%d chunks=%d resends=%d",
            peer,
            lid.index,
            lid.term,
            total,
            sum(resends.values()),
        )


_KNOWN: Final = frozenset(SnapshotAck.ChunkStatus.values())


class _AckReader:
    """Pulls a learner's acks on a daemon thread so waits can time out.

    The thread ends when the client half-closes or the call ends (gRPC's
    request iterator then raises).
    """

    END: Final = SnapshotAck()  # identity sentinel: the client closed its stream

    def __init__(self, request_iterator: Iterator[SnapshotAck]) -> None:
        self._queue: queue.SimpleQueue[SnapshotAck | BaseException] = queue.SimpleQueue()
        self._it = request_iterator
        threading.Thread(target=self._run, name="d-engine-sm-grpc-acks", daemon=True).start()

    def _run(self) -> None:
        try:
            for ack in self._it:
                self._queue.put(ack)
            self._queue.put(self.END)
        except Exception as exc:  # grpc.RpcError: cancelled, deadline, connection lost
            self._queue.put(exc)

    def get(self, timeout: float) -> SnapshotAck | BaseException | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


# -- server -------------------------------------------------------------------------
def start_server(
    handler: StateMachineHandler,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None = None,
    current_term: TermSource = 0,
    max_workers: int = 8,
    window: int = DEFAULT_WINDOW,
    max_message_bytes: int | None = None,
) -> tuple[grpc.Server, int]:
    """Like :func:`serve`, also returning the bound port (useful with ``:0``).

    Raises:
        OSError: ``listen`` could not be bound.
    """
    limit = max_message_bytes or message_limit(handler.config.chunk_size)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="d-engine-sm-grpc"),
        # SO_REUSEPORT (gRPC's default) would let a second server bind a busy
        # port silently; a taken port must be an error.
        options=[*_options(limit), ("grpc.so_reuseport", 0)],
    )
    servicer = SnapshotServicer(handler, current_term=current_term, window=window)
    storage_pb2_grpc.add_SnapshotServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:  # grpc reports bind failures this way
        raise OSError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    _log.info(
        "serving node=%d listen=%s port=%d tls=%s", handler.node_id, listen, port, bool(credentials)
    )
    return server, port


def serve(
    handler: StateMachineHandler,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None = None,
    current_term: TermSource = 0,
    max_workers: int = 8,
    window: int = DEFAULT_WINDOW,
    max_message_bytes: int | None = None,
) -> grpc.Server:
    """Start a gRPC server exposing ``handler`` as d-engine's ``SnapshotService``.

    Non-blocking: returns the started server; the caller stops it
    (``server.stop(grace)``) and closes the handler afterwards.

    Args:
        handler: the node's handler.
        listen: ``host:port`` (port 0 picks a free one; see :func:`start_server`).
        credentials: TLS server credentials; plaintext when None.
        current_term: this node's term or a callable returning it.
        max_workers: concurrent calls served.
        window: StreamSnapshot chunks in flight.
        max_message_bytes: gRPC message limit; default from ``chunk_size``.

    Returns:
        The started ``grpc.Server``.

    Raises:
        OSError: ``listen`` could not be bound.
    """
    return start_server(
        handler,
        listen,
        credentials=credentials,
        current_term=current_term,
        max_workers=max_workers,
        window=window,
        max_message_bytes=max_message_bytes,
    )[0]


# -- clients ------------------------------------------------------------------------
def _open_channel(
    target: str,
    chunk_size: int,
    credentials: grpc.ChannelCredentials | None,
    interceptors: Interceptors,
) -> tuple[grpc.Channel, grpc.Channel]:
    """(the channel to call through, the underlying one to close)."""
    options = _options(message_limit(chunk_size))
    if credentials is None:
        raw = grpc.insecure_channel(target, options=options)
    else:
        raw = grpc.secure_channel(target, credentials, options=options)
    return (grpc.intercept_channel(raw, *interceptors) if interceptors else raw), raw


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


class _ClosingIterator(Iterator[SnapshotChunk]):
    """Serialises ``next`` and ``close`` of a chunk stream.

    gRPC pulls request iterators on its own thread, which may still be inside
    ``next`` when the call fails; closing must wait for it.
    """

    def __init__(self, source: Iterator[SnapshotChunk]) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._closed = False
        self.sent = 0

    def __next__(self) -> SnapshotChunk:
        with self._lock:
            if self._closed:
                raise StopIteration
            chunk = next(self._source)
            self.sent += 1
            return chunk

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            close = getattr(self._source, "close", None)
            if close is not None:
                close()


def send_snapshot(
    target: str,
    handler: StateMachineHandler,
    metadata: SnapshotMetadata | None = None,
    *,
    leader_term: int,
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Interceptors = (),
) -> SnapshotResponse:
    """Push a snapshot of ``handler`` to the peer at ``target`` (InstallSnapshot).

    Blocks until the peer installed it, refused it or ``timeout`` expired.
    Thread-safe (one channel per call). The chunk stream (and its shared
    lock on the archive) is always released before returning.

    Args:
        target: ``host:port`` of the peer.
        handler: the sending node's handler.
        metadata: the snapshot to send; default the newest.
        leader_term: sent as every chunk's ``leader_term``.
        timeout: deadline for the whole call, in seconds.
        credentials: TLS channel credentials; plaintext when None.
        interceptors: gRPC client interceptors (tests corrupt chunks with them).

    Returns:
        The peer's ``SnapshotResponse`` (``success`` True, ``next_chunk`` = total chunks).

    Raises:
        SnapshotNotFound: no snapshot to send.
        StaleSnapshotError: the peer has applied past this snapshot.
        SnapshotTransferError: the peer refused or the call failed (status text
            in the message; ``seq`` = the peer's ``next_chunk`` when known).
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    meta = metadata if metadata is not None else handler.get_latest_snapshot_metadata()
    if meta is None:
        raise SnapshotNotFound(str(handler.config.snapshots_dir), "no snapshot to send")
    chunks = _ClosingIterator(handler.load_snapshot_data(meta, leader_term=leader_term))
    try:
        channel, raw = _open_channel(target, handler.config.chunk_size, credentials, interceptors)
        try:
            stub = storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
            response: SnapshotResponse = stub.InstallSnapshot(chunks, timeout=timeout)
        except grpc.RpcError as err:
            raise _push_error(err, target, meta) from err
        finally:
            raw.close()
    finally:
        chunks.close()
    if not response.success:  # an OK status with success=false (not ours, but legal)
        raise SnapshotTransferError(
            f"peer {target} answered success=false", seq=response.next_chunk
        )
    lid = meta.last_included
    _log.info(
        "sent snapshot target=%s index=%d term=%d chunks=%d",
        target,
        lid.index,
        lid.term,
        response.next_chunk,
    )
    return response


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


class _GoBackFilter(Iterator[SnapshotChunk]):
    """Drops chunks in flight behind a corrupt one until its resend arrives.

    The server sends a window of chunks; after chunk ``s`` fails its CRC the
    receiver wants ``s`` again and would refuse ``s+1`` as a gap. The server
    goes back to ``s`` when it reads the CHECKSUM_MISMATCH ack, so anything
    above ``s`` that arrives first is stale and skipped here.
    """

    def __init__(self, chunks: Iterator[SnapshotChunk]) -> None:
        self._chunks = chunks
        self._waiting: int | None = None
        self.dropped = 0

    def __next__(self) -> SnapshotChunk:
        while True:
            chunk = next(self._chunks)
            waiting = self._waiting
            if waiting is not None and chunk.seq > waiting:
                self.dropped += 1
                _log.debug("dropped in-flight chunk seq=%d awaiting=%d", chunk.seq, waiting)
                continue
            ok = verify_chunk(chunk)
            if waiting is None and not ok:
                self._waiting = chunk.seq
            elif waiting is not None and chunk.seq == waiting and ok:
                self._waiting = None
            return chunk


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
    cancelled on any failure, and nothing is installed then. Thread-safe.

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
    acks: queue.SimpleQueue[SnapshotAck | None] = queue.SimpleQueue()

    def requests() -> Iterator[SnapshotAck]:
        yield from iter(acks.get, None)

    channel, raw = _open_channel(target, handler.config.chunk_size, credentials, interceptors)
    call = None
    try:
        stub = storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.StreamSnapshot(requests(), timeout=timeout)
        try:
            meta: SnapshotMetadata = handler.apply_snapshot_stream_from_leader(
                current_term, _GoBackFilter(iter(call)), acks.put
            )
        except SnapshotTransferError as exc:
            cause = exc.__cause__
            if not isinstance(cause, grpc.RpcError) or isinstance(exc, StaleSnapshotError):
                raise
            if _code(cause) == grpc.StatusCode.NOT_FOUND:
                raise SnapshotNotFound(target, "peer has no snapshot") from cause
            raise SnapshotTransferError(
                f"StreamSnapshot from {target} failed: {_describe(cause)}",
                seq=exc.seq,
                status=exc.status,
            ) from cause
    except BaseException:
        if call is not None:
            call.cancel()
        raise
    finally:
        acks.put(None)
        raw.close()
    lid = meta.last_included
    _log.info("pulled snapshot target=%s index=%d term=%d", target, lid.index, lid.term)
    return meta


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return err.code()
    except Exception:  # an RpcError without a status
        return None


__all__ = [
    "DEFAULT_WINDOW",
    "INSTALL_SNAPSHOT_METHOD",
    "SERVICE_NAME",
    "STREAM_SNAPSHOT_METHOD",
    "SnapshotServicer",
    "message_limit",
    "pull_snapshot",
    "send_snapshot",
    "serve",
    "start_server",
]
