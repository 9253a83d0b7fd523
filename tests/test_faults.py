"""Disk faults through the FileOps seam: every call of every method, in create,
cleanup (prune) and install (receive).

A :class:`FaultOps` fails the Nth call of one chosen method once, with
``OSError(EIO)`` or ``OSError(ENOSPC)``; ``open_write`` can instead hand out
a file that fills the disk after K bytes. After each injected fault:

* the operation raised a SnapshotError-family error (never a bare OSError),
  ``ENOSPC`` as ``InsufficientSpace``;
* the previous archives are byte-identical, the state machine's items and
  ``last_applied`` are unchanged, ``get_latest_snapshot_metadata()`` too;
* no ``temp-*`` file or directory is left;
* the next attempt (the fault was one-shot) succeeds.

Faults after the point of no return are tolerated by design and listed in
``TOLERATED`` with the outcome asserted instead. ``CALLS`` pins how many
times each operation calls each method; ``test_call_counts`` fails when the
implementation changes them, so the parametrization never silently misses
a call.
"""

from __future__ import annotations

import errno
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from _seams import CREATE_STEPS, INSTALL_STEPS, FullDiskFile

from d_engine_sm import _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._fs import FileOps
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._memory import MemoryStateMachine
from d_engine_sm._snapshot import archive
from d_engine_sm.errors import InsufficientSpace, SnapshotError, StaleSnapshotError
from d_engine_sm.proto import common_pb2, storage_pb2

Meta = storage_pb2.SnapshotMetadata
FAILED = storage_pb2.SnapshotAck.FAILED
METHODS = (
    "open_write",
    "fsync",
    "replace",
    "fsync_dir",
    "mkdir",
    "remove",
    "remove_tree",
    "disk_free",
)
OPS = ("create", "cleanup", "install")

# How many times each operation calls each method in the scenarios below.
CALLS: dict[str, dict[str, int]] = {
    # work dir, free space, temp archive, fsync, rename, dir fsync (publish +
    # prune), prune one old archive, remove the work dir.
    "create": {
        "mkdir": 1,
        "disk_free": 1,
        "open_write": 1,
        "fsync": 1,
        "replace": 1,
        "fsync_dir": 2,
        "remove": 1,
        "remove_tree": 1,
    },
    # two old archives removed, one dir fsync.
    "cleanup": {"remove": 2, "fsync_dir": 1},
    # free space, temp archive, fsync, unpack dir, publish rename + dir fsync,
    # prune one old archive + its dir fsync, remove the unpack dir, then the
    # (already renamed) temp archive.
    "install": {
        "disk_free": 1,
        "open_write": 1,
        "fsync": 1,
        "mkdir": 1,
        "replace": 1,
        "fsync_dir": 2,
        "remove": 2,
        "remove_tree": 1,
    },
}

# (op, method, nth) -> why the failure is not reported: it happens after the
# point of no return, and the outcome asserted instead.
TOLERATED: dict[tuple[str, str, int], str] = {
    # Prune after publish: the new archive is out and recorded; the old one
    # stays until the next prune (asserted: cleanup_snapshot removes it).
    ("create", "remove", 1): "prune-after-publish",
    ("create", "fsync_dir", 2): "prune-after-publish",
    ("install", "remove", 1): "prune-after-publish",
    ("install", "fsync_dir", 2): "prune-after-publish",
    # Removing a work dir failed: logged, the leftover goes at the next
    # start-up (asserted: reopening the handler removes it).
    ("create", "remove_tree", 1): "leftover-until-restart",
    ("install", "remove_tree", 1): "leftover-until-restart",
    # The already-renamed temp archive: removing it is a no-op anyway.
    ("install", "remove", 2): "harmless",
    # Installed, then keeping the archive failed: the state is right, the
    # archive is not kept (latest metadata unchanged) until the next local
    # snapshot; a retry is refused as stale (DESIGN: on success the archive
    # is kept; install._keep_installed logs "keeping received archive failed").
    ("install", "replace", 1): "installed-not-kept",
    # Renamed, then the dir fsync failed: installed and the archive is on
    # disk under its final name, but not recorded until the next start-up.
    ("install", "fsync_dir", 1): "installed-kept-unrecorded",
}

# Faults where either outcome is consistent: raise with nothing changed, or
# succeed completely (the archive is renamed; only the dir fsync failed).
EITHER: set[tuple[str, str, int]] = {("create", "fsync_dir", 1)}

# (op, method, nth) -> a known contract violation: strict xfail (none open).
BUGS: dict[tuple[str, str, int], str] = {}


class Injected(OSError):
    """The injected fault (an OSError, so the code under test treats it as one)."""


class FaultOps(FileOps):
    """Fails the ``nth`` call of ``method`` once (counting only while armed).

    With ``full_after`` set, the first ``open_write`` returns a file that
    raises ENOSPC after that many bytes instead.
    """

    def __init__(
        self,
        method: str | None = None,
        nth: int = 0,
        err: int = errno.EIO,
        *,
        full_after: int | None = None,
        fail_step: str | None = None,
    ) -> None:
        self.method = method
        self.nth = nth
        self.err = err
        self.full_after = full_after
        self.fail_step = fail_step
        self.armed = False
        self.fired = False
        self.calls: Counter[str] = Counter()

    def _hit(self, name: str) -> None:
        if not self.armed:
            return
        self.calls[name] += 1
        if not self.fired and name == self.method and self.calls[name] == self.nth:
            self.fired = True
            raise Injected(self.err, f"injected {name} #{self.nth}: {errno.errorcode[self.err]}")

    def announce(self, step: str) -> None:
        if self.armed and not self.fired and step == self.fail_step:
            self.fired = True
            raise Injected(self.err, f"injected at step {step}")

    def open_write(self, path: Path) -> BinaryIO:
        self._hit("open_write")
        f = super().open_write(path)
        if self.armed and self.full_after is not None and not self.fired:
            self.fired = True
            return FullDiskFile(f, self.full_after, Injected)  # type: ignore[return-value]
        return f

    def fsync(self, f: BinaryIO) -> None:
        self._hit("fsync")
        super().fsync(f)

    def replace(self, src: Path, dst: Path) -> None:
        self._hit("replace")
        super().replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        self._hit("fsync_dir")
        super().fsync_dir(path)

    def mkdir(self, path: Path) -> None:
        self._hit("mkdir")
        super().mkdir(path)

    def remove(self, path: Path) -> None:
        self._hit("remove")
        super().remove(path)

    def remove_tree(self, path: Path) -> None:
        self._hit("remove_tree")
        super().remove_tree(path)

    def disk_free(self, path: Path) -> int:
        self._hit("disk_free")
        return super().disk_free(path)


# -- scenarios ------------------------------------------------------------------------
def cfg(directory: Path, retain: int = 2) -> SnapshotConfig:
    # fsync on: the fsync and dir-fsync steps only run when it is.
    return SnapshotConfig(
        snapshots_dir=directory, chunk_size=256, cleanup_retain_count=retain, fsync=True
    )


def entries(first: int, count: int, tag: bytes = b"v") -> list[common_pb2.Entry]:
    return [
        _kv.command_entry(
            i, 1, _kv.insert(b"k%d" % (i % 37), tag + hashlib.sha1(b"%d" % i).digest())
        )
        for i in range(first, first + count)
    ]


def archives(directory: Path) -> dict[str, bytes]:
    """Published archives (name -> SHA-256): not temp-*, not .lock."""
    if not directory.is_dir():
        return {}
    return {
        p.name: hashlib.sha256(p.read_bytes()).digest()
        for p in directory.iterdir()
        if p.name.endswith(".tar.gz") and not p.name.startswith("temp-")
    }


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("temp-"))


def serialized(meta: Meta | None) -> bytes | None:
    return None if meta is None else meta.SerializeToString()


@dataclass
class Node:
    """A handler over a MemoryStateMachine with the fault seam wired in."""

    directory: Path
    ops: FaultOps
    retain: int = 2
    node_id: int = 1
    sm: MemoryStateMachine = field(default_factory=MemoryStateMachine)
    handler: StateMachineHandler = field(init=False)

    def __post_init__(self) -> None:
        self.open()

    def open(self) -> None:
        self.handler = StateMachineHandler(
            self.sm, cfg(self.directory, self.retain), node_id=self.node_id, file_ops=self.ops
        )

    def reopen(self) -> None:
        self.handler.close()
        self.ops.armed = False
        self.open()

    def fill(self, count: int, tag: bytes = b"v") -> None:
        self.handler.apply_chunk(entries(self.handler.last_applied() + 1, count, tag))

    def view(self) -> tuple[object, ...]:
        return (
            self.sm.items(),
            self.handler.last_applied(),
            serialized(self.handler.get_latest_snapshot_metadata()),
            archives(self.directory),
        )


@dataclass
class Scenario:
    op: str
    tmp: Path
    ops: FaultOps
    node: Node = field(init=False)
    leader: Node | None = None
    acks: list[storage_pb2.SnapshotAck] = field(default_factory=list)
    result: object = None

    def __post_init__(self) -> None:
        if self.op == "create":
            # Two archives (20, 40) and more applied: the create prunes 20.
            self.node = Node(self.tmp / "node", self.ops)
            for _ in range(2):
                self.node.fill(20)
                self.node.handler.create_snapshot()
            self.node.fill(20)
        elif self.op == "cleanup":
            self.node = Node(self.tmp / "node", self.ops, retain=5)
            for _ in range(4):
                self.node.fill(10)
                self.node.handler.create_snapshot()
        else:
            self.leader = Node(self.tmp / "leader", FaultOps(), node_id=1)
            self.leader.fill(60)
            self.leader.handler.create_snapshot()
            # The follower has its own history and two snapshots: the install prunes one.
            self.node = Node(self.tmp / "follower", self.ops, node_id=2)
            for _ in range(2):
                self.node.fill(3, tag=b"old")
                self.node.handler.create_snapshot()

    def run(self) -> object:
        """The operation under test, with the seam armed."""
        self.ops.armed = True
        self.acks.clear()
        h = self.node.handler
        if self.op == "create":
            return h.create_snapshot()
        if self.op == "cleanup":
            return h.cleanup_snapshot(2)
        assert self.leader is not None
        meta = self.leader.handler.get_latest_snapshot_metadata()
        assert meta is not None
        return h.apply_snapshot_stream_from_leader(
            1, self.leader.handler.load_snapshot_data(meta), self.acks.append
        )

    def leader_view(self) -> tuple[dict[bytes, bytes], int, Meta]:
        assert self.leader is not None
        meta = self.leader.handler.get_latest_snapshot_metadata()
        assert meta is not None
        return self.leader.sm.items(), self.leader.handler.last_applied(), meta

    def check_success(self, result: object) -> None:
        """The operation's effect, as after a fault-free run."""
        h, d = self.node.handler, self.node.directory
        if self.op == "create":
            assert isinstance(result, tuple)
            meta, path = result
            assert meta.last_included.index == 60
            assert h.get_latest_snapshot_metadata() == meta
            assert archive.verify(path) == meta.checksum
        elif self.op == "cleanup":
            assert sorted(archives(d)) == ["snapshot-30-1.tar.gz", "snapshot-40-1.tar.gz"]
        else:
            items, applied, meta = self.leader_view()
            assert result == meta
            assert self.node.sm.items() == items and h.last_applied() == applied
            assert h.get_latest_snapshot_metadata() == meta


@pytest.fixture
def scenario_factory(tmp_path: Path) -> Iterator[Callable[[str, FaultOps], Scenario]]:
    made: list[Scenario] = []

    def make(op: str, ops: FaultOps) -> Scenario:
        s = Scenario(op, tmp_path / f"{op}-{len(made)}", ops)
        made.append(s)
        return s

    yield make
    for s in made:
        s.node.handler.close()
        if s.leader is not None:
            s.leader.handler.close()


def assert_refused_unchanged(s: Scenario, before: tuple[object, ...], exc: BaseException) -> None:
    """The failure contract: specific error, nothing changed, nothing left over."""
    assert isinstance(exc, SnapshotError), f"{type(exc).__name__} escaped: {exc!r}"
    if s.ops.err == errno.ENOSPC and s.op != "cleanup":
        assert isinstance(exc, InsufficientSpace), repr(exc)
    now = s.node.view()
    if s.op == "cleanup":
        # Prune is deletion: the newest two must be intact and nothing else touched
        # beyond the archives it was asked to remove.
        kept = {"snapshot-30-1.tar.gz", "snapshot-40-1.tar.gz"}
        assert now[:3] == before[:3]
        after, previous = now[3], before[3]
        assert isinstance(after, dict) and isinstance(previous, dict)
        assert kept <= set(after) and all(after[n] == previous[n] for n in after)
    else:
        assert now == before
    assert temps(s.node.directory) == []
    assert not s.node.handler.snapshot_in_progress()
    if s.op == "install":
        assert s.acks and s.acks[-1].status == FAILED  # the leader is told


# -- the matrix ---------------------------------------------------------------------------
def _matrix() -> Iterator[Any]:
    for op in OPS:
        for method, count in CALLS[op].items():
            for nth in range(1, count + 1):
                for err in (errno.EIO, errno.ENOSPC):
                    key = (op, method, nth)
                    marks = []
                    if key in BUGS:
                        marks.append(pytest.mark.xfail(strict=True, reason=BUGS[key]))
                    yield pytest.param(
                        op,
                        method,
                        nth,
                        err,
                        marks=marks,
                        id=f"{op}-{method}#{nth}-{errno.errorcode[err]}",
                    )


@pytest.mark.parametrize("op", OPS)
def test_call_counts(scenario_factory: Callable[[str, FaultOps], Scenario], op: str) -> None:
    """The matrix covers every call: a fault-free run makes exactly ``CALLS[op]``."""
    ops = FaultOps()
    s = scenario_factory(op, ops)
    s.check_success(s.run())
    assert dict(ops.calls) == CALLS[op]


@pytest.mark.parametrize(("op", "method", "nth", "err"), list(_matrix()))
def test_fault(
    scenario_factory: Callable[[str, FaultOps], Scenario], op: str, method: str, nth: int, err: int
) -> None:
    ops = FaultOps(method, nth, err)
    s = scenario_factory(op, ops)
    before = s.node.view()
    tolerated = TOLERATED.get((op, method, nth))
    try:
        result = s.run()
    except Exception as exc:  # classified below
        assert ops.fired
        assert tolerated is None, f"tolerated fault raised {exc!r}"
        assert_refused_unchanged(s, before, exc)
        s.check_success(s.run())  # one-shot: the next attempt succeeds
        return
    assert ops.fired
    if (op, method, nth) in EITHER:
        s.check_success(result)
        return
    assert tolerated is not None, f"fault at {method}#{nth} went unnoticed"
    check_tolerated(s, tolerated, result, before)


def check_tolerated(s: Scenario, how: str, result: object, before: tuple[object, ...]) -> None:
    h, d = s.node.handler, s.node.directory
    if how in ("prune-after-publish", "harmless", "leftover-until-restart"):
        s.check_success(result)
        if how == "leftover-until-restart":
            assert len(temps(d)) == 1
            s.node.reopen()  # start-up recovery removes it
        assert temps(d) == []
        h = s.node.handler
        h.cleanup_snapshot(2)  # a later prune catches up
        assert len(archives(d)) == 2
        return
    items, applied, meta = s.leader_view()
    assert s.node.sm.items() == items and h.last_applied() == applied
    assert serialized(h.get_latest_snapshot_metadata()) == before[2]
    assert temps(d) == []
    name = f"snapshot-{applied}-{meta.last_included.term}.tar.gz"
    if how == "installed-not-kept":
        assert archives(d) == before[3]
    else:  # installed-kept-unrecorded: kept on disk, found at the next start-up
        assert name in archives(d)
        s.node.reopen()
        assert s.node.handler.get_latest_snapshot_metadata() == meta
    with pytest.raises(StaleSnapshotError):  # a retry is refused: already installed
        s.run()


# -- a full disk midway through a write -----------------------------------------------------
@pytest.mark.parametrize("op", ["create", "install"])
@pytest.mark.parametrize("budget", [0, 100, 700])
def test_disk_full_midway(
    scenario_factory: Callable[[str, FaultOps], Scenario], op: str, budget: int
) -> None:
    ops = FaultOps(full_after=budget, err=errno.ENOSPC)
    s = scenario_factory(op, ops)
    before = s.node.view()
    with pytest.raises(InsufficientSpace) as info:
        s.run()
    assert_refused_unchanged(s, before, info.value)
    s.check_success(s.run())


def test_too_little_free_space_refuses_install_before_writing(
    scenario_factory: Callable[[str, FaultOps], Scenario],
) -> None:
    class Tiny(FaultOps):
        def disk_free(self, path: Path) -> int:
            return 10 if self.armed and not self.fired else super().disk_free(path)

    ops = Tiny()
    s = scenario_factory("install", ops)
    before = s.node.view()
    with pytest.raises(InsufficientSpace) as info:
        s.run()
    assert ops.calls["open_write"] == 0  # refused before any byte was written
    ops.fired = True
    assert_refused_unchanged(s, before, info.value)
    s.check_success(s.run())


# -- a failing announced step -----------------------------------------------------------------
# announce() is the crash tests' hook; raising from it models "the step it
# announces failed". Steps whose failure is tolerated, or leaks, as above.
STEPS: dict[str, tuple[str, ...]] = {
    "create": tuple(s for s in CREATE_STEPS if s != "ensure_dir:mkdir"),
    "cleanup": ("prune:remove", "prune:fsync_dir"),
    "install": tuple(INSTALL_STEPS),
}
STEP_TOLERATED: dict[tuple[str, str], str] = {
    ("create", "prune:remove"): "prune-after-publish",
    ("create", "prune:fsync_dir"): "prune-after-publish",
    ("install", "prune:remove"): "prune-after-publish",
    ("install", "prune:fsync_dir"): "prune-after-publish",
    ("install", "publish:rename"): "installed-not-kept",
    ("install", "publish:fsync_dir"): "installed-kept-unrecorded",
    # Recording in the state machine is advisory: the directory is the record.
    ("create", "record"): "harmless",
    ("install", "record"): "harmless",
    ("install", "install:publish"): "installed-not-kept",
    ("install", "install:flush"): "installed-not-kept",
}
STEP_EITHER = {("create", "publish:fsync_dir")}
STEP_BUGS: dict[tuple[str, str], str] = {}


def _steps() -> Iterator[Any]:
    for op, steps in STEPS.items():
        for step in steps:
            key = (op, step)
            marks = (
                [pytest.mark.xfail(strict=True, reason=STEP_BUGS[key])] if key in STEP_BUGS else []
            )
            yield pytest.param(op, step, marks=marks, id=f"{op}-{step}")


@pytest.mark.parametrize(("op", "step"), list(_steps()))
def test_failing_step(
    scenario_factory: Callable[[str, FaultOps], Scenario], op: str, step: str
) -> None:
    ops = FaultOps(fail_step=step)
    s = scenario_factory(op, ops)
    before = s.node.view()
    tolerated = STEP_TOLERATED.get((op, step))
    try:
        result = s.run()
    except Exception as exc:  # classified below
        assert ops.fired and tolerated is None, repr(exc)
        assert_refused_unchanged(s, before, exc)
        s.check_success(s.run())
        return
    assert ops.fired
    if (op, step) in STEP_EITHER:
        s.check_success(result)
        return
    assert tolerated is not None, f"failing {step} went unnoticed"
    check_tolerated(s, tolerated, result, before)
