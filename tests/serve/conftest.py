"""Tiny offline assets for the serving tests: a byte-level BPE tokenizer trained on the shipped
text (so multi-byte UTF-8 characters span several tokens) with a ChatML chat template, and tiny
random SpikingBrain / Llama models saved as model directories."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 512


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("spikingbrain").joinpath("data/train.jsonl").read_text("utf-8")
    docs = [json.loads(line)["text"][:4000] for line in text.splitlines()[:50] if line.strip()]
    docs.append("café naïve über 東京 — ünïcödé ☃ 😀")  # make sure multi-byte text is in the data
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, chat_template=CHATML)


def build_spikingbrain(tokenizer, seed: int = 0):
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(seed)
    cfg = SpikingBrainConfig.from_preset("tiny", vocab_size=VOCAB, eos_token_id=tokenizer.eos_token_id,
                                         bos_token_id=None, pad_token_id=tokenizer.pad_token_id, sliding_window=8)
    model = SpikingBrainForCausalLM(cfg).eval()
    _sharpen(model)
    return model


def build_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    _sharpen(model)
    return model


def _sharpen(model) -> None:
    """Random tiny models give almost flat logits, so greedy ties could hide batching bugs;
    larger head weights make the argmax decisive, and the EOS logit is pinned at 0 so answers run
    to max_tokens (stop/EOS are tested on purpose elsewhere)."""
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(20.0)
        head.weight[model.config.eos_token_id].zero_()  # logit 0: near the median, never the argmax in practice


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def sb_model(tokenizer):
    return build_spikingbrain(tokenizer)


@pytest.fixture(scope="session")
def llama_model(tokenizer):
    return build_llama(tokenizer)


@pytest.fixture(scope="session")
def sb_model_dir(tmp_path_factory, tokenizer, sb_model) -> Path:
    path = tmp_path_factory.mktemp("sb_model")
    sb_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Tiny models run fastest on one thread, and intra-op threads spin badly when the
    machine's 2 cores are shared; restored after this folder's tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


API_KEY = "test-key-123"


@pytest.fixture(scope="package")
def server(tokenizer, sb_model):
    """A running server on a free loopback port: tiny SpikingBrain model, an API key, small limits."""
    from spikingbrain.serve.protocol import Limits
    from spikingbrain.serve.server import BackgroundServer, create_app

    app = create_app(sb_model, tokenizer, model_name="tiny-sb", api_key=API_KEY, max_batch=16,
                     limits=Limits(max_request_bytes=8192, max_prompt_tokens=300, max_tokens_cap=64))
    with BackgroundServer(app) as srv:
        srv.api_key = API_KEY
        yield srv


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def llama_model_dir(tmp_path_factory, tokenizer, llama_model) -> Path:
    path = tmp_path_factory.mktemp("llama_model")
    llama_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
