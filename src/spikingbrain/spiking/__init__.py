"""Spiking inference: adaptive-threshold neurons, spike coding, INT8 weights/KV, event-driven
matmul, ``spikify`` and the spike/energy monitor (SPEC section 4)."""
from spikingbrain.spiking.coding import SCHEMES, decode, encode, spike_events, time_steps
from spikingbrain.spiking.energy import energy_estimate
from spikingbrain.spiking.event import EventResult, dense_matmul, event_matmul
from spikingbrain.spiking.linear import SpikingLinear
from spikingbrain.spiking.monitor import SpikeMonitor
from spikingbrain.spiking.neuron import adaptive_spikes, integrate_and_fire, round_half_up, threshold
from spikingbrain.spiking.quant import (
    Int8KVQuantizer,
    dequantize_weight,
    fake_quantize_per_vector,
    quantize_per_vector,
    quantize_weight,
)
from spikingbrain.spiking.spikify import (
    SpikingScheme,
    apply_scheme,
    calibrate,
    set_spiking,
    spikify,
    spiking_layers,
    unspikify,
)

__all__ = [
    "SCHEMES", "EventResult", "Int8KVQuantizer", "SpikeMonitor", "SpikingLinear", "SpikingScheme",
    "adaptive_spikes", "apply_scheme", "calibrate", "decode", "dense_matmul", "dequantize_weight", "encode", "energy_estimate",
    "event_matmul", "fake_quantize_per_vector", "integrate_and_fire", "quantize_per_vector",
    "quantize_weight", "round_half_up", "set_spiking", "spike_events", "spikify", "spiking_layers",
    "threshold", "time_steps", "unspikify",
]
