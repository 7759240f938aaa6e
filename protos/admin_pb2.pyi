from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("models", "hosts")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    hosts: _containers.RepeatedCompositeFieldContainer[HostStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., hosts: _Optional[_Iterable[_Union[HostStatus, _Mapping]]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "routing_version", "dtype", "hidden_size", "layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    routing_version: int
    dtype: str
    hidden_size: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerStatus]
    def __init__(self, name: _Optional[str] = ..., routing_version: _Optional[int] = ..., dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerStatus, _Mapping]]] = ...) -> None: ...

class LayerStatus(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertStatus]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertStatus, _Mapping]]] = ...) -> None: ...

class ExpertStatus(_message.Message):
    __slots__ = ("expert", "replicas")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, expert: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("host", "slot")
    HOST_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    host: str
    slot: int
    def __init__(self, host: _Optional[str] = ..., slot: _Optional[int] = ...) -> None: ...

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
