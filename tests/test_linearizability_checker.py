"""The register checker used by the cluster tests must accept and refuse."""

from __future__ import annotations

import math

from _linearizability import UNKNOWN, Op, check, check_key


def w(v: str, call: float, ret: float, key: str = "k") -> Op:
    return Op("write", key, v, None, call, ret)


def r(v: str | None, call: float, ret: float, key: str = "k") -> Op:
    return Op("read", key, None, v, call, ret)


def cas(exp: str | None, new: str, ok: object, call: float, ret: float) -> Op:
    return Op("cas", "k", (exp, new), ok, call, ret)


def test_sequential_history_is_linearizable() -> None:
    assert check_key([w("a", 0, 1), r("a", 2, 3), cas("a", "b", True, 4, 5), r("b", 6, 7)])


def test_stale_read_is_refused() -> None:
    assert not check_key([w("a", 0, 1), w("b", 2, 3), r("a", 4, 5)])


def test_concurrent_write_may_be_seen_either_way() -> None:
    assert check_key([w("a", 0, 1), w("b", 2, 6), r("a", 3, 4), r("b", 7, 8)])
    assert not check_key([w("a", 0, 1), w("b", 2, 6), r("b", 3, 4), r("a", 7, 8)])


def test_cas_result_must_match_state() -> None:
    assert not check_key([w("a", 0, 1), cas("a", "b", False, 2, 3)])
    assert not check_key([cas(None, "x", False, 0, 1)])  # absent key: a None CAS succeeds
    assert check_key([cas(None, "x", True, 0, 1), r("x", 2, 3)])


def test_unknown_outcome_may_apply_late_or_never() -> None:
    late = [w("a", 0, 1), w("b", 2, math.inf), r("a", 3, 4), r("b", 10, 11)]
    assert check_key(late)
    never = [w("a", 0, 1), w("b", 2, math.inf), r("a", 3, 4), r("a", 10, 11)]
    assert check_key(never)
    flip = [w("a", 0, 1), w("b", 2, math.inf), r("b", 3, 4), r("a", 10, 11)]
    assert not check_key(flip)
    assert check_key([cas("a", "c", UNKNOWN, 0, math.inf), r(None, 1, 2)])


def test_keys_are_checked_separately() -> None:
    ops = [w("a", 0, 1, "x"), r("a", 2, 3, "x"), w("b", 0, 1, "y"), r("c", 2, 3, "y")]
    assert check(ops) == ["y"]
