"""SqliteStateMachine: the durable embedded key/value state machine (stdlib sqlite3).

Theory of operation:

* One writer connection, guarded by ``_write_lock``, does every write
  (apply, reset, install, TTL cleanup, metadata). Each ``apply_chunk`` is one
  transaction that carries the new ``last_applied`` with the data, so a crash
  never leaves the two disagreeing.
* Commands are decoded by the shared :func:`_kv.apply_entries` into an
  in-memory overlay (last write per key wins); the overlay is then written
  with two ``executemany`` calls. Collapsing per key keeps the SQL batch
  small and lets CompareAndSwap see earlier writes of the same batch.
* Reads use per-thread connections in WAL mode: they never block applies and
  only ever see committed transactions. Each reader connection has its own
  lock, held for one query, so an install can park every reader.
  ``last_applied``, the term history and the snapshot metadata are also
  cached in Python (replaced, never mutated, after each commit) so the
  handler's hot queries touch no file.
* ``prepare_snapshot`` opens a read transaction on a dedicated connection
  (microseconds); ``generate_snapshot_data`` copies that pinned view with the
  SQLite backup API into a standalone file while applies continue.
* ``apply_snapshot_from_file`` replaces the database *file*: the received
  file is validated and prepared in place (``_sqlite_schema.stage``), then,
  with every connection closed and readers parked, the live WAL is
  checkpointed and removed and the received file renamed over the database.
  No connection ever spans the swap: SQLite names ``-wal``/``-shm`` after the
  path, so an old connection's side files must never meet the new file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import ClassVar, Final

from d_engine_sm import _kv
from d_engine_sm._closing import Closing
from d_engine_sm._fs import DEFAULT_FILE_OPS, FileOps
from d_engine_sm._sqlite_batch import SELECT_ONE, OverlayOps
from d_engine_sm._sqlite_readers import ReaderPool
from d_engine_sm._sqlite_schema import (
    _SCHEMA,
    APPLICATION_ID,
    SCHEMA_VERSION,
    SIDE_FILES,
    SNAPSHOT_FILE,
    same_device,
    stage,
    staging_path,
)
from d_engine_sm._state_machine import StateMachine, install_key
from d_engine_sm._values import ApplyResult, LogId
from d_engine_sm.errors import SnapshotError
from d_engine_sm.proto import common_pb2, storage_pb2

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SNAPSHOT_FILE", "SqliteStateMachine"]

_log = logging.getLogger("d_engine_sm.sqlite")

_BUSY_TIMEOUT: Final = 30.0
_SYNC: Final = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
_INCOMING: Final = "-incoming"  # a received file copied next to the database (cross-device)
_IN_BATCH: Final = 500  # keys per IN (...) lookup: under SQLite's variable limit
_SET_APPLIED: Final = "UPDATE meta SET applied_index = ?, applied_term = ? WHERE id = 0"


class SqliteStateMachine(Closing, StateMachine):
    """A durable key/value state machine in one SQLite database (WAL mode).

    Executes ``WriteCommand`` payloads exactly like :class:`MemoryStateMachine`
    (Insert with optional TTL, Delete, CompareAndSwap). Each ``apply_chunk``
    is one transaction that includes the new ``last_applied``; reopening the
    same path restores the data, ``last_applied`` and the snapshot metadata.

    ``durability`` sets SQLite's ``synchronous`` pragma:

    * ``"full"`` (default): every returned ``apply_chunk`` is on disk and
      survives a power loss.
    * ``"normal"``: survives a process crash; a power loss may lose the last
      few applied batches (never half a batch).
    * ``"off"``: nothing is fsynced; for tests and benchmarks only.

    Thread safety: all methods may be called from any thread. Writes are
    serialised on one connection; ``get``/``__len__``/``items`` run on
    per-thread read connections concurrently with applies and see only
    committed batches; during an install they see the old state or the new
    one, never an error. ``stop()`` only flushes and clears the running flag
    (the instance stays usable, like MemoryStateMachine); ``close()``
    releases the connections and is terminal. Use one instance per path.

    Args:
        path: database file; parent directories are created.
        durability: ``"full"``, ``"normal"`` or ``"off"`` (above).
        clock: wall-clock seconds used to stamp and check TTL expiry.
        file_ops: seam whose ``announce`` is called before crash-relevant
            steps (``"sqlite:install:rename"`` ...); tests use it to kill the
            process there.
        validate_timeout: seconds a received snapshot file may take to be
            validated and prepared before the install is refused.

    Raises:
        ValueError: bad ``durability``, or ``path`` holds another database.
    """

    snapshot_format: ClassVar[str | None] = "d_engine_sm.sqlite"  # the database file
    snapshot_format_version = SCHEMA_VERSION

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: str = "full",
        clock: Callable[[], float] = time.time,
        file_ops: FileOps | None = None,
        validate_timeout: float = 60.0,
    ) -> None:
        if durability not in _SYNC:
            raise ValueError(f"durability must be one of {sorted(_SYNC)}, got {durability!r}")
        self._path = os.path.abspath(os.fspath(path))
        self._durability = durability
        self._clock = clock
        if not validate_timeout > 0:
            raise ValueError(f"validate_timeout must be > 0, got {validate_timeout!r}")
        self._validate_timeout = validate_timeout
        self._fs = file_ops if file_ops is not None else DEFAULT_FILE_OPS
        # Lock order: _write_lock -> _generating -> the readers' locks; _snap_lock
        self._write_lock = threading.Lock()
        self._generating = threading.Lock()  # held by generate_snapshot_data's copy
        self._snap_lock = threading.Lock()
        self._readers = ReaderPool(
            lambda: self._connect(readonly=True),
            lambda: ValueError(f"SqliteStateMachine is closed: path={self._path}"),
        )
        self._pinned: sqlite3.Connection | None = None
        # install_key() of the received file prepare_install staged in place.
        self._prepared: bytes | None = None
        self._closed = False
        self._running = True
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        # A copy an install made and did not rename: never part of the state.
        _unlink_quietly(self._path + _INCOMING)
        self._db = self._open_writer()
        _log.info(
            "opened path=%s durability=%s last_applied=%d",
            self._path,
            durability,
            self._last_applied.index,
        )

    # -- connections -----------------------------------------------------
    def _open_writer(self) -> sqlite3.Connection:
        self._db = db = self._connect()
        try:
            self._init_schema()
            self._load_cache()
        except BaseException:
            db.close()
            raise
        return db

    def _connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        # check_same_thread=False: the writer is guarded by _write_lock, a
        # reader is used by its own thread only (close() excepted).
        conn = sqlite3.connect(
            self._path,
            timeout=_BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
            uri=True,
        )
        if readonly:
            conn.execute("PRAGMA query_only = 1")
        return conn

    def _init_schema(self) -> None:
        db = self._db
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self._path} is not a SQLite database: {exc}") from exc
        if app_id == 0 and tables == 0:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ValueError(f"{self._path}: cannot enable WAL mode (got {mode})")
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        elif app_id != APPLICATION_ID or version != SCHEMA_VERSION:
            raise ValueError(
                f"{self._path} is not a SqliteStateMachine database "
                f"(application_id={app_id:#x} user_version={version})"
            )
        db.execute(f"PRAGMA synchronous = {_SYNC[self._durability]}")

    def _load_cache(self) -> None:
        index, term, blob = self._db.execute(
            "SELECT applied_index, applied_term, snapshot_meta FROM meta WHERE id = 0"
        ).fetchone()
        self._last_applied = LogId(term=term, index=index)
        self._snapshot_meta = _parse_meta(blob) if blob is not None else None
        self._term_starts: list[tuple[int, int]] = [
            (int(i), int(t))
            for i, t in self._db.execute("SELECT first_index, term FROM terms ORDER BY 1")
        ]

    def _writer(self) -> sqlite3.Connection:
        if self._closed:
            raise ValueError(f"SqliteStateMachine is closed: path={self._path}")
        return self._db

    @property
    def path(self) -> str:
        """Absolute path of the database file."""
        return self._path

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self._writer()
        self._running = True

    def stop(self) -> None:
        """Flush and clear the running flag; the instance stays usable."""
        if not self._closed:
            self.flush()
        self._running = False

    def is_running(self) -> bool:
        return self._running and not self._closed

    def close(self) -> None:
        """Release every connection (idempotent). Further calls raise ValueError."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._running = False
            with self._snap_lock:
                self._release_pinned()
            self._readers.close()
            self._db.close()
        _log.info("closed path=%s", self._path)

    # -- reads -----------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        readers = self._readers
        reader = readers.mine()
        with reader.lock:
            conn = reader.conn  # ReaderPool.conn() inlined for the common case: hot path
            if reader.generation != readers.generation or conn is None:
                conn = readers.conn(reader)
            row = conn.execute(SELECT_ONE, (key,)).fetchone()
        if row is None:
            return None
        value, at = row
        return value if at is None or at > self._clock() else None

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Live values of ``keys`` (None where absent), one query per ``_IN_BATCH`` keys."""
        reader = self._readers.mine()
        now = self._clock()
        found: dict[bytes, bytes] = {}
        with reader.lock:  # one lock for the whole batch: all of it from one file
            db = self._readers.conn(reader)
            for start in range(0, len(keys), _IN_BATCH):
                part = list(keys[start : start + _IN_BATCH])
                marks = ",".join("?" * len(part))
                query = f"SELECT key, value, expires_at FROM kv WHERE key IN ({marks})"
                for key, value, at in db.execute(query, part):
                    if at is None or at > now:
                        found[key] = value
        return [found.get(key) for key in keys]

    def __len__(self) -> int:
        """Number of stored keys, expired-but-not-cleaned ones included (O(n))."""
        reader = self._readers.mine()
        with reader.lock:
            return int(self._readers.conn(reader).execute("SELECT count(*) FROM kv").fetchone()[0])

    def items(self) -> dict[bytes, bytes]:
        """A copy of the live key/value pairs (expired keys left out)."""
        now = self._clock()
        reader = self._readers.mine()
        with reader.lock:
            rows = self._readers.conn(reader).execute(
                "SELECT key, value FROM kv WHERE expires_at IS NULL OR expires_at > ?", (now,)
            )
            return dict(rows.fetchall())

    def entry_term(self, index: int) -> int | None:
        return _kv.term_at(index, self._term_starts, self._last_applied, self._snapshot_meta)

    # -- write path ------------------------------------------------------
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        if not entries:
            return []
        with self._write_lock:
            db = self._writer()
            ops = OverlayOps(db)
            last = entries[-1]
            starts = _kv.next_term_starts(self._term_starts, entries)
            db.execute("BEGIN IMMEDIATE")
            try:
                results = _kv.apply_entries(entries, ops, self._clock())
                ops.flush()
                db.execute(_SET_APPLIED, (last.index, last.term))
                if starts is not None:
                    self._write_terms(db, starts)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            # Publish only after the commit: readers never see uncommitted state.
            if starts is not None:
                self._term_starts = starts
            self._last_applied = LogId(term=last.term, index=last.index)
        _log.debug("applied path=%s first=%d last=%d", self._path, entries[0].index, last.index)
        return results

    @staticmethod
    def _write_terms(db: sqlite3.Connection, starts: list[tuple[int, int]]) -> None:
        db.execute("DELETE FROM terms")
        db.executemany("INSERT OR REPLACE INTO terms VALUES (?, ?)", starts)

    def last_applied(self) -> LogId:
        last = self._last_applied
        return LogId(term=last.term, index=last.index)

    def update_last_applied(self, log_id: LogId) -> None:
        """Set ``last_applied``; persisted at once (it is rare and must survive)."""
        self.persist_last_applied(log_id)

    def persist_last_applied(self, log_id: LogId) -> None:
        with self._write_lock:
            self._writer().execute(_SET_APPLIED, (log_id.index, log_id.term))
            self._last_applied = LogId(term=log_id.term, index=log_id.index)

    def lease_background_cleanup(self) -> list[bytes]:
        with self._write_lock:
            db = self._writer()
            now = self._clock()
            db.execute("BEGIN IMMEDIATE")
            try:
                where = "WHERE expires_at IS NOT NULL AND expires_at <= ?"
                keys = [k for (k,) in db.execute(f"SELECT key FROM kv {where}", (now,))]
                if keys:
                    db.execute(f"DELETE FROM kv {where}", (now,))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        if keys:
            _log.debug("expired path=%s keys=%d", self._path, len(keys))
        return keys

    # -- snapshots -------------------------------------------------------
    def snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None:
        return self._snapshot_meta

    def update_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        """Record ``meta``; persisted at once so a reopen restores it."""
        self.persist_last_snapshot_metadata(meta)

    def persist_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        copy = storage_pb2.SnapshotMetadata()
        copy.CopyFrom(meta)
        with self._write_lock:
            self._writer().execute(
                "UPDATE meta SET snapshot_meta = ? WHERE id = 0", (copy.SerializeToString(),)
            )
            self._snapshot_meta = copy

    def prepare_snapshot(self) -> None:
        """Pin the current committed state for the next ``generate_snapshot_data``.

        Opens a read transaction on a dedicated connection (fast; no copy).
        While pinned, WAL checkpoints cannot pass this point, so the WAL grows
        until the snapshot is generated.
        """
        with self._write_lock:  # never a connection to a file an install is replacing
            self._writer()
            conn = self._connect(readonly=True)
            try:
                conn.execute("BEGIN")
                conn.execute("SELECT applied_index FROM meta").fetchone()  # starts the read txn
            except BaseException:
                conn.close()
                raise
            with self._snap_lock:
                self._release_pinned()
                self._pinned = conn

    def _release_pinned(self) -> None:
        pinned, self._pinned = self._pinned, None
        if pinned is not None:
            pinned.close()

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        """Write ``dir/state.sqlite3``: the pinned state, or the current one.

        Runs concurrently with applies (they use another connection).

        Raises:
            SnapshotError: the copy failed.
        """
        with self._generating:  # an install's file swap waits for this copy
            self._generate(Path(dir) / SNAPSHOT_FILE)
        _log.info(
            "snapshot written dir=%s index=%d term=%d",
            dir,
            last_included.index,
            last_included.term,
        )

    def _generate(self, target_path: Path) -> None:
        with self._snap_lock:
            source, self._pinned = self._pinned, None
        if source is None:
            source = self._connect(readonly=True)
        try:
            target = sqlite3.connect(os.fspath(target_path), isolation_level=None)
            try:
                source.backup(target)
                # A backup keeps the source's WAL flag; make the file standalone.
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
        except sqlite3.Error as exc:
            raise SnapshotError(f"cannot write snapshot {target_path}: {exc}") from exc
        finally:
            source.close()

    def prepare_install(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        """Validate and stage ``dir/state.sqlite3`` in place, with applies running.

        The slow part of an install (header, schema objects, integrity_check,
        column types; ``meta`` written in as the applied LogId; fsync), so
        that :meth:`apply_snapshot_from_file` only renames. When the file
        cannot be renamed over the database (another file system), nothing
        is done here: the install copies and stages it then.

        Raises:
            CorruptSnapshotError: as :meth:`apply_snapshot_from_file`.
        """
        source = self._received_file(dir)
        if self._closed or not same_device(source, Path(self._path).parent):
            return
        self._prepared = None
        self._stage(source, meta)
        self._prepared = install_key(meta, dir)

    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        """Replace the whole state with ``dir/state.sqlite3`` by replacing the file.

        The received file is validated (header, schema objects, integrity_check,
        column types; bounded by ``validate_timeout``), given ``meta`` as its
        applied LogId, fsynced, and renamed over the database: it is *moved*
        out of ``dir``. All but the rename is done by :meth:`prepare_install`
        when it ran for the same file and metadata. Readers on other threads
        see the old or the new state. A crash at any point leaves either the
        old or the new state.

        Raises:
            CorruptSnapshotError: the file is missing, hostile, not of this
                schema or too slow to validate; nothing changed.
            SnapshotError: the old database could not be reopened after a
                failed swap, or the new one after a swap; the instance is closed.
        """
        copy = storage_pb2.SnapshotMetadata()
        copy.CopyFrom(meta)
        lid = copy.last_included
        source = self._received_file(dir)
        prepared, self._prepared = self._prepared == install_key(copy, dir), None
        with self._write_lock:
            self._writer()
            staged = source if prepared else staging_path(source, Path(self._path + _INCOMING))
            try:
                if not prepared:
                    self._stage(staged, copy)
                self._swap_in(staged)
            finally:
                if staged != source:
                    _unlink_quietly(str(staged))
        _log.info("snapshot installed path=%s index=%d term=%d", self._path, lid.index, lid.term)

    def _received_file(self, dir: Path) -> Path:
        source = Path(dir) / SNAPSHOT_FILE
        if os.path.abspath(source) == self._path:
            raise ValueError(f"cannot install the live database onto itself: {source}")
        return source

    def _stage(self, path: Path, meta: storage_pb2.SnapshotMetadata) -> None:
        """Validate the received file at ``path`` and make it the database for ``meta``."""
        sync = self._durability != "off"
        stage(path, meta, timeout=self._validate_timeout, fs=self._fs, sync=sync)

    def _swap_in(self, staged: Path) -> None:
        """Rename ``staged`` over the database with no connection open across the swap.

        Each step names what a crash just before it leaves. Caller holds
        ``_write_lock``; caches are reloaded from whichever file ends up in place.
        """
        with self._generating, self._readers.parked():
            with self._snap_lock:
                self._release_pinned()
            # Crash: the old database and its WAL, untouched.
            self._fs.announce("sqlite:install:checkpoint")
            # Our readers are parked: only a foreign connection can block this.
            self._db.execute("PRAGMA busy_timeout = 2000")
            try:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT * 1000)}")
            if busy:  # another connection (another process?) holds the WAL: keep it
                raise SnapshotError(f"cannot checkpoint {self._path}: database is in use")
            self._db.close()
            try:
                # Crash: the old database, whole; its (empty) WAL is its own.
                self._fs.announce("sqlite:install:remove_wal")
                for suffix in SIDE_FILES:
                    _unlink_quietly(self._path + suffix)
                # Crash: the old database alone; no side file is left to meet the new one.
                self._fs.announce("sqlite:install:rename")
                self._fs.replace(staged, Path(self._path))
            except BaseException:
                self._reopen()  # nothing was swapped: back to the old file
                raise
            # Crash: the new database (or, after a power loss, possibly the old one).
            # From here on the new file is the state: finish, never roll back.
            try:
                self._fs.announce("sqlite:install:fsync_dir")
                if self._durability != "off":
                    self._fs.fsync_dir(Path(self._path).parent)
            except OSError as exc:
                # flush() fsyncs the directory again before an archive is kept.
                _log.warning("fsync of database directory failed error=%r", exc)
            self._reopen("sqlite:install:reopen")

    def _reopen(self, step: str | None = None) -> None:
        try:
            if step is not None:
                self._fs.announce(step)
            self._open_writer()
        except BaseException as exc:
            # Applying to a state we cannot read would diverge: the instance is
            # done; opening the path again (a restart) continues from the file.
            self._closed = True
            self._running = False
            self._readers.closed = True  # inside parked(): readers see it when released
            _log.error("reopening after install failed path=%s error=%r", self._path, exc)
            raise SnapshotError(f"cannot reopen {self._path} after install: {exc}") from exc

    def flush(self) -> None:
        """Make every applied batch and installed snapshot durable, whatever
        ``durability`` says -- except ``"off"``, which never fsyncs.

        Fsyncs the database and its WAL directly rather than waiting on a
        FULL checkpoint, which a pinned snapshot read would block (with
        ``"full"`` every commit already fsynced the WAL), then the directory
        (an install's rename). The handler calls it before it publishes an
        archive of this state.
        """
        with self._write_lock:
            db = self._writer()
            if self._durability == "off":  # nothing is fsynced, as documented
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                return
            if self._durability != "full":
                for name in (self._path, self._path + "-wal"):
                    try:
                        fd = os.open(name, os.O_RDONLY)
                    except FileNotFoundError:
                        continue
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            self._fs.fsync_dir(Path(self._path).parent)
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def reset(self) -> None:
        with self._write_lock:
            db = self._writer()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM kv")
                db.execute("DELETE FROM terms")
                db.execute(
                    "UPDATE meta SET applied_index = 0, applied_term = 0,"
                    " snapshot_meta = NULL WHERE id = 0"
                )
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            self._term_starts = []
            self._snapshot_meta = None
            self._last_applied = LogId()
        with self._snap_lock:
            self._release_pinned()


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")


def _parse_meta(blob: bytes) -> storage_pb2.SnapshotMetadata:
    meta = storage_pb2.SnapshotMetadata()
    meta.ParseFromString(blob)
    return meta


def _unlink_quietly(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)
