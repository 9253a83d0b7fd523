"""Two processes share one snapshot directory: no torn or lost archive.

A *creator* process applies entries and creates snapshots in a loop (its own
handler, which also prunes to ``cleanup_retain_count``). A *pruner* process
(its own handler on the same directory) loops over ``cleanup_snapshot`` with
a random retain count and reads archives back (``load_snapshot_data`` →
assembled bytes → ``archive.verify``). ``SnapshotInProgress`` (the other
process holds ``.lock``) and ``SnapshotNotFound`` (pruned between listing
and opening) are acceptable; anything else is recorded as a violation.

Afterwards the parent checks: no violation on either side, every archive
left verifies and has the SHA-256 the creator recorded for it, every
archive the pruner read back was byte-identical to what the creator wrote,
the creator's last archive still exists (nothing newer can replace it),
and no ``temp-`` file remains.

This file is also the children's script:
``python tests/test_multiprocess.py creator|pruner DIR SECONDS``; each
prints ``ready``, waits for a line on stdin, runs, prints a JSON summary.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.naming import parse_archive_name
from d_engine_sm._values import log_id
from d_engine_sm.errors import SnapshotInProgress, SnapshotNotFound
from d_engine_sm.proto import storage_pb2

SECONDS = 4.0
WAIT = 60.0
PREFIX = "snapshot-"


def config(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(
        snapshots_dir=directory, chunk_size=4096, cleanup_retain_count=3, fsync=True
    )


# -- the children ---------------------------------------------------------------------------
def creator(directory: Path, seconds: float) -> dict[str, Any]:
    rng = random.Random(1)
    created: list[tuple[int, int, str]] = []
    busy = 0
    violations: list[str] = []
    with StateMachineHandler(MemoryStateMachine(), config(directory), node_id=1) as h:
        start_signal()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            first = h.last_applied() + 1
            h.apply_chunk(
                [
                    _kv.command_entry(i, 1, _kv.insert(b"k%d" % (i % 500), rng.randbytes(64)))
                    for i in range(first, first + 200)
                ]
            )
            try:
                meta, _ = h.create_snapshot()
            except SnapshotInProgress:
                busy += 1
                continue
            except Exception as exc:
                violations.append(f"create failed: {exc!r}")
                continue
            lid = meta.last_included
            created.append((lid.index, lid.term, meta.checksum.hex()))
    return {"created": created, "busy": busy, "violations": violations}


def pruner(directory: Path, seconds: float) -> dict[str, Any]:
    rng = random.Random(2)
    reads: list[tuple[int, int, str]] = []
    removed = busy = gone = 0
    violations: list[str] = []
    scratch = directory.parent / "pruner-scratch.tar.gz"
    with StateMachineHandler(MemoryStateMachine(), config(directory), node_id=2) as h:
        start_signal()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                removed += len(h.cleanup_snapshot(rng.randint(1, 2)))
            except SnapshotInProgress:
                busy += 1
            except Exception as exc:
                violations.append(f"cleanup failed: {exc!r}")
            names = [p.name for p in directory.iterdir()]
            parsed = sorted(x for x in (parse_archive_name(n, PREFIX) for n in names) if x)
            if not parsed:
                continue
            index, term = rng.choice(parsed[-2:])
            meta = storage_pb2.SnapshotMetadata(last_included=log_id(index, term))
            try:
                chunks = list(h.load_snapshot_data(meta))
            except SnapshotNotFound:
                gone += 1
                continue
            except Exception as exc:
                violations.append(f"load {index} failed: {exc!r}")
                continue
            blob = b"".join(c.data for c in chunks)
            if [c.seq for c in chunks] != list(range(len(chunks))) or any(
                c.total_chunks != len(chunks) for c in chunks
            ):
                violations.append(f"chunks of {index} out of order or miscounted")
            scratch.write_bytes(blob)
            try:
                digest = archive.verify(scratch)
            except Exception as exc:
                violations.append(f"archive {index} read back torn: {exc!r}")
                continue
            if digest != hashlib.sha256(blob).digest():
                violations.append(f"archive {index}: verify digest differs from the bytes")
            reads.append((index, term, digest.hex()))
    return {
        "reads": reads,
        "removed": removed,
        "busy": busy,
        "gone": gone,
        "violations": violations,
    }


def start_signal() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


# -- the test --------------------------------------------------------------------------------
def spawn(role: str, directory: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, role, str(directory), str(SECONDS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_creator_and_pruner_processes_share_a_directory(tmp_path: Path) -> None:
    directory = tmp_path / "snaps"
    directory.mkdir()  # handlers do no I/O until they write; the pruner lists it at once
    procs = [spawn("creator", directory), spawn("pruner", directory)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=WAIT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(WAIT)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    made, pruned = (json.loads(out) for out, _ in outputs)
    assert made["violations"] == [] and pruned["violations"] == []

    checksums = {(i, t): c for i, t, c in made["created"]}
    assert len(checksums) >= 3, made  # the loops really overlapped
    assert len(pruned["reads"]) >= 3 and pruned["removed"] >= 1, pruned
    for index, term, digest in pruned["reads"]:  # nothing torn was ever served
        assert checksums[(index, term)] == digest
    left = {}
    for path in directory.iterdir():
        parsed = parse_archive_name(path.name, PREFIX)
        if parsed is not None:
            left[parsed] = archive.verify(path).hex()
    assert left and all(checksums[lid] == digest for lid, digest in left.items())
    last_index, last_term, _ = made["created"][-1]
    assert (last_index, last_term) in left  # the newest is never lost
    assert [x.name for x in directory.iterdir() if x.name.startswith("temp-")] == []
    with StateMachineHandler(MemoryStateMachine(), config(directory)) as h:
        latest = h.get_latest_snapshot_metadata()
        assert latest is not None and latest.last_included.index == last_index


def main(argv: list[str]) -> int:
    role, directory, seconds = argv[0], Path(argv[1]), float(argv[2])
    run = {"creator": creator, "pruner": pruner}[role]
    print(json.dumps(run(directory, seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
