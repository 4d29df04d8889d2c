"""Intra-layer parallel hybrid (the 76B's mixer): ``gla+swa`` and ``gla+full``.

A linear branch (GLA) and a softmax branch (SWA or full attention) run on the same normed input,
sharing the q/k/v projections by default (``config.hybrid_separate_proj`` gives the linear
branch its own). Each branch's per-head output is RMS-normalised, the two are merged as
``o = w1 * o_lin + w2 * o_soft`` with learnable per-layer scalars (init 0.5 each; the report
does not say), then ``o_proj``.
"""
from __future__ import annotations

import torch
from torch import nn

from spikingbrain.layers.attention import softmax_attend
from spikingbrain.layers.context import MixerContext
from spikingbrain.layers.gla import GatedLinearAttention
from spikingbrain.layers.norm import RMSNorm
from spikingbrain.layers.projections import QKV, project


class ParallelHybrid(nn.Module):
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
        self.separate = bool(config.hybrid_separate_proj)
        self.gla = GatedLinearAttention(config, layer_idx, with_projections=self.separate)
        if self.separate:
            del self.gla.o_proj  # one output projection, after the merge
        self.attn_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        self.merge = nn.Parameter(torch.full((2,), 0.5))
        self.kv_quantizer = None
        self.q_quantizer = None  # see SoftmaxAttention

    def _shape(self, t, B, T, heads):
        return t.view(B, T, heads, self.head_dim)

    def shaped_qkv(self, owner, x):
        """``owner``'s q/k/v projections of ``x``, ``[B, T, heads, D]`` each."""
        B, T, _ = x.shape
        q, k, v = project(owner, QKV, x)
        return (self._shape(q, B, T, self.num_heads), self._shape(k, B, T, self.num_kv_heads),
                self._shape(v, B, T, self.num_kv_heads))

    def linear_inputs(self, x, zq, zk, v):
        """The linear branch's pre-activation q, k and v (``[B, T, heads, D]``): its own
        projections of ``x`` when separate, else the shared ``zq, zk, v``."""
        return self.shaped_qkv(self.gla, x) if self.separate else (zq, zk, v)

    def branches(self, x, ctx: MixerContext, cache=None, sink_kv=None):
        """Both branch outputs, normed, ``[B, T, H, D]`` each: ``(o_linear, o_softmax)``."""
        zq, zk, v = self.shaped_qkv(self, x)
        lq, lk, lv = self.linear_inputs(x, zq, zk, v)
        o_lin = self.gla.linear_attention(x, lq, lk, lv, ctx, cache.linear if cache is not None else None)
        o_soft = softmax_attend(
            zq.transpose(1, 2), zk.transpose(1, 2), v.transpose(1, 2), ctx, self.window,
            cache.kv if cache is not None else None, sink_kv, self.kv_quantizer, self.q_quantizer,
        ).transpose(1, 2)
        return o_lin, self.attn_norm(o_soft)

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache=None, sink_kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        o_lin, o_soft = self.branches(x, ctx, cache, sink_kv)
        o = self.merge[0] * o_lin + self.merge[1] * o_soft
        return self.o_proj(o.reshape(B, T, -1))
