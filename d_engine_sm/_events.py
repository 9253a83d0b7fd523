"""The ApplyWorker's events and how ``on_event`` receives them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from d_engine_sm._values import ApplyResult
from d_engine_sm.proto import storage_pb2


@dataclass(frozen=True)
class ApplyCompleted:
    """One ``apply_chunk`` call succeeded: results for every entry, in log order."""

    last_index: int
    results: list[ApplyResult]


@dataclass(frozen=True)
class FatalError:
    """The worker stopped: ``error`` is the ``ApplyError`` (source ``"StateMachine"``)
    or, for anything unexpected (handler closed, order broken from outside),
    that error with source ``"ApplyWorker"``."""

    source: str
    error: BaseException


@dataclass(frozen=True)
class SnapshotCreated:
    """A policy-triggered snapshot was written."""

    metadata: storage_pb2.SnapshotMetadata
    path: Path


@dataclass(frozen=True)
class SnapshotFailed:
    """A policy-triggered snapshot failed (logged; the worker keeps applying)."""

    error: BaseException


@dataclass(frozen=True)
class SnapshotSkipped:
    """A policy-triggered snapshot was not taken: another writer (a snapshot
    create or install in this process, or another process holding the
    directory's ``.lock``) was at work. No cooldown started: the next applied
    batch that carries a commit asks the policy again."""

    reason: str


WorkerEvent: TypeAlias = (
    ApplyCompleted | FatalError | SnapshotCreated | SnapshotFailed | SnapshotSkipped
)
EventFn: TypeAlias = Callable[[WorkerEvent], Any]


class HasPut(Protocol):
    """Anything with a ``put(event)`` method, such as a ``queue.Queue``."""

    def put(self, item: WorkerEvent, /) -> Any:
        """Accept one event; called on the apply thread, must not block long."""


def event_sink(on_event: EventFn | HasPut) -> EventFn:
    """Turn a callable or an object with ``put`` into the worker's event callback.

    Raises:
        TypeError: ``put`` is a coroutine function, or ``on_event`` is neither.
    """
    put = getattr(on_event, "put", None)
    if put is not None and callable(put):
        if inspect.iscoroutinefunction(put):
            raise TypeError(
                "on_event.put is a coroutine (an asyncio.Queue?): use "
                "d_engine_sm.aio.AsyncApplyWorker, or a callable that calls "
                "loop.call_soon_threadsafe(queue.put_nowait, event)"
            )
        return put  # type: ignore[no-any-return]
    if callable(on_event):
        return on_event
    raise TypeError(f"on_event must be callable or have put(), got {type(on_event).__name__}")
