"""Held-out perplexity and bits per byte of any causal LM (``model(input_ids).logits``).

Definitions (natural logs, ``S`` = the scored tokens, see :mod:`spikingbrain.evaluation.texts`):

- ``nll = - sum_{t in S} log p(x_t | x_<t)`` in nats, each token scored exactly once;
- ``ppl = exp(nll / |S|)``;
- ``bits_per_byte = nll / ln 2 / B`` with ``B`` the UTF-8 bytes of the scored text (the
  tokenizer-independent measure: models with different vocabularies are comparable).

Context, three ways: disjoint windows of ``context_length`` (default; tokens at a window start
see little context), a sliding window (``stride < context_length``: each token sees at least
``context_length - stride`` tokens; use it for a Transformer beyond its trained context), or
``true_long_context=True``: the stream is fed chunk by chunk through the model's cache, so every
token sees the whole stream before it (SpikingBrain's constant-size state makes this cheap).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError
from spikingbrain.evaluation.streaming import check_ids, evaluating, forward_logits, model_device, stream_logits, windows
from spikingbrain.evaluation.texts import build_stream


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]``, ``targets [...]`` -> negative log-likelihood per target, float32 ``[...]``."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, targets.reshape(-1).to(flat.device), reduction="none").view(targets.shape)


def _check_vocab(logits: torch.Tensor, ids: torch.Tensor) -> None:
    top = int(ids.max())
    if top >= logits.shape[-1]:
        raise SpikingBrainError(
            f"the tokenizer produced id {top} but the model has only {logits.shape[-1]} logits: "
            "tokenizer and model do not match"
        )


def perplexity(
    model,
    tokenizer,
    texts,
    context_length: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    true_long_context: bool = False,
    progress: bool = False,
) -> dict:
    """Perplexity and bits per byte of ``model`` on ``texts`` (a string or a list of documents).

    ``context_length``: window length, or the chunk length with ``true_long_context``.
    ``stride``: window step (default ``context_length``). ``max_tokens``: cap on scored tokens.
    ``batch_size``: windows of equal length run together.

    Returns ``{"ppl", "bits_per_byte", "nll", "tokens", "bytes", "documents", "context_length",
    "stride", "true_long_context"}`` (``nll`` in nats, summed).
    """
    if batch_size < 1:
        raise SpikingBrainError(f"batch_size must be >= 1, got {batch_size}")
    stream = build_stream(tokenizer, texts, max_tokens)
    ids, scored = stream.ids, stream.scored
    n = len(ids)
    check_ids(model, ids)
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with evaluating(model):
        if true_long_context:
            if stride is not None:
                raise SpikingBrainError("stride has no meaning with true_long_context (every token sees all context)")
            chunks = stream_logits(model, ids[:-1], context_length)
            for start, end, logits in tqdm(chunks, total=math.ceil((n - 1) / context_length),
                                           desc="perplexity (stream)", disable=not progress):
                _check_vocab(logits, ids)
                mask = scored[start + 1:end + 1]
                nll = token_nll(logits[0], ids[start + 1:end + 1].to(device)).cpu()
                total += nll[mask].double().sum()
                count += int(mask.sum())
        else:
            spans = list(windows(n, context_length, stride))
            groups: list[list[tuple[int, int, int]]] = []
            for span in spans:  # batch consecutive windows of equal length
                if groups and len(groups[-1]) < batch_size and (
                    groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]
                ):
                    groups[-1].append(span)
                else:
                    groups.append([span])
            for group in tqdm(groups, desc="perplexity", disable=not progress):
                batch = torch.stack([ids[s:e] for s, e, _ in group]).to(device)
                logits, _ = forward_logits(model, batch)
                _check_vocab(logits, ids)
                for row, (s, e, first) in enumerate(group):
                    lo = first - 1 - s  # logits index predicting target `first`
                    targets = ids[first:e + 1]
                    mask = scored[first:e + 1]
                    nll = token_nll(logits[row, lo:], targets.to(device)).cpu()
                    total += nll[mask].double().sum()
                    count += int(mask.sum())
    nll_sum = float(total)
    return {
        "ppl": math.exp(nll_sum / count),
        "bits_per_byte": nll_sum / math.log(2) / stream.bytes,
        "nll": nll_sum,
        "tokens": count,
        "bytes": stream.bytes,
        "documents": stream.documents,
        "context_length": context_length,
        "stride": None if true_long_context else (stride or context_length),
        "true_long_context": bool(true_long_context),
    }
