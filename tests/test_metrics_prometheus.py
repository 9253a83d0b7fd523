"""The metric table, ``handler.metrics()``, and a real Prometheus scrape of both."""

from __future__ import annotations

import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import puts

from d_engine_sm import (
    METRICS,
    ApplyResult,
    ApplyWorker,
    FatalError,
    MemoryStateMachine,
    NewCommitData,
    SnapshotConfig,
    StateMachineHandler,
)
from d_engine_sm.proto import common_pb2

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families

from d_engine_sm.prometheus import (
    HandlerCollector,
    parse_address,
    start_metrics_server,
)

LEADER = common_pb2.NODE_ROLE_LEADER
HANDLER_SPECS = [m for m in METRICS if m.source == "handler"]


def test_table_declares_each_metric_once_with_kind_unit_help() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert spec.kind in ("counter", "gauge", "summary"), spec
        assert spec.unit and spec.help.endswith("."), spec
        assert spec.source in ("handler", "worker"), spec
        assert spec.kind != "summary" or spec.unit == "seconds", spec


def test_handler_dict_has_exactly_the_declared_metrics(handler: StateMachineHandler) -> None:
    handler.apply_chunk(puts(1, 3))
    out = handler.metrics()
    assert set(out) == {m.name for m in HANDLER_SPECS}
    for spec in HANDLER_SPECS:
        value = out[spec.name]
        if spec.kind == "summary":
            assert isinstance(value, dict)
            assert set(value) == {"count", "sum", "max", "p50", "p99"}
        else:
            assert isinstance(value, int), spec
    assert out["apply_entries"] == 3 and out["last_applied"] == 3


def _scrape(port: int) -> dict[str, Metric]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    wanted = {"node_id": "7", **labels}
    found = [s.value for s in families[family].samples if s.name == sample and s.labels == wanted]
    assert len(found) == 1, (sample, families[family].samples)
    return float(found[0])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[StateMachineHandler, ApplyWorker]]:
    config = SnapshotConfig(snapshots_dir=tmp_path / "snapshots", fsync=False)
    with (
        StateMachineHandler(MemoryStateMachine(), config, node_id=7) as handler,
        ApplyWorker(handler, lambda event: None) as worker,
    ):
        yield handler, worker


def test_scrape_over_http_reports_kinds_names_and_live_values(
    node: tuple[StateMachineHandler, ApplyWorker],
) -> None:
    handler, worker = node
    worker.submit(puts(1, 40), NewCommitData(40, LEADER, 1))
    worker.submit(puts(41, 60), NewCommitData(100, LEADER, 1))
    handler.wait_applied(100, timeout=10)
    handler.create_snapshot()
    with start_metrics_server("127.0.0.1:0", handler, worker) as server:
        families = _scrape(server.port)
        kinds = {name.removeprefix("d_engine_sm_"): f.type for name, f in families.items()}
        assert kinds == {m.name: m.kind for m in METRICS}
        batches = handler.metrics()["apply_batches"]
        assert isinstance(batches, int) and 1 <= batches <= 2  # the worker may coalesce
        assert _value(families, "d_engine_sm_apply_entries_total") == 100
        assert _value(families, "d_engine_sm_apply_batches_total") == batches
        assert _value(families, "d_engine_sm_apply_seconds_count") == batches
        assert _value(families, "d_engine_sm_apply_seconds_sum") > 0
        p99 = _value(families, "d_engine_sm_apply_seconds", quantile="0.99")
        assert 0 < p99 <= _value(families, "d_engine_sm_apply_seconds_sum")
        assert _value(families, "d_engine_sm_snapshot_creates_total") == 1
        assert _value(families, "d_engine_sm_snapshot_create_seconds_count") == 1
        assert _value(families, "d_engine_sm_last_applied") == 100
        assert _value(families, "d_engine_sm_worker_queued_entries") == 0
        assert _value(families, "d_engine_sm_worker_failed") == 0
        assert _value(families, "d_engine_sm_apply_errors_total") == 0

        # Read at scrape time: new applies show up in the next scrape.
        worker.submit(puts(101, 5), NewCommitData(105, LEADER, 1))
        handler.wait_applied(105, timeout=10)
        again = _scrape(server.port)
        assert _value(again, "d_engine_sm_apply_entries_total") == 105
        assert _value(again, "d_engine_sm_last_applied") == 105
        port = server.port
    with pytest.raises(urllib.error.URLError):  # closed: the port no longer answers
        _scrape(port)


def test_without_a_worker_only_handler_metrics(handler: StateMachineHandler) -> None:
    registry = CollectorRegistry()
    registry.register(HandlerCollector(handler))
    handler.apply_chunk(puts(1, 2))
    assert registry.get_sample_value("d_engine_sm_apply_entries_total", {"node_id": "1"}) == 2
    assert registry.get_sample_value("d_engine_sm_last_applied", {"node_id": "1"}) == 2
    names = {f.name for f in registry.collect()}
    assert names == {f"d_engine_sm_{m.name}" for m in HANDLER_SPECS}


def test_two_handlers_in_one_registry_are_refused(handler: StateMachineHandler) -> None:
    registry = CollectorRegistry()
    registry.register(HandlerCollector(handler))
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(HandlerCollector(handler))


@pytest.mark.parametrize(
    "address", ["9464", "127.0.0.1", ":9464", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:65536"]
)
def test_bad_address_is_a_value_error(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(address)


def test_addresses() -> None:
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("localhost:65535") == ("localhost", 65535)


def test_busy_port_is_an_os_error_and_leaves_the_registry_clean(
    handler: StateMachineHandler,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        registry = CollectorRegistry()
        with pytest.raises(OSError):
            start_metrics_server(f"127.0.0.1:{taken.getsockname()[1]}", handler, registry=registry)
    assert list(registry.collect()) == []
    with start_metrics_server("127.0.0.1:0", handler, registry=registry) as server:
        assert "d_engine_sm_last_applied" in _scrape(server.port)


class _Failing(MemoryStateMachine):
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        raise OSError("disk gone")


def test_a_failed_worker_shows_in_the_scrape(tmp_path: Path) -> None:
    config = SnapshotConfig(snapshots_dir=tmp_path / "snapshots", fsync=False)
    failed = threading.Event()
    with (
        StateMachineHandler(_Failing(), config, node_id=7) as handler,
        ApplyWorker(handler, lambda e: failed.set() if isinstance(e, FatalError) else None) as w,
    ):
        w.submit(puts(1, 3), NewCommitData(3, LEADER, 1))
        assert failed.wait(10)
        with start_metrics_server("127.0.0.1:0", handler, w) as server:
            families = _scrape(server.port)
        assert _value(families, "d_engine_sm_worker_failed") == 1
        assert _value(families, "d_engine_sm_apply_errors_total") == 1
        assert _value(families, "d_engine_sm_last_applied") == 0


def test_readme_table_lists_every_metric() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| ", section, re.M)
    assert rows == [(m.name, m.kind) for m in METRICS]


def test_readme_metrics_recipes_are_valid_python() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # Prometheus, OpenTelemetry
    for block in blocks:
        compile(block, "README.md", "exec")
    assert "start_metrics_server" in blocks[0] and "create_observable_counter" in blocks[1]
