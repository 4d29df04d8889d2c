"""CPU fast path: bf16 weights and int8 weight-only linears.

``int8`` uses PyTorch's dynamic quantization when this build has it (int8 weights per output
channel, activations quantized on the fly per batch, fbgemm/onednn int8 GEMMs). Where it is
missing (it is deprecated in recent PyTorch), ``Int8Linear`` stores int8 weights with one fp32
scale per output row and dequantizes them at each call: the memory saving without the GEMM
speed-up. The embeddings stay in floating point. The LM head is quantized too by default
(``head=False`` keeps it in floating point, the spiking scheme's rule): at batch 1 it is one
~[vocab x d] read per token, ~15% of a 135M model's decode step in fp32. Quantizing builds a new
module from the weight, so an embedding table tied to the head is left as it is.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Int8Linear(nn.Module):
    """``y = (x @ (q * scale).T) + b`` with ``q [out, in]`` int8 and ``scale [out, 1]`` =
    ``max|W_row| / 127`` (symmetric, per output row)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127.0
        self.register_buffer("qweight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def quantize_int8(model: nn.Module, head: bool = True) -> tuple[nn.Module, str]:
    """Replace the linears by int8 ones, in place (the LM head too unless ``head=False``).
    Returns ``(model, method)`` with method ``"dynamic"`` (torch dynamic quantization) or
    ``"weight-only"`` (``Int8Linear``)."""
    model = model.float().eval()  # dynamic quantization needs fp32 activations
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and (head or m is not out_emb)}
    if not names:
        raise SpikingBrainError("the model has no nn.Linear layers to quantize")
    try:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(model, qconfig_spec=names, dtype=torch.qint8, inplace=True)
        return model, "dynamic"
    except Exception:  # removed or unsupported on this build/CPU: our own weight-only path
        pass
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(getattr(parent, child)))
    return model, "weight-only"


def cast_dtype(model: nn.Module, dtype: str) -> nn.Module:
    if dtype not in DTYPES:
        raise SpikingBrainError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bf16" and not _cpu_bf16_ok():
        warnings.warn("this CPU has no native bf16 matmul (AVX512-BF16/AMX); bf16 saves memory but may be slower than fp32")
    return model.to(DTYPES[dtype])


def _cpu_bf16_ok() -> bool:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False
    return "AVX512" in cap.upper() or "AMX" in cap.upper() or "SVE" in cap.upper()
