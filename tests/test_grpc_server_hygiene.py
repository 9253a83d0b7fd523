"""What the gRPC server offers around the snapshot service: server interceptors and
gRPC's standard health checking, probed with real clients on 127.0.0.1."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("grpc_health")

import grpc
import grpc_node
from grpc_health.v1 import health_pb2, health_pb2_grpc

from d_engine_sm._handler import StateMachineHandler
from d_engine_sm.errors import SnapshotTransferError
from d_engine_sm.transport import grpc as transport

CHUNK = 16 * 1024
WAIT = 20.0  # upper bound for any single awaited event
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN_KEY = "x-test-token"


def make_handler(directory: Path, *, seed_keys: int = 0) -> StateMachineHandler:
    return grpc_node.memory_handler(directory, CHUNK, seed_keys=seed_keys)


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with make_handler(tmp_path / "follower") as handler:
        yield handler


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with make_handler(tmp_path / "leader", seed_keys=40) as handler:
        yield handler


class Counting(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Records the method of every call it sees, in order (shared ``log`` across instances)."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name = name
        self.log = log
        self._lock = threading.Lock()

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        with self._lock:
            self.log.append((self.name, handler_call_details.method))
        return continuation(handler_call_details)


class RequireToken(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses snapshot calls without the right token (UNAUTHENTICATED); health stays open."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        if (
            handler_call_details.method.startswith("/grpc.health.")
            or metadata.get(TOKEN_KEY) == self.token
        ):
            return continuation(handler_call_details)

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        return grpc.stream_unary_rpc_method_handler(refuse)


class AddToken(grpc.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        metadata = [*(client_call_details.metadata or ()), (TOKEN_KEY, self.token)]
        return continuation(client_call_details._replace(metadata=metadata), request_iterator)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def check(target: str, service: str) -> Any:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)


# -- interceptors ---------------------------------------------------------------------
def test_server_interceptors_see_every_call_in_order(
    leader: StateMachineHandler, follower: StateMachineHandler
) -> None:
    log: list[tuple[str, str]] = []
    server, port = transport.start_server(
        follower, "127.0.0.1:0", interceptors=[Counting("outer", log), Counting("inner", log)]
    )
    target = f"127.0.0.1:{port}"
    try:
        assert check(target, "").status == SERVING
        meta = leader.get_latest_snapshot_metadata()
        assert meta is not None
        response = transport.send_snapshot(target, leader, meta, leader_term=2, timeout=WAIT)
    finally:
        server.stop(None).wait(WAIT)
    assert response.success
    assert follower.last_applied() == leader.last_applied() == 40
    health = "/grpc.health.v1.Health/Check"
    # The probe then the push: two InstallSnapshot calls, each seen by both, outer first.
    assert log == [
        ("outer", health),
        ("inner", health),
        ("outer", transport.INSTALL_SNAPSHOT_METHOD),
        ("inner", transport.INSTALL_SNAPSHOT_METHOD),
        ("outer", transport.INSTALL_SNAPSHOT_METHOD),
        ("inner", transport.INSTALL_SNAPSHOT_METHOD),
    ]


def test_an_interceptor_can_refuse_a_push_and_nothing_is_installed(
    leader: StateMachineHandler, follower: StateMachineHandler
) -> None:
    port = free_port()
    server = transport.serve(follower, f"127.0.0.1:{port}", interceptors=(RequireToken("s3cret"),))
    target = f"127.0.0.1:{port}"
    try:
        assert check(target, transport.SERVICE_NAME).status == SERVING  # health stays open
        for interceptors in ((), (AddToken("wrong"),)):
            with pytest.raises(SnapshotTransferError, match="UNAUTHENTICATED"):
                transport.send_snapshot(
                    target, leader, leader_term=2, timeout=WAIT, interceptors=interceptors
                )
            assert follower.last_applied() == 0
            assert follower.get_latest_snapshot_metadata() is None
        transport.send_snapshot(
            target, leader, leader_term=2, timeout=WAIT, interceptors=(AddToken("s3cret"),)
        )
    finally:
        server.stop(None).wait(WAIT)
    assert follower.last_applied() == 40


# -- health checking ------------------------------------------------------------------
def test_health_check_reports_serving_for_the_node_and_the_snapshot_service(
    follower: StateMachineHandler,
) -> None:
    server, port = transport.start_server(follower, "127.0.0.1:0")
    target = f"127.0.0.1:{port}"
    try:
        assert check(target, "").status == SERVING
        assert check(target, transport.SERVICE_NAME).status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            check(target, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(None).wait(WAIT)
    with pytest.raises(grpc.RpcError) as info:  # stopped: nothing answers
        check(target, "")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["", transport.SERVICE_NAME])
def test_health_watch_sees_not_serving_as_soon_as_stop_begins(
    follower: StateMachineHandler, service: str
) -> None:
    server, port = transport.start_server(follower, "127.0.0.1:0")
    seen: queue.Queue[int | BaseException] = queue.Queue()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)

    def read() -> None:
        try:
            for response in watch:
                seen.put(response.status)
        except grpc.RpcError as exc:
            seen.put(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped: threading.Event | None = None
    try:
        assert seen.get(timeout=WAIT) == SERVING
        # A long grace: the open Watch call keeps the server in it until the client leaves,
        # so NOT_SERVING must arrive while the grace period runs, not after it.
        stopped = server.stop(grace=WAIT)
        assert seen.get(timeout=WAIT) == NOT_SERVING
        assert not stopped.is_set()
    finally:
        watch.cancel()
        reader.join(WAIT)
        channel.close()
        if stopped is None:
            stopped = server.stop(None)
    assert stopped.wait(WAIT)  # the watcher gone, the server stops at once
    assert not reader.is_alive()


def test_the_returned_server_is_a_grpc_server_doing_what_the_real_one_does(
    follower: StateMachineHandler,
) -> None:
    server, port = transport.start_server(follower, "127.0.0.1:0")
    assert isinstance(server, grpc.Server)
    try:
        echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request[::-1])
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.Echo", {"Ping": echo}),)
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary("/t.Echo/Ping", None, None)(b"abc", timeout=WAIT) == b"cba"
        assert server.wait_for_termination(0.01)  # True: timed out, still running
        with pytest.raises(ValueError, match="already-started"):
            server.start()
    finally:
        server.stop(None).wait(WAIT)
    assert not server.wait_for_termination(WAIT)  # stopped: returns at once
