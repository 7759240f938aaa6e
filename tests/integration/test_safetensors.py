"""A spec whose weights come from a safetensors file in HF naming serves the same layer as
the in-process reference built from that file; each host reads only its own experts."""

from __future__ import annotations

import pytest
import torch

from moefleet.client import Client
from moefleet.cluster import service
from moefleet.testing import Reference
from tests.specs import family_spec, save_hf_checkpoint

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_service_from_safetensors_matches_reference(ray_session, tmp_path, family):
    path = tmp_path / "model.safetensors"
    save_hf_checkpoint(family_spec(family), str(path))
    spec = family_spec(family, weights={"random": None, "safetensors": str(path)})
    ref = Reference(spec)
    random_ref = Reference(family_spec(family))
    x = torch.randn(50, spec.moe.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ref(3, x), random_ref(3, x))  # the file holds those weights
    svc = service.start(spec, port=0)
    try:
        with Client(svc.address) as c:
            for layer in spec.layers:
                torch.testing.assert_close(c.infer(spec.name, layer, x), ref(layer, x))
    finally:
        svc.shutdown()
