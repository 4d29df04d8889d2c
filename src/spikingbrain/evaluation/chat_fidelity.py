"""Chat fidelity of a converted model to its teacher, on held-out instructions.

- ``fidelity``: teacher-forced top-1 agreement on the teacher's own greedy answers: both models
  read the rendered conversation (template, instruction, the teacher's answer); over the
  answer's positions, the share where the model's most likely next token is the teacher's.
- ``empty``: how many of the model's own greedy answers are empty (it ends its turn at once, or
  writes only whitespace): the failure a user sees first.
"""
from __future__ import annotations

import torch

from spikingbrain.convert.chat_data import encode_example


@torch.no_grad()
def chat_fidelity(model, teacher, tokenizer, examples: list[dict], max_new_tokens: int = 24,
                  keep_answers: int = 0) -> dict:
    """Returns ``{"fidelity", "answer_tokens", "empty", "prompts", "answers"}`` (``answers``:
    the model's first ``keep_answers`` greedy answers, for the report)."""
    from spikingbrain.demo import chat_answers

    agree = total = 0
    for ex in examples:
        ids, mask = encode_example(tokenizer, ex)
        x = torch.tensor(ids)[None].to(next(model.parameters()).device)
        lm = model(input_ids=x, use_cache=False).logits[0].float()
        lt = teacher(input_ids=x.to(next(teacher.parameters()).device), use_cache=False).logits[0].float()
        v = min(lm.shape[-1], lt.shape[-1])
        # logits at t predict token t + 1: score the positions whose next token is the answer's
        pos = torch.tensor([j - 1 for j, m in enumerate(mask) if m and j > 0])
        if pos.numel():
            agree += int((lm[pos, :v].argmax(-1).cpu() == lt[pos, :v].argmax(-1).cpu()).sum())
            total += pos.numel()
    prompts = [ex["messages"][0]["content"] for ex in examples]
    answers = chat_answers(model, tokenizer, prompts, max_new_tokens)
    return {"fidelity": agree / max(1, total), "answer_tokens": total,
            "empty": sum(1 for a in answers if not a.strip()), "prompts": len(prompts),
            "answers": [{"prompt": p, "answer": a} for p, a in zip(prompts[:keep_answers], answers[:keep_answers])]}
