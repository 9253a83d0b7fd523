"""The handler's metrics as OpenTelemetry observable instruments (a recipe).

OpenTelemetry is not a dependency of d_engine_sm: install ``opentelemetry-api``
and an SDK with an exporter in the application. The callbacks read
``handler.metrics()`` when the SDK collects, as Prometheus does at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from d_engine_sm import METRICS, ApplyWorker, StateMachineHandler

Callback = Callable[[CallbackOptions], Iterable[Observation]]


def instrument(handler: StateMachineHandler, worker: ApplyWorker | None = None) -> None:
    """Declare one observable instrument per entry of ``METRICS``."""
    meter = metrics.get_meter("d_engine_sm")
    labels = {"node_id": handler.node_id}

    def reading(name: str, field: str | None = None) -> list[Callback]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            value: float
            if name == "worker_queued_entries":
                value = worker.queued_entries if worker else 0
            elif name == "worker_failed":
                value = int(worker.failed) if worker else 0
            else:
                raw = handler.metrics()[name]
                value = raw[field or "count"] if isinstance(raw, dict) else raw
            yield Observation(value, labels)

        return [callback]

    for spec in METRICS:
        if spec.source == "worker" and worker is None:
            continue
        if spec.kind == "counter":
            meter.create_observable_counter(
                spec.name, reading(spec.name), unit=spec.unit, description=spec.help
            )
        elif spec.kind == "gauge":
            meter.create_observable_gauge(
                spec.name, reading(spec.name), unit=spec.unit, description=spec.help
            )
        else:  # a summary: its running count and sum, both monotonic
            meter.create_observable_counter(
                f"{spec.name}.count", reading(spec.name, "count"), description=spec.help
            )
            meter.create_observable_counter(
                f"{spec.name}.sum", reading(spec.name, "sum"), unit="s", description=spec.help
            )
