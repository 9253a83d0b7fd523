from __future__ import annotations

import queue
import threading

import pytest
from conftest import put

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler, _kv
from d_engine_sm.proto import client_pb2

PUT = client_pb2.WATCH_EVENT_TYPE_PUT
DELETE = client_pb2.WATCH_EVENT_TYPE_DELETE


def events(w: object, n: int) -> list[tuple[bytes, bytes, int]]:
    out = []
    for _ in range(n):
        ev = w.get(5)  # type: ignore[attr-defined]
        out.append((ev.key, ev.value, ev.event_type))
    return out


def test_ordering_and_cas_rules(config: SnapshotConfig) -> None:  # B030-B036
    cas = _kv.compare_and_swap
    with StateMachineHandler(MemoryStateMachine(), config) as h, h.watch() as w:
        h.apply_chunk(
            [
                put(1, b"k1", b"v1"),
                _kv.command_entry(2, 1, cas(b"k2", b"nope", b"x")),  # fails: no event
                _kv.command_entry(3, 1, _kv.delete(b"k3")),
                _kv.command_entry(4, 1, cas(b"lock", None, b"owner2")),
                _kv.noop_entry(5, 1),
                _kv.command_entry(6, 1, b"\xff"),
            ]
        )
        assert events(w, 3) == [
            (b"k1", b"v1", PUT),
            (b"k3", b"", DELETE),
            (b"lock", b"owner2", PUT),
        ]
        with pytest.raises(queue.Empty):
            w.get(0.01)


def test_single_key_watch(config: SnapshotConfig) -> None:
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        w = h.watch(b"b")
        h.apply_chunk([put(1, b"a", b"1"), put(2, b"b", b"2"), put(3, b"b", b"3")])
        assert events(w, 2) == [(b"b", b"2", PUT), (b"b", b"3", PUT)]
        with pytest.raises(queue.Empty):
            w.get(0)


def test_lagging_watcher_drops_oldest_and_never_blocks_apply(config: SnapshotConfig) -> None:
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        slow = h.watch(maxsize=4)
        fast = h.watch(maxsize=1000)
        for i in range(1, 101):
            h.apply_chunk([put(i, b"k", str(i).encode())])
        assert slow.dropped == 96
        assert [v for _, v, _ in events(slow, 4)] == [b"97", b"98", b"99", b"100"]
        assert len(events(fast, 100)) == 100 and fast.dropped == 0
        assert h.metrics()["watch_dropped"] == 96


def test_close_ends_iteration(config: SnapshotConfig) -> None:
    h = StateMachineHandler(MemoryStateMachine(), config)
    w = h.watch()
    got: list[bytes] = []
    done = threading.Event()

    def consume() -> None:
        got.extend(ev.key for ev in w)
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    h.apply_chunk([put(1, b"a", b"1")])
    h.close()
    assert done.wait(10)
    assert got == [b"a"]
    assert w.closed
    with pytest.raises(queue.Empty):
        w.get(0)
    late = h.watch()
    assert late.closed


def test_closed_watcher_gets_nothing_more(config: SnapshotConfig) -> None:
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        w = h.watch()
        w.close()
        h.apply_chunk([put(1, b"a", b"1")])
        with pytest.raises(queue.Empty):
            w.get(0)


def test_watch_argument_errors(config: SnapshotConfig) -> None:
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        with pytest.raises(TypeError):
            h.watch("str-key")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="maxsize"):
            h.watch(maxsize=0)
