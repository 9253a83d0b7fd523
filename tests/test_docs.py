"""The documentation: self-contained, its examples run, its interfaces documented.

Quick checks over the sources; ``tox -e docs`` builds the site itself with
warnings as errors and runs the same examples through Sphinx.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.rst"))
# An unpacked sdist may come without the documentation sources.
needs_docs = pytest.mark.skipif(not (DOCS / "conf.py").is_file(), reason="no docs/ here")

# Text that points a reader outside this repository.
FORBIDDEN = re.compile(r"\bDESIGN\b|DESIGN\.md|STYLE\.md|/work/|shared/reference")
EXTERNAL_LINK = re.compile(r"https?://|www\.")

# Modules whose every public class, function and method must have a docstring.
DOCUMENTED = [
    "_state_machine.py",
    "_values.py",
    "_config.py",
    "_policy.py",
    "_watch.py",
    "_kv.py",
    "commands.py",
    "testing.py",
    "errors.py",
    "_closing.py",
    "_events.py",
    "_pipeline.py",
    "_metrics.py",
    "prometheus.py",
    "aio.py",
    "_worker.py",
    "_handler.py",
    "integrations/pysyncobj.py",
]


def _doc_sources() -> list[Path]:
    files = [*PAGES, DOCS / "conf.py", *DOCS.glob("examples/*.py"), *DOCS.glob("_templates/*")]
    package = [
        p for p in (ROOT / "d_engine_sm").rglob("*.py") if "_pb2" not in p.name
    ]  # generated code is not ours to word
    return [p for p in (*files, *package, ROOT / "README.md") if p.is_file()]


@needs_docs
def test_pages_exist() -> None:
    names = {p.stem for p in PAGES}
    assert {"index", "getting-started", "concepts", "design", "state-machine"} <= names
    assert {"operations", "wire-format", "api"} <= names


def test_no_reference_outside_the_repository() -> None:
    offenders = []
    for path in _doc_sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


@needs_docs
def test_docs_link_nowhere_outside() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in [*PAGES, *DOCS.glob("_templates/*")]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if EXTERNAL_LINK.search(line)
    ]
    assert offenders == []


@needs_docs
def test_built_html_check_catches_off_site_references(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("check_built", DOCS / "check_built.py")
    assert spec is not None and spec.loader is not None
    check_built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_built)
    (tmp_path / "ok.html").write_text('<a href="api.html#x">x</a><img src="_static/a.svg">')
    assert check_built.problems(tmp_path) == []
    (tmp_path / "bad.html").write_text(
        '<a href="https://example.org">x</a>\n<script src="//cdn.example/x.js">\nsee DESIGN.md\n'
    )
    assert [p.split(":")[1] for p in check_built.problems(tmp_path)] == ["1", "2", "3"]
    assert check_built.main(["check_built", str(tmp_path)]) == 1


@needs_docs
def test_api_page_covers_every_exported_name() -> None:
    import d_engine_sm
    import d_engine_sm.errors

    api = (DOCS / "api.rst").read_text()
    assert ".. automodule:: d_engine_sm.errors" in api
    missing = [
        name
        for name in d_engine_sm.__all__
        if name not in d_engine_sm.errors.__all__ and not re.search(rf"d_engine_sm\.{name}\b", api)
    ]
    assert missing == [], f"add these to docs/api.rst: {missing}"


@needs_docs
def test_conf_needs_no_network() -> None:
    text = (DOCS / "conf.py").read_text()
    assert "sphinx.ext.intersphinx" not in text
    assert "html_show_sphinx = False" in text


@needs_docs
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [str(DOCS / "examples"), *sys.path])
    result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} example(s) failed in {page.name}"


def _undocumented(path: Path) -> list[str]:
    missing = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            public = not child.name.startswith("_") or child.name == "__len__"
            if public and ast.get_docstring(child) is None:
                missing.append(f"{path.name}:{child.lineno}: {prefix}{child.name}")
            if public and isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(ast.parse(path.read_text()), "")
    return missing


@pytest.mark.parametrize("name", DOCUMENTED)
def test_public_names_have_docstrings(name: str) -> None:
    assert _undocumented(ROOT / "d_engine_sm" / name) == []


# Every public class, method and function a user can reach from these modules
# has a docstring (inherited ones count: an override documented on its base).
PUBLIC_MODULES = [
    "d_engine_sm",
    "d_engine_sm.aio",
    "d_engine_sm.errors",
    "d_engine_sm.commands",
    "d_engine_sm.testing",
    "d_engine_sm.prometheus",
    "d_engine_sm.integrations.pysyncobj",
    "d_engine_sm.transport.grpc",
]


def _reachable_undocumented(module: Any) -> list[str]:
    names = getattr(module, "__all__", None) or [n for n in vars(module) if n[0] != "_"]
    missing = []
    for name in names:
        obj = getattr(module, name)
        owner = getattr(obj, "__module__", "") or ""
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not owner.startswith("d_engine_sm") or "_pb2" in owner:
            continue  # re-exported from elsewhere, or generated
        if not inspect.getdoc(obj):
            missing.append(f"{owner}.{obj.__qualname__}")
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") and attr != "__len__":
                continue
            member = value if isinstance(value, property) else getattr(value, "__func__", value)
            if (inspect.isfunction(member) or isinstance(member, property)) and not inspect.getdoc(
                member
            ):
                missing.append(f"{owner}.{obj.__qualname__}.{attr}")
    return missing


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_reachable_public_names_have_docstrings(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # its extra is not installed
        pytest.skip(f"{name}: {exc}")
    assert _reachable_undocumented(module) == []


def test_reachable_check_can_fail() -> None:
    class Public:
        """Documented."""

        def method(self) -> None:
            pass

    fake = type(sys)("d_engine_sm.fake")
    Public.__module__ = fake.__name__
    fake.__dict__["Public"] = Public
    assert _reachable_undocumented(fake) == [
        "d_engine_sm.fake.test_reachable_check_can_fail.<locals>.Public.method"
    ]


@needs_docs
def test_metric_table_is_generated_from_the_declarations() -> None:
    pytest.importorskip("sphinx")
    import d_engine_sm

    assert ".. metrics-table::" in (DOCS / "operations.rst").read_text()
    spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
    assert spec is not None and spec.loader is not None
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    rows = "\n".join(conf.metrics_table_lines())
    for metric in d_engine_sm.METRICS:
        cells = [f"``{metric.name}``", metric.kind, metric.unit, metric.help]
        assert "* - " + "\n     - ".join(cells) in rows


@needs_docs
def test_opentelemetry_recipe_compiles() -> None:
    # OpenTelemetry is not a dependency: the recipe is compiled, not run.
    recipe = DOCS / "examples" / "otel_metrics.py"
    compile(recipe.read_text(), str(recipe), "exec")
    page = (DOCS / "operations.rst").read_text()
    assert ".. literalinclude:: examples/otel_metrics.py" in page
    for block in re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", page):
        compile(textwrap.dedent(block), "operations.rst", "exec")


def test_readme_guarantees_link_to_tests_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\[`(tests/[\w/]+\.py)((?:::\w+)?)`\]\(([^)]+)\)", table)
    assert len(links) >= 20
    names = {row.split(" | ")[0].strip("| ") for row in table.splitlines()[3:] if row}
    wanted = {
        "bounded memory for any archive",
        "schema validation of received SQLite files",
        "durable state before publish",
        "clean interrupt",
        "read-only directories",
        "nothing written after close",
        "resumable verified transfer",
    }
    assert wanted <= names
    for shown, test, target in links:
        assert shown == target and (ROOT / target).is_file(), target
        if test:
            assert f"def {test[2:]}(" in (ROOT / target).read_text(), shown + test
