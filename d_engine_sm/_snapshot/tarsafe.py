"""Reading hostile tar streams with bounded memory and time.

``tarfile`` trusts the sizes a stream declares: a PAX extended header
(``x``/``g``/``X``) or a GNU long name/link (``L``/``K``) is read into memory
whole before any caller sees a member, a chain of them recurses once per
header, old GNU sparse headers pull extension blocks without limit, and
skipping a member's data loops over its declared size even after the data
ran out. Every path that opens an archive (verify, list, unpack) goes
through this module, which checks each declared size against a cap
*before* tarfile reads it:

* an extended header or long name larger than its cap, more than a few of
  them in a row, or global headers adding up past a cap: refused;
* sparse members (any flavour): refused while reading headers;
* a member's data is skipped here, in bounded reads that stop at the end
  of the stream (a member declaring more than what follows is corrupt).
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, Final, cast

from d_engine_sm.errors import CorruptSnapshotError, UnsafeArchiveError

MAX_EXTENDED_HEADER: Final = 256 << 10  # one PAX header; real ones hold a few names and times
MAX_GLOBAL_HEADERS: Final = 256 << 10  # all global PAX headers of an archive (they accumulate)
MAX_LONG_NAME: Final = 64 << 10  # a GNU long name or link target
MAX_HEADER_CHAIN: Final = 8  # extension headers in front of one member
MAX_NAME_LENGTH: Final = 4096  # a member name, after extensions are applied
_SKIP_BUF: Final = 64 << 10

_isal_error: tuple[type[BaseException], ...] = ()
try:  # optional: the `fast` extra; its inflater raises its own error class
    from isal import isal_zlib as _isal_zlib

    _isal_error = (cast("type[BaseException]", _isal_zlib.error),)
except ImportError:  # pragma: no cover - exercised by the no-extra tox run
    pass

# What reading a damaged gzip/tar stream can raise. BadGzipFile is an
# OSError; so is an unreadable disk block, which is just as corrupt to us.
_DECODE_ERRORS: Final[tuple[type[BaseException], ...]] = (
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    OverflowError,
    *_isal_error,
)

# Not in typeshed, but in tarfile since 3.2.
_BAD_HEADER: Final[tuple[type[Exception], ...]] = (
    getattr(tarfile, "InvalidHeaderError"),  # noqa: B009
    getattr(tarfile, "TruncatedHeaderError"),  # noqa: B009
)

_EXTENSIONS: Final = {
    tarfile.XHDTYPE: ("PAX extended header", MAX_EXTENDED_HEADER),
    tarfile.SOLARIS_XHDTYPE: ("PAX extended header", MAX_EXTENDED_HEADER),
    tarfile.XGLTYPE: ("PAX global header", MAX_EXTENDED_HEADER),
    tarfile.GNUTYPE_LONGNAME: ("GNU long name", MAX_LONG_NAME),
    tarfile.GNUTYPE_LONGLINK: ("GNU long link", MAX_LONG_NAME),
}


@contextlib.contextmanager
def decoding(path: object) -> Iterator[None]:
    """Turn whatever a damaged gzip/tar stream raises into CorruptSnapshotError.

    Library errors pass through. Running out of memory while decoding is
    reported as a corrupt archive too: every declared size is capped, so it
    can only mean an archive built to exhaust memory (or a host already
    starved), and a bare MemoryError must not reach a caller.
    """
    try:
        yield
    except (CorruptSnapshotError, UnsafeArchiveError):
        raise
    except MemoryError as e:
        raise CorruptSnapshotError(str(path), "out of memory while decoding the archive") from e
    except _DECODE_ERRORS as e:
        raise CorruptSnapshotError(str(path), f"{type(e).__name__}: {e}") from e


class StrictTarInfo(tarfile.TarInfo):
    """A TarInfo whose bad or oversized headers are errors.

    ``TarFile.next`` treats an invalid or truncated header after the first
    as the end of the archive and stops silently; for a snapshot that would
    mean a truncated state, so raise instead. An all-zero block (the real
    end marker) still ends the archive.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> StrictTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except _BAD_HEADER as e:
            raise tarfile.ReadError(f"bad tar header: {e}") from e

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # Called for every header right after its 512 bytes were parsed and
        # before anything it declares is read: the one place to cap sizes.
        _admit_header(tarfile_, self)
        return cast(tarfile.TarInfo, cast(Any, super())._proc_member(tarfile_))

    def _proc_gnusparse_10(self, next_: Any, pax_headers: Any, tarfile_: Any) -> None:
        # GNU sparse 1.0 reads its map from the data blocks without a bound.
        raise UnsafeArchiveError(next_.name, "sparse members are not allowed")


def _admit_header(tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
    state = cast(Any, tar)
    chain: int = getattr(state, "_desm_chain", 0)
    if info.size < 0:
        raise UnsafeArchiveError(info.name, f"negative size {info.size} in a tar header")
    if info.type == tarfile.GNUTYPE_SPARSE:
        raise UnsafeArchiveError(info.name, "sparse members are not allowed")
    extension = _EXTENSIONS.get(info.type)
    if extension is None:
        state._desm_chain = 0  # a real member ends the chain
        return
    kind, cap = extension
    if info.size > cap:
        raise UnsafeArchiveError(info.name, f"{kind} declares {info.size} bytes, over {cap}")
    if chain + 1 > MAX_HEADER_CHAIN:
        raise UnsafeArchiveError(info.name, f"more than {MAX_HEADER_CHAIN} extension headers")
    state._desm_chain = chain + 1
    if info.type == tarfile.XGLTYPE:
        total: int = getattr(state, "_desm_global", 0) + info.size
        if total > MAX_GLOBAL_HEADERS:
            raise UnsafeArchiveError(info.name, f"global headers exceed {MAX_GLOBAL_HEADERS} bytes")
        state._desm_global = total


def open_tar(gz: Any) -> tarfile.TarFile:
    """A streaming (forward-only) reader of the tar inside ``gz``, strict headers."""
    return tarfile.open(fileobj=gz, mode="r|", bufsize=_SKIP_BUF, tarinfo=StrictTarInfo)


def next_member(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    """The next member or None; tarfile's member list is cleared so memory stays flat.

    The previous member's unread data is skipped here in bounded reads, so a
    member that declares more data than the stream holds ends in an error
    instead of a loop over its declared size.
    """
    state = cast(Any, tar)
    if state._loaded:
        # Python 3.10's next() after the end (e.g. an empty archive, whose end
        # TarFile.__init__ already read) seeks backwards: a stream cannot.
        return None
    if state.firstmember is None:  # else its data has not been offered yet
        _skip_data(tar)
    member = tar.next()
    state.members.clear()
    return member


def _skip_data(tar: tarfile.TarFile) -> None:
    stream = cast(Any, tar.fileobj)
    remaining: int = cast(Any, tar).offset - stream.tell()
    while remaining > 0:
        data = stream.read(min(remaining, _SKIP_BUF))
        if not data:
            raise tarfile.ReadError("unexpected end of data: a member declares more than follows")
        remaining -= len(data)


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, ``.`` and empty ones dropped.

    Raises:
        UnsafeArchiveError: an empty, over-long, absolute, drive-qualified,
            backslashed, control-character or ``..`` name.
    """
    if not name:
        raise UnsafeArchiveError(name, "empty member name")
    if len(name) > MAX_NAME_LENGTH:
        raise UnsafeArchiveError(name[:64] + "...", f"name longer than {MAX_NAME_LENGTH}")
    if name.startswith("/"):
        raise UnsafeArchiveError(name, "absolute path")
    # "C:x" is drive-relative on Windows only; elsewhere "k:1" is a plain name.
    if os.name == "nt" and len(name) >= 2 and name[1] == ":":
        raise UnsafeArchiveError(name, "drive-qualified path")
    if "\\" in name:
        raise UnsafeArchiveError(name, "backslash in member name")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise UnsafeArchiveError(name, "control character in member name")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(name, "'..' component")
    return parts


def member_kind(member: tarfile.TarInfo) -> str:
    """``file``, ``dir``, ``symlink``, ``hardlink``, ``chardev``, ``blockdev``,
    ``fifo``, ``sparse`` or ``other``."""
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr():
        return "chardev"
    if member.isblk():
        return "blockdev"
    if member.isfifo():
        return "fifo"
    if member.issparse():
        return "sparse"
    if member.isdir():
        return "dir"
    if member.isreg():
        return "file"
    return "other"


def check_member(member: tarfile.TarInfo) -> tuple[str, ...]:
    """Refuse anything but a safely named regular file or directory."""
    kind = member_kind(member)
    if kind not in ("file", "dir"):
        raise UnsafeArchiveError(member.name, f"{kind} members are not allowed")
    if member.size < 0:
        raise UnsafeArchiveError(member.name, f"negative size {member.size}")
    parts = member_parts(member.name)
    if not parts and kind == "file":
        raise UnsafeArchiveError(member.name, "file member with an empty name")
    return parts
