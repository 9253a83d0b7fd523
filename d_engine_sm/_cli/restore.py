"""``d-engine-sm snapshot restore``: restore a node's state from a backup archive.

The archive goes through the same path as one received from a leader
(``StateMachineHandler.install_snapshot_from_file``): its SHA-256, its
members and its size are checked, and the state is replaced all or nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from d_engine_sm._cli.common import Subparsers, add_command, out
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._sqlite import SqliteStateMachine


def register(snapshot_actions: Subparsers) -> None:
    """Add ``restore`` to the ``snapshot`` command's actions."""
    p = add_command(
        snapshot_actions,
        "restore",
        help="install a backup archive into a SqliteStateMachine (verified, all or nothing)",
        description="Installs ARCHIVE into the SQLite state at --state, verified like a snapshot "
        "received from a leader; the archive is kept in --dir as the newest snapshot. Refused "
        "when the state has already applied past the archive (use a new --state to start over).",
    )
    p.add_argument("archive", type=Path, metavar="ARCHIVE")
    p.add_argument(
        "--state", type=Path, required=True, metavar="SQLITE", help="database to restore"
    )
    p.add_argument("--dir", type=Path, required=True, help="the node's snapshots directory")
    p.add_argument("--sha256", help="expected SHA-256 of the archive (hex)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.archive.is_file():
        raise FileNotFoundError(2, "No such archive", str(args.archive))
    checksum = bytes.fromhex(args.sha256) if args.sha256 else None
    if checksum is not None and len(checksum) != 32:
        raise ValueError("--sha256 must be 64 hex digits")
    sm = SqliteStateMachine(args.state)
    try:
        with StateMachineHandler(sm, SnapshotConfig(snapshots_dir=args.dir)) as handler:
            before = handler.last_applied()
            meta = handler.install_snapshot_from_file(args.archive, checksum=checksum)
            lid = meta.last_included
            out(
                f"restored {args.archive.name}: index {lid.index} term {lid.term} "
                f"(was {before}), {len(sm)} keys, sha256 {meta.checksum.hex()[:16]}…"
            )
    finally:
        sm.close()
    return 0
