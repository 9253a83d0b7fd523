"""``snapshot list|inspect|verify|extract``: look at archives on disk.

Read-only, except ``extract`` writing into its (empty) destination.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from d_engine_sm._cli import restore
from d_engine_sm._cli.common import (
    DEFAULT_PREFIX,
    Subparsers,
    _Failure,
    add_command,
    check_prefix,
    existing_dir,
    existing_file,
    out,
    positive_int,
    printable,
    short_hex,
)
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._progress import fmt_age, fmt_count, fmt_mb
from d_engine_sm._snapshot import archive, manifest
from d_engine_sm._snapshot.naming import BROKEN_SUFFIX, LOCK_NAME, is_temp_name, parse_archive_name
from d_engine_sm._sqlite import APPLICATION_ID
from d_engine_sm.errors import CorruptSnapshotError, UnsafeArchiveError
from d_engine_sm.proto import storage_pb2

_SQLITE_NAMES: Final = ("*.sqlite3", "*.sqlite", "*.db")
_MAX_CELL: Final = 48  # characters of the MANIFEST column in ``snapshot list``


def register(subparsers: Subparsers) -> None:
    snap = add_command(subparsers, "snapshot", help="list, inspect, verify or extract archives")
    actions = snap.add_subparsers(dest="snapshot_command", metavar="ACTION")
    actions.required = True
    p = add_command(actions, "list", help="archives in a snapshots directory")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.set_defaults(func=_cmd_list)
    p = add_command(actions, "inspect", help="one archive: LogId, digest, manifest, members")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.set_defaults(func=_cmd_inspect)
    p = add_command(actions, "verify", help="check archives end to end")
    p.add_argument("path", type=Path, metavar="DIR|FILE")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.add_argument(
        "--state",
        type=Path,
        metavar="SQLITE",
        help="SqliteStateMachine database whose recorded snapshot metadata to check against "
        "(default: one found next to the archives)",
    )
    p.set_defaults(func=_cmd_verify)
    p = add_command(actions, "extract", help="safely unpack an archive")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("dest", type=Path, metavar="DEST")
    p.add_argument("--max-bytes", type=positive_int, default=SnapshotConfig.max_unpacked_bytes)
    p.add_argument("--max-members", type=positive_int, default=SnapshotConfig.max_archive_members)
    p.set_defaults(func=_cmd_extract)
    restore.register(actions)


@dataclass
class _DirListing:
    archives: list[tuple[int, int, Path]] = field(default_factory=list)
    temps: list[Path] = field(default_factory=list)
    broken: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)


def _scan(directory: Path, prefix: str) -> _DirListing:
    """Classify a snapshots directory's entries (read-only, unlike the store's recovery)."""
    found = _DirListing()
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name == LOCK_NAME:
            continue
        if is_temp_name(name):
            found.temps.append(entry)
        elif name.endswith(BROKEN_SUFFIX):
            found.broken.append(entry)
        elif entry.is_file() and (parsed := parse_archive_name(name, prefix)) is not None:
            found.archives.append((parsed[0], parsed[1], entry))
        else:
            found.other.append(entry)
    found.archives.sort()
    return found


def _escaped(text: str) -> str:
    """``text`` with each unprintable character escaped (manifest strings come from the archive)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


# -- snapshot list ------------------------------------------------------------------------
def _manifest_cell(path: Path) -> str:
    """The MANIFEST column: what the archive says it holds (reads at most ~4 KiB)."""
    try:
        cell = _escaped(manifest.summary(archive.read_manifest(path)))
    except CorruptSnapshotError:
        return "bad manifest"
    # Its strings come from the archive: keep a hostile one from widening the table.
    return cell if len(cell) <= _MAX_CELL else cell[: _MAX_CELL - 1] + "…"


def _cmd_list(args: argparse.Namespace) -> int:
    directory = existing_dir(args.dir)
    listing = _scan(directory, check_prefix(args.prefix))
    now = time.time()
    rows: list[tuple[str, str, str]] = []
    for index, term, path in listing.archives:
        try:
            st = path.stat()
            digest = archive.sha256_file(path)
            cell = _manifest_cell(path)
        except FileNotFoundError:  # pruned since the scan
            continue
        head = (
            f"{index:>12} {term:>6} {fmt_mb(st.st_size):>11} {fmt_age(now - st.st_mtime):>7}"
            f"  {short_hex(digest):<12}"
        )
        rows.append((head, cell, path.name))
    if rows:
        width = max(len("MANIFEST"), *(len(cell) for _, cell, _ in rows))
        out(
            f"{'INDEX':>12} {'TERM':>6} {'SIZE':>11} {'AGE':>7}  {'SHA256':<12}"
            f"  {'MANIFEST':<{width}}  NAME"
        )
    for head, cell, name in rows:
        out(f"{head}  {cell:<{width}}  {name}")
    if not rows:  # none, or all pruned since the scan
        out(f"no snapshot archives ({args.prefix}<index>-<term>.tar.gz) in {directory}")
    else:
        out(f"{len(rows)} archive(s) in {directory}")
    for path in listing.temps:
        out(f"leftover  {path.name}  (work in progress, or left by a crash: removed at start-up)")
    for path in listing.broken:
        out(f"broken    {path.name}  (failed verification at start-up, moved aside)")
    for path in listing.other:
        out(f"other     {path.name}  (not a snapshot archive)")
    return 0


# -- snapshot inspect ---------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace) -> int:
    path = existing_file(args.file)
    prefix = check_prefix(args.prefix)
    parsed = parse_archive_name(path.name, prefix)
    size = path.stat().st_size
    members = archive.list_members(path)  # reads to the end: checks the gzip CRC too
    digest = archive.sha256_file(path)
    out(f"file     {path}")
    if parsed is None:
        out(f"log id   unknown (name is not {prefix}<index>-<term>.tar.gz)")
    else:
        out(f"log id   index {parsed[0]} term {parsed[1]}")
    out(f"size     {size} bytes ({fmt_mb(size)})")
    out(f"sha256   {digest.hex()}")
    try:
        found = archive.read_manifest(path)
    except CorruptSnapshotError as exc:
        bad: CorruptSnapshotError | None = exc
        out(f"manifest bad ({_escaped(exc.reason)})")
    else:
        bad = None
        for line in manifest.describe(found):
            out(_escaped(line))
    total = sum(m[1] for m in members if m[2] == "file")
    out(f"members  {len(members)} ({fmt_count(total)} bytes unpacked)")
    for name, member_size, kind in members:
        out(f"  {kind:<8} {member_size:>14}  {printable(name)}")
    # Everything is shown first; then, like installs and start-up recovery, it fails
    # on what they would refuse, so a script can trust the exit code.
    problems = [] if bad is None else [str(bad)]
    unsafe = [name for name, _, kind in members if kind not in ("file", "dir")]
    if unsafe:
        shown = ", ".join(printable(name) for name in unsafe[:5])
        problems.append(f"{len(unsafe)} member(s) that safe unpack refuses: {shown}")
    if problems:
        raise _Failure("; ".join(problems))
    return 0


# -- snapshot verify ----------------------------------------------------------------------
def _recorded(sources: Sequence[Path]) -> list[tuple[Path, storage_pb2.SnapshotMetadata]]:
    """Snapshot metadata recorded by SqliteStateMachine databases (read-only open)."""
    found = []
    for db_path in sources:
        uri = "file:" + urllib.parse.quote(str(db_path.resolve())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True)
        except sqlite3.Error:
            continue
        try:
            if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                continue
            row = conn.execute("SELECT snapshot_meta FROM meta WHERE id = 0").fetchone()
        except sqlite3.Error:
            continue
        finally:
            conn.close()
        if row is None or row[0] is None:
            continue
        meta = storage_pb2.SnapshotMetadata()
        try:
            meta.ParseFromString(row[0])
        except Exception:  # a damaged record is no record
            continue
        found.append((db_path, meta))
    return found


def _record_candidates(directory: Path, explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [existing_file(explicit)]
    seen: list[Path] = []
    for place in (directory, directory.parent):
        for pattern in _SQLITE_NAMES:
            for candidate in sorted(place.glob(pattern)):
                if candidate.is_file() and candidate not in seen:
                    seen.append(candidate)
    return seen


def _cmd_verify(args: argparse.Namespace) -> int:
    target: Path = args.path
    prefix = check_prefix(args.prefix)
    if not target.exists():
        raise _Failure(f"no such file or directory: {target}")
    if target.is_dir():
        listing = _scan(target, prefix)
        files = [p for _, _, p in listing.archives]
        directory = target
    else:
        listing = _DirListing()
        files = [target]
        directory = target.parent
    records = _recorded(_record_candidates(directory, args.state))
    corrupt: list[Path] = []
    gone = 0
    for path in files:
        try:
            digest = archive.verify(path)
        except FileNotFoundError:
            gone += 1
            out(f"skipped  {path.name}  (removed meanwhile)")
            continue
        except CorruptSnapshotError as exc:
            corrupt.append(path)
            out(f"CORRUPT  {path.name}: {exc.reason}")
            continue
        note = "no recorded checksum"
        parsed = parse_archive_name(path.name, prefix)
        for source, meta in records:
            lid = meta.last_included
            if parsed is None or (lid.index, lid.term) != parsed or len(meta.checksum) != 32:
                continue
            if meta.checksum != digest:
                note = ""
                corrupt.append(path)
                out(
                    f"CORRUPT  {path.name}: SHA-256 {short_hex(digest)} does not match "
                    f"{short_hex(meta.checksum)} recorded in {source}"
                )
                break
            note = f"matches recorded metadata in {source.name}"
        if note:
            out(f"ok       {path.name}  sha256 {short_hex(digest)}  ({note})")
    for path in listing.temps:
        out(f"skipped  {path.name}  (temp leftover)")
    for path in listing.broken:
        out(f"skipped  {path.name}  (already marked broken)")
    if len(files) == gone:  # none, or all removed since the scan
        out(f"no snapshot archives to verify in {target}")
    else:
        out(f"{len(files) - gone} archive(s) verified, {len(corrupt)} corrupt")
    if corrupt:
        names = ", ".join(str(p) for p in corrupt)
        raise _Failure(f"{len(corrupt)} corrupt snapshot archive(s): {names}")
    return 0


# -- snapshot extract ---------------------------------------------------------------------
def _cmd_extract(args: argparse.Namespace) -> int:
    source = existing_file(args.file)
    dest: Path = args.dest
    created = False
    if dest.exists():
        if not dest.is_dir():
            raise _Failure(f"destination exists and is not a directory: {dest}")
        if any(dest.iterdir()):
            raise _Failure(f"destination is not empty, refusing to extract into it: {dest}")
    else:
        dest.mkdir(parents=True)
        created = True
    try:
        archive.safe_unpack(source, dest, max_bytes=args.max_bytes, max_members=args.max_members)
    except BaseException as exc:
        # Nothing half-extracted stays behind: dest was empty (or absent) before.
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in list(dest.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        if isinstance(exc, (UnsafeArchiveError, CorruptSnapshotError)):
            raise _Failure(f"refused {source}: {exc}; nothing extracted") from exc
        raise
    files = [p for p in dest.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    out(f"extracted {len(files)} file(s), {fmt_count(total)} bytes, into {dest}")
    return 0
