"""SpikingBrainForCausalLM on tiny configs (fp32, eval): cached decoding and chunked prefill equal
one full forward for every layout (ring buffer wrapping, sink tokens), left padding equals
sequences one at a time, save/load is exact, generate() equals greedy decoding without a cache,
the loss is the shifted cross-entropy, and packed documents equal separate ones."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from spikingbrain import SpikingBrainCache, SpikingBrainError, SpikingBrainForCausalLM
from spikingbrain.hf_compat import CACHE_KWARG
from testutils import assert_close_rel, tiny_model

TOL = 1e-5  # fp32 logits; measured rms ratio <= 3e-7 (max abs ratio <= 7e-7)
W = 16  # the tiny preset's sliding window

LAYOUTS = {
    "gla": ["gla", "gla"],
    "swa": ["swa", "swa"],
    "full": ["full", "full"],
    "7b": ["gla", "swa", "gla", "swa"],
    "gla+swa": ["gla+swa", "gla+swa"],
    "gla+full": ["gla+full", "gla+swa"],
}
# (layout, sink tokens): sinks only matter where there is a softmax branch
CASES = [(name, 0) for name in LAYOUTS] + [("swa", 4), ("7b", 4), ("gla+swa", 4), ("gla+full", 4)]
CASE_IDS = [f"{n}-sinks{s}" for n, s in CASES]


_MODELS: dict = {}


def model_for(name: str, sinks: int = 0) -> SpikingBrainForCausalLM:
    key = (name, sinks)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(LAYOUTS[name], num_sink_tokens=sinks)
    return _MODELS[key]


def ids_of(B, T, seed=0):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def left_pad(seqs, pad_id=0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    return ids, mask


# ---------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name,sinks", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_decode_token_by_token_equals_full_forward(name, sinks):
    """T = 43 > 2w: the SWA ring buffer wraps twice during decoding."""
    model = model_for(name, sinks)
    T = 43
    ids = ids_of(2, T, seed=1)
    full = model(ids, use_cache=False).logits
    cache = model.new_cache()
    logits = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
    for t in range(5, T):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        logits.append(out.logits)
    assert cache.get_seq_length() == T
    assert_close_rel(torch.cat(logits, 1), full, TOL, name)


@torch.no_grad()
def test_decode_tiny_76b_preset():
    """The 76B shape in miniature: parallel hybrids, sigmoid keys with the key-tied gate, sink
    tokens, MoE FFNs."""
    from spikingbrain import SpikingBrainConfig

    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(SpikingBrainConfig.from_preset("tiny-76b")).eval()
    ids = ids_of(2, 40, seed=13)
    full = model(ids).logits
    cache = model.new_cache()
    steps = [model(ids[:, :20], past_key_values=cache).logits]
    steps += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(20, 40)]
    assert_close_rel(torch.cat(steps, 1), full, TOL)


@pytest.mark.parametrize("name,sinks", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_chunked_prefill_equals_one_shot(name, sinks):
    """Three pieces through the cache; the middle one is longer than the window."""
    model = model_for(name, sinks)
    T = 45
    ids = ids_of(2, T, seed=2)
    full = model(ids, use_cache=False).logits
    cache = model.new_cache()
    pieces = [model(ids[:, a:b], past_key_values=cache).logits for a, b in [(0, 7), (7, 30), (30, T)]]
    assert_close_rel(torch.cat(pieces, 1), full, TOL, name)
    # and the cache then continues exactly like one built in one shot
    nxt = ids_of(2, 3, seed=3)
    one_shot = model.new_cache()
    model(ids, past_key_values=one_shot)
    for t in range(3):
        a = model(nxt[:, t:t + 1], past_key_values=cache).logits
        b = model(nxt[:, t:t + 1], past_key_values=one_shot).logits
        assert_close_rel(a, b, TOL, f"{name} step {t}")


@pytest.mark.parametrize("name,sinks", [("7b", 0), ("gla+full", 4)])
@torch.no_grad()
def test_long_chunked_prefill_with_padding(name, sinks):
    """Pieces longer than the attention block (256) on top of a cached past (the blocked path
    with past keys), row 1 left-padded by 5."""
    model = model_for(name, sinks)
    T = 600
    ids = ids_of(2, T, seed=4)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :5] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    for cuts in [(0, 20, 320, T), (0, 300, 301, T)]:
        cache = model.new_cache()
        logits = torch.cat([
            model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache).logits
            for a, b in zip(cuts[:-1], cuts[1:])
        ], 1)
        assert_close_rel(logits[real], full[real], TOL, f"{name} {cuts}")


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("name,sinks", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_left_padded_batch_equals_one_at_a_time(name, sinks):
    """Without a cache, and with one (padded prefill, then 6 decode steps per row)."""
    model = model_for(name, sinks)
    seqs = [ids_of(1, n, seed=10 + n)[0] for n in (30, 21, 9)]
    ids, mask = left_pad(seqs)
    T = ids.shape[1]
    batch = model(ids, attention_mask=mask, use_cache=False).logits
    cont = ids_of(3, 6, seed=5)
    cache = model.new_cache()
    model(ids, attention_mask=mask, past_key_values=cache)
    steps = []
    for t in range(6):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        steps.append(model(cont[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
    steps = torch.cat(steps, 1)
    for i, s in enumerate(seqs):
        alone = model(torch.cat([s, cont[i]])[None], use_cache=False).logits[0]
        assert_close_rel(batch[i, T - len(s):], alone[:len(s)], TOL, f"{name} row {i}")
        assert_close_rel(steps[i], alone[len(s):], TOL, f"{name} row {i} decode")


@torch.no_grad()
def test_padding_leaves_the_linear_state_untouched():
    """Pads in a later chunk (not only at the left edge) do not decay the GLA state."""
    model = model_for("gla")
    ids = ids_of(1, 30, seed=6)
    ref = model(ids).logits
    cache = model.new_cache()
    a = model(ids[:, :10], past_key_values=cache).logits
    chunk = torch.cat([ids[:, 10:20], torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 5)], 1).long()
    b = model(chunk, attention_mask=mask, past_key_values=cache).logits[:, :10]
    mask = torch.cat([mask, torch.ones(1, 10, dtype=torch.long)], 1)
    c = model(ids[:, 20:], attention_mask=mask, past_key_values=cache).logits
    assert_close_rel(torch.cat([a, b, c], 1), ref, TOL)


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name,sinks", [("7b", 0), ("gla+full", 4)])
@torch.no_grad()
def test_save_load_round_trip_is_exact(name, sinks, tmp_path):
    model = model_for(name, sinks)
    ids = ids_of(2, 40, seed=7)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    for cls in (SpikingBrainForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, SpikingBrainForCausalLM)
        assert loaded.config.layer_types == model.config.layer_types
        assert torch.equal(loaded(ids).logits, expected), cls.__name__


# ---------------------------------------------------------------------------- generation
def greedy_without_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("name,sinks", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_generate_equals_greedy_without_cache(name, sinks):
    model = model_for(name, sinks)
    prompt = ids_of(1, 12, seed=8)
    n = 2 * W  # long enough to wrap the ring buffer
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(model, prompt, n))
    no_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(no_cache, out[:, :18])


@torch.no_grad()
def test_generate_feeds_one_token_at_a_time_through_the_cache(monkeypatch):
    """The installed transformers' generation contract (``cache`` from 5.24, ``past_key_values``
    before): after the prompt, every step must hand the model our cache and one new token.
    A model that misses the cache's name generates correct-looking text from scratch each step."""
    model = model_for("7b")
    seen = []
    forward = SpikingBrainForCausalLM.forward

    def spy(self, input_ids=None, **kw):
        state = kw.get("cache", kw.get("past_key_values"))
        seen.append((None if input_ids is None else input_ids.shape[1], type(state).__name__,
                     0 if state is None else state.get_seq_length()))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(SpikingBrainForCausalLM, "forward", spy)
    model.generate(ids_of(1, 7, seed=3), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert seen[0] == (7, "SpikingBrainCache", 0)
    assert seen[1:] == [(1, "SpikingBrainCache", 7 + i) for i in range(4)]


def test_model_accepts_either_name_for_the_decode_state():
    model = model_for("7b")
    ids = ids_of(1, 6, seed=4)
    with torch.no_grad():
        a = model(ids[:, :5], cache=model.new_cache(), use_cache=True)
        b = model(ids[:, :5], past_key_values=model.new_cache(), use_cache=True)
        la = model(ids[:, 5:], cache=getattr(a, CACHE_KWARG), use_cache=True).logits
        lb = model(ids[:, 5:], past_key_values=getattr(b, CACHE_KWARG), use_cache=True).logits
    assert torch.equal(la, lb)
    with pytest.raises(SpikingBrainError, match="not both"):
        model(ids, cache=model.new_cache(), past_key_values=model.new_cache())

@pytest.mark.parametrize("name,sinks", [("7b", 0), ("full", 0), ("gla+full", 4)])
@torch.no_grad()
def test_batched_generate_with_left_padding_equals_per_sequence(name, sinks):
    model = model_for(name, sinks)
    seqs = [ids_of(1, n, seed=20 + n)[0] for n in (19, 4, 11)]
    ids, mask = left_pad(seqs)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(s):]), f"row {i}"


@torch.no_grad()
def test_generate_from_inputs_embeds_equals_from_ids():
    model = model_for("7b", 4)
    ids = ids_of(2, 10, seed=14)
    from_ids = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(from_embeds[:, -8:], from_ids[:, 10:])


# ---------------------------------------------------------------------------- loss
@pytest.mark.parametrize("name", ["7b", "gla+full"])
def test_loss_is_shifted_cross_entropy(name):
    model = model_for(name)
    ids = ids_of(2, 25, seed=9)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close_rel(out.loss, manual, 1e-6)


def test_loss_backward_reaches_every_parameter():
    model = tiny_model(LAYOUTS["gla+full"], num_sink_tokens=4).train()
    ids = ids_of(2, 20, seed=10)
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


# ---------------------------------------------------------------------------- packed documents
@pytest.mark.parametrize("name,sinks", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_packed_documents_equal_separate_documents(name, sinks):
    """position_ids restarting at 0 reset the GLA state and mask attention at the boundaries;
    the second document is longer than the window."""
    model = model_for(name, sinks)
    docs = [ids_of(1, n, seed=30 + n)[0] for n in (13, 24, 7)]
    packed = torch.cat(docs)[None].repeat(2, 1)
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None].repeat(2, 1)
    logits = model(packed, position_ids=pos, use_cache=False).logits
    separate = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    assert_close_rel(logits[0], separate, TOL, name)
    assert_close_rel(logits[1], separate, TOL, name)


# ---------------------------------------------------------------------------- sink tokens
def sink_reference(model):
    """Sinks as their own sequence through every layer's own forward: all at position 0 (so
    the position mask lets each see all the others: no causal mask) and no RoPE."""
    from spikingbrain.layers.context import MixerContext

    base = model.model
    h = base.sink_tokens[None]
    S, hd = h.shape[1], model.config.head_dim
    ctx = MixerContext(positions=torch.zeros(1, S, dtype=torch.long), cos=torch.ones(1, S, hd),
                       sin=torch.zeros(1, S, hd), valid=torch.ones(1, S, dtype=torch.bool))
    kvs = []
    for layer in base.layers:
        x = layer.input_layernorm(h)
        mixer = layer.self_attn
        if hasattr(mixer, "kv_quantizer"):
            k, v = (p(x).view(1, S, -1, hd).transpose(1, 2) for p in (mixer.k_proj, mixer.v_proj))
            kvs.append(mixer.kv_quantizer(k, v) if mixer.kv_quantizer is not None else (k, v))
        else:
            kvs.append(None)
        h = h + mixer(x, ctx)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return kvs


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
@torch.no_grad()
def test_sink_kv_equals_the_layers_own_computation(separate, quantized):
    """compute_sink_kv runs each mixer's definition (the hybrid's linear branch with its own
    projections when ``hybrid_separate_proj``, fed keys/values from before the KV hook)."""
    model = tiny_model(["gla+swa", "gla", "swa", "gla+full"], num_sink_tokens=4,
                       hybrid_separate_proj=separate)
    if quantized:  # a stand-in for spiking's INT8 KV hook
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "kv_quantizer"):
                layer.self_attn.kv_quantizer = lambda k, v: (k * 0.5, v + 0.25)
    got, ref = model.model.compute_sink_kv(), sink_reference(model)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert_close_rel(a[0], b[0], 1e-6, f"layer {i} k")
            assert_close_rel(a[1], b[1], 1e-6, f"layer {i} v")


# ---------------------------------------------------------------------------- other
@torch.no_grad()
def test_gla_modes_agree_in_the_model():
    model = model_for("7b")
    ids = ids_of(2, 40, seed=11)
    ref = model(ids).logits
    try:
        for mode in ("chunk", "recurrent", "naive"):
            model.set_gla_mode(mode)
            assert_close_rel(model(ids).logits, ref, TOL, mode)
    finally:
        model.set_gla_mode("auto")


@torch.no_grad()
def test_bf16_prefill_and_decode():
    """Low precision runs (the GLA state stays fp32) and stays near the fp32 model."""
    model = tiny_model(LAYOUTS["gla+full"], num_sink_tokens=4)
    ids = ids_of(2, 30, seed=12)
    ref = model(ids).logits
    model = model.to(torch.bfloat16)
    full = model(ids).logits
    assert full.dtype == torch.bfloat16
    cache = model.new_cache()
    steps = [model(ids[:, :20], past_key_values=cache).logits]
    steps += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(20, 30)]
    assert cache.layers[0].linear.state.dtype == torch.float32
    assert_close_rel(torch.cat(steps, 1).float(), full.float(), 2e-2)
    assert_close_rel(full.float(), ref, 5e-2)


def test_clear_errors():
    model = model_for("7b")
    with pytest.raises(SpikingBrainError, match="outside the vocabulary"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(SpikingBrainError, match="SpikingBrainCache"):
        model(torch.tensor([[1, 2]]), past_key_values=object())
    with pytest.raises(SpikingBrainError, match="exactly one"):
        model()
    with pytest.raises(SpikingBrainError, match="attention_mask"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    assert isinstance(model(torch.tensor([[1, 2]]), use_cache=True).past_key_values, SpikingBrainCache)
