"""A small linearizability checker for a per-key register (Wing & Gong's
search with Lowe's memoisation of (linearized set, state)).

Operations on one key: ``write(v)``, ``read() -> v | None``,
``cas(expected, new) -> bool`` (``expected=None``: succeeds only if absent).
An operation whose outcome is unknown (timeout, node killed) has
``ret = inf``: it may take effect at any point after its call, or never.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

UNKNOWN = object()


@dataclass(frozen=True)
class Op:
    kind: str  # "write" | "read" | "cas"
    key: str
    arg: Any  # write: value; cas: (expected, new); read: None
    result: Any  # read: value or None; cas: bool; write: None; UNKNOWN when not known
    call: float
    ret: float  # math.inf when the outcome is unknown


def _apply(state: str | None, op: Op) -> tuple[bool, str | None]:
    """(is this op's observed result legal from ``state``, the state after it)."""
    if op.kind == "write":
        return True, op.arg
    if op.kind == "read":
        return op.result is UNKNOWN or op.result == state, state
    expected, new = op.arg
    succeeded = state == expected
    if op.result is not UNKNOWN and op.result != succeeded:
        return False, state
    return True, new if succeeded else state


class GaveUp(Exception):
    """The search exceeded its budget: neither proven nor refuted."""


def _observed(ops: list[Op]) -> set[Any]:
    seen: set[Any] = set()
    for op in ops:
        if op.kind == "read" and op.result is not UNKNOWN:
            seen.add(op.result)
        elif op.kind == "cas":
            seen.add(op.arg[0])
    return seen


def _drop_unobserved(ops: list[Op]) -> list[Op]:
    """Unknown-outcome writes whose value nobody ever saw are taken as not applied.

    Values are unique per write, so such an op can only matter by making a
    concurrent CAS fail; taking it as never applied only makes the check
    stricter (a false alarm, never a missed violation), and it keeps the
    search from trying every subset of them.
    """
    seen = _observed(ops)
    out = []
    for op in ops:
        if op.ret == math.inf and op.kind in ("write", "cas"):
            value = op.arg if op.kind == "write" else op.arg[1]
            if value not in seen:
                continue
        out.append(op)
    return out


def check_key(ops: list[Op], initial: str | None = None, budget: int = 2_000_000) -> bool:
    """True when the history of one key is linearizable.

    Raises:
        GaveUp: more than ``budget`` search states.
    """
    ops = sorted(_drop_unobserved(ops), key=lambda o: o.call)
    n = len(ops)
    must = sum(1 << i for i, o in enumerate(ops) if o.ret != math.inf)
    seen: set[tuple[int, str | None]] = set()
    stack: list[tuple[int, str | None]] = [(0, initial)]
    while stack:
        done, state = stack.pop()
        if done & must == must:
            return True
        if (done, state) in seen:
            continue
        seen.add((done, state))
        if len(seen) > budget:
            raise GaveUp(f"{len(seen)} states for {n} operations")
        pending = [i for i in range(n) if not done >> i & 1]
        horizon = min(ops[i].ret for i in pending)
        nexts = []
        for i in pending:
            if ops[i].call > horizon:
                break  # sorted by call: no later op can go first
            legal, after = _apply(state, ops[i])
            if legal:
                nexts.append((done | 1 << i, after))
        stack.extend(reversed(nexts))  # the earliest call is tried first
    return False


def check(ops: Iterable[Op]) -> list[str]:
    """Keys whose histories are not linearizable (empty: all good)."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    return sorted(k for k, history in by_key.items() if not check_key(history))
