"""``d-engine-sm serve --metrics``: a real Prometheus endpoint, parsed by prometheus-client."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("grpc")
parser = pytest.importorskip("prometheus_client.parser")

from _cli_helpers import cli, serve  # noqa: E402


@pytest.mark.timeout(60)
def test_serve_exposes_the_handlers_metrics(tmp_path: Path) -> None:
    with serve(tmp_path / "snaps", "--metrics", "127.0.0.1:0") as peer:
        line = peer.lines.get(timeout=30)
        assert line is not None and line.startswith("metrics at http://127.0.0.1:"), line
        url = line.split()[-1]
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    applied = families["d_engine_sm_last_applied"]
    assert applied.type == "gauge"
    assert [s.value for s in applied.samples] == [0.0]


def test_serve_refuses_a_malformed_metrics_address(tmp_path: Path) -> None:
    done = cli("serve", "--dir", str(tmp_path), "--listen", "127.0.0.1:0", "--metrics", "nope")
    assert done.returncode == 2
    assert "--metrics" in done.stderr and "HOST:PORT" in done.stderr
