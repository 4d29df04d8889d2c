"""How closely a model (e.g. a converted SpikingBrain) follows its teacher, token by token.

Both models read the same token stream (:mod:`spikingbrain.evaluation.texts`) in the same
disjoint windows of ``context_length``; at every position whose next token is a scored document
token we compare the two next-token distributions ``p`` (teacher) and ``q`` (model):

- ``top1``: share of positions where ``argmax p == argmax q``;
- ``kl``: mean over positions of ``KL(p || q) = sum_v p_v (log p_v - log q_v)``, nats per token;
- ``model_ppl`` / ``teacher_ppl``: each model's perplexity on the same targets.

Vocabularies must match on the tokenizer's ids; extra padded logits (a model whose embedding was
padded beyond ``len(tokenizer)``) are dropped before the softmax so both distributions cover the
same tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError
from spikingbrain.evaluation.streaming import check_ids, evaluating, forward_logits, model_device, windows
from spikingbrain.evaluation.texts import build_stream


def _shared_vocab(model_logits: torch.Tensor, teacher_logits: torch.Tensor, tokenizer) -> int:
    vm, vt = model_logits.shape[-1], teacher_logits.shape[-1]
    if vm == vt:
        return vm
    n = len(tokenizer)
    if vm >= n and vt >= n:
        return n
    raise SpikingBrainError(
        f"model ({vm} logits) and teacher ({vt} logits) do not share the tokenizer's {n} tokens"
    )


def teacher_agreement(
    model,
    teacher,
    tokenizer,
    texts,
    context_length: int = 2048,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """Top-1 agreement and mean KL(teacher || model) on ``texts`` (see module docstring).

    Returns ``{"top1", "kl", "tokens", "model_ppl", "teacher_ppl", "context_length"}``.
    """
    stream = build_stream(tokenizer, texts, max_tokens)
    ids, scored = stream.ids, stream.scored
    agree = 0
    kl_sum = torch.zeros((), dtype=torch.float64)
    nll_m = torch.zeros((), dtype=torch.float64)
    nll_t = torch.zeros((), dtype=torch.float64)
    count = 0
    check_ids(model, ids)
    check_ids(teacher, ids)
    spans = list(windows(len(ids), context_length))
    with evaluating(model), evaluating(teacher):
        for s, e, _ in tqdm(spans, desc="agreement", disable=not progress):
            window = ids[None, s:e]
            lm, _ = forward_logits(model, window.to(model_device(model)))
            lt, _ = forward_logits(teacher, window.to(model_device(teacher)))
            v = _shared_vocab(lm, lt, tokenizer)
            mask = scored[s + 1:e + 1]
            logq = F.log_softmax(lm[0, :, :v].cpu(), dim=-1)[mask]
            logp = F.log_softmax(lt[0, :, :v].cpu(), dim=-1)[mask]
            targets = ids[s + 1:e + 1][mask]
            agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
            kl_sum += F.kl_div(logq, logp, log_target=True, reduction="sum").double()
            rows = torch.arange(len(targets))
            nll_m -= logq[rows, targets].double().sum()
            nll_t -= logp[rows, targets].double().sum()
            count += len(targets)
    return {
        "top1": agree / count,
        "kl": float(kl_sum) / count,
        "tokens": count,
        "model_ppl": math.exp(float(nll_m) / count),
        "teacher_ppl": math.exp(float(nll_t) / count),
        "context_length": context_length,
    }
