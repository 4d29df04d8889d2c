"""Finding and loading the model a user names on the command line."""
from __future__ import annotations

from pathlib import Path

from spikingbrain.errors import SpikingBrainError

DEFAULT_MODEL_DIR = Path("spikingbrain-demo") / "model"  # what `spikingbrain demo` writes (cwd-relative)


def resolve_model_dir(model: str | None) -> Path:
    """The model directory to use: the one given, else the demo's output if it exists."""
    if model is None:
        if (DEFAULT_MODEL_DIR / "config.json").is_file():
            return DEFAULT_MODEL_DIR
        raise SpikingBrainError(
            f"no MODEL given and no demo model at ./{DEFAULT_MODEL_DIR}: run `spikingbrain demo` first "
            "or pass a model directory (config.json + weights + tokenizer)"
        )
    path = Path(model)
    if not path.is_dir():
        raise SpikingBrainError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise SpikingBrainError(f"{str(path)!r} has no config.json: not a saved model directory")
    return path


def load_model(model: str | None, dtype: str = "fp32", int8: bool = False):
    """``(model, tokenizer, path)`` from a model directory (AutoModelForCausalLM + AutoTokenizer;
    ``import spikingbrain`` registers SpikingBrain with the Auto classes)."""
    import spikingbrain  # noqa: F401  (Auto registration)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikingbrain.layers.projections import fuse_projections
    from spikingbrain.serve.quantize import cast_dtype, quantize_int8

    path = resolve_model_dir(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise SpikingBrainError(f"could not load a tokenizer from {str(path)!r}: {e}") from None
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    except SpikingBrainError:
        raise
    except Exception as e:
        raise SpikingBrainError(f"could not load a model from {str(path)!r}: {type(e).__name__}: {e}") from None
    lm.eval()
    fuse_projections(lm)  # inference only: one matmul for q/k/v and one for gate/up
    if int8:
        if dtype != "fp32":
            raise SpikingBrainError("--int8 runs int8 weights with fp32 activations; do not combine it with --dtype")
        lm, _ = quantize_int8(lm)
    else:
        lm = cast_dtype(lm, dtype)
    return lm, tokenizer, path
