"""Building what a recipe trains: the student, its tokenizer, and the frozen teacher.

- ``model.path``: any local Hugging Face causal LM directory (SpikingBrain or not), fp32.
- ``model.preset``: a randomly initialised ``SpikingBrainConfig.from_preset`` model (seeded by
  the recipe's ``seed``); needs ``model.tokenizer``.
- ``model.convert``: ``spikingbrain.convert_from_transformer(teacher, layout, sliding_window)``,
  its new output norms calibrated on the first training rows.

A teacher named both in ``model.convert.teacher`` and ``objective.teacher`` is loaded once: the
conversion copies its weights, so it can then serve frozen (``eval()``, no gradients) as the
distillation teacher.
"""
from __future__ import annotations

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.recipe import Recipe, resolve_path
from spikingbrain.train.tokenizer import load_tokenizer


def _teacher_key(spec: str) -> str:
    return "default" if spec in (None, "default") else resolve_path(spec)


def load_teachers(recipe: Recipe) -> dict[str, tuple[nn.Module, object]]:
    """``{key: (model, tokenizer)}`` for every teacher the recipe names."""
    from spikingbrain.convert import load_teacher

    wanted = []
    if recipe.model.convert is not None:
        wanted.append(recipe.model.convert.teacher)
    if recipe.objective.teacher is not None and recipe.objective.kl_weight > 0:
        wanted.append(recipe.objective.teacher)
    out = {}
    for spec in wanted:
        key = _teacher_key(spec)
        if key not in out:
            out[key] = load_teacher(None if key == "default" else key)
    return out


def resolve_tokenizer(recipe: Recipe, teachers: dict):
    m = recipe.model
    if m.tokenizer is not None:
        return load_tokenizer(m.tokenizer)
    if m.convert is not None:
        return teachers[_teacher_key(m.convert.teacher)][1]
    if m.path is not None:
        return load_tokenizer(None, fallback_dir=m.path)
    raise SpikingBrainError("recipe field model.tokenizer: required with model.preset (e.g. 'bytes' or a tokenizer dir)")


def build_student(recipe: Recipe, tokenizer, teachers: dict, calibration_ids: torch.Tensor | None) -> nn.Module:
    import spikingbrain  # noqa: F401  (registers SpikingBrain with the Auto classes)
    from transformers import AutoModelForCausalLM

    m = recipe.model
    torch.manual_seed(recipe.seed)
    if m.path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(resolve_path(m.path), dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError) as e:
            raise SpikingBrainError(f"recipe field model.path: could not load a causal LM: {e}") from None
    elif m.preset is not None:
        from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

        model = SpikingBrainForCausalLM(SpikingBrainConfig.from_preset(m.preset, **m.overrides))
    else:
        from spikingbrain.convert import convert_from_transformer

        c = m.convert
        teacher = teachers[_teacher_key(c.teacher)][0]
        model = convert_from_transformer(teacher, layout=c.layout, sliding_window=c.sliding_window,
                                         tokenizer=tokenizer, calibration_ids=calibration_ids, seed=recipe.seed)
        if hasattr(model, "tokenizer"):
            del model.tokenizer  # keep the module picklable/shardable; we hold the tokenizer
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise SpikingBrainError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab} "
            "(model.tokenizer / model.overrides.vocab_size)"
        )
    model.train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def distillation_teacher(recipe: Recipe, teachers: dict, device: torch.device) -> nn.Module | None:
    o = recipe.objective
    if o.kl_weight <= 0:
        return None
    teacher = teachers[_teacher_key(o.teacher)][0]
    teacher.eval().requires_grad_(False)
    if recipe.precision == "bf16" and device.type == "cuda":
        teacher.to(torch.bfloat16)
    return teacher.to(device)


def apply_spiking(model: nn.Module, recipe: Recipe) -> int:
    """Spike-aware training (``recipe.spiking``): ``spikify(..., ste=True)`` in place, before the
    trainable selection / LoRA (the parameters keep their names). Returns the number of spiking
    projections (0 without a ``spiking`` section)."""
    sp = recipe.spiking
    if sp is None:
        return 0
    try:
        from spikingbrain.spiking import spikify, spiking_layers
    except ImportError as e:
        raise SpikingBrainError(f"recipe field spiking: the spiking module is unavailable ({e})") from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise SpikingBrainError("recipe field spiking: needs a causal LM with decoder blocks at model.model.layers")
    names = {n for parent in layers.modules() for n, c in parent.named_children() if type(c) is nn.Linear}
    for i, name in enumerate(sp.exclude):
        if name not in names:
            raise SpikingBrainError(f"recipe field spiking.exclude[{i}]: no block projection is called {name!r} "
                                    f"(this model has {', '.join(sorted(names))})")
    spikify(model, k=sp.k, weight_bits=sp.weight_bits, group_size=sp.group_size, ste=True, clip=sp.clip,
            kv_bits=sp.kv_bits, exclude=sp.exclude)
    n = len(spiking_layers(model))
    if n == 0:
        where = "spiking.exclude" if sp.exclude else "spiking"
        raise SpikingBrainError(f"recipe field {where}: the model has no block projection (nn.Linear) left to spike")
    return n
