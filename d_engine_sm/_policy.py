"""Snapshot policies: when should this node take a snapshot?

Pure decisions over a :class:`SnapshotContext` and an injected monotonic
clock, so tests advance time instead of sleeping.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable

from d_engine_sm._values import SnapshotContext

Clock = Callable[[], float]


class SnapshotPolicy(abc.ABC):
    """Decides, per commit, whether to snapshot. Must be thread-safe and cheap.

    ``StateMachineHandler.should_snapshot`` consults it (with ``ApplyWorker``:
    on the apply thread, after each applied batch that carried a commit), so
    it must not block or do I/O.
    """

    @abc.abstractmethod
    def should_trigger(self, ctx: SnapshotContext) -> bool:
        """Whether a snapshot should be taken now.

        Called from any thread, possibly concurrently; non-blocking.

        Args:
            ctx: role, terms, the applied LogId and the newest snapshot's LogId.

        Returns:
            True to ask for a snapshot. A True may start a cooldown, so the
            caller should act on it.
        """

    def mark_snapshot_created(self) -> None:  # noqa: B027 - optional hook
        """Called by the handler after every successful create (default: nothing).

        Runs on the creating thread; must be quick and thread-safe.
        """

    def mark_snapshot_skipped(self) -> None:  # noqa: B027 - optional hook
        """Called by the handler when a create found another writer at work
        (``SnapshotInProgress``): a trigger that made no snapshot must not
        hold the next one back, so the next check may trigger again."""


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")


class LogSizePolicy(SnapshotPolicy):
    """Trigger when ``last_applied.index - last_included.index >= threshold``.

    Role-agnostic (followers snapshot too). No trigger when the current term
    is behind the snapshot's term, nor within ``cooldown`` seconds of the last
    trigger. A check that does not trigger does not start the cooldown, and
    neither does a trigger whose snapshot was skipped because another writer
    held the directory (:meth:`mark_snapshot_skipped` withdraws it).
    """

    def __init__(self, threshold: int, cooldown: float, *, clock: Clock = time.monotonic) -> None:
        self._check_threshold(threshold)
        _check_seconds("cooldown", cooldown)
        self._threshold = threshold
        self._cooldown = float(cooldown)
        self._clock = clock
        self._last_trigger: float | None = None
        self._before_trigger: float | None = None  # restored when the trigger is withdrawn
        self._outstanding = False  # a trigger not yet followed by created/skipped
        self._lock = threading.Lock()

    @staticmethod
    def _check_threshold(threshold: int) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")

    @property
    def threshold(self) -> int:
        """The lag, in entries, that triggers a snapshot."""
        return self._threshold

    def update_threshold(self, threshold: int) -> None:
        """Change the threshold; takes effect at the next check. Thread-safe.

        Raises:
            ValueError: ``threshold`` is not an int >= 1.
        """
        self._check_threshold(threshold)
        self._threshold = threshold

    def lag_reached(self, ctx: SnapshotContext) -> bool:
        """The size condition alone (no cooldown, no state change). Non-blocking.

        >>> from d_engine_sm._values import log_id
        >>> p = LogSizePolicy(100, 0.0)
        >>> p.lag_reached(SnapshotContext(1, log_id(0, 0), log_id(100, 1), 1))
        True
        """
        if ctx.current_term < ctx.last_included.term:
            return False
        lag = max(0, ctx.last_applied.index - ctx.last_included.index)
        return lag >= self._threshold

    def should_trigger(self, ctx: SnapshotContext) -> bool:
        """Lag reached and no trigger within ``cooldown``; a True starts the cooldown.

        Takes a short internal lock; thread-safe.
        """
        if not self.lag_reached(ctx):
            return False
        with self._lock:  # blocking, unlike d-engine's CAS that answered a spurious False
            now = self._clock()
            if self._last_trigger is not None and now - self._last_trigger < self._cooldown:
                return False
            self._before_trigger, self._last_trigger = self._last_trigger, now
            self._outstanding = True
            return True

    def mark_snapshot_created(self) -> None:
        """The trigger made a snapshot: keep the cooldown it started. Thread-safe."""
        with self._lock:
            self._outstanding = False

    def mark_snapshot_skipped(self) -> None:
        """The trigger made no snapshot: withdraw the cooldown it started. Thread-safe."""
        with self._lock:
            if self._outstanding:  # a create without a trigger withdraws nothing
                self._last_trigger = self._before_trigger
                self._outstanding = False


class TimeBasedPolicy(SnapshotPolicy):
    """Trigger on the leader once ``interval`` seconds passed since start or last snapshot."""

    def __init__(self, interval: float, *, clock: Clock = time.monotonic) -> None:
        _check_seconds("interval", interval)
        self._interval = float(interval)
        self._clock = clock
        self._started = clock()

    def due(self) -> bool:
        """Whether ``interval`` seconds passed since construction or the last reset."""
        return self._clock() - self._started >= self._interval

    def should_trigger(self, ctx: SnapshotContext) -> bool:
        """True on the leader once the interval elapsed. Non-blocking, thread-safe."""
        return ctx.is_leader() and self.due()

    def reset_timer(self) -> None:
        """Restart the interval from now."""
        self._started = self._clock()

    def mark_snapshot_created(self) -> None:
        """Restart the interval (the handler calls it after every create)."""
        self.reset_timer()


class CompositePolicy(SnapshotPolicy):
    """Leader only: trigger when the interval elapsed OR the log lag reached ``threshold``."""

    def __init__(
        self, interval: float, threshold: int, cooldown: float, *, clock: Clock = time.monotonic
    ) -> None:
        self.time = TimeBasedPolicy(interval, clock=clock)
        self.size = LogSizePolicy(threshold, cooldown, clock=clock)

    def should_trigger(self, ctx: SnapshotContext) -> bool:
        """On the leader: the time OR the size component triggers. Thread-safe."""
        if not ctx.is_leader():
            return False
        return self.time.due() or self.size.should_trigger(ctx)

    def mark_snapshot_created(self) -> None:
        """Restart the time component and keep the size component's cooldown."""
        self.time.mark_snapshot_created()
        self.size.mark_snapshot_created()

    def mark_snapshot_skipped(self) -> None:
        """Withdraw the size component's cooldown (the interval keeps running)."""
        self.size.mark_snapshot_skipped()
