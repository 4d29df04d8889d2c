"""SpikingBrainCache: constant memory for GLA / SWA layers (the bytes after 4w tokens equal those
after 2w), growing memory for full attention, batch surgery (select / cat), and the ring's
semantics (only real tokens, slot = position % w, a new document drops the old one)."""
import pytest
import torch

from spikingbrain import SpikingBrainCache
from testutils import assert_close_rel, tiny_model

W = 16


def ids_of(B, T, seed=0):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def feed(model, cache, ids, start, end, step=1):
    with torch.no_grad():
        for t in range(start, end, step):
            model(ids[:, t:t + step], past_key_values=cache)


@pytest.mark.parametrize("layers,sinks", [
    (["gla", "swa"], 0), (["gla", "gla"], 0), (["swa", "swa"], 0), (["gla+swa", "swa"], 4),
])
def test_constant_layers_do_not_grow(layers, sinks):
    model = tiny_model(layers, num_sink_tokens=sinks, strong=False)
    ids = ids_of(2, 4 * W)
    cache = model.new_cache()
    feed(model, cache, ids, 0, 2 * W, step=2 * W)  # prefill 2w
    at_2w = cache.memory_report()
    feed(model, cache, ids, 2 * W, 4 * W)  # then decode to 4w, token by token
    at_4w = cache.memory_report()
    assert cache.get_seq_length() == 4 * W
    assert at_2w["total"] > 0
    assert at_4w == at_2w
    assert at_4w["growing"] == 0 and at_4w["constant"] == cache.nbytes()
    # what those bytes are: per GLA layer B*H*K*V fp32, per SWA layer k, v ring of w slots
    cfg = model.config
    B, H, Hkv, D = 2, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    expected = 0
    for t in cfg.layer_types:
        if "gla" in t:
            expected += B * H * D * D * 4
        if "swa" in t:
            expected += 2 * B * Hkv * W * D * 4 + B * W * (8 + 1)  # k, v + pos (long), valid (bool)
            expected += 2 * Hkv * sinks * D * 4  # sink keys/values, once per layer
    assert at_4w["total"] == expected


def test_full_attention_grows_linearly():
    model = tiny_model(["full", "gla"], strong=False)
    ids = ids_of(1, 4 * W)
    cache = model.new_cache()
    feed(model, cache, ids, 0, 2 * W, step=2 * W)
    at_2w = cache.memory_report()
    feed(model, cache, ids, 2 * W, 4 * W, step=W)
    at_4w = cache.memory_report()
    assert at_4w["constant"] == at_2w["constant"] > 0
    assert at_4w["growing"] == 2 * at_2w["growing"] > 0
    assert at_4w["total"] == at_4w["constant"] + at_4w["growing"] == cache.nbytes()


def test_empty_cache():
    cache = SpikingBrainCache(tiny_model(["gla", "swa", "full"], strong=False).config)
    assert cache.nbytes() == 0 and cache.get_seq_length() == 0 and cache.batch_size == 0


@torch.no_grad()
def test_select_and_cat_rows_keep_decoding_exact():
    """Rows prefilled in separate caches (different lengths) and stacked with ``cat`` decode like
    each row alone; ``select`` reorders rows."""
    model = tiny_model(["gla", "swa", "full", "gla+swa"], num_sink_tokens=2)
    a, b = ids_of(1, 37, seed=1), ids_of(1, 9, seed=2)
    nxt = ids_of(2, 4, seed=3)
    ca, cb = model.new_cache(), model.new_cache()
    model(a, past_key_values=ca)
    model(b, past_key_values=cb)
    both = SpikingBrainCache.cat([ca, cb])
    assert both.batch_size == 2
    steps = torch.cat([model(nxt[:, t:t + 1], past_key_values=both).logits for t in range(4)], 1)
    for i, seq in enumerate((a, b)):
        alone = model(torch.cat([seq, nxt[i:i + 1]], 1), use_cache=False).logits[:, -4:]
        assert_close_rel(steps[i:i + 1], alone, 1e-5, f"row {i}")
    # swap the rows: the next step follows them
    both.select([1, 0])
    step = model(nxt[[1, 0], :1], past_key_values=both).logits
    for j, (seq, row) in enumerate(((b, 1), (a, 0))):
        alone = model(torch.cat([seq, nxt[row:row + 1], nxt[row:row + 1, :1]], 1), use_cache=False).logits[:, -1:]
        assert_close_rel(step[j:j + 1], alone, 1e-5, f"selected row {j}")


# ---------------------------------------------------------------------------- ring semantics
def ring_positions(cache, layer, row):
    """The positions a ring holds for ``row`` (valid slots), sorted."""
    _, _, pos, valid = cache.layers[layer].kv.past()
    return sorted(pos[row][valid[row]].tolist())


@torch.no_grad()
def test_ring_holds_the_last_w_real_tokens_by_position():
    """Padding never enters the ring (nor moves it): after a prompt with an 8-token hole and a
    decode step padded in one row, each ring holds exactly the last w real positions, each at
    slot ``position % w``."""
    model = tiny_model(["swa"], strong=False)
    ids = ids_of(2, 30)
    mask = torch.ones(2, 31, dtype=torch.long)
    mask[0, 10:18] = 0
    mask[1, 30] = 0  # row 1's decode step is padding
    cache = model.new_cache()
    model(ids, attention_mask=mask[:, :30], past_key_values=cache)
    model(ids_of(2, 1, seed=1), attention_mask=mask, past_key_values=cache)
    assert ring_positions(cache, 0, 0) == list(range(23 - W, 23))  # 22 real tokens + 1 decoded
    assert ring_positions(cache, 0, 1) == list(range(30 - W, 30))
    _, _, pos, valid = cache.layers[0].kv.past()
    assert bool(valid.all()) and torch.equal(pos % W, torch.arange(W).expand(2, W))
    assert cache.next_pos.tolist() == [23, 30] and cache.get_seq_length() == 31


@torch.no_grad()
def test_a_document_starting_at_a_chunk_boundary_drops_the_cached_one():
    """position_ids restarting exactly where a chunk starts: the new document sees nothing of
    the old one, so the cache drops its keys and restarts the linear state."""
    model = tiny_model(["gla", "swa", "full"], strong=False)
    cache = model.new_cache()
    model(ids_of(1, 20), past_key_values=cache)
    model(ids_of(1, 3, seed=1), position_ids=torch.arange(3)[None], past_key_values=cache)
    assert ring_positions(cache, 1, 0) == [0, 1, 2]
    assert ring_positions(cache, 2, 0) == [0, 1, 2]  # full attention: earlier keys marked invalid
    fresh = model.new_cache()
    model(ids_of(1, 3, seed=1), past_key_values=fresh)
    assert_close_rel(cache.layers[0].linear.state, fresh.layers[0].linear.state, 1e-6, "GLA state restarted")
    assert cache.next_pos.tolist() == [3]


def test_cat_refuses_states_without_rows():
    from spikingbrain.cache import KVState, LinearState
    from spikingbrain.errors import SpikingBrainError

    model = tiny_model(["gla", "swa"], strong=False)
    fed = model.new_cache()
    with torch.no_grad():
        model(ids_of(1, 5), past_key_values=fed)
    with pytest.raises(SpikingBrainError, match="feed every cache"):
        SpikingBrainCache.cat([fed, model.new_cache()])
    with pytest.raises(SpikingBrainError, match="feed every cache"):
        LinearState.cat([fed.layers[0].linear, LinearState()])
    with pytest.raises(SpikingBrainError, match="feed every cache"):
        KVState.cat([KVState(W), fed.layers[1].kv])
    assert LinearState.cat([LinearState(), LinearState()]).state is None  # nothing to stack: empty
    with pytest.raises(SpikingBrainError, match="rows"):
        with torch.no_grad():
            model(ids_of(2, 1), past_key_values=fed)  # 2 rows into a 1-row state
