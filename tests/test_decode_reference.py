"""Cached decoding equals one full forward for any attention mask, checked against the dense
reference of ``dense_reference.py`` (explicit position masks, a per-token GLA recurrence,
explicit RoPE; float64), not against the model itself.

Every scenario runs a batch of 3 rows of 48 tokens (window w = 16) two ways: one forward
without a cache, and a chunked prefill (chunks of 5, 1, 17 and 9 tokens: one shorter than the
window, one of a single token, one longer than the window) followed by 16 decode steps of one
token. Masks: left padding, right padding (rows whose prompt ends in padding, and rows padded
while others decode), holes (8 padded tokens inside a chunk, across a chunk boundary, and
during decoding), packed documents (``position_ids`` that restart) with documents starting
inside a chunk, exactly at a chunk boundary and at a decode step (with and without padding;
padding carrying arbitrary position ids), and documents given for the prompt only with decoding
continuing the last one.
"""
from __future__ import annotations

import pytest
import torch

from dense_reference import reference_logits
from testutils import assert_close_rel, tiny_model

TOL = 2e-5  # fp32 model vs float64 reference; a wrong mask or state is off by > 1e-1
W = 16
B, T = 3, 48
CUTS = (0, 5, 6, 23, 32)  # prefill chunks, then one token at a time up to T

LAYOUTS = {
    "gla": dict(layer_types=["gla", "gla"]),
    "swa": dict(layer_types=["swa", "swa"]),
    "full": dict(layer_types=["full", "full"]),
    "7b": dict(layer_types=["gla", "swa", "gla", "swa"]),
    "gla+swa": dict(layer_types=["gla+swa", "gla+swa"]),
    "gla+full": dict(layer_types=["gla+full", "gla+swa"]),
    "swa-sinks": dict(layer_types=["swa", "swa"], num_sink_tokens=3),
    "7b-sinks": dict(layer_types=["gla", "swa", "gla", "swa"], num_sink_tokens=3),
    "gla+swa-sinks-separate": dict(layer_types=["gla+swa", "gla+full"], num_sink_tokens=3,
                                   hybrid_separate_proj=True),
    # the 76B's shape: hybrids, sigmoid keys with the key-tied gate, sinks, MoE FFNs
    "76b-moe": dict(layer_types=["gla+swa", "gla+full", "gla+swa"], mlp_layer_types=["dense", "moe", "moe"],
                    gla_feature_map="sigmoid", gla_gate="key", num_sink_tokens=4, num_experts=4,
                    num_experts_per_tok=1, num_shared_experts=1),
}

_MODELS: dict = {}


def model_for(name):
    if name not in _MODELS:
        over = dict(LAYOUTS[name])
        _MODELS[name] = tiny_model(over.pop("layer_types"), **over)
    return _MODELS[name]


def _ids(seed=0):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def _positions(mask, docs, pad_pos=0):
    """Position ids restarting at each document start; ``docs[b]``: the lengths of row ``b``'s
    documents counted in real tokens; padding gets ``pad_pos`` (any value: it is masked)."""
    pos = torch.full((B, T), pad_pos, dtype=torch.long)
    for b in range(B):
        starts, s = set(), 0
        for n in docs[b]:
            starts.add(s)
            s += n
        p, r = 0, 0
        for t in range(T):
            if mask[b, t]:
                p = 0 if (r in starts and r > 0) else p
                pos[b, t] = p
                p, r = p + 1, r + 1
    return pos


def scenario(name):
    """``(attention_mask [B, T], position_ids [B, T] or None, positions given to decode steps)``."""
    m = torch.ones(B, T, dtype=torch.long)
    if name == "left_pad":
        m[1, :5] = 0
        m[2, :13] = 0
        return m, None, False
    if name == "right_pad":
        m[0, 27:32] = 0  # prompts of different lengths, right-padded; decoding continues
        m[1, 20:32] = 0
        m[2, 44:] = 0  # a row padded while the others decode
        return m, None, False
    if name == "holes":
        m[0, 8:16] = 0  # inside the 17-token chunk
        m[1, 19:27] = 0  # across the chunk boundary at 23
        m[2, 35:43] = 0  # during decoding
        return m, None, False
    if name == "packed":
        m[0, 12:15] = 0
        m[2, 30:34] = 0
        # real-token document lengths: row 0 starts documents at tokens 9 (inside a chunk) and
        # 23 (a chunk boundary: 3 pads before it); row 1 at 6 (boundary) and 32 (the first
        # decode step); row 2 at 20 and at the decode step of token 44
        docs = [[9, 11, 25], [6, 26, 16], [20, 20, 4]]
        return m, _positions(m, docs, pad_pos=1), True
    if name == "packed_boundary":  # no padding: documents start exactly where a chunk does
        docs = [[6, 17, 25], [23, 9, 16], [32, 16]]  # starts at 6, 23 (prefill chunks), 32 (decoding)
        return m, _positions(m, docs), True
    if name == "packed_prompt":
        m[1, 2:5] = 0
        m[2, 36:40] = 0
        docs = [[10, 38], [6, 17, 22], [23, 21]]  # the last document continues into decoding
        return m, _positions(m, docs, pad_pos=0), False
    raise ValueError(name)


SCENARIOS = ["left_pad", "right_pad", "holes", "packed", "packed_boundary", "packed_prompt"]


def _check_positions_are_what_the_scenario_says():
    m, pos, _ = scenario("packed")
    real0 = pos[0][m[0].bool()]
    assert real0[9] == 0 and real0[20] == 0 and int((real0 == 0).sum()) == 3
    assert pos[0, 23] == 0  # a document starts exactly at the chunk boundary 23
    assert pos[1, 6] == 0 and pos[1, 32] == 0


def test_scenarios_are_what_they_say():
    _check_positions_are_what_the_scenario_says()


def run_chunked(model, ids, mask, pos, pos_in_decode):
    """Chunked prefill (``CUTS``) then one token at a time; logits ``[B, T, V]``."""
    cache = model.new_cache()
    cuts = list(CUTS) + list(range(CUTS[-1] + 1, T + 1))
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        kw = {}
        if pos is not None and (a < CUTS[-1] or pos_in_decode):
            kw["position_ids"] = pos[:, a:b]
        out.append(model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, **kw).logits)
    assert cache.get_seq_length() == T
    return torch.cat(out, 1)


@pytest.mark.parametrize("scen", SCENARIOS)
@pytest.mark.parametrize("name", list(LAYOUTS))
@torch.no_grad()
def test_cached_decode_equals_dense_reference(name, scen):
    model = model_for(name)
    ids = _ids(seed=len(name) + len(scen))
    mask, pos, pos_in_decode = scenario(scen)
    ref = reference_logits(model, ids, mask, pos)
    real = mask.bool()
    full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert_close_rel(full[real], ref[real].float(), TOL, f"{name} {scen}: one forward")
    steps = run_chunked(model, ids, mask, pos, pos_in_decode)
    assert_close_rel(steps[real], ref[real].float(), TOL, f"{name} {scen}: chunked prefill + decode")


@torch.no_grad()
def test_reference_equals_transformers_llama():
    """The reference's attention, RoPE, norms and FFN are those of transformers' Llama: an
    all-``full`` SpikingBrain model with Llama's weights, through the reference, gives Llama's
    logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model(["full", "full"])
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=2, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, attention_bias=c.attention_bias,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings,
    )).eval().double()
    missing, unexpected = llama.load_state_dict(
        {k: v.double() for k, v in model.state_dict().items() if "inv_freq" not in k}, strict=False)
    assert not unexpected and all("inv_freq" in k or "lm_head" in k for k in missing), (missing, unexpected)
    ids = _ids(seed=7)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :6] = 0  # left padding: Llama's own mask and positions handle it
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    theirs = llama(ids, attention_mask=mask, position_ids=pos).logits
    ours = reference_logits(model, ids, mask)
    real = mask.bool()
    assert_close_rel(ours[real], theirs[real], 1e-6, "reference vs transformers Llama")  # Llama builds RoPE in fp32
