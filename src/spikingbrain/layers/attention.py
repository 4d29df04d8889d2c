"""Softmax attention mixers: sliding-window (``swa``) and full causal (``full``).

The Transformer's attention unchanged (q/k/v biases, RoPE over the full head dim) except that in
``swa`` query ``i`` sees keys ``i - w + 1 .. i``. Decoding keeps a ring buffer of the last ``w``
keys/values (constant memory); ``full`` keeps a growing KV cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spikingbrain.layers.context import MixerContext
from spikingbrain.layers.projections import QKV, project
from spikingbrain.layers.rope import apply_rope
from spikingbrain.ops.sliding_window import windowed_attention


class SoftmaxAttention(nn.Module):
    fusable = (QKV,)

    def __init__(self, config, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.attention_out_bias)
        # Set by spiking.spikify for INT8 keys/values: (k, v) -> (k, v), shapes [B, Hkv, T, D].
        self.kv_quantizer = None

    def project(self, x: torch.Tensor):
        """``x [B, T, d]`` -> q ``[B, H, T, D]``, k, v ``[B, Hkv, T, D]`` (before RoPE)."""
        B, T, _ = x.shape
        q, k, v = project(self, QKV, x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, ctx: MixerContext, cache=None, sink_kv=None) -> torch.Tensor:
        return softmax_attend(q, k, v, ctx, self.window, cache, sink_kv, self.kv_quantizer)

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache=None, sink_kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        o = self.attend(q, k, v, ctx, cache.kv if cache is not None else None, sink_kv)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def softmax_attend(q, k, v, ctx: MixerContext, window, cache=None, sink_kv=None, kv_quantizer=None):
    """RoPE, INT8-KV hook, cache update and (windowed) attention.

    ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]`` (before RoPE); ``cache``: a ``KVState`` or None.
    Returns ``[B, H, T, D]``. The cache holds only the current document of each row (the rules:
    ``spikingbrain/cache.py``), so its keys get document 0, the chunk's first document.
    """
    q = apply_rope(q, ctx.cos, ctx.sin)
    k = apply_rope(k, ctx.cos, ctx.sin)
    if kv_quantizer is not None:
        k, v = kv_quantizer(k, v)
    B, T = q.shape[0], q.shape[2]
    q_pos = k_pos = ctx.positions
    k_valid = ctx.valid
    q_seg = k_seg = ctx.seg
    past = cache.past() if cache is not None else None
    if (past is not None and T == 1 and window is not None and cache.window == window
            and sink_kv is None and ctx.seg is None and ctx.valid is None):
        return _decode_step_in_ring(q, k, v, ctx, window, cache)
    if past is not None:
        pk, pv, ppos, pvalid = past
        k_all, v_all = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        k_pos = torch.cat([ppos, ctx.positions], 1)
        new_valid = ctx.valid if ctx.valid is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        k_valid = torch.cat([pvalid, new_valid], 1)
        if ctx.seg is not None:
            k_seg = torch.cat([torch.zeros_like(ppos), ctx.seg], 1)
    else:
        k_all, v_all = k, v
    sink_k, sink_v = sink_kv if sink_kv is not None else (None, None)
    o = windowed_attention(
        q, k_all, v_all, q_pos=q_pos, k_pos=k_pos, window=window, k_valid=k_valid,
        q_seg=q_seg, k_seg=k_seg, sink_k=sink_k, sink_v=sink_v,
    )
    if cache is not None:
        keep, new_doc = ctx.valid, None
        if ctx.seg is not None:  # only the row's last document can be seen again
            last_doc = ctx.seg == ctx.seg[:, -1:]
            keep = last_doc if keep is None else keep & last_doc
            new_doc = ctx.seg[:, -1] > 0
        cache.append(k, v, ctx.positions, keep, new_doc)
    return o


def _decode_step_in_ring(q, k, v, ctx: MixerContext, window: int, cache):
    """One real decode token of a sliding-window layer, continuing its row's document: write
    it into the ring buffer first (slot ``p % w`` holds nothing this query can see), then attend
    over the buffer. Avoids concatenating the past with the new key, a full copy of the window
    per layer per token."""
    cache.append(k, v, ctx.positions)
    kk, vv, kpos, kvalid = cache.past()
    qpos = ctx.positions  # [B, 1]
    mask = kvalid & (kpos <= qpos) & (kpos > qpos - window)  # [B, w]
    # Two plain matmuls with the query heads of a KV group as rows: one read of the window, no
    # head repetition. On CPU this is ~2x faster than SDPA's masked kernel for one query.
    B, H, _, D = q.shape
    Hkv = kk.shape[1]
    qr = q.reshape(B, Hkv, H // Hkv, D) * D**-0.5  # head h uses KV head h // (H / Hkv)
    s = torch.matmul(qr.to(kk.dtype), kk.transpose(-1, -2)).float()  # [B, Hkv, H/Hkv, w]
    if not bool(mask.all()):  # the usual case once the ring has filled: nothing to mask
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))  # the query's own key is always seen
    return torch.matmul(torch.softmax(s, -1).to(vv.dtype), vv).reshape(B, H, 1, D).to(q.dtype)
