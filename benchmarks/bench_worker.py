"""What does the ApplyWorker pipeline cost, and does a policy snapshot stall it?

1. Applied entries/s through an ApplyWorker (1000-entry batches submitted
   from another thread) vs direct ``apply_chunk`` calls, same run, same
   entries. Target: ratio >= 0.9.
2. Apply stall while a policy snapshot of 1M keys (100-byte values) runs:
   the longest gap between two ApplyCompleted events. Target: <= 100 ms.
3. 10,000 concurrent asyncio ``wait_applied`` waiters: time for all of them
   to wake after one apply, and the thread count before/while/after.

    python benchmarks/bench_worker.py [--entries 200000] [--keys 1000000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import summary

from d_engine_sm import LogSizePolicy, MemoryStateMachine, SnapshotConfig, StateMachineHandler, _kv
from d_engine_sm._values import NewCommitData
from d_engine_sm._worker import ApplyCompleted, ApplyWorker, SnapshotCreated, WorkerEvent
from d_engine_sm.aio import AsyncStateMachineHandler
from d_engine_sm.proto import common_pb2

BATCH = 1000
LEADER = NewCommitData(new_commit_index=0, role=common_pb2.NODE_ROLE_LEADER, current_term=1)


def make_entries(first: int, count: int, value_size: int = 16) -> list[common_pb2.Entry]:
    value = b"v" * value_size
    return [
        _kv.command_entry(i, 1, _kv.insert(b"key%d" % i, value))
        for i in range(first, first + count)
    ]


def batches(entries: list[common_pb2.Entry], size: int) -> list[list[common_pb2.Entry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


def new_handler(root: Path, **kwargs: object) -> StateMachineHandler:
    cfg = SnapshotConfig(snapshots_dir=root / f"s{time.monotonic_ns()}", fsync=False)
    return StateMachineHandler(MemoryStateMachine(), cfg, **kwargs)  # type: ignore[arg-type]


# -- 1. throughput -----------------------------------------------------------------
def direct_rate(root: Path, chunks: list[list[common_pb2.Entry]], total: int) -> float:
    handler = new_handler(root)
    t0 = time.perf_counter()
    for chunk in chunks:
        handler.apply_chunk(chunk)
    elapsed = time.perf_counter() - t0
    handler.close()
    return total / elapsed


def worker_rate(root: Path, chunks: list[list[common_pb2.Entry]], total: int) -> float:
    handler = new_handler(root)
    done = threading.Event()

    def on_event(event: WorkerEvent) -> None:
        if isinstance(event, ApplyCompleted) and event.last_index == total:
            done.set()

    worker = ApplyWorker(handler, on_event)
    worker.start()

    def submitter() -> None:
        for chunk in chunks:
            worker.submit(chunk)

    t0 = time.perf_counter()
    t = threading.Thread(target=submitter)
    t.start()
    done.wait()
    elapsed = time.perf_counter() - t0
    t.join()
    worker.shutdown()
    handler.close()
    return total / elapsed


def throughput(root: Path, total: int, repeat: int) -> dict[str, object]:
    chunks = batches(make_entries(1, total), BATCH)
    direct_rate(root, chunks, total)  # warm up
    worker_rate(root, chunks, total)
    direct, worker = [], []
    for _ in range(repeat):  # interleaved so drift hits both alike
        direct.append(direct_rate(root, chunks, total))
        worker.append(worker_rate(root, chunks, total))
    return {
        "direct_entries_per_s": summary(direct),
        "worker_entries_per_s": summary(worker),
        "ratio_worker_vs_direct": statistics.median(worker) / statistics.median(direct),
    }


# -- 2. stall during a policy snapshot -------------------------------------------------
def snapshot_stall(root: Path, keys: int, tail_batches: int) -> dict[str, object]:
    policy = LogSizePolicy(threshold=keys, cooldown=3600.0)  # triggers exactly once
    handler = new_handler(root, snapshot_policy=policy)
    value = b"x" * 100
    for first in range(1, keys + 1, 10_000):
        count = min(10_000, keys + 1 - first)
        handler.apply_chunk(
            [
                _kv.command_entry(i, 1, _kv.insert(b"key%08d" % i, value))
                for i in range(first, first + count)
            ]
        )
    completed_at: list[float] = []
    created_at: list[float] = []
    created = threading.Event()

    def on_event(event: WorkerEvent) -> None:
        now = time.perf_counter()
        if isinstance(event, ApplyCompleted):
            completed_at.append(now)
        elif isinstance(event, SnapshotCreated):
            created_at.append(now)
            created.set()

    worker = ApplyWorker(handler, on_event, max_queued_entries=1000)
    worker.start()
    t0 = time.perf_counter()
    # Keep applying (with commits) while the snapshot runs. Entries are built
    # per batch, as a Raft loop reads them from its log: millions of prebuilt
    # messages would make the cyclic GC, not the worker, the longest pause.
    firsts = range(keys + 1, keys + 1 + tail_batches * 100, 100)
    for sent, first in enumerate(firsts, 1):
        worker.submit(make_entries(first, 100, value_size=100), LEADER)
        if created.is_set() and sent > 50:
            break
    worker.shutdown()
    t_end = time.perf_counter()
    handler.close()
    pairs = list(itertools.pairwise(completed_at))
    gaps = [b - a for a, b in pairs]
    window = [b - a for a, b in pairs if created_at and a <= created_at[0]]
    return {
        "keys": keys,
        "snapshot_seconds": (created_at[0] - t0) if created_at else None,
        "apply_events": len(completed_at),
        "max_gap_ms_during_snapshot": max(window) * 1000 if window else None,
        "max_gap_ms_overall": max(gaps) * 1000 if gaps else None,
        "median_gap_ms": statistics.median(gaps) * 1000 if gaps else None,
        "snapshot_created": bool(created_at),
        "run_seconds": t_end - t0,
    }


# -- 3. async waiters ------------------------------------------------------------------
def async_waiters(root: Path, count: int) -> dict[str, object]:
    handler = new_handler(root)
    entries = make_entries(1, 100)

    async def main() -> dict[str, object]:
        ah = AsyncStateMachineHandler(handler)
        before = threading.active_count()
        tasks = [asyncio.create_task(ah.wait_applied(1 + i % 100, 30.0)) for i in range(count)]
        await asyncio.sleep(0)
        during = threading.active_count()
        applier = threading.Thread(target=handler.apply_chunk, args=(entries,))
        t0 = time.perf_counter()
        applier.start()
        await asyncio.gather(*tasks)
        wake_all = time.perf_counter() - t0
        applier.join()
        return {
            "waiters": count,
            "wake_all_ms": wake_all * 1000,
            "threads_before": before,
            "threads_while_waiting": during,
            "threads_after": threading.active_count(),
            "leftover_waiters": ah.pending_waiters(),
        }

    out = asyncio.run(main())
    handler.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--tail-batches", type=int, default=20_000)
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results: dict[str, dict[str, Any]] = {
            "throughput": throughput(root, args.entries, args.repeat),
            "snapshot_stall": snapshot_stall(root, args.keys, args.tail_batches),
            "async_waiters": async_waiters(root, args.waiters),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    tp: dict[str, Any] = results["throughput"]
    for name in ("direct_entries_per_s", "worker_entries_per_s"):
        s = tp[name]
        print(
            f"{name:<22} median {s['median']:>12,.0f}  min {s['min']:>12,.0f}  "
            f"max {s['max']:>12,.0f}  entries/s"
        )
    print(f"ratio worker/direct: {tp['ratio_worker_vs_direct']:.2f} (target >= 0.9)")
    for section in ("snapshot_stall", "async_waiters"):
        print(f"{section}:")
        for key, value in results[section].items():
            text = f"{value:,.1f}" if isinstance(value, float) else str(value)
            print(f"  {key:<28} {text}")


if __name__ == "__main__":
    main()
