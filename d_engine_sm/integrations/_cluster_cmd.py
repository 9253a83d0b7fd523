"""``d-engine-sm cluster``: a real PySyncObj cluster on 127.0.0.1 with
d_engine_sm as every node's state machine, put through a short ordeal.

Steps: start N node processes; concurrent writers; a snapshot; kill -9 and
wipe a follower, write more, restart it and time its catch-up by snapshot;
linearizable reads across nodes; compare every node's state. ``--compare``
runs plain PySyncObj (a dict with its pickle dump) on the same work and
prints ratios. Every step has a deadline; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from d_engine_sm.integrations._cluster import Cluster

STEP_TIMEOUT: Final = 600.0
DEFAULT_KEYS: Final = 20_000


def register(subparsers: Any) -> None:
    from d_engine_sm._cli.common import add_command, int_at_least

    p = add_command(
        subparsers,
        "cluster",
        help="run a local PySyncObj cluster on d_engine_sm: writes, kill/wipe/catch-up, checks",
        description="Starts N PySyncObj nodes (separate processes on 127.0.0.1) whose state "
        "machine is d_engine_sm, writes from concurrent clients, kills and wipes a follower, "
        "restarts it, waits for its catch-up by snapshot, checks linearizable reads and that "
        "all states are identical, and prints figures and a verdict. Needs the 'pysyncobj' extra.",
    )
    p.add_argument("--nodes", type=int_at_least(3), default=3, metavar="N")
    p.add_argument("--dir", type=Path, help="work here (kept); default: a temp dir (removed)")
    p.add_argument("--keys", type=int_at_least(1), default=DEFAULT_KEYS, metavar="N")
    p.add_argument("--writers", type=int_at_least(1), default=4, metavar="N")
    p.add_argument("--value-size", type=int_at_least(1), default=100, metavar="BYTES")
    p.add_argument("--compact-every", type=int_at_least(0), default=0, metavar="ENTRIES",
                   help="PySyncObj logCompactionMinEntries (0: only at the end)")  # fmt: skip
    p.add_argument("--compare", action="store_true", help="also run plain PySyncObj; ratios")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    # The CLI package imports this module: its helpers are imported when used.
    from d_engine_sm._cli.common import _Failure, out

    try:
        import pysyncobj  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise _Failure("the cluster command needs: pip install 'd-engine-sm[pysyncobj]'") from None
    base = args.dir or Path(tempfile.mkdtemp(prefix="d-engine-sm-cluster-"))
    try:
        work = Work(args.keys, args.writers, args.value_size, args.compact_every)
        when = f"every {args.compact_every} entries" if args.compact_every else "at the end"
        out(
            f"cluster: {args.nodes} nodes on 127.0.0.1, {args.keys} keys of {args.value_size} B,"
            f" {args.writers} writers, compaction {when}"
        )
        ours = run_scenario(base / "d_engine_sm", args.nodes, "dsm", work, out)
        plain = None
        if args.compare:
            out("plain PySyncObj, same work:")
            plain = run_scenario(base / "plain", args.nodes, "plain", work, out)
        return report(ours, plain, out)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


class Work:
    def __init__(self, keys: int, writers: int, value_size: int, compact_every: int) -> None:
        self.keys = keys
        self.writers = writers
        self.value_size = value_size
        # "only at the end": a threshold above anything this run writes.
        self.compact_every = compact_every or 10 * keys + 100_000

    def options(self) -> dict[str, Any]:
        return {"logCompactionMinEntries": self.compact_every}


def run_scenario(root: Path, n: int, mode: str, work: Work, out: Any) -> dict[str, Any]:
    """Run the ordeal on a fresh cluster; returns the figures (``problems`` lists failures)."""
    figures: dict[str, Any] = {"mode": mode, "problems": []}
    problems: list[str] = figures["problems"]
    with Cluster(root, n, mode=mode, options=work.options()) as cluster:
        cluster.start()
        leader = cluster.wait_leader()
        figures["writes_per_second"] = _write(cluster, work, "k", work.keys)
        rate = figures["writes_per_second"]
        out(f"  writes: {work.keys} from {work.writers} concurrent clients: {rate:,.0f} writes/s")
        snap = cluster.nodes[leader].call("compact", timeout=STEP_TIMEOUT)
        figures["snapshot_seconds"] = snap["seconds"]
        figures["snapshot_bytes"] = snap["bytes"]
        out(f"  snapshot on the leader: {snap['seconds']:.3f} s, {snap['bytes'] / 1e6:.1f} MB")
        figures["catch_up_seconds"] = _kill_wipe_catch_up(cluster, leader, work, problems)
        if figures["catch_up_seconds"] is not None:
            out(f"  wiped follower caught up in {figures['catch_up_seconds']:.3f} s")
        if mode == "dsm":
            figures["reads_ok"] = _linearizable_reads(cluster, problems)
            out(f"  linearizable reads across nodes: {'ok' if figures['reads_ok'] else 'FAILED'}")
        digests = [cluster.nodes[i].call("digest", timeout=STEP_TIMEOUT) for i in range(n)]
        figures["identical"] = len({d["digest"] for d in digests}) == 1
        figures["keys_per_node"] = [d["keys"] for d in digests]
        if not figures["identical"]:
            problems.append(f"states differ: {[d['digest'][:12] for d in digests]}")
        same = "yes" if figures["identical"] else "NO"
        out(f"  states identical on all {n} nodes: {same} ({digests[0]['keys']} keys)")
        status = [cluster.nodes[i].call("status") for i in range(n)]
        figures["term"] = max(s["term"] for s in status)
        if mode == "dsm":
            figures["max_tick_gap_seconds"] = max(s["max_tick_gap_seconds"] for s in status)
            figures["max_hook_seconds"] = max(s["max_hook_seconds"] for s in status)
            gap = figures["max_tick_gap_seconds"] * 1000
            hook = figures["max_hook_seconds"] * 1000
            out(
                f"  term {figures['term']} (elections: {figures['term'] - 1}); longest tick gap"
                f" {gap:.0f} ms, longest own work on the tick thread {hook:.1f} ms CPU"
            )
        else:
            out(f"  term {figures['term']} (elections: {figures['term'] - 1})")
    return figures


def _write(cluster: Cluster, work: Work, prefix: str, count: int) -> float:
    """``count`` keys from ``writers`` clients spread over the nodes; writes/s."""
    per = [
        count // work.writers + (1 if i < count % work.writers else 0) for i in range(work.writers)
    ]
    run = uuid.uuid4().hex[:6]
    started = time.perf_counter()

    def one(i: int) -> dict[str, Any]:
        node = cluster.nodes[i % len(cluster.nodes)]
        return node.call("load", timeout=STEP_TIMEOUT, count=per[i], prefix=f"{prefix}{run}-{i}-",
                         value_size=work.value_size, window=500)  # fmt: skip

    with ThreadPoolExecutor(work.writers) as pool:
        results = list(pool.map(one, range(work.writers)))
    elapsed = time.perf_counter() - started
    errors = sum(int(r["errors"]) for r in results)
    return (count - errors) / elapsed


def _kill_wipe_catch_up(
    cluster: Cluster, leader: int, work: Work, problems: list[str]
) -> float | None:
    follower = (leader + 1) % len(cluster.nodes)
    cluster.nodes[follower].kill()
    cluster.wipe(follower)
    lead = cluster.nodes[leader]
    lead.call(
        "load",
        timeout=STEP_TIMEOUT,
        count=200,
        prefix="after-kill-",
        value_size=work.value_size,
        window=100,
    )
    lead.call("compact", timeout=STEP_TIMEOUT)  # the follower can only come back by snapshot
    target = lead.call("status")["commit_index"]
    started = time.perf_counter()
    cluster.nodes[follower].start()
    try:
        cluster.nodes[follower].call("wait", timeout=STEP_TIMEOUT, index=target)
    except (RuntimeError, TimeoutError) as exc:
        problems.append(f"wiped follower did not catch up: {exc}")
        return None
    return time.perf_counter() - started


def _linearizable_reads(cluster: Cluster, problems: list[str]) -> bool:
    """A write acknowledged by one node is seen by a linearizable read on every other."""
    n = len(cluster.nodes)
    ok = True
    lock = threading.Lock()

    def check(i: int) -> None:
        nonlocal ok
        key, value = f"lin-{i}", f"v-{uuid.uuid4().hex}"
        cluster.nodes[i % n].call("put", key=key, value=value)
        for j in range(n):
            got = cluster.nodes[j].call("get", key=key)["value"]
            if got != value:
                with lock:
                    ok = False
                    problems.append(
                        f"read on node {j} after write on {i % n}: {got!r} != {value!r}"
                    )

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(check, range(3 * n)))
    return ok


def report(ours: dict[str, Any], plain: dict[str, Any] | None, out: Any) -> int:
    if plain is not None:
        out("ratios (d_engine_sm / plain PySyncObj):")
        out(f"  writes/s      {_ratio(ours['writes_per_second'], plain['writes_per_second'])}")
        snap = _ratio(ours["snapshot_seconds"], plain["snapshot_seconds"])
        out(f"  snapshot time {snap} (lower is better)")
        if ours["catch_up_seconds"] and plain["catch_up_seconds"]:
            catch = _ratio(ours["catch_up_seconds"], plain["catch_up_seconds"])
            out(f"  catch-up time {catch} (lower is better)")
        elif plain["catch_up_seconds"] is None:
            out("  catch-up: plain PySyncObj did not finish")
    verdict = not ours["problems"]
    for problem in ours["problems"]:
        out(f"  problem: {problem}")
    out(f"verdict: {'PASS' if verdict else 'FAIL'}")
    return 0 if verdict else 1


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"
