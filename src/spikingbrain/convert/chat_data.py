"""The shipped chat data (``data/chat_{train,valid}.jsonl``, made by ``scripts/make_chat_data.py``):
instructions answered greedily by the default teacher, so that the conversion sees its chat
template and its own answers. Each line: ``{"id", "messages": [user, assistant], "finished"}``."""
from __future__ import annotations

import json
from importlib import resources

import torch

from spikingbrain.errors import SpikingBrainError

SPLITS = ("train", "valid")


def load_chat(split: str) -> list[dict]:
    if split not in SPLITS:
        raise SpikingBrainError(f"chat data split must be one of {SPLITS}, got {split!r}")
    path = resources.files("spikingbrain") / "data" / f"chat_{split}.jsonl"
    if not path.is_file():
        raise SpikingBrainError(f"shipped chat data {path} is missing: run scripts/make_chat_data.py")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        m = r.get("messages")
        if not (isinstance(m, list) and len(m) == 2 and m[0].get("role") == "user" and m[1].get("role") == "assistant"):
            raise SpikingBrainError(f"{path}: row {r.get('id')!r} is not a user/assistant pair")
    return rows


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """``(ids, answer_mask)`` of one example rendered through the chat template (the system turn
    the template adds included); ``answer_mask`` is 1 on the assistant's tokens (its content and
    the end-of-turn marker when the teacher finished), 0 elsewhere."""
    from spikingbrain.train.encode import IGNORE, encode_chat

    messages = example["messages"]
    ids, labels = encode_chat(tokenizer, messages)
    mask = [int(lab != IGNORE) for lab in labels]
    if not example.get("finished", True):  # the teacher never ended this turn: neither does the sequence
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end in ids:
            cut = len(ids) - 1 - ids[::-1].index(end)
            ids, mask = ids[:cut], mask[:cut]
    return ids, mask


def chat_stream(tokenizer, split: str = "train", limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` (default: all) examples' rendered ids, concatenated: a token stream to
    cut training windows from."""
    ids: list[int] = []
    rows = load_chat(split)
    if limit is not None and len(rows) < limit:
        raise SpikingBrainError(f"the recipe wants {limit} chat examples, the shipped {split} split has {len(rows)}")
    for ex in rows[:limit]:
        ids.extend(encode_example(tokenizer, ex)[0])
    return torch.tensor(ids)
