"""Gated linear attention mixer (the 7B's linear layer, SPEC.md section 1).

From the pre-normed input ``x``::

    q = phi(W_q x + b_q),  k = phi(W_k x + b_k),  v = W_v x + b_v     (phi = relu; no RoPE)
    g = logsigmoid(W_g2 (W_g1 x) + b_g2) / 16                          (per key channel, KV head)
                                          (gla_gate="full": one full-rank W_g x + b_g instead)
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = (q_t / sqrt(dh)) S_t
    out = W_o merge_heads(RMSNorm_dh(o))

k, v, g are repeated from ``Hkv`` to ``H`` heads (query head ``h`` uses KV head ``h // (H/Hkv)``,
as in HF's ``repeat_kv``). The 76B variant uses ``phi = sigmoid`` and the key-tied gate
``g_t = log(1 - k_t)``, computed as ``logsigmoid(-z)`` for ``k = sigmoid(z)`` (stable).
Padding tokens get ``k = v = 0`` and ``g = 0`` so they leave the state untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spikingbrain.layers.context import MixerContext
from spikingbrain.layers.norm import RMSNorm
from spikingbrain.layers.projections import QKV, project
from spikingbrain.ops.gla import gla


class GatedLinearAttention(nn.Module):
    def __init__(self, config, layer_idx: int, with_projections: bool = True) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.feature_map = config.gla_feature_map
        self.gate = config.gla_gate
        self.gate_normalizer = float(config.gla_gate_logit_normalizer)
        self.chunk_size = config.gla_chunk_size
        d, hd = config.hidden_size, config.head_dim
        if with_projections:  # the parallel hybrid may share the softmax branch's projections
            self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
            self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
            self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
            self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.attention_out_bias)
        self.fusable = (QKV,) if with_projections else ()
        if self.gate == "lowrank":
            r = config.gla_gate_low_rank_dim
            self.gk_proj = nn.Sequential(
                nn.Linear(d, r, bias=False), nn.Linear(r, self.num_kv_heads * hd, bias=True)
            )
        elif self.gate == "full":
            self.gk_proj = nn.Linear(d, self.num_kv_heads * hd, bias=True)
        self.o_norm = RMSNorm(hd, eps=config.rms_norm_eps)

    def _phi(self, z: torch.Tensor) -> torch.Tensor:
        if self.feature_map == "relu":
            return F.relu(z)
        if self.feature_map == "sigmoid":
            return torch.sigmoid(z)
        return z

    def linear_attention(self, x, zq, zk, v, ctx: MixerContext, cache=None) -> torch.Tensor:
        """Pre-activation ``zq [B, T, H, D]``, ``zk, v [B, T, Hkv, D]`` -> normed ``o [B, T, H, D]``."""
        q, k = self._phi(zq), self._phi(zk)
        gdt = torch.promote_types(x.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
        if self.gate in ("lowrank", "full"):
            B, T = x.shape[:2]
            g = F.logsigmoid(self.gk_proj(x).to(gdt)).view(B, T, self.num_kv_heads, self.head_dim)
            g = g / self.gate_normalizer
        else:
            g = F.logsigmoid(-zk.to(gdt))  # log(1 - sigmoid(zk))
        if ctx.valid is not None:
            m = ctx.valid[:, :, None, None].to(k.dtype)
            k, v = k * m, v * m
            # g = 0 (no decay) too: with k = v = 0 alone a pad still decayed a non-zero state
            g = g * m.to(g.dtype)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v, g = (t.repeat_interleave(rep, dim=2) for t in (k, v, g))
        state = cache.state if cache is not None else None
        o, final = gla(
            q, k, v, g, scale=self.head_dim**-0.5, initial_state=state,
            output_final_state=cache is not None, mode=ctx.gla_mode, reset=ctx.reset,
            chunk_size=self.chunk_size,
        )
        if cache is not None:
            cache.set_state(final)
        # the state math runs in fp32; hand o_proj the model's dtype
        return self.o_norm(o).to(x.dtype)

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache=None, sink_kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        zq, zk, v = project(self, QKV, x)
        zq = zq.view(B, T, self.num_heads, self.head_dim)
        zk = zk.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        o = self.linear_attention(x, zq, zk, v, ctx, cache.linear if cache is not None else None)
        return self.o_proj(o.reshape(B, T, -1))
