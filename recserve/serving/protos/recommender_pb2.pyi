from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("request_id", "model", "user", "query", "candidate_item_ids", "top_k", "numeric")
    class UserEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class NumericEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    user: _containers.ScalarMap[str, str]
    query: str
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    numeric: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., user: _Optional[_Mapping[str, str]] = ..., query: _Optional[str] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., numeric: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "items", "scores", "served_by", "model", "version", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    served_by: str
    model: str
    version: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., served_by: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
