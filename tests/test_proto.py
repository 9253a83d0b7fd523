"""The committed generated code is fresh, and the wire names/numbers are d-engine's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from d_engine_sm.proto import client_pb2, common_pb2, storage_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = [
    "common_pb2.py", "common_pb2.pyi", "storage_pb2.py", "storage_pb2.pyi",
    "storage_pb2_grpc.py", "client_pb2.py", "client_pb2.pyi",
    "kv_snapshot_pb2.py", "kv_snapshot_pb2.pyi",
]  # fmt: skip


def test_generated_files_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        timeout=60,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "d_engine_sm" / "proto" / name).read_bytes()
        != (ROOT / "d_engine_sm" / "proto" / name).read_bytes()
    ]
    assert stale == [], f"run scripts/gen_proto.py: stale {stale}"


def _fields(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_wire_names_and_numbers() -> None:
    assert common_pb2.DESCRIPTOR.package == "d_engine.common"
    assert storage_pb2.DESCRIPTOR.package == "d_engine.server.storage"
    assert client_pb2.DESCRIPTOR.package == "d_engine.client"
    assert _fields(common_pb2.LogId) == {"term": 1, "index": 2}
    assert _fields(common_pb2.Entry) == {"index": 1, "term": 2, "payload": 3}
    assert _fields(common_pb2.EntryPayload) == {"noop": 1, "command": 2, "config": 3}
    assert _fields(storage_pb2.SnapshotMetadata) == {"last_included": 1, "checksum": 2}
    assert _fields(storage_pb2.SnapshotChunk) == {
        "leader_term": 1, "leader_id": 2, "seq": 3, "total_chunks": 4,
        "chunk_checksum": 5, "metadata": 6, "data": 7,
    }  # fmt: skip
    assert _fields(storage_pb2.SnapshotAck) == {"seq": 1, "status": 2, "next_requested": 3}
    assert _fields(storage_pb2.SnapshotResponse) == {"term": 1, "success": 2, "next_chunk": 3}
    ack = storage_pb2.SnapshotAck
    assert [ack.ACCEPTED, ack.CHECKSUM_MISMATCH, ack.OUT_OF_ORDER, ack.REQUESTED, ack.FAILED] == [
        0, 1, 2, 3, 4,
    ]  # fmt: skip
    assert common_pb2.NODE_ROLE_LEADER == 3 and common_pb2.NODE_ROLE_LEARNER == 4
    assert client_pb2.WATCH_EVENT_TYPE_PUT == 0 and client_pb2.WATCH_EVENT_TYPE_DELETE == 1
    cas = client_pb2.WriteCommand.CompareAndSwap
    assert _fields(cas) == {"key": 1, "expected_value": 2, "new_value": 3}
    assert _fields(client_pb2.WriteCommand.Insert) == {"key": 1, "value": 2, "ttl_secs": 3}


def test_service_method_paths() -> None:
    service = storage_pb2.DESCRIPTOR.services_by_name["SnapshotService"]
    assert service.full_name == "d_engine.server.storage.SnapshotService"
    install = service.methods_by_name["InstallSnapshot"]
    assert install.client_streaming and not install.server_streaming
    stream = service.methods_by_name["StreamSnapshot"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.input_type.name == "SnapshotAck" and stream.output_type.name == "SnapshotChunk"


def test_known_bytes() -> None:
    # LogId{term=1, index=2} encodes as field 1 varint 1, field 2 varint 2.
    assert common_pb2.LogId(term=1, index=2).SerializeToString() == b"\x08\x01\x10\x02"
