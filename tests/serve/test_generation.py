import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.adapters import PerRowAdapter, SpikingBrainAdapter, make_adapter
from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids, chunked_prefill
from spikingbrain.serve.sampling import SamplingParams


@pytest.fixture(params=["spikingbrain", "llama"])
def model(request, sb_model, llama_model):
    return sb_model if request.param == "spikingbrain" else llama_model


def test_adapter_choice(sb_model, llama_model):
    assert isinstance(make_adapter(sb_model), SpikingBrainAdapter)
    assert isinstance(make_adapter(llama_model), PerRowAdapter)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_matches_one_forward(model, chunk):
    ids = torch.randint(0, 500, (50,), generator=torch.Generator().manual_seed(1))
    adapter = make_adapter(model)
    logits, state = chunked_prefill(adapter, adapter.new_state(), ids, chunk_size=chunk)
    with torch.no_grad():
        ref = model(input_ids=ids[None]).logits[0, -1]
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=1e-4)
    # and the state continues correctly: next-token logits equal the full forward's
    nxt = torch.tensor([5])
    step_logits, _ = adapter.step(state, nxt)
    with torch.no_grad():
        ref2 = model(input_ids=torch.cat([ids, nxt])[None]).logits[0, -1]
    torch.testing.assert_close(step_logits[0], ref2, atol=2e-4, rtol=1e-4)


def test_prefill_state_stays_constant_for_long_prompts(sb_model):
    """GLA + SWA keep a constant-size state: 16x the prompt, same bytes."""
    adapter = make_adapter(sb_model)
    ids = torch.randint(0, 500, (16384,), generator=torch.Generator().manual_seed(0))
    _, short = chunked_prefill(adapter, adapter.new_state(), ids[:1024], chunk_size=512)
    _, long = chunked_prefill(adapter, adapter.new_state(), ids, chunk_size=512)
    assert adapter.nbytes(short) == adapter.nbytes(long) > 0
    assert long.get_seq_length() == 16384


def test_streamer_equals_hf_generate_greedy(model, tokenizer):
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Tell me a story."}])
    streamer = TextStreamer(model, tokenizer, ids, SamplingParams(max_new_tokens=24), prefill_chunk=5)
    deltas = list(streamer)
    seq = streamer.sequence
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=0)
    ref_new = ref[0, len(ids):].tolist()
    assert seq.output_ids == [t for t in ref_new if t != tokenizer.eos_token_id]
    assert "".join(deltas) == seq.text == tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    assert seq.finish_reason == "length" and len(seq.output_ids) == 24


def test_stop_string_trims_and_finishes(sb_model, tokenizer):
    ids = tokenizer("The river ran", add_special_tokens=False)["input_ids"]
    full = TextStreamer(sb_model, tokenizer, ids, SamplingParams(max_new_tokens=30))
    text = "".join(full)
    stop = text[10:13]
    assert len(stop) == 3
    cut = text.find(stop)
    s = TextStreamer(sb_model, tokenizer, ids, SamplingParams(max_new_tokens=30, stop=[stop]))
    assert "".join(s) == text[:cut] == s.sequence.text
    assert s.sequence.finish_reason == "stop"
    assert len(s.sequence.output_ids) < 30


def test_eos_finishes_with_stop(sb_model, tokenizer):
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    first = TextStreamer(sb_model, tokenizer, ids, SamplingParams(max_new_tokens=1))
    list(first)
    # make the first sampled token the EOS by treating it as one
    tok = first.sequence.output_ids[0]
    s = TextStreamer(sb_model, tokenizer, ids, SamplingParams(max_new_tokens=10))
    s.sequence.eos_ids = {tok}
    assert "".join(s) == "" and s.sequence.finish_reason == "stop" and s.sequence.output_ids == []


def test_seeded_sampling_is_reproducible(sb_model, tokenizer):
    ids = tokenizer("Once", add_special_tokens=False)["input_ids"]

    def run(seed):
        s = TextStreamer(sb_model, tokenizer, ids, SamplingParams(temperature=1.0, top_p=0.9, seed=seed,
                                                                  max_new_tokens=16))
        list(s)
        return s.sequence.output_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_continuing_a_conversation_reuses_the_state(model, tokenizer):
    msgs = [{"role": "user", "content": "Hi there."}]
    p = SamplingParams(max_new_tokens=6)
    first = TextStreamer(model, tokenizer, chat_prompt_ids(tokenizer, msgs), p)
    list(first)
    ids2 = first.fed_ids + tokenizer("<|im_end|>\n<|im_start|>user\nMore.<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)["input_ids"]
    cont = TextStreamer(model, tokenizer, ids2, p, state=first.state, state_ids=first.fed_ids)
    assert cont.reused_tokens == len(first.fed_ids) > 0
    fresh = TextStreamer(model, tokenizer, ids2, p)
    assert fresh.reused_tokens == 0
    list(cont)
    list(fresh)
    assert cont.sequence.output_ids == fresh.sequence.output_ids


def test_empty_prompt_is_a_user_error(sb_model):
    adapter = make_adapter(sb_model)
    with pytest.raises(SpikingBrainError):
        chunked_prefill(adapter, adapter.new_state(), torch.tensor([], dtype=torch.long))


@pytest.mark.slow
def test_one_million_token_prompt_in_bounded_memory(sb_model):
    """1M prompt tokens through the constant-size state: the process's peak memory grows by far
    less than one full-prompt activation would need (the [1M, vocab] fp32 logits alone are 2 GB)."""
    import resource

    adapter = make_adapter(sb_model)
    ids = torch.randint(0, 500, (1_000_000,), generator=torch.Generator().manual_seed(0))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logits, state = chunked_prefill(adapter, adapter.new_state(), ids, chunk_size=2048)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert state.get_seq_length() == 1_000_000
    assert torch.isfinite(logits).all()
    assert adapter.nbytes(state) < 1 << 20
    assert peak_after - peak_before < 300 * 2**20
