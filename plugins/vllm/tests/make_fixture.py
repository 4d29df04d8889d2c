#!/usr/bin/env python3
"""Regenerate tests/fixtures/tiny: a tiny SpikingBrain checkpoint (head dim 32) and the reference
outputs of the MAIN package for it, which the plugin's tests compare vLLM against.

Run from the repository root in the main package's environment (not the vLLM one):

    PYTHONPATH=$PWD/src python3 plugins/vllm/tests/make_fixture.py

Writes ``tiny/`` (config.json, model.safetensors, tokenizer files: a byte-level BPE with 384
tokens trained on the shipped text) and ``reference.safetensors``:
``prompt_<i>`` the prompt ids; ``logprobs_<i>`` log-softmax of the logits at every prompt position
[T, V] with the checkpoint's window (8 keys); ``logprobs_w9_<i>`` the same with a 9-key window
(what an off-by-one in the window convention would give); ``greedy_<i>`` 16 greedily generated
tokens (main package, its own decode cache); ``greedy_logprobs_<i>`` their log-probabilities;
``logprobs_full_<i>`` prompt log-softmax with the last layer as full attention (``FULL_LAYOUT``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

OUT = Path(__file__).resolve().parent / "fixtures"
DATA = Path(__file__).resolve().parents[3] / "src" / "spikingbrain" / "data" / "train.jsonl"
WINDOW = 8
PROMPT_LENGTHS = [1, 5, 8, 9, 23, 70]  # 1 token; shorter than, equal to, one past the window; > a 64-token chunk
NEW_TOKENS = 16
MIN_GAP = 0.02
FULL_LAYOUT = ("gla", "swa", "gla", "full")  # same weights, last layer full causal attention


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines()[:400]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_config(vocab_size: int, window: int, layer_types=("gla", "swa", "gla", "swa")) -> SpikingBrainConfig:
    return SpikingBrainConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=True, tie_word_embeddings=False, layer_types=list(layer_types),
        sliding_window=window, initializer_range=0.15, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )


@torch.no_grad()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@torch.no_grad()
def greedy(model, ids: list[int]) -> tuple[list[int], list[float], float]:
    """Greedy decoding through the main package's own cache (prefill, then one token a step).
    Also returns the smallest gap between the best and second-best log-probability on the way."""
    cache = model.new_cache()
    logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    out, lps, gap = [], [], float("inf")
    for _ in range(NEW_TOKENS):
        lp = torch.log_softmax(logits.float(), -1)
        top = lp.topk(2).values
        gap = min(gap, float(top[0] - top[1]))
        t = int(lp.argmax())
        out.append(t)
        lps.append(float(lp[t]))
        logits = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out, lps, gap


def main() -> None:
    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = tiny_config(len(tok), WINDOW)
    model = SpikingBrainForCausalLM(cfg).eval()
    # GLA gates start near log(0.5)/16; spread them so some channels forget fast and some slowly
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "gk_proj"):
            torch.nn.init.normal_(layer.self_attn.gk_proj[1].bias, 0.0, 3.0)
    tiny = OUT / "tiny"
    model.save_pretrained(tiny)
    tok.save_pretrained(tiny)

    wide = SpikingBrainForCausalLM(tiny_config(len(tok), WINDOW + 1)).eval()
    wide.load_state_dict(model.state_dict())
    full = SpikingBrainForCausalLM(tiny_config(len(tok), WINDOW, FULL_LAYOUT)).eval()
    full.load_state_dict(model.state_dict())
    rng = random.Random(0)
    ref = {}
    for i, n in enumerate(PROMPT_LENGTHS):
        # greedy continuations are compared token for token: draw prompts until no step is a
        # near-tie (a gap under MIN_GAP could flip on float rounding in either implementation)
        for _ in range(100):
            ids = [rng.randrange(1, len(tok)) for _ in range(n)]
            toks, lps, gap = greedy(model, ids)
            if gap >= MIN_GAP:
                break
        else:
            raise SystemExit(f"no prompt of {n} tokens without a near-tie in 100 draws")
        ref[f"prompt_{i}"] = torch.tensor(ids)
        ref[f"logprobs_{i}"] = prompt_logprobs(model, ids)
        ref[f"logprobs_w9_{i}"] = prompt_logprobs(wide, ids)
        ref[f"greedy_{i}"] = torch.tensor(toks)
        ref[f"greedy_logprobs_{i}"] = torch.tensor(lps)
        ref[f"logprobs_full_{i}"] = prompt_logprobs(full, ids)
        print(f"prompt {i}: {n} tokens, greedy {toks[:6]}..., smallest greedy gap {gap:.4f}")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(OUT / "reference.safetensors"),
              metadata={"window": str(WINDOW), "new_tokens": str(NEW_TOKENS)})
    print(f"wrote {tiny} and {OUT / 'reference.safetensors'}")


if __name__ == "__main__":
    main()
