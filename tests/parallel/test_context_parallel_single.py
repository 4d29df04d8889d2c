"""Context parallelism without other processes: sharding arithmetic, and the sharded code path
on a group of one (every exchange is then the identity), which must still equal the model
exactly: it checks the replaced mixer methods (features, padding, document resets, the state
scan's bookkeeping) against the model's own, in-process and fast."""
from __future__ import annotations

import pytest
import torch

from cp_worker import MODELS, cache_tensors, make_model
from dense_reference import reference_logits
from spikingbrain.errors import SpikingBrainError
from spikingbrain.parallel import (context_parallel_forward, context_parallel_loss, context_parallel_prefill,
                                   shard_bounds, shard_targets)
from spikingbrain.parallel.comm import CommStats
from spikingbrain.parallel.context import _Run, sequence_metadata
from testutils import assert_close_rel


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("T,R", [(10, 1), (10, 3), (7, 7), (37, 4), (1000, 6)])
def test_shard_bounds_are_contiguous_and_balanced(T, R):
    b = shard_bounds(T, R)
    assert len(b) == R and b[0][0] == 0 and b[-1][1] == T
    assert all(b[i][1] == b[i + 1][0] for i in range(R - 1))
    sizes = [e - s for s, e in b]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_bounds_rejects_more_ranks_than_tokens():
    with pytest.raises(SpikingBrainError, match="shorter than"):
        shard_bounds(3, 4)


def test_shard_targets_follow_the_hf_shift():
    labels = torch.arange(10)[None]
    assert shard_targets(labels, 0, 4).tolist() == [[1, 2, 3, 4]]
    assert shard_targets(labels, 6, 10).tolist() == [[7, 8, 9, -100]]


def _mask():
    m = torch.ones(2, 29, dtype=torch.long)
    m[0, :3] = 0  # left padding
    m[0, 12:15] = 0  # a hole: GLA must neither add nor decay there
    m[1, -2:] = 0  # right padding
    return m


@pytest.mark.parametrize("key", list(MODELS))
def test_group_of_one_prefill_equals_model(key):
    model = make_model(key).eval()
    ids = torch.randint(0, 512, (2, 29), generator=torch.Generator().manual_seed(1))
    mask = _mask()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=True)
    out = context_parallel_prefill(model, ids, attention_mask=mask, logits="local", cache_rank=None)
    _close(out.logits, ref.logits, "logits")
    a, b = cache_tensors(out.cache), cache_tensors(ref.past_key_values)
    assert a.keys() == b.keys()
    for k in a:
        _close(a[k].float(), b[k].float(), f"cache {k}")
    last = context_parallel_prefill(model, ids, attention_mask=mask).last_logits
    _close(last, ref.logits[:, -1], "last logits")


# dynamic NTK RoPE changes its frequencies per forward call: no one-shot dense reference for decode
@pytest.mark.parametrize("key", [k for k in MODELS if k != "7b-dynamic-rope"])
@torch.no_grad()
def test_group_of_one_prefill_and_decode_equal_dense_reference(key):
    """The sharded path's prefill (holes, right padding, a packed document starting at the last
    token of the prompt) and decoding on from its cache (a padded step, then a new document)
    against ``tests/dense_reference.py``."""
    model = make_model(key).eval()
    T, n = 29, 4
    ids = torch.randint(0, 512, (2, T + n), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, T + n, dtype=torch.long)
    mask[:, :T] = _mask()
    mask[1, T + 1] = 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    pos[0, T - 1:] = torch.arange(n + 1)  # row 0: a document of the prompt's last token, then on
    pos[1, T + 2:] = torch.arange(n - 2)  # row 1: a new document two steps into decoding
    out = context_parallel_prefill(model, ids[:, :T], attention_mask=mask[:, :T], position_ids=pos[:, :T],
                                   logits="local")
    steps = [model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], position_ids=pos[:, t:t + 1],
                   past_key_values=out.cache).logits for t in range(T, T + n)]
    got = torch.cat([out.logits] + steps, 1)
    ref = reference_logits(model, ids, mask, pos).float()
    real = mask.bool()
    assert_close_rel(got[real], ref[real], 2e-5, key)


@pytest.mark.parametrize("key", list(MODELS))
def test_group_of_one_loss_and_gradients_equal_model(key):
    ids = torch.randint(0, 512, (2, 31), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([list(range(11)) + list(range(20))] * 2)  # two packed documents
    labels = ids.clone()
    labels[:, 11] = -100
    ref_model, model = make_model(key).train(), make_model(key).train()
    ref = ref_model(ids, labels=labels, position_ids=pos)
    ref.loss.backward()
    res = context_parallel_loss(model, ids, labels, position_ids=pos)
    _close(res.logits, ref.logits, "logits")
    _close(res.loss, ref.loss, "loss")
    assert int(res.n) == res.n_total == int((labels[:, 1:] != -100).sum())
    res.loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        g, h = p.grad, q.grad
        if h is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, h, atol=1e-4 * float(h.abs().max()) + 1e-8, rtol=1e-3, msg=name)


def test_replacements_are_removed_even_after_an_error():
    model = make_model("76b")
    bad = torch.full((1, 8), 10_000)  # outside the vocabulary: the model raises mid-call
    with pytest.raises(SpikingBrainError):
        context_parallel_forward(model, bad)
    context_parallel_forward(model, torch.zeros(1, 8, dtype=torch.long))
    for m in model.modules():
        for name in ("linear_attention", "attend", "branches", "route", "compute_sink_kv"):
            assert name not in m.__dict__, (type(m).__name__, name)


def test_gradient_checkpointing_is_refused():
    model = make_model("7b").train()
    model.model.gradient_checkpointing = True
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(SpikingBrainError, match="gradient checkpointing"):
        context_parallel_loss(model, ids, ids)


class _Comm:
    def __init__(self, rank, world):
        self.rank, self.world, self.stats = rank, world, CommStats()


def test_halo_mode_picks_p2p_only_when_every_shard_holds_the_next_halo():
    meta = sequence_metadata(1, 40, "cpu")
    two = _Run(_Comm(0, 2), meta, shard_bounds(40, 2), "auto", False)
    assert two.halo_lengths(16) == [0, 15]
    assert two._halo_mode(two.halo_lengths(16)) == "p2p"
    four = _Run(_Comm(0, 4), meta, shard_bounds(40, 4), "auto", False)
    assert four.halo_lengths(16) == [0, 10, 15, 15]
    assert four._halo_mode(four.halo_lengths(16)) == "allgather"
    forced = _Run(_Comm(0, 4), meta, shard_bounds(40, 4), "p2p", False)
    with pytest.raises(SpikingBrainError, match="p2p"):
        forced._halo_mode(forced.halo_lengths(16))
    with pytest.raises(SpikingBrainError, match="halo must be"):
        _Run(_Comm(0, 2), meta, shard_bounds(40, 2), "ring", False)


def test_halo_lengths_follow_positions_documents_and_padding():
    bounds = shard_bounds(40, 2)  # second shard starts at token 20
    docs = torch.tensor([list(range(15)) + list(range(25))])  # a document starts at token 15
    run = _Run(_Comm(1, 2), sequence_metadata(1, 40, "cpu", position_ids=docs), bounds, "auto", False)
    assert run.halo_lengths(16) == [0, 5]
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, 10:14] = 0  # 4 padding tokens share a position: the window spans 4 more tokens
    run = _Run(_Comm(1, 2), sequence_metadata(1, 40, "cpu", attention_mask=mask), bounds, "auto", False)
    assert run.halo_lengths(16) == [0, 19]


def test_cli_cp_prefill_on_one_process(capsys):
    from spikingbrain.cli import main

    assert main(["cp-prefill", "--preset", "tiny-76b", "--random-tokens", "40", "--nproc", "1",
                 "--max-new-tokens", "3", "--check"]) == 0
    out = capsys.readouterr().out
    assert "prefill of 40 tokens on 1 process(es)" in out
    assert "same greedy continuation: True" in out
    assert main(["cp-prefill", "--preset", "tiny"]) == 2  # no prompt: a user error, exit 2


def test_recipe_context_parallel_option_is_validated():
    from spikingbrain.train.recipe import check_world, parse_recipe

    base = {"model": {"preset": "tiny", "tokenizer": "bytes"}, "data": {"train": ["x.jsonl"]}, "steps": 1,
            "optim": {"batch_size": 4}}
    r = parse_recipe({**base, "distributed": "ddp", "context_parallel": 2}, check_files=False)
    check_world(r, 4)  # a 2 x 2 mesh: 2 data-parallel ranks of 2 rows each
    with pytest.raises(SpikingBrainError, match="does not divide"):
        check_world(r, 3)
    with pytest.raises(SpikingBrainError, match="optim.batch_size"):
        check_world(parse_recipe({**base, "distributed": "ddp", "context_parallel": 2,
                                  "optim": {"batch_size": 3}}, check_files=False), 2 * 2)
    with pytest.raises(SpikingBrainError, match="context_parallel: needs distributed"):
        parse_recipe({**base, "context_parallel": 2}, check_files=False)
    with pytest.raises(SpikingBrainError, match="context_parallel"):
        parse_recipe({**base, "distributed": "ddp", "context_parallel": 2, "grad_checkpointing": True},
                     check_files=False)
    with pytest.raises(SpikingBrainError, match="context_parallel"):
        parse_recipe({**base, "context_parallel": 0}, check_files=False)
