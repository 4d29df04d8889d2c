"""The arithmetic of the released W8ASpike checkpoint (BICLab/SpikingBrain-7B, folder ``W8ASpike``).

Loading that checkpoint (``convert/official.py``) puts it into this package's spiking inference
path (``SpikingLinear``, the mixers' ``kv_quantizer`` / ``q_quantizer`` hooks) with the pieces
below, so that it computes what the authors' code computes. Where their code differs from this
package's own scheme (``neuron.py``, ``quant.py``):

- spike counts (their ``dynamic_spikes``): ``s = torch.round(x / V_th)`` (half to even) with
  ``V_th = clamp(mean(|x|) / k, 1e-5, 1e4)``, the mean cast to fp32 before the division. Ours rounds
  half up (the integrate-and-fire neuron) and keeps ``x``'s precision: the two differ only on exact
  ties and, for fp64 inputs, in the threshold's last bits. (Their optional Int2Spike bitwise
  coding encodes and decodes the counts exactly, so it changes no value.)
- weights (their ``Quantizer``): integer codes ``round(W / s)`` from the stored scales
  ``s [out, in/128, 1]``, **no clamp**, effective weight ``codes * s``. Ours computes the scales
  from the weights and clamps to ``[-127, 127]``.
- keys and values (their ``quantize_sym``), per vector after RoPE:
  ``scale = clamp(max|x| / 127, 1e-5, 1e4)`` (fp32), codes ``round(x / scale)`` clamped to
  ``[-128, 127]``. Ours has no scale clamp (an all-zero vector gets scale 1).
- the window-attention query after RoPE is spike-coded like a layer input, per head vector
  (the mean runs over ``head_dim``). Ours leaves the query in float.
- ``down_proj`` runs in float and unspiked: their MLP calls ``swiglu_linear`` with the raw
  ``down_proj.weight``, bypassing its quantizer (its stored scales are never used).
"""
from __future__ import annotations

import torch

from spikingbrain.errors import SpikingBrainError

V_TH_MIN, V_TH_MAX = 1e-5, 1e4
KV_SCALE_MIN, KV_SCALE_MAX = 1e-5, 1e4


def spikes(x: torch.Tensor, k: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_int, V_th)`` as ``dynamic_spikes`` computes them (see the module doc)."""
    v_th = (x.abs().mean(-1, keepdim=True).float() / k).clamp(V_TH_MIN, V_TH_MAX)
    return torch.round(x / v_th), v_th


def weight_codes(weight: torch.Tensor, scales: torch.Tensor, group_size: int = 128,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes ``round(W / s)`` and scales ``[out, G]`` (fp32) of one quantized linear.

    ``weight [out, in]``; ``scales [out, in / group_size, 1]`` as stored. The division runs in
    ``dtype`` (default: the weight's), the precision their code runs in when the model is loaded
    in that dtype. Codes are int8 when they fit, else int16 (no clamp: a stored scale smaller
    than ``max|W| / 127`` gives codes beyond 127)."""
    out, n = weight.shape
    if n % group_size:
        raise SpikingBrainError(f"in_features {n} is not a multiple of the group size {group_size}")
    if tuple(scales.shape) != (out, n // group_size, 1):
        raise SpikingBrainError(f"scales of shape {tuple(scales.shape)}, expected {(out, n // group_size, 1)}")
    dt = dtype or weight.dtype
    s = scales.to(dt)
    if not bool((s != 0).all()) or not bool(torch.isfinite(s).all()):
        raise SpikingBrainError("weight_quantizer.scales holds zero or non-finite values")
    codes = torch.round(weight.to(dt).view(out, -1, group_size) / s).view(out, n)
    peak = float(codes.abs().max()) if codes.numel() else 0.0
    if peak > 32767:
        raise SpikingBrainError(f"weight codes reach {peak:.0f}: the stored scales do not fit the weights")
    codes = codes.to(torch.int8 if peak <= 127 else torch.int16)
    return codes, s.float().squeeze(-1)


class QuerySpiker:
    """``q -> V_th * s_int``, per ``head_dim`` vector: the query spike coding after RoPE. ``neuron``:
    ``"w8aspike"`` (their rounding, see ``spikes``) or ``"adaptive"`` (this package's neuron).
    A plain callable (not an ``nn.Module``), so setting it adds nothing to the state dict."""

    def __init__(self, k: float = 3.0, neuron: str = "w8aspike") -> None:
        if neuron not in ("w8aspike", "adaptive"):
            raise SpikingBrainError(f"neuron must be w8aspike|adaptive, got {neuron!r}")
        self.k, self.neuron = float(k), neuron

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        if self.neuron == "w8aspike":
            s, v_th = spikes(q, self.k)
        else:
            from spikingbrain.spiking.neuron import adaptive_spikes

            s, v_th = adaptive_spikes(q, self.k)
        return (s * v_th).to(q.dtype)

    def __repr__(self) -> str:
        return f"QuerySpiker(k={self.k}, neuron={self.neuron!r})"


def fake_quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """Their ``quantize_sym(x, 8)``: per-vector INT8 fake quantization (see the module doc)."""
    scale = (x.abs().amax(-1, keepdim=True).float() / 127).clamp(KV_SCALE_MIN, KV_SCALE_MAX)
    return ((x / scale).round().clamp(-128, 127) * scale).to(x.dtype)


class KVQuantizer:
    """``(k, v) -> (k, v)``: ``fake_quantize_kv`` on new keys and values (``[B, Hkv, T, D]``)."""

    bits = 8

    def __call__(self, k: torch.Tensor, v: torch.Tensor):
        return fake_quantize_kv(k), fake_quantize_kv(v)

    def __repr__(self) -> str:
        return "W8ASpikeKVQuantizer()"
