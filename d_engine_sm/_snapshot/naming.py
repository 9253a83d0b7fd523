"""Names of the files in a snapshots directory (pure: no file system access).

``<prefix><index>-<term>.tar.gz`` is a published archive (d-engine's name),
``temp-…`` is work in progress, ``….broken`` an archive moved aside at
start-up, ``.lock`` the writers' lock file.

d-engine's cleanup parser sliced a fixed 9 bytes off every name whatever the
prefix (Q01), so ``snap-12345678-3.tar.gz`` read as index 5678. Here the
prefix is stripped by its real length and the rest must be exactly
``<digits>-<digits>.tar.gz``.

>>> archive_name("snap-", 12345678, 3)
'snap-12345678-3.tar.gz'
>>> parse_archive_name("snap-12345678-3.tar.gz", "snap-")
(12345678, 3)
>>> parse_archive_name("snap-012345678-3.tar.gz", "snap-") is None
True

Every path that scans a directory (the store's listing, hence recovery,
pruning and the latest metadata; the CLI's ``list`` and ``verify``) goes
through :func:`parse_archive_name`, so a non-canonical name is ignored
everywhere alike: never recovered, served, pruned or verified.
"""

from __future__ import annotations

import re
from typing import Final

TEMP_PREFIX: Final = "temp-"
ARCHIVE_SUFFIX: Final = ".tar.gz"
BROKEN_SUFFIX: Final = ".broken"
LOCK_NAME: Final = ".lock"

_U64_MAX: Final = 2**64 - 1
# LogId fields are uint64: at most 20 digits. Checking the length first also
# keeps int() clear of CPython's limit on huge digit strings.
_MAX_DIGITS: Final = 20
# [0-9], not \d: \d also matches non-ASCII digits (Arabic-Indic and others).
_CORE: Final = re.compile(r"([0-9]+)-([0-9]+)")
_NAME_PART: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAX_PART_LEN: Final = 128


def check_prefix(prefix: str) -> None:
    """Validate an archive name prefix (``snapshots_dir_prefix``).

    Mirrors ``SnapshotConfig``: a non-empty file-name part without path
    separators or NUL, and not starting with ``temp-`` (start-up recovery
    deletes ``temp-…`` names, so such archives would be lost).

    Args:
        prefix: the prefix to check.

    Raises:
        TypeError: ``prefix`` is not a str.
        ValueError: ``prefix`` is empty, contains ``/``, ``\\`` or NUL, is
            ``.`` or ``..``, or starts with ``temp-``.

    Pure and thread-safe.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"snapshot prefix must be a str, got {type(prefix).__name__}")
    if not prefix or "/" in prefix or "\\" in prefix or "\0" in prefix or prefix in (".", ".."):
        raise ValueError(
            f"snapshot prefix must be a non-empty file-name part without '/', got {prefix!r}"
        )
    if prefix.startswith(TEMP_PREFIX):
        raise ValueError(f"snapshot prefix must not start with {TEMP_PREFIX!r}, got {prefix!r}")


def _check_u64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{name} must be a uint64 (0..2**64-1), got {value}")


def archive_name(prefix: str, index: int, term: int) -> str:
    """The file name of the archive for LogId ``(index, term)``.

    Args:
        prefix: ``snapshots_dir_prefix`` (see :func:`check_prefix`).
        index: ``last_included.index``, a uint64.
        term: ``last_included.term``, a uint64.

    Returns:
        ``f"{prefix}{index}-{term}.tar.gz"``.

    Raises:
        TypeError: a bad argument type.
        ValueError: a bad prefix, or index/term outside uint64.

    Pure and thread-safe.
    """
    check_prefix(prefix)
    _check_u64("index", index)
    _check_u64("term", term)
    return f"{prefix}{index}-{term}{ARCHIVE_SUFFIX}"


def parse_archive_name(name: str, prefix: str) -> tuple[int, int] | None:
    """``(index, term)`` of an archive file name, or None if it is not one.

    Only the canonical spelling parses, exactly what :func:`archive_name`
    writes: ``<prefix><digits>-<digits>.tar.gz`` with ASCII digits, no sign,
    no leading zeros (``0`` itself is fine), no spaces or ``_``, no extra
    ``-`` segments, each number within uint64. So ``parse`` succeeds iff
    ``name == archive_name(prefix, *parsed)``. The prefix may contain digits
    and dashes itself; it is stripped by its exact length.

    Args:
        name: a directory entry's name (not a path).
        prefix: ``snapshots_dir_prefix`` (see :func:`check_prefix`).

    Returns:
        ``(index, term)``, or None for any other name.

    Raises:
        TypeError: ``prefix`` is not a str.
        ValueError: a bad prefix (a configuration error, not a bad name).

    Pure and thread-safe.
    """
    check_prefix(prefix)
    if not isinstance(name, str):
        return None
    if len(name) < len(prefix) + len(ARCHIVE_SUFFIX):
        return None  # prefix and suffix would overlap
    if not (name.startswith(prefix) and name.endswith(ARCHIVE_SUFFIX)):
        return None
    match = _CORE.fullmatch(name[len(prefix) : -len(ARCHIVE_SUFFIX)])
    if match is None:
        return None
    digits_index, digits_term = match.groups()
    if len(digits_index) > _MAX_DIGITS or len(digits_term) > _MAX_DIGITS:
        return None
    index, term = int(digits_index), int(digits_term)
    if index > _U64_MAX or term > _U64_MAX:
        return None
    # One spelling per LogId: "010" or "0010" would name the archive that
    # load_snapshot_data looks up as "10", so they are not archive names.
    if str(index) != digits_index or str(term) != digits_term:
        return None
    return index, term


def is_temp_name(name: str) -> bool:
    """True for a work-in-progress name (``temp-…``), which recovery may delete.

    Pure and thread-safe.

    >>> is_temp_name("temp-receive-1a2b"), is_temp_name("snapshot-5-1.tar.gz")
    (True, False)
    """
    return name.startswith(TEMP_PREFIX)


def temp_name(kind: str, unique: str) -> str:
    """A work-in-progress name: ``temp-<kind>-<unique>``.

    Args:
        kind: what the temp path is for (``create``, ``receive``, …).
        unique: makes the name unique per operation (a counter, uuid hex).

    Returns:
        ``f"temp-{kind}-{unique}"``.

    Raises:
        TypeError: ``kind`` or ``unique`` is not a str.
        ValueError: either is not a simple name part: ASCII letters, digits,
            ``_ . -``, starting with a letter or digit, at most 128 chars.

    Pure and thread-safe.

    >>> temp_name("receive", "00000007")
    'temp-receive-00000007'
    """
    for label, part in (("kind", kind), ("unique", unique)):
        if not isinstance(part, str):
            raise TypeError(f"temp name {label} must be a str, got {type(part).__name__}")
        if len(part) > _MAX_PART_LEN or _NAME_PART.fullmatch(part) is None:
            raise ValueError(
                f"temp name {label} must be ASCII letters, digits, '_', '.' or '-', "
                f"starting with a letter or digit, at most {_MAX_PART_LEN} chars; got {part!r}"
            )
    return f"{TEMP_PREFIX}{kind}-{unique}"
