"""Archive refusals beyond the main corpus: control characters, sparse files, bad caps."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.tarsafe import member_kind
from d_engine_sm.errors import UnsafeArchiveError


def _archive(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def _member(name: str, type_: bytes = tarfile.REGTYPE, data: bytes = b"x") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (_member("evil\nname"), "control character in member name"),
        (_member("bell\x07"), "control character in member name"),
        (_member("del\x7f"), "control character in member name"),
        (_member("./"), "file member with an empty name"),
    ],
    ids=["newline", "bell", "del", "dot-slash-file"],
)
def test_refused_members(tmp_path: Path, info: tarfile.TarInfo, reason: str) -> None:
    arc = _archive(tmp_path / "a.tar.gz", info, b"x" if info.isreg() else b"")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match=reason):
        archive.safe_unpack(arc, dest, max_bytes=1 << 20, max_members=10)
    assert list(dest.iterdir()) == []


def test_kind_names_cover_every_tar_type() -> None:
    kinds = {
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.CHRTYPE: "chardev",
        tarfile.BLKTYPE: "blockdev",
        tarfile.FIFOTYPE: "fifo",
        tarfile.DIRTYPE: "dir",
        tarfile.REGTYPE: "file",
    }
    for type_, kind in kinds.items():
        assert member_kind(_member("m", type_)) == kind


@pytest.mark.parametrize(
    ("max_bytes", "max_members"), [(-1, 10), (10, -1)], ids=["bytes", "members"]
)
def test_negative_caps_are_misuse(tmp_path: Path, max_bytes: int, max_members: int) -> None:
    arc = _archive(tmp_path / "a.tar.gz", _member("f"), b"x")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ValueError, match="caps must be >= 0"):
        archive.safe_unpack(arc, dest, max_bytes=max_bytes, max_members=max_members)


def test_destination_must_be_an_existing_directory(tmp_path: Path) -> None:
    arc = _archive(tmp_path / "a.tar.gz", _member("f"), b"x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for dest in (tmp_path / "missing", arc, tmp_path / "link"):
        with pytest.raises(ValueError, match="must be an existing directory"):
            archive.safe_unpack(arc, dest, max_bytes=100, max_members=10)
    assert list((tmp_path / "real").iterdir()) == []


def test_a_gnu_sparse_member_is_refused(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar to write a sparse member")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.truncate(1 << 20)  # all hole: tar --sparse records it as a sparse member
        f.seek(1 << 19)
        f.write(b"data")
    arc = tmp_path / "sparse.tar.gz"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-czf", str(arc), "-C", str(src), "holes"],
        check=True,
        timeout=30,
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match="sparse members are not allowed"):
        archive.safe_unpack(arc, dest, max_bytes=1 << 21, max_members=10)
    assert list(dest.iterdir()) == []
