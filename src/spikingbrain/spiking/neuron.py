"""Adaptive-threshold spiking neuron: the one-step collapse and its multi-step event view.

For an activation ``x`` of shape ``[..., C]`` (one token per row, ``C`` channels):

- threshold ``V_th = clamp(mean(|x|, -1) / k, 1e-5, 1e4)``, shape ``[..., 1]``;
- integer spike counts ``s_int = round(x / V_th)``, shape ``[..., C]``, optionally clipped to
  ``[-clip, clip]``; a layer then computes ``V_th * (W s_int)`` instead of ``W x``.

Rounding is *half up* (``floor(u + 1/2)``: 2.5 -> 3, -2.5 -> -2), not PyTorch's half-to-even,
because that is exactly what the integrate-and-fire neuron below produces; with it the sum of the
multi-step spikes equals ``s_int`` bit for bit, also on ties. It is computed as
``floor(u) + (u - floor(u) >= 1/2)``, which is exact in floating point (``u + 1/2`` itself can round
up, e.g. for the largest float below 1/2).

Training uses a straight-through estimator: the backward pass treats rounding as the identity and
``V_th`` as a constant, so the gradient of the dequantized value ``V_th * s_int`` with respect to
``x`` is exactly the identity.
"""
from __future__ import annotations

import torch

from spikingbrain.errors import SpikingBrainError

V_TH_MIN = 1e-5
V_TH_MAX = 1e4


def threshold(x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    """``V_th = clamp(mean(|x|) / k, 1e-5, 1e4)`` over the last dim: ``[..., C]`` -> ``[..., 1]``."""
    if not k > 0:
        raise SpikingBrainError(f"k must be > 0, got {k}")
    return (x.abs().mean(-1, keepdim=True) / k).clamp(V_TH_MIN, V_TH_MAX)


def round_half_up(u: torch.Tensor) -> torch.Tensor:
    """``floor(u + 1/2)`` computed exactly: ties go up (the neuron's rounding)."""
    f = torch.floor(u)
    return f + (u - f >= 0.5).to(u.dtype)


def adaptive_spikes(x: torch.Tensor, k: float = 3.0, clip: int | None = None):
    """Spike-code ``x [..., C]`` -> ``(s_int [..., C], v_th [..., 1])``.

    ``s_int`` holds integers in ``x``'s floating dtype (computed in at least fp32, so counts are
    exact up to 2^24) and carries straight-through gradients; ``v_th`` is detached.
    ``clip``: if given, counts are clamped to ``[-clip, clip]`` (off by default).
    """
    if clip is not None and clip < 1:
        raise SpikingBrainError(f"clip must be a positive integer or None, got {clip}")
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    v_th = threshold(xf.detach(), k)
    u = xf / v_th
    s = round_half_up(u.detach())
    if clip is not None:
        s = s.clamp(-clip, clip)
    if u.requires_grad:
        # straight-through (d s / d u = 1); ``u - u.detach()`` is exactly 0, so the forward value
        # stays the exact integer count (``u + (s - u).detach()`` could be off by an ulp)
        s = s + (u - u.detach())
    return s, v_th


def integrate_and_fire(u: torch.Tensor, steps: int | None = None, signed: bool = True) -> torch.Tensor:
    """Multi-step integrate-and-fire neuron (no leak, soft reset) -> spike train ``[T, *u.shape]``.

    ``u = x / V_th`` is the input charge in units of the threshold, integrated at the first step;
    the neuron then discharges one threshold per spike (soft reset ``v <- v - s_t``). At each step
    it fires ``+1`` when ``v >= 1/2`` and (if ``signed``) ``-1`` when ``v < -1/2``, i.e. the
    membrane starts with a half-threshold bias (``v + 1/2`` is compared with ``V_th`` and with 0),
    so the residual it leaves is in ``[-1/2, 1/2)`` and never makes it fire back. Keeping the membrane in threshold units makes every update an exact float
    subtraction of an integer, so after ``T >= |round_half_up(u)|`` steps the spikes sum to
    ``round_half_up(u)`` exactly; with fewer steps the sum is that count clipped to ``[-T, T]``.
    ``steps=None`` uses the minimum, ``max |round_half_up(u)|``.
    """
    if not signed and bool((u < -0.5).any()):
        raise SpikingBrainError("an unsigned neuron cannot represent negative inputs; use signed=True")
    if steps is None:
        steps = int(round_half_up(u).abs().max().item()) if u.numel() else 0
    v = u.clone()
    train = torch.zeros((steps, *u.shape), dtype=torch.int8, device=u.device)
    for t in range(steps):
        s = (v >= 0.5).to(v.dtype)
        if signed:
            s = s - (v < -0.5).to(v.dtype)
        v = v - s
        train[t] = s.to(torch.int8)
    return train
