"""The lean decode step: one token per row through the whole stack, as one traceable function.

Every tensor it touches is preallocated (``LeanState``) and indexed by tensors (the ring slot is
``pos % C``, the mask is built from the slots' positions), with no Python branch on tensor
values, so ``torch.compile`` (inductor's CPU backend) can turn ~30 layers of small calls into a
few fused kernels around the matmuls. The same function runs eagerly where compiling is
unavailable or turned off.

Supported: GLA (relu/sigmoid/identity feature maps; low-rank, full or key-tied gates), sliding
window and full softmax attention, both parallel hybrids (shared or separate projections),
sink tokens, dense SwiGLU FFNs, the static RoPE types. Refused with a reason (the caller then
keeps the model's own step): MoE FFNs, spiking/INT8-KV hooks, length-dependent RoPE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spikingbrain.decode.state import KV_DTYPES, LeanState, quantize_vectors
from spikingbrain.decode.weights import PackedLinear, Unsupported
from spikingbrain.errors import SpikingBrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpec:
    gla: bool  # has a linear (GLA) branch
    kind: str | None  # softmax branch: "swa", "full" or None
    heads: int
    kv_heads: int
    head_dim: int


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _packed(owner: nn.Module, names: tuple[str, ...], fused: str, fmt: str, dtype) -> PackedLinear:
    """One matmul for ``names`` (already fused into ``fused`` or not)."""
    if hasattr(owner, fused) and fused in owner.__dict__.get("fused_sizes", {}):
        return PackedLinear([getattr(owner, fused)], fmt, dtype)
    return PackedLinear([getattr(owner, n) for n in names], fmt, dtype)


class LeanLayer(nn.Module):
    def __init__(self, layer, spec: LayerSpec, config, fmt: str, dtype) -> None:
        super().__init__()
        from spikingbrain.layers.gla import GatedLinearAttention
        from spikingbrain.layers.hybrid import ParallelHybrid
        from spikingbrain.layers.mlp import SwiGLU

        self.spec = spec
        mixer, mlp = layer.self_attn, layer.mlp
        if type(mlp) is not SwiGLU:
            raise Unsupported(f"{type(mlp).__name__} feed-forward layers (MoE) are not supported by lean decode")
        if getattr(mixer, "kv_quantizer", None) is not None or getattr(mixer, "q_quantizer", None) is not None:
            raise Unsupported("the spiking INT8-KV / query hooks are not supported by lean decode")
        self.eps = float(layer.input_layernorm.variance_epsilon)
        self.norm1 = nn.Buffer(layer.input_layernorm.weight.detach().float())
        self.norm2 = nn.Buffer(layer.post_attention_layernorm.weight.detach().float())
        qkv = ("q_proj", "k_proj", "v_proj")
        self.qkv = _packed(mixer, qkv, "qkv_proj", fmt, dtype)
        self.o_proj = PackedLinear([mixer.o_proj], fmt, dtype)
        self.gate_up = _packed(mlp, ("gate_proj", "up_proj"), "gate_up_proj", fmt, dtype)
        self.down = PackedLinear([mlp.down_proj], fmt, dtype)
        self.act = mlp.act_fn
        gla = mixer if isinstance(mixer, GatedLinearAttention) else getattr(mixer, "gla", None)
        self.separate = isinstance(mixer, ParallelHybrid) and mixer.separate
        if gla is not None:
            self.feature_map, self.gate = gla.feature_map, gla.gate
            self.gate_normalizer = gla.gate_normalizer
            self.o_norm = nn.Buffer(gla.o_norm.weight.detach().float())
            self.o_norm_eps = float(gla.o_norm.variance_epsilon)
            if self.separate:
                self.lin_qkv = _packed(gla, qkv, "qkv_proj", fmt, dtype)
            if gla.gate == "lowrank":
                self.gk = nn.ModuleList([PackedLinear([gla.gk_proj[0]], fmt, dtype),
                                         PackedLinear([gla.gk_proj[1]], fmt, dtype)])
            elif gla.gate == "full":
                self.gk = nn.ModuleList([PackedLinear([gla.gk_proj], fmt, dtype)])
        if isinstance(mixer, ParallelHybrid):
            self.attn_norm = nn.Buffer(mixer.attn_norm.weight.detach().float())
            self.attn_norm_eps = float(mixer.attn_norm.variance_epsilon)
            self.merge = nn.Buffer(mixer.merge.detach().float().clone())

    # ---------------------------------------------------------------- branches
    def _phi(self, z):
        if self.feature_map == "relu":
            return F.relu(z)
        if self.feature_map == "sigmoid":
            return torch.sigmoid(z)
        return z

    def linear_branch(self, xn, zq, zk, v, S):
        """GLA recurrence for one token; updates ``S [B, H, K, V]`` in place; returns normed
        ``o [B, H, D]``."""
        sp = self.spec
        B = xn.shape[0]
        q = self._phi(zq).view(B, sp.heads, sp.head_dim)
        k = self._phi(zk).view(B, sp.kv_heads, sp.head_dim)
        v = v.view(B, sp.kv_heads, sp.head_dim)
        if self.gate == "key":
            g = F.logsigmoid(-zk).view(B, sp.kv_heads, sp.head_dim)
        else:
            z = xn
            for lin in self.gk:
                z = lin(z)
            g = F.logsigmoid(z).view(B, sp.kv_heads, sp.head_dim) / self.gate_normalizer
        rep = sp.heads // sp.kv_heads
        if rep > 1:
            k, v, g = (t.repeat_interleave(rep, dim=1) for t in (k, v, g))
        S.mul_(g.exp()[..., None]).add_(k[..., :, None] * v[..., None, :])
        o = torch.matmul((q * sp.head_dim**-0.5)[:, :, None, :], S)[:, :, 0]
        return _rms(o, self.o_norm, self.o_norm_eps)

    def softmax_branch(self, zq, zk, v, cos, sin, ring, slot, mask, sinks, fused_int8):
        """Write the token's key/value to its slot, attend over the ring (and sinks); ``o [B, H, D]``."""
        sp = self.spec
        B = zq.shape[0]
        G = sp.heads // sp.kv_heads
        q = zq.view(B, sp.heads, sp.head_dim)
        k = zk.view(B, sp.kv_heads, sp.head_dim)
        v = v.view(B, sp.kv_heads, sp.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rows = torch.arange(B, device=zq.device)
        K, V = ring[0], ring[1]
        int8 = K.dtype == torch.int8
        if int8:
            KS, VS = ring[2], ring[3]
            kq, kscale = quantize_vectors(k)
            vq, vscale = quantize_vectors(v)
            K[rows, :, :, slot] = kq
            V[rows, :, slot] = vq
            KS[rows, :, slot] = kscale
            VS[rows, :, slot] = vscale
        else:
            K[rows, :, :, slot] = k.to(K.dtype)
            V[rows, :, slot] = v.to(V.dtype)
        qr = q.view(B, sp.kv_heads, G, sp.head_dim) * sp.head_dim**-0.5
        if int8 and fused_int8:  # one fused reduction over the int8 codes (compiled)
            s = (qr[..., :, None] * K[:, :, None].float()).sum(-2) * KS[:, :, None, :]
        elif int8:
            s = torch.matmul(qr, K.float()) * KS[:, :, None, :]
        else:
            s = torch.matmul(qr.to(K.dtype), K).float()
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        if sinks is not None:
            sk, sv = sinks
            s = torch.cat([torch.matmul(qr, sk.transpose(-1, -2)).expand(B, -1, -1, -1), s], -1)
        p = torch.softmax(s, -1)
        if sinks is not None:
            ps, p = p[..., :sk.shape[2]], p[..., sk.shape[2]:]
        if int8 and fused_int8:
            o = ((p * VS[:, :, None, :])[..., :, None] * V[:, :, None].float()).sum(-2)
        elif int8:
            o = torch.matmul(p * VS[:, :, None, :], V.float())
        else:
            o = torch.matmul(p.to(V.dtype), V).float()
        if sinks is not None:
            o = o + torch.matmul(ps, sv)
        return o.reshape(B, sp.heads, sp.head_dim)

    def forward(self, x, cos, sin, S, ring, slot, mask, sinks, fused_int8):
        sp = self.spec
        B = x.shape[0]
        xn = _rms(x, self.norm1, self.eps)
        hd = sp.head_dim
        zq, zk, v = self.qkv(xn).split([sp.heads * hd, sp.kv_heads * hd, sp.kv_heads * hd], -1)
        if sp.kind is None:
            o = self.linear_branch(xn, zq, zk, v, S)
        else:
            o = self.softmax_branch(zq, zk, v, cos, sin, ring, slot, mask, sinks, fused_int8)
            if sp.gla:
                lq, lk, lv = ((zq, zk, v) if not self.separate else
                              self.lin_qkv(xn).split([sp.heads * hd, sp.kv_heads * hd, sp.kv_heads * hd], -1))
                o_lin = self.linear_branch(xn, lq, lk, lv, S)
                o = self.merge[0] * o_lin + self.merge[1] * _rms(o, self.attn_norm, self.attn_norm_eps)
        h = x + self.o_proj(o.reshape(B, -1))
        gate, up = self.gate_up(_rms(h, self.norm2, self.eps)).chunk(2, -1)
        return h + self.down(self.act(gate) * up)


class LeanDecoder(nn.Module):
    """The lean step of a ``SpikingBrainForCausalLM`` (weights packed as ``weights``: ``float``,
    ``int8`` or ``int4``; window in ``kv``: ``fp32``, ``bf16`` or ``int8``). Raises
    ``Unsupported`` for models it cannot run."""

    def __init__(self, model, weights: str = "float", kv: str = "fp32") -> None:
        super().__init__()
        from spikingbrain.layers.rope import LENGTH_DEPENDENT_ROPE_TYPES
        from spikingbrain.modeling import SpikingBrainForCausalLM

        if not isinstance(model, SpikingBrainForCausalLM):
            raise Unsupported(f"lean decode runs SpikingBrain models, not {type(model).__name__}")
        if kv not in KV_DTYPES:
            raise SpikingBrainError(f"kv must be one of {', '.join(KV_DTYPES)}, got {kv!r}")
        cfg = model.config
        inner = model.model
        if inner.rotary_emb.rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
            raise Unsupported(f"length-dependent RoPE ({inner.rotary_emb.rope_type}) is not supported by lean decode")
        p = next(model.parameters(), None)
        self.model_dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        dtype = self.model_dtype if weights == "float" else torch.float32
        self.window = cfg.sliding_window
        self.kv_dtype = KV_DTYPES[kv]
        self.weights, self.kv = weights, kv
        self.specs = [LayerSpec("gla" in t, "swa" if "swa" in t else ("full" if "full" in t else None),
                                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
                      for t in cfg.layer_types]
        self.layers = nn.ModuleList(LeanLayer(l, s, cfg, weights, dtype) for l, s in zip(inner.layers, self.specs))
        self.embed = nn.Buffer(inner.embed_tokens.weight.detach(), persistent=False)
        self.norm = nn.Buffer(inner.norm.weight.detach().float())
        self.norm_eps = float(inner.norm.variance_epsilon)
        self.head = PackedLinear([model.lm_head], weights, dtype)
        self.inv_freq = nn.Buffer(inner.rotary_emb.inv_freq.detach().float().clone())
        self.rope_scaling = float(inner.rotary_emb.attention_scaling)
        self.has_sinks = inner.sink_tokens is not None
        self._sinks = None
        if self.has_sinks:
            with torch.no_grad():
                kv_ = inner.compute_sink_kv()
            self._sinks = [None if t is None else (t[0].detach().float(), t[1].detach().float()) for t in kv_]
        self._model_sinks = kv_ if self.has_sinks else None
        self.compiled = None  # the compiled step, once built
        self._compiled_ok = False
        self.fused_int8 = False

    def sink_kv(self, i: int):
        return None if self._model_sinks is None else self._model_sinks[i]

    # ---------------------------------------------------------------- the step
    def forward(self, tokens, pos, gla: list, rings: list, slot_pos: list, slot_valid: list):
        """``tokens, pos [B]``; ``gla``: the GLA states in layer order; ``rings``: per softmax
        layer ``[k, v(, ks, vs)]``; ``slot_pos/slot_valid``: per kind (``swa`` then ``full``)
        ``[B, C]``. Updates them all in place, and ``pos`` (+1); returns logits ``[B, V]`` fp32."""
        B = tokens.shape[0]
        x = F.embedding(tokens, self.embed).float()
        freqs = pos.float()[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        cos = (emb.cos() * self.rope_scaling)[:, None]
        sin = (emb.sin() * self.rope_scaling)[:, None]
        rows = torch.arange(B, device=tokens.device)
        slots, masks = {}, {}
        for j, kind in enumerate(self._kinds):
            sp, sv = slot_pos[j], slot_valid[j]
            slot = pos % sp.shape[1]
            sp[rows, slot] = pos
            sv[rows, slot] = True
            m = sv & (sp <= pos[:, None])
            if kind == "swa":
                m = m & (sp > (pos - self.window)[:, None])
            slots[kind], masks[kind] = slot, m
        gi = ri = 0
        for i, layer in enumerate(self.layers):
            spec = self.specs[i]
            S = ring = slot = mask = None
            if spec.gla:
                S, gi = gla[gi], gi + 1
            if spec.kind is not None:
                ring, ri = rings[ri], ri + 1
                slot, mask = slots[spec.kind], masks[spec.kind]
            sinks = self._sinks[i] if self._sinks is not None else None
            x = layer(x, cos, sin, S, ring, slot, mask, sinks, self.fused_int8)
        pos.add_(1)
        return self.head(_rms(x, self.norm, self.norm_eps))

    @property
    def _kinds(self) -> list[str]:
        return [k for k in ("swa", "full") if any(s.kind == k for s in self.specs)]

    def _args(self, state: LeanState):
        gla = [state.gla[i] for i, s in enumerate(self.specs) if s.gla]
        rings = [state.rings[i].tensors() for i, s in enumerate(self.specs) if s.kind is not None]
        kinds = self._kinds
        return gla, rings, [state.slots[k].pos for k in kinds], [state.slots[k].valid for k in kinds]

    @torch.inference_mode()
    def step(self, state: LeanState, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of every row (``tokens [B]``); returns logits ``[B, V]``."""
        state.ensure_room(1)
        tokens = tokens.view(-1).to(state.next_pos.device)
        args = (tokens, state.next_pos, *self._args(state))
        if self.compiled is None:
            logits = self.forward(*args)
        else:
            for t in (args[0], args[1], *args[2], *(r[0] for r in args[3]), *args[4], *args[5]):
                torch._dynamo.maybe_mark_dynamic(t, 0)  # rows come and go (the server's batch)
            for t in args[4] + args[5]:
                torch._dynamo.maybe_mark_dynamic(t, 1)  # ring sizes grow: one graph for all of them
            for ring in args[3]:
                torch._dynamo.maybe_mark_dynamic(ring[0], 3)
                for t in ring[1:]:
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            try:
                logits = self.compiled(*args)
            except Exception as e:
                if self._compiled_ok:
                    raise
                # compiling failed (no C++ compiler, an unsupported build...): nothing ran yet
                log.warning("lean decode: torch.compile failed (%s: %s); running eagerly", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                self.compiled, self.fused_int8 = None, False
                logits = self.forward(*args)
            else:
                self._compiled_ok = True
        state.stream_len += 1
        state.max_pos += 1
        return logits

    def new_state(self, cache) -> LeanState:
        return LeanState.from_cache(cache, self)

    # ---------------------------------------------------------------- compiling
    def compile(self) -> bool:
        """Use ``torch.compile`` (inductor) for the step; False (and the eager step kept) where
        it is unavailable. The first step after this compiles (a minute on 2 cores; cached on
        disk by inductor for later runs)."""
        try:
            import torch._inductor  # noqa: F401
            from torch._inductor import cpp_builder  # noqa: F401
        except Exception as e:  # a build without inductor
            log.warning("lean decode: torch.compile unavailable (%s); running eagerly", e)
            return False
        self.fused_int8 = True
        self.compiled = torch.compile(self.forward, dynamic=None, fullgraph=False)
        self._compiled_ok = False
        return True
