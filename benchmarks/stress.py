"""Stress: is anything lost, double-applied or mis-installed under concurrent load?

For ``--seconds`` a leader handler (SqliteStateMachine by default) takes
writes from several writer threads through one ApplyWorker, while

* each writer submits batches on its own keys (Insert, Delete, CAS that must
  succeed and CAS that must fail), waits for its last index
  (``wait_applied``) and reads its keys back: read-your-writes;
* reader threads wait for the current commit index and read random keys:
  every value must be one the key held at some index in [commit, submitted]
  (linearizable: never older than the index waited for);
* a LogSizePolicy with a small threshold makes the worker snapshot often;
* two followers (each its own directory) keep installing the leader's newest
  snapshot concurrently; a stale refusal or a snapshot pruned before it was
  opened is fine, an install must equal the leader's state at its index
  exactly (a model of every key's history gives it);
* a cleanup loop prunes the leader's snapshots with a random retain count.

At the end: the worker drains, the leader's state equals the model, every
archive verifies, the newest installs into a fresh node exactly, and no
``temp-`` file is left anywhere. Prints ops/s, p99 latencies (apply, wait,
read, transfer) and the invariant violations, which must be 0.

    python benchmarks/stress.py [--seconds 10] [--writers 4] [--readers 2]
                                [--state-machine sqlite|memory] [--dir DIR] [--json]

Exit status 1 when any violation was seen.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import percentile

from d_engine_sm import (
    LogSizePolicy,
    MemoryStateMachine,
    SnapshotConfig,
    SqliteStateMachine,
    StateMachine,
    StateMachineHandler,
    _kv,
)
from d_engine_sm._snapshot import archive
from d_engine_sm._values import NewCommitData
from d_engine_sm._worker import ApplyWorker, FatalError, SnapshotCreated, SnapshotFailed
from d_engine_sm.errors import SnapshotInProgress, SnapshotNotFound, StaleSnapshotError
from d_engine_sm.proto import common_pb2

TERM = 1
KEYS_PER_WRITER = 2000
WAIT = 30.0  # seconds: any wait this long is a violation, not a slow run


class Model:
    """Every key's history: ``key -> ([index...], [value or None...])``, index ascending."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.history: dict[bytes, tuple[list[int], list[bytes | None]]] = {}

    def record(self, index: int, key: bytes, value: bytes | None) -> None:
        """Called in index order (under the writers' log lock)."""
        with self.lock:
            indices, values = self.history.setdefault(key, ([], []))
            indices.append(index)
            values.append(value)

    def value_at(self, key: bytes, index: int) -> bytes | None:
        with self.lock:
            indices, values = self.history.get(key, ([], []))
            pos = bisect.bisect_right(indices, index) - 1
            return values[pos] if pos >= 0 else None

    def allowed(self, key: bytes, low: int, high: int) -> list[bytes | None]:
        """Values ``key`` held at some index in ``[low, high]``."""
        with self.lock:
            indices, values = self.history.get(key, ([], []))
            pos = bisect.bisect_right(indices, low) - 1
            end = bisect.bisect_right(indices, high)
            # Never written by ``low``: absent then.
            return [None, *values[:end]] if pos < 0 else values[pos:end]

    def around(self, key: bytes, index: int) -> list[tuple[int, bytes | None]]:
        """The writes of ``key`` just before and after ``index`` (for reports)."""
        with self.lock:
            indices, values = self.history.get(key, ([], []))
            pos = bisect.bisect_right(indices, index)
            return list(zip(indices, values, strict=True))[max(0, pos - 2) : pos + 2]

    def state_at(self, index: int) -> dict[bytes, bytes]:
        with self.lock:
            keys = list(self.history)
        out = {}
        for key in keys:
            value = self.value_at(key, index)
            if value is not None:
                out[key] = value
        return out


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.latencies: dict[str, list[float]] = {"wait": [], "read": [], "transfer": []}
        self.violations: list[str] = []

    def incr(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            self.latencies[name].append(seconds)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)


def make_sm(kind: str, path: Path) -> StateMachine:
    if kind == "memory":
        return MemoryStateMachine()
    return SqliteStateMachine(path, durability="off")


def items(sm: StateMachine) -> dict[bytes, bytes]:
    assert isinstance(sm, (MemoryStateMachine, SqliteStateMachine))
    return sm.items()


def close_sm(sm: StateMachine) -> None:
    if isinstance(sm, SqliteStateMachine):
        sm.close()


class Stress:
    def __init__(self, root: Path, kind: str, writers: int, readers: int, seed: int) -> None:
        self.root = root
        self.kind = kind
        self.n_writers = writers
        self.n_readers = readers
        self.seed = seed
        self.model = Model()
        self.stats = Stats()
        self.stop = threading.Event()
        self.log_lock = threading.Lock()  # index assignment + submit, in log order
        self.next_index = 1
        self.snapshot_cond = threading.Condition()
        self.snapshots = 0
        self.leader_sm = make_sm(kind, root / "leader.db")
        policy = LogSizePolicy(threshold=3000, cooldown=0.2)
        self.leader = StateMachineHandler(
            self.leader_sm, self.config("leader"), node_id=1, snapshot_policy=policy
        )
        self.worker = ApplyWorker(self.leader, self.on_event, max_batch_entries=2000)
        self.followers = [
            StateMachineHandler(
                make_sm(kind, root / f"follower{i}.db"), self.config(f"follower{i}"), node_id=i + 2
            )
            for i in range(2)
        ]

    def config(self, name: str) -> SnapshotConfig:
        return SnapshotConfig(
            snapshots_dir=self.root / name,
            chunk_size=64 * 1024,
            fsync=False,
            cleanup_retain_count=3,
        )

    # -- worker events --------------------------------------------------------------
    def on_event(self, event: object) -> None:
        if isinstance(event, FatalError):
            self.stats.violation(f"worker fatal error: {event.error!r}")
        elif isinstance(event, SnapshotFailed):
            if not isinstance(event.error, SnapshotInProgress):
                self.stats.violation(f"policy snapshot failed: {event.error!r}")
        elif isinstance(event, SnapshotCreated):
            self.stats.incr("snapshots")
            with self.snapshot_cond:
                self.snapshots += 1
                self.snapshot_cond.notify_all()

    # -- writers ----------------------------------------------------------------------
    def writer(self, wid: int) -> None:
        rng = random.Random(self.seed * 1000 + wid)
        keys = [b"w%d-%d" % (wid, k) for k in range(KEYS_PER_WRITER)]
        mine: dict[bytes, bytes] = {}  # what this writer's keys hold once applied
        seq = 0
        while not self.stop.is_set():
            # (key, command, the key's value once this entry is applied)
            batch: list[tuple[bytes, bytes, bytes | None]] = []
            touched: dict[bytes, bytes | None] = {}
            for _ in range(rng.randint(1, 32)):
                key = rng.choice(keys)
                current = touched[key] if key in touched else mine.get(key)
                seq += 1
                value = b"%d:%d" % (wid, seq) + b"x" * rng.randint(0, 64)
                op = rng.random()
                if op < 0.6:
                    cmd, new = _kv.insert(key, value), value
                elif op < 0.75:
                    cmd, new = _kv.delete(key), None
                elif op < 0.9:  # CAS that must succeed
                    cmd, new = _kv.compare_and_swap(key, current, value), value
                else:  # CAS that must fail: the expected value never was
                    cmd, new = _kv.compare_and_swap(key, b"never", value), current
                batch.append((key, cmd, new))
                touched[key] = new
            with self.log_lock:
                first = self.next_index
                entries = [
                    _kv.command_entry(first + i, TERM, cmd) for i, (_, cmd, _) in enumerate(batch)
                ]
                last = first + len(entries) - 1
                self.next_index = last + 1
                for i, (key, _, new) in enumerate(batch):
                    self.model.record(first + i, key, new)
                commit = NewCommitData(
                    new_commit_index=last, role=common_pb2.NODE_ROLE_LEADER, current_term=TERM
                )
                started = time.perf_counter()
                self.worker.submit(entries, commit)
            try:
                self.leader.wait_applied(last, WAIT)
            except Exception as exc:
                self.stats.violation(f"writer {wid}: wait_applied({last}) failed: {exc!r}")
                return
            self.stats.observe("wait", time.perf_counter() - started)
            self.stats.incr("writes", len(entries))
            for key, new in touched.items():
                if new is None:
                    mine.pop(key, None)
                else:
                    mine[key] = new
            t0 = time.perf_counter()
            got = self.leader.read_from_state_machine(list(touched))
            self.stats.observe("read", time.perf_counter() - t0)
            self.stats.incr("reads")
            found = {r.key: r.value for r in got or []}
            want = {k: v for k, v in touched.items() if v is not None}
            if found != want:
                self.stats.violation(
                    f"writer {wid}: read-your-writes at {last}: got {found!r} want {want!r}"
                )

    # -- readers ----------------------------------------------------------------------
    def reader(self, rid: int) -> None:
        rng = random.Random(self.seed * 2000 + rid)
        while not self.stop.is_set():
            with self.log_lock:
                commit = self.next_index - 1  # everything submitted so far
            started = time.perf_counter()
            try:
                self.leader.wait_applied(commit, WAIT)
            except Exception as exc:
                self.stats.violation(f"reader {rid}: wait_applied({commit}) failed: {exc!r}")
                return
            self.stats.observe("wait", time.perf_counter() - started)
            keys = [
                b"w%d-%d" % (rng.randrange(self.n_writers), rng.randrange(KEYS_PER_WRITER))
                for _ in range(8)
            ]
            t0 = time.perf_counter()
            got = self.leader.read_from_state_machine(keys)
            self.stats.observe("read", time.perf_counter() - t0)
            # The upper bound is what was submitted, not last_applied(): a batch's
            # data is visible from the state machine's commit, just before the
            # handler publishes its index. Reads older than ``commit`` are the bug.
            with self.log_lock:
                high = self.next_index - 1
            self.stats.incr("reads")
            found = {r.key: r.value for r in got or []}
            for key in keys:
                allowed = self.model.allowed(key, commit, high)
                if found.get(key) not in allowed:
                    again = self.leader.read_from_state_machine([key])
                    self.stats.violation(
                        f"reader {rid}: {key!r}={found.get(key)!r} not held in "
                        f"[{commit}, {high}]: held {allowed!r} (history "
                        f"{self.model.around(key, commit)}), re-read {again!r}"
                    )

    # -- followers ----------------------------------------------------------------------
    def transfers(self, fid: int) -> None:
        follower = self.followers[fid]
        seen = 0
        while not self.stop.is_set():
            with self.snapshot_cond:
                self.snapshot_cond.wait_for(self._news(seen), timeout=1.0)
                seen = self.snapshots
            meta = self.leader.get_latest_snapshot_metadata()
            if meta is None or self.stop.is_set():
                continue
            index = meta.last_included.index
            started = time.perf_counter()
            try:
                stream = self.leader.load_snapshot_data(meta)
                follower.apply_snapshot_stream_from_leader(TERM, stream, lambda _ack: None)
            except StaleSnapshotError:
                self.stats.incr("transfers_stale")
                continue
            except SnapshotNotFound:  # pruned between listing and opening: fine
                self.stats.incr("transfers_pruned")
                continue
            except Exception as exc:
                self.stats.violation(f"follower {fid}: transfer of {index} failed: {exc!r}")
                continue
            self.stats.observe("transfer", time.perf_counter() - started)
            self.stats.incr("installs")
            self.check_installed(f"follower {fid}", follower, index)

    def _news(self, seen: int) -> Callable[[], bool]:
        return lambda: self.snapshots > seen or self.stop.is_set()

    def check_installed(self, who: str, handler: StateMachineHandler, index: int) -> None:
        if handler.last_applied() != index:
            self.stats.violation(f"{who}: last_applied {handler.last_applied()} != {index}")
        got, want = items(handler.state_machine), self.model.state_at(index)
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))[:4]
            self.stats.violation(f"{who}: state at {index} differs from the model: {diff!r}")

    def cleaner(self) -> None:
        rng = random.Random(self.seed * 3000)
        while not self.stop.wait(0.05):  # pacing, not synchronisation
            try:
                self.leader.cleanup_snapshot(rng.randint(1, 3))
                self.stats.incr("cleanups")
            except SnapshotInProgress:
                self.stats.incr("cleanups_busy")
            except Exception as exc:
                self.stats.violation(f"cleanup failed: {exc!r}")

    # -- run ------------------------------------------------------------------------------
    def run(self, seconds: float) -> dict[str, Any]:
        self.worker.start()
        threads = [
            *(threading.Thread(target=self.writer, args=(i,)) for i in range(self.n_writers)),
            *(threading.Thread(target=self.reader, args=(i,)) for i in range(self.n_readers)),
            *(threading.Thread(target=self.transfers, args=(i,)) for i in range(2)),
            threading.Thread(target=self.cleaner),
        ]
        for t in threads:
            t.daemon = True
            t.start()
        started = time.perf_counter()
        self.stop.wait(seconds)
        self.stop.set()
        with self.snapshot_cond:
            self.snapshot_cond.notify_all()
        for t in threads:
            t.join(WAIT)
            if t.is_alive():
                self.stats.violation(f"thread {t.name} did not stop within {WAIT}s")
        elapsed = time.perf_counter() - started
        if not self.worker.shutdown(drain=True, timeout=WAIT):
            self.stats.violation("worker did not drain in time")
        self.final_checks()
        return self.report(elapsed)

    def final_checks(self) -> None:
        last = self.next_index - 1
        if self.leader.last_applied() != last:
            self.stats.violation(f"leader last_applied {self.leader.last_applied()} != {last}")
        self.check_installed("leader", self.leader, last)
        for path in sorted((self.root / "leader").glob("*.tar.gz")):
            try:
                archive.verify(path)
            except Exception as exc:
                self.stats.violation(f"archive {path.name} does not verify: {exc!r}")
        meta = self.leader.get_latest_snapshot_metadata()
        if meta is not None:
            fresh = StateMachineHandler(
                make_sm(self.kind, self.root / "fresh.db"), self.config("fresh"), node_id=9
            )
            try:
                fresh.apply_snapshot_stream_from_leader(
                    TERM, self.leader.load_snapshot_data(meta), lambda _ack: None
                )
                self.check_installed("fresh node", fresh, meta.last_included.index)
            except Exception as exc:
                self.stats.violation(f"newest archive does not install: {exc!r}")
            finally:
                fresh.close()
                close_sm(fresh.state_machine)
        leftovers = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("temp-*"))
        if leftovers:
            self.stats.violation(f"temp leftovers: {leftovers}")

    def report(self, elapsed: float) -> dict[str, Any]:
        c = self.stats.counts
        lat = {
            name: {"p50_ms": percentile(v, 0.5) * 1e3, "p99_ms": percentile(v, 0.99) * 1e3}
            for name, v in self.stats.latencies.items()
            if v
        }
        apply = self.leader.metrics().get("apply_seconds")
        if isinstance(apply, dict) and apply.get("count"):
            lat["apply"] = {"p50_ms": apply["p50"] * 1e3, "p99_ms": apply["p99"] * 1e3}
        return {
            "seconds": round(elapsed, 2),
            "state_machine": self.kind,
            "writers": self.n_writers,
            "readers": self.n_readers,
            "writes_per_s": c.get("writes", 0) / elapsed,
            "reads_per_s": c.get("reads", 0) / elapsed,
            "counts": dict(sorted(c.items())),
            "latency": lat,
            "violations": len(self.stats.violations),
            "violation_details": self.stats.violations[:20],
        }

    def close(self) -> None:
        self.worker.shutdown(drain=False, timeout=WAIT)
        for h in (self.leader, *self.followers):
            h.close()
            close_sm(h.state_machine)


@contextlib.contextmanager
def workdir(given: str | None) -> Iterator[Path]:
    if given is not None:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="d-engine-sm-stress-") as tmp:
        yield Path(tmp)


def print_text(r: dict[str, Any], out: Callable[[str], None] = print) -> None:
    c = r["counts"]
    out(
        f"stress: {r['seconds']:.1f} s, {r['state_machine']} leader, "
        f"{r['writers']} writers, {r['readers']} readers, 2 followers"
    )
    out(f"  writes        {r['writes_per_s']:>12,.0f} entries/s  ({c.get('writes', 0):,} total)")
    out(f"  reads         {r['reads_per_s']:>12,.0f} reads/s    ({c.get('reads', 0):,} total)")
    out(
        f"  snapshots     {c.get('snapshots', 0):>12,} created; cleanups "
        f"{c.get('cleanups', 0):,} (+{c.get('cleanups_busy', 0):,} busy)"
    )
    out(
        f"  transfers     {c.get('installs', 0):>12,} installed, "
        f"{c.get('transfers_stale', 0):,} refused as stale, "
        f"{c.get('transfers_pruned', 0):,} pruned before opening"
    )
    for name in ("apply", "wait", "read", "transfer"):
        if name in r["latency"]:
            s = r["latency"][name]
            out(f"  {name:<9} p50 {s['p50_ms']:>9.2f} ms   p99 {s['p99_ms']:>9.2f} ms")
    out(f"  invariant violations: {r['violations']}")
    for text in r["violation_details"]:
        out(f"    - {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--state-machine", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.writers < 1 or args.readers < 0:
        parser.error("--seconds must be > 0, --writers >= 1, --readers >= 0")
    with workdir(args.dir) as root:
        stress = Stress(root, args.state_machine, args.writers, args.readers, args.seed)
        try:
            result = stress.run(args.seconds)
        finally:
            stress.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_text(result)
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
