"""Misuse and callback failures at the handler, worker and config boundaries.

Bad arguments get a TypeError/ValueError naming the argument; a listener
or callback that raises is logged and changes nothing else.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import puts

from d_engine_sm import (
    ApplyCompleted,
    ApplyWorker,
    MemoryStateMachine,
    NewCommitData,
    SnapshotConfig,
    StateMachineHandler,
    WorkerEvent,
)
from d_engine_sm.errors import HandlerClosed
from d_engine_sm.proto import common_pb2

LEADER = common_pb2.NODE_ROLE_LEADER


def _config(tmp_path: Path, **kw: Any) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=tmp_path / "snapshots", fsync=False, **kw)


# -- the handler's constructor and arguments -----------------------------------------


def test_handler_refuses_wrong_types(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with pytest.raises(TypeError, match="state_machine must be"):
        StateMachineHandler(object(), config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a SnapshotConfig"):
        StateMachineHandler(MemoryStateMachine(), {"snapshots_dir": tmp_path})  # type: ignore[arg-type]
    for node_id in (-1, True, 1.0):
        with pytest.raises(ValueError, match="node_id must be an int >= 0"):
            StateMachineHandler(MemoryStateMachine(), config, node_id=node_id)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="last_applied_index must be an int"):
        StateMachineHandler(MemoryStateMachine(), config, last_applied_index="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last_applied_index must be >= 0, got -1"):
        StateMachineHandler(MemoryStateMachine(), config, last_applied_index=-1)


def test_last_applied_index_given_by_the_caller(tmp_path: Path) -> None:
    with StateMachineHandler(MemoryStateMachine(), _config(tmp_path), last_applied_index=7) as h:
        assert h.last_applied() == 7
        assert h.metrics()["last_applied"] == 7


@pytest.mark.parametrize("value", [-1, True, 2.5, "3"])
def test_update_pending_refuses_non_index(handler: StateMachineHandler, value: object) -> None:
    with pytest.raises(ValueError, match="new_commit must be an int >= 0"):
        handler.update_pending(value)  # type: ignore[arg-type]
    assert handler.pending_commit() == 0


def test_wait_applied_argument_checks(handler: StateMachineHandler) -> None:
    with pytest.raises(TypeError, match="target must be an int, got str"):
        handler.wait_applied("1", None)  # type: ignore[arg-type]
    for timeout in (-1.0, math.nan):
        with pytest.raises(ValueError, match="timeout must be >= 0 or None"):
            handler.wait_applied(1, timeout=timeout)


def test_apply_chunk_accepts_any_iterable_and_nothing(handler: StateMachineHandler) -> None:
    assert handler.apply_chunk([]) == []
    # Typed as a Sequence; any iterable works (it is listed first).
    assert handler.apply_chunk(iter([])) == []  # type: ignore[arg-type]
    results = handler.apply_chunk(e for e in puts(1, 3))  # type: ignore[arg-type]
    assert len(results) == 3 and handler.last_applied() == 3


# -- listeners ----------------------------------------------------------------------------


def test_a_failing_applied_listener_is_logged_and_the_others_still_run(
    handler: StateMachineHandler, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    def broken(index: int) -> None:
        raise RuntimeError("listener bug")

    handler.add_applied_listener(broken)
    remove = handler.add_applied_listener(seen.append)
    with caplog.at_level(logging.ERROR, logger="d_engine_sm.handler"):
        handler.apply_chunk(puts(1, 2))
    assert seen == [2] and handler.last_applied() == 2
    assert "applied listener failed index=2" in caplog.text
    remove()
    handler.apply_chunk(puts(3, 1))
    assert seen == [2]


def test_close_listeners(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    h = StateMachineHandler(MemoryStateMachine(), _config(tmp_path))

    def broken() -> None:
        raise RuntimeError("close bug")

    h.add_close_listener(broken)
    h.add_close_listener(lambda: calls.append("a"))
    removed = h.add_close_listener(lambda: calls.append("removed"))
    removed()
    with caplog.at_level(logging.ERROR, logger="d_engine_sm.handler"):
        h.close()
    assert calls == ["a"] and "close listener failed" in caplog.text
    assert h.closed
    h.close()  # idempotent: listeners run once
    assert calls == ["a"]
    h.add_close_listener(lambda: calls.append("late"))  # already closed: called at once
    assert calls == ["a", "late"]
    with pytest.raises(HandlerClosed):
        h.apply_chunk(puts(1, 1))


# -- the worker's arguments and callbacks -----------------------------------------------------


def test_worker_refuses_bad_arguments(handler: StateMachineHandler) -> None:
    with pytest.raises(TypeError, match="handler must be a StateMachineHandler"):
        ApplyWorker(object(), lambda e: None)  # type: ignore[arg-type]
    for name in ("max_batch_entries", "max_queued_entries", "snapshot_workers"):
        for bad in (0, True, 1.5):
            kwargs: dict[str, Any] = {name: bad}
            with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
                ApplyWorker(handler, lambda e: None, **kwargs)
    with ApplyWorker(handler, lambda e: None) as worker:
        with pytest.raises(TypeError, match="commit must be NewCommitData or None, got int"):
            worker.submit(puts(1, 1), 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be >= 0 or None"):
            worker.submit(puts(1, 1), timeout=-1)
        assert worker.handler is handler
    assert handler.last_applied() == 0


def test_a_failing_event_callback_is_logged_and_applying_goes_on(
    handler: StateMachineHandler, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[WorkerEvent] = []

    def on_event(event: WorkerEvent) -> None:
        calls.append(event)
        raise RuntimeError("consumer bug")

    with (
        caplog.at_level(logging.ERROR, logger="d_engine_sm.worker"),
        ApplyWorker(handler, on_event) as worker,
    ):
        worker.submit(puts(1, 3), NewCommitData(3, LEADER, 1))
        handler.wait_applied(3, timeout=10)
        worker.submit(puts(4, 2), NewCommitData(5, LEADER, 1))
        handler.wait_applied(5, timeout=10)
    assert handler.last_applied() == 5
    assert any(isinstance(e, ApplyCompleted) for e in calls)
    assert "on_event failed event=ApplyCompleted" in caplog.text


def test_a_failing_should_snapshot_is_logged_and_applying_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(StateMachineHandler):
        def should_snapshot(self, new_commit_data: NewCommitData) -> bool:
            raise RuntimeError("policy bug")

    done = threading.Event()
    with (
        Broken(MemoryStateMachine(), _config(tmp_path)) as h,
        caplog.at_level(logging.ERROR, logger="d_engine_sm.worker"),
        ApplyWorker(h, lambda e: done.set() if isinstance(e, ApplyCompleted) else None) as w,
    ):
        w.submit(puts(1, 2), NewCommitData(2, LEADER, 1))
        assert done.wait(10)
        h.wait_applied(2, timeout=10)
        assert not w.failed
    assert "should_snapshot failed" in caplog.text
    assert h.get_latest_snapshot_metadata() is None


# -- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("snapshots_dir_prefix", 5, TypeError, "snapshots_dir_prefix must be a str"),
        ("snapshots_dir_prefix", "temp-x", ValueError, "must not start with 'temp-'"),
        ("snapshots_dir_prefix", "a/b", ValueError, "without '/'"),
        ("chunk_timeout", math.inf, ValueError, "chunk_timeout must be finite"),
        ("chunk_timeout", 0, ValueError, "chunk_timeout must be > 0"),
        ("chunk_timeout", "1", TypeError, "chunk_timeout must be a number of seconds"),
        ("snapshot_cool_down_since_last_check", -1, ValueError, "must be >= 0"),
        ("compression_level", 10, ValueError, "compression_level must be 0-9"),
        ("chunk_size", 1 << 31, ValueError, "chunk_size must be < 2 GiB"),
        ("chunk_size", 1.0, TypeError, "chunk_size must be an int, got float"),
    ],
)
def test_config_rejections(
    tmp_path: Path, field: str, value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _config(tmp_path, **{field: value})
