"""``d-engine-sm serve`` and ``send`` when they cannot do their job: what the user sees
(exit status, the one error line) and that nothing is left running."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("grpc_health")

from _cli_helpers import PY, busy_port, cli, one_error_line, run, serve, silent_peer

from d_engine_sm import MemoryStateMachine, _kv
from d_engine_sm._cli.transport import _stop_on_sigterm
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler

WAIT = 30.0  # upper bound for any single awaited event
SHORT = 0.5  # the --timeout given to a send meant to run out of time


def a_snapshot(directory: Path) -> Path:
    config = SnapshotConfig(snapshots_dir=directory, fsync=False)
    with StateMachineHandler(MemoryStateMachine(), config) as handler:
        handler.apply_chunk(
            [_kv.command_entry(i, 1, _kv.insert(b"k%d" % i, b"v")) for i in range(1, 11)]
        )
        handler.create_snapshot()
    return directory


# -- serve ------------------------------------------------------------------------------------
def test_serve_refuses_a_file_as_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "snapshots"
    path.write_text("not a directory")
    code, out, err = run(capsys, "serve", "--dir", str(path), "--listen", "127.0.0.1:0")
    assert code == 1
    assert one_error_line(err) == f"not a directory: {path}"
    assert out == ""
    assert path.read_text() == "not a directory"


def test_serve_on_a_busy_port_names_the_address_and_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with busy_port() as port:
        code, out, err = run(
            capsys, "serve", "--dir", str(tmp_path / "srv"), "--listen", f"127.0.0.1:{port}"
        )
    assert code == 1
    assert one_error_line(err) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert out == ""


def test_serve_on_a_busy_port_prints_one_line_not_grpc_logs_too(tmp_path: Path) -> None:
    # gRPC's native logger writes to the process's stderr itself: only a child shows it.
    with busy_port() as port:
        quiet = cli("serve", "--dir", str(tmp_path / "a"), "--listen", f"127.0.0.1:{port}")
        verbose = cli("-v", "serve", "--dir", str(tmp_path / "b"), "--listen", f"127.0.0.1:{port}")
    assert quiet.returncode == verbose.returncode == 1
    assert (
        quiet.stderr
        == f"d-engine-sm: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    # With --verbose gRPC's own diagnostics stay (they say more than ours).
    assert "Failed to add port" in verbose.stderr


def test_serve_with_metrics_on_a_busy_port_names_it_and_stops_the_grpc_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("prometheus_client")
    with busy_port() as port:
        started = time.monotonic()
        code, out, err = run(
            capsys,
            "serve",
            "--dir",
            str(tmp_path / "srv"),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            f"127.0.0.1:{port}",
        )
    assert code == 1
    assert one_error_line(err) == (
        f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
    assert out == ""  # never announced as serving
    assert time.monotonic() - started < WAIT / 2  # the gRPC server's stop did not hang


def test_serve_metrics_without_prometheus_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes the import fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "d_engine_sm.prometheus", raising=False)
    code, out, err = run(
        capsys,
        "serve",
        "--dir",
        str(tmp_path / "srv"),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    )
    assert code == 1
    assert one_error_line(err) == (
        "--metrics needs the prometheus extra: pip install 'd-engine-sm[prometheus]'"
    )
    assert out == ""


@pytest.mark.timeout(60)
def test_serve_with_metrics_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    with serve(tmp_path / "srv", "--metrics", "127.0.0.1:0") as peer:
        line = peer.lines.get(timeout=WAIT)
        assert line is not None and line.startswith("metrics at http://127.0.0.1:"), line
        assert line.rstrip().endswith("/metrics")
        peer.proc.send_signal(signal.SIGTERM)
        assert peer.proc.wait(timeout=WAIT) == 0
        rest: list[str] = []
        while (line := peer.lines.get(timeout=WAIT)) is not None:
            rest.append(line)
        assert peer.proc.stderr is not None
        stderr = peer.proc.stderr.read()
    assert rest == ["stopped; last_applied 0\n"]
    assert stderr == ""


def test_stop_on_sigterm_off_the_main_thread_leaves_signals_alone() -> None:
    # signal.signal() raises ValueError outside the main thread: main() run from a
    # worker thread must still get a stop request, just not one SIGTERM can make.
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def run_serve_helper() -> None:
        with _stop_on_sigterm() as stop:
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(stop.requested)
            stop.request()
            seen.append(stop.requested)

    worker = threading.Thread(target=run_serve_helper)
    worker.start()
    worker.join(WAIT)
    assert seen == [before, False, True]
    assert signal.getsignal(signal.SIGTERM) is before


# -- send -------------------------------------------------------------------------------------
def test_send_from_a_directory_without_a_snapshot_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, "send", "--dir", str(empty), "--to", "127.0.0.1:1")
    assert code == 1
    assert one_error_line(err) == f"no snapshot archive to send in {empty}"
    assert out == ""
    assert list(empty.iterdir()) == []  # read-only: nothing made


def test_send_to_a_silent_peer_gives_up_after_its_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = a_snapshot(tmp_path / "snaps")
    with silent_peer() as target:
        started = time.monotonic()
        code, out, err = run(
            capsys, "send", "--dir", str(source), "--to", target, "--timeout", str(SHORT)
        )
    elapsed = time.monotonic() - started
    assert code == 1
    assert f"InstallSnapshot to {target} failed: DEADLINE_EXCEEDED: " in one_error_line(err)
    assert out == ""
    assert SHORT <= elapsed < SHORT + 5


@pytest.mark.parametrize("module", ["storage_pb2", "storage_pb2_grpc"])
def test_an_import_error_that_is_not_about_grpc_is_not_blamed_on_the_extra(
    tmp_path: Path, module: str
) -> None:
    # A module of this package that cannot be imported (a broken installation): the
    # user must see that, not advice to install the grpc extra, even when the
    # module's name says grpc.
    script = (
        "import sys\n"
        "from d_engine_sm._cli import main\n"
        "import d_engine_sm.proto as proto\n"
        f"sys.modules['d_engine_sm.proto.{module}'] = None\n"
        f"if hasattr(proto, {module!r}): delattr(proto, {module!r})\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [PY, "-c", script, "send", "--dir", str(tmp_path), "--to", "127.0.0.1:1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 1
    assert one_error_line(done.stderr) == (
        "unexpected ModuleNotFoundError: "
        f"import of d_engine_sm.proto.{module} halted; None in sys.modules"
    )
