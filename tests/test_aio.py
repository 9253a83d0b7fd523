"""d_engine_sm.aio: native wait_applied (no threads parked), executor-backed
methods, async snapshot streams, AsyncApplyWorker."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import put, puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._values import ApplyResult, NewCommitData
from d_engine_sm._worker import ApplyCompleted, FatalError
from d_engine_sm.aio import AsyncApplyWorker, AsyncStateMachineHandler
from d_engine_sm.errors import (
    ApplyError,
    ApplyTimeout,
    HandlerClosed,
    SnapshotTransferError,
    WorkerStopped,
)
from d_engine_sm.proto import common_pb2, storage_pb2

WAIT = 10.0
T = TypeVar("T")
ACCEPTED = storage_pb2.SnapshotAck.ACCEPTED
FAILED = storage_pb2.SnapshotAck.FAILED


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, WAIT * 3))


@pytest.fixture
def handler(config: SnapshotConfig) -> Iterator[StateMachineHandler]:
    with StateMachineHandler(MemoryStateMachine(), config, node_id=1) as h:
        yield h


def apply_from_thread(handler: StateMachineHandler, entries: list[common_pb2.Entry]) -> None:
    t = threading.Thread(target=handler.apply_chunk, args=(entries,))
    t.start()
    t.join(WAIT)
    assert not t.is_alive()


# -- wait_applied --------------------------------------------------------------------
def test_ten_thousand_waiters_no_threads(handler: StateMachineHandler) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        before = threading.active_count()
        tasks = [
            asyncio.create_task(ah.wait_applied(1 + i % 100, timeout=WAIT)) for i in range(10_000)
        ]
        await asyncio.sleep(0)  # every task runs to its first await: registered
        assert ah.pending_waiters() == 10_000
        assert threading.active_count() == before
        apply_from_thread(handler, puts(1, 100))
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert threading.active_count() == before
        assert ah.pending_waiters() == 0

    run(main())


def test_mixed_targets_wake_in_turn(handler: StateMachineHandler) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        t5, t10, t15 = (asyncio.create_task(ah.wait_applied(n, None)) for n in (5, 10, 15))
        await asyncio.sleep(0)
        apply_from_thread(handler, puts(1, 10))
        await asyncio.wait_for(asyncio.gather(t5, t10), WAIT)
        assert not t15.done()
        assert ah.pending_waiters() == 1
        apply_from_thread(handler, puts(11, 5))
        await asyncio.wait_for(t15, WAIT)
        assert ah.pending_waiters() == 0

    run(main())


def test_fast_path_registers_nothing(handler: StateMachineHandler) -> None:
    handler.apply_chunk(puts(1, 3))

    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        await ah.wait_applied(3, 0)
        await ah.wait_applied(1, None)
        assert ah.pending_waiters() == 0

    run(main())


def test_timeout_same_message_as_sync(handler: StateMachineHandler) -> None:
    handler.apply_chunk(puts(1, 5))
    with pytest.raises(ApplyTimeout) as sync_err:
        handler.wait_applied(100, 0.05)

    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        with pytest.raises(ApplyTimeout) as err:
            await ah.wait_applied(100, 0.05)
        assert str(err.value) == str(sync_err.value)
        assert "current_applied: 5" in str(err.value)
        assert (err.value.target, err.value.current) == (100, 5)
        assert ah.pending_waiters() == 0

    run(main())


def test_cancelled_waiters_cleaned_up(handler: StateMachineHandler) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        tasks = [asyncio.create_task(ah.wait_applied(10 + i % 7, None)) for i in range(1000)]
        keep = asyncio.create_task(ah.wait_applied(3, None))
        await asyncio.sleep(0)
        assert ah.pending_waiters() == 1001
        for t in tasks[::2]:  # cancel half first, then the rest: both heap paths
            t.cancel()
        await asyncio.gather(*tasks[::2], return_exceptions=True)
        assert ah.pending_waiters() <= 1001
        for t in tasks[1::2]:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert ah.pending_waiters() == 1  # only `keep`, nothing leaked
        apply_from_thread(handler, puts(1, 20))
        await asyncio.wait_for(keep, WAIT)
        assert ah.pending_waiters() == 0

    run(main())


def test_close_wakes_waiters_with_handler_closed(config: SnapshotConfig) -> None:
    handler = StateMachineHandler(MemoryStateMachine(), config)
    handler.apply_chunk(puts(1, 2))

    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        tasks = [asyncio.create_task(ah.wait_applied(n, None)) for n in (5, 6, 7)]
        await asyncio.sleep(0)
        closer = threading.Thread(target=handler.close)
        closer.start()
        closer.join(WAIT)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        assert all(isinstance(r, HandlerClosed) for r in results)
        assert ah.pending_waiters() == 0
        with pytest.raises(HandlerClosed):
            await ah.wait_applied(9, 1.0)
        await ah.wait_applied(2, 1.0)  # already applied: fine even when closed

    run(main())


def test_bad_arguments(handler: StateMachineHandler) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        with pytest.raises(TypeError):
            await ah.wait_applied("1", 1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            await ah.wait_applied(1, -1.0)

    run(main())
    with pytest.raises(TypeError):
        AsyncStateMachineHandler(object())  # type: ignore[arg-type]


# -- executor-backed methods ---------------------------------------------------------
def test_methods_as_coroutines(handler: StateMachineHandler) -> None:
    async def main() -> None:
        async with AsyncStateMachineHandler(handler) as ah:
            assert await ah.apply_chunk(puts(1, 3)) == [ApplyResult(i, True) for i in (1, 2, 3)]
            assert await ah.last_applied() == 3
            await ah.update_pending(5)
            assert await ah.pending_range() == range(4, 6)
            found = await ah.read_from_state_machine([b"k2", b"nope"])
            assert found is not None
            assert [(r.key, r.value) for r in found] == [(b"k2", b"v2")]
            meta, path = await ah.create_snapshot()
            assert meta.last_included.index == 3
            assert path.exists()
            assert await ah.get_latest_snapshot_metadata() == meta
            chunk = await ah.load_snapshot_chunk(meta, 0)
            assert chunk.seq == 0
            assert await ah.cleanup_snapshot(1) == []
            assert (await ah.metrics())["last_applied"] == 3
        assert handler.closed

    run(main())


def test_async_watcher(handler: StateMachineHandler) -> None:
    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        watcher = ah.watch(b"k1")
        await ah.apply_chunk([put(1, b"k1", b"hello")])
        event = await watcher.get(timeout=WAIT)
        assert (event.key, event.value) == (b"k1", b"hello")
        watcher.close()
        assert [e async for e in watcher] == []

    run(main())


# -- snapshot transfer round trip ----------------------------------------------------
@pytest.fixture
def leader(tmp_path: Path) -> Iterator[StateMachineHandler]:
    cfg = SnapshotConfig(snapshots_dir=tmp_path / "leader", chunk_size=512, fsync=False)
    with StateMachineHandler(MemoryStateMachine(), cfg, node_id=7) as h:
        h.apply_chunk([put(i, b"key%d" % i, b"value-%d" % i * 3) for i in range(1, 301)])
        yield h


def test_async_snapshot_round_trip(
    leader: StateMachineHandler, handler: StateMachineHandler
) -> None:
    meta, _ = leader.create_snapshot()
    acks: list[storage_pb2.SnapshotAck] = []
    ack_threads: set[str] = set()

    async def ack(a: storage_pb2.SnapshotAck) -> None:
        await asyncio.sleep(0)
        ack_threads.add(threading.current_thread().name)
        acks.append(a)

    async def main() -> storage_pb2.SnapshotMetadata:
        ah_leader = AsyncStateMachineHandler(leader)
        ah_follower = AsyncStateMachineHandler(handler)
        waiter = asyncio.create_task(ah_follower.wait_applied(300, WAIT))
        stream = ah_leader.load_snapshot_data(meta, leader_term=4)
        installed = await ah_follower.apply_snapshot_stream_from_leader(4, stream, ack)
        await waiter  # install jumps last_applied: async waiters wake too
        return installed

    installed = run(main())
    assert installed.last_included == meta.last_included
    assert handler.last_applied() == 300
    leader_sm, follower_sm = leader.state_machine, handler.state_machine
    assert isinstance(leader_sm, MemoryStateMachine)
    assert isinstance(follower_sm, MemoryStateMachine)
    assert follower_sm.items() == leader_sm.items()
    assert len(acks) > 1
    assert [a.seq for a in acks] == list(range(len(acks)))
    assert all(a.status == ACCEPTED for a in acks)
    assert ack_threads == {threading.main_thread().name}  # acks run on the loop


def test_plain_iterable_and_sync_ack(
    leader: StateMachineHandler, handler: StateMachineHandler
) -> None:
    meta, _ = leader.create_snapshot()
    chunks = list(leader.load_snapshot_data(meta))
    acks: list[storage_pb2.SnapshotAck] = []

    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        await ah.apply_snapshot_stream_from_leader(1, chunks, acks.append)

    run(main())
    assert handler.last_applied() == 300
    assert len(acks) == len(chunks)


def test_failing_async_stream_installs_nothing(
    leader: StateMachineHandler, handler: StateMachineHandler
) -> None:
    meta, _ = leader.create_snapshot()
    chunks = list(leader.load_snapshot_data(meta))
    assert len(chunks) > 2
    acks: list[storage_pb2.SnapshotAck] = []

    async def broken() -> AsyncIterator[storage_pb2.SnapshotChunk]:
        for chunk in chunks[:2]:
            yield chunk
        raise ConnectionResetError("peer went away")

    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        with pytest.raises(SnapshotTransferError):
            await ah.apply_snapshot_stream_from_leader(1, broken(), acks.append)

    run(main())
    assert handler.last_applied() == 0
    assert acks[-1].status == FAILED
    assert handler.get_latest_snapshot_metadata() is None


def test_cancelled_receive_aborts_transfer(
    leader: StateMachineHandler, handler: StateMachineHandler
) -> None:
    meta, _ = leader.create_snapshot()
    chunks = list(leader.load_snapshot_data(meta))
    acks: list[storage_pb2.SnapshotAck] = []

    async def main() -> None:
        first_sent = asyncio.Event()
        failed_ack = asyncio.Event()
        never = asyncio.Event()

        async def stalled() -> AsyncIterator[storage_pb2.SnapshotChunk]:
            yield chunks[0]
            first_sent.set()
            await never.wait()  # the leader stalls; the caller gives up
            yield chunks[1]

        async def ack(a: storage_pb2.SnapshotAck) -> None:
            acks.append(a)
            if a.status == FAILED:
                failed_ack.set()

        ah = AsyncStateMachineHandler(handler)
        call = asyncio.create_task(ah.apply_snapshot_stream_from_leader(1, stalled(), ack))
        await first_sent.wait()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        # the receiving thread aborts with a FAILED ack, delivered on this loop
        await asyncio.wait_for(failed_ack.wait(), WAIT)

    run(main())
    assert handler.last_applied() == 0
    assert acks[-1].status == FAILED


# -- AsyncApplyWorker ----------------------------------------------------------------
class GatedSM(MemoryStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        self.entered.set()
        assert self.release.wait(WAIT)
        return super().apply_chunk(entries)


def test_async_apply_worker_events_and_back_pressure(config: SnapshotConfig) -> None:
    sm = GatedSM()
    handler = StateMachineHandler(sm, config, node_id=3)

    async def main() -> None:
        async with AsyncApplyWorker(handler, max_queued_entries=4) as w:
            await w.submit(puts(1, 1))
            await asyncio.get_running_loop().run_in_executor(None, sm.entered.wait, WAIT)
            await w.submit(puts(2, 4))  # fills the queue
            blocked = asyncio.create_task(w.submit(puts(6, 2)))
            ticks = 0
            for _ in range(5):  # the loop keeps running while submit waits
                await asyncio.sleep(0)
                ticks += 1
            assert ticks == 5
            assert not blocked.done()
            sm.release.set()
            await asyncio.wait_for(blocked, WAIT)
            last = 0
            while last < 7:
                event = await asyncio.wait_for(w.events.get(), WAIT)
                assert isinstance(event, ApplyCompleted)
                assert event.last_index > last
                last = event.last_index
        assert handler.last_applied() == 7
        with pytest.raises(WorkerStopped):
            await w.submit(puts(8, 1))

    run(main())


def test_async_apply_worker_fatal(config: SnapshotConfig) -> None:
    class Failing(MemoryStateMachine):
        def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
            raise OSError("Disk failure")

    handler = StateMachineHandler(Failing(), config)

    async def main() -> None:
        ah = AsyncStateMachineHandler(handler)
        async with AsyncApplyWorker(ah) as w:
            commit = NewCommitData(1, common_pb2.NODE_ROLE_FOLLOWER, 1)
            await w.submit(puts(1, 1), commit)
            event = await asyncio.wait_for(w.events.get(), WAIT)
            assert isinstance(event, FatalError)
            assert isinstance(event.error, ApplyError)
            with pytest.raises(WorkerStopped):
                await w.submit(puts(1, 1))

    run(main())


def test_async_with_shares_one_mixin_and_cleans_up(config: SnapshotConfig) -> None:
    from d_engine_sm._closing import AsyncClosing

    for cls in (AsyncStateMachineHandler, AsyncApplyWorker):
        assert issubclass(cls, AsyncClosing)
        assert cls.__aexit__ is AsyncClosing.__aexit__  # no per-class copy

    async def main() -> tuple[int, bool]:
        sync = StateMachineHandler(MemoryStateMachine(), config, node_id=1)
        async with AsyncStateMachineHandler(sync) as h:
            async with AsyncApplyWorker(h) as w:
                for first in range(1, 500, 100):
                    await w.submit(puts(first, 100))
            applied = await h.last_applied()  # leaving the worker drained it
        return applied, sync.closed

    assert run(main()) == (500, True)
