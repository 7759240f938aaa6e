"""Expert maths: the reference SwiGLU FFN and MoE layer, grouped kernels, weight sources, and
the ExpertHost that runs batches for the experts in its slots, and its gRPC data plane
(raw bytes in and out). Knows nothing of gating or routing."""

from .host import ExpertHost
from .reference import ExpertWeights, MoELayer, SharedExperts, swiglu

__all__ = ["ExpertHost", "ExpertWeights", "MoELayer", "SharedExperts", "swiglu"]
