"""Progress display for the command line (stdlib only).

On a terminal a long step shows a carriage-return bar redrawn at most ~10
times a second; elsewhere (pipes, logs, tests) it prints one plain status
line when the step starts and nothing per update, so captured output stays
readable. Only the CLI uses this module; the library itself never prints.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from typing import Final, TextIO

Clock = Callable[[], float]
Formatter = Callable[[int], str]

MIN_INTERVAL: Final = 0.1  # seconds between redraws: ~10 updates/s
_BAR_MIN: Final = 10
_BAR_MAX: Final = 40


def fmt_count(n: int) -> str:
    """``1234567`` -> ``'1,234,567'``.

    >>> fmt_count(1234567)
    '1,234,567'
    """
    return f"{n:,}"


def fmt_mb(n: int) -> str:
    """Bytes as decimal megabytes.

    >>> fmt_mb(2_500_000)
    '2.5 MB'
    """
    return f"{n / 1e6:.1f} MB"


def fmt_age(seconds: float) -> str:
    """A short human age: ``42s``, ``5m12s``, ``3h04m``, ``2d05h``.

    >>> fmt_age(42), fmt_age(312), fmt_age(11040), fmt_age(190000)
    ('42s', '5m12s', '3h04m', '2d04h')
    """
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Bar:
    """One long step's progress. ``update`` is thread-safe and cheap.

    Not constructed directly: see :meth:`Reporter.bar`.
    """

    def __init__(
        self,
        reporter: Reporter,
        label: str,
        total: int,
        fmt: Formatter,
        unit: str,
    ) -> None:
        self._reporter = reporter
        self._label = label
        self._total = max(0, total)
        self._fmt = fmt
        self._unit = unit
        self._done = 0
        self._started = reporter.clock()
        self._last_draw = float("-inf")
        self._lock = threading.Lock()
        self._closed = False

    def update(self, done: int, total: int | None = None) -> None:
        """Record progress; redraws at most every ``MIN_INTERVAL`` seconds.

        Safe from any thread; never blocks on anything but a short lock.
        """
        with self._lock:
            if self._closed:
                return
            self._done = max(self._done, done)
            if total is not None and total > 0:
                self._total = total
            if not self._reporter.tty:
                return
            now = self._reporter.clock()
            if now - self._last_draw < MIN_INTERVAL and self._done < self._total:
                return
            self._last_draw = now
            text = self._render(now)
        self._reporter.draw(text)

    def _render(self, now: float) -> str:
        total = self._total
        done = min(self._done, total) if total else self._done
        fraction = done / total if total else 0.0
        width = max(_BAR_MIN, min(_BAR_MAX, self._reporter.columns() - 60))
        filled = int(fraction * width)
        elapsed = now - self._started
        rate = f"  {self._fmt(int(done / elapsed))}/s" if elapsed > 0 and done else ""
        unit = f" {self._unit}" if self._unit else ""
        return (
            f"{self._label:<9} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"
            f"  {self._fmt(done)}/{self._fmt(total)}{unit}{rate}"
        )

    def close(self) -> None:
        """End the bar: draws it complete, then clears the line. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._reporter.clear()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reporter:
    """Writes status lines and progress bars to one text stream.

    Args:
        stream: where to write (the CLI passes ``sys.stdout``).
        tty: draw bars; default ``stream.isatty()``.
        clock: monotonic seconds (tests inject one).

    Thread-safe: bars update from worker threads while lines come from the
    main thread; one lock orders the writes.
    """

    def __init__(self, stream: TextIO, *, tty: bool | None = None, clock: Clock = time.monotonic):
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.clock = clock
        self._lock = threading.Lock()
        self._drawn = 0  # length of the bar text currently on screen

    def columns(self) -> int:
        return shutil.get_terminal_size((100, 24)).columns

    def line(self, text: str) -> None:
        """Print one status line (clearing any bar first)."""
        with self._lock:
            self._erase_locked()
            self.stream.write(text + "\n")
            self.stream.flush()

    def bar(
        self, label: str, total: int, *, start: str, fmt: Formatter = fmt_count, unit: str = ""
    ) -> Bar:
        """A progress bar for a step; off a terminal, prints ``start`` as a plain line."""
        if not self.tty:
            self.line(f"{label}: {start}")
        return Bar(self, label, total, fmt, unit)

    def draw(self, text: str) -> None:
        with self._lock:
            width = self.columns() - 1
            text = text[:width]
            pad = " " * max(0, self._drawn - len(text))
            self.stream.write("\r" + text + pad)
            self.stream.flush()
            self._drawn = len(text)

    def clear(self) -> None:
        with self._lock:
            self._erase_locked()
            self.stream.flush()

    def _erase_locked(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream
        return False
