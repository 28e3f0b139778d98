from smartspec.wire import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillItem(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("items", "chunked")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PrefillItem]
    chunked: bool
    def __init__(self, items: _Optional[_Iterable[_Union[PrefillItem, _Mapping]]] = ..., chunked: _Optional[bool] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("next_token_ids", "stats")
    NEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    next_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: _common_pb2.StepStats
    def __init__(self, next_token_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Union[_common_pb2.StepStats, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("request_ids", "draft_counts", "draft_token_ids", "draft_distributions", "draft_parents", "prefill_request_ids", "prefill_counts", "cut_invalid_drafts")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PARENTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CUT_INVALID_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    draft_counts: _containers.RepeatedScalarFieldContainer[int]
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_distributions: _common_pb2.DraftDistributions
    draft_parents: _containers.RepeatedScalarFieldContainer[int]
    prefill_request_ids: _containers.RepeatedScalarFieldContainer[str]
    prefill_counts: _containers.RepeatedScalarFieldContainer[int]
    cut_invalid_drafts: bool
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., draft_counts: _Optional[_Iterable[int]] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., draft_distributions: _Optional[_Union[_common_pb2.DraftDistributions, _Mapping]] = ..., draft_parents: _Optional[_Iterable[int]] = ..., prefill_request_ids: _Optional[_Iterable[str]] = ..., prefill_counts: _Optional[_Iterable[int]] = ..., cut_invalid_drafts: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("accepted_counts", "emitted_token_ids", "committed_lengths", "stats", "prefill_next_token_ids", "verified_draft_counts")
    ACCEPTED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EMITTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_DRAFT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    accepted_counts: _containers.RepeatedScalarFieldContainer[int]
    emitted_token_ids: _containers.RepeatedScalarFieldContainer[int]
    committed_lengths: _containers.RepeatedScalarFieldContainer[int]
    stats: _common_pb2.StepStats
    prefill_next_token_ids: _containers.RepeatedScalarFieldContainer[int]
    verified_draft_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, accepted_counts: _Optional[_Iterable[int]] = ..., emitted_token_ids: _Optional[_Iterable[int]] = ..., committed_lengths: _Optional[_Iterable[int]] = ..., stats: _Optional[_Union[_common_pb2.StepStats, _Mapping]] = ..., prefill_next_token_ids: _Optional[_Iterable[int]] = ..., verified_draft_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "kv_capacity_tokens", "kv_used_tokens", "live_sequences", "max_sequences")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    kv_capacity_tokens: int
    kv_used_tokens: int
    live_sequences: int
    max_sequences: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., kv_capacity_tokens: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., live_sequences: _Optional[int] = ..., max_sequences: _Optional[int] = ...) -> None: ...
