"""The package stays readable: no module over 650 lines, no function body over 60.

A function's body is counted from its first statement after the docstring to
its last line, so a long docstring is never a reason to split a function.
Generated protobuf modules (``*_pb2*``) are not ours to shape.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import d_engine_sm

PACKAGE = Path(d_engine_sm.__file__).parent
MAX_MODULE_LINES = 650
MAX_BODY_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_pb2" not in p.name)


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's end."""
    body = node.body
    first = body[0]
    if (
        len(body) > 1
        and isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        first = body[1]
    assert node.end_lineno is not None
    return node.end_lineno - first.lineno + 1


def _functions(path: Path) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", _body_lines(node)


def test_modules_found() -> None:
    names = {p.name for p in _modules()}
    assert {"_handler.py", "manager.py"} <= names
    assert not any("_pb2" in name for name in names)


def test_no_module_over_limit() -> None:
    long = [
        f"{p.relative_to(PACKAGE.parent)}: {n} lines"
        for p in _modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_body_over_limit() -> None:
    long = [
        f"{where}: body {n} lines"
        for path in _modules()
        for where, n in _functions(path)
        if n > MAX_BODY_LINES
    ]
    assert not long, f"function bodies over {MAX_BODY_LINES} lines:\n" + "\n".join(long)


def test_body_count_skips_the_docstring() -> None:
    source = 'def f():\n    """Doc\n\n    more.\n    """\n    a = 1\n    return a\n'
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert _body_lines(node) == 2
    bare = ast.parse("def g():\n    return 1\n").body[0]
    assert isinstance(bare, ast.FunctionDef)
    assert _body_lines(bare) == 1
