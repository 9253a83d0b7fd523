"""StateMachine: the interface a user implements (d-engine's trait, synchronous)."""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from d_engine_sm._values import ApplyResult, LogId
from d_engine_sm.proto import common_pb2, storage_pb2


class StateMachine(abc.ABC):
    """The user's replicated state: subclass it and hand an instance to
    :class:`~d_engine_sm.StateMachineHandler`.

    Who calls what. The handler calls only the write path and the reads:
    ``last_applied`` (once, when the handler is built), ``apply_chunk``,
    ``get``/``get_many``, ``__len__`` (for a snapshot's manifest),
    ``prepare_snapshot``, ``generate_snapshot_data``, ``prepare_install``,
    ``apply_snapshot_from_file``, ``flush`` (before it publishes an archive)
    and ``update_last_snapshot_metadata`` then
    ``persist_last_snapshot_metadata``. Every other method (``start``,
    ``stop``, ``is_running``, ``entry_term``, ``update_last_applied``,
    ``persist_last_applied``, ``snapshot_metadata``, ``reset``,
    ``lease_background_cleanup``) belongs to the application that embeds the
    handler and to the conformance suite in :mod:`d_engine_sm.testing`; the
    handler never calls them.

    Snapshot format. Set :attr:`snapshot_format` (and bump
    :attr:`snapshot_format_version` when the files change) so that a node
    refuses, at the first chunk, a snapshot its state machine cannot read.

    Threads. The handler calls each method on the thread of the public call
    that needs it (with :class:`~d_engine_sm.ApplyWorker`: applies on the
    ``d-engine-sm-apply-<node_id>`` thread, policy snapshots on a
    ``d-engine-sm-snapshot-<node_id>`` pool thread; a snapshot install on the
    thread that called ``apply_snapshot_stream_from_leader``, such as a gRPC
    server thread). What the handler guarantees:

    * ``apply_chunk``, ``prepare_snapshot``, ``apply_snapshot_from_file`` and
      (unless ``prepare_snapshot`` is overridden) ``generate_snapshot_data``
      are never called concurrently with each other: the handler holds one
      lock around the state machine's write path.
    * ``get`` and ``get_many`` may be called from any thread at any time,
      including while any of the above runs, and must return either the old
      or the new value, never a torn one.
    * ``generate_snapshot_data`` runs with applies *paused* unless the class
      overrides :meth:`prepare_snapshot`; then only ``prepare_snapshot`` runs
      paused and ``generate_snapshot_data`` runs concurrently with
      ``apply_chunk``, and must write exactly the state that
      ``prepare_snapshot`` captured.
    * ``update_last_snapshot_metadata``/``persist_last_snapshot_metadata``
      run after a snapshot is published, with applies *not* paused: they may
      run concurrently with ``apply_chunk`` and reads.
    * ``prepare_install`` runs with applies *not* paused, just before the
      paused ``apply_snapshot_from_file`` of the same install: concurrently
      with ``apply_chunk`` and reads, so it must not touch the live state.
    * The handler never runs two snapshot creates or installs at once.

    Methods the application calls (``reset``, ``update_last_applied``,
    ``lease_background_cleanup``, ...) get no such serialisation from the
    handler: the application calls them when nothing is applying, or the
    state machine serialises them itself (the built-ins take their own write
    lock).

    Durability. A *durable* state machine keeps its data and its
    ``last_applied`` together: whenever the process dies, what a reopen finds
    is exactly the state after the entry it reports as ``last_applied()``
    (never data ahead of or behind its index), and an ``apply_chunk`` that
    returned is not lost. The Raft engine then replays the log from
    ``last_applied() + 1``. A non-durable state machine (such as
    :class:`~d_engine_sm.MemoryStateMachine`) starts empty after a restart
    and is rebuilt from a snapshot and the log.
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
    def start(self) -> None:
        """Make the state machine ready to serve; ``is_running()`` is then True.

        Called by the application (the handler neither starts nor stops the
        state machine it is given). A freshly constructed instance already
        counts as running; ``start`` after ``stop`` resumes it. Idempotent.
        Blocking; not called concurrently with applies by the handler.
        """

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving; ``is_running()`` is then False.

        Called by the application at shutdown. A durable state machine makes
        everything applied so far durable before returning (as :meth:`flush`)
        and stays reusable: ``start`` may follow. Blocking; the application
        calls it only after applies have stopped (for example after
        ``ApplyWorker.shutdown``).
        """

    @abc.abstractmethod
    def is_running(self) -> bool:
        """Whether the state machine is started.

        Returns:
            True between ``start`` (or construction) and ``stop``.

        Non-blocking; may be called from any thread.
        """

    # -- reads -----------------------------------------------------------
    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The live value of ``key`` (expired TTL keys read as absent).

        Called through :meth:`get_many` by
        ``StateMachineHandler.read_from_state_machine``, on the reader's
        thread, with no handler lock held: it runs concurrently with
        ``apply_chunk``, snapshot generation and snapshot install, and must
        return either the value before or the value after a concurrent
        change. A change whose ``apply_chunk`` returned must be visible
        (``wait_applied`` wakes readers only after the apply returns).

        Args:
            key: the key to read.

        Returns:
            The value, or None when the key is absent or expired.
        """

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """``[get(k) for k in keys]``; override when a batch lookup is cheaper.

        Same threading contract as :meth:`get`: called on the reader's
        thread, concurrently with applies.

        Args:
            keys: the keys to read, in request order (may repeat).

        Returns:
            One value or None per key, in the same order.
        """
        get = self.get
        return [get(key) for key in keys]

    @abc.abstractmethod
    def entry_term(self, index: int) -> int | None:
        """Term of the applied entry at ``index`` if still known, else None.

        Called by the application (the handler labels snapshots with the
        exact applied LogId and does not need it). May be called from any
        thread while an apply runs. Never raises for an unknown index.

        Args:
            index: a log index.

        Returns:
            The term of the entry applied at ``index``, or None when the
            index was not applied or is no longer remembered.
        """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of keys held (a diagnostic: may count expired TTL keys).

        Called by ``create_snapshot`` with applies paused, just before
        ``prepare_snapshot``, to record the key count in the archive's
        manifest (if it raises, the manifest says "unknown"), so it must be
        fast; and by the application and the conformance suite, from any
        thread, possibly while an apply runs.
        """

    # -- write path ------------------------------------------------------
    @abc.abstractmethod
    def apply_chunk(self, entries: Sequence[common_pb2.Entry]) -> list[ApplyResult]:
        """Apply entries in order; one result per entry, same order.

        Called by ``StateMachineHandler.apply_chunk`` with the handler's
        write-path lock held: never concurrently with another
        ``apply_chunk``, ``prepare_snapshot`` or ``apply_snapshot_from_file``,
        but reads (``get``) and, when ``prepare_snapshot`` is overridden,
        ``generate_snapshot_data`` may run at the same time. The entries are
        non-empty, contiguous and start at ``last_applied().index + 1`` (the
        handler checks before calling).

        A command that does not decode, a noop and a membership change still
        count as applied (a failed command gets ``succeeded=False``): every
        replica must reach the same outcome from the same entries.

        On return ``last_applied()`` is the last entry's LogId. A durable
        state machine has made the entries *and* that ``last_applied``
        durable together (one transaction) before returning.

        Args:
            entries: the committed entries to apply.

        Returns:
            One :class:`~d_engine_sm.ApplyResult` per entry, in order.

        Raises:
            Exception: any error means the batch did not happen: the state
                and ``last_applied`` must be as before the call. The handler
                raises it as ``ApplyError`` (cause chained) and does not move
                its applied index.
        """

    @abc.abstractmethod
    def last_applied(self) -> LogId:
        """The LogId of the last applied entry; ``LogId(index=0, term=0)`` when none.

        The handler reads it once, when it is constructed, and keeps its own
        copy afterwards (advanced by ``apply_chunk`` and installs). Also
        called by the application, from any thread. Return a fresh LogId (or
        one never mutated): the caller may keep it.
        """

    @abc.abstractmethod
    def update_last_applied(self, log_id: LogId) -> None:
        """Set the applied LogId in memory, without forcing it to disk.

        The cheap half of the pair: called by the application (never by the
        handler: ``apply_chunk`` and ``apply_snapshot_from_file`` advance
        ``last_applied`` themselves) when it moves the applied point outside
        an apply, for example after restoring state from elsewhere. May be
        called often. Afterwards ``last_applied()`` returns ``log_id``. A
        state machine may persist at once (the SQLite one does, it is rare).
        The application calls it when no apply runs.

        Args:
            log_id: the new applied LogId.
        """

    @abc.abstractmethod
    def persist_last_applied(self, log_id: LogId) -> None:
        """Set the applied LogId and make it durable before returning.

        The durable half of the pair: as :meth:`update_last_applied`, and a
        reopen after return reports ``log_id``. Called by the application
        (never by the handler), typically at a checkpoint or shutdown; it
        must not record an index ahead of the data that is durable. The
        application calls it when no apply runs. Blocking.

        Args:
            log_id: the applied LogId to record.
        """

    # -- snapshots -------------------------------------------------------
    @abc.abstractmethod
    def snapshot_metadata(self) -> storage_pb2.SnapshotMetadata | None:
        """The metadata last recorded by ``update_last_snapshot_metadata``,
        ``persist_last_snapshot_metadata`` or ``apply_snapshot_from_file``.

        None when none was recorded (and after ``reset``). Called by the
        application; the handler itself trusts the snapshots directory
        (``StateMachineHandler.get_latest_snapshot_metadata``). A durable
        state machine returns the persisted value after a reopen.
        """

    @abc.abstractmethod
    def update_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        """Record, in memory, the metadata of the newest snapshot.

        Called by the handler right after a snapshot was published (create)
        or a received one installed and kept, immediately followed by
        :meth:`persist_last_snapshot_metadata` with the same value. Runs on
        the thread doing the create or install, with applies *not* paused
        (``apply_chunk`` and reads may run concurrently). A failure is logged
        and ignored: the archive on disk is what counts. Keep a copy: the
        message belongs to the caller.

        Args:
            meta: the snapshot's LogId and SHA-256 checksum.
        """

    @abc.abstractmethod
    def persist_last_snapshot_metadata(self, meta: storage_pb2.SnapshotMetadata) -> None:
        """Record the metadata of the newest snapshot and make it durable.

        The durable half of :meth:`update_last_snapshot_metadata`, called
        by the handler right after it, on the same thread and with the same
        concurrency. A durable state machine returns ``meta`` from
        ``snapshot_metadata()`` after a reopen. Blocking.

        Args:
            meta: the snapshot's LogId and SHA-256 checksum.
        """

    def prepare_snapshot(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Capture a point-in-time view for the next ``generate_snapshot_data``.

        Called by ``create_snapshot`` with applies paused (the write-path lock
        held; reads may still run), on the creating thread, so it must be fast
        (a copy-on-write reference, a read transaction, a dict copy).
        Overriding it lets the handler resume applies while
        ``generate_snapshot_data`` writes that captured view. The default does
        nothing, and then ``generate_snapshot_data`` runs with applies paused.

        Raises:
            Exception: the create fails with ``SnapshotError`` (cause
                chained) and nothing is published.
        """

    @abc.abstractmethod
    def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
        """Write the state as of ``last_included`` into the (existing, empty) ``dir``.

        Called by ``create_snapshot`` on the creating thread (a snapshot pool
        thread under ``ApplyWorker``), with applies paused unless
        :meth:`prepare_snapshot` is overridden (then concurrently with
        ``apply_chunk``, writing the view ``prepare_snapshot`` captured).
        ``last_included`` is the exact LogId the data must reflect.

        Write regular files and directories only (links and devices are
        refused when the archive is unpacked). No fsync is needed: the handler
        packs ``dir`` into an archive, fsyncs and publishes it, then removes
        ``dir``. The same files are handed to :meth:`apply_snapshot_from_file`
        on the node that installs the snapshot.

        Args:
            dir: an empty directory inside the snapshots directory.
            last_included: the applied LogId the snapshot is labelled with.

        Raises:
            Exception: the create fails with ``SnapshotError`` (cause
                chained) and nothing is published.
        """

    def prepare_install(  # noqa: B027 - optional hook, default no-op
        self, meta: storage_pb2.SnapshotMetadata, dir: Path
    ) -> None:
        """Validate and prepare a received snapshot while applies keep running.

        Called by the handler once a received archive is verified and
        unpacked into ``dir``, on the receiving thread, *before* applies are
        paused for :meth:`apply_snapshot_from_file`: it runs concurrently with
        ``apply_chunk`` and reads, so it must not touch the live state. Put
        the slow, state-independent part of an install here (checking the
        files, building a structure to swap in); the paused part then only
        swaps. ``apply_snapshot_from_file(meta, dir)`` normally follows with
        the same arguments, but may not: the snapshot can turn out stale, or
        the handler close, in between. Whatever this keeps must therefore live
        in ``dir`` (removed by the handler afterwards) or be small. The
        default does nothing.

        Args:
            meta: the snapshot's metadata (LogId, SHA-256 of the archive).
            dir: the unpacked files ``generate_snapshot_data`` wrote.

        Raises:
            Exception: the install fails with ``SnapshotError`` (cause
                chained) before anything changed.
        """

    @abc.abstractmethod
    def apply_snapshot_from_file(self, meta: storage_pb2.SnapshotMetadata, dir: Path) -> None:
        """Replace the whole state with the snapshot unpacked in ``dir``.

        Called by ``apply_snapshot_stream_from_leader`` after the transfer
        was verified and unpacked and :meth:`prepare_install` returned, on
        the receiving thread, with applies paused (never concurrently with
        ``apply_chunk`` or a snapshot create); reads may run concurrently and
        must see the old or the new state. ``meta.last_included`` is newer
        than the applied index. The handler calls :meth:`flush` right after,
        before it keeps the received archive.

        Afterwards ``last_applied()`` is ``meta.last_included`` and
        ``snapshot_metadata()`` is ``meta``. A durable state machine has the
        new state durable when the following :meth:`flush` returns at the
        latest, and a crash midway leaves the old or the new state, never a
        mix. ``dir`` is scratch space the handler removes after the call:
        the state machine may move files out of it but must not keep using
        it.

        Args:
            meta: the snapshot's metadata (LogId, SHA-256 of the archive).
            dir: the unpacked files ``generate_snapshot_data`` wrote.

        Raises:
            Exception: the install fails with ``SnapshotError`` (cause
                chained); the state and ``last_applied`` must be as before.
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
        its newest archive at start-up). The application may call it too
        (``stop`` implies it). Blocking.
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """Drop all state: empty, last_applied (0, 0), no snapshot metadata.

        Called by the application (never by the handler), when no apply
        runs. ``is_running()`` is unchanged, and applies may then restart at
        index 1. A durable state machine makes the reset durable before
        returning, so a reopen does not bring the old state back.
        """

    def lease_background_cleanup(self) -> list[bytes]:
        """Remove expired keys; return them. Default: nothing to clean.

        Called by the application on its own schedule (never by the
        handler). Expired keys already read as absent, so removing them
        changes nothing a reader or replica can observe. May be called while
        reads and applies run: the state machine serialises it with
        ``apply_chunk`` itself (the built-ins take their write lock).

        Returns:
            The keys removed.
        """
        return []


def overrides_prepare(sm: StateMachine) -> bool:
    """True when ``sm`` supplies its own point-in-time capture."""
    return type(sm).prepare_snapshot is not StateMachine.prepare_snapshot


def install_key(meta: storage_pb2.SnapshotMetadata, dir: Path) -> bytes:
    """What a ``prepare_install`` result belongs to: the directory and the exact metadata."""
    return os.fsencode(os.path.abspath(dir)) + b"\0" + meta.SerializeToString(deterministic=True)


def declared_format(sm: StateMachine) -> tuple[str, int] | None:
    """``(snapshot_format, snapshot_format_version)``, or None when undeclared."""
    name = getattr(sm, "snapshot_format", None)
    version = getattr(sm, "snapshot_format_version", 1)
    if not isinstance(name, str) or isinstance(version, bool) or not isinstance(version, int):
        return None
    return name, version
