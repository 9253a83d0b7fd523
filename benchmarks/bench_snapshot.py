"""How fast is the snapshot lifecycle, against floors measured in the same run?

On a MemoryStateMachine with N keys x value-size bytes:

1. create: ``create_snapshot`` vs ``tar czf`` of the same unpacked files
   (throughput ratio, target >= 4x with ISA-L; absolute target < 1.5 s);
2. stream: ``load_snapshot_data`` (1 MiB chunks) vs an mmap-slice +
   ``zlib.crc32`` loop over the same file (target >= 0.8x);
3. install end to end (send + receive + verify + unpack + load) vs
   ``tar xzf`` of the same archive (target >= 1.5x);
4. apply stall: the longest gap between consecutive apply completions while
   a create runs (target <= 100 ms);
5. memory: RSS high-water growth (VmHWM, in a subprocess) while sending and
   receiving a ~1 GiB snapshot of incompressible bytes (target <= 64 MiB);
6. with ``--compare-tree DIR`` (another checkout of the package, e.g. the
   main branch): ``MemoryStateMachine.get`` p50 and ``apply_chunk``
   throughput of this tree vs that one, each in subprocesses taking turns
   (target: within 5%).

    python benchmarks/bench_snapshot.py [--keys 1000000] [--value-size 100]
        [--repeat 3] [--big-gib 1] [--skip-memory] [--compare-tree DIR] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import summary

from d_engine_sm import _kv
from d_engine_sm._compress import HAVE_ISAL
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import ApplyResult, LogId
from d_engine_sm.proto import common_pb2, storage_pb2

MiB = 1 << 20


def config(directory: Path, **kw: Any) -> SnapshotConfig:
    # fsync off: tar does not fsync either, and we measure CPU paths, not the disk.
    return SnapshotConfig(
        snapshots_dir=directory, chunk_size=MiB, fsync=False, cleanup_retain_count=1, **kw
    )


def load(h: StateMachineHandler, keys: int, value_size: int) -> None:
    batch = 20_000
    for first in range(1, keys + 1, batch):
        last = min(first + batch, keys + 1)
        h.apply_chunk(
            [
                _kv.command_entry(
                    i, 1, _kv.insert(b"key-%010d" % i, os.urandom(value_size // 2).hex().encode())
                )
                for i in range(first, last)
            ]
        )


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_create(h: StateMachineHandler, work: Path, repeat: int) -> dict[str, Any]:
    ours = []
    for _ in range(repeat + 1):  # first run is warm-up
        h.apply_chunk([_kv.command_entry(h.last_applied() + 1, 1, _kv.insert(b"tick", b"x"))])
        ours.append(timed(h.create_snapshot))
    ours = ours[1:]
    unpacked = work / "unpacked"
    unpacked.mkdir()
    sm = h.state_machine
    sm.generate_snapshot_data(unpacked, LogId())
    raw = sum(p.stat().st_size for p in unpacked.iterdir())
    tar = []
    for n in range(repeat):
        out = work / f"tar{n}.tar.gz"
        tar.append(
            timed(
                lambda out=out: subprocess.run(
                    ["tar", "czf", str(out), "-C", str(unpacked), "."], check=True
                )
            )
        )
        out.unlink()
    shutil.rmtree(unpacked)
    return {
        "create_seconds": summary(ours),
        "tar_czf_seconds": summary(tar),
        "raw_bytes": raw,
        "ratio_vs_tar_czf": summary(tar)["median"] / summary(ours)["median"],
    }


def bench_stream(
    h: StateMachineHandler, meta: storage_pb2.SnapshotMetadata, path: Path, repeat: int
) -> dict[str, Any]:
    def ours() -> None:
        for _ in h.load_snapshot_data(meta):
            pass

    def floor() -> None:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            size = len(m)
            for start in range(0, size, MiB):
                zlib.crc32(m[start : start + MiB]).to_bytes(4, "big")

    ours()
    floor()
    a = [timed(ours) for _ in range(repeat)]
    b = [timed(floor) for _ in range(repeat)]
    size = path.stat().st_size
    return {
        "archive_bytes": size,
        "stream_seconds": summary(a),
        "mmap_crc32_seconds": summary(b),
        "stream_mib_per_s": size / MiB / summary(a)["median"],
        "ratio_vs_floor": summary(b)["median"] / summary(a)["median"],
    }


class _TimedLoad(MemoryStateMachine):
    """Records the time the state machine itself spends loading the snapshot."""

    load_seconds = 0.0

    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        t0 = time.perf_counter()
        super().apply_snapshot_from_file(meta, dir)
        self.load_seconds = time.perf_counter() - t0


def bench_install(
    h: StateMachineHandler,
    meta: storage_pb2.SnapshotMetadata,
    path: Path,
    work: Path,
    repeat: int,
) -> dict[str, Any]:
    ours, loads = [], []
    for n in range(repeat + 1):
        sm = _TimedLoad()
        with StateMachineHandler(sm, config(work / f"f{n}"), node_id=2) as f:
            stream = h.load_snapshot_data(meta)
            ours.append(
                timed(lambda f=f, s=stream: f.apply_snapshot_stream_from_leader(1, s, _no_ack))
            )
            loads.append(sm.load_seconds)
            assert f.last_applied() == meta.last_included.index
        shutil.rmtree(work / f"f{n}")
    ours, loads = ours[1:], loads[1:]
    library = [a - b for a, b in zip(ours, loads, strict=True)]
    tar = []
    for n in range(repeat):
        dest = work / f"x{n}"
        dest.mkdir()
        tar.append(
            timed(
                lambda d=dest: subprocess.run(["tar", "xzf", str(path), "-C", str(d)], check=True)
            )
        )
        shutil.rmtree(dest)
    return {
        "install_seconds": summary(ours),
        "sm_load_seconds": summary(loads),
        "install_without_sm_load_seconds": summary(library),
        "tar_xzf_seconds": summary(tar),
        "ratio_vs_tar_xzf": summary(tar)["median"] / summary(ours)["median"],
        "ratio_without_sm_load_vs_tar_xzf": summary(tar)["median"] / summary(library)["median"],
    }


def _no_ack(ack: storage_pb2.SnapshotAck) -> None:
    pass


def bench_stall(h: StateMachineHandler, repeat: int) -> dict[str, Any]:
    def run(with_create: bool) -> float:
        stop = threading.Event()
        stamps: list[float] = []
        window: list[float] = []

        def applier() -> None:
            while not stop.is_set():
                i = h.last_applied() + 1
                h.apply_chunk([_kv.command_entry(i, 1, _kv.insert(b"hot", b"%d" % i))])
                stamps.append(time.perf_counter())

        t = threading.Thread(target=applier)
        t.start()
        time.sleep(0.2)
        window.append(time.perf_counter())
        if with_create:
            h.create_snapshot()
        else:
            time.sleep(1.0)
        window.append(time.perf_counter())
        stop.set()
        t.join()
        inside = [s for s in stamps if window[0] <= s <= window[1]]
        before = [s for s in stamps if s < window[0]][-1:]
        after = [s for s in stamps if s > window[1]][:1]
        seq = before + inside + after
        return max((b - a for a, b in itertools.pairwise(seq)), default=float("inf"))

    gaps = [run(True) for _ in range(repeat)]
    idle = [run(False) for _ in range(repeat)]
    return {
        "max_apply_gap_during_create_ms": summary([g * 1000 for g in gaps]),
        "max_apply_gap_without_create_ms": summary([g * 1000 for g in idle]),
    }


# -- 5. memory (subprocess) -------------------------------------------------------------
class DiskStateMachine(StateMachine):
    """A state that lives in one file of incompressible bytes; streams, never buffers."""

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.applied = LogId()
        self.meta: storage_pb2.SnapshotMetadata | None = None
        self.digest = b""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def is_running(self) -> bool:
        return True

    def get(self, key: bytes) -> bytes | None:
        return None

    def entry_term(self, index: int) -> int | None:
        return None

    def __len__(self) -> int:
        return 0

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        if entries:
            self.applied = LogId(index=entries[-1].index, term=entries[-1].term)
        return [ApplyResult.success(e.index) for e in entries]

    def last_applied(self) -> LogId:
        return self.applied

    def update_last_applied(self, log_id: LogId) -> None:
        self.applied = log_id

    def persist_last_applied(self, log_id: LogId) -> None:
        self.applied = log_id

    def snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None:
        return self.meta

    def update_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        self.meta = meta

    def persist_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        self.meta = meta

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        with open(dir / "blob.bin", "wb") as out:
            for _ in range(self.size // MiB):
                out.write(os.urandom(MiB))

    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        sha = hashlib.sha256()
        with open(dir / "blob.bin", "rb") as f:
            while block := f.read(MiB):
                sha.update(block)
        self.digest = sha.digest()
        self.applied = LogId(index=meta.last_included.index, term=meta.last_included.term)

    def flush(self) -> None: ...
    def reset(self) -> None: ...


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(leader_dir: str, follower_dir: str) -> None:
    leader = StateMachineHandler(DiskStateMachine(), config(Path(leader_dir)), node_id=1)
    follower = StateMachineHandler(DiskStateMachine(), config(Path(follower_dir)), node_id=2)
    meta = leader.get_latest_snapshot_metadata()
    assert meta is not None
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmHWM")
    t0 = time.perf_counter()
    follower.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), lambda a: None)
    elapsed = time.perf_counter() - t0
    assert follower.last_applied() == meta.last_included.index
    peak = _status("VmHWM")
    print(json.dumps({"rss_base": base, "rss_peak": peak, "seconds": elapsed}))


def bench_memory(work: Path, gib: float) -> dict[str, Any]:
    size = int(gib * 1024) * MiB
    leader_dir = work / "big-leader"
    with StateMachineHandler(DiskStateMachine(size), config(leader_dir)) as h:
        h.apply_chunk([common_pb2.Entry(index=1, term=1)])
        _, path = h.create_snapshot()
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(leader_dir), str(work / "big-follower")],
        check=True,
        capture_output=True,
        text=True,
    )
    got = json.loads(out.stdout)
    growth = got["rss_peak"] - got["rss_base"]
    result = {
        "archive_bytes": path.stat().st_size,
        "transfer_seconds": got["seconds"],
        "rss_growth_mib": growth / MiB,
    }
    shutil.rmtree(leader_dir)
    shutil.rmtree(work / "big-follower", ignore_errors=True)
    return result


# -- 6. reads and applies against another tree (subprocesses) ----------------------------
def rw_child(keys: int) -> None:
    """Print this tree's MemoryStateMachine apply throughput and get p50."""
    sm = MemoryStateMachine()
    batches = [
        [
            _kv.command_entry(i, 1, _kv.insert(b"key-%010d" % i, b"v" * 100))
            for i in range(first, min(first + 1000, keys + 1))
        ]
        for first in range(1, keys + 1, 1000)
    ]
    t0 = time.perf_counter()
    for batch in batches:
        sm.apply_chunk(batch)
    applied = keys / (time.perf_counter() - t0)
    probes = [b"key-%010d" % (1 + (i * 7919) % keys) for i in range(1000)]
    get = sm.get
    per_get = []
    for _ in range(300):  # p50 over batches: one get is too short to time alone
        t0 = time.perf_counter()
        for key in probes:
            get(key)
        per_get.append((time.perf_counter() - t0) / len(probes) * 1e9)
    per_get.sort()
    print(json.dumps({"apply_per_s": applied, "get_p50_ns": per_get[len(per_get) // 2]}))


def bench_rw(other: Path, keys: int, rounds: int) -> dict[str, Any]:
    import d_engine_sm

    ours = Path(d_engine_sm.__file__).resolve().parent.parent
    got: dict[str, list[dict[str, float]]] = {"ours": [], "other": []}
    for _ in range(rounds):  # taking turns, so drift in machine load hits both alike
        for name, tree in (("ours", ours), ("other", other)):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(
                [sys.executable, __file__, "--rw-child", str(keys)],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            got[name].append(json.loads(out.stdout))

    def med(name: str, field: str) -> float:
        return summary([r[field] for r in got[name]])["median"]

    return {
        "other_tree": str(other),
        "get_p50_ns": {"ours": med("ours", "get_p50_ns"), "other": med("other", "get_p50_ns")},
        "apply_per_s": {"ours": med("ours", "apply_per_s"), "other": med("other", "apply_per_s")},
        # > 1 means ours is slower / faster respectively
        "get_p50_ratio": med("ours", "get_p50_ns") / med("other", "get_p50_ns"),
        "apply_ratio": med("ours", "apply_per_s") / med("other", "apply_per_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big-gib", type=float, default=1.0)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compare-tree", type=Path, help="another checkout to compare get/apply")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--rw-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.rw_child:
        rw_child(args.rw_child)
        return
    results: dict[str, Any] = {"keys": args.keys, "value_size": args.value_size, "isal": HAVE_ISAL}
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        work = Path(tmp)
        with StateMachineHandler(MemoryStateMachine(), config(work / "leader"), node_id=1) as h:
            load(h, args.keys, args.value_size)
            results["create"] = bench_create(h, work, args.repeat)
            meta, path = h.create_snapshot()
            results["stream"] = bench_stream(h, meta, path, args.repeat)
            results["install"] = bench_install(h, meta, path, work, args.repeat)
            results["stall"] = bench_stall(h, args.repeat)
        if not args.skip_memory:
            results["memory"] = bench_memory(work, args.big_gib)
    if args.compare_tree is not None:
        results["rw"] = bench_rw(args.compare_tree, min(args.keys, 200_000), 2 * args.repeat + 1)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"keys={args.keys} value_size={args.value_size} isal={HAVE_ISAL}")
    for line in _lines(results):
        print(line)


def _lines(r: dict[str, Any]) -> list[str]:
    c, s, i, st = r["create"], r["stream"], r["install"], r["stall"]
    med = "median"
    out = [
        f"create   {c['create_seconds'][med]:.3f} s  tar czf {c['tar_czf_seconds'][med]:.3f} s"
        f"  ratio {c['ratio_vs_tar_czf']:.2f}x  (target >= 4x, < 1.5 s)",
        f"stream   {s['stream_seconds'][med]:.3f} s ({s['stream_mib_per_s']:.0f} MiB/s)"
        f"  mmap+crc32 {s['mmap_crc32_seconds'][med]:.3f} s"
        f"  ratio {s['ratio_vs_floor']:.2f}x  (target >= 0.8x)",
        f"install  {i['install_seconds'][med]:.3f} s  tar xzf {i['tar_xzf_seconds'][med]:.3f} s"
        f"  ratio {i['ratio_vs_tar_xzf']:.2f}x  (target >= 1.5x)",
        f"         of which the state machine's load {i['sm_load_seconds'][med]:.3f} s;"
        f" library part {i['install_without_sm_load_seconds'][med]:.3f} s"
        f" = {i['ratio_without_sm_load_vs_tar_xzf']:.2f}x tar xzf",
        f"stall    max apply gap during create {st['max_apply_gap_during_create_ms'][med]:.1f} ms"
        f" (worst {st['max_apply_gap_during_create_ms']['max']:.1f})"
        f"  without create {st['max_apply_gap_without_create_ms'][med]:.1f} ms"
        "  (target <= 100 ms)",
    ]
    if "rw" in r:
        rw = r["rw"]
        out.append(
            f"get      p50 {rw['get_p50_ns']['ours']:.0f} ns vs {rw['get_p50_ns']['other']:.0f} ns"
            f" in {rw['other_tree']}: {rw['get_p50_ratio']:.3f}x the time  (target <= 1.05)"
        )
        out.append(
            f"apply    {rw['apply_per_s']['ours']:,.0f}/s vs {rw['apply_per_s']['other']:,.0f}/s:"
            f" {rw['apply_ratio']:.3f}x the throughput  (target >= 0.95)"
        )
    if "memory" in r:
        m = r["memory"]
        out.append(
            f"memory   {m['archive_bytes'] / MiB:.0f} MiB archive sent+received in"
            f" {m['transfer_seconds']:.1f} s, RSS growth {m['rss_growth_mib']:.1f} MiB"
            "  (target <= 64 MiB)"
        )
    return out


if __name__ == "__main__":
    main()
