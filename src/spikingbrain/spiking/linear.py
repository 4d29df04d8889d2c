"""``SpikingLinear``: a linear projection with spike-coded inputs and integer weights.

``y = V_th * ((W_q * scale) s_int) + b`` where ``(s_int, V_th) = adaptive_spikes(x, k)`` per
token and ``W_q`` holds symmetric per-row-per-group integer weights (``quant``). Because
``s_int`` are integers and the per-group scales factor out, this is what an event-driven core
computes (``event.event_matmul``); here it runs as one dense matmul in fp32 (at least), so counts
and weight codes are represented exactly.

Two modes:

- inference (``ste=False``): buffers ``qweight [out, in]`` int8 and ``scales [out, G]``; the
  float weight is not kept in the state dict (the original ``nn.Linear`` is remembered outside
  it so that ``unspikify`` can restore it).
- training (``ste=True``): the original layer's float ``weight``/``bias`` parameters (shared, not
  copied), fake-quantized at every call with a straight-through estimator, and straight-through
  spikes: spike-aware fine-tuning (QAT). The forward values are exactly those of the inference
  mode built from the same float weights (same integer codes, scales and spike counts); the
  backward pass treats rounding as the identity, so the float master weights keep training. The
  state dict keeps the original names (``weight``, ``bias``) and holds plain float tensors, so a
  checkpoint of a spike-aware model is a checkpoint of the plain model.

``forward(x, weight_delta=D)`` (training mode) multiplies with ``fake_quant(W + D)``: how a LoRA
adapter ``D = s * B A`` trains spike-aware, as the weight it will be merged into.

``spike_inputs=False`` feeds ``x`` unchanged (W8A16: isolates the weight-quantization error);
``weight_bits=None`` keeps float weights (isolates the spiking error). ``neuron="w8aspike"`` codes
inputs the way the released W8ASpike code does (``spiking/w8aspike.py``: ``torch.round``, threshold
in fp32); its integer codes may then be int16 (their weights are not clamped to 127).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import w8aspike
from spikingbrain.spiking.neuron import adaptive_spikes
from spikingbrain.spiking.quant import dequantize_weight, fake_quantize_weight, quantize_weight


NEURONS = ("adaptive", "w8aspike")


class SpikingLinear(nn.Module):
    def __init__(
        self, linear: nn.Linear, k: float = 3.0, weight_bits: int | None = 8, group_size: int = 128,
        clip: int | None = None, ste: bool = False, keep_original: bool = True, neuron: str = "adaptive",
    ) -> None:
        super().__init__()
        if neuron not in NEURONS:
            raise SpikingBrainError(f"neuron must be one of {NEURONS}, got {neuron!r}")
        if ste and neuron != "adaptive":
            raise SpikingBrainError("spike-aware training (ste=True) uses the adaptive neuron")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.k, self.clip, self.ste, self.neuron = float(k), clip, bool(ste), neuron
        self.weight_bits, self.group_size = weight_bits, int(group_size)
        self.spike_inputs = True
        self._original = (linear,) if keep_original else None  # a tuple: not a registered submodule
        if ste:
            self.weight = linear.weight  # the same Parameter: trained in place, nothing duplicated
        elif weight_bits is None:
            self.register_buffer("weight", linear.weight.detach().clone())
        else:
            self.requantize(linear.weight)
        if linear.bias is None:
            self.bias = None
        elif ste:
            self.bias = linear.bias
        else:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def requantize(self, weight: torch.Tensor, alpha=1.0) -> None:
        """(Re)build ``qweight``/``scales`` from a float weight; ``alpha`` = clipping ratio(s)."""
        q, s = quantize_weight(weight, self.weight_bits, self.group_size, alpha)
        self.register_buffer("qweight", q.to(weight.device))
        self.register_buffer("scales", s.to(weight.device))

    def float_weight(self, dtype=torch.float32, weight_delta: torch.Tensor | None = None) -> torch.Tensor:
        """The weight the layer actually multiplies with (dequantized, ``[out, in]``).
        ``weight_delta`` (training mode only) is added to the float weight before quantizing."""
        if self.ste:
            w = self.weight.to(dtype)
            if weight_delta is not None:
                w = w + weight_delta.to(dtype)
            return w if self.weight_bits is None else fake_quantize_weight(w, self.weight_bits, self.group_size)
        if weight_delta is not None:
            raise ValueError("weight_delta needs a training-mode (ste=True) SpikingLinear")
        if self.weight_bits is None:
            return self.weight.to(dtype)
        return dequantize_weight(self.qweight, self.scales, self.group_size, dtype)

    def spikes(self, x: torch.Tensor):
        """``(s_int, V_th)`` for input ``x [..., in]`` with this layer's ``k``, ``clip`` and neuron."""
        if self.neuron == "w8aspike":
            s, v_th = w8aspike.spikes(x, self.k)
            return (s if self.clip is None else s.clamp(-self.clip, self.clip)), v_th
        return adaptive_spikes(x, self.k, self.clip)

    def forward(self, x: torch.Tensor, weight_delta: torch.Tensor | None = None) -> torch.Tensor:
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = self.float_weight(cdt, weight_delta)
        if self.spike_inputs:
            s, v_th = self.spikes(x)
            y = F.linear(s.to(cdt), w) * v_th.to(cdt)
        else:
            y = F.linear(x.to(cdt), w)
        if self.bias is not None:
            y = y + self.bias.to(cdt)
        return y.to(x.dtype)

    def to_linear(self) -> nn.Linear:
        """The original ``nn.Linear`` if kept (in STE mode it shares the trained parameters), else
        a new one holding the float master weights (STE mode) or the dequantized ones."""
        if self._original is not None:
            lin = self._original[0]
            if self.ste:
                lin.weight, lin.bias = self.weight, self.bias  # the trained parameters themselves
                return lin
            ref = self.weight if self.weight_bits is None else self.qweight
            return lin.to(device=ref.device)
        w = self.weight.detach() if self.ste else self.float_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"weight_bits={self.weight_bits}, group_size={self.group_size}, clip={self.clip}, "
            f"ste={self.ste}, spike_inputs={self.spike_inputs}, neuron={self.neuron}"
        )
