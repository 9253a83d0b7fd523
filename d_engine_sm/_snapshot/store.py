"""The snapshots directory: every file operation on it, through the FileOps seam.

Layout (the README's "Snapshots on disk")::

    <dir>/.lock                        one writer at a time, across processes
    <dir>/<prefix><index>-<term>.tar.gz a published archive
    <dir>/temp-<kind>-<pid>-<hex>      work in progress (removed at start-up)
    <dir>/<archive>.broken             an archive that failed verification

Crash safety comes from ordering: an archive is written under a ``temp-``
name, fsynced, renamed to its final name (atomic), then the directory is
fsynced. A crash at any point leaves either no archive or a whole one, plus
maybe a ``temp-`` leftover that :meth:`SnapshotStore.recover` removes. Each
durable step announces itself (``fs.announce("publish:rename")``) so crash
tests can kill the process exactly there.

Readers hold a shared portalocker lock on the archive they stream; prune
takes an exclusive non-blocking lock before unlinking, so it never deletes
an archive someone is reading.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import filelock
import portalocker

from d_engine_sm._fs import DEFAULT_FILE_OPS, FileOps
from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.naming import (
    BROKEN_SUFFIX,
    LOCK_NAME,
    archive_name,
    check_prefix,
    is_temp_name,
    parse_archive_name,
    temp_name,
)
from d_engine_sm.errors import (
    CorruptSnapshotError,
    InsufficientSpace,
    ReadOnlySnapshotDir,
    SnapshotInProgress,
    SnapshotNotFound,
)

_log = logging.getLogger("d_engine_sm.snapshot")
_EXCLUSIVE_NOW: Final = portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
# What creating a file says on a read-only mount or a directory we may not write.
_READ_ONLY_ERRNOS: Final = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@dataclass(frozen=True, order=True)
class ArchiveInfo:
    """A published archive: its LogId (from the name) and its path.

    Orders by ``(index, term)``, so ``max()`` of a listing is the newest.
    """

    index: int
    term: int
    path: Path


class SnapshotReader:
    """An open archive under a shared lock (see :meth:`SnapshotStore.open_reader`).

    ``mmap`` is a read-only map of the whole file, or None for an empty
    file (a zero-length map is an error on POSIX). Valid only inside the
    ``with`` block. One thread at a time.
    """

    def __init__(self, path: Path, size: int, mapped: mmap.mmap | None) -> None:
        self.path = path
        self.size = size
        self.mmap = mapped

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the archive.

        Raises:
            ValueError: the range is not within ``0 <= start <= end <= size``.
        """
        if not 0 <= start <= end:
            raise ValueError(f"bad range [{start}, {end}) for {self.path}")
        if end > self.size:
            raise ValueError(f"range end {end} exceeds file size {self.size} of {self.path}")
        if self.mmap is None or start == end:
            return b""
        return self.mmap[start:end]


class SnapshotStore:
    """All I/O on one snapshots directory.

    Construction does no I/O (the directory need not exist). Mutations
    (``publish``, ``prune``, ``recover``) are meant to run under
    :meth:`writer_lock`; listing and reading are safe at any time. Methods
    block on disk I/O and are safe to call from several threads.

    Args:
        directory: the snapshots directory.
        prefix: archive name prefix (``snapshots_dir_prefix``).
        fs: the FileOps seam every durable step goes through.
        fsync: fsync archives and the directory (False only for tests and
            benchmarks).
        keep_broken: how many ``*.broken`` archives recovery keeps.

    Raises:
        ValueError: a bad prefix or a negative ``keep_broken``.
    """

    def __init__(
        self,
        directory: Path,
        prefix: str,
        *,
        fs: FileOps = DEFAULT_FILE_OPS,
        fsync: bool = True,
        keep_broken: int = 3,
    ) -> None:
        check_prefix(prefix)
        if keep_broken < 0:
            raise ValueError(f"keep_broken must be >= 0, got {keep_broken}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.fs = fs
        self.fsync = fsync
        self.keep_broken = keep_broken
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    # -- directory and writer lock ---------------------------------------

    def ensure_dir(self) -> None:
        """Create the directory (and parents) if missing.

        Raises:
            OSError: it cannot be created.
        """
        if not self.directory.is_dir():
            self.fs.announce("ensure_dir:mkdir")
            self.fs.mkdir(self.directory)

    def is_writable(self) -> bool:
        """Whether this process may create files in the directory (False if missing).

        ``os.access`` answers for read-only mounts even as root (``EROFS``).
        """
        return self.directory.is_dir() and os.access(self.directory, os.W_OK | os.X_OK)

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold ``<dir>/.lock`` for one write operation (create, install, cleanup).

        Never waits: a lock held by another process, or by another thread of
        this one, fails at once. Creates the directory if needed.

        Raises:
            SnapshotInProgress: someone else holds the lock.
            ReadOnlySnapshotDir: the directory (or its lock file) cannot be
                created or written.
        """
        lock_path = self.directory / LOCK_NAME
        # A fresh lock object per operation: filelock is re-entrant per
        # object, and a second thread must be refused, not let in.
        lock = filelock.FileLock(str(lock_path))
        try:
            self.ensure_dir()
            lock.acquire(timeout=0)
        except filelock.Timeout as e:
            raise SnapshotInProgress(
                f"another snapshot writer holds {lock_path} (create, install or cleanup)"
            ) from e
        except OSError as e:
            if e.errno not in _READ_ONLY_ERRNOS:
                raise
            raise ReadOnlySnapshotDir(str(self.directory), e.strerror or str(e)) from e
        try:
            yield
        finally:
            lock.release()

    # -- names ------------------------------------------------------------

    def archive_path(self, index: int, term: int) -> Path:
        """The final path of the archive for LogId ``(index, term)``."""
        return self.directory / archive_name(self.prefix, index, term)

    def new_temp_path(self, kind: str) -> Path:
        """A fresh ``temp-<kind>-<pid>-<hex>`` path in the directory; nothing is created.

        Unique per call, so no operation ever reuses another's leftover.
        """
        return self.directory / temp_name(kind, f"{os.getpid()}-{secrets.token_hex(8)}")

    # -- writing ----------------------------------------------------------

    @contextlib.contextmanager
    def temp_archive(self, kind: str) -> Iterator[tuple[Path, BinaryIO]]:
        """A new temp file to write an archive into.

        Clean exit: fsynced (if ``fsync``) and closed, ready for
        :meth:`publish`. Exception: closed, removed, re-raised.

        Raises:
            OSError: the file could not be created, written or fsynced (it
                is removed).
        """
        path = self.new_temp_path(kind)
        f = self.fs.open_write(path)  # exclusive create: never a leftover
        try:
            yield path, f
            if self.fsync:
                # Survives: a crash after rename must not publish unflushed data.
                self.fs.announce(f"{kind}:fsync")
                self.fs.fsync(f)
            f.close()
        except BaseException:
            with contextlib.suppress(OSError):
                f.close()
            self.remove_quietly(path)
            raise

    def publish(self, temp_file: Path, index: int, term: int) -> Path:
        """Atomically move a finished temp archive to its final name.

        An existing archive of the same name is replaced (same LogId, same
        state). On failure the temp file is left for the caller to remove.

        Returns:
            The final path.

        Raises:
            OSError: the rename or the directory fsync failed.
        """
        final = self.archive_path(index, term)
        self._rename(temp_file, final)
        if self.fsync:
            self._sync_dir("publish")
        _log.info("published archive path=%s index=%d term=%d", final, index, term)
        return final

    def _rename(self, src: Path, dst: Path) -> None:
        # Survives any crash: rename is atomic, the name holds old or new.
        self.fs.announce("publish:rename")
        try:
            self.fs.replace(src, dst)
        except OSError as e:
            _log.error("publish failed step=rename src=%s dst=%s error=%s", src, dst, e)
            raise

    def _sync_dir(self, op: str) -> None:
        # Survives power loss: makes the rename (or unlink) itself durable.
        self.fs.announce(f"{op}:fsync_dir")
        try:
            self.fs.fsync_dir(self.directory)
        except OSError as e:
            _log.error("%s failed step=fsync_dir dir=%s error=%s", op, self.directory, e)
            raise

    # -- listing ----------------------------------------------------------

    def list_archives(self) -> list[ArchiveInfo]:
        """Published archives, ascending by ``(index, term)``.

        Skips ``temp-…``, ``.lock``, ``*.broken``, directories and anything
        else that is not a regular file, and names that do not parse (with
        one warning per name). A missing directory lists as empty.
        """
        try:
            with os.scandir(self.directory) as it:
                entries = list(it)
        except FileNotFoundError:
            return []
        found: list[ArchiveInfo] = []
        for entry in entries:
            name = entry.name
            if name == LOCK_NAME or is_temp_name(name) or name.endswith(BROKEN_SUFFIX):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:  # vanished meanwhile
                continue
            parsed = parse_archive_name(name, self.prefix)
            if parsed is None:
                self._warn_once(name)
                continue
            found.append(ArchiveInfo(parsed[0], parsed[1], self.directory / name))
        found.sort()
        return found

    def _warn_once(self, name: str) -> None:
        with self._warned_lock:
            if name in self._warned:
                return
            self._warned.add(name)
        _log.warning("ignoring unrecognised file dir=%s name=%s", self.directory, name)

    def latest(self) -> ArchiveInfo | None:
        """The newest archive by ``(index, term)``, or None."""
        archives = self.list_archives()
        return archives[-1] if archives else None

    def find(self, index: int, term: int) -> ArchiveInfo | None:
        """The archive for LogId ``(index, term)`` if it exists as a file."""
        path = self.archive_path(index, term)
        return ArchiveInfo(index, term, path) if path.is_file() else None

    # -- pruning ----------------------------------------------------------

    def prune(self, retain: int) -> list[Path]:
        """Delete all but the newest ``retain`` archives (by index).

        Never deletes the newest, nor an archive a reader holds (it is
        skipped, and goes on a later prune). Archives already gone are
        ignored.

        Returns:
            The paths removed.

        Raises:
            ValueError: ``retain < 1``.
            OSError: a delete failed for another reason than "not found".
        """
        if retain < 1:
            raise ValueError(f"retain count must be >= 1, got {retain}")
        archives = self.list_archives()
        removed = [
            info.path
            for info in archives[: max(0, len(archives) - retain)]
            if self._prune_one(info)
        ]
        if removed and self.fsync:
            self._sync_dir("prune")
        return removed

    def _prune_one(self, info: ArchiveInfo) -> bool:
        try:
            f = open(info.path, "rb")  # noqa: SIM115 - closed below, lock held until then
        except FileNotFoundError:
            return False
        with f:
            try:
                portalocker.lock(
                    f, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
                )
            except portalocker.exceptions.LockException:
                _log.info("prune skipped archive in use path=%s index=%d", info.path, info.index)
                return False
            # Holding the exclusive lock, no reader can start on this file
            # until it is unlinked (a reader then finds it gone).
            self.fs.announce("prune:remove")
            try:
                self.fs.remove(info.path)
            except FileNotFoundError:
                return False
        _log.info("pruned archive path=%s index=%d term=%d", info.path, info.index, info.term)
        return True

    # -- reading ----------------------------------------------------------

    @contextlib.contextmanager
    def open_reader(self, info: ArchiveInfo) -> Iterator[SnapshotReader]:
        """Open an archive for streaming, under a shared lock that stops prune.

        Waits only while a prune holds the file's exclusive lock (an unlink).

        Raises:
            SnapshotNotFound: the archive does not exist (or was pruned
                meanwhile), or is not a regular file.
        """
        path = info.path
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except FileNotFoundError as e:
            raise SnapshotNotFound(str(path)) from e
        except IsADirectoryError as e:
            raise SnapshotNotFound(str(path), "not a snapshot archive file") from e
        mapped: mmap.mmap | None = None
        try:
            portalocker.lock(f, portalocker.LockFlags.SHARED)
            st = os.fstat(f.fileno())
            if not self._still_linked(path, st):
                raise SnapshotNotFound(str(path), "snapshot archive was pruned")
            if st.st_size > 0:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            yield SnapshotReader(path, st.st_size, mapped)
        finally:
            if mapped is not None:
                mapped.close()
            with contextlib.suppress(portalocker.exceptions.LockException, OSError):
                portalocker.unlock(f)
            f.close()

    @staticmethod
    def _still_linked(path: Path, st: os.stat_result) -> bool:
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    # -- start-up recovery --------------------------------------------------

    def recover(
        self,
        verify: Callable[[Path], bytes] = archive.verify,
        *,
        tidy: bool = True,
        keep: frozenset[str] = frozenset(),
    ) -> tuple[ArchiveInfo, bytes] | None:
        """Bring the directory back to a clean state after a crash.

        Removes ``temp-…`` leftovers (files and dirs); checks archives newest
        first until one verifies, moving each that fails to ``<name>.broken``
        (keeping at most ``keep_broken`` of those, oldest removed). Older
        archives than the one returned are not checked. Run under
        :meth:`writer_lock` or before anything else uses the directory.

        With ``tidy=False`` nothing is removed or moved: corrupt archives are
        only skipped. For a read-only directory, or one another process is
        writing (its ``temp-…`` files are live).

        Args:
            verify: integrity check returning the file's SHA-256, raising
                CorruptSnapshotError.
            tidy: remove leftovers and move corrupt archives aside.
            keep: ``temp-…`` names to leave alone (a resumable partial transfer).

        Returns:
            ``(newest valid archive, its SHA-256)``, or None. None also
            when the directory does not exist (nothing is created).

        Raises:
            OSError: a file could not be checked or moved for a reason other
                than corruption.
        """
        if not self.directory.is_dir():
            return None
        if tidy:
            self._remove_temps(keep)
        result: tuple[ArchiveInfo, bytes] | None = None
        for info in reversed(self.list_archives()):
            try:
                digest = verify(info.path)
            except FileNotFoundError:
                continue
            except CorruptSnapshotError as e:
                if tidy:
                    self._quarantine(info, e)
                else:
                    _log.warning("skipping corrupt archive path=%s reason=%s", info.path, e.reason)
                continue
            result = (info, digest)
            break
        if tidy:
            self._trim_broken()
        return result

    def _remove_temps(self, keep: frozenset[str]) -> None:
        with os.scandir(self.directory) as it:
            leftovers = [Path(e.path) for e in it if is_temp_name(e.name) and e.name not in keep]
        for path in leftovers:
            # Survives a crash mid-write: a temp- name is never published.
            self.fs.announce("recover:remove_temp")
            self.remove_quietly(path)
            _log.warning("removed leftover temp path=%s", path)

    def _quarantine(self, info: ArchiveInfo, error: CorruptSnapshotError) -> None:
        broken = info.path.with_name(info.path.name + BROKEN_SUFFIX)
        # Survives a crash: the archive has either its name or .broken, and
        # a re-run re-verifies whatever still has the archive name.
        self.fs.announce("recover:rename_broken")
        self.fs.replace(info.path, broken)
        if self.fsync:
            self._sync_dir("recover")
        _log.warning(
            "moved corrupt archive aside path=%s broken=%s reason=%s",
            info.path,
            broken,
            error.reason,
        )

    def _trim_broken(self) -> None:
        broken: list[tuple[int, str, Path]] = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.endswith(BROKEN_SUFFIX) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        broken.append((mtime, entry.name, Path(entry.path)))
        broken.sort()
        for _, _, path in broken[: max(0, len(broken) - self.keep_broken)]:
            self.fs.announce("recover:remove_broken")
            self.remove_quietly(path)
            _log.info("removed old broken archive path=%s", path)

    # -- space and cleanup --------------------------------------------------

    def check_space(self, needed: int) -> None:
        """Refuse to start writing ``needed`` bytes without the room for them.

        Asks the nearest existing ancestor when the directory does not exist yet.

        Raises:
            InsufficientSpace: less than ``needed`` bytes free.
            ValueError: ``needed < 0``.
        """
        if needed < 0:
            raise ValueError(f"needed bytes must be >= 0, got {needed}")
        probe = self.directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = self.fs.disk_free(probe)
        if free < needed:
            raise InsufficientSpace(str(self.directory), needed, free)

    def remove_quietly(self, path: Path) -> None:
        """Remove a file or directory tree; missing is fine, other errors are logged."""
        try:
            if path.is_dir() and not path.is_symlink():
                self.fs.remove_tree(path)
            else:
                self.fs.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warning("could not remove path=%s error=%s", path, e)
