"""How do create, stream and install scale, and how much memory does each take?

For each built-in state machine (MemoryStateMachine, SqliteStateMachine)
holding N keys x value-size bytes (default 2,000,000 x 100 B, about 240 MB
of state):

1. create: ``create_snapshot()`` vs ``tar czf`` of the same unpacked
   snapshot files (target >= 4x);
2. stream: ``load_snapshot_data`` read to the end (the sending side: every
   chunk read and checksummed) vs ``tar xzf`` of the same archive;
3. install: ``load_snapshot_data`` -> ``apply_snapshot_stream_from_leader``
   in one process (send, receive, verify, unpack, load) vs ``tar xzf`` of
   the same archive (target >= 1.5x; SQLite also at N keys);

each phase in a fresh subprocess, reporting its peak RSS growth (VmHWM,
reset just before the phase; target for a SQLite install: <= 64 MiB). Then
the install comparison again at 200,000 keys (``--install-keys``), the
median of ``--repeat`` runs, for both machines. Ratios are tar's time over
ours, both measured in this run. By default nothing is fsynced: snapshots
are written without fsync and SQLite runs with ``durability="off"``, like
``tar xzf``, which does not fsync either. ``--durable`` turns both on
(snapshot fsync, SQLite ``"full"``) and then times ``tar xzf`` followed by
an fsync of every file it wrote and of their directories.

    python benchmarks/bench_scale.py [--keys 2000000] [--value-size 100]
        [--install-keys 200000] [--repeat 3] [--machines memory,sqlite]
        [--durable] [--json]

``--keys 20000 --install-keys 5000 --repeat 1`` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from d_engine_sm import _kv
from d_engine_sm._compress import HAVE_ISAL
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._state_machine import StateMachine
from d_engine_sm.proto import storage_pb2

MiB = 1 << 20
MACHINES = ("memory", "sqlite")
_BATCH = 20_000


# -- the child side: one phase per process ------------------------------------------------
class Phase:
    """Where one machine's files live inside the work directory."""

    def __init__(self, work: Path, machine: str, keys: int, value_size: int, durable: bool):
        self.root = work / f"{machine}-{keys}"
        self.machine = machine
        self.keys = keys
        self.value_size = value_size
        self.durable = durable

    @property
    def leader_dir(self) -> Path:
        return self.root / "leader-snapshots"

    def config(self, directory: Path) -> SnapshotConfig:
        return SnapshotConfig(
            snapshots_dir=directory, chunk_size=MiB, fsync=self.durable, cleanup_retain_count=1
        )

    def machine_at(self, db: Path) -> StateMachine:
        if self.machine == "memory":
            return MemoryStateMachine()
        return SqliteStateMachine(db, durability="full" if self.durable else "off")

    def leader(self) -> StateMachineHandler:
        return StateMachineHandler(
            self.machine_at(self.root / "leader.db"), self.config(self.leader_dir), node_id=1
        )


def _fill(h: StateMachineHandler, keys: int, value_size: int) -> None:
    """Apply ``keys`` inserts (values: random hex, so they compress about 2x)."""
    for first in range(1, keys + 1, _BATCH):
        last = min(first + _BATCH, keys + 1)
        h.apply_chunk(
            [
                _kv.command_entry(
                    i, 1, _kv.insert(b"key-%010d" % i, os.urandom(value_size // 2).hex().encode())
                )
                for i in range(first, last)
            ]
        )


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss(fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Run ``fn``; return its wall and CPU seconds, its RSS high-water growth, its result.

    The high-water mark is reset first (``/proc/self/clear_refs``), so setup
    done before does not count. CPU time (all threads) is the steadier
    figure on a busy machine.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not allowed here: the peak may then include setup
        print("bench_scale: cannot reset VmHWM; peaks include setup", file=sys.stderr)
    base = _status("VmRSS")
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    growth = max(0, _status("VmHWM") - base)
    return {"seconds": elapsed, "cpu_seconds": cpu, "rss_growth": growth}, result


def _no_ack(ack: storage_pb2.SnapshotAck) -> None:
    pass


def child(phase: Phase, name: str, follower: Path | None, warm: bool) -> dict[str, Any]:
    if name == "create":
        return _child_create(phase)
    with phase.leader() as leader:
        meta = leader.get_latest_snapshot_metadata()
        assert meta is not None, "run the create phase first"
        if name == "stream":

            def send() -> int:
                return sum(len(c.data) for c in leader.load_snapshot_data(meta))

            figures, sent = _peak_rss(send)
            return {**figures, "bytes": sent}
        assert follower is not None
        if warm:  # one install first, so one-time costs (imports, caches) do not count
            _install(phase, leader, meta, follower / "warm-up")
        return _install(phase, leader, meta, follower)


def _install(
    phase: Phase, leader: StateMachineHandler, meta: storage_pb2.SnapshotMetadata, at: Path
) -> dict[str, Any]:
    sm = phase.machine_at(at / "follower.db")
    with StateMachineHandler(sm, phase.config(at / "snapshots"), node_id=2) as f:
        figures, _ = _peak_rss(
            lambda: f.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), _no_ack)
        )
        assert f.last_applied() == meta.last_included.index
        assert len(sm) == phase.keys, (len(sm), phase.keys)
        if isinstance(sm, SqliteStateMachine):
            sm.close()
    return figures


def _child_create(phase: Phase) -> dict[str, Any]:
    shutil.rmtree(phase.root, ignore_errors=True)
    phase.root.mkdir(parents=True)
    with phase.leader() as h:
        t0 = time.perf_counter()
        _fill(h, phase.keys, phase.value_size)
        fill_seconds = time.perf_counter() - t0
        figures, (_, path) = _peak_rss(h.create_snapshot)
        if isinstance(h.state_machine, SqliteStateMachine):
            h.state_machine.close()
    return {
        **figures,
        "fill_seconds": fill_seconds,
        "archive": str(path),
        "archive_bytes": path.stat().st_size,
    }


# -- the parent side ----------------------------------------------------------------------
def run_child(
    args: argparse.Namespace, machine: str, keys: int, name: str, extra: list[str]
) -> Any:
    cmd = [sys.executable, __file__, "--child", name, machine, str(args.work), str(keys)]
    cmd += ["--value-size", str(args.value_size), *extra]
    if args.durable:
        cmd.append("--durable")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _timed_cmd(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of ``cmd`` (CPU: it and its children, e.g. tar's gzip)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu


def _cache(path: Path) -> None:
    """Read ``path`` once, so each timed reader finds it in the page cache alike."""
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def _tar_xzf(archive: Path, dest: Path, durable: bool) -> tuple[float, float]:
    """``tar xzf``; ``durable``: then fsync what it wrote, as a durable install does."""
    dest.mkdir(parents=True)
    c0, t0 = time.process_time(), time.perf_counter()
    wall, cpu = _timed_cmd(["tar", "xzf", str(archive), "-C", str(dest)])
    if not durable:
        return wall, cpu
    for path in [*dest.rglob("*"), dest]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0, cpu + time.process_time() - c0


def _tar_czf(unpacked: Path, scratch: Path, repeat: int) -> list[tuple[float, float]]:
    """``tar czf`` of the unpacked files, ``repeat`` times."""
    out: list[tuple[float, float]] = []
    for n in range(repeat):
        target = scratch / f"tar-c{n}.tar.gz"
        out.append(_timed_cmd(["tar", "czf", str(target), "-C", str(unpacked), "."]))
        target.unlink()
    return out


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _install_child(
    args: argparse.Namespace, machine: str, keys: int, n: int, warm: bool
) -> dict[str, Any]:
    follower = args.work / f"{machine}-{keys}" / f"follower-{n}"
    extra = ["--follower", str(follower)] + (["--warm"] if warm else [])
    result: dict[str, Any] = run_child(args, machine, keys, "install", extra)
    shutil.rmtree(follower, ignore_errors=True)
    return result


def bench_machine(
    args: argparse.Namespace, machine: str, keys: int, repeat: int, *, warm: bool
) -> dict[str, Any]:
    """All three phases of one machine at ``keys`` keys, with their tar baselines.

    Installs and ``tar xzf`` take turns, each after the archive was read into
    the page cache, so neither pays a disk read the other does not, and drift
    in the machine's load hits both alike. ``warm``: each install child
    installs once unmeasured first (the small comparison, where one-time costs
    would show); at scale they do not matter and the peak RSS of a fresh
    process is the figure wanted.
    """
    root = args.work / f"{machine}-{keys}"
    create = run_child(args, machine, keys, "create", [])
    archive = Path(create["archive"])
    _cache(archive)
    stream = run_child(args, machine, keys, "stream", [])
    installs, xzf = [], []
    for n in range(repeat):
        _cache(archive)
        installs.append(_install_child(args, machine, keys, n, warm))
        _cache(archive)
        xzf.append(_tar_xzf(archive, root / f"tar-x{n}", args.durable))
    unpacked = root / "tar-x0"
    raw = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file())
    czf = _tar_czf(unpacked, root, repeat)
    shutil.rmtree(root)
    tar = {
        "tar_xzf_seconds": _summary([w for w, _ in xzf]),
        "tar_xzf_cpu_seconds": _summary([c for _, c in xzf]),
        "tar_czf_seconds": _summary([w for w, _ in czf]),
        "tar_czf_cpu_seconds": _summary([c for _, c in czf]),
    }
    xzf_wall, czf_wall = tar["tar_xzf_seconds"]["median"], tar["tar_czf_seconds"]["median"]
    xzf_cpu, czf_cpu = tar["tar_xzf_cpu_seconds"]["median"], tar["tar_czf_cpu_seconds"]["median"]
    install = _summary([i["seconds"] for i in installs])
    install_figures = {
        "seconds": install["median"],
        "cpu_seconds": statistics.median(i["cpu_seconds"] for i in installs),
        "rss_growth": max(i["rss_growth"] for i in installs),
    }
    return {
        "keys": keys,
        "archive_bytes": create["archive_bytes"],
        "raw_bytes": raw,
        "fill_seconds": create["fill_seconds"],
        "create": _phase(create, czf_wall, czf_cpu),
        "stream": _phase(stream, xzf_wall, xzf_cpu),
        "install": {**_phase(install_figures, xzf_wall, xzf_cpu), "seconds_summary": install},
        **tar,
    }


def _phase(r: dict[str, Any], tar: float, tar_cpu: float) -> dict[str, Any]:
    return {
        "seconds": r["seconds"],
        "cpu_seconds": r["cpu_seconds"],
        "rss_growth_mib": r["rss_growth"] / MiB,
        "ratio_vs_tar": tar / r["seconds"],
        "cpu_ratio_vs_tar": tar_cpu / max(r["cpu_seconds"], 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--keys", type=int, default=2_000_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--install-keys", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the small install comparison")
    ap.add_argument("--machines", default=",".join(MACHINES))
    ap.add_argument("--durable", action="store_true", help="fsync snapshots, SQLite 'full'")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--follower", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, machine, work, keys = args.child
        phase = Phase(Path(work), machine, int(keys), args.value_size, args.durable)
        print(json.dumps(child(phase, name, args.follower, args.warm)))
        return
    if min(args.keys, args.install_keys, args.repeat, args.value_size) < 1:
        ap.error("--keys, --install-keys, --repeat and --value-size must be >= 1")
    machines = [m for m in args.machines.split(",") if m]
    if unknown := set(machines) - set(MACHINES):
        ap.error(f"unknown machines {sorted(unknown)}; choose from {list(MACHINES)}")
    results: dict[str, Any] = {
        "keys": args.keys,
        "install_keys": args.install_keys,
        "value_size": args.value_size,
        "isal": HAVE_ISAL,
        "durable": args.durable,
        "scale": {},
        "install_small": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        args.work = Path(tmp)
        for m in machines:
            results["scale"][m] = bench_machine(args, m, args.keys, 1, warm=False)
        for m in machines:
            results["install_small"][m] = bench_machine(
                args, m, args.install_keys, args.repeat, warm=True
            )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for line in _lines(results):
        print(line)


def _lines(r: dict[str, Any]) -> Iterator[str]:
    yield (
        f"value_size={r['value_size']} isal={r['isal']} durable={r['durable']}"
        "  (ratio = tar's time / ours, same run; CPU: the same with CPU seconds)"
    )
    for title, block in (
        (f"{r['keys']:,} keys, one run per phase", r["scale"]),
        (f"{r['install_keys']:,} keys, medians", r["install_small"]),
    ):
        yield ""
        yield title
        for m, s in block.items():
            yield (
                f"  {m:<7} raw {s['raw_bytes'] / MiB:,.0f} MiB, archive"
                f" {s['archive_bytes'] / MiB:,.0f} MiB (filled in {s['fill_seconds']:.1f} s)"
            )
            czf, xzf = s["tar_czf_seconds"]["median"], s["tar_xzf_seconds"]["median"]
            for phase, tar, base in (
                ("create", "czf", czf),
                ("stream", "xzf", xzf),
                ("install", "xzf", xzf),
            ):
                p = s[phase]
                yield (
                    f"    {phase:<8} {p['seconds']:8.3f} s  tar {tar} {base:8.3f} s"
                    f"  ratio {p['ratio_vs_tar']:6.2f}x (CPU {p['cpu_ratio_vs_tar']:5.2f}x)"
                    f"  peak RSS +{p['rss_growth_mib']:,.1f} MiB"
                )
    yield ""
    yield "targets (wall-clock ratios):"
    yield from _verdicts(r)


def _verdicts(r: dict[str, Any]) -> Iterator[str]:
    def line(what: str, value: float, ok: bool, unit: str = "x") -> str:
        return f"  {what:<44} {value:8.2f}{unit}  {'met' if ok else 'MISSED'}"

    for m, s in r["scale"].items():
        yield line(f"{m} create >= 4x tar czf ({r['keys']:,} keys)", *_at_least(s, "create", 4))
    for m, s in r["install_small"].items():
        yield line(
            f"{m} install >= 1.5x tar xzf ({r['install_keys']:,} keys)",
            *_at_least(s, "install", 1.5),
        )
    if "sqlite" in r["scale"]:
        s = r["scale"]["sqlite"]
        yield line(
            f"sqlite install >= 1.5x tar xzf ({r['keys']:,} keys)", *_at_least(s, "install", 1.5)
        )
        growth = s["install"]["rss_growth_mib"]
        yield line("sqlite install peak RSS growth <= 64 MiB", growth, growth <= 64, " MiB")


def _at_least(s: dict[str, Any], phase: str, target: float) -> tuple[float, bool]:
    ratio = float(s[phase]["ratio_vs_tar"])
    return ratio, ratio >= target


if __name__ == "__main__":
    main()
