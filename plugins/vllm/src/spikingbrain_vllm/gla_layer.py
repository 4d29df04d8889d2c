"""The GLA mixer as a vLLM V1 state layer.

Declared to the engine like vLLM's own linear-attention layers (``LinearAttention`` ->
``MambaBase``): one state per sequence of shape ``[H, head_dim, head_dim]`` kept in the
engine's state cache (a ``MambaSpec``, LINEAR backend), here always in fp32 whatever the model
dtype, since the recurrence accumulates over the whole context.

The math is the project's GLA (SPEC.md section 1)::

    q = phi(W_q x + b_q), k = phi(W_k x + b_k), v = W_v x + b_v          (no RoPE)
    g = logsigmoid(W_g2 W_g1 x + b_g2) / 16    (or log(1 - k) for the key-tied gate)
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = q_t S_t / sqrt(dh)
    out = W_o merge_heads(RMSNorm_dh(o))

k, v, g are repeated from the KV heads to the query heads (head ``h`` uses KV head
``h // (H / Hkv)``). Per step, the batch holds decode requests first (one token each), then
prefills (a whole prompt, or a chunk of one under chunked prefill).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.custom_op import PluggableLayer
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.linear.base import LinearAttention

from spikingbrain_vllm.gla import gla_chunked, gla_decode_step


@PluggableLayer.register("spikingbrain_gla")
class SpikingBrainGLA(LinearAttention):
    def __init__(self, config, vllm_config, prefix: str) -> None:
        super().__init__(config, vllm_config, prefix)
        if self.tp_size != 1:
            raise NotImplementedError("spikingbrain-vllm: tensor parallelism is not supported yet (use tensor_parallel_size=1)")
        self.num_kv_heads = config.num_key_value_heads
        self.feature_map = config.gla_feature_map
        self.gate = config.gla_gate
        self.gate_normalizer = float(config.gla_gate_logit_normalizer)
        self.scale = self.head_dim**-0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                          bias=config.attention_bias, prefix=f"{prefix}.qkv_proj")
        if self.gate == "lowrank":
            r = config.gla_gate_low_rank_dim
            self.gk_proj = nn.ModuleList([
                ReplicatedLinear(self.hidden_size, r, bias=False, prefix=f"{prefix}.gk_proj.0"),
                ReplicatedLinear(r, self.kv_size, bias=True, prefix=f"{prefix}.gk_proj.1"),
            ])
        self.o_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = RowParallelLinear(self.q_size, self.hidden_size, bias=config.attention_out_bias,
                                        prefix=f"{prefix}.o_proj")
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self  # how the engine finds the layer to bind its state cache

    # ---- what the engine allocates per sequence
    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (torch.float32,)

    def get_state_shape(self) -> tuple[tuple[int, int, int]]:
        return ((self.num_heads, self.head_dim, self.head_dim),)

    # ---- math
    def _phi(self, z):
        if self.feature_map == "relu":
            return F.relu(z)
        if self.feature_map == "sigmoid":
            return torch.sigmoid(z)
        return z

    def _inputs(self, x):
        """``x [N, d]`` -> q ``[N, H, D]``, k, g ``[N, H, D]`` (repeated to H heads), v ``[N, H, D]``."""
        N = x.shape[0]
        qkv, _ = self.qkv_proj(x)
        zq, zk, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        zq = zq.view(N, self.num_heads, self.head_dim)
        zk = zk.view(N, self.num_kv_heads, self.head_dim)
        v = v.view(N, self.num_kv_heads, self.head_dim)
        q, k = self._phi(zq), self._phi(zk)
        if self.gate == "lowrank":
            h, _ = self.gk_proj[0](x)
            h, _ = self.gk_proj[1](h)
            g = F.logsigmoid(h.float()).view(N, self.num_kv_heads, self.head_dim) / self.gate_normalizer
        else:
            g = F.logsigmoid(-zk.float())  # log(1 - sigmoid(zk)), stable
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v, g = (t.repeat_interleave(rep, dim=1) for t in (k, v, g))
        return q, k, v, g

    def forward(self, hidden_states: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> None:
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        if meta is None:  # profiling / warm-up run: no state cache bound yet
            output.zero_()
            return
        n = meta.num_decode_tokens + meta.num_prefill_tokens
        x = hidden_states[:n]
        q, k, v, g = self._inputs(x)
        states = self.kv_cache[0]  # [num_slots, H, D, D] fp32
        slots = meta.state_indices_tensor
        o = torch.empty(n, self.num_heads, self.head_dim, dtype=torch.float32, device=x.device)
        nd = meta.num_decodes
        if nd:
            idx = slots[:nd].long()
            # a one-token prompt is scheduled as a "decode": it must start from zero, not from
            # whatever the slot held for a previous request
            fresh = (meta.seq_lens[:nd] <= 1).to(x.device)
            S = states[idx] * (~fresh).float()[:, None, None, None]
            o[:meta.num_decode_tokens] = gla_decode_step(q[:nd], k[:nd], v[:nd], g[:nd], self.scale, S)
            states[idx] = S
        starts = meta.query_start_loc
        for i in range(nd, nd + meta.num_prefills):
            a, b = int(starts[i]), int(starts[i + 1])
            slot = int(slots[i])
            has_past = int(meta.seq_lens[i]) > b - a  # a later chunk of a chunked prefill
            o[a:b], final = gla_chunked(q[a:b], k[a:b], v[a:b], g[a:b], self.scale,
                                        initial_state=states[slot] if has_past else None)
            states[slot] = final
        o = self.o_norm(o.to(x.dtype).view(n * self.num_heads, self.head_dim))  # one norm per head
        out, _ = self.o_proj(o.view(n, self.q_size))
        output[:n] = out
