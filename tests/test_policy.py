from __future__ import annotations

import threading

import pytest

from d_engine_sm._policy import CompositePolicy, LogSizePolicy, TimeBasedPolicy
from d_engine_sm._values import SnapshotContext, log_id
from d_engine_sm.proto import common_pb2

LEADER = common_pb2.NODE_ROLE_LEADER
FOLLOWER = common_pb2.NODE_ROLE_FOLLOWER


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ctx(
    applied: int, included: int, role: int = LEADER, term: int = 1, inc_term: int = 1
) -> SnapshotContext:
    return SnapshotContext(role, log_id(included, inc_term), log_id(applied, term), term)


def test_log_size_threshold_inclusive_and_below() -> None:  # B041, B042
    p = LogSizePolicy(1000, 1.0, clock=Clock())
    assert p.should_trigger(ctx(1500, 500))
    q = LogSizePolicy(1000, 1.0, clock=Clock())
    assert not q.should_trigger(ctx(1499, 500))


def test_log_size_cooldown(tmp_path: object) -> None:  # B043, B044
    clock = Clock()
    p = LogSizePolicy(100, 1.0, clock=clock)
    assert p.should_trigger(ctx(100, 0))
    assert not p.should_trigger(ctx(300, 0))
    clock.now += 0.999
    assert not p.should_trigger(ctx(300, 0))
    clock.now += 0.001
    assert p.should_trigger(ctx(300, 0))


def test_log_size_follower_and_dynamic_threshold() -> None:  # B045, B046
    clock = Clock()
    assert LogSizePolicy(100, 0, clock=clock).should_trigger(ctx(100, 0, role=FOLLOWER))
    p = LogSizePolicy(1000, 1.0, clock=clock)
    assert not p.should_trigger(ctx(700, 0))
    p.update_threshold(700)
    assert p.should_trigger(ctx(700, 0))  # the failed check did not start a cooldown
    with pytest.raises(ValueError, match="threshold"):
        p.update_threshold(0)


def test_log_size_term_regression() -> None:  # B047
    p = LogSizePolicy(100, 0, clock=Clock())
    assert not p.should_trigger(SnapshotContext(LEADER, log_id(100, 3), log_id(200, 2), 2))


def test_log_size_concurrent_exactly_one_trigger() -> None:  # B048 without timing
    p = LogSizePolicy(10, 60.0, clock=Clock())
    hits: list[bool] = []
    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        hits.extend(p.should_trigger(ctx(50, 0)) for _ in range(2000))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hits.count(True) == 1


def test_time_based() -> None:  # B050-B053 (binary-exact times: no float drift)
    clock = Clock()
    p = TimeBasedPolicy(0.125, clock=clock)
    assert not p.should_trigger(ctx(0, 0))
    clock.now += 0.125
    assert p.should_trigger(ctx(0, 0))
    assert not p.should_trigger(ctx(0, 0, role=FOLLOWER))  # leader only
    clock.now += 0.0625
    p.reset_timer()
    assert not p.should_trigger(ctx(0, 0))
    clock.now += 0.125
    p.mark_snapshot_created()
    assert not p.should_trigger(ctx(0, 0))


def test_composite() -> None:  # B055-B060
    clock = Clock()
    p = CompositePolicy(0.125, 1000, 1.0, clock=clock)
    assert not p.should_trigger(ctx(0, 0))
    clock.now += 0.25
    assert p.should_trigger(ctx(0, 0))
    p.mark_snapshot_created()
    assert not p.should_trigger(ctx(0, 0))

    q = CompositePolicy(3600, 5, 0, clock=clock)
    assert not q.should_trigger(ctx(0, 0))
    assert q.should_trigger(ctx(6, 0))
    q.mark_snapshot_created()
    assert not q.should_trigger(ctx(6, 6))
    assert not q.should_trigger(ctx(4 + 6, 6))
    assert q.should_trigger(ctx(6 + 6, 6))

    f = CompositePolicy(0.01, 1, 1.0, clock=clock)
    clock.now += 1
    assert not f.should_trigger(ctx(100, 0, role=FOLLOWER))


def test_bad_policy_args() -> None:
    with pytest.raises(ValueError, match="cooldown"):
        LogSizePolicy(1, -1)
    with pytest.raises(ValueError, match="interval"):
        TimeBasedPolicy(-0.5)


def test_log_size_skipped_trigger_starts_no_cooldown() -> None:
    clock = Clock()
    p = LogSizePolicy(100, 3600.0, clock=clock)
    assert p.should_trigger(ctx(100, 0))
    p.mark_snapshot_skipped()  # another writer held the directory: no snapshot
    assert p.should_trigger(ctx(100, 0))  # so the very next check tries again
    p.mark_snapshot_created()
    assert not p.should_trigger(ctx(200, 0))  # a real snapshot starts the cooldown
    p.mark_snapshot_skipped()  # a manual create skipped: no trigger to withdraw
    assert not p.should_trigger(ctx(300, 0))
    clock.now += 3600.0
    assert p.should_trigger(ctx(300, 0))


def test_composite_skipped_trigger_starts_no_cooldown() -> None:
    p = CompositePolicy(3600.0, 100, 3600.0, clock=Clock())
    assert p.should_trigger(ctx(100, 0))
    p.mark_snapshot_skipped()
    assert p.should_trigger(ctx(100, 0))
