"""Model specs on the command line -> ``(model, tokenizer)``: ``default`` (the embedded teacher),
a ``.gguf`` file, or a local Hugging Face model directory (SpikingBrain or any causal LM)."""
from __future__ import annotations

from pathlib import Path

import torch

from spikingbrain.errors import SpikingBrainError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_spikingbrain(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "spikingbrain"


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """Load ``spec`` for evaluation (eval mode, on ``device``); returns ``(model, tokenizer)``."""
    if dtype not in DTYPES:
        raise SpikingBrainError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(spec).expanduser()
    if spec.lower() in ("default", "smollm2") or path.suffix == ".gguf":
        from spikingbrain import load_teacher

        model, tokenizer = load_teacher(spec, dtype=DTYPES[dtype])
    else:
        if not (path / "config.json").is_file():
            raise SpikingBrainError(f"{spec}: not a model directory (no config.json), a .gguf file, or 'default'")
        import spikingbrain  # noqa: F401  (registers SpikingBrain with the Auto classes)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise SpikingBrainError(f"could not load {path}: {type(e).__name__}: {e}") from e
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise SpikingBrainError(f"device {device!r} is not available")
    return model.to(device).eval(), tokenizer
