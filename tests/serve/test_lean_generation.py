"""The generation paths on the lean decode step: the same greedy answers as the model's own step
(alone, in the engine's continuous batch, in a continued conversation), and the CLI flags."""
import argparse
import copy
import threading

import pytest
import torch

from spikingbrain.decode import LeanState
from spikingbrain.decode.adapter import LeanAdapter, enable_lean
from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve import cli
from spikingbrain.serve.adapters import make_adapter
from spikingbrain.serve.engine import Engine
from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids
from spikingbrain.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def lean_model(sb_model):
    model = copy.deepcopy(sb_model)  # the session's model stays on its own step
    assert enable_lean(model) is None
    assert isinstance(make_adapter(model), LeanAdapter)
    return model


def _alone(model, tokenizer, ids, params, **kw):
    s = TextStreamer(model, tokenizer, ids, params, **kw)
    list(s)
    return s


def test_batched_lean_equals_each_request_alone_on_the_model_step(lean_model, sb_model, tokenizer):
    prompts = [tokenizer("word " * (1 + 3 * i), add_special_tokens=False)["input_ids"] for i in range(5)]
    params = [SamplingParams(max_new_tokens=6 + 3 * i) for i in range(5)]
    engine = Engine(lean_model, tokenizer, max_batch=3, prefill_chunk=3).start()
    results = [None] * 5
    try:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, engine.generate(prompts[i], params[i], timeout=60))) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    finally:
        engine.stop()
    for i in range(5):
        assert results[i]["text"] == _alone(sb_model, tokenizer, prompts[i], params[i]).sequence.text


def test_continued_conversation_on_a_lean_state(lean_model, sb_model, tokenizer):
    """The second turn prefills on top of a LeanState (converted back to the model's cache)."""
    params = SamplingParams(max_new_tokens=10)
    msgs = [{"role": "user", "content": "Hi there"}]
    answers = []
    for model in (lean_model, sb_model):
        first = _alone(model, tokenizer, chat_prompt_ids(tokenizer, msgs), params)
        more = tokenizer(" and then?", add_special_tokens=False)["input_ids"]
        second = _alone(model, tokenizer, first.fed_ids + more, params, state=first.state, state_ids=first.fed_ids)
        assert second.reused_tokens > 0
        answers.append((first.sequence.text, second.sequence.text, type(second.state)))
    assert answers[0][:2] == answers[1][:2]
    assert answers[0][2] is LeanState


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="spikingbrain")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_lean_by_default_same_answer_as_no_lean(sb_model_dir, capsys):
    base = ["generate", str(sb_model_dir), "--prompt", "The king", "--max-new-tokens", "12"]
    assert _run(base) == 0
    lean_out = capsys.readouterr().out
    assert _run(base + ["--no-lean"]) == 0
    assert capsys.readouterr().out == lean_out
    assert _run(base + ["--int8", "--kv", "int8", "--int4"]) == 0  # runs (different weights)
    with pytest.raises(SpikingBrainError, match="--no-lean"):
        _run(base + ["--no-lean", "--kv", "bf16"])


def test_cli_other_models_keep_their_step_with_a_note(llama_model_dir, capsys):
    assert _run(["generate", str(llama_model_dir), "--prompt", "The king", "--max-new-tokens", "3"]) == 0
    assert "model's own step" in capsys.readouterr().err
    with pytest.raises(SpikingBrainError, match="lean decode"):
        _run(["generate", str(llama_model_dir), "--prompt", "x", "--int4"])


@torch.inference_mode()
def test_lean_state_bytes_are_reported(lean_model, tokenizer):
    s = _alone(lean_model, tokenizer, tokenizer("word word", add_special_tokens=False)["input_ids"],
               SamplingParams(max_new_tokens=3))
    assert isinstance(s.state, LeanState)
    assert s.adapter.nbytes(s.state) == s.state.nbytes() > 0


def test_lean_default_respects_the_memory_bound(sb_model):
    from spikingbrain.decode.adapter import extra_bytes, lean_decoder
    from spikingbrain.serve.quantize import quantize_int8

    model = quantize_int8(copy.deepcopy(sb_model))[0]
    need = extra_bytes(model, "int8")
    assert need > 0 and extra_bytes(sb_model, "float") == 0
    assert "GiB" in enable_lean(model, max_extra_bytes=need - 1) and lean_decoder(model) is None
    assert enable_lean(model, max_extra_bytes=need) is None and lean_decoder(model).weights == "int8"
    plain = copy.deepcopy(sb_model)
    assert enable_lean(plain) is None  # float weights: the model's own tensors, shared
    dec = lean_decoder(plain)
    assert dec.head.weight.data_ptr() == plain.lm_head.weight.data_ptr()
