"""The key/value command language shared by the built-in state machines (pure).

Decodes ``WriteCommand`` payloads and derives watch events; the stores only
supply the storage primitive. Everything here is deterministic given its
inputs, so every replica decides the same.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from google.protobuf.message import DecodeError

from d_engine_sm._values import ApplyResult, LogId
from d_engine_sm.proto import client_pb2, common_pb2, storage_pb2

WriteCommand = client_pb2.WriteCommand
WatchResponse = client_pb2.WatchResponse

PUT: Final = client_pb2.WATCH_EVENT_TYPE_PUT
DELETE: Final = client_pb2.WATCH_EVENT_TYPE_DELETE


def decode_command(entry: common_pb2.Entry) -> WriteCommand | None:
    """The entry's WriteCommand, or None for noop/config/empty/undecodable payloads."""
    if entry.payload.WhichOneof("payload") != "command":
        return None
    cmd = WriteCommand()
    try:
        cmd.ParseFromString(entry.payload.command)
    except DecodeError:
        return None
    if cmd.WhichOneof("operation") is None:
        return None
    return cmd


def insert(key: bytes, value: bytes, ttl_secs: int = 0) -> bytes:
    """Encoded Insert command (a convenience for callers and tests).

    Args:
        key: the key to set.
        value: its value.
        ttl_secs: seconds until the key expires; 0 never expires.

    Returns:
        A serialized ``WriteCommand``, the ``command`` bytes of an entry.

    >>> from d_engine_sm.proto import client_pb2
    >>> client_pb2.WriteCommand.FromString(insert(b"k", b"v", 5)).insert.ttl_secs
    5
    """
    return WriteCommand(
        insert=WriteCommand.Insert(key=key, value=value, ttl_secs=ttl_secs)
    ).SerializeToString()


def delete(key: bytes) -> bytes:
    """Encoded Delete command (deleting an absent key still succeeds).

    Args:
        key: the key to remove.

    Returns:
        A serialized ``WriteCommand``.
    """
    return WriteCommand(delete=WriteCommand.Delete(key=key)).SerializeToString()


def compare_and_swap(key: bytes, expected: bytes | None, new_value: bytes) -> bytes:
    """Encoded CompareAndSwap command.

    Applied, it sets ``key`` to ``new_value`` only when the live value equals
    ``expected`` (with ``expected=None``: only when the key is absent);
    otherwise the entry's result is ``succeeded=False`` and nothing changes.

    Args:
        key: the key to compare and set.
        expected: the value required, or None for "absent".
        new_value: the value to set.

    Returns:
        A serialized ``WriteCommand``.
    """
    cas = WriteCommand.CompareAndSwap(key=key, new_value=new_value)
    if expected is not None:
        cas.expected_value = expected
    return WriteCommand(compare_and_swap=cas).SerializeToString()


def command_entry(index: int, term: int, command: bytes) -> common_pb2.Entry:
    """A log entry carrying ``command`` (for example from :func:`insert`).

    Args:
        index: the entry's log index.
        term: the entry's term.
        command: the payload bytes (a serialized ``WriteCommand`` for the
            built-in state machines).

    Returns:
        A ``d_engine.common.Entry``.
    """
    return common_pb2.Entry(
        index=index, term=term, payload=common_pb2.EntryPayload(command=command)
    )


def noop_entry(index: int, term: int) -> common_pb2.Entry:
    """A noop log entry (a new leader's first entry): applied, changes nothing.

    Args:
        index: the entry's log index.
        term: the entry's term.

    Returns:
        A ``d_engine.common.Entry`` with a ``noop`` payload.
    """
    return common_pb2.Entry(
        index=index, term=term, payload=common_pb2.EntryPayload(noop=common_pb2.Noop())
    )


def watch_events(
    entries: Sequence[common_pb2.Entry], results: Sequence[ApplyResult]
) -> Iterator[WatchResponse]:
    """Events for one applied batch, aligned with results by position.

    Insert and Delete emit when they succeeded; CompareAndSwap only when its
    comparison succeeded. Noop/config/undecodable entries emit nothing.
    """
    for entry, result in zip(entries, results, strict=False):
        if not result.succeeded:
            continue
        cmd = decode_command(entry)
        if cmd is None:
            continue
        op = cmd.WhichOneof("operation")
        if op == "insert":
            yield WatchResponse(key=cmd.insert.key, value=cmd.insert.value, event_type=PUT)
        elif op == "delete":
            yield WatchResponse(key=cmd.delete.key, value=b"", event_type=DELETE)
        else:
            cas = cmd.compare_and_swap
            yield WatchResponse(key=cas.key, value=cas.new_value, event_type=PUT)


TERM_HISTORY: Final = 64  # term changes remembered for entry_term()
TermStarts = list[tuple[int, int]]  # (first index, term), ascending


def next_term_starts(starts: TermStarts, entries: Sequence[common_pb2.Entry]) -> TermStarts | None:
    """The term history after applying ``entries``, or None when unchanged."""
    current = starts[-1][1] if starts else None
    if entries[0].term == current and entries[-1].term == current:
        return None
    new = list(starts)
    for entry in entries:
        if entry.term != current:
            new.append((entry.index, entry.term))
            current = entry.term
    return new[-TERM_HISTORY:] if new != starts else None


def term_at(
    index: int,
    starts: TermStarts,
    last_applied: LogId,
    snapshot: storage_pb2.SnapshotMetadata | None,
) -> int | None:
    """``entry_term`` for the built-in machines: known for applied entries only."""
    if index <= 0 or index > last_applied.index:
        return None
    if snapshot is not None and index == snapshot.last_included.index:
        return int(snapshot.last_included.term)
    pos = bisect.bisect_right(starts, (index, float("inf"))) - 1
    return starts[pos][1] if pos >= 0 else None


class KvOps:
    """The storage primitives :func:`apply_entries` drives (one per store)."""

    def put(self, key: bytes, value: bytes, expires_at: float | None) -> None:
        """Set ``key``; ``expires_at`` is a wall-clock time, None for never."""
        raise NotImplementedError

    def delete(self, key: bytes) -> None:
        """Remove ``key`` (absent keys are fine)."""
        raise NotImplementedError

    def get_live(self, key: bytes, now: float) -> bytes | None:
        """The value of ``key`` unless absent or expired at ``now``."""
        raise NotImplementedError

    def plain_setter(self) -> Callable[[bytes, bytes], None] | None:
        """A cheaper ``put(key, value, None)``, valid until the next TTL put; None if none."""
        return None


def apply_entries(entries: Sequence[common_pb2.Entry], ops: KvOps, now: float) -> list[ApplyResult]:
    """Execute a batch of entries against ``ops``; one result per entry.

    Noop, config and empty payloads count as applied (succeeded). A command
    that does not decode, or has no operation, changes nothing and fails.
    CompareAndSwap fails, changing nothing, unless the live value equals
    ``expected_value`` (unset: the key must be absent). ``now`` (wall-clock
    seconds) stamps TTL expiries.
    """
    # The hot path of every apply, shaped by measurement: FromString, HasField
    # instead of WhichOneof, failures noted by position, and results built in
    # one comprehension with tuple.__new__ (a C call, unlike the NamedTuple's
    # Python-level __new__).
    from_string = WriteCommand.FromString
    put = ops.put
    setter = ops.plain_setter()
    failed: list[int] = []
    for pos, entry in enumerate(entries):
        raw = entry.payload.command
        if not raw and entry.payload.WhichOneof("payload") != "command":
            continue  # noop / config / empty payload: applied
        try:
            cmd = from_string(raw)
        except DecodeError:
            failed.append(pos)
            continue
        if cmd.HasField("insert"):
            ins = cmd.insert
            ttl = ins.ttl_secs
            if ttl:
                put(ins.key, ins.value, now + ttl)
                setter = None
            elif setter is not None:
                setter(ins.key, ins.value)
            else:
                put(ins.key, ins.value, None)
        elif cmd.HasField("delete"):
            ops.delete(cmd.delete.key)
        elif cmd.HasField("compare_and_swap"):
            cas = cmd.compare_and_swap
            expected = cas.expected_value if cas.HasField("expected_value") else None
            if ops.get_live(cas.key, now) == expected:
                put(cas.key, cas.new_value, None)
            else:
                failed.append(pos)
        else:
            failed.append(pos)
    new = tuple.__new__
    results: list[ApplyResult] = [new(ApplyResult, (entry.index, True)) for entry in entries]
    for pos in failed:
        results[pos] = new(ApplyResult, (entries[pos].index, False))
    return results
