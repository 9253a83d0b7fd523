"""The PySyncObj integration's failure paths, in one process: RaftNode's
refusals and its failed states, the tick-thread bridge fed a scripted
journal, the catch-up's sources, the compaction job and the dump format.

Single-node PySyncObj clusters use short election timeouts so a leader
exists within a fraction of a second.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import pickle
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pysyncobj")

from pysyncobj.config import SERIALIZER_STATE  # type: ignore[import-untyped]
from pysyncobj.pickle import dumps as pysyncobj_dumps  # type: ignore[import-untyped]

from d_engine_sm import (
    ApplyWorker,
    MemoryStateMachine,
    SnapshotConfig,
    StateMachineHandler,
    commands,
)
from d_engine_sm._values import LogId
from d_engine_sm._worker import FatalError, WorkerEvent
from d_engine_sm.integrations import _bridge, _dump
from d_engine_sm.integrations.pysyncobj import (
    BadDump,
    ClusterMismatch,
    ProposeError,
    ProposeTimeout,
    RaftNode,
)
from d_engine_sm.proto import common_pb2

# A single node elects itself within ~0.2 s instead of up to 1.4 s.
FAST: dict[str, Any] = {
    "appendEntriesUseBatch": False,
    "appendEntriesPeriod": 0.02,
    "raftMinTimeout": 0.1,
    "raftMaxTimeout": 0.2,
}


def free_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def new_handler(snapshots: Path) -> StateMachineHandler:
    return StateMachineHandler(
        MemoryStateMachine(), SnapshotConfig(snapshots_dir=snapshots, fsync=False)
    )


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[StateMachineHandler]:
    with new_handler(tmp_path / "snapshots") as h:
        yield h


def inserts(first: int, count: int, term: int = 1) -> list[common_pb2.Entry]:
    return [
        commands.entry(i, term, commands.insert(b"k%d" % i, b"v%d" % i))
        for i in range(first, first + count)
    ]


def items(h: StateMachineHandler) -> dict[bytes, bytes]:
    sm = h.state_machine
    assert isinstance(sm, MemoryStateMachine)
    return sm.items()


def bridge_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the integration logged (other loggers may log too)."""
    return [r for r in caplog.records if r.name == "d_engine_sm.pysyncobj"]


# -- ProposeError ------------------------------------------------------------------------
def test_propose_errors_pickle_with_their_whole_message() -> None:
    err = ProposeError("NODE_FAILED", True, "StateMachine: disk on fire")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ProposeError
    assert (back.reason, back.maybe_applied, back.detail) == ("NODE_FAILED", True, err.detail)
    assert str(back) == str(err) == "proposal failed: NODE_FAILED: StateMachine: disk on fire"
    timeout = pickle.loads(pickle.dumps(ProposeTimeout(detail="no answer within 0.5s")))
    assert isinstance(timeout, ProposeTimeout) and isinstance(timeout, TimeoutError)
    assert str(timeout) == "proposal failed: TIMEOUT: no answer within 0.5s"
    assert timeout.maybe_applied is True


# -- RaftNode refusals and failed states ---------------------------------------------------
def test_a_handler_is_required(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^handler must be a StateMachineHandler$"):
        RaftNode(free_addr(), [], MemoryStateMachine(), tmp_path)  # type: ignore[arg-type]
    assert not tmp_path.joinpath("cluster.json").exists()


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"self": "x"}'])
def test_an_unreadable_identity_file_is_refused(
    handler: StateMachineHandler, tmp_path: Path, content: str
) -> None:
    (tmp_path / "cluster.json").write_text(content)
    with pytest.raises(BadDump, match=r"cluster\.json is unreadable: "):
        RaftNode(free_addr(), [], handler, tmp_path)
    assert (tmp_path / "cluster.json").read_text() == content  # left for the operator


@pytest.mark.timeout(30)
def test_without_a_leader_proposals_time_out_and_a_closed_node_refuses(
    handler: StateMachineHandler, tmp_path: Path
) -> None:
    # The other member never answers: no majority, so no leader; commands wait for one.
    node = RaftNode(free_addr(), [free_addr()], handler, tmp_path, **FAST)
    try:
        with pytest.raises(TypeError, match=r"^command must be bytes$"):
            node.propose("text", timeout=1)  # type: ignore[arg-type]
        with pytest.raises(
            ProposeTimeout, match=r"^proposal failed: TIMEOUT: no answer within 0\.2s$"
        ) as exc:
            node.propose(commands.insert(b"k", b"v"), timeout=0.2)
        assert exc.value.maybe_applied is True  # it may still commit later
        assert node.status()["leader"] is None and handler.last_applied() <= 1
    finally:
        node.close()
    node.close()  # idempotent
    assert node.status()["term"] == 0  # no engine left
    for call in (
        lambda: node.propose(commands.insert(b"k", b"v"), timeout=1),
        lambda: node.propose_async(commands.insert(b"k", b"v"), callback=lambda r, e: None),
        lambda: node.barrier(timeout=1),
        lambda: node.read([b"k"], timeout=1),
    ):
        with pytest.raises(ProposeError, match=r"^proposal failed: CLOSED: node is closed$") as err:
            call()
        assert (err.value.reason, err.value.maybe_applied) == ("CLOSED", False)


class _FailsOnBoom(MemoryStateMachine):
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[Any]:
        if any(b"boom" in e.SerializeToString() for e in entries):
            raise RuntimeError("disk on fire")
        return super().apply_chunk(entries)


class _Watched(RaftNode):
    """A RaftNode that also signals the apply worker's fatal event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fatal = threading.Event()
        super().__init__(*args, **kwargs)

    def _on_event(self, event: WorkerEvent) -> None:
        super()._on_event(event)
        if isinstance(event, FatalError):
            self.fatal.set()


@pytest.mark.timeout(30)
def test_a_failing_state_machine_stops_the_node_from_taking_proposals(tmp_path: Path) -> None:
    sm = _FailsOnBoom()
    with (
        StateMachineHandler(sm, SnapshotConfig(snapshots_dir=tmp_path / "s", fsync=False)) as h,
        _Watched(free_addr(), [], h, tmp_path / "n", **FAST) as node,
    ):
        assert node.propose(commands.insert(b"ok", b"1"), timeout=10).succeeded
        applied = h.last_applied()
        node.propose_async(commands.insert(b"boom", b"2"), callback=lambda r, e: None)
        assert node.fatal.wait(10)
        failed = node.status()["failed"]
        assert failed is not None and failed.startswith("StateMachine: ")
        assert "disk on fire" in failed
        commit_index = node.status()["commit_index"]
        later = commands.insert(b"later", b"3")
        for call in (
            lambda: node.propose(later, timeout=5),
            # Nothing is proposed: this node could never apply it.
            lambda: node.propose_async(later, callback=lambda r, e: None),
            lambda: node.barrier(timeout=5),
        ):
            with pytest.raises(ProposeError) as err:
                call()
            assert (err.value.reason, err.value.maybe_applied) == ("NODE_FAILED", False)
            assert str(err.value) == f"proposal failed: NODE_FAILED: {failed}"
        assert node.status()["commit_index"] == commit_index
        assert h.last_applied() == applied and sm.items() == {b"ok": b"1"}


@pytest.mark.timeout(30)
def test_state_of_another_term_is_refused_and_the_node_shuts_down(tmp_path: Path) -> None:
    addr, data = free_addr(), tmp_path / "n"
    with (
        new_handler(tmp_path / "s1") as h1,
        RaftNode(addr, [], h1, data, **FAST) as node,
    ):
        for i in range(3):
            assert node.propose(commands.insert(b"a%d" % i, b"v"), timeout=10).succeeded
        term = node.status()["term"]
    # A state that applied index 2 at another term, put under this node's data dir.
    with new_handler(tmp_path / "s2") as h2:
        h2.apply_chunk(inserts(1, 2, term=term + 7))
        before = set(threading.enumerate())
        with pytest.raises(ClusterMismatch) as exc:
            RaftNode(addr, [], h2, data, **FAST)
        assert str(exc.value) == (
            f"the state machine applied index 2 at term {term + 7}, but this node's Raft log"
            f" has term {term} there: the state belongs to another cluster; refusing"
        )
        # Everything the refused node started was stopped again.
        assert [t.name for t in set(threading.enumerate()) - before if t.is_alive()] == []
    # The journal is intact and the address free: an empty state replays it all.
    with (
        new_handler(tmp_path / "s3") as h3,
        RaftNode(addr, [], h3, data, **FAST) as node,
    ):
        assert node.propose(commands.insert(b"b", b"v"), timeout=10).succeeded
        assert items(h3) == {b"a0": b"v", b"a1": b"v", b"a2": b"v", b"b": b"v"}
        assert node.status()["failed"] is None


def test_check_journal_compares_the_term_where_the_journal_covers_the_state(
    handler: StateMachineHandler,
) -> None:
    handler.apply_chunk(inserts(1, 3, term=1))
    log = [(b"\x01", 2, 1), (b"\x01", 3, 2), (b"\x01", 4, 2)]
    assert _bridge.check_journal(handler, log) == (
        "the state machine applied index 3 at term 1, but this node's Raft log has term 2 there"
    )
    assert _bridge.check_journal(handler, [(b"\x01", 3, 1), (b"\x01", 4, 2)]) is None
    assert _bridge.check_journal(handler, [(b"\x01", 4, 2), (b"\x01", 5, 2)]) is None
    assert _bridge.check_journal(handler, []) is None


# -- the bridge fed a scripted journal -------------------------------------------------------
class FakeEngine:
    """What the bridge reads of PySyncObj's engine."""

    def __init__(self, log: list[tuple[bytes, int, int]]) -> None:
        self._SyncObj__raftLog = log
        self.raftCurrentTerm = log[-1][2]
        self.raftLastApplied = log[-1][1]


def regular(call: object) -> bytes:
    """A REGULAR journal entry as PySyncObj's ``@replicated`` writes it."""
    pickled: bytes = pysyncobj_dumps(call)
    return bytes([_bridge.REGULAR]) + pickled


NOOP = bytes([1])  # PySyncObj's NO_OP entry


@pytest.mark.timeout(30)
def test_journal_entries_become_entries_and_a_short_journal_waits(
    handler: StateMachineHandler,
) -> None:
    log = [
        (NOOP, 1, 1),
        (regular((0, (commands.insert(b"a", b"1"),))), 2, 1),
        (regular((0, (None,))), 3, 1),  # a barrier
        (regular(0), 4, 1),  # a call without arguments: not ours
        (regular((0, (b"x", b"y"))), 5, 1),  # two arguments: not ours
        (regular((0, (commands.insert(b"b", b"2"),))), 6, 2),
    ]
    engine = FakeEngine(log)
    fetches: list[int] = []
    with ApplyWorker(handler, lambda e: None) as worker:
        fwd = _bridge.Forwarder(handler, worker, lambda: engine, _bridge.Stats(), fetches.append)
        try:
            fwd.on_tick()
            assert fwd.forwarded == 6
            handler.wait_applied(6, 10)
            assert items(handler) == {b"a": b"1", b"b": b"2"}
            assert handler.state_machine.last_applied() == LogId(index=6, term=2)
            # PySyncObj re-appending a follower's log: applied says 7, the journal ends at 6.
            engine.raftLastApplied = 7
            fwd.on_tick()
            assert fwd.forwarded == 6
            log.append((regular((0, (commands.insert(b"c", b"3"),))), 7, 2))
            fwd.on_tick()
            assert fwd.forwarded == 7
            handler.wait_applied(7, 10)
            assert items(handler)[b"c"] == b"3"
            assert fetches == [] and fwd.failed is None
        finally:
            fwd.close(10)


def test_a_stopped_worker_stops_forwarding(
    handler: StateMachineHandler, caplog: pytest.LogCaptureFixture
) -> None:
    worker = ApplyWorker(handler, lambda e: None)
    worker.shutdown()
    engine = FakeEngine([(NOOP, 1, 1), (regular((0, (commands.insert(b"a", b"1"),))), 2, 1)])
    fwd = _bridge.Forwarder(handler, worker, lambda: engine, _bridge.Stats(), lambda i: None)
    with caplog.at_level(logging.ERROR, logger="d_engine_sm.pysyncobj"):
        fwd.on_tick()
        fwd.close(10)  # the feeder already ended on the error
    assert fwd.failed is not None and fwd.failed.startswith("apply worker: ")
    assert "shut down" in fwd.failed
    assert any(r.message.startswith("forwarding stopped: ") for r in bridge_log(caplog))
    engine._SyncObj__raftLog.append((NOOP, 3, 1))
    engine.raftLastApplied = 3
    fwd.on_tick()
    assert fwd.forwarded == 2  # nothing more is handed over
    assert handler.last_applied() == 0


# -- catch-up ------------------------------------------------------------------------------
def _archive(snapshots: Path, n: int) -> StateMachineHandler:
    """A handler with ``n`` entries applied and archived (left open)."""
    h = new_handler(snapshots)
    h.apply_chunk(inserts(1, n))
    h.create_snapshot()
    return h


def _catch_up(
    h: StateMachineHandler, sources: list[str], applied: int = 0
) -> tuple[_bridge.CatchUp, list[int], threading.Event, _bridge.Stats]:
    done: list[int] = []
    finished = threading.Event()
    stats = _bridge.Stats()

    def on_done(index: int) -> None:
        done.append(index)
        finished.set()

    return (
        _bridge.CatchUp(h, lambda: applied, lambda: sources, on_done, stats),
        done,
        finished,
        stats,
    )


@pytest.mark.timeout(30)
def test_catch_up_installs_a_newer_local_archive(tmp_path: Path) -> None:
    _archive(tmp_path / "s", 20).close()
    with new_handler(tmp_path / "s") as h:  # the state was lost, its archives were not
        assert h.last_applied() == 0
        cu, done, finished, stats = _catch_up(h, [])
        cu.start(21)
        assert finished.wait(10)
        cu.close(10)
        assert done == [20] and stats.snapshots_installed == 1
        assert len(items(h)) == 20 and h.last_applied() == 20


def test_a_local_archive_that_fails_to_install_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _archive(tmp_path / "s", 20).close()
    with new_handler(tmp_path / "s") as h:
        path = tmp_path / "s" / "snapshot-20-1.tar.gz"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        cu, _done, _finished, stats = _catch_up(h, [])
        with caplog.at_level(logging.WARNING, logger="d_engine_sm.pysyncobj"):
            assert cu._try_once(21) is False
        assert any(
            r.message.startswith(f"installing local archive {path} failed: ")
            for r in bridge_log(caplog)
        )
        assert stats.snapshots_installed == 0 and h.last_applied() == 0 and items(h) == {}


@pytest.mark.timeout(30)
def test_catch_up_skips_dead_and_stale_sources(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("grpc")
    from d_engine_sm.transport.grpc import start_server

    dead = free_addr()  # nothing listens there
    source = _archive(tmp_path / "src", 20)
    server, port = start_server(source, "127.0.0.1:0")
    good = f"127.0.0.1:{port}"
    try:
        with new_handler(tmp_path / "dst") as h:
            cu, done, finished, stats = _catch_up(h, [dead, good])
            with caplog.at_level(logging.WARNING, logger="d_engine_sm.pysyncobj"):
                cu.start(21)
                assert finished.wait(20)
                cu.close(10)
            assert done == [20] and stats.snapshots_installed == 1
            assert items(h) == items(source)
            failed = [r.message for r in bridge_log(caplog) if r.levelno == logging.WARNING]
            assert len(failed) == 1 and failed[0].startswith(f"catch-up from {dead} failed: ")
            # Later, more is needed than the source has: it is stale, skipped silently.
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="d_engine_sm.pysyncobj"):
                assert cu._try_once(41) is False
            warned = [r.message for r in bridge_log(caplog) if r.levelno == logging.WARNING]
            assert len(warned) == 1 and warned[0].startswith(f"catch-up from {dead} failed")
            assert stats.snapshots_installed == 1 and h.last_applied() == 20
    finally:
        server.stop(grace=None).wait(10)
        source.close()


def test_catch_up_stops_when_forwarded_entries_never_apply(
    handler: StateMachineHandler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_bridge, "SNAPSHOT_WAIT", 0.05)
    cu, done, _finished, _stats = _catch_up(handler, [], applied=5)
    with caplog.at_level(logging.ERROR, logger="d_engine_sm.pysyncobj"):
        cu.start(10)
        cu.close(10)
    assert done == []
    assert [r.message for r in bridge_log(caplog)] == [
        "catch-up stopped: timeout waiting for state machine to apply index 5"
        " (timeout: 0.05s, current_applied: 0)"
    ]


# -- compaction --------------------------------------------------------------------------------
DUMP = _dump.Dump(
    cluster_id="other",
    last=(b"\x00abc", 10, 2),
    prev=(b"\x01", 9, 2),
    members=("127.0.0.1:1",),
    archive_index=12,
    archive_term=2,
    archive_sha256=bytes(range(32)),
    source=None,
)


def test_a_dump_of_another_cluster_or_garbage_is_refused(
    handler: StateMachineHandler, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "raft.dump"
    _dump.write_durably(path, DUMP)
    comp = _bridge.Compaction(handler, path, "c1", None, _bridge.Stats())
    with caplog.at_level(logging.ERROR, logger="d_engine_sm.pysyncobj"):
        with pytest.raises(
            ClusterMismatch,
            match=f"^dump {path} belongs to cluster 'other', this node to 'c1'$",
        ):
            comp.deserializer(str(path))
        path.write_bytes(b"\x80pickled by plain PySyncObj")
        with pytest.raises(BadDump, match=r"^not a d-engine-sm dump \(27 bytes\)$"):
            comp.deserializer(str(path))
    assert comp.loaded is None
    assert [r.message for r in bridge_log(caplog)] == [f"refusing dump path={path}"] * 2


def test_a_bug_in_the_compaction_job_fails_it_without_a_dump(
    handler: StateMachineHandler,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_bridge, "FAILED_BACKOFF", 0.0)

    def broken() -> Any:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(handler, "create_snapshot", broken)
    handler.apply_chunk(inserts(1, 2))
    stats = _bridge.Stats()
    comp = _bridge.Compaction(handler, tmp_path / "raft.dump", "c1", None, stats)
    with caplog.at_level(logging.ERROR, logger="d_engine_sm.pysyncobj"):
        with pytest.raises(_bridge._Deferred):
            comp.serializer("unused", ((b"\x01", 2, 1), (b"\x01", 1, 1), []))
        assert comp._thread is not None
        comp._thread.join(10)
    assert comp.checker() == SERIALIZER_STATE.FAILED
    assert comp.checker() == SERIALIZER_STATE.NOT_SERIALIZING  # PySyncObj may retry
    assert not (tmp_path / "raft.dump").exists() and stats.snapshots_created == 0
    [record] = bridge_log(caplog)
    assert record.message == "compaction at index=2 failed" and record.exc_info is not None
    comp.close(10)


def test_the_compaction_point_advances_only_onto_journal_entries(
    handler: StateMachineHandler, tmp_path: Path
) -> None:
    log = [(b"\x01", 5, 1), (b"\x01", 6, 1), (b"\x01", 8, 1), (b"\x01", 9, 1)]
    engine = FakeEngine(log)
    comp = _bridge.Compaction(
        handler, tmp_path / "raft.dump", "c1", None, _bridge.Stats(), engine=lambda: engine
    )
    last, prev = (b"\x01", 4, 1), (b"\x01", 3, 1)
    assert comp._advance(last, prev, 6) == ((b"\x01", 6, 1), (b"\x01", 5, 1))
    assert comp._advance(last, prev, 5) == (last, prev)  # the entry before it is trimmed
    assert comp._advance(last, prev, 8) == (last, prev)  # a gap before it in the journal
    assert comp._advance(last, prev, 10) == (last, prev)  # not applied yet
    assert comp._advance(last, prev, 3) == (last, prev)  # not past the requested point


# -- the dump's content ----------------------------------------------------------------------
def _signed(obj: dict[str, Any]) -> bytes:
    head = _dump.MAGIC + json.dumps(obj).encode()
    return head + hashlib.sha256(head).digest()


def _fields(**change: Any) -> dict[str, Any]:
    good = json.loads(_dump.encode(DUMP)[len(_dump.MAGIC) : -32])
    assert isinstance(good, dict)
    good.update(change)
    return good


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            _fields(archive={"index": 1, "term": 1, "sha256": "00" * 31}),
            "archive sha256 is not 32 bytes",
        ),
        (
            _fields(archive={"index": -1, "term": 1, "sha256": "00" * 32}),
            "expected an int >= 0, got -1",
        ),
        (
            _fields(archive={"index": 1, "term": True, "sha256": "00" * 32}),
            "expected an int >= 0, got True",
        ),
        (_fields(last=[base64.b64encode(b"x").decode(), 1.5, 1]), "expected an int >= 0, got 1.5"),
        (_fields(last=["not base64!", 1, 1]), "base64"),
        (_fields(prev=[1, 2]), "not enough values to unpack"),
        ({k: v for k, v in _fields().items() if k != "members"}, "'members'"),
        (_fields(members=None), "'NoneType' object is not iterable"),
    ],
)
def test_a_signed_dump_with_bad_content_is_refused(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(BadDump, match=r"^malformed dump: ") as exc:
        _dump.decode(_signed(obj))
    assert message in str(exc.value)
