"""Turn a model into its spiking inference form (in place), and back.

``spikify`` replaces every ``nn.Linear`` inside ``model.model.layers`` — attention q/k/v/o, the
GLA gate pair ``gk_proj``, FFN gate/up/down (``down_proj`` included, which the released code
skipped), MoE experts, shared experts and router — by a ``SpikingLinear``, and gives every mixer
that has a ``kv_quantizer`` attribute (SWA / full softmax attention) an ``Int8KVQuantizer``.
Embeddings, final norm and LM head stay in floating point. Spiking is per token (threshold from
the token's own activations), so prefill, cached decoding and ``generate()`` work unchanged.

Calibration (``calibration``: a list of token-id tensors / lists, or of strings together with
``tokenizer``): the spike thresholds are dynamic, so what is calibrated is the *weight*
quantizer. One forward pass over the calibration tokens (with plain absmax weights) streams the
actual spike-coded inputs ``X = V_th * s_int`` of every projection through a hook, which
accumulates, for each candidate clipping ratio ``alpha`` in ``CLIP_RATIOS``, the squared output
error ``||(W_q(alpha) * scale(alpha) - W) X^T||^2`` per output row. Each row then keeps the
``alpha`` with the smallest error (``alpha = 1`` is a candidate, so calibration never increases
the error on the calibration data). Without calibration the scales are plain absmax (from the
weights alone).

Saving: a spikified SpikingBrain model (``ste=False``) records its scheme in
``config.spiking`` (``SpikingScheme.to_dict()``), so ``save_pretrained`` writes the integer
weights and scales and ``from_pretrained`` rebuilds the same structure (``apply_scheme``) and
loads them: the model comes back in its quantized form, bit for bit.

The released W8ASpike checkpoint's scheme (``spiking/w8aspike.py``) is
``spikify(model, neuron="w8aspike", spike_query=True, exclude=("down_proj",))``: their rounding,
their KV quantizer, the window-attention query spike-coded after RoPE, and ``down_proj`` left in
float and unspiked as their forward does. This package's own default spikes ``down_proj`` too.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import w8aspike
from spikingbrain.spiking.linear import NEURONS, SpikingLinear
from spikingbrain.spiking.quant import Int8KVQuantizer, dequantize_weight, quantize_weight

CLIP_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)
MAX_CALIBRATION_ROWS = 512  # tokens per projection and call used for the error statistics


def _blocks(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise SpikingBrainError("spikify expects a causal LM with decoder blocks at model.model.layers")
    return layers


@dataclass
class SpikingScheme:
    """What ``spikify`` did to a model: enough to rebuild the structure its state dict fills."""

    k: float = 3.0
    weight_bits: int | None = 8
    group_size: int = 128
    clip: int | None = None
    kv_bits: int | None = 8
    exclude: tuple[str, ...] = ()
    neuron: str = "adaptive"
    spike_query: bool = False
    spike_inputs: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SpikingScheme":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpikingBrainError(f"config.spiking has unknown fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        d["exclude"] = tuple(d.get("exclude", ()))
        return cls(**d)


def _record(model: nn.Module, scheme: SpikingScheme | None) -> None:
    from spikingbrain.config import SpikingBrainConfig

    config = getattr(model, "config", None)
    if isinstance(config, SpikingBrainConfig):
        config.spiking = scheme.to_dict() if scheme is not None else None


def apply_scheme(model: nn.Module, scheme: "SpikingScheme | dict") -> nn.Module:
    """Rebuild a recorded spiking structure on a float (or meta-device) model, without
    calibration and without keeping the float layers: the loader then fills its integer weights
    and scales from the checkpoint."""
    if isinstance(scheme, dict):
        scheme = SpikingScheme.from_dict(scheme)
    spikify(model, k=scheme.k, weight_bits=scheme.weight_bits, group_size=scheme.group_size, clip=scheme.clip,
            kv_bits=scheme.kv_bits, exclude=scheme.exclude, keep_original=False, neuron=scheme.neuron,
            spike_query=scheme.spike_query)
    if not scheme.spike_inputs:
        set_spiking(model, spike_inputs=False)
    return model


def spiking_layers(model: nn.Module) -> dict[str, SpikingLinear]:
    """``{qualified name: SpikingLinear}`` in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SpikingLinear)}


def spikify(
    model: nn.Module,
    k: float = 3.0,
    weight_bits: int | None = 8,
    group_size: int = 128,
    calibration=None,
    ste: bool = False,
    clip: int | None = None,
    kv_bits: int | None = 8,
    exclude: Iterable[str] = (),
    tokenizer=None,
    keep_original: bool = True,
    neuron: str = "adaptive",
    spike_query: bool = False,
) -> nn.Module:
    """Spike-code ``model`` in place and return it.

    ``exclude``: projection names to leave as ``nn.Linear`` (matched against the last name
    component, e.g. ``("down_proj",)`` reproduces the released code). ``kv_bits=None`` leaves
    keys/values in float.

    ``ste=True`` is the training form (spike-aware fine-tuning, the training recipes' ``spiking``
    section): each ``SpikingLinear`` keeps the original float ``weight``/``bias`` parameters
    (shared, same state-dict names), fake-quantizes the weight and spike-codes the input at every
    call with straight-through gradients. Its forward equals, value for value, that of
    ``spikify(..., ste=False)`` on the same float weights without ``calibration`` (which is
    skipped here: it changes the integer weights, not the float ones); ``unspikify`` hands back
    plain ``nn.Linear`` layers holding the trained weights.

    ``neuron="w8aspike"`` and ``spike_query=True`` select the released W8ASpike arithmetic (see
    the module doc); with that neuron the KV quantizer is theirs too (``kv_bits`` must be 8).
    """
    if not k > 0:
        raise SpikingBrainError(f"k must be > 0, got {k}")
    if neuron not in NEURONS:
        raise SpikingBrainError(f"neuron must be one of {NEURONS}, got {neuron!r}")
    if neuron == "w8aspike" and kv_bits not in (None, 8):
        raise SpikingBrainError("the w8aspike neuron comes with their 8-bit KV quantizer: kv_bits must be 8 or None")
    if spiking_layers(model):
        raise SpikingBrainError("model is already spikified; use set_spiking() to change k, or unspikify() first")
    excluded = set(exclude)
    layers = _blocks(model)
    targets = [
        (parent, child_name, child)
        for parent in layers.modules()
        for child_name, child in parent.named_children()
        if type(child) is nn.Linear and child_name not in excluded
    ]
    for parent, name, lin in targets:
        setattr(parent, name, SpikingLinear(lin, k, weight_bits, group_size, clip, ste, keep_original, neuron))
    for m in layers.modules():
        if kv_bits is not None and hasattr(m, "kv_quantizer"):
            m.kv_quantizer = w8aspike.KVQuantizer() if neuron == "w8aspike" else Int8KVQuantizer(kv_bits)
        if spike_query and hasattr(m, "q_quantizer"):
            m.q_quantizer = w8aspike.QuerySpiker(k, neuron)
    if calibration is not None and weight_bits is not None and not ste:
        calibrate(model, calibration, tokenizer)
    if not ste:
        _record(model, SpikingScheme(float(k), weight_bits, int(group_size), clip, kv_bits,
                                     tuple(sorted(excluded)), neuron, bool(spike_query)))
    return model


def unspikify(model: nn.Module) -> nn.Module:
    """Undo ``spikify`` in place: restore ``nn.Linear`` modules (the originals when kept, with
    trained weights copied back after STE fine-tuning) and remove the KV quantizers."""
    for m in list(_blocks(model).modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, SpikingLinear):
                setattr(m, name, child.to_linear())
        if hasattr(m, "kv_quantizer") and isinstance(m.kv_quantizer, (Int8KVQuantizer, w8aspike.KVQuantizer)):
            m.kv_quantizer = None
        if isinstance(getattr(m, "q_quantizer", None), w8aspike.QuerySpiker):
            m.q_quantizer = None
    _record(model, None)
    return model


def set_spiking(model: nn.Module, k: float | None = None, clip=..., spike_inputs: bool | None = None) -> nn.Module:
    """Change ``k`` / ``clip`` / ``spike_inputs`` of every ``SpikingLinear`` (weights are untouched)."""
    mods = spiking_layers(model)
    if not mods:
        raise SpikingBrainError("model is not spikified")
    if k is not None and not k > 0:
        raise SpikingBrainError(f"k must be > 0, got {k}")
    for m in mods.values():
        if k is not None:
            m.k = float(k)
        if clip is not ...:
            m.clip = clip
        if spike_inputs is not None:
            m.spike_inputs = bool(spike_inputs)
    if k is not None:
        for m in _blocks(model).modules():
            if isinstance(getattr(m, "q_quantizer", None), w8aspike.QuerySpiker):
                m.q_quantizer.k = float(k)
    spiking = getattr(getattr(model, "config", None), "spiking", None)
    if isinstance(spiking, dict):  # keep the saved record in step with the layers
        first = next(iter(mods.values()))
        spiking.update(k=first.k, clip=first.clip, spike_inputs=first.spike_inputs)
    return model


def _calibration_batches(calibration, tokenizer, device):
    items = [calibration] if isinstance(calibration, (str, torch.Tensor)) else list(calibration)
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise SpikingBrainError("calibration texts need a tokenizer (spikify(..., tokenizer=tok))")
            ids = torch.tensor(tokenizer(item)["input_ids"])
        else:
            ids = torch.as_tensor(item)
        if ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
            raise SpikingBrainError("calibration items must be texts or non-empty token-id tensors")
        yield (ids if ids.dim() == 2 else ids.view(1, -1)).to(device)


@torch.no_grad()
def calibrate(model: nn.Module, calibration, tokenizer=None) -> dict[str, torch.Tensor]:
    """Pick per-row weight clipping ratios on calibration tokens (see module doc) and requantize.
    Returns ``{layer name: chosen alpha per row [out]}``."""
    mods = {n: m for n, m in spiking_layers(model).items() if not m.ste and m.weight_bits is not None}
    if not mods:
        raise SpikingBrainError("nothing to calibrate: no integer-weight SpikingLinear in the model")
    ratios = torch.tensor(CLIP_RATIOS)
    errors, weights, hooks = {}, {}, []
    for name, m in mods.items():
        # the reference is the original float weight when kept, else the absmax-dequantized one
        w = m._original[0].weight if m._original is not None else m.float_weight()
        weights[name] = w.detach().float().to(m.qweight.device)
        errors[name] = torch.zeros(len(CLIP_RATIOS), m.out_features, dtype=torch.float64)

        def hook(mod, args, name=name):
            x = args[0].reshape(-1, mod.in_features)
            if x.shape[0] > MAX_CALIBRATION_ROWS:
                x = x[torch.linspace(0, x.shape[0] - 1, MAX_CALIBRATION_ROWS).long()]
            if mod.spike_inputs:
                s, v_th = mod.spikes(x)
                x = s * v_th
            x, w = x.float(), weights[name]
            for a, ratio in enumerate(CLIP_RATIOS):  # error matrices built on the fly: O(out*in) memory
                q, sc = quantize_weight(w, mod.weight_bits, mod.group_size, ratio)
                dw = dequantize_weight(q, sc, mod.group_size) - w
                errors[name][a] += (x @ dw.t()).square().sum(0).double().cpu()

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        for ids in _calibration_batches(calibration, tokenizer, next(model.parameters()).device):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    chosen = {}
    for name, m in mods.items():
        alpha = ratios[errors[name].argmin(0)]
        m.requantize(weights[name], alpha.to(m.qweight.device))
        chosen[name] = alpha
    return chosen
