"""The gRPC snapshot transport between real processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")

import grpc
import grpc_node

from d_engine_sm._handler import StateMachineHandler
from d_engine_sm.errors import (
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
)
from d_engine_sm.proto import storage_pb2, storage_pb2_grpc
from d_engine_sm.transport import grpc as transport

NODE = Path(__file__).with_name("grpc_node.py")
PROTO_DIR = Path(transport.__file__).resolve().parent.parent / "proto"
CHUNK = 16 * 1024
WAIT = 20.0  # upper bound for any single awaited event
STARTUP = 90.0  # upper bound for a node to seed its state and listen


class Node:
    """A ``grpc_node.py`` process: its port, its output lines, simple commands."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.dir = directory
        self.proc = subprocess.Popen(
            [sys.executable, str(NODE), "--dir", str(directory), "--chunk-size", str(CHUNK), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        # Seeding (64 MiB in test_resume) and the first snapshot come before PORT.
        port = self.wait_line(lambda s: s.startswith("PORT "), timeout=STARTUP)
        self.port = int(port.split()[1])
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("EOF")
            self._cond.notify_all()

    def wait_line(self, pred: Callable[[str], bool], start: int = 0, timeout: float = WAIT) -> str:
        def found() -> str | None:
            return next((s for s in self.lines[start:] if pred(s) or s == "EOF"), None)

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, timeout), self.lines[-20:]
            line = found()
        assert line is not None and line != "EOF", f"node exited; output: {self.lines[-20:]}"
        return line

    def ask(self, cmd: str) -> str:
        with self._cond:
            start = len(self.lines)
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = cmd.upper()
        return self.wait_line(lambda s: s.startswith(reply + " "), start)

    def digest(self) -> tuple[str, int, int]:
        _, hexdigest, count, applied = self.ask("digest").split()
        return hexdigest, int(count), int(applied)

    def latest(self) -> str:
        return self.ask("latest")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(WAIT)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(WAIT)


@pytest.fixture
def nodes() -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(directory: Path, *args: str) -> Node:
        node = Node(directory, *args)
        started.append(node)
        return node

    yield start
    for node in started:
        node.close()


def local_handler(
    directory: Path, *, seed_keys: int = 0, state: str = "memory"
) -> StateMachineHandler:
    handler = StateMachineHandler(
        grpc_node.make_state(state, directory),
        grpc_node.config(directory / "snapshots", CHUNK),
        node_id=1,
    )
    if seed_keys:
        grpc_node.seed(handler, seed_keys, 4096, 11)
    return handler


def local_digest(handler: StateMachineHandler) -> tuple[str, int, int]:
    items = grpc_node.state_items(handler.state_machine)
    return grpc_node.digest(items), len(items), handler.last_applied()


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("temp-*"))


# What a transfer cut by its peer or connection leaves: the verified prefix to resume from.
PARTIAL = ["temp-resume-data", "temp-resume-state"]


def latest_line(meta: storage_pb2.SnapshotMetadata) -> str:
    lid = meta.last_included
    return f"LATEST {lid.index} {lid.term} {meta.checksum.hex()}"


def flip(chunk: storage_pb2.SnapshotChunk) -> storage_pb2.SnapshotChunk:
    bad = storage_pb2.SnapshotChunk()
    bad.CopyFrom(chunk)
    data = bytearray(bad.data)
    data[len(data) // 2] ^= 0xFF
    bad.data = bytes(data)
    return bad


class _CallWrapper:
    """A response iterator that edits chunks and otherwise behaves like the call."""

    def __init__(self, call: Any, edit: Callable[[Any], Any]) -> None:
        self._call = call
        self._edit = edit

    def __iter__(self) -> _CallWrapper:
        return self

    def __next__(self) -> Any:
        return self._edit(next(self._call))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class ResponseEditor(grpc.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, edit: Callable[[Any], Any]) -> None:
        self.edit = edit

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return _CallWrapper(continuation(client_call_details, request_iterator), self.edit)


class RequestEditor(grpc.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, edit: Callable[[Any], Any]) -> None:
        self.edit = edit

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(client_call_details, (self.edit(c) for c in request_iterator))


def corrupt_once(seq: int) -> tuple[Callable[[Any], Any], list[int]]:
    flipped: list[int] = []

    def edit(chunk: Any) -> Any:
        if chunk.seq == seq and not flipped:
            flipped.append(seq)
            return flip(chunk)
        return chunk

    return edit, flipped


# -- import hygiene ------------------------------------------------------------------
def test_core_and_transport_package_import_without_grpc() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'grpc' or name.startswith('grpc.'):\n"
        "            raise ImportError('grpc blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import d_engine_sm, d_engine_sm.transport\n"
        "from d_engine_sm import MemoryStateMachine\n"
        "assert MemoryStateMachine().get(b'x') is None\n"
        "loaded = [m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- push and pull ---------------------------------------------------------------------
@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_push_installs_multi_chunk_snapshot_on_peer(
    tmp_path: Path, nodes: Callable[..., Node], state: str
) -> None:
    if state == "sqlite":
        pytest.importorskip("d_engine_sm._sqlite")
    leader = local_handler(tmp_path / "leader", seed_keys=60, state=state)
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    total = len(list(leader.load_snapshot_data(meta)))
    assert total > 4  # really multi-chunk
    peer = nodes(tmp_path / "peer", "--state", state)
    assert peer.latest() == "LATEST none"

    response = transport.send_snapshot(peer.target, leader, leader_term=2, timeout=WAIT)

    assert response.success and response.next_chunk == total and response.term == 2
    assert peer.digest() == local_digest(leader)
    assert peer.latest() == latest_line(meta)
    assert temps(peer.dir) == []
    # A second push of the same snapshot is stale and says so.
    with pytest.raises(StaleSnapshotError):
        transport.send_snapshot(peer.target, leader, leader_term=2, timeout=WAIT)
    leader.close()


def test_pull_installs_peers_newest_snapshot(tmp_path: Path, nodes: Callable[..., Node]) -> None:
    peer = nodes(tmp_path / "peer", "--seed-keys", "50")
    learner = local_handler(tmp_path / "learner")

    meta = transport.pull_snapshot(peer.target, learner, timeout=WAIT)

    assert local_digest(learner) == peer.digest()
    assert latest_line(meta) == peer.latest()
    assert learner.last_applied() == 50
    assert temps(learner.config.snapshots_dir) == []
    learner.close()


def test_pull_from_node_without_snapshot_is_not_found(
    tmp_path: Path, nodes: Callable[..., Node]
) -> None:
    peer = nodes(tmp_path / "peer")
    learner = local_handler(tmp_path / "learner")
    with pytest.raises(SnapshotNotFound, match="peer has no snapshot"):
        transport.pull_snapshot(peer.target, learner, timeout=WAIT)
    assert learner.get_latest_snapshot_metadata() is None
    learner.close()


# -- corruption in flight ----------------------------------------------------------------
def test_pull_retransmits_chunk_corrupted_in_flight(
    tmp_path: Path, nodes: Callable[..., Node]
) -> None:
    peer = nodes(tmp_path / "peer", "--seed-keys", "50")
    learner = local_handler(tmp_path / "learner")
    edit, flipped = corrupt_once(2)

    transport.pull_snapshot(peer.target, learner, timeout=WAIT, interceptors=[ResponseEditor(edit)])

    assert flipped == [2]
    assert local_digest(learner) == peer.digest()
    peer.wait_line(lambda s: "CHECKSUM_MISMATCH" in s and "seq=2" in s)
    peer.wait_line(lambda s: "resending" in s and "seq=2" in s)
    learner.close()


def test_push_with_chunk_corrupted_in_flight_is_refused_cleanly(
    tmp_path: Path, nodes: Callable[..., Node]
) -> None:
    leader = local_handler(tmp_path / "leader", seed_keys=60)
    peer = nodes(tmp_path / "peer")
    before = peer.digest()
    edit, flipped = corrupt_once(2)

    with pytest.raises(SnapshotTransferError, match="INVALID_ARGUMENT") as err:
        transport.send_snapshot(
            peer.target, leader, leader_term=2, timeout=WAIT, interceptors=[RequestEditor(edit)]
        )

    assert flipped == [2]
    assert err.value.seq == 2  # the peer's next_chunk: resume from the corrupt chunk
    assert peer.digest() == before
    assert peer.latest() == "LATEST none"
    # The chunks behind the corrupt one were dropped, then the stream ended: a
    # push cannot resend, and a stream that simply ends leaves nothing to resume.
    assert temps(peer.dir) == []
    # Not wedged: a clean push right after succeeds.
    assert transport.send_snapshot(peer.target, leader, leader_term=2, timeout=WAIT).success
    assert peer.digest() == local_digest(leader)
    assert temps(peer.dir) == []
    leader.close()


# -- cancellation and crashes --------------------------------------------------------------
def test_client_cancel_mid_push_keeps_only_the_verified_prefix(
    tmp_path: Path, nodes: Callable[..., Node]
) -> None:
    leader = local_handler(tmp_path / "leader", seed_keys=60)
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    peer = nodes(tmp_path / "peer")
    before = peer.digest()
    release = threading.Event()

    def gated() -> Iterator[storage_pb2.SnapshotChunk]:
        with leader.load_snapshot_data(meta, leader_term=2) as chunks:  # type: ignore[attr-defined]
            for chunk in chunks:
                if chunk.seq == 4:
                    release.wait(WAIT)
                    return
                yield chunk

    channel = grpc.insecure_channel(peer.target)
    stub = storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
    future = stub.InstallSnapshot.future(gated(), timeout=WAIT)
    peer.wait_line(lambda s: " ack " in s and "seq=3 status=ACCEPTED" in s)
    assert temps(peer.dir)  # the receive is under way
    future.cancel()
    release.set()
    peer.wait_line(lambda s: "InstallSnapshot failed" in s)

    assert future.cancelled()
    assert temps(peer.dir) == PARTIAL  # chunks 0-3 kept to resume from
    assert peer.digest() == before
    assert peer.latest() == "LATEST none"
    channel.close()
    leader.close()


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_peer_killed_mid_transfer(
    tmp_path: Path, nodes: Callable[..., Node], direction: str
) -> None:
    killed: list[int] = []
    if direction == "push":
        leader = local_handler(tmp_path / "leader", seed_keys=60)
        peer = nodes(tmp_path / "peer")

        def kill_before(chunk: Any) -> Any:
            if chunk.seq == 4 and not killed:
                peer.wait_line(lambda s: " ack " in s and "seq=3 status=ACCEPTED" in s)
                assert temps(peer.dir)  # a receive in progress
                killed.append(chunk.seq)  # before: the call fails as soon as it dies
                peer.kill()
            return chunk

        started = time.monotonic()
        with pytest.raises(SnapshotTransferError):
            transport.send_snapshot(
                peer.target,
                leader,
                leader_term=2,
                timeout=WAIT,
                interceptors=[RequestEditor(kill_before)],
            )
        expected_latest = "LATEST none"
        receiver_dir = peer.dir
        leader.close()
    else:
        peer = nodes(tmp_path / "peer", "--seed-keys", "50")
        expected_latest = peer.latest()
        learner = local_handler(tmp_path / "learner")

        def kill_after(chunk: Any) -> Any:
            if chunk.seq == 3 and not killed:
                killed.append(chunk.seq)  # before: the call fails as soon as it dies
                peer.kill()
            return chunk

        started = time.monotonic()
        with pytest.raises(SnapshotTransferError):
            transport.pull_snapshot(
                peer.target, learner, timeout=WAIT, interceptors=[ResponseEditor(kill_after)]
            )
        receiver_dir = learner.config.snapshots_dir
        assert learner.last_applied() == 0
        assert learner.get_latest_snapshot_metadata() is None
        learner.close()
    elapsed = time.monotonic() - started
    assert killed
    assert elapsed < WAIT / 2, f"error took {elapsed:.1f}s"
    if direction == "pull":
        assert temps(receiver_dir) == PARTIAL  # the learner keeps what it verified

    restarted = nodes(peer.dir)
    assert temps(peer.dir) == []
    assert restarted.latest() == expected_latest


# -- wire compatibility with an independent compile ---------------------------------------
_PEER_SCRIPT = r"""
import hashlib, json, sys, zlib
sys.path.insert(0, sys.argv[1])
import grpc
from google.protobuf import text_format
import common_pb2, storage_pb2, storage_pb2_grpc, client_pb2
mods = {"common": common_pb2, "storage": storage_pb2, "client": client_pb2}
req = json.load(sys.stdin)
out = {"parsed": {}, "built": {}}
for name, (mod, cls, hexbytes, text) in req["samples"].items():
    klass = getattr(mods[mod], cls)
    msg = klass.FromString(bytes.fromhex(hexbytes))
    out["parsed"][name] = text_format.MessageToString(msg)
    built = text_format.Parse(text, klass())
    out["built"][name] = built.SerializeToString(deterministic=True).hex()
svc = storage_pb2.DESCRIPTOR.services_by_name["SnapshotService"]
out["service"] = svc.full_name
out["methods"] = {
    m.name: [m.full_name, m.input_type.full_name, m.output_type.full_name,
             m.client_streaming, m.server_streaming] for m in svc.methods
}
src = open(storage_pb2_grpc.__file__).read()
out["paths"] = sorted(p for p in (req["paths"]) if p in src)
# A live pull through the independently generated stub: ping-pong acks.
channel = grpc.insecure_channel(req["target"])
stub = storage_pb2_grpc.SnapshotServiceStub(channel)
import queue
acks = queue.SimpleQueue()
def requests():
    while True:
        a = acks.get()
        if a is None:
            return
        yield a
data = []
for chunk in stub.StreamSnapshot(requests(), timeout=20):
    assert chunk.chunk_checksum == zlib.crc32(chunk.data).to_bytes(4, "big")
    data.append(chunk.data)
    acks.put(storage_pb2.SnapshotAck(seq=chunk.seq, status=storage_pb2.SnapshotAck.ACCEPTED,
                                     next_requested=chunk.seq + 1))
    if chunk.seq == 0:
        out["first_metadata"] = text_format.MessageToString(chunk.metadata)
acks.put(None)
out["pulled_sha256"] = hashlib.sha256(b"".join(data)).hexdigest()
out["pulled_chunks"] = len(data)
print(json.dumps(out))
"""


def _samples() -> dict[str, Any]:
    from google.protobuf import text_format

    from d_engine_sm import _kv
    from d_engine_sm.proto import client_pb2, common_pb2

    ack = storage_pb2.SnapshotAck
    lid = common_pb2.LogId(term=7, index=2**40 + 3)
    messages: dict[str, tuple[str, Any]] = {
        "log_id": ("common", lid),
        "entry_cmd": ("common", _kv.command_entry(9, 3, _kv.insert(b"k", b"v", 30))),
        "entry_noop": ("common", _kv.noop_entry(10, 3)),
        "metadata": (
            "storage",
            storage_pb2.SnapshotMetadata(last_included=lid, checksum=b"\x01" * 32),
        ),
        "chunk": (
            "storage",
            storage_pb2.SnapshotChunk(
                leader_term=5,
                leader_id=3,
                seq=0,
                total_chunks=9,
                chunk_checksum=b"\xd9g3\x0f",
                metadata=storage_pb2.SnapshotMetadata(last_included=lid, checksum=b"x" * 32),
                data=bytes(range(256)),
            ),
        ),
        "response": ("storage", storage_pb2.SnapshotResponse(term=4, success=True, next_chunk=9)),
        "cas": (
            "client",
            client_pb2.WriteCommand.FromString(_kv.compare_and_swap(b"a", None, b"b")),
        ),
        "result": ("client", client_pb2.ClientResult(key=b"k", value=b"v")),
        "watch": (
            "client",
            client_pb2.WatchResponse(
                key=b"k", value=b"", event_type=client_pb2.WATCH_EVENT_TYPE_DELETE
            ),
        ),
    }
    for status in ack.ChunkStatus.values():
        name = ack.ChunkStatus.Name(status).lower()
        messages[f"ack_{name}"] = ("storage", ack(seq=4, status=status, next_requested=5))  # type: ignore[arg-type]
    return {
        name: (
            mod,
            type(msg).__name__,
            msg.SerializeToString(deterministic=True).hex(),
            text_format.MessageToString(msg),
        )
        for name, (mod, msg) in messages.items()
    }


def test_wire_format_and_paths_match_independent_compile(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    src = tmp_path / "proto"
    out = tmp_path / "gen"
    src.mkdir()
    out.mkdir()
    for name in ("common.proto", "storage.proto", "client.proto"):
        text = (PROTO_DIR / name).read_text()
        # Same packages and messages; only the import path differs from ours.
        text = text.replace('import "d_engine_sm/proto/common.proto";', 'import "common.proto";')
        (src / name).write_text(text)
    protoc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *(str(p) for p in sorted(src.glob("*.proto"))),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert protoc.returncode == 0, protoc.stderr

    leader = local_handler(tmp_path / "leader", seed_keys=20)
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    server, port = transport.start_server(leader, "127.0.0.1:0")
    samples = _samples()
    paths = [transport.INSTALL_SNAPSHOT_METHOD, transport.STREAM_SNAPSHOT_METHOD]
    try:
        run = subprocess.run(
            [sys.executable, "-c", _PEER_SCRIPT, str(out)],
            input=json.dumps({"samples": samples, "paths": paths, "target": f"127.0.0.1:{port}"}),
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
    finally:
        server.stop(None)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)

    from google.protobuf import text_format

    from d_engine_sm.proto import client_pb2, common_pb2

    mods = {"common": common_pb2, "storage": storage_pb2, "client": client_pb2}
    for name, (mod, cls, hexbytes, text) in samples.items():
        assert got["parsed"][name] == text, name  # our bytes, their parser
        assert got["built"][name] == hexbytes, name  # their bytes equal ours
        theirs = getattr(mods[mod], cls).FromString(bytes.fromhex(got["built"][name]))
        assert text_format.MessageToString(theirs) == text, name
    ours = storage_pb2.DESCRIPTOR.services_by_name["SnapshotService"]
    assert got["service"] == ours.full_name == transport.SERVICE_NAME
    assert got["methods"] == {
        m.name: [
            m.full_name,
            m.input_type.full_name,
            m.output_type.full_name,
            m.client_streaming,
            m.server_streaming,
        ]
        for m in ours.methods
    }
    assert got["methods"]["StreamSnapshot"][3:] == [True, True]
    assert got["methods"]["InstallSnapshot"][3:] == [True, False]
    assert got["paths"] == sorted(paths)
    assert got["pulled_sha256"] == meta.checksum.hex()
    assert got["pulled_chunks"] > 4
    assert text_format.Parse(got["first_metadata"], storage_pb2.SnapshotMetadata()) == meta
    leader.close()


def test_tls_push_and_pull_in_process(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    server_creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    client_creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    leader = local_handler(tmp_path / "leader", seed_keys=20)
    follower = local_handler(tmp_path / "follower")
    learner = local_handler(tmp_path / "learner")
    server, port = transport.start_server(follower, "127.0.0.1:0", credentials=server_creds)
    try:
        target = f"127.0.0.1:{port}"
        # Plaintext against a TLS port fails cleanly, with nothing installed.
        with pytest.raises(SnapshotTransferError):
            transport.send_snapshot(target, leader, leader_term=2, timeout=5)
        assert follower.last_applied() == 0
        response = transport.send_snapshot(
            target, leader, leader_term=2, timeout=WAIT, credentials=client_creds
        )
        assert response.success
        meta = transport.pull_snapshot(target, learner, timeout=WAIT, credentials=client_creds)
    finally:
        server.stop(None)
    assert local_digest(follower) == local_digest(leader) == local_digest(learner)
    assert meta == leader.get_latest_snapshot_metadata()
    for h in (leader, follower, learner):
        h.close()


# -- a peer that will not finish ------------------------------------------------------------------
@pytest.mark.parametrize("misbehaviour", ["duplicates", "idle", "overall"])
def test_a_misbehaving_pusher_cannot_hold_the_receive_open(
    tmp_path: Path, misbehaviour: str
) -> None:
    leader = local_handler(tmp_path / "leader", seed_keys=60)
    config = grpc_node.config(tmp_path / "follower", CHUNK)
    # Only the limit under test is tight: a loaded machine that delays the pusher's
    # 0.4 s steps by 0.6 s must not end the "overall" case as idle instead.
    idle, overall = (30.0, 2.0) if misbehaviour == "overall" else (1.0, 30.0)
    follower = StateMachineHandler(
        grpc_node.make_state("memory", tmp_path),
        dataclasses.replace(config, transfer_idle_timeout=idle, transfer_timeout=overall),
        node_id=2,
    )
    server, port = transport.start_server(follower, "127.0.0.1:0")
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    chunks = list(leader.load_snapshot_data(meta, leader_term=2))
    assert len(chunks) > 10

    def hostile() -> Iterator[storage_pb2.SnapshotChunk]:
        yield from chunks[:2]
        if misbehaviour == "overall":  # progress every 0.4 s, never idle, too slow overall
            for c in chunks[2:]:
                time.sleep(0.4)
                yield c
        while True:  # chunk 1 again and again: fast, or slowly enough to be idle
            time.sleep(0.001 if misbehaviour == "duplicates" else 0.3)
            yield chunks[1]

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.InstallSnapshot(hostile(), timeout=WAIT)
        elapsed = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reason = {
            "duplicates": "duplicate or out-of-turn chunks",
            "idle": "no new chunk accepted for 1 seconds",
            "overall": "transfer took more than 2 seconds",
        }[misbehaviour]
        assert reason in (err.value.details() or "")
        assert elapsed < 6.0, elapsed
        # Good data is kept to resume from when the peer merely stalled.
        expect = [] if misbehaviour == "duplicates" else PARTIAL
        assert temps(follower.config.snapshots_dir) == expect
        # The next transfer proceeds at once and installs.
        target = f"127.0.0.1:{port}"
        assert transport.send_snapshot(target, leader, leader_term=2, timeout=WAIT).success
        assert local_digest(follower) == local_digest(leader)
        assert temps(follower.config.snapshots_dir) == []
    finally:
        channel.close()
        server.stop(None)
        follower.close()
        leader.close()


# -- the push's resume probe ------------------------------------------------------------------
class _NoProbePeer(storage_pb2_grpc.SnapshotServiceServicer):
    """Like a d-engine node: any stream short of total_chunks is an error."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def InstallSnapshot(self, request_iterator: Any, context: Any) -> Any:
        seqs = [c.seq for c in request_iterator if c.data]
        self.calls.append(seqs)
        if not seqs or len(seqs) != max(seqs) + 1:
            context.abort(grpc.StatusCode.INTERNAL, f"Received chunks({len(seqs)}) != total")
        return storage_pb2.SnapshotResponse(term=1, success=True, next_chunk=len(seqs))


def test_push_to_a_peer_without_probe_support_sends_everything(tmp_path: Path) -> None:
    leader = local_handler(tmp_path / "leader", seed_keys=20)
    peer = _NoProbePeer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    storage_pb2_grpc.add_SnapshotServiceServicer_to_server(peer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        response = transport.send_snapshot(f"127.0.0.1:{port}", leader, leader_term=2, timeout=WAIT)
    finally:
        server.stop(None)
        leader.close()
    assert response.success
    assert peer.calls[0] == []  # the probe: a header, no data
    assert peer.calls[1] == list(range(len(peer.calls[1]))) and len(peer.calls) == 2


def test_push_to_a_busy_peer_fails_at_the_probe(tmp_path: Path) -> None:
    leader = local_handler(tmp_path / "leader", seed_keys=20)
    follower = local_handler(tmp_path / "follower")
    server, port = transport.start_server(follower, "127.0.0.1:0")
    sent: list[int] = []

    def count(chunk: Any) -> Any:
        if chunk.data:
            sent.append(chunk.seq)
        return chunk

    try:
        with _dir_locked(follower), pytest.raises(SnapshotTransferError, match="ABORTED"):
            transport.send_snapshot(
                f"127.0.0.1:{port}",
                leader,
                leader_term=2,
                timeout=WAIT,
                interceptors=[RequestEditor(count)],
            )
    finally:
        server.stop(None)
        follower.close()
        leader.close()
    assert sent == []  # refused before any data crossed


@contextlib.contextmanager
def _dir_locked(handler: StateMachineHandler) -> Iterator[None]:
    """Another process's writer lock on the handler's snapshots directory."""
    import filelock

    lock = filelock.FileLock(str(handler.config.snapshots_dir / ".lock"))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
            "print('LOCKED', flush=True); sys.stdin.read()",
            lock.lock_file,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "LOCKED"
        yield
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(WAIT)
