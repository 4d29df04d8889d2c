"""Held-out text and perplexity for the spiking sweep (kept here so the spiking pipeline needs
nothing but a model directory and a text file).

Perplexity: the token stream (texts tokenized separately, joined with EOS when the tokenizer has
one) is cut into non-overlapping windows of ``seq_len`` tokens; each window is scored on its own
(no carried context), ``ppl = exp(total NLL / predicted tokens)`` with ``seq_len - 1`` predicted
tokens per full window.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from spikingbrain.errors import SpikingBrainError


def load_causal_lm(model_dir, dtype: str = "float32", gguf_file: str | None = None):
    """``(model, tokenizer)`` from a saved directory (SpikingBrain registers itself with the Auto
    classes on ``import spikingbrain``; any HF causal LM works), optionally a GGUF file in it."""
    import spikingbrain  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    if not d.is_dir():
        raise SpikingBrainError(f"model directory not found: {d}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SpikingBrainError(f"unsupported dtype {dtype!r}")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(d, **kw)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype), **kw)
    except (OSError, ValueError) as e:
        raise SpikingBrainError(f"cannot load a causal LM and tokenizer from {d}: {e}") from None
    return model.eval(), tok


def load_texts(path) -> list[str]:
    """``.jsonl`` (one object per line with a ``"text"`` field) or plain text (one document)."""
    p = Path(path)
    if not p.is_file():
        raise SpikingBrainError(f"text file not found: {p}")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SpikingBrainError(f"{p}:{i}: expected a JSON object with a 'text' field ({e})") from None
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SpikingBrainError(f"no text in {p}")
    return texts


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Concatenated token ids ``[n]`` (int64), truncated to ``max_tokens``."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < 2:
        raise SpikingBrainError("need at least 2 tokens of text to measure perplexity")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 4) -> dict:
    """``ids [n]`` -> ``{"ppl", "nll", "tokens"}`` (``nll`` = mean NLL in nats per predicted token)."""
    if seq_len < 2:
        raise SpikingBrainError(f"seq_len must be >= 2, got {seq_len}")
    device = next(model.parameters()).device
    windows = [ids[i : i + seq_len] for i in range(0, ids.numel(), seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        for w in ([torch.stack(batch)] if len({x.numel() for x in batch}) == 1 else [x[None] for x in batch]):
            w = w.to(device)
            logits = model(input_ids=w, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += w[:, 1:].numel()
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}
