"""The released SpikingBrain-7B checkpoint format, written from its description, and an independent
reference forward written from the official equations (nothing here imports the package).

Format (BICLab/SpikingBrain-7B, ``hf_7B_model`` and ``W8ASpike``): ``config.json`` with
``model_type: "gla_swa"``, ``attn_layers`` (window-attention layers), ``sliding_window`` W,
``norm_eps``, ``rope_theta``; weights ``model.embeddings``, ``model.layers.N.{attn_norm, mlp_norm}``,
``attn.{q,k,v}_proj.{weight,bias}``, ``attn.o_proj.weight``, on GLA layers ``attn.gk_proj.0.weight``
[16, d], ``attn.gk_proj.1.{weight,bias}``, ``attn.g_norm.weight`` [head_dim] (W8ASpike: one
full-rank ``attn.gk_proj.{weight,bias}``, and ``<linear>.weight_quantizer.scales`` [out, in/128, 1]
beside every quantized linear), ``mlp.{gate,up,down}_proj.weight``, ``model.norm``, ``lm_head``.

Reference, per sequence (one row, no padding; a left-padded batch is compared row by row):
- RMSNorm ``w * x / sqrt(mean(x^2) + eps)``; RoPE (rotate-half, cos/sin computed in fp32 as their
  rotary embedding does, positions 0..T-1);
- GLA: ``q = relu(W_q x + b)``, ``k = relu(W_k x + b)``, ``v = W_v x + b``,
  ``g = logsigmoid(gk(x)) / 16``, KV heads repeated (query head h uses KV head h // (H / Hkv)); the
  explicit recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = (q_t / sqrt(D)) S_t``;
  RMSNorm over D (g_norm), ``o_proj``;
- window attention: an explicit masked softmax, query i sees keys j with ``i - keys < j <= i``
  (``keys = W + 1`` for flash-attn's ``window_size=(W, 0)``, ``W`` for their SDPA/decode cache);
- MLP ``down(silu(gate x) * up x)``; residuals; final norm; ``lm_head``.
W8ASpike adds their fake quantization: linear inputs ``round(x / V_th) * V_th`` with
``V_th = clamp(mean|x| / 3, 1e-5, 1e4)`` (the mean in fp32, ``torch.round``), weights
``round(W / s) * s`` per group of 128, the window-attention query spike-coded the same way per head
vector after RoPE, keys/values ``round(x / c).clamp(-128, 127) * c`` per vector with
``c = clamp(max|x| / 127, 1e-5, 1e4)``; ``down_proj`` float and unspiked (their forward) unless
``down_proj="spiking"``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


def official_config(*, layers=4, hidden=128, heads=4, kv_heads=2, inter=256, vocab=160, window=6,
                    theta=10000.0, dtype="float32") -> dict:
    return {
        "architectures": ["GLAswaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_gla_swa.GLAswaConfig",
                     "AutoModelForCausalLM": "modeling_gla_swa.GLAswaForCausalLM"},
        "attention_dropout": 0.0, "attn_layers": list(range(1, layers, 2)), "attn_mode": "chunk",
        "bos_token_id": 0, "conv_size": 4, "elementwise_affine": True, "eos_token_id": 0,
        "fuse_cross_entropy": True, "hidden_act": "swish", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": inter, "max_position_embeddings": 4096, "model_type": "gla_swa", "norm_eps": 1e-6,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "rope_theta": theta, "sliding_window": window, "tie_word_embeddings": False, "torch_dtype": dtype,
        "transformers_version": "4.45.0", "use_cache": True, "use_short_conv": False, "vocab_size": vocab,
    }


QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gk_proj", "gate_proj", "up_proj", "down_proj")


def official_weights(cfg: dict, *, seed: int = 0, w8aspike: bool = False) -> dict[str, torch.Tensor]:
    """Random weights under the official names (std 1/sqrt(fan_in): sharp attention, so a wrong
    window or state moves the logits visibly)."""
    g = torch.Generator().manual_seed(seed)
    d, H, Hkv, ff, V = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["intermediate_size"], cfg["vocab_size"]
    D = d // H

    def mat(o, i, scale=1.0):
        return torch.randn(o, i, generator=g) * scale * i ** -0.5

    def vec(n, scale=0.1):
        return torch.randn(n, generator=g) * scale

    w = {"model.embeddings.weight": torch.randn(V, d, generator=g), "model.norm.weight": 1 + vec(d),
         "lm_head.weight": mat(V, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "attn_norm.weight"] = 1 + vec(d)
        w[p + "mlp_norm.weight"] = 1 + vec(d)
        w[p + "attn.q_proj.weight"], w[p + "attn.q_proj.bias"] = mat(H * D, d, 2.0), vec(H * D)
        w[p + "attn.k_proj.weight"], w[p + "attn.k_proj.bias"] = mat(Hkv * D, d, 2.0), vec(Hkv * D)
        w[p + "attn.v_proj.weight"], w[p + "attn.v_proj.bias"] = mat(Hkv * D, d), vec(Hkv * D)
        w[p + "attn.o_proj.weight"] = mat(d, H * D)
        if i not in cfg["attn_layers"]:
            if w8aspike:
                w[p + "attn.gk_proj.weight"], w[p + "attn.gk_proj.bias"] = mat(Hkv * D, d), 2 + vec(Hkv * D, 1.0)
            else:
                w[p + "attn.gk_proj.0.weight"] = mat(16, d)
                w[p + "attn.gk_proj.1.weight"], w[p + "attn.gk_proj.1.bias"] = mat(Hkv * D, 16), 2 + vec(Hkv * D, 1.0)
            w[p + "attn.g_norm.weight"] = 1 + vec(D)
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = mat(ff, d), mat(ff, d)
        w[p + "mlp.down_proj.weight"] = mat(d, ff)
    if w8aspike:  # group-128 scales as their calibration would store them: around max|W| / 127
        for name in [n for n in w if n.endswith("_proj.weight") and n.split(".")[-2] in QUANTIZED]:
            W = w[name]
            amax = W.view(W.shape[0], -1, 128).abs().amax(-1, keepdim=True)
            w[name[: -len("weight")] + "weight_quantizer.scales"] = amax / 127 * (0.9 + 0.2 * torch.rand(
                amax.shape, generator=g))  # some codes beyond 127: their quantizer does not clamp
    return w


def write_official(path: Path, cfg: dict, weights: dict[str, torch.Tensor], dtype=torch.float32) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


class Reference:
    """The official forward of one sequence, from the equations (see the module doc)."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor], *, keys: int, dtype=torch.float64,
                 w8aspike: bool = False, down_proj: str = "float") -> None:
        self.cfg, self.keys, self.dtype, self.w8 = cfg, keys, dtype, w8aspike
        self.spike_down = down_proj == "spiking"
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        self.H, self.Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.D = cfg["hidden_size"] // self.H
        self.eps = cfg["norm_eps"]

    # --- pieces
    def rms(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    @staticmethod
    def spike(x, k=3.0):
        vth = (x.abs().mean(-1, keepdim=True).float() / k).clamp(1e-5, 1e4)
        return torch.round(x / vth) * vth

    @staticmethod
    def kv_int8(x):
        c = (x.abs().amax(-1, keepdim=True).float() / 127).clamp(1e-5, 1e4)
        return ((x / c).round().clamp(-128, 127) * c).to(x.dtype)

    def linear(self, x, name, bias=True):
        W = self.w[name + ".weight"]
        b = self.w.get(name + ".bias") if bias else None
        proj = name.split(".")[-1]
        if self.w8 and proj in QUANTIZED and (proj != "down_proj" or self.spike_down):
            s = self.w[name + ".weight_quantizer.scales"]
            W = (torch.round(W.view(W.shape[0], -1, 128) / s) * s).view_as(W)
            x = self.spike(x).to(x.dtype)
        y = x @ W.T
        return y if b is None else y + b

    def rope(self, x, T):
        D = self.D
        inv = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        freqs = torch.arange(T).float()[:, None] * inv[None]
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # fp32 tables, then the model's dtype
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    def gla(self, x, p):
        T, H, Hkv, D = x.shape[0], self.H, self.Hkv, self.D
        q = F.relu(self.linear(x, p + "q_proj")).view(T, H, D)
        k = F.relu(self.linear(x, p + "k_proj")).view(T, Hkv, D)
        v = self.linear(x, p + "v_proj").view(T, Hkv, D)
        if self.w8:
            gk = self.linear(x, p + "gk_proj")
        else:
            gk = self.linear(self.linear(x, p + "gk_proj.0", bias=False), p + "gk_proj.1")
        g = (F.logsigmoid(gk) / 16).view(T, Hkv, D)
        rep = H // Hkv
        k, v, g = (t.repeat_interleave(rep, 1) for t in (k, v, g))
        S = torch.zeros(H, D, D, dtype=x.dtype)
        out = []
        for t in range(T):
            S = torch.exp(g[t])[:, :, None] * S + k[t][:, :, None] * v[t][:, None, :]
            out.append(torch.einsum("hk,hkv->hv", q[t] * D**-0.5, S))
        o = self.rms(torch.stack(out), self.w[p + "g_norm.weight"])
        return self.linear(o.reshape(T, H * D), p + "o_proj", bias=False)

    def window_attention(self, x, p):
        T, H, Hkv, D = x.shape[0], self.H, self.Hkv, self.D
        q = self.rope(self.linear(x, p + "q_proj").view(T, H, D), T)
        k = self.rope(self.linear(x, p + "k_proj").view(T, Hkv, D), T)
        v = self.linear(x, p + "v_proj").view(T, Hkv, D)
        if self.w8:
            k, v = self.kv_int8(k), self.kv_int8(v)
            q = self.spike(q).to(q.dtype)
        rep = H // Hkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        visible = (j <= i) & (j > i - self.keys)
        scores = torch.einsum("ihd,jhd->hij", q, k) * D**-0.5
        scores = scores.masked_fill(~visible[None], float("-inf"))
        o = torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1), v)
        return self.linear(o.reshape(T, H * D), p + "o_proj", bias=False)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [T]`` -> logits ``[T, vocab]``."""
        h = self.w["model.embeddings.weight"][ids]
        for n in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{n}."
            x = self.rms(h, self.w[p + "attn_norm.weight"])
            mix = self.window_attention if n in self.cfg["attn_layers"] else self.gla
            h = h + mix(x, p + "attn.")
            y = self.rms(h, self.w[p + "mlp_norm.weight"])
            act = F.silu(self.linear(y, p + "mlp.gate_proj")) * self.linear(y, p + "mlp.up_proj")
            h = h + self.linear(act, p + "mlp.down_proj")
        return self.rms(h, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T
