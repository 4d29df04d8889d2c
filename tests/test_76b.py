"""The 76B architecture (SPEC.md sections 1-2): intra-layer parallel hybrids, sink tokens, MoE
FFNs, its decode state, the ``layout="76b"`` conversion and its parameter count.

Exact parameter counts (``count_parameters``, checked here against a closed form):
spikingbrain-76b 76,055,745,080 total / 11,894,690,360 active per token;
spikingbrain-7b 7,616,542,976 (Qwen2.5-7B's 7,615,616,512 + 926,464 gate/norm params).
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spikingbrain.cache import SpikingBrainCache
from spikingbrain.config import SpikingBrainConfig, layout_76b
from spikingbrain.modeling import count_parameters
from spikingbrain.convert import config_from_teacher, convert_from_transformer
from spikingbrain.convert.upcycle import upcycle_alpha
from spikingbrain.layers.hybrid import ParallelHybrid
from spikingbrain.layers.mlp import SwiGLU
from spikingbrain.layers.moe import MoE
from spikingbrain.modeling import SpikingBrainForCausalLM, SpikingBrainModel

DENSE_1_INDEXED = (1, 2, 3, 5, 7, 9, 11)


@pytest.fixture
def sink_calls(monkeypatch):
    """Counts SpikingBrainModel.compute_sink_kv calls."""
    calls = []
    real = SpikingBrainModel.compute_sink_kv

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(SpikingBrainModel, "compute_sink_kv", counted)
    return calls


# ------------------------------------------------------------------------------- the layout helper
def test_layout_76b_pattern():
    types, mlp = layout_76b(28)
    assert [i + 1 for i, t in enumerate(types) if t == "gla+full"] == [7, 14, 21, 28]
    assert all(t == "gla+swa" for i, t in enumerate(types) if (i + 1) % 7)
    assert [i + 1 for i, t in enumerate(mlp) if t == "dense"] == list(DENSE_1_INDEXED)
    assert mlp.count("moe") == 21
    preset = SpikingBrainConfig.from_preset("spikingbrain-76b")
    assert (preset.layer_types, preset.mlp_layer_types) == (types, mlp)
    # a 28-layer teacher config maps to the same pattern (no weights needed)
    tc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=4)
    c = config_from_teacher(tc, "76b")
    assert c.layer_types == types and c.gla_feature_map == "sigmoid" and c.gla_gate == "key"
    assert c.num_sink_tokens == 128
    # fewer layers: full branches only where a multiple of 7 exists
    assert layout_76b(6)[0] == ["gla+swa"] * 6
    assert [i + 1 for i, t in enumerate(layout_76b(14)[0]) if t == "gla+full"] == [7, 14]


# ----------------------------------------------------------------------------- parameter counting
def closed_form_76b():
    d, f, V, L, dh, H, Hkv = 3584, 18944, 152064, 28, 128, 28, 4
    attn = d * H * dh + 2 * d * Hkv * dh + H * dh + 2 * Hkv * dh + H * dh * d  # q,k,v (+biases), o
    ffn = 3 * d * f
    qwen = 2 * V * d + L * (attn + ffn + 2 * d) + d
    assert qwen == 7_615_616_512  # Qwen2.5-7B, untied
    moe_layers = 21
    hybrid_extra = L * (dh + dh + 2)  # o_norm, attn_norm, merge per layer
    sinks = 128 * d
    total = qwen + moe_layers * (16 * ffn + 16 * d) + hybrid_extra + sinks  # 17 experts replace 1 FFN; router
    active = total - moe_layers * 15 * ffn  # per token: 1 shared + 1 routed expert
    return total, active


def test_count_parameters_76b():
    counts = count_parameters("spikingbrain-76b")
    print(f"spikingbrain-76b: total={counts['total']:,} active={counts['active']:,}")
    assert 74e9 <= counts["total"] <= 78e9
    assert 10e9 <= counts["active"] <= 14e9
    assert (counts["total"], counts["active"]) == closed_form_76b() == (76_055_745_080, 11_894_690_360)
    seven = count_parameters("spikingbrain-7b")
    assert seven["total"] == seven["active"] == 7_615_616_512 + 926_464


# ------------------------------------------------------------------------ layout="76b" conversion
@pytest.fixture(scope="module")
def teacher14():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=14,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def student76(teacher14):
    return convert_from_transformer(teacher14, layout="76b", sliding_window=8)


def test_convert_76b_builds_the_pattern(teacher14, student76):
    s, c = student76, student76.config
    types, mlp = layout_76b(14)
    assert c.layer_types == types and c.mlp_layer_types == mlp
    assert c.conversion_layout == "76b"
    full = [i + 1 for i, layer in enumerate(s.model.layers) if layer.self_attn.window is None]
    assert full == [7, 14]
    alpha = upcycle_alpha(16, 1, 1)
    for i, (layer, t_layer) in enumerate(zip(s.model.layers, teacher14.model.layers)):
        mixer = layer.self_attn
        assert isinstance(mixer, ParallelHybrid)
        assert mixer.window == (None if (i + 1) % 7 == 0 else 8)
        assert torch.equal(mixer.merge.data, torch.tensor([0.5, 0.5]))
        assert mixer.gla.feature_map == "sigmoid" and mixer.gla.gate == "key"
        assert not hasattr(mixer.gla, "gk_proj")
        assert torch.equal(mixer.q_proj.weight, t_layer.self_attn.q_proj.weight)
        if i + 1 in DENSE_1_INDEXED:
            assert isinstance(layer.mlp, SwiGLU) and not isinstance(layer.mlp, MoE)
            assert torch.equal(layer.mlp.up_proj.weight, t_layer.mlp.up_proj.weight)
        else:
            assert isinstance(layer.mlp, MoE)
            assert (len(layer.mlp.experts), len(layer.mlp.shared_experts), layer.mlp.top_k) == (16, 1, 1)
            torch.testing.assert_close(layer.mlp.experts[5].up_proj.weight, t_layer.mlp.up_proj.weight * alpha)
    assert (c.num_experts, c.num_experts_per_tok, c.num_shared_experts) == (16, 1, 1)
    assert s.model.sink_tokens.shape == (128, 32) and c.num_sink_tokens == 128
    assert 0.01 < s.model.sink_tokens.std().item() < 0.03


def test_convert_76b_generates_and_decodes_like_it_prefills(student76):
    s = student76
    prompt = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = s.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
        assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
        # greedy without a cache: the same tokens (the SWA window of 8 is exceeded on the way)
        ids = prompt
        for _ in range(8):
            ids = torch.cat([ids, s(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


def test_convert_76b_round_trips_and_calibrates(teacher14, student76, tmp_path):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    student76.save_pretrained(tmp_path)
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mlp_layer_types == student76.config.mlp_layer_types
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student76(ids).logits)
    cal = convert_from_transformer(teacher14, layout="76b", sliding_window=8, calibration_ids=ids)
    first = cal.model.layers[0].self_attn
    assert not torch.equal(first.gla.o_norm.weight, torch.ones(8))
    assert not torch.equal(first.attn_norm.weight, torch.ones(8))
    with torch.no_grad():
        assert torch.isfinite(cal(ids).logits).all()


def test_calibrating_76b_matches_teacher_power_with_the_sinks_attended(teacher14):
    """Each hybrid's branches are calibrated as the real forward runs them: softmax branch
    attending to the sink tokens (whose keys/values depend on the earlier layers' norms)."""
    from spikingbrain.convert import calibrate_output_norms
    from spikingbrain.convert.mapping import teacher_attention_io
    from spikingbrain.layers.context import MixerContext

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    s = convert_from_transformer(teacher14, layout="76b", sliding_window=8)
    scales = calibrate_output_norms(s, teacher14, ids)
    assert sorted(scales) == list(range(14))
    io = teacher_attention_io(teacher14, ids, list(range(14)))
    pos = torch.arange(16)[None].expand(2, 16)
    cos, sin = s.model.rotary_emb(io[0][0], pos)
    ctx = MixerContext(positions=pos, cos=cos, sin=sin)
    with torch.no_grad():
        sink_kv = s.model.compute_sink_kv()
        for i in (0, 6, 13):
            x, target = io[i]
            o_lin, o_soft = s.model.layers[i].self_attn.branches(x, ctx, sink_kv=sink_kv[i])
            tgt = target.view(2, 16, 4, 8).pow(2).mean(dim=(0, 1, 2)).sqrt()
            for o in (o_lin, o_soft):
                torch.testing.assert_close(o.pow(2).mean(dim=(0, 1, 2)).sqrt(), tgt, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ sink tokens and caching
def tiny76(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SpikingBrainConfig.from_preset("tiny-76b", sliding_window=8, **kw)
    return SpikingBrainForCausalLM(cfg).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_sink_prefill_then_decode_equals_full_forward(padded, sink_calls):
    model = tiny76()
    B, T, P = 2, 24, 5
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        assert len(sink_calls) == 1  # no cache: once per forward
        cache = model.new_cache()
        steps = [model(ids[:, :P], attention_mask=mask[:, :P], past_key_values=cache, use_cache=True).logits]
        stored = [layer.sink_kv for layer in cache.layers]
        assert all(kv is not None and kv[0].shape == (1, 2, 4, 16) for kv in stored)
        for t in range(P, T):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                               use_cache=True).logits)
    assert len(sink_calls) == 2  # the cached run computed the sinks once, for all 20 steps
    assert all(layer.sink_kv is kv for layer, kv in zip(cache.layers, stored))  # stored, not recomputed
    dec = torch.cat(steps, 1)
    valid = mask.bool()
    torch.testing.assert_close(dec[valid], full[valid], rtol=1e-4, atol=1e-5)


def test_sinks_matter_and_are_learned():
    model = tiny76()
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids).logits
        model.model.sink_tokens.mul_(5)
        moved = model(ids).logits
    assert not torch.allclose(base, moved, atol=1e-3)  # every token, the first included, sees them
    assert not torch.allclose(base[:, 0], moved[:, 0], atol=1e-4)
    model.train()
    model(ids, labels=ids).loss.backward()
    g = model.model.sink_tokens.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_generate_computes_sinks_once(sink_calls):
    model = tiny76()
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 17)
    assert len(sink_calls) == 1


def test_cache_memory_report_separates_constant_and_growing_state():
    model = tiny76()
    c = model.config
    B, H, Hkv, D, S, w = 2, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_sink_tokens, 8
    n_swa = sum(t == "gla+swa" for t in c.layer_types)
    n_full = sum(t == "gla+full" for t in c.layer_types)
    linear = len(c.layer_types) * B * H * D * D * 4  # fp32 state per layer
    kv_token = 2 * B * Hkv * D * 4 + B * 8 + B  # k, v (fp32), position (int64), valid (bool)
    ring = n_swa * w * kv_token
    sinks = len(c.layer_types) * 2 * Hkv * S * D * 4  # one copy, shared by the batch rows
    ids = torch.randint(0, 512, (B, 30), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache()
    reports = []
    with torch.no_grad():
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        reports.append(cache.memory_report())
        for t in range(6, 30):
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            reports.append(cache.memory_report())
    assert isinstance(cache, SpikingBrainCache)
    for n, r in enumerate(reports):
        tokens = 6 + n
        assert r["constant"] == linear + ring + sinks
        assert r["growing"] == n_full * tokens * kv_token
        assert r["total"] == r["constant"] + r["growing"]
    assert reports[-1]["total"] == cache.nbytes()
    # the 7B layout (no full attention) has nothing that grows
    seven = SpikingBrainForCausalLM(SpikingBrainConfig.from_preset("tiny")).eval()
    cache7 = seven.new_cache()
    with torch.no_grad():
        seven(ids, past_key_values=cache7, use_cache=True)
    r7 = cache7.memory_report()
    assert r7["growing"] == 0 and r7["constant"] == r7["total"] > 0
