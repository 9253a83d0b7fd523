"""A small custom StateMachine: commands are ``b"key=value"``, state is a dict.

Not durable (like MemoryStateMachine): after a restart it starts empty and
is rebuilt from a snapshot and the log. Shown in the documentation and run
by its doctests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from d_engine_sm import ApplyResult, StateMachine
from d_engine_sm.proto import common_pb2, storage_pb2

LogId = common_pb2.LogId


class DictMachine(StateMachine):
    snapshot_format = "example.dict-json"  # what generate_snapshot_data writes
    snapshot_format_version = 1

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._applied = LogId(index=0, term=0)
        self._meta: storage_pb2.SnapshotMetadata | None = None
        self._captured: dict[bytes, bytes] | None = None
        self._running = True
        # The handler serialises its own calls; this lock serialises the
        # application's (reset, update_last_applied) with them.
        self._write = threading.Lock()

    # -- lifecycle: called by the application only -------------------------
    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False

    def is_running(self) -> bool:
        return self._running

    # -- reads: any thread, concurrently with applies -----------------------
    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)  # one dict lookup: the old or the new value

    def entry_term(self, index: int) -> int | None:
        applied = self._applied
        return int(applied.term) if index == applied.index and index > 0 else None

    def __len__(self) -> int:
        return len(self._data)

    # -- write path: the handler holds its apply lock -----------------------
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        results = []
        with self._write:
            for entry in entries:
                command = entry.payload.command
                ok = entry.payload.WhichOneof("payload") == "command" and b"=" in command
                if ok:  # a malformed command is applied as a failure, on every replica
                    key, _, value = command.partition(b"=")
                    self._data[key] = value
                results.append(ApplyResult(entry.index, ok))
            last = entries[-1]
            self._applied = LogId(index=last.index, term=last.term)
        return results

    def last_applied(self) -> LogId:
        return LogId(index=self._applied.index, term=self._applied.term)

    def update_last_applied(self, log_id: LogId) -> None:
        with self._write:
            self._applied = LogId(index=log_id.index, term=log_id.term)

    def persist_last_applied(self, log_id: LogId) -> None:
        self.update_last_applied(log_id)  # nothing here is durable

    # -- snapshots ----------------------------------------------------------
    def snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None:
        return self._meta

    def update_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        copy = storage_pb2.SnapshotMetadata()
        copy.CopyFrom(meta)  # the message belongs to the caller
        self._meta = copy

    def persist_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        self.update_last_snapshot_metadata(meta)

    def prepare_snapshot(self) -> None:
        # Applies are paused: a shallow copy is the state at last_included.
        # Overriding this lets generate_snapshot_data run while applies go on.
        self._captured = dict(self._data)

    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        captured, self._captured = self._captured, None
        data = captured if captured is not None else dict(self._data)
        pairs = {key.hex(): value.hex() for key, value in data.items()}
        (dir / "state.json").write_text(json.dumps(pairs))

    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        # Parse first: if the file is bad, raise before touching the state.
        pairs = json.loads((dir / "state.json").read_text())
        data = {bytes.fromhex(key): bytes.fromhex(value) for key, value in pairs.items()}
        with self._write:
            self._data = data
            lid = meta.last_included
            self._applied = LogId(index=lid.index, term=lid.term)
            self.update_last_snapshot_metadata(meta)

    def flush(self) -> None:
        pass  # nothing to make durable

    def reset(self) -> None:
        with self._write:
            self._data = {}
            self._applied = LogId(index=0, term=0)
            self._meta = None
