import argparse
import io
import sys

import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve import cli
from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids
from spikingbrain.serve.loading import load_model
from spikingbrain.serve.quantize import Int8Linear, quantize_int8
from spikingbrain.serve.sampling import SamplingParams


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="spikingbrain")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_streams_the_greedy_answer(sb_model_dir, sb_model, tokenizer, capsys):
    assert _run(["generate", str(sb_model_dir), "--prompt", "The king", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    ids = tokenizer("The king", add_special_tokens=False)["input_ids"]
    ref = TextStreamer(sb_model, tokenizer, ids, SamplingParams(max_new_tokens=12))
    list(ref)
    assert out == ref.sequence.text + "\n"
    assert "12 generated" in err and "finish=length" in err


def test_generate_with_chat_template_stop_and_prompt_file(sb_model_dir, sb_model, tokenizer, tmp_path, capsys):
    msgs = [{"role": "user", "content": "Hi"}]
    ref = TextStreamer(sb_model, tokenizer, chat_prompt_ids(tokenizer, msgs), SamplingParams(max_new_tokens=20))
    text = "".join(ref)
    stop = text[8:11]
    f = tmp_path / "prompt.txt"
    f.write_text("Hi", encoding="utf-8")
    assert _run(["generate", str(sb_model_dir), "--prompt-file", str(f), "--chat", "--max-new-tokens", "20",
                 "--stop", stop]) == 0
    out, err = capsys.readouterr()
    assert out == text[:text.find(stop)] + "\n"
    assert "finish=stop" in err


def test_missing_default_model_tells_to_run_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpikingBrainError, match="spikingbrain demo"):
        _run(["generate", "--prompt", "x"])
    with pytest.raises(SpikingBrainError, match="does not exist"):
        _run(["generate", str(tmp_path / "nope"), "--prompt", "x"])


def test_default_model_is_the_demo_output(tmp_path, monkeypatch, sb_model, tokenizer, capsys):
    demo = tmp_path / "spikingbrain-demo" / "model"
    sb_model.save_pretrained(demo)
    tokenizer.save_pretrained(demo)
    monkeypatch.chdir(tmp_path)
    assert _run(["generate", "--prompt", "A", "--max-new-tokens", "3"]) == 0
    assert "3 generated" in capsys.readouterr().err


def test_chat_streams_resets_and_exits(sb_model_dir, sb_model, tokenizer, monkeypatch, capsys):
    lines = iter(["Hello", "/reset", "Hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert _run(["chat", str(sb_model_dir), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    ref = TextStreamer(sb_model, tokenizer, chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hello"}]),
                       SamplingParams(max_new_tokens=6))
    answer = "".join(ref)
    # after /reset the same question gets the same first answer
    assert out.count("assistant> " + answer + "\n") == 2
    assert "[conversation reset]" in err


@pytest.mark.parametrize("which", ["spikingbrain", "llama"])
def test_bf16_path(which, sb_model_dir, llama_model_dir, sb_model, llama_model):
    """The loaded bf16 model computes what the in-memory model fused and cast to bf16 here
    computes, to 2 bf16 ulps of the largest logit (one rounding of a fused matmul)."""
    import copy

    from spikingbrain.layers.projections import fuse_projections

    path, ref_model = (sb_model_dir, sb_model) if which == "spikingbrain" else (llama_model_dir, llama_model)
    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(ref_model)
    fuse_projections(ref)
    ref = ref.to(torch.bfloat16)
    with torch.no_grad():
        want = ref(input_ids=ids).logits.float()
        bf16, _, _ = load_model(str(path), dtype="bf16")
        assert bf16.lm_head.weight.dtype == torch.bfloat16
        out = bf16(input_ids=ids).logits.float()
    ulp = 2.0 ** (torch.floor(torch.log2(want.abs().max())).item() - 7)
    torch.testing.assert_close(out, want, rtol=0, atol=2 * ulp)


def test_int8_path(sb_model_dir, sb_model):
    """The streamed int8 load equals quantizing the in-memory model (fused) here, exactly."""
    import copy

    from spikingbrain.layers.projections import fuse_projections

    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(sb_model)
    fuse_projections(ref)
    ref, _ = quantize_int8(ref)
    with torch.no_grad():
        q, _, _ = load_model(str(sb_model_dir), int8=True)
        assert not isinstance(q.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)  # fused, then int8
        assert not isinstance(q.lm_head, torch.nn.Linear)  # the head is int8 too by default
        # the (tied) embedding table is untouched
        assert torch.equal(q.get_input_embeddings().weight, sb_model.get_input_embeddings().weight)
        out = q(input_ids=ids).logits
        assert torch.equal(out, ref(input_ids=ids).logits)
        full = sb_model(input_ids=ids).logits
    assert (out - full).abs().max() < 0.05 * full.abs().max()  # and int8 stays near fp32


def test_int8_can_keep_the_head_in_float(sb_model):
    import copy

    q, _ = quantize_int8(copy.deepcopy(sb_model), head=False)
    assert isinstance(q.lm_head, torch.nn.Linear)
    assert not isinstance(q.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_weight_only_int8_linear_matches():
    lin = torch.nn.Linear(64, 32)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (32, 1)
    torch.testing.assert_close(q(x), lin(x), atol=0.02, rtol=0.02)


def test_int8_with_bf16_is_rejected(sb_model_dir):
    with pytest.raises(SpikingBrainError, match="int8"):
        load_model(str(sb_model_dir), dtype="bf16", int8=True)


def test_serve_refuses_bad_limits(sb_model_dir):
    with pytest.raises(SpikingBrainError, match="max-batch"):
        _run(["serve", str(sb_model_dir), "--max-batch", "0"])


@pytest.mark.parametrize("argv,env", [(["--api-key", ""], {}), (["--api-key", "  "], {}), ([], {"SPIKINGBRAIN_API_KEY": ""})])
def test_serve_refuses_an_empty_api_key(sb_model_dir, monkeypatch, argv, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SpikingBrainError, match="API key is empty"):
        _run(["serve", str(sb_model_dir), *argv])


def test_serve_allowed_hosts_default_and_flag():
    assert cli._allowed_hosts(None, "127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert cli._allowed_hosts(None, "192.168.1.5") == ["localhost", "127.0.0.1", "::1", "192.168.1.5"]
    assert cli._allowed_hosts("chat.lan, 10.0.0.2", "0.0.0.0") == ["chat.lan", "10.0.0.2"]
    with pytest.raises(SpikingBrainError):
        cli._allowed_hosts(" , ", "127.0.0.1")
