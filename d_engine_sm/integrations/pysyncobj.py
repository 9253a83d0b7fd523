"""Run a :class:`~d_engine_sm.StateMachineHandler` under PySyncObj (experimental).

PySyncObj elects a leader and replicates the log; d_engine_sm applies the
committed entries (on an :class:`~d_engine_sm.ApplyWorker`, never on
PySyncObj's tick thread), serves linearizable reads, and owns snapshots:
log compaction produces this library's archives and a lagging follower
fetches them over this library's gRPC snapshot transport.

Example (a node of a 3-node cluster)::

    from d_engine_sm import SnapshotConfig, SqliteStateMachine, StateMachineHandler, commands
    from d_engine_sm.integrations.pysyncobj import RaftNode

    sm = SqliteStateMachine("n1/state.db")
    handler = StateMachineHandler(sm, SnapshotConfig(snapshots_dir="n1/snapshots"))
    with RaftNode("127.0.0.1:4321", ["127.0.0.1:4322", "127.0.0.1:4323"], handler, "n1",
                  snapshot_addr="127.0.0.1:5321") as node:
        node.propose(commands.insert(b"k", b"v"), timeout=5.0)

Requires the extra ``d_engine_sm[pysyncobj]`` (PySyncObj and grpcio).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated  # type: ignore[import-untyped]

from d_engine_sm._closing import Closing
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._values import ApplyResult
from d_engine_sm._worker import ApplyCompleted, ApplyWorker, FatalError, WorkerEvent
from d_engine_sm.errors import DEngineError
from d_engine_sm.integrations import _bridge
from d_engine_sm.integrations._dump import BadDump, ClusterMismatch
from d_engine_sm.proto import client_pb2

_log = logging.getLogger("d_engine_sm.pysyncobj")

JOURNAL_FILE: Final = "raft.journal"
DUMP_FILE: Final = "raft.dump"
IDENTITY_FILE: Final = "cluster.json"
FAILED_RESULTS_KEPT: Final = 100_000
CLOSE_TIMEOUT: Final = 30.0
_RESERVED: Final = ("serializer", "deserializer", "serializeChecker", "journalFile", "fullDumpFile")


class ProposeError(DEngineError):
    """A proposal did not go through.

    Attributes:
        reason: PySyncObj's failure name (``QUEUE_FULL``, ``MISSING_LEADER``,
            ``DISCARDED``, ``NOT_LEADER``, ``LEADER_CHANGED``, ``REQUEST_DENIED``)
            or ``TIMEOUT``/``NODE_FAILED``/``OUTCOME_UNKNOWN``.
        maybe_applied: True when the command may still be (or have been)
            applied: retrying it can apply it twice.
        detail: what else is known (why the node failed, the timeout), or "".
    """

    def __init__(self, reason: str, maybe_applied: bool, detail: str = "") -> None:
        super().__init__(f"proposal failed: {reason}{': ' + detail if detail else ''}")
        self.reason = reason
        self.maybe_applied = maybe_applied
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.maybe_applied, self.detail))


class ProposeTimeout(ProposeError, TimeoutError):
    """No answer within the timeout: the command may still be applied."""

    def __init__(
        self, reason: str = "TIMEOUT", maybe_applied: bool = True, detail: str = ""
    ) -> None:
        super().__init__(reason, maybe_applied, detail)


_FAIL_NAMES: Final = {value: name for name, value in vars(FAIL_REASON).items() if name.isupper()}
# Outcomes where PySyncObj cannot know whether the entry will commit.
_MAYBE: Final = {FAIL_REASON.LEADER_CHANGED}


class _Engine(SyncObj):  # type: ignore[misc]
    """PySyncObj's node with one replicated method; all logic is in the bridge."""

    def __init__(
        self, bridge: _bridge.Forwarder, self_addr: str, partners: Sequence[str], conf: SyncObjConf
    ) -> None:
        self._bridge = bridge
        super().__init__(self_addr, list(partners), conf)

    @replicated  # type: ignore[untyped-decorator]
    def _propose(self, command: bytes | None) -> int:
        return self._bridge.on_regular(command)


class RaftNode(Closing):
    """A PySyncObj node whose state machine is a d_engine_sm handler.

    Args:
        self_addr: this node's Raft address, ``host:port``.
        partners: the other members' Raft addresses.
        handler: the caller's handler (any state machine); the node neither
            starts nor closes it. Its ``snapshots_dir`` holds the archives.
        data_dir: PySyncObj's journal and dump, and the cluster identity.
        snapshot_addr: ``host:port`` where this node serves its archives
            (gRPC); None serves none (then it can never help a follower).
        snapshot_peers: Raft address → snapshot address of the other
            members, tried when catching up (besides the dump's source).
        cluster_id: this cluster's identity; default derived from the sorted
            member addresses. A data_dir or dump of another cluster is refused.
        options: any other ``SyncObjConf`` setting (``appendEntriesUseBatch``,
            ``logCompactionMinEntries``, ``password``, …). Its serializer,
            journal and dump settings are this class's own.

    Create it on a thread that outlives it (PySyncObj stops ticking when its
    creating thread exits). All methods are thread-safe.

    Raises:
        ClusterMismatch: data_dir or the state belongs to another cluster.
        ValueError: a reserved option, or bad addresses.
    """

    def __init__(
        self,
        self_addr: str,
        partners: Iterable[str],
        handler: StateMachineHandler,
        data_dir: str | Path,
        *,
        snapshot_addr: str | None = None,
        snapshot_peers: Mapping[str, str] | None = None,
        cluster_id: str | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(handler, StateMachineHandler):
            raise TypeError("handler must be a StateMachineHandler")
        for name in _RESERVED:
            if name in options:
                raise ValueError(f"option {name!r} is set by RaftNode itself")
        partners = [p for p in partners if p != self_addr]
        self._self_addr = self_addr
        self._handler = handler
        self._data_dir = Path(data_dir)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._cluster_id = cluster_id or _default_cluster_id([self_addr, *partners])
        self._snapshot_peers = dict(snapshot_peers or {})
        self._check_identity()
        self._started_applied = handler.last_applied()
        self._stats = _bridge.Stats()
        self._lock = threading.Lock()
        self._failed: OrderedDict[int, None] = OrderedDict()
        self._jumps: list[tuple[int, int]] = []  # (from, to] covered by installs, not applies
        self._fatal: str | None = None
        self._closed = False
        self._worker = ApplyWorker(handler, self._on_event, max_queued_entries=1_000_000)
        self._worker.start()
        self._engine: _Engine | None = None
        self._server: Any = None
        try:
            self._start(self_addr, partners, snapshot_addr, options)
        except BaseException:
            self._shutdown()
            raise

    def _start(
        self,
        self_addr: str,
        partners: list[str],
        snapshot_addr: str | None,
        options: dict[str, Any],
    ) -> None:
        handler = self._handler
        if snapshot_addr is not None:
            from d_engine_sm.transport.grpc import start_server

            self._server, _port = start_server(handler, snapshot_addr)
        self._compaction = _bridge.Compaction(
            handler,
            self._data_dir / DUMP_FILE,
            self._cluster_id,
            snapshot_addr,
            self._stats,
            engine=lambda: self._engine,
        )
        self._catch_up = _bridge.CatchUp(
            handler, lambda: self._forwarder.forwarded, self._sources, self._caught_up, self._stats
        )
        self._forwarder = _bridge.Forwarder(
            handler, self._worker, lambda: self._engine, self._stats, self._catch_up.start
        )
        conf = SyncObjConf(
            journalFile=str(self._data_dir / JOURNAL_FILE),
            fullDumpFile=str(self._data_dir / DUMP_FILE),
            serializer=self._compaction.serializer,
            deserializer=self._compaction.deserializer,
            serializeChecker=self._compaction.checker,
            **options,
        )
        # The tick thread starts inside the constructor and may call the bridge at once.
        engine = _Engine(self._forwarder, self_addr, partners, conf)
        self._engine = engine
        problem = _bridge.check_journal(handler, engine._SyncObj__raftLog)  # pyright: ignore[reportAttributeAccessIssue]
        if problem is not None:
            raise ClusterMismatch(f"{problem}: the state belongs to another cluster; refusing")
        engine.addOnTickCallback(self._forwarder.on_tick)

    # -- identity ------------------------------------------------------------
    def _check_identity(self) -> None:
        path = self._data_dir / IDENTITY_FILE
        applied = self._handler.last_applied()
        if path.exists():
            try:
                found = json.loads(path.read_text())["cluster_id"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BadDump(f"{path} is unreadable: {exc}") from exc
            if found != self._cluster_id:
                raise ClusterMismatch(
                    f"{self._data_dir} belongs to cluster {found!r}, not {self._cluster_id!r}"
                )
            return
        if applied > 0:
            raise ClusterMismatch(
                f"the state machine already applied index {applied} but {self._data_dir}"
                " holds no cluster identity: it comes from another cluster or node;"
                " start from an empty state (or restore it with `d-engine-sm snapshot restore`)"
            )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"cluster_id": self._cluster_id, "self": self._self_addr}))
        tmp.replace(path)

    # -- proposals -----------------------------------------------------------
    def propose(self, command: bytes, timeout: float) -> ApplyResult:
        """Replicate ``command`` (from :mod:`d_engine_sm.commands`); any node.

        Returns once the entry is applied on *this* node, with its result.

        Raises:
            ProposeError: not committed (``maybe_applied`` says whether it may be).
            ProposeTimeout: no answer within ``timeout`` (it may still apply).
            ApplyTimeout: committed, not applied here within ``timeout``.
        """
        if not isinstance(command, bytes):
            raise TypeError("command must be bytes")
        deadline = time.monotonic() + timeout
        index = self._replicate(command, timeout)
        self._handler.wait_applied(index, max(0.0, deadline - time.monotonic()))
        return self._result(index)

    def propose_async(self, command: bytes, callback: Callable[[Any, int], None]) -> None:
        """Replicate without waiting: ``callback(index, FAIL_REASON)`` runs on PySyncObj's
        tick thread once the entry is committed (and queued for applying here) or failed.

        For pipelining many writes; the callback must be quick. ``wait_applied(index)``
        on the handler then waits for the apply.

        Raises:
            ProposeError: the node is closed, or has stopped applying (``NODE_FAILED``):
                nothing is proposed, since this node would never apply it.
        """
        self._check_usable()
        assert self._engine is not None
        self._engine._propose(command, callback=callback)  # pyright: ignore[reportCallIssue]

    def barrier(self, timeout: float) -> int:
        """Commit a no-op through the log; returns its index.

        Once ``handler.wait_applied(index)`` returns, reads on this node see
        every write acknowledged before the barrier started (linearizable).
        """
        return self._replicate(_bridge.BARRIER, timeout)

    def read(
        self, keys: Sequence[bytes], *, linearizable: bool = True, timeout: float = 5.0
    ) -> list[client_pb2.ClientResult] | None:
        """Read ``keys``; with ``linearizable`` after a barrier (one log round trip)."""
        if linearizable:
            deadline = time.monotonic() + timeout
            index = self.barrier(timeout)
            self._handler.wait_applied(index, max(0.0, deadline - time.monotonic()))
        return self._handler.read_from_state_machine(keys)

    def _check_usable(self) -> None:
        if self._closed or self._engine is None:
            raise ProposeError("CLOSED", False, "node is closed")
        if self._fatal is not None:
            raise ProposeError("NODE_FAILED", False, self._fatal)  # refused, not proposed

    def _replicate(self, command: bytes | None, timeout: float) -> int:
        self._check_usable()
        done = threading.Event()
        box: list[Any] = []

        def callback(result: Any, error: int) -> None:
            box.append((result, error))
            done.set()

        assert self._engine is not None
        self._engine._propose(command, callback=callback)  # pyright: ignore[reportCallIssue]
        if not done.wait(timeout):
            raise ProposeTimeout(detail=f"no answer within {timeout}s")
        result, error = box[0]
        if error != FAIL_REASON.SUCCESS:
            raise ProposeError(_FAIL_NAMES.get(error, str(error)), error in _MAYBE)
        assert isinstance(result, int)
        return result

    def _result(self, index: int) -> ApplyResult:
        with self._lock:
            if any(lo < index <= hi for lo, hi in self._jumps):
                raise ProposeError(
                    "OUTCOME_UNKNOWN", True, f"index {index} arrived inside an installed snapshot"
                )
            failed = index in self._failed
        return ApplyResult.failure(index) if failed else ApplyResult.success(index)

    def _on_event(self, event: WorkerEvent) -> None:
        if isinstance(event, ApplyCompleted):
            failed = [r.index for r in event.results if not r.succeeded]
            if failed:
                with self._lock:
                    for index in failed:
                        self._failed[index] = None
                    while len(self._failed) > FAILED_RESULTS_KEPT:
                        self._failed.popitem(last=False)
        elif isinstance(event, FatalError):
            self._fatal = f"{event.source}: {event.error}"
            self._forwarder.failed = self._fatal
            _log.error("node stopped applying: %s", self._fatal)

    # -- catch-up --------------------------------------------------------------
    def _sources(self) -> list[str]:
        out: list[str] = []
        loaded = self._compaction.loaded
        if loaded is not None and loaded.source:
            out.append(loaded.source)
        engine = self._engine
        leader = None if engine is None else engine._getLeader()
        if leader is not None and str(leader) in self._snapshot_peers:
            out.append(self._snapshot_peers[str(leader)])
        out.extend(self._snapshot_peers.values())
        own = self._compaction.source
        return [s for i, s in enumerate(out) if s not in out[:i] and s != own]

    def _caught_up(self, applied: int) -> None:
        with self._lock:
            self._jumps.append((self._forwarder.forwarded, applied))
            del self._jumps[:-16]
        self._forwarder.resume(applied)

    # -- status and lifecycle ------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A snapshot of this node's view (local; may be stale on a deposed leader)."""
        engine = self._engine
        leader = None if engine is None else engine._getLeader()
        stats = self._stats
        return {
            "self": self._self_addr,
            "leader": None if leader is None else str(leader),
            "is_leader": leader is not None and str(leader) == self._self_addr,
            "term": 0 if engine is None else engine.raftCurrentTerm,
            "commit_index": 0 if engine is None else engine.raftCommitIndex,
            "raft_last_applied": 0 if engine is None else engine.raftLastApplied,
            "last_applied": self._handler.last_applied(),
            "started_applied": self._started_applied,
            "catching_up": self._forwarder.catching_up,
            "failed": self._fatal,
            "snapshots_created": stats.snapshots_created,
            "snapshots_installed": stats.snapshots_installed,
            "snapshot_create_seconds": stats.snapshot_create_seconds,
            "catch_up_seconds": stats.catch_up_seconds,
            "catch_up_term_changes": stats.catch_up_term_changes,
            "max_hook_seconds": stats.max_hook_seconds,
            "max_hook_wall_seconds": stats.max_hook_wall_seconds,
            "max_tick_gap_seconds": stats.max_tick_gap_seconds,
            "terms_seen": stats.elections_seen,
            "cluster_id": self._cluster_id,
        }

    def force_compaction(self) -> None:
        """Ask PySyncObj to compact its log now (an archive is created in the background)."""
        assert self._engine is not None
        self._compaction.hurry()
        self._engine.forceLogCompaction()

    def close(self) -> None:
        """Stop PySyncObj, drain applies, stop serving. Idempotent; blocking (bounded)."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.destroy()
            thread = engine._SyncObj__thread  # pyright: ignore[reportAttributeAccessIssue]
            if thread is not None:
                thread.join(CLOSE_TIMEOUT)
        for part in ("_forwarder", "_catch_up", "_compaction"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close(CLOSE_TIMEOUT)
        self._worker.shutdown(drain=True, timeout=CLOSE_TIMEOUT)
        if self._server is not None:
            self._server.stop(grace=1.0).wait(CLOSE_TIMEOUT)
            self._server = None


def _default_cluster_id(members: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(set(members))).encode()).hexdigest()[:16]


__all__ = ["BadDump", "ClusterMismatch", "ProposeError", "ProposeTimeout", "RaftNode"]
