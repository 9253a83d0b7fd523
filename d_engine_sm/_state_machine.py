"""StateMachine: the interface a user implements (d-engine's trait, synchronous)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from d_engine_sm._values import ApplyResult, LogId
from d_engine_sm.proto import common_pb2, storage_pb2


class StateMachine(abc.ABC):
    """The user's replicated state.

    Threading contract the handler relies on:

    * ``apply_chunk``, ``reset``, ``apply_snapshot_from_file`` and
      ``prepare_snapshot`` are never called concurrently with each other
      (the handler serialises the write path).
    * ``get`` / ``entry_term`` / ``__len__`` may be called from any thread while
      an apply runs, and must return either the old or the new value.
    * ``generate_snapshot_data`` runs with applies *paused* unless the class
      overrides :meth:`prepare_snapshot`, in which case it runs concurrently
      with applies and must write exactly the state captured by
      ``prepare_snapshot``.
    """

    snapshot_format: ClassVar[str | None] = None
    """Name of the data ``generate_snapshot_data`` writes and
    ``apply_snapshot_from_file`` reads, recorded in each archive's manifest.
    A receiver whose state machine declares another name refuses the
    snapshot at its first chunk. None (the default): undeclared, not checked."""

    snapshot_format_version: ClassVar[int] = 1
    """Version of ``snapshot_format``; a receiver refuses a newer one than its own."""

    # -- lifecycle -------------------------------------------------------
    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def is_running(self) -> bool: ...

    # -- reads -----------------------------------------------------------
    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The live value of ``key`` (expired TTL keys read as absent)."""

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """``[get(k) for k in keys]``; override when a batch lookup is cheaper."""
        get = self.get
        return [get(key) for key in keys]

    @abc.abstractmethod
    def entry_term(self, index: int) -> int | None:
        """Term of the applied entry at ``index`` if still known, else None."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    # -- write path ------------------------------------------------------
    @abc.abstractmethod
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        """Apply entries in order; one result per entry, same order.

        Must also advance :meth:`last_applied` to the last entry's LogId.
        """

    @abc.abstractmethod
    def last_applied(self) -> LogId: ...

    @abc.abstractmethod
    def update_last_applied(self, log_id: LogId) -> None: ...

    @abc.abstractmethod
    def persist_last_applied(self, log_id: LogId) -> None: ...

    # -- snapshots -------------------------------------------------------
    @abc.abstractmethod
    def snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None: ...

    @abc.abstractmethod
    def update_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None: ...

    @abc.abstractmethod
    def persist_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None: ...

    def prepare_snapshot(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Capture a point-in-time view for the next ``generate_snapshot_data``.

        Called with applies paused, so it must be fast (a copy-on-write
        reference, a read transaction, a dict copy). Overriding it lets the
        handler resume applies while ``generate_snapshot_data`` writes.
        """

    @abc.abstractmethod
    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        """Write the state as of ``last_included`` into the (existing, empty) ``dir``."""

    @abc.abstractmethod
    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        """Replace the whole state with the snapshot unpacked in ``dir``.

        Afterwards ``last_applied()`` is ``meta.last_included``. ``dir`` is
        scratch space the handler removes afterwards: files may be moved out
        of it. On an error the state must be unchanged.
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every applied batch and installed snapshot durable before returning.

        The handler calls it after a snapshot's data is written and before
        the archive is renamed into place (create), and after
        ``apply_snapshot_from_file`` before the received archive is kept
        (install): an archive must never be ahead of the state after a power
        loss. Runs on the snapshot's thread, possibly while ``apply_chunk``
        and ``get`` run on others. A state machine that keeps nothing across
        restarts may do nothing (the handler then reports the state as behind
        its newest archive at start-up).
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """Drop all state: empty, last_applied (0, 0), no snapshot metadata."""

    def lease_background_cleanup(self) -> list[bytes]:
        """Remove expired keys; return them. Default: nothing to clean."""
        return []


def overrides_prepare(sm: StateMachine) -> bool:
    """True when ``sm`` supplies its own point-in-time capture."""
    return type(sm).prepare_snapshot is not StateMachine.prepare_snapshot


def declared_format(sm: StateMachine) -> tuple[str, int] | None:
    """``(snapshot_format, snapshot_format_version)``, or None when undeclared."""
    name = getattr(sm, "snapshot_format", None)
    version = getattr(sm, "snapshot_format_version", 1)
    if not isinstance(name, str) or isinstance(version, bool) or not isinstance(version, int):
        return None
    return name, version
