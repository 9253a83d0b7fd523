"""Sphinx configuration for the d_engine_sm documentation.

Builds offline: no intersphinx, no extension that fetches anything. The
version comes from the package itself, so it is written in one place.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy
sys.path.insert(0, str(ROOT / "docs" / "examples"))  # the pages' example modules

from docutils import nodes  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402
from sphinx.application import Sphinx  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402

import d_engine_sm  # noqa: E402

project = "d_engine_sm"
author = "the d_engine_sm authors"
copyright = "the d_engine_sm authors"
release = d_engine_sm.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]

# Offline and self-contained: no intersphinx, nothing resolved against other sites.
html_theme = "furo"
html_title = f"d_engine_sm {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
exclude_patterns = ["_build"]
templates_path = ["_templates"]

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# Inheritance is shown only where it matters (errors): the core classes'
# private bases would only confuse.
autodoc_default_options = {"members": True}
autodoc_inherit_docstrings = True
# The generated protobuf classes have no Python source to cross-reference;
# their references are left as plain text instead of warnings.
nitpicky = False

# Only the pages' ``.. doctest::`` blocks: docstring examples need their
# module's globals and run under pytest (tests/test_doctests.py).
doctest_test_doctest_blocks = ""
html_show_sphinx = False  # no links off-site in the footer


def metrics_table_lines() -> list[str]:
    """The metric table as reStructuredText, one row per ``d_engine_sm.METRICS`` entry."""
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 10 12 48", ""]
    lines += ["   * - name", "     - kind", "     - unit", "     - what it measures"]
    for spec in d_engine_sm.METRICS:
        where = "" if spec.source == "handler" else " (``ApplyWorker``)"
        lines += [f"   * - ``{spec.name}``", f"     - {spec.kind}", f"     - {spec.unit}"]
        lines += [f"     - {spec.help}{where}"]
    return lines


class MetricsTable(SphinxDirective):
    """``.. metrics-table::``: the metric table, generated from ``d_engine_sm.METRICS``.

    The declarations are the one source: the page cannot drift from the code.
    """

    def run(self) -> list[nodes.Node]:
        box = nodes.container()
        rst = StringList(metrics_table_lines(), "metrics-table")
        self.state.nested_parse(rst, self.content_offset, box)
        return list(box.children)


def setup(app: Sphinx) -> dict[str, bool]:
    """Register the page directives of this site."""
    app.add_directive("metrics-table", MetricsTable)
    return {"parallel_read_safe": True}
