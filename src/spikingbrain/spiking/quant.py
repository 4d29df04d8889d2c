"""Symmetric integer weight quantization (per output row, per group of inputs) and INT8 KV.

Weights ``W [out, in]`` are split along the input dimension into ``G = ceil(in / group_size)``
groups (the last one may be shorter). Each (row, group) gets one scale
``scale = alpha * max|W_row,group| / qmax`` with ``qmax = 2^(bits-1) - 1`` (127 for INT8) and
``alpha`` a clipping ratio (1 = plain absmax; calibration may pick a smaller one per row), and
``W_q = clamp(round(W / scale), -qmax, qmax)`` — clamping matters once ``alpha < 1``. Dequantized
``W ~= W_q * scale``. All-zero groups get scale 1 (their codes are 0 anyway).

KV: one scale per key/value vector (last dim), ``scale = max|k| / 127``, codes clamped to
``[-127, 127]``; ``Int8KVQuantizer`` is the ``(k, v) -> (k, v)`` fake-quantizer the softmax
mixers call before using or caching new keys/values.
"""
from __future__ import annotations

import torch

from spikingbrain.errors import SpikingBrainError


def qmax_for(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise SpikingBrainError(f"weight_bits must be an integer in 2..8 (or None for float weights), got {bits!r}")
    return (1 << (bits - 1)) - 1


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, G, group_size]``, zero-padded."""
    out, n = w.shape
    G = -(-n // group_size)
    pad = G * group_size - n
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(out, G, group_size)


def group_scales(w: torch.Tensor, bits: int = 8, group_size: int = 128, alpha=1.0) -> torch.Tensor:
    """Scales ``[out, G]`` (fp32). ``alpha``: float or ``[out]`` tensor of clipping ratios."""
    if group_size < 1:
        raise SpikingBrainError(f"group_size must be >= 1, got {group_size}")
    qmax = qmax_for(bits)
    amax = _grouped(w.detach().float(), group_size).abs().amax(-1)
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=w.device)
    if alpha.dim() == 1:
        alpha = alpha[:, None]
    scale = amax * alpha / qmax
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """``[out, G]`` -> ``[out, in]`` (each scale repeated over its group)."""
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int = 128, alpha=1.0):
    """``W [out, in]`` -> ``(W_q [out, in] int8, scales [out, G] fp32)``."""
    if w.dim() != 2:
        raise SpikingBrainError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    qmax = qmax_for(bits)
    scales = group_scales(w, bits, group_size, alpha)
    full = expand_scales(scales, w.shape[1], group_size)
    q = torch.round(w.detach().float() / full).clamp(-qmax, qmax).to(torch.int8)
    return q, scales


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int = 128, dtype=torch.float32) -> torch.Tensor:
    """``W_q * scale`` -> ``[out, in]`` in ``dtype`` (the product in fp32, or fp64 for fp64)."""
    ct = torch.promote_types(dtype, torch.float32)
    return (q.to(ct) * expand_scales(scales, q.shape[1], group_size).to(ct)).to(dtype)


def straight_through(exact: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``exact`` in the forward pass (bit for bit), the identity gradient to ``x`` in the backward
    pass: ``exact + (x - x.detach())`` (the bracket is exactly 0 for finite ``x``). Returns
    ``exact`` itself when no gradient is being recorded for ``x``."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return exact
    return exact + (x - x.detach())


def fake_quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int = 128) -> torch.Tensor:
    """Quantize-dequantize ``w`` with a straight-through gradient (for spike-aware training). The
    forward value equals ``dequantize_weight(*quantize_weight(w))``, the inference weights."""
    q, s = quantize_weight(w, bits, group_size)
    return straight_through(dequantize_weight(q, s, group_size, w.dtype), w)


def quantize_per_vector(x: torch.Tensor, bits: int = 8):
    """``x [..., D]`` -> ``(codes [..., D] int8, scales [..., 1])``, one scale per vector."""
    qmax = qmax_for(bits)
    amax = x.detach().abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(x.detach() / scale).clamp(-qmax, qmax).to(torch.int8), scale


def fake_quantize_per_vector(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-vector quantize-dequantize in ``x``'s dtype; straight-through when ``x`` needs grad."""
    q, scale = quantize_per_vector(x.float(), bits)
    return straight_through((q.float() * scale).to(x.dtype), x)


class Int8KVQuantizer:
    """``(k, v) -> (k, v)``: INT8 per-vector fake quantization of new keys and values
    (``[B, Hkv, T, D]``, one scale per ``D``-vector). A plain callable, not an ``nn.Module``,
    so setting it on a mixer adds nothing to the state dict."""

    def __init__(self, bits: int = 8) -> None:
        qmax_for(bits)
        self.bits = bits

    def __call__(self, k: torch.Tensor, v: torch.Tensor):
        return fake_quantize_per_vector(k, self.bits), fake_quantize_per_vector(v, self.bits)

    def __repr__(self) -> str:
        return f"Int8KVQuantizer(bits={self.bits})"
