"""Create: capture the state at an exact LogId, pack it, publish the archive."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Final

from d_engine_sm._snapshot import archive
from d_engine_sm._snapshot.core import ManagerCore, SnapshotMetadata, snapshot_metadata
from d_engine_sm._snapshot.manifest import new_manifest
from d_engine_sm._snapshot.store import ArchiveInfo
from d_engine_sm._snapshot.streams import ProgressFn, report
from d_engine_sm._state_machine import StateMachine, overrides_prepare
from d_engine_sm._values import LogId
from d_engine_sm.errors import SnapshotError, SnapshotInProgress

_log = logging.getLogger("d_engine_sm.snapshot")

_SPACE_MARGIN: Final = 64 * 1024  # gzip/tar overhead over the raw bytes, worst case


class Creating(ManagerCore):
    """``create``: one snapshot of the state machine, published crash-safely."""

    def create(self, *, progress: ProgressFn | None = None) -> tuple[SnapshotMetadata, Path]:
        started = time.perf_counter()
        try:
            with self._exclusive():
                meta, path = self._create_locked(progress)
        except SnapshotInProgress:
            self._policy.mark_snapshot_skipped()  # no snapshot: no cooldown either
            raise
        except OSError as exc:  # any disk step not translated nearer to it
            self._metrics.incr("snapshot_create_errors")
            raise self._disk_error(exc, 0, "creating snapshot") from exc
        except BaseException:
            self._metrics.incr("snapshot_create_errors")
            raise
        self._metrics.incr("snapshot_creates")
        self._metrics.observe("snapshot_create_seconds", time.perf_counter() - started)
        return meta, path

    def _create_locked(self, progress: ProgressFn | None) -> tuple[SnapshotMetadata, Path]:
        store = self._store
        work_dir = store.new_temp_path("work")
        try:
            self._fs.announce("create:work_dir")
            self._fs.mkdir(work_dir)
            captured = self._capture(work_dir)
            if isinstance(captured, ArchiveInfo):  # already snapshotted at this LogId
                existing = self._existing(captured)
                # Record it too: a create that failed after its rename (say, the
                # directory fsync) published this archive without recording it.
                self._record(existing)
                return existing, captured.path
            last_included, keys = captured
            meta, final = self._pack_and_publish(work_dir, last_included, keys, progress)
        finally:
            store.remove_quietly(work_dir)
        self._record(meta)
        self._prune_quietly()
        self._policy.mark_snapshot_created()
        _log.info(
            "snapshot created index=%d term=%d path=%s",
            meta.last_included.index,
            meta.last_included.term,
            final,
        )
        return meta, final

    def _capture(self, work_dir: Path) -> tuple[LogId, int | None] | ArchiveInfo:
        """Write the state into ``work_dir``; returns the exact LogId it reflects
        and the number of keys at it (for the manifest).

        Applies are paused while the LogId is read and the state captured, so
        the data is exactly the state at that LogId. With a ``prepare_snapshot``
        override only the capture is paused; generate runs alongside applies.
        Returns the existing archive instead when one is already published for
        that LogId (hashing it is left to the caller: not under the pause).
        """
        two_phase = overrides_prepare(self._sm)
        self._pause.acquire()
        paused = True
        try:
            last_included = self._applied()
            existing = self._store.find(last_included.index, last_included.term)
            if existing is not None:
                return existing
            keys = _count_keys(self._sm)  # paused: the state prepare/generate capture
            if two_phase:
                try:
                    self._sm.prepare_snapshot()
                except Exception as exc:
                    raise SnapshotError(f"prepare_snapshot failed: {exc}") from exc
                self._pause.release()
                paused = False
            self._fs.announce("create:generate")
            try:
                self._sm.generate_snapshot_data(work_dir, last_included)
            except Exception as exc:
                raise SnapshotError(f"generate_snapshot_data failed: {exc}") from exc
        finally:
            if paused:
                self._pause.release()
        return last_included, keys

    def _existing(self, info: ArchiveInfo) -> SnapshotMetadata:
        latest = self.latest_metadata()
        lid = latest.last_included if latest is not None else None
        if lid is not None and (lid.index, lid.term) == (info.index, info.term):
            return latest  # type: ignore[return-value]  # checked just above
        return snapshot_metadata(info.index, info.term, archive.sha256_file(info.path))

    def _pack_and_publish(
        self, work_dir: Path, last_included: LogId, keys: int | None, progress: ProgressFn | None
    ) -> tuple[SnapshotMetadata, Path]:
        store = self._store
        generated = _tree_size(work_dir)
        manifest = new_manifest(self._sm, keys, generated)
        report(progress, "generate", generated, generated)
        needed = generated + _SPACE_MARGIN
        store.check_space(needed)
        try:
            with store.temp_archive("create") as (temp, out):
                self._fs.announce("create:pack")
                digest, _size = archive.pack(
                    work_dir,
                    out,
                    level=self._config.compression_level,
                    progress=progress,
                    manifest=manifest,
                )
            try:
                self._fs.announce("create:flush")
                self._flush_state()
                final = store.publish(temp, last_included.index, last_included.term)
            except BaseException:
                if not temp.exists():
                    # Renamed, then the directory fsync failed: un-publish, so a
                    # failed create changes nothing (the archive was never recorded).
                    store.remove_quietly(
                        store.archive_path(last_included.index, last_included.term)
                    )
                store.remove_quietly(temp)
                raise
        except OSError as exc:
            raise self._disk_error(exc, needed, "writing snapshot archive") from exc
        return snapshot_metadata(last_included.index, last_included.term, digest), final


def _count_keys(sm: StateMachine) -> int | None:
    try:
        return len(sm)
    except Exception:  # a manifest without a key count is still a manifest
        return None


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
