"""Training recipes: a YAML file read into typed dataclasses and checked before any work.

Every field is declared below with its type and default. ``load_recipe`` rejects unknown keys,
wrong types, missing files and inconsistent settings with a ``SpikingBrainError`` that names the
field (``optim.lr``, ``data.stages[1].seq_len``...), so a bad recipe fails in a second instead of
after the model has loaded.

Paths are taken relative to the current directory; ``package:data/train.jsonl`` names a file
shipped inside the ``spikingbrain`` package (so the example recipes run from anywhere).
YAML reads ``1e-4`` as a string; number fields accept such strings.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import yaml

from spikingbrain.errors import SpikingBrainError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("7b", "full", "76b")


@dataclass
class ConvertSpec:
    """Build the student by converting a Transformer (``spikingbrain.convert_from_transformer``)."""

    teacher: str = "default"  # "default" (the embedded SmolLM2) or a HF model dir / .gguf path
    layout: Union[str, list[str]] = "7b"  # "7b" | "full" | "76b" | explicit layer_types list
    sliding_window: int | None = None


@dataclass
class ModelSection:
    """Exactly one of ``path``, ``preset`` or ``convert``."""

    path: str | None = None
    preset: str | None = None
    convert: ConvertSpec | None = None
    overrides: dict = field(default_factory=dict)  # config fields applied to a preset
    tokenizer: str | None = None  # "bytes" | "default" | a dir; None: the model's / teacher's


@dataclass
class Stage:
    """One sequence-length stage; give ``steps`` or ``tokens`` (rounded up to whole steps)."""

    seq_len: int
    steps: int | None = None
    tokens: int | None = None


@dataclass
class DataSection:
    train: list[str]
    valid: list[str] = field(default_factory=list)
    valid_fraction: float = 0.0  # held out from `train` by a seeded hash of each document
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    text_sample_by: Literal["document", "paragraph", "line"] = "document"
    seq_len: int = 512
    stages: list[Stage] = field(default_factory=list)
    streaming: bool = False
    shuffle_buffer: int = 10000
    max_documents: int | None = None


@dataclass
class ObjectiveSection:
    type: Literal["cpt", "sft"] = "cpt"
    ce_weight: float = 1.0
    kl_weight: float = 0.0
    kl_temperature: float = 1.0
    teacher: str | None = None  # "default" | a path; required when kl_weight > 0


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final LR of cosine / WSD as a fraction of `lr`
    warmup_steps: int = 0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying at the end
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping (the norm is still measured and logged)
    grad_accum: int = 1
    batch_size: int = 8  # global batch in rows, over all processes and accumulation steps


@dataclass
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainableSection:
    params: Union[str, list[str]] = "all"  # "all" | "attention" | "none" | list of regexes
    lora: LoRASpec | None = None


@dataclass
class CheckpointSection:
    every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    dir: str | None = None  # default: {out}/checkpoints


@dataclass
class EvalSection:
    every: int = 0  # steps; 0: only at the end
    max_tokens: int = 65536


@dataclass
class LogSection:
    every: int = 1
    jsonl: str | None = None  # default: {out}/metrics.jsonl
    tensorboard: bool = False
    progress: bool = True


@dataclass
class SpikingSection:
    """Spike-aware fine-tuning: the student trains through its spiking forward (``spikify(...,
    ste=True)``): every block projection's input is spike-coded (adaptive threshold, integer
    counts) and its weight fake-quantized (symmetric, per output row and group of inputs), both
    with straight-through gradients, so the float master weights train (QAT). Embeddings and
    LM head stay float. Checkpoints and the export hold plain float weights: ``spikify`` the
    exported model with the same settings to run it spiking."""

    k: float = 3.0  # threshold V_th = mean|x| / k
    weight_bits: int | None = 8  # 2..8; null: float weights (spikes only)
    group_size: int = 128  # inputs per weight scale
    kv_bits: int | None = 8  # INT8 keys/values of SWA / softmax mixers; null: float
    clip: int | None = None  # clamp spike counts to [-clip, clip]; null: no clamp
    exclude: list[str] = field(default_factory=list)  # projections left float, e.g. [down_proj]


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    out: str = "runs/train"
    steps: int | None = None  # total optimizer steps (or the sum of data.stages)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainable: TrainableSection = field(default_factory=TrainableSection)
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_checkpointing: bool = False
    compile: bool = False
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    # ranks that split each sequence (context parallelism, spikingbrain.parallel): the processes
    # form a [world / N, N] data x context mesh; every N consecutive ranks share batch rows
    context_parallel: int = 1
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    seed: int = 0
    spiking: SpikingSection | None = None
    export: bool = True  # save_pretrained the final model + tokenizer to {out}/final

    # ------------------------------------------------------------------ derived
    def stage_plan(self) -> list[tuple[int, int]]:
        """``[(seq_len, steps), ...]`` for the whole run."""
        if not self.data.stages:
            return [(self.data.seq_len, int(self.steps or 0))]
        plan = []
        for st in self.data.stages:
            steps = st.steps if st.steps is not None else -(-st.tokens // (self.optim.batch_size * st.seq_len))
            plan.append((st.seq_len, steps))
        return plan

    @property
    def total_steps(self) -> int:
        return sum(s for _, s in self.stage_plan())

    def seq_len_at(self, step: int) -> int:
        """Sequence length used by optimizer step ``step`` (0-indexed)."""
        end = 0
        for seq_len, steps in self.stage_plan():
            end += steps
            if step < end:
                return seq_len
        return self.stage_plan()[-1][0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(tp, str(tp))


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp``; return it converted (numbers, nested
    dataclasses). Raises SpikingBrainError naming ``where``."""
    origin = typing.get_origin(tp)
    bad = SpikingBrainError(f"recipe field {where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except SpikingBrainError as e:
                if len([x for x in args if x is not type(None)]) == 1:
                    raise e
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad from None
            if not f.is_integer():
                raise bad
            return int(f)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp}")  # a bug in this file, not user input


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise SpikingBrainError(
            f"recipe field {prefix}{unknown[0]}: unknown key; {where or 'the recipe'} accepts {', '.join(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpikingBrainError(f"recipe field {path}: required but missing")
    return cls(**kwargs)


def resolve_path(p: str) -> str:
    """``package:REL`` -> a file inside the installed package; anything else as given."""
    if p.startswith("package:"):
        return str(PACKAGE_ROOT / p[len("package:"):])
    return os.path.expanduser(p)


def _expand(patterns: list[str], where: str) -> list[str]:
    files = []
    for i, pat in enumerate(patterns):
        p = resolve_path(pat)
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.exists(p) else [])
        if not hits:
            raise SpikingBrainError(f"recipe field {where}[{i}]: no such file {pat!r}")
        files.extend(hits)
    return files


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``--set a.b=value``: the value is parsed as YAML (``--set optim.lr=1e-4``)."""
    for item in overrides:
        if "=" not in item:
            raise SpikingBrainError(f"--set {item!r}: expected key=value")
        key, val = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise SpikingBrainError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(val)
    return raw


def parse_recipe(raw: dict, *, check_files: bool = True) -> Recipe:
    """Turn a plain dict into a validated Recipe (see the module docstring)."""
    if not isinstance(raw, dict):
        raise SpikingBrainError("a recipe must be a YAML mapping of sections")
    r: Recipe = _build(Recipe, raw, "")
    _validate(r, check_files)
    return r


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, out: str | None = None,
                *, check_files: bool = True) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise SpikingBrainError(f"recipe {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpikingBrainError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    raw = apply_overrides(raw, list(overrides or []))
    if out is not None:
        raw["out"] = out
    return parse_recipe(raw, check_files=check_files)


def _positive(value, where: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise SpikingBrainError(f"recipe field {where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate(r: Recipe, check_files: bool) -> None:
    m = r.model
    given = [k for k in ("path", "preset", "convert") if getattr(m, k) is not None]
    if len(given) != 1:
        raise SpikingBrainError(
            f"recipe field model: give exactly one of path, preset, convert (got {', '.join(given) or 'none'})"
        )
    if m.convert is not None and isinstance(m.convert.layout, str) and m.convert.layout not in LAYOUTS:
        raise SpikingBrainError(f"recipe field model.convert.layout: expected one of {LAYOUTS} or a list, got {m.convert.layout!r}")
    if m.overrides and m.preset is None:
        raise SpikingBrainError("recipe field model.overrides: only applies to model.preset")
    d = r.data
    _positive(d.seq_len, "data.seq_len")
    if not 0.0 <= d.valid_fraction < 1.0:
        raise SpikingBrainError(f"recipe field data.valid_fraction: must be in [0, 1), got {d.valid_fraction}")
    if d.valid and d.valid_fraction:
        raise SpikingBrainError("recipe field data.valid_fraction: give data.valid or data.valid_fraction, not both")
    if not d.train:
        raise SpikingBrainError("recipe field data.train: needs at least one file")
    _positive(d.shuffle_buffer, "data.shuffle_buffer")
    _positive(d.max_documents, "data.max_documents")
    for i, st in enumerate(d.stages):
        _positive(st.seq_len, f"data.stages[{i}].seq_len")
        if (st.steps is None) == (st.tokens is None):
            raise SpikingBrainError(f"recipe field data.stages[{i}]: give exactly one of steps, tokens")
        _positive(st.steps, f"data.stages[{i}].steps")
        _positive(st.tokens, f"data.stages[{i}].tokens")
    if d.stages:
        if r.steps is not None and r.steps != r.total_steps:
            raise SpikingBrainError(
                f"recipe field steps: {r.steps} disagrees with the {r.total_steps} steps of data.stages (drop one)"
            )
    elif r.steps is None:
        raise SpikingBrainError("recipe field steps: required when data.stages is not given")
    _positive(r.steps, "steps")
    o = r.objective
    _positive(o.kl_temperature, "objective.kl_temperature")
    _positive(o.ce_weight, "objective.ce_weight", allow_zero=True)
    _positive(o.kl_weight, "objective.kl_weight", allow_zero=True)
    if o.ce_weight == 0 and o.kl_weight == 0:
        raise SpikingBrainError("recipe field objective.ce_weight: ce_weight and kl_weight are both 0")
    if o.kl_weight > 0 and o.teacher is None:
        raise SpikingBrainError("recipe field objective.teacher: required when objective.kl_weight > 0")
    op = r.optim
    _positive(op.lr, "optim.lr")
    _positive(op.warmup_steps, "optim.warmup_steps", allow_zero=True)
    _positive(op.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(op.grad_clip, "optim.grad_clip", allow_zero=True)
    _positive(op.grad_accum, "optim.grad_accum")
    _positive(op.batch_size, "optim.batch_size")
    if not 0.0 <= op.min_lr_ratio <= 1.0:
        raise SpikingBrainError(f"recipe field optim.min_lr_ratio: must be in [0, 1], got {op.min_lr_ratio}")
    if not 0.0 < op.decay_fraction <= 1.0:
        raise SpikingBrainError(f"recipe field optim.decay_fraction: must be in (0, 1], got {op.decay_fraction}")
    if len(op.betas) != 2 or not all(0.0 <= b < 1.0 for b in op.betas):
        raise SpikingBrainError(f"recipe field optim.betas: expected two numbers in [0, 1), got {op.betas}")
    if op.batch_size % op.grad_accum:
        raise SpikingBrainError(
            f"recipe field optim.batch_size: {op.batch_size} is not divisible by optim.grad_accum={op.grad_accum}"
        )
    t = r.trainable
    if isinstance(t.params, str) and t.params not in ("all", "attention", "none"):
        raise SpikingBrainError(f"recipe field trainable.params: expected all | attention | none | a list of regexes, got {t.params!r}")
    if isinstance(t.params, list):
        import re

        for i, pat in enumerate(t.params):
            try:
                re.compile(pat)
            except re.error as e:
                raise SpikingBrainError(f"recipe field trainable.params[{i}]: bad regex {pat!r}: {e}") from None
    if t.lora is not None:
        _positive(t.lora.rank, "trainable.lora.rank")
        if not 0.0 <= t.lora.dropout < 1.0:
            raise SpikingBrainError(f"recipe field trainable.lora.dropout: must be in [0, 1), got {t.lora.dropout}")
        if not t.lora.targets:
            raise SpikingBrainError("recipe field trainable.lora.targets: needs at least one module name")
    if t.params == "none" and t.lora is None:
        raise SpikingBrainError("recipe field trainable.params: 'none' leaves nothing to train (add trainable.lora)")
    _positive(r.context_parallel, "context_parallel")
    if r.context_parallel > 1:
        if r.distributed == "none":
            raise SpikingBrainError("recipe field context_parallel: needs distributed: ddp or fsdp")
        if r.compile or r.grad_checkpointing:
            raise SpikingBrainError("recipe field context_parallel: cannot be combined with compile or "
                                    "grad_checkpointing")
    _positive(r.checkpoint.every, "checkpoint.every", allow_zero=True)
    _positive(r.checkpoint.keep_last, "checkpoint.keep_last")
    _positive(r.eval.every, "eval.every", allow_zero=True)
    _positive(r.eval.max_tokens, "eval.max_tokens")
    _positive(r.log.every, "log.every")
    if r.spiking is not None:
        sp = r.spiking
        _positive(sp.k, "spiking.k")
        for name in ("weight_bits", "kv_bits"):
            bits = getattr(sp, name)
            if bits is not None and not 2 <= bits <= 8:
                raise SpikingBrainError(f"recipe field spiking.{name}: must be in 2..8 (or null for float), got {bits}")
        _positive(sp.group_size, "spiking.group_size")
        _positive(sp.clip, "spiking.clip")
        for i, name in enumerate(sp.exclude):
            if not name.strip():
                raise SpikingBrainError(f"recipe field spiking.exclude[{i}]: expected a projection name, got {name!r}")
        if r.distributed == "fsdp":
            raise SpikingBrainError("recipe field spiking: spike-aware training supports distributed: none | ddp, not fsdp")
        if t.lora is not None and t.lora.dropout > 0:
            raise SpikingBrainError("recipe field trainable.lora.dropout: must be 0 with spiking (a spike-aware "
                                    "adapter trains as part of the quantized weight, B A is never applied alone)")
    if check_files:
        d.train = _expand(d.train, "data.train")
        d.valid = _expand(d.valid, "data.valid")
        for where, p in (("model.path", m.path), ("model.tokenizer", m.tokenizer),
                         ("model.convert.teacher", m.convert.teacher if m.convert else None),
                         ("objective.teacher", o.teacher)):
            if p is not None and p not in ("default", "bytes") and not os.path.exists(resolve_path(p)):
                raise SpikingBrainError(f"recipe field {where}: no such file or directory {p!r}")


def check_world(r: Recipe, world_size: int) -> None:
    """Checks that need the number of processes (run before the model is built)."""
    cp = r.context_parallel
    if world_size % cp:
        raise SpikingBrainError(f"recipe field context_parallel: {cp} does not divide the {world_size} processes")
    per = r.optim.grad_accum * (world_size // cp)
    if r.optim.batch_size % per:
        raise SpikingBrainError(
            f"recipe field optim.batch_size: {r.optim.batch_size} is not divisible by "
            f"optim.grad_accum * world_size / context_parallel = {r.optim.grad_accum} * {world_size // cp}"
        )
