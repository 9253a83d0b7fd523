"""The ``d-engine-sm`` command line (also ``python -m d_engine_sm``).

``demo`` runs the main job end to end; ``snapshot list|inspect|verify|extract``
look at archives on disk; ``serve``/``send`` move snapshots over gRPC (the
``grpc`` extra, imported only by those two commands).

Each command group lives in its own module that exposes
``register(subparsers)``: it adds its parser(s) and sets ``func``, the
function that runs the command (``func(args) -> exit status``). The parser
is assembled from :data:`COMMANDS`; adding a command is adding a module there.
Ctrl-C interrupts a command anywhere, once; a command that must finish some
steps (stop threads before closing, remove what it made) sets
``handles_interrupts=True`` and marks its interruptible parts itself
(``common.INTERRUPTS``).

Errors are one line on stderr, ``d-engine-sm: error: ...``: exit 2 for bad
usage, 1 for failures, 130 when interrupted, never a traceback
(``--verbose`` logs it). This package and ``_progress`` are the only
modules that print.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sqlite3
import sys
from collections.abc import Callable, Iterator
from typing import Final

from d_engine_sm import __version__
from d_engine_sm._cli import demo, snapshot, transport
from d_engine_sm._cli.common import (
    INTERRUPTS,
    PROG,
    Parser,
    Subparsers,
    _UsageError,
    describe,
    error,
    log,
)
from d_engine_sm._cli.common import (
    _Failure as _Failure,  # re-exported: tests catch it
)
from d_engine_sm._cli.demo import _Demo as _Demo  # the seam tests subclass
from d_engine_sm.errors import DEngineError
from d_engine_sm.integrations import _cluster_cmd

COMMANDS: Final[tuple[Callable[[Subparsers], None], ...]] = (
    demo.register,
    snapshot.register,
    transport.register,
    _cluster_cmd.register,
)


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 success, 1 failure, 2 bad usage, 130 interrupted.

    Blocking (runs the whole command). From the main thread it handles
    SIGINT while the command runs (see ``common.Interrupts``: Ctrl-C stops
    the command at a point where it can clean up, prints one line and
    returns 130), and ``serve`` also SIGTERM; called with ``argv`` the
    previous SIGINT handler is restored afterwards.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        error(str(exc))
        return 2
    except SystemExit as exc:  # --help / --version already printed
        return exc.code if isinstance(exc.code, int) else 0
    # Run as the program (no argv): keep handling Ctrl-C until the process exits.
    with INTERRUPTS.installed(restore=argv is not None), _logging(bool(args.verbose)):
        status, message = _run(args)
        if INTERRUPTS.pending:  # whatever else failed, the user asked to stop
            status, message = 130, "interrupted"
        if message is not None:
            error(message)
        return status


def _run(args: argparse.Namespace) -> tuple[int, str | None]:
    """The command's exit status and the one error line to print (None: none)."""
    try:
        if getattr(args, "handles_interrupts", False):
            status: int = args.func(args)
        else:  # the default: Ctrl-C interrupts the command anywhere (once)
            with INTERRUPTS.interruptible():
                status = args.func(args)
        return status, None
    except _UsageError as exc:
        return 2, str(exc)
    except _Failure as exc:
        return 1, str(exc)
    except KeyboardInterrupt:
        return 130, "interrupted"
    except (DEngineError, OSError, ValueError, TypeError, sqlite3.Error) as exc:
        log.debug("command failed", exc_info=True)
        return 1, describe(exc)
    except Exception as exc:  # a bug: still one line; --verbose shows the traceback
        log.debug("unexpected error", exc_info=True)
        return 1, f"unexpected {type(exc).__name__}: {exc}"


def build_parser() -> Parser:
    """The whole parser: top-level options, then each command module's parsers."""
    parser = Parser(
        prog=PROG,
        description="The state-machine side of a Raft node: demo, snapshot tools, transport.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log (INFO) to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for register in COMMANDS:
        register(commands)
    return parser


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Library logs to stderr for this call: INFO with ``--verbose``, else WARNING
    (and, once Ctrl-C was pressed, only errors).

    Restored afterwards, so calling :func:`main` in-process leaves no handler behind.
    """
    root = logging.getLogger("d_engine_sm")
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        # After Ctrl-C, warnings about what it cut short (an aborted transfer, a
        # discarded batch) are expected: the one "interrupted" line says it all.
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or not INTERRUPTS.pending)
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


__all__ = ["COMMANDS", "build_parser", "main"]
