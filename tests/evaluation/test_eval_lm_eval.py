import json
import math

import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.evaluation.cloze import CLOZE_FILE, build_cloze_items, render_jsonl, shipped_records

lm_eval = pytest.importorskip("lm_eval")


def test_shipped_cloze_data_is_regenerated_exactly():
    items = build_cloze_items(shipped_records("valid"))
    assert render_jsonl(items) == CLOZE_FILE.read_text("utf-8")
    assert len(items) > 100
    for it in items:
        words = it["context"].split()
        assert 60 <= len(words) <= 202 and it["target"].isalpha() and len(it["target"]) >= 3
        assert it["target"].lower() in it["context"].lower()
        assert not it["context"].endswith(it["target"])


def _hand_loglikelihoods(model, tokenizer, docs):
    """lm-eval's loglikelihood request by hand: tokens of context + " target", the target's tokens
    being those after the context's; log-prob summed, greedy = every target token is the argmax."""
    out = []
    with torch.no_grad():
        for doc in docs:
            ctx = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["context"] + " " + doc["target"], add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)[len(ctx) - 1:]
            ll = float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
            greedy = bool((logp.argmax(-1) == torch.tensor(cont)).all())
            out.append((ll, greedy))
    return out


def test_local_cloze_task_end_to_end(tmp_path, llama_dir, tokenizer, llama, monkeypatch):
    from spikingbrain.evaluation.harness import run_lm_eval

    monkeypatch.chdir(tmp_path)  # the task must find its data from any working directory
    r = run_lm_eval(llama_dir, tasks=["spikingbrain_cloze"], limit=4)
    m = r["spikingbrain_cloze"]
    assert m["samples"] == 4
    docs = [json.loads(line) for line in CLOZE_FILE.read_text("utf-8").splitlines()[:4]]
    hand = _hand_loglikelihoods(llama, tokenizer, docs)
    assert m["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in hand) / 4), rel=1e-4)
    assert m["acc"] == pytest.approx(sum(g for _, g in hand) / 4)


def test_loaded_spikingbrain_model_runs(tokenizer, spiking):
    from spikingbrain.evaluation.harness import run_lm_eval

    r = run_lm_eval(spiking, tokenizer=tokenizer, limit=2)
    m = r["spikingbrain_cloze"]
    assert m["samples"] == 2
    docs = [json.loads(line) for line in CLOZE_FILE.read_text("utf-8").splitlines()[:2]]
    hand = _hand_loglikelihoods(spiking, tokenizer, docs)
    assert m["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in hand) / 2), rel=1e-4)
    assert m["acc"] == pytest.approx(sum(g for _, g in hand) / 2)


def test_summarize_drops_filters_and_non_numbers():
    from spikingbrain.evaluation.harness import summarize

    raw = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact,strict": 1,
                             "sample_len": 3}},
           "n-samples": {"t": {"original": 10, "effective": 3}}}
    assert summarize(raw) == {"t": {"acc": 0.5, "exact,strict": 1.0, "samples": 3}}


def test_loaded_model_needs_tokenizer(llama):
    from spikingbrain.evaluation.harness import run_lm_eval

    with pytest.raises(SpikingBrainError, match="tokenizer"):
        run_lm_eval(llama, limit=1)
