"""d_engine_sm.aio at its edges: the inline coroutines, a closed loop, unbound and full workers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

import pytest
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._values import ApplyResult, NewCommitData
from d_engine_sm.aio import AsyncApplyWorker, AsyncStateMachineHandler
from d_engine_sm.errors import SubmitTimeout
from d_engine_sm.proto import common_pb2

WAIT = 10.0
LEADER = common_pb2.NODE_ROLE_LEADER


@pytest.fixture
def handler(config: SnapshotConfig) -> Iterator[StateMachineHandler]:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=4) as h:
        yield h


def test_inline_coroutines_mirror_the_handler(handler: StateMachineHandler) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        assert ah.handler is handler and ah.node_id == 4 and ah.config is handler.config
        assert not ah.closed
        await ah.update_pending(3)
        assert await ah.pending_commit() == 3
        assert await ah.pending_range() == range(1, 4)
        assert await ah.snapshot_in_progress() is False
        assert await ah.get_latest_snapshot_metadata() is None
        await ah.apply_chunk(puts(1, 3))
        commit = NewCommitData(3, LEADER, 1)
        assert await ah.should_snapshot(commit) == handler.should_snapshot(commit)
        await ah.close()
        assert ah.closed

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_a_waiter_whose_loop_closed_is_dropped_quietly(handler: StateMachineHandler) -> None:
    ah = AsyncStateMachineHandler(handler)
    loop = asyncio.new_event_loop()
    tasks: list[asyncio.Task[None]] = []

    async def leave_waiter() -> None:  # registered, never awaited to the end
        tasks.append(asyncio.ensure_future(ah.wait_applied(5, timeout=None)))
        await asyncio.sleep(0)

    loop.run_until_complete(leave_waiter())
    loop.close()  # before the apply that would wake it
    assert ah.pending_waiters() == 1
    handler.apply_chunk(puts(1, 5))  # nobody to wake; no exception escapes the apply
    assert handler.last_applied() == 5 and ah.pending_waiters() == 0
    assert not tasks[0].done()


def test_worker_delivering_without_start_in_a_loop_is_an_error(
    handler: StateMachineHandler,
) -> None:
    w = AsyncApplyWorker(handler)
    assert w.worker.handler is handler
    with pytest.raises(RuntimeError, match=r"start\(\) was not called in a running loop"):
        w._deliver(object())  # type: ignore[arg-type]
    w.worker.shutdown(drain=False)


class _Gated(MemoryStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        self.entered.set()
        self.release.wait(WAIT)
        return super().apply_chunk(entries)


def test_submit_with_no_room_and_zero_timeout_raises_at_once(config: SnapshotConfig) -> None:
    sm = _Gated()
    handler = StateMachineHandler(sm, config)

    async def main() -> None:
        async with AsyncApplyWorker(handler, max_queued_entries=2) as w:
            await w.submit(puts(1, 1))
            await asyncio.get_running_loop().run_in_executor(None, sm.entered.wait, WAIT)
            await w.submit(puts(2, 2))  # the queue is full now
            with pytest.raises(SubmitTimeout):
                await w.submit(puts(4, 1), timeout=0)
            with pytest.raises(SubmitTimeout):
                await w.submit(puts(4, 1), timeout=0.05)  # waits in the executor, then gives up
            sm.release.set()
        assert handler.last_applied() == 3

    asyncio.run(asyncio.wait_for(main(), WAIT * 3))
    handler.close()
