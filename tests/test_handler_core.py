"""pending / wait / apply / read: d-engine's B001-B024 plus the holes they leave."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import put, puts

from d_engine_sm import (
    ApplyError,
    ApplyOrderError,
    ApplyTimeout,
    HandlerClosed,
    MemoryStateMachine,
    SnapshotConfig,
    StateMachineHandler,
)
from d_engine_sm._values import ApplyResult
from d_engine_sm.proto import common_pb2


def make(config: SnapshotConfig, last_applied: int | None = None) -> StateMachineHandler:
    return StateMachineHandler(MemoryStateMachine(), config, last_applied_index=last_applied)


# -- pending ---------------------------------------------------------------------
def test_update_pending_raises_and_never_lowers(config: SnapshotConfig) -> None:  # B001, B002
    h = make(config)
    h.update_pending(1)
    assert h.pending_commit() == 1
    h.update_pending(10)
    h.update_pending(7)
    assert h.pending_commit() == 10


def test_update_pending_concurrent_max(config: SnapshotConfig) -> None:  # B003
    h = make(config)
    barrier = threading.Barrier(50)

    def run(value: int) -> None:
        barrier.wait()
        for v in range(value - 20, value + 1):
            h.update_pending(max(v, 0))

    threads = [threading.Thread(target=run, args=(v,)) for v in range(1, 51)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.pending_commit() == 50


def test_pending_range(config: SnapshotConfig) -> None:  # B004-B006
    h = make(config, last_applied=10)
    assert h.pending_range() is None
    h.update_pending(7)
    h.update_pending(10)
    assert h.pending_range() is None
    h.update_pending(11)
    assert h.pending_range() == range(11, 12)


def test_constructor_does_not_create_snapshot_dir(config: SnapshotConfig) -> None:  # B008
    make(config)
    assert not config.snapshots_dir.exists()


# -- wait_applied ------------------------------------------------------------------
def test_wait_fast_path_and_equality(config: SnapshotConfig) -> None:  # B010, B011, B016
    h = make(config, last_applied=10)
    h.wait_applied(5, 0)
    h.wait_applied(10, 0)


def test_wait_woken_by_real_apply(config: SnapshotConfig) -> None:  # B012, G004
    h = make(config)
    h.apply_chunk(puts(1, 5))
    started = threading.Event()
    outcome: list[object] = []

    def waiter() -> None:
        started.set()
        try:
            h.wait_applied(10, 30)
            outcome.append(h.read_from_state_machine([b"k10"]))
        except Exception as exc:  # pragma: no cover - reported below
            outcome.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    started.wait()
    h.apply_chunk(puts(6, 5))
    t.join(10)
    assert not t.is_alive()
    # the woken waiter already sees the applied state
    assert outcome and outcome[0] is not None
    assert outcome[0][0].value == b"v10"  # type: ignore[index]


def test_wait_timeout_message(config: SnapshotConfig) -> None:  # B013
    h = make(config, last_applied=5)
    t0 = time.monotonic()
    with pytest.raises(ApplyTimeout) as info:
        h.wait_applied(100, 0.05)
    assert time.monotonic() - t0 >= 0.045
    assert "current_applied: 5" in str(info.value) and "100" in str(info.value)
    assert (info.value.target, info.value.current) == (100, 5)
    assert isinstance(info.value, TimeoutError)


def test_wait_zero_timeout_and_target_zero(config: SnapshotConfig) -> None:  # G011
    h = make(config)
    h.wait_applied(0, 0)
    with pytest.raises(ApplyTimeout):
        h.wait_applied(1, 0)


def test_mixed_targets_only_reached_wake(config: SnapshotConfig) -> None:  # B014, G010
    h = make(config)
    targets = [3] * 7 + [7] * 7 + [20] * 6
    woke: dict[int, list[int]] = {}
    ready = threading.Barrier(len(targets) + 1)
    lock = threading.Lock()

    def waiter(i: int, target: int) -> None:
        ready.wait()
        try:
            h.wait_applied(target, 30)
            with lock:
                woke[i] = [target, h.last_applied()]
        except HandlerClosed:
            pass

    threads = [threading.Thread(target=waiter, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    ready.wait()
    h.apply_chunk(puts(1, 7))
    for i, t in enumerate(threads):
        if targets[i] <= 7:
            t.join(10)
            assert not t.is_alive()
    assert sorted(w[0] for w in woke.values()) == [3] * 7 + [7] * 7
    assert all(w[1] >= w[0] for w in woke.values())
    assert all(t.is_alive() for i, t in enumerate(threads) if targets[i] == 20)
    h.close()
    for t in threads:
        t.join(10)
    assert len(woke) == 14  # the target-20 waiters ended with HandlerClosed


def test_close_wakes_waiters_with_handler_closed(config: SnapshotConfig) -> None:
    h = make(config)
    errors: list[BaseException] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        try:
            h.wait_applied(5, 30)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    started.wait()
    while not h._cond._waiters:  # type: ignore[attr-defined]  # waiter parked on the condition
        time.sleep(0.001)
    h.close()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], HandlerClosed)
    with pytest.raises(HandlerClosed):
        h.wait_applied(9, 1)
    h.close()  # idempotent


def test_sequential_waits(config: SnapshotConfig) -> None:  # B015
    h = make(config)
    for i in range(1, 6):
        h.apply_chunk([put(i, b"k", b"v")])
        h.wait_applied(i, 1)
    assert h.last_applied() == 5


# -- apply_chunk -------------------------------------------------------------------
def test_apply_updates_last_applied_and_returns_results(config: SnapshotConfig) -> None:  # B020
    h = make(config)
    results = h.apply_chunk(puts(1, 3))
    assert results == [ApplyResult(1, True), ApplyResult(2, True), ApplyResult(3, True)]
    assert h.last_applied() == 3


def test_apply_empty(config: SnapshotConfig) -> None:  # B022
    h = make(config)
    h.apply_chunk(puts(1, 2))
    assert h.apply_chunk([]) == []
    assert h.last_applied() == 2


@pytest.mark.parametrize(
    "indices",
    [[2], [1, 3], [1, 2, 2], [0], [1, 2, 4]],
    ids=["gap-first", "gap-inside", "duplicate", "zero", "gap-last"],
)
def test_apply_out_of_order_applies_nothing(config: SnapshotConfig, indices: list[int]) -> None:
    h = make(config)
    entries = [put(i, b"k%d" % n, b"v") for n, i in enumerate(indices)]
    with pytest.raises(ApplyOrderError):
        h.apply_chunk(entries)
    assert h.last_applied() == 0
    assert h.read_from_state_machine([b"k0", b"k1", b"k2"]) is None


def test_apply_overlap_rejected(config: SnapshotConfig) -> None:
    h = make(config)
    h.apply_chunk(puts(1, 5))
    with pytest.raises(ApplyOrderError) as info:
        h.apply_chunk(puts(4, 3))
    assert (info.value.expected, info.value.got) == (6, 4)
    assert h.last_applied() == 5


class Failing(MemoryStateMachine):
    def __init__(self, *, short: bool = False) -> None:
        super().__init__()
        self.short = short

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        if self.short:
            return super().apply_chunk(entries)[:-1]
        raise OSError("Disk failure - cannot write to storage")


def test_state_machine_error_propagates_with_cause(config: SnapshotConfig) -> None:  # B023
    h = StateMachineHandler(Failing(), config)
    with pytest.raises(ApplyError) as info:
        h.apply_chunk([put(1, b"a", b"b")])
    assert isinstance(info.value.__cause__, OSError)
    assert "Disk failure" in str(info.value)
    assert h.last_applied() == 0
    assert h.metrics()["apply_errors"] == 1


def test_wrong_result_count_is_an_error(config: SnapshotConfig) -> None:  # Q11
    h = StateMachineHandler(Failing(short=True), config)
    with pytest.raises(ApplyError, match="1 results for 2 entries"):
        h.apply_chunk(puts(1, 2))
    assert h.last_applied() == 0


def test_last_applied_index_overrides_state_machine(config: SnapshotConfig) -> None:
    sm = MemoryStateMachine()
    sm.apply_chunk(puts(1, 3))
    assert StateMachineHandler(sm, config).last_applied() == 3
    assert StateMachineHandler(sm, config, last_applied_index=10).last_applied() == 10


def test_closed_handler_refuses_apply_and_read(config: SnapshotConfig) -> None:
    h = make(config)
    h.close()
    with pytest.raises(HandlerClosed):
        h.apply_chunk(puts(1, 1))
    with pytest.raises(HandlerClosed):
        h.read_from_state_machine([b"a"])


# -- reads ------------------------------------------------------------------------
def test_read_found_keys_in_request_order(config: SnapshotConfig) -> None:  # G020
    h = make(config)
    h.apply_chunk([put(1, b"a", b"1"), put(2, b"b", b"2")])
    got = h.read_from_state_machine([b"b", b"missing", b"a"])
    assert got is not None
    assert [(r.key, r.value) for r in got] == [(b"b", b"2"), (b"a", b"1")]
    assert h.read_from_state_machine([b"missing"]) is None
    assert h.read_from_state_machine([]) is None


def test_reads_run_during_apply(config: SnapshotConfig) -> None:
    entered = threading.Event()
    release = threading.Event()

    class Slow(MemoryStateMachine):
        def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
            entered.set()
            release.wait(10)
            return super().apply_chunk(entries)

    h = StateMachineHandler(Slow(), config)
    t = threading.Thread(target=h.apply_chunk, args=([put(1, b"a", b"1")],))
    t.start()
    entered.wait(10)
    assert h.read_from_state_machine([b"a"]) is None  # did not block on the apply
    release.set()
    t.join(10)
    assert h.read_from_state_machine([b"a"]) is not None


def test_metrics_counts(config: SnapshotConfig) -> None:
    h = make(config)
    h.apply_chunk(puts(1, 10))
    h.apply_chunk(puts(11, 5))
    m = h.metrics()
    assert m["apply_batches"] == 2 and m["apply_entries"] == 15
    apply_seconds = m["apply_seconds"]
    assert isinstance(apply_seconds, dict) and apply_seconds["count"] == 2
    assert m["last_applied"] == 15


def test_constructor_validates(config: SnapshotConfig, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        StateMachineHandler(object(), config)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="node_id"):
        StateMachineHandler(MemoryStateMachine(), config, node_id=-1)


# -- close(): no write to the state machine after it returns ----------------------------
class Recording(MemoryStateMachine):
    """Counts every write the handler makes; ``install_gate`` holds an install midway."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.install_entered = threading.Event()
        self.install_gate = threading.Event()
        self.install_gate.set()

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        self.writes.append("apply_chunk")
        return super().apply_chunk(entries)

    def apply_snapshot_from_file(self, meta: object, dir: Path) -> None:
        self.install_entered.set()
        assert self.install_gate.wait(30)
        self.writes.append("apply_snapshot_from_file")
        super().apply_snapshot_from_file(meta, dir)  # type: ignore[arg-type]

    def update_last_snapshot_metadata(self, meta: object) -> None:
        self.writes.append("update_last_snapshot_metadata")
        super().update_last_snapshot_metadata(meta)  # type: ignore[arg-type]

    def persist_last_snapshot_metadata(self, meta: object) -> None:
        self.writes.append("persist_last_snapshot_metadata")
        super().persist_last_snapshot_metadata(meta)  # type: ignore[arg-type]


def _leader_chunks(tmp_path: Path, config: SnapshotConfig) -> list[object]:
    """A real snapshot of 300 entries, as chunks (several: chunk_size is 1 KiB)."""
    leader_cfg = SnapshotConfig(
        snapshots_dir=tmp_path / "leader", chunk_size=1024, fsync=False, chunk_timeout=5.0
    )
    with StateMachineHandler(MemoryStateMachine(), leader_cfg, node_id=1) as leader:
        rng = random.Random(7)  # incompressible values: several chunks
        leader.apply_chunk([put(i, b"k%d" % i, rng.randbytes(40)) for i in range(1, 301)])
        meta, _ = leader.create_snapshot()
        chunks = list(leader.load_snapshot_data(meta))
    assert len(chunks) > 3
    return chunks  # type: ignore[return-value]


class _Gated:
    """A chunk iterator that stops before chunk ``at`` until ``go`` is set."""

    def __init__(self, chunks: list[object], at: int) -> None:
        self.chunks, self.at = chunks, at
        self.reached, self.go = threading.Event(), threading.Event()

    def __iter__(self) -> object:
        for seq, chunk in enumerate(self.chunks):
            if seq == self.at:
                self.reached.set()
                assert self.go.wait(30)
            yield chunk


def _receive_in_thread(
    h: StateMachineHandler, stream: object, acks: list[object]
) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            h.apply_snapshot_stream_from_leader(1, stream, acks.append)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def _close_in_thread(h: StateMachineHandler) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        h.close()
        done.set()

    t = threading.Thread(target=run)
    t.start()
    return t, done


def test_close_aborts_a_receive_reading_chunks(tmp_path: Path, config: SnapshotConfig) -> None:
    stream = _Gated(_leader_chunks(tmp_path, config), at=2)
    sm = Recording()
    h = StateMachineHandler(sm, config, node_id=2)
    acks: list[object] = []
    receiver, errors = _receive_in_thread(h, stream, acks)
    assert stream.reached.wait(10)  # the receive holds chunks 0-1, blocked on chunk 2
    closer, closed = _close_in_thread(h)
    stream.go.set()
    closer.join(10)
    assert closed.is_set()
    writes_at_close = list(sm.writes)
    receiver.join(10)
    assert not receiver.is_alive()
    assert writes_at_close == sm.writes == []  # nothing installed, nothing recorded
    assert len(errors) == 1 and isinstance(errors[0], HandlerClosed), errors
    assert acks[-1].status == acks[-1].FAILED  # type: ignore[attr-defined]
    assert h.last_applied() == 0 and len(sm) == 0
    assert not [p for p in config.snapshots_dir.iterdir() if p.name.startswith("temp-")]


def test_close_waits_for_an_install_in_flight(tmp_path: Path, config: SnapshotConfig) -> None:
    chunks = _leader_chunks(tmp_path, config)
    sm = Recording()
    sm.install_gate.clear()
    h = StateMachineHandler(sm, config, node_id=2)
    receiver, errors = _receive_in_thread(h, chunks, [])
    assert sm.install_entered.wait(10)  # install holds the state machine
    closer, closed = _close_in_thread(h)
    closer.join(0.2)  # bounded look: close must still be waiting for the install
    assert not closed.is_set()
    sm.install_gate.set()
    closer.join(10)
    assert closed.is_set()
    writes_at_close = list(sm.writes)
    receiver.join(10)
    assert not errors, errors
    # The install completed and was recorded before close() returned; nothing after.
    assert writes_at_close[0] == "apply_snapshot_from_file"
    assert sm.writes == writes_at_close
    assert h.last_applied() == 300
    with pytest.raises(HandlerClosed):
        h.apply_chunk(puts(301, 1))
    assert sm.writes == writes_at_close


def test_close_from_an_ack_callback_installs_nothing(
    tmp_path: Path, config: SnapshotConfig
) -> None:
    chunks = _leader_chunks(tmp_path, config)
    sm = Recording()
    h = StateMachineHandler(sm, config, node_id=2)
    acks: list[object] = []

    def ack(message: object) -> None:
        acks.append(message)
        if len(acks) == 2:
            h.close()  # on the receiving thread itself: must not wait for itself

    with pytest.raises(HandlerClosed):
        h.apply_snapshot_stream_from_leader(1, chunks, ack)  # type: ignore[arg-type]
    assert sm.writes == []
    assert acks[-1].status == acks[-1].FAILED  # type: ignore[attr-defined]


def test_close_waits_for_an_apply_in_flight(config: SnapshotConfig) -> None:
    entered, gate = threading.Event(), threading.Event()

    class Slow(Recording):
        def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
            entered.set()
            assert gate.wait(30)
            return super().apply_chunk(entries)

    sm = Slow()
    h = StateMachineHandler(sm, config)
    applier = threading.Thread(target=h.apply_chunk, args=(puts(1, 5),))
    applier.start()
    assert entered.wait(10)
    closer, closed = _close_in_thread(h)
    closer.join(0.2)
    assert not closed.is_set()
    gate.set()
    closer.join(10)
    applier.join(10)
    assert closed.is_set() and sm.writes == ["apply_chunk"]
    with pytest.raises(HandlerClosed):
        h.apply_chunk(puts(6, 1))
    assert sm.writes == ["apply_chunk"] and h.last_applied() == 5


def test_create_after_close_is_refused(config: SnapshotConfig) -> None:
    sm = Recording()
    h = StateMachineHandler(sm, config)
    h.apply_chunk(puts(1, 5))
    h.close()
    h.close()  # idempotent, returns at once when nothing runs
    with pytest.raises(HandlerClosed):
        h.create_snapshot()
    assert sm.writes == ["apply_chunk"]
