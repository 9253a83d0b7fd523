"""Outbound: serve a published archive as the chunks a follower receives."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

from d_engine_sm._snapshot import chunks
from d_engine_sm._snapshot.core import ManagerCore, SnapshotMetadata
from d_engine_sm._snapshot.store import ArchiveInfo
from d_engine_sm._snapshot.streams import ChunkStream, ProgressFn
from d_engine_sm.errors import ChunkOutOfRange, SnapshotError, SnapshotNotFound
from d_engine_sm.proto import storage_pb2


class Serving(ManagerCore):
    """``load_data`` (a chunk stream) and ``load_chunk`` (one chunk, for resends)."""

    def _find(self, metadata: SnapshotMetadata) -> ArchiveInfo:
        if not isinstance(metadata, SnapshotMetadata):
            raise TypeError("metadata must be a SnapshotMetadata")
        if not metadata.HasField("last_included"):
            raise SnapshotError("snapshot metadata has no last_included")
        lid = metadata.last_included
        info = self._store.find(lid.index, lid.term)
        if info is None:
            raise SnapshotNotFound(str(self._store.archive_path(lid.index, lid.term)))
        return info

    def _wire_metadata(self, metadata: SnapshotMetadata) -> SnapshotMetadata:
        """The metadata to send: the caller's, with our checksum when it has none."""
        out = SnapshotMetadata()
        out.CopyFrom(metadata)
        if not out.checksum:
            latest = self.latest_metadata()
            if latest is not None and latest.last_included == metadata.last_included:
                out.checksum = latest.checksum
        return out

    def load_data(
        self,
        metadata: SnapshotMetadata,
        *,
        leader_term: int | None,
        progress: ProgressFn | None,
    ) -> Iterator[storage_pb2.SnapshotChunk]:
        info = self._find(metadata)
        term = metadata.last_included.term if leader_term is None else leader_term
        stack = ExitStack()  # nothing to close if entering fails: the reader cleans up itself
        reader = stack.enter_context(self._store.open_reader(info))
        return ChunkStream(
            stack,
            reader,
            chunk_size=self._config.chunk_size,
            leader_term=term,
            leader_id=self._node_id,
            metadata=self._wire_metadata(metadata),
            metrics=self._metrics,
            progress=progress,
        )

    def load_chunk(
        self, metadata: SnapshotMetadata, seq: int, *, leader_term: int | None
    ) -> storage_pb2.SnapshotChunk:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be an int >= 0, got {seq!r}")
        info = self._find(metadata)
        term = metadata.last_included.term if leader_term is None else leader_term
        size_chunk = self._config.chunk_size
        with self._store.open_reader(info) as reader:
            total = chunks.chunk_count(reader.size, size_chunk)
            if seq >= total:
                raise ChunkOutOfRange(seq, total)
            start, end = chunks.chunk_bounds(seq, reader.size, size_chunk)
            data = reader.read(start, end)
        return chunks.make_chunk(
            seq=seq,
            total=total,
            data=data,
            leader_term=term,
            leader_id=self._node_id,
            metadata=self._wire_metadata(metadata) if seq == 0 else None,
        )
