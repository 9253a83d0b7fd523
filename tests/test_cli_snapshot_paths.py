"""``d-engine-sm snapshot list|inspect|verify|extract`` off the happy path.

Each test runs the command line in-process through ``main`` and checks the exit
status, the one stderr line of a failure, and what the command printed or left
on disk: archives that vanish mid-command, databases next to the archives that
are not (or hold no, or a damaged) record, destinations that are not usable,
and extractions that fail halfway.
"""

from __future__ import annotations

import gzip
import io
import signal
import sqlite3
import tarfile
import threading
from pathlib import Path

import pytest
from _cli_helpers import one_error_line, run
from conftest import memory_snapshots, puts

from d_engine_sm import (
    SnapshotConfig,
    SqliteStateMachine,
    StateMachineHandler,
)
from d_engine_sm._cli import common, main
from d_engine_sm._cli import snapshot as snapshot_cli
from d_engine_sm._sqlite import APPLICATION_ID

NAME_MAX = 255  # Linux: one path component


def sqlite_node(node: Path, indexes: tuple[int, ...] = (40, 100)) -> tuple[Path, Path]:
    """``node/state.sqlite3`` recording its newest snapshot, and ``node/snapshots``."""
    config = SnapshotConfig(snapshots_dir=node / "snapshots", fsync=False, cleanup_retain_count=5)
    with (
        SqliteStateMachine(node / "state.sqlite3", durability="off") as sm,
        StateMachineHandler(sm, config) as handler,
    ):
        applied = 0
        for index in indexes:
            handler.apply_chunk(puts(applied + 1, index - applied))
            applied = index
            handler.create_snapshot()
    return node / "state.sqlite3", node / "snapshots"


def ok_lines(out: str) -> dict[str, str]:
    """Archive name -> the note in parentheses of its ``ok`` line."""
    found = {}
    for line in out.splitlines():
        if line.startswith("ok "):
            name = line.split()[1]
            found[name] = line[line.index("(") + 1 : line.rindex(")")]
    return found


def prune_after_scan(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Archives removed between the directory scan and reading them (a concurrent prune)."""
    real_scan = snapshot_cli._scan

    def scan(directory: Path, prefix: str) -> snapshot_cli._DirListing:
        listing = real_scan(directory, prefix)
        for name in names:
            (directory / name).unlink()
        return listing

    monkeypatch.setattr(snapshot_cli, "_scan", scan)


# -- list -----------------------------------------------------------------------------
def test_list_skips_an_archive_pruned_meanwhile_and_counts_what_it_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = memory_snapshots(tmp_path / "snaps")
    prune_after_scan(monkeypatch, "snapshot-40-1.tar.gz")
    code, out, err = run(capsys, "snapshot", "list", str(directory))
    assert (code, err) == (0, "")
    assert "snapshot-40-1.tar.gz" not in out
    assert out.count("snapshot-100-1.tar.gz") == 1
    assert f"1 archive(s) in {directory}" in out


def test_list_when_every_archive_was_pruned_meanwhile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = memory_snapshots(tmp_path / "snaps")
    prune_after_scan(monkeypatch, "snapshot-40-1.tar.gz", "snapshot-100-1.tar.gz")
    code, out, err = run(capsys, "snapshot", "list", str(directory))
    assert (code, err) == (0, "")
    assert "INDEX" not in out  # no table header without rows
    assert f"no snapshot archives (snapshot-<index>-<term>.tar.gz) in {directory}" in out


# -- inspect --------------------------------------------------------------------------
def test_inspect_an_archive_under_another_name_has_no_log_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = memory_snapshots(tmp_path / "snaps", (30,))
    renamed = tmp_path / "backup.tar.gz"
    renamed.write_bytes((directory / "snapshot-30-1.tar.gz").read_bytes())
    code, out, err = run(capsys, "snapshot", "inspect", str(renamed))
    assert (code, err) == (0, "")
    assert "log id   unknown (name is not snapshot-<index>-<term>.tar.gz)" in out
    # A custom --prefix is what the message names.
    code, out, _ = run(capsys, "snapshot", "inspect", str(renamed), "--prefix", "snap_")
    assert code == 0
    assert "log id   unknown (name is not snap_<index>-<term>.tar.gz)" in out


def test_inspect_shows_then_fails_on_members_that_safe_unpack_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = tarfile.TarInfo("state.bin")
        data.size = 3
        tar.addfile(data, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("to-passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        fifo = tarfile.TarInfo("pipe")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    path = tmp_path / "snapshot-9-1.tar.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    code, out, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 1  # shown in full, then refused as verify and installs refuse it
    assert "members  3 (3 bytes unpacked)" in out and "symlink" in out and "fifo" in out
    assert one_error_line(err).endswith("2 member(s) that safe unpack refuses: to-passwd, pipe")
    code, out, err = run(capsys, "snapshot", "verify", str(path))
    assert code == 1
    assert "symlink members are not allowed" in out
    assert str(path) in one_error_line(err)


def test_inspect_a_directory_is_not_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "snapshot", "inspect", str(tmp_path))
    assert (code, out) == (1, "")
    assert one_error_line(err) == f"not a file: {tmp_path}"


# -- verify ---------------------------------------------------------------------------
def test_verify_ignores_databases_that_hold_no_usable_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = memory_snapshots(tmp_path / "node" / "snapshots")
    (directory / "junk.db").write_bytes(b"this is not an SQLite database" * 40)
    with sqlite3.connect(directory / "other.sqlite") as other:  # someone else's database
        other.execute("CREATE TABLE meta (id INTEGER, snapshot_meta BLOB)")
        other.execute("INSERT INTO meta VALUES (0, x'0a02')")
    other.close()
    with SqliteStateMachine(tmp_path / "node" / "state.sqlite3", durability="off"):
        pass  # ours, but no snapshot recorded yet
    code, out, err = run(capsys, "snapshot", "verify", str(directory))
    assert (code, err) == (0, "")
    assert ok_lines(out) == {
        "snapshot-40-1.tar.gz": "no recorded checksum",
        "snapshot-100-1.tar.gz": "no recorded checksum",
    }
    assert "2 archive(s) verified, 0 corrupt" in out


def test_verify_treats_a_damaged_record_as_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, directory = sqlite_node(tmp_path / "node", (25,))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        # Field 1 (last_included) declares 0x7f bytes; one follows: not a message.
        conn.execute("UPDATE meta SET snapshot_meta = x'0a7f01' WHERE id = 0")
    conn.close()
    code, out, err = run(capsys, "snapshot", "verify", str(directory))
    assert (code, err) == (0, "")
    assert ok_lines(out) == {"snapshot-25-1.tar.gz": "no recorded checksum"}


def test_verify_with_an_explicit_state_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, directory = sqlite_node(tmp_path / "node")
    # Archives checked elsewhere: nothing next to them says what was recorded.
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    for archive_path in directory.iterdir():
        (elsewhere / archive_path.name).write_bytes(archive_path.read_bytes())
    code, out, _ = run(capsys, "snapshot", "verify", str(elsewhere))
    assert code == 0
    assert set(ok_lines(out).values()) == {"no recorded checksum"}
    code, out, err = run(capsys, "snapshot", "verify", str(elsewhere), "--state", str(db))
    assert (code, err) == (0, "")
    # The database records the newest snapshot only; the older one is not in it.
    assert ok_lines(out) == {
        "snapshot-40-1.tar.gz": "no recorded checksum",
        "snapshot-100-1.tar.gz": "matches recorded metadata in state.sqlite3",
    }
    code, out, err = run(
        capsys, "snapshot", "verify", str(elsewhere), "--state", str(tmp_path / "nope.db")
    )
    assert (code, out) == (1, "")
    assert one_error_line(err) == f"no such file: {tmp_path / 'nope.db'}"


def test_verify_skips_a_database_that_cannot_be_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, directory = sqlite_node(tmp_path / "node", (30,))
    real = snapshot_cli._record_candidates

    def candidates(place: Path, explicit: Path | None) -> list[Path]:
        # One found by the glob, removed before it is opened read-only.
        return [tmp_path / "node" / "vanished.sqlite3", *real(place, explicit)]

    monkeypatch.setattr(snapshot_cli, "_record_candidates", candidates)
    code, out, err = run(capsys, "snapshot", "verify", str(directory))
    assert (code, err) == (0, "")
    assert ok_lines(out) == {"snapshot-30-1.tar.gz": f"matches recorded metadata in {db.name}"}
    assert not (tmp_path / "node" / "vanished.sqlite3").exists()  # read-only: nothing created


def test_verify_skips_archives_removed_meanwhile_and_broken_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = memory_snapshots(tmp_path / "snaps")
    (directory / "snapshot-7-1.tar.gz.broken").write_bytes(b"moved aside at start-up")
    prune_after_scan(monkeypatch, "snapshot-40-1.tar.gz")
    code, out, err = run(capsys, "snapshot", "verify", str(directory))
    assert (code, err) == (0, "")
    assert "skipped  snapshot-40-1.tar.gz  (removed meanwhile)" in out
    assert "skipped  snapshot-7-1.tar.gz.broken  (already marked broken)" in out
    assert list(ok_lines(out)) == ["snapshot-100-1.tar.gz"]
    assert "1 archive(s) verified, 0 corrupt" in out


def test_verify_when_every_archive_was_removed_meanwhile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = memory_snapshots(tmp_path / "snaps", (10,))
    prune_after_scan(monkeypatch, "snapshot-10-1.tar.gz")
    code, out, err = run(capsys, "snapshot", "verify", str(directory))
    assert (code, err) == (0, "")
    assert f"no snapshot archives to verify in {directory}" in out
    assert "verified" not in out


def test_verify_an_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "snapshot", "verify", str(tmp_path))
    assert (code, err) == (0, "")
    assert out == f"no snapshot archives to verify in {tmp_path}\n"


# -- extract --------------------------------------------------------------------------
def test_extract_onto_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = memory_snapshots(tmp_path / "snaps", (5,)) / "snapshot-5-1.tar.gz"
    dest = tmp_path / "dest"
    dest.write_bytes(b"keep me")
    code, out, err = run(capsys, "snapshot", "extract", str(source), str(dest))
    assert (code, out) == (1, "")
    assert one_error_line(err) == (f"destination exists and is not a directory: {dest}")
    assert dest.read_bytes() == b"keep me"


def _tar_gz(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar.gz of files (bytes) and directories (None), in this order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def test_extract_creates_directories_the_archive_does_not_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _tar_gz(
        tmp_path / "flat.tar.gz", [("deep/er/file.txt", b"12345"), ("deep/other.txt", b"6")]
    )
    dest = tmp_path / "dest"
    code, out, err = run(capsys, "snapshot", "extract", str(source), str(dest))
    assert (code, err) == (0, "")
    assert f"extracted 2 file(s), 6 bytes, into {dest}" in out
    assert (dest / "deep" / "er" / "file.txt").read_bytes() == b"12345"
    assert (dest / "deep" / "other.txt").read_bytes() == b"6"
    for directory in (dest / "deep", dest / "deep" / "er"):
        assert directory.stat().st_mode & 0o777 == 0o755


def test_extract_into_an_existing_dir_refused_halfway_leaves_it_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = _tar_gz(
        tmp_path / "evil.tar.gz",
        [("sub", None), ("sub/a.txt", b"aa"), ("top.txt", b"t"), ("../escaped.txt", b"x")],
    )
    dest = tmp_path / "jail" / "dest"
    dest.mkdir(parents=True)
    code, out, err = run(capsys, "snapshot", "extract", str(evil), str(dest))
    assert (code, out) == (1, "")
    line = one_error_line(err)
    assert f"refused {evil}:" in line and "../escaped.txt" in line
    assert line.endswith("; nothing extracted")
    assert dest.is_dir() and list(dest.iterdir()) == []  # kept (it was there), emptied
    assert not (tmp_path / "jail" / "escaped.txt").exists()


def test_extract_failing_on_disk_leaves_dest_empty_and_names_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_name = "n" * (NAME_MAX + 1)  # a valid member name the file system refuses
    source = _tar_gz(
        tmp_path / "long.tar.gz",
        [("sub", None), ("sub/a.txt", b"aa"), ("top.txt", b"t"), (long_name, b"x")],
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    code, out, err = run(capsys, "snapshot", "extract", str(source), str(dest))
    assert (code, out) == (1, "")
    line = one_error_line(err)
    assert line.startswith("File name too long: ")
    assert line.endswith(long_name)
    assert list(dest.iterdir()) == []


# -- shared argument handling -----------------------------------------------------------
def test_state_spec_argument_type() -> None:
    assert common.state_spec("memory") == common.StateSpec("memory")
    assert common.state_spec("sqlite:/d/s.db") == common.StateSpec("sqlite", Path("/d/s.db"))
    for bad in ("sqlite:", "sqlite", "redis:x", "Memory"):
        with pytest.raises(Exception, match=r"expected 'memory' or 'sqlite:PATH'"):
            common.state_spec(bad)


def test_main_runs_off_the_main_thread_and_leaves_sigint_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = memory_snapshots(tmp_path / "snaps", (12,))
    before = signal.getsignal(signal.SIGINT)
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(main(["snapshot", "list", str(directory)]))
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    out, err = capsys.readouterr()
    assert (codes, err) == ([0], "")
    assert "snapshot-12-1.tar.gz" in out and "1 archive(s)" in out
    assert signal.getsignal(signal.SIGINT) is before
