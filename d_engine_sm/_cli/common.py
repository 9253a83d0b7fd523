"""What every command of the command line shares: errors, the parser,
argument types, output helpers.

A command module adds its parsers in ``register(subparsers)`` through
:func:`add_command` (which gives every command ``-v/--verbose``) and sets
``func`` to the function that runs it: ``func(args) -> exit status``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn, TypeAlias

from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._snapshot.naming import parse_archive_name
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._state_machine import StateMachine

log: Final = logging.getLogger("d_engine_sm.cli")

PROG: Final = "d-engine-sm"
DEFAULT_PREFIX: Final = "snapshot-"


class _UsageError(Exception):
    """Bad command-line usage: exit 2."""


class _Failure(Exception):
    """A command failed in a way already explained by the message: exit 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors raise (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"


def _verbose_parent() -> Parser:
    parent = Parser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a top-level --verbose.
    parent.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    return parent


_VERBOSE: Final = _verbose_parent()


def add_command(subparsers: Subparsers, name: str, **kwargs: Any) -> Parser:
    """Add one (sub)command's parser; it accepts ``-v/--verbose`` too."""
    return subparsers.add_parser(name, parents=[_VERBOSE], **kwargs)


# -- argument types -------------------------------------------------------------------
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer (``_`` separators allowed) >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 0-65535), got {text!r}")
    return text


@dataclass(frozen=True)
class StateSpec:
    kind: str  # "memory" or "sqlite"
    path: Path | None = None


def state_spec(text: str) -> StateSpec:
    if text == "memory":
        return StateSpec("memory")
    kind, sep, path = text.partition(":")
    if kind == "sqlite" and sep and path:
        return StateSpec("sqlite", Path(path))
    raise argparse.ArgumentTypeError(f"expected 'memory' or 'sqlite:PATH', got {text!r}")


def check_prefix(prefix: str) -> str:
    try:
        parse_archive_name("", prefix)
    except (TypeError, ValueError) as exc:
        raise _UsageError(f"bad --prefix: {exc}") from None
    return prefix


# -- output ---------------------------------------------------------------------------
def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """The one line a failing command prints on stderr."""
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {one_line}\n")
    sys.stderr.flush()


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def printable(name: str) -> str:
    """A member name safe to print (hostile archives may hold control characters)."""
    return name if name.isprintable() else repr(name)


def short_hex(digest: bytes, n: int = 12) -> str:
    return digest.hex()[:n]


# -- files and state machines ---------------------------------------------------------
def existing_dir(path: Path) -> Path:
    if not path.exists():
        raise _Failure(f"no such directory: {path}")
    if not path.is_dir():
        raise _Failure(f"not a directory: {path}")
    return path


def existing_file(path: Path) -> Path:
    if not path.exists():
        raise _Failure(f"no such file: {path}")
    if not path.is_file():
        raise _Failure(f"not a file: {path}")
    return path


def make_state_machine(spec: StateSpec, durability: str = "full") -> StateMachine:
    if spec.kind == "memory":
        return MemoryStateMachine()
    assert spec.path is not None
    return SqliteStateMachine(spec.path, durability=durability)


def close_state_machine(sm: StateMachine) -> None:
    close = getattr(sm, "close", None)
    if callable(close):
        close()


# -- Ctrl-C ---------------------------------------------------------------------------
class Interrupts:
    """Where Ctrl-C (SIGINT) may interrupt a command, and what it does elsewhere.

    A ``KeyboardInterrupt`` is raised only inside :meth:`interruptible`
    blocks, and at most once per run; anywhere else (opening, closing,
    removing, or a step that must finish such as a snapshot create) the
    signal is remembered and the command stops at its next interruptible
    point, or ends with exit 130 if there is none. Inside a
    :meth:`cancelling` block the signal calls that block's ``cancel``
    instead (it must be quick: it runs in the signal handler). So clean-up
    code never meets an interrupt, and an impatient second Ctrl-C changes
    nothing. ``main()`` runs a command inside one interruptible block unless
    the command set ``handles_interrupts`` (then it marks its own blocks).
    """

    def __init__(self) -> None:
        self.pending = False  # a signal arrived (and may not have been raised yet)
        self._armed = False
        self._raised = False
        self._cancel: Callable[[], object] | None = None

    def _reset(self) -> None:
        self.pending = self._armed = self._raised = False
        self._cancel = None

    @contextlib.contextmanager
    def installed(self, *, restore: bool = True) -> Iterator[Interrupts]:
        """Handle SIGINT this way while inside (main thread only; elsewhere: no-op).

        ``restore=False`` keeps the handler after the block, for a process
        about to exit: a late Ctrl-C then cannot print a traceback.
        """
        self._reset()  # a fresh run
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_signal)
        try:
            yield self
        finally:
            if restore:
                signal.signal(signal.SIGINT, previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True
        if self._armed and not self._raised:
            self._armed = False
            self._raised = True
            raise KeyboardInterrupt
        if self._cancel is not None:
            self._cancel()

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` now if a signal arrived and none was raised yet."""
        if self.pending and not self._raised:
            self._raised = True
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Ctrl-C raises ``KeyboardInterrupt`` in this block (once per run)."""
        self.check()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @contextlib.contextmanager
    def cancelling(self, cancel: Callable[[], object]) -> Iterator[None]:
        """Ctrl-C calls ``cancel()`` in this block; ``KeyboardInterrupt`` follows it."""
        self.check()
        self._cancel = cancel
        try:
            yield
        finally:
            self._cancel = None
        self.check()


INTERRUPTS: Final = Interrupts()
