"""Prometheus exposition of a handler's (and an apply worker's) metrics.

Needs the ``prometheus`` extra (``pip install 'd-engine-sm[prometheus]'``).
Values are read when Prometheus scrapes, never copied in the background::

    from d_engine_sm.prometheus import start_metrics_server

    server = start_metrics_server("127.0.0.1:9464", handler, worker)
    ...
    server.close()

Names are ``d_engine_sm_<name>`` from the package's metric table
(``d_engine_sm.METRICS``), each with a ``node_id`` label; counters end in
``_total``; a summary has ``_count``, ``_sum`` and the ``0.5`` and ``0.99``
quantiles of its latest 1,024 observations.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client import start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
        SummaryMetricFamily,
    )
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "d_engine_sm.prometheus needs prometheus-client: pip install 'd-engine-sm[prometheus]'"
    ) from exc

from d_engine_sm._metrics import METRICS, MetricSpec, worker_metrics

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from d_engine_sm._handler import StateMachineHandler
    from d_engine_sm._worker import ApplyWorker

__all__ = ["HandlerCollector", "MetricsServer", "start_metrics_server"]

NAMESPACE = "d_engine_sm"
_QUANTILES = (("0.5", "p50"), ("0.99", "p99"))
_BASE_UNITS = ("seconds", "bytes")  # Prometheus puts only base units in names


class HandlerCollector(Collector):
    """A collector for one handler and, optionally, the ``ApplyWorker`` feeding it.

    Register it on a ``CollectorRegistry`` (one per handler: two handlers'
    metrics share names). Every scrape calls ``handler.metrics()`` once.
    """

    def __init__(self, handler: StateMachineHandler, worker: ApplyWorker | None = None) -> None:
        self._handler = handler
        self._worker = worker
        self._labels = {"node_id": str(handler.node_id)}

    def _specs(self) -> Iterator[MetricSpec]:
        for spec in METRICS:
            if spec.source == "handler" or self._worker is not None:
                yield spec

    def describe(self) -> Iterable[Metric]:
        """The metric families, without values (read at registration). Non-blocking."""
        return [_family(spec, ()) for spec in self._specs()]

    def collect(self) -> Iterable[Metric]:
        """The current values, read from the handler (and worker) at scrape time. Non-blocking."""
        values: dict[str, int | dict[str, float]] = dict(self._handler.metrics())
        if self._worker is not None:
            values.update(worker_metrics(self._worker))
        families = []
        for spec in self._specs():
            family = _family(spec, tuple(self._labels))
            _add(family, values[spec.name], self._labels)
            families.append(family)
        return families


def _family(spec: MetricSpec, labels: tuple[str, ...]) -> Metric:
    name = f"{NAMESPACE}_{spec.name}"
    unit = spec.unit if spec.unit in _BASE_UNITS else ""
    if spec.kind == "counter":
        return CounterMetricFamily(name, spec.help, labels=labels, unit=unit)
    if spec.kind == "gauge":
        return GaugeMetricFamily(name, spec.help, labels=labels, unit=unit)
    return SummaryMetricFamily(name, spec.help, labels=labels, unit=unit)


def _add(family: Metric, value: int | dict[str, float], labels: dict[str, str]) -> None:
    if isinstance(value, dict):
        assert isinstance(family, SummaryMetricFamily)
        family.add_metric(list(labels.values()), int(value["count"]), value["sum"])
        for quantile, key in _QUANTILES:
            family.add_sample(family.name, {**labels, "quantile": quantile}, value[key])
    else:
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric(list(labels.values()), value)


class MetricsServer:
    """An HTTP endpoint serving ``/metrics`` on a daemon thread; ``close()`` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def host(self) -> str:
        """The address the server is bound to. Non-blocking."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when asked for port 0)."""
        return int(self._server.server_address[1])

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port (waits up to ``timeout`` for the thread)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) to a host and a port.

    Raises:
        ValueError: no port, a port that is not an integer in 0..65535, or no host.
    """
    host, sep, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0..65535, got {address!r}")
    return host, int(port_text)


def start_metrics_server(
    address: str,
    handler: StateMachineHandler,
    worker: ApplyWorker | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> MetricsServer:
    """Serve ``handler``'s (and ``worker``'s) metrics at ``http://address/metrics``.

    ``address`` is ``HOST:PORT``; port 0 picks a free port (``.port`` says
    which). The collector goes on ``registry`` when given (with whatever else
    it holds), else on a registry of its own.

    Raises:
        ValueError: a malformed address.
        OSError: the address cannot be bound (in use, not local).
    """
    host, port = parse_address(address)
    if registry is None:
        registry = CollectorRegistry()
    collector = HandlerCollector(handler, worker)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except BaseException:
        registry.unregister(collector)
        raise
    return MetricsServer(server, thread)
