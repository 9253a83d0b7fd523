"""Small boundaries: bad commands and commit data, progress after close, failing callbacks."""

from __future__ import annotations

import io
import logging

import pytest

from d_engine_sm import LogSizePolicy, MemoryStateMachine, NewCommitData, StateMachine, _kv
from d_engine_sm._progress import Reporter, _isatty, fmt_count
from d_engine_sm._snapshot.streams import report
from d_engine_sm.proto import common_pb2


def test_undecodable_and_empty_commands_are_not_commands() -> None:
    garbage = common_pb2.Entry(index=1, term=1)
    garbage.payload.command = b"\xff\xff\xff"
    assert _kv.decode_command(garbage) is None
    empty = common_pb2.Entry(index=2, term=1)
    empty.payload.command = b""
    assert _kv.decode_command(empty) is None
    noop = common_pb2.Entry(index=3, term=1)
    noop.payload.noop.SetInParent()
    assert _kv.decode_command(noop) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"new_commit_index": -1}, ValueError, "new_commit_index"),
        ({"current_term": 1.5}, TypeError, "NewCommitData.current_term must be an int, got float"),
        ({"role": True}, TypeError, "NewCommitData.role must be an int, got bool"),
    ],
)
def test_new_commit_data_checks(kwargs: dict[str, object], error: type, message: str) -> None:
    fields: dict[str, object] = {"new_commit_index": 1, "role": 1, "current_term": 1, **kwargs}
    with pytest.raises(error, match=message):
        NewCommitData(**fields)  # type: ignore[arg-type]


def test_default_background_cleanup_removes_nothing() -> None:
    class Minimal(MemoryStateMachine):
        lease_background_cleanup = StateMachine.lease_background_cleanup

    assert Minimal().lease_background_cleanup() == []


def test_policy_threshold_is_readable() -> None:
    assert LogSizePolicy(threshold=7, cooldown=0).threshold == 7


def test_a_bar_ignores_updates_after_close_and_closes_once() -> None:
    out = io.StringIO()
    reporter = Reporter(out, tty=True, clock=lambda: 0.0)
    bar = reporter.bar("apply", 10, start="10 entries", fmt=fmt_count, unit="entries")
    bar.update(5)
    bar.close()
    drawn = out.getvalue()
    bar.update(9)
    bar.close()
    assert out.getvalue() == drawn


def test_a_closed_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    stream.close()
    assert _isatty(stream) is False
    assert Reporter(stream).tty is False


def test_a_failing_progress_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken(phase: str, done: int, total: int) -> None:
        raise RuntimeError("ui bug")

    with caplog.at_level(logging.ERROR, logger="d_engine_sm.snapshot"):
        report(broken, "send", 1, 2)
    assert "progress callback failed phase=send" in caplog.text
