"""The node process behind ``d-engine-sm cluster`` (``_node_proc``), driven
through ``_cluster.Cluster`` as the command drives it: plain PySyncObj (the
baseline) on its own, and either flavour without a quorum, where every
request must fail with a reason instead of hanging.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pysyncobj")
pytest.importorskip("grpc")

from d_engine_sm.integrations._cluster import Cluster, NodeDied, NodeProc, _result

EMPTY_DIGEST = hashlib.sha256().hexdigest()


def _close(c: Cluster) -> None:
    c.close()
    assert not any(n.running for n in c.nodes)


@pytest.fixture
def plain_alone(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "plain", 1, mode="plain")
    try:
        c.start()
        yield c
    finally:
        _close(c)


@pytest.mark.timeout(60)
def test_plain_node_writes_waits_digests_and_dumps(plain_alone: Cluster) -> None:
    c = plain_alone
    assert c.wait_leader() == 0
    node = c.nodes[0]
    load = node.call("load", count=300, prefix="p-", value_size=16, window=64)
    assert (load["count"], load["errors"]) == (300, 0)
    status = node.call("status")
    assert status["leader"] == c.addrs[0] and status["term"] >= 1
    assert status["commit_index"] >= status["last_applied"] >= 300
    assert node.call("wait", index=status["commit_index"], timeout=10)["seconds"] >= 0
    digest = node.call("digest")
    assert digest["keys"] == 300 and digest["digest"] != EMPTY_DIGEST
    assert digest["last_applied"] >= 300
    dump = c.node_dir(0) / "raft.dump"
    assert not dump.exists()
    compact = node.call("compact", timeout=30)
    assert compact["bytes"] == dump.stat().st_size > 300 * 16  # the pickled dict
    cpu = node.call("cpu")
    assert cpu["process"] > 0 and cpu["children"] >= 0
    # Per thread name; the numbered request-pool threads are counted as one.
    assert {"MainThread", "node-req"} <= cpu["threads"].keys()
    assert all(seconds >= 0 for seconds in cpu["threads"].values())
    proc = node.proc
    assert proc is not None
    node.stop()  # stdin closed: the node closes PySyncObj and exits cleanly
    assert proc.returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["plain", "dsm"])
def test_node_without_quorum_fails_each_request_with_a_reason(tmp_path: Path, mode: str) -> None:
    # Three members, one running: no leader can be elected; proposals fail at once.
    c = Cluster(tmp_path / mode, 3, mode=mode, options={"commandsWaitLeader": False})
    try:
        node = c.nodes[0]
        node.start()
        status = node.call("status")
        assert status["leader"] is None and status["commit_index"] == 1
        # Index 1 is PySyncObj's own first entry, committed without a leader.
        node.call("wait", index=1, timeout=10)
        with pytest.raises(TimeoutError, match=r"^no agreed leader within 0\.3s$"):
            c.wait_leader(timeout=0.3, among=[0])
        load = node.call("load", count=5, prefix="x-", value_size=4, window=5)
        assert (load["count"], load["errors"]) == (5, 5)
        expected_wait = {
            "plain": r"^TimeoutError: index 2 not applied in 0\.2s$",
            "dsm": r"^ApplyTimeout: timeout waiting for state machine to apply index 2 "
            r"\(timeout: 0\.2s, current_applied: 1\)$",
        }[mode]
        with pytest.raises(RuntimeError, match=expected_wait):
            node.call("wait", index=2, timeout=0.2)
        nothing = {"plain": "no dump", "dsm": "no snapshot"}[mode]
        with pytest.raises(RuntimeError, match=f"^TimeoutError: {nothing}$"):
            node.call("compact", timeout=0.3)
        assert not (c.node_dir(0) / "raft.dump").exists()
        if mode == "dsm":
            answer = node.request("put", key="k", value="v", timeout=2.0).result(15)
            assert answer["ok"] is False
            assert answer["error"] == "ProposeError: proposal failed: MISSING_LEADER"
            assert answer["maybe_applied"] is False  # never proposed: safe to retry
        # A request the node does not know fails alone; the node keeps serving.
        answer = node.request("frobnicate").result(15)
        assert answer["ok"] is False and "op_frobnicate" in answer["error"]
        digest = node.call("digest")
        assert (digest["digest"], digest["keys"], digest["last_applied"]) == (EMPTY_DIGEST, 0, 1)
        # No answer in time: the driver's own deadline, as the builtin TimeoutError.
        slow = node.request("wait", index=2, timeout=0.5)
        with pytest.raises(TimeoutError, match=r"^no answer from the node within 0\.05 s$"):
            _result(slow, 0.05)
        # "quit" ends the node: what is still pending fails with NodeDied, the exit is clean.
        pending = node.request("quit")
        with pytest.raises(NodeDied, match=r"^node process exited rc=0; log: "):
            pending.result(30)
        proc = node.proc
        assert proc is not None and proc.wait(30) == 0
        with pytest.raises(NodeDied, match="node is not running"):
            node.call("status")
    finally:
        _close(c)


@pytest.mark.timeout(60)
def test_a_node_that_cannot_start_is_reported_not_waited_for(tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    log = tmp_path / "node.stderr"
    argv = [sys.executable, "-m", "d_engine_sm.integrations._node_proc", "--mode", "plain"]
    node = NodeProc([*argv, "--self", "127.0.0.1:1", "--dir", str(taken)], log)
    with pytest.raises(NodeDied, match=f"^node process exited rc=1; log: {re.escape(str(log))}$"):
        node.start()
    assert node.proc is not None and node.proc.wait(30) == 1
    assert "FileExistsError" in log.read_text()
    assert not node.running


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["plain", "dsm"])
def test_a_node_does_not_outlive_its_driver(tmp_path: Path, mode: str) -> None:
    # A single-member cluster elects itself; a load far too long to finish is
    # running when the driver goes away (its end of stdin closes, as when it dies).
    c = Cluster(tmp_path / mode, 1, mode=mode)
    try:
        c.start()
        assert c.wait_leader() == 0
        node = c.nodes[0]
        load = node.request("load", count=50_000_000, prefix="k-", value_size=8, window=64)
        node.call("wait", index=200, timeout=30)  # the load is under way
        proc = node.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(20) == 0  # the load gave up; the node closed cleanly
        # It answered before exiting: it gave up, or met the node already closed.
        answer = load.result(10)
        assert answer["ok"] is False
        assert re.match(r"Stopping: the node is stopping$|ProposeError: .*CLOSED", answer["error"])
    finally:
        _close(c)
