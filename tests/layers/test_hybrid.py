"""Intra-layer parallel hybrids (layers/hybrid.py): ``gla+swa`` and ``gla+full``.

Each branch is the stand-alone layer given the same weights; merge weights start at 0.5; the
76B options (sigmoid feature map, key-tied gate g = 1 - k) are finite and decode like they
prefill; sink tokens are seen by every softmax branch and computed as a non-causal, RoPE-free
sequence of their own.
"""
import pytest
import torch
import torch.nn.functional as F

from spikingbrain.config import SpikingBrainConfig
from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers import gla as gla_module
from spikingbrain.layers.attention import SoftmaxAttention
from spikingbrain.layers.context import MixerContext
from spikingbrain.layers.gla import GatedLinearAttention
from spikingbrain.layers.hybrid import ParallelHybrid
from spikingbrain.layers.rope import RotaryEmbedding, apply_rope
from spikingbrain.modeling import SpikingBrainForCausalLM

WINDOW = 8
OPTIONS = [pytest.param(("relu", "lowrank"), id="relu-lowrank"), pytest.param(("sigmoid", "key"), id="sigmoid-key")]
KINDS = ["gla+swa", "gla+full"]


def make_config(kind="gla+swa", fmap="sigmoid", gate="key", **kw):
    base = dict(layer_types=[kind] * 4, gla_feature_map=fmap, gla_gate=gate, sliding_window=WINDOW,
                attention_bias=True)
    base.update(kw)
    return SpikingBrainConfig.from_preset("tiny", **base)


def context(config, B, T, start=0):
    pos = torch.arange(start, start + T)[None].expand(B, T)
    cos, sin = RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos)
    return MixerContext(positions=pos, cos=cos, sin=sin)


def hybrid_and_standalone(kind, fmap, gate, seed=0, **kw):
    """A hybrid with non-trivial norms/biases plus a GLA and a softmax layer sharing its weights."""
    torch.manual_seed(seed)
    cfg = make_config(kind, fmap, gate, **kw)
    window = WINDOW if kind == "gla+swa" else None
    hyb = ParallelHybrid(cfg, 0, window=window).eval()
    with torch.no_grad():
        for p in (hyb.gla.o_norm.weight, hyb.attn_norm.weight):
            p.uniform_(0.5, 1.5)
        for proj in (hyb.q_proj, hyb.k_proj, hyb.v_proj):
            proj.bias.normal_(0, 0.1)
    lin = GatedLinearAttention(cfg, 0).eval()
    soft = SoftmaxAttention(cfg, 0, window=window).eval()
    src = hyb.gla if hyb.separate else hyb
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(lin, name).load_state_dict(getattr(src, name).state_dict())
        getattr(soft, name).load_state_dict(getattr(hyb, name).state_dict())
    lin.o_proj.load_state_dict(hyb.o_proj.state_dict())
    soft.o_proj.load_state_dict(hyb.o_proj.state_dict())
    lin.o_norm.load_state_dict(hyb.gla.o_norm.state_dict())
    if gate == "lowrank":
        lin.gk_proj.load_state_dict(hyb.gla.gk_proj.state_dict())
    return cfg, hyb, lin, soft


def pre_o_proj(mixer, x, ctx, **kw):
    got = {}
    h = mixer.o_proj.register_forward_pre_hook(lambda m, args: got.__setitem__("o", args[0]))
    try:
        out = mixer(x, ctx, **kw)
    finally:
        h.remove()
    return out, got["o"]


# ------------------------------------------------------------------------------- branch identity
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("separate", [False, True])
def test_branches_equal_the_standalone_layers(kind, opts, separate):
    cfg, hyb, lin, soft = hybrid_and_standalone(kind, *opts, hybrid_separate_proj=separate)
    B, T = 2, 3 * WINDOW  # longer than the window: the SWA branch must really slide
    x = torch.randn(B, T, cfg.hidden_size)
    ctx = context(cfg, B, T)
    with torch.no_grad():
        o_lin, o_soft = hyb.branches(x, ctx)
        assert o_lin.shape == o_soft.shape == (B, T, cfg.num_attention_heads, cfg.head_dim)
        # linear branch == the GLA layer (same o_proj applied to both)
        assert torch.equal(hyb.o_proj(o_lin.reshape(B, T, -1)), lin(x, ctx))
        # softmax branch == RMSNorm_dh of the SWA/full layer's attention output
        _, o_ref = pre_o_proj(soft, x, ctx)
        assert torch.equal(o_soft, hyb.attn_norm(o_ref.view(B, T, cfg.num_attention_heads, cfg.head_dim)))
        # and the layer merges them with its two scalars, then o_proj
        with_weights = hyb.merge[0] * o_lin + hyb.merge[1] * o_soft
        assert torch.equal(hyb(x, ctx), hyb.o_proj(with_weights.reshape(B, T, -1)))
        hyb.merge.copy_(torch.tensor([1.0, 0.0]))
        assert torch.equal(hyb(x, ctx), lin(x, ctx))
    if separate:
        assert hasattr(hyb.gla, "q_proj") and not hasattr(hyb.gla, "o_proj")
        assert not torch.equal(hyb.gla.q_proj.weight, hyb.q_proj.weight)
    else:
        assert not hasattr(hyb.gla, "q_proj")


def test_swa_branch_slides_and_full_branch_does_not():
    cfg, swa, _, _ = hybrid_and_standalone("gla+swa", "sigmoid", "key")
    full = ParallelHybrid(cfg, 0, window=None).eval()
    full.load_state_dict(swa.state_dict())
    x = torch.randn(1, 3 * WINDOW, cfg.hidden_size)
    ctx = context(cfg, 1, 3 * WINDOW)
    with torch.no_grad():
        _, s = swa.branches(x, ctx)
        _, f = full.branches(x, ctx)
    assert torch.equal(s[:, :WINDOW], f[:, :WINDOW])  # identical while the window holds everything
    assert not torch.allclose(s[:, WINDOW:], f[:, WINDOW:])


# ------------------------------------------------------------------------------------ merge init
def test_merge_weights_start_at_one_half_and_learn(tmp_path):
    cfg = make_config(layer_types=["gla+swa", "gla+full", "gla", "swa"])
    model = SpikingBrainForCausalLM(cfg)
    merges = [layer.self_attn.merge for layer in model.model.layers if isinstance(layer.self_attn, ParallelHybrid)]
    assert len(merges) == 2
    for m in merges:
        assert isinstance(m, torch.nn.Parameter) and m.requires_grad
        assert torch.equal(m.data, torch.tensor([0.5, 0.5]))
    assert "model.layers.0.self_attn.merge" in dict(model.named_parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()
    assert all(m.grad is not None and torch.count_nonzero(m.grad) == 2 for m in merges)
    # a trained value survives save/load; a fresh model still starts at 0.5
    with torch.no_grad():
        merges[0].copy_(torch.tensor([0.25, 0.9]))
    model.save_pretrained(tmp_path)
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].self_attn.merge.data, torch.tensor([0.25, 0.9]))
    assert torch.equal(SpikingBrainForCausalLM(cfg).model.layers[1].self_attn.merge.data, torch.tensor([0.5, 0.5]))


# ------------------------------------------------------------------- sigmoid feature map, key gate
def test_key_gate_is_log_one_minus_k_and_has_no_parameters(monkeypatch):
    cfg = make_config("gla+swa", "sigmoid", "key")
    lin = GatedLinearAttention(cfg, 0).eval()
    assert not hasattr(lin, "gk_proj")
    captured = {}
    real = gla_module.gla

    def spy(q, k, v, g, **kw):
        captured.update(q=q, k=k, g=g)
        return real(q, k, v, g, **kw)

    monkeypatch.setattr(gla_module, "gla", spy)
    B, T = 1, 10
    x = torch.randn(B, T, cfg.hidden_size)
    zq = torch.randn(B, T, 4, 16) * 30  # saturating pre-activations: sigmoid -> 0 or 1
    zk = torch.randn(B, T, 2, 16) * 30
    zk[0, 0, 0, 0] = 80.0  # k == 1.0 in fp32: log(1 - k) would be -inf
    v = torch.randn(B, T, 2, 16)
    with torch.no_grad():
        o = lin.linear_attention(x, zq, zk, v, context(cfg, B, T))
    assert torch.isfinite(o).all()
    q, k, g = captured["q"], captured["k"], captured["g"]
    assert torch.equal(q, torch.sigmoid(zq))
    assert ((k >= 0) & (k <= 1)).all()
    assert torch.isfinite(g).all() and (g <= 0).all()
    g_kv = g[:, :, ::2]  # the gate is repeated from 2 KV heads to 4 query heads
    # g = log(1 - k): where k is not saturated, directly; everywhere via log(1 - sigmoid(z)) = -softplus(z)
    ok = zk.abs() < 8
    torch.testing.assert_close(g_kv.exp()[ok], 1 - k[:, :, ::2][ok], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_kv, -F.softplus(zk.double()).float(), rtol=1e-5, atol=1e-6)
    assert g_kv[0, 0, 0, 0].item() == pytest.approx(-80.0)


def test_key_gate_needs_the_sigmoid_feature_map():
    with pytest.raises(SpikingBrainError, match="gla_gate='key'.*sigmoid"):
        make_config("gla+swa", "relu", "key")


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_hybrid_model_decode_equals_full_forward(kind, opts):
    torch.manual_seed(0)
    cfg = make_config(kind, *opts)
    model = SpikingBrainForCausalLM(cfg).eval()
    B, T, P = 2, 3 * WINDOW, 5
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :P], past_key_values=cache, use_cache=True).logits]
        for t in range(P, T):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    dec = torch.cat(steps, 1)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(dec, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["naive", "recurrent"])
def test_key_gate_chunked_form_matches_references_with_saturated_keys(mode):
    """Keys near 1 make the key-tied gate close the memory (g -> -50): the chunked form must stay
    finite and agree with the quadratic reference and the recurrence."""
    torch.manual_seed(1)
    cfg = make_config("gla+full", "sigmoid", "key")
    model = SpikingBrainForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(40)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        model.set_gla_mode("chunk")
        chunk = model(ids).logits
        model.set_gla_mode(mode)
        ref = model(ids).logits
    assert torch.isfinite(chunk).all()
    torch.testing.assert_close(chunk, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ sink tokens
def test_sink_keys_are_seen_by_every_query_of_the_softmax_branch():
    """Softmax branch output with sinks == softmax over [sink keys, the window's own keys]."""
    cfg, hyb, _, _ = hybrid_and_standalone("gla+swa", "sigmoid", "key")
    B, T, S, H, Hkv, D = 1, 2 * WINDOW, 3, 4, 2, 16
    x = torch.randn(B, T, cfg.hidden_size)
    ctx = context(cfg, B, T)
    sk, sv = torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)
    with torch.no_grad():
        _, o_soft = hyb.branches(x, ctx, sink_kv=(sk, sv))
        q = apply_rope(hyb.q_proj(x).view(B, T, H, D).transpose(1, 2), ctx.cos, ctx.sin)
        k = apply_rope(hyb.k_proj(x).view(B, T, Hkv, D).transpose(1, 2), ctx.cos, ctx.sin)
        v = hyb.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        rows = []
        for i in range(T):
            lo = max(0, i - WINDOW + 1)
            kk = torch.cat([sk, k[:, :, lo:i + 1]], 2).repeat_interleave(H // Hkv, 1)
            vv = torch.cat([sv, v[:, :, lo:i + 1]], 2).repeat_interleave(H // Hkv, 1)
            att = torch.softmax(q[:, :, i:i + 1] @ kk.transpose(-1, -2) / D**0.5, -1)
            rows.append(att @ vv)
        ref = hyb.attn_norm(torch.cat(rows, 2).transpose(1, 2))
        _, no_sinks = hyb.branches(x, ctx)
    torch.testing.assert_close(o_soft, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(o_soft, no_sinks)


def reference_sink_kv(model):
    """The spec, written out: the sinks are their own sequence, run through the stack; softmax
    branches attend among sinks without a causal mask and without RoPE; linear branches run the
    (causal) recurrence over them; every layer exposes its sink keys/values."""
    m = model.model
    h = m.sink_tokens[None]
    S, hd = h.shape[1], model.config.head_dim
    pos = torch.zeros(1, S, dtype=torch.long)
    ctx = MixerContext(positions=pos, cos=torch.ones(1, S, hd), sin=torch.zeros(1, S, hd), gla_mode="naive")
    out = []
    for layer in m.layers:
        x = layer.input_layernorm(h)
        mix = layer.self_attn
        if isinstance(mix, GatedLinearAttention):
            out.append(None)
            h = h + mix(x, ctx)
        else:
            q, k, v = (p(x).view(1, S, -1, hd).transpose(1, 2) for p in (mix.q_proj, mix.k_proj, mix.v_proj))
            rep = q.shape[1] // k.shape[1]
            att = torch.softmax(q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / hd**0.5, -1)
            o = (att @ v.repeat_interleave(rep, 1)).transpose(1, 2)
            out.append((k, v))
            if isinstance(mix, ParallelHybrid):
                src = mix.gla if mix.separate else mix
                lq, lk, lv = (p(x).view(1, S, -1, hd) for p in (src.q_proj, src.k_proj, src.v_proj))
                o_lin = mix.gla.linear_attention(x, lq, lk, lv, ctx)
                o = mix.merge[0] * o_lin + mix.merge[1] * mix.attn_norm(o)
            h = h + mix.o_proj(o.reshape(1, S, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return out


@pytest.mark.parametrize("separate", [False, True])
def test_sink_kv_is_a_non_causal_ropeless_pass_over_the_sinks(separate):
    torch.manual_seed(0)
    cfg = make_config(layer_types=["gla", "gla+swa", "swa", "gla+full"], num_sink_tokens=5,
                      hybrid_separate_proj=separate)
    model = SpikingBrainForCausalLM(cfg).eval()
    with torch.no_grad():
        got = model.model.compute_sink_kv()
        ref = reference_sink_kv(model)
    assert got[0] is None and ref[0] is None
    for i in (1, 2, 3):
        assert got[i][0].shape == (1, cfg.num_key_value_heads, 5, cfg.head_dim)
        for a, b in zip(got[i], ref[i]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
