"""The scale benchmark still runs end to end (tiny sizes; its figures are not checked).

The benchmark runs as a subprocess (benchmarks are never imported by tests);
only the shape of its JSON report is asserted, never a speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scale.py"


@pytest.mark.timeout(180)
def test_bench_scale_runs_and_reports_every_phase() -> None:
    args = ["--keys", "3000", "--install-keys", "1000", "--repeat", "1", "--json"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=170,
    )
    report = json.loads(out.stdout)
    assert (report["keys"], report["install_keys"]) == (3000, 1000)
    for section in ("scale", "install_small"):
        assert set(report[section]) == {"memory", "sqlite"}
        for figures in report[section].values():
            assert figures["archive_bytes"] > 0
            for phase in ("create", "stream", "install"):
                assert figures[phase]["seconds"] > 0
                assert figures[phase]["ratio_vs_tar"] > 0
                assert figures[phase]["rss_growth_mib"] >= 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("state", ["sqlite", "memory"])
def test_bench_install_stall_runs_and_reports_both_installs(state: str) -> None:
    script = SCRIPT.parent / "bench_install_stall.py"
    args = ["--state", state, "--keys", "2000", "--repeat", "1", "--json"]
    out = subprocess.run(
        [sys.executable, str(script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=110,
    )
    report = json.loads(out.stdout)
    assert (report["state"], report["keys"]) == (state, 2000) and report["stall_ratio"] > 0
    for name in ("prepared", "paused"):
        figures = report["medians"][name]
        assert figures["install_seconds"] > 0 and figures["max_apply_gap_seconds"] >= 0
