"""The command-line tools on a released-format (``gla_swa``) directory, and the streamed inference
loading (``serve/loading.py``: int8 linears quantized as they are read, bf16 converted on the way)
against loading the whole model first and converting it afterwards."""
from __future__ import annotations

import json
import warnings
from importlib import resources

import pytest
import torch
from official_ref import official_config, official_weights, write_official
from torch.ao.quantization import quantize_dynamic
from transformers import AutoModelForCausalLM

from spikingbrain.cli import main
from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.projections import fuse_projections
from spikingbrain.serve.loading import load_model
from spikingbrain.serve.quantize import Fp32Embedding

# tests/serve/conftest.py's VOCAB, not imported: under pytest the module name `conftest` can be
# another directory's conftest (tests/evaluation's has VOCAB = 384), depending on test order
VOCAB = 512
CFG = official_config(vocab=VOCAB, window=8)


def _official_dir(root, tokenizer, dtype, w8aspike=False, seed=1):
    assert len(tokenizer) <= VOCAB
    cfg = {**CFG, "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"}
    d = write_official(root, cfg, official_weights(cfg, seed=seed, w8aspike=w8aspike), dtype=dtype)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, tokenizer):
    return _official_dir(tmp_path_factory.mktemp("official"), tokenizer, torch.float32)


@pytest.fixture(scope="module")
def official_bf16_dir(tmp_path_factory, tokenizer):
    return _official_dir(tmp_path_factory.mktemp("official_bf16"), tokenizer, torch.bfloat16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_streamed_int8_equals_quantizing_the_loaded_model(request, stored):
    d = request.getfixturevalue("official_dir" if stored == "fp32" else "official_bf16_dir")
    streamed, _, _ = load_model(str(d), int8=True, progress=False)
    whole = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    fuse_projections(whole)
    names = {n for n, m in whole.named_modules() if type(m) is torch.nn.Linear}
    with warnings.catch_warnings():  # torch's own dynamic quantization of the whole fp32 model
        warnings.simplefilter("ignore")
        quantize_dynamic(whole, qconfig_spec=names, dtype=torch.qint8, inplace=True)
    # a bf16 table stays bf16 (lookups are exact either way); an fp32 one stays fp32
    emb = streamed.model.embed_tokens
    assert isinstance(emb, Fp32Embedding) == (stored == "bf16")
    assert torch.equal(_logits(streamed, IDS), _logits(whole, IDS))
    assert not any(type(m) is torch.nn.Linear for m in streamed.modules())  # head included


def test_streamed_bf16_equals_casting_the_loaded_model(official_dir):
    streamed, _, _ = load_model(str(official_dir), dtype="bf16", progress=False)
    assert streamed.dtype == torch.bfloat16 and hasattr(streamed.model.layers[0].self_attn, "qkv_proj")
    whole = AutoModelForCausalLM.from_pretrained(official_dir, dtype=torch.bfloat16).eval()
    fuse_projections(whole)
    assert torch.equal(_logits(streamed, IDS), _logits(whole, IDS))


def test_generate_chat_eval_spikes_accept_an_official_directory(official_dir, tmp_path, capsys):
    for extra in ([], ["--int8"], ["--dtype", "bf16"]):
        assert main(["generate", str(official_dir), "--prompt", "The sea", "--max-new-tokens", "4", *extra]) == 0
        assert "4 generated" in capsys.readouterr().err
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"text": "It is a truth universally acknowledged, that a single man."}) + "\n")
    out = tmp_path / "eval.json"
    assert main(["eval", str(official_dir), "--suite", "ppl", "--data", str(data), "--context-length", "16",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["model"]["ppl"]["ppl"] > 1
    valid = resources.files("spikingbrain").joinpath("data/valid.jsonl")
    assert main(["spikes", str(official_dir), "--text", str(valid), "--ks", "3", "--max-tokens", "100",
                 "--seq-len", "50"]) == 0
    assert "baseline ppl" in capsys.readouterr().out


def test_chat_accepts_an_official_directory(official_dir, monkeypatch, capsys):
    lines = iter(["Hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(official_dir), "--temperature", "0", "--max-new-tokens", "3"]) == 0
    assert str(official_dir) in capsys.readouterr().err


def test_w8aspike_directory_runs_and_refuses_int8(tmp_path, tokenizer, capsys):
    d = _official_dir(tmp_path / "w8", tokenizer, torch.float32, w8aspike=True)
    assert main(["generate", str(d), "--prompt", "The sea", "--max-new-tokens", "3"]) == 0
    with pytest.raises(SpikingBrainError, match="spiking INT8 form already"):
        load_model(str(d), int8=True)
