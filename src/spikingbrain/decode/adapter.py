"""The generation paths' view of lean decode: prefill runs the model, decode steps run the lean
step. ``enable_lean(model, ...)`` builds a ``LeanDecoder`` for the model (or says why it cannot)
and keeps it on the model, where ``serve.adapters.make_adapter`` finds it."""
from __future__ import annotations

import logging

import torch

from spikingbrain.decode.state import LeanState
from spikingbrain.decode.step import LeanDecoder, Unsupported
from spikingbrain.serve.adapters import SpikingBrainAdapter

log = logging.getLogger(__name__)
ATTR = "lean_decoder"


def default_kv(model, weights: str) -> str:
    """The window's default dtype: the model's own for float weights (an fp32 model decodes as
    exactly as before), bf16 next to quantized weights (int8 weights are the larger error)."""
    if weights != "float":
        return "bf16"
    p = next(model.parameters(), None)
    return "bf16" if p is not None and p.dtype == torch.bfloat16 else "fp32"


def _quantized(m) -> bool:
    return type(m).__module__.startswith("torch.ao.nn.quantized") and type(m).__name__ == "Linear"


def extra_bytes(model, weights: str) -> int:
    """Memory the lean step's packed weights add to the model's: none for float weights in the
    model's dtype (shared), a copy of the codes for int8/int4 (dynamic int8 layers keep theirs
    packed for fbgemm, which the int8 kernel cannot read)."""
    per = {"float": 0.0, "int8": 1.0, "int4": 0.5}[weights]
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            n += m.weight.numel()
        elif _quantized(m):
            n += m.in_features * m.out_features
    return int(n * per)


def enable_lean(model, weights: str | None = None, kv: str | None = None, compile: bool = False,
                max_extra_bytes: int | None = None) -> str | None:
    """Attach a lean decode step to ``model``; returns None, or the reason it was not attached
    (the model's own step is used then). ``weights`` None: ``int8`` if the model's linears are
    int8 already, else ``float``. ``max_extra_bytes``: refuse when the packed weights would add
    more memory than this (a 7B in int8 would need 7 GB more)."""
    if weights is None:
        quantized = any(_quantized(m) or type(m).__name__ == "Int8Linear" for m in model.modules())
        weights = "int8" if quantized else "float"
    extra = extra_bytes(model, weights)
    if max_extra_bytes is not None and extra > max_extra_bytes:
        return (f"its {weights} weights would add {extra / 2**30:.1f} GiB to the model's memory; "
                "pass --lean to use it anyway")
    try:
        dec = LeanDecoder(model, weights=weights, kv=kv or default_kv(model, weights))
    except Unsupported as e:
        return str(e)
    if compile:
        dec.compile()
    model.__dict__[ATTR] = dec  # not a submodule: no state-dict entries, not moved by .to()
    return None


def lean_decoder(model) -> LeanDecoder | None:
    return model.__dict__.get(ATTR)


class LeanAdapter(SpikingBrainAdapter):
    """``SpikingBrainAdapter`` whose decode steps run a ``LeanDecoder``. A state is a
    ``SpikingBrainCache`` until its first step (prefill), a ``LeanState`` after; feeding a
    ``LeanState`` more prompt converts it back."""

    def __init__(self, model, decoder: LeanDecoder) -> None:
        super().__init__(model)
        self.decoder = decoder

    def _lean(self, state) -> LeanState:
        return state if isinstance(state, LeanState) else LeanState.from_cache(state, self.decoder)

    def extend(self, state, ids: torch.Tensor):
        if isinstance(state, LeanState):
            state = state.to_cache(self.model, self.decoder)
        return super().extend(state, ids)

    def cat(self, states: list):
        return LeanState.cat([self._lean(s) for s in states])

    def select(self, state, rows: list[int]):
        return state.select(rows)

    def step(self, state, tokens: torch.Tensor):
        state = self._lean(state)
        return self.decoder.step(state, tokens), state

    def nbytes(self, state) -> int:
        return int(state.nbytes()) if state is not None else 0
