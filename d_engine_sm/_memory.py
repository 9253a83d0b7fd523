"""MemoryStateMachine: the in-memory key/value state machine."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Final

from d_engine_sm import _kv, _kvfile
from d_engine_sm._state_machine import StateMachine, install_key
from d_engine_sm._values import ApplyResult, LogId
from d_engine_sm.proto import common_pb2, storage_pb2

DATA_FILE: Final = "kv.bin"


class _DictOps(_kv.KvOps):
    __slots__ = ("data", "expiry")

    def __init__(self, data: dict[bytes, bytes], expiry: dict[bytes, float]) -> None:
        self.data = data
        self.expiry = expiry

    def put(self, key: bytes, value: bytes, expires_at: float | None) -> None:
        self.data[key] = value
        if expires_at is not None:
            self.expiry[key] = expires_at
        elif self.expiry:
            self.expiry.pop(key, None)

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)
        if self.expiry:
            self.expiry.pop(key, None)

    def plain_setter(self) -> Callable[[bytes, bytes], None] | None:
        # With no TTL keys a plain put is dict.__setitem__ itself: no Python frame.
        return None if self.expiry else self.data.__setitem__

    def get_live(self, key: bytes, now: float) -> bytes | None:
        value = self.data.get(key)
        if value is not None and self.expiry:
            at = self.expiry.get(key)
            if at is not None and at <= now:
                return None
        return value


class MemoryStateMachine(StateMachine):
    """A key/value state machine held in a dict; nothing survives the process.

    Executes ``WriteCommand`` payloads (Insert with optional TTL, Delete,
    CompareAndSwap). Reads are lock-free and safe during applies. Its
    ``prepare_snapshot`` copies the dicts (tens of milliseconds for a million
    keys), so snapshots are written while applies continue.

    Thread safety: every method may be called from any thread; writes
    (``apply_chunk``, install, ``reset``, ``lease_background_cleanup``) take
    one internal lock. ``stop()`` only clears the running flag.

    Args:
        clock: wall-clock seconds used to stamp and check TTL expiry.
    """

    snapshot_format: ClassVar[str | None] = "d_engine_sm.memory"  # kv.bin, see _kvfile
    snapshot_format_version = 1

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._ops = _DictOps({}, {})
        self._write_lock = threading.Lock()  # apply / reset / install / cleanup
        self._last_applied = LogId()
        self._term_starts: list[tuple[int, int]] = []  # (first index, term), ascending
        self._snapshot_meta: storage_pb2.SnapshotMetadata | None = None
        self._captured: tuple[dict[bytes, bytes], dict[bytes, float]] | None = None
        # A received snapshot parsed by prepare_install: (index, key, data, expiry).
        self._prepared: tuple[int, bytes, dict[bytes, bytes], dict[bytes, float]] | None = None
        self._running = True

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False

    def is_running(self) -> bool:
        return self._running

    # -- reads -----------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        return self._ops.get_live(key, self._clock())

    def __len__(self) -> int:
        return len(self._ops.data)

    def items(self) -> dict[bytes, bytes]:
        """A copy of the live key/value pairs (expired keys left out)."""
        now = self._clock()
        ops = self._ops
        return {k: v for k, v in list(ops.data.items()) if ops.get_live(k, now) is not None}

    def entry_term(self, index: int) -> int | None:
        return _kv.term_at(index, self._term_starts, self._last_applied, self._snapshot_meta)

    # -- write path ------------------------------------------------------
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        if not entries:
            return []
        with self._write_lock:
            results = _kv.apply_entries(entries, self._ops, self._clock())
            starts = _kv.next_term_starts(self._term_starts, entries)
            if starts is not None:
                self._term_starts = starts
            last = entries[-1]
            self._last_applied = LogId(term=last.term, index=last.index)
            prepared = self._prepared
            if prepared is not None and last.index >= prepared[0]:
                self._prepared = None  # the log passed it: that install will not come
        return results

    def last_applied(self) -> LogId:
        return LogId(term=self._last_applied.term, index=self._last_applied.index)

    def update_last_applied(self, log_id: LogId) -> None:
        self._last_applied = LogId(term=log_id.term, index=log_id.index)

    def persist_last_applied(self, log_id: LogId) -> None:
        self.update_last_applied(log_id)

    def lease_background_cleanup(self) -> list[bytes]:
        with self._write_lock:
            now = self._clock()
            ops = self._ops
            expired = [k for k, at in ops.expiry.items() if at <= now]
            for key in expired:
                ops.delete(key)
        return expired

    # -- snapshots -------------------------------------------------------
    def snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None:
        return self._snapshot_meta

    def update_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        copy = storage_pb2.SnapshotMetadata()
        copy.CopyFrom(meta)
        self._snapshot_meta = copy

    def persist_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        self.update_last_snapshot_metadata(meta)

    def prepare_snapshot(self) -> None:
        # Applies are paused by the handler: a shallow copy is a consistent
        # point-in-time view (bytes are immutable, so values are shared).
        self._captured = (dict(self._ops.data), dict(self._ops.expiry))

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        captured = self._captured
        self._captured = None
        data, expiry = captured if captured is not None else (self._ops.data, self._ops.expiry)
        with open(dir / DATA_FILE, "wb") as out:
            _kvfile.write(out, data, expiry)

    def prepare_install(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        """Parse the received ``kv.bin`` while applies go on; the install then swaps it in.

        At most one parsed state is kept: the next prepare, the install, a
        ``reset`` or an apply that passes the snapshot's index drops it.
        """
        self._prepared = None  # never two parsed states at once
        data, expiry = _read_data(dir)
        self._prepared = (meta.last_included.index, install_key(meta, dir), data, expiry)

    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[1] == install_key(meta, dir):
            data, expiry = prepared[2], prepared[3]
        else:
            del prepared  # freed before another parse
            data, expiry = _read_data(dir)
        with self._write_lock:
            self._ops = _DictOps(data, expiry)
            lid = meta.last_included
            self._last_applied = LogId(term=lid.term, index=lid.index)
            self._term_starts = []
            self.update_last_snapshot_metadata(meta)

    def flush(self) -> None:
        pass

    def reset(self) -> None:
        with self._write_lock:
            self._ops = _DictOps({}, {})
            self._last_applied = LogId()
            self._term_starts = []
            self._snapshot_meta = None
            self._captured = None
            self._prepared = None


def _read_data(dir: Path) -> tuple[dict[bytes, bytes], dict[bytes, float]]:
    with open(dir / DATA_FILE, "rb") as f:
        # Parse straight from the page cache: no copy of the whole file.
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"empty key/value snapshot file {dir / DATA_FILE}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _kvfile.read(mapped)
