"""The few cache operations the engine needs from a model, for SpikingBrain and for any HF model.

A *state* is the decode state of one or more sequences (rows):

- ``new_state()``: empty state of one row.
- ``extend(state, ids [T], all_logits=False) -> (logits, state)``: feed ``T`` more tokens of a
  single-row state (prefill, chunk by chunk); logits ``[V]`` of the last one, or ``[T, V]`` of
  every one with ``all_logits`` (prompt log-probabilities).
- ``cat([states]) -> state``: rows of all states, in order (rows may be at different lengths).
- ``select(state, rows) -> state``: keep those rows, in that order.
- ``step(state, tokens [B]) -> (logits [B, V], state)``: one decode step for every row.
- ``nbytes(state)``: bytes of decode state held.

SpikingBrain's cache keeps per-row positions and key-valid masks, so a batched step is one
forward of ``[B, 1]`` ids. Other HF models (tests use a tiny Llama) keep one state per row and
step row by row: simple and exactly equal to running each request alone.
"""
from __future__ import annotations

import torch
from spikingbrain.hf_compat import cache_kwargs, output_cache


class _Adapter:
    """What every adapter shares: the model and its device."""

    def __init__(self, model) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class SpikingBrainAdapter(_Adapter):
    """Batched decode over ``SpikingBrainCache`` (``cat`` / ``select`` move rows)."""

    batched = True

    def new_state(self):
        return self.model.new_cache()

    @torch.inference_mode()
    def extend(self, state, ids: torch.Tensor, all_logits: bool = False):
        out = self.model(input_ids=ids.view(1, -1).to(self.device), use_cache=True,
                         logits_to_keep=0 if all_logits else 1, **cache_kwargs(state))
        return (out.logits[0] if all_logits else out.logits[0, -1]).float(), output_cache(out)

    def cat(self, states: list):
        from spikingbrain.cache import SpikingBrainCache

        return states[0] if len(states) == 1 else SpikingBrainCache.cat(states)

    def select(self, state, rows: list[int]):
        return state.select(rows)

    @torch.inference_mode()
    def step(self, state, tokens: torch.Tensor):
        out = self.model(input_ids=tokens.view(-1, 1).to(self.device), use_cache=True, **cache_kwargs(state))
        return out.logits[:, -1].float(), output_cache(out)

    def nbytes(self, state) -> int:
        return int(state.nbytes()) if state is not None else 0


class PerRowAdapter(_Adapter):
    """Any HF causal LM with its own cache (``DynamicCache``): a state is a list of per-row caches
    and a step runs each row alone (no padding, so batched results equal solo results)."""

    batched = False

    def new_state(self):
        from transformers import DynamicCache

        return [DynamicCache(config=self.model.config)]

    @torch.inference_mode()
    def extend(self, state, ids: torch.Tensor, all_logits: bool = False):
        (cache,) = state
        out = self.model(input_ids=ids.view(1, -1).to(self.device), use_cache=True,
                         logits_to_keep=0 if all_logits else 1, **cache_kwargs(cache))
        return (out.logits[0] if all_logits else out.logits[0, -1]).float(), [output_cache(out)]

    def cat(self, states: list):
        return [c for s in states for c in s]

    def select(self, state, rows: list[int]):
        return [state[i] for i in rows]

    @torch.inference_mode()
    def step(self, state, tokens: torch.Tensor):
        logits, caches = [], []
        for cache, tok in zip(state, tokens.view(-1).tolist()):
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device), use_cache=True,
                             **cache_kwargs(cache))
            logits.append(out.logits[0, -1].float())
            caches.append(output_cache(out))
        return torch.stack(logits), caches

    def nbytes(self, state) -> int:
        total = 0
        for cache in state or []:
            for layer in getattr(cache, "layers", []):
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total


def make_adapter(model):
    """The adapter for ``model``: batched for SpikingBrain (its decode steps on the lean step when
    ``spikingbrain.decode.enable_lean`` attached one), per-row for other HF models."""
    from spikingbrain.modeling import SpikingBrainForCausalLM

    if isinstance(model, SpikingBrainForCausalLM):
        decoder = model.__dict__.get("lean_decoder")
        if decoder is not None:
            from spikingbrain.decode.adapter import LeanAdapter

            return LeanAdapter(model, decoder)
        return SpikingBrainAdapter(model)
    return PerRowAdapter(model)
