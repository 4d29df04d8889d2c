import queue
import threading
import time

import pytest
import torch

from spikingbrain.serve.engine import Engine
from spikingbrain.serve.generation import TextStreamer
from spikingbrain.serve.sampling import SamplingParams


@pytest.fixture(params=["spikingbrain", "llama"])
def model(request, sb_model, llama_model):
    return sb_model if request.param == "spikingbrain" else llama_model


def _alone(model, tokenizer, ids, params):
    s = TextStreamer(model, tokenizer, ids, params)
    list(s)
    return s.sequence


def test_batched_greedy_equals_each_request_alone(model, tokenizer):
    """Requests of different prompt lengths and answer lengths join the batch at different
    steps (prefill chunk 3 staggers them, max_batch 3 makes some wait) and leave it at
    different steps; every answer must equal the one produced alone."""
    prompts = [tokenizer("word " * (1 + 3 * i), add_special_tokens=False)["input_ids"] for i in range(6)]
    params = [SamplingParams(max_new_tokens=8 + 3 * i) for i in range(6)]
    engine = Engine(model, tokenizer, max_batch=3, prefill_chunk=3).start()
    results = [None] * 6
    try:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate(prompts[i], params[i], timeout=60)))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    finally:
        engine.stop()
    for i in range(6):
        ref = _alone(model, tokenizer, prompts[i], params[i])
        assert results[i]["text"] == ref.text
        assert results[i]["completion_tokens"] == len(ref.output_ids) == params[i].max_new_tokens
        assert results[i]["finish_reason"] == "length"
        assert results[i]["prompt_tokens"] == len(prompts[i])


def test_sampled_requests_are_reproducible_in_a_batch(sb_model, tokenizer):
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    p = dict(temperature=0.9, top_k=50, max_new_tokens=12)
    engine = Engine(sb_model, tokenizer).start()
    try:
        out = {}
        threads = [threading.Thread(target=lambda s=s: out.__setitem__(s, engine.generate(ids, SamplingParams(seed=s, **p))))
                   for s in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.stop()
    for s in (1, 2, 3):
        assert out[s]["text"] == _alone(sb_model, tokenizer, ids, SamplingParams(seed=s, **p)).text


def test_cancel_frees_the_slot_and_others_finish(sb_model, tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    engine = Engine(sb_model, tokenizer, max_batch=2).start()
    try:
        events = queue.Queue()
        handle = engine.submit(ids, SamplingParams(max_new_tokens=10_000), events.put)
        assert events.get(timeout=30).kind == "delta"
        handle.cancel()
        kinds = []
        while True:
            ev = events.get(timeout=30)
            kinds.append(ev.kind)
            if ev.kind in ("done", "error"):
                break
        assert kinds[-1] == "error" and ev.text == "cancelled"
        info = engine.generate(ids, SamplingParams(max_new_tokens=5), timeout=30)
        assert info["completion_tokens"] == 5
        deadline = time.time() + 5
        while engine.snapshot()["state_bytes"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.snapshot() == {"waiting": 0, "running": 0, "state_bytes": 0}
    finally:
        engine.stop()


def test_a_failing_step_fails_only_the_batch_in_flight(sb_model, tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    engine = Engine(sb_model, tokenizer).start()
    real_step = engine.adapter.step
    calls = {"n": 0}

    def flaky(state, tokens):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step(state, tokens)

    engine.adapter.step = flaky
    try:
        with pytest.raises(RuntimeError, match="boom"):
            engine.generate(ids, SamplingParams(max_new_tokens=5), timeout=30)
        assert engine.generate(ids, SamplingParams(max_new_tokens=5), timeout=30)["completion_tokens"] == 5
    finally:
        engine.stop()


def test_state_bytes_reported_while_running(sb_model, tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    engine = Engine(sb_model, tokenizer).start()
    try:
        events = queue.Queue()
        h = engine.submit(ids, SamplingParams(max_new_tokens=10_000), events.put)
        events.get(timeout=30)
        deadline = time.time() + 5
        while engine.snapshot()["state_bytes"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        alone = TextStreamer(sb_model, tokenizer, ids, SamplingParams(max_new_tokens=2))
        list(alone)
        assert engine.snapshot()["state_bytes"] == alone.adapter.nbytes(alone.state) > 0
        h.cancel()
    finally:
        engine.stop()


def test_spike_sparsity_is_averaged_over_the_request_steps(sb_model, tokenizer):
    """The engine reads each row's figure after every decode step and reports the mean over
    that request's steps (a stand-in probe with known per-row values, to check the arithmetic)."""
    from spikingbrain.serve.spikes import make_spike_probe

    assert make_spike_probe(sb_model) is None  # not spiking: no figure, no probe

    class Probe:
        def __init__(self):
            self.step = 0

        def reset(self):
            self.step += 1

        def rows(self, batch):
            return [0.5 + 0.01 * self.step + 0.1 * r for r in range(batch)]

    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    engine = Engine(sb_model, tokenizer, spike_probe=Probe()).start()
    try:
        events = queue.Queue()
        engine.submit(ids, SamplingParams(max_new_tokens=5), events.put)
        live, info = [], None
        while info is None:
            ev = events.get(timeout=30)
            if ev.kind == "delta" and ev.info:
                live.append(ev.info["spike_sparsity"])
            elif ev.kind == "done":
                info = ev.info
    finally:
        engine.stop()
    # 5 tokens: the first comes from the prefill, then 4 decode steps with 0.51 .. 0.54 (row 0)
    assert info["spike_sparsity"] == pytest.approx(sum(0.5 + 0.01 * s for s in range(1, 5)) / 4)
    assert live and all(0.5 < x < 0.55 for x in live)


def _sparsity_alone(model, ids, n_tokens):
    """The spiking package's own SpikeMonitor over each decode step of one request run alone
    (greedy), averaged over the steps: what the engine must report for that request."""
    from spikingbrain.serve.adapters import make_adapter
    from spikingbrain.serve.generation import chunked_prefill
    from spikingbrain.spiking import SpikeMonitor

    adapter = make_adapter(model)
    logits, state = chunked_prefill(adapter, adapter.new_state(), torch.tensor(ids))
    token, figures = int(logits.argmax()), []
    with SpikeMonitor(model) as mon:
        for _ in range(n_tokens - 1):
            mon.reset()
            logits, state = adapter.step(state, torch.tensor([token]))
            figures.append(mon.report()["total"]["sparsity"])
            token = int(logits[0].argmax())
    return sum(figures) / len(figures)


def test_real_spiking_model_reports_each_requests_own_sparsity(sb_model, tokenizer):
    """Two different requests decoded in one batch each get their own figure (the old engine gave
    every request the batch's), equal to the monitor's figure for that request alone."""
    import copy

    spiking = pytest.importorskip("spikingbrain.spiking")
    from spikingbrain.serve.spikes import make_spike_probe

    model = spiking.spikify(copy.deepcopy(sb_model))
    probe = make_spike_probe(model)
    assert probe is not None
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("Hello there", "The king of the old mill")]
    engine = Engine(model, tokenizer, spike_probe=probe).start()
    try:
        qs = [queue.Queue() for _ in prompts]
        for ids, q in zip(prompts, qs):
            engine.submit(ids, SamplingParams(max_new_tokens=6), q.put)
        infos = []
        for q in qs:
            ev = q.get(timeout=60)
            while ev.kind == "delta":
                ev = q.get(timeout=60)
            infos.append(ev.info)
    finally:
        engine.stop()
    probe.close()
    want = [_sparsity_alone(model, ids, 6) for ids in prompts]
    got = [info["spike_sparsity"] for info in infos]
    assert got == pytest.approx(want, abs=1e-5)
    assert abs(want[0] - want[1]) > 1e-4  # the two requests really differ (10x the tolerance)
    assert not probe.broken
