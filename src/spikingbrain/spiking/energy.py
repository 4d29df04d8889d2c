"""Idealised energy of one forward pass of the block projections (45 nm figures, as the SPEC).

- dense FP16: every multiply-accumulate (``tokens * in * out`` per projection) costs 1.5 pJ;
- dense INT8: the same MACs at 0.23 pJ;
- spiking: every non-zero spike adds one weight column (``out`` INT8 additions at 0.03 pJ).
  Per MAC that is ``spikes per channel * 0.03 pJ`` (the report: 1.13 * 0.03 = 0.034 pJ).

Ignored, as in the report: the per-token threshold multiply, the per-group scale multiplies,
control logic, memory traffic, attention score/value products and everything outside the
projections.
"""
from __future__ import annotations

FP16_MAC_PJ = 1.5
INT8_MAC_PJ = 0.23
INT8_ADD_PJ = 0.03


def energy_estimate(macs: int, spike_adds: int) -> dict:
    """``macs``: dense multiply-accumulates; ``spike_adds``: additions of the spiking version
    (non-zero spikes * output width). Energies in pJ, savings in percent."""
    fp16, int8, spk = macs * FP16_MAC_PJ, macs * INT8_MAC_PJ, spike_adds * INT8_ADD_PJ
    return {
        "macs": int(macs),
        "spike_adds": int(spike_adds),
        "dense_fp16_pj": fp16,
        "dense_int8_pj": int8,
        "spiking_pj": spk,
        "spiking_pj_per_mac": spk / macs if macs else 0.0,
        "saving_vs_fp16_pct": 100.0 * (1 - spk / fp16) if macs else 0.0,
        "saving_vs_int8_pct": 100.0 * (1 - spk / int8) if macs else 0.0,
    }
