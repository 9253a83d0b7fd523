"""The metrics table, and the counters and latency summaries behind ``handler.metrics()``."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, Protocol

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
        """Add ``amount`` to counter ``name``. Non-blocking, thread-safe."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + amount

    def observe(self, name: str, seconds: float) -> None:
        """Record one duration in summary ``name``. Non-blocking, thread-safe."""
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
        """A consistent copy of every counter and summary. Non-blocking, thread-safe."""
        with self._lock:
            out: dict[str, int | dict[str, float]] = dict(self._counters)
            for name, summary in self._summaries.items():
                out[name] = summary.as_dict()
        return out


Kind = Literal["counter", "gauge", "summary"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its key in ``handler.metrics()``, kind, unit and help text.

    ``source`` says what reports it: ``"handler"`` (``StateMachineHandler.metrics()``)
    or ``"worker"`` (an ``ApplyWorker``). A summary's value is a dict of
    ``count``, ``sum``, ``max`` (since start) and ``p50``/``p99`` (of the
    latest 1,024 observations).
    """

    name: str
    kind: Kind
    unit: str
    help: str
    source: Literal["handler", "worker"] = "handler"


# Every metric the package reports, declared once: the handler's dict, the
# Prometheus collector and the docs all read this table.
METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec(
        "apply_batches", "counter", "batches", "Entry batches applied to the state machine."
    ),
    MetricSpec("apply_entries", "counter", "entries", "Entries applied to the state machine."),
    MetricSpec("apply_errors", "counter", "batches", "Apply calls the state machine failed."),
    MetricSpec("apply_seconds", "summary", "seconds", "Duration of one applied batch."),
    MetricSpec("snapshot_creates", "counter", "snapshots", "Snapshots created."),
    MetricSpec("snapshot_create_errors", "counter", "snapshots", "Snapshot creations that failed."),
    MetricSpec("snapshot_create_seconds", "summary", "seconds", "Duration of a snapshot creation."),
    MetricSpec("snapshot_sends", "counter", "snapshots", "Snapshots streamed to a follower."),
    MetricSpec("snapshot_sent_bytes", "counter", "bytes", "Archive bytes streamed to followers."),
    MetricSpec("snapshot_send_seconds", "summary", "seconds", "Duration of streaming a snapshot."),
    MetricSpec("snapshot_receives", "counter", "snapshots", "Snapshots received and installed."),
    MetricSpec("snapshot_received_bytes", "counter", "bytes", "Archive bytes received."),
    MetricSpec(
        "snapshot_receive_errors", "counter", "snapshots", "Snapshot receptions that failed."
    ),
    MetricSpec(
        "snapshot_receive_seconds", "summary", "seconds", "Duration of receiving and installing."
    ),
    MetricSpec("watch_events", "counter", "events", "Watch events delivered to watchers."),
    MetricSpec(
        "watch_dropped", "counter", "events", "Watch events dropped (a watcher's queue full)."
    ),
    MetricSpec("last_applied", "gauge", "index", "Index of the last applied entry."),
    MetricSpec("pending_commit", "gauge", "index", "Highest commit index the handler was told of."),
    MetricSpec(
        "state_behind_snapshot",
        "gauge",
        "entries",
        "Entries the state lacks to reach its newest snapshot (0 normally).",
    ),
    MetricSpec(
        "worker_queued_entries", "gauge", "entries", "Entries queued in the apply worker.", "worker"
    ),
    MetricSpec(
        "worker_failed", "gauge", "1", "1 once the apply worker has stopped on a failure.", "worker"
    ),
)

# What the handler counts itself (zero until something happens).
COUNTERS: Final = tuple(m.name for m in METRICS if m.source == "handler" and m.kind == "counter")
SUMMARIES: Final = tuple(m.name for m in METRICS if m.kind == "summary")


class _Worker(Protocol):
    @property
    def queued_entries(self) -> int: ...
    @property
    def failed(self) -> bool: ...


def worker_metrics(worker: _Worker) -> dict[str, int]:
    """The ``"worker"`` metrics of an ``ApplyWorker``, read now."""
    return {"worker_queued_entries": worker.queued_entries, "worker_failed": int(worker.failed)}


def new_handler_metrics() -> Metrics:
    """Metrics for a handler, every declared counter present at zero."""
    metrics = Metrics()
    for name in COUNTERS:
        metrics.incr(name, 0)
    with metrics._lock:
        for name in SUMMARIES:
            metrics._summaries[name] = _Summary()
    return metrics
