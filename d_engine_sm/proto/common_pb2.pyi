from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_ROLE_UNSPECIFIED: _ClassVar[NodeRole]
    NODE_ROLE_FOLLOWER: _ClassVar[NodeRole]
    NODE_ROLE_CANDIDATE: _ClassVar[NodeRole]
    NODE_ROLE_LEADER: _ClassVar[NodeRole]
    NODE_ROLE_LEARNER: _ClassVar[NodeRole]
NODE_ROLE_UNSPECIFIED: NodeRole
NODE_ROLE_FOLLOWER: NodeRole
NODE_ROLE_CANDIDATE: NodeRole
NODE_ROLE_LEADER: NodeRole
NODE_ROLE_LEARNER: NodeRole

class LogId(_message.Message):
    __slots__ = ("term", "index")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    term: int
    index: int
    def __init__(self, term: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("index", "term", "payload")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    payload: EntryPayload
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., payload: _Optional[_Union[EntryPayload, _Mapping]] = ...) -> None: ...

class EntryPayload(_message.Message):
    __slots__ = ("noop", "command", "config")
    NOOP_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    noop: Noop
    command: bytes
    config: MembershipChange
    def __init__(self, noop: _Optional[_Union[Noop, _Mapping]] = ..., command: _Optional[bytes] = ..., config: _Optional[_Union[MembershipChange, _Mapping]] = ...) -> None: ...

class Noop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MembershipChange(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
