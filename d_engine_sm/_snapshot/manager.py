"""SnapshotManager: the handler's snapshot orchestration (create, prune,
load, receive, install, start-up recovery).

It owns ordering and error translation only; bytes on the wire are decided
by ``receiver``/``chunks``, archives by ``archive`` and the directory by
``store``. The manager is one object joined from one module per concern:
``core`` (state, guards, recovery, record and prune), ``create``,
``outbound`` (load) and ``install`` (receive, install from a file).
"""

from __future__ import annotations

from d_engine_sm._snapshot.create import Creating
from d_engine_sm._snapshot.inbound import AckFn
from d_engine_sm._snapshot.install import Installing
from d_engine_sm._snapshot.outbound import Serving

__all__ = ["AckFn", "SnapshotManager"]


class SnapshotManager(Creating, Installing, Serving):
    """Snapshot lifecycle for one handler. Thread-safe."""
