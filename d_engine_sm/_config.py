"""SnapshotConfig: d-engine's snapshot settings, in seconds and bytes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB


@dataclass(frozen=True)
class SnapshotConfig:
    """Snapshot lifecycle settings. Every field is validated on construction.

    The first nine fields are d-engine's, with durations in float seconds and
    sizes in bytes; the rest are this library's. Frozen: share one instance
    between threads freely.

    Raises:
        ValueError: a field is out of range; the message names the field.
        TypeError: a field has the wrong type.

    >>> SnapshotConfig(snapshots_dir="/tmp/snaps").chunk_size
    1048576
    """

    enable: bool = True
    """False: ``should_snapshot`` always answers False (explicit creates still work)."""
    max_log_entries_before_snapshot: int = 1000
    """The default policy's threshold: entries applied since the newest snapshot."""
    snapshot_cool_down_since_last_check: float = 3600.0
    """The default policy's cooldown: seconds between two triggers."""
    cleanup_retain_count: int = 2
    """Archives kept after each create or install (the newest ones, by index)."""
    snapshots_dir: Path = field(default_factory=lambda: Path("snapshots"))
    """Where archives live; created on first use. One handler per directory writes."""
    snapshots_dir_prefix: str = "snapshot-"
    """Archive file-name prefix: ``<prefix><index>-<term>.tar.gz``."""
    chunk_size: int = MiB
    """Bytes of archive per ``SnapshotChunk`` sent (less than 2 GiB)."""
    retained_log_entries: int = 1
    """A hint for the Raft log: purge up to ``last_included.index`` minus this.
    It never moves the snapshot's label."""
    chunk_timeout: float = 10.0
    """Seconds a receiver waits for the next chunk before aborting with FAILED."""
    # Beyond d-engine's fields:
    compression_level: int = 1
    """gzip level 0-9 (ISA-L maps it onto its 0-3 scale)."""
    fsync: bool = True
    """False only for tests and benchmarks: archives are then not durable."""
    max_unpacked_bytes: int = 64 * GiB
    """Unpack refuses an archive whose members add up to more than this."""
    max_archive_members: int = 1_000_000
    """Unpack refuses an archive with more members than this."""
    max_chunk_retries: int = 3
    """Resends accepted for one chunk after a CHECKSUM_MISMATCH."""
    keep_broken: int = 3
    """Corrupt archives moved aside to ``*.broken`` kept at start-up (oldest removed)."""
    read_only: bool = False
    """Only read the snapshots directory, writable or not: start-up recovery
    removes and moves nothing, the policy never asks for a snapshot, and
    create, install and cleanup raise :class:`ReadOnlySnapshotDir`. For tools
    that inspect or send what is there."""
    require_checksum: bool = False
    """Refuse a received snapshot whose ``metadata.checksum`` is empty. By default an
    empty checksum means "the sender gave none": the archive is still verified
    (count, CRC per chunk, structure while unpacking) and the SHA-256 computed on
    receipt is recorded. A checksum of any other length than 32 bytes is always refused."""
    transfer_idle_timeout: float = 60.0
    """A receive aborts when no new chunk was accepted for this long (duplicates,
    dropped and corrupt chunks are no progress)."""
    transfer_timeout: float = 3600.0
    """A receive aborts when the whole transfer takes longer than this."""
    resume_ttl: float = 3600.0
    """How long an interrupted receive stays resumable (0: never keep one)."""
    resume_max_bytes: int = 16 * GiB
    """An interrupted receive larger than this is not kept for resuming."""

    def __post_init__(self) -> None:
        if not isinstance(self.snapshots_dir, Path):
            if not isinstance(self.snapshots_dir, (str, os.PathLike)):
                raise TypeError(
                    "snapshots_dir must be a path, got " + type(self.snapshots_dir).__name__
                )
            object.__setattr__(self, "snapshots_dir", Path(self.snapshots_dir))
        for name in ("enable", "fsync", "read_only", "require_checksum"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool")
        _int_at_least("max_log_entries_before_snapshot", self.max_log_entries_before_snapshot, 1)
        _int_at_least("cleanup_retain_count", self.cleanup_retain_count, 1)
        _int_at_least("chunk_size", self.chunk_size, 1)
        _int_at_least("retained_log_entries", self.retained_log_entries, 0)
        _int_at_least("max_unpacked_bytes", self.max_unpacked_bytes, 1)
        _int_at_least("max_archive_members", self.max_archive_members, 1)
        _int_at_least("max_chunk_retries", self.max_chunk_retries, 0)
        _int_at_least("keep_broken", self.keep_broken, 0)
        _int_at_least("compression_level", self.compression_level, 0)
        if self.compression_level > 9:
            raise ValueError(f"compression_level must be 0-9, got {self.compression_level}")
        if self.chunk_size > 0xFFFF_FFFF // 2:
            raise ValueError(f"chunk_size must be < 2 GiB, got {self.chunk_size}")
        _seconds("snapshot_cool_down_since_last_check", self.snapshot_cool_down_since_last_check, 0)
        _seconds("chunk_timeout", self.chunk_timeout, None)
        _seconds("transfer_idle_timeout", self.transfer_idle_timeout, None)
        _seconds("transfer_timeout", self.transfer_timeout, None)
        _seconds("resume_ttl", self.resume_ttl, 0)
        _int_at_least("resume_max_bytes", self.resume_max_bytes, 0)
        prefix = self.snapshots_dir_prefix
        if not isinstance(prefix, str):
            raise TypeError("snapshots_dir_prefix must be a str")
        if not prefix or "/" in prefix or "\\" in prefix or "\0" in prefix or prefix in (".", ".."):
            raise ValueError(
                "snapshots_dir_prefix must be a non-empty file-name part without '/', "
                f"got {prefix!r}"
            )
        if prefix.startswith("temp-"):
            raise ValueError("snapshots_dir_prefix must not start with 'temp-' (reserved)")


def _int_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _seconds(name: str, value: object, minimum: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is None and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
