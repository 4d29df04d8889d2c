"""Decode speed and decode-state memory at a long context, without a long prefill.

Per-token decode cost depends on how much state a model holds, not on its values, so a state
"as if L tokens had been read" is filled with random values:
- transformers teachers: a ``DynamicCache`` with ``L`` random keys/values per layer;
- SpikingBrain: random GLA states and full SWA windows of random keys/values at positions
  ``L-w .. L-1`` (full-attention layers get ``L`` random keys).
Used by ``spikingbrain demo`` and ``benchmarks/decode.py``.
"""
from __future__ import annotations

import statistics
import time

import torch
from spikingbrain.hf_compat import cache_kwargs, output_cache


def fill_teacher_cache(model, L: int):
    """A DynamicCache holding ``L`` random keys/values in every layer."""
    from transformers import DynamicCache

    cfg = model.config
    hkv = cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(model.parameters())
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(1, hkv, L, dh, dtype=p.dtype, device=p.device)
        cache.update(k, torch.randn_like(k), i)
    return cache


@torch.inference_mode()
def fill_spikingbrain_cache(model, L: int):
    """A SpikingBrainCache as if ``L`` tokens had been fed: random GLA states, full SWA windows
    of random keys/values at positions ``L-w .. L-1`` (slot ``n % w`` holds token ``n``)."""
    dev = next(model.parameters()).device
    cache = model.new_cache()
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev), use_cache=True, **cache_kwargs(cache))
    for lc in cache.layers:
        if lc.linear is not None and lc.linear.state is not None:
            lc.linear.set_state(torch.randn_like(lc.linear.state) * 0.1)
        if lc.kv is not None:
            t = lc.kv.tensors
            if lc.kv.window is None:  # full attention: L keys
                hkv, dh = t["k"].shape[1], t["k"].shape[3]
                k = torch.randn(1, hkv, L, dh, dtype=t["k"].dtype, device=dev)
                lc.kv.tensors = {"k": k, "v": torch.randn_like(k), "pos": torch.arange(L, device=dev)[None],
                                 "valid": torch.ones(1, L, dtype=torch.bool, device=dev)}
            else:
                w = lc.kv.window
                n = torch.arange(max(0, L - w), L)
                slots = n % w
                pos = torch.zeros(1, w, dtype=torch.long)
                valid = torch.zeros(1, w, dtype=torch.bool)
                pos[0, slots] = n
                valid[0, slots] = True
                t["k"], t["v"] = torch.randn_like(t["k"]), torch.randn_like(t["v"])
                t["pos"], t["valid"] = pos.to(dev), valid.to(dev)
    cache.stream_len = torch.tensor([L], device=dev)
    cache.next_pos = torch.tensor([L], device=dev)
    return cache


@torch.inference_mode()
def time_decode(model, cache, tokens: int, warmup: int) -> float:
    """Median ms per decode step (batch 1)."""
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tok = torch.tensor([[1]], device=dev)
    times = []
    for i in range(warmup + tokens):
        t0 = time.perf_counter()
        out = model(input_ids=tok, use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        tok = out.logits[:, -1:].argmax(-1)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def cache_bytes(cache) -> int:
    """Bytes held by a decode state: a SpikingBrainCache (its own count) or a transformers cache
    (every key/value tensor)."""
    if hasattr(cache, "nbytes") and not callable(cache.nbytes):
        return int(cache.nbytes)
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
