"""Resumable transfers over real gRPC: a 64 MiB archive cut about half way, then retried.

Each scenario cuts a transfer (SIGKILL of the sending process, or a TCP proxy
in between that drops the connection), checks that the receiver kept exactly
a resumable partial, retries, and counts the chunks that cross the wire on
the retry: chunk 0 (pull: it names the snapshot) plus the missing ones only.
The result must install and verify (state digest, SHA-256 of the archive).
Plus the partial's lifecycle: stale at start-up, discarded by a newer
snapshot, and not used by a different snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc_node
import pytest
from test_grpc import PARTIAL, WAIT, Node, RequestEditor, ResponseEditor, local_digest, temps

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot import chunks as wire
from d_engine_sm.errors import SnapshotTransferError
from d_engine_sm.proto import common_pb2, storage_pb2
from d_engine_sm.transport import grpc as transport

MiB = 1024 * 1024
CHUNK = MiB
KEYS = 64  # 64 incompressible 1 MiB values: a ~64 MiB archive in ~65 chunks
pytestmark = pytest.mark.timeout(180)


def leader_config(directory: Path) -> SnapshotConfig:
    return grpc_node.config(directory, CHUNK)


def make_leader(directory: Path) -> StateMachineHandler:
    handler = StateMachineHandler(MemoryStateMachine(), leader_config(directory), node_id=1)
    grpc_node.seed(handler, KEYS, MiB, 11)
    return handler


def node(directory: Path, *args: str) -> Node:
    return Node(directory, "--chunk-size", str(CHUNK), *args)


def acked(peer: Node, start: int) -> list[int]:
    """Seqs the receiving node ACCEPTED (one log line per chunk) since line ``start``."""
    return [
        int(s.split(" seq=")[1].split()[0])
        for s in peer.lines[start:]
        if " ack " in s and "status=ACCEPTED" in s
    ]


class CuttingProxy:
    """A 127.0.0.1 TCP proxy that drops the connection after ``limit`` bytes one way."""

    def __init__(self, target_port: int, limit: int, *, count_upstream: bool) -> None:
        self._target = ("127.0.0.1", target_port)
        self._limit = limit
        self._count_upstream = count_upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.counted = 0
        self.cut = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while not self.cut.is_set():
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._target)
                self._socks += [client, upstream]
                for src, dst, counted in (
                    (client, upstream, self._count_upstream),
                    (upstream, client, not self._count_upstream),
                ):
                    threading.Thread(
                        target=self._pipe, args=(src, dst, counted), daemon=True
                    ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(256 * 1024):
                dst.sendall(data)
                if counted:
                    self.counted += len(data)
                    if self.counted >= self._limit:
                        self.close()
                        return

    def close(self) -> None:
        self.cut.set()
        for sock in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[StateMachineHandler]:
    handler = make_leader(tmp_path / "leader")
    yield handler
    handler.close()


@pytest.fixture
def peers() -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(directory: Path, *args: str) -> Node:
        started.append(node(directory, *args))
        return started[-1]

    yield start
    for n in started:
        n.close()


def total_chunks(handler: StateMachineHandler) -> int:
    meta = handler.get_latest_snapshot_metadata()
    assert meta is not None
    size = (
        handler.config.snapshots_dir.joinpath(
            f"snapshot-{meta.last_included.index}-{meta.last_included.term}.tar.gz"
        )
        .stat()
        .st_size
    )
    assert size > 60 * MiB
    return -(-size // CHUNK)


def push_counting(target: str, handler: StateMachineHandler) -> list[int]:
    """Push with a client interceptor recording the seq of every data chunk sent."""
    seen: list[int] = []

    def count(chunk: Any) -> Any:
        if chunk.data:
            seen.append(chunk.seq)
        return chunk

    response = transport.send_snapshot(
        target, handler, leader_term=2, timeout=WAIT * 3, interceptors=[RequestEditor(count)]
    )
    assert response.success
    return seen


def assert_installed(peer: Node, leader: StateMachineHandler) -> None:
    assert peer.digest() == local_digest(leader)
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    lid = meta.last_included
    assert peer.latest() == f"LATEST {lid.index} {lid.term} {meta.checksum.hex()}"
    kept = peer.dir / "snapshots" / f"snapshot-{lid.index}-{lid.term}.tar.gz"
    assert archive.verify(kept) == meta.checksum
    assert temps(peer.dir) == []


_SENDER = r"""
import sys, time
sys.path.insert(0, sys.argv[3])
import grpc_node
from test_grpc import RequestEditor
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm.proto import common_pb2, storage_pb2
from d_engine_sm.transport import grpc as transport

def held(chunk):
    # Never past chunk argv[5]: the parent kills the process about half way, however
    # late it sees the ack it waits for (a paced sender could finish first).
    if chunk.seq >= int(sys.argv[5]):
        time.sleep(600)
    return chunk

config = grpc_node.config(sys.argv[2], int(sys.argv[4]))
h = StateMachineHandler(MemoryStateMachine(), config, node_id=1)
print("SENDING", flush=True)
transport.send_snapshot(
    sys.argv[1], h, leader_term=2, timeout=120, interceptors=[RequestEditor(held)]
)
print("SENT", flush=True)
"""


@pytest.mark.slow
def test_push_resumes_after_the_sender_is_killed(
    tmp_path: Path, leader: StateMachineHandler, peers: Callable[..., Node]
) -> None:
    total = total_chunks(leader)
    peer = peers(tmp_path / "peer")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SENDER,
            peer.target,
            str(leader.config.snapshots_dir),
            str(Path(__file__).parent),
            str(CHUNK),
            str(total // 2 + 2),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        half = total // 2
        peer.wait_line(lambda s: " ack " in s and f"seq={half} status=ACCEPTED" in s)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(WAIT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
    peer.wait_line(lambda s: "InstallSnapshot failed" in s)
    assert temps(peer.dir) == PARTIAL
    kept = acked(peer, 0)
    assert kept == list(range(len(kept)))
    assert half < len(kept) < total, (len(kept), total)

    start = len(peer.lines)
    sent = push_counting(peer.target, leader)

    assert sent == list(range(len(kept), total))  # only the missing chunks crossed
    assert acked(peer, start) == sent
    peer.wait_line(lambda s: f"resuming transfer index={KEYS} at chunk={len(kept)}" in s, start)
    print(f"push after SIGKILL: {total} chunks, {len(kept)} kept, {len(sent)} sent on retry")
    assert_installed(peer, leader)


@pytest.mark.slow
def test_push_resumes_after_the_connection_drops(
    tmp_path: Path, leader: StateMachineHandler, peers: Callable[..., Node]
) -> None:
    total = total_chunks(leader)
    peer = peers(tmp_path / "peer")
    proxy = CuttingProxy(peer.port, total * CHUNK // 2, count_upstream=True)
    with pytest.raises(SnapshotTransferError):
        transport.send_snapshot(proxy.target, leader, leader_term=2, timeout=WAIT * 3)
    assert proxy.cut.is_set()
    peer.wait_line(lambda s: "InstallSnapshot failed" in s)
    assert temps(peer.dir) == PARTIAL
    kept = len(acked(peer, 0))
    assert total // 4 < kept < total * 3 // 4, (kept, total)

    start = len(peer.lines)
    sent = push_counting(peer.target, leader)

    assert sent == list(range(kept, total))
    assert acked(peer, start) == sent
    print(f"push after a dropped connection: {total} chunks, {kept} kept, {len(sent)} sent")
    assert_installed(peer, leader)


def pull_counting(target: str, learner: StateMachineHandler) -> list[int]:
    seen: list[int] = []

    def count(chunk: Any) -> Any:
        seen.append(chunk.seq)
        return chunk

    transport.pull_snapshot(target, learner, timeout=WAIT * 3, interceptors=[ResponseEditor(count)])
    return seen


def learner_partial(learner: StateMachineHandler) -> int:
    """Chunks the learner kept (from its sidecar)."""
    state = (learner.config.snapshots_dir / "temp-resume-state").read_text()
    return int(json.loads(state)["chunks"])


def assert_pulled(learner: StateMachineHandler, peer: Node) -> None:
    assert local_digest(learner) == peer.digest()
    meta = learner.get_latest_snapshot_metadata()
    assert meta is not None
    lid = meta.last_included
    assert peer.latest() == f"LATEST {lid.index} {lid.term} {meta.checksum.hex()}"
    assert temps(learner.config.snapshots_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["kill", "drop"])
def test_pull_resumes_after_a_cut(tmp_path: Path, peers: Callable[..., Node], cut: str) -> None:
    seed = ("--seed-keys", str(KEYS), "--value-size", str(MiB), "--seed", "11")
    peer = peers(tmp_path / "peer", *seed)
    learner = StateMachineHandler(
        MemoryStateMachine(), leader_config(tmp_path / "learner"), node_id=3
    )
    try:
        if cut == "kill":
            killed: list[int] = []

            def kill_half(chunk: Any) -> Any:
                if chunk.seq == KEYS // 2 and not killed:
                    killed.append(chunk.seq)
                    peer.kill()  # the sending process dies mid-stream
                return chunk

            with pytest.raises(SnapshotTransferError):
                transport.pull_snapshot(
                    peer.target, learner, timeout=WAIT, interceptors=[ResponseEditor(kill_half)]
                )
            peer = peers(tmp_path / "peer", *seed)  # restarted: the same snapshot
        else:
            proxy = CuttingProxy(peer.port, KEYS * MiB // 2, count_upstream=False)
            with pytest.raises(SnapshotTransferError):
                transport.pull_snapshot(proxy.target, learner, timeout=WAIT)
            assert proxy.cut.is_set()
        assert temps(learner.config.snapshots_dir) == PARTIAL
        kept = learner_partial(learner)
        assert KEYS // 4 < kept < KEYS, kept

        received = pull_counting(peer.target, learner)

        total = received[-1] + 1
        assert received == [0, *range(kept, total)]  # chunk 0 names the snapshot
        print(f"pull after {cut}: {total} chunks, {kept} kept, {len(received)} on the retry")
        assert_pulled(learner, peer)
    finally:
        learner.close()


# -- the partial's lifecycle ------------------------------------------------------------------
def cut_push(tmp_path: Path, leader: StateMachineHandler) -> Path:
    """Leave a partial in a fresh follower directory (in-process), return the directory."""
    follower_dir = tmp_path / "follower"
    follower = StateMachineHandler(MemoryStateMachine(), leader_config(follower_dir), node_id=2)
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None

    def half() -> Iterator[Any]:
        with leader.load_snapshot_data(meta) as chunks:  # type: ignore[attr-defined]
            for chunk in chunks:
                if chunk.seq == 10:
                    raise ConnectionResetError("peer went away")
                yield chunk

    with follower, pytest.raises(SnapshotTransferError):
        follower.apply_snapshot_stream_from_leader(2, half(), lambda _: None)
    assert sorted(p.name for p in follower_dir.glob("temp-*")) == PARTIAL
    return follower_dir


def test_stale_partial_is_removed_at_start_up(tmp_path: Path, leader: StateMachineHandler) -> None:
    follower_dir = cut_push(tmp_path, leader)
    fresh = StateMachineHandler(MemoryStateMachine(), leader_config(follower_dir), node_id=2)
    fresh.close()
    assert sorted(p.name for p in follower_dir.glob("temp-*")) == PARTIAL  # fresh: kept
    state = follower_dir / "temp-resume-state"
    doc = json.loads(state.read_text())
    state.write_text(json.dumps(doc | {"saved_at": time.time() - 7200}))
    config = SnapshotConfig(snapshots_dir=follower_dir, chunk_size=CHUNK, resume_ttl=3600.0)
    StateMachineHandler(MemoryStateMachine(), config, node_id=2).close()
    assert list(follower_dir.glob("temp-*")) == []


def test_a_different_or_newer_snapshot_discards_the_partial(
    tmp_path: Path, leader: StateMachineHandler
) -> None:
    follower_dir = cut_push(tmp_path, leader)
    follower = StateMachineHandler(MemoryStateMachine(), leader_config(follower_dir), node_id=2)
    with follower:
        # A different snapshot (another LogId) arrives: the partial is not used.
        other = StateMachineHandler(MemoryStateMachine(), leader_config(tmp_path / "o"), node_id=4)
        with other:
            grpc_node.seed(other, 3, 1000, 5)
            meta = other.get_latest_snapshot_metadata()
            assert meta is not None
            follower.apply_snapshot_stream_from_leader(
                2, list(other.load_snapshot_data(meta)), lambda _: None
            )
        assert list(follower_dir.glob("temp-*")) == []
        assert follower.last_applied() == 3


def test_a_newer_local_snapshot_discards_the_partial(
    tmp_path: Path, leader: StateMachineHandler
) -> None:
    follower_dir = cut_push(tmp_path, leader)
    with StateMachineHandler(
        MemoryStateMachine(), leader_config(follower_dir), node_id=2
    ) as follower:
        grpc_node.seed(follower, KEYS + 6, 100, 3)  # its own snapshot at index 70 > 64
        assert list(follower_dir.glob("temp-*")) == []


def test_a_prefix_of_uneven_chunks_is_not_kept(tmp_path: Path) -> None:
    # Chunks shorter than the first (before the last) make no clean cut to resume at.
    meta = storage_pb2.SnapshotMetadata(
        last_included=common_pb2.LogId(index=5, term=1), checksum=b"\x01" * 32
    )
    sizes = [10, 5, 10, 10]
    stream = [
        wire.make_chunk(
            seq=i,
            total=4,
            data=b"x" * n,
            leader_term=1,
            leader_id=1,
            metadata=meta if i == 0 else None,
        )
        for i, n in enumerate(sizes)
    ]

    def cut() -> Iterator[Any]:
        yield from stream[:2]
        raise ConnectionResetError("peer went away")

    directory = tmp_path / "follower"
    h = StateMachineHandler(MemoryStateMachine(), leader_config(directory))
    with h, pytest.raises(SnapshotTransferError):
        h.apply_snapshot_stream_from_leader(1, cut(), lambda _: None)
    assert list(directory.glob("temp-*")) == []
