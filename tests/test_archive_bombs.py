"""Tar header bombs: every size an archive declares is capped before it is read.

Each hostile archive is a small gzip file whose tar stream declares a huge
extended header, long name, sparse map or member. Every path that opens an
archive (verify, list, unpack, receive, start-up recovery, the CLI) must
refuse it with a library error while its peak RSS grows by less than 64 MiB,
and keep doing so under an address-space limit (no bare MemoryError).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from d_engine_sm import MemoryStateMachine, SnapshotConfig, StateMachineHandler
from d_engine_sm._fs import FileOps
from d_engine_sm._snapshot import archive, chunks, tarsafe
from d_engine_sm.errors import CorruptSnapshotError, SnapshotTransferError, UnsafeArchiveError
from d_engine_sm.proto import common_pb2, storage_pb2

CHILD = Path(__file__).with_name("bomb_child.py")
MiB = 1 << 20
RSS_BUDGET = 64 * MiB
FOLLOWING = 128 * MiB  # zeros after the bomb header: what an uncapped reader would hold
LIBRARY_ERRORS = {"UnsafeArchiveError", "CorruptSnapshotError"}
RECEIVE_ERRORS = LIBRARY_ERRORS | {"SnapshotTransferError", "SnapshotError"}
# The module's ``bombs`` fixture compresses ~1 GiB of filler inside whichever test
# first asks for it; on a loaded machine that alone overran the global 60 s.
pytestmark = pytest.mark.timeout(300)


# -- hostile archive builders -------------------------------------------------------
def write_gz(path: Path, parts: Iterable[bytes]) -> Path:
    """Stream-compress ``parts`` into a gzip file (never all in memory)."""
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        for part in parts:
            f.write(comp.compress(part))
        f.write(comp.flush())
    return path


def header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def zeros(n: int) -> Iterator[bytes]:
    chunk = bytes(MiB)
    for _ in range(n // MiB):
        yield chunk


def regular(name: str, data: bytes) -> list[bytes]:
    pad = -len(data) % 512
    return [header(name, tarfile.REGTYPE, len(data)), data, bytes(pad)]


END = bytes(1024)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def build_big_header(path: Path, kind: bytes) -> Path:
    """One extension header of ``kind`` declaring 256 MiB, 128 MiB of it present."""
    return write_gz(
        path,
        [header("././@Ext", kind, 256 * MiB), *zeros(FOLLOWING), *regular("kv.bin", b"x"), END],
    )


def build_gnu_sparse(path: Path) -> Path:
    """An old GNU sparse member whose extension blocks never end."""
    first = bytearray(header("kv.bin", tarfile.GNUTYPE_SPARSE, 0))
    first[482] = 1  # isextended
    block = bytearray(512)
    for i in range(21):
        block[i * 24 : i * 24 + 24] = b"00000000001\0" * 2
    block[504] = 1
    count = FOLLOWING // 512
    return write_gz(path, [with_checksum(first), *(bytes(block) for _ in range(count)), END])


def build_sparse_10(path: Path) -> Path:
    """PAX GNU sparse 1.0: a sparse map read from the data blocks, endlessly long."""
    records = b"".join(
        pax_record(k, v)
        for k, v in [
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "kv.bin"),
            ("GNU.sparse.realsize", "1"),
        ]
    )
    pax = [header("././@PaxHeader", tarfile.XHDTYPE, len(records)), records]
    pax.append(bytes(-len(records) % 512))
    count = FOLLOWING // 2
    body_head = b"%d\n" % count

    def body() -> Iterator[bytes]:
        yield body_head
        piece = b"1\n" * (MiB // 2)
        for _ in range(FOLLOWING // MiB):
            yield piece

    return write_gz(path, [*pax, header("kv.bin", tarfile.REGTYPE, 512), *body(), END])


def build_oversized_member(path: Path) -> Path:
    """A member declaring 2**62 bytes with 1 KiB behind it."""
    return write_gz(path, [header("kv.bin", tarfile.REGTYPE, 2**62), bytes(1024)])


def build_short_member(path: Path) -> Path:
    """A member declaring 512 KiB (under the caps) with 1 KiB behind it."""
    return write_gz(path, [header("kv.bin", tarfile.REGTYPE, 512 << 10), b"y" * 1024])


def build_chain(path: Path, n: int = 5000) -> Path:
    """Thousands of empty PAX headers in front of one member (recursion bomb)."""
    return write_gz(path, [*(header("././@PaxHeader", tarfile.XHDTYPE, 0) for _ in range(n)), END])


BIG = {
    "pax_x": lambda p: build_big_header(p, tarfile.XHDTYPE),
    "pax_g": lambda p: build_big_header(p, tarfile.XGLTYPE),
    "pax_solaris": lambda p: build_big_header(p, tarfile.SOLARIS_XHDTYPE),
    "gnu_longname": lambda p: build_big_header(p, tarfile.GNUTYPE_LONGNAME),
    "gnu_longlink": lambda p: build_big_header(p, tarfile.GNUTYPE_LONGLINK),
    "gnu_sparse": build_gnu_sparse,
    "pax_sparse_10": build_sparse_10,
    "oversized_member": build_oversized_member,
}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    return {name: build(root / f"{name}.tar.gz") for name, build in BIG.items()}


def run_child(
    ops: list[str], path: Path, work: Path, limit: int | None = None
) -> list[dict[str, object]]:
    """Run ``ops`` one after the other in one child; one result per op."""
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(CHILD), ",".join(ops), str(path), str(work)]
    if limit is not None:
        argv.append(str(limit))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["op"] for r in results] == ops, out.stdout
    return results


# -- in-process: fast checks of each class ----------------------------------------------
@pytest.mark.parametrize("name", sorted(BIG))
def test_files_are_small(bombs: dict[str, Path], name: str) -> None:
    assert bombs[name].stat().st_size < 2 * MiB


@pytest.mark.parametrize("name", sorted(BIG))
def test_verify_refuses_every_bomb(bombs: dict[str, Path], name: str) -> None:
    with pytest.raises(CorruptSnapshotError):
        archive.verify(bombs[name])


@pytest.mark.parametrize("name", sorted(BIG))
def test_list_and_unpack_refuse_every_bomb(
    bombs: dict[str, Path], name: str, tmp_path: Path
) -> None:
    with pytest.raises((UnsafeArchiveError, CorruptSnapshotError)):
        archive.list_members(bombs[name])
    with pytest.raises((UnsafeArchiveError, CorruptSnapshotError)):
        archive.safe_unpack(bombs[name], tmp_path, max_bytes=MiB, max_members=100)


def test_header_chain_is_bounded(tmp_path: Path) -> None:
    path = build_chain(tmp_path / "chain.tar.gz")
    with pytest.raises(CorruptSnapshotError, match="extension headers"):
        archive.verify(path)
    with pytest.raises(UnsafeArchiveError, match="extension headers"):
        archive.list_members(path)


def test_global_headers_accumulate_to_a_cap(tmp_path: Path) -> None:
    parts: list[bytes] = []
    for g in range(3):
        records = b"".join(pax_record(f"k{g}.{i:06d}", "v" * 20) for i in range(5000))
        assert len(records) < tarsafe.MAX_EXTENDED_HEADER
        parts += [header("././@Global", tarfile.XGLTYPE, len(records)), records]
        parts.append(bytes(-len(records) % 512))
    path = write_gz(tmp_path / "g.tar.gz", [*parts, *regular("kv.bin", b"x"), END])
    with pytest.raises(CorruptSnapshotError, match="global headers exceed"):
        archive.verify(path)


def test_member_shorter_than_declared(tmp_path: Path) -> None:
    path = build_short_member(tmp_path / "short.tar.gz")
    with pytest.raises(CorruptSnapshotError):
        archive.verify(path)
    with pytest.raises(CorruptSnapshotError):
        archive.list_members(path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(CorruptSnapshotError):
        archive.safe_unpack(path, dest, max_bytes=MiB, max_members=100)


def test_long_but_legal_names_still_work(tmp_path: Path) -> None:
    """Caps sit far above what real archives use: a 1000-char name round-trips."""
    src = tmp_path / "src"
    deep = src / "/".join(["d" * 99] * 9)
    deep.mkdir(parents=True)
    (deep / "kv.bin").write_bytes(b"v")
    arc = tmp_path / "a.tar.gz"
    with open(arc, "wb") as f:
        archive.pack(src, f)
    archive.verify(arc)
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.safe_unpack(arc, dest, max_bytes=MiB, max_members=100)
    assert (dest / deep.relative_to(src) / "kv.bin").read_bytes() == b"v"


def test_out_of_memory_while_decoding_is_a_library_error() -> None:
    with pytest.raises(CorruptSnapshotError, match="out of memory"), tarsafe.decoding("x"):
        raise MemoryError


# -- subprocesses: peak RSS of every path -------------------------------------------------
OPS = ["verify", "list", "unpack", "manifest", "receive", "startup"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(BIG))
def test_every_path_stays_within_64_mib(bombs: dict[str, Path], name: str, tmp_path: Path) -> None:
    for result in run_child(OPS, bombs[name], tmp_path):
        op = result["op"]
        allowed = RECEIVE_ERRORS if op == "receive" else LIBRARY_ERRORS
        if op == "startup":
            # Start-up recovery never raises for a bad archive: it moves it aside.
            assert result["error"] is None, (name, result)
            left = result["left"]
            assert isinstance(left, list)
            assert "snapshot-10-1.tar.gz.broken" in left, (name, result)
            assert "snapshot-10-1.tar.gz" not in left, (name, result)
        elif op == "manifest":  # reads only the first header: None when it is a member
            assert result["error"] in {*allowed, None}, (name, result)
        else:
            assert result["error"] in allowed, (name, result)
        assert isinstance(result["growth"], int)
        assert result["growth"] < RSS_BUDGET, (name, op, result["growth"] // MiB)
        if op == "receive":
            acks = result["acks"]
            assert isinstance(acks, list) and acks and acks[-1] == "FAILED", (name, result)
            assert result["left"] in ([], [".lock"]), (name, result)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("op", ["receive", "verify", "unpack"])
def test_under_an_address_space_limit(bombs: dict[str, Path], op: str, tmp_path: Path) -> None:
    """With little memory to spare, still a library error, never a bare MemoryError."""
    limit = _address_space_now() + 256 * MiB
    for name in ("pax_x", "gnu_longname", "pax_sparse_10"):
        (result,) = run_child([op], bombs[name], tmp_path / name, limit=limit)
        assert result["error"] in RECEIVE_ERRORS, (name, result)
        if op == "receive":
            acks = result["acks"]
            assert isinstance(acks, list) and acks and acks[-1] == "FAILED", (name, result)


def _address_space_now() -> int:
    """Virtual size of a child that imported the library (the limit's baseline)."""
    code = (
        "import os, d_engine_sm, d_engine_sm._snapshot.archive\n"
        "pages = int(open('/proc/self/statm').read().split()[0])\n"
        "print(pages * os.sysconf('SC_PAGE_SIZE'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0 or not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc/self/statm")
    # Threads (receive runs three) each reserve a stack: leave room for them.
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    per_thread = stack if 0 < stack < 64 * MiB else 8 * MiB
    return int(out.stdout.strip()) + 4 * per_thread


# -- the CLI ------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["pax_x", "gnu_longlink", "oversized_member"])
def test_cli_commands_stay_small(bombs: dict[str, Path], name: str, tmp_path: Path) -> None:
    path = bombs[name]
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    os.link(path, snaps / "snapshot-10-1.tar.gz")
    commands = [
        ["snapshot", "verify", str(snaps)],
        ["snapshot", "inspect", str(path)],
        ["snapshot", "list", str(snaps)],
        ["snapshot", "extract", str(path), str(tmp_path / "out"), "--max-bytes", "1000"],
    ]
    baseline = _peak_of(["snapshot", "list", str(tmp_path / "empty-missing")])
    for argv in commands:
        code, peak, err = _run_measured(argv)
        assert peak - baseline < RSS_BUDGET, (argv, (peak - baseline) // MiB)
        if argv[1] != "list":
            assert code == 1, (argv, code, err)
            assert "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _run_measured(argv: list[str]) -> tuple[int, int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "d_engine_sm", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, err


def _peak_of(argv: list[str]) -> int:
    return _run_measured(argv)[1]


def test_out_of_memory_while_receiving_ends_with_failed_ack(tmp_path: Path) -> None:
    """Memory exhausted anywhere on the receive path: FAILED ack, a library error."""

    class Exhausted(FileOps):
        def announce(self, step: str) -> None:
            if step == "receive:chunk":
                raise MemoryError

    data = b"\x1f\x8b" + bytes(2000)
    meta = storage_pb2.SnapshotMetadata(last_included=common_pb2.LogId(index=5, term=1))
    stream = [
        chunks.make_chunk(
            seq=i,
            total=2,
            data=data[i * 1000 : (i + 1) * 1000],
            leader_term=1,
            leader_id=2,
            metadata=meta if i == 0 else None,
        )
        for i in range(2)
    ]
    acks: list[storage_pb2.SnapshotAck] = []
    snaps = tmp_path / "snaps"
    config = SnapshotConfig(snapshots_dir=snaps, fsync=False)
    with StateMachineHandler(MemoryStateMachine(), config, file_ops=Exhausted()) as h:
        with pytest.raises(SnapshotTransferError, match="out of memory"):
            h.apply_snapshot_stream_from_leader(1, stream, acks.append)
        assert h.last_applied() == 0
    assert acks[-1].status == storage_pb2.SnapshotAck.FAILED
    assert [p.name for p in snaps.iterdir() if p.name != ".lock"] == []


# -- the class: any header type with any declared size ----------------------------------
_TYPES = b"0123456789ALKSVMNgxXDIEZ\0"
_SIZES = [0, 1, 513, 16 * MiB, 8**11 - 1]
_BEHIND = 12 * MiB  # an uncapped reader of a 16 MiB header holds all of it


@pytest.mark.parametrize("kind", [bytes([t]) for t in _TYPES], ids=lambda k: repr(k)[2:-1])
def test_any_header_type_with_any_size_is_bounded(kind: bytes, tmp_path: Path) -> None:
    """Whatever the type byte and declared size, every reader stays small and
    ends in a library error or a clean result (never another exception)."""
    for size in _SIZES:
        behind = zeros(_BEHIND if size > _BEHIND else MiB)
        path = write_gz(
            tmp_path / "h.tar.gz", [header("kv.bin", kind, size), *behind, *regular("x", b"x"), END]
        )
        tracemalloc.start()
        try:
            for op in ("verify", "list", "unpack"):
                dest = tmp_path / f"d-{op}"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                try:
                    if op == "verify":
                        archive.verify(path)
                    elif op == "list":
                        archive.list_members(path)
                    else:
                        archive.safe_unpack(path, dest, max_bytes=4 * MiB, max_members=10)
                except (CorruptSnapshotError, UnsafeArchiveError):
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * MiB, (kind, size, peak // MiB)
