"""The ``d-engine-sm`` command line (also ``python -m d_engine_sm``).

``demo`` runs the main job end to end; ``snapshot list|inspect|verify|extract``
look at archives on disk; ``serve``/``send`` move snapshots over gRPC (the
``grpc`` extra, imported only by those two commands).

Errors are one line on stderr, ``d-engine-sm: error: ...``: exit 2 for bad
usage, 1 for failures, never a traceback (``--verbose`` logs it). This
module and ``_progress`` are the only ones in the package that print.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn

from d_engine_sm import __version__, _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._progress import Reporter, fmt_age, fmt_count, fmt_mb
from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.naming import (
    BROKEN_SUFFIX,
    LOCK_NAME,
    archive_name,
    is_temp_name,
    parse_archive_name,
)
from d_engine_sm._sqlite import APPLICATION_ID, SqliteStateMachine
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import NewCommitData
from d_engine_sm.errors import CorruptSnapshotError, DEngineError, UnsafeArchiveError
from d_engine_sm.proto import common_pb2, storage_pb2

_log = logging.getLogger("d_engine_sm.cli")

PROG: Final = "d-engine-sm"
GRPC_HINT: Final = "pip install 'd-engine-sm[grpc]'"
DEFAULT_ENTRIES: Final = 200_000
DEFAULT_PREFIX: Final = "snapshot-"
_READ_BATCH: Final = 4096  # keys per read_from_state_machine call in the demo's compare
_SQLITE_NAMES: Final = ("*.sqlite3", "*.sqlite", "*.db")


class _UsageError(Exception):
    """Bad command-line usage: exit 2."""


class _Failure(Exception):
    """A command failed in a way already explained by the message: exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# -- entry point ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 success, 1 failure, 2 bad usage, 130 interrupted.

    Blocking (runs the whole command). Installs signal handlers only for
    ``serve`` and only while it runs, from the main thread.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        _error(str(exc))
        return 2
    except SystemExit as exc:  # --help / --version already printed
        return exc.code if isinstance(exc.code, int) else 0
    with _logging(bool(getattr(args, "verbose", False))):
        try:
            status: int = args.func(args)
            return status
        except _UsageError as exc:
            _error(str(exc))
            return 2
        except _Failure as exc:
            _error(str(exc))
            return 1
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except (DEngineError, OSError, ValueError, TypeError, sqlite3.Error) as exc:
            _log.debug("command failed", exc_info=True)
            _error(_describe(exc))
            return 1
        except Exception as exc:  # a bug: still one line; --verbose shows the traceback
            _log.debug("unexpected error", exc_info=True)
            _error(f"unexpected {type(exc).__name__}: {exc}")
            return 1


def _error(message: str) -> None:
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {one_line}\n")
    sys.stderr.flush()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Library logs to stderr for this call: INFO with ``--verbose``, else WARNING.

    Restored afterwards, so calling :func:`main` in-process leaves no handler behind.
    """
    root = logging.getLogger("d_engine_sm")
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# -- argument parsing -------------------------------------------------------------------
def _int_at_least(minimum: int) -> Callable[[str], int]:
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


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 0-65535), got {text!r}")
    return text


@dataclass(frozen=True)
class _StateSpec:
    kind: str  # "memory" or "sqlite"
    path: Path | None = None


def _state_spec(text: str) -> _StateSpec:
    if text == "memory":
        return _StateSpec("memory")
    kind, sep, path = text.partition(":")
    if kind == "sqlite" and sep and path:
        return _StateSpec("sqlite", Path(path))
    raise argparse.ArgumentTypeError(f"expected 'memory' or 'sqlite:PATH', got {text!r}")


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="The state-machine side of a Raft node: demo, snapshot tools, transport.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log (INFO) to stderr")
    verbose = _Parser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a top-level --verbose.
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        parents=[verbose],
        help="apply N writes on a leader, snapshot, stream to a follower, compare",
        description="Leader applies N key/value writes through an ApplyWorker, snapshots per "
        "policy, streams its newest snapshot to a follower, which installs it; both states "
        "are compared key by key.",
    )
    demo.add_argument("--entries", type=_positive_int, default=DEFAULT_ENTRIES, metavar="N")
    demo.add_argument("--dir", type=Path, help="work here (must be empty); default: a temp dir")
    demo.add_argument("--state", choices=("sqlite", "memory"), default="sqlite")
    demo.add_argument("--batch", type=_positive_int, default=1000, help="entries per submit")
    demo.add_argument("--value-size", type=_non_negative_int, default=100, metavar="BYTES")
    demo.set_defaults(func=_cmd_demo)

    snap = commands.add_parser(
        "snapshot", parents=[verbose], help="list, inspect, verify or extract archives"
    )
    snap_cmds = snap.add_subparsers(dest="snapshot_command", metavar="ACTION")
    snap_cmds.required = True
    p = snap_cmds.add_parser("list", parents=[verbose], help="archives in a snapshots directory")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.set_defaults(func=_cmd_list)
    p = snap_cmds.add_parser(
        "inspect", parents=[verbose], help="one archive: LogId, digest, members"
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.set_defaults(func=_cmd_inspect)
    p = snap_cmds.add_parser("verify", parents=[verbose], help="check archives end to end")
    p.add_argument("path", type=Path, metavar="DIR|FILE")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.add_argument(
        "--state",
        type=Path,
        metavar="SQLITE",
        help="SqliteStateMachine database whose recorded snapshot metadata to check against "
        "(default: one found next to the archives)",
    )
    p.set_defaults(func=_cmd_verify)
    p = snap_cmds.add_parser("extract", parents=[verbose], help="safely unpack an archive")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("dest", type=Path, metavar="DEST")
    p.add_argument("--max-bytes", type=_positive_int, default=SnapshotConfig.max_unpacked_bytes)
    p.add_argument("--max-members", type=_positive_int, default=SnapshotConfig.max_archive_members)
    p.set_defaults(func=_cmd_extract)

    serve = commands.add_parser(
        "serve", parents=[verbose], help="accept and serve snapshots over gRPC until interrupted"
    )
    serve.add_argument("--dir", type=Path, required=True, help="snapshots directory")
    serve.add_argument("--listen", type=_host_port, required=True, metavar="HOST:PORT")
    serve.add_argument(
        "--state", type=_state_spec, default=_StateSpec("memory"), metavar="sqlite:PATH|memory"
    )
    serve.add_argument("--node-id", type=_non_negative_int, default=0, metavar="N")
    serve.set_defaults(func=_cmd_serve)

    send = commands.add_parser(
        "send", parents=[verbose], help="push this directory's newest snapshot to a peer"
    )
    send.add_argument("--dir", type=Path, required=True, help="snapshots directory")
    send.add_argument("--to", type=_host_port, required=True, metavar="HOST:PORT")
    send.add_argument(
        "--term", type=_non_negative_int, help="leader term (default: the snapshot's)"
    )
    send.add_argument("--timeout", type=_positive_float, default=60.0, metavar="SECONDS")
    send.set_defaults(func=_cmd_send)
    return parser


# -- shared helpers -----------------------------------------------------------------------
def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _existing_dir(path: Path) -> Path:
    if not path.exists():
        raise _Failure(f"no such directory: {path}")
    if not path.is_dir():
        raise _Failure(f"not a directory: {path}")
    return path


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise _Failure(f"no such file: {path}")
    if not path.is_file():
        raise _Failure(f"not a file: {path}")
    return path


def _check_prefix(prefix: str) -> str:
    try:
        parse_archive_name("", prefix)
    except (TypeError, ValueError) as exc:
        raise _UsageError(f"bad --prefix: {exc}") from None
    return prefix


@dataclass
class _DirListing:
    archives: list[tuple[int, int, Path]] = field(default_factory=list)
    temps: list[Path] = field(default_factory=list)
    broken: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)


def _scan(directory: Path, prefix: str) -> _DirListing:
    """Classify a snapshots directory's entries (read-only, unlike the store's recovery)."""
    found = _DirListing()
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name == LOCK_NAME:
            continue
        if is_temp_name(name):
            found.temps.append(entry)
        elif name.endswith(BROKEN_SUFFIX):
            found.broken.append(entry)
        elif entry.is_file() and (parsed := parse_archive_name(name, prefix)) is not None:
            found.archives.append((parsed[0], parsed[1], entry))
        else:
            found.other.append(entry)
    found.archives.sort()
    return found


def _printable(name: str) -> str:
    """A member name safe to print (hostile archives may hold control characters)."""
    return name if name.isprintable() else repr(name)


def _hex(digest: bytes, n: int = 12) -> str:
    return digest.hex()[:n]


def _make_state_machine(spec: _StateSpec, durability: str = "full") -> StateMachine:
    if spec.kind == "memory":
        return MemoryStateMachine()
    assert spec.path is not None
    return SqliteStateMachine(spec.path, durability=durability)


def _close_state_machine(sm: StateMachine) -> None:
    close = getattr(sm, "close", None)
    if callable(close):
        close()


# -- snapshot list ------------------------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    directory = _existing_dir(args.dir)
    listing = _scan(directory, _check_prefix(args.prefix))
    now = time.time()
    if listing.archives:
        _out(f"{'INDEX':>12} {'TERM':>6} {'SIZE':>11} {'AGE':>7}  {'SHA256':<12}  NAME")
    for index, term, path in listing.archives:
        try:
            st = path.stat()
            digest = archive.sha256_file(path)
        except FileNotFoundError:  # pruned since the scan
            continue
        _out(
            f"{index:>12} {term:>6} {fmt_mb(st.st_size):>11} {fmt_age(now - st.st_mtime):>7}"
            f"  {_hex(digest):<12}  {path.name}"
        )
    if not listing.archives:
        _out(f"no snapshot archives ({args.prefix}<index>-<term>.tar.gz) in {directory}")
    else:
        _out(f"{len(listing.archives)} archive(s) in {directory}")
    for path in listing.temps:
        _out(f"leftover  {path.name}  (work in progress, or left by a crash: removed at start-up)")
    for path in listing.broken:
        _out(f"broken    {path.name}  (failed verification at start-up, moved aside)")
    for path in listing.other:
        _out(f"other     {path.name}  (not a snapshot archive)")
    return 0


# -- snapshot inspect ---------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace) -> int:
    path = _existing_file(args.file)
    prefix = _check_prefix(args.prefix)
    parsed = parse_archive_name(path.name, prefix)
    size = path.stat().st_size
    members = archive.list_members(path)  # reads to the end: checks the gzip CRC too
    digest = archive.sha256_file(path)
    _out(f"file     {path}")
    if parsed is None:
        _out(f"log id   unknown (name is not {prefix}<index>-<term>.tar.gz)")
    else:
        _out(f"log id   index {parsed[0]} term {parsed[1]}")
    _out(f"size     {size} bytes ({fmt_mb(size)})")
    _out(f"sha256   {digest.hex()}")
    total = sum(m[1] for m in members if m[2] == "file")
    _out(f"members  {len(members)} ({fmt_count(total)} bytes unpacked)")
    for name, member_size, kind in members:
        _out(f"  {kind:<8} {member_size:>14}  {_printable(name)}")
    unsafe = [name for name, _, kind in members if kind not in ("file", "dir")]
    if unsafe:
        shown = ", ".join(_printable(name) for name in unsafe[:5])
        _out(f"warning: {len(unsafe)} member(s) that safe unpack refuses: {shown}")
    return 0


# -- snapshot verify ----------------------------------------------------------------------
def _recorded(sources: Sequence[Path]) -> list[tuple[Path, storage_pb2.SnapshotMetadata]]:
    """Snapshot metadata recorded by SqliteStateMachine databases (read-only open)."""
    found = []
    for db_path in sources:
        uri = "file:" + urllib.parse.quote(str(db_path.resolve())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True)
        except sqlite3.Error:
            continue
        try:
            if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                continue
            row = conn.execute("SELECT snapshot_meta FROM meta WHERE id = 0").fetchone()
        except sqlite3.Error:
            continue
        finally:
            conn.close()
        if row is None or row[0] is None:
            continue
        meta = storage_pb2.SnapshotMetadata()
        try:
            meta.ParseFromString(row[0])
        except Exception:  # a damaged record is no record
            continue
        found.append((db_path, meta))
    return found


def _record_candidates(directory: Path, explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [_existing_file(explicit)]
    seen: list[Path] = []
    for place in (directory, directory.parent):
        for pattern in _SQLITE_NAMES:
            for candidate in sorted(place.glob(pattern)):
                if candidate.is_file() and candidate not in seen:
                    seen.append(candidate)
    return seen


def _cmd_verify(args: argparse.Namespace) -> int:
    target: Path = args.path
    prefix = _check_prefix(args.prefix)
    if not target.exists():
        raise _Failure(f"no such file or directory: {target}")
    if target.is_dir():
        listing = _scan(target, prefix)
        files = [p for _, _, p in listing.archives]
        directory = target
    else:
        listing = _DirListing()
        files = [target]
        directory = target.parent
    records = _recorded(_record_candidates(directory, args.state))
    corrupt: list[Path] = []
    for path in files:
        try:
            digest = archive.verify(path)
        except FileNotFoundError:
            _out(f"skipped  {path.name}  (removed meanwhile)")
            continue
        except CorruptSnapshotError as exc:
            corrupt.append(path)
            _out(f"CORRUPT  {path.name}: {exc.reason}")
            continue
        note = "no recorded checksum"
        parsed = parse_archive_name(path.name, prefix)
        for source, meta in records:
            lid = meta.last_included
            if parsed is None or (lid.index, lid.term) != parsed or len(meta.checksum) != 32:
                continue
            if meta.checksum != digest:
                note = ""
                corrupt.append(path)
                _out(
                    f"CORRUPT  {path.name}: SHA-256 {_hex(digest)} does not match "
                    f"{_hex(meta.checksum)} recorded in {source}"
                )
                break
            note = f"matches recorded metadata in {source.name}"
        if note:
            _out(f"ok       {path.name}  sha256 {_hex(digest)}  ({note})")
    for path in listing.temps:
        _out(f"skipped  {path.name}  (temp leftover)")
    for path in listing.broken:
        _out(f"skipped  {path.name}  (already marked broken)")
    if not files:
        _out(f"no snapshot archives to verify in {target}")
    else:
        _out(f"{len(files)} archive(s) verified, {len(corrupt)} corrupt")
    if corrupt:
        names = ", ".join(str(p) for p in corrupt)
        raise _Failure(f"{len(corrupt)} corrupt snapshot archive(s): {names}")
    return 0


# -- snapshot extract ---------------------------------------------------------------------
def _cmd_extract(args: argparse.Namespace) -> int:
    source = _existing_file(args.file)
    dest: Path = args.dest
    created = False
    if dest.exists():
        if not dest.is_dir():
            raise _Failure(f"destination exists and is not a directory: {dest}")
        if any(dest.iterdir()):
            raise _Failure(f"destination is not empty, refusing to extract into it: {dest}")
    else:
        dest.mkdir(parents=True)
        created = True
    try:
        archive.safe_unpack(source, dest, max_bytes=args.max_bytes, max_members=args.max_members)
    except BaseException as exc:
        # Nothing half-extracted stays behind: dest was empty (or absent) before.
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in list(dest.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        if isinstance(exc, (UnsafeArchiveError, CorruptSnapshotError)):
            raise _Failure(f"refused {source}: {exc}; nothing extracted") from exc
        raise
    files = [p for p in dest.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    _out(f"extracted {len(files)} file(s), {fmt_count(total)} bytes, into {dest}")
    return 0


# -- serve / send ---------------------------------------------------------------------------
def _grpc_transport() -> Any:
    try:
        from d_engine_sm.transport import grpc as transport
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "grpc" or "grpc" in str(exc):
            raise _Failure(f"the gRPC transport needs the grpc extra: {GRPC_HINT}") from exc
        raise
    return transport


def _cmd_serve(args: argparse.Namespace) -> int:
    transport = _grpc_transport()
    directory: Path = args.dir
    if directory.exists() and not directory.is_dir():
        raise _Failure(f"not a directory: {directory}")
    spec: _StateSpec = args.state
    sm = _make_state_machine(spec)
    try:
        config = SnapshotConfig(snapshots_dir=directory)
        # Signals are caught through shutdown too: a second Ctrl-C must not
        # interrupt the server's stop or the handler's close half-way.
        with (
            _stop_signals() as stop,
            StateMachineHandler(sm, config, node_id=args.node_id) as handler,
        ):
            server, port = transport.start_server(handler, args.listen)
            try:
                host = args.listen.rpartition(":")[0]
                _out(f"serving node {args.node_id} on {host}:{port} (snapshots in {directory})")
                # A bounded wait per round keeps the main thread responsive to signals.
                while not stop.wait(0.5):
                    pass
            finally:
                server.stop(grace=2.0).wait(5.0)
            _out(f"stopped; last_applied {handler.last_applied()}")
    finally:
        _close_state_machine(sm)
    return 0


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while inside (handlers restored afterwards)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # pragma: no cover - signals need the main thread; Ctrl-C stays default
        return
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _cmd_send(args: argparse.Namespace) -> int:
    transport = _grpc_transport()
    directory = _existing_dir(args.dir)
    # Only the archive matters: the state machine is a placeholder.
    with StateMachineHandler(MemoryStateMachine(), SnapshotConfig(snapshots_dir=directory)) as h:
        meta = h.get_latest_snapshot_metadata()
        if meta is None:
            raise _Failure(f"no snapshot archive to send in {directory}")
        lid = meta.last_included
        term = lid.term if args.term is None else args.term
        started = time.perf_counter()
        response = transport.send_snapshot(args.to, h, meta, leader_term=term, timeout=args.timeout)
        seconds = time.perf_counter() - started
        size = (directory / archive_name(h.config.snapshots_dir_prefix, lid.index, lid.term)).stat()
    _out(
        f"sent snapshot index {lid.index} term {lid.term} ({fmt_mb(size.st_size)}, "
        f"{response.next_chunk} chunks) to {args.to} in {seconds:.2f} s: installed"
    )
    return 0


# -- demo -----------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    if args.dir is not None:
        base: Path = args.dir
        if base.exists() and (not base.is_dir() or any(base.iterdir())):
            raise _Failure(f"demo directory must be empty or not exist: {base}")
        base.mkdir(parents=True, exist_ok=True)
        return _Demo(args, base, Reporter(sys.stdout)).run()
    base = Path(tempfile.mkdtemp(prefix="d-engine-sm-demo-"))
    try:
        return _Demo(args, base, Reporter(sys.stdout)).run()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _key(i: int) -> bytes:
    return b"key-%010d" % i


class _Demo:
    """One demo run: leader apply -> snapshot -> transfer -> install -> compare."""

    def __init__(self, args: argparse.Namespace, base: Path, out: Reporter) -> None:
        self.n: int = args.entries
        self.batch: int = args.batch
        self.value_size: int = args.value_size
        self.state: str = args.state
        self.keep = args.dir is not None
        self.base = base
        self.out = out
        self.problems: list[str] = []

    def _machine(self, node: str) -> StateMachine:
        if self.state == "memory":
            return MemoryStateMachine()
        return _make_state_machine(
            _StateSpec("sqlite", self.base / node / "state.sqlite3"), "normal"
        )

    def run(self) -> int:
        state = "sqlite (durability normal)" if self.state == "sqlite" else "memory"
        self.out.line(
            f"demo: {fmt_count(self.n)} writes of {self.value_size}-byte values, "
            f"{state} state, {'in ' + str(self.base) if self.keep else 'temporary directory'}"
        )
        threshold = max(1, self.n // 4)
        leader_cfg = SnapshotConfig(
            snapshots_dir=self.base / "leader" / "snapshots",
            max_log_entries_before_snapshot=threshold,
            snapshot_cool_down_since_last_check=0.0,
        )
        follower_cfg = SnapshotConfig(snapshots_dir=self.base / "follower" / "snapshots")
        leader_sm = self._machine("leader")
        try:
            follower_sm = self._machine("follower")
            try:
                with (
                    StateMachineHandler(leader_sm, leader_cfg, node_id=1) as leader,
                    StateMachineHandler(follower_sm, follower_cfg, node_id=2) as follower,
                ):
                    try:
                        self._steps(leader, follower, threshold)
                    except DEngineError as exc:  # reported in the verdict, then exit 1
                        _log.debug("demo step failed", exc_info=True)
                        self.problems.append(f"{type(exc).__name__}: {exc}")
            finally:
                _close_state_machine(follower_sm)
        finally:
            _close_state_machine(leader_sm)
        if self.problems:
            self.out.line(f"verdict   FAILED: {'; '.join(self.problems)}")
            raise _Failure(f"demo failed: {self.problems[0]}")
        self.out.line("verdict   OK: the follower's state is identical to the leader's")
        if self.keep:
            self.out.line(
                f"files     leader {self.base / 'leader'}, follower {self.base / 'follower'}"
            )
        return 0

    def _steps(
        self, leader: StateMachineHandler, follower: StateMachineHandler, threshold: int
    ) -> None:
        if not self._apply(leader, threshold):
            return
        meta, path = self._snapshot(leader)
        if not self._transfer(leader, follower, meta, path):
            return
        self._compare(leader, follower)

    # -- step 1: apply through an ApplyWorker ----------------------------------------
    def _entries(self) -> list[list[common_pb2.Entry]]:
        """The N Insert entries in submit batches; random (incompressible) values."""
        started = time.perf_counter()
        rng = random.Random(0x5EED)
        size, n = self.value_size, self.n
        batches = [
            [
                _kv.command_entry(i, 1, _kv.insert(_key(i), rng.randbytes(size)))
                for i in range(first, min(n, first + self.batch - 1) + 1)
            ]
            for first in range(1, n + 1, self.batch)
        ]
        self.out.line(
            f"prepare   {fmt_count(n)} entries built in {time.perf_counter() - started:.2f} s"
        )
        return batches

    def _apply(self, leader: StateMachineHandler, threshold: int) -> bool:
        from d_engine_sm._worker import (
            ApplyCompleted,
            ApplyWorker,
            FatalError,
            SnapshotCreated,
            SnapshotFailed,
        )

        n, batch = self.n, self.batch
        # Built up front so the figure measures applying, not protobuf encoding.
        batches = self._entries()
        bar = self.out.bar(
            "apply",
            n,
            start=f"{fmt_count(n)} entries in batches of {fmt_count(batch)}",
            unit="entries",
        )
        fatal: list[BaseException] = []
        snapshots: list[Any] = []
        failed: list[BaseException] = []
        last_done = [0.0]

        def on_event(event: object) -> None:
            if isinstance(event, ApplyCompleted):
                last_done[0] = time.perf_counter()
                bar.update(event.last_index)
            elif isinstance(event, FatalError):
                fatal.append(event.error)
            elif isinstance(event, SnapshotCreated):
                snapshots.append(event.metadata)
            elif isinstance(event, SnapshotFailed):
                failed.append(event.error)

        worker = ApplyWorker(leader, on_event, max_queued_entries=max(100_000, 4 * batch))
        started = time.perf_counter()
        worker.start()
        try:
            for entries in batches:
                if fatal:
                    break
                last = entries[-1].index
                worker.submit(entries, NewCommitData(last, common_pb2.NODE_ROLE_LEADER, 1))
        except DEngineError as exc:  # WorkerStopped after a fatal error
            if not fatal:
                raise
            _log.debug("submit stopped: %s", exc)
        finally:
            worker.shutdown(drain=True)  # also waits for a policy snapshot in flight
            bar.close()
        if fatal:
            self.problems.append(f"apply failed: {fatal[0]}")
            return False
        seconds = max(last_done[0] - started, 1e-9)
        applied = leader.last_applied()
        self.out.line(
            f"apply     {fmt_count(applied)} entries in {seconds:.2f} s: "
            f"{fmt_count(int(applied / seconds))} entries/s"
        )
        if applied != n:
            self.problems.append(f"leader applied {applied} of {n} entries")
            return False
        stats = leader.metrics()["snapshot_create_seconds"]
        assert isinstance(stats, dict)
        if snapshots:
            mean = stats["sum"] / max(1, stats["count"])
            self.out.line(
                f"policy    {len(snapshots)} snapshot(s), one per {fmt_count(threshold)} "
                f"entries, taken while applying: create {mean:.2f} s mean, {stats['max']:.2f} s max"
            )
        for error in failed:
            self.problems.append(f"policy snapshot failed: {error}")
        return True

    # -- step 2: the final snapshot -----------------------------------------------------
    def _snapshot(self, leader: StateMachineHandler) -> tuple[storage_pb2.SnapshotMetadata, Path]:
        before = leader.get_latest_snapshot_metadata()
        started = time.perf_counter()
        meta, path = leader.create_snapshot()
        seconds = time.perf_counter() - started
        lid = meta.last_included
        size = path.stat().st_size
        fresh = before is None or before.last_included != lid
        how = f"created in {seconds:.2f} s" if fresh else "already taken by the policy"
        self.out.line(
            f"snapshot  index {lid.index} term {lid.term}: {fmt_mb(size)}, {how} "
            f"(sha256 {_hex(meta.checksum)})"
        )
        return meta, path

    # -- step 3: stream to the follower, which installs ---------------------------------
    def _transfer(
        self,
        leader: StateMachineHandler,
        follower: StateMachineHandler,
        meta: storage_pb2.SnapshotMetadata,
        path: Path,
    ) -> bool:
        size = path.stat().st_size
        bar = self.out.bar(
            "transfer", size, start=f"streaming {fmt_mb(size)} to the follower", fmt=fmt_mb
        )
        acks: list[storage_pb2.SnapshotAck] = []
        received_at: list[float] = []

        def progress(phase: str, done: int, total: int) -> None:
            if phase == "receive":
                bar.update(done, total)
                if done >= total and not received_at:
                    received_at.append(time.perf_counter())
            elif not received_at:
                received_at.append(time.perf_counter())

        started = time.perf_counter()
        chunks = leader.load_snapshot_data(meta)
        try:
            installed = follower.apply_snapshot_stream_from_leader(
                1, chunks, acks.append, progress=progress
            )
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            bar.close()
        ended = time.perf_counter()
        received = received_at[0] if received_at else ended
        transfer_s = max(received - started, 1e-9)
        bad = [a for a in acks if a.status != storage_pb2.SnapshotAck.ACCEPTED]
        self.out.line(
            f"transfer  {fmt_mb(size)} in {len(acks)} chunks: {transfer_s:.2f} s, "
            f"{size / transfer_s / 1e6:.1f} MB/s"
        )
        self.out.line(f"install   {ended - received:.2f} s (unpack + replace the follower's state)")
        if bad:
            self.problems.append(f"{len(bad)} chunk(s) not accepted")
        if installed.last_included != meta.last_included or installed.checksum != meta.checksum:
            self.problems.append("the follower installed different snapshot metadata")
        return True

    # -- step 4: compare through the read path ------------------------------------------
    def _compare(self, leader: StateMachineHandler, follower: StateMachineHandler) -> None:
        started = time.perf_counter()
        if follower.last_applied() != leader.last_applied():
            self.problems.append(
                f"last_applied differs: leader {leader.last_applied()}, "
                f"follower {follower.last_applied()}"
            )
        differing = 0
        first_diff: bytes | None = None
        for lo in range(1, self.n + 1, _READ_BATCH):
            keys = [_key(i) for i in range(lo, min(self.n + 1, lo + _READ_BATCH))]
            a = {r.key: r.value for r in leader.read_from_state_machine(keys) or ()}
            b = {r.key: r.value for r in follower.read_from_state_machine(keys) or ()}
            for key in keys:
                if key not in a or a.get(key) != b.get(key):
                    differing += 1
                    first_diff = first_diff or key
        leader_len, follower_len = len(leader.state_machine), len(follower.state_machine)
        seconds = time.perf_counter() - started
        if differing:
            self.problems.append(f"{differing} key(s) differ, first {first_diff!r}")
        if leader_len != follower_len or leader_len != self.n:
            self.problems.append(
                f"key counts differ: written {self.n}, leader {leader_len}, follower {follower_len}"
            )
        verdict = "identical" if not differing and leader_len == follower_len else "DIFFERENT"
        self.out.line(
            f"compare   {fmt_count(self.n)} keys read on both nodes in {seconds:.2f} s: {verdict}"
        )


__all__ = ["main"]


if __name__ == "__main__":  # pragma: no cover - ``python -m d_engine_sm`` uses __main__.py
    sys.exit(main())
