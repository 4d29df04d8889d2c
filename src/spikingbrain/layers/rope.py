"""Rotary position embedding over the full head dimension (Llama/Qwen2 convention)."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Returns ``(cos, sin)`` of shape ``[B, T, head_dim]`` for integer ``position_ids [B, T]``.

    ``config.rope_parameters`` follows transformers 5: ``{"rope_type", "rope_theta", ...}``;
    non-default types (llama3, yarn, ...) use transformers' own initialisers.
    """

    def __init__(self, config) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.config = config

    @staticmethod
    def compute_inv_freq(config) -> tuple[torch.Tensor, float]:
        params = config.rope_parameters
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            dim = config.head_dim
            base = float(params["rope_theta"])
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            return inv_freq, 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]``, ``cos/sin [B, T, D]``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
