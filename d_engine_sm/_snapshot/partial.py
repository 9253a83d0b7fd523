"""The one interrupted transfer a snapshots directory keeps, to resume it.

Layout::

    <dir>/temp-resume-data    the archive bytes received so far (verified chunks only)
    <dir>/temp-resume-state   a small JSON sidecar: which snapshot, how it was cut, how much

A receive always assembles into ``temp-resume-data``. When it fails because
the sender or the connection went away (never because the data was wrong),
the driver fsyncs the data and then writes the sidecar (temp file, fsync,
rename, directory fsync). The sidecar is the commit point: data without a
sidecar is a receive in progress or one that crashed, and is removed; the
sidecar is removed before a resumed receive appends again, so a crash then
leaves nothing to trust either. A partial older than ``ttl`` seconds (wall
clock, it must survive restarts) or bigger than ``max_bytes`` is not kept.
Everything here runs under the store's writer lock (receive, start-up).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final

from d_engine_sm._snapshot.receiver import SHA256_LEN, Partial
from d_engine_sm._snapshot.store import SnapshotStore

_log = logging.getLogger("d_engine_sm.snapshot")

DATA_NAME: Final = "temp-resume-data"
STATE_NAME: Final = "temp-resume-state"
NAMES: Final = frozenset({DATA_NAME, STATE_NAME})
_READ_BLOCK: Final = 4 << 20
_MAX_STATE_BYTES: Final = 4096
_CLOCK_SKEW: Final = 60.0  # a sidecar "from the future" by more than this is stale


class PartialStore:
    """The partial transfer of one snapshots directory (see the module docstring).

    Args:
        store: the directory's store (its FileOps seam and fsync setting).
        ttl: seconds a partial stays resumable; 0 disables keeping one.
        max_bytes: a partial larger than this is not kept.
        clock: wall-clock seconds (``time.time``), replaceable in tests.
    """

    def __init__(
        self,
        store: SnapshotStore,
        *,
        ttl: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._clock = clock

    @property
    def data_path(self) -> Path:
        return self._store.directory / DATA_NAME

    @property
    def state_path(self) -> Path:
        return self._store.directory / STATE_NAME

    def load(self) -> Partial | None:
        """The kept partial if there is a valid, fresh one; anything else is removed."""
        partial = self._read_state()
        if partial is None:
            if self.data_path.exists() or self.state_path.exists():
                self.discard("no valid sidecar")
            return None
        return partial

    def _read_state(self) -> Partial | None:
        try:
            with open(self.state_path, "rb") as f:
                raw = f.read(_MAX_STATE_BYTES + 1)
            size = self.data_path.stat().st_size
        except FileNotFoundError:
            return None
        if len(raw) > _MAX_STATE_BYTES:
            return None
        try:
            doc = json.loads(raw)
            partial = _from_doc(doc)
            saved_at = float(doc["saved_at"])
        except (ValueError, KeyError, TypeError):
            return None
        age = self._clock() - saved_at
        if age > self._ttl or age < -_CLOCK_SKEW or size < _bytes(partial):
            return None
        return partial

    def discard(self, why: str) -> None:
        """Remove the partial (sidecar first: data alone is never trusted)."""
        there = [p for p in (self.state_path, self.data_path) if p.exists()]
        for path in there:
            self._store.remove_quietly(path)
        if there:
            _log.info("discarded partial transfer dir=%s reason=%s", self._store.directory, why)

    def discard_if_older(self, index: int) -> None:
        """A snapshot at ``index`` exists now: a partial of an older one is useless."""
        partial = self._read_state()
        if partial is not None and partial.index <= index:
            self.discard(f"snapshot {index} is newer")

    @contextlib.contextmanager
    def open_fresh(self) -> Iterator[BinaryIO]:
        """A new, empty data file (after removing any partial); closed on exit."""
        self.discard("a new transfer starts")
        f = self._store.fs.open_write(self.data_path)
        try:
            yield f
        finally:
            f.close()

    @contextlib.contextmanager
    def open_resumed(self, partial: Partial) -> Iterator[BinaryIO]:
        """The data file cut to the partial's verified bytes, positioned at its end."""
        # Survives a crash from here on: without the sidecar the data is not trusted.
        self._store.remove_quietly(self.state_path)
        f = open(self.data_path, "r+b")  # noqa: SIM115 - closed below
        try:
            f.truncate(_bytes(partial))
            f.seek(0, 2)
            yield f
        finally:
            f.close()

    def read_prefix(self, partial: Partial) -> Iterator[bytes]:
        """The partial's verified bytes, in blocks (to hash and unpack again)."""
        left = _bytes(partial)
        with open(self.data_path, "rb") as f:
            while left > 0:
                block = f.read(min(_READ_BLOCK, left))
                if not block:
                    raise OSError(f"partial transfer {self.data_path} is shorter than recorded")
                left -= len(block)
                yield block

    def keep(self, out: BinaryIO, partial: Partial) -> bool:
        """Make the received prefix resumable: fsync the data, then commit the sidecar.

        Returns:
            False (and the data removed) when keeping is disabled or too big.
        """
        size = _bytes(partial)
        out.flush()
        if (
            self._ttl <= 0
            or size > self._max_bytes
            or len(partial.checksum) != SHA256_LEN
            or out.tell() != size  # chunks of another size than the first: no clean cut
        ):
            self.discard("not resumable")
            return False
        fs, store = self._store.fs, self._store
        if store.fsync:
            fs.fsync(out)
        doc = _to_doc(partial) | {"saved_at": self._clock()}
        temp = store.new_temp_path("resume")
        try:
            with fs.open_write(temp) as f:
                f.write(json.dumps(doc).encode())
                if store.fsync:
                    fs.fsync(f)
            fs.replace(temp, self.state_path)
            if store.fsync:
                fs.fsync_dir(store.directory)
        except OSError:
            store.remove_quietly(temp)
            self.discard("sidecar could not be written")
            raise
        _log.info(
            "kept partial transfer index=%d term=%d chunks=%d/%d bytes=%d",
            partial.index,
            partial.term,
            partial.chunks,
            partial.total_chunks,
            size,
        )
        return True


def _bytes(partial: Partial) -> int:
    return partial.chunks * partial.chunk_size


def _to_doc(partial: Partial) -> dict[str, Any]:
    return {
        "index": partial.index,
        "term": partial.term,
        "checksum": partial.checksum.hex(),
        "total_chunks": partial.total_chunks,
        "chunk_size": partial.chunk_size,
        "chunks": partial.chunks,
    }


def _from_doc(doc: Any) -> Partial:
    if not isinstance(doc, dict):
        raise TypeError("sidecar is not an object")
    ints = {k: doc[k] for k in ("index", "term", "total_chunks", "chunk_size", "chunks")}
    for key, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"bad {key}")
    checksum = bytes.fromhex(doc["checksum"])
    if len(checksum) != SHA256_LEN or not 0 < ints["chunks"] < ints["total_chunks"]:
        raise ValueError("bad checksum or counts")
    if ints["chunk_size"] < 1:
        raise ValueError("bad chunk_size")
    return Partial(checksum=checksum, **ints)
