"""SqliteStateMachine install: hostile received files are refused, readers never fail.

Each hostile file is built the way an attacker would: a real SQLite file
whose schema, header or side files lie. The install must refuse it with a
``CorruptSnapshotError`` naming what was wrong, change nothing, and leave the
node applying; a good install afterwards must succeed.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import put

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._sqlite import SNAPSHOT_FILE, SqliteStateMachine
from d_engine_sm._values import LogId, log_id
from d_engine_sm.errors import CorruptSnapshotError, SnapshotError
from d_engine_sm.proto import storage_pb2

KV = (
    "CREATE TABLE kv(key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL,"
    " expires_at REAL) WITHOUT ROWID"
)


def meta_at(index: int, term: int = 1) -> storage_pb2.SnapshotMetadata:
    return storage_pb2.SnapshotMetadata(last_included=log_id(index, term), checksum=b"\x07" * 32)


def good_file(path: Path, pairs: dict[bytes, bytes]) -> None:
    """A genuine snapshot file of ``pairs`` (what generate_snapshot_data writes)."""
    db_path = path.with_name(path.name + ".src")
    with SqliteStateMachine(db_path, durability="off") as sm:
        if pairs:
            sm.apply_chunk([put(i + 1, k, v) for i, (k, v) in enumerate(pairs.items())])
        tmp = path.parent / "gen"
        tmp.mkdir()
        sm.generate_snapshot_data(tmp, sm.last_applied())
    os.replace(tmp / SNAPSHOT_FILE, path)
    tmp.rmdir()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(db_path) + suffix):
            os.unlink(str(db_path) + suffix)


def edit(path: Path, *statements: str) -> None:
    """Run ``statements`` on the file as its attacker would (writable schema)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA writable_schema = ON")
        for statement in statements:
            db.execute(statement)
        db.execute("PRAGMA journal_mode = DELETE")


def patch_header(path: Path, offset: int, value: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


def rebuilt(path: Path, kv_sql: str, extra: tuple[str, ...] = ()) -> None:
    """A file with a different ``kv`` (and optional extras) but right header ids."""
    path.unlink()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(kv_sql)
        db.execute("CREATE INDEX kv_expiry ON kv(expires_at) WHERE expires_at IS NOT NULL")
        db.execute(
            "CREATE TABLE meta(id INTEGER PRIMARY KEY CHECK (id = 0),"
            " applied_index INTEGER NOT NULL, applied_term INTEGER NOT NULL, snapshot_meta BLOB)"
        )
        db.execute("INSERT INTO meta VALUES (0, 0, 0, NULL)")
        db.execute("CREATE TABLE terms(first_index INTEGER PRIMARY KEY, term INTEGER NOT NULL)")
        for statement in extra:
            db.execute(statement)
        db.execute("PRAGMA application_id = 1145393997")
        db.execute("PRAGMA user_version = 1")


ENDLESS = (
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r)"
    " SELECT x'01' AS key, x'02' AS value, NULL AS expires_at FROM r"
)

# kind -> (how to spoil a good file, a phrase the refusal must contain)
HOSTILE: dict[str, tuple[Callable[[Path], object], str]] = {
    "kv-is-endless-view": (
        lambda p: edit(p, "DROP TABLE kv", f"CREATE VIEW kv AS {ENDLESS}"),
        "unexpected schema objects",
    ),
    "trigger-on-meta": (
        lambda p: edit(
            p,
            "CREATE TRIGGER t BEFORE DELETE ON meta BEGIN"
            " SELECT count(*) FROM (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL"
            " SELECT n + 1 FROM r) SELECT n FROM r); END",
        ),
        "unexpected schema objects",
    ),
    "extra-table": (lambda p: edit(p, "CREATE TABLE extra(x)"), "unexpected schema objects"),
    "extra-view": (lambda p: edit(p, f"CREATE VIEW v AS {ENDLESS}"), "unexpected schema"),
    "extra-index": (lambda p: edit(p, "CREATE INDEX i ON kv(value)"), "unexpected schema"),
    "missing-index": (lambda p: edit(p, "DROP INDEX kv_expiry"), "missing"),
    "kv-columns-reordered": (
        lambda p: rebuilt(
            p,
            "CREATE TABLE kv(value BLOB NOT NULL, key BLOB PRIMARY KEY NOT NULL,"
            " expires_at REAL) WITHOUT ROWID",
        ),
        "unexpected schema objects",
    ),
    "kv-column-type": (
        lambda p: rebuilt(p, KV.replace("value BLOB", "value TEXT")),
        "unexpected schema objects",
    ),
    "kv-with-rowid": (
        lambda p: rebuilt(p, KV.replace(" WITHOUT ROWID", "")),
        "unexpected schema objects",
    ),
    "huge-page-count": (
        lambda p: patch_header(p, 28, (0x7FFFFFFF).to_bytes(4, "big")),
        "header declares 2147483647 pages",
    ),
    "truncated": (lambda p: os.truncate(p, os.path.getsize(p) // 2), "header declares"),
    "not-sqlite": (lambda p: p.write_bytes(os.urandom(8192)), "not a SQLite database file"),
    "empty": (lambda p: p.write_bytes(b""), "not a SQLite database file"),
    "wrong-application-id": (
        lambda p: patch_header(p, 68, (0x12345678).to_bytes(4, "big")),
        "application_id=0x12345678",
    ),
    "wrong-user-version": (
        lambda p: patch_header(p, 60, (7).to_bytes(4, "big")),
        "user_version=7",
    ),
    "stale-page-count": (lambda p: patch_header(p, 92, b"\xff" * 4), "not valid"),
    "unknown-format": (lambda p: patch_header(p, 18, b"\x03\x03"), "unknown file format 3/3"),
    "mixed-format": (lambda p: patch_header(p, 18, b"\x01\x02"), "unknown file format 1/2"),
    "bad-page-size": (lambda p: patch_header(p, 16, b"\x03\x00"), "invalid page size"),
    "side-wal": (
        lambda p: Path(str(p) + "-wal").write_bytes(os.urandom(4096)),
        "side file state.sqlite3-wal",
    ),
    "side-journal": (
        lambda p: Path(str(p) + "-journal").write_bytes(os.urandom(4096)),
        "side file state.sqlite3-journal",
    ),
    "typed-rows": (
        lambda p: edit(p, "INSERT INTO kv VALUES ('text-key', 42, NULL)"),
        "wrongly typed",
    ),
    "missing": (lambda p: p.unlink(), "missing"),
}


def _corrupt_btree(path: Path) -> None:
    """Overwrite the kv table's pages (not page 1) with noise."""
    with closing(sqlite3.connect(path)) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'kv'").fetchone()[0]
        page = db.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as f:
        f.seek((root - 1) * page + 8)
        f.write(os.urandom(page - 8))


HOSTILE["corrupt-btree"] = (_corrupt_btree, "integrity_check failed|not a readable SQLite")


def _lying_index(path: Path) -> None:
    """kv_expiry with the canonical SQL but missing the rows it should index."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("DROP INDEX kv_expiry")
        db.execute("CREATE INDEX kv_expiry ON kv(expires_at) WHERE expires_at > 1e12")
        db.execute("INSERT INTO kv VALUES (x'01', x'02', 100.0)")
        db.execute("PRAGMA writable_schema = ON")
        db.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX kv_expiry ON kv(expires_at)"
            " WHERE expires_at IS NOT NULL' WHERE name = 'kv_expiry'"
        )
        db.execute("PRAGMA journal_mode = DELETE")


HOSTILE["index-lies"] = (_lying_index, "integrity_check failed.*kv_expiry")


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_file_is_refused_and_nothing_changes(tmp_path: Path, kind: str) -> None:
    spoil, phrase = HOSTILE[kind]
    snap = tmp_path / "snap"
    snap.mkdir()
    good_file(snap / SNAPSHOT_FILE, {b"k%d" % i: b"v" * 50 for i in range(300)})
    spoil(snap / SNAPSHOT_FILE)
    with SqliteStateMachine(tmp_path / "live.db") as sm:
        sm.apply_chunk([put(1, b"old", b"1")])
        sm.persist_last_snapshot_metadata(meta_at(1))
        started = time.monotonic()
        with pytest.raises(CorruptSnapshotError, match=phrase) as info:
            sm.apply_snapshot_from_file(meta_at(9), snap)
        assert time.monotonic() - started < 5.0, "refusal must not take long"
        assert info.value.reason
        assert sm.items() == {b"old": b"1"}
        assert sm.last_applied() == log_id(1, 1)
        assert sm.snapshot_metadata() == meta_at(1)
        sm.apply_chunk([put(2, b"after", b"2")])  # the node keeps applying
        assert sm.get(b"after") == b"2"
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        good_file(fresh / SNAPSHOT_FILE, {b"new": b"n"})
        sm.apply_snapshot_from_file(meta_at(9), fresh)
        assert sm.items() == {b"new": b"n"}
    with SqliteStateMachine(tmp_path / "live.db") as again:
        assert again.items() == {b"new": b"n"} and again.last_applied() == log_id(9, 1)


def test_validation_is_bounded_by_the_deadline(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    good_file(snap / SNAPSHOT_FILE, {b"k%06d" % i: os.urandom(100) for i in range(20_000)})
    with SqliteStateMachine(tmp_path / "live.db", validate_timeout=1e-4) as sm:
        sm.apply_chunk([put(1, b"old", b"1")])
        with pytest.raises(CorruptSnapshotError, match=r"longer than 0\.0001 s"):
            sm.apply_snapshot_from_file(meta_at(9), snap)
        assert sm.items() == {b"old": b"1"}
    with pytest.raises(ValueError, match="validate_timeout"):
        SqliteStateMachine(tmp_path / "x.db", validate_timeout=0)


class HostileLeader(SqliteStateMachine):
    """A leader whose snapshot file is a SQLite database with a ``kv`` view that never ends."""

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        super().generate_snapshot_data(dir, last_included)
        edit(dir / SNAPSHOT_FILE, "DROP TABLE kv", f"CREATE VIEW kv AS {ENDLESS}")


def test_hostile_snapshot_through_the_handler_does_not_wedge_applies(tmp_path: Path) -> None:
    def cfg(name: str) -> SnapshotConfig:
        return SnapshotConfig(snapshots_dir=tmp_path / name, fsync=False)

    with (
        HostileLeader(tmp_path / "leader.db", durability="off") as leader_sm,
        StateMachineHandler(
            leader_sm, cfg("leader"), node_id=1, last_applied_index=10**6
        ) as leader,
        SqliteStateMachine(tmp_path / "follower.db", durability="normal") as follower_sm,
        StateMachineHandler(follower_sm, cfg("follower"), node_id=2) as follower,
    ):
        # Far ahead of the follower, which keeps applying during the transfer.
        leader.apply_chunk([put(i, b"k%d" % i, b"v") for i in range(10**6 + 1, 10**6 + 101)])
        meta, _ = leader.create_snapshot()
        follower.apply_chunk([put(1, b"mine", b"m")])
        stop = threading.Event()
        longest = [0.0]
        applied = [0]

        def keep_applying() -> None:
            index = 2
            while not stop.is_set():
                started = time.monotonic()
                follower.apply_chunk([put(index, b"a%d" % index, b"x")])
                longest[0] = max(longest[0], time.monotonic() - started)
                applied[0] += 1
                index += 1

        applier = threading.Thread(target=keep_applying)
        applier.start()
        try:
            with pytest.raises(SnapshotError) as info:
                follower.apply_snapshot_stream_from_leader(
                    1, leader.load_snapshot_data(meta), lambda ack: None
                )
        finally:
            stop.set()
            applier.join(30)
        assert isinstance(info.value.__cause__, CorruptSnapshotError)
        assert "unexpected schema objects" in str(info.value.__cause__)
        assert not applier.is_alive() and applied[0] > 0
        assert longest[0] < 5.0, "the apply lock was held for long"
        assert follower.last_applied() == 1 + applied[0]
        assert follower_sm.get(b"mine") == b"m"
        latest = follower.get_latest_snapshot_metadata()
        assert latest is None  # nothing kept


def test_readers_see_old_or_new_never_an_error(tmp_path: Path) -> None:
    """Readers hammer get/get_many/len while the database file is replaced 30 times."""
    keys = [b"k%04d" % i for i in range(500)]
    sources = {}
    for letter in (b"A", b"B"):
        path = tmp_path / letter.decode()
        path.mkdir()
        good_file(path / SNAPSHOT_FILE, {k: letter * 20 for k in keys})
        sources[letter] = path / SNAPSHOT_FILE
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]
    with SqliteStateMachine(tmp_path / "live.db", durability="normal") as sm:
        sm.apply_chunk([put(i + 1, k, b"A" * 20) for i, k in enumerate(keys)])

        def reader(n: int) -> None:
            try:
                while not stop.is_set():
                    values = sm.get_many(keys[n::7])
                    if len({v for v in values}) != 1 or values[0] not in (b"A" * 20, b"B" * 20):
                        problems.append(f"mixed batch {set(values)!r}")
                        return
                    if sm.get(keys[n]) is None or len(sm) != len(keys):
                        problems.append("a key vanished")
                        return
                    reads[0] += 1
            except Exception as exc:
                problems.append(repr(exc))

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            for round_ in range(30):
                letter = b"B" if round_ % 2 == 0 else b"A"
                snap = tmp_path / f"round{round_}"
                snap.mkdir()
                shutil.copyfile(sources[letter], snap / SNAPSHOT_FILE)
                sm.apply_snapshot_from_file(meta_at(1000 + round_), snap)
                assert sm.get(keys[0]) == letter * 20
                assert sm.last_applied() == log_id(1000 + round_, 1)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert problems == []
        assert reads[0] > 0
        assert not any(Path(str(tmp_path / "live.db") + s).exists() for s in ("-incoming",))


def test_install_from_another_file_system(tmp_path: Path) -> None:
    """A received file on another device is copied next to the database first."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    snap = Path(tempfile.mkdtemp(dir=other))
    try:
        good_file(snap / SNAPSHOT_FILE, {b"far": b"away"})
        with SqliteStateMachine(tmp_path / "live.db") as sm:
            sm.apply_chunk([put(1, b"old", b"1")])
            sm.apply_snapshot_from_file(meta_at(9), snap)
            assert sm.items() == {b"far": b"away"}
        assert not (tmp_path / "live.db-incoming").exists()
    finally:
        shutil.rmtree(snap)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
        timeout=10,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


def test_full_disk_while_copying_in_changes_nothing(tmp_path: Path, small_disk: Path) -> None:
    """The database lives on a 2 MiB disk; a 4 MiB snapshot on another disk cannot be copied in."""
    snap = tmp_path / "snap"
    snap.mkdir()
    good_file(snap / SNAPSHOT_FILE, {b"k%05d" % i: os.urandom(200) for i in range(15_000)})
    assert os.path.getsize(snap / SNAPSHOT_FILE) > 3 << 20
    with SqliteStateMachine(small_disk / "live.db") as sm:
        sm.apply_chunk([put(1, b"old", b"1")])
        with pytest.raises(OSError) as info:
            sm.apply_snapshot_from_file(meta_at(9), snap)
        assert info.value.errno == errno.ENOSPC
        assert not (small_disk / "live.db-incoming").exists()
        assert sm.items() == {b"old": b"1"} and sm.last_applied() == log_id(1, 1)
        sm.apply_chunk([put(2, b"after", b"2")])
        assert sm.get(b"after") == b"2"


def test_install_refused_while_another_connection_holds_the_wal(tmp_path: Path) -> None:
    """One instance per path; a foreign reader mid-transaction blocks the checkpoint:
    the install is refused rather than dropping WAL frames."""
    snap = tmp_path / "snap"
    snap.mkdir()
    good_file(snap / SNAPSHOT_FILE, {b"new": b"n"})
    with SqliteStateMachine(tmp_path / "live.db", durability="normal") as sm:
        sm.apply_chunk([put(1, b"old", b"1")])
        with closing(sqlite3.connect(tmp_path / "live.db", isolation_level=None)) as other:
            other.execute("BEGIN")
            other.execute("SELECT count(*) FROM kv").fetchone()  # holds a WAL read mark
            sm.apply_chunk([put(2, b"later", b"2")])
            with pytest.raises(SnapshotError, match="in use"):
                sm.apply_snapshot_from_file(meta_at(9), snap)
            other.execute("COMMIT")
        assert sm.items() == {b"old": b"1", b"later": b"2"}
        sm.apply_snapshot_from_file(meta_at(9), snap)  # the same (already staged) file
        assert sm.items() == {b"new": b"n"}


def test_full_disk_while_preparing_is_not_called_corrupt(small_disk: Path) -> None:
    """Validation passes; writing the snapshot's LogId into the file finds the disk
    full: a SnapshotError (not CorruptSnapshotError), and nothing changed."""
    snap = small_disk / "snap"
    snap.mkdir()
    good_file(snap / SNAPSHOT_FILE, {b"k%04d" % i: os.urandom(100) for i in range(3000)})
    with SqliteStateMachine(small_disk / "live.db", durability="normal") as sm:
        sm.apply_chunk([put(1, b"old", b"1")])
        filler = small_disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        with pytest.raises(SnapshotError, match="cannot prepare") as info:
            sm.apply_snapshot_from_file(meta_at(9), snap)
        assert not isinstance(info.value, CorruptSnapshotError)
        assert sm.items() == {b"old": b"1"} and sm.last_applied() == log_id(1, 1)
        filler.unlink()
        sm.apply_snapshot_from_file(meta_at(9), snap)  # room again: the same file installs
        assert len(sm) == 3000 and sm.last_applied() == log_id(9, 1)
