from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KvPage(_message.Message):
    __slots__ = ("keys", "values", "ttl_positions", "ttl_expiry")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TTL_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TTL_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    values: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_positions: _containers.RepeatedScalarFieldContainer[int]
    ttl_expiry: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., values: _Optional[_Iterable[bytes]] = ..., ttl_positions: _Optional[_Iterable[int]] = ..., ttl_expiry: _Optional[_Iterable[float]] = ...) -> None: ...
