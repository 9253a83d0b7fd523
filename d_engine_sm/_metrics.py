"""Counters and latency summaries behind ``StateMachineHandler.metrics()``."""

from __future__ import annotations

import threading
from collections import deque
from typing import Final

_WINDOW: Final = 1024  # recent observations kept for percentiles


class _Summary:
    __slots__ = ("count", "max", "recent", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.recent: deque[float] = deque(maxlen=_WINDOW)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        self.recent.append(value)

    def as_dict(self) -> dict[str, float]:
        ordered = sorted(self.recent)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

        return {
            "count": self.count,
            "sum": self.total,
            "max": self.max,
            "p50": pct(0.50),
            "p99": pct(0.99),
        }


class Metrics:
    """Thread-safe counters (``incr``) and duration summaries (``observe``).

    Names say their unit: ``*_seconds`` are durations, ``*_bytes`` sizes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._summaries: dict[str, _Summary] = {}

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + amount

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            summary = self._summaries.get(name)
            if summary is None:
                summary = self._summaries[name] = _Summary()
            summary.observe(seconds)

    def applied(self, entries: int, seconds: float) -> None:
        """One successful apply batch (hot path: one lock round trip)."""
        with self._lock:
            counters = self._counters
            counters["apply_batches"] = counters.get("apply_batches", 0) + 1
            counters["apply_entries"] = counters.get("apply_entries", 0) + entries
            summary = self._summaries.get("apply_seconds")
            if summary is None:
                summary = self._summaries["apply_seconds"] = _Summary()
            summary.observe(seconds)

    def snapshot(self) -> dict[str, int | dict[str, float]]:
        with self._lock:
            out: dict[str, int | dict[str, float]] = dict(self._counters)
            for name, summary in self._summaries.items():
                out[name] = summary.as_dict()
        return out


# Names every handler reports from the start (zero until something happens).
COUNTERS: Final = (
    "apply_batches",
    "apply_entries",
    "apply_errors",
    "snapshot_creates",
    "snapshot_create_errors",
    "snapshot_sends",
    "snapshot_sent_bytes",
    "snapshot_receives",
    "snapshot_received_bytes",
    "snapshot_receive_errors",
    "watch_events",
    "watch_dropped",
)
SUMMARIES: Final = (
    "apply_seconds",
    "snapshot_create_seconds",
    "snapshot_send_seconds",
    "snapshot_receive_seconds",
)


def new_handler_metrics() -> Metrics:
    metrics = Metrics()
    for name in COUNTERS:
        metrics.incr(name, 0)
    with metrics._lock:
        for name in SUMMARIES:
            metrics._summaries[name] = _Summary()
    return metrics
