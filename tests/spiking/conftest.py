"""Tiny offline models for the spiking tests (hidden 64, random weights)."""
from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

VOCAB = 320


def make_spikingbrain(preset: str = "tiny", seed: int = 0, **overrides):
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(seed)
    cfg = SpikingBrainConfig.from_preset(preset, vocab_size=VOCAB, sliding_window=8, **overrides)
    return SpikingBrainForCausalLM(cfg).eval()


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = resources.files("spikingbrain").joinpath("data/train.jsonl").read_text("utf-8")
    docs = [json.loads(line)["text"][:2000] for line in raw.splitlines()[:10] if line.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 24), generator=g)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()
