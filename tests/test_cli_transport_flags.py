"""``d-engine-sm send --no-resume`` and ``serve --resume-ttl/--transfer-timeout``, and
what ``serve`` offers orchestrators (gRPC health checks), run as real processes."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("grpc_health")

import grpc
import grpc_node
from _cli_helpers import cli, cli_without, serve
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_grpc import RequestEditor

from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm.errors import SnapshotTransferError
from d_engine_sm.transport import grpc as transport

MiB = 1024 * 1024
WAIT = 30.0  # upper bound for any single awaited event
PARTIAL = ["temp-resume-data", "temp-resume-state"]
CUT_AT = 2  # the chunk at which the first transfer breaks off


def partial_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("temp-*"))


def one_error_line(stderr: str, contains: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("d-engine-sm: error: "), stderr
    assert contains in lines[0], stderr


# -- usage errors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--resume-ttl", "-1", "must be a finite number >= 0"),
        ("--resume-ttl", "nan", "must be a finite number >= 0"),
        ("--resume-ttl", "inf", "must be a finite number >= 0"),
        ("--resume-ttl", "soon", "not a number"),
        ("--transfer-timeout", "0", "must be a finite number > 0"),
        ("--transfer-timeout", "-5", "must be a finite number > 0"),
        ("--transfer-timeout", "inf", "must be a finite number > 0"),
        ("--transfer-timeout", "1e999", "must be a finite number > 0"),
        ("--transfer-timeout", "", "not a number"),
    ],
)
def test_serve_rejects_bad_limits_as_usage_errors(
    tmp_path: Path, option: str, value: str, says: str
) -> None:
    run = cli("serve", "--dir", str(tmp_path / "srv"), "--listen", "127.0.0.1:0", option, value)
    assert run.returncode == 2
    one_error_line(run.stderr, f"argument {option}: {says}")
    assert not (tmp_path / "srv").exists()  # refused before anything was made


def test_send_no_resume_takes_no_value(tmp_path: Path) -> None:
    run = cli("send", "--dir", str(tmp_path), "--to", "127.0.0.1:1", "--no-resume=yes")
    assert run.returncode == 2
    one_error_line(run.stderr, "--no-resume")


def test_missing_health_package_names_the_extra(tmp_path: Path) -> None:
    run = cli_without(
        "grpc_health", "serve", "--dir", "srv", "--listen", "127.0.0.1:0", cwd=tmp_path
    )
    assert run.returncode == 1
    one_error_line(run.stderr, "pip install 'd-engine-sm[grpc]'")


# -- a snapshot and a follower holding the first chunks of it ------------------------------
@pytest.fixture
def leader(tmp_path: Path) -> Path:
    """A snapshots directory whose newest archive spans a few 1 MiB chunks (the CLI's size)."""
    directory = tmp_path / "leader"
    with StateMachineHandler(MemoryStateMachine(), grpc_node.config(directory, MiB)) as handler:
        grpc_node.seed(handler, 4, MiB, 5)
    return directory


def cut_transfer(leader: Path, follower: Path) -> None:
    """Receive ``leader``'s snapshot into ``follower`` until the peer goes away at CUT_AT."""
    config = grpc_node.config(leader, MiB)
    with (
        StateMachineHandler(MemoryStateMachine(), config) as source,
        StateMachineHandler(MemoryStateMachine(), grpc_node.config(follower, MiB)) as sink,
    ):
        meta = source.get_latest_snapshot_metadata()
        assert meta is not None

        def broken() -> Iterator[Any]:
            with source.load_snapshot_data(meta) as chunks:  # type: ignore[attr-defined]
                for chunk in chunks:
                    if chunk.seq == CUT_AT:
                        raise ConnectionResetError("peer went away")
                    yield chunk

        with pytest.raises(SnapshotTransferError):
            sink.apply_snapshot_stream_from_leader(2, broken(), lambda _: None)
    assert partial_files(follower) == PARTIAL


def stop(peer: Any) -> str:
    """SIGTERM the serve process; its exit status must be 0; returns its stderr."""
    peer.proc.send_signal(signal.SIGTERM)
    assert peer.proc.wait(timeout=WAIT) == 0
    stderr: str = peer.proc.stderr.read()
    return stderr


# -- serve --resume-ttl ----------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "kept"), [((), PARTIAL), (("--resume-ttl", "0"), [])])
def test_serve_resume_ttl_decides_whether_a_partial_is_kept(
    tmp_path: Path, leader: Path, flags: tuple[str, ...], kept: list[str]
) -> None:
    follower = tmp_path / "follower"
    cut_transfer(leader, follower)
    with serve(follower, *flags) as peer:  # start-up has looked at the partial by now
        assert partial_files(follower) == kept
        run = cli("send", "--dir", str(leader), "--to", peer.address, "-v", timeout=WAIT * 2)
        assert run.returncode == 0, run.stderr
        assert "installed" in run.stdout
        # The sender resumes only from what the peer kept.
        assert (f"push resumed target={peer.address} from={CUT_AT}" in run.stderr) == bool(kept)
        stop(peer)
    assert partial_files(follower) == []


# -- send --no-resume --------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [True, False])
def test_send_no_resume_sends_everything_even_to_a_peer_holding_a_prefix(
    tmp_path: Path, leader: Path, resume: bool
) -> None:
    follower = tmp_path / "follower"
    cut_transfer(leader, follower)
    flags = () if resume else ("--no-resume",)
    with serve(follower, "-v") as peer:
        assert partial_files(follower) == PARTIAL
        run = cli("send", "--dir", str(leader), "--to", peer.address, *flags, "-v", timeout=WAIT)
        assert run.returncode == 0, run.stderr
        assert "installed" in run.stdout
        server_log = stop(peer)
    assert ("push resumed" in run.stderr) == resume
    assert ("InstallSnapshot probe" in server_log) == resume  # the peer is asked only to resume
    # Chunks that crossed the wire (the peer acks each): only the missing ones when resuming.
    crossed = sorted({int(seq) for seq in re.findall(r" ack peer=\S+ seq=(\d+) ", server_log)})
    chunks = 5  # 4 MiB of incompressible values in 1 MiB chunks
    if resume:
        assert crossed == [0, *range(CUT_AT, chunks)]  # 0: the header naming the snapshot
    else:
        assert crossed == list(range(chunks))
    assert "snapshot installed" in server_log
    assert partial_files(follower) == []
    assert sorted(p.name for p in follower.glob("snapshot-*")) == sorted(
        p.name for p in leader.glob("snapshot-*")
    )


# -- serve --transfer-timeout ----------------------------------------------------------------
def test_serve_transfer_timeout_aborts_a_receive_that_takes_too_long(tmp_path: Path) -> None:
    chunk = 16 * 1024
    with StateMachineHandler(
        MemoryStateMachine(), grpc_node.config(tmp_path / "leader", chunk)
    ) as leader:
        grpc_node.seed(leader, 40, 4096, 5)  # ~10 chunks

        def stall(chunk: Any) -> Any:
            if chunk.seq == 1:  # time passing is the stimulus: 1.5 s > the 0.5 s allowed
                time.sleep(1.5)
            return chunk

        def push(address: str) -> None:
            transport.send_snapshot(
                address,
                leader,
                leader_term=2,
                timeout=WAIT,
                interceptors=[RequestEditor(stall)],
                resume=False,
            )

        with serve(tmp_path / "strict", "--transfer-timeout", "0.5") as peer:
            with pytest.raises(
                SnapshotTransferError, match=r"transfer took more than 0\.5 seconds"
            ):
                push(peer.address)
            assert not list((tmp_path / "strict").glob("snapshot-*"))
            stop(peer)
        with serve(tmp_path / "default") as peer:  # the same push, default limits: installed
            push(peer.address)
            assert list((tmp_path / "default").glob("snapshot-*"))
            stop(peer)


# -- health checks ----------------------------------------------------------------------------
def test_serve_answers_health_checks_until_stopped(tmp_path: Path) -> None:
    with serve(tmp_path / "srv") as peer, grpc.insecure_channel(peer.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", transport.SERVICE_NAME):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        peer.proc.send_signal(signal.SIGTERM)  # stopping: probers are told first
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert peer.proc.wait(timeout=WAIT) == 0
