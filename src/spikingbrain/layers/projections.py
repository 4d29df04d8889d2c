"""Input projections that may be fused into one matmul for inference.

Training and checkpoints keep the Hugging Face names (``q_proj``, ``k_proj``, ``v_proj``;
``gate_proj``, ``up_proj``). ``fuse_projections(model)`` concatenates each group into one
``nn.Linear`` (``qkv_proj``, ``gate_up_proj``): at batch-1 decoding every matmul is a separate
small call with its own overhead (and, for dynamic int8, its own activation quantization), so
fewer, larger calls are faster. The mixers call ``project(self, names, x)``, which uses the fused
layer when it exists.
"""
from __future__ import annotations

import torch
from torch import nn

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSED_NAMES = {QKV: "qkv_proj", GATE_UP: "gate_up_proj"}


def project(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(getattr(owner, n)(x) for n in names)``, as one matmul when ``names`` were fused."""
    # a plain dict lookup: the unfused (training) path should not pay for a failed nn.Module getattr
    sizes = owner.__dict__.get("fused_sizes", {}).get(FUSED_NAMES[names])
    if sizes is None:
        return tuple(getattr(owner, n)(x) for n in names)
    return getattr(owner, FUSED_NAMES[names])(x).split(sizes, -1)


def _fuse(owner: nn.Module, names: tuple[str, ...]) -> bool:
    parts = [getattr(owner, n, None) for n in names]
    if not all(type(p) is nn.Linear for p in parts):  # quantized/spiking layers: leave them
        return False
    if len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
        return False
    w = parts[0].weight
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                      bias=parts[0].bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    fused.requires_grad_(w.requires_grad)
    # on the owner, not the fused layer: quantization may replace that layer by another module
    owner.fused_sizes = {**getattr(owner, "fused_sizes", {}), FUSED_NAMES[names]: [p.out_features for p in parts]}
    for n in names:
        delattr(owner, n)
    setattr(owner, FUSED_NAMES[names], fused)
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up projections in place, for inference (the fused model's state dict
    no longer has the separate names: do not save it). Returns how many groups were fused."""
    n = 0
    for module in list(model.modules()):
        for names in (QKV, GATE_UP):
            if names in getattr(module, "fusable", ()):
                n += _fuse(module, names)
    return n
