"""Watchers: fire-and-forget delivery of applied key changes.

Apply never blocks on a watcher: each has a bounded queue and, when full,
its oldest events are dropped and counted in ``Watcher.dropped``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from d_engine_sm._closing import Closing
from d_engine_sm.proto import client_pb2

WatchResponse = client_pb2.WatchResponse


class Watcher(Closing):
    """An iterator of ``WatchResponse`` for one key (or all keys).

    Thread-safe; meant for one consumer thread. Iteration blocks until an
    event arrives and ends once the watcher (or its handler) is closed and
    the queue is drained. Built by ``StateMachineHandler.watch``; a context
    manager that closes it.

    Attributes:
        key: the watched key, or None for every key.
        maxsize: how many undelivered events are kept before the oldest drop.
        dropped: how many events were dropped because the queue was full.
    """

    def __init__(self, hub: WatchHub, key: bytes | None, maxsize: int) -> None:
        self.key = key
        self.maxsize = maxsize
        self.dropped = 0
        self._hub = hub
        self._events: deque[WatchResponse] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def _push(self, event: WatchResponse) -> bool:
        """Queue ``event``; returns False when the oldest one was dropped for it."""
        with self._cond:
            if self._closed:
                return True
            kept = True
            if len(self._events) >= self.maxsize:
                self._events.popleft()
                self.dropped += 1
                kept = False
            self._events.append(event)
            self._cond.notify()
        return kept

    def get(self, timeout: float | None = None) -> WatchResponse:
        """The next event.

        Args:
            timeout: seconds to wait; None waits until an event or close.

        Raises:
            queue.Empty: nothing arrived within ``timeout``, or the watcher is
                closed and drained.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._events:
                if self._closed:
                    raise queue.Empty
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._cond.wait(remaining)
            return self._events.popleft()

    def __iter__(self) -> Iterator[WatchResponse]:
        return self

    def __next__(self) -> WatchResponse:
        try:
            return self.get()
        except queue.Empty:
            raise StopIteration from None

    @property
    def closed(self) -> bool:
        """True once the watcher or its handler was closed."""
        return self._closed

    def close(self) -> None:
        """Stop receiving events; a blocked consumer wakes. Idempotent."""
        self._hub._remove(self)
        self._mark_closed()

    def _mark_closed(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class WatchHub:
    """The handler's registry of watchers, indexed by key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Copy-on-write so publish iterates without taking the lock.
        self._all: tuple[Watcher, ...] = ()
        self._by_key: dict[bytes, tuple[Watcher, ...]] = {}
        self._closed = False

    @property
    def active(self) -> bool:
        """Whether any watcher is registered (apply skips event building when not)."""
        return bool(self._all or self._by_key)

    def watch(self, key: bytes | None, maxsize: int) -> Watcher:
        """Register a watcher of ``key`` (all keys when None). Thread-safe.

        Raises:
            TypeError: ``key`` is neither bytes nor None.
            ValueError: ``maxsize`` is not an int >= 1.
        """
        if key is not None and not isinstance(key, bytes):
            raise TypeError(f"watch key must be bytes or None, got {type(key).__name__}")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, got {maxsize!r}")
        watcher = Watcher(self, key, maxsize)
        with self._lock:
            if self._closed:
                watcher._mark_closed()
            elif key is None:
                self._all = (*self._all, watcher)
            else:
                self._by_key = {**self._by_key, key: (*self._by_key.get(key, ()), watcher)}
        return watcher

    def publish(self, events: Iterable[WatchResponse]) -> tuple[int, int]:
        """Deliver events in order; returns (delivered, dropped)."""
        delivered = dropped = 0
        everyone = self._all
        by_key = self._by_key
        for event in events:
            for watcher in (*everyone, *by_key.get(event.key, ())):
                delivered += 1
                if not watcher._push(event):
                    dropped += 1
        return delivered, dropped

    def _remove(self, watcher: Watcher) -> None:
        with self._lock:
            if watcher.key is None:
                self._all = tuple(w for w in self._all if w is not watcher)
            else:
                rest = tuple(w for w in self._by_key.get(watcher.key, ()) if w is not watcher)
                by_key = dict(self._by_key)
                if rest:
                    by_key[watcher.key] = rest
                else:
                    by_key.pop(watcher.key, None)
                self._by_key = by_key

    def close_all(self) -> None:
        """Close every watcher and refuse new ones (the handler is closing)."""
        with self._lock:
            self._closed = True
            watchers = (*self._all, *(w for ws in self._by_key.values() for w in ws))
            self._all = ()
            self._by_key = {}
        for watcher in watchers:
            watcher._mark_closed()
