"""The gRPC transport when things go wrong: peers that refuse, stay silent, answer
nonsense or vanish mid-call; servers that cannot bind. Everything on 127.0.0.1, in
this process, with bounded deadlines."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

pytest.importorskip("grpc")
pytest.importorskip("grpc_health")

import grpc
import grpc_node
from _cli_helpers import busy_port, silent_peer
from test_grpc import ResponseEditor

from d_engine_sm import _kv
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._snapshot.partial import PartialStore
from d_engine_sm.errors import (
    CorruptSnapshotError,
    HandlerClosed,
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
)
from d_engine_sm.proto import storage_pb2, storage_pb2_grpc
from d_engine_sm.transport import _grpc_client, _grpc_server
from d_engine_sm.transport import grpc as transport

CHUNK = 16 * 1024
WAIT = 20.0  # upper bound for any single awaited event
SHORT = 0.5  # the deadline given to calls that are meant to run out of time
KEYS = 40  # the leader's snapshot: index 40, about 11 chunks of CHUNK bytes

Ack = storage_pb2.SnapshotAck
Response = storage_pb2.SnapshotResponse


def make_handler(directory: Path, *, seed_keys: int = 0) -> StateMachineHandler:
    return grpc_node.memory_handler(directory, CHUNK, seed_keys=seed_keys)


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with make_handler(tmp_path / "leader", seed_keys=KEYS) as handler:
        yield handler


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with make_handler(tmp_path / "follower") as handler:
        yield handler


@pytest.fixture
def total(leader: StateMachineHandler) -> int:
    """The number of chunks of the leader's snapshot."""
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    chunks: Any = leader.load_snapshot_data(meta)
    with contextlib.closing(chunks):
        count: int = chunks.total_chunks
    assert count > 4
    return count


@contextlib.contextmanager
def serving(handler: StateMachineHandler) -> Iterator[str]:
    """``handler`` served by ``start_server`` on a free port; yields its target."""
    server, port = transport.start_server(handler, "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait(WAIT)


@contextlib.contextmanager
def grpc_server(servicer: storage_pb2_grpc.SnapshotServiceServicer) -> Iterator[str]:
    """A plain gRPC server for ``servicer`` on a free port; yields its target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    storage_pb2_grpc.add_SnapshotServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait(WAIT)


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A port bound but not listening: connections are refused, and nobody else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


class LogWatch(logging.Handler):
    """Signals when a transport log record containing ``text`` is emitted (on any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.seen.set()


@contextlib.contextmanager
def watching(text: str) -> Iterator[LogWatch]:
    logger = logging.getLogger("d_engine_sm.transport")
    watch = LogWatch(text)
    level = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


# -- a scripted peer: answers InstallSnapshot calls as told, records what it got -----------
@dataclass(frozen=True)
class Refuse:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...] = ()


class ScriptedPeer(storage_pb2_grpc.SnapshotServiceServicer):
    """Answers each InstallSnapshot call with the next scripted reply.

    ``calls`` records, per call, the chunks received as ``(seq, has data)``.
    """

    def __init__(self, *replies: Response | Refuse) -> None:
        self.replies = list(replies)
        self.calls: list[list[tuple[int, bool]]] = []
        self._lock = threading.Lock()

    def InstallSnapshot(
        self, request_iterator: Iterator[storage_pb2.SnapshotChunk], context: Any
    ) -> Response:
        received = [(chunk.seq, bool(chunk.data)) for chunk in request_iterator]
        with self._lock:
            self.calls.append(received)
            reply = self.replies.pop(0)
        if isinstance(reply, Response):
            return reply
        context.set_trailing_metadata(reply.trailers)
        context.abort(reply.code, reply.details)
        raise AssertionError("context.abort returned")


def probe_only() -> list[tuple[int, bool]]:
    """What a resume probe carries: chunk 0's header, no data."""
    return [(0, False)]


def everything(total: int) -> list[tuple[int, bool]]:
    return [(seq, True) for seq in range(total)]


# -- arguments checked before any call --------------------------------------------------
@pytest.mark.parametrize("timeout", [0.0, -1.0, math.nan])
def test_push_and_pull_refuse_a_non_positive_timeout(
    leader: StateMachineHandler, follower: StateMachineHandler, timeout: float
) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be > 0, got "):
        transport.send_snapshot("127.0.0.1:1", leader, leader_term=2, timeout=timeout)
    with pytest.raises(ValueError, match=r"^timeout must be > 0, got "):
        transport.pull_snapshot("127.0.0.1:1", follower, timeout=timeout)
    assert follower.last_applied() == 0


def test_push_without_a_snapshot_names_the_directory(follower: StateMachineHandler) -> None:
    with closed_port() as target, pytest.raises(SnapshotNotFound) as info:
        transport.send_snapshot(target, follower, leader_term=1, timeout=WAIT)
    assert info.value.path == str(follower.config.snapshots_dir)
    assert str(info.value).startswith("no snapshot to send: ")


def test_push_of_an_archive_truncated_on_disk_is_refused_before_any_call(
    leader: StateMachineHandler, total: int
) -> None:
    archive = next(leader.config.snapshots_dir.glob("snapshot-*.tar.gz"))
    os.truncate(archive, 0)
    peer = ScriptedPeer()
    with grpc_server(peer) as target, pytest.raises(CorruptSnapshotError) as info:
        transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert info.value.path == str(archive)
    assert info.value.reason == "archive is empty"
    assert peer.calls == []


# -- unreachable and silent peers ---------------------------------------------------------
def test_push_to_a_refusing_port_fails_at_once_as_unavailable(leader: StateMachineHandler) -> None:
    with closed_port() as target, pytest.raises(SnapshotTransferError) as info:
        started = time.monotonic()
        transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert time.monotonic() - started < WAIT / 2  # not a wait for the deadline
    assert f"InstallSnapshot to {target} failed: UNAVAILABLE: " in str(info.value)


def test_pull_from_a_refusing_port_fails_at_once_as_unavailable(
    follower: StateMachineHandler,
) -> None:
    with closed_port() as target, pytest.raises(SnapshotTransferError) as info:
        started = time.monotonic()
        transport.pull_snapshot(target, follower, timeout=WAIT)
    assert time.monotonic() - started < WAIT / 2
    assert f"StreamSnapshot from {target} failed: UNAVAILABLE: " in str(info.value)
    assert follower.last_applied() == 0


def test_push_to_a_silent_peer_gives_up_at_its_deadline(leader: StateMachineHandler) -> None:
    with silent_peer() as target, pytest.raises(SnapshotTransferError) as info:
        started = time.monotonic()
        transport.send_snapshot(target, leader, leader_term=2, timeout=SHORT)
    elapsed = time.monotonic() - started
    assert SHORT <= elapsed < SHORT + 5
    assert f"InstallSnapshot to {target} failed: DEADLINE_EXCEEDED: " in str(info.value)


def test_pull_from_a_silent_peer_gives_up_at_its_deadline(follower: StateMachineHandler) -> None:
    with silent_peer() as target, pytest.raises(SnapshotTransferError) as info:
        started = time.monotonic()
        transport.pull_snapshot(target, follower, timeout=SHORT)
    elapsed = time.monotonic() - started
    assert SHORT <= elapsed < SHORT + 5
    assert f"StreamSnapshot from {target} failed: DEADLINE_EXCEEDED: " in str(info.value)
    assert follower.last_applied() == 0
    assert follower.get_latest_snapshot_metadata() is None


# -- peers answering the probe in ways ours never do ---------------------------------------
def test_a_peer_installing_from_the_probe_alone_gets_the_whole_snapshot(
    leader: StateMachineHandler, total: int
) -> None:
    final = Response(term=3, success=True, next_chunk=total)
    peer = ScriptedPeer(Response(term=3, success=True, next_chunk=1), final)
    with grpc_server(peer) as target:
        response = transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert response == final
    assert peer.calls == [probe_only(), everything(total)]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT])
def test_a_peer_not_understanding_the_probe_gets_the_whole_snapshot(
    leader: StateMachineHandler, total: int, code: grpc.StatusCode
) -> None:
    peer = ScriptedPeer(
        Refuse(code, "no data in chunk 0"), Response(success=True, next_chunk=total)
    )
    with grpc_server(peer) as target:
        assert transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT).success
    assert peer.calls == [probe_only(), everything(total)]


def test_a_probe_answer_past_the_snapshot_sends_nothing(
    leader: StateMachineHandler, total: int
) -> None:
    peer = ScriptedPeer(Response(success=False, next_chunk=total + 5))
    with grpc_server(peer) as target, pytest.raises(SnapshotTransferError) as info:
        transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert info.value.reason == (
        f"InstallSnapshot to {target}: receiver asks to start at chunk {total + 5}, "
        f"snapshot has {total}"
    )
    assert peer.calls == [probe_only()]


def test_a_probe_answer_claiming_every_chunk_without_installing_is_an_error(
    leader: StateMachineHandler, total: int
) -> None:
    peer = ScriptedPeer(Response(success=False, next_chunk=total))
    with grpc_server(peer) as target, pytest.raises(SnapshotTransferError) as info:
        transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert info.value.reason == (
        f"InstallSnapshot to {target}: the peer's answer to the probe claims every chunk, "
        "yet it installed nothing"
    )
    assert peer.calls == [probe_only()]


def test_an_ok_status_with_success_false_is_not_an_install(
    leader: StateMachineHandler, total: int
) -> None:
    peer = ScriptedPeer(
        Response(success=False, next_chunk=0), Response(success=False, next_chunk=3)
    )
    with grpc_server(peer) as target, pytest.raises(SnapshotTransferError) as info:
        transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert info.value.reason == f"peer {target} answered success=false"
    assert info.value.seq == 3
    assert peer.calls == [probe_only(), everything(total)]


def test_a_resumed_push_sends_the_header_then_only_the_missing_chunks(
    leader: StateMachineHandler, total: int, caplog: pytest.LogCaptureFixture
) -> None:
    final = Response(success=True, next_chunk=total)
    peer = ScriptedPeer(Response(success=False, next_chunk=total - 2), final)
    with grpc_server(peer) as target, caplog.at_level(logging.INFO, "d_engine_sm.transport"):
        assert transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT) == final
    assert peer.calls == [probe_only(), [(0, False), (total - 2, True), (total - 1, True)]]
    assert f"push resumed target={target} from={total - 2} sent=2" in caplog.messages


# -- refusals and what their trailers say ---------------------------------------------------
@pytest.mark.parametrize(
    ("trailers", "last_applied"),
    [
        ((("d-engine-sm-last-applied", "77"),), 77),
        ((("d-engine-sm-last-applied", "seventy"),), -1),  # not a number: unknown
        ((), -1),  # a peer that sends no trailers (d-engine)
    ],
)
def test_a_stale_refusal_reads_the_peers_last_applied_when_it_can(
    leader: StateMachineHandler, trailers: tuple[tuple[str, str], ...], last_applied: int
) -> None:
    stale = Refuse(grpc.StatusCode.FAILED_PRECONDITION, "StaleSnapshotError: stale", trailers)
    peer = ScriptedPeer(stale)
    with grpc_server(peer) as target, pytest.raises(StaleSnapshotError) as info:
        transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert info.value.snapshot_index == KEYS
    assert info.value.last_applied == last_applied
    assert peer.calls == [probe_only()]  # said at the probe: nothing more sent


@pytest.mark.parametrize(("next_chunk", "seq"), [("4", 4), ("four", 0)])
def test_a_refusal_reports_where_the_peer_would_resume(
    leader: StateMachineHandler, next_chunk: str, seq: int
) -> None:
    full = Refuse(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "InsufficientSpace: disk full",
        (("d-engine-sm-next-chunk", next_chunk), ("d-engine-sm-error", "InsufficientSpace")),
    )
    with grpc_server(ScriptedPeer(full)) as target, pytest.raises(SnapshotTransferError) as info:
        transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT)
    assert info.value.reason == (
        f"InstallSnapshot to {target} failed: RESOURCE_EXHAUSTED: InsufficientSpace: disk full"
    )
    assert info.value.seq == seq


class StatuslessError(grpc.RpcError):
    """An ``RpcError`` that is no call: it has no code, details or trailers."""


class FailingInterceptor(grpc.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        raise StatuslessError()


def test_an_rpc_error_without_a_status_is_reported_as_such(leader: StateMachineHandler) -> None:
    with closed_port() as target, pytest.raises(SnapshotTransferError) as info:
        transport.send_snapshot(
            target, leader, leader_term=2, timeout=WAIT, interceptors=[FailingInterceptor()]
        )
    assert info.value.reason == f"InstallSnapshot to {target} failed: StatuslessError()"
    assert info.value.seq == 0
    assert isinstance(info.value.__cause__, StatuslessError)


def test_outgoing_chunks_end_once_closed(leader: StateMachineHandler, total: int) -> None:
    # gRPC may pull the request iterator on its own thread after the call failed.
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    source: Any = leader.load_snapshot_data(meta)
    with contextlib.closing(source):
        out = _grpc_client._Outgoing(source, range(2, total), header=True)
        header = next(out)
        assert (header.seq, header.data, header.HasField("metadata")) == (0, b"", True)
        assert next(out).seq == 2
        out.close()
        with pytest.raises(StopIteration):
            next(out)
        assert out.sent == 1  # the header is not counted


# -- pulls that fail on this side -------------------------------------------------------
def test_pull_of_a_snapshot_older_than_the_applied_state_is_stale(
    leader: StateMachineHandler, follower: StateMachineHandler
) -> None:
    follower.apply_chunk(
        [_kv.command_entry(i, 3, _kv.insert(b"k%d" % i, b"v")) for i in range(1, 61)]
    )
    with serving(leader) as target, pytest.raises(StaleSnapshotError) as info:
        transport.pull_snapshot(target, follower, timeout=WAIT)
    assert (info.value.snapshot_index, info.value.last_applied) == (KEYS, 60)
    assert follower.last_applied() == 60
    assert follower.get_latest_snapshot_metadata() is None


def test_pull_into_a_closed_handler_raises_handler_closed(
    leader: StateMachineHandler, follower: StateMachineHandler
) -> None:
    follower.close()
    with serving(leader) as target, pytest.raises(HandlerClosed):
        transport.pull_snapshot(target, follower, timeout=WAIT)


class NotingEnds(transport.SnapshotServicer):
    """The real servicer, noting when a StreamSnapshot call ends (for any reason)."""

    def __init__(self, handler: StateMachineHandler) -> None:
        # Acks are awaited far longer than the tests' deadline: only the client ends a call.
        super().__init__(handler, ack_timeout=10 * WAIT)
        self.ended = threading.Event()

    def StreamSnapshot(
        self, request_iterator: Iterator[Ack], context: grpc.ServicerContext
    ) -> Iterator[storage_pb2.SnapshotChunk]:
        context.add_callback(self.ended.set)
        yield from super().StreamSnapshot(request_iterator, context)


def test_a_pull_failing_midway_cancels_its_call_and_the_leader_serves_on(
    leader: StateMachineHandler, follower: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = follower.apply_snapshot_stream_from_leader

    def fail_after_chunk_0(term: int, stream: Any, ack: Any, *args: Any, **kwargs: Any) -> Any:
        assert next(iter(stream)).seq == 0
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(follower, "apply_snapshot_stream_from_leader", fail_after_chunk_0)
    servicer = NotingEnds(leader)
    with grpc_server(servicer) as target:
        with pytest.raises(RuntimeError, match=r"^disk on fire$"):
            transport.pull_snapshot(target, follower, timeout=2 * WAIT)
        # Left alone the call would run to its deadline (2 * WAIT): it was cancelled.
        assert servicer.ended.wait(WAIT)
        monkeypatch.setattr(follower, "apply_snapshot_stream_from_leader", real)
        meta = transport.pull_snapshot(target, follower, timeout=WAIT)
    assert meta.last_included.index == follower.last_applied() == KEYS


def test_the_leader_ends_a_stream_whose_learner_cancels_while_awaited(
    leader: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    awaiting = threading.Event()
    real_get = _grpc_server._AckReader.get

    def get(self: Any, timeout: float) -> Any:
        awaiting.set()  # the leader now waits for the learner's ack of chunk 0
        return real_get(self, timeout)

    monkeypatch.setattr(_grpc_server._AckReader, "get", get)
    acks: queue.SimpleQueue[Ack | None] = queue.SimpleQueue()
    # gRPC hands the leader the cancellation as an error, or as the acks simply
    # ending (then followed by the call's termination): either way it just ends.
    with (
        serving(leader) as target,
        watching("StreamSnapshot ") as ended,
        raw_stream(target, iter(acks.get, None)) as call,
    ):
        try:
            assert next(call).seq == 0
            assert awaiting.wait(WAIT)
            call.cancel()
            assert ended.seen.wait(WAIT)
        finally:
            acks.put(None)
    assert len(ended.messages) == 1, ended.messages
    assert re.fullmatch(
        r"StreamSnapshot ended by peer=\S+: (.*RpcError.*|the call was cancelled)",
        ended.messages[0],
    ), ended.messages


def temps(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.rglob("temp-*"))


def cut_at_chunk_2(chunk: Any) -> Any:
    if chunk.seq == 2:
        raise ConnectionResetError("peer went away")
    return chunk


@pytest.mark.parametrize("keeping_fails", [False, True])
def test_a_pull_cut_midway_keeps_its_prefix_unless_keeping_fails(
    leader: StateMachineHandler,
    follower: StateMachineHandler,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    keeping_fails: bool,
) -> None:
    if keeping_fails:

        def no_space(self: Any, out: Any, partial: Any) -> bool:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(PartialStore, "keep", no_space)
    with (
        serving(leader) as target,
        caplog.at_level(logging.WARNING, "d_engine_sm.snapshot"),
        pytest.raises(SnapshotTransferError) as info,
    ):
        transport.pull_snapshot(
            target, follower, timeout=WAIT, interceptors=[ResponseEditor(cut_at_chunk_2)]
        )
    assert info.value.reason == "stream error: ConnectionResetError('peer went away')"
    assert follower.last_applied() == 0
    kept = temps(follower.config.snapshots_dir)
    if keeping_fails:  # not fatal: the same error, and nothing half-kept
        assert kept == []
        assert "keeping partial transfer failed error=OSError(28, 'No space left on device')" in (
            caplog.messages
        )
    else:
        assert kept == ["temp-resume-data", "temp-resume-state"]


def test_ctrl_c_during_a_receive_ends_it_with_nothing_kept_and_no_failed_ack(
    leader: StateMachineHandler, follower: StateMachineHandler
) -> None:
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    acks: list[Ack] = []

    def ack(message: Ack) -> None:
        acks.append(message)
        if len(acks) == 3:  # Ctrl-C lands while the third ack is being sent
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follower.apply_snapshot_stream_from_leader(2, leader.load_snapshot_data(meta), ack)
    assert follower.last_applied() == 0
    assert follower.get_latest_snapshot_metadata() is None
    # This side stopped it: no FAILED ack blames the stream, and no prefix is kept.
    assert [a.status for a in acks] == [Ack.ACCEPTED] * 3
    assert temps(follower.config.snapshots_dir) == []


# -- the leader's side of StreamSnapshot: refusals a learner sees ----------------------------
def test_a_leader_closing_before_the_stream_refuses_the_pull_as_unavailable(
    leader: StateMachineHandler, follower: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    def closed(*args: Any, **kwargs: Any) -> Any:
        raise HandlerClosed("handler is closed")

    monkeypatch.setattr(leader, "load_snapshot_data", closed)
    with serving(leader) as target, pytest.raises(SnapshotTransferError) as info:
        transport.pull_snapshot(target, follower, timeout=WAIT)
    assert info.value.reason == (
        f"StreamSnapshot from {target} failed: UNAVAILABLE: HandlerClosed: handler is closed"
    )
    assert follower.last_applied() == 0


def test_a_leader_whose_archive_was_pruned_meanwhile_has_no_snapshot(
    leader: StateMachineHandler, follower: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pruned(*args: Any, **kwargs: Any) -> Any:
        raise SnapshotNotFound("snapshot-40-2.tar.gz", "snapshot archive was pruned")

    monkeypatch.setattr(leader, "load_snapshot_data", pruned)
    with serving(leader) as target, pytest.raises(SnapshotNotFound) as info:
        transport.pull_snapshot(target, follower, timeout=WAIT)
    assert str(info.value) == f"peer has no snapshot: {target}"
    assert follower.last_applied() == 0


def test_a_leader_whose_archive_is_empty_refuses_the_pull(
    leader: StateMachineHandler, follower: StateMachineHandler
) -> None:
    os.truncate(next(leader.config.snapshots_dir.glob("snapshot-*.tar.gz")), 0)
    with serving(leader) as target, pytest.raises(SnapshotTransferError) as info:
        transport.pull_snapshot(target, follower, timeout=WAIT)
    assert f"StreamSnapshot from {target} failed: INTERNAL: snapshot archive is empty" in str(
        info.value
    )
    assert follower.last_applied() == 0


@contextlib.contextmanager
def raw_stream(target: str, acks: Iterator[Ack]) -> Iterator[Any]:
    """A StreamSnapshot call with hand-written acks (a learner that is not ours)."""
    with grpc.insecure_channel(target) as channel:
        stub = storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
        yield stub.StreamSnapshot(acks, timeout=WAIT)


def drain(call: Any) -> tuple[list[int], grpc.StatusCode, str]:
    """The seqs a call delivered before it failed, and its status."""
    seqs: list[int] = []
    with pytest.raises(grpc.RpcError) as info:
        seqs.extend(chunk.seq for chunk in call)
    error: Any = info.value
    return seqs, error.code(), error.details()


@pytest.mark.parametrize(
    ("ack", "code", "details"),
    [
        (
            Ack(seq=0, status=cast(Any, 99), next_requested=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown ack status 99",
        ),
        (
            Ack(seq=0, status=Ack.FAILED, next_requested=0),
            grpc.StatusCode.ABORTED,
            "receiver reported FAILED at chunk 0",
        ),
    ],
)
def test_leader_aborts_on_a_learners_bad_or_failed_ack(
    leader: StateMachineHandler, ack: Ack, code: grpc.StatusCode, details: str
) -> None:
    with serving(leader) as target, raw_stream(target, iter([ack])) as call:
        seqs, got_code, got_details = drain(call)
    assert (seqs, got_code, got_details) == ([0], code, details)


def test_leader_aborts_when_the_learner_closes_its_acks_early(
    leader: StateMachineHandler, total: int
) -> None:
    with serving(leader) as target, raw_stream(target, iter(())) as call:
        seqs, code, details = drain(call)
    assert seqs == [0]  # chunk 0 goes alone first; its ack never comes
    assert code == grpc.StatusCode.ABORTED
    assert details == f"receiver closed its acks after 0 of {total} chunks"


def test_leader_gives_up_on_a_learner_that_never_acks(
    leader: StateMachineHandler, total: int
) -> None:
    servicer = transport.SnapshotServicer(leader, ack_timeout=0.3, max_retries=0)
    never: queue.SimpleQueue[Ack | None] = queue.SimpleQueue()
    try:
        with grpc_server(servicer) as target, raw_stream(target, iter(never.get, None)) as call:
            seqs, code, details = drain(call)
    finally:
        never.put(None)
    assert seqs == [0]
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details == f"no ack within 0.3s (accepted 0 of {total} chunks)"


class FakeContext:
    """Just enough of a ``grpc.ServicerContext`` to run StreamSnapshot without gRPC."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def __init__(self) -> None:
        self.aborted: list[tuple[grpc.StatusCode, str]] = []
        self.callbacks: list[Any] | None = []

    def add_callback(self, callback: Any) -> bool:
        if self.callbacks is None:
            return False  # gRPC: the call has already terminated; not registered
        self.callbacks.append(callback)
        return True

    def terminate(self) -> None:  # what gRPC does when the call ends
        callbacks, self.callbacks = self.callbacks or [], None
        for callback in callbacks:
            callback()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted.append((code, details))
        raise RuntimeError("aborted")


class LostAcks(Iterator[Ack]):
    """A learner's acks whose connection is gone."""

    def __next__(self) -> Ack:
        raise ConnectionResetError("connection lost")


def test_leader_ends_a_stream_quietly_when_the_learners_acks_fail(
    leader: StateMachineHandler,
) -> None:
    # gRPC hands a lost connection to the request iterator as an error (or, at times,
    # as an end, seen above): the call is over, there is nobody to abort it for.
    servicer = transport.SnapshotServicer(leader, ack_timeout=WAIT)
    context = FakeContext()
    with watching("StreamSnapshot ") as ended:
        chunks = list(servicer.StreamSnapshot(LostAcks(), cast(Any, context)))
    assert [chunk.seq for chunk in chunks] == [0]
    assert context.aborted == []
    assert ended.messages == [
        "StreamSnapshot ended by peer=ipv4:127.0.0.1:1: ConnectionResetError('connection lost')"
    ]


class EndThenCancel(Iterator[Ack]):
    """A cancelled call's acks as gRPC may hand them over: an end, then the termination."""

    def __init__(self, context: FakeContext) -> None:
        self.context = context

    def __next__(self) -> Ack:
        self.context.terminate()
        raise StopIteration


@pytest.mark.parametrize("cancelled", [True, False])
def test_acks_ending_early_abort_the_stream_unless_the_call_was_cancelled(
    leader: StateMachineHandler, cancelled: bool
) -> None:
    servicer = transport.SnapshotServicer(leader, ack_timeout=WAIT)
    context = FakeContext()
    acks: Iterator[Ack] = EndThenCancel(context) if cancelled else iter([])
    with watching("StreamSnapshot ") as ended:
        stream = servicer.StreamSnapshot(acks, cast(Any, context))
        assert next(stream).seq == 0
        if cancelled:  # nobody to answer: it just ends
            assert list(stream) == []
        else:  # a real half-close stays active: the learner hears why
            with pytest.raises(RuntimeError, match="aborted"):
                next(stream)
    if cancelled:
        assert context.aborted == []
        assert ended.messages == [
            "StreamSnapshot ended by peer=ipv4:127.0.0.1:1: the call was cancelled"
        ]
    else:
        assert [code for code, _ in context.aborted] == [grpc.StatusCode.ABORTED]
        assert context.aborted[0][1].startswith("receiver closed its acks after 0 of ")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window must be >= 1, got 0"),
        ({"max_retries": -1}, "max_retries must be >= 0, got -1"),
        ({"ack_timeout": 0.0}, "ack_timeout must be > 0, got 0.0"),
        ({"ack_timeout": math.nan}, "ack_timeout must be > 0, got nan"),
    ],
)
def test_servicer_refuses_nonsensical_limits(
    follower: StateMachineHandler, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        transport.SnapshotServicer(follower, **kwargs)
    assert str(info.value) == message


# -- binding --------------------------------------------------------------------------------
def test_a_busy_port_is_an_error_naming_the_address_and_the_reason(
    follower: StateMachineHandler,
) -> None:
    with busy_port() as port, pytest.raises(OSError) as info:
        transport.start_server(follower, f"127.0.0.1:{port}")
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)}"
    assert info.value.errno == errno.EADDRINUSE
    assert isinstance(info.value.__cause__, RuntimeError)  # gRPC's own words, kept


def test_a_host_that_does_not_resolve_is_named_without_an_errno(
    follower: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unknown(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with busy_port() as port:  # gRPC fails for real; the resolver's answer is injected
        monkeypatch.setattr(socket, "getaddrinfo", unknown)
        with pytest.raises(OSError) as info:
            transport.start_server(follower, f"127.0.0.1:{port}")
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port}: Name or service not known"
    assert info.value.errno is None  # a resolver code is no errno


class RefusingPorts:
    """A real ``grpc.Server`` whose ``add_insecure_port`` fails as gRPC's does."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_insecure_port(self, address: str) -> int:
        raise RuntimeError(f"Failed to bind to address {address}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def test_a_failure_a_plain_bind_does_not_reproduce_keeps_grpcs_words(
    follower: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = grpc.server
    monkeypatch.setattr(grpc, "server", lambda *a, **kw: RefusingPorts(real(*a, **kw)))
    with pytest.raises(OSError) as info:
        transport.start_server(follower, "127.0.0.1:0")  # a socket binds it fine
    assert str(info.value) == "cannot listen on 127.0.0.1:0: Failed to bind to address 127.0.0.1:0"
    assert info.value.errno is None


@pytest.mark.parametrize("where", ["unix:{tmp}/missing/node.sock", "127.0.0.1:no-such-service"])
def test_an_address_that_is_not_host_and_port_keeps_grpcs_words(
    follower: StateMachineHandler, tmp_path: Path, where: str
) -> None:
    listen = where.format(tmp=tmp_path)
    with pytest.raises(OSError) as info:
        transport.start_server(follower, listen)
    assert str(info.value).startswith(
        f"cannot listen on {listen}: Failed to bind to address {listen}"
    )


@pytest.mark.parametrize("port", ["65536", "70000"])
def test_a_port_above_65535_is_refused_not_wrapped(
    follower: StateMachineHandler, port: str
) -> None:
    # gRPC would take it modulo 65536 and listen somewhere else.
    with pytest.raises(ValueError) as info:
        transport.start_server(follower, f"127.0.0.1:{port}")
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port}: port {port} is above 65535"


class RecordingServer:
    """Stands in for a ``grpc.Server``: records calls, returns canned values."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def method(*args: Any) -> Any:
            self.calls.append((name, args))
            return 4242

        return method


def test_the_returned_server_passes_port_and_handler_calls_through() -> None:
    from grpc_health.v1 import health

    inner = RecordingServer()
    wrapped: Any = transport._HealthReportingServer(inner, health.HealthServicer())  # type: ignore[arg-type]
    credentials = object()
    handlers = {"Ping": object()}
    assert wrapped.add_insecure_port("127.0.0.1:0") == 4242
    assert wrapped.add_secure_port("127.0.0.1:1", credentials) == 4242
    wrapped.add_registered_method_handlers("t.Echo", handlers)
    assert inner.calls == [
        ("add_insecure_port", ("127.0.0.1:0",)),
        ("add_secure_port", ("127.0.0.1:1", credentials)),
        ("add_registered_method_handlers", ("t.Echo", handlers)),
    ]
