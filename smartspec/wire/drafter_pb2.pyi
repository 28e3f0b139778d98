from smartspec.wire import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPOSE_STATUS_UNSPECIFIED: _ClassVar[ProposeStatus]
    PROPOSE_STATUS_OK: _ClassVar[ProposeStatus]
    PROPOSE_STATUS_RESYNC_REQUIRED: _ClassVar[ProposeStatus]
PROPOSE_STATUS_UNSPECIFIED: ProposeStatus
PROPOSE_STATUS_OK: ProposeStatus
PROPOSE_STATUS_RESYNC_REQUIRED: ProposeStatus

class ProposeRequest(_message.Message):
    __slots__ = ("request_ids", "committed_lengths", "appended_counts", "appended_token_ids", "max_draft_tokens", "sampling")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    APPENDED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    APPENDED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    committed_lengths: _containers.RepeatedScalarFieldContainer[int]
    appended_counts: _containers.RepeatedScalarFieldContainer[int]
    appended_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: _containers.RepeatedCompositeFieldContainer[_common_pb2.SamplingParams]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., committed_lengths: _Optional[_Iterable[int]] = ..., appended_counts: _Optional[_Iterable[int]] = ..., appended_token_ids: _Optional[_Iterable[int]] = ..., max_draft_tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Iterable[_Union[_common_pb2.SamplingParams, _Mapping]]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("statuses", "draft_counts", "draft_token_ids", "draft_distributions", "stats", "draft_parents", "draft_token_probs")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PARENTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_PROBS_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[ProposeStatus]
    draft_counts: _containers.RepeatedScalarFieldContainer[int]
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_distributions: _common_pb2.DraftDistributions
    stats: _common_pb2.StepStats
    draft_parents: _containers.RepeatedScalarFieldContainer[int]
    draft_token_probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, statuses: _Optional[_Iterable[_Union[ProposeStatus, str]]] = ..., draft_counts: _Optional[_Iterable[int]] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., draft_distributions: _Optional[_Union[_common_pb2.DraftDistributions, _Mapping]] = ..., stats: _Optional[_Union[_common_pb2.StepStats, _Mapping]] = ..., draft_parents: _Optional[_Iterable[int]] = ..., draft_token_probs: _Optional[_Iterable[float]] = ...) -> None: ...

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
    __slots__ = ("kind", "model", "live_sequences")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    model: _common_pb2.ModelInfo
    live_sequences: int
    def __init__(self, kind: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., live_sequences: _Optional[int] = ...) -> None: ...
