"""How fast does StateMachineHandler.apply_chunk apply 100-byte puts on MemoryStateMachine?

Compared, in the same run, with the floor: a loop that parses each entry's
WriteCommand and sets a dict key (what any Python KV apply must do at least).
Target: handler >= 0.70 x floor.

    python benchmarks/bench_apply.py [--entries 200000] [--batch 1000] [--json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import report, summary

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler, _kv
from d_engine_sm.proto import client_pb2, common_pb2


def make_batches(total: int, batch: int) -> list[list[common_pb2.Entry]]:
    value = b"x" * 100
    entries = [
        _kv.command_entry(i, 1, _kv.insert(b"key-%08d" % (i % 50_000), value))
        for i in range(1, total + 1)
    ]
    return [entries[i : i + batch] for i in range(0, total, batch)]


def floor_run(batches: list[list[common_pb2.Entry]]) -> float:
    data: dict[bytes, bytes] = {}
    import time

    t0 = time.perf_counter()
    for batch in batches:
        for entry in batch:
            cmd = client_pb2.WriteCommand()
            cmd.ParseFromString(entry.payload.command)
            data[cmd.insert.key] = cmd.insert.value
    elapsed = time.perf_counter() - t0
    return sum(map(len, batches)) / elapsed


def handler_run(batches: list[list[common_pb2.Entry]], snapdir: str) -> float:
    import time

    handler = StateMachineHandler(MemoryStateMachine(), SnapshotConfig(snapshots_dir=Path(snapdir)))
    t0 = time.perf_counter()
    for batch in batches:
        handler.apply_chunk(batch)
    elapsed = time.perf_counter() - t0
    handler.close()
    return sum(map(len, batches)) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    batches = make_batches(ns.entries, ns.batch)
    floor: list[float] = []
    handler: list[float] = []
    with tempfile.TemporaryDirectory() as snapdir:
        floor_run(batches)  # warm-up
        handler_run(batches, snapdir)
        for _ in range(ns.repeat):  # interleaved, so drift in machine load hits both alike
            floor.append(floor_run(batches))
            handler.append(handler_run(batches, snapdir))
    rows = {"floor (parse + dict set)": summary(floor), "handler.apply_chunk": summary(handler)}
    ratios = {
        "handler / floor, medians (target >= 0.70)": summary(handler)["median"]
        / summary(floor)["median"],
        "handler / floor, best runs": max(handler) / max(floor),
    }
    report(rows, ratios, ns.json, "entries/s")


if __name__ == "__main__":
    main()
