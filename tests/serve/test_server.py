"""The official openai client against a live server (tiny SpikingBrain model, greedy decoding)."""
import http.client
import json
import re
import threading
import time
from urllib.parse import urlparse

import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids
from spikingbrain.serve.sampling import SamplingParams


def _alone(model, tokenizer, messages, max_tokens, stop=()):
    s = TextStreamer(model, tokenizer, chat_prompt_ids(tokenizer, messages),
                     SamplingParams(max_new_tokens=max_tokens, stop=list(stop)))
    list(s)
    return s.sequence


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="tiny-sb", messages=messages, temperature=0, **kw)


def _stream_text(client, messages, **kw):
    parts, finish, usage = [], None, None
    for chunk in _chat(client, messages, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    return parts, finish, usage


MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]


def test_chat_completion(client, sb_model, tokenizer):
    r = _chat(client, MSG, max_tokens=20)
    ref = _alone(sb_model, tokenizer, MSG, 20)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    assert r.model == "tiny-sb"


def test_streaming_equals_non_streaming(client):
    parts, finish, usage = _stream_text(client, MSG, max_tokens=20, stream_options={"include_usage": True})
    assert len(parts) > 1  # really streamed in pieces
    assert "".join(parts) == _chat(client, MSG, max_tokens=20).choices[0].message.content
    assert finish == "length"
    assert usage.completion_tokens == 20


def test_stop_strings(client, sb_model, tokenizer):
    text = _alone(sb_model, tokenizer, MSG, 30).text
    stop = text[12:15]
    expected = text[:text.find(stop)]
    r = _chat(client, MSG, max_tokens=30, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    parts, finish, _ = _stream_text(client, MSG, max_tokens=30, stop=stop)
    assert "".join(parts) == expected and finish == "stop"


def test_max_tokens(client):
    for n in (1, 7):
        r = _chat(client, MSG, max_tokens=n)
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"


def test_completions_endpoint(client, sb_model, tokenizer):
    r = client.completions.create(model="tiny-sb", prompt="The old mill", max_tokens=12, temperature=0)
    ids = tokenizer("The old mill", add_special_tokens=False)["input_ids"]
    s = TextStreamer(sb_model, tokenizer, ids, SamplingParams(max_new_tokens=12))
    list(s)
    assert r.choices[0].text == s.sequence.text
    assert r.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-sb", prompt="The old mill", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == s.sequence.text


def _sample_independently(model, tokenizer, messages, n, temperature, seed):
    """Seeded sampling written out in the test: full forward each step, softmax(logits / T),
    one torch.multinomial draw per token from a CPU generator seeded with ``seed``."""
    ids = chat_prompt_ids(tokenizer, messages)
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
            out.append(int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=g)))
    return tokenizer.decode(out, skip_special_tokens=True)


def test_seeded_sampling_over_http_follows_seed_and_temperature(client, sb_model, tokenizer):
    def once(seed, temperature, n=12):
        return client.chat.completions.create(model="tiny-sb", messages=MSG, max_tokens=n, temperature=temperature,
                                              seed=seed).choices[0].message.content

    assert once(42, 1.0) == once(42, 1.0)
    # the seed is honoured: it equals sampling done here with the same seed and algorithm
    assert once(42, 1.0) == _sample_independently(sb_model, tokenizer, MSG, 12, 1.0, 42)
    # different seeds at a high temperature give different answers
    assert len({once(s, 2.0) for s in range(1, 6)}) >= 4
    # temperature 0 is greedy whatever the seed
    greedy = _alone(sb_model, tokenizer, MSG, 12).text
    assert once(1, 0.0) == once(2, 0.0) == greedy


def test_sixteen_concurrent_streaming_clients_get_their_own_answers(client, sb_model, tokenizer):
    convs = [[{"role": "user", "content": f"Question number {i}: " + "why? " * (i % 5)}] for i in range(16)]
    lengths = [8 + (i % 4) * 4 for i in range(16)]
    out = [None] * 16

    def run(i):
        out[i] = _stream_text(client, convs[i], max_tokens=lengths[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(16):
        parts, finish, _ = out[i]
        ref = _alone(sb_model, tokenizer, convs[i], lengths[i])
        assert "".join(parts) == ref.text, i
        assert finish == "length"
    assert len({"".join(o[0]) for o in out}) > 1
    # the decode steps really were batched
    m = requests.get(client.base_url.scheme + "://" + client.base_url.host + f":{client.base_url.port}/metrics",
                     headers={"Authorization": f"Bearer {client.api_key}"}).text
    samples = {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(m) for s in f.samples}
    alone = samples[("spikingbrain_decode_batch_size_bucket", "1.0")]
    total = samples[("spikingbrain_decode_batch_size_count", None)]
    assert total > alone  # some steps had more than one sequence


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-sb"]
    assert requests.get(server.url + "/health").json() == {"status": "ok"}
    _chat(client, MSG, max_tokens=3)
    text = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.api_key}"}).text
    for name in ("spikingbrain_requests_total", "spikingbrain_completion_tokens_total", "spikingbrain_prompt_tokens_total",
                 "spikingbrain_request_latency_seconds_count", "spikingbrain_decode_state_bytes",
                 "spikingbrain_time_to_first_token_seconds_sum"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? \d", text, re.M), name
    assert int(re.search(r"^spikingbrain_completion_tokens_total (\d+)", text, re.M).group(1)) >= 3
    assert 'endpoint="/v1/chat/completions",status="200"' in text


def _metric(server, *names):
    """The sum of the named gauges/counters, from one scrape (two scrapes could see a request move
    from waiting to running between them and count it in neither)."""
    text = requests.get(server.url + "/metrics").text
    return sum(int(re.search(rf"^{name} (\d+)", text, re.M).group(1)) for name in names)


def test_client_disconnect_cancels_generation(sb_model, tokenizer):
    """A client that goes away mid-stream frees its batch slot at the next decode step."""
    from spikingbrain.serve.protocol import Limits
    from spikingbrain.serve.server import BackgroundServer, create_app

    app = create_app(sb_model, tokenizer, model_name="tiny-sb", limits=Limits(max_tokens_cap=100_000))
    with BackgroundServer(app) as server:
        u = urlparse(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        body = json.dumps({"messages": MSG, "max_tokens": 100_000, "stream": True, "temperature": 0})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read(5) == b"data:"
        # queued or already decoding (the role chunk is sent before the engine picks it up)
        assert _metric(server, "spikingbrain_requests_running", "spikingbrain_requests_waiting") == 1
        conn.sock.shutdown(2)
        conn.close()
        deadline = time.time() + 20
        while time.time() < deadline and not _metric(server, "spikingbrain_generations_cancelled_total"):
            time.sleep(0.05)
        assert _metric(server, "spikingbrain_generations_cancelled_total") == 1
        while time.time() < deadline and _metric(server, "spikingbrain_requests_running"):
            time.sleep(0.05)
        assert _metric(server, "spikingbrain_requests_running") == _metric(server, "spikingbrain_requests_waiting") == 0
        assert _metric(server, "spikingbrain_completion_tokens_total") == 0  # it never finished
