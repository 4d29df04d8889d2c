"""The k sweep: held-out perplexity unspiked vs spiked, spike statistics and energy per k.

One model, spikified once (weights quantized once; ``k`` only changes the thresholds), restored
with ``unspikify`` at the end. Rows: ``baseline`` (the float model), ``w8_only`` (INT8 weights and
KV, float activations: isolates the weight error) and one row per ``k`` (INT8 weights + KV and
spike-coded activations, statistics from ``SpikeMonitor`` over the same evaluation tokens).
``ppl_delta_pct = 100 * (ppl / baseline_ppl - 1)``.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from spikingbrain.spiking.monitor import SpikeMonitor, format_table
from spikingbrain.spiking.quality import perplexity
from spikingbrain.spiking.spikify import set_spiking, spikify, unspikify

# The technical report's figures for SpikingBrain-7B (SPEC section 4), printed beside ours.
REFERENCE = {
    "sparsity_by_k": {2.0: 0.730, 2.5: 0.709, 3.0: 0.692, 3.5: 0.677, 4.0: 0.664},
    "sparsity_k3": 0.6915,
    "spikes_per_channel": 1.13,
    "silent_channel_share": 0.184,
    "share_0_7": 0.941,
    "share_above_16": 0.01,
}
SUMMARY_KEYS = ("sparsity", "spikes_per_channel", "mean_abs_count", "silent_channel_share", "share_0_7", "share_above_16")


def run_sweep(
    model, ids: torch.Tensor, ks=(2.0, 2.5, 3.0, 3.5, 4.0), seq_len: int = 256, batch_size: int = 4,
    weight_bits: int | None = 8, group_size: int = 128, calibration=None, exclude=(), progress: bool = True,
) -> dict:
    """Run the sweep on ``ids [n]``; ``calibration``: token-id tensors for ``spikify``."""
    model.eval()
    t0 = time.time()
    base = perplexity(model, ids, seq_len, batch_size)
    spikify(model, k=ks[0], weight_bits=weight_bits, group_size=group_size, calibration=calibration, exclude=exclude)
    try:
        set_spiking(model, spike_inputs=False)
        w8 = perplexity(model, ids, seq_len, batch_size)
        set_spiking(model, spike_inputs=True)
        rows = []
        for k in tqdm(ks, desc="k sweep", disable=not progress):
            set_spiking(model, k=k)
            with SpikeMonitor(model) as mon:
                q = perplexity(model, ids, seq_len, batch_size)
            rep = mon.report()
            row = {"k": float(k), "ppl": q["ppl"], "nll": q["nll"], "ppl_delta_pct": 100 * (q["ppl"] / base["ppl"] - 1)}
            row.update({key: rep["total"][key] for key in SUMMARY_KEYS})
            row.update(
                firing_rate=rep["total"]["firing_rate"], energy=rep["total"]["energy"],
                abs_count_histogram=rep["total"]["abs_count_histogram"],
                by_projection=rep["by_projection"], table=format_table(rep),
            )
            rows.append(row)
    finally:
        unspikify(model)
    return {
        "tokens": base["tokens"], "seq_len": seq_len, "weight_bits": weight_bits, "group_size": group_size,
        "exclude": list(exclude), "calibrated": calibration is not None,
        "baseline": base, "w8_only": dict(w8, ppl_delta_pct=100 * (w8["ppl"] / base["ppl"] - 1)),
        "sweep": rows, "reference_7b": REFERENCE, "seconds": time.time() - t0,
    }


def format_sweep(result: dict) -> str:
    """Summary table: one row per k, plus the baseline and W8-only perplexities."""
    b, w8 = result["baseline"], result["w8_only"]
    head = f"{'k':>5}{'ppl':>10}{'d_ppl':>8}{'sparsity':>10}{'(7B)':>7}{'spk/ch':>8}{'silent':>8}{'[0,7]':>8}{'>16':>7}{'save16':>8}{'save8':>8}"
    lines = [
        f"baseline ppl {b['ppl']:.3f} on {b['tokens']} tokens; INT8 weights+KV only: ppl {w8['ppl']:.3f} ({w8['ppl_delta_pct']:+.2f}%)",
        head, "-" * len(head),
    ]
    ref = REFERENCE["sparsity_by_k"]
    for r in result["sweep"]:
        e = r["energy"]
        refs = f"{ref[r['k']]:.3f}" if r["k"] in ref else "-"
        lines.append(
            f"{r['k']:>5.2f}{r['ppl']:>10.3f}{r['ppl_delta_pct']:>+7.2f}%{r['sparsity']:>10.3f}{refs:>7}"
            f"{r['spikes_per_channel']:>8.2f}{100 * r['silent_channel_share']:>7.1f}%{100 * r['share_0_7']:>7.1f}%"
            f"{100 * r['share_above_16']:>6.2f}%{e['saving_vs_fp16_pct']:>7.1f}%{e['saving_vs_int8_pct']:>7.1f}%"
        )
    return "\n".join(lines)
