"""One request must never fail another: poison sampling parameters, a sequence whose sampling
raises, long prompts against running decodes, the bounded queue, draining on shutdown."""
import queue
import threading

import pytest
import torch

from spikingbrain.serve import generation
from spikingbrain.serve.engine import SHUTDOWN_MESSAGE, Engine, QueueFull, ShuttingDown
from spikingbrain.serve.generation import TextStreamer
from spikingbrain.serve.sampling import SamplingParams


def _alone(model, tokenizer, ids, params):
    s = TextStreamer(model, tokenizer, ids, params)
    list(s)
    return s.sequence


def _run_all(engine, jobs):
    """Submit every (ids, params) at once; returns each one's final Event."""
    out = [queue.Queue() for _ in jobs]
    for (ids, params), q in zip(jobs, out):
        engine.submit(ids, params, q.put)
    finals = []
    for q in out:
        while True:
            ev = q.get(timeout=60)
            if ev.kind in ("done", "error"):
                finals.append(ev)
                break
    return finals


def test_extreme_sampling_values_are_greedy_and_harm_no_one(sb_model, tokenizer):
    """temperature 1e-300 / 5e-324 and repetition_penalty 1e-300 made every request in flight
    fail (inf/NaN probabilities) and the poison request itself never got an answer."""
    ids = tokenizer("The river", add_special_tokens=False)["input_ids"]
    normal = SamplingParams(max_new_tokens=6)
    poisons = [SamplingParams(temperature=t, max_new_tokens=6) for t in (1e-300, 5e-324, 1e-40)]
    poisons.append(SamplingParams(temperature=1.0, repetition_penalty=1e-300, max_new_tokens=6, seed=1))
    poisons.append(SamplingParams(temperature=0.5, repetition_penalty=1e300, max_new_tokens=6, seed=1))
    engine = Engine(sb_model, tokenizer).start()
    try:
        finals = _run_all(engine, [(ids, normal)] * 2 + [(ids, p) for p in poisons] + [(ids, normal)])
    finally:
        engine.stop()
    assert [ev.kind for ev in finals] == ["done"] * len(finals), [ev.text for ev in finals]
    greedy = _alone(sb_model, tokenizer, ids, normal).text
    for ev in finals[:2] + finals[2:5] + finals[-1:]:
        assert ev.info["text"] == greedy  # a vanishing temperature is greedy
    for ev in finals[5:7]:
        assert ev.info["completion_tokens"] == 6


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_sequence_whose_sampling_fails_fails_alone(sb_model, tokenizer, monkeypatch, when):
    """A sampling error (here: forced for one request, at its first token or its third) gives
    that request an error reply; the requests batched with it finish with their own answers."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("Once upon", "The king", "A river")]
    normal = [SamplingParams(max_new_tokens=8) for _ in ids]
    poison = SamplingParams(max_new_tokens=8)
    real = generation.sample_next
    calls = {"n": 0}

    def sample(logits, params, seen, gen=None):
        if params is poison:
            calls["n"] += 1
            if calls["n"] == (1 if when == "prefill" else 3):
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, seen, gen)

    monkeypatch.setattr(generation, "sample_next", sample)
    engine = Engine(sb_model, tokenizer, max_batch=8).start()
    try:
        jobs = [(ids[0], normal[0]), (ids[1], poison), (ids[1], normal[1]), (ids[2], normal[2])]
        finals = _run_all(engine, jobs)
        after = engine.generate(ids[0], SamplingParams(max_new_tokens=3), timeout=60)
    finally:
        engine.stop()
    assert finals[1].kind == "error" and "sampling failed" in finals[1].text
    for ev, (i, p) in zip([finals[0], finals[2], finals[3]], [(0, normal[0]), (1, normal[1]), (2, normal[2])]):
        assert ev.kind == "done"
        assert ev.info["text"] == _alone(sb_model, tokenizer, ids[i], p).text
    assert after["completion_tokens"] == 3


def test_long_prefill_is_spread_over_decode_steps(sb_model, tokenizer):
    """While a request decodes, a long prompt is read at most ``prefill_budget`` tokens (minus
    the decoding rows) between two decode steps; the old engine fed a whole 512-token chunk
    per step. Every answer still equals the one produced alone."""
    short = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    long = torch.randint(3, 500, (1500,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(sb_model, tokenizer, prefill_budget=24)
    fed, between = [0], []
    real_extend, real_step = engine.adapter.extend, engine.adapter.step

    def extend(state, ids, **kw):
        fed[0] += ids.numel()
        return real_extend(state, ids, **kw)

    def step(state, tokens):
        between.append(fed[0])
        fed[0] = 0
        return real_step(state, tokens)

    engine.adapter.extend, engine.adapter.step = extend, step
    engine.start()
    try:
        q = queue.Queue()
        engine.submit(short, SamplingParams(max_new_tokens=200), q.put)
        assert q.get(timeout=60).kind == "delta"  # decoding now
        long_info = engine.generate(long, SamplingParams(max_new_tokens=4), timeout=120)
    finally:
        engine.stop()
    assert max(between[1:]) <= 24 - 1  # budget minus the one decoding row
    assert sum(between) >= 1500  # the long prompt was read, spread over many steps
    assert long_info["text"] == _alone(sb_model, tokenizer, long, SamplingParams(max_new_tokens=4)).text


def test_a_short_prompt_overtakes_a_long_one(sb_model, tokenizer):
    """Prompts closest to done are read first: a short prompt sent after a long one starts
    decoding long before the long one's prefill ends."""
    long = torch.randint(3, 500, (800,), generator=torch.Generator().manual_seed(1)).tolist()
    short = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    engine = Engine(sb_model, tokenizer, prefill_budget=16, prefill_chunk=16)
    order = []
    engine.start()
    try:
        q0, q1, q2 = queue.Queue(), queue.Queue(), queue.Queue()
        engine.submit(short, SamplingParams(max_new_tokens=400), q0.put)  # keeps a decode running
        assert q0.get(timeout=60).kind == "delta"
        engine.submit(long, SamplingParams(max_new_tokens=1), lambda ev: order.append(("long", ev.kind)) or q1.put(ev))
        engine.submit(short, SamplingParams(max_new_tokens=1), lambda ev: order.append(("short", ev.kind)) or q2.put(ev))
        for q in (q1, q2):
            while q.get(timeout=120).kind not in ("done", "error"):
                pass
    finally:
        engine.stop()
    firsts = [who for who, kind in order if kind == "done"]
    assert firsts == ["short", "long"]


def test_the_waiting_queue_is_bounded(sb_model, tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    engine = Engine(sb_model, tokenizer, max_batch=1, max_waiting=2).start()
    try:
        q = queue.Queue()
        first = engine.submit(ids, SamplingParams(max_new_tokens=100_000), q.put)
        assert q.get(timeout=60).kind == "delta"  # admitted: the batch is full now
        waiting = [engine.submit(ids, SamplingParams(max_new_tokens=2), lambda ev: None) for _ in range(2)]
        with pytest.raises(QueueFull) as exc:
            engine.submit(ids, SamplingParams(max_new_tokens=2), lambda ev: None)
        assert exc.value.retry_after >= 1
        first.cancel()
        for h in waiting:
            h.cancel()
    finally:
        engine.stop()


def test_drain_refuses_new_work_and_ends_running_work_with_an_error(sb_model, tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    engine = Engine(sb_model, tokenizer, max_batch=1).start()
    try:
        running, queued = queue.Queue(), queue.Queue()
        engine.submit(ids, SamplingParams(max_new_tokens=100_000), running.put)
        assert running.get(timeout=60).kind == "delta"
        engine.submit(ids, SamplingParams(max_new_tokens=2), queued.put)
        engine.drain(0.0)
        with pytest.raises(ShuttingDown):
            engine.submit(ids, SamplingParams(max_new_tokens=2), lambda ev: None)
        for q in (queued, running):
            ev = q.get(timeout=60)
            while ev.kind == "delta":
                ev = q.get(timeout=60)
            assert ev.kind == "error" and ev.text == SHUTDOWN_MESSAGE
        threading.Event().wait(0.1)
        assert engine.idle() and engine.alive
    finally:
        engine.stop()
