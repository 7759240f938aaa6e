"""What the gRPC servicer delegates to, minus the engine: one model "m" of hidden size 4 in
FP32. A test subclasses it with the `submit` it needs."""

from __future__ import annotations

import torch

MODEL, HIDDEN = "m", 4


class FakeRouter:
    def ready(self) -> bool:
        return True

    def model_names(self) -> list[str]:
        return [MODEL]

    def metadata(self, model: str) -> tuple[int, torch.dtype]:
        return HIDDEN, torch.float32
