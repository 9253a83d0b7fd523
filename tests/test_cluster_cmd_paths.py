"""``d-engine-sm cluster``: its arguments, the missing extra, and the verdict.

The ordeal's judgement (which figures it prints, which failures it names,
PASS or FAIL, the work directory kept or removed) is checked against a
scripted stand-in for the node processes; ``test_pysyncobj.py`` runs the
command on a real cluster.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import pytest

from d_engine_sm._cli import main
from d_engine_sm.integrations import _cluster_cmd

ADDRS = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


class FakeNode:
    """One scripted node: answers the requests ``run_scenario`` makes."""

    def __init__(self, cluster: FakeCluster, i: int) -> None:
        self.cluster = cluster
        self.i = i

    def call(self, op: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        c = self.cluster
        c.events.append(f"{op} {self.i}")
        if op == "status":
            return {
                "leader": ADDRS[0],
                "term": 3,
                "commit_index": 4321,
                "max_tick_gap_seconds": 0.25,
                "max_hook_seconds": 0.002,
            }
        if op == "load":
            return {"seconds": 0.01, "count": kw["count"], "errors": 0}
        if op == "compact":
            return {"seconds": c.faults.get("snapshot_seconds", 0.5), "bytes": 2_500_000}
        if op == "wait":
            if "catch_up" in c.faults:
                raise RuntimeError(c.faults["catch_up"])
            return {"seconds": 0.01}
        if op == "put":
            c.values[kw["key"]] = kw["value"]
            return {"index": 1, "succeeded": True}
        if op == "get":
            if c.faults.get("stale_reads_on") == self.i:
                return {"value": None}
            return {"value": c.values.get(kw["key"])}
        if op == "digest":
            digest = "ab" * 32 if c.faults.get("diverged") != self.i else "cd" * 32
            return {"digest": digest, "keys": 1234, "last_applied": 4321}
        raise AssertionError(f"unexpected request {op}")

    def kill(self) -> None:
        self.cluster.events.append(f"kill {self.i}")

    def start(self) -> None:
        self.cluster.events.append(f"start {self.i}")


class FakeCluster:
    """Stands in for ``_cluster.Cluster``; every instance is recorded."""

    made: ClassVar[list[FakeCluster]] = []
    faults_by_mode: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, root: Path, n: int, *, mode: str, options: dict[str, Any]) -> None:
        self.root, self.mode, self.options = root, mode, options
        self.faults = self.faults_by_mode.get(mode, {})
        self.nodes = [FakeNode(self, i) for i in range(n)]
        self.events: list[str] = []
        self.values: dict[str, str] = {}
        self.closed = False
        root.mkdir(parents=True)  # like the real one: the scenario works in it
        self.made.append(self)

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closed = True

    def start(self) -> None:
        self.events.append("start all")

    def wait_leader(self) -> int:
        return 0

    def wipe(self, i: int) -> None:
        self.events.append(f"wipe {i}")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeCluster]:
    # The command only checks that the extra imports; the stand-in needs nothing of it.
    monkeypatch.setitem(sys.modules, "pysyncobj", types.ModuleType("pysyncobj"))
    monkeypatch.setattr(_cluster_cmd, "Cluster", FakeCluster)
    monkeypatch.setattr(FakeCluster, "made", [])
    monkeypatch.setattr(FakeCluster, "faults_by_mode", {})
    return FakeCluster


def test_healthy_run_with_compare_passes_prints_ratios_and_removes_its_temp_dir(
    fake: type[FakeCluster], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.faults_by_mode = {"plain": {"snapshot_seconds": 0.0}}
    assert main(["cluster", "--keys", "40", "--writers", "2", "--compare"]) == 0
    out = capsys.readouterr().out
    ours, plain = fake.made
    assert (ours.mode, ours.root.name, plain.mode, plain.root.name) == (
        "dsm",
        "d_engine_sm",
        "plain",
        "plain",
    )
    assert ours.root.parent == plain.root.parent
    assert ours.root.parent.name.startswith("d-engine-sm-cluster-")
    assert not ours.root.parent.exists()  # no --dir: the temp dir is removed
    assert ours.closed and plain.closed
    # "compaction at the end": a threshold above anything the run writes.
    assert ours.options == {"logCompactionMinEntries": 10 * 40 + 100_000}
    # The follower is killed and wiped before it restarts and is waited for.
    kill = ours.events.index("kill 1")
    assert ours.events[kill + 1] == "wipe 1"
    assert ours.events.index("start 1") < ours.events.index("wait 1")
    assert (
        "cluster: 3 nodes on 127.0.0.1, 40 keys of 100 B, 2 writers, compaction at the end" in out
    )
    assert "plain PySyncObj, same work:" in out
    assert "linearizable reads across nodes: ok" in out
    assert "states identical on all 3 nodes: yes (1234 keys)" in out
    assert "longest tick gap 250 ms, longest own work on the tick thread 2.0 ms CPU" in out
    # Plain PySyncObj has no tick-thread figures: its term line stands alone.
    assert "\n  term 3 (elections: 2)\n" in out
    assert "ratios (d_engine_sm / plain PySyncObj):" in out
    assert "  snapshot time n/a (lower is better)" in out  # plain took 0 s: no ratio
    assert "  catch-up time " in out and "x (lower is better)" in out
    assert "problem:" not in out
    assert out.rstrip().endswith("verdict: PASS")


def test_every_failure_is_named_and_the_verdict_is_fail(
    fake: type[FakeCluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.faults_by_mode = {
        "dsm": {
            "catch_up": "TimeoutError: index 4321 not applied in 600.0s",
            "stale_reads_on": 2,
            "diverged": 1,
        },
        "plain": {"catch_up": "NodeDied: node process exited rc=-9"},
    }
    work = tmp_path / "work"
    argv = ["cluster", "--keys", "30", "--writers", "3", "--compact-every", "7"]
    assert main([*argv, "--dir", str(work), "--compare"]) == 1
    out = capsys.readouterr().out
    assert (work / "d_engine_sm").is_dir() and (work / "plain").is_dir()  # --dir is kept
    assert fake.made[0].options == {"logCompactionMinEntries": 7}
    assert "compaction every 7 entries" in out
    assert "wiped follower caught up" not in out
    assert "linearizable reads across nodes: FAILED" in out
    assert "states identical on all 3 nodes: NO" in out
    problems = [line for line in out.splitlines() if line.startswith("  problem: ")]
    assert problems[0] == (
        "  problem: wiped follower did not catch up: TimeoutError: index 4321 not applied in 600.0s"
    )
    # Every write is read back on every node: node 2 misses each one.
    stale = [p for p in problems if p.startswith("  problem: read on node 2 after write on ")]
    assert len(stale) == 9 and len(problems) == 11
    assert all(": None != 'v-" in p for p in stale)
    assert problems[-1] == f"  problem: states differ: {['ab' * 6, 'cd' * 6, 'ab' * 6]}"
    # Neither flavour caught up: no ratio, and the baseline's failure is said.
    assert "catch-up time" not in out
    assert "  catch-up: plain PySyncObj did not finish" in out
    assert out.rstrip().endswith("verdict: FAIL")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "2"], "argument --nodes: must be >= 3, got 2"),
        (["--keys", "0"], "argument --keys: must be >= 1, got 0"),
        (["--keys", "abc"], "argument --keys: not an integer: 'abc'"),
        (["--compact-every", "-1"], "argument --compact-every: must be >= 0, got -1"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, fake: type[FakeCluster], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cluster", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"d-engine-sm: error: {message} (see 'd-engine-sm cluster --help')\n"
    assert fake.made == []  # nothing was started


def test_separators_are_accepted_in_counts(
    fake: type[FakeCluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cluster", "--keys", "1_000", "--dir", str(tmp_path / "w")]) == 0
    assert "1000 keys of 100 B" in capsys.readouterr().out


def test_without_the_extra_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pysyncobj", None)  # import raises ImportError
    work = tmp_path / "work"
    assert main(["cluster", "--dir", str(work)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "d-engine-sm: error: the cluster command needs: pip install 'd-engine-sm[pysyncobj]'\n"
    )
    assert captured.out == ""
    assert not work.exists()  # it stopped before making anything
