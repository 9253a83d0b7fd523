"""The snapshots directory: listing, temp files, publish, prune (B090-B093),
the cross-process writer lock, start-up recovery and free-space admission."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from d_engine_sm._fs import FileOps
from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.store import ArchiveInfo, SnapshotStore
from d_engine_sm.errors import InsufficientSpace, SnapshotInProgress, SnapshotNotFound


class RecordingOps(FileOps):
    """Real file operations that remember each announced step."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.fsyncs = 0

    def announce(self, step: str) -> None:
        self.steps.append(step)

    def fsync(self, f: BinaryIO) -> None:
        self.fsyncs += 1
        super().fsync(f)


class FailingReplace(RecordingOps):
    def replace(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EIO, "injected at replace")


class NoSpace(FileOps):
    def disk_free(self, path: Path) -> int:
        return 0


class VanishingRemove(FileOps):
    """Someone else deletes the file just before we do."""

    def remove(self, path: Path) -> None:
        os.unlink(path)
        super().remove(path)


class DeniedRemove(FileOps):
    def remove(self, path: Path) -> None:
        raise PermissionError(errno.EACCES, "injected", str(path))


def touch(path: Path, data: bytes = b"dummy snapshot data") -> Path:
    path.write_bytes(data)
    return path


def names(directory: Path) -> set[str]:
    return set(os.listdir(directory))


def real_archive(store: SnapshotStore, tmp_path: Path, index: int, term: int) -> Path:
    src = tmp_path / f"src-{index}-{term}"
    src.mkdir()
    (src / "kv.bin").write_bytes(f"state at {index}".encode() * 100)
    with store.temp_archive("create") as (temp, out):
        archive.pack(src, out)
    return store.publish(temp, index, term)


@pytest.fixture
def snapdir(tmp_path: Path) -> Path:
    d = tmp_path / "snapshots"
    d.mkdir()
    return d


# -- construction, names, listing ---------------------------------------------------


def test_constructor_does_no_io(tmp_path: Path) -> None:
    """B008: the directory need not exist, and nothing is created."""
    store = SnapshotStore(tmp_path / "never" / "created", "snapshot-")
    assert store.list_archives() == []
    assert store.latest() is None
    assert store.find(1, 1) is None
    assert not (tmp_path / "never").exists()


def test_constructor_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SnapshotStore(tmp_path, "")
    with pytest.raises(ValueError):
        SnapshotStore(tmp_path, "a/b")
    with pytest.raises(ValueError):
        SnapshotStore(tmp_path, "snapshot-", keep_broken=-1)


def test_archive_path_and_temp_paths(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    assert store.archive_path(100, 5) == snapdir / "snapshot-100-5.tar.gz"
    temps = {store.new_temp_path("create") for _ in range(200)}
    assert len(temps) == 200
    for p in temps:
        assert p.parent == snapdir
        assert re.fullmatch(rf"temp-create-{os.getpid()}-[0-9a-f]{{16}}", p.name)
    assert names(snapdir) == set()  # nothing created


def test_list_skips_odd_names_and_sorts_numerically(
    snapdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for n in ("snapshot-1-1.tar.gz", "snapshot-10-2.tar.gz", "snapshot-2-1.tar.gz"):
        touch(snapdir / n)
    touch(snapdir / "snapshot-2-0.tar.gz")  # same index, lower term
    touch(snapdir / "temp-create-1-ab")
    touch(snapdir / ".lock", b"")
    touch(snapdir / "snapshot-3-1.tar.gz.broken")
    touch(snapdir / "snapshot-bad-2-2.tar.gz")
    touch(snapdir / "snap-5-1.tar.gz")
    touch(snapdir / "snapshot-7-1.tar")
    (snapdir / "snapshot-4-1.tar.gz").mkdir()  # a directory, not an archive
    (snapdir / "invalid_format").mkdir()
    (snapdir / "snapshot-9-9.tar.gz.link").symlink_to(snapdir / "snapshot-1-1.tar.gz")
    store = SnapshotStore(snapdir, "snapshot-")

    with caplog.at_level(logging.WARNING, logger="d_engine_sm.snapshot"):
        first = store.list_archives()
        second = store.list_archives()

    assert first == second
    assert [(a.index, a.term) for a in first] == [(1, 1), (2, 0), (2, 1), (10, 2)]
    assert all(a.path == snapdir / f"snapshot-{a.index}-{a.term}.tar.gz" for a in first)
    latest = store.latest()
    assert latest is not None
    assert (latest.index, latest.term) == (10, 2)
    warned = [r.getMessage() for r in caplog.records]
    for odd in ("snapshot-bad-2-2.tar.gz", "snap-5-1.tar.gz", "snapshot-7-1.tar"):
        assert sum(odd in m for m in warned) == 1, odd  # once per name, not per listing
    assert not any("temp-create" in m or ".lock" in m or ".broken" in m for m in warned)


@pytest.mark.parametrize(
    "prefix", ["s-", "snap", "node1-snap-", "a-very-long-prefix-with-digits-123-", "x"]
)
def test_custom_prefixes_parse_exactly(snapdir: Path, prefix: str) -> None:
    store = SnapshotStore(snapdir, prefix)
    for index, term in [(12345678, 3), (1, 1), (2**64 - 1, 7)]:
        touch(store.archive_path(index, term))
    touch(snapdir / "snapshot-5-5.tar.gz")  # another prefix's file
    listed = [(a.index, a.term) for a in store.list_archives()]
    # "snapshot-5-5.tar.gz" is not ours, even for prefix "snap" ("shot-5-5" is no LogId)
    assert listed == [(1, 1), (12345678, 3), (2**64 - 1, 7)]
    found = store.find(12345678, 3)
    assert found == ArchiveInfo(12345678, 3, snapdir / f"{prefix}12345678-3.tar.gz")
    assert store.find(12345678, 4) is None


def test_archive_info_orders_by_index_then_term() -> None:
    a = ArchiveInfo(2, 9, Path("z"))
    b = ArchiveInfo(10, 1, Path("a"))
    c = ArchiveInfo(10, 2, Path("a"))
    assert sorted([c, b, a]) == [a, b, c]
    assert max([a, c, b]) == c


# -- temp files and publish -------------------------------------------------------------


def test_temp_archive_clean_exit_fsyncs_and_closes(snapdir: Path) -> None:
    ops = RecordingOps()
    store = SnapshotStore(snapdir, "snapshot-", fs=ops)
    with store.temp_archive("create") as (temp, out):
        out.write(b"archive bytes")
    assert out.closed
    assert temp.read_bytes() == b"archive bytes"
    assert ops.fsyncs == 1
    assert ops.steps == ["create:fsync"]


def test_temp_archive_without_fsync(snapdir: Path) -> None:
    ops = RecordingOps()
    store = SnapshotStore(snapdir, "snapshot-", fs=ops, fsync=False)
    with store.temp_archive("receive") as (temp, out):
        out.write(b"x")
    assert temp.read_bytes() == b"x"
    assert ops.fsyncs == 0


def test_temp_archive_removed_on_exception(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    with (
        pytest.raises(RuntimeError, match="generator failed"),
        store.temp_archive("create") as (temp, out),
    ):
        out.write(b"partial")
        assert temp.exists()
        raise RuntimeError("generator failed")
    assert out.closed
    assert not temp.exists()
    assert names(snapdir) == set()


def test_temp_archive_never_reuses_a_leftover(snapdir: Path) -> None:
    leftover = touch(snapdir / f"temp-receive-{os.getpid()}-0123456789abcdef", b"stale bytes")
    store = SnapshotStore(snapdir, "snapshot-")
    for _ in range(20):
        with store.temp_archive("receive") as (temp, out):
            assert temp != leftover
            out.write(b"fresh")
        assert temp.read_bytes() == b"fresh"  # not appended to anything
        temp.unlink()
    assert leftover.read_bytes() == b"stale bytes"


def test_open_write_is_exclusive(snapdir: Path) -> None:
    """The seam refuses an existing path, so a name clash can never append."""
    path = touch(snapdir / "temp-x-1", b"old")
    with pytest.raises(FileExistsError):
        FileOps().open_write(path)


def test_publish_renames_and_syncs_dir(snapdir: Path) -> None:
    ops = RecordingOps()
    store = SnapshotStore(snapdir, "snapshot-", fs=ops)
    with store.temp_archive("create") as (temp, out):
        out.write(b"new archive")
    final = store.publish(temp, 7, 2)
    assert final == snapdir / "snapshot-7-2.tar.gz"
    assert final.read_bytes() == b"new archive"
    assert not temp.exists()
    assert ops.steps == ["create:fsync", "publish:rename", "publish:fsync_dir"]
    assert store.find(7, 2) == ArchiveInfo(7, 2, final)


def test_publish_without_fsync_skips_dir_sync(snapdir: Path) -> None:
    ops = RecordingOps()
    store = SnapshotStore(snapdir, "snapshot-", fs=ops, fsync=False)
    with store.temp_archive("create") as (temp, _out):
        pass
    store.publish(temp, 1, 1)
    assert ops.steps == ["publish:rename"]


def test_publish_failure_leaves_previous_archives_intact(snapdir: Path) -> None:
    good = SnapshotStore(snapdir, "snapshot-")
    touch(good.archive_path(1, 1), b"one")
    touch(good.archive_path(2, 1), b"two")
    store = SnapshotStore(snapdir, "snapshot-", fs=FailingReplace())

    with store.temp_archive("create") as (temp, out):
        out.write(b"three")
    # The caller's pattern: a failed publish removes its temp file.
    with pytest.raises(OSError) as info:
        try:
            store.publish(temp, 3, 1)
        except BaseException:
            store.remove_quietly(temp)
            raise
    assert info.value.errno == errno.EIO
    assert not temp.exists()
    assert names(snapdir) == {"snapshot-1-1.tar.gz", "snapshot-2-1.tar.gz"}
    assert good.archive_path(1, 1).read_bytes() == b"one"
    assert good.archive_path(2, 1).read_bytes() == b"two"


# -- prune (B090-B093) --------------------------------------------------------------------


def test_b090_keeps_newest_retain_count(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    for i in (1, 2, 3):
        touch(store.archive_path(i, 1))
    removed = store.prune(2)
    assert removed == [snapdir / "snapshot-1-1.tar.gz"]
    assert names(snapdir) == {"snapshot-2-1.tar.gz", "snapshot-3-1.tar.gz"}
    assert all((snapdir / n).is_file() for n in names(snapdir))


def test_b091_noop_when_within_retain(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    for i in (3, 4):
        touch(store.archive_path(i, 1))
    assert store.prune(2) == []
    assert names(snapdir) == {"snapshot-3-1.tar.gz", "snapshot-4-1.tar.gz"}


def test_b092_ignores_non_archives(snapdir: Path) -> None:
    for d in ("snapshot-1-1", "invalid_format", "snapshot-bad-2-2"):
        (snapdir / d).mkdir()
    touch(snapdir / "snapshot-bad-3-3.tar.gz")
    touch(snapdir / "snapshot-0-1.tar.gz.broken")
    touch(snapdir / "temp-create-1-aa")
    store = SnapshotStore(snapdir, "snapshot-")
    before = names(snapdir)
    assert store.prune(1) == []
    assert names(snapdir) == before


def test_b093_prune_needs_no_state_machine(snapdir: Path) -> None:
    """The store has no state machine to consult: prune works from names alone."""
    store = SnapshotStore(snapdir, "custom_")
    for i in (5, 6, 7, 8):
        touch(store.archive_path(i, 2))
    assert store.prune(3) == [snapdir / "custom_5-2.tar.gz"]


@pytest.mark.parametrize("retain", [0, -1])
def test_prune_retain_below_one(snapdir: Path, retain: int) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    touch(store.archive_path(1, 1))
    with pytest.raises(ValueError, match="retain"):
        store.prune(retain)
    assert names(snapdir) == {"snapshot-1-1.tar.gz"}


def test_prune_by_index_not_mtime_and_newest_kept(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    for i in (1, 2, 30):
        touch(store.archive_path(i, 1))
    os.utime(store.archive_path(1, 1), (4_000_000_000, 4_000_000_000))  # "newest" by mtime
    removed = store.prune(1)
    assert sorted(removed) == [store.archive_path(1, 1), store.archive_path(2, 1)]
    assert names(snapdir) == {"snapshot-30-1.tar.gz"}


def test_prune_announces_each_remove(snapdir: Path) -> None:
    ops = RecordingOps()
    store = SnapshotStore(snapdir, "snapshot-", fs=ops)
    for i in (1, 2, 3):
        touch(store.archive_path(i, 1))
    store.prune(1)
    assert ops.steps == ["prune:remove", "prune:remove", "prune:fsync_dir"]


def test_prune_tolerates_vanished_file(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-", fs=VanishingRemove())
    for i in (1, 2):
        touch(store.archive_path(i, 1))
    assert store.prune(1) == []  # someone else removed it: not ours to report
    assert names(snapdir) == {"snapshot-2-1.tar.gz"}


def test_prune_skips_archive_a_reader_holds(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    for i in (1, 2, 3):
        touch(store.archive_path(i, 1), f"archive {i}".encode())
    held = store.find(1, 1)
    assert held is not None

    with store.open_reader(held) as reader:
        assert store.prune(1) == [store.archive_path(2, 1)]
        assert reader.read(0, reader.size) == b"archive 1"
        assert held.path.exists()

    assert store.prune(1) == [store.archive_path(1, 1)]
    assert names(snapdir) == {"snapshot-3-1.tar.gz"}


def test_prune_skips_archive_a_reader_thread_holds(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    for i in (1, 2):
        touch(store.archive_path(i, 1))
    opened, release = threading.Event(), threading.Event()
    old = store.find(1, 1)
    assert old is not None

    def reader() -> None:
        with store.open_reader(old):
            opened.set()
            release.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert opened.wait(10)
        assert store.prune(1) == []
    finally:
        release.set()
        t.join(10)
    assert store.prune(1) == [old.path]


# -- readers -----------------------------------------------------------------------------


def test_open_reader_maps_and_reads(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    payload = b"1234567890ABCDEF"
    touch(store.archive_path(1, 1), payload)
    info = store.find(1, 1)
    assert info is not None
    with store.open_reader(info) as reader:
        assert reader.size == 16
        assert reader.mmap is not None
        assert reader.mmap[:] == payload
        assert [reader.read(s, min(s + 4, 16)) for s in range(0, 16, 4)] == [
            b"1234",
            b"5678",
            b"90AB",
            b"CDEF",
        ]
        assert reader.read(16, 16) == b""
        with pytest.raises(ValueError, match="exceeds file size 16"):  # B108
            reader.read(0, 1000)
        with pytest.raises(ValueError):
            reader.read(5, 4)


def test_open_reader_empty_file(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    touch(store.archive_path(4, 1), b"")
    with store.open_reader(ArchiveInfo(4, 1, store.archive_path(4, 1))) as reader:
        assert reader.size == 0
        assert reader.mmap is None
        assert reader.read(0, 0) == b""


def test_open_reader_missing_or_directory(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    missing = ArchiveInfo(9, 9, store.archive_path(9, 9))
    with pytest.raises(SnapshotNotFound), store.open_reader(missing):
        pass
    store.archive_path(6, 1).mkdir()  # B104: the path is a directory
    directory = ArchiveInfo(6, 1, store.archive_path(6, 1))
    with pytest.raises(SnapshotNotFound), store.open_reader(directory):
        pass


# -- writer lock ---------------------------------------------------------------------------

_HOLD_LOCK = """
import sys, filelock
lock = filelock.FileLock(sys.argv[1])
lock.acquire(timeout=10)
print("locked", flush=True)
sys.stdin.read()
"""


def test_writer_lock_held_by_another_process(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(snapdir / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(SnapshotInProgress), store.writer_lock():
            pytest.fail("entered while another process holds the lock")
        proc.stdin.close()  # the holder exits, releasing the lock
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    with store.writer_lock():
        pass


def test_writer_lock_held_by_another_thread(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.writer_lock():
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(SnapshotInProgress), store.writer_lock():
            pass
    finally:
        release.set()
        t.join(10)
    with store.writer_lock():  # released after the operation
        pass


def test_writer_lock_creates_dir(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "new" / "snaps", "snapshot-")
    with store.writer_lock():
        assert (tmp_path / "new" / "snaps").is_dir()
    assert store.list_archives() == []


# -- recovery ------------------------------------------------------------------------------


def test_recover_missing_dir_creates_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "absent", "snapshot-")
    assert store.recover() is None
    assert not (tmp_path / "absent").exists()


def test_recover_removes_temp_leftovers(snapdir: Path, tmp_path: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    valid = real_archive(store, tmp_path, 3, 1)
    touch(snapdir / "temp-create-123-aaaa", b"half an archive")
    work = snapdir / "temp-work-123-bbbb"
    (work / "nested").mkdir(parents=True)
    touch(work / "nested" / "kv.bin")
    ops = RecordingOps()
    store = SnapshotStore(snapdir, "snapshot-", fs=ops)

    found = store.recover()

    assert found == (ArchiveInfo(3, 1, valid), archive.sha256_file(valid))
    assert names(snapdir) == {"snapshot-3-1.tar.gz"}
    assert ops.steps == ["recover:remove_temp", "recover:remove_temp"]


def test_recover_moves_corrupt_newest_aside(
    snapdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    one = real_archive(store, tmp_path, 1, 1)
    two = real_archive(store, tmp_path, 2, 1)
    three = real_archive(store, tmp_path, 3, 1)
    three.write_bytes(three.read_bytes()[:-50])  # torn write

    with caplog.at_level(logging.WARNING, logger="d_engine_sm.snapshot"):
        found = store.recover()

    assert found == (ArchiveInfo(2, 1, two), archive.sha256_file(two))
    assert names(snapdir) == {
        "snapshot-1-1.tar.gz",
        "snapshot-2-1.tar.gz",
        "snapshot-3-1.tar.gz.broken",
    }
    assert archive.verify(one) and archive.verify(two)
    assert any("snapshot-3-1.tar.gz" in r.getMessage() for r in caplog.records)
    latest = store.latest()
    assert latest is not None and latest.index == 2


def test_recover_all_corrupt(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    for i in (1, 2):
        touch(store.archive_path(i, 1), b"not an archive")
    assert store.recover() is None
    assert names(snapdir) == {"snapshot-1-1.tar.gz.broken", "snapshot-2-1.tar.gz.broken"}


def test_recover_keep_broken_bound(snapdir: Path, tmp_path: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-", keep_broken=3)
    for i, age in ((10, 300), (11, 200), (12, 100)):  # older broken ones, oldest first
        old = touch(snapdir / f"snapshot-{i}-1.tar.gz.broken")
        os.utime(old, (1_000_000 - age, 1_000_000 - age))
    real_archive(store, tmp_path, 20, 1)
    bad = real_archive(store, tmp_path, 21, 1)
    bad.write_bytes(b"\x1f\x8b" + bad.read_bytes()[2:40])

    found = store.recover()

    assert found is not None and found[0].index == 20
    broken = {n for n in names(snapdir) if n.endswith(".broken")}
    # the oldest (index 10) went; the fresh one was kept
    assert broken == {
        "snapshot-11-1.tar.gz.broken",
        "snapshot-12-1.tar.gz.broken",
        "snapshot-21-1.tar.gz.broken",
    }


def test_recover_keep_broken_zero(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-", keep_broken=0)
    touch(store.archive_path(1, 1), b"junk")
    assert store.recover() is None
    assert names(snapdir) == set()


def test_recover_announces_steps(snapdir: Path, tmp_path: Path) -> None:
    real_archive(SnapshotStore(snapdir, "snapshot-"), tmp_path, 1, 1)
    touch(snapdir / "snapshot-2-1.tar.gz", b"junk")
    touch(snapdir / "temp-receive-9-ff")
    ops = RecordingOps()
    store = SnapshotStore(snapdir, "snapshot-", fs=ops, keep_broken=0)
    store.recover()
    assert ops.steps == [
        "recover:remove_temp",
        "recover:rename_broken",
        "recover:fsync_dir",
        "recover:remove_broken",
    ]


def test_recover_custom_verify(snapdir: Path) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    touch(store.archive_path(1, 1), b"anything")
    seen: list[Path] = []

    def verify(path: Path) -> bytes:
        seen.append(path)
        return b"\x01" * 32

    assert store.recover(verify) == (ArchiveInfo(1, 1, store.archive_path(1, 1)), b"\x01" * 32)
    assert seen == [store.archive_path(1, 1)]


# -- space and removal ------------------------------------------------------------------------


def test_check_space(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "not" / "yet", "snapshot-", fs=NoSpace())
    store.check_space(0)
    with pytest.raises(InsufficientSpace) as info:
        store.check_space(1024)
    assert (info.value.needed, info.value.available) == (1024, 0)
    assert not (tmp_path / "not").exists()
    real = SnapshotStore(tmp_path, "snapshot-")
    real.check_space(1)
    with pytest.raises(ValueError):
        real.check_space(-1)


def test_remove_quietly(snapdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SnapshotStore(snapdir, "snapshot-")
    f = touch(snapdir / "temp-a-1")
    tree = snapdir / "temp-b-1"
    (tree / "x").mkdir(parents=True)
    touch(tree / "x" / "y")
    store.remove_quietly(f)
    store.remove_quietly(tree)
    store.remove_quietly(snapdir / "missing")
    assert names(snapdir) == set()

    denied = SnapshotStore(snapdir, "snapshot-", fs=DeniedRemove())
    g = touch(snapdir / "temp-c-1")
    with caplog.at_level(logging.WARNING, logger="d_engine_sm.snapshot"):
        denied.remove_quietly(g)
    assert g.exists()
    assert any("temp-c-1" in r.getMessage() for r in caplog.records)
