"""Live spike sparsity for the server, when the model is spiking.

``spikingbrain.spiking`` (another area) owns the definition; we read
``SpikeMonitor.report()["total"]["sparsity"]`` (share of zero slots when every spike count is
coded with 3 time steps) for each decode step. The monitor's hooks stay attached for the
server's lifetime; ``reset()`` before a step, ``sparsity()`` after it. The import is lazy and
everything degrades to "no figure" (``None``) when the package is absent, the model has no
spiking layers, or the monitor fails, so serving never depends on it.
"""
from __future__ import annotations

import logging

log = logging.getLogger("spikingbrain.serve")


def model_is_spiking(model) -> bool:
    """True when some module of ``model`` comes from ``spikingbrain.spiking`` (a spiking linear)."""
    return any(type(m).__module__.startswith("spikingbrain.spiking") for m in model.modules())


class SpikeProbe:
    """Wraps a monitor with ``reset()`` and ``report() -> {"total": {"sparsity", "values"}}``."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor
        self.broken = False

    def reset(self) -> None:
        if not self.broken:
            try:
                self.monitor.reset()
            except Exception:
                self._disable()

    def sparsity(self) -> float | None:
        """Sparsity over the projections' inputs since ``reset()``; None if nothing was seen."""
        if self.broken:
            return None
        try:
            total = self.monitor.report()["total"]
            if not total.get("values", 1):
                return None
            return float(total["sparsity"])
        except Exception:
            self._disable()
            return None

    def _disable(self) -> None:
        log.exception("spike monitor failed; sparsity reporting is off")
        self.broken = True


def make_spike_probe(model) -> SpikeProbe | None:
    """A probe for a spiking model, or None (model not spiking, or spiking package absent)."""
    if not model_is_spiking(model):
        return None
    try:
        from spikingbrain.spiking import SpikeMonitor
    except ImportError:
        return None
    try:
        monitor = SpikeMonitor(model).__enter__()
    except Exception:
        log.exception("could not attach a SpikeMonitor; sparsity reporting is off")
        return None
    return SpikeProbe(monitor)
