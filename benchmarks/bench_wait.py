"""How long from apply_chunk returning to a wait_applied waiter waking?

Compared, in the same run, with a bare threading.Condition round trip
(notify_all -> waiter wakes) measured the same way. Target: p50 <= 2 x bare.

    python benchmarks/bench_wait.py [--rounds 2000] [--json]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from _common import percentile, report

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler, _kv


def bare_round_trips(rounds: int) -> list[float]:
    cond = threading.Condition()
    state: dict[str, float] = {"value": 0, "woke_at": 0.0}
    ready = threading.Event()
    out: list[float] = []

    def reached(target: float) -> bool:
        return state["value"] >= target

    def waiter() -> None:
        for target in range(1, rounds + 1):
            with cond:
                ready.set()
                cond.wait_for(partial(reached, float(target)))
                state["woke_at"] = time.perf_counter()
            done.set()

    done = threading.Event()
    t = threading.Thread(target=waiter)
    t.start()
    for target in range(1, rounds + 1):
        ready.wait()
        ready.clear()
        time.sleep(0)  # let the waiter park
        done.clear()
        t0 = time.perf_counter()
        with cond:
            state["value"] = target
            cond.notify_all()
        done.wait()
        out.append(state["woke_at"] - t0)
    t.join()
    return out


def handler_round_trips(rounds: int, snapdir: str) -> list[float]:
    handler = StateMachineHandler(MemoryStateMachine(), SnapshotConfig(snapshots_dir=Path(snapdir)))
    entries = [_kv.command_entry(i, 1, _kv.insert(b"k", b"v")) for i in range(1, rounds + 1)]
    ready = threading.Event()
    done = threading.Event()
    woke = {"at": 0.0}
    out: list[float] = []

    def waiter() -> None:
        for target in range(1, rounds + 1):
            ready.set()
            handler.wait_applied(target, 10)
            woke["at"] = time.perf_counter()
            done.set()

    t = threading.Thread(target=waiter)
    t.start()
    for entry in entries:
        ready.wait()
        ready.clear()
        time.sleep(0)
        done.clear()
        t0 = time.perf_counter()
        handler.apply_chunk([entry])
        done.wait()
        out.append(woke["at"] - t0)
    t.join()
    handler.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as snapdir:
        bare = bare_round_trips(ns.rounds)
        handled = handler_round_trips(ns.rounds, snapdir)
    rows = {
        name: {
            "median": percentile(v, 0.5) * 1e6,
            "min": min(v) * 1e6,
            "max": percentile(v, 0.99) * 1e6,
        }
        for name, v in (("bare Condition", bare), ("wait_applied", handled))
    }
    ratio = percentile(handled, 0.5) / percentile(bare, 0.5)
    report(
        rows,
        {"wait_applied p50 / bare p50 (target <= 2.0)": ratio},
        ns.json,
        "us (max column = p99)",
    )


if __name__ == "__main__":
    main()
