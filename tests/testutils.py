"""Helpers shared by the core tests (importable as ``testutils``: ``tests/conftest.py`` puts this
folder on ``sys.path``, which ``--import-mode=importlib`` does not do by itself)."""
from __future__ import annotations

import torch


def err_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``rms(a - b) / rms(b)`` (flash-linear-attention's ``get_err_ratio``)."""
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).flatten().square().mean().sqrt().item()
    base = b.flatten().square().mean().sqrt().item()
    return err / (base + 1e-30)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, tol: float, name: str = "", atol: float = 0.0) -> float:
    """Assert ``a`` and ``b`` (the reference) have the same shape, are finite, and
    ``rms(a - b) <= tol * rms(b)`` (or every difference ``<= atol``, for references that are
    exactly zero, where any rounding is an infinite relative error); returns the ratio.

    Like flash-linear-attention's ``assert_close``: a relative error over the whole tensor, so
    a few elements near zero do not make the check flaky, while a wrong mask or state (which
    moves many elements by O(1)) fails by orders of magnitude.
    """
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    assert torch.isfinite(b).all(), f"{name}: non-finite values in the reference"
    ratio = err_ratio(a, b)
    max_abs = (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0
    assert ratio <= tol or max_abs <= atol, f"{name}: relative error {ratio:.3e} > {tol:.1e} (max abs diff {max_abs:.3e})"
    return ratio


def tiny_model(layer_types, *, seed: int = 0, strong: bool = True, **overrides):
    """A tiny ``SpikingBrainForCausalLM`` in eval mode with the given layer types.

    ``strong`` re-draws every matrix with std ``1/sqrt(fan_in)`` (instead of the 0.02 init) so
    attention patterns are sharp and a wrong mask or state moves the logits visibly.
    """
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    cfg = SpikingBrainConfig.from_preset(
        "tiny", num_hidden_layers=len(layer_types), layer_types=list(layer_types), **overrides
    )
    torch.manual_seed(seed)
    model = SpikingBrainForCausalLM(cfg).eval()
    if strong:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model
