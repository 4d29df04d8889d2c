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


def int8_linear(linear: nn.Linear, chunk_rows: int = 2048, consume: bool = False) -> tuple[nn.Module, str]:
    """An int8 version of one linear: ``(module, "dynamic")``, exactly what torch's
    ``quantize_dynamic`` builds from the fp32 weight (its default weight observer: one symmetric
    scale per tensor), or ``(Int8Linear, "weight-only")`` where dynamic quantization is missing.

    The weight may be bf16/fp16 (the streaming loader keeps it in its stored precision): it is
    observed and quantized ``chunk_rows`` rows at a time, so no fp32 copy of the whole matrix is
    made (a 7B's LM head would need 2.2 GB for it). The linear itself is left untouched (its weight
    may be tied to the embeddings) unless ``consume``: then its weight is dropped as soon as the
    integer codes exist, before torch packs them (one copy fewer at the peak)."""
    w, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach().float()
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.nn.quantized.modules.utils import _clamp_weights
        from torch.ao.quantization import default_dynamic_qconfig

        observer = default_dynamic_qconfig.weight()
        if observer.qscheme not in (torch.per_tensor_symmetric, torch.per_tensor_affine):
            raise NotImplementedError(observer.qscheme)
        rows = range(0, w.shape[0], chunk_rows)
        for r in rows:
            observer(w[r:r + chunk_rows].float())
        scale, zero_point = observer.calculate_qparams()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is deprecated (still the engine's path)
            qweight = torch._empty_affine_quantized(tuple(w.shape), scale=float(scale),
                                                    zero_point=int(zero_point), dtype=torch.qint8)
            for r in rows:
                qweight[r:r + chunk_rows].copy_(torch.quantize_per_tensor(
                    w[r:r + chunk_rows].float(), float(scale), int(zero_point), torch.qint8))
            if consume:
                del w
                linear.weight = None
            qweight = _clamp_weights(qweight, observer, scale, zero_point)
            # built at 1 x 1 and given its weight: the full-size constructor packs a dummy weight
            out = DynamicLinear(1, 1, dtype=torch.qint8)
            out.set_weight_bias(qweight, bias)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        return out, "dynamic"
    except Exception:  # removed or unsupported on this build/CPU: our own weight-only path
        fp32 = nn.Linear(linear.in_features, linear.out_features, bias=bias is not None, device="meta")
        fp32.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        if bias is not None:
            fp32.bias = nn.Parameter(bias, requires_grad=False)
        return Int8Linear(fp32), "weight-only"


def quantize_int8(model: nn.Module, head: bool = True) -> tuple[nn.Module, str]:
    """Replace the linears by int8 ones, in place (the LM head too unless ``head=False``).
    Returns ``(model, method)`` with method ``"dynamic"`` (torch dynamic quantization) or
    ``"weight-only"`` (``Int8Linear``)."""
    model = model.float().eval()  # dynamic quantization needs fp32 activations
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and (head or m is not out_emb)]
    if not names:
        raise SpikingBrainError("the model has no nn.Linear layers to quantize")
    method = "dynamic"
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q, m = int8_linear(getattr(parent, child))
        setattr(parent, child, q)
        if m != "dynamic":
            method = m
    return model, method


class Fp32Embedding(nn.Module):
    """An embedding table kept in its stored dtype (bf16 for the released checkpoints) whose
    lookups come out in fp32: the int8 path's activations are fp32, and a lookup reads one row,
    so the table need not be widened (that would cost 2 GB for a 7B's vocabulary)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx).float()


def streaming_int8_hooks(head: bool = True):
    """``(dtype_for, on_module)`` for ``loader.load_pretrained``: every linear is quantized as
    soon as its weights are in (so one float linear exists at a time), the embedding table keeps
    its stored precision. Same result as loading in fp32 and calling ``quantize_int8``, except
    for that table's dtype (lookups are exact either way)."""

    def dtype_for(name: str, module: nn.Module, stored: torch.dtype):
        # the table and the linears' weights stay in their stored half precision until quantized
        half = stored in (torch.bfloat16, torch.float16)
        if half and name.endswith(".weight") and (name == "model.embed_tokens.weight" or type(module) is nn.Linear):
            return stored
        return None

    def on_module(name: str, module: nn.Module):
        if type(module) is nn.Linear and (head or name != "lm_head"):
            return int8_linear(module, consume=True)[0]
        if name == "model.embed_tokens" and module.weight.dtype != torch.float32:
            return Fp32Embedding(module)
        return None

    return dtype_for, on_module


def cast_dtype(model: nn.Module, dtype: str) -> nn.Module:
    if dtype not in DTYPES:
        raise SpikingBrainError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bf16":
        warn_if_slow_bf16()
    return model.to(DTYPES[dtype])


def warn_if_slow_bf16() -> None:
    if not _cpu_bf16_ok():
        warnings.warn("this CPU has no native bf16 matmul (AVX512-BF16/AMX); bf16 saves memory but may be slower than fp32")


def _cpu_bf16_ok() -> bool:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False
    return "AVX512" in cap.upper() or "AMX" in cap.upper() or "SVE" in cap.upper()
