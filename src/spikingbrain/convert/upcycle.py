"""MoE upcycling: turn dense SwiGLU FFNs into mixtures of experts that start where they were.

Every expert (``N`` routed, ``S`` shared) of a selected layer is a copy of that layer's dense FFN
with each of its three matrices scaled by ``alpha = (1 / (S + w))^(1/3)``, where ``w`` is the
total routed weight a token gets at init. With a small random router (std 0.02) the softmax is
nearly uniform, so ``w ~= k/N`` without renormalisation (SPEC.md's ``alpha = (1/(S + k/N))^(1/3)``,
0.98 for S=1, k=1, N=16); we use ``w = 1`` with ``norm_topk_prob`` and ``w = k/2`` for a sigmoid
router without it (``sigmoid(~0) = 1/2``). The MoE output is then
``(S + w) * FFN_alpha(x) ~= (S + w) * alpha^3 * FFN(x) = FFN(x)``: "~=" because SiLU is not
homogeneous (``silu(alpha z) != alpha silu(z)``) and the router's scores are only nearly
uniform. tests/convert/test_upcycle.py measures how close the logits stay.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.moe import ROUTERS, MoE

# 1-indexed layers of the 76B that keep a dense FFN.
DENSE_LAYERS_76B = (1, 2, 3, 5, 7, 9, 11)


def default_moe_layers(num_layers: int) -> list[int]:
    """0-indexed layers that become MoE in the 76B pattern: all but 1-indexed 1,2,3,5,7,9,11."""
    return [i for i in range(num_layers) if i + 1 not in DENSE_LAYERS_76B]


def upcycle_alpha(num_experts: int, top_k: int, num_shared_experts: int, router: str = "softmax",
                  norm_topk_prob: bool = False) -> float:
    """The per-matrix scale ``(1 / (S + w))^(1/3)`` (see the module docstring for ``w``)."""
    if norm_topk_prob:
        routed = 1.0
    elif router == "softmax":
        routed = top_k / num_experts
    else:
        routed = top_k * 0.5
    return (1.0 / (num_shared_experts + routed)) ** (1.0 / 3.0)


def _dense_ffn(layer: nn.Module, i: int) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    names = ("gate_proj", "up_proj", "down_proj")
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
        kind = type(mlp).__name__ if mlp is not None else "nothing"
        raise SpikingBrainError(
            f"layer {i}: mlp is {kind}, not a dense SwiGLU with gate_proj/up_proj/down_proj nn.Linear "
            "(already upcycled, or spiking/LoRA applied before upcycling?)"
        )
    if any(getattr(mlp, n).bias is not None for n in names):
        raise SpikingBrainError(f"layer {i}: the dense FFN has biases; experts are bias-free SwiGLUs")
    return mlp


@torch.no_grad()
def upcycle_moe(
    model: nn.Module,
    num_experts: int = 16,
    top_k: int = 1,
    num_shared_experts: int = 1,
    layers: Iterable[int] | None = None,
    router: str = "softmax",
    seed: int = 0,
    router_std: float = 0.02,
    norm_topk_prob: bool = False,
) -> nn.Module:
    """Replace dense SwiGLU FFNs of ``model`` by upcycled MoE FFNs, in place; returns ``model``.

    Args:
        model: a causal LM with ``model.model.layers[i].mlp`` dense SwiGLUs (SpikingBrain,
            Llama, Qwen2, ...).
        num_experts / top_k / num_shared_experts / router / norm_topk_prob: the MoE (see
            ``layers/moe.py``).
        layers: 0-indexed layers to upcycle; default: the 76B pattern (all layers except
            1-indexed 1, 2, 3, 5, 7, 9, 11).
        seed / router_std: the router weights are ``N(0, router_std^2)`` from a CPU generator
            seeded with ``seed`` (reproducible on any device).

    If ``model.config`` has ``mlp_layer_types`` (a SpikingBrainConfig), its MoE fields
    (``num_experts``, ``num_experts_per_tok``, ``num_shared_experts``, ``router_type``,
    ``norm_topk_prob``, ``moe_intermediate_size``, ``mlp_layer_types``) are updated so that
    ``save_pretrained`` / ``from_pretrained`` round-trips the upcycled model.
    """
    if router not in ROUTERS:
        raise SpikingBrainError(f"router must be one of {ROUTERS}, got {router!r}")
    if num_experts < 1 or not 1 <= top_k <= num_experts or num_shared_experts < 0:
        raise SpikingBrainError(
            f"need num_experts >= 1, 1 <= top_k <= num_experts, num_shared_experts >= 0; got "
            f"num_experts={num_experts}, top_k={top_k}, num_shared_experts={num_shared_experts}"
        )
    decoder = getattr(getattr(model, "model", None), "layers", None)
    if decoder is None:
        raise SpikingBrainError("upcycle_moe expects a causal LM with model.model.layers")
    n = len(decoder)
    layers = default_moe_layers(n) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise SpikingBrainError(f"layers {bad} out of range for a model with {n} layers (0-indexed)")
    dense = [_dense_ffn(decoder[i], i) for i in layers]
    config = getattr(model, "config", None)
    moe_config = config is not None and hasattr(config, "mlp_layer_types")
    if moe_config and "moe" in (config.mlp_layer_types or []):
        existing = (config.num_experts, config.num_experts_per_tok, config.num_shared_experts, config.router_type)
        if existing != (num_experts, top_k, num_shared_experts, router):
            raise SpikingBrainError(
                f"the model already has MoE layers with (num_experts, top_k, shared, router)={existing}; "
                "upcycle the rest with the same settings"
            )
    widths = {mlp.gate_proj.out_features for mlp in dense}
    if moe_config and len(widths) > 1:
        raise SpikingBrainError(f"the selected FFNs have different widths {sorted(widths)}; the config has one")
    hidden_act = getattr(config, "hidden_act", "silu") if config is not None else "silu"
    aux_coef = getattr(config, "router_aux_loss_coef", 0.01)
    z_coef = getattr(config, "router_z_loss_coef", 0.0)
    alpha = upcycle_alpha(num_experts, top_k, num_shared_experts, router, norm_topk_prob)
    gen = torch.Generator().manual_seed(seed)

    for i, mlp in zip(layers, dense):
        weight = mlp.gate_proj.weight
        d, width = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        with torch.device("meta"):  # no random init of N+S experts we overwrite anyway
            moe = MoE(d, width, num_experts, top_k, num_shared_experts, router, aux_coef, z_coef,
                      norm_topk_prob, hidden_act)
        moe = moe.to(weight.dtype).to_empty(device=weight.device)
        scaled = {n: getattr(mlp, n).weight * alpha for n in ("gate_proj", "up_proj", "down_proj")}
        for expert in list(moe.experts) + list(moe.shared_experts):
            for name, w in scaled.items():
                getattr(expert, name).weight.copy_(w)
        moe.router.weight.copy_(torch.randn(num_experts, d, generator=gen) * router_std)
        moe.train(mlp.training)
        decoder[i].mlp = moe

    if moe_config:
        types = list(config.mlp_layer_types or ["dense"] * n)
        for i in layers:
            types[i] = "moe"
        config.mlp_layer_types = types
        config.num_experts = num_experts
        config.num_experts_per_tok = top_k
        config.num_shared_experts = num_shared_experts
        config.router_type = router
        config.norm_topk_prob = norm_topk_prob
        if widths:
            width = widths.pop()
            config.moe_intermediate_size = None if width == config.intermediate_size else width
    return model
