"""Shared helpers for the benchmark scripts (timing and reporting only)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any


def measure(fn: Callable[[], float | None], *, repeat: int, warmup: int = 1) -> list[float]:
    """Run ``fn`` warmup+repeat times; each run returns its own figure or None (elapsed s)."""
    out = []
    for i in range(warmup + repeat):
        t0 = time.perf_counter()
        value = fn()
        figure = value if value is not None else time.perf_counter() - t0
        if i >= warmup:
            out.append(figure)
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def report(
    rows: dict[str, dict[str, float]], ratios: dict[str, float], as_json: bool, unit: str
) -> None:
    if as_json:
        print(json.dumps({"unit": unit, "results": rows, "ratios": ratios}, indent=2))
        return
    width = max(len(name) for name in rows)
    for name, s in rows.items():
        print(
            f"{name:<{width}}  median {s['median']:>14,.1f}  "
            f"min {s['min']:>14,.1f}  max {s['max']:>14,.1f}  {unit}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Json = dict[str, Any]
