"""Worker side of the context-parallel tests: runs on each of 4 spawned processes (gloo).

Cases for 4 ranks run on a group of all four; cases for 2 ranks run on the pairs {0, 1} and
{2, 3}, two cases at a time. Every case builds its model from the state dict the test passes,
runs the sharded computation and returns plain tensors; the test compares them with one
process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.parallel import CommStats, context_parallel_loss, context_parallel_prefill


MODELS = {
    # 7B layout: alternating gla / swa
    "7b": ("tiny", {}),
    # 76B layout: gla+swa / gla+full hybrids, sink tokens, MoE (top-1 + shared)
    "76b": ("tiny-76b", {}),
    # every mixer kind, sinks seen by a pure GLA layer, separate linear-branch projections
    "mixed": ("tiny", dict(layer_types=["gla", "full", "swa", "gla+full"], num_sink_tokens=2,
                           hybrid_separate_proj=True)),
    # dynamic NTK RoPE past max_position_embeddings: the frequencies follow the whole sequence
    "7b-dynamic-rope": ("tiny", dict(max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})),
}


def make_model(key: str, seed: int = 0) -> SpikingBrainForCausalLM:
    """A tiny model of layout ``key`` with weights larger than the 0.02 init, so that what
    crosses shard boundaries (states, halos) moves the outputs well above the tolerances."""
    preset, overrides = MODELS[key]
    torch.manual_seed(seed)
    model = SpikingBrainForCausalLM(SpikingBrainConfig.from_preset(preset, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    return model


def build(case, state):
    preset, overrides = MODELS[case["model"]]
    model = SpikingBrainForCausalLM(SpikingBrainConfig.from_preset(preset, **overrides))
    model.load_state_dict(state)
    return model


def cache_tensors(cache) -> dict:
    """Everything a SpikingBrainCache holds, as plain tensors."""
    out = {"stream_len": cache.stream_len, "next_pos": cache.next_pos}
    for i, lc in enumerate(cache.layers):
        if lc.linear is not None:
            out[f"{i}.state"] = lc.linear.state
        if lc.kv is not None and lc.kv.past() is not None:  # past(): [B, Hkv, L, D] whatever the storage
            for name, t in zip(("k", "v", "pos", "valid"), lc.kv.past()):
                out[f"{i}.kv.{name}"] = t
        if lc.sink_kv is not None:
            out[f"{i}.sink_k"], out[f"{i}.sink_v"] = lc.sink_kv
    return {k: v.detach().clone() for k, v in out.items()}


def decode_after(model, cache, steps: torch.Tensor, mask: torch.Tensor | None = None,
                 pos: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of feeding ``steps [B, n]`` one token at a time after the prefill ``cache``, with
    this step's column of ``mask`` / ``pos`` (``[B, n]``) when given."""
    outs = []
    with torch.no_grad():
        for t in range(steps.shape[1]):
            kw = {}
            if mask is not None:
                kw["attention_mask"] = mask[:, t:t + 1]
            if pos is not None:
                kw["position_ids"] = pos[:, t:t + 1]
            outs.append(model(steps[:, t:t + 1], past_key_values=cache, use_cache=True, **kw).logits[:, -1])
    return torch.stack(outs, 1)


def run_case(case, state, group) -> dict:
    model = build(case, state)
    g_rank = dist.get_rank(group)
    stats = CommStats()
    if case["kind"] == "prefill":
        model.eval()
        kw = {"position_ids": case["pos"]} if "pos" in case else {}
        out = context_parallel_prefill(model, case["ids"], attention_mask=case.get("mask"), group=group,
                                       cache_rank=0, logits=case.get("logits", "local"),
                                       halo=case.get("halo", "auto"), scan=case.get("scan", "auto"), stats=stats,
                                       **kw)
        res = {"start": out.start, "end": out.end, "logits": out.logits, "last_logits": out.last_logits,
               "bytes": stats.by_kind()}
        if g_rank == 0:
            res["cache"] = cache_tensors(out.cache)
            res["decode"] = decode_after(model, out.cache, case["decode"], case.get("decode_mask"),
                                         case.get("decode_pos"))
        return res
    model.train()
    res = context_parallel_loss(model, case["ids"], case["labels"], position_ids=case.get("pos"),
                                attention_mask=case.get("mask"), group=group, halo=case.get("halo", "auto"),
                                scan=case.get("scan", "auto"), stats=stats)
    res.loss.backward()
    loss = res.loss.detach().clone()
    dist.all_reduce(loss, group=group)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        grads[name] = g
    out = {"start": res.start, "end": res.end, "logits": res.logits.detach(), "loss": loss,
           "bytes": stats.by_kind(), "bwd_bytes": stats.by_kind("bwd")}
    if g_rank == 0:
        out["grads"] = grads
    return out


def run_cases(cases: list[dict], states: dict, recipe: str | None = None) -> dict:
    """Every case (see the module docstring), then, if given, a training ``recipe`` on all four
    ranks (the trainer lays them out as its data x context mesh)."""
    torch.manual_seed(0)
    rank = dist.get_rank()
    quad = dist.new_group([0, 1, 2, 3])
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = {}
    for case in cases:
        if case["world"] == 4:
            group = quad
        elif case["pair"] == rank // 2:
            group = pairs[rank // 2]
        else:
            continue
        results[case["name"]] = run_case(case, states[case["model"]], group)
    trained = None
    if recipe is not None:
        import spikingbrain.parallel as P
        from spikingbrain.train import load_recipe, train

        original, shards = P.context_parallel_loss, []

        def spy(*a, **kw):  # the trainer imports it from spikingbrain.parallel at call time
            out = original(*a, **kw)
            shards.append((out.start, out.end, tuple(a[1].shape)))
            return out

        P.context_parallel_loss = spy
        try:
            res = train(load_recipe(recipe), progress=False)
        finally:
            P.context_parallel_loss = original
        trained = {"step": res.step, "history": res.history, "shards": shards}
    return {"rank": rank, "results": results, "trained": trained}
