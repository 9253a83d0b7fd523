"""gRPC snapshot transport: d-engine's ``SnapshotService`` over HTTP/2.

The public face of the gRPC transport (extra ``d_engine_sm[grpc]``); with
its private halves ``_grpc_server`` and ``_grpc_client`` the only modules
that import ``grpc``. Method paths are d-engine's:

- ``/d_engine.server.storage.SnapshotService/InstallSnapshot`` — client
  streaming, leader → follower. The follower's reply says success only
  after the snapshot is installed.
- ``/d_engine.server.storage.SnapshotService/StreamSnapshot`` — bidirectional,
  a learner pulls the leader's newest snapshot; its ``SnapshotAck`` messages drive
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

Both directions run on one sans-IO sender (``_snapshot/sender.py``) and the
receiver (``_snapshot/receiver.py``); the modules here are I/O glue.
StreamSnapshot sends chunk 0 alone first: its ack's ``next_requested`` says
where the learner resumes (0, or the first chunk it lacks from an interrupted
transfer of the same snapshot); then go-back-N: up to ``window`` chunks in
flight; a ``CHECKSUM_MISMATCH``/``REQUESTED`` ack rewinds to
``next_requested``, and the receiver drops the chunks that were in flight
behind a corrupt one until its resend arrives.

Resuming a push: InstallSnapshot cannot return acks midway, so
:func:`send_snapshot` first sends a *probe*: a stream of one resume header
(seq 0 with the metadata, ``total_chunks`` and no data; no archive has an
empty chunk 0). The receiver answers it with status OK and
``SnapshotResponse(success=False, next_chunk=K)``: K is the first chunk it
lacks of that snapshot (0 = all). If K > 0 the push is the header followed
by chunks K… ; else the plain chunk stream from 0, as d-engine sends it. A
peer that answers the probe otherwise gets the whole snapshot.

The server also answers gRPC's standard health-checking service
(``grpc.health.v1.Health``, ``Check`` and ``Watch``) so orchestrators can
probe a node: the overall status (service ``""``) and :data:`SERVICE_NAME`
are SERVING from start; the returned server's ``stop()`` sets every status
to NOT_SERVING *before* its grace period, so a prober sees the node leave
while calls in flight finish.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from d_engine_sm.proto import storage_pb2, storage_pb2_grpc
from d_engine_sm.transport import _grpc_client
from d_engine_sm.transport._grpc_client import (
    message_limit,
    options,
    pull_snapshot,
    send_snapshot,
)
from d_engine_sm.transport._grpc_server import (
    DEFAULT_WINDOW,
    ERROR_KEY,
    LAST_APPLIED_KEY,
    NEXT_CHUNK_KEY,
    SnapshotServicer,
    TermSource,
)

if TYPE_CHECKING:
    import threading

    from d_engine_sm._handler import StateMachineHandler

_log = logging.getLogger("d_engine_sm.transport")

Interceptors = _grpc_client.Interceptors
SnapshotAck = storage_pb2.SnapshotAck
SnapshotChunk = storage_pb2.SnapshotChunk
SnapshotMetadata = storage_pb2.SnapshotMetadata
SnapshotResponse = storage_pb2.SnapshotResponse

SERVICE_NAME: Final = "d_engine.server.storage.SnapshotService"
INSTALL_SNAPSHOT_METHOD: Final = f"/{SERVICE_NAME}/InstallSnapshot"
STREAM_SNAPSHOT_METHOD: Final = f"/{SERVICE_NAME}/StreamSnapshot"


# -- server -------------------------------------------------------------------------
ServerInterceptors = Sequence["grpc.ServerInterceptor[Any, Any]"]


class _HealthReportingServer(grpc.Server):
    """A started ``grpc.Server`` that reports NOT_SERVING before it stops.

    Delegates everything to the wrapped server; ``stop(grace)`` first sets
    every health status to NOT_SERVING (and keeps it so), then stops.
    ``health`` is the health servicer, for callers that report more
    (e.g. NOT_SERVING while the handler is being closed).
    """

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer) -> None:
        self._server = server
        self.health = health_servicer

    def stop(self, grace: float | None = None) -> threading.Event:
        self.health.enter_graceful_shutdown()
        return self._server.stop(grace)

    def start(self) -> None:
        self._server.start()

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)  # type: ignore[attr-defined]

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def start_server(
    handler: StateMachineHandler,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None = None,
    current_term: TermSource = 0,
    max_workers: int = 8,
    window: int = DEFAULT_WINDOW,
    max_message_bytes: int | None = None,
    interceptors: ServerInterceptors = (),
) -> tuple[grpc.Server, int]:
    """Like :func:`serve`, also returning the bound port (useful with ``:0``).

    Raises:
        ValueError: ``listen``'s port is above 65535.
        OSError: ``listen`` could not be bound (the message names the address
            and, when a plain bind of it fails too, the system's reason, whose
            ``errno`` the error carries).
    """
    _check_port(listen)
    limit = max_message_bytes or message_limit(handler.config.chunk_size)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="d-engine-sm-grpc"),
        interceptors=list(interceptors),
        # SO_REUSEPORT (gRPC's default) would let a second server bind a busy
        # port silently; a taken port must be an error.
        options=[*options(limit), ("grpc.so_reuseport", 0)],
    )
    servicer = SnapshotServicer(handler, current_term=current_term, window=window)
    storage_pb2_grpc.add_SnapshotServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    # Non-blocking Watch (the default): a watcher holds no worker thread.
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:  # grpc reports bind failures this way (never a port 0)
        raise _bind_error(listen, exc) from exc
    server.start()
    _log.info(
        "serving node=%d listen=%s port=%d tls=%s", handler.node_id, listen, port, bool(credentials)
    )
    return _HealthReportingServer(server, health_servicer), port


def _host_port(listen: str) -> tuple[str, int] | None:
    """``listen``'s host (brackets stripped) and numeric port; None for other forms (``unix:``)."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_port(listen: str) -> None:
    # gRPC takes a port modulo 65536: ":70000" would listen on 4464.
    parsed = _host_port(listen)
    if parsed is not None and parsed[1] > 65535:
        raise ValueError(f"cannot listen on {listen}: port {parsed[1]} is above 65535")


def _bind_error(listen: str, exc: RuntimeError) -> OSError:
    """The error for a failed bind, with the reason a plain bind of ``listen`` gives.

    gRPC says only "Failed to bind"; a socket bound to the same address says
    why (address in use, not this host's, permission denied, unknown host).
    """
    parsed = _host_port(listen)
    reason = _plain_bind(*parsed) if parsed is not None else None
    if reason is None:
        return OSError(f"cannot listen on {listen}: {exc}")
    error = OSError(f"cannot listen on {listen}: {reason.strerror or reason}")
    if not isinstance(reason, socket.gaierror):  # a resolver code is no errno
        error.errno = reason.errno
    return error


def _plain_bind(host: str, port: int) -> OSError | None:
    """Why binding ``host:port`` fails (None: it does not fail now)."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in found:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
    except OSError as err:
        return err
    return None


def serve(
    handler: StateMachineHandler,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None = None,
    current_term: TermSource = 0,
    max_workers: int = 8,
    window: int = DEFAULT_WINDOW,
    max_message_bytes: int | None = None,
    interceptors: ServerInterceptors = (),
) -> grpc.Server:
    """Start a gRPC server exposing ``handler`` as d-engine's ``SnapshotService``.

    Non-blocking: returns the started server; the caller stops it
    (``server.stop(grace)``) and closes the handler afterwards. The server
    also answers gRPC health checks (``grpc.health.v1.Health``): the overall
    status and :data:`SERVICE_NAME` are SERVING until ``stop`` is called,
    which sets them NOT_SERVING before the grace period starts. Its
    ``health`` attribute is the ``grpc_health`` servicer, to report more.

    Args:
        handler: the node's handler.
        listen: ``host:port`` (port 0 picks a free one; see :func:`start_server`).
        credentials: TLS server credentials; plaintext when None.
        current_term: this node's term or a callable returning it.
        max_workers: concurrent calls served.
        window: StreamSnapshot chunks in flight.
        max_message_bytes: gRPC message limit; default from ``chunk_size``.
        interceptors: server interceptors (``grpc.ServerInterceptor``), run
            around every call (snapshot and health) in the order given: for
            authentication, logging, metrics.

    Returns:
        The started ``grpc.Server``.

    Raises:
        ValueError: ``listen``'s port is above 65535.
        OSError: ``listen`` could not be bound (see :func:`start_server`).
    """
    return start_server(
        handler,
        listen,
        credentials=credentials,
        current_term=current_term,
        max_workers=max_workers,
        window=window,
        max_message_bytes=max_message_bytes,
        interceptors=interceptors,
    )[0]


__all__ = [
    "DEFAULT_WINDOW",
    "ERROR_KEY",
    "INSTALL_SNAPSHOT_METHOD",
    "LAST_APPLIED_KEY",
    "NEXT_CHUNK_KEY",
    "SERVICE_NAME",
    "STREAM_SNAPSHOT_METHOD",
    "SnapshotServicer",
    "message_limit",
    "pull_snapshot",
    "send_snapshot",
    "serve",
    "start_server",
]
