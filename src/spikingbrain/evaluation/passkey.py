"""Long-context retrieval: pass key / needle-in-a-haystack prompts, generated offline.

A prompt is ``INTRO + filler (with needle(s) inside) + QUESTION``, about ``length`` tokens long.
The filler is ordinary prose (the shipped public-domain passages, or the user's texts), cut at
word boundaries. The asked needle ``"The pass key is 40213. Remember it. 40213 is the pass
key."`` (a 5-digit key) sits at relative ``depth`` of the filler: ``0`` right after the intro,
``1`` right before the question, measured in filler tokens. The multi-key variant hides
``num_keys`` needles ``"The pass key for <name> is <key>. Remember it."`` (the others at random
depths, all keys distinct) and asks for one name.

Scoring (:func:`score_answer`) is exact: the first run of digits in the greedy continuation
must equal the key, nothing more, nothing less.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError
from spikingbrain.evaluation.report import markdown_table
from spikingbrain.evaluation.streaming import check_ids, evaluating, model_device, prefill
from spikingbrain.evaluation.texts import shipped_texts
from spikingbrain.hf_compat import cache_kwargs

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.\n\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
MULTI_NEEDLE = "The pass key for {name} is {key}. Remember it."
MULTI_QUESTION = "\n\nWhat is the pass key for {name}? The pass key for {name} is"
NAMES = ["Alice", "Bernard", "Clara", "Daniel", "Edith", "Felix", "Grace", "Henry", "Irene", "Julius",
         "Katherine", "Leonard", "Margaret", "Nathan", "Olivia", "Peter", "Rosalind", "Samuel",
         "Theresa", "Victor", "Winifred", "Xavier", "Yvonne", "Zachary"]


@dataclass
class PasskeyPrompt:
    """``text``: the prompt; ``input_ids``: its tokens (with the tokenizer's special tokens);
    ``answer``: the asked key (5 digits); ``name``: who it belongs to (multi-key) or None;
    ``needle_char`` / ``needle_token``: where the asked needle starts (character offset in
    ``text``, index in ``input_ids``); ``depth``: the requested relative depth."""

    text: str
    input_ids: list[int]
    answer: str
    name: str | None
    needle_char: int
    needle_token: int
    depth: float
    keys: dict


def score_answer(generated: str, answer: str) -> bool:
    """Exact match: the first maximal run of digits in ``generated`` equals ``answer``."""
    m = re.search(r"\d+", generated)
    return m is not None and m.group() == answer


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _filler(tokenizer, texts: list[str], budget: int, rng: random.Random) -> tuple[str, list[int]]:
    """Prose of at most ``budget`` tokens, cut at a word boundary; also returns the character
    offset where each of its tokens ends (to place needles by token depth)."""
    if not texts:
        raise SpikingBrainError("no filler text given")
    order = list(range(len(texts)))
    start = rng.randrange(len(order))
    order = order[start:] + order[:start]
    pieces: list[str] = []
    chars = 0
    i = 0
    while chars < budget * 8 + 64:  # English BPE: ~4 chars/token; over-collect, then cut
        pieces.append(texts[order[i % len(order)]].strip())
        chars += len(pieces[-1]) + 2
        i += 1
        if i > 64 * len(order) + 1000:
            raise SpikingBrainError("the filler texts are too short to build the prompt")
    text = "\n\n".join(pieces)
    ends = _token_ends(tokenizer, text)
    while len(ends) < budget:  # unusually dense tokenizer: add more prose
        text = text + "\n\n" + text
        ends = _token_ends(tokenizer, text)
    cut = ends[budget - 1]
    head = text[:cut]
    if cut < len(text) and not text[cut].isspace():  # drop a trailing partial word
        ws = max(head.rfind(" "), head.rfind("\n"))
        head = head[:ws] if ws > 0 else head
    return head, [e for e in ends[:budget] if e <= len(head)]


def _token_ends(tokenizer, text: str) -> list[int]:
    """Character offset where each token of ``text`` ends."""
    if getattr(tokenizer, "is_fast", False):
        offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [e for _, e in offs]
    ids = _tokens(tokenizer, text)
    ends, pos = [], 0
    for t in ids:  # slow tokenizers: accumulate decoded lengths (approximate for odd pieces)
        pos += len(tokenizer.decode([t]))
        ends.append(min(pos, len(text)))
    return ends


def _insert_at(filler: str, ends: list[int], depth: float) -> int:
    """Character position in ``filler`` at ``depth`` of its tokens, moved back to a whitespace."""
    if depth <= 0 or not ends:
        return 0
    k = round(depth * len(ends))
    if k >= len(ends):
        return len(filler)
    pos = ends[k - 1] if k > 0 else 0
    ws = max(filler.rfind(" ", 0, pos + 1), filler.rfind("\n", 0, pos + 1))
    return ws if ws > 0 else 0


def make_passkey_prompt(tokenizer, length: int, depth: float, seed: int = 0, filler_texts=None,
                        num_keys: int = 1) -> PasskeyPrompt:
    """Build a needle-in-a-haystack prompt of about ``length`` tokens (see module docstring).

    ``filler_texts``: list of documents for the haystack (default: the shipped passages).
    Deterministic in ``seed``: the key(s), the name(s), the filler start, other needles' depths.
    """
    if not 0.0 <= float(depth) <= 1.0:
        raise SpikingBrainError(f"depth must be in [0, 1], got {depth}")
    if not 1 <= num_keys <= len(NAMES):
        raise SpikingBrainError(f"num_keys must be in [1, {len(NAMES)}], got {num_keys}")
    rng = random.Random(seed)
    keys = [str(k) for k in rng.sample(range(10000, 100000), num_keys)]
    if num_keys == 1:
        name = None
        needles = [NEEDLE.format(key=keys[0])]
        question = QUESTION
        names = [None]
    else:
        names = rng.sample(NAMES, num_keys)
        needles = [MULTI_NEEDLE.format(name=n, key=k) for n, k in zip(names, keys)]
        name = names[0]
        question = MULTI_QUESTION.format(name=name)
    depths = [float(depth)] + [rng.random() for _ in range(num_keys - 1)]
    fixed = len(_tokens(tokenizer, INTRO + question)) + sum(len(_tokens(tokenizer, " " + n + " ")) for n in needles)
    special = len(tokenizer("x")["input_ids"]) - len(_tokens(tokenizer, "x"))
    budget = length - fixed - special
    if budget < 1:
        raise SpikingBrainError(f"length {length} is too short: the intro, needles and question alone take {fixed} tokens")
    texts = shipped_texts("train") + shipped_texts("valid") if filler_texts is None else list(filler_texts)
    filler, ends = _filler(tokenizer, texts, budget, rng)

    # Insert from the end so earlier character positions stay valid; ties keep the asked needle first.
    spots = sorted(((_insert_at(filler, ends, d), -i, i) for i, d in enumerate(depths)), reverse=True)
    body = filler
    for pos, _, i in spots:
        left, right = body[:pos].rstrip(), body[pos:].lstrip()
        piece = (" " if left else "") + needles[i] + (" " if right else "")
        body = left + piece + right
    text = INTRO + body + question
    needle_char = len(INTRO) + body.index(needles[0])
    enc = tokenizer(text, return_offsets_mapping=True) if getattr(tokenizer, "is_fast", False) else None
    if enc is not None:
        input_ids = enc["input_ids"]
        needle_token = next(i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > needle_char and e > s)
    else:
        input_ids = tokenizer(text)["input_ids"]
        needle_token = special + len(_tokens(tokenizer, text[:needle_char]))
    return PasskeyPrompt(text=text, input_ids=list(input_ids), answer=keys[0], name=name,
                         needle_char=needle_char, needle_token=needle_token, depth=float(depth),
                         keys=dict(zip(names, keys)) if num_keys > 1 else {None: keys[0]})


def greedy_continuation(model, tokenizer, input_ids: list[int], max_new_tokens: int = 8,
                        prefill_chunk: int | None = 4096) -> str:
    """Greedy ``model.generate`` continuation of ``input_ids``, decoded (special tokens dropped).

    Prompts longer than ``prefill_chunk`` tokens are first fed through the model's cache in
    chunks (all but the last token), bounding activation memory to one chunk.
    """
    ids = torch.tensor([input_ids], dtype=torch.long)
    check_ids(model, ids)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                  attention_mask=torch.ones_like(ids).to(device))
    with evaluating(model):
        if prefill_chunk and ids.shape[1] > prefill_chunk:
            kwargs.update(cache_kwargs(prefill(model, ids[:, :-1], prefill_chunk)))
        out = model.generate(ids.to(device), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def key_score(model, tokenizer, prompt: PasskeyPrompt) -> dict:
    """Teacher-forced score of the asked key after ``prompt``: one forward over ``prompt + " " +
    key``. Finer than the exact-match trial: how far a model that fails is from answering.

    Returns ``{"logprob": summed log-probability of the key's tokens (nats), "ranks": each key
    token's rank among the logits at its position (0: the greedy choice; all 0: recalled), "top":
    the greedy token at the first answer position, decoded}``."""
    full = prompt.text + " " + prompt.answer
    enc = tokenizer(full, return_offsets_mapping=True) if getattr(tokenizer, "is_fast", False) else None
    if enc is not None:
        ids = enc["input_ids"]
        start = next(i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > len(prompt.text))
    else:  # slow tokenizers: the prompt's tokens, then the answer's
        ids = list(prompt.input_ids) + _tokens(tokenizer, " " + prompt.answer)
        start = len(prompt.input_ids)
    x = torch.tensor([ids], dtype=torch.long)
    check_ids(model, x)
    with evaluating(model):
        logits = model(input_ids=x.to(model_device(model))).logits[0, start - 1:-1].float().cpu()
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(1, x[0, start:, None])
    return {"logprob": float(picked.sum()), "ranks": (logp > picked).sum(1).tolist(),
            "top": tokenizer.decode([int(logp[0].argmax())])}


def run_passkey(model, tokenizer, length: int, depth: float, seed: int = 0, filler_texts=None,
                num_keys: int = 1, max_new_tokens: int = 8, prefill_chunk: int | None = 4096) -> dict:
    """One trial: ``{"length", "depth", "seed", "num_keys", "tokens", "answer", "output", "correct"}``."""
    p = make_passkey_prompt(tokenizer, length, depth, seed, filler_texts, num_keys)
    output = greedy_continuation(model, tokenizer, p.input_ids, max_new_tokens, prefill_chunk)
    return {"length": length, "depth": float(depth), "seed": seed, "num_keys": num_keys,
            "tokens": len(p.input_ids), "answer": p.answer, "output": output,
            "correct": score_answer(output, p.answer)}


def passkey(model, tokenizer, length: int, depth: float, seed: int = 0, **kwargs) -> bool:
    """True when greedy decoding recalls the pass key exactly (see :func:`run_passkey`)."""
    return run_passkey(model, tokenizer, length, depth, seed, **kwargs)["correct"]


def passkey_sweep(model, tokenizer, lengths, depths, seeds=(0,), progress: bool = False, **kwargs) -> list[dict]:
    """All ``lengths x depths x seeds`` trials, one row each (see :func:`run_passkey`)."""
    grid = [(n, d, s) for n in lengths for d in depths for s in seeds]
    return [run_passkey(model, tokenizer, n, d, s, **kwargs)
            for n, d, s in tqdm(grid, desc="passkey", disable=not progress)]


def passkey_table(rows: list[dict]) -> str:
    """Markdown table of accuracy (share of seeds correct): one row per length, one column per
    depth, and the mean over depths."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    table = []
    for n in lengths:
        line = {"length": n}
        accs = []
        for d in depths:
            hits = [r["correct"] for r in rows if r["length"] == n and r["depth"] == d]
            if hits:
                line[f"{d:.0%}"] = sum(hits) / len(hits)
                accs.append(line[f"{d:.0%}"])
        line["mean"] = sum(accs) / len(accs)
        table.append(line)
    return markdown_table(table)
