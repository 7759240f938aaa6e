"""moefleet for transformers models (the `hf` extra): run their sparse MoE blocks on a service."""

from .remote import SUPPORTED_MODEL_TYPES, RemoteMoE, close, remote_moe

__all__ = ["remote_moe", "close", "RemoteMoE", "SUPPORTED_MODEL_TYPES"]
