"""Fail when the built HTML refers to anything outside this repository.

Usage: ``python docs/check_built.py docs/_build/html`` (run by ``tox -e docs``
after the build). Checks every page for links or resources off-site
(``href``/``src`` with a scheme or ``//``) and for a design document that is
not part of the repository.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

OFF_SITE = re.compile(r"""(?:href|src)\s*=\s*["'](?:[a-z][a-z0-9+.-]*:|//)""", re.IGNORECASE)
OUTSIDE_DOC = re.compile(r"\bDESIGN\b|DESIGN\.md|STYLE\.md")


def problems(root: Path) -> list[str]:
    """Every offending line of every HTML page under ``root``, as ``path:line: text``."""
    found = []
    for page in sorted(root.rglob("*.html")):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for pattern in (OFF_SITE, OUTSIDE_DOC):
                if pattern.search(line):
                    found.append(f"{page.relative_to(root)}:{number}: {line.strip()[:120]}")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "docs/_build/html")
    if not any(root.rglob("*.html")):
        sys.stderr.write(f"no HTML pages under {root}: build the docs first\n")
        return 2
    found = problems(root)
    for line in found:
        sys.stderr.write(line + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
