from d_engine_sm.proto import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotMetadata(_message.Message):
    __slots__ = ("last_included", "checksum")
    LAST_INCLUDED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    last_included: _common_pb2.LogId
    checksum: bytes
    def __init__(self, last_included: _Optional[_Union[_common_pb2.LogId, _Mapping]] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("leader_term", "leader_id", "seq", "total_chunks", "chunk_checksum", "metadata", "data")
    LEADER_TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    leader_term: int
    leader_id: int
    seq: int
    total_chunks: int
    chunk_checksum: bytes
    metadata: SnapshotMetadata
    data: bytes
    def __init__(self, leader_term: _Optional[int] = ..., leader_id: _Optional[int] = ..., seq: _Optional[int] = ..., total_chunks: _Optional[int] = ..., chunk_checksum: _Optional[bytes] = ..., metadata: _Optional[_Union[SnapshotMetadata, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SnapshotAck(_message.Message):
    __slots__ = ("seq", "status", "next_requested")
    class ChunkStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACCEPTED: _ClassVar[SnapshotAck.ChunkStatus]
        CHECKSUM_MISMATCH: _ClassVar[SnapshotAck.ChunkStatus]
        OUT_OF_ORDER: _ClassVar[SnapshotAck.ChunkStatus]
        REQUESTED: _ClassVar[SnapshotAck.ChunkStatus]
        FAILED: _ClassVar[SnapshotAck.ChunkStatus]
    ACCEPTED: SnapshotAck.ChunkStatus
    CHECKSUM_MISMATCH: SnapshotAck.ChunkStatus
    OUT_OF_ORDER: SnapshotAck.ChunkStatus
    REQUESTED: SnapshotAck.ChunkStatus
    FAILED: SnapshotAck.ChunkStatus
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NEXT_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: SnapshotAck.ChunkStatus
    next_requested: int
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[SnapshotAck.ChunkStatus, str]] = ..., next_requested: _Optional[int] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("term", "success", "next_chunk")
    TERM_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    term: int
    success: bool
    next_chunk: int
    def __init__(self, term: _Optional[int] = ..., success: _Optional[bool] = ..., next_chunk: _Optional[int] = ...) -> None: ...
