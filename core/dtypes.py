"""The dtypes a model may be served in, by the name a spec gives (`ModelSpec.dtype`)."""

from __future__ import annotations

import torch

__all__ = ["TORCH_DTYPES"]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
