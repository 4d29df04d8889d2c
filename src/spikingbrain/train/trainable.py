"""Choosing what trains: all parameters, the attention mixers, a regex list, and/or LoRA.

- ``all``: every parameter. ``attention``: parameters under ``.self_attn.`` (the mixers,
  including GLA gates and output norms: what conversion changed). ``none``: nothing but LoRA.
  A list of regexes: parameters whose full name matches one (``re.search``).
- LoRA: each targeted ``nn.Linear`` (its attribute name in ``targets``, or its full name
  matching a target regex) becomes ``LoRALinear``: ``y = W x + b + (alpha / r) * B A dropout(x)``
  with ``A [r, in]`` Kaiming-uniform, ``B [out, r]`` zero (the model is unchanged at start).
  Only ``A`` and ``B`` train (plus whatever ``params`` selects). ``merge_lora`` folds them
  back into plain ``nn.Linear`` layers for export.
- LoRA on a spike-aware model (recipe ``spiking``): the target is a training-mode
  ``SpikingLinear`` and the adapter trains as part of the weight it will be merged into:
  ``y = V_th * fake_quant(W + (alpha / r) B A) s_int`` (straight-through), so the merged export,
  spikified, computes what training computed. Needs ``dropout: 0``.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking.linear import SpikingLinear
from spikingbrain.train.recipe import LoRASpec

ATTENTION = re.compile(r"(^|\.)self_attn\.")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or training-mode ``SpikingLinear``) plus a trainable low-rank
    update. Input ``[..., in]``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, SpikingLinear) and (not base.ste or dropout > 0):
            raise SpikingBrainError("LoRA on a SpikingLinear needs ste=True and dropout 0 "
                                    "(recipe fields spiking, trainable.lora.dropout)")
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` (shapes, dtypes) keeps working
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """The update ``(alpha / r) B A`` ``[out, in]`` that merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, SpikingLinear):  # spike-aware: quantize and spike the merged weight
            return self.base(x, weight_delta=self.delta())
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Module:
        self.base.weight += self.delta()
        return self.base


def _targeted(name: str, targets: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in targets or any(re.fullmatch(t, name) for t in targets)


def apply_lora(model: nn.Module, spec: LoRASpec) -> int:
    """Wrap every targeted ``nn.Linear`` / training-mode ``SpikingLinear`` (never the LM head or
    embeddings); returns how many."""
    names = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or (isinstance(m, SpikingLinear) and m.ste))
             and not n.endswith("lm_head") and _targeted(n, spec.targets)]
    if not names:
        raise SpikingBrainError(f"recipe field trainable.lora.targets: no nn.Linear matches {spec.targets}")
    for n in names:
        parent, _, leaf = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), spec.rank, spec.alpha, spec.dropout))
    return len(names)


def merge_lora(model: nn.Module) -> int:
    """Replace every ``LoRALinear`` by its merged ``nn.Linear``; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        parent, _, leaf = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lin = getattr(owner, leaf).merged()
        lin.weight.requires_grad_(True)
        setattr(owner, leaf, lin)
    return len(names)


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """``merge_lora`` on a full state dict (``scalings``: LoRA module name -> alpha / r)."""
    out = {}
    for k, v in sd.items():
        if ".lora_A" in k or ".lora_B" in k:
            continue
        if ".base." in k:
            mod, _, pname = k.rpartition(".base.")
            if pname == "weight" and mod in scalings:
                v = v + (sd[f"{mod}.lora_B"] @ sd[f"{mod}.lora_A"]) * scalings[mod]
            k = f"{mod}.{pname}"
        out[k] = v
    return out


def select_trainable(model: nn.Module, params, lora: LoRASpec | None) -> dict[str, int]:
    """Set ``requires_grad`` per the recipe; apply LoRA. Returns parameter counts
    ``{"trainable", "total", "lora_layers"}``."""
    n_lora = 0
    if params == "all":
        keep = lambda n: True  # noqa: E731
    elif params == "attention":
        keep = lambda n: bool(ATTENTION.search(n))  # noqa: E731
    elif params == "none":
        keep = lambda n: False  # noqa: E731
    else:
        pats = [re.compile(p) for p in params]
        keep = lambda n: any(p.search(n) for p in pats)  # noqa: E731
    for n, p in model.named_parameters():
        p.requires_grad_(keep(n))
    if lora is not None:
        n_lora = apply_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise SpikingBrainError(f"recipe field trainable.params: {params!r} selects no parameter of this model")
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters()), "lora_layers": n_lora}
