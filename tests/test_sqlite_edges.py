"""SqliteStateMachine at its edges: forged schemas, unwritable targets, a closed machine."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from conftest import put

from d_engine_sm._sqlite import SNAPSHOT_FILE, SqliteStateMachine
from d_engine_sm._values import LogId, log_id
from d_engine_sm.errors import CorruptSnapshotError, SnapshotError
from d_engine_sm.proto import storage_pb2


def _meta(index: int) -> storage_pb2.SnapshotMetadata:
    return storage_pb2.SnapshotMetadata(last_included=log_id(index, 1), checksum=b"\0" * 32)


def test_snapshot_with_an_extra_column_is_refused(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    with SqliteStateMachine(snap / SNAPSHOT_FILE, durability="off") as donor:
        donor.apply_chunk([put(1, b"a", b"1")])
    with closing(sqlite3.connect(snap / SNAPSHOT_FILE, isolation_level=None)) as db:
        db.execute("ALTER TABLE kv ADD COLUMN smuggled TEXT")
        db.execute("PRAGMA journal_mode = DELETE")
    with SqliteStateMachine(tmp_path / "t.db") as sm:
        sm.apply_chunk([put(1, b"o", b"old")])
        with pytest.raises(CorruptSnapshotError, match="unexpected schema objects"):
            sm.apply_snapshot_from_file(_meta(5), snap)
        assert sm.items() == {b"o": b"old"} and sm.last_applied() == log_id(1, 1)


def test_snapshot_into_a_missing_directory_is_a_snapshot_error(tmp_path: Path) -> None:
    with SqliteStateMachine(tmp_path / "t.db") as sm:
        sm.apply_chunk([put(1, b"a", b"1")])
        with pytest.raises(SnapshotError, match="cannot write snapshot"):
            sm.generate_snapshot_data(tmp_path / "no" / "such" / "dir", log_id(1, 1))
        sm.apply_chunk([put(2, b"b", b"2")])  # still usable
        assert sm.get(b"b") == b"2"


def test_last_applied_set_directly_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with SqliteStateMachine(path) as sm:
        assert sm.path == str(path.resolve())
        sm.update_last_applied(LogId(term=3, index=42))
        assert sm.last_applied() == log_id(42, 3)
    with SqliteStateMachine(path) as again:
        assert again.last_applied() == log_id(42, 3)


def test_prepare_snapshot_on_a_closed_machine_is_refused(tmp_path: Path) -> None:
    sm = SqliteStateMachine(tmp_path / "t.db")
    sm.close()
    with pytest.raises(ValueError, match="SqliteStateMachine is closed"):
        sm.prepare_snapshot()
