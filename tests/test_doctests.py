"""Run the package's docstring examples (the diskcache way: one test per module)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import d_engine_sm

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(d_engine_sm.__path__, "d_engine_sm.")
    if ".proto." not in info.name and not info.name.endswith(("__main__", ".transport.grpc"))
)

# Modules (by name prefix) of an optional extra: their examples run where the
# extra is installed (the minimal env has none).
EXTRAS = {
    "d_engine_sm.prometheus": "prometheus_client",
    "d_engine_sm.integrations.": "pysyncobj",
    "d_engine_sm.transport.": "grpc",
}


def test_modules_found() -> None:
    assert "d_engine_sm._values" in MODULES and "d_engine_sm._snapshot.naming" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    for prefix, extra in EXTRAS.items():
        if name.startswith(prefix):
            pytest.importorskip(extra)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
