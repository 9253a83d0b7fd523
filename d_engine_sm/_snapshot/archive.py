"""Snapshot archives: pack a directory into a gzip'd tar, verify, safely unpack.

Files only: no locks and no knowledge of the snapshots directory (that is
``store.py``). Archives are standard tar.gz (GNU tar and d-engine read them);
gzip runs through ``_compress`` (ISA-L when installed, else zlib).

Safety: an archive from a peer is hostile input. :func:`safe_unpack` does
its own checks rather than Python 3.12's ``filter=`` (3.10 must behave the
same): only regular files and directories, relative names without ``..``,
caps on member count and bytes, every target resolved inside ``dest``,
modes and owners from the archive ignored.

Integrity: the gzip trailer (CRC32 + length) covers every byte of the tar,
so :func:`verify` decompresses to the very end; a tar header that fails its
checksum part-way is an error, not a silent end of archive (tarfile's
default), and anything after the end-of-archive marker must be zeros.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, cast

from d_engine_sm._compress import HAVE_ISAL, gzip_reader, gzip_writer
from d_engine_sm._snapshot.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from d_engine_sm._snapshot.tarsafe import (
    check_member,
    decoding,
    member_kind,
    next_member,
    open_tar,
)
from d_engine_sm.errors import CorruptSnapshotError, UnsafeArchiveError

ProgressFn = Callable[[str, int, int], None]
"""``progress(phase, done_bytes, total_bytes)``."""

_log = logging.getLogger("d_engine_sm.snapshot")

_COPY_BUF: Final = 1 << 20
# tarfile's stream reader copies its whole remaining buffer on every read,
# headers included, so a huge buffer makes many small members quadratic.
_STREAM_BUF: Final = 64 << 10
_FILE_MODE: Final = 0o644
_DIR_MODE: Final = 0o755


class _HashingWriter(io.RawIOBase):
    """Feeds every byte written to ``out`` into SHA-256 and counts it."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._out = out
        self.sha = hashlib.sha256()
        self.count = 0
        self.abandoned = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        if self.abandoned:
            return n
        self.sha.update(b)
        self._out.write(b)
        self.count += n
        return n

    def flush(self) -> None:
        if not self.abandoned and not self._out.closed:
            self._out.flush()

    def abandon(self) -> None:
        """After a failure: swallow what a half-built gzip writer's finalizer
        still tries to write (its close would otherwise fail again, unraisably)."""
        self.abandoned = True


class _HashingReader(io.RawIOBase):
    """Feeds every byte read from ``raw`` into SHA-256 (verify's single pass)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(-1 if size is None else size)
        self.sha.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(memoryview(b).nbytes)
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)


class _ProgressReader:
    """A source file for ``tarfile.addfile`` that reports bytes read."""

    def __init__(self, raw: BinaryIO, report: Callable[[int], None]) -> None:
        self._raw = raw
        self._report = report

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._report(len(data))
        return data


@dataclass(frozen=True)
class _Entry:
    name: str
    path: Path
    is_dir: bool
    size: int
    mtime: int


def _collect(src_dir: Path) -> list[_Entry]:
    """Every directory and regular file under ``src_dir``, parents first, sorted."""
    entries: list[_Entry] = []

    def walk(directory: Path, rel: str) -> None:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            name = f"{rel}/{child.name}" if rel else child.name
            st = child.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                entries.append(_Entry(name, Path(child.path), True, 0, int(st.st_mtime)))
                walk(Path(child.path), name)
            elif stat.S_ISREG(st.st_mode):
                entries.append(_Entry(name, Path(child.path), False, st.st_size, int(st.st_mtime)))
            else:
                raise UnsafeArchiveError(
                    name, "snapshot data may hold only regular files and directories"
                )

    walk(src_dir, "")
    return entries


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type = tarfile.DIRTYPE if entry.is_dir else tarfile.REGTYPE
    info.size = entry.size
    info.mode = _DIR_MODE if entry.is_dir else _FILE_MODE
    info.mtime = entry.mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(
    src_dir: Path,
    out: BinaryIO,
    *,
    level: int = 1,
    progress: ProgressFn | None = None,
    use_isal: bool = HAVE_ISAL,
    manifest: Manifest | None = None,
) -> tuple[bytes, int]:
    """Write the contents of ``src_dir`` to ``out`` as a gzip'd tar.

    Member names are relative to ``src_dir`` (``kv.bin``, ``sub/x``); empty
    directories and empty files are kept; owners are dropped and modes
    normalised. Every byte written to ``out`` is hashed on the way, so the
    digest needs no second read.

    Args:
        src_dir: the directory whose contents to pack.
        out: a binary stream to write the archive to (not closed).
        level: gzip level 0-9.
        progress: called with ``("pack", done, total)``, total being the sum
            of the file sizes.
        use_isal: compress through ISA-L (when installed) or zlib.
        manifest: written as the first member (``MANIFEST.d-engine-sm.json``)
            when given; without it the archive is what older versions wrote.

    Returns:
        ``(sha256 digest of the bytes written, number of bytes written)``.

    Raises:
        UnsafeArchiveError: ``src_dir`` holds a symlink, device, fifo or socket.
        OSError: reading ``src_dir`` or writing ``out`` failed.

    Blocking (disk I/O and compression). Thread-safe for distinct arguments.
    """
    entries = _collect(src_dir)
    total = sum(e.size for e in entries)
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress("pack", done, total)

    hashing = _HashingWriter(out)
    gz: BinaryIO | None = None
    try:
        gz = gzip_writer(cast(BinaryIO, hashing), level, use_isal=use_isal)  # writes the header
        # On an exception the with-block closes without writing the end marker.
        with tarfile.TarFile(
            fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BUF
        ) as tar:
            if manifest is not None:
                _add_manifest(tar, manifest)
            for entry in entries:
                info = _tarinfo(entry)
                if entry.is_dir:
                    tar.addfile(info)
                    continue
                with open(entry.path, "rb", buffering=0) as src:
                    reader = _ProgressReader(cast(BinaryIO, src), report)
                    tar.addfile(info, cast(IO[bytes], reader))
        gz.close()  # gzip trailer; ``out`` stays open
    except BaseException:
        hashing.abandon()
        if gz is not None:
            with contextlib.suppress(Exception):
                gz.close()
        raise
    if progress is not None and total == 0:
        progress("pack", 0, 0)
    return hashing.sha.digest(), hashing.count


def _add_manifest(tar: tarfile.TarFile, manifest: Manifest) -> None:
    data = manifest.to_bytes()
    info = _tarinfo(_Entry(MANIFEST_NAME, Path(MANIFEST_NAME), False, len(data), 0))
    tar.addfile(info, io.BytesIO(data))


def read_manifest(path: Path) -> Manifest | None:
    """The manifest of an archive, or None when its first member is not one.

    Reads one tar header and at most 4 KiB of data (bounded whatever the
    file holds); the rest of the archive is not checked (see :func:`verify`).

    Raises:
        CorruptSnapshotError: the archive cannot be read, or its manifest is
            malformed.
        OSError: the file cannot be opened.

    Blocking; thread-safe.
    """
    with open(path, "rb") as raw:
        try:
            with decoding(path):
                tar = open_tar(gzip_reader(cast(BinaryIO, raw)))
                member = next_member(tar)
                if member is None or member.name != MANIFEST_NAME or not member.isreg():
                    return None
                return _manifest_of(tar, member, str(path))
        except UnsafeArchiveError as e:
            raise CorruptSnapshotError(str(path), str(e)) from e


def _manifest_of(tar: tarfile.TarFile, member: tarfile.TarInfo, source: str) -> Manifest:
    if member.size > MAX_MANIFEST_BYTES:
        raise CorruptSnapshotError(source, f"{MANIFEST_NAME} declares {member.size} bytes")
    src = tar.extractfile(member)
    assert src is not None  # a regular file
    return Manifest.from_bytes(src.read(), source)


def sha256_file(path: Path) -> bytes:
    """SHA-256 of a file's bytes.

    Raises:
        OSError: the file cannot be read.

    Blocking; thread-safe.
    """
    sha = hashlib.sha256()
    buf = bytearray(_COPY_BUF)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha.digest()


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := next_member(tar)) is not None:
        yield member


def _drain_tail(tar: tarfile.TarFile, path: Path | str) -> None:
    """Read past the end-of-archive marker to the gzip trailer (checks its CRC).

    Only zero padding may follow the marker: anything else means the tar was
    cut short or spliced.
    """
    stream = cast(Any, tar.fileobj)
    while data := stream.read(_STREAM_BUF):
        if data.count(0) != len(data):
            raise CorruptSnapshotError(str(path), "data after the end-of-archive marker")


def verify(path: Path) -> bytes:
    """Check an archive end to end and return the SHA-256 of its bytes.

    One pass over the file: the bytes are hashed as they are decompressed;
    the gzip CRC and length trailer are checked; every tar header must be
    valid up to the end marker; no member may be unsafe (see
    :func:`safe_unpack`); a manifest, when first, must parse.

    Args:
        path: the archive.

    Returns:
        The SHA-256 digest (32 bytes) of the file.

    Raises:
        CorruptSnapshotError: the archive is damaged or holds an unsafe
            member; the message names the path and why.
        OSError: the file cannot be opened.

    Blocking; thread-safe.
    """
    with open(path, "rb") as raw:
        hashing = _HashingReader(cast(BinaryIO, raw))
        try:
            with decoding(path):
                tar = open_tar(gzip_reader(cast(BinaryIO, hashing)))
                for i, member in enumerate(_members(tar)):
                    check_member(member)
                    if i == 0 and member.name == MANIFEST_NAME and member.isreg():
                        _manifest_of(tar, member, str(path))  # installs would refuse a bad one
                _drain_tail(tar, path)
                while hashing.read(_COPY_BUF):  # bytes gzip did not need (none, normally)
                    pass
        except UnsafeArchiveError as e:  # unsafe headers or members: not a valid snapshot
            raise CorruptSnapshotError(str(path), str(e)) from e
    return hashing.sha.digest()


def list_members(path: Path) -> list[tuple[str, int, str]]:
    """``(name, size, kind)`` of every member, for ``snapshot inspect``.

    ``kind`` is one of ``file``, ``dir``, ``symlink``, ``hardlink``,
    ``chardev``, ``blockdev``, ``fifo``, ``sparse``, ``other``. Unsafe
    members are listed, not refused; headers that declare more than their
    caps (see ``tarsafe``) and sparse members are refused.

    Raises:
        CorruptSnapshotError: the archive is damaged.
        UnsafeArchiveError: a header declares more than its cap.
        OSError: the file cannot be opened.

    Blocking; thread-safe.
    """
    result: list[tuple[str, int, str]] = []
    with open(path, "rb") as raw, decoding(path):
        tar = open_tar(gzip_reader(cast(BinaryIO, raw)))
        for member in _members(tar):
            result.append((member.name, member.size, member_kind(member)))
        _drain_tail(tar, path)
    return result


class _Unpacker:
    """State of one safe_unpack: what exists under dest and what it cost."""

    def __init__(self, archive: str, dest: Path, max_bytes: int, max_members: int) -> None:
        self.archive = archive
        self.dest_real = os.path.realpath(dest)
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.members = 0
        self.declared = 0
        self.written = 0
        self.seen: dict[tuple[str, ...], bool] = {}  # parts -> is_dir
        self.buf = bytearray(_COPY_BUF)

    def admit(self, member: tarfile.TarInfo) -> tuple[str, ...]:
        """All checks that need no disk: type, name, duplicates, caps."""
        parts = check_member(member)
        self.members += 1
        if self.members > self.max_members:
            raise UnsafeArchiveError(member.name, f"more than {self.max_members} members")
        if member.isreg():
            self.declared += member.size
            if self.declared > self.max_bytes:
                raise UnsafeArchiveError(
                    member.name, f"unpacked size would exceed {self.max_bytes} bytes"
                )
        for i in range(1, len(parts)):
            if self.seen.get(parts[:i]) is False:
                raise UnsafeArchiveError(member.name, "a parent path is a file member")
        previous = self.seen.get(parts)
        if previous is not None and not (previous and member.isdir()):
            raise UnsafeArchiveError(member.name, "duplicate member")
        return parts

    def target(self, parts: tuple[str, ...], name: str) -> str:
        """Create the parent directories of ``parts``; return its checked path."""
        parent = self.dest_real
        for i, part in enumerate(parts[:-1]):
            parent = os.path.join(parent, part)
            if not self.seen.get(parts[: i + 1]):
                os.mkdir(parent, _DIR_MODE)
                os.chmod(parent, _DIR_MODE)
                self.seen[parts[: i + 1]] = True
        # Belt and braces: nothing above creates links, but never trust that.
        real_parent = os.path.realpath(parent)
        if real_parent != self.dest_real and not real_parent.startswith(self.dest_real + os.sep):
            raise UnsafeArchiveError(name, "target resolves outside the destination")
        return os.path.join(real_parent, parts[-1])

    def make_dir(self, parts: tuple[str, ...], name: str) -> None:
        if not parts or self.seen.get(parts):
            return  # "." (dest itself) or already created as a parent
        path = self.target(parts, name)
        os.mkdir(path, _DIR_MODE)
        os.chmod(path, _DIR_MODE)
        self.seen[parts] = True

    def write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]
    ) -> int:
        path = self.target(parts, member.name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, _FILE_MODE)
        self.seen[parts] = False
        with open(fd, "wb", buffering=0) as out:
            os.chmod(path, _FILE_MODE)
            with decoding(self.archive):
                src = cast(io.BufferedReader, tar.extractfile(member))
            view = memoryview(self.buf)
            while True:
                with decoding(self.archive):
                    n = src.readinto(self.buf)
                if not n:
                    break
                self.written += n
                if self.written > self.max_bytes:
                    raise UnsafeArchiveError(
                        member.name, f"unpacked bytes exceed {self.max_bytes} bytes"
                    )
                out.write(view[:n])
        return member.size


def safe_unpack(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int,
    max_members: int,
    progress: ProgressFn | None = None,
    use_isal: bool = HAVE_ISAL,
) -> None:
    """Stream-extract ``archive`` into the existing empty directory ``dest``.

    Only regular files (mode 0o644) and directories (0o755) are created;
    owners, modes and times in the archive are ignored. A manifest as the
    first member is checked (strictly parsed) but not written to ``dest``. On failure ``dest``
    may hold a partial tree (the caller owns and removes it); nothing is
    ever written outside it.

    Args:
        archive: a tar.gz file.
        dest: an existing, empty directory.
        max_bytes: cap on the sum of file sizes, declared and actual.
        max_members: cap on the number of members (files and directories).
        progress: called with ``("unpack", archive_bytes_read, archive_size)``.
        use_isal: decompress through ISA-L (when installed) or zlib.

    Raises:
        UnsafeArchiveError: an absolute or ``..`` name, an empty or odd
            name, a link, device, fifo or sparse member, a duplicate, or a
            cap exceeded.
        CorruptSnapshotError: the gzip or tar stream is damaged.
        ValueError: ``dest`` is not an empty directory, or a cap is < 0.
        OSError: writing under ``dest`` failed (``ENOSPC`` …).

    Blocking; thread-safe for distinct ``dest``.
    """
    total = os.path.getsize(archive)
    with open(archive, "rb") as raw:
        unpack_stream(
            cast(BinaryIO, raw),
            dest,
            name=str(archive),
            max_bytes=max_bytes,
            max_members=max_members,
            progress=(lambda done: progress("unpack", done, total)) if progress else None,
            use_isal=use_isal,
        )
    if progress is not None:
        progress("unpack", total, total)


def unpack_stream(
    raw: BinaryIO,
    dest: Path,
    *,
    name: str,
    max_bytes: int,
    max_members: int,
    progress: Callable[[int], None] | None = None,
    use_isal: bool = HAVE_ISAL,
) -> None:
    """:func:`safe_unpack` over any readable stream of archive bytes.

    ``name`` labels errors; ``progress`` gets the archive bytes read so far
    (when ``raw`` can ``tell``). Same checks, errors and guarantees as
    :func:`safe_unpack`; used to unpack a snapshot while it is still arriving.
    """
    if max_bytes < 0 or max_members < 0:
        raise ValueError(f"caps must be >= 0, got max_bytes={max_bytes} max_members={max_members}")
    if not dest.is_dir() or dest.is_symlink():
        raise ValueError(f"unpack destination must be an existing directory: {dest}")
    if any(dest.iterdir()):
        raise ValueError(f"unpack destination must be empty: {dest}")
    state = _Unpacker(name, dest, max_bytes, max_members)
    with decoding(name):
        tar = open_tar(gzip_reader(raw, use_isal=use_isal))
    first = True
    while True:
        with decoding(name):
            member = next_member(tar)
        if member is None:
            break
        if first and member.name == MANIFEST_NAME and member.isreg():
            first = False
            with decoding(name):  # says what the archive holds; not part of the state
                _manifest_of(tar, member, name)
            continue
        first = False
        parts = state.admit(member)
        if member.isdir():
            state.make_dir(parts, member.name)
        else:
            state.write_file(tar, member, parts)
        if progress is not None:
            progress(raw.tell())
    with decoding(name):
        _drain_tail(tar, name)
    _log.debug("unpacked archive=%s members=%d bytes=%d", name, state.members, state.written)
