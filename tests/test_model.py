"""A stateful model test: a leader and a follower handler against a plain dict.

Hypothesis drives a ``RuleBasedStateMachine`` through random sequences of:
apply a batch (Insert / Delete / CompareAndSwap / noop and garbage command
bytes) on the leader, read keys, create a snapshot, cleanup with a random
retain count, transfer the newest snapshot to the follower, and restart the
leader (close the handler and its SqliteStateMachine, reopen both over the
same database and snapshot directory). The model is a dict per applied
index. Invariants, checked after every step:

* reads (``read_from_state_machine``) equal the model at ``last_applied``;
  every ``ApplyResult`` equals the model's verdict;
* ``last_applied`` never goes backwards (the follower's moves only through
  an install, and only forwards);
* the newest archive installs, into a fresh handler, to exactly the model's
  state at its index, and ``get_latest_snapshot_metadata()`` names it.

Both nodes (and the fresh check node) use ``SqliteStateMachine``: its
archives hold a SQLite file, which only a SqliteStateMachine installs.
Clocks are fixed, so TTL inserts hidden in garbage bytes never expire.

Profiles (tests/_hypothesis_profiles.py): ``ci`` by default, 30 examples of
up to 25 steps, derandomized; ``HYPOTHESIS_PROFILE=long`` for a soak.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest
from _hypothesis_profiles import PROFILE
from google.protobuf.message import DecodeError
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._values import ApplyResult
from d_engine_sm.errors import StaleSnapshotError
from d_engine_sm.proto import client_pb2, common_pb2, storage_pb2

Meta = storage_pb2.SnapshotMetadata
KEYS: Final = (b"", b"a", b"b", b"c", b"d")
VALUES: Final = st.sampled_from([b"", b"1", b"2", b"x" * 40])
NOW: Final = 1_000_000.0


def fixed_clock() -> float:
    return NOW


# A command is encoded bytes, or None for a noop entry.
COMMANDS = st.one_of(
    st.builds(_kv.insert, st.sampled_from(KEYS), VALUES),
    st.builds(_kv.insert, st.sampled_from(KEYS), VALUES, st.integers(1, 2**40)),
    st.builds(_kv.delete, st.sampled_from(KEYS)),
    st.builds(_kv.compare_and_swap, st.sampled_from(KEYS), st.none() | VALUES, VALUES),
    st.binary(max_size=12),  # garbage; sometimes a valid or empty command
    st.none(),
)


def model_apply(state: dict[bytes, bytes], command: bytes | None) -> bool:
    """The command semantics, written from DESIGN.md against the wire format."""
    if command is None:
        return True
    try:
        cmd = client_pb2.WriteCommand.FromString(command)
    except DecodeError:
        return False
    op = cmd.WhichOneof("operation")
    if op == "insert":
        state[cmd.insert.key] = cmd.insert.value
        return True
    if op == "delete":
        state.pop(cmd.delete.key, None)
        return True
    if op == "compare_and_swap":
        cas = cmd.compare_and_swap
        expected = cas.expected_value if cas.HasField("expected_value") else None
        if state.get(cas.key) != expected:
            return False
        state[cas.key] = cas.new_value
        return True
    return False


def entry(index: int, term: int, command: bytes | None) -> common_pb2.Entry:
    if command is None:
        return _kv.noop_entry(index, term)
    return _kv.command_entry(index, term, command)


def config(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(
        snapshots_dir=directory,
        chunk_size=512,
        cleanup_retain_count=2,
        fsync=False,
        chunk_timeout=10.0,
    )


class Node:
    """A handler over a SqliteStateMachine that can be closed and reopened."""

    def __init__(self, root: Path, node_id: int) -> None:
        self.root = root
        self.node_id = node_id
        self.open()

    def open(self) -> None:
        self.sm = SqliteStateMachine(self.root / "state.db", durability="off", clock=fixed_clock)
        self.handler = StateMachineHandler(
            self.sm, config(self.root / "snapshots"), node_id=self.node_id
        )

    def close(self) -> None:
        self.handler.close()
        self.sm.close()

    def archives(self) -> list[str]:
        d = self.root / "snapshots"
        return sorted(p.name for p in d.glob("snapshot-*.tar.gz")) if d.is_dir() else []


class HandlerModel(RuleBasedStateMachine):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.leader = Node(root / "leader", 1)
        self.follower = Node(root / "follower", 2)
        self.term = 1
        # The model: applied index -> leader state after it (every batch end).
        self.states: dict[int, dict[bytes, bytes]] = {0: {}}
        self.model: dict[bytes, bytes] = {}
        self.leader_applied = 0
        self.follower_applied = 0
        self.snapshots: set[int] = set()  # indices the leader has snapshotted
        self.checked: bytes | None = None  # checksum of the newest archive last verified
        self.checks = itertools.count()

    def teardown(self) -> None:
        self.leader.close()
        self.follower.close()

    # -- rules -----------------------------------------------------------------------
    @rule(commands=st.lists(COMMANDS, min_size=1, max_size=8), new_term=st.booleans())
    def apply_batch(self, commands: list[bytes | None], new_term: bool) -> None:
        if new_term:
            self.term += 1
        first = self.leader.handler.last_applied() + 1
        batch = [entry(first + i, self.term, c) for i, c in enumerate(commands)]
        results = self.leader.handler.apply_chunk(batch)
        verdicts = [model_apply(self.model, c) for c in commands]
        assert results == [ApplyResult(e.index, ok) for e, ok in zip(batch, verdicts, strict=True)]
        self.leader_applied = batch[-1].index
        self.states[self.leader_applied] = dict(self.model)

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=6))
    def read(self, keys: list[bytes]) -> None:
        got = self.leader.handler.read_from_state_machine(keys)
        found = [(k, self.model[k]) for k in keys if k in self.model]
        assert (None if got is None else [(r.key, r.value) for r in got]) == (found or None)

    @rule()
    def create_snapshot(self) -> None:
        h = self.leader.handler
        meta, path = h.create_snapshot()
        assert meta.last_included.index == self.leader_applied
        assert path.name in self.leader.archives()
        assert h.get_latest_snapshot_metadata() == meta
        self.snapshots.add(self.leader_applied)

    @rule(retain=st.integers(1, 3))
    def cleanup(self, retain: int) -> None:
        before = self.leader.archives()
        latest = self.leader.handler.get_latest_snapshot_metadata()
        removed = self.leader.handler.cleanup_snapshot(retain)
        after = self.leader.archives()
        assert len(after) == min(len(before), retain)
        assert sorted([p.name for p in removed] + after) == before
        assert self.leader.handler.get_latest_snapshot_metadata() == latest

    @precondition(lambda self: bool(self.snapshots))
    @rule()
    def transfer(self) -> None:
        meta = self.leader.handler.get_latest_snapshot_metadata()
        assert meta is not None
        index = meta.last_included.index
        f = self.follower.handler
        acks: list[storage_pb2.SnapshotAck] = []
        stream = self.leader.handler.load_snapshot_data(meta)
        if index <= self.follower_applied:
            with pytest.raises(StaleSnapshotError):
                f.apply_snapshot_stream_from_leader(self.term, stream, acks.append)
        else:
            assert f.apply_snapshot_stream_from_leader(self.term, stream, acks.append) == meta
            self.follower_applied = index
            assert f.get_latest_snapshot_metadata() == meta
        assert f.last_applied() == self.follower_applied
        assert self.follower.sm.items() == self.states[self.follower_applied]

    @rule()
    def restart_leader(self) -> None:
        latest = self.leader.handler.get_latest_snapshot_metadata()
        self.leader.close()
        self.leader.open()
        assert self.leader.handler.last_applied() == self.leader_applied
        assert self.leader.handler.get_latest_snapshot_metadata() == latest

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def reads_equal_model(self) -> None:
        h = self.leader.handler
        assert h.last_applied() == self.leader_applied  # never moves otherwise
        assert self.leader.sm.items() == self.states[h.last_applied()]
        got = h.read_from_state_machine(KEYS)
        want = [(k, self.model[k]) for k in KEYS if k in self.model]
        assert (None if got is None else [(r.key, r.value) for r in got]) == (want or None)

    @invariant()
    def follower_moves_only_by_install(self) -> None:
        assert self.follower.handler.last_applied() == self.follower_applied
        assert self.follower.sm.items() == self.states[self.follower_applied]

    @invariant()
    def newest_archive_installs_to_the_model(self) -> None:
        meta = self.leader.handler.get_latest_snapshot_metadata()
        names = self.leader.archives()
        if meta is None:
            assert names == []
            return
        index = meta.last_included.index
        newest = max(names, key=lambda n: int(n.split("-")[1]))
        assert newest == f"snapshot-{index}-{meta.last_included.term}.tar.gz"
        if meta.checksum == self.checked:
            return
        fresh = Node(self.root / f"check-{next(self.checks)}", 3)
        try:
            stream = self.leader.handler.load_snapshot_data(meta)
            if index == 0:  # the empty state at 0: nothing newer to install
                with pytest.raises(StaleSnapshotError):
                    fresh.handler.apply_snapshot_stream_from_leader(
                        self.term, stream, lambda _a: None
                    )
                assert self.states[0] == {}
            else:
                got = fresh.handler.apply_snapshot_stream_from_leader(
                    self.term, stream, lambda _ack: None
                )
                assert got == meta
            assert fresh.handler.last_applied() == index
            assert fresh.sm.items() == self.states[index]
        finally:
            fresh.close()
        self.checked = meta.checksum


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_handler_model(tmp_path: Path) -> None:
    runs = itertools.count()

    class Bound(HandlerModel):
        def __init__(self) -> None:
            super().__init__(tmp_path / f"run-{next(runs)}")

    # Some hypothesis releases leave this function unannotated: call it through a typed name.
    run_as_test: Callable[..., Any] = run_state_machine_as_test
    run_as_test(Bound, settings=PROFILE)
