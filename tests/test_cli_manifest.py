"""``snapshot inspect`` and ``snapshot list`` show what an archive's manifest says."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import pytest
from conftest import puts

from d_engine_sm import MemoryStateMachine, SnapshotConfig, SqliteStateMachine, StateMachineHandler
from d_engine_sm import __version__ as VERSION
from d_engine_sm._cli import main
from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.manifest import MANIFEST_NAME
from d_engine_sm.proto import common_pb2


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _config(directory: Path) -> SnapshotConfig:
    return SnapshotConfig(snapshots_dir=directory, fsync=False, cleanup_retain_count=5)


def memory_archive(directory: Path, keys: int) -> Path:
    with StateMachineHandler(MemoryStateMachine(), _config(directory)) as h:
        h.apply_chunk(puts(1, keys))
        return h.create_snapshot()[1]


def sqlite_archive(tmp_path: Path, directory: Path, keys: int) -> Path:
    sm = SqliteStateMachine(tmp_path / "state.db")
    try:
        with StateMachineHandler(sm, _config(directory)) as h:
            h.apply_chunk(puts(1, keys))
            return h.create_snapshot()[1]
    finally:
        sm.close()


def old_archive(tmp_path: Path, directory: Path, index: int) -> Path:
    """An archive made the way earlier versions made it: no manifest member."""
    sm = MemoryStateMachine()
    with StateMachineHandler(sm, _config(tmp_path / "scratch")) as h:
        h.apply_chunk(puts(1, index))
    work = tmp_path / "work"
    work.mkdir()
    sm.generate_snapshot_data(work, common_pb2.LogId(index=index, term=1))
    directory.mkdir(exist_ok=True)
    path = directory / f"snapshot-{index}-1.tar.gz"
    with open(path, "wb") as f:
        archive.pack(work, f)
    assert archive.read_manifest(path) is None
    return path


def crafted_archive(path: Path, manifest_body: bytes) -> Path:
    """A well-formed tar.gz whose first member, under the manifest's name, is ``manifest_body``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_NAME, manifest_body), ("kv.bin", b"x" * 100)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(comp.compress(buf.getvalue()) + comp.flush())
    return path


def _good_manifest(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "manifest_version": 1,
        "format": "d_engine_sm.memory",
        "format_version": 1,
        "keys": 1,
        "unpacked_bytes": 100,
        "library_version": "0.1.0",
    }
    fields.update(changes)
    return json.dumps(fields).encode()


def manifest_cells(out: str) -> dict[str, str]:
    """``{archive name: MANIFEST cell}`` from ``snapshot list``, cut at the header's columns."""
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("INDEX"))
    start, end = header.index("MANIFEST"), header.index("NAME")
    return {
        line[end:].strip(): line[start:end].strip()
        for line in lines
        if line.strip().endswith(".tar.gz")
    }


# -- inspect --------------------------------------------------------------------------------
def test_inspect_memory_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = memory_archive(tmp_path / "snaps", keys=30)
    code, out, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 0, err
    lines = out.splitlines()
    assert "format   d_engine_sm.memory v1" in lines
    assert "keys     30" in lines
    found = archive.read_manifest(path)
    assert found is not None
    assert f"unpacked {found.unpacked_bytes} bytes (declared)" in lines
    assert f"written  by d_engine_sm {VERSION} (manifest v1)" in lines
    assert any(MANIFEST_NAME in line for line in lines)  # still listed as a member


def test_inspect_sqlite_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sqlite_archive(tmp_path, tmp_path / "snaps", keys=12)
    code, out, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 0, err
    version = SqliteStateMachine.snapshot_format_version
    assert f"format   d_engine_sm.sqlite v{version}" in out.splitlines()
    assert "keys     12" in out.splitlines()


def test_inspect_archive_without_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = old_archive(tmp_path, tmp_path / "snaps", index=25)
    code, out, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("manifest")] == [
        "manifest none (archive written without one: older version or another tool)"
    ]
    assert not any(line.startswith("format ") for line in out.splitlines())
    assert "index 25 term 1" in out and "kv.bin" in out


@pytest.mark.parametrize(
    "body",
    [b"{nope", _good_manifest(keys=-1), _good_manifest(extra=1), b"\xff\xfe"],
    ids=["not-json", "negative-keys", "extra-key", "not-utf8"],
)
def test_inspect_malformed_manifest_shows_the_rest_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: bytes
) -> None:
    path = crafted_archive(tmp_path / "snaps" / "snapshot-5-1.tar.gz", body)
    code, out, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 1
    manifest_lines = [line for line in out.splitlines() if line.startswith("manifest")]
    assert len(manifest_lines) == 1 and manifest_lines[0].startswith("manifest bad ("), out
    assert "index 5 term 1" in out and "kv.bin" in out  # the rest is still shown
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("d-engine-sm: error: "), err
    assert str(path) in lines[0] and MANIFEST_NAME in lines[0]


def test_inspect_hostile_manifest_strings_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = _good_manifest(format="evil\x1b[2J\nformat", library_version="\x07")
    path = crafted_archive(tmp_path / "snaps" / "snapshot-5-1.tar.gz", body)
    code, out, err = run(capsys, "snapshot", "inspect", str(path))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out
    assert sum(line.startswith("format") for line in out.splitlines()) == 1


# -- list -----------------------------------------------------------------------------------
def test_list_shows_one_manifest_cell_per_archive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "snaps"
    memory_archive(directory, keys=7)  # snapshot-7-1
    sqlite_archive(tmp_path, directory, keys=12)  # snapshot-12-1
    old_archive(tmp_path, directory, index=25)
    crafted_archive(directory / "snapshot-30-1.tar.gz", b"{nope")
    (directory / "snapshot-40-1.tar.gz").write_bytes(b"not a gzip file")
    long_format = "f" * 200
    crafted_archive(directory / "snapshot-50-1.tar.gz", _good_manifest(format=long_format))
    code, out, err = run(capsys, "snapshot", "list", str(directory))
    assert code == 0, err
    version = SqliteStateMachine.snapshot_format_version
    cells = manifest_cells(out)
    assert cells == {
        "snapshot-7-1.tar.gz": "d_engine_sm.memory v1, 7 keys",
        "snapshot-12-1.tar.gz": f"d_engine_sm.sqlite v{version}, 12 keys",
        "snapshot-25-1.tar.gz": "-",
        "snapshot-30-1.tar.gz": "bad manifest",
        "snapshot-40-1.tar.gz": "bad manifest",
        "snapshot-50-1.tar.gz": cells["snapshot-50-1.tar.gz"],
    }
    long_cell = cells["snapshot-50-1.tar.gz"]
    assert long_cell.startswith("fff") and long_cell.endswith("…") and len(long_cell) < 60
    # The columns the existing readers rely on are unchanged: index, term first, name last.
    rows = [line.split() for line in out.splitlines() if line.strip().endswith(".tar.gz")]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        (str(i), "1", f"snapshot-{i}-1.tar.gz") for i in (7, 12, 25, 30, 40, 50)
    ]
    assert "6 archive(s) in" in out
