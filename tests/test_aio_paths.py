"""``AsyncStateMachineHandler.wait_applied`` in its races: an apply or a close landing
while a waiter registers, a timeout firing in the same loop iteration as the
wake-up, and cancelled waiters leaving the heap in the listener's or the
canceller's path. Each race is made deterministic by running the competing step
at the exact point (same thread, same loop iteration)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm.aio import AsyncStateMachineHandler
from d_engine_sm.errors import HandlerClosed

WAIT = 10.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, WAIT))


@pytest.fixture
def handler(config: SnapshotConfig) -> Iterator[StateMachineHandler]:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as h:
        yield h


def on_read(
    handler: StateMachineHandler,
    monkeypatch: pytest.MonkeyPatch,
    nth: int,
    step: Callable[[], object],
) -> None:
    """Run ``step`` right after the ``nth`` read of ``last_applied`` (which it then returns
    unchanged): the read is stale by the time the caller acts on it."""
    real = handler.last_applied
    reads = [0]

    def last_applied() -> int:
        value = real()
        reads[0] += 1
        if reads[0] == nth:
            step()
        return value

    monkeypatch.setattr(handler, "last_applied", last_applied)


def test_an_apply_before_the_waiter_registers_is_not_missed(
    handler: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        # The apply (and its listener, with no waiter yet) runs after the first check.
        on_read(handler, monkeypatch, 1, lambda: handler.apply_chunk(puts(1, 1)))
        await ah.wait_applied(1, timeout=None)  # would wait forever if missed
        assert ah.pending_waiters() == 0

    run(main())


def test_a_close_before_the_waiter_registers_raises_handler_closed(
    handler: StateMachineHandler,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        # The close lands between the registration and the re-check.
        on_read(handler, monkeypatch, 2, handler.close)
        with pytest.raises(HandlerClosed, match="handler closed while waiting for index 4"):
            await ah.wait_applied(4, timeout=None)
        assert ah.pending_waiters() == 0
        await asyncio.sleep(0)  # the close listener's wake-up runs: nobody left to fail

    run(main())
    gc.collect()
    # No future was left holding an exception nobody retrieves.
    assert "exception was never retrieved" not in caplog.text


def test_a_timer_firing_after_the_apply_but_before_the_wake_up_is_no_timeout(
    handler: StateMachineHandler,
) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        loop = asyncio.get_running_loop()
        # Next loop iteration: this apply, then the (due) timer; the listener's
        # wake-up only in the iteration after.
        loop.call_soon(handler.apply_chunk, puts(1, 2))
        await ah.wait_applied(2, timeout=0.0)
        assert ah.pending_waiters() == 0

    run(main())


def test_a_timer_firing_after_the_wake_up_changes_nothing(
    handler: StateMachineHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        # The apply lands while the waiter registers: its wake-up is queued before
        # the timer is due, and both run in the same loop iteration.
        on_read(handler, monkeypatch, 2, lambda: handler.apply_chunk(puts(1, 3)))
        await ah.wait_applied(3, timeout=0.0)
        assert ah.pending_waiters() == 0

    run(main())


def test_cancelled_waiters_leave_the_heap_when_they_reach_its_top(
    handler: StateMachineHandler,
) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        t5, t6, t7 = (asyncio.create_task(ah.wait_applied(n, None)) for n in (5, 6, 7))
        await asyncio.sleep(0)
        assert ah.pending_waiters() == 3
        t6.cancel()  # not at the top: stays, marked dead (fewer dead than live)
        await asyncio.gather(t6, return_exceptions=True)
        assert ah.pending_waiters() == 3
        t5.cancel()  # the top leaves, and the dead one now at the top with it
        await asyncio.gather(t5, return_exceptions=True)
        assert ah.pending_waiters() == 1
        handler.apply_chunk(puts(1, 7))
        await t7
        assert ah.pending_waiters() == 0

    run(main())


def test_the_listener_skips_targets_ahead_and_drops_dead_waiters(
    handler: StateMachineHandler,
) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        t2, t3, t4 = (asyncio.create_task(ah.wait_applied(n, None)) for n in (2, 3, 4))
        await asyncio.sleep(0)
        t3.cancel()
        await asyncio.gather(t3, return_exceptions=True)
        assert ah.pending_waiters() == 3
        handler.apply_chunk(puts(1, 1))  # below every target: nothing to wake
        await asyncio.sleep(0)
        assert not (t2.done() or t4.done()) and ah.pending_waiters() == 3
        handler.apply_chunk(puts(2, 2))  # wakes 2, drops the cancelled 3, keeps 4
        await t2
        assert ah.pending_waiters() == 1 and not t4.done()
        handler.apply_chunk(puts(4, 1))
        await t4
        assert ah.pending_waiters() == 0

    run(main())
