"""The on-disk format of SqliteStateMachine, and the checks a received file must pass.

A received ``state.sqlite3`` is hostile until proven otherwise: SQLite runs
whatever its schema says (a view named ``kv`` may be an endless recursive
query, a trigger fires on our writes) and applies any ``-wal``/``-journal``
lying next to it. :func:`stage` therefore checks, cheapest first:

1. no SQLite side file (``-wal``, ``-shm``, ``-journal``) next to it;
2. its 100-byte header, read in Python before SQLite sees the file: magic,
   page size, file format, the declared page count against the file size,
   ``application_id`` and ``user_version``;
3. its schema objects: ``sqlite_master`` must equal, row for row (type, name,
   table and SQL text), that of a freshly created database, so exactly the
   expected tables with their column types and ``WITHOUT ROWID``, the expected
   index, and no view, trigger or virtual table;
4. ``integrity_check`` (pages, and the index against the table: a lying
   ``kv_expiry`` would make TTL cleanup fail later) and the type of every
   ``kv`` column.

Every statement runs on a private connection with ``trusted_schema`` off,
``cell_size_check`` on and a progress handler that interrupts it once the
deadline passes: no file can make an install run unbounded. Only then is the
file made into a live database (its ``meta`` row set to the snapshot's
LogId, WAL mode) and made durable, ready to be renamed into place.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
import urllib.parse
from contextlib import suppress
from pathlib import Path
from typing import Final

from d_engine_sm._fs import FileOps
from d_engine_sm.errors import CorruptSnapshotError, SnapshotError
from d_engine_sm.proto import storage_pb2

SNAPSHOT_FILE: Final = "state.sqlite3"
APPLICATION_ID: Final = 0x4445534D  # "DESM": marks files written by this class
SCHEMA_VERSION: Final = 1
SIDE_FILES: Final = ("-wal", "-shm", "-journal")  # what SQLite keeps next to a database

_SCHEMA: Final = (
    "CREATE TABLE kv(key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL,"
    " expires_at REAL) WITHOUT ROWID",
    "CREATE INDEX kv_expiry ON kv(expires_at) WHERE expires_at IS NOT NULL",
    "CREATE TABLE meta(id INTEGER PRIMARY KEY CHECK (id = 0),"
    " applied_index INTEGER NOT NULL, applied_term INTEGER NOT NULL, snapshot_meta BLOB)",
    "INSERT INTO meta VALUES (0, 0, 0, NULL)",
    "CREATE TABLE terms(first_index INTEGER PRIMARY KEY, term INTEGER NOT NULL)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

_MAGIC: Final = b"SQLite format 3\x00"
_SCHEMA_ROWS: Final = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
# VM instructions between deadline checks (a few ms). Each check takes the GIL:
# every 1,000 made validation 2x slower next to a busy apply thread, now that it
# runs while applies go on (benchmarks/bench_install_stall.py).
_PROGRESS_STEPS: Final = 10_000


def expected_schema() -> list[tuple[str, str, str, str]]:
    """``sqlite_master`` rows of a freshly created database (computed, not hand-copied)."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for statement in _SCHEMA:
            db.execute(statement)
        return [tuple(row) for row in db.execute(_SCHEMA_ROWS)]
    finally:
        db.close()


_EXPECTED: Final = expected_schema()


def check_header(path: Path) -> None:
    """Refuse a file whose header is not a SqliteStateMachine snapshot's.

    Raises:
        CorruptSnapshotError: what is wrong with the header.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(100)
    if len(head) < 100 or head[:16] != _MAGIC:
        raise CorruptSnapshotError(str(path), "not a SQLite database file")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise CorruptSnapshotError(str(path), f"invalid page size {page_size}")
    # 1: rollback journal (as generated), 2: WAL (a staged file); no side file
    # exists (checked before), so SQLite has no journal or WAL to apply.
    if head[18] not in (1, 2) or head[19] != head[18]:
        raise CorruptSnapshotError(
            str(path), f"unknown file format {head[18]}/{head[19]} (want 1/1 or 2/2)"
        )
    if head[24:28] != head[92:96]:
        raise CorruptSnapshotError(str(path), "header page count is not valid (stale header)")
    pages = int.from_bytes(head[28:32], "big")
    if pages * page_size != size:
        raise CorruptSnapshotError(
            str(path),
            f"header declares {pages} pages of {page_size} bytes but the file has {size} bytes",
        )
    app_id = int.from_bytes(head[68:72], "big")
    version = int.from_bytes(head[60:64], "big")
    if app_id != APPLICATION_ID or version != SCHEMA_VERSION:
        raise CorruptSnapshotError(
            str(path),
            f"not a SqliteStateMachine snapshot (application_id={app_id:#x}"
            f" user_version={version})",
        )
    if int.from_bytes(head[56:60], "big") != 1:
        raise CorruptSnapshotError(str(path), "text encoding is not UTF-8")


def _open(path: Path, deadline: float) -> sqlite3.Connection:
    """A private read-write connection whose every statement stops at ``deadline``."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        db.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
        # synchronous OFF: until renamed into place the file is scratch (a crash
        # discards it), and stage() fsyncs it once at the end.
        pragmas = ("trusted_schema = OFF", "cell_size_check = ON", "synchronous = OFF")
        for pragma in pragmas:
            db.execute(f"PRAGMA {pragma}")
    except BaseException:
        db.close()
        raise
    return db


def _check_contents(db: sqlite3.Connection, path: str) -> None:
    found = [tuple(row) for row in db.execute(_SCHEMA_ROWS)]
    if found != _EXPECTED:
        unexpected = sorted(set(found) - set(_EXPECTED))
        missing = sorted(set(_EXPECTED) - set(found))
        raise CorruptSnapshotError(
            path,
            f"unexpected schema objects {[r[:2] for r in unexpected]}"
            f" (missing {[r[:2] for r in missing]})",
        )
    # As cheap as quick_check here (the only index is partial, usually small).
    check = db.execute("PRAGMA integrity_check(3)").fetchall()
    if check != [("ok",)]:
        raise CorruptSnapshotError(path, f"integrity_check failed: {check}")
    bad = db.execute(
        "SELECT count(*) FROM kv WHERE typeof(key) != 'blob' OR typeof(value) != 'blob'"
        " OR (expires_at IS NOT NULL AND typeof(expires_at) NOT IN ('real', 'integer'))"
    ).fetchone()[0]
    if bad:
        raise CorruptSnapshotError(path, f"{bad} rows with wrongly typed columns")


def _set_meta(db: sqlite3.Connection, meta: storage_pb2.SnapshotMetadata) -> None:
    """Record the snapshot's LogId in the file itself: it is the new ``last_applied``."""
    lid = meta.last_included
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM meta")
        db.execute(
            "INSERT INTO meta VALUES (0, ?, ?, ?)",
            (lid.index, lid.term, meta.SerializeToString()),
        )
        db.execute("DELETE FROM terms")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")


def stage(
    source: Path,
    meta: storage_pb2.SnapshotMetadata,
    *,
    timeout: float,
    fs: FileOps,
    sync: bool,
) -> None:
    """Validate ``source`` and turn it, in place, into the live database for ``meta``.

    Afterwards ``source`` holds the snapshot's rows, ``meta`` as its applied
    LogId and snapshot metadata, no term history, WAL mode, no side file, and
    (``sync``) is on disk.

    Raises:
        CorruptSnapshotError: the file is missing, hostile or not of this
            schema, or validating it took longer than ``timeout`` seconds.
        SnapshotError: writing the validated file failed.
    """
    name = str(source)
    if not source.is_file():
        raise CorruptSnapshotError(name, "snapshot data file is missing")
    for suffix in SIDE_FILES:
        if os.path.lexists(name + suffix):
            raise CorruptSnapshotError(name, f"unexpected SQLite side file {source.name}{suffix}")
    check_header(source)
    deadline = time.monotonic() + timeout
    validated = False
    try:
        db = _open(source, deadline)
        try:
            _check_contents(db, name)
            validated = True
            fs.announce("sqlite:install:stage")
            _set_meta(db, meta)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if time.monotonic() > deadline:
            raise CorruptSnapshotError(
                name, f"validation took longer than {timeout:g} s and was interrupted"
            ) from exc
        if validated:  # our own write failed (a full disk, say): not the file's fault
            raise SnapshotError(f"cannot prepare {name} for install: {exc}") from exc
        raise CorruptSnapshotError(name, f"not a readable SQLite database: {exc}") from exc
    if sync:
        fs.announce("sqlite:install:fsync")
        with open(source, "rb+") as f:
            fs.fsync(f)


def same_device(source: Path, directory: Path) -> bool:
    """Whether ``source`` can be renamed into ``directory`` (True when it is
    missing: :func:`stage` reports that)."""
    try:
        return os.stat(source).st_dev == os.stat(directory).st_dev
    except FileNotFoundError:
        return True


def staging_path(source: Path, incoming: Path) -> Path:
    """``source``, or a copy of it at ``incoming`` when a rename cannot cross to there.

    ``incoming`` sits next to the database, so the final rename stays on one
    file system; its owner removes a leftover copy at open.
    """
    if same_device(source, incoming.parent):
        return source
    try:
        shutil.copyfile(source, incoming)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(incoming)  # a partial copy (a full disk, say)
        raise
    return incoming
