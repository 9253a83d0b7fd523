"""The conformance suite on both built-ins, and a differential check between them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d_engine_sm import MemoryStateMachine, _kv
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._state_machine import StateMachine
from d_engine_sm.testing import StateMachineConformance


def make_sqlite(path: Path) -> SqliteStateMachine:
    """Factory for the SIGKILL test's subprocess (same path as the class's)."""
    return SqliteStateMachine(path / "state.db")


class TestMemoryConformance(StateMachineConformance):
    durable = False

    def make_state_machine(self, path: Path) -> StateMachine:
        return MemoryStateMachine()

    def make_state_machine_with_clock(
        self, path: Path, clock: Callable[[], float]
    ) -> StateMachine | None:
        return MemoryStateMachine(clock=clock)


class TestSqliteConformance(StateMachineConformance):
    durable = True
    factory = f"{__name__}:make_sqlite"

    def make_state_machine(self, path: Path) -> StateMachine:
        return make_sqlite(path)

    def make_state_machine_with_clock(
        self, path: Path, clock: Callable[[], float]
    ) -> StateMachine | None:
        path.mkdir(parents=True, exist_ok=True)
        return SqliteStateMachine(path / "state.db", clock=clock)


class TestWithoutOptionalHooks(StateMachineConformance):
    """The suite also runs when only make_state_machine is given (TTL falls back)."""

    def make_state_machine(self, path: Path) -> StateMachine:
        return MemoryStateMachine()


def test_base_class_is_not_collected(tmp_path: Path) -> None:
    """A user's module that imports the base runs each test once, base never alone."""
    (tmp_path / "test_mine.py").write_text(
        "from d_engine_sm import MemoryStateMachine\n"
        "from d_engine_sm.testing import StateMachineConformance\n"
        "\n"
        "class TestMine(StateMachineConformance):\n"
        "    def make_state_machine(self, path):\n"
        "        return MemoryStateMachine()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = [name for name in dir(StateMachineConformance) if name.startswith("test_")]
    durable_only = 3  # reopen after stop, reopen after drop, SIGKILL
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"{len(tests) - durable_only} passed, {durable_only} skipped" in summary, summary


_KEYS = st.sampled_from([b"", b"a", b"b", b"c"])
_VALUES = st.sampled_from([b"", b"1", b"2", b"long" * 8])
_COMMANDS = st.one_of(
    st.builds(_kv.insert, _KEYS, _VALUES, st.sampled_from([0, 0, 1, 30])),
    st.builds(_kv.delete, _KEYS),
    st.builds(_kv.compare_and_swap, _KEYS, st.none() | _VALUES, _VALUES),
    st.binary(max_size=12),  # mostly garbage, sometimes a valid or empty command
)


class _Clock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(st.lists(_COMMANDS, min_size=1, max_size=8), min_size=1, max_size=5))
def test_builtins_agree(tmp_path: Path, batches: list[list[bytes]]) -> None:
    clock = _Clock()
    memory = MemoryStateMachine(clock=clock)
    with SqliteStateMachine(tmp_path / "diff.db", durability="off", clock=clock) as sqlite:
        sqlite.reset()  # one database across examples
        index = 0
        for batch in batches:
            entries = [_kv.command_entry(index + i + 1, 1, cmd) for i, cmd in enumerate(batch)]
            index += len(batch)
            assert sqlite.apply_chunk(entries) == memory.apply_chunk(entries)
            clock.now += 10  # lets ttl=1 keys expire between batches
            assert sqlite.items() == memory.items()
            for key in (b"", b"a", b"b", b"c"):
                assert sqlite.get(key) == memory.get(key)
            assert len(sqlite) == len(memory)
        assert sqlite.last_applied() == memory.last_applied()
        assert sorted(sqlite.lease_background_cleanup()) == sorted(
            memory.lease_background_cleanup()
        )
