"""Snapshot file names: d-engine's B150-B157 that apply, and its Q01 parser bug avoided."""

from __future__ import annotations

import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import puts
from hypothesis import given
from hypothesis import strategies as st

from d_engine_sm import MemoryStateMachine, StateMachineHandler
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._snapshot.naming import (
    ARCHIVE_SUFFIX,
    BROKEN_SUFFIX,
    LOCK_NAME,
    TEMP_PREFIX,
    archive_name,
    check_prefix,
    is_temp_name,
    parse_archive_name,
    temp_name,
)

U64_MAX = 2**64 - 1


def test_constants() -> None:
    assert (TEMP_PREFIX, ARCHIVE_SUFFIX, BROKEN_SUFFIX, LOCK_NAME) == (
        "temp-",
        ".tar.gz",
        ".broken",
        ".lock",
    )


# -- B150 / B156 / B153: final names ------------------------------------------


def test_b150_final_name() -> None:
    assert archive_name("snapshot-", 100, 5) == "snapshot-100-5.tar.gz"


def test_b156_custom_prefix() -> None:
    assert archive_name("snap-", 100, 5) == "snap-100-5.tar.gz"
    assert parse_archive_name("snap-100-5.tar.gz", "snap-") == (100, 5)


def test_b153_parse_final_name() -> None:
    assert parse_archive_name("snapshot-100-5.tar.gz", "snapshot-") == (100, 5)


def test_b155_invalid_name() -> None:
    assert parse_archive_name("invalid-file.txt", "snapshot-") is None


def test_b154_temp_names_are_not_archives() -> None:
    # d-engine's path manager parsed "temp-100-5" as (100, 5); here temp
    # names are never archives (recovery deletes them), only is_temp_name.
    assert parse_archive_name("temp-100-5", "snapshot-") is None
    assert is_temp_name("temp-100-5")


def test_b157_config_default_prefix_works() -> None:
    prefix = SnapshotConfig().snapshots_dir_prefix
    assert parse_archive_name(archive_name(prefix, 7, 2), prefix) == (7, 2)


def test_zero_log_id() -> None:
    assert archive_name("snapshot-", 0, 0) == "snapshot-0-0.tar.gz"
    assert parse_archive_name("snapshot-0-0.tar.gz", "snapshot-") == (0, 0)


# -- Q01: prefixes of any length ------------------------------------------------


def test_q01_short_prefix_with_long_index() -> None:
    # d-engine sliced 9 bytes: "snap-12345678-3" read as (5678, 3).
    assert parse_archive_name("snap-12345678-3.tar.gz", "snap-") == (12345678, 3)


def test_q01_short_prefix_plain() -> None:
    # d-engine: core "5" -> None, never cleaned.
    assert parse_archive_name("snap-100-5.tar.gz", "snap-") == (100, 5)


def test_q01_long_prefix_with_digits_and_dashes() -> None:
    assert parse_archive_name("snapshot_v2-100-5.tar.gz", "snapshot_v2-") == (100, 5)
    assert parse_archive_name("snap-v2-100-5.tar.gz", "snap-v2-") == (100, 5)
    assert parse_archive_name("s-1-2-100-5.tar.gz", "s-1-2-") == (100, 5)


def test_q01_tiny_names_do_not_crash() -> None:
    # d-engine panicked slicing names shorter than 9 bytes.
    for name in ["", "a", "a.gz", ".tar.gz", "a.tar.gz", "a1-2", "a-.tar.gz"]:
        assert parse_archive_name(name, "a") is None


@pytest.mark.parametrize("length", range(1, 21))
def test_prefix_lengths_round_trip(length: int) -> None:
    prefix = ("p" * length)[:-1] + "-"
    for index, term in [(0, 0), (1, 1), (12345678, 3), (U64_MAX, U64_MAX)]:
        name = archive_name(prefix, index, term)
        assert name == f"{prefix}{index}-{term}.tar.gz"
        assert parse_archive_name(name, prefix) == (index, term)


def test_other_prefix_does_not_match() -> None:
    assert parse_archive_name("snapshot-100-5.tar.gz", "snap-") is None
    assert parse_archive_name("snap-100-5.tar.gz", "snapshot-") is None
    # A prefix that is a proper prefix of another one leaves junk behind it.
    assert parse_archive_name("snap-v2-100-5.tar.gz", "snap-") is None


# -- junk names --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "snapshot-100-5.gz",  # .gz that is not .tar.gz
        "snapshot-100-5.tgz",
        "snapshot-100-5.tar",
        "snapshot-100-5.tar.gz.broken",
        "snapshot-100-5.tar.gz.tmp",
        "snapshot-100-5",  # a directory name, B092
        "snapshot-1-2-3.tar.gz",  # extra dash segment (G101)
        "snapshot-1-2-.tar.gz",
        "snapshot--1-2.tar.gz",
        "snapshot-bad-2-2.tar.gz",
        "snapshot-100.tar.gz",
        "snapshot--5.tar.gz",
        "snapshot-100-.tar.gz",
        "snapshot-.tar.gz",
        "snapshot-+1-2.tar.gz",
        "snapshot-1-+2.tar.gz",
        "snapshot- 1-2.tar.gz",
        "snapshot-1 -2.tar.gz",
        "snapshot-1_000-2.tar.gz",  # int() would accept the underscore
        "snapshot-0x10-2.tar.gz",
        "snapshot-1e3-2.tar.gz",
        "snapshot-\u0661\u0662-3.tar.gz",  # Arabic-Indic digits: \d would match
        "snapshot-\uff11-3.tar.gz",  # fullwidth one
        "snapshot-1-2.tar.gz\n",
        "Snapshot-1-2.tar.gz",
        "snapshot-1-2.TAR.GZ",
        "xsnapshot-1-2.tar.gz",
        "temp-snapshot-1-2.tar.gz",
        ".lock",
        "",
    ],
)
def test_junk_names(name: str) -> None:
    assert parse_archive_name(name, "snapshot-") is None


def test_huge_numbers() -> None:
    top = f"snapshot-{U64_MAX}-{U64_MAX}.tar.gz"
    assert parse_archive_name(top, "snapshot-") == (U64_MAX, U64_MAX)
    assert parse_archive_name(f"snapshot-{U64_MAX + 1}-1.tar.gz", "snapshot-") is None
    assert parse_archive_name(f"snapshot-1-{U64_MAX + 1}.tar.gz", "snapshot-") is None
    assert parse_archive_name("snapshot-" + "9" * 25 + "-1.tar.gz", "snapshot-") is None
    # Longer than CPython's int() digit limit (4300): still just None.
    assert parse_archive_name("snapshot-" + "1" * 5000 + "-1.tar.gz", "snapshot-") is None


@pytest.mark.parametrize(
    "name",
    [
        "snapshot-007-01.tar.gz",
        "snapshot-010-1.tar.gz",
        "snapshot-10-01.tar.gz",
        "snapshot-00-0.tar.gz",
        "snapshot-0-00.tar.gz",
        "snapshot--0-1.tar.gz",
        "snapshot-0" + "0" * 20 + "-1.tar.gz",
    ],
)
def test_leading_zeros_are_not_canonical(name: str) -> None:
    # load_snapshot_data looks archives up by archive_name(): "010" would be
    # recovered as index 10 and then never found (one spelling per LogId).
    assert parse_archive_name(name, "snapshot-") is None


def test_zero_is_canonical() -> None:
    assert parse_archive_name("snapshot-0-0.tar.gz", "snapshot-") == (0, 0)


def test_prefix_overlapping_suffix() -> None:
    # Name shorter than prefix + suffix: prefix and suffix would share bytes.
    assert parse_archive_name("x.tar.gz", "x.tar.gz") is None
    assert parse_archive_name("x.tar.gz1-2.tar.gz", "x.tar.gz") == (1, 2)


@given(
    prefix=st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=30),
    index=st.integers(0, U64_MAX),
    term=st.integers(0, U64_MAX),
)
def test_round_trip_property(prefix: str, index: int, term: int) -> None:
    if prefix in (".", "..") or prefix.startswith(TEMP_PREFIX):
        return
    assert parse_archive_name(archive_name(prefix, index, term), prefix) == (index, term)


_PIECES = ["snapshot-", "snap", "-", "0", "00", "1", "010", "42", ".tar", ".gz", "+", " ", "_"]
_PIECES += ["x", "\u0661", "\uff11", str(U64_MAX), str(U64_MAX + 1)]


@given(name=st.one_of(st.text(max_size=40), st.lists(st.sampled_from(_PIECES)).map("".join)))
def test_parse_accepts_exactly_the_canonical_names(name: str) -> None:
    """parse(name) succeeds iff name == archive_name(*parse(name))."""
    parsed = parse_archive_name(name, "snapshot-")
    match = re.fullmatch(r"snapshot-(0|[1-9][0-9]*)-(0|[1-9][0-9]*)\.tar\.gz", name)
    if match is None or max(int(match[1]), int(match[2])) > U64_MAX:
        assert parsed is None
    else:
        assert parsed == (int(match[1]), int(match[2]))
    if parsed is not None:
        assert archive_name("snapshot-", *parsed) == name


# -- bad arguments --------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "a/b", "a\\b", "a\0", ".", "..", "temp-", "temp-x"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        archive_name(prefix, 1, 1)
    with pytest.raises(ValueError, match="prefix"):
        parse_archive_name("snapshot-1-1.tar.gz", prefix)
    with pytest.raises(ValueError, match="prefix"):
        check_prefix(prefix)


def test_bad_prefix_type() -> None:
    with pytest.raises(TypeError, match="prefix"):
        archive_name(b"snapshot-", 1, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("index", "term", "exc"),
    [
        (-1, 0, ValueError),
        (0, -1, ValueError),
        (U64_MAX + 1, 0, ValueError),
        (0, U64_MAX + 1, ValueError),
        (True, 0, TypeError),
        (1.0, 0, TypeError),
        (0, "1", TypeError),
    ],
)
def test_bad_log_id(index: object, term: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"index|term"):
        archive_name("snapshot-", index, term)  # type: ignore[arg-type]


def test_config_and_naming_agree_on_prefixes() -> None:
    for prefix in ["", "a/b", ".", "temp-x"]:
        with pytest.raises(ValueError):
            SnapshotConfig(snapshots_dir_prefix=prefix)
        with pytest.raises(ValueError):
            check_prefix(prefix)


# -- temp names --------------------------------------------------------------


def test_temp_name() -> None:
    assert temp_name("receive", "3f2a") == "temp-receive-3f2a"
    assert temp_name("create", "100-5") == "temp-create-100-5"
    assert temp_name("unpack", "a.b_c") == "temp-unpack-a.b_c"
    assert is_temp_name(temp_name("x", "1"))


def test_is_temp_name() -> None:
    assert is_temp_name("temp-100-5")
    assert is_temp_name("temp-create-1.tar.gz")
    assert not is_temp_name("snapshot-100-5.tar.gz")
    assert not is_temp_name("tempfile")
    assert not is_temp_name("xtemp-1")
    assert not is_temp_name(LOCK_NAME)


@pytest.mark.parametrize(
    ("kind", "unique"),
    [
        ("", "1"),
        ("x", ""),
        ("a/b", "1"),
        ("x", "../etc"),
        ("..", "1"),
        (".hidden", "1"),
        ("x", "-1"),
        ("x", "a b"),
        ("x", "a\0"),
        ("x", "\u00e9"),
        ("x", "a" * 129),
    ],
)
def test_temp_name_rejects_non_simple_parts(kind: str, unique: str) -> None:
    with pytest.raises(ValueError, match="temp name"):
        temp_name(kind, unique)


def test_temp_name_type() -> None:
    with pytest.raises(TypeError, match="kind"):
        temp_name(1, "x")  # type: ignore[arg-type]


# -- every path that scans a directory ignores non-canonical names alike -----------


_NON_CANONICAL = [
    "snapshot-010-1.tar.gz",
    "snapshot-+10-1.tar.gz",
    "snapshot- 10-1.tar.gz",
    "snapshot-1_0-1.tar.gz",
    "snapshot-\u0661\u0660-1.tar.gz",
    "snapshot--0-1.tar.gz",
    "snapshot-10-01.tar.gz",
]


def test_non_canonical_names_are_ignored_by_every_scan(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    config = SnapshotConfig(snapshots_dir=snaps, cleanup_retain_count=1, fsync=False)
    with StateMachineHandler(MemoryStateMachine(), config) as h:
        h.apply_chunk(puts(1, 5))
        _, path = h.create_snapshot()
    good = path.read_bytes()
    # Valid archives with newer-looking non-canonical names.
    for name in _NON_CANONICAL:
        (snaps / name).write_bytes(good)
    before = sorted(p.name for p in snaps.iterdir())

    with StateMachineHandler(MemoryStateMachine(), config) as h:  # start-up recovery
        latest = h.get_latest_snapshot_metadata()
        assert latest is not None and latest.last_included.index == 5
        assert sum(len(c.data) for c in h.load_snapshot_data(latest)) == len(good)
        assert h.cleanup_snapshot(1) == []  # prune never touches them either
    assert sorted(p.name for p in snaps.iterdir()) == before  # nothing moved or removed

    def cli(*argv: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "d_engine_sm", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout

    listing = cli("snapshot", "list", str(snaps))
    verified = cli("snapshot", "verify", str(snaps))
    assert "1 archive(s)" in listing and "1 archive(s) verified" in verified
    for name in _NON_CANONICAL:
        assert f"other     {name}" in listing
        assert name not in verified
