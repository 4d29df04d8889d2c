import math

import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.evaluation.perplexity import perplexity
from spikingbrain.evaluation.streaming import windows
from spikingbrain.evaluation.texts import build_stream


def hand_nll(model, ids, scored, context_start):
    """Sum over scored targets t of -log softmax(model(ids[context_start(t):t]))[-1][ids[t]],
    one forward pass per target, log-softmax written out by hand."""
    total, n = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            if not scored[t]:
                continue
            logits = model(ids[None, context_start(t):t]).logits[0, -1].double()
            log_probs = logits - torch.log(torch.exp(logits - logits.max()).sum()) - logits.max()
            total -= float(log_probs[ids[t]])
            n += 1
    return total, n


def test_stream_layout(tokenizer):
    texts = ["Hello world.", "Second one here."]
    s = build_stream(tokenizer, texts)
    eos = tokenizer.eos_token_id
    assert s.ids[0] == eos and int((s.ids == eos).sum()) == 2 and s.documents == 2
    assert not bool(s.scored[s.ids == eos].any())  # separators are context, never targets
    assert int(s.scored.sum()) == len(s.ids) - 2
    assert s.bytes == sum(len(t.encode()) for t in texts)


def test_full_context_matches_hand_computation(tokenizer, llama, texts):
    stream = build_stream(tokenizer, texts, max_tokens=40)
    total, n = hand_nll(llama, stream.ids, stream.scored, lambda t: 0)
    r = perplexity(llama, tokenizer, texts, context_length=4096, max_tokens=40)
    assert r["tokens"] == n == 40
    assert r["nll"] == pytest.approx(total, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)


@pytest.mark.parametrize("length,stride", [(16, None), (16, 5), (9, 9), (12, 1)])
def test_windows_match_hand_computation(tokenizer, llama, texts, length, stride):
    stream = build_stream(tokenizer, texts, max_tokens=30)
    step = stride or length

    def start(t):  # the first window whose targets reach t: start k*step with k*step + length >= t
        return max(0, math.ceil((t - length) / step)) * step

    total, n = hand_nll(llama, stream.ids, stream.scored, start)
    r = perplexity(llama, tokenizer, texts, context_length=length, stride=stride, max_tokens=30, batch_size=3)
    assert r["tokens"] == n
    assert r["nll"] == pytest.approx(total, rel=1e-5)


def test_windows_cover_every_target_once():
    for n, length, stride in [(2, 1, 1), (100, 7, 3), (50, 10, 10), (11, 10, 4)]:
        covered = [t for s, e, first in windows(n, length, stride) for t in range(first, e + 1)]
        assert covered == list(range(1, n))
        for s, e, first in windows(n, length, stride):
            assert e - s <= length and first > s


def test_bits_per_byte_formula(tokenizer, llama):
    texts = ["café naïve 東京 is a string with multi-byte characters ☃.", "A plain second document."]
    r = perplexity(llama, tokenizer, texts, context_length=64)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert r["bytes"] > sum(len(t) for t in texts)
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / math.log(2) / r["bytes"])
    assert r["ppl"] == pytest.approx(math.exp(r["nll"] / r["tokens"]))


def test_max_tokens_truncates_and_counts_decoded_bytes(tokenizer, llama, texts):
    r = perplexity(llama, tokenizer, texts, context_length=64, max_tokens=30)
    assert r["tokens"] == 30 and r["documents"] == 1
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"][:30]
    assert r["bytes"] == len(tokenizer.decode(first).encode("utf-8"))


def test_stride_equal_to_window_on_short_text_is_one_shot(tokenizer, llama, texts):
    short = [texts[0][:200]]
    a = perplexity(llama, tokenizer, short, context_length=1024)
    b = perplexity(llama, tokenizer, short, context_length=1024, stride=1024)
    c = perplexity(llama, tokenizer, short, context_length=1024, stride=256)
    assert a["nll"] == b["nll"] == pytest.approx(c["nll"], rel=1e-6)


@pytest.mark.parametrize("chunk", [7, 64])
def test_streaming_with_cache_equals_one_shot_llama(tokenizer, llama, texts, chunk):
    one = perplexity(llama, tokenizer, texts, context_length=4096, max_tokens=150)
    stream = perplexity(llama, tokenizer, texts, context_length=chunk, true_long_context=True, max_tokens=150)
    assert stream["tokens"] == one["tokens"]
    assert stream["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert stream["stride"] is None and stream["true_long_context"]


@pytest.mark.parametrize("chunk", [5, 40])
def test_streaming_with_cache_equals_one_shot_spikingbrain(tokenizer, spiking, texts, chunk):
    # The tiny preset has a sliding window of 8 < chunk 40: chunks cross the window boundary.
    one = perplexity(spiking, tokenizer, texts, context_length=4096, max_tokens=60)
    stream = perplexity(spiking, tokenizer, texts, context_length=chunk, true_long_context=True, max_tokens=60)
    assert stream["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_bad_inputs_raise_clear_errors(tokenizer, llama, texts):
    with pytest.raises(SpikingBrainError, match="stride"):
        perplexity(llama, tokenizer, texts, context_length=8, stride=9)
    with pytest.raises(SpikingBrainError, match="empty"):
        perplexity(llama, tokenizer, ["", ""])
    with pytest.raises(SpikingBrainError, match="context_length"):
        perplexity(llama, tokenizer, texts, context_length=0)
    with pytest.raises(SpikingBrainError, match="true_long_context"):
        perplexity(llama, tokenizer, texts, context_length=8, stride=4, true_long_context=True)


def test_tokenizer_model_mismatch(tokenizer, texts):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(SpikingBrainError, match="do not match"):
        perplexity(small, tokenizer, texts, context_length=32, max_tokens=40)
