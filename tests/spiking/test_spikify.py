import copy
import json

import pytest
import torch
from torch import nn

from conftest import make_llama, make_spikingbrain
from testutils import assert_close_rel
from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import (
    Int8KVQuantizer, SpikeMonitor, SpikingLinear, calibrate, set_spiking, spikify, spiking_layers, unspikify,
)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------- reference written from the equations
class RefSpikingLinear(nn.Module):
    """``y = V_th (W_q s) + b``: ``V_th = clamp(mean|x| / k, 1e-5, 1e4)`` per token,
    ``s = floor(x / V_th + 1/2)``, ``W_q`` = per (row, group of 128 inputs) absmax INT8 codes times
    their scale. Records every ``s`` it computes."""

    def __init__(self, lin, k, weight_bits=8, spike_inputs=True, group=128):
        super().__init__()
        w = lin.weight.detach().float()
        if weight_bits is not None:
            qmax = 2 ** (weight_bits - 1) - 1
            wq = torch.empty_like(w)
            for g0 in range(0, w.shape[1], group):
                blk = w[:, g0:g0 + group]
                scale = blk.abs().amax(1, keepdim=True) / qmax
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                wq[:, g0:g0 + group] = torch.round(blk / scale).clamp(-qmax, qmax) * scale
            w = wq
        self.w, self.b = w, None if lin.bias is None else lin.bias.detach().float()
        self.k, self.spike_inputs, self.counts = k, spike_inputs, []

    def forward(self, x):
        x = x.float()
        if self.spike_inputs:
            v = (x.abs().mean(-1, keepdim=True) / self.k).clamp(1e-5, 1e4)
            s = torch.floor(x / v + 0.5)
            self.counts.append(s.reshape(-1, s.shape[-1]).clone())
            y = torch.nn.functional.linear(s, self.w) * v
        else:
            y = torch.nn.functional.linear(x, self.w)
        return y if self.b is None else y + self.b


def ref_kv_quantizer(k, v):
    """INT8 per key/value vector: ``round(x / s) s`` with ``s = max|x| / 127``."""
    def fq(x):
        s = x.abs().amax(-1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        return torch.round(x / s).clamp(-127, 127) * s
    return fq(k), fq(v)


def reference_spiking(model, k=3.0, weight_bits=8, spike_inputs=True, kv=True):
    """A copy of the float ``model`` with every block ``nn.Linear`` replaced by the reference and
    every mixer that takes a KV quantizer given the reference one. Returns (copy, its layers)."""
    ref = copy.deepcopy(model)
    layers = []
    for parent in list(ref.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                r = RefSpikingLinear(child, k, weight_bits, spike_inputs)
                setattr(parent, name, r)
                layers.append(r)
        if kv and hasattr(parent, "kv_quantizer"):
            parent.kv_quantizer = ref_kv_quantizer
    return ref, layers


def test_spikify_replaces_every_block_linear(ids):
    model = make_spikingbrain()
    n_linear = sum(type(m) is nn.Linear for m in model.model.layers.modules())
    spikify(model)
    names = list(spiking_layers(model))
    assert len(names) == n_linear
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    for want in ("layers.0.mlp.down_proj", "layers.0.self_attn.gk_proj.0", "layers.0.self_attn.gk_proj.1",
                 "layers.1.self_attn.k_proj"):
        assert any(n.endswith(want) for n in names)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[1].self_attn.kv_quantizer, Int8KVQuantizer)  # swa layer
    assert not hasattr(model.model.layers[0].self_attn, "kv_quantizer")  # gla layer
    sd = model.state_dict()
    assert "model.layers.0.mlp.down_proj.qweight" in sd and "model.layers.0.mlp.down_proj.weight" not in sd
    assert sd["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int8
    with pytest.raises(SpikingBrainError, match="already"):
        spikify(model)


def test_logits_equal_the_reference_spiking_model(ids):
    """The spikified model's logits equal those of the model rebuilt from the equations
    (reference above) at k = 3 and k = 50, and with spike coding off (INT8 weights + INT8 KV
    only); the spiking error shrinks as k grows."""
    model = make_spikingbrain()
    refs = {key: reference_spiking(model, **kw)[0] for key, kw in
            {"k3": dict(k=3.0), "k50": dict(k=50.0), "w8": dict(spike_inputs=False)}.items()}
    with torch.no_grad():
        floats = model(ids).logits
        expected = {key: r(ids).logits for key, r in refs.items()}
        spikify(model, k=3.0)
        got = {"k3": model(ids).logits}
        set_spiking(model, k=50.0)
        got["k50"] = model(ids).logits
        set_spiking(model, spike_inputs=False)
        got["w8"] = model(ids).logits
    for key in expected:
        assert_close_rel(got[key], expected[key], 1e-5, key)
    assert _rel_err(got["k50"], floats) < _rel_err(got["k3"], floats) / 5


def test_generate_and_cached_decoding(ids):
    model = spikify(make_spikingbrain())
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :16], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(16, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    inc = torch.cat(steps, 1)
    # per-token spiking: decoding sees the same counts up to rare rounding flips from summation order
    assert _rel_err(inc, full) < 5e-3
    gen = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, 14)


def test_llama_and_moe_models(ids):
    llama = make_llama()
    reference, _ = reference_spiking(llama)
    with torch.no_grad():
        expected = reference(ids).logits
        spikify(llama)
        assert_close_rel(llama(ids).logits, expected, 1e-5, "spiked llama")
    assert llama.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    moe = make_spikingbrain("tiny-76b")
    with torch.no_grad():
        ref = moe(ids).logits
        spikify(moe)
        names = list(spiking_layers(moe))
        assert any(".experts.0.down_proj" in n for n in names) and any(n.endswith("mlp.router") for n in names)
        assert any(n.endswith("shared_experts.0.up_proj") for n in names)
        assert torch.isfinite(moe(ids).logits).all()
    assert moe.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_unspikify_restores_the_original(ids):
    model = make_spikingbrain()
    with torch.no_grad():
        ref = model(ids).logits
        spikify(model)
        unspikify(model)
        assert torch.equal(model(ids).logits, ref)
    assert model.model.layers[1].self_attn.kv_quantizer is None
    assert not spiking_layers(model)


def test_exclude_keeps_down_proj_float():
    model = spikify(make_spikingbrain(), exclude=("down_proj",))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, SpikingLinear)


def test_ste_gradients_flow(ids):
    model = spikify(make_spikingbrain(), ste=True).train()
    out = model(ids, labels=ids)
    out.loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    down = model.model.layers[1].mlp.down_proj
    assert q.weight.requires_grad and q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert down.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # flows through every spiking layer
    # a step of training changes the weights, and unspikify hands the trained weights back
    with torch.no_grad():
        q.weight -= 0.1 * q.weight.grad
    trained = q.weight.detach().clone()
    unspikify(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, trained)


@pytest.mark.parametrize("bits, bias", [(8, False), (4, True), (None, False)])
def test_ste_layer_equals_inference_layer_and_is_straight_through(bits, bias):
    """Training form (ste=True) == inference form on the same float weights, value for value; the
    backward pass is that of ``y = W_q (V_th s_int) + b`` with rounding as the identity:
    ``dL/dW = g^T (V_th s_int)`` (the spiked input) and ``dL/dx = g W_q``."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 24, bias=bias)  # 96 inputs, group 32: three groups per row
    x = torch.randn(2, 5, 96) * torch.rand(2, 5, 1) * 3
    infer = SpikingLinear(lin, k=2.5, weight_bits=bits, group_size=32)
    train = SpikingLinear(lin, k=2.5, weight_bits=bits, group_size=32, ste=True)
    assert train.weight is lin.weight  # shared: the float master weight itself trains
    xg = x.clone().requires_grad_(True)
    y = train(xg)
    with torch.no_grad():
        ref = infer(x)
    assert torch.equal(y.detach(), ref) and torch.equal(train(x).detach(), ref)
    g = torch.randn_like(y)
    y.backward(g)
    s, v_th = infer.spikes(x)
    assert torch.equal(s, s.round())
    wq = infer.float_weight()
    torch.testing.assert_close(lin.weight.grad, g.reshape(-1, 24).t() @ (s * v_th).reshape(-1, 96))
    torch.testing.assert_close(xg.grad, g @ wq)
    if bias:
        torch.testing.assert_close(lin.bias.grad, g.sum((0, 1)))


def test_ste_spikify_round_trip_keeps_float_weights(ids):
    model = make_spikingbrain()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    spikify(model, ste=True)
    sd = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)  # plain float state
    assert sum(p.numel() for p in model.parameters()) == n_params  # nothing copied
    unspikify(model)
    assert not spiking_layers(model) and all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_calibration_lowers_weight_error(ids, tokenizer):
    model = spikify(make_spikingbrain(), weight_bits=4, group_size=32)  # coarse: clipping matters
    layer = model.model.layers[0].mlp.up_proj
    before = layer.float_weight().clone()
    inputs = []
    hook = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    s, v = layer.spikes(inputs[0].reshape(-1, layer.in_features))
    x = s * v
    w = layer._original[0].weight.detach()
    chosen = calibrate(model, [ids])
    after = layer.float_weight()
    err = lambda wq: ((x @ (wq - w).t()) ** 2).sum().item()  # noqa: E731
    assert err(after) <= err(before)
    assert any((a < 1).any() for a in chosen.values())
    assert all(a.shape == (m.out_features,) for (n, a), m in zip(chosen.items(), spiking_layers(model).values()))
    # texts need the tokenizer
    with pytest.raises(SpikingBrainError, match="tokenizer"):
        calibrate(model, ["some text"])


def test_monitor_on_model_report_is_json(ids):
    """Totals over the whole model equal those computed from the reference's own spike counts:
    3-step sparsity ``1 - mean(popcount(min(|s|, 7))) / 3``, spikes per channel
    ``mean(popcount(|s|))``, ``mean |s|``."""
    model = make_spikingbrain()
    reference, ref_layers = reference_spiking(model)
    with torch.no_grad():
        reference(ids)
    counts = torch.cat([c.flatten() for r in ref_layers for c in r.counts]).abs().long()

    def popcount(a):
        return sum(((a >> b) & 1) for b in range(int(a.max()).bit_length()))

    spikify(model)
    with SpikeMonitor(model) as mon, torch.no_grad():
        model(ids)
    rep = mon.report()
    json.dumps(rep)
    t = rep["total"]
    assert t["values"] == counts.numel()
    assert t["sparsity"] == pytest.approx(1 - popcount(counts.clamp(max=7)).double().mean().item() / 3, abs=1e-12)
    assert t["spikes_per_channel"] == pytest.approx(popcount(counts).double().mean().item(), abs=1e-12)
    assert t["mean_abs_count"] == pytest.approx(counts.double().mean().item(), abs=1e-12)
    assert t["energy"]["saving_vs_fp16_pct"] > 90
    assert "mlp.down_proj" in rep["by_projection"] and "TOTAL" in mon.table()
    with pytest.raises(SpikingBrainError):
        SpikeMonitor(make_spikingbrain())
