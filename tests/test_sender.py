"""The sans-IO snapshot sender, driven by hand-built acks and a fake clock (no I/O)."""

from __future__ import annotations

import pytest

from d_engine_sm._snapshot.sender import (
    ABORTED,
    DONE,
    PROBING,
    SENDING,
    Abort,
    Finish,
    Probe,
    Resend,
    Send,
    SnapshotSender,
    Wait,
)
from d_engine_sm.proto import storage_pb2

Ack = storage_pb2.SnapshotAck
OK, BAD, ASK, FAILED, OOO = (
    Ack.ACCEPTED,
    Ack.CHECKSUM_MISMATCH,
    Ack.REQUESTED,
    Ack.FAILED,
    Ack.OUT_OF_ORDER,
)


def ack(seq: int, status: int, nxt: int) -> Ack:
    return Ack(seq=seq, status=status, next_requested=nxt)  # type: ignore[arg-type]


def sender(total: int = 10, **kw: object) -> SnapshotSender:
    args: dict[str, object] = {"window": 3, "max_retries": 2, "ack_timeout": 5.0}
    args.update(kw)
    return SnapshotSender(total, **args)  # type: ignore[arg-type]


def seqs(decision: object) -> list[int]:
    assert isinstance(decision, Send), decision
    return list(decision.seqs)


def test_probe_then_window_then_finish() -> None:
    tx = sender(5)
    assert tx.start(0.0) == Probe() and tx.state == PROBING
    assert seqs(tx.on_ack(ack(0, OK, 1), 1.0)) == [1, 2, 3]
    assert tx.state == SENDING
    assert seqs(tx.on_ack(ack(1, OK, 2), 1.0)) == [4]
    assert isinstance(tx.on_ack(ack(2, OK, 3), 1.0), Wait)
    tx.on_ack(ack(3, OK, 4), 1.0)
    assert tx.on_ack(ack(4, OK, 5), 1.0) == Finish(resends=0)
    assert tx.state == DONE and tx.accepted == 5


def test_probe_answer_resumes_at_the_first_missing_chunk() -> None:
    # A learner holding chunks 0-5 of this snapshot acks chunk 0 with next 6.
    tx = sender(10)
    tx.start(0.0)
    assert seqs(tx.on_ack(ack(0, OK, 6), 0.5)) == [6, 7, 8]
    assert tx.resumed_at == 6


def test_requested_answer_to_a_header_probe() -> None:
    tx = sender(10, window=10)
    tx.start(0.0)
    assert seqs(tx.on_ack(ack(0, ASK, 4), 0.5)) == list(range(4, 10))


def test_probe_refused_starts_from_zero() -> None:
    tx = sender(4, window=4)
    tx.start(0.0)
    assert seqs(tx.on_probe_refused(0.1)) == [0, 1, 2, 3]


def test_without_probe_a_full_window_goes_first() -> None:
    tx = sender(10, probe=False)
    assert seqs(tx.start(0.0)) == [0, 1, 2]


def test_checksum_mismatch_goes_back_n_within_the_retry_limit() -> None:
    tx = sender(10, probe=False, max_retries=2)
    tx.start(0.0)
    tx.on_ack(ack(0, OK, 1), 0.1)  # sends 3
    for attempt in (1, 2):
        again = tx.on_ack(ack(1, BAD, 1), 0.2)
        assert isinstance(again, Resend) and list(again.seqs) == [1, 2, 3], attempt
    assert tx.resends == 2
    last = tx.on_ack(ack(1, BAD, 1), 0.3)
    assert isinstance(last, Abort) and last.status == "ABORTED" and "resent 2 times" in last.reason
    assert tx.state == ABORTED


def test_a_corrupt_chunk_zero_while_probing_resends_it_alone() -> None:
    tx = sender(10)
    tx.start(0.0)
    again = tx.on_ack(ack(0, BAD, 0), 0.1)
    assert isinstance(again, Resend) and list(again.seqs) == [0]
    assert tx.state == PROBING


@pytest.mark.parametrize("status", [FAILED, OOO])
def test_receiver_giving_up_aborts(status: int) -> None:
    tx = sender()
    tx.start(0.0)
    out = tx.on_ack(ack(0, status, 0), 0.1)
    assert isinstance(out, Abort) and out.status == "ABORTED"


def test_no_ack_within_ack_timeout_aborts() -> None:
    tx = sender(ack_timeout=5.0)
    tx.start(10.0)
    assert tx.until == 15.0
    assert tx.on_tick(14.0) == Wait(15.0)
    out = tx.on_tick(15.0)
    assert isinstance(out, Abort) and out.status == "DEADLINE_EXCEEDED"


def test_overall_deadline_aborts_even_with_acks_flowing() -> None:
    tx = sender(1000, window=1, deadline=3.0, probe=False)
    tx.start(0.0)
    now = 0.0
    out: object = None
    for seq in range(1000):
        now += 0.5
        out = tx.on_ack(ack(seq, OK, seq + 1), now)
        if now >= 3.0:
            out = tx.on_tick(now)
            break
    assert isinstance(out, Abort) and "more than 3s" in out.reason


def test_receiver_closing_early_aborts_and_after_the_end_finishes() -> None:
    tx = sender(2, probe=False)
    tx.start(0.0)
    assert isinstance(tx.on_end(0.1), Abort)
    tx = sender(1, probe=False)
    tx.start(0.0)
    assert isinstance(tx.on_ack(ack(0, OK, 1), 0.1), Finish)
    assert isinstance(tx.on_end(0.2), Finish)


@pytest.mark.parametrize(
    "bad",
    [ack(0, OK, 7), ack(0, BAD, 10), ack(0, 99, 0), ack(0, BAD, 5)],
    ids=["accepts-unsent", "resend-past-end", "unknown-status", "resend-unsent"],
)
def test_nonsensical_acks_abort(bad: Ack) -> None:
    tx = sender(10, probe=False)
    tx.start(0.0)
    out = tx.on_ack(bad, 0.1)
    assert isinstance(out, Abort) and out.status == "INVALID_ARGUMENT"


def test_terminal_decisions_repeat() -> None:
    tx = sender()
    tx.start(0.0)
    final = tx.on_ack(ack(0, FAILED, 0), 0.1)
    assert tx.on_ack(ack(0, OK, 1), 0.2) is final
    assert tx.on_tick(100.0) is final and tx.on_end(100.0) is final


def test_answer_beyond_the_end_is_refused() -> None:
    tx = sender(3)
    tx.start(0.0)
    assert isinstance(tx.on_ack(ack(0, ASK, 4), 0.1), Abort)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"total": 0}, ValueError),
        ({"window": 0}, ValueError),
        ({"max_retries": -1}, ValueError),
        ({"ack_timeout": 0}, ValueError),
        ({"deadline": -1.0}, ValueError),
        ({"window": 1.5}, TypeError),
        ({"ack_timeout": "5"}, TypeError),
    ],
)
def test_arguments_are_validated(kw: dict[str, object], error: type[Exception]) -> None:
    args: dict[str, object] = {"total": 3, "window": 1, "max_retries": 0, "ack_timeout": 1.0}
    args.update(kw)
    total = args.pop("total")
    with pytest.raises(error):
        SnapshotSender(total, **args)  # type: ignore[arg-type]


def test_start_twice_is_a_bug() -> None:
    tx = sender()
    tx.start(0.0)
    with pytest.raises(RuntimeError):
        tx.start(1.0)
