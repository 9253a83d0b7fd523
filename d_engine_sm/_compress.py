"""gzip and CRC32 through the fastest available implementation.

With the ``fast`` extra (python-isal) both run through ISA-L: same formats,
several times faster. Without it, the standard library's zlib.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, Final, cast

_igzip: Any
_isal_zlib: Any
try:  # optional: the `fast` extra
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - exercised by the no-extra tox run
    _igzip = None
    _isal_zlib = None

HAVE_ISAL: Final = _igzip is not None

crc32: Callable[[bytes | bytearray | memoryview, int], int] = (
    _isal_zlib.crc32 if _isal_zlib is not None else zlib.crc32
)


def gzip_writer(raw: BinaryIO, level: int, *, use_isal: bool = HAVE_ISAL) -> BinaryIO:
    """A gzip stream over ``raw`` (not closed when the writer closes).

    ``level`` is zlib's 0-9; ISA-L has levels 0-3, so it is scaled down.
    ``mtime=0`` keeps the same input producing the same bytes.
    """
    if use_isal and _igzip is not None:
        isal_level = min(3, (level + 2) // 3)
        writer = _igzip.IGzipFile(fileobj=raw, mode="wb", compresslevel=isal_level, mtime=0)
        return cast(BinaryIO, writer)
    return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0))


def gzip_reader(raw: BinaryIO, *, use_isal: bool = HAVE_ISAL) -> BinaryIO:
    """A gzip decompressing reader over ``raw``; checks the CRC at the end."""
    if use_isal and _igzip is not None:
        return cast(BinaryIO, _igzip.IGzipFile(fileobj=raw, mode="rb"))
    return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
