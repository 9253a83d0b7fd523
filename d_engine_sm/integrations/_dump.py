"""The small file PySyncObj stores and sends in place of its state dump.

PySyncObj's log compaction writes a "full dump" and ships it to a lagging
follower over its own connection. With d_engine_sm underneath, the state
lives in this library's archives, so the dump only *describes* one: the two
log entries PySyncObj keeps after compaction, the cluster members, the
archive's LogId and SHA-256, the cluster id, and where the archive is served.
A trailing SHA-256 of the whole file catches a truncated or spliced transfer
(PySyncObj's own transfer has no checksum).

Layout: ``MAGIC`` + JSON (UTF-8) + SHA-256 of the preceding bytes (32 bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from d_engine_sm.errors import DEngineError

MAGIC: Final = b"d-engine-sm pysyncobj dump v1\n"
MAX_DUMP_BYTES: Final = 16 * 1024 * 1024  # two log entries plus a few names

#: PySyncObj's log entry: (command bytes, index, term).
LogEntry = tuple[bytes, int, int]


class ClusterMismatch(DEngineError):
    """State, dump or archive belongs to another cluster (or to a wiped node)."""


class BadDump(DEngineError):
    """A dump file that is truncated, corrupt or not ours."""


@dataclass(frozen=True)
class Dump:
    """What a dump file says."""

    cluster_id: str
    last: LogEntry
    prev: LogEntry
    members: tuple[str, ...]
    archive_index: int
    archive_term: int
    archive_sha256: bytes
    source: str | None  # host:port serving the archive (gRPC), None when not served


def encode(dump: Dump) -> bytes:
    body = json.dumps(
        {
            "cluster_id": dump.cluster_id,
            "last": _entry_out(dump.last),
            "prev": _entry_out(dump.prev),
            "members": list(dump.members),
            "archive": {
                "index": dump.archive_index,
                "term": dump.archive_term,
                "sha256": dump.archive_sha256.hex(),
            },
            "source": dump.source,
        },
        sort_keys=True,
    ).encode()
    head = MAGIC + body
    return head + hashlib.sha256(head).digest()


def decode(data: bytes) -> Dump:
    """Parse and verify a dump.

    Raises:
        BadDump: wrong magic, bad digest, or malformed content.
    """
    if len(data) > MAX_DUMP_BYTES or not data.startswith(MAGIC) or len(data) < len(MAGIC) + 32:
        raise BadDump(f"not a d-engine-sm dump ({len(data)} bytes)")
    head, digest = data[:-32], data[-32:]
    if hashlib.sha256(head).digest() != digest:
        raise BadDump("dump SHA-256 mismatch: truncated or corrupted in transfer")
    try:
        obj = json.loads(head[len(MAGIC) :])
        arch = obj["archive"]
        sha = bytes.fromhex(arch["sha256"])
        if len(sha) != 32:
            raise ValueError("archive sha256 is not 32 bytes")
        return Dump(
            cluster_id=str(obj["cluster_id"]),
            last=_entry_in(obj["last"]),
            prev=_entry_in(obj["prev"]),
            members=tuple(str(m) for m in obj["members"]),
            archive_index=_uint(arch["index"]),
            archive_term=_uint(arch["term"]),
            archive_sha256=sha,
            source=None if obj["source"] is None else str(obj["source"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadDump(f"malformed dump: {exc}") from exc


def read(path: Path) -> Dump:
    with open(path, "rb") as f:
        data = f.read(MAX_DUMP_BYTES + 1)
    return decode(data)


def write_durably(path: Path, dump: Dump) -> None:
    """Write temp → fsync → rename → fsync dir: a crash leaves the old or the new dump."""
    temp = path.with_name(path.name + ".d-engine-sm.tmp")
    with open(temp, "wb") as f:
        f.write(encode(dump))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entry_out(entry: LogEntry) -> list[Any]:
    command, index, term = entry
    return [base64.b64encode(command).decode(), index, term]


def _entry_in(raw: Any) -> LogEntry:
    command, index, term = raw
    return base64.b64decode(command, validate=True), _uint(index), _uint(term)


def _uint(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an int >= 0, got {value!r}")
    return value
