"""Fused q/k/v and gate/up projections (inference) equal the separate ones."""
import copy

import pytest
import torch
from torch import nn

from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.layers.projections import fuse_projections
from testutils import tiny_model


def _decode_logits(model, ids, prefill: int):
    """Prefill ``ids[:, :prefill]`` then feed the rest one token at a time; all logits."""
    cache = model.new_cache()
    outs = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


def _models():
    yield "7b-layout", tiny_model(["gla", "swa", "gla", "full"], sliding_window=6)
    torch.manual_seed(0)
    yield "76b-layout", SpikingBrainForCausalLM(SpikingBrainConfig.from_preset("tiny-76b", sliding_window=6)).eval()
    torch.manual_seed(0)
    cfg = SpikingBrainConfig.from_preset("tiny-76b", sliding_window=6, hybrid_separate_proj=True)
    yield "76b-separate", SpikingBrainForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", ["7b-layout", "76b-layout", "76b-separate"])
def test_fused_model_equals_unfused(name):
    model = dict(_models())[name]
    fused = copy.deepcopy(model)
    n = fuse_projections(fused)
    assert n > 0
    names = {k.rsplit(".", 1)[-1] for k, _ in fused.named_modules()}
    assert "qkv_proj" in names and "q_proj" not in names
    # MoE experts are read weight by weight: they keep their separate projections
    for m in fused.modules():
        if type(m).__name__ == "SwiGLUExpert":
            assert isinstance(m.gate_proj, nn.Linear) and not hasattr(m, "gate_up_proj")
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        got = fused(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_decode_logits(fused, ids, 9), _decode_logits(model, ids, 9), atol=1e-4, rtol=1e-4)


def test_fusion_skips_non_linear_projections():
    model = tiny_model(["gla", "swa"])
    attn = model.model.layers[1].self_attn
    attn.k_proj = nn.Sequential(attn.k_proj)  # e.g. a quantized or spiking replacement
    fuse_projections(model)
    assert hasattr(attn, "q_proj") and not hasattr(attn, "qkv_proj")
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj")


def test_a_fused_model_refuses_to_save(tmp_path):
    from spikingbrain.errors import SpikingBrainError

    model = tiny_model(["gla", "swa"])
    fuse_projections(model)
    with pytest.raises(SpikingBrainError, match="fused"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
