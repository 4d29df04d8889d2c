"""Tiny offline assets: a byte-level BPE tokenizer trained on the shipped text and tiny random
Llama / SpikingBrain models whose logits are sharp enough that argmax ties never happen."""
from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

VOCAB = 384


def _docs(n: int = 15) -> list[str]:
    raw = resources.files("spikingbrain").joinpath("data/train.jsonl").read_text("utf-8")
    return [json.loads(line)["text"][:2000] for line in raw.splitlines()[:n] if line.strip()]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_docs() + ["café naïve 東京 ☃"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_llama(tokenizer, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits: distinct argmaxes, a non-trivial distribution
        model.lm_head.weight.mul_(20)
    return model


def make_spikingbrain(tokenizer, seed: int = 0):
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(seed)
    cfg = SpikingBrainConfig.from_preset("tiny", vocab_size=VOCAB, eos_token_id=tokenizer.eos_token_id,
                                         bos_token_id=None, pad_token_id=tokenizer.pad_token_id, sliding_window=8)
    model = SpikingBrainForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def llama(tokenizer):
    return make_llama(tokenizer)


@pytest.fixture(scope="session")
def other_llama(tokenizer):
    return make_llama(tokenizer, seed=1)


@pytest.fixture(scope="session")
def spiking(tokenizer):
    return make_spikingbrain(tokenizer)


@pytest.fixture(scope="session")
def texts():
    from spikingbrain.evaluation.texts import shipped_texts

    return [t[:600] for t in shipped_texts("valid")[:3]]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer, llama):
    path = tmp_path_factory.mktemp("tiny-llama")
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
