"""Child process for tests/test_archive_bombs.py: run one operation on a hostile
archive and report what escaped and how much the peak RSS grew.

Usage: python tests/bomb_child.py OP[,OP...] ARCHIVE WORKDIR [AS_LIMIT_BYTES]

Prints one JSON line per op: {"op": ..., "error": class name or null,
"message": ..., "growth": bytes, "acks": [...], "left": [...names left in the
snapshots dir]}.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
from pathlib import Path

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._snapshot import archive, chunks
from d_engine_sm.proto import common_pb2, storage_pb2

CAP = 1 << 20  # max_unpacked_bytes for every operation


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _config(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(
        snapshots_dir=directory,
        chunk_size=64 << 10,
        max_unpacked_bytes=CAP,
        max_archive_members=1000,
        chunk_timeout=10.0,
        fsync=False,
    )


def _receive(path: Path, work: Path, acks: list[str]) -> None:
    data = path.read_bytes()
    meta = storage_pb2.SnapshotMetadata(
        last_included=common_pb2.LogId(index=10, term=1), checksum=hashlib.sha256(data).digest()
    )
    size = 64 << 10
    total = max(1, -(-len(data) // size))
    stream = [
        chunks.make_chunk(
            seq=i,
            total=total,
            data=data[i * size : (i + 1) * size],
            leader_term=1,
            leader_id=2,
            metadata=meta if i == 0 else None,
        )
        for i in range(total)
    ]
    with StateMachineHandler(MemoryStateMachine(), _config(work / "snaps")) as h:
        h.apply_snapshot_stream_from_leader(
            1,
            stream,
            lambda ack: acks.append(storage_pb2.SnapshotAck.ChunkStatus.Name(ack.status)),
        )


def _startup(path: Path, work: Path) -> None:
    snaps = work / "snaps"
    snaps.mkdir()
    shutil.copy(path, snaps / "snapshot-10-1.tar.gz")
    with StateMachineHandler(MemoryStateMachine(), _config(snaps)) as h:
        if h.get_latest_snapshot_metadata() is not None:
            raise AssertionError("a hostile archive was recovered as the latest snapshot")


def _run(op: str, path: Path, work: Path) -> dict[str, object]:
    acks: list[str] = []
    before = _peak()
    error: BaseException | None = None
    try:
        if op == "verify":
            archive.verify(path)
        elif op == "list":
            archive.list_members(path)
        elif op == "unpack":
            dest = work / "dest"
            dest.mkdir()
            archive.safe_unpack(path, dest, max_bytes=CAP, max_members=1000)
        elif op == "manifest":
            archive.read_manifest(path)
        elif op == "receive":
            _receive(path, work, acks)
        elif op == "startup":
            _startup(path, work)
        else:
            raise SystemExit(f"unknown op {op}")
    except BaseException as exc:  # reported, judged by the test
        error = exc
    snaps = work / "snaps"
    return {
        "op": op,
        "error": type(error).__name__ if error is not None else None,
        "message": str(error)[:300] if error is not None else "",
        # Peak RSS only rises: growth over the peak so far bounds every op run
        # so far by (first baseline + growth), which is what the budget is about.
        "growth": _peak() - before,
        "acks": acks,
        "left": sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else [],
    }


def main() -> None:
    ops, path, work = sys.argv[1].split(","), Path(sys.argv[2]), Path(sys.argv[3])
    if len(sys.argv) > 4:
        limit = int(sys.argv[4])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for op in ops:
        op_work = work / op
        op_work.mkdir(parents=True)
        print(json.dumps(_run(op, path, op_work)))


if __name__ == "__main__":
    main()
