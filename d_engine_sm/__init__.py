"""d_engine_sm: the state-machine side of a Raft node (d-engine 0.2.3 compatible)."""

import logging as _logging

from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._metrics import METRICS, MetricSpec
from d_engine_sm._policy import CompositePolicy, LogSizePolicy, SnapshotPolicy, TimeBasedPolicy
from d_engine_sm._sqlite import SqliteStateMachine
from d_engine_sm._state_machine import StateMachine
from d_engine_sm._values import ApplyResult, NewCommitData, SnapshotContext
from d_engine_sm._watch import Watcher
from d_engine_sm._worker import (
    ApplyCompleted,
    ApplyWorker,
    FatalError,
    SnapshotCreated,
    SnapshotFailed,
    SnapshotSkipped,
    WorkerEvent,
)
from d_engine_sm.errors import (
    ApplyError,
    ApplyOrderError,
    ApplyTimeout,
    ChunkOutOfRange,
    CorruptSnapshotError,
    DEngineError,
    HandlerClosed,
    InsufficientSpace,
    ReadOnlySnapshotDir,
    SnapshotError,
    SnapshotFormatMismatch,
    SnapshotInProgress,
    SnapshotMetadataError,
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
    SubmitTimeout,
    UnsafeArchiveError,
    WorkerStopped,
)

__version__ = "0.2.0.dev0"  # the one version source: setup.cfg reads it

# A library logs, the application decides where it goes: without a handler of
# its own, Python's last-resort handler would print warnings to stderr.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [  # noqa: RUF022 - plain sorted() order, as the tests check
    "ApplyCompleted",
    "ApplyError",
    "ApplyOrderError",
    "ApplyResult",
    "ApplyTimeout",
    "ApplyWorker",
    "ChunkOutOfRange",
    "CompositePolicy",
    "CorruptSnapshotError",
    "DEngineError",
    "FatalError",
    "HandlerClosed",
    "InsufficientSpace",
    "LogSizePolicy",
    "METRICS",
    "MemoryStateMachine",
    "MetricSpec",
    "NewCommitData",
    "ReadOnlySnapshotDir",
    "SnapshotConfig",
    "SnapshotContext",
    "SnapshotCreated",
    "SnapshotError",
    "SnapshotFailed",
    "SnapshotFormatMismatch",
    "SnapshotInProgress",
    "SnapshotMetadataError",
    "SnapshotNotFound",
    "SnapshotPolicy",
    "SnapshotSkipped",
    "SnapshotTransferError",
    "SqliteStateMachine",
    "StaleSnapshotError",
    "StateMachine",
    "StateMachineHandler",
    "SubmitTimeout",
    "TimeBasedPolicy",
    "UnsafeArchiveError",
    "Watcher",
    "WorkerEvent",
    "WorkerStopped",
]
