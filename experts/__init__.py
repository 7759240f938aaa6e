"""Expert maths: the reference SwiGLU FFN and MoE layer, grouped kernels, weight sources, and
the ExpertHost that runs batches for the experts in its slots. Knows nothing of gating or gRPC."""

from .host import ExpertHost
from .reference import ExpertWeights, MoELayer, SharedExperts, swiglu

__all__ = ["ExpertHost", "ExpertWeights", "MoELayer", "SharedExperts", "swiglu"]
