from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class KVSpec(_message.Message):
    __slots__ = ("protocol_version", "model_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "max_len", "layout")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    max_len: int
    layout: str
    def __init__(self, protocol_version: _Optional[int] = ..., model_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., max_len: _Optional[int] = ..., layout: _Optional[str] = ...) -> None: ...

class KVHandshake(_message.Message):
    __slots__ = ("spec", "request_id", "num_tokens", "extras_meta")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_META_FIELD_NUMBER: _ClassVar[int]
    spec: KVSpec
    request_id: str
    num_tokens: int
    extras_meta: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, spec: _Optional[_Union[KVSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., extras_meta: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class KVHandshakeReply(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
