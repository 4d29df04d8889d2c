"""Scoring over HTTP: ``echo`` + ``logprobs`` on /v1/completions with token-list prompts, and
lm-eval's own ``local-completions`` model computing loglikelihoods against the server."""

import pytest
import requests
import torch

from spikingbrain.serve.server import BackgroundServer, create_app


@pytest.fixture(scope="module")
def plain_server(tokenizer, sb_model):
    app = create_app(sb_model, tokenizer, model_name="tiny-sb")
    with BackgroundServer(app) as srv:
        yield srv


def _reference_logprobs(model, ids):
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], lp


def test_echo_logprobs_of_a_token_list_prompt(plain_server, sb_model, tokenizer):
    ids = torch.randint(3, 500, (150,), generator=torch.Generator().manual_seed(3)).tolist()  # > one echo chunk
    body = {"model": "tiny-sb", "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 2, "echo": True}
    r = requests.post(plain_server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    ref, full = _reference_logprobs(sb_model, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the generated token
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(ref, abs=2e-3)
    # the top alternatives are the model's two most likely tokens at that position
    for pos in (1, 70, len(ids) - 1):
        top = torch.topk(full[pos - 1], 2)
        assert sorted(lp["top_logprobs"][pos].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=2e-3)
    # the generated token is the greedy one, with its log-prob
    greedy = int(full[-1].argmax())
    assert lp["token_logprobs"][-1] == pytest.approx(float(full[-1, greedy]), abs=2e-3)
    assert ch["text"] == tokenizer.decode(ids) + tokenizer.decode([greedy])


def test_several_prompts_in_one_request(plain_server, tokenizer):
    prompts = ["The old mill", "A river ran"]
    r = requests.post(plain_server.url + "/v1/completions",
                      json={"model": "tiny-sb", "prompt": prompts, "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    for p, t in zip(prompts, texts):
        one = requests.post(plain_server.url + "/v1/completions",
                            json={"model": "tiny-sb", "prompt": p, "max_tokens": 4, "temperature": 0}, timeout=60)
        assert one.json()["choices"][0]["text"] == t


def test_lm_eval_local_completions_scores_against_the_server(plain_server, sb_model, tokenizer):
    """lm-eval's ``local-completions`` (remote tokenizer: /tokenizer_info + /tokenize) runs a
    loglikelihood task against the server; every per-sample loglikelihood equals lm-eval's own
    HF backend on the same in-memory model."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from spikingbrain.evaluation.harness import TASKS_DIR

    manager = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)
    common = dict(tasks=["spikingbrain_cloze"], limit=3, task_manager=manager, log_samples=True, bootstrap_iters=0)
    remote = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={plain_server.url}/v1/completions,model=tiny-sb,tokenizer_backend=remote,"
                   "num_concurrent=1,max_retries=1,tokenized_requests=True",
        **common)
    local = lm_eval.simple_evaluate(model=HFLM(pretrained=sb_model, tokenizer=tokenizer, batch_size=1), **common)

    def logliks(res):
        return [s["resps"][0][0][0] for s in sorted(res["samples"]["spikingbrain_cloze"], key=lambda s: s["doc_id"])]

    got, want = logliks(remote), logliks(local)
    assert len(got) == 3
    assert got == pytest.approx(want, abs=5e-3)
    assert all(x < 0 for x in got)
