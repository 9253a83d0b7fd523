"""The ``d-engine-sm`` command line: in-process through ``main`` and as real subprocesses."""

from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from _cli_helpers import Peer, cli_without, serve
from conftest import memory_snapshots, puts

from d_engine_sm import (
    ApplyResult,
    MemoryStateMachine,
    SnapshotConfig,
    StateMachine,
    StateMachineHandler,
    _cli,
)
from d_engine_sm._cli import main
from d_engine_sm._progress import Reporter
from d_engine_sm._snapshot import archive
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._values import LogId
from d_engine_sm.proto import common_pb2

PY = sys.executable


# -- helpers -------------------------------------------------------------------------
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *, contains: str = "") -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("d-engine-sm: error: "), err
    assert "Traceback" not in err
    assert contains in lines[0], err


def snapshots_dir(tmp_path: Path, indexes: tuple[int, ...] = (40, 100)) -> Path:
    """A snapshots directory with one archive per index (memory state machine)."""
    return memory_snapshots(tmp_path / "snaps", indexes)


def archive_at(directory: Path, index: int, term: int = 1) -> Path:
    path = directory / f"snapshot-{index}-{term}.tar.gz"
    assert path.is_file()
    return path


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def hostile_archive(path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        evil = tarfile.TarInfo("../escaped.txt")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


# -- demo ----------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["sqlite", "memory"])
def test_demo_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str) -> None:
    work = tmp_path / "demo"
    code, out, err = run(
        capsys, "demo", "--entries", "3000", "--batch", "250", "--state", state, "--dir", str(work)
    )
    assert code == 0, err
    assert err == ""
    assert "verdict   OK" in out
    assert "entries/s" in out and "MB/s" in out
    assert "3,000 keys read on both nodes" in out and "identical" in out
    # The leader kept its final snapshot; the follower kept the installed one.
    archive_at(work / "leader" / "snapshots", 3000)
    archive_at(work / "follower" / "snapshots", 3000)
    if state == "sqlite":
        assert (work / "follower" / "state.sqlite3").is_file()


def test_demo_default_dir_is_temporary_and_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # keeps mkdtemp inside tmp_path
    code, out, err = run(capsys, "demo", "--entries", "500", "--state", "memory")
    assert code == 0, err
    assert "verdict   OK" in out
    assert list(scratch.iterdir()) == []


class _FailingLeader(MemoryStateMachine):
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        if entries[-1].index > 300:
            raise OSError("injected: disk gone")
        return super().apply_chunk(entries)


class _ForgetfulFollower(MemoryStateMachine):
    """Loses one key on its read path: the compare step must notice."""

    def get(self, key: bytes) -> bytes | None:
        return None if key == b"key-%010d" % 7 else super().get(key)


class _MiscountingFollower(MemoryStateMachine):
    """Installs and reads fine, but counts one key too many."""

    def __len__(self) -> int:
        return super().__len__() + 1


def _on_snapshot_thread() -> bool:
    return threading.current_thread().name.startswith("d-engine-sm-snapshot")


class _NoPolicySnapshots(MemoryStateMachine):
    """Policy snapshots (on the worker's snapshot thread) fail; the final one works."""

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        if _on_snapshot_thread():
            raise OSError("injected: snapshot disk gone")
        super().generate_snapshot_data(dir, last_included)


class _NoSnapshots(MemoryStateMachine):
    """Every snapshot fails: the policy's and the demo's own final one."""

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        raise OSError("injected: no room for snapshots")


@pytest.mark.parametrize(
    ("leader", "follower", "problems"),
    [
        (_FailingLeader, MemoryStateMachine, ["apply failed"]),
        (MemoryStateMachine, _ForgetfulFollower, ["1 key(s) differ"]),
        (
            MemoryStateMachine,
            _MiscountingFollower,
            ["key counts differ: written 1000, leader 1000"],
        ),
        (_NoPolicySnapshots, MemoryStateMachine, ["policy snapshot failed: "]),
        (_NoSnapshots, MemoryStateMachine, ["policy snapshot failed: ", "SnapshotError: "]),
    ],
    ids=["apply", "lost-key", "key-count", "policy-snapshot", "no-snapshot"],
)
def test_demo_verdict_names_the_problem_and_exits_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    leader: type[MemoryStateMachine],
    follower: type[MemoryStateMachine],
    problems: list[str],
) -> None:
    class Demo(_cli._Demo):  # the state-machine factory is the seam
        def _machine(self, node: str) -> StateMachine:
            return leader() if node == "leader" else follower()

    args = argparse.Namespace(
        entries=1000, batch=100, value_size=8, state="memory", dir=tmp_path / "d"
    )
    (tmp_path / "d").mkdir()
    with pytest.raises(_cli._Failure, match=f"demo failed: {re.escape(problems[0])}"):
        Demo(args, tmp_path / "d", Reporter(sys.stdout)).run()
    out = capsys.readouterr().out
    verdict = [line for line in out.splitlines() if line.startswith("verdict")]
    assert len(verdict) == 1 and verdict[0].startswith("verdict   FAILED: ")
    assert all(problem in verdict[0] for problem in problems), verdict
    if len(problems) > 1:  # no snapshot: nothing was streamed to the follower
        assert "transfer" not in out and "compare" not in out


def test_demo_refuses_non_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    code, _, err = run(capsys, "demo", "--entries", "10", "--dir", str(tmp_path / "busy"))
    assert code == 1
    assert_one_error_line(err, contains="must be empty")


def test_demo_as_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PY, "-m", "d_engine_sm", "demo", "--entries", "2000", "--dir", "tmp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "verdict   OK" in proc.stdout
    # Not a terminal: plain status lines, no carriage-return bars.
    assert "\r" not in proc.stdout
    assert "apply: 2,000 entries" in proc.stdout
    archive_at(tmp_path / "tmp" / "leader" / "snapshots", 2000)


# -- snapshot list / inspect ----------------------------------------------------------
def test_list_shows_archives_sorted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = snapshots_dir(tmp_path)
    (directory / "temp-create-1-abc").write_bytes(b"partial")
    (directory / "snapshot-7-1.tar.gz.broken").write_bytes(b"bad")
    code, out, err = run(capsys, "snapshot", "list", str(directory))
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip().endswith(".tar.gz")]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("40", "1", "snapshot-40-1.tar.gz"),
        ("100", "1", "snapshot-100-1.tar.gz"),
    ]
    digest = archive.sha256_file(archive_at(directory, 100)).hex()[:12]
    assert digest in out
    assert "temp-create-1-abc" in out and "leftover" in out
    assert "snapshot-7-1.tar.gz.broken" in out and "broken" in out


def test_list_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "snapshot", "list", str(tmp_path))
    assert code == 0
    assert "no snapshot archives" in out


def test_inspect_lists_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = archive_at(snapshots_dir(tmp_path), 100)
    code, out, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 0, err
    assert "index 100 term 1" in out
    assert archive.sha256_file(path).hex() in out
    assert f"{path.stat().st_size} bytes" in out
    members = archive.list_members(path)
    assert members
    for name, size, kind in members:
        assert any(kind in line and str(size) in line and name in line for line in out.splitlines())


def test_inspect_corrupt_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = archive_at(snapshots_dir(tmp_path), 100)
    flip_byte(path)
    code, _, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 1
    assert_one_error_line(err, contains=str(path))


# -- snapshot verify ------------------------------------------------------------------
def test_verify_good_dir_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = snapshots_dir(tmp_path)
    code, out, err = run(capsys, "snapshot", "verify", str(directory))
    assert code == 0, err
    assert "2 archive(s) verified, 0 corrupt" in out
    code, out, err = run(capsys, "snapshot", "verify", str(archive_at(directory, 40)))
    assert code == 0, err
    assert "ok       snapshot-40-1.tar.gz" in out


def test_verify_corrupt_archive_exit_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = snapshots_dir(tmp_path)
    bad = archive_at(directory, 40)
    flip_byte(bad)
    code, out, err = run(capsys, "snapshot", "verify", str(directory))
    assert code == 1
    assert_one_error_line(err, contains=str(bad))
    assert "CORRUPT  snapshot-40-1.tar.gz" in out
    assert "ok       snapshot-100-1.tar.gz" in out
    code, _, err = run(capsys, "snapshot", "verify", str(bad))
    assert code == 1
    assert_one_error_line(err, contains=str(bad))


def test_verify_checks_sha256_recorded_by_sqlite_state_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = tmp_path / "node"
    config = SnapshotConfig(snapshots_dir=node / "snapshots", fsync=False)
    with (
        SqliteStateMachine(node / "state.sqlite3", durability="off") as sm,
        StateMachineHandler(sm, config) as handler,
    ):
        handler.apply_chunk(puts(1, 50))
        _, path = handler.create_snapshot()
    code, out, err = run(capsys, "snapshot", "verify", str(node / "snapshots"))
    assert code == 0, err
    assert "matches recorded metadata in state.sqlite3" in out
    # A valid archive with other bytes under the recorded name: only SHA-256 catches it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "state.sqlite3").write_bytes(b"not the recorded state")
    with open(path, "wb") as out_file:
        archive.pack(other, out_file)
    archive.verify(path)  # structurally fine
    code, out, err = run(capsys, "snapshot", "verify", str(path))
    assert code == 1
    assert "does not match" in out
    assert_one_error_line(err, contains=str(path))


# -- snapshot extract -----------------------------------------------------------------
def test_extract_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = archive_at(snapshots_dir(tmp_path), 100)
    dest = tmp_path / "out"
    code, out, err = run(capsys, "snapshot", "extract", str(path), str(dest))
    assert code == 0, err
    names = {name for name, _, kind in archive.list_members(path) if kind == "file"}
    names.discard("MANIFEST.d-engine-sm.json")  # says what the archive holds; not state
    assert names and {p.name for p in dest.iterdir()} == names
    assert "extracted" in out
    # A second extract into the now non-empty DEST is refused, DEST untouched.
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    code, _, err = run(capsys, "snapshot", "extract", str(path), str(dest))
    assert code == 1
    assert_one_error_line(err, contains="not empty")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_extract_refuses_hostile_archive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = hostile_archive(tmp_path / "evil.tar.gz")
    dest = tmp_path / "jail" / "dest"
    code, _, err = run(capsys, "snapshot", "extract", str(evil), str(dest))
    assert code == 1
    assert_one_error_line(err, contains="..")
    assert not (tmp_path / "jail" / "escaped.txt").exists()
    assert not dest.exists()  # created by extract, removed again: nothing half-extracted


# -- usage and path errors ------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["snapshot"],
        ["snapshot", "frob", "x"],
        ["demo", "--entries", "0"],
        ["demo", "--entries", "many"],
        ["demo", "--state", "redis"],
        ["demo", "--bogus"],
        ["snapshot", "list"],
        ["snapshot", "list", ".", "--prefix", "a/b"],
        ["serve", "--dir", "d", "--listen", "no-port"],
        ["serve", "--dir", "d", "--listen", "h:1", "--state", "sqlite:"],
        ["send", "--dir", "d", "--to", "h:1", "--timeout", "-1"],
    ],
)
def test_bad_usage_exit_2_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert_one_error_line(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["snapshot", "list", "{missing}"],
        ["snapshot", "inspect", "{missing}"],
        ["snapshot", "verify", "{missing}"],
        ["snapshot", "extract", "{missing}", "{tmp}/dest"],
        ["snapshot", "list", "{file}"],
        ["send", "--dir", "{missing}", "--to", "127.0.0.1:1"],
    ],
)
def test_bad_path_exit_1_one_line(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("x")
    names = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path)}
    names["file"] = str(tmp_path / "a-file")
    code, _, err = run(capsys, *(a.format(**names) for a in argv))
    assert code == 1
    assert_one_error_line(err)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("d-engine-sm ")
    code, out, _ = run(capsys, "snapshot", "verify", "--help")
    assert code == 0 and "DIR|FILE" in out


def test_verbose_logs_to_stderr_and_leaves_no_handler(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    before = list(logging.getLogger("d_engine_sm").handlers)
    code, _, err = run(
        capsys, "-v", "demo", "--entries", "200", "--state", "memory", "--dir", str(tmp_path / "d")
    )
    assert code == 0
    assert "INFO d_engine_sm." in err
    assert logging.getLogger("d_engine_sm").handlers == before


# -- progress display -----------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_on_a_terminal_is_throttled() -> None:
    stream, clock = io.StringIO(), _Clock()
    reporter = Reporter(stream, tty=True, clock=clock)
    with reporter.bar("apply", 1000, start="unused on a tty", unit="entries") as bar:
        bar.update(100)  # first draw
        bar.update(200)  # within 0.1 s: skipped
        clock.now += 0.2
        bar.update(300)
        bar.update(1000)  # completion always drawn
    text = stream.getvalue()
    draws = [d for d in text.split("\r") if d.startswith("apply")]
    assert [d.split()[3] for d in draws] == ["100/1,000", "300/1,000", "1,000/1,000"]
    assert "unused on a tty" not in text
    assert text.endswith("\r")  # the bar line is cleared at the end
    reporter.line("done")
    assert stream.getvalue().endswith("done\n")


def test_progress_off_a_terminal_prints_one_status_line() -> None:
    stream = io.StringIO()
    reporter = Reporter(stream, tty=False, clock=_Clock())
    with reporter.bar("transfer", 10, start="streaming") as bar:
        for i in range(11):
            bar.update(i)
    assert stream.getvalue() == "transfer: streaming\n"


# -- serve / send over gRPC -----------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[Peer]:
    pytest.importorskip("grpc")
    with serve(tmp_path / "srv", "--node-id", "7") as peer:
        yield peer


def test_serve_and_send(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    server: Peer,
) -> None:
    pytest.importorskip("grpc")
    proc, lines, address = server.proc, server.lines, server.address
    assert "serving node 7 on 127.0.0.1:" in server.banner, server.banner
    assert not address.endswith(":0")

    source = snapshots_dir(tmp_path, (100,))
    code, out, err = run(capsys, "send", "--dir", str(source), "--to", address, "--timeout", "30")
    assert code == 0, err
    assert "sent snapshot index 100 term 1" in out and "installed" in out

    code, out, err = run(capsys, "snapshot", "list", str(tmp_path / "srv"))
    assert code == 0, err
    assert "snapshot-100-1.tar.gz" in out
    assert (tmp_path / "srv" / "snapshot-100-1.tar.gz").read_bytes() == (
        archive_at(source, 100).read_bytes()
    )

    # The same snapshot again is stale for the follower: refused, one line, exit 1.
    code, _, err = run(capsys, "send", "--dir", str(source), "--to", address, "--timeout", "30")
    assert code == 1
    assert_one_error_line(err, contains="stale")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(line)
    assert any(line.startswith("stopped; last_applied 100") for line in rest), rest


def test_send_to_nobody_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("grpc")
    source = snapshots_dir(tmp_path, (10,))
    code, _, err = run(
        capsys, "send", "--dir", str(source), "--to", "127.0.0.1:1", "--timeout", "5"
    )
    assert code == 1
    assert_one_error_line(err)


def test_python_m_entry_point_exit_codes(tmp_path: Path) -> None:
    bad = subprocess.run(
        [PY, "-m", "d_engine_sm", "snapshot", "verify", "missing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert bad.returncode == 1
    assert_one_error_line(bad.stderr, contains="missing")


def test_serve_without_grpc_names_the_extra(tmp_path: Path) -> None:
    proc = cli_without("grpc", "serve", "--dir", "srv", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, contains="pip install 'd-engine-sm[grpc]'")
    assert not (tmp_path / "srv").exists()
