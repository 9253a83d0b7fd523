"""SqliteStateMachine when a step fails halfway: transactions roll back and the
machine stays usable; received files with a foreign text encoding or a damaged
first page are refused; the live file is never installed onto itself; a second
``prepare_snapshot`` replaces the first pin."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from conftest import put
from test_sqlite_install import good_file, meta_at, patch_header

from d_engine_sm import _sqlite
from d_engine_sm._sqlite import SNAPSHOT_FILE, SqliteStateMachine
from d_engine_sm._sqlite_schema import _SCHEMA
from d_engine_sm._values import log_id
from d_engine_sm.errors import CorruptSnapshotError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def deny_delete_on(
    table: str,
) -> Callable[[int, str | None, str | None, str | None, str | None], int]:
    """An SQLite authorizer refusing DELETE on ``table`` (a write failing midway)."""

    def authorizer(
        action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        if action == sqlite3.SQLITE_DELETE and arg1 == table:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    return authorizer


def allow_all(
    action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
) -> int:
    return sqlite3.SQLITE_OK  # set_authorizer(None) needs Python 3.11


# -- writes that fail inside their transaction ---------------------------------------------------
def test_a_failing_ttl_cleanup_rolls_back_and_the_next_one_works(tmp_path: Path) -> None:
    clock = Clock()
    with SqliteStateMachine(tmp_path / "t.db", clock=clock) as sm:
        sm.apply_chunk([put(1, b"short", b"1", ttl=5), put(2, b"kept", b"2")])
        clock.now += 60
        sm._db.set_authorizer(deny_delete_on("kv"))
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            sm.lease_background_cleanup()
        sm._db.set_authorizer(allow_all)
        # Still one transaction at a time: the failed one was rolled back.
        assert sm.lease_background_cleanup() == [b"short"]
        assert sm.items() == {b"kept": b"2"}
        assert sm.lease_background_cleanup() == []


def test_a_failing_reset_changes_nothing_and_the_next_one_works(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with SqliteStateMachine(path) as sm:
        sm.apply_chunk([put(1, b"a", b"1"), put(2, b"b", b"2", term=2)])
        sm._db.set_authorizer(deny_delete_on("terms"))  # after kv's rows are deleted
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            sm.reset()
        sm._db.set_authorizer(allow_all)
        assert sm.last_applied() == log_id(2, 2)
        assert sm.entry_term(2) == 2
        sm.apply_chunk([put(3, b"c", b"3", term=2)])  # the writer is not stuck in a transaction
    with SqliteStateMachine(path) as again:  # nothing of the failed reset was committed
        assert again.items() == {b"a": b"1", b"b": b"2", b"c": b"3"}
        assert again.last_applied() == log_id(3, 2)
        again.reset()
        assert again.items() == {} and again.last_applied() == log_id(0, 0)


def test_a_failing_schema_creation_leaves_a_file_a_later_open_initialises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.db"
    monkeypatch.setattr(_sqlite, "_SCHEMA", (*_SCHEMA, "CREATE TABLE kv(x)"))
    with pytest.raises(sqlite3.OperationalError, match="table kv already exists"):
        SqliteStateMachine(path)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0
    monkeypatch.undo()
    with SqliteStateMachine(path) as sm:
        sm.apply_chunk([put(1, b"a", b"1")])
        assert sm.get(b"a") == b"1"


# -- installs ----------------------------------------------------------------------------------
def _refused(tmp_path: Path, spoil: Callable[[Path], object], phrase: str) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    good_file(snap / SNAPSHOT_FILE, {b"k%d" % i: b"v" * 50 for i in range(300)})
    spoil(snap / SNAPSHOT_FILE)
    with SqliteStateMachine(tmp_path / "live.db") as sm:
        sm.apply_chunk([put(1, b"old", b"1")])
        with pytest.raises(CorruptSnapshotError, match=phrase) as info:
            sm.apply_snapshot_from_file(meta_at(9), snap)
        assert str(snap / SNAPSHOT_FILE) in str(info.value)
        assert sm.items() == {b"old": b"1"} and sm.last_applied() == log_id(1, 1)


def test_a_snapshot_file_in_utf16_is_refused(tmp_path: Path) -> None:
    _refused(
        tmp_path,
        lambda p: patch_header(p, 56, (2).to_bytes(4, "big")),  # text encoding: UTF-16le
        "text encoding is not UTF-8",
    )


def test_a_snapshot_file_with_a_damaged_first_page_is_refused(tmp_path: Path) -> None:
    # The header is intact; the b-tree page holding the schema behind it is not.
    _refused(
        tmp_path,
        lambda p: patch_header(p, 100, b"\x0d" + b"\xff" * 60),
        "not a readable SQLite database: database disk image is malformed",
    )


def test_the_live_database_is_not_installed_onto_itself(tmp_path: Path) -> None:
    with SqliteStateMachine(tmp_path / SNAPSHOT_FILE) as sm:
        sm.apply_chunk([put(1, b"a", b"1")])
        with pytest.raises(ValueError, match="cannot install the live database onto itself"):
            sm.apply_snapshot_from_file(meta_at(5), tmp_path)
        assert sm.items() == {b"a": b"1"} and sm.last_applied() == log_id(1, 1)


# -- snapshots ---------------------------------------------------------------------------------
def test_a_second_prepare_replaces_the_first_pin(tmp_path: Path) -> None:
    with SqliteStateMachine(tmp_path / "t.db") as sm:
        sm.apply_chunk([put(1, b"a", b"1")])
        sm.prepare_snapshot()
        sm.apply_chunk([put(2, b"b", b"2")])
        sm.prepare_snapshot()  # pins the state as of now, releasing the first pin
        sm.apply_chunk([put(3, b"c", b"3")])
        out = tmp_path / "out"
        out.mkdir()
        sm.generate_snapshot_data(out, log_id(2, 1))
    with closing(sqlite3.connect(out / SNAPSHOT_FILE)) as db:
        rows = dict(db.execute("SELECT key, value FROM kv").fetchall())
        applied = db.execute("SELECT applied_index FROM meta").fetchone()[0]
    assert rows == {b"a": b"1", b"b": b"2"} and applied == 2
