import math

import pytest
import torch
import torch.nn.functional as F

from spikingbrain.evaluation.agreement import teacher_agreement
from spikingbrain.evaluation.perplexity import perplexity
from spikingbrain.evaluation.texts import build_stream


def test_model_agrees_with_itself(tokenizer, llama, texts):
    r = teacher_agreement(llama, llama, tokenizer, texts, context_length=64, max_tokens=60)
    assert r["top1"] == 1.0 and r["tokens"] == 60
    assert abs(r["kl"]) < 1e-6
    assert r["model_ppl"] == pytest.approx(r["teacher_ppl"])


def test_matches_hand_computation(tokenizer, llama, other_llama, texts):
    teacher = other_llama
    r = teacher_agreement(llama, teacher, tokenizer, texts, context_length=4096, max_tokens=50)
    s = build_stream(tokenizer, texts, max_tokens=50)
    with torch.no_grad():
        q = F.softmax(llama(s.ids[None, :-1]).logits[0].double(), -1)[s.scored[1:]]
        p = F.softmax(teacher(s.ids[None, :-1]).logits[0].double(), -1)[s.scored[1:]]
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert r["tokens"] == 50
    assert r["kl"] == pytest.approx(kl, rel=1e-4) and r["kl"] > 0.1
    assert r["top1"] == pytest.approx(top1) and r["top1"] < 1
    ppl = perplexity(llama, tokenizer, texts, context_length=4096, max_tokens=50)["ppl"]
    assert r["model_ppl"] == pytest.approx(ppl, rel=1e-5)
    assert math.isfinite(r["teacher_ppl"])
