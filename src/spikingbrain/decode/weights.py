"""Linear weights of the lean decode step, packed for one-token matmuls on CPU.

- ``float``: the weight as it is (fp32 or bf16), ``F.linear``.
- ``int8``: one int8 code per weight and one scale per output channel (symmetric, ``max|W_row| /
  127``), run by torch's weight-only kernel ``_weight_int8pack_mm`` (bf16 activations, fp32
  accumulation). At batch 1 decoding is a read of every weight per token: the int8 kernel
  reads 1 byte per weight where fp32 reads 4, and unlike dynamic quantization it does not
  quantize the activations (one call, no per-call activation scale, bf16-exact inputs).
- ``int4``: groups of 32 input channels with an asymmetric scale/offset each, run by
  ``_weight_int4pack_mm_for_cpu`` (the layout torch's kernel wants).

torch's own kernels are used because they are the maintained CPU kernels for this (torchao's
CPU weight-only int8 path dispatches to the same ATen op); no hand-written kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spikingbrain.errors import SpikingBrainError

WEIGHT_FORMATS = ("float", "int8", "int4")


class Unsupported(SpikingBrainError):
    """This model cannot run the lean step (the reason is the message)."""

INT4_GROUP = 32


def read_linear(module: nn.Module):
    """``(weight [out, in], bias | None, codes)`` of a plain, int8 or dynamic-int8 linear;
    ``codes`` is ``(int8 [out, in], scale [out])`` when the layer is int8 already (reused as
    they are, so the lean step computes with exactly the model's weights; ``weight`` is then
    None, not to hold a float copy of a large model), else None."""
    from spikingbrain.serve.quantize import Int8Linear

    codes = w = None
    if type(module) is nn.Linear:
        w, b = module.weight.detach(), module.bias
    elif isinstance(module, Int8Linear):
        codes, b = (module.qweight, module.scale.reshape(-1).float()), module.bias
    elif type(module).__name__ == "Linear" and type(module).__module__.startswith("torch.ao.nn.quantized"):
        qw, b = module.weight(), module.bias()
        if qw.qscheme() in (torch.per_tensor_symmetric, torch.per_tensor_affine) and qw.q_zero_point() == 0:
            codes = qw.int_repr(), torch.full((qw.shape[0],), qw.q_scale(), dtype=torch.float32)
        elif qw.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine) and \
                bool((qw.q_per_channel_zero_points() == 0).all()):
            codes = qw.int_repr(), qw.q_per_channel_scales().float()
        else:
            w = qw.dequantize()
    else:
        raise Unsupported(f"lean decode cannot read a {type(module).__name__} layer's weights")
    return w, None if b is None else b.detach().float(), codes


def _float(w, codes) -> torch.Tensor:
    return w.float() if w is not None else codes[0].float() * codes[1][:, None]


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [out, in] int8, scale [out] fp32)``: symmetric, per output channel."""
    scale = w.abs().amax(1).clamp_min(1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int4_codes(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [out, in] in 0..15, scale, zero [out, in/group])`` with ``w ~ (code - 8) * scale +
    zero`` (torch's int4 CPU kernel convention)."""
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo).clamp_min(1e-6) / 15
    zero = lo + 8 * scale
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return codes.reshape(N, K), scale, zero


def read_linears(modules: list[nn.Module]):
    """``read_linear`` of several layers sharing their input, stacked along the outputs."""
    parts = [read_linear(m) for m in modules]
    if len(parts) == 1:
        return parts[0]
    w = None if all(p[2] is not None for p in parts) else torch.cat([_float(p[0], p[2]) for p in parts])
    if len({p[1] is None for p in parts}) != 1:
        raise SpikingBrainError("lean decode: layers fused into one matmul must all have a bias or none")
    b = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    codes = None
    if all(p[2] is not None for p in parts):  # per-row scales: the codes stack as they are
        codes = torch.cat([p[2][0] for p in parts]), torch.cat([p[2][1] for p in parts])
    return w, b, codes


class PackedLinear(nn.Module):
    """``y = x W^T + b`` for the layers ``modules`` (sharing their input; one matmul, outputs
    concatenated) in one of ``WEIGHT_FORMATS``; ``x [M, in]``, ``y [M, out]`` fp32."""

    def __init__(self, modules: list[nn.Module], fmt: str, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise SpikingBrainError(f"weight format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
        w, b, codes = read_linears(modules)
        shape = w.shape if w is not None else codes[0].shape
        self.fmt, self.out_features, self.in_features = fmt, shape[0], shape[1]
        self.bias = None if b is None else nn.Buffer(b)
        if fmt == "int4" and self.in_features % INT4_GROUP:
            fmt = self.fmt = "int8"  # the kernel needs whole groups
        if fmt == "float":  # the model's own tensor when its dtype fits: no copy
            self.weight = nn.Buffer(w if w is not None and w.dtype == compute_dtype else _float(w, codes).to(compute_dtype))
        elif fmt == "int8":
            codes, scale = codes if codes is not None else int8_codes(w.float())
            self.weight = nn.Buffer(codes.contiguous())
            self.scale = nn.Buffer(scale.to(torch.bfloat16))
        else:
            codes, scale, zero = int4_codes(_float(w, codes))
            self.weight = nn.Buffer(torch._convert_weight_to_int4pack_for_cpu(codes, 1))
            self.scale_zero = nn.Buffer(torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "float":
            y = F.linear(x.to(self.weight.dtype), self.weight).float()
        elif self.fmt == "int8":
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale).float()
        else:
            y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, INT4_GROUP,
                                                  self.scale_zero).float()
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"
