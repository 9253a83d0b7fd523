"""Helpers for the CLI tests: the command run in-process or as a subprocess, its
one error line, a busy port, and a ``d-engine-sm serve`` peer in a subprocess."""

from __future__ import annotations

import contextlib
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from d_engine_sm._cli import main

PY = sys.executable
ERROR = "d-engine-sm: error: "


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(ARGV)`` in this process: its exit status, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The text of the only stderr line, which must be the CLI's error line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR), err
    assert "Traceback" not in err
    return lines[0][len(ERROR) :]


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A port another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def silent_peer() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel does) but never speaks HTTP/2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m d_engine_sm ARGV`` to completion, output captured."""
    return subprocess.run(
        [PY, "-m", "d_engine_sm", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_without(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI run as if ``module`` were not installed (a None entry in sys.modules)."""
    script = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from d_engine_sm._cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [PY, "-c", script, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stdout_lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """The process's stdout lines (None at EOF), read on a thread so waits can be bounded."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@dataclass
class Peer:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    address: str  # HOST:PORT it listens on
    banner: str  # the first line it printed


@contextlib.contextmanager
def serve(directory: Path, *extra: str, startup_timeout: float = 30) -> Iterator[Peer]:
    """Run ``serve --dir DIRECTORY --listen 127.0.0.1:0``; stopped on exit.

    SIGTERM first (a clean stop, which also lets a coverage run save the
    child's data), SIGKILL if it is not gone within 10 s.
    """
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "d_engine_sm",
            "serve",
            "--dir",
            str(directory),
            "--listen",
            "127.0.0.1:0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = stdout_lines(proc)
        first = lines.get(timeout=startup_timeout)
        assert first is not None and " on 127.0.0.1:" in first, first
        yield Peer(proc, lines, first.split(" on ")[1].split()[0], first)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
