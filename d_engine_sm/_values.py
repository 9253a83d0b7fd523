"""Small immutable values passed between the handler, policies and callers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from d_engine_sm.proto import common_pb2

LogId = common_pb2.LogId
NodeRole = common_pb2.NodeRole


class ApplyResult(NamedTuple):
    """Outcome of applying one entry: its index and whether the command succeeded.

    A NamedTuple rather than a frozen dataclass: one is built per applied
    entry, and tuple construction keeps the apply hot path cheap.

    >>> ApplyResult.success(7)
    ApplyResult(index=7, succeeded=True)
    """

    index: int  # type: ignore[assignment]  # shadows tuple.index by design
    succeeded: bool

    @classmethod
    def success(cls, index: int) -> ApplyResult:
        """The entry at ``index`` was applied and its command succeeded."""
        return cls(index, True)

    @classmethod
    def failure(cls, index: int) -> ApplyResult:
        """The entry at ``index`` was applied but its command failed (CAS miss, bad bytes)."""
        return cls(index, False)


def _check_non_negative(owner: str, **fields: int) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class NewCommitData:
    """What the Raft core reports after advancing its commit index.

    Args:
        new_commit_index: the new commit index.
        role: this node's ``NodeRole`` (``common_pb2.NODE_ROLE_LEADER``, ...).
        current_term: this node's current term.

    Raises:
        ValueError: a field is negative.
        TypeError: a field is not an int.

    >>> from d_engine_sm.proto import common_pb2
    >>> NewCommitData(10, common_pb2.NODE_ROLE_LEADER, 2).new_commit_index
    10
    """

    new_commit_index: int
    role: int
    current_term: int

    def __post_init__(self) -> None:
        _check_non_negative(
            "NewCommitData",
            new_commit_index=self.new_commit_index,
            role=self.role,
            current_term=self.current_term,
        )


@dataclass(frozen=True)
class SnapshotContext:
    """Everything a :class:`~d_engine_sm.SnapshotPolicy` may look at to decide.

    Attributes:
        role: this node's ``NodeRole``.
        last_included: the newest snapshot's LogId (``LogId(0, 0)`` when none).
        last_applied: the handler's applied LogId.
        current_term: this node's current term.
    """

    role: int
    last_included: LogId
    last_applied: LogId
    current_term: int

    def is_leader(self) -> bool:
        """Whether ``role`` is ``NODE_ROLE_LEADER``."""
        return self.role == common_pb2.NODE_ROLE_LEADER


def log_id(index: int, term: int) -> LogId:
    """Build a LogId from ``(index, term)`` (the proto takes term first)."""
    return LogId(term=term, index=index)
