"""Fail when line coverage is under a floor; print lines, branches and both.

coverage.py's own ``fail_under`` judges lines and branches together; this
gate holds statements alone to a higher floor. Reads ``coverage json``.

    python scripts/coverage_gate.py coverage.json --lines 95
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("report", type=Path, help="the output of `coverage json`")
    parser.add_argument("--lines", type=float, required=True, help="minimum line coverage, %%")
    args = parser.parse_args(argv)
    totals = json.loads(args.report.read_text())["totals"]
    lines = totals["percent_statements_covered"]
    print(
        f"coverage: lines {lines:.1f}% ({totals['covered_lines']}/{totals['num_statements']}), "
        f"branches {totals['percent_branches_covered']:.1f}% "
        f"({totals['covered_branches']}/{totals['num_branches']}), "
        f"both {totals['percent_covered']:.1f}%"
    )
    if lines < args.lines:
        print(f"coverage: lines {lines:.1f}% is under the floor of {args.lines:.1f}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
