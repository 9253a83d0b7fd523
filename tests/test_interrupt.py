"""Ctrl-C (SIGINT) at each phase of ``d-engine-sm demo``, ``serve`` and ``send``.

Real subprocesses; the signal is sent when the child announces the phase
(a line on its stdout; ``tests/interrupt_child.py`` also holds the child
there until told to go on), never after a sleep. Each run must end with
exactly one line on stderr, exit status 130, and nothing left behind: no
temporary directory, no ``temp-`` file in a ``--dir``, SQLite files intact.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

PY = sys.executable
CHILD = str(Path(__file__).with_name("interrupt_child.py"))
WAIT = 30.0
INTERRUPTED = "d-engine-sm: error: interrupted\n"
DEMO = ["demo", "--entries", "4500", "--batch", "250", "--value-size", "700"]  # 4 chunks
REPEAT = 2  # each case runs this many times: the outcome must not vary


class Child:
    """A child process whose stdout lines arrive on a queue (read by a thread)."""

    def __init__(self, argv: list[str], cwd: Path, scratch: Path) -> None:
        # PYTHONFAULTHANDLER: a child that hangs is sent SIGABRT and says where (see finish).
        env = {**os.environ, "TMPDIR": str(scratch), "PYTHONWARNINGS": "ignore"}
        env["PYTHONFAULTHANDLER"] = "1"
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str) -> str:
        while True:
            line = self.lines.get(timeout=WAIT)
            assert line is not None, f"exited before {prefix!r}: {self.seen}"
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def interrupt(self, times: int = 1) -> None:
        for _ in range(times):
            self.proc.send_signal(signal.SIGINT)

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str]:
        assert self.proc.stderr is not None
        try:
            rc = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
            self.proc.wait(WAIT)
            pytest.fail(f"hung after {self.seen}:\n{self.proc.stderr.read()}")
        err = self.proc.stderr.read()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return rc, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    children: list[Child] = []
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def start(argv: list[str]) -> Child:
        child = Child(argv, tmp_path, scratch)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


# A receive cut by a cancelled call keeps its verified prefix to resume from.
RESUMABLE = frozenset({"temp-resume-data", "temp-resume-state"})


def assert_nothing_left(
    scratch: Path, work: Path | None, allow: frozenset[str] = frozenset()
) -> None:
    assert list(scratch.iterdir()) == []  # the demo's temporary directory is gone
    if work is None:
        return
    stray = [p for p in work.rglob("*") if p.name.startswith("temp-") and p.name not in allow]
    assert stray == []
    for db in work.rglob("state.sqlite3"):
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# (phase announced by the child, line to wait for, whether the child blocks there)
PHASES = [
    ("none", "apply: ", False),  # the main thread submitting batches
    ("policy", "phase policy", True),  # a policy snapshot generating, applies running
    ("final", "phase final", True),  # about to create the final snapshot (not interruptible)
    ("receive", "phase receive", True),  # mid-transfer: the stream is ended, nothing installed
    ("install", "phase install", True),  # the follower installing
    ("none", "transfer  ", False),  # install done: compare or clean-up
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("times", "use_dir"), [(1, False), (2, True)], ids=["once-tempdir", "twice-dir"]
)
@pytest.mark.parametrize(("phase", "marker", "blocks"), PHASES, ids=[p[1] for p in PHASES])
def test_demo_interrupted(
    tmp_path: Path, spawn: object, phase: str, marker: str, blocks: bool, times: int, use_dir: bool
) -> None:
    scratch = tmp_path / "scratch"
    for attempt in range(REPEAT):
        work = tmp_path / f"work-{attempt}" if use_dir else None
        argv = [PY, CHILD, phase, *DEMO, *(["--dir", str(work)] if work else [])]
        child: Child = spawn(argv)  # type: ignore[operator]
        child.wait_for(marker)
        child.interrupt(times)  # twice: an impatient second Ctrl-C
        if blocks:
            child.go_on()
        rc, err = child.finish()
        assert (rc, err) == (130, INTERRUPTED), (attempt, child.seen)
        assert not any(line.startswith("verdict") for line in child.seen)
        assert_nothing_left(scratch, work)


def test_demo_interrupted_as_installed(tmp_path: Path, spawn: object) -> None:
    """The unmodified ``python -m d_engine_sm demo``, interrupted while applying."""
    child: Child = spawn([PY, "-m", "d_engine_sm", *DEMO])  # type: ignore[operator]
    child.wait_for("apply: ")
    child.interrupt()
    assert child.finish() == (130, INTERRUPTED)
    assert_nothing_left(tmp_path / "scratch", None)


# -- serve / send ------------------------------------------------------------------------
@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_serve_interrupted(tmp_path: Path, spawn: object, times: int) -> None:
    pytest.importorskip("grpc")
    srv = tmp_path / "srv"
    argv = [PY, "-m", "d_engine_sm", "serve", "--dir", str(srv), "--listen", "127.0.0.1:0"]
    argv += ["--state", f"sqlite:{tmp_path / 'state.sqlite3'}"]
    child: Child = spawn(argv)  # type: ignore[operator]
    child.wait_for("serving node 0 on 127.0.0.1:")
    child.interrupt(times)
    rc, err = child.finish()
    assert (rc, err) == (130, INTERRUPTED), child.seen
    assert_nothing_left(tmp_path / "scratch", srv)


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
def test_send_interrupted_mid_call(tmp_path: Path, spawn: object, times: int) -> None:
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from conftest import puts

    from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
    from d_engine_sm.proto import storage_pb2, storage_pb2_grpc

    source = tmp_path / "source"
    with StateMachineHandler(MemoryStateMachine(), SnapshotConfig(snapshots_dir=source)) as h:
        h.apply_chunk(puts(1, 50))
        h.create_snapshot()
    receiving, cancelled = threading.Event(), threading.Event()

    class Stalling(storage_pb2_grpc.SnapshotServiceServicer):
        """Takes the first chunk, then never answers: the sender blocks mid-call."""

        def InstallSnapshot(self, request_iterator: object, context: object) -> object:
            next(iter(request_iterator))  # type: ignore[call-overload]
            context.add_callback(cancelled.set)  # type: ignore[attr-defined]
            receiving.set()
            cancelled.wait(WAIT)
            return storage_pb2.SnapshotResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    storage_pb2_grpc.add_SnapshotServiceServicer_to_server(Stalling(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        argv = [PY, "-m", "d_engine_sm", "send", "--dir", str(source)]
        argv += ["--to", f"127.0.0.1:{port}", "--timeout", "60"]
        child: Child = spawn(argv)  # type: ignore[operator]
        assert receiving.wait(WAIT)  # the sender is inside the call
        child.interrupt(times)
        rc, err = child.finish()
        assert (rc, err) == (130, INTERRUPTED)
        assert cancelled.wait(WAIT)  # the call was cancelled, not left to time out
    finally:
        server.stop(None)
    assert_nothing_left(tmp_path / "scratch", source)


def test_serve_interrupted_mid_receive(tmp_path: Path, spawn: object) -> None:
    """A push is half-way in when Ctrl-C comes: the receive is aborted, nothing is
    installed or left, and the server still ends with one line and 130."""
    grpc = pytest.importorskip("grpc")
    import random
    import time

    from conftest import put

    from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
    from d_engine_sm.proto import storage_pb2_grpc

    source = SnapshotConfig(snapshots_dir=tmp_path / "source", chunk_size=4096, fsync=False)
    rng = random.Random(3)
    with StateMachineHandler(MemoryStateMachine(), source) as h:
        h.apply_chunk([put(i, b"k%d" % i, rng.randbytes(100)) for i in range(1, 301)])
        meta, _ = h.create_snapshot()
        chunks = list(h.load_snapshot_data(meta))
    assert len(chunks) > 3
    srv = tmp_path / "srv"
    argv = [PY, "-m", "d_engine_sm", "serve", "--dir", str(srv), "--listen", "127.0.0.1:0"]
    child: Child = spawn(argv)  # type: ignore[operator]
    address = child.wait_for("serving node 0 on ").split(" on ")[1].split()[0]
    hold = threading.Event()

    def stalled() -> Iterator[object]:
        yield from chunks[:2]
        hold.wait(WAIT)  # the push stays open, half-way

    with grpc.insecure_channel(address) as channel:
        stub = storage_pb2_grpc.SnapshotServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.InstallSnapshot.future(stalled(), timeout=WAIT)
        # The receiver's temp archive is the only sign from the other process that
        # the transfer is under way: look for it, bounded.
        deadline = time.monotonic() + WAIT
        while not any(p.name.startswith("temp-") for p in srv.glob("*")):
            assert time.monotonic() < deadline, "the server never started receiving"
            time.sleep(0.01)
        child.interrupt(2)
        rc, err = child.finish()
        hold.set()
        with pytest.raises(grpc.RpcError):
            call.result(WAIT)
    assert (rc, err) == (130, INTERRUPTED), child.seen
    assert not list(srv.glob("snapshot-*"))  # nothing installed
    # The server's shutdown cancels the call: the receive may keep its verified
    # prefix (both files or neither) for the leader's next push to resume.
    kept = {p.name for p in srv.glob("temp-resume-*")}
    assert kept in (set(), RESUMABLE)
    assert_nothing_left(tmp_path / "scratch", srv, allow=RESUMABLE)
