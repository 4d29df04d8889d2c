"""Shared fixtures: a tiny Llama with the byte tokenizer, small text and chat corpora."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src"
SHIPPED = SRC / "spikingbrain" / "data" / "train.jsonl"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 32, vocab 260) saved with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain.train.tokenizer import byte_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=256, pad_token_id=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    """train/valid JSONL of real text: the first shipped documents, cut to 300 characters."""
    d = tmp_path_factory.mktemp("text")
    docs = []
    with open(SHIPPED) as f:
        for line in f:
            docs.append(json.loads(line)["text"][:300])
            if len(docs) == 80:
                break
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:64]))
    (d / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[64:]))
    return {"train": d / "train.jsonl", "valid": d / "valid.jsonl"}


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat")
    rows = []
    for i in range(40):
        rows.append({"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]})
    p = d / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a shared, busy machine);
    subprocesses get OMP_NUM_THREADS=1 (set by the tests; torchrun's default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
