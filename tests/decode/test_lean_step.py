"""The lean decode step equals the model's own step (fp32, every layer type, a left-padded
batch), equals the independent dense reference, and its quantized forms stay within what a
reference computation of the same quantization gives.

Each scenario: a batch of 3 rows (two left-padded) is prefilled by the model, converted to a
``LeanState``, and decoded for 24 steps by both the lean step and the model (whose state keeps
its own cache), feeding both the model's greedy tokens. The window is 16 slots, so rings wrap;
full-attention rings grow in steps of ``SLOT_GRAIN`` (32 here) during the run.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dense_reference import reference_logits
from testutils import assert_close_rel, tiny_model

from spikingbrain.decode import LeanDecoder, LeanState, Unsupported
from spikingbrain.decode.adapter import enable_lean, lean_decoder
from spikingbrain.hf_compat import cache_kwargs, output_cache

B, T, STEPS, W = 3, 44, 24, 16

LAYOUTS = {
    "gla": dict(layer_types=["gla", "gla"]),
    "swa": dict(layer_types=["swa", "swa"]),
    "full": dict(layer_types=["full", "swa"]),
    "7b": dict(layer_types=["gla", "swa", "gla", "swa"]),
    "gla+swa": dict(layer_types=["gla+swa", "gla+swa"]),
    "gla+full-sinks": dict(layer_types=["gla+full", "gla+swa"], num_sink_tokens=3),
    "7b-sinks": dict(layer_types=["gla", "swa", "gla", "swa"], num_sink_tokens=3),
    "hybrid-separate-sigmoid-key": dict(layer_types=["gla+swa", "gla+full"], hybrid_separate_proj=True,
                                        gla_feature_map="sigmoid", gla_gate="key"),
    "full-gate": dict(layer_types=["gla", "swa"], gla_gate="full"),
}


@pytest.fixture(autouse=True)
def _small_grain(monkeypatch):
    from spikingbrain.decode import state

    monkeypatch.setattr(state, "SLOT_GRAIN", 32)


def _model(name):
    over = dict(LAYOUTS[name])
    return tiny_model(over.pop("layer_types"), sliding_window=W, **over)


def _prompt(seed=0):
    ids = torch.randint(3, 500, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :9] = 0  # left padding, as a batched prompt gets
    mask[2, :4] = 0
    return ids, mask


@torch.inference_mode()
def _prefill(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model.new_cache()))
    return out.logits[:, -1], output_cache(out)


@torch.inference_mode()
def _run(model, decoder, ids, mask, steps=STEPS, reference=None):
    """Logits ``[steps, B, V]`` of the model's own step (``reference`` model, default ``model``)
    and of the lean step, both fed the model's greedy tokens."""
    reference = reference or model
    last, cache = _prefill(reference, ids, mask)
    state = LeanState.from_cache(cache, decoder)  # a copy: the steps are compared from one state
    tok = last.argmax(-1)
    ref, got = [], []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
        out = reference(input_ids=tok[:, None], attention_mask=mask, use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        ref.append(out.logits[:, -1])
        got.append(decoder.step(state, tok))
        tok = ref[-1].argmax(-1)
    return torch.stack(ref), torch.stack(got), state, mask


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lean_step_equals_model_step(name):
    model = _model(name)
    ids, mask = _prompt()
    ref, got, state, _ = _run(model, LeanDecoder(model, "float", "fp32"), ids, mask)
    assert_close_rel(got, ref, 1e-5, name)
    if "full" in state.slots:  # the full-attention ring grew while decoding (positions 41..67)
        assert state.slots["full"].size == 96


@pytest.mark.parametrize("name", ["7b", "gla+full-sinks"])
def test_lean_step_equals_dense_reference(name):
    """Against ``dense_reference.py`` (float64, explicit masks, its own recurrence): the logits of
    every decoded token of each row equal the reference's for the whole padded sequence."""
    model = _model(name)
    ids, mask = _prompt(1)
    steps = 10
    _, got, _, full_mask = _run(model, LeanDecoder(model, "float", "fp32"), ids, mask, steps)
    # the tokens the steps were fed: rebuild the full sequence greedily from the model's logits
    seq = ids.clone()
    with torch.inference_mode():
        last, cache = _prefill(model, ids, mask)
        tok, m = last.argmax(-1), mask
        for _ in range(steps):
            seq = torch.cat([seq, tok[:, None]], 1)
            m = torch.cat([m, torch.ones(B, 1, dtype=torch.long)], 1)
            out = model(input_ids=tok[:, None], attention_mask=m, use_cache=True, **cache_kwargs(cache))
            cache, tok = output_cache(out), out.logits[:, -1].argmax(-1)
    ref = reference_logits(model, seq, full_mask)[:, T:]  # [B, steps, V]
    assert_close_rel(got.transpose(0, 1).double(), ref, 2e-5, name)


def _dequantized(model, bits):
    """A copy of ``model`` whose linears hold exactly the lean step's quantized weights."""
    from spikingbrain.decode.weights import int4_codes, int8_codes

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if type(m) is torch.nn.Linear:
                w = m.weight.float()
                if bits == 8 or w.shape[1] % 32:  # int4 needs whole groups of 32 (PackedLinear)
                    q, s = int8_codes(w)
                    m.weight.copy_(q.float() * s[:, None])
                else:
                    q, s, z = int4_codes(w)
                    N, K = w.shape
                    deq = (q.view(N, K // 32, 32).float() - 8) * s[..., None] + z[..., None]
                    m.weight.copy_(deq.view(N, K))
    return ref


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_match_their_reference(weights):
    """The quantized step computes the model with dequantized weights; what remains is bf16
    rounding of the matmul inputs (8 mantissa bits: ~2^-9 relative per element, accumulated over
    4 layers' matmuls), so the tolerance is 3e-2. The quantization error itself (the reference
    against the fp32 model) is larger than that, so the check sees a wrong packing."""
    model = _model("7b")
    ids, mask = _prompt(2)
    ref_model = _dequantized(model, 8 if weights == "int8" else 4)
    ref, got, _, _ = _run(model, LeanDecoder(model, weights, "fp32"), ids, mask, 12, reference=ref_model)
    err = assert_close_rel(got, ref, 3e-2, weights)
    _, exact, _, _ = _run(model, LeanDecoder(model, "float", "fp32"), ids, mask, 12, reference=ref_model)
    quant_err = ((exact - ref).norm() / ref.norm()).item()
    assert err < quant_err, (err, quant_err)


@pytest.mark.parametrize("kv", ["int8", "bf16"])
def test_quantized_window_matches_its_reference(kv):
    """The window in int8 (one scale per key/value vector) or bf16 equals the model's step with
    its keys/values quantized the same way by the attention's KV hook (after RoPE, as the lean
    step stores them): what is left is the order of the float operations (int8) or bf16 score
    rounding (|s| <~ 10 at 2^-9 relative), hence 1e-5 and 2e-2."""
    from spikingbrain.spiking.quant import Int8KVQuantizer

    model = _model("7b")
    ids, mask = _prompt(3)
    ref_model = copy.deepcopy(model)
    for layer in ref_model.model.layers:
        if hasattr(layer.self_attn, "kv_quantizer"):
            layer.self_attn.kv_quantizer = (Int8KVQuantizer() if kv == "int8" else
                                            (lambda k, v: (k.bfloat16().float(), v.bfloat16().float())))
    ref, got, _, _ = _run(model, LeanDecoder(model, "float", kv), ids, mask, 12, reference=ref_model)
    assert_close_rel(got, ref, 1e-5 if kv == "int8" else 2e-2, kv)
    _, plain, _, _ = _run(model, LeanDecoder(model, "float", "fp32"), ids, mask, 12, reference=ref_model)
    assert ((plain - ref).norm() / ref.norm()).item() > 1e-5  # the quantization is visible


def test_state_round_trip_and_batching():
    """``to_cache`` gives the model a state it continues exactly; ``select``/``cat`` move rows
    (rings of different sizes are padded to the larger)."""
    model = _model("gla+full-sinks")
    dec = LeanDecoder(model, "float", "fp32")
    ids, mask = _prompt(4)
    ref, got, state, mask = _run(model, dec, ids, mask, 4)
    tok = got[-1].argmax(-1)
    with torch.inference_mode():
        a = model(input_ids=tok[:, None], use_cache=True, **cache_kwargs(state.to_cache(model, dec))).logits[:, -1]
    b = dec.step(LeanState.cat([state.select([2, 0]), state.select([1])]), tok[[2, 0, 1]])
    assert_close_rel(b, a[[2, 0, 1]], 1e-5, "cat/select")
    short = LeanState.from_cache(_prefill(model, ids[:1, -5:], None)[1], dec)
    both = LeanState.cat([short, state.select([1])])
    assert both.slots["full"].size == state.slots["full"].size


def test_refusals_are_clear():
    moe = tiny_model(["gla+swa", "gla+full"], mlp_layer_types=["dense", "moe"], num_experts=4,
                     num_experts_per_tok=1, gla_feature_map="sigmoid", gla_gate="key", num_sink_tokens=2)
    with pytest.raises(Unsupported, match="MoE"):
        LeanDecoder(moe)
    assert "MoE" in enable_lean(moe)
    assert lean_decoder(moe) is None
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert "SpikingBrain" in enable_lean(llama)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    model = _model("7b")
    dec = LeanDecoder(model, "float", "fp32")

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    assert dec.compile()
    ids, mask = _prompt()
    ref, got, _, _ = _run(model, dec, ids, mask, 3)
    assert dec.compiled is None
    assert "running eagerly" in caplog.text
    assert_close_rel(got, ref, 1e-5, "eager fallback")
