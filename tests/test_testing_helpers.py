"""d_engine_sm.testing's crash helpers, in process (their SIGKILL'd child reports no coverage)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from d_engine_sm import MemoryStateMachine
from d_engine_sm._values import ApplyResult
from d_engine_sm.proto import common_pb2
from d_engine_sm.testing import crash_child_main, crash_expected, load_factory


class _Stop(Exception):
    pass


class _StopsAfter(MemoryStateMachine):
    """Applies ``batches`` batches, then raises (the child loop has no other end)."""

    batches = 3

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        if self.batches == 0:
            raise _Stop
        self.batches -= 1
        return super().apply_chunk(entries)


LAST: list[_StopsAfter] = []


def make(path: Path) -> _StopsAfter:
    sm = _StopsAfter()
    LAST.append(sm)
    return sm


def test_crash_child_reports_each_batch_after_it_is_applied(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(_Stop):
        crash_child_main([f"{__name__}:make", str(tmp_path), "5"])
    assert capsys.readouterr().out.split() == ["5", "10", "15"]
    assert LAST[-1].items() == crash_expected(15)


@pytest.mark.parametrize("spec", ["", "module", ":attr", "module:"])
def test_load_factory_needs_module_and_attribute(spec: str) -> None:
    with pytest.raises(ValueError, match="factory must look like 'module:callable'"):
        load_factory(spec)


def test_load_factory_imports() -> None:
    assert load_factory(f"{__name__}:make") is make
