"""How fast does a snapshot travel over the gRPC transport on loopback?

Question: for a >= 200 MB snapshot archive (incompressible values, so the
archive really is that big), what MB/s do a push (``send_snapshot`` →
InstallSnapshot) and a pull (``pull_snapshot`` → StreamSnapshot) reach with
1 MiB and 4 MiB chunks, and what fraction is that of a plain local file copy
(``shutil.copyfile``) of the same archive in the same run? Target: >= 200 MB/s
with 4 MiB chunks.

Each figure is end to end: from the call until the receiver has verified,
unpacked and installed the snapshot (a ``MemoryStateMachine``; fsync off) and
the call returned. The peer runs in a second process (``spawn``), so sender
and receiver do not share a GIL. ``--phases`` adds a breakdown of the receive
side in this process (chunk read, serialize, parse, receive+install with no
network). Every run also times a StreamSnapshot into a null sink (the
transport alone, no receive/install) as the transport's ceiling.

Run::

    python benchmarks/bench_grpc.py                 # 256 MB, 3 runs each
    python benchmarks/bench_grpc.py --size-mb 64 --repeat 1 --phases
    python benchmarks/bench_grpc.py --json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from _common import report, summary

from d_engine_sm import MemoryStateMachine, _kv
from d_engine_sm._config import MiB, SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm.transport import grpc as transport

VALUE_SIZE = 256 * 1024
STREAM_ONLY: dict[int, list[float]] = {}


def _config(directory: Path, chunk_size: int) -> SnapshotConfig:
    return SnapshotConfig(
        snapshots_dir=directory,
        chunk_size=chunk_size,
        fsync=False,
        chunk_timeout=60.0,
        max_log_entries_before_snapshot=10**9,
    )


def build_leader(directory: Path, size_mb: int) -> StateMachineHandler:
    """A handler whose newest snapshot holds ``size_mb`` MB of random values."""
    leader = StateMachineHandler(MemoryStateMachine(), _config(directory, MiB), node_id=1)
    count = size_mb * MiB // VALUE_SIZE
    batch = []
    for i in range(1, count + 1):
        batch.append(_kv.command_entry(i, 1, _kv.insert(b"key-%08d" % i, os.urandom(VALUE_SIZE))))
        if len(batch) == 64:
            leader.apply_chunk(batch)
            batch = []
    if batch:
        leader.apply_chunk(batch)
    leader.create_snapshot()
    return leader


# -- the peer process --------------------------------------------------------------
def peer_main(conn: Connection, root: str) -> None:
    """Serve commands from the parent: ("follower", chunk) / ("leader", dir, chunk) / ("stop",)."""
    server = None
    handler: StateMachineHandler | None = None
    n = 0
    while True:
        cmd = conn.recv()
        if server is not None:
            server.stop(None)
        if handler is not None:
            handler.close()
        if cmd[0] == "stop":
            conn.send("bye")
            return
        if cmd[0] == "follower":
            n += 1
            directory = Path(root) / f"follower-{n}"
            shutil.rmtree(Path(root) / f"follower-{n - 1}", ignore_errors=True)
            handler = StateMachineHandler(MemoryStateMachine(), _config(directory, cmd[1]))
        else:
            handler = StateMachineHandler(MemoryStateMachine(), _config(Path(cmd[1]), cmd[2]))
        server, port = transport.start_server(handler, "127.0.0.1:0", window=cmd[-1])
        conn.send(port)


class Peer:
    def __init__(self, root: Path) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=peer_main, args=(child, str(root)), daemon=True)
        self._proc.start()

    def ask(self, *cmd: Any) -> Any:
        self._conn.send(cmd)
        return self._conn.recv()

    def stop(self) -> None:
        self.ask("stop")
        self._proc.join(30)


# -- measurements --------------------------------------------------------------------
def timed(fn: Callable[[], object], size: int, repeat: int) -> list[float]:
    figures = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        figures.append(size / (time.perf_counter() - t0) / 1e6)
    return figures


def bench_copy(archive: Path, scratch: Path, repeat: int) -> list[float]:
    dst = scratch / "copy.tar.gz"

    def run() -> None:
        shutil.copyfile(archive, dst)
        dst.unlink()

    run()  # warm-up (page cache)
    return timed(run, archive.stat().st_size, repeat)


def bench_push(
    leader: StateMachineHandler, peer: Peer, *, chunk: int, window: int, size: int, repeat: int
) -> list[float]:
    sender = StateMachineHandler(
        MemoryStateMachine(), _config(leader.config.snapshots_dir, chunk), node_id=1
    )
    figures = []
    for _ in range(repeat + 1):  # first run warms up
        target = f"127.0.0.1:{peer.ask('follower', chunk, window)}"

        def push(target: str = target) -> None:
            transport.send_snapshot(target, sender, leader_term=1, timeout=600)

        figures += timed(push, size, 1)
    sender.close()
    return figures[1:]


def bench_pull(
    leader_dir: Path,
    peer: Peer,
    scratch: Path,
    *,
    chunk: int,
    window: int,
    size: int,
    repeat: int,
) -> list[float]:
    port = peer.ask("leader", str(leader_dir), chunk, window)
    figures = []
    STREAM_ONLY[chunk] = bench_stream_only(port, chunk, size, repeat)
    for i in range(repeat + 1):
        local = StateMachineHandler(MemoryStateMachine(), _config(scratch / f"pull-{i}", chunk))

        def pull(local: StateMachineHandler = local) -> None:
            transport.pull_snapshot(f"127.0.0.1:{port}", local, timeout=600)

        figures += timed(pull, size, 1)
        local.close()
        shutil.rmtree(scratch / f"pull-{i}", ignore_errors=True)
    return figures[1:]


def bench_stream_only(port: int, chunk: int, size: int, repeat: int) -> list[float]:
    """StreamSnapshot into a null sink (ack each chunk, keep nothing): the transport ceiling."""
    from d_engine_sm.proto import storage_pb2, storage_pb2_grpc

    def run() -> None:
        limit = transport.message_limit(chunk)
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
            acks: queue.SimpleQueue[storage_pb2.SnapshotAck | None] = queue.SimpleQueue()
            for c in stub.StreamSnapshot(iter(acks.get, None), timeout=600):
                acks.put(storage_pb2.SnapshotAck(seq=c.seq, next_requested=c.seq + 1))
            acks.put(None)

    run()
    return timed(run, size, repeat)


def bench_phases(leader: StateMachineHandler, scratch: Path, chunk: int) -> dict[str, float]:
    """Receive-side costs in this process, MB/s: read+CRC chunks, install from a file."""
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    sender = StateMachineHandler(
        MemoryStateMachine(), _config(leader.config.snapshots_dir, chunk), node_id=1
    )
    size = 0
    t0 = time.perf_counter()
    for c in sender.load_snapshot_data(meta):
        size += len(c.data)
    load = size / (time.perf_counter() - t0) / 1e6
    chunks = list(sender.load_snapshot_data(meta))
    t0 = time.perf_counter()
    wire = [c.SerializeToString() for c in chunks]
    ser = size / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    parsed = [type(chunks[0]).FromString(b) for b in wire]
    parse = size / (time.perf_counter() - t0) / 1e6
    del wire
    local = StateMachineHandler(MemoryStateMachine(), _config(scratch / "phase", chunk))
    t0 = time.perf_counter()
    local.apply_snapshot_stream_from_leader(1, parsed, lambda ack: None)
    receive = size / (time.perf_counter() - t0) / 1e6
    local.close()
    sender.close()
    shutil.rmtree(scratch / "phase", ignore_errors=True)
    return {
        "load_snapshot_data (read+CRC+build)": load,
        "serialize": ser,
        "parse": parse,
        "receive+verify+install, no network": receive,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--window", type=int, default=transport.DEFAULT_WINDOW)
    parser.add_argument("--chunks-mib", default="1,4", help="comma-separated chunk sizes")
    parser.add_argument("--phases", action="store_true", help="also time receive-side phases")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        root = Path(tmp)
        leader = build_leader(root / "leader", args.size_mb)
        meta = leader.get_latest_snapshot_metadata()
        assert meta is not None
        lid = meta.last_included
        archive = leader.config.snapshots_dir / f"snapshot-{lid.index}-{lid.term}.tar.gz"
        size = archive.stat().st_size
        if not args.json:
            print(f"archive {size / 1e6:.1f} MB, window {args.window}")
        rows = {"local file copy": summary(bench_copy(archive, root, args.repeat))}
        peer = Peer(root / "peer")
        try:
            for mib in (int(x) for x in args.chunks_mib.split(",")):
                chunk = mib * MiB
                push = bench_push(
                    leader, peer, chunk=chunk, window=args.window, size=size, repeat=args.repeat
                )
                rows[f"push {mib} MiB chunks"] = summary(push)
                pull = bench_pull(
                    leader.config.snapshots_dir,
                    peer,
                    root,
                    chunk=chunk,
                    window=args.window,
                    size=size,
                    repeat=args.repeat,
                )
                rows[f"pull {mib} MiB chunks"] = summary(pull)
                rows[f"stream only {mib} MiB (no receive/install)"] = summary(STREAM_ONLY[chunk])
                if args.phases:
                    for name, value in bench_phases(leader, root, chunk).items():
                        rows[f"phase {mib} MiB: {name}"] = summary([value])
        finally:
            peer.stop()
            leader.close()
        base = rows["local file copy"]["median"]
        ratios = {
            f"{name} / local copy": s["median"] / base
            for name, s in rows.items()
            if name.startswith(("push", "pull", "stream"))
        }
        report(rows, ratios, args.json, "MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
