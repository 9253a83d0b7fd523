"""FileOps: the one seam through which snapshot code touches the disk.

Every durable step goes through here, one primitive per method, so tests can
fail any step (EIO, ENOSPC, a failing fsync or rename) or announce it to a
crash test that SIGKILLs the process there. Platform differences live here
and nowhere else: directory fsync is POSIX-only.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import BinaryIO


class FileOps:
    """Real file operations. Subclass and override one method to inject a fault."""

    def announce(self, step: str) -> None:
        """Called just before each crash-relevant step (``"create:rename"`` ...).

        A no-op in production; crash tests override it to kill the process.
        """

    def open_write(self, path: Path) -> BinaryIO:
        """Create ``path`` exclusively for writing (never reuses a leftover)."""
        return open(path, "xb")

    def fsync(self, f: BinaryIO) -> None:
        f.flush()
        os.fsync(f.fileno())

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        if sys.platform == "win32":  # pragma: no cover - no directory handles there
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def remove(self, path: Path) -> None:
        """Remove a file; ``FileNotFoundError`` propagates (callers decide)."""
        os.unlink(path)

    def remove_tree(self, path: Path) -> None:
        shutil.rmtree(path)

    def disk_free(self, path: Path) -> int:
        return shutil.disk_usage(path).free


DEFAULT_FILE_OPS = FileOps()
