"""Sans-IO send state machine for a snapshot transfer to a follower.

Theory of operation
-------------------
The sender is the receiver's counterpart (``receiver.py``): it owns the
window of chunks in flight, resends and their limit, the ack deadline and
the overall deadline, and answers each event with a decision value. It never
opens a file, starts a thread or reads a clock (``now`` is passed in); a
transport drives it and does the I/O:

    decision = sender.start(now)
    while True:
        match decision:
            Probe / Send(seqs) / Resend(seqs): put those chunks on the wire
            Wait(until): nothing to send
            Finish / Abort(reason, status): stop
        event = next ack, or the wait expired, or the acks ended
        decision = sender.on_ack(ack, now) / .on_tick(now) / .on_end(now)

States::

    PROBING --answer (ACCEPTED/REQUESTED seq 0, next K)--> SENDING --all accepted--> DONE
    PROBING, SENDING --give-up / deadline / bad ack--> ABORTED

- PROBING: the first decision is ``Probe``: the transport sends what names
  the snapshot (chunk 0, or a data-less header where acks cannot be read
  mid-call) alone and waits for its answer, whose ``next_requested`` is the
  first chunk the receiver lacks: a resumed transfer starts there. Without
  ``probe`` the sender starts at chunk 0 with a full window.
- SENDING: go-back-N. At most ``window`` chunks past the lowest unaccepted
  one are in flight. ``ACCEPTED`` moves the window; ``CHECKSUM_MISMATCH`` /
  ``REQUESTED`` rewinds to ``next_requested`` (the receiver drops what was
  in flight behind it), at most ``max_retries`` times per chunk; ``FAILED``
  / ``OUT_OF_ORDER`` gives up. No ack within ``ack_timeout`` seconds, or a
  transfer longer than ``deadline`` seconds, aborts.
- DONE and ABORTED are terminal: later events repeat the final decision.

Every run is bounded: at most ``total * (1 + max_retries * window)`` chunks
are sent before the sender finishes or aborts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final

from d_engine_sm._snapshot.chunks import check_int, check_seconds
from d_engine_sm.proto import storage_pb2

SnapshotAck = storage_pb2.SnapshotAck

PROBING: Final = "PROBING"
SENDING: Final = "SENDING"
DONE: Final = "DONE"
ABORTED: Final = "ABORTED"

_ACCEPTED: Final = SnapshotAck.ACCEPTED
_RESEND: Final = frozenset({SnapshotAck.CHECKSUM_MISMATCH, SnapshotAck.REQUESTED})
_GIVE_UP: Final = frozenset({SnapshotAck.FAILED, SnapshotAck.OUT_OF_ORDER})
_KNOWN: Final = frozenset(SnapshotAck.ChunkStatus.values())


@dataclass(frozen=True)
class Probe:
    """Send only what names the snapshot (chunk 0 or a header), then wait for its answer."""


@dataclass(frozen=True)
class Send:
    """Send these chunks, in order, then wait for acks until ``until``."""

    seqs: range
    until: float


@dataclass(frozen=True)
class Resend(Send):
    """Go back: send these chunks again (the receiver asked for ``seqs.start``)."""


@dataclass(frozen=True)
class Wait:
    """Nothing to send; wait for an ack until ``until``."""

    until: float


@dataclass(frozen=True)
class Finish:
    """Every chunk was accepted."""

    resends: int


@dataclass(frozen=True)
class Abort:
    """Give up. ``status`` names the gRPC status a transport ends the call with."""

    reason: str
    status: str


Decision = Probe | Send | Wait | Finish | Abort


class SnapshotSender:
    """Decides what to send next for one transfer (see the module docstring).

    Not thread-safe: one driver per sender. Never blocks, never does I/O.

    Args:
        total: the snapshot's ``total_chunks`` (>= 1).
        window: chunks in flight beyond the lowest unaccepted one (>= 1).
        max_retries: resends of one chunk before giving up.
        ack_timeout: seconds to wait for any ack.
        deadline: seconds the whole transfer may take (None: no limit).
        probe: start with a :class:`Probe` (the receiver says where to start).

    Raises:
        TypeError, ValueError: an argument out of range.
    """

    def __init__(
        self,
        total: int,
        *,
        window: int,
        max_retries: int,
        ack_timeout: float,
        deadline: float | None = None,
        probe: bool = True,
    ) -> None:
        self._total = check_int("total", total, 1)
        self._window = check_int("window", window, 1)
        self._max_retries = check_int("max_retries", max_retries, 0)
        check_seconds("ack_timeout", ack_timeout)
        check_seconds("deadline", deadline)
        self._ack_timeout = ack_timeout
        self._deadline = deadline
        self._probe = probe
        self._state = PROBING if probe else SENDING
        self._base = 0  # lowest seq not yet accepted
        self._next = 0  # next seq to send
        self._resends: Counter[int] = Counter()
        self._resumed_at = 0
        self._ack_due = 0.0
        self._end_by: float | None = None
        self._final: Finish | Abort | None = None
        self._started = False

    # -- view ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"PROBING"``, ``"SENDING"``, ``"DONE"`` or ``"ABORTED"``."""
        return self._state

    @property
    def accepted(self) -> int:
        """Chunks the receiver holds (the lowest unaccepted seq)."""
        return self._base

    @property
    def resumed_at(self) -> int:
        """Where the probe's answer started the transfer (0: from the beginning)."""
        return self._resumed_at

    @property
    def resends(self) -> int:
        """Chunks sent again so far."""
        return sum(self._resends.values())

    @property
    def until(self) -> float:
        """When the current wait expires (the earlier of the ack and overall deadlines)."""
        if self._end_by is None:
            return self._ack_due
        return min(self._ack_due, self._end_by)

    # -- events ----------------------------------------------------------------

    def start(self, now: float) -> Decision:
        """The transfer begins at ``now``: the first chunks to send."""
        if self._started:
            raise RuntimeError("sender already started")
        self._started = True
        self._end_by = now + self._deadline if self._deadline is not None else None
        self._ack_due = now + self._ack_timeout
        if self._state == PROBING:
            self._next = 1
            return Probe()
        return self._fill(now, Send)

    def on_ack(self, ack: SnapshotAck, now: float) -> Decision:
        """An ack arrived at ``now``."""
        if self._final is not None:
            return self._final
        self._ack_due = now + self._ack_timeout
        status, requested = ack.status, ack.next_requested
        if status not in _KNOWN:
            return self._abort(f"unknown ack status {status}", "INVALID_ARGUMENT")
        if status in _GIVE_UP:
            name = SnapshotAck.ChunkStatus.Name(status)
            return self._abort(f"receiver reported {name} at chunk {ack.seq}", "ABORTED")
        if self._state == PROBING and status in (_ACCEPTED, SnapshotAck.REQUESTED):
            return self._answered(requested, now)
        if status == _ACCEPTED:
            return self._accepted(requested, now)
        return self._resend(requested, now)

    def on_probe_refused(self, now: float) -> Decision:
        """The probe got no usable answer (a peer that does not resume): start at 0."""
        if self._final is not None:
            return self._final
        return self._answered(0, now)

    def on_tick(self, now: float) -> Decision:
        """The wait ended at ``now`` without an ack."""
        if self._final is not None:
            return self._final
        if self._end_by is not None and now >= self._end_by:
            return self._abort(
                f"transfer took more than {self._deadline:g}s "
                f"(accepted {self._base} of {self._total} chunks)",
                "DEADLINE_EXCEEDED",
            )
        if now >= self._ack_due:
            return self._abort(
                f"no ack within {self._ack_timeout:g}s "
                f"(accepted {self._base} of {self._total} chunks)",
                "DEADLINE_EXCEEDED",
            )
        return Wait(self.until)

    def on_end(self, now: float) -> Decision:
        """The receiver closed its side at ``now`` (no more acks will come)."""
        if self._final is not None:
            return self._final
        if self._base >= self._total:
            return self._finish()
        return self._abort(
            f"receiver closed its acks after {self._base} of {self._total} chunks", "ABORTED"
        )

    # -- internals -------------------------------------------------------------

    def _answered(self, start: int, now: float) -> Decision:
        if start > self._total:
            return self._abort(
                f"receiver asks to start at chunk {start}, snapshot has {self._total}",
                "INVALID_ARGUMENT",
            )
        self._state = SENDING
        self._base = self._next = self._resumed_at = start
        if start == self._total:
            return self._finish()
        return self._fill(now, Send)

    def _accepted(self, requested: int, now: float) -> Decision:
        if requested > self._next:
            return self._abort(
                f"ack accepts up to {requested} but only {self._next} chunks were sent",
                "INVALID_ARGUMENT",
            )
        self._base = max(self._base, requested)
        if self._base >= self._total:
            return self._finish()
        return self._fill(now, Send)

    def _resend(self, requested: int, now: float) -> Decision:
        if requested >= self._total or requested > self._next:
            return self._abort(
                f"resend of chunk {requested} requested, {self._next} of {self._total} sent",
                "INVALID_ARGUMENT",
            )
        self._resends[requested] += 1
        if self._resends[requested] > self._max_retries:
            return self._abort(
                f"chunk {requested} resent {self._max_retries} times, giving up", "ABORTED"
            )
        if self._state == PROBING:  # chunk 0 alone again: its answer is still awaited
            return Resend(range(0, 1), self.until)
        # Go back N: the receiver drops what followed ``requested``.
        self._base = min(self._base, requested)
        self._next = requested
        return self._fill(now, Resend)

    def _fill(self, now: float, kind: type[Send]) -> Decision:
        end = min(self._total, self._base + self._window)
        if self._next >= end:
            return Wait(self.until)
        seqs = range(self._next, end)
        self._next = end
        return kind(seqs, self.until)

    def _finish(self) -> Finish:
        self._state = DONE
        self._base = self._total
        self._final = Finish(self.resends)
        return self._final

    def _abort(self, reason: str, status: str) -> Abort:
        self._state = ABORTED
        self._final = Abort(reason, status)
        return self._final


__all__ = [
    "ABORTED",
    "DONE",
    "PROBING",
    "SENDING",
    "Abort",
    "Decision",
    "Finish",
    "Probe",
    "Resend",
    "Send",
    "SnapshotSender",
    "Wait",
]
