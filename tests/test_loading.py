"""Strict loading of native SpikingBrain directories (``spikingbrain.loader``): a checkpoint that
does not match its config is an error naming the problem, never a model with random tensors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from testutils import tiny_model
from transformers import AutoModelForCausalLM

from spikingbrain import SpikingBrainConfig, SpikingBrainError, SpikingBrainForCausalLM

LOADERS = [SpikingBrainForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained]


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(["gla", "swa", "gla+swa", "full"], seed=3)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def _edit_weights(d, fn):
    f = d / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_roundtrip_is_exact_and_buffers_are_rebuilt(saved):
    d, model = saved
    for load in LOADERS:
        loaded = load(d)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        # the RoPE frequencies are a non-persistent buffer: absent from the file, computed on load
        assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
        ids = torch.randint(0, 512, (2, 12))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_embeddings_load_without_a_stored_head(tmp_path):
    model = tiny_model(["gla", "swa"], tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_checkpoint_loads(saved, tmp_path):
    d, model = saved
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


BAD_WEIGHTS = {
    "missing": (lambda sd: sd.pop("model.layers.2.self_attn.merge"),
                r"nothing was loaded.*missing 1 tensor.*model\.layers\.2\.self_attn\.merge"),
    "unexpected": (lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
                   r"no place for.*model\.layers\.0\.self_attn\.extra\.weight"),
    "wrong shape": (lambda sd: sd.update({"model.norm.weight": torch.ones(63)}),
                    r"wrong shape.*model\.norm\.weight: \[63\] in the checkpoint, \[64\]"),
}


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_weights_that_do_not_fit_are_refused(saved, load, case):
    d, _ = saved
    edit, message = BAD_WEIGHTS[case]
    _edit_weights(d, edit)
    with pytest.raises(SpikingBrainError, match=message):
        load(d)


@pytest.mark.parametrize("load", LOADERS)
def test_truncated_file(saved, load):
    d, _ = saved
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(SpikingBrainError, match="truncated"):
        load(d)


@pytest.mark.parametrize("load", LOADERS)
def test_config_missing_a_field(saved, load):
    d, _ = saved
    _edit_config(d, lambda c: c.pop("layer_types"))
    with pytest.raises(SpikingBrainError, match="layer_types"):
        load(d)


def test_unknown_model_type(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(SpikingBrainError, match=r"model_type 'llama' is not a SpikingBrain format"):
        SpikingBrainForCausalLM.from_pretrained(tmp_path)


def test_not_a_directory_and_no_weights(tmp_path):
    with pytest.raises(SpikingBrainError, match="not a local model directory"):
        SpikingBrainForCausalLM.from_pretrained(tmp_path / "nowhere")
    SpikingBrainConfig.from_preset("tiny").save_pretrained(tmp_path)
    with pytest.raises(SpikingBrainError, match="no model weights"):
        SpikingBrainForCausalLM.from_pretrained(tmp_path)


def test_dtype_and_unsupported_options(saved):
    d, _ = saved
    assert SpikingBrainForCausalLM.from_pretrained(d, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert SpikingBrainForCausalLM.from_pretrained(d, torch_dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(SpikingBrainError, match="unsupported option"):
        SpikingBrainForCausalLM.from_pretrained(d, quantization_config={"bits": 4})
    with pytest.raises(SpikingBrainError, match="gla_swa"):
        SpikingBrainForCausalLM.from_pretrained(d, window_convention="sdpa")
