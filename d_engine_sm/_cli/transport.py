"""``serve`` / ``send``: move snapshots between processes or hosts over gRPC.

The ``grpc`` extra is imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Final

from d_engine_sm._cli.common import (
    INTERRUPTS,
    StateSpec,
    Subparsers,
    _Failure,
    add_command,
    close_state_machine,
    existing_dir,
    host_port,
    make_state_machine,
    non_negative_int,
    non_negative_seconds,
    out,
    positive_float,
    state_spec,
)
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._progress import fmt_mb
from d_engine_sm._snapshot.naming import archive_name

GRPC_HINT: Final = "pip install 'd-engine-sm[grpc]'"
GRPC_EXTRA_PACKAGES: Final = ("grpc", "grpc_health")  # what the grpc extra installs
STOP_POLL: Final = 0.2  # seconds: at most this late, serve notices SIGINT/SIGTERM


def register(subparsers: Subparsers) -> None:
    serve = add_command(
        subparsers, "serve", help="accept and serve snapshots over gRPC until interrupted"
    )
    serve.add_argument("--dir", type=Path, required=True, help="snapshots directory")
    serve.add_argument("--listen", type=host_port, required=True, metavar="HOST:PORT")
    serve.add_argument(
        "--state", type=state_spec, default=StateSpec("memory"), metavar="sqlite:PATH|memory"
    )
    serve.add_argument("--node-id", type=non_negative_int, default=0, metavar="N")
    serve.add_argument(
        "--resume-ttl",
        type=non_negative_seconds,
        metavar="SECONDS",
        help="keep an interrupted receive resumable this long (0: never; default 3600)",
    )
    serve.add_argument(
        "--transfer-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="abort a receive that takes longer than this in all (default 3600)",
    )
    serve.add_argument(
        "--metrics",
        type=host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs the prometheus extra)",
    )
    serve.set_defaults(func=_cmd_serve, handles_interrupts=True)

    send = add_command(subparsers, "send", help="push this directory's newest snapshot to a peer")
    send.add_argument("--dir", type=Path, required=True, help="snapshots directory")
    send.add_argument("--to", type=host_port, required=True, metavar="HOST:PORT")
    send.add_argument("--term", type=non_negative_int, help="leader term (default: the snapshot's)")
    send.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS")
    send.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="send the whole snapshot, without asking the peer what it already holds",
    )
    send.set_defaults(func=_cmd_send, handles_interrupts=True)


PROMETHEUS_HINT: Final = "pip install 'd-engine-sm[prometheus]'"


def _grpc_transport(verbose: bool) -> Any:
    # gRPC's native logger writes its own line for failures we report (a busy port,
    # say): the command's one error line says it. gRPC reads the variable as it
    # loads, so it is set only around that import (nothing else inherits it).
    quiet = not verbose and "GRPC_VERBOSITY" not in os.environ and "grpc" not in sys.modules
    if quiet:
        os.environ["GRPC_VERBOSITY"] = "NONE"
    try:
        from d_engine_sm.transport import grpc as transport
    except ImportError as exc:
        # Only the extra's own packages: a broken module of ours must show as itself.
        if (exc.name or "").split(".")[0] in GRPC_EXTRA_PACKAGES:
            raise _Failure(f"the gRPC transport needs the grpc extra: {GRPC_HINT}") from exc
        raise
    finally:
        if quiet:
            del os.environ["GRPC_VERBOSITY"]
    return transport


def _cmd_serve(args: argparse.Namespace) -> int:
    transport = _grpc_transport(bool(args.verbose))
    directory: Path = args.dir
    if directory.exists() and not directory.is_dir():
        raise _Failure(f"not a directory: {directory}")
    spec: StateSpec = args.state
    sm = make_state_machine(spec)
    try:
        limits = {"resume_ttl": args.resume_ttl, "transfer_timeout": args.transfer_timeout}
        config = SnapshotConfig(
            snapshots_dir=directory, **{k: v for k, v in limits.items() if v is not None}
        )
        # SIGTERM stops cleanly (exit 0), Ctrl-C too but ends "interrupted" (130);
        # neither interrupts the server's stop or the handler's close half-way.
        with (
            _stop_on_sigterm() as stop,
            INTERRUPTS.cancelling(stop.request),
            StateMachineHandler(sm, config, node_id=args.node_id) as handler,
            contextlib.ExitStack() as stack,
        ):
            server, port = transport.start_server(handler, args.listen)
            try:
                metrics = stack.enter_context(_metrics_server(args.metrics, handler))
                host = args.listen.rpartition(":")[0]
                out(f"serving node {args.node_id} on {host}:{port} (snapshots in {directory})")
                if metrics is not None:
                    out(f"metrics at http://{metrics.host}:{metrics.port}/metrics")
                # Short sleeps: the handlers only set a flag (see _StopRequest).
                while not stop.requested:
                    time.sleep(STOP_POLL)
            finally:
                stack.close()  # the metrics endpoint first: it reads the handler
                server.stop(grace=2.0).wait(5.0)
            # A receive still running is aborted or waited for by close() (on leaving
            # the with): the state machine is closed only after that.
            out(f"stopped; last_applied {handler.last_applied()}")
    finally:
        close_state_machine(sm)
    return 0


@contextlib.contextmanager
def _metrics_server(address: str | None, handler: StateMachineHandler) -> Iterator[Any]:
    """The Prometheus endpoint for ``handler`` while the block runs (None without --metrics)."""
    if address is None:
        yield None
        return
    try:
        from d_engine_sm.prometheus import start_metrics_server
    except ImportError as exc:
        raise _Failure(f"--metrics needs the prometheus extra: {PROMETHEUS_HINT}") from exc
    try:
        server = start_metrics_server(address, handler)
    except OSError as exc:
        raise _Failure(f"cannot serve metrics on {address}: {exc.strerror or exc}") from exc
    with server:
        yield server


class _StopRequest:
    """Set from signal handlers, so a plain attribute: a handler runs between
    any two bytecodes of the main thread, possibly while it holds a lock
    (an ``Event.set`` there could wait for the main thread itself)."""

    requested = False

    def request(self) -> None:
        self.requested = True


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[_StopRequest]:
    """A stop request made by SIGTERM while inside (the handler restored afterwards)."""
    stop = _StopRequest()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.request()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # pragma: no cover - signals need the main thread
        return
    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_send(args: argparse.Namespace) -> int:
    transport = _grpc_transport(bool(args.verbose))
    directory = existing_dir(args.dir)
    # Only the archive matters: the state machine is a placeholder. Read-only: the
    # directory is left exactly as found (no leftover removed, nothing moved aside).
    config = SnapshotConfig(snapshots_dir=directory, read_only=True)
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        meta = h.get_latest_snapshot_metadata()
        if meta is None:
            raise _Failure(f"no snapshot archive to send in {directory}")
        lid = meta.last_included
        term = lid.term if args.term is None else args.term
        started = time.perf_counter()
        with INTERRUPTS.interruptible():  # the call is cancelled; the peer installs nothing
            response = transport.send_snapshot(
                args.to, h, meta, leader_term=term, timeout=args.timeout, resume=args.resume
            )
        seconds = time.perf_counter() - started
        size = (directory / archive_name(h.config.snapshots_dir_prefix, lid.index, lid.term)).stat()
    out(
        f"sent snapshot index {lid.index} term {lid.term} ({fmt_mb(size.st_size)}, "
        f"{response.next_chunk} chunks) to {args.to} in {seconds:.2f} s: installed"
    )
    return 0
