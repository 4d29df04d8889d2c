import json

import pytest
import torch
from torch import nn

from conftest import make_llama, make_spikingbrain
from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import (
    Int8KVQuantizer, SpikeMonitor, SpikingLinear, calibrate, set_spiking, spikify, spiking_layers, unspikify,
)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


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


def test_logits_change_is_bounded_and_shrinks_with_k(ids):
    model = make_spikingbrain()
    with torch.no_grad():
        ref = model(ids).logits
        spikify(model, k=3.0)
        err3 = _rel_err(model(ids).logits, ref)
        set_spiking(model, k=50.0)
        err50 = _rel_err(model(ids).logits, ref)
        set_spiking(model, spike_inputs=False)
        err_w8 = _rel_err(model(ids).logits, ref)
    assert 0 < err3 < 0.35
    assert err50 < err3 / 5
    assert err_w8 < 0.02


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
    with torch.no_grad():
        ref = llama(ids).logits
        spikify(llama)
        assert _rel_err(llama(ids).logits, ref) < 0.35
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
    model = spikify(make_spikingbrain())
    with SpikeMonitor(model) as mon, torch.no_grad():
        model(ids)
    rep = mon.report()
    json.dumps(rep)
    t = rep["total"]
    assert 0 < t["sparsity"] < 1 and 0 < t["spikes_per_channel"] < t["mean_abs_count"]
    assert t["mean_abs_count"] == pytest.approx(3.0, abs=0.3)  # ~k by construction
    assert t["energy"]["saving_vs_fp16_pct"] > 90
    assert "mlp.down_proj" in rep["by_projection"] and "TOTAL" in mon.table()
    with pytest.raises(SpikingBrainError):
        SpikeMonitor(make_spikingbrain())
