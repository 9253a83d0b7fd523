"""os.fork() with a handler and a worker busy: the child gets clear errors, never a deadlock.

The parent holds an apply in flight (the apply thread is inside the state
machine, holding the handler's apply lock) when it forks. In the child that
thread does not exist; without the at-fork handlers the first apply, close
or shutdown would wait for it forever. The child runs its checks, reports
them as JSON on a pipe and leaves with ``os._exit``; the parent reads with
a deadline, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import warnings
from collections.abc import Callable, Sequence

import pytest
from conftest import puts

from d_engine_sm import (
    ApplyWorker,
    HandlerClosed,
    MemoryStateMachine,
    SnapshotConfig,
    StateMachineHandler,
    WorkerStopped,
)
from d_engine_sm._values import ApplyResult
from d_engine_sm.proto import common_pb2

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
WAIT = 20.0


class Blocking(MemoryStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        self.entered.set()
        self.release.wait(WAIT)
        return super().apply_chunk(entries)


def _outcome(call: Callable[[], object]) -> str:
    try:
        result = call()
    except (HandlerClosed, WorkerStopped) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"returned {result!r}"


def _child_checks(handler: StateMachineHandler, worker: ApplyWorker) -> dict[str, str]:
    return {
        "apply_chunk": _outcome(lambda: handler.apply_chunk(puts(2, 1))),
        "read": _outcome(lambda: handler.read_from_state_machine([b"k1"])),
        "wait_applied": _outcome(lambda: handler.wait_applied(1, 1.0)),
        "create_snapshot": _outcome(handler.create_snapshot),
        "submit": _outcome(lambda: worker.submit(puts(2, 1))),
        "shutdown": _outcome(lambda: worker.shutdown(timeout=5.0)),
        "close": _outcome(handler.close),
    }


def _fork_and_check(handler: StateMachineHandler, worker: ApplyWorker) -> dict[str, str]:
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # 3.12+: "multi-threaded process, fork() may deadlock"
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: no pytest from here on
        code = 0
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(_child_checks(handler, worker)).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], WAIT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child hung (deadlock)")
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, str] = json.loads(data)
    return result


def test_forked_child_gets_clear_errors_not_a_deadlock(config: SnapshotConfig) -> None:
    sm = Blocking()
    handler = StateMachineHandler(sm, config, node_id=1)
    worker = ApplyWorker(handler, lambda event: None)
    worker.start()
    try:
        worker.submit(puts(1, 1))
        assert sm.entered.wait(WAIT)  # the apply thread holds the apply lock now
        outcome = _fork_and_check(handler, worker)
    finally:
        sm.release.set()
        assert worker.shutdown(timeout=WAIT)
        handler.close()
    fork_words = "before os.fork(); create a new one in the child"
    for name in ("apply_chunk", "read", "wait_applied", "create_snapshot"):
        assert outcome[name].startswith("HandlerClosed:"), (name, outcome[name])
        assert fork_words in outcome[name]
    assert outcome["submit"].startswith("WorkerStopped:") and fork_words in outcome["submit"]
    assert outcome["shutdown"] == "returned True"
    assert outcome["close"] == "returned None"
    # The parent is untouched by the child's at-fork handling.
    assert handler.last_applied() == 1
