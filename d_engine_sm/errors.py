"""Every error a caller can act on, under one base, :class:`DEngineError`.

Errors that mean the same as a builtin also subclass it (``ApplyTimeout`` is a
``TimeoutError``), so callers can catch what they already catch. Facts are
attributes; every error pickles (facts included) so it can cross a process
boundary.
"""

from __future__ import annotations

from typing import Any, ClassVar


def _rebuild(cls: type[DEngineError], message: str, state: dict[str, Any]) -> DEngineError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class DEngineError(Exception):
    """Base of every error raised by d_engine_sm.

    Catch it to handle any library error; every subclass pickles with its
    attributes, so it can cross a process boundary.

    ``grpc_status`` names the gRPC status code (a ``grpc.StatusCode`` member
    name, kept a plain string so this module needs no grpc) that a transport
    answers with when the error ends a call; subclasses override it.
    """

    grpc_status: ClassVar[str] = "INTERNAL"

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take facts in __init__; rebuild from message + attributes
        # instead of replaying __init__ so each class needs no __reduce__.
        message = str(self.args[0]) if self.args else ""
        return (_rebuild, (type(self), message, dict(self.__dict__)))


class HandlerClosed(DEngineError):
    """The handler was closed (before or during the call).

    ``wait_applied`` raises it in every waiter when ``close()`` runs.
    """

    grpc_status: ClassVar[str] = "UNAVAILABLE"


class ApplyTimeout(DEngineError, TimeoutError):
    """``wait_applied`` gave up before ``target`` was applied (also a ``TimeoutError``).

    Attributes:
        target: the index waited for.
        current: the applied index when the wait gave up.
        timeout: the timeout in seconds.
    """

    def __init__(self, target: int, current: int, timeout: float | None) -> None:
        super().__init__(
            f"timeout waiting for state machine to apply index {target} "
            f"(timeout: {timeout}s, current_applied: {current})"
        )
        self.target = target
        self.current = current
        self.timeout = timeout


class ApplyOrderError(DEngineError, ValueError):
    """Entries were not contiguous from ``last_applied() + 1``; nothing was applied.

    Also a ``ValueError``.

    Attributes:
        expected: the index that should have come next.
        got: the index that came instead.
    """

    def __init__(self, expected: int, got: int, detail: str = "") -> None:
        msg = f"entries out of order: expected index {expected}, got {got}"
        super().__init__(f"{msg} ({detail})" if detail else msg)
        self.expected = expected
        self.got = got


class ApplyError(DEngineError):
    """The state machine failed to apply a batch; ``last_applied`` did not move.

    The state machine's own exception is chained as ``__cause__``. Raised
    too when it returned a wrong number of results.

    Attributes:
        first: the batch's first index.
        last: the batch's last index.
        reason: what went wrong (includes the cause's message).
    """

    def __init__(self, first: int, last: int, reason: str) -> None:
        super().__init__(f"state machine failed to apply entries {first}..{last}: {reason}")
        self.first = first
        self.last = last
        self.reason = reason


class WorkerStopped(DEngineError):
    """The ApplyWorker is shut down or stopped after a fatal error.

    Final: a worker that stopped never accepts work again.
    """


class SubmitTimeout(DEngineError, TimeoutError):
    """``ApplyWorker.submit`` waited ``timeout`` seconds for queue space.

    Also a ``TimeoutError``; nothing was queued.

    Attributes:
        timeout: the timeout in seconds.
        queued: entries queued when it gave up.
    """

    def __init__(self, timeout: float, queued: int) -> None:
        super().__init__(f"apply queue still full after {timeout}s ({queued} entries queued)")
        self.timeout = timeout
        self.queued = queued


class SnapshotError(DEngineError):
    """A snapshot operation failed; previous snapshots and state are intact."""


class InsufficientSpace(SnapshotError):
    """Not enough free disk space to write a snapshot (checked before, or ENOSPC midway).

    Temporary files were removed; nothing else changed.

    Attributes:
        path: the snapshots directory.
        needed: bytes the operation expected to need.
        available: bytes free when it failed.
    """

    grpc_status: ClassVar[str] = "RESOURCE_EXHAUSTED"

    def __init__(self, path: str, needed: int, available: int) -> None:
        super().__init__(
            f"insufficient space in {path}: need {needed} bytes, {available} available"
        )
        self.path = path
        self.needed = needed
        self.available = available


class SnapshotInProgress(SnapshotError):
    """Another snapshot create/install holds the guard or the directory lock.

    Raised at once, never after waiting: retry later. The lock may be held
    by another process using the same snapshots directory.
    """

    grpc_status: ClassVar[str] = "ABORTED"


class SnapshotNotFound(SnapshotError):
    """No archive exists for the requested metadata.

    Attributes:
        path: the archive path that was looked for.
    """

    grpc_status: ClassVar[str] = "NOT_FOUND"

    def __init__(self, path: str, reason: str = "no such snapshot archive") -> None:
        super().__init__(f"{reason}: {path}")
        self.path = path


class CorruptSnapshotError(SnapshotError):
    """An archive failed its integrity check (gzip CRC, tar structure, SHA-256).

    Attributes:
        path: the archive.
        reason: which check failed.
    """

    grpc_status: ClassVar[str] = "INVALID_ARGUMENT"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"corrupt snapshot archive {path}: {reason}")
        self.path = path
        self.reason = reason


class ChunkOutOfRange(SnapshotError, IndexError):
    """``load_snapshot_chunk`` was asked for ``seq >= total_chunks`` (also an ``IndexError``).

    Attributes:
        seq: the chunk asked for.
        total: the archive's number of chunks.
    """

    grpc_status: ClassVar[str] = "OUT_OF_RANGE"

    def __init__(self, seq: int, total: int) -> None:
        super().__init__(f"chunk {seq} out of range: snapshot has {total} chunks")
        self.seq = seq
        self.total = total


class SnapshotTransferError(SnapshotError):
    """Receiving a snapshot stream failed; nothing was installed.

    ``status`` is the name of the final ack's status (``FAILED``,
    ``OUT_OF_ORDER``, ``CHECKSUM_MISMATCH``) and ``seq`` the chunk concerned.
    The follower's state and snapshots are exactly as before.

    Attributes:
        reason: what was wrong with the stream.
        seq: the chunk concerned.
        status: the name of the final ack's status.
    """

    grpc_status: ClassVar[str] = "INVALID_ARGUMENT"

    def __init__(self, reason: str, *, seq: int = 0, status: str = "FAILED") -> None:
        super().__init__(f"snapshot transfer failed at chunk {seq} ({status}): {reason}")
        self.reason = reason
        self.seq = seq
        self.status = status


class StaleSnapshotError(SnapshotTransferError):
    """The offered snapshot is not newer than what this node already applied.

    Nothing is installed; the node already has that state or a newer one.

    Attributes:
        snapshot_index: the offered snapshot's ``last_included.index``.
        last_applied: this node's applied index.
    """

    grpc_status: ClassVar[str] = "FAILED_PRECONDITION"

    def __init__(self, snapshot_index: int, last_applied: int) -> None:
        SnapshotError.__init__(
            self,
            f"stale snapshot: last_included index {snapshot_index} is not newer "
            f"than last_applied {last_applied}",
        )
        self.reason = "stale snapshot"
        self.seq = 0
        self.status = "FAILED"
        self.snapshot_index = snapshot_index
        self.last_applied = last_applied


class SnapshotMetadataError(SnapshotTransferError):
    """The offered snapshot's metadata is malformed (say, a checksum that is not SHA-256).

    ``field`` names the offending metadata field.
    """

    def __init__(self, field: str, reason: str) -> None:
        SnapshotTransferError.__init__(self, f"bad snapshot metadata.{field}: {reason}")
        self.field = field


class UnsafeArchiveError(SnapshotError):
    """An archive member would escape the target dir, is a link/device, or exceeds a limit.

    Nothing was unpacked outside the snapshots directory and nothing installed.

    Attributes:
        member: the member's name in the archive.
        reason: why it was refused.
    """

    grpc_status: ClassVar[str] = "INVALID_ARGUMENT"

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"unsafe archive member {member!r}: {reason}")
        self.member = member
        self.reason = reason


class ReadOnlySnapshotDir(SnapshotError):
    """A snapshot writer (create, install, cleanup) met a read-only snapshots directory.

    Reading, listing, verifying and sending still work on such a directory.

    Attributes:
        path: the snapshots directory.
        detail: what the operating system said (``EROFS``, ``EACCES``, ...).
    """

    def __init__(self, path: str, detail: str = "read-only") -> None:
        super().__init__(
            f"snapshots directory {path} is read-only ({detail}): "
            "create, install and cleanup need to write it"
        )
        self.path = path
        self.detail = detail


class SnapshotFormatMismatch(SnapshotTransferError):
    """The snapshot's manifest names a format this node's state machine cannot install.

    Raised as soon as the manifest arrives (the first chunk, normally), before
    anything is unpacked; ``expected`` and ``got`` name the two formats.
    The final ack is ``FAILED``; the node is unchanged.

    Attributes:
        expected: the format (and version) this node's state machine reads.
        got: the format the snapshot's manifest declares.
    """

    def __init__(self, expected: str, got: str, *, seq: int = 0) -> None:
        reason = (
            f"snapshot format {got} cannot be installed by this state machine, "
            f"which reads {expected}"
        )
        super().__init__(reason, seq=seq, status="FAILED")
        self.expected = expected
        self.got = got


__all__ = [
    "ApplyError",
    "ApplyOrderError",
    "ApplyTimeout",
    "ChunkOutOfRange",
    "CorruptSnapshotError",
    "DEngineError",
    "HandlerClosed",
    "InsufficientSpace",
    "ReadOnlySnapshotDir",
    "SnapshotError",
    "SnapshotFormatMismatch",
    "SnapshotInProgress",
    "SnapshotMetadataError",
    "SnapshotNotFound",
    "SnapshotTransferError",
    "StaleSnapshotError",
    "SubmitTimeout",
    "UnsafeArchiveError",
    "WorkerStopped",
]
