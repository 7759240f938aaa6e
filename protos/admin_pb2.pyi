from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShutdownRequest(_message.Message):
    __slots__ = ("grace_s",)
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    grace_s: float
    def __init__(self, grace_s: _Optional[float] = ...) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class ScaleExpertRequest(_message.Message):
    __slots__ = ("model", "layer", "expert", "replicas")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: int
    expert: int
    replicas: int
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class AddExpertRequest(_message.Message):
    __slots__ = ("model", "layer", "expert", "group", "safetensors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: int
    expert: int
    group: int
    safetensors: bytes
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ..., group: _Optional[int] = ..., safetensors: _Optional[bytes] = ...) -> None: ...

class RemoveExpertRequest(_message.Message):
    __slots__ = ("model", "layer", "expert")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: int
    expert: int
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class ChangeResponse(_message.Message):
    __slots__ = ("routing_version", "expert", "replicas_added", "replicas_removed")
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_ADDED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    routing_version: int
    expert: int
    replicas_added: int
    replicas_removed: int
    def __init__(self, routing_version: _Optional[int] = ..., expert: _Optional[int] = ..., replicas_added: _Optional[int] = ..., replicas_removed: _Optional[int] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("model", "replicas", "max_moves", "min_gain", "allow_partial")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_MOVES_FIELD_NUMBER: _ClassVar[int]
    MIN_GAIN_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    model: str
    replicas: int
    max_moves: int
    min_gain: float
    allow_partial: bool
    def __init__(self, model: _Optional[str] = ..., replicas: _Optional[int] = ..., max_moves: _Optional[int] = ..., min_gain: _Optional[float] = ..., allow_partial: bool = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("routing_version", "moves", "moves_from_scratch", "imbalance_before", "imbalance_after", "host_imbalance_before", "host_imbalance_after", "replicas_requested", "replicas_placed", "moves_uncut", "host_imbalance_uncut")
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    MOVES_FROM_SCRATCH_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    HOST_IMBALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    HOST_IMBALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_PLACED_FIELD_NUMBER: _ClassVar[int]
    MOVES_UNCUT_FIELD_NUMBER: _ClassVar[int]
    HOST_IMBALANCE_UNCUT_FIELD_NUMBER: _ClassVar[int]
    routing_version: int
    moves: int
    moves_from_scratch: int
    imbalance_before: float
    imbalance_after: float
    host_imbalance_before: float
    host_imbalance_after: float
    replicas_requested: int
    replicas_placed: int
    moves_uncut: int
    host_imbalance_uncut: float
    def __init__(self, routing_version: _Optional[int] = ..., moves: _Optional[int] = ..., moves_from_scratch: _Optional[int] = ..., imbalance_before: _Optional[float] = ..., imbalance_after: _Optional[float] = ..., host_imbalance_before: _Optional[float] = ..., host_imbalance_after: _Optional[float] = ..., replicas_requested: _Optional[int] = ..., replicas_placed: _Optional[int] = ..., moves_uncut: _Optional[int] = ..., host_imbalance_uncut: _Optional[float] = ...) -> None: ...

class SetAutoscalingRequest(_message.Message):
    __slots__ = ("model", "enabled", "target_tokens_per_s", "min_replicas", "max_replicas", "upscale_delay_s", "downscale_delay_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    DOWNSCALE_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    enabled: bool
    target_tokens_per_s: float
    min_replicas: int
    max_replicas: int
    upscale_delay_s: float
    downscale_delay_s: float
    def __init__(self, model: _Optional[str] = ..., enabled: bool = ..., target_tokens_per_s: _Optional[float] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., upscale_delay_s: _Optional[float] = ..., downscale_delay_s: _Optional[float] = ...) -> None: ...

class AutoscalingStatus(_message.Message):
    __slots__ = ("enabled", "target_tokens_per_s", "min_replicas", "max_replicas", "upscale_delay_s", "downscale_delay_s")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    DOWNSCALE_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    target_tokens_per_s: float
    min_replicas: int
    max_replicas: int
    upscale_delay_s: float
    downscale_delay_s: float
    def __init__(self, enabled: bool = ..., target_tokens_per_s: _Optional[float] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., upscale_delay_s: _Optional[float] = ..., downscale_delay_s: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("models", "hosts", "routers")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    hosts: _containers.RepeatedCompositeFieldContainer[HostStatus]
    routers: _containers.RepeatedCompositeFieldContainer[RouterStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., hosts: _Optional[_Iterable[_Union[HostStatus, _Mapping]]] = ..., routers: _Optional[_Iterable[_Union[RouterStatus, _Mapping]]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "routing_version", "dtype", "hidden_size", "layers", "autoscaling", "latency_p50_s", "latency_p99_s", "requests_per_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    routing_version: int
    dtype: str
    hidden_size: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerStatus]
    autoscaling: AutoscalingStatus
    latency_p50_s: float
    latency_p99_s: float
    requests_per_s: float
    def __init__(self, name: _Optional[str] = ..., routing_version: _Optional[int] = ..., dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerStatus, _Mapping]]] = ..., autoscaling: _Optional[_Union[AutoscalingStatus, _Mapping]] = ..., latency_p50_s: _Optional[float] = ..., latency_p99_s: _Optional[float] = ..., requests_per_s: _Optional[float] = ...) -> None: ...

class LayerStatus(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertStatus]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertStatus, _Mapping]]] = ...) -> None: ...

class ExpertStatus(_message.Message):
    __slots__ = ("expert", "replicas", "tokens_per_s", "target_replicas", "group")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    expert: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    tokens_per_s: float
    target_replicas: int
    group: int
    def __init__(self, expert: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., tokens_per_s: _Optional[float] = ..., target_replicas: _Optional[int] = ..., group: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("host", "slot")
    HOST_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    host: str
    slot: int
    def __init__(self, host: _Optional[str] = ..., slot: _Optional[int] = ...) -> None: ...

class RouterStatus(_message.Message):
    __slots__ = ("name", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class HostStatus(_message.Message):
    __slots__ = ("id", "node_id", "node_ip", "device", "slots_total", "slots_used")
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    id: str
    node_id: str
    node_ip: str
    device: str
    slots_total: int
    slots_used: int
    def __init__(self, id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_ip: _Optional[str] = ..., device: _Optional[str] = ..., slots_total: _Optional[int] = ..., slots_used: _Optional[int] = ...) -> None: ...
