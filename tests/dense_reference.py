"""An independent dense reference of a SpikingBrain model's forward, for the decode tests.

Written from SPEC.md's equations, not from the model's code: it reads only the model's config
and weights (in float64) and never calls a mixer, an op or the cache. What it defines:

- Padding does not exist: each row is reduced to its real tokens (``attention_mask`` = 1) before
  anything is computed; padded positions get no output.
- Positions: ``position_ids`` where given (at real tokens; what padding carries is ignored),
  otherwise 0, 1, 2, ... over the real tokens.
- Documents: a real token whose position is not greater than the previous real token's starts
  a new document. Nothing crosses a document boundary: GLA state starts from zero, attention
  sees only the document's keys.
- Softmax attention of real token ``i``: keys ``j`` of its document with
  ``p_i - w < p_j <= p_i`` (``w = sliding_window`` keys including itself; no lower bound for
  ``full``), explicit RoPE on q and k (rotate-half convention, ``theta_f = base^(-2f/dh)``),
  scale ``1/sqrt(dh)``, query head ``h`` on KV head ``h // (H/Hkv)``; plus the sink tokens'
  keys/values when the model has them (no RoPE, always visible).
- GLA, per document and head, one token at a time:
  ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = (q_t / sqrt(dh)) S_t``, ``S_0 = 0``,
  ``q = phi(W_q x + b)``, ``k = phi(W_k x + b)``; gate ``logsigmoid(W_g2 W_g1 x + b) / 16``
  (low-rank) or ``log(1 - sigmoid(z_k))`` (76B's key-tied gate); then RMSNorm over ``dh``.
- Hybrids: ``w1 * o_lin + w2 * RMSNorm(o_soft)`` then ``W_o``.
- Sink tokens: their own short sequence through every layer, attending to each other without a
  causal mask and without RoPE; in linear branches a causal recurrence from a zero state.
- FFN: SwiGLU; MoE: softmax (or sigmoid) router, top-k weights (renormalised if configured),
  plus the shared experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DT = torch.float64


def _w(lin):
    return lin.weight.detach().to(DT), (None if lin.bias is None else lin.bias.detach().to(DT))


def _linear(lin, x):
    w, b = _w(lin)
    y = x @ w.T
    return y if b is None else y + b


def _rms(norm, x):
    eps = norm.variance_epsilon
    return norm.weight.detach().to(DT) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x, pos, base):
    """``x [n, heads, dh]`` rotated by integer positions ``pos [n]`` (rotate-half pairs ``f, f + dh/2``)."""
    dh = x.shape[-1]
    freq = base ** (-torch.arange(0, dh, 2, dtype=DT) / dh)  # [dh/2]
    ang = pos.to(DT)[:, None] * freq[None]  # [n, dh/2]
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _phi(cfg, z):
    return {"relu": F.relu, "sigmoid": torch.sigmoid}.get(cfg.gla_feature_map, lambda t: t)(z)


def _heads(t, n, heads, dh):
    return t.reshape(n, heads, dh)


class _Row:
    """One row's real tokens: positions and document ids."""

    def __init__(self, pos: torch.Tensor):
        self.pos = pos
        doc = torch.zeros(len(pos), dtype=torch.long)
        for i in range(1, len(pos)):
            doc[i] = doc[i - 1] + int(pos[i] <= pos[i - 1])
        self.doc = doc


def _softmax_branch(cfg, owner, x, row: _Row | None, window, sink_kv):
    """``owner``'s q/k/v of ``x [n, d]`` -> attention output ``[n, H, dh]`` and the keys/values.
    ``row=None``: the sink pass (no RoPE, every sink sees every sink)."""
    n, H, Hkv, dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = _heads(_linear(owner.q_proj, x), n, H, dh)
    k = _heads(_linear(owner.k_proj, x), n, Hkv, dh)
    v = _heads(_linear(owner.v_proj, x), n, Hkv, dh)
    if row is None:
        allowed = torch.ones(n, n, dtype=torch.bool)
    else:
        base = float(cfg.rope_parameters["rope_theta"])
        assert cfg.rope_parameters.get("rope_type", "default") == "default"
        q, k = _rope(q, row.pos, base), _rope(k, row.pos, base)
        pi, pj = row.pos[:, None], row.pos[None, :]
        allowed = (pj <= pi) & (row.doc[:, None] == row.doc[None, :])
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
        if window is not None:
            allowed &= pj > pi - window
    kk, vv = k, v
    if sink_kv is not None:
        sk, sv = sink_kv
        kk, vv = torch.cat([sk, k]), torch.cat([sv, v])
        allowed = torch.cat([torch.ones(n, sk.shape[0], dtype=torch.bool), allowed], 1)
    rep = H // Hkv
    out = torch.empty(n, H, dh, dtype=DT)
    for h in range(H):
        s = (q[:, h] @ kk[:, h // rep].T) / dh**0.5  # [n, keys]
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, h] = s.softmax(-1) @ vv[:, h // rep]
    return out, (k, v)


def _gla_branch(cfg, gla_mod, owner, x, row: _Row | None):
    """The GLA recurrence over ``x [n, d]`` (``owner`` holds q/k/v; ``gla_mod`` the gate and
    the output norm) -> normed output ``[n, H, dh]``. ``row=None``: one document."""
    n, H, Hkv, dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    zq = _heads(_linear(owner.q_proj, x), n, H, dh)
    zk = _heads(_linear(owner.k_proj, x), n, Hkv, dh)
    v = _heads(_linear(owner.v_proj, x), n, Hkv, dh)
    q, k = _phi(cfg, zq), _phi(cfg, zk)
    if cfg.gla_gate == "lowrank":
        g = F.logsigmoid(_linear(gla_mod.gk_proj[1], _linear(gla_mod.gk_proj[0], x)))
        g = _heads(g, n, Hkv, dh) / float(cfg.gla_gate_logit_normalizer)
    else:
        g = torch.log1p(-torch.sigmoid(zk))  # log(1 - k)
    rep = H // Hkv
    doc = row.doc if row is not None else torch.zeros(n, dtype=torch.long)
    out = torch.empty(n, H, dh, dtype=DT)
    S = torch.zeros(H, dh, dh, dtype=DT)
    for t in range(n):
        if t == 0 or doc[t] != doc[t - 1]:
            S = torch.zeros(H, dh, dh, dtype=DT)
        for h in range(H):
            j = h // rep
            S[h] = g[t, j].exp()[:, None] * S[h] + k[t, j][:, None] * v[t, j][None, :]
            out[t, h] = (q[t, h] / dh**0.5) @ S[h]
    return _rms(gla_mod.o_norm, out)


def _mixer(cfg, mixer, kind, x, row, sink_kv):
    """``(output [n, d], (k, v) of the softmax branch or None)``."""
    n = x.shape[0]
    window = cfg.sliding_window if "swa" in kind else None
    if kind == "gla":
        o = _gla_branch(cfg, mixer, mixer, x, row)
        return _linear(mixer.o_proj, o.reshape(n, -1)), None
    if kind in ("swa", "full"):
        o, kv = _softmax_branch(cfg, mixer, x, row, window, sink_kv)
        return _linear(mixer.o_proj, o.reshape(n, -1)), kv
    owner = mixer.gla if cfg.hybrid_separate_proj else mixer
    o_lin = _gla_branch(cfg, mixer.gla, owner, x, row)
    o_soft, kv = _softmax_branch(cfg, mixer, x, row, window, sink_kv)
    w1, w2 = mixer.merge.detach().to(DT)
    o = w1 * o_lin + w2 * _rms(mixer.attn_norm, o_soft)
    return _linear(mixer.o_proj, o.reshape(n, -1)), kv


def _swiglu(mlp, x):
    return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _ffn(cfg, mlp, kind, x):
    if kind != "moe":
        return _swiglu(mlp, x)
    z = _linear(mlp.router, x)
    p = z.softmax(-1) if cfg.router_type == "softmax" else z.sigmoid()
    w, ids = p.topk(cfg.num_experts_per_tok, -1)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for wi, e in zip(w[t], ids[t]):
            y[t] += wi * _swiglu(mlp.experts[int(e)], x[t:t + 1])[0]
    for shared in mlp.shared_experts:
        y = y + _swiglu(shared, x)
    return y


def _stack(model, h, row, sinks):
    """Run ``h [n, d]`` through every layer; returns the last hidden state and, per layer, the
    softmax branch's keys/values (used for the sink pass)."""
    cfg, base = model.config, model.model
    kvs = []
    for i, layer in enumerate(base.layers):
        kind = cfg.layer_types[i]
        o, kv = _mixer(cfg, layer.self_attn, kind, _rms(layer.input_layernorm, h), row,
                       None if sinks is None else sinks[i])
        kvs.append(kv)
        h = h + o
        h = h + _ffn(cfg, layer.mlp, cfg.mlp_layer_types[i], _rms(layer.post_attention_layernorm, h))
    return h, kvs


@torch.no_grad()
def reference_logits(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Float64 logits ``[B, T, V]`` of the real tokens (padded positions hold NaN)."""
    B, T = input_ids.shape
    valid = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    base = model.model
    sinks = None
    if base.sink_tokens is not None:
        _, sinks = _stack(model, base.sink_tokens.detach().to(DT), None, None)
    emb = base.embed_tokens.weight.detach().to(DT)
    out = torch.full((B, T, model.config.vocab_size), float("nan"), dtype=DT)
    for b in range(B):
        idx = valid[b].nonzero().flatten()
        if not len(idx):
            continue
        pos = position_ids[b, idx] if position_ids is not None else torch.arange(len(idx))
        h, _ = _stack(model, emb[input_ids[b, idx]], _Row(pos), sinks)
        out[b, idx] = _linear(model.lm_head, _rms(base.norm, h))
    return out
