"""A spikified model saves and loads again in its quantized form; the released W8ASpike arithmetic
(``spiking/w8aspike.py``) against its definition."""
import json

import pytest
import torch
from torch import nn

from conftest import make_spikingbrain
from spikingbrain import SpikingBrainForCausalLM
from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import SpikingLinear, adaptive_spikes, set_spiking, spikify, unspikify
from spikingbrain.spiking import w8aspike


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("options", [
    {},  # this package's scheme: down_proj spiked, INT8 KV
    {"exclude": ("down_proj",), "kv_bits": None, "k": 2.5},
    {"neuron": "w8aspike", "spike_query": True, "exclude": ("down_proj",)},  # the released scheme
    {"weight_bits": None},  # spikes only, float weights (a float buffer named weight)
])
def test_spikified_model_saves_and_reloads_quantized(tmp_path, ids, options):
    model = make_spikingbrain("tiny-76b") if options.get("weight_bits", 8) is None else make_spikingbrain()
    calib = [ids[:1]] if options.get("weight_bits", 8) is not None else None  # per-row clipping: not absmax
    spikify(model, calibration=calib, **options)
    assert model.config.spiking["neuron"] == options.get("neuron", "adaptive")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["spiking"] == model.config.spiking
    again = SpikingBrainForCausalLM.from_pretrained(tmp_path)
    _same_state(model, again)
    assert sum(isinstance(m, SpikingLinear) for m in again.modules()) == sum(
        isinstance(m, SpikingLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_record_follows_the_model(tmp_path, ids):
    model = spikify(make_spikingbrain())
    set_spiking(model, k=4.0, spike_inputs=False)
    assert model.config.spiking["k"] == 4.0 and model.config.spiking["spike_inputs"] is False
    model.save_pretrained(tmp_path)
    again = SpikingBrainForCausalLM.from_pretrained(tmp_path)
    assert all(m.k == 4.0 and not m.spike_inputs for m in again.modules() if isinstance(m, SpikingLinear))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    unspikify(model)
    assert model.config.spiking is None
    spikify(model, ste=True)  # the training form saves plain float weights: nothing recorded
    assert model.config.spiking is None


def test_unknown_scheme_field_is_refused(tmp_path):
    model = spikify(make_spikingbrain())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["spiking"]["bits_per_spike"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpikingBrainError, match="bits_per_spike"):
        SpikingBrainForCausalLM.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- the released arithmetic
def test_w8aspike_spikes_round_half_to_even_with_fp32_threshold():
    x = torch.tensor([[2.5, -2.5, 1.5, 0.5, 3.0, -0.5]], dtype=torch.float64)  # mean |x| = 1.75
    s, v = w8aspike.spikes(x, k=1.75)  # V_th = 1: ties everywhere
    assert v.dtype == torch.float32 and v.item() == 1.0
    assert s.tolist() == [[2.0, -2.0, 2.0, 0.0, 3.0, -0.0]]  # torch.round: half to even
    ours, _ = adaptive_spikes(x, k=1.75)
    assert ours.tolist() == [[3.0, -2.0, 2.0, 1.0, 3.0, 0.0]]  # the neuron: half up


def test_w8aspike_weight_codes_are_not_clamped():
    w = torch.tensor([[1.0] * 128 + [2.0] * 128])
    s = torch.tensor([[[1.0 / 127], [1.0 / 200]]])  # [out=1, groups=2, 1]; second: below max|W| / 127
    codes, scales = w8aspike.weight_codes(w, s)
    assert codes.dtype == torch.int16 and codes[0, 0] == 127 and codes[0, 128] == 400
    assert scales.shape == (1, 2) and scales.dtype == torch.float32
    assert torch.equal(codes.float() * scales.repeat_interleave(128, 1), (torch.round(w.view(1, 2, 128) / s) * s).view(1, -1))
    with pytest.raises(SpikingBrainError, match="scales of shape"):
        w8aspike.weight_codes(w, s[:, :1])  # one group for two


def test_w8aspike_kv_quantizer_clamps_the_scale():
    x = torch.tensor([[1e-4, -5e-5, 0.0], [3.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    q = w8aspike.fake_quantize_kv(x)
    # a tiny vector: scale clamped at 1e-5 (max|x|/127 would be ~7.9e-7), codes 10 and -5
    assert torch.allclose(q[0], torch.tensor([1e-4, -5e-5, 0.0]), atol=1e-12)
    c = 3.0 / 127
    assert torch.allclose(q[1], torch.round(x[1] / c) * c)
    assert torch.equal(q[2], x[2])


def test_w8aspike_neuron_in_spiking_linear_and_query():
    lin = nn.Linear(8, 4)
    m = SpikingLinear(lin, neuron="w8aspike")
    x = torch.randn(3, 8, dtype=torch.float64)
    s, v = w8aspike.spikes(x)
    want = (s * v) @ m.float_weight(torch.float64).T + lin.bias.double()
    assert torch.allclose(m(x), want, atol=1e-12)
    q = torch.randn(1, 2, 5, 16)
    s, v = w8aspike.spikes(q)
    assert torch.equal(w8aspike.QuerySpiker(3.0)(q), s * v)
    with pytest.raises(SpikingBrainError, match="adaptive"):
        SpikingLinear(lin, neuron="w8aspike", ste=True)
