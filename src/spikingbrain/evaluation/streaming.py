"""Running any Hugging Face causal LM over long token streams: fixed windows, or chunked
prefill through the model's own cache (the decode state of one chunk passed to the next)."""
from __future__ import annotations

import contextlib
import inspect

import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.hf_compat import cache_kwargs, output_cache


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) and no autograd for the duration; the previous mode is restored."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train(True)


def windows(n: int, context_length: int, stride: int | None = None):
    """Sliding windows over a stream of ``n`` tokens, as ``(start, end, first_new)`` triples.

    The window feeds ``ids[start:end]`` (at most ``context_length`` tokens) and its logits predict
    ``ids[start+1 : end+1]``; targets ``first_new .. end`` (inclusive of ``end``, exclusive of
    ``end+1``) are the ones no earlier window scored. Every target ``1 .. n-1`` is covered exactly
    once. ``stride`` (default ``context_length``: disjoint windows) is how far each window moves;
    with ``stride < context_length`` every new target has at least ``context_length - stride``
    tokens of left context (the standard sliding-window evaluation).
    """
    if context_length < 1:
        raise SpikingBrainError(f"context_length must be >= 1, got {context_length}")
    stride = context_length if stride is None else stride
    if not 1 <= stride <= context_length:
        raise SpikingBrainError(f"stride must be in [1, context_length={context_length}], got {stride}")
    done = 1  # next unscored target
    start = 0
    while done < n:
        end = min(start + context_length, n - 1)
        yield start, end, done
        done = end + 1
        start += stride


def check_ids(model, ids: torch.Tensor) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer/model mismatch) before the
    embedding lookup fails deep inside torch."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if n is not None and ids.numel() and int(ids.max()) >= n:
        raise SpikingBrainError(
            f"the tokenizer produced id {int(ids.max())} but the model has only {n} embeddings: "
            "tokenizer and model do not match"
        )


def forward_logits(model, input_ids: torch.Tensor, cache=None, use_cache: bool = False):
    """``input_ids [B, T]`` -> ``(logits [B, T, V] float32, cache)``."""
    kwargs = {"use_cache": use_cache}
    if cache is not None:
        kwargs.update(cache_kwargs(cache))
    out = model(input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float(), output_cache(out)


def stream_logits(model, ids: torch.Tensor, chunk_size: int):
    """Chunked prefill of the 1-D stream ``ids [N]`` through the model's cache.

    Yields ``(start, end, logits [1, end-start, V])``: the logits of positions ``start..end-1``,
    each computed with the whole stream before it as context. Works for any model whose cache
    accepts a multi-token chunk after a filled cache (SpikingBrain's constant-size cache, HF
    ``DynamicCache``); memory per step is that of one chunk plus the cache.
    """
    if chunk_size < 1:
        raise SpikingBrainError(f"chunk size must be >= 1, got {chunk_size}")
    device = model_device(model)
    cache = None
    for start in range(0, len(ids), chunk_size):
        end = min(start + chunk_size, len(ids))
        logits, cache = forward_logits(model, ids[None, start:end].to(device), cache, use_cache=True)
        if cache is None:
            raise SpikingBrainError(
                f"{type(model).__name__} returned no decode state (cache) with use_cache=True: "
                "it cannot stream long text through a cache"
            )
        yield start, end, logits


def prefill(model, ids: torch.Tensor, chunk_size: int):
    """Feed ``ids [1, N]`` through the model chunk by chunk; returns the filled cache.

    Only the last position's logits are materialised per chunk where the model accepts
    ``logits_to_keep`` (HF Llama-family and SpikingBrain do), so a long prompt costs one chunk of
    activations, not ``N x vocab`` logits.
    """
    device = model_device(model)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    cache = None
    for start in range(0, ids.shape[1], chunk_size):
        kwargs = {"use_cache": True, **cache_kwargs(cache)}
        if keep:
            kwargs["logits_to_keep"] = 1
        out = model(ids[:, start:start + chunk_size].to(device), **kwargs)
        cache = output_cache(out)
    return cache
