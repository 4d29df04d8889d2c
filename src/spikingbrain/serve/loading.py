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


def load_model(model: str | None, dtype: str = "fp32", int8: bool = False, progress: bool = True):
    """``(model, tokenizer, path)`` from a model directory, ready for inference (q/k/v and gate/up
    fused). SpikingBrain directories (this package's format or the released ``gla_swa``
    checkpoints) are streamed from disk: with ``int8`` every linear is quantized as soon as its
    weights are read, with ``dtype="bf16"`` weights are converted on the way, so peak memory stays
    near the final model's size (a 7B loads in int8 in ~8 GB). Other causal LMs go through
    ``AutoModelForCausalLM`` (``import spikingbrain`` registers the Auto classes)."""
    import spikingbrain  # noqa: F401  (Auto registration)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikingbrain.layers.projections import fuse_projections
    from spikingbrain.loader import FORMATS, load_pretrained, read_config
    from spikingbrain.serve.quantize import (
        DTYPES,
        cast_dtype,
        int8_linear,
        quantize_int8,
        streaming_int8_hooks,
        warn_if_slow_bf16,
    )

    path = resolve_model_dir(model)
    if int8 and dtype != "fp32":
        raise SpikingBrainError("--int8 runs int8 weights with fp32 activations; do not combine it with --dtype")
    if dtype not in DTYPES:
        raise SpikingBrainError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise SpikingBrainError(f"could not load a tokenizer from {str(path)!r}: {e}") from None
    if read_config(path).get("model_type") in FORMATS:
        if int8 and _spiking(path):
            raise SpikingBrainError("this model is in its spiking INT8 form already (spiking weights and "
                                    "activations); run it without --int8")
        hooks = streaming_int8_hooks() if int8 else (None, None)
        lm = load_pretrained(path, dtype=DTYPES[dtype], fuse=True, dtype_for=hooks[0], on_module=hooks[1],
                             progress=progress)
        if int8 and lm.config.tie_word_embeddings:  # a tied head is not streamed: quantize it now
            lm.lm_head = int8_linear(lm.lm_head)[0]
        if dtype == "bf16":
            warn_if_slow_bf16()
        return lm, tokenizer, path
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    except SpikingBrainError:
        raise
    except Exception as e:
        raise SpikingBrainError(f"could not load a model from {str(path)!r}: {type(e).__name__}: {e}") from None
    lm.eval()
    fuse_projections(lm)  # inference only: one matmul for q/k/v and one for gate/up
    if int8:
        lm, _ = quantize_int8(lm)
    else:
        lm = cast_dtype(lm, dtype)
    return lm, tokenizer, path


def _spiking(path: Path) -> bool:
    """Whether the directory holds a model in its spiking form (read from headers only)."""
    from spikingbrain.loader import plan_for
    from spikingbrain.weights import CheckpointFiles

    with CheckpointFiles(path) as files:
        return bool(plan_for(path, files, {}).config.spiking)
