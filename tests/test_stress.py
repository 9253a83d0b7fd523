"""A short run of benchmarks/stress.py: concurrent load, zero invariant violations.

The script runs as a subprocess (benchmarks are never imported by tests)
for a few seconds in ``tmp_path``: writers through an ApplyWorker checking
read-your-writes, linearizable readers, policy snapshots, two followers
installing concurrently, a cleanup loop. See the script's docstring; the
5-minute figures in the README come from ``--seconds 300``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "stress.py"
SECONDS = 8


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("state_machine", ["sqlite"])
def test_stress_short_run_has_no_violations(tmp_path: Path, state_machine: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--seconds",
            str(SECONDS),
            "--state-machine",
            state_machine,
            "--dir",
            str(tmp_path / "work"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    result = json.loads(proc.stdout)
    assert result["violations"] == 0, result["violation_details"]
    assert proc.returncode == 0
    counts = result["counts"]
    # The run did the work it claims to check.
    assert counts["writes"] > 1_000 and counts["reads"] > 100
    assert counts["snapshots"] >= 2
    assert counts["installs"] >= 1
    assert counts.get("cleanups", 0) >= 1
    for name in ("apply", "wait", "read", "transfer"):
        assert result["latency"][name]["p99_ms"] >= 0
    assert not list((tmp_path / "work").rglob("temp-*"))
