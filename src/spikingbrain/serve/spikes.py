"""Live spike sparsity for the server, per request, when the model is spiking.

``spikingbrain.spiking`` (another area) owns the definition, ``SpikeMonitor``'s ``sparsity``:
the share of zero slots when every spike count ``s`` is coded with 3 time steps of the
bidirectional bitwise code, ``1 - mean(popcount(min(|s|, 7))) / 3`` over every (token, input
channel) of every spiking projection. The monitor pools all rows of a batch; a server reports
one figure per request, so ``SpikeProbe`` applies the same formula row by row: forward
pre-hooks recompute each ``SpikingLinear``'s counts (``mod.spikes``) and add them up per batch
row. Projections whose input is not ``[batch, tokens, channels]`` (routed MoE experts see a
flat list of tokens) cannot be attributed to a row and are left out of the per-request figure.

The import is lazy and everything degrades to "no figure" (``None``) when the package is
absent, the model has no spiking layers, or a hook fails, so serving never depends on it.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("spikingbrain.serve")

SPARSITY_STEPS = 3


def model_is_spiking(model) -> bool:
    """True when some module of ``model`` comes from ``spikingbrain.spiking`` (a spiking linear)."""
    return any(type(m).__module__.startswith("spikingbrain.spiking") for m in model.modules())


class SpikeProbe:
    """``reset()`` before a batched forward, ``rows(batch)`` after it: each row's sparsity (or
    None when nothing attributable was seen)."""

    def __init__(self, modules, popcount) -> None:
        self._popcount = popcount
        self._lim = (1 << SPARSITY_STEPS) - 1
        self.broken = False
        self._spikes: torch.Tensor | None = None  # [B] popcount(min(|s|, 7)) summed
        self._values: torch.Tensor | None = None  # [B] (token, channel) values seen
        self._hooks = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, mod, args) -> None:
        if self.broken or not getattr(mod, "spike_inputs", True):
            return
        try:
            x = args[0]
            if x.dim() != 3:
                return
            with torch.no_grad():
                s, _ = mod.spikes(x.detach())
            a = s.abs().to(torch.int64).clamp(max=self._lim)
            spikes = self._popcount(a).sum(dim=(1, 2)).cpu()
            values = torch.full_like(spikes, s.shape[1] * s.shape[2])
            if self._spikes is None or self._spikes.shape != spikes.shape:
                self._spikes, self._values = spikes, values
            else:
                self._spikes += spikes
                self._values += values
        except Exception:
            self._disable()

    def reset(self) -> None:
        self._spikes = self._values = None

    def rows(self, batch: int) -> list[float | None] | None:
        if self.broken or self._spikes is None or self._spikes.numel() != batch:
            return None
        out = []
        for sp, v in zip(self._spikes.tolist(), self._values.tolist()):
            out.append(1.0 - sp / (v * SPARSITY_STEPS) if v else None)
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _disable(self) -> None:
        log.exception("spike probe failed; sparsity reporting is off")
        self.broken = True


def make_spike_probe(model) -> SpikeProbe | None:
    """A probe for a spiking model, or None (model not spiking, or spiking package absent)."""
    if not model_is_spiking(model):
        return None
    try:
        from spikingbrain.spiking.coding import _popcount
        from spikingbrain.spiking.linear import SpikingLinear
    except ImportError:
        return None
    modules = [m for m in model.modules() if isinstance(m, SpikingLinear)]
    if not modules:
        return None
    return SpikeProbe(modules, _popcount)
