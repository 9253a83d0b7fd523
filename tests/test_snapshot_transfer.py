"""Leader -> follower snapshot transfer at handler level (d-engine B100-B137, G060-G086).

A ``leader_follower`` pair pipes ``load_snapshot_data`` into
``apply_snapshot_stream_from_leader`` and records the acks. Every receive
failure asserts the exact acks, the error class, that the follower is
unchanged and that no ``temp-`` file is left behind.
"""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._snapshot import chunks as wire
from d_engine_sm._values import LogId
from d_engine_sm.errors import (
    ChunkOutOfRange,
    CorruptSnapshotError,
    SnapshotError,
    SnapshotInProgress,
    SnapshotNotFound,
    SnapshotTransferError,
    StaleSnapshotError,
    UnsafeArchiveError,
)
from d_engine_sm.proto import common_pb2, storage_pb2

Ack = storage_pb2.SnapshotAck
Chunk = storage_pb2.SnapshotChunk
Meta = storage_pb2.SnapshotMetadata
ACCEPTED, MISMATCH, OUT_OF_ORDER, FAILED = (
    Ack.ACCEPTED,
    Ack.CHECKSUM_MISMATCH,
    Ack.OUT_OF_ORDER,
    Ack.FAILED,
)
WAIT = 10.0


def cfg(directory: Path, **kw: Any) -> SnapshotConfig:
    base: dict[str, Any] = {
        "snapshots_dir": directory,
        "chunk_size": 256,
        "fsync": False,
        "chunk_timeout": 5.0,
        "cleanup_retain_count": 2,
        # These tests pin "a failed transfer leaves nothing"; keeping a
        # resumable partial is tested in test_resume.py.
        "resume_ttl": 0,
    }
    base.update(kw)
    return SnapshotConfig(**base)


def puts(first: int, count: int, term: int = 1, tag: bytes = b"v") -> list[common_pb2.Entry]:
    return [
        _kv.command_entry(i, term, _kv.insert(b"k%d" % i, tag + b"%d" % i + _noise(i)))
        for i in range(first, first + count)
    ]


def _noise(i: int) -> bytes:
    """Incompressible-ish bytes, so small snapshots still span many chunks."""
    return hashlib.sha256(b"%d" % i).hexdigest().encode()


def acks_of(acks: list[Ack]) -> list[tuple[int, int, int]]:
    return [(a.seq, a.status, a.next_requested) for a in acks]


def accepted(n: int) -> list[tuple[int, int, int]]:
    return [(s, ACCEPTED, s + 1) for s in range(n)]


@dataclass
class Pair:
    leader: StateMachineHandler
    follower: StateMachineHandler
    tmp: Path
    acks: list[Ack]

    @property
    def fdir(self) -> Path:
        return self.follower.config.snapshots_dir

    def snapshot(self) -> tuple[Meta, list[Chunk]]:
        meta, _ = self.leader.create_snapshot()
        return meta, list(self.leader.load_snapshot_data(meta))

    def transfer(
        self,
        meta: Meta | None = None,
        stream: Iterable[Chunk] | None = None,
        config: SnapshotConfig | None = None,
    ) -> Meta:
        """Pipe the leader's snapshot (or ``stream``) into the follower."""
        if stream is None:
            if meta is None:
                meta, _ = self.leader.create_snapshot()
            stream = self.leader.load_snapshot_data(meta)
        self.acks.clear()
        return self.follower.apply_snapshot_stream_from_leader(1, stream, self.acks.append, config)

    def state(self) -> tuple[object, ...]:
        sm = self.follower.state_machine
        assert isinstance(sm, MemoryStateMachine)
        latest = self.follower.get_latest_snapshot_metadata()
        files = (
            sorted(
                (p.name, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in self.fdir.iterdir()
                if p.is_file() and p.name != ".lock"
            )
            if self.fdir.is_dir()
            else []
        )
        return (
            sm.items(),
            self.follower.last_applied(),
            latest.SerializeToString() if latest is not None else None,
            files,
        )

    def leftovers(self) -> list[str]:
        if not self.fdir.is_dir():
            return []
        return sorted(p.name for p in self.fdir.iterdir() if p.name.startswith("temp-"))


@pytest.fixture
def leader_follower(tmp_path: Path) -> Iterator[Pair]:
    leader = StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "leader"), node_id=1)
    follower = StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "follower"), node_id=2)
    with leader, follower:
        leader.apply_chunk(puts(1, 60, term=1))
        leader.apply_chunk(puts(61, 40, term=3))
        # The follower has its own history and an older snapshot to lose.
        follower.apply_chunk(puts(1, 5, tag=b"old"))
        follower.create_snapshot()
        yield Pair(leader, follower, tmp_path, [])


def assert_refused(pair: Pair, before: tuple[object, ...]) -> None:
    assert pair.state() == before
    assert pair.leftovers() == []
    assert not pair.follower.snapshot_in_progress()


# -- round trip ------------------------------------------------------------------------
def test_round_trip_multi_chunk(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    assert len(sent) > 3
    woke = threading.Event()

    def wait() -> None:
        pair.follower.wait_applied(100, WAIT)
        woke.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    progress: list[tuple[str, int, int]] = []
    got = pair.follower.apply_snapshot_stream_from_leader(
        1,
        pair.leader.load_snapshot_data(meta),
        pair.acks.append,
        progress=lambda *a: progress.append(a),
    )
    waiter.join(WAIT)
    assert woke.is_set()
    assert got == meta
    assert acks_of(pair.acks) == accepted(len(sent))
    assert pair.follower.last_applied() == 100
    fsm, lsm = pair.follower.state_machine, pair.leader.state_machine
    assert isinstance(fsm, MemoryStateMachine) and isinstance(lsm, MemoryStateMachine)
    assert fsm.items() == lsm.items()
    assert fsm.get(b"k1") == b"v1" + _noise(1)  # the follower's own "old" values are gone
    assert pair.follower.get_latest_snapshot_metadata() == meta
    kept = pair.fdir / "snapshot-100-3.tar.gz"
    assert hashlib.sha256(kept.read_bytes()).digest() == meta.checksum
    assert {p for p, _, _ in progress} >= {"receive", "unpack", "install"}
    assert pair.leftovers() == []
    # New entries continue from the snapshot.
    pair.follower.apply_chunk(puts(101, 1))
    assert pair.follower.last_applied() == 101


def test_follower_serves_the_snapshot_onward(leader_follower: Pair) -> None:
    pair = leader_follower
    meta = pair.transfer()
    third_sm = MemoryStateMachine()
    with StateMachineHandler(third_sm, cfg(pair.tmp / "third"), node_id=3) as third:
        stream = pair.follower.load_snapshot_data(meta)
        acks: list[Ack] = []
        third.apply_snapshot_stream_from_leader(1, stream, acks.append)
        assert third.last_applied() == 100
    lsm = pair.leader.state_machine
    assert isinstance(lsm, MemoryStateMachine)
    assert third_sm.items() == lsm.items()
    assert all(a.status == ACCEPTED for a in acks)


def test_round_trip_generator_stream_and_tiny_chunks(tmp_path: Path) -> None:
    config = cfg(tmp_path / "l", chunk_size=7)
    with (
        StateMachineHandler(MemoryStateMachine(), config, node_id=1) as leader,
        StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "f"), node_id=2) as follower,
    ):
        leader.apply_chunk(puts(1, 3))
        meta, _ = leader.create_snapshot()
        acks: list[Ack] = []
        follower.apply_snapshot_stream_from_leader(
            1, (c for c in leader.load_snapshot_data(meta)), acks.append
        )
        assert follower.read_from_state_machine([b"k1", b"k3"]) is not None
        assert len(acks) > 20


# -- load_snapshot_chunk / load_snapshot_data (G060-G062) ---------------------------------
def test_load_snapshot_chunk_matches_the_stream(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    for c in sent:
        one = pair.leader.load_snapshot_chunk(meta, c.seq)
        assert one.SerializeToString() == c.SerializeToString()
        assert one.HasField("metadata") == (c.seq == 0)
        assert one.leader_id == 1
        assert one.leader_term == meta.last_included.term == 3
        assert wire.verify_chunk(one)
    assert sent[0].metadata == meta
    with pytest.raises(ChunkOutOfRange) as info:
        pair.leader.load_snapshot_chunk(meta, len(sent))
    assert (info.value.seq, info.value.total) == (len(sent), len(sent))
    assert pair.leader.load_snapshot_chunk(meta, 1, leader_term=7).leader_term == 7
    assert all(c.leader_term == 9 for c in pair.leader.load_snapshot_data(meta, leader_term=9))
    body = b"".join(c.data for c in sent)
    assert hashlib.sha256(body).digest() == meta.checksum


def test_load_missing_or_bad_metadata(leader_follower: Pair) -> None:
    pair = leader_follower
    missing = Meta(last_included=LogId(index=999, term=1))
    with pytest.raises(SnapshotNotFound):
        pair.leader.load_snapshot_data(missing)
    with pytest.raises(SnapshotNotFound):
        pair.leader.load_snapshot_chunk(missing, 0)
    for call in (
        lambda: pair.leader.load_snapshot_data(Meta()),
        lambda: pair.leader.load_snapshot_chunk(Meta(), 0),
    ):
        with pytest.raises(SnapshotError, match="last_included"):
            call()


# -- receive failure modes -----------------------------------------------------------------------
def with_meta(c: Chunk, **changes: Any) -> Chunk:
    out = Chunk()
    out.CopyFrom(c)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def bad_crc(c: Chunk) -> Chunk:
    return with_meta(c, chunk_checksum=b"\0\0\0\0")


def expect_failure(
    pair: Pair,
    stream: Iterable[Chunk],
    error: type[BaseException],
    acks: list[tuple[int, int, int]],
    config: SnapshotConfig | None = None,
) -> BaseException:
    before = pair.state()
    with pytest.raises(error) as info:
        pair.transfer(stream=stream, config=config)
    assert acks_of(pair.acks) == acks
    assert_refused(pair, before)
    return info.value


def test_missing_metadata_on_first_chunk(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    first = Chunk()
    first.CopyFrom(sent[0])
    first.ClearField("metadata")
    expect_failure(pair, [first, *sent[1:]], SnapshotTransferError, [(0, FAILED, 0)])


@pytest.mark.parametrize("kind", [list, iter])
def test_empty_stream(
    leader_follower: Pair, kind: Callable[[list[Chunk]], Iterable[Chunk]]
) -> None:
    expect_failure(leader_follower, kind([]), SnapshotTransferError, [(0, FAILED, 0)])


def test_early_end(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    err = expect_failure(pair, sent[:3], SnapshotTransferError, [*accepted(3), (3, FAILED, 3)])
    assert isinstance(err, SnapshotTransferError) and err.status == "FAILED"


def test_gap(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    expect_failure(
        pair, [sent[0], sent[1], sent[3]], SnapshotTransferError, [*accepted(2), (3, FAILED, 2)]
    )


@pytest.mark.parametrize("field", ["leader_term", "leader_id"])
def test_leader_change_mid_stream(leader_follower: Pair, field: str) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    changed = with_meta(sent[2], **{field: getattr(sent[2], field) + 1})
    err = expect_failure(
        pair,
        [sent[0], sent[1], changed, *sent[3:]],
        SnapshotTransferError,
        [*accepted(2), (2, OUT_OF_ORDER, 2)],
    )
    assert isinstance(err, SnapshotTransferError) and err.status == "OUT_OF_ORDER"


def test_checksum_mismatch_then_resend_is_accepted(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    stream = [sent[0], bad_crc(sent[1]), *sent[1:]]
    assert pair.transfer(stream=stream) == meta
    assert acks_of(pair.acks) == [(0, ACCEPTED, 1), (1, MISMATCH, 1), *accepted(len(sent))[1:]]
    assert pair.follower.last_applied() == 100


def test_checksum_mismatch_of_chunk_zero_then_resend(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    assert pair.transfer(stream=[bad_crc(sent[0]), *sent]) == meta
    assert acks_of(pair.acks) == [(0, MISMATCH, 0), *accepted(len(sent))]


def test_checksum_mismatch_beyond_max_retries(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    retries = pair.follower.config.max_chunk_retries
    stream = [sent[0], *[bad_crc(sent[1])] * (retries + 1), *sent[1:]]
    expect_failure(
        pair,
        stream,
        SnapshotTransferError,
        [(0, ACCEPTED, 1), *[(1, MISMATCH, 1)] * retries, (1, FAILED, 1)],
    )


def test_duplicate_chunk_is_re_acked(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    stream = [sent[0], sent[1], sent[1], sent[0], *sent[2:]]
    assert pair.transfer(stream=stream) == meta
    assert acks_of(pair.acks) == [
        (0, ACCEPTED, 1),
        (1, ACCEPTED, 2),
        (1, ACCEPTED, 2),
        (0, ACCEPTED, 2),
        *accepted(len(sent))[2:],
    ]
    lsm, fsm = pair.leader.state_machine, pair.follower.state_machine
    assert isinstance(lsm, MemoryStateMachine) and isinstance(fsm, MemoryStateMachine)
    assert fsm.items() == lsm.items()


def test_extra_chunk_beyond_total(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    n = len(sent)
    extra = wire.make_chunk(
        seq=n, total=n + 1, data=b"x", leader_term=3, leader_id=1, metadata=None
    )
    extra.total_chunks = n
    expect_failure(pair, [*sent, extra], SnapshotTransferError, [*accepted(n), (n, FAILED, n)])


def test_sha256_mismatch(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    first = Chunk()
    first.CopyFrom(sent[0])
    first.metadata.checksum = bytes(32)
    n = len(sent)
    err = expect_failure(
        pair, [first, *sent[1:]], SnapshotTransferError, [*accepted(n), (n, FAILED, n)]
    )
    assert "SHA-256" in str(err)


def test_stale_snapshot(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    pair.follower.apply_chunk(puts(6, 95))  # follower at 100 == last_included
    err = expect_failure(pair, sent, StaleSnapshotError, [(0, FAILED, 0)])
    assert isinstance(err, StaleSnapshotError)
    assert (err.snapshot_index, err.last_applied) == (100, 100)


def test_chunk_timeout_on_a_blocked_iterator(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    never = threading.Event()

    def stalls() -> Iterator[Chunk]:
        yield sent[0]
        yield sent[1]
        never.wait(60)  # a peer that stops sending

    config = cfg(pair.fdir, chunk_timeout=0.3)
    try:
        err = expect_failure(
            pair, stalls(), SnapshotTransferError, [*accepted(2), (2, FAILED, 2)], config
        )
    finally:
        never.set()
    assert "no chunk received" in str(err)


def test_iterator_raising_mid_stream(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()

    def breaks() -> Iterator[Chunk]:
        yield sent[0]
        yield sent[1]
        raise ConnectionResetError("peer went away")

    err = expect_failure(pair, breaks(), SnapshotTransferError, [*accepted(2), (2, FAILED, 2)])
    assert isinstance(err.__cause__, ConnectionResetError)


def test_stream_of_non_chunks(leader_follower: Pair) -> None:
    pair = leader_follower
    _, sent = pair.snapshot()
    bad: list[Any] = [sent[0], b"not a chunk"]
    expect_failure(pair, bad, SnapshotTransferError, [(0, ACCEPTED, 1), (1, FAILED, 1)])


def test_install_while_create_runs_is_in_progress(tmp_path: Path) -> None:
    class Blocking(MemoryStateMachine):
        entered = threading.Event()
        release = threading.Event()

        def generate_snapshot_data(self, dir: Path, last_included: LogId) -> None:
            self.entered.set()
            assert self.release.wait(WAIT)
            super().generate_snapshot_data(dir, last_included)

    sm = Blocking()
    with (
        StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "l"), node_id=1) as leader,
        StateMachineHandler(sm, cfg(tmp_path / "f"), node_id=2) as follower,
    ):
        leader.apply_chunk(puts(1, 20))
        meta, _ = leader.create_snapshot()
        follower.apply_chunk(puts(1, 2))
        creator = threading.Thread(target=follower.create_snapshot)
        creator.start()
        acks: list[Ack] = []
        try:
            assert sm.entered.wait(WAIT)
            with pytest.raises(SnapshotInProgress):
                follower.apply_snapshot_stream_from_leader(
                    1, leader.load_snapshot_data(meta), acks.append
                )
        finally:
            sm.release.set()
            creator.join(WAIT)
        assert acks_of(acks) == [(0, FAILED, 0)]
        assert follower.last_applied() == 2
        follower.apply_snapshot_stream_from_leader(1, leader.load_snapshot_data(meta), acks.append)
        assert follower.last_applied() == 20


def test_create_while_install_runs_is_in_progress(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    midway = threading.Event()
    resume = threading.Event()

    def slow() -> Iterator[Chunk]:
        for c in sent:
            if c.seq == 2:
                midway.set()
                assert resume.wait(WAIT)
            yield c

    result: list[Meta] = []
    t = threading.Thread(target=lambda: result.append(pair.transfer(stream=slow())))
    t.start()
    try:
        assert midway.wait(WAIT)
        assert pair.follower.snapshot_in_progress()
        with pytest.raises(SnapshotInProgress):
            pair.follower.create_snapshot()
        with pytest.raises(SnapshotInProgress):
            pair.follower.cleanup_snapshot(1)
    finally:
        resume.set()
        t.join(WAIT)
    assert result == [meta]


def test_a_failed_transfer_never_spoils_the_next(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    with pytest.raises(SnapshotTransferError):
        pair.transfer(stream=sent[:-1])
    with pytest.raises(SnapshotTransferError):
        pair.transfer(stream=[sent[0], sent[2]])
    assert pair.transfer(stream=sent) == meta
    assert acks_of(pair.acks) == accepted(len(sent))
    assert pair.follower.last_applied() == 100


# -- hostile archives ------------------------------------------------------------------------------
# A member: (name, tar type, data or link target).
Member = tuple[str, bytes, bytes]
REG, SYM, LNK = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
OK: Member = ("kv.bin", REG, b"x" * 10)


def _tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == REG:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload.decode()
                tar.addfile(info)
    return buf.getvalue()


MALICIOUS: dict[str, list[Member]] = {
    "absolute": [OK, ("/tmp/d-engine-sm-evil", REG, b"evil")],
    "dotdot": [OK, ("../evil", REG, b"evil")],
    "nested_dotdot": [OK, ("a/b/../../../evil", REG, b"evil")],
    "symlink": [("link", SYM, b".."), ("link/evil", REG, b"evil")],
    "symlink_abs": [("kv.bin", SYM, b"/etc/passwd")],
    "hardlink": [("kv.bin", LNK, b"/etc/passwd")],
    "chardev": [("dev", tarfile.CHRTYPE, b"")],
    "blockdev": [("blk", tarfile.BLKTYPE, b"")],
    "fifo": [("fifo", tarfile.FIFOTYPE, b"")],
    "too_many_members": [(f"f{i}", REG, b"") for i in range(20)],
    "oversize": [("kv.bin", REG, b"\0" * 5000)],
    "duplicate": [("kv.bin", REG, b"evil"), ("kv.bin", REG, b"evil")],
}


def _send_archive(pair: Pair, blob: bytes, checksum: bytes, config: SnapshotConfig) -> Meta:
    meta = Meta(last_included=LogId(index=500, term=4), checksum=checksum)
    size = config.chunk_size
    total = wire.chunk_count(len(blob), size)
    stream = [
        wire.make_chunk(
            seq=s,
            total=total,
            data=blob[a:b],
            leader_term=4,
            leader_id=1,
            metadata=meta if s == 0 else None,
        )
        for s in range(total)
        for a, b in [wire.chunk_bounds(s, len(blob), size)]
    ]
    return pair.transfer(stream=stream, config=config)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_is_refused(leader_follower: Pair, case: str) -> None:
    pair = leader_follower
    blob = _tar(MALICIOUS[case])
    config = cfg(pair.fdir, max_archive_members=10, max_unpacked_bytes=4096)
    before, tree = pair.state(), _tree(pair.tmp)
    outside = Path("/tmp/d-engine-sm-evil")
    with pytest.raises((UnsafeArchiveError, CorruptSnapshotError)):
        _send_archive(pair, blob, hashlib.sha256(blob).digest(), config)
    n = wire.chunk_count(len(blob), config.chunk_size)
    assert acks_of(pair.acks) == [*accepted(n), (n, FAILED, n)]
    assert_refused(pair, before)
    assert _tree(pair.tmp) == tree
    assert not outside.exists() and not (pair.tmp / "evil").exists()


def test_byte_flips_with_original_checksum_are_refused(leader_follower: Pair) -> None:
    pair = leader_follower
    meta, sent = pair.snapshot()
    blob = b"".join(c.data for c in sent)
    before = pair.state()
    rng = random.Random(1234)
    for pos in rng.sample(range(len(blob)), 50):
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(SnapshotError):
            _send_archive(pair, bytes(flipped), meta.checksum, pair.follower.config)
        assert_refused(pair, before)


def test_byte_flips_without_checksum_never_install_differently(tmp_path: Path) -> None:
    """No SHA-256 to lean on: gzip CRC + tar checks refuse, or the state is identical."""
    with StateMachineHandler(MemoryStateMachine(), cfg(tmp_path / "l"), node_id=1) as leader:
        leader.apply_chunk(puts(1, 100))
        meta, path = leader.create_snapshot()
        blob = path.read_bytes()
        lsm = leader.state_machine
        assert isinstance(lsm, MemoryStateMachine)
        expected = lsm.items()
    rng = random.Random(99)
    for n, pos in enumerate(rng.sample(range(len(blob)), 40)):
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << rng.randrange(8)
        fsm = MemoryStateMachine()
        with StateMachineHandler(fsm, cfg(tmp_path / f"f{n}"), node_id=2) as follower:
            pair = Pair(leader, follower, tmp_path, [])
            try:
                _send_archive(pair, bytes(flipped), b"", follower.config)
            except SnapshotError:
                assert fsm.items() == {} and follower.last_applied() == 0
            else:
                assert fsm.items() == expected
            assert pair.leftovers() == []
    assert meta.last_included.index == 100
