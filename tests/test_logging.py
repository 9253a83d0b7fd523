"""The package logs through ``d_engine_sm.*`` loggers, prints nothing, and ships a NullHandler."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import d_engine_sm

README = Path(__file__).resolve().parent.parent / "README.md"
PACKAGE = Path(d_engine_sm.__file__).parent

# Every module of the package, optional extras included when installed.
_IMPORT_ALL = """
import importlib, pkgutil, d_engine_sm
for mod in pkgutil.walk_packages(d_engine_sm.__path__, "d_engine_sm."):
    try:
        importlib.import_module(mod.name)
    except ImportError:
        pass  # an optional extra that is not installed
"""


def test_null_handler_on_the_package_logger() -> None:
    handlers = logging.getLogger("d_engine_sm").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_import_and_warnings_print_nothing_without_configuration() -> None:
    # Without a NullHandler, Python's last-resort handler would print the
    # warning to stderr: the library must stay silent until the app configures logging.
    code = _IMPORT_ALL + (
        "import logging\n"
        "logging.getLogger('d_engine_sm.snapshot').warning('moved corrupt archive aside')\n"
        "logging.getLogger('d_engine_sm.worker').error('state machine failed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""


def test_records_still_reach_an_application_handler() -> None:
    code = (
        "import logging, sys, d_engine_sm\n"
        "logging.basicConfig(stream=sys.stdout, format='%(name)s %(levelname)s %(message)s')\n"
        "logging.getLogger('d_engine_sm.snapshot').warning('pruned %d', 3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == "d_engine_sm.snapshot WARNING pruned 3\n", done.stderr


def _logger_names_in_source() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        names.update(re.findall(r"getLogger\(\"(d_engine_sm[\w.]*)\"\)", path.read_text()))
    names.discard("d_engine_sm")  # the parent: where the CLI attaches its handler
    return names


def test_readme_lists_every_logger_the_package_uses() -> None:
    text = README.read_text()
    section = text.split("## Logging", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(d_engine_sm\.[\w.]+)` \|", section, re.M))
    assert _logger_names_in_source()
    assert documented == _logger_names_in_source()
