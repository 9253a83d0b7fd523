from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_EVENT_TYPE_PUT: _ClassVar[WatchEventType]
    WATCH_EVENT_TYPE_DELETE: _ClassVar[WatchEventType]
WATCH_EVENT_TYPE_PUT: WatchEventType
WATCH_EVENT_TYPE_DELETE: WatchEventType

class WriteCommand(_message.Message):
    __slots__ = ("insert", "delete", "compare_and_swap")
    class Insert(_message.Message):
        __slots__ = ("key", "value", "ttl_secs")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        TTL_SECS_FIELD_NUMBER: _ClassVar[int]
        key: bytes
        value: bytes
        ttl_secs: int
        def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., ttl_secs: _Optional[int] = ...) -> None: ...
    class Delete(_message.Message):
        __slots__ = ("key",)
        KEY_FIELD_NUMBER: _ClassVar[int]
        key: bytes
        def __init__(self, key: _Optional[bytes] = ...) -> None: ...
    class CompareAndSwap(_message.Message):
        __slots__ = ("key", "expected_value", "new_value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
        NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
        key: bytes
        expected_value: bytes
        new_value: bytes
        def __init__(self, key: _Optional[bytes] = ..., expected_value: _Optional[bytes] = ..., new_value: _Optional[bytes] = ...) -> None: ...
    INSERT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_AND_SWAP_FIELD_NUMBER: _ClassVar[int]
    insert: WriteCommand.Insert
    delete: WriteCommand.Delete
    compare_and_swap: WriteCommand.CompareAndSwap
    def __init__(self, insert: _Optional[_Union[WriteCommand.Insert, _Mapping]] = ..., delete: _Optional[_Union[WriteCommand.Delete, _Mapping]] = ..., compare_and_swap: _Optional[_Union[WriteCommand.CompareAndSwap, _Mapping]] = ...) -> None: ...

class ClientResult(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("key", "value", "event_type")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    event_type: WatchEventType
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., event_type: _Optional[_Union[WatchEventType, str]] = ...) -> None: ...
