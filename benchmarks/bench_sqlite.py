"""How fast does SqliteStateMachine apply entries, next to raw sqlite3?

Question: with 1000-entry batches, how many entries/s does
``SqliteStateMachine.apply_chunk`` sustain (durability "full" and "normal"),
and what fraction is that of a raw ``sqlite3`` ``executemany`` that inserts
the same key/value rows, one transaction per batch, into the same table
schema with the same journal mode and ``synchronous`` setting? The target
is a ratio of at least 0.6.

The raw baseline is given ready-made rows; SqliteStateMachine is given
protobuf ``Entry`` objects and must decode every ``WriteCommand``, build one
result per entry and record ``last_applied`` in the same transaction.

Run::

    python benchmarks/bench_sqlite.py --entries 100000 --batch 1000
    python benchmarks/bench_sqlite.py --json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from d_engine_sm import _kv
from d_engine_sm._sqlite import _SYNC, SqliteStateMachine
from d_engine_sm._sqlite_schema import _SCHEMA
from d_engine_sm.proto import common_pb2

Rows = list[tuple[bytes, bytes]]


def make_workload(
    count: int, value_size: int, keys: str = "sequential"
) -> tuple[Rows, list[common_pb2.Entry]]:
    """Rows for the baseline and the same writes as log entries (term 1).

    ``keys="random"`` shuffles the key order (fixed seed), which makes every
    commit touch many B-tree pages: SQLite's cost grows, so the state
    machine's fixed decoding cost matters less and the ratio rises.
    """
    pad = b"x" * max(0, value_size - 16)
    order = list(range(count))
    if keys == "random":
        random.Random(1).shuffle(order)
    rows: Rows = [(b"key-%012d" % i, b"value-%010d" % i + pad) for i in order]
    entries = [
        _kv.command_entry(i + 1, 1, _kv.insert(key, value)) for i, (key, value) in enumerate(rows)
    ]
    return rows, entries


def run_sm(path: Path, durability: str, entries: list[common_pb2.Entry], batch: int) -> float:
    """Seconds to apply ``entries`` through SqliteStateMachine in ``batch`` chunks."""
    sm = SqliteStateMachine(path, durability=durability)
    try:
        start = time.perf_counter()
        for first in range(0, len(entries), batch):
            sm.apply_chunk(entries[first : first + batch])
        elapsed = time.perf_counter() - start
        if sm.last_applied().index != len(entries):
            raise RuntimeError("state machine did not apply every entry")
    finally:
        sm.close()
    return elapsed


def run_raw(path: Path, durability: str, rows: Rows, batch: int) -> float:
    """Seconds for raw executemany of ``rows``, one transaction per batch."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA synchronous = {_SYNC[durability]}")
        sql = "INSERT INTO kv(key, value) VALUES (?, ?)"
        start = time.perf_counter()
        for first in range(0, len(rows), batch):
            db.execute("BEGIN")
            db.executemany(sql, rows[first : first + batch])
            db.execute("COMMIT")
        elapsed = time.perf_counter() - start
    finally:
        db.close()
    return elapsed


def measure(workdir: Path, runner: Callable[..., float], *args: object) -> float:
    """Seconds of one ``runner(path, *args)`` on a fresh database file."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    try:
        return runner(run_dir / "db.sqlite3", *args)
    finally:
        shutil.rmtree(run_dir)


def summary(count: int, times: list[float]) -> dict[str, float]:
    rates = [count / t for t in times]
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--value-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keys", choices=["sequential", "random"], default="sequential")
    parser.add_argument(
        "--durability", action="append", choices=sorted(_SYNC), help="default: full and normal"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to put the databases")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.entries < 1 or args.batch < 1 or args.repeat < 1:
        parser.error("--entries, --batch and --repeat must be >= 1")
    durabilities = args.durability or ["full", "normal"]
    rows, entries = make_workload(args.entries, args.value_size, args.keys)
    warm_rows, warm_entries = rows[: args.batch * 2], entries[: args.batch * 2]

    workdir = Path(tempfile.mkdtemp(prefix="bench-sqlite-", dir=args.dir))
    results: dict[str, dict[str, object]] = {}
    try:
        for durability in durabilities:
            measure(workdir, run_raw, durability, warm_rows, args.batch)
            measure(workdir, run_sm, durability, warm_entries, args.batch)
            raw_times: list[float] = []
            sm_times: list[float] = []
            for _ in range(args.repeat):  # interleaved pairs: drift hits both alike
                raw_times.append(measure(workdir, run_raw, durability, rows, args.batch))
                sm_times.append(measure(workdir, run_sm, durability, entries, args.batch))
            raw = summary(args.entries, raw_times)
            sm = summary(args.entries, sm_times)
            pair_ratios = [r / s for r, s in zip(raw_times, sm_times, strict=True)]
            results[durability] = {
                "sqlite_state_machine": sm,
                "raw_executemany": raw,
                "ratio": sm["median"] / raw["median"],
                "ratio_of_pairs_median": statistics.median(pair_ratios),
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        doc = {
            "entries": args.entries,
            "batch": args.batch,
            "value_size": args.value_size,
            "keys": args.keys,
            "repeat": args.repeat,
            "sqlite_version": sqlite3.sqlite_version,
            "python": sys.version.split()[0],
            "results": results,
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"entries={args.entries} batch={args.batch} value_size={args.value_size} keys={args.keys} "
        f"repeat={args.repeat} sqlite={sqlite3.sqlite_version}"
    )
    print(f"{'durability':<10} {'what':<22} {'median/s':>12} {'min/s':>12} {'max/s':>12}")
    for durability, res in results.items():
        for what in ("sqlite_state_machine", "raw_executemany"):
            s = res[what]
            assert isinstance(s, dict)
            print(
                f"{durability:<10} {what:<22} {s['median']:>12,.0f} "
                f"{s['min']:>12,.0f} {s['max']:>12,.0f}"
            )
        print(f"{durability:<10} {'ratio of medians':<22} {res['ratio']:>12.2f}")
        print(f"{durability:<10} {'median pair ratio':<22} {res['ratio_of_pairs_median']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
