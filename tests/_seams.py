"""Seams shared by the fault and crash tests: the announced steps and a full disk."""

from __future__ import annotations

import errno
from typing import Any, BinaryIO

# Every step the store and manager announce, in the order create / install
# reach them (the crash tests kill at each; the fault tests fail each).
CREATE_STEPS: list[str] = [
    "ensure_dir:mkdir",
    "create:work_dir",
    "create:generate",
    "create:pack",
    "create:fsync",
    "create:flush",
    "publish:rename",
    "publish:fsync_dir",
    "record",
    "prune:remove",
    "prune:fsync_dir",
]
INSTALL_STEPS: list[str] = [
    "receive:chunk",
    "receive:fsync",
    "install:unpack",
    "install:apply",
    "install:flush",
    "install:publish",
    "publish:rename",
    "publish:fsync_dir",
    "record",
    "prune:remove",
    "prune:fsync_dir",
]

# Steps SqliteStateMachine.apply_snapshot_from_file announces (inside "install:apply").
SQLITE_INSTALL_STEPS: list[str] = [
    "sqlite:install:stage",
    "sqlite:install:fsync",
    "sqlite:install:checkpoint",
    "sqlite:install:remove_wal",
    "sqlite:install:rename",
    "sqlite:install:fsync_dir",
    "sqlite:install:reopen",
]


class FullDiskFile:
    """A file that takes ``budget`` bytes and then fails like a full disk (ENOSPC)."""

    def __init__(self, inner: BinaryIO, budget: int, error: type[OSError] = OSError) -> None:
        self._inner = inner
        self._budget = budget
        self._error = error

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        if n > self._budget:
            raise self._error(errno.ENOSPC, "No space left on device (injected midway)")
        self._budget -= n
        return self._inner.write(b)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
