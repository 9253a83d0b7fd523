"""pending / wait / apply / read: d-engine's B001-B024 plus the holes they leave."""

from __future__ import annotations

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
