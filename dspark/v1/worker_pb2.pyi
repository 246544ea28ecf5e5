from dspark.v1 import generation_pb2 as _generation_pb2
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

class KVRendezvous(_message.Message):
    __slots__ = ("backend", "store_host", "store_port", "world_size", "group_name", "generation")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    backend: str
    store_host: str
    store_port: int
    world_size: int
    group_name: str
    generation: int
    def __init__(self, backend: _Optional[str] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., world_size: _Optional[int] = ..., group_name: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "target_replica", "drafter_replica", "feature_layers")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPLICA_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingOptions
    target_replica: str
    drafter_replica: str
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingOptions, _Mapping]] = ..., target_replica: _Optional[str] = ..., drafter_replica: _Optional[str] = ..., feature_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("request_id", "first_token", "num_prompt_tokens", "kv_spec", "features")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_SPEC_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token: int
    num_prompt_tokens: int
    kv_spec: KVSpec
    features: Tensor
    def __init__(self, request_id: _Optional[str] = ..., first_token: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., kv_spec: _Optional[_Union[KVSpec, _Mapping]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("request_id", "anchor_token", "new_features", "max_tokens", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEW_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    anchor_token: int
    new_features: Tensor
    max_tokens: int
    sampling: _generation_pb2.SamplingOptions
    def __init__(self, request_id: _Optional[str] = ..., anchor_token: _Optional[int] = ..., new_features: _Optional[_Union[Tensor, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingOptions, _Mapping]] = ...) -> None: ...

class ProposeResult(_message.Message):
    __slots__ = ("request_id", "draft_tokens", "draft_probs", "confidences")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: Tensor
    confidences: Tensor
    def __init__(self, request_id: _Optional[str] = ..., draft_tokens: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Union[Tensor, _Mapping]] = ..., confidences: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("request_id", "draft_tokens", "draft_probs", "confidences", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: Tensor
    confidences: Tensor
    sampling: _generation_pb2.SamplingOptions
    def __init__(self, request_id: _Optional[str] = ..., draft_tokens: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Union[Tensor, _Mapping]] = ..., confidences: _Optional[_Union[Tensor, _Mapping]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingOptions, _Mapping]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("request_id", "num_accepted", "next_token", "committed_features", "step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_accepted: int
    next_token: int
    committed_features: Tensor
    step: _generation_pb2.SpecStats
    def __init__(self, request_id: _Optional[str] = ..., num_accepted: _Optional[int] = ..., next_token: _Optional[int] = ..., committed_features: _Optional[_Union[Tensor, _Mapping]] = ..., step: _Optional[_Union[_generation_pb2.SpecStats, _Mapping]] = ...) -> None: ...

class FreeRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...
