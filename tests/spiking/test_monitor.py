"""Monitor metrics on a hand-made input whose spike counts are known exactly."""
import json

import pytest
import torch
from torch import nn

from spikingbrain.spiking import SpikeMonitor, SpikingLinear
from spikingbrain.spiking.energy import energy_estimate

# mean|x| = 32 / 8 = 4, so with k = 4 the threshold is 1 and s_int = x; the second token is
# silent (V_th clamps to 1e-5, all counts 0).
X = torch.tensor([[0.0, 0.0, 1.0, -2.0, 3.0, 7.0, 17.0, -2.0], [0.0] * 8])


def _monitored():
    model = nn.Sequential(SpikingLinear(nn.Linear(8, 4), k=4.0))
    with SpikeMonitor(model) as mon, torch.no_grad():
        model(X)
    model(X)  # outside the context: not counted
    return mon.report()


def test_hand_made_metrics():
    rep = _monitored()
    json.dumps(rep)
    m = rep["layers"]["0"]
    assert m["values"] == 16 and m["channels"] == 8
    hist = m["abs_count_histogram"]
    assert hist[0] == 10 and hist[1] == 1 and hist[2] == 2 and hist[3] == 1 and hist[7] == 1 and hist[17] == 1
    assert sum(hist) == 16
    assert m["share_0_7"] == pytest.approx(15 / 16)
    assert m["share_above_16"] == pytest.approx(1 / 16)
    assert m["mean_abs_count"] == pytest.approx(32 / 16)
    # bitwise-bidirectional spikes = popcounts: 1,2,2,3,7,17 -> 1+1+1+2+3+2 = 10
    assert m["spikes_per_channel"] == pytest.approx(10 / 16)
    assert m["silent_channel_share"] == pytest.approx(2 / 8)
    # 3-step sparsity: popcount(min(|s|, 7)) = 1+1+1+2+3+3 = 11 of 16 * 3 slots
    assert m["sparsity"] == pytest.approx(1 - 11 / 48)
    rates = m["firing_rate"]
    assert rates["binary"] is None and rates["bitwise"] is None  # negative counts seen
    assert rates["ternary"] == pytest.approx(32 / (17 * 8))  # token 1: T = 17; token 2: T = 0
    assert rates["bitwise-bidirectional"] == pytest.approx(10 / (5 * 8))  # 17 needs 5 bits
    # two's complement, 6 bits (-2..17): 1 -> 1, -2 (111110) -> 5 twice, 3 -> 2, 7 -> 3, 17 -> 2
    assert rates["twos-complement"] == pytest.approx(18 / (6 * 8))
    e = m["energy"]
    assert e["macs"] == 2 * 8 * 4 and e["spike_adds"] == 10 * 4
    assert e["dense_fp16_pj"] == pytest.approx(64 * 1.5)
    assert e["dense_int8_pj"] == pytest.approx(64 * 0.23)
    assert e["spiking_pj"] == pytest.approx(40 * 0.03)
    assert e["saving_vs_fp16_pct"] == pytest.approx(100 * (1 - 1.2 / 96))
    assert m["energy_by_scheme"]["ternary"]["spike_adds"] == 32 * 4
    assert rep["total"]["sparsity"] == pytest.approx(m["sparsity"])


def test_energy_model_matches_the_report_figures():
    # the SPEC: 1.13 spikes per channel -> 0.034 pJ per MAC, 97.7% below FP16, 85.2% below INT8
    e = energy_estimate(macs=100_000, spike_adds=113_000)
    assert e["spiking_pj_per_mac"] == pytest.approx(0.0339)
    assert round(e["saving_vs_fp16_pct"], 1) == 97.7
    assert round(e["saving_vs_int8_pct"], 1) == 85.3  # 1 - 0.0339 / 0.23; the report rounds to 85.2


def test_pooling_across_projections():
    a, b = SpikingLinear(nn.Linear(8, 4), k=4.0), SpikingLinear(nn.Linear(8, 2), k=4.0)
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"p": a}), nn.ModuleDict({"p": b})])})
    with SpikeMonitor(model) as mon, torch.no_grad():
        a(X[:1])
        b(X)
    rep = mon.report()
    assert set(rep["by_projection"]) == {"p"}
    pooled = rep["by_projection"]["p"]
    assert pooled["values"] == 8 + 16 and pooled["channels"] == 16
    assert pooled["silent_channel_share"] == pytest.approx(4 / 16)
    assert pooled["mean_abs_count"] == pytest.approx(64 / 24)
    assert pooled["energy"]["macs"] == 8 * 4 + 16 * 2


def test_histogram_shortcut_equals_coding_spike_events():
    from spikingbrain.spiking.coding import row_time_steps, spike_events
    from spikingbrain.spiking.monitor import _Stats

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(30, 40, generator=g) ** 3 * 4).round()
    s[3] = 0
    st = _Stats(40, 1)
    st.add(s)
    for scheme in ("ternary", "bitwise-bidirectional", "twos-complement"):
        T = row_time_steps(s, scheme)
        assert st.events[scheme] == int(spike_events(s, scheme, T.unsqueeze(-1)).sum()), scheme
        assert st.slots[scheme] == int(T.sum()) * 40
    assert st.sparse_spikes == int(spike_events(s.abs().clamp(max=7), "bitwise").sum())
