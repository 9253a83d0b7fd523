"""The README's quickstart runs as written, and its first lines are the two set-up commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_first_lines_are_the_two_commands() -> None:
    head = README.read_text().splitlines()[:6]
    assert any("d-engine-sm demo" in line for line in head)
    assert any("./scripts/run-tests" in line for line in head)


def test_quickstart_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    quickstart = blocks[0]
    assert "StateMachineHandler" in quickstart and "ApplyWorker" in quickstart
    done = subprocess.run(
        [sys.executable, "-c", quickstart],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert 'key: "k7"' in done.stdout
