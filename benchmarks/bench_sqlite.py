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

With ``--install``, a second question: how long does a follower on
SqliteStateMachine take to receive and install a snapshot of ``--snapshot-keys`` keys
(``--value-size`` bytes each; end to end: stream, verify, unpack, validate,
swap) next to ``tar xzf`` of the same archive in the same run (target: at
least 1.5x faster), and how much does its peak RSS grow meanwhile? Each
install runs in a fresh subprocess (peak RSS reset before the install) whose
follower already holds 10,000 keys; durability "off" (no fsync, like tar)
and "normal" (the received file and directory fsynced)::

    python benchmarks/bench_sqlite.py --install --snapshot-keys 200000 --value-size 100 --repeat 5

``--stage-keys N`` adds the state machine's own part at scale: validating,
preparing and fsyncing a received file of N keys (the step that reads the
whole file), its time and peak RSS growth, in a fresh subprocess::

    python benchmarks/bench_sqlite.py --install --stage-keys 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._sqlite import _SYNC, SqliteStateMachine
from d_engine_sm._sqlite_schema import _SCHEMA
from d_engine_sm.proto import common_pb2, storage_pb2

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


# -- install ------------------------------------------------------------------------
MiB = 1 << 20
FOLLOWER_KEYS = 10_000


def _config(directory: Path) -> SnapshotConfig:
    # Archive fsync off: tar does not fsync; the state machine's durability decides the rest.
    return SnapshotConfig(snapshots_dir=directory, chunk_size=MiB, fsync=False)


def _fill(h: StateMachineHandler, keys: int, value_size: int) -> None:
    for first in range(1, keys + 1, 20_000):
        last = min(first + 20_000, keys + 1)
        h.apply_chunk(
            [
                _kv.command_entry(
                    i, 1, _kv.insert(b"key-%010d" % i, os.urandom(value_size // 2).hex().encode())
                )
                for i in range(first, last)
            ]
        )


class _TimedSqlite(SqliteStateMachine):
    """Times the state machine's part of an install: prepare (validate, stage) and swap."""

    load_seconds = 0.0

    def prepare_install(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        t0 = time.perf_counter()
        super().prepare_install(meta, dir)
        self.load_seconds += time.perf_counter() - t0

    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        t0 = time.perf_counter()
        super().apply_snapshot_from_file(meta, dir)
        self.load_seconds += time.perf_counter() - t0


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def install_child(work: str, run: str, durability: str) -> None:
    """One install into a fresh follower; prints seconds and peak RSS as JSON."""
    root = Path(work)
    leader_sm = SqliteStateMachine(root / "leader.db", durability="off")
    leader = StateMachineHandler(leader_sm, _config(root / "leader"), node_id=1)
    sm = _TimedSqlite(root / run / "follower.db", durability=durability)
    follower = StateMachineHandler(sm, _config(root / run / "snaps"), node_id=2)
    _fill(follower, FOLLOWER_KEYS, 100)
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _vm("VmHWM")
    t0 = time.perf_counter()
    follower.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), lambda a: None)
    elapsed = time.perf_counter() - t0
    peak = _vm("VmHWM")
    assert follower.last_applied() == meta.last_included.index
    assert sm.get(b"key-%010d" % meta.last_included.index) is not None
    doc = {"seconds": elapsed, "sm_seconds": sm.load_seconds, "rss_growth": peak - base}
    print(json.dumps(doc))


def stage_child(keys: str) -> None:
    """Validate and prepare a received file of ``keys`` keys; prints seconds and RSS growth."""
    from d_engine_sm._fs import FileOps
    from d_engine_sm._sqlite_schema import stage

    work = Path(tempfile.mkdtemp(prefix="bench-sqlite-stage-"))
    try:
        path = work / "state.sqlite3"
        db = sqlite3.connect(path, isolation_level=None)
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO kv(key, value) VALUES (?, ?)",
            ((b"key-%010d" % i, os.urandom(50).hex().encode()) for i in range(int(keys))),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode = DELETE")
        db.close()
        meta = storage_pb2.SnapshotMetadata()
        meta.last_included.index, meta.last_included.term = int(keys), 1
        Path("/proc/self/clear_refs").write_text("5")
        base = _vm("VmHWM")
        t0 = time.perf_counter()
        stage(path, meta, timeout=3600, fs=FileOps(), sync=True)
        elapsed = time.perf_counter() - t0
        doc = {"bytes": path.stat().st_size, "seconds": elapsed, "rss_growth": _vm("VmHWM") - base}
        print(json.dumps(doc))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_stage(keys: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--stage-child", str(keys)],
        check=True,
        capture_output=True,
        text=True,
    )
    got = json.loads(out.stdout)
    return {
        "keys": keys,
        "file_mib": got["bytes"] / MiB,
        "seconds": got["seconds"],
        "rss_growth_mib": got["rss_growth"] / MiB,
    }


def bench_install(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-sqlite-install-", dir=args.dir))
    try:
        with (
            SqliteStateMachine(work / "leader.db", durability="off") as leader_sm,
            StateMachineHandler(leader_sm, _config(work / "leader")) as leader,
        ):
            _fill(leader, args.snapshot_keys, args.value_size)
            _, archive = leader.create_snapshot()
        results: dict[str, object] = {"archive_bytes": archive.stat().st_size}
        tar: list[float] = []
        runs: dict[str, list[dict[str, float]]] = {d: [] for d in ("off", "normal")}
        for n in range(args.repeat + 1):  # interleaved; the first round warms up
            for durability, done in runs.items():
                run = f"run-{durability}-{n}"
                out = subprocess.run(
                    [sys.executable, __file__, "--install-child", str(work), run, durability],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                if n:
                    done.append(json.loads(out.stdout))
                shutil.rmtree(work / run)
            dest = work / "untar"
            dest.mkdir()
            t0 = time.perf_counter()
            subprocess.run(["tar", "xzf", str(archive), "-C", str(dest)], check=True)
            if n:
                tar.append(time.perf_counter() - t0)
            shutil.rmtree(dest)
        tar_median = statistics.median(tar)
        results["tar_xzf_seconds"] = _spread(tar)
        for durability, done in runs.items():
            seconds = [d["seconds"] for d in done]
            results[durability] = {
                "install_seconds": _spread(seconds),
                "sm_install_seconds": _spread([d["sm_seconds"] for d in done]),
                "rss_growth_mib_max": max(d["rss_growth"] for d in done) / MiB,
                "ratio_vs_tar_xzf": tar_median / statistics.median(seconds),
            }
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def install_main(args: argparse.Namespace) -> int:
    results = bench_install(args)
    if args.stage_keys:
        results["stage"] = bench_stage(args.stage_keys)
    if args.json:
        doc = {"keys": args.snapshot_keys, "value_size": args.value_size, "repeat": args.repeat}
        print(json.dumps(doc | results, indent=2))
        return 0
    print(
        f"install keys={args.snapshot_keys} value_size={args.value_size} repeat={args.repeat} "
        f"archive={int(str(results['archive_bytes'])) / MiB:.1f} MiB "
        f"sqlite={sqlite3.sqlite_version}"
    )
    tar = results["tar_xzf_seconds"]
    assert isinstance(tar, dict)
    print(
        f"{'tar xzf':<28} median {tar['median']:.3f} s  min {tar['min']:.3f}  max {tar['max']:.3f}"
    )
    for durability in ("off", "normal"):
        res = results[durability]
        assert isinstance(res, dict)
        s, sm = res["install_seconds"], res["sm_install_seconds"]
        print(
            f"{'install, durability ' + durability:<28} median {s['median']:.3f} s  "
            f"min {s['min']:.3f}  max {s['max']:.3f}  (state machine part {sm['median']:.3f} s)  "
            f"ratio vs tar {res['ratio_vs_tar_xzf']:.2f}x  "
            f"peak RSS growth {res['rss_growth_mib_max']:.1f} MiB"
        )
    staged = results.get("stage")
    if isinstance(staged, dict):
        print(
            f"{'validate + prepare + fsync':<28} {staged['keys']:,} keys "
            f"({staged['file_mib']:.0f} MiB file): {staged['seconds']:.2f} s, "
            f"peak RSS growth {staged['rss_growth_mib']:.1f} MiB"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--install-child"]:
        install_child(*argv[1:4])
        return 0
    if argv[:1] == ["--stage-child"]:
        stage_child(argv[1])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--value-size", type=int, default=None, help="default 64; 100 with --install"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keys", choices=["sequential", "random"], default="sequential")
    parser.add_argument(
        "--durability", action="append", choices=sorted(_SYNC), help="default: full and normal"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to put the databases")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--install", action="store_true", help="measure snapshot install")
    parser.add_argument("--snapshot-keys", type=int, default=200_000, help="with --install")
    parser.add_argument("--stage-keys", type=int, default=0, help="with --install (0: skip)")
    args = parser.parse_args(argv)
    if args.install:
        args.value_size = args.value_size or 100
        return install_main(args)
    args.value_size = args.value_size or 64
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
