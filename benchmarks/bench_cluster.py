"""How does a 3-node PySyncObj cluster do with d_engine_sm as its state
machine, against plain PySyncObj (a dict with its pickle dump), same work,
same run, same machine?

Each case starts a fresh 3-process cluster on 127.0.0.1 for each flavour:

1. ``throughput``: writes/s of KEYS keys (VALUE_SIZE-byte random values,
   concurrent writers), compaction only at the end. Target ratio >= 0.8.
2. ``throughput-compacting``: the same with PySyncObj's
   ``logCompactionMinEntries=5000``. Target: ahead of plain (ratio > 1).
3. ``snapshot``: time to create the leader's snapshot (our archive vs
   PySyncObj's dump) after KEYS writes. Target at 500k keys: >= 5x faster.
4. ``catch-up``: a follower is killed and wiped, the leader compacts, the
   follower restarts; time until it has applied the leader's commit index,
   PySyncObj's default timeouts. ``--catch-up-timeout`` bounds a run that
   never finishes (then "did not finish"). Target: completes at 500k keys and
   for a >= 200 MB archive (plain does not), faster than plain at 200k.

Also printed: CPU seconds of the 3 node processes during the writes (plain's
forked dump processes included), archives created per node, terms
(elections) per run, longest tick gap and longest own
work on PySyncObj's tick thread (d_engine_sm only).

    python benchmarks/bench_cluster.py [--keys 200000] [--value-size 100]
        [--cases throughput,throughput-compacting,snapshot,catch-up]
        [--catch-up-timeout 120] [--json]
    # a >= 200 MB archive: --keys 110000 --value-size 2000 --cases catch-up
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from d_engine_sm.integrations._cluster import Cluster

CASES = ("throughput", "throughput-compacting", "snapshot", "catch-up")
WRITERS = 4
WINDOW = 500


def load(c: Cluster, keys: int, value_size: int, prefix: str) -> float:
    """``keys`` writes from WRITERS clients spread over the nodes; writes/s."""
    per = keys // WRITERS
    started = time.perf_counter()
    futs = [
        c.nodes[i % len(c.nodes)].request(
            "load",
            count=per,
            prefix=f"{prefix}{i}-",
            value_size=value_size,
            window=WINDOW,
            timeout=3600,
        )
        for i in range(WRITERS)
    ]
    errors = 0
    for fut in futs:
        out = fut.result(3700)
        if not out["ok"]:
            raise RuntimeError(out["error"])
        errors += out["errors"]
    return (per * WRITERS - errors) / (time.perf_counter() - started)


def run_case(case: str, mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    compact = 5000 if case == "throughput-compacting" else 100 * args.keys + 1_000_000
    out: dict[str, Any] = {"case": case, "mode": mode}
    with Cluster(root, 3, mode=mode, options={"logCompactionMinEntries": compact}) as c:
        c.start()
        leader = c.wait_leader()
        out["writes_per_second"] = load(c, args.keys, args.value_size, "k")
        cpu = [n.call("cpu") for n in c.nodes]
        # All nodes' CPU for the writes, plain's forked dump processes included.
        out["cpu_seconds"] = sum(x["process"] + x["children"] for x in cpu)
        if case in ("snapshot", "catch-up"):
            snap = c.nodes[leader].call("compact", timeout=3600)
            out["snapshot_seconds"], out["snapshot_bytes"] = snap["seconds"], snap["bytes"]
        if case == "catch-up":
            out["catch_up_seconds"] = catch_up(c, leader, args.catch_up_timeout)
        status = [n.call("status") for n in c.nodes if n.running]
        out["term"] = max(s["term"] for s in status)
        if mode == "dsm":
            out["max_tick_gap_seconds"] = max(s["max_tick_gap_seconds"] for s in status)
            out["max_hook_seconds"] = max(s["max_hook_seconds"] for s in status)
            out["max_hook_wall_seconds"] = max(s["max_hook_wall_seconds"] for s in status)
            out["snapshots_created"] = [s["snapshots_created"] for s in status]
    return out


def catch_up(c: Cluster, leader: int, timeout: float) -> float | None:
    victim = (leader + 1) % len(c.nodes)
    c.nodes[victim].kill()
    c.wipe(victim)
    lead = c.nodes[leader]
    lead.call("load", count=100, prefix="after-", value_size=10, window=50, timeout=600)
    lead.call("compact", timeout=3600)
    target = lead.call("status")["commit_index"]
    started = time.perf_counter()
    c.nodes[victim].start()
    try:
        c.nodes[victim].call("wait", index=target, timeout=timeout)
    except (RuntimeError, TimeoutError):
        return None
    return time.perf_counter() - started


def ratio(a: float | None, b: float | None) -> str:
    if a is None:
        return "ours did not finish"
    if b is None:
        return "plain did not finish"
    return f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--catch-up-timeout", type=float, default=120.0)
    parser.add_argument("--modes", default="dsm,plain")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for case in args.cases.split(","):
            row = {}
            for mode in args.modes.split(","):
                row[mode] = run_case(case, mode, args, Path(tmp) / f"{case}-{mode}")
            results.append(row)
            if not args.json:
                print_row(case, row)
    if args.json:
        print(json.dumps(results, indent=2))


def print_row(case: str, row: dict[str, dict[str, Any]]) -> None:
    ours, plain = row.get("dsm"), row.get("plain")
    print(f"{case}:")
    for name, r in row.items():
        parts = [
            f"{r['writes_per_second']:,.0f} writes/s",
            f"CPU {r['cpu_seconds']:.1f} s (3 nodes)",
            f"term {r['term']}",
        ]
        if "snapshot_seconds" in r:
            parts.append(
                f"snapshot {r['snapshot_seconds']:.2f} s ({r['snapshot_bytes'] / 1e6:.1f} MB)"
            )
        if "catch_up_seconds" in r:
            cu = r["catch_up_seconds"]
            parts.append("catch-up did not finish" if cu is None else f"catch-up {cu:.2f} s")
        if "snapshots_created" in r:
            parts.append(f"archives {'/'.join(map(str, r['snapshots_created']))}")
        if "max_tick_gap_seconds" in r:
            parts.append(
                f"tick gap max {r['max_tick_gap_seconds'] * 1000:.0f} ms,"
                f" own tick work max {r['max_hook_seconds'] * 1000:.1f} ms CPU"
                f" ({r['max_hook_wall_seconds'] * 1000:.0f} ms wall with GIL waits)"
            )
        print(f"  {'d_engine_sm' if name == 'dsm' else 'plain':11} " + "; ".join(parts))
    if ours and plain:
        w = ratio(ours["writes_per_second"], plain["writes_per_second"])
        line = f"  ratio writes/s {w}"
        if "snapshot_seconds" in ours:
            line += (
                f"; snapshot speed-up {plain['snapshot_seconds'] / ours['snapshot_seconds']:.1f}x"
            )
        if "catch_up_seconds" in ours:
            line += f"; catch-up time {ratio(ours['catch_up_seconds'], plain['catch_up_seconds'])}"
        print(line)


if __name__ == "__main__":
    main()
