"""The sans-IO snapshot receiver, fed hand-built chunks (no files, no threads).

Ports d-engine's receive-stream behaviours (B120-B125, B128) and its untested
gaps (G070-G078) as receiver-level assertions: every ack's seq, status and
next_requested is checked. Where our contract differs from d-engine (stale
snapshots refused, CRC mismatch asks for a resend, gaps and duplicates acked)
the test says so.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d_engine_sm._snapshot.chunks import checksum
from d_engine_sm._snapshot.receiver import (
    ABORTED,
    AWAIT_FIRST,
    COMPLETE,
    RECEIVING,
    Partial,
    ReceiveAbort,
    SnapshotReceiver,
    Step,
)
from d_engine_sm._values import log_id
from d_engine_sm.proto import storage_pb2

Chunk = storage_pb2.SnapshotChunk
Ack = storage_pb2.SnapshotAck
Metadata = storage_pb2.SnapshotMetadata

_KEEP = object()  # sentinel: build the default metadata


def md(index: int = 100, term: int = 1, digest: bytes = b"") -> Metadata:
    return Metadata(last_included=log_id(index, term), checksum=digest)


def chunk(
    seq: int,
    data: bytes,
    *,
    total: int,
    term: int = 1,
    leader: int = 1,
    metadata: Metadata | object | None = _KEEP,
    crc: bytes | None = None,
) -> Chunk:
    """Like d-engine's create_test_chunk: metadata (100, term) unless told otherwise."""
    c = Chunk(
        leader_term=term,
        leader_id=leader,
        seq=seq,
        total_chunks=total,
        chunk_checksum=checksum(data) if crc is None else crc,
        data=data,
    )
    if metadata is _KEEP:
        c.metadata.CopyFrom(md(100, term))
    elif metadata is not None:
        assert isinstance(metadata, Metadata)
        c.metadata.CopyFrom(metadata)
    return c


def split(data: bytes, parts: int, metadata: Metadata, *, term: int = 1) -> list[Chunk]:
    """A well-behaved sender: ceil(len/parts)-byte chunks, metadata on seq 0 only."""
    size = -(-len(data) // parts)
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return [
        chunk(i, p, total=len(pieces), term=term, metadata=metadata if i == 0 else None)
        for i, p in enumerate(pieces)
    ]


def a(ack: Ack | None) -> tuple[int, str, int] | None:
    """An ack as (seq, status name, next_requested)."""
    if ack is None:
        return None
    return ack.seq, Ack.ChunkStatus.Name(ack.status), ack.next_requested


def ok(seq: int, nxt: int | None = None) -> tuple[int, str, int]:
    return seq, "ACCEPTED", seq + 1 if nxt is None else nxt


def run(
    rx: SnapshotReceiver, chunks: Sequence[Chunk]
) -> tuple[list[tuple[int, str, int] | None], bytes, ReceiveAbort | None]:
    """Feed every chunk then end the stream; collect acks, written bytes, the abort."""
    acks: list[tuple[int, str, int] | None] = []
    written = bytearray()
    try:
        for c in chunks:
            step = rx.feed(c)
            acks.append(a(step.ack))
            if step.data is not None:
                written += step.data
        rx.end_of_stream()
    except ReceiveAbort as abort:
        acks.append(a(abort.ack))
        return acks, bytes(written), abort
    return acks, bytes(written), None


def assert_failed_stays_failed(rx: SnapshotReceiver, status: str) -> None:
    assert rx.state == ABORTED
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(chunk(0, b"late", total=1))
    assert info.value.ack is None
    assert info.value.status == status
    with pytest.raises(ReceiveAbort) as info:
        rx.end_of_stream()
    assert info.value.ack is None
    assert rx.timed_out(1.0).ack is None
    assert rx.fail("again").ack is None
    assert rx.state == ABORTED


# -- d-engine B120-B125 ---------------------------------------------------------------


def test_b120_single_chunk() -> None:
    meta = md(2, 1, b"\x02" * 32)
    rx = SnapshotReceiver(last_applied_index=0)
    step = rx.feed(chunk(0, b"tar.gz bytes", total=1, metadata=meta))
    assert a(step.ack) == ok(0)
    assert step.data == b"tar.gz bytes"
    assert rx.state == COMPLETE
    assert rx.end_of_stream() == meta
    assert (rx.total_chunks, rx.leader_term, rx.leader_id) == (1, 1, 1)
    assert (rx.received, rx.received_bytes, rx.expected_bytes) == (1, 12, 12)
    assert rx.snapshot_index == 2


def test_b120_stale_snapshot_refused() -> None:
    # d-engine installed index 2 over last_applied 10 (Q08); we refuse first.
    rx = SnapshotReceiver(last_applied_index=10)
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(chunk(0, b"data", total=1, metadata=md(2, 1)))
    abort = info.value
    assert a(abort.ack) == (0, "FAILED", 0)
    assert (abort.status, abort.stale, abort.snapshot_index, abort.seq) == ("FAILED", True, 2, 0)
    assert "stale" in abort.reason
    assert rx.metadata is None
    assert_failed_stays_failed(rx, "FAILED")


@pytest.mark.parametrize(("index", "stale"), [(9, True), (10, True), (11, False)])
def test_stale_boundary(index: int, stale: bool) -> None:
    rx = SnapshotReceiver(last_applied_index=10)
    acks, _, abort = run(rx, [chunk(0, b"x", total=1, metadata=md(index, 1))])
    if stale:
        assert abort is not None and abort.stale
        assert acks == [(0, "FAILED", 0)]
    else:
        assert abort is None
        assert acks == [ok(0)]


def test_stale_refused_even_with_bad_crc() -> None:
    # Refused before any data is looked at.
    rx = SnapshotReceiver(last_applied_index=10)
    acks, written, abort = run(rx, [chunk(0, b"x", total=1, metadata=md(3), crc=b"\0\0\0\0")])
    assert abort is not None and abort.stale
    assert acks == [(0, "FAILED", 0)]
    assert written == b""


def test_b121_checksum_mismatch_asks_for_resend() -> None:
    # d-engine aborts at once; we answer CHECKSUM_MISMATCH, next_requested = seq (G074).
    rx = SnapshotReceiver(last_applied_index=0)
    bad = chunk(0, b"bad data", total=1, crc=bytes.fromhex("deadbeef"))
    step = rx.feed(bad)
    assert a(step.ack) == (0, "CHECKSUM_MISMATCH", 0)
    assert step.data is None
    # Chunk 0's metadata was not captured.
    assert rx.state == AWAIT_FIRST
    assert (rx.metadata, rx.total_chunks, rx.received, rx.expected_bytes) == (None, 0, 0, 0)
    step = rx.feed(chunk(0, b"bad data", total=1))
    assert a(step.ack) == ok(0)
    assert step.data == b"bad data"
    assert rx.end_of_stream() == md(100, 1)


def test_b121_mismatch_then_end_of_stream_fails() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, [chunk(0, b"bad data", total=1, crc=bytes.fromhex("deadbeef"))])
    assert acks == [(0, "CHECKSUM_MISMATCH", 0), (0, "FAILED", 0)]
    assert written == b""
    assert abort is not None and "missing metadata" in abort.reason


def test_b122_leader_term_change() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(
        rx, [chunk(0, b"one", total=2, term=1), chunk(1, b"two", total=2, term=2)]
    )
    assert acks == [ok(0), (1, "OUT_OF_ORDER", 1)]
    assert written == b"one"
    assert abort is not None
    assert (abort.status, abort.seq, abort.stale) == ("OUT_OF_ORDER", 1, False)
    assert "leader changed" in abort.reason
    assert abort.snapshot_index == 100
    assert_failed_stays_failed(rx, "OUT_OF_ORDER")


def test_b123_stream_ends_early() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, [chunk(0, b"half", total=2)])
    assert acks == [ok(0), (1, "FAILED", 1)]
    assert written == b"half"
    assert abort is not None
    assert abort.reason == "stream ended after 1 of 2 chunks"
    assert (abort.status, abort.seq) == ("FAILED", 1)
    assert_failed_stays_failed(rx, "FAILED")


@pytest.mark.parametrize(
    ("first", "ack"),
    [
        (chunk(0, b"x", total=1, metadata=None), (0, "FAILED", 0)),
        (chunk(0, b"x", total=1, metadata=Metadata(checksum=b"\x01" * 32)), (0, "FAILED", 0)),
        (chunk(3, b"x", total=5, metadata=None), (3, "FAILED", 0)),
    ],
    ids=["no-metadata", "no-last-included", "no-metadata-seq3"],
)
def test_b124_first_chunk_without_metadata(first: Chunk, ack: tuple[int, str, int]) -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, [first])
    assert acks == [ack]  # the only ack
    assert written == b""
    assert abort is not None and "missing metadata" in abort.reason
    assert abort.snapshot_index == 0
    assert_failed_stays_failed(rx, "FAILED")


def test_b125_multi_chunk_success() -> None:
    data = bytes(range(256)) * 3 + b"tail"
    meta = md(5, 1, b"\x01" * 32)
    chunks = split(data, 3, meta)
    assert len(chunks) == 3
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, chunks)
    assert abort is None
    assert acks == [ok(0), ok(1), ok(2)]
    assert written == data
    assert rx.state == COMPLETE
    assert rx.end_of_stream() == meta
    assert rx.received_bytes == len(data)
    assert rx.expected_bytes == 3 * len(chunks[0].data) >= len(data)


def test_b125_dengine_helper_metadata_on_every_chunk() -> None:
    # d-engine's test helper puts metadata on every chunk; later ones are ignored.
    chunks = [chunk(i, bytes([i]) * 4, total=3) for i in range(3)]
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, chunks)
    assert abort is None
    assert acks == [ok(0), ok(1), ok(2)]
    assert written == b"\x00" * 4 + b"\x01" * 4 + b"\x02" * 4


# Failure scenarios shared by B128: (chunks, ack list expected).
_TWO = [chunk(0, b"aa", total=2), chunk(1, b"bb", total=2)]
FAILURES: dict[str, tuple[list[Chunk], list[tuple[int, str, int]]]] = {
    "crc-then-eof": (
        [chunk(0, b"aa", total=1, crc=b"1234")],
        [(0, "CHECKSUM_MISMATCH", 0), (0, "FAILED", 0)],
    ),
    "term-change": ([_TWO[0], chunk(1, b"bb", total=2, term=9)], [ok(0), (1, "OUT_OF_ORDER", 1)]),
    "early-eof": ([_TWO[0]], [ok(0), (1, "FAILED", 1)]),
    "no-metadata": ([chunk(0, b"aa", total=1, metadata=None)], [(0, "FAILED", 0)]),
    "gap": (
        [chunk(0, b"aa", total=3), chunk(2, b"cc", total=3)],
        [ok(0), (2, "FAILED", 1)],
    ),
    "extra": ([*_TWO, chunk(2, b"cc", total=2)], [ok(0), ok(1), (2, "FAILED", 2)]),
    "empty": ([], [(0, "FAILED", 0)]),
}


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_b128_failure_paths_never_complete(name: str) -> None:
    # Receiver-level B128: no failure path yields metadata for an install,
    # and bytes written are only accepted chunks, in order.
    chunks, expected = FAILURES[name]
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, chunks)
    assert abort is not None
    assert acks == expected
    assert b"aabbcc".startswith(written)
    assert rx.state == ABORTED
    with pytest.raises(ReceiveAbort):
        rx.end_of_stream()


# -- d-engine gaps G070-G078 ------------------------------------------------------------


def test_g070_transport_error_mid_stream() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    for c in split(b"abcdef", 3, md())[:2]:
        rx.feed(c)
    abort = rx.fail("stream error: connection reset")
    assert a(abort.ack) == (2, "FAILED", 2)
    assert (abort.status, abort.seq, abort.reason) == (
        "FAILED",
        2,
        "stream error: connection reset",
    )
    assert abort.snapshot_index == 100
    assert_failed_stays_failed(rx, "FAILED")


def test_g070_transport_error_before_first_chunk() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    abort = rx.fail("stream error: boom")
    assert a(abort.ack) == (0, "FAILED", 0)
    assert abort.snapshot_index == 0
    assert_failed_stays_failed(rx, "FAILED")


@pytest.mark.parametrize("accepted", [0, 1])
def test_g071_timeout(accepted: int) -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    for c in split(b"abcd", 2, md())[:accepted]:
        rx.feed(c)
    abort = rx.timed_out(10.0)
    assert isinstance(abort, ReceiveAbort)
    assert a(abort.ack) == (accepted, "FAILED", accepted)
    assert abort.reason == "no chunk received for 10 seconds"
    assert_failed_stays_failed(rx, "FAILED")


def test_timeout_after_complete_still_aborts() -> None:
    # The stream never closed after the last chunk: the driver gives up.
    rx = SnapshotReceiver(last_applied_index=0)
    rx.feed(chunk(0, b"x", total=1))
    abort = rx.timed_out(0.5)
    assert a(abort.ack) == (1, "FAILED", 1)
    assert "0.5 seconds" in abort.reason
    assert_failed_stays_failed(rx, "FAILED")


def test_g072_leader_id_change_same_term() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(
        rx,
        [
            chunk(0, b"a", total=3, leader=1),
            chunk(1, b"b", total=3, leader=1),
            chunk(2, b"c", total=3, leader=2),
        ],
    )
    assert acks == [ok(0), ok(1), (2, "OUT_OF_ORDER", 2)]
    assert written == b"ab"
    assert abort is not None and abort.status == "OUT_OF_ORDER"


def test_g075_duplicate_is_reacked_not_written() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    c0, c1, c2 = (chunk(i, bytes([65 + i]), total=3) for i in range(3))
    acks, written, abort = run(rx, [c0, c0, c1, c0, c1, c2, c2, c1])
    assert abort is None
    assert acks == [ok(0), ok(0, 1), ok(1), ok(0, 2), ok(1, 2), ok(2), ok(2, 3), ok(1, 3)]
    assert written == b"ABC"


def test_g075_gap_aborts_with_ack() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, _, abort = run(
        rx, [chunk(0, b"a", total=5), chunk(1, b"b", total=5), chunk(3, b"d", total=5)]
    )
    assert acks == [ok(0), ok(1), (3, "FAILED", 2)]
    assert abort is not None and "gap" in abort.reason


def test_g076_empty_stream() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    with pytest.raises(ReceiveAbort) as info:
        rx.end_of_stream()
    assert a(info.value.ack) == (0, "FAILED", 0)
    assert "missing metadata" in info.value.reason
    assert_failed_stays_failed(rx, "FAILED")


def test_g077_extra_chunk_refused_at_once() -> None:
    # d-engine acked extras as Accepted and failed only at EOF.
    rx = SnapshotReceiver(last_applied_index=0)
    rx.feed(chunk(0, b"a", total=1))
    assert rx.state == COMPLETE
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(chunk(1, b"b", total=1))
    assert a(info.value.ack) == (1, "FAILED", 1)
    assert "beyond total_chunks" in info.value.reason
    assert_failed_stays_failed(rx, "FAILED")


def test_g077_seq_beyond_total_mid_stream() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, _, abort = run(rx, [chunk(0, b"a", total=2), chunk(7, b"x", total=2)])
    assert acks == [ok(0), (7, "FAILED", 1)]
    assert abort is not None


def test_g078_total_chunks_change_refused() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, _, abort = run(rx, [chunk(0, b"a", total=3), chunk(1, b"b", total=2)])
    assert acks == [ok(0), (1, "FAILED", 1)]
    assert abort is not None and "total_chunks" in abort.reason


def test_g078_later_metadata_ignored() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    first = md(7, 1, b"\x07" * 32)
    acks, _, abort = run(
        rx,
        [
            chunk(0, b"a", total=2, metadata=first),
            chunk(1, b"b", total=2, metadata=md(99, 1, b"\x09" * 32)),
        ],
    )
    assert abort is None
    assert acks == [ok(0), ok(1)]
    assert rx.end_of_stream() == first


# -- the other rules --------------------------------------------------------------------------


def test_first_chunk_must_be_seq_zero() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, _, abort = run(rx, [chunk(1, b"b", total=2)])
    assert acks == [(1, "FAILED", 0)]
    assert abort is not None and "expected 0" in abort.reason


def test_total_chunks_zero_refused() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, _, abort = run(rx, [chunk(0, b"", total=0)])
    assert acks == [(0, "FAILED", 0)]
    assert abort is not None and "total_chunks" in abort.reason


def test_mismatch_on_later_chunk_then_resend() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    c0, c1, c2 = split(b"abcdefghi", 3, md())
    bad = Chunk()
    bad.CopyFrom(c1)
    bad.data = b"dEf"
    acks, written, abort = run(rx, [c0, bad, c1, c2])
    assert abort is None
    assert acks == [ok(0), (1, "CHECKSUM_MISMATCH", 1), ok(1), ok(2)]
    assert written == b"abcdefghi"


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_retries_are_bounded(max_retries: int) -> None:
    rx = SnapshotReceiver(last_applied_index=0, max_retries=max_retries)
    c0 = split(b"abcd", 2, md())[0]
    bad = chunk(1, b"cd", total=2, crc=b"\0\0\0\0")
    assert a(rx.feed(c0).ack) == ok(0)
    for _ in range(max_retries):
        assert a(rx.feed(bad).ack) == (1, "CHECKSUM_MISMATCH", 1)
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(bad)
    assert a(info.value.ack) == (1, "FAILED", 1)
    assert info.value.status == "FAILED"
    assert f"{max_retries + 1} times" in info.value.reason
    assert_failed_stays_failed(rx, "FAILED")


def test_retries_bounded_on_first_chunk() -> None:
    rx = SnapshotReceiver(last_applied_index=0, max_retries=2)
    bad = chunk(0, b"x", total=1, crc=b"nope")
    assert [a(rx.feed(bad).ack) for _ in range(2)] == [(0, "CHECKSUM_MISMATCH", 0)] * 2
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(bad)
    assert a(info.value.ack) == (0, "FAILED", 0)
    assert info.value.snapshot_index == 100


def test_retry_budget_is_per_chunk() -> None:
    rx = SnapshotReceiver(last_applied_index=0, max_retries=2)
    chunks = split(b"abcdef", 3, md())
    acks: list[tuple[int, str, int] | None] = []
    for c in chunks:
        bad = Chunk()
        bad.CopyFrom(c)
        bad.chunk_checksum = b"\0\0\0\1"
        acks += [a(rx.feed(bad).ack), a(rx.feed(bad).ack), a(rx.feed(c).ack)]
    assert acks == [x for s in range(3) for x in [(s, "CHECKSUM_MISMATCH", s)] * 2 + [ok(s)]]
    assert rx.state == COMPLETE


def test_chunk_larger_than_first_refused() -> None:
    # expected_bytes must stay an upper bound for free-space admission.
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, [chunk(0, b"ab", total=2), chunk(1, b"cde", total=2)])
    assert rx.expected_bytes == 4
    assert acks == [ok(0), (1, "FAILED", 1)]
    assert written == b"ab"
    assert abort is not None and "more than chunk 0" in abort.reason


def test_duplicates_after_complete_are_reacked() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    c0, c1 = split(b"abcd", 2, md())
    rx.feed(c0)
    rx.feed(c1)
    step = rx.feed(c0)
    assert (a(step.ack), step.data) == (ok(0, 2), None)
    assert rx.state == COMPLETE
    assert rx.end_of_stream() == md()


def test_duplicate_from_other_leader_is_out_of_order() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    acks, _, abort = run(rx, [chunk(0, b"a", total=2), chunk(0, b"a", total=2, leader=5)])
    assert acks == [ok(0), (0, "OUT_OF_ORDER", 1)]
    assert abort is not None and abort.status == "OUT_OF_ORDER"


def test_current_term_not_checked() -> None:
    # d-engine senders put last_included.term in leader_term; any value is fine.
    rx = SnapshotReceiver(last_applied_index=0)
    acks, _, abort = run(rx, [chunk(0, b"a", total=1, term=0, metadata=md(5, 3))])
    assert abort is None
    assert acks == [ok(0)]
    assert rx.leader_term == 0


def test_states_through_a_stream() -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    assert rx.state == AWAIT_FIRST
    c0, c1, c2 = split(b"abc", 3, md())
    rx.feed(c0)
    assert rx.state == RECEIVING
    rx.feed(c1)
    assert rx.state == RECEIVING
    rx.feed(c2)
    assert rx.state == COMPLETE
    assert rx.end_of_stream() == rx.end_of_stream() == md()
    assert rx.state == COMPLETE


def test_metadata_is_a_copy() -> None:
    c0 = chunk(0, b"a", total=1, metadata=md(8, 2))
    rx = SnapshotReceiver(last_applied_index=0)
    rx.feed(c0)
    c0.metadata.last_included.index = 1
    assert rx.end_of_stream().last_included.index == 8


def test_empty_chunk_zero_is_a_header_not_an_archive() -> None:
    # No archive is empty, so an empty chunk 0 with metadata asks where to
    # start (a resume header): REQUESTED 0 without a partial; nothing written.
    rx = SnapshotReceiver(last_applied_index=0)
    acks, written, abort = run(rx, [chunk(0, b"", total=1)])
    assert acks == [(0, "REQUESTED", 0), (0, "FAILED", 0)]
    assert written == b""
    assert abort is not None and not abort.resumable  # ended by the sender: a probe


def test_refusal_keeps_the_facts() -> None:
    rx = SnapshotReceiver(last_applied_index=50)
    with pytest.raises(ReceiveAbort):
        rx.feed(chunk(0, b"a", total=1, metadata=md(20)))
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(chunk(0, b"a", total=1, metadata=md(60)))
    again = info.value
    assert (again.ack, again.stale, again.snapshot_index, again.status) == (
        None,
        True,
        20,
        "FAILED",
    )
    assert again.reason.startswith("receiver already aborted: stale snapshot")


def test_receive_abort_pickles() -> None:
    abort = ReceiveAbort(
        "gap",
        "FAILED",
        3,
        Ack(seq=3, status=Ack.FAILED, next_requested=2),
        stale=True,
        snapshot_index=9,
    )
    back = pickle.loads(pickle.dumps(abort))
    assert (back.reason, back.status, back.seq, back.stale, back.snapshot_index) == (
        "gap",
        "FAILED",
        3,
        True,
        9,
    )
    assert back.ack == abort.ack
    assert str(back) == "gap"


def test_step_is_frozen() -> None:
    step = Step(ack=None, data=b"x")
    with pytest.raises(AttributeError):
        step.data = b"y"  # type: ignore[misc]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="last_applied_index"):
        SnapshotReceiver(last_applied_index=-1)
    with pytest.raises(ValueError, match="max_retries"):
        SnapshotReceiver(last_applied_index=0, max_retries=-1)
    with pytest.raises(TypeError, match="last_applied_index"):
        SnapshotReceiver(last_applied_index=1.5)  # type: ignore[arg-type]
    rx = SnapshotReceiver(last_applied_index=0)
    with pytest.raises(TypeError, match="SnapshotChunk"):
        rx.feed(b"raw bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seconds"):
        rx.timed_out("10")  # type: ignore[arg-type]
    assert rx.state == AWAIT_FIRST  # bad calls change nothing


def test_ack_driven_sender_recovers_from_corruption() -> None:
    # A sender that follows next_requested; the link corrupts every chunk's
    # first transmission and, once, replays an old chunk.
    data = bytes(range(251)) * 40
    chunks = split(data, 17, md(42, 4), term=4)
    rx = SnapshotReceiver(last_applied_index=41, max_retries=1)
    sent: set[int] = set()
    written = bytearray()
    acks = []
    nxt = 0
    replayed = False
    while nxt < len(chunks):
        c = chunks[nxt]
        if nxt not in sent:
            sent.add(nxt)
            corrupt = Chunk()
            corrupt.CopyFrom(c)
            corrupt.data = bytes([c.data[0] ^ 0x80]) + c.data[1:]
            c = corrupt
        step = rx.feed(c)
        acks.append(a(step.ack))
        if step.data is not None:
            written += step.data
        assert step.ack is not None
        nxt = step.ack.next_requested
        if nxt == 9 and not replayed:
            replayed = True
            assert a(rx.feed(chunks[3]).ack) == ok(3, 9)
    assert rx.end_of_stream() == md(42, 4)
    assert bytes(written) == data
    assert acks.count((5, "CHECKSUM_MISMATCH", 5)) == 1
    assert len(acks) == 2 * len(chunks)
    assert replayed


# -- property: mutations never complete with different bytes ------------------------------

# (kind, i, j, blob): which chunk, a second number, extra bytes.
Op = tuple[str, int, int, bytes]
_KINDS = ["drop", "dup", "swap", "truncate", "flip", "term", "leader", "total", "extra", "strip"]
_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(_KINDS),
        st.integers(0, 40),
        st.integers(0, 1000),
        st.binary(max_size=8),
    ),
    max_size=6,
)


def _copy(c: Chunk) -> Chunk:
    out = Chunk()
    out.CopyFrom(c)
    return out


def _mutate(chunks: list[Chunk], ops: list[Op]) -> list[Chunk]:
    out = [_copy(c) for c in chunks]
    for kind, n, m, blob in ops:
        if kind == "extra":
            # Past the end only: a forged chunk *within* range with a valid
            # CRC is the archive SHA-256 check's job, not the receiver's.
            total = chunks[0].total_chunks
            forged = chunk(total + n % 3, blob, total=total, metadata=None)
            out.insert(m % (len(out) + 1), forged)
            continue
        if not out:
            continue
        i = n % len(out)
        if kind == "drop":
            del out[i]
        elif kind == "dup":
            out.insert(m % (len(out) + 1), _copy(out[i]))
        elif kind == "swap":
            j = m % len(out)
            out[i], out[j] = out[j], out[i]
        elif kind == "truncate":
            del out[i:]
        elif kind == "flip" and out[i].data:
            buf = bytearray(out[i].data)
            buf[m % len(buf)] ^= 1 + m % 255
            out[i].data = bytes(buf)  # checksum left as sent: corruption in transit
        elif kind == "term":
            out[i].leader_term += 1 + m % 3
        elif kind == "leader":
            out[i].leader_id += 1 + m % 3
        elif kind == "total" and out[i].seq > 0:
            # Later chunks only: rewriting chunk 0's total (plus a truncation)
            # is a consistent forgery that only the archive's SHA-256 can catch.
            out[i].total_chunks = max(0, out[i].total_chunks + (1 if m % 2 else -1))
        elif kind == "strip":
            out[i].ClearField("metadata")
    return out


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=300),
    chunk_size=st.integers(1, 64),
    ops=_MUTATIONS,
    max_retries=st.integers(0, 3),
)
def test_mutated_streams_complete_exactly_or_abort(
    data: bytes, chunk_size: int, ops: list[Op], max_retries: int
) -> None:
    meta = md(5, 2, b"\x05" * 32)
    parts = math.ceil(len(data) / chunk_size)
    chunks = split(data, parts, meta, term=2)
    stream = _mutate(chunks, ops)
    rx = SnapshotReceiver(last_applied_index=0, max_retries=max_retries)
    written = bytearray()
    next_seq = 0
    try:
        for c in stream:
            step = rx.feed(c)
            if step.ack is None:  # dropped: in flight behind a corrupt chunk
                assert step.data is None
                continue
            if step.data is not None:
                # Data only with an ACCEPTED ack for exactly the next seq.
                assert a(step.ack) == ok(next_seq)
                next_seq += 1
                written += step.data
        result = rx.end_of_stream()
    except ReceiveAbort as abort:
        assert rx.state == ABORTED
        assert abort.status in {"FAILED", "OUT_OF_ORDER", "CHECKSUM_MISMATCH"}
        assert data.startswith(bytes(written))
        with pytest.raises(ReceiveAbort) as info:
            rx.end_of_stream()
        assert info.value.ack is None
        return
    assert rx.state == COMPLETE
    assert bytes(written) == data
    assert result == meta


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=200),
    chunk_size=st.integers(1, 32),
    dups=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=5),
    bad=st.lists(st.integers(0, 40), max_size=5),
)
def test_benign_noise_still_completes(
    data: bytes, chunk_size: int, dups: list[tuple[int, int]], bad: list[int]
) -> None:
    # Late duplicates and corrupted copies just before the good one (within
    # the retry budget) must not stop a transfer.
    chunks = split(data, math.ceil(len(data) / chunk_size), md(3, 1))
    stream: list[Chunk] = []
    corrupt_count: dict[int, int] = {}
    for c in chunks:
        for b in bad:
            if b % len(chunks) == c.seq and corrupt_count.get(c.seq, 0) < 3:
                corrupt_count[c.seq] = corrupt_count.get(c.seq, 0) + 1
                noisy = _copy(c)
                noisy.chunk_checksum = bytes(x ^ 0xFF for x in c.chunk_checksum)
                stream.append(noisy)
        stream.append(c)
        for src, _ in dups:
            if src % len(chunks) <= c.seq and len(stream) % 3 == 0:
                stream.append(_copy(chunks[src % len(chunks)]))
    rx = SnapshotReceiver(last_applied_index=0, max_retries=3)
    acks, written, abort = run(rx, stream)
    assert abort is None, abort
    assert written == data
    assert rx.state == COMPLETE
    assert all(x is not None and x[1] != "FAILED" for x in acks)


# -- resuming, deadlines, bounded noise, checksum length ------------------------------------
DIGEST = b"\x07" * 32


def resumable_stream(parts: int = 6) -> list[Chunk]:
    return split(bytes(range(60)), parts, md(100, 1, DIGEST))


def partial_of(chunks: list[Chunk], kept: int) -> Partial:
    return Partial(100, 1, DIGEST, len(chunks), len(chunks[0].data), kept)


def test_header_is_answered_with_the_first_missing_chunk() -> None:
    chunks = resumable_stream()
    header = chunk(0, b"", total=6, metadata=md(100, 1, DIGEST))
    rx = SnapshotReceiver(last_applied_index=0, partial=partial_of(chunks, 4))
    step = rx.feed(header)
    assert (a(step.ack), step.data, step.resume_from) == ((0, "REQUESTED", 4), None, 4)
    acks, written, abort = run(rx, chunks[4:])
    assert abort is None and acks == [ok(4), ok(5)]
    assert written == b"".join(c.data for c in chunks[4:])
    assert rx.resumed == 4 and rx.state == COMPLETE


def test_chunk_zero_of_the_same_snapshot_skips_ahead() -> None:
    # Pull: the learner's ack of chunk 0 tells the sender where to go on.
    chunks = resumable_stream()
    rx = SnapshotReceiver(last_applied_index=0, partial=partial_of(chunks, 3))
    step = rx.feed(chunks[0])
    assert (a(step.ack), step.data, step.resume_from) == (ok(0, 3), None, 3)
    assert a(rx.feed(chunks[1]).ack) == ok(1, 3)  # in flight already: a duplicate
    assert a(rx.feed(chunks[3]).ack) == ok(3)


@pytest.mark.parametrize(
    "other",
    [
        {"index": 99},
        {"checksum": b"\x08" * 32},
        {"total_chunks": 7},
        {"chunk_size": 3},
    ],
    ids=["logid", "checksum", "count", "chunk-size"],
)
def test_a_different_snapshot_starts_from_zero(other: dict[str, object]) -> None:
    chunks = resumable_stream()
    fields = {**partial_of(chunks, 4).__dict__, **other}
    rx = SnapshotReceiver(last_applied_index=0, partial=Partial(**fields))
    step = rx.feed(chunks[0])
    assert (a(step.ack), step.resume_from) == (ok(0), 0)
    assert step.data == chunks[0].data


def test_no_resume_without_a_sha256() -> None:
    chunks = split(bytes(range(60)), 6, md(100, 1, b""))
    partial = Partial(100, 1, b"", 6, 10, 4)
    rx = SnapshotReceiver(last_applied_index=0, partial=partial)
    assert rx.feed(chunks[0]).resume_from == 0


def test_which_failures_are_resumable() -> None:
    chunks = resumable_stream()
    rx = SnapshotReceiver(last_applied_index=0)
    _, _, abort = run(rx, chunks[:3])  # ended early on purpose (a probe, a stop): not kept
    assert abort is not None and not abort.resumable
    rx = SnapshotReceiver(last_applied_index=0)
    rx.feed(chunks[0])
    assert rx.timed_out(1.0).resumable
    assert SnapshotReceiver(last_applied_index=0).fail("x", resumable=True).resumable
    _, _, gap = run(SnapshotReceiver(last_applied_index=0), [chunks[0], chunks[2]])
    assert gap is not None and not gap.resumable  # wrong data is never kept


def test_idle_deadline_counts_only_new_chunks() -> None:
    chunks = resumable_stream()
    rx = SnapshotReceiver(last_applied_index=0, idle_timeout=5.0)
    rx.feed(chunks[0], now=0.0)
    rx.feed(chunks[1], now=4.0)
    for t in (5.0, 6.0, 8.5):  # duplicates keep coming, no progress
        assert a(rx.feed(chunks[1], now=t).ack) == ok(1, 2)
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(chunks[1], now=9.5)
    assert "no new chunk accepted for 5 seconds" in info.value.reason
    assert info.value.resumable and a(info.value.ack) == (2, "FAILED", 2)


def test_overall_deadline_even_with_progress() -> None:
    chunks = split(bytes(range(100)), 50, md(100, 1, DIGEST))
    rx = SnapshotReceiver(last_applied_index=0, idle_timeout=5.0, deadline=10.0)
    assert rx.tick(0.0) is None
    with pytest.raises(ReceiveAbort) as info:
        for i, c in enumerate(chunks):
            rx.feed(c, now=i * 1.0)
    assert "more than 10 seconds" in info.value.reason and info.value.seq == 11


def test_tick_reports_a_passed_deadline() -> None:
    rx = SnapshotReceiver(last_applied_index=0, idle_timeout=2.0)
    rx.feed(resumable_stream()[0], now=1.0)
    assert rx.tick(2.5) is None
    late = rx.tick(3.5)
    assert late is not None and late.ack is not None and rx.state == ABORTED


@pytest.mark.parametrize("max_retries", [0, 3])
def test_duplicates_forever_are_bounded(max_retries: int) -> None:
    chunks = resumable_stream()
    rx = SnapshotReceiver(last_applied_index=0, max_retries=max_retries)
    rx.feed(chunks[0])
    rx.feed(chunks[1])
    budget = (max_retries + 1) * 6
    for _ in range(budget):
        assert a(rx.feed(chunks[1]).ack) == ok(1, 2)
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(chunks[1])
    assert "duplicate" in info.value.reason and not info.value.resumable


def test_chunks_in_flight_behind_a_corrupt_one_are_dropped() -> None:
    chunks = resumable_stream()
    rx = SnapshotReceiver(last_applied_index=0)
    rx.feed(chunks[0])
    bad = Chunk()
    bad.CopyFrom(chunks[1])
    bad.chunk_checksum = b"\0\0\0\0"
    assert a(rx.feed(bad).ack) == (1, "CHECKSUM_MISMATCH", 1)
    assert rx.feed(chunks[2]) == Step(ack=None, data=None)  # go-back-N: sent before our ack
    assert rx.feed(chunks[3]) == Step(ack=None, data=None)
    assert a(rx.feed(chunks[1]).ack) == ok(1)
    _, _, abort = run(rx, [chunks[3]])  # once resent, a gap is a gap again
    assert abort is not None and "gap" in abort.reason


@pytest.mark.parametrize("size", [1, 16, 31, 33, 64])
def test_checksum_of_the_wrong_length_is_refused(size: int) -> None:
    rx = SnapshotReceiver(last_applied_index=0)
    with pytest.raises(ReceiveAbort) as info:
        rx.feed(chunk(0, b"a", total=1, metadata=md(100, 1, b"\x01" * size)))
    assert info.value.bad_field == "checksum" and f"got {size} bytes" in info.value.reason
    assert a(info.value.ack) == (0, "FAILED", 0)


def test_empty_checksum_is_accepted_unless_required() -> None:
    c = chunk(0, b"a", total=1, metadata=md(100, 1, b""))
    assert a(SnapshotReceiver(last_applied_index=0).feed(c).ack) == ok(0)
    with pytest.raises(ReceiveAbort) as info:
        SnapshotReceiver(last_applied_index=0, require_checksum=True).feed(c)
    assert info.value.bad_field == "checksum" and "empty (required)" in info.value.reason


def test_abort_with_new_facts_pickles() -> None:
    abort = ReceiveAbort("x", "FAILED", 2, None, bad_field="checksum", resumable=True)
    back = pickle.loads(pickle.dumps(abort))
    assert (back.bad_field, back.resumable) == ("checksum", True)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"idle_timeout": 0}, ValueError),
        ({"deadline": -1}, ValueError),
        ({"idle_timeout": "1"}, TypeError),
        ({"partial": (1, 2)}, TypeError),
    ],
)
def test_new_arguments_are_validated(kw: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        SnapshotReceiver(last_applied_index=0, **kw)  # type: ignore[arg-type]
