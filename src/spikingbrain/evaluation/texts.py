"""Held-out text in, one token stream out: the input shared by perplexity and agreement.

Documents are joined into a single stream ``[EOS] doc_1 [EOS] doc_2 ... [EOS] doc_n``: the EOS
before each document stands for "a document ended here" (so the first token of every document,
including the first, is predicted under the same condition and can be scored) and is context
only: it is never a scored target. Documents see the documents before them as left context,
as in the packed, unmasked text the models were pre-trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from spikingbrain.errors import SpikingBrainError


def shipped_texts(split: str = "valid") -> list[str]:
    """The package's public-domain passages (``data/{split}.jsonl``), in file order."""
    if split not in ("train", "valid"):
        raise SpikingBrainError(f"shipped split must be 'train' or 'valid', got {split!r}")
    raw = resources.files("spikingbrain").joinpath(f"data/{split}.jsonl").read_text("utf-8")
    return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]


def read_texts(paths) -> list[str]:
    """Documents from files: ``.jsonl`` (one ``{"text": ...}`` object a line) or plain text
    (``.txt`` and anything else: the whole file is one document)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise SpikingBrainError(f"text file not found: {p}")
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SpikingBrainError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise SpikingBrainError(f'{p}:{n}: each line must be an object with a string "text" field')
                docs.append(obj["text"])
        else:
            docs.append(p.read_text("utf-8"))
    return docs


@dataclass
class TokenStream:
    """``ids``: LongTensor ``[N]``, the joined stream. ``scored``: BoolTensor ``[N]``, True where
    the token is a document token that counts as a target (never position 0, never an EOS
    separator). ``bytes``: UTF-8 bytes of the scored text."""

    ids: torch.Tensor
    scored: torch.Tensor
    bytes: int
    documents: int = 0
    truncated: bool = field(default=False)


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(tokenizer, "bos_token_id", None)
    if eos is None:
        raise SpikingBrainError("the tokenizer has no EOS (or BOS) token to separate documents")
    return int(eos)


def build_stream(tokenizer, texts, max_tokens: int | None = None) -> TokenStream:
    """Tokenise ``texts`` (a string or a list of strings) into one stream (see module docstring).

    ``max_tokens`` caps the number of scored tokens: the stream stops inside the document where
    the cap is reached, and that document's bytes are those of its decoded scored tokens.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t]
    if not texts:
        raise SpikingBrainError("no text to evaluate (empty input)")
    if max_tokens is not None and max_tokens < 1:
        raise SpikingBrainError(f"max_tokens must be >= 1, got {max_tokens}")
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    scored: list[bool] = []
    nbytes = 0
    ntargets = 0
    ndocs = 0
    truncated = False
    for text in texts:
        doc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not doc:
            continue
        budget = None if max_tokens is None else max_tokens - ntargets
        if budget is not None and budget <= 0:
            truncated = True
            break
        if budget is not None and len(doc) > budget:
            doc = doc[:budget]
            nbytes += len(tokenizer.decode(doc).encode("utf-8"))
            truncated = True
        else:
            nbytes += len(text.encode("utf-8"))
        ids.append(eos)
        scored.append(False)
        ids.extend(doc)
        scored.extend([True] * len(doc))
        ntargets += len(doc)
        ndocs += 1
        if truncated:
            break
    if not any(scored):
        raise SpikingBrainError("the text produced no tokens")
    return TokenStream(torch.tensor(ids, dtype=torch.long), torch.tensor(scored), nbytes, ndocs, truncated)
