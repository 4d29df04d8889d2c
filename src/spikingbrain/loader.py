"""Loading a model directory into a ``SpikingBrainForCausalLM``: strict, streamed, any known format.

Nothing is loaded before every check has passed, and a failed check is an error naming what is
wrong (never a model with randomly initialised tensors):

1. ``config.json`` picks the format by its ``model_type``: ``"spikingbrain"`` (this package's
   own) or a registered adapter (``"gla_swa"``, the released SpikingBrain-7B checkpoints:
   ``convert/official.py``). Any other type is refused, naming it. The format turns the file into a
   ``SpikingBrainConfig``, refusing files that lack a field the architecture depends on.
2. The model is built on the meta device (no memory): in its spiking form when
   ``config.spiking`` is set, with fused q/k/v and gate/up projections when ``fuse=True``.
3. The format's *plan* names, for every tensor of that skeleton's state dict (a tied LM head
   excepted), the checkpoint tensor(s) it is made from. Checkpoint tensors that are missing,
   tensors no target uses (unless the format lists them as deliberately unused, with the reason),
   and shapes that disagree are reported together, each by name. The safetensors headers
   (``weights.py``) were checked when the files were opened: a truncated file fails there.
4. Streaming: module by module (embeddings, LM head, then every module of every layer, final
   norm), tensors are read from the memory-mapped files, converted to the target dtype and put
   in place. ``on_module(name, module)`` may return a replacement as soon as a module is complete:
   the int8 path (``serve/loading.py``) quantizes each linear right away, so a float copy of only
   one linear exists at a time and peak memory stays near the final model's size.
5. Non-persistent buffers (RoPE ``inv_freq``) are computed, a tied head is tied, the generation
   config is read.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.weights import CheckpointFiles

FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

# Fields a native config.json must state: those that decide the architecture's semantics (a field
# that only changes shapes is caught anyway, by the weights that then do not fit). save_pretrained
# writes every field, so a file missing one was edited or cut short.
NATIVE_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "attention_bias",
    "tie_word_embeddings", "layer_types",
)
NATIVE_REQUIRED_IF = {  # layer type present -> fields it needs
    "swa": ("sliding_window",),
    "gla": ("gla_feature_map", "gla_gate", "gla_gate_logit_normalizer"),
    "+": ("hybrid_separate_proj",),
    "moe": ("mlp_layer_types", "num_experts", "num_experts_per_tok", "num_shared_experts", "router_type",
            "norm_topk_prob"),
}


@dataclass
class Source:
    """How one target tensor is made: checkpoint tensors ``names`` (expected ``shapes``), read as
    they are and concatenated along dim 0 when several, or passed to ``make(tensors, dtype)``
    (tensors in their stored dtype, ``dtype`` the model's) which returns the target."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    make: Callable | None = None


@dataclass
class Plan:
    """A format's answer for one checkpoint: the config and where each target tensor comes from."""

    config: object  # SpikingBrainConfig
    sources: Callable[[str, tuple[int, ...]], Source | None]  # target name, shape -> Source (None: missing)
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint tensor -> why it is not used
    default_dtype: torch.dtype | None = None  # what dtype="auto" means for this checkpoint
    extra_files: tuple[str, ...] = ()  # files a conversion copies beside the weights


FORMATS: dict[str, Callable] = {}  # model_type -> (raw config dict, CheckpointFiles, options) -> Plan


def register_format(model_type: str, make_plan: Callable) -> None:
    """Teach the loader a checkpoint format (``convert/official.py`` registers ``gla_swa``)."""
    FORMATS[model_type] = make_plan


# --------------------------------------------------------------------------- config
def read_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise SpikingBrainError(f"{path}: no config.json (not a model directory)")
    try:
        raw = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpikingBrainError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SpikingBrainError(f"{f}: expected a JSON object")
    return raw


def require_fields(raw: dict, required, where: str) -> None:
    missing = [k for k in required if k not in raw]
    if missing:
        raise SpikingBrainError(f"{where}: config.json lacks field(s) {', '.join(missing)}; the model cannot be "
                                "built without guessing them")


def dtype_from_config(raw: dict) -> torch.dtype | None:
    name = raw.get("dtype") or raw.get("torch_dtype")
    return FLOAT_DTYPES.get(str(name).replace("torch.", "")) if name else None


def native_plan(raw: dict, files: CheckpointFiles, options: dict) -> Plan:
    from spikingbrain.config import SpikingBrainConfig

    if options:
        raise SpikingBrainError(f"options {sorted(options)} apply to the released gla_swa checkpoints, not to a "
                                "native SpikingBrain directory")
    require_fields(raw, NATIVE_REQUIRED, str(files.directory))
    kinds = " ".join(list(raw.get("layer_types") or []) + list(raw.get("mlp_layer_types") or []))
    for kind, needed in NATIVE_REQUIRED_IF.items():
        if kind in kinds:
            require_fields(raw, needed, str(files.directory))
    kwargs = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
    config = SpikingBrainConfig(**kwargs)
    ignored = {}
    if config.tie_word_embeddings and "lm_head.weight" in files:
        ignored["lm_head.weight"] = "the head is tied to model.embed_tokens.weight (checked equal on load)"

    def sources(name, shape):
        return Source((name,), (tuple(shape),)) if name in files else None

    return Plan(config, sources, ignored, dtype_from_config(raw))


register_format("spikingbrain", native_plan)


def plan_for(path: Path, files: CheckpointFiles, options: dict, config=None) -> Plan:
    raw = read_config(path)
    model_type = raw.get("model_type")
    if model_type not in FORMATS:
        known = ", ".join(repr(t) for t in FORMATS)
        raise SpikingBrainError(
            f"{path}: model_type {model_type!r} is not a SpikingBrain format (known: {known}); to turn another "
            "Transformer into a SpikingBrain model use `spikingbrain convert --teacher DIR`"
        )
    plan = FORMATS[model_type](raw, files, dict(options))
    if config is not None and getattr(config, "model_type", None) == "spikingbrain":
        plan.config = config  # a parsed config handed in (with any overrides applied to it)
    return plan


# --------------------------------------------------------------------------- skeleton and checks
def build_skeleton(config, fuse: bool = False) -> nn.Module:
    """The model on the meta device (shapes only), in its spiking form if the config says so."""
    from spikingbrain.layers.projections import fuse_projections
    from spikingbrain.modeling import SpikingBrainForCausalLM

    with torch.device("meta"):
        model = SpikingBrainForCausalLM(config)
        if getattr(config, "spiking", None):
            from spikingbrain.spiking.spikify import apply_scheme

            apply_scheme(model, config.spiking)
        if fuse:
            fuse_projections(model)
    return model


def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """State-dict name -> (owning module, attribute, meta tensor), tied head excepted."""
    out = {}
    for mname, mod in model.named_modules():
        for attr, t in list(mod._parameters.items()) + [
            (a, b) for a, b in mod._buffers.items() if a not in mod._non_persistent_buffers_set
        ]:
            if t is None:
                continue
            name = f"{mname}.{attr}" if mname else attr
            out[name] = (mod, attr, t)
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _fused_source(model, name: str, shape, plan: Plan) -> Source | None:
    """A fused projection (``qkv_proj``, ``gate_up_proj``) reads its parts one after the other."""
    from spikingbrain.layers.projections import FUSED_NAMES

    owner_name, fused, attr = name.rsplit(".", 2)
    for group, fused_name in FUSED_NAMES.items():
        if fused == fused_name:
            parts = []
            for part in group:
                sub = model.get_submodule(owner_name)
                sizes = sub.fused_sizes[fused_name]
                pshape = (sizes[group.index(part)],) + tuple(shape[1:])
                src = plan.sources(f"{owner_name}.{part}.{attr}", pshape)
                if src is None:
                    return None
                if src.make is not None:  # fusing only plain linears, whose sources are plain reads
                    raise SpikingBrainError(f"internal error: cannot fuse {owner_name}.{part}, made by a transform")
                parts.append(src)
            return Source(tuple(n for p in parts for n in p.names), tuple(s for p in parts for s in p.shapes))
    return None


def check_plan(model, plan: Plan, files: CheckpointFiles, where: str) -> dict[str, Source]:
    """Every target's source, after checking that nothing is missing, unused or misshapen."""
    targets = _targets(model)
    fused = {n for n, (m, a, t) in targets.items() if n.rsplit(".", 2)[-2] in ("qkv_proj", "gate_up_proj")}
    chosen, missing, bad_shape = {}, [], []
    for name, (_, _, t) in targets.items():
        src = _fused_source(model, name, t.shape, plan) if name in fused else plan.sources(name, tuple(t.shape))
        if src is None:
            missing.append(name)
            continue
        absent = [n for n in src.names if n not in files]
        if absent:
            missing.extend(absent)
            continue
        for n, s in zip(src.names, src.shapes):
            if tuple(files.shape(n)) != tuple(s):
                bad_shape.append(f"{n}: {list(files.shape(n))} in the checkpoint, {list(s)} expected")
        chosen[name] = src
    used = {n for s in chosen.values() for n in s.names}
    unexpected = sorted(n for n in files.keys() if n not in used and n not in plan.ignored)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model has no place for: {_few(unexpected)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} tensor(s) of the wrong shape: {_few(bad_shape)}")
    if problems:
        raise SpikingBrainError(f"{where}: checkpoint does not match its config; nothing was loaded. "
                                + "; ".join(problems))
    return chosen


def _few(items, n: int = 8) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------- streaming
def _module_order(model: nn.Module, names) -> list[str]:
    """Owning modules of ``names``: embeddings, LM head, then the layers' modules in order, rest."""
    owners = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n in names))
    first = [o for o in ("model.embed_tokens", "lm_head") if o in owners]
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rest = sorted((o for o in owners if o not in first), key=lambda o: rank.get(o, len(rank)))
    return first + rest


def _target_dtype(module: nn.Module, attr: str, meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype | None:
    """Floats go to the model dtype; integer codes keep their own; quantization scales stay fp32."""
    from spikingbrain.spiking.linear import SpikingLinear

    if not meta.is_floating_point():
        return None
    if isinstance(module, SpikingLinear) and attr == "scales":
        return torch.float32
    return dtype


def produce(files: CheckpointFiles, src: Source, dtype: torch.dtype | None, model_dtype: torch.dtype) -> torch.Tensor:
    """The target tensor described by ``src`` (``dtype=None``: keep the stored/made dtype)."""
    if src.make is not None:
        t = src.make([files.read(n) for n in src.names], model_dtype)
        return t if dtype is None else t.to(dtype)
    if len(src.names) == 1:
        return files.read(src.names[0], dtype)
    rows = sum(s[0] for s in src.shapes)
    out = torch.empty((rows,) + tuple(src.shapes[0][1:]), dtype=dtype or files.dtype(src.names[0]))
    r = 0
    for n, s in zip(src.names, src.shapes):
        files.read(n, out=out[r:r + s[0]])
        r += s[0]
    return out


def stream_into(model: nn.Module, chosen: dict[str, Source], files: CheckpointFiles, dtype: torch.dtype,
                dtype_for: Callable[[str, nn.Module, torch.dtype], torch.dtype | None] | None = None,
                on_module: Callable[[str, nn.Module], nn.Module | None] | None = None,
                progress: bool = False) -> None:
    targets = _targets(model)
    by_owner: dict[str, list[str]] = {}
    for name in chosen:
        by_owner.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    order = _module_order(model, chosen)
    bar = _progress(len(order), progress, f"loading {files.directory.name}")
    for owner in order:
        for name in by_owner[owner]:
            module, attr, meta = targets[name]
            stored = files.dtype(chosen[name].names[0])
            want = (dtype_for(name, module, stored) if dtype_for else None) or _target_dtype(module, attr, meta, dtype)
            t = produce(files, chosen[name], want, dtype)
            if tuple(t.shape) != tuple(meta.shape):
                raise SpikingBrainError(f"{name}: made a tensor of shape {list(t.shape)}, expected {list(meta.shape)}")
            if not meta.is_floating_point() and t.is_floating_point():
                raise SpikingBrainError(f"{name}: expected integer codes, the checkpoint holds {t.dtype}")
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(t, requires_grad=meta.requires_grad and t.is_floating_point())
            else:
                module._buffers[attr] = t
        for name in by_owner[owner]:
            del targets[name]  # holds the module: a replaced module's float weights must be freed now
        if on_module is not None:
            mod = model.get_submodule(owner) if owner else model
            new = on_module(owner, mod)
            if new is not None and new is not mod:
                parent, _, child = owner.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
                del mod, new
                _trim_heap()
            else:
                del mod, new
        bar.update(1)
    bar.close()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``). Quantizing a 7B linear by
    linear frees tens of MB of temporaries between long-lived allocations each time; without this,
    glibc keeps the holes and the resident set grew ~70 MB per layer (2 GB over a 7B's 28 layers,
    measured with benchmarks/official_7b.py)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="module", leave=False)
        except ImportError:
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


def finish(model: nn.Module, files: CheckpointFiles, plan: Plan) -> None:
    """Non-persistent buffers, tied head, leftovers check."""
    from spikingbrain.layers.rope import RotaryEmbedding

    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = m.compute_inv_freq(m.config)[0]
    if model.config.tie_word_embeddings:
        emb = model.get_input_embeddings().weight
        model.lm_head.weight = emb
        if "lm_head.weight" in files:
            stored = files.read("lm_head.weight", emb.dtype)
            if stored.shape != emb.shape or not torch.equal(stored, emb):
                raise SpikingBrainError("lm_head.weight is stored and differs from the embeddings, but the config ties "
                                        "them (tie_word_embeddings); set it to false to keep a separate head")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SpikingBrainError(f"internal error: tensors left uninitialised after loading: {_few(left)}")


# --------------------------------------------------------------------------- entry point
def resolve_dtype(dtype, plan: Plan, files: CheckpointFiles) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if plan.default_dtype is not None:
            return plan.default_dtype
        floats = [files.dtype(n) for n in files.keys() if files.dtype(n).is_floating_point]
        return floats[0] if floats else torch.float32
    name = str(dtype).replace("torch.", "")
    if name not in FLOAT_DTYPES:
        raise SpikingBrainError(f"dtype must be one of {', '.join(sorted(FLOAT_DTYPES))} or 'auto', got {dtype!r}")
    return FLOAT_DTYPES[name]


def load_pretrained(path, *, dtype=None, config=None, fuse: bool = False, options: dict | None = None,
                    dtype_for=None, on_module=None, progress: bool = False):
    """A ``SpikingBrainForCausalLM`` (eval mode, CPU) from a model directory; see the module doc.

    ``dtype``: a torch dtype, a name, or ``None``/``"auto"`` for the checkpoint's own.
    ``options``: format options (``gla_swa``: ``window_convention``, ``down_proj``).
    ``fuse``: fuse q/k/v and gate/up for inference (such a model cannot be saved).
    ``dtype_for(name, module, stored_dtype)`` / ``on_module(name, module)``: hooks of the streaming
    int8 path (a dtype for one tensor instead of ``dtype``; a replacement for a module just loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise SpikingBrainError(f"{path}: not a model directory")
    files = CheckpointFiles(path)
    try:
        plan = plan_for(path, files, options or {}, config)
        model_dtype = resolve_dtype(dtype, plan, files)
        model = build_skeleton(plan.config, fuse=fuse)
        chosen = check_plan(model, plan, files, str(path))
        stream_into(model, chosen, files, model_dtype, dtype_for, on_module, progress)
        finish(model, files, plan)
    finally:
        files.close()
    model.config.dtype = model_dtype
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    _generation_config(model, path)
    return model.eval()


def _generation_config(model, path: Path) -> None:
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise SpikingBrainError(f"{path / 'generation_config.json'}: {e}") from None
    else:
        model.generation_config = GenerationConfig.from_model_config(model.config)


# --------------------------------------------------------------------------- the HF entry point
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token",
               "trust_remote_code", "_from_auto", "_from_pipeline", "code_revision", "_commit_hash",
               "low_cpu_mem_usage", "attn_implementation", "use_safetensors", "adapter_kwargs", "resume_download")
OPTIONS = ("window_convention", "down_proj")


def from_pretrained_call(path, model_args, kwargs):
    """``SpikingBrainForCausalLM.from_pretrained`` (and ``AutoModelForCausalLM`` after ``import
    spikingbrain``): the HF calling convention mapped onto ``load_pretrained``."""
    if model_args:
        raise SpikingBrainError("from_pretrained takes no positional arguments besides the directory")
    kwargs = dict(kwargs)
    config = kwargs.pop("config", None)
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype
    device_map = kwargs.pop("device_map", None)
    subfolder = kwargs.pop("subfolder", "") or ""
    info = kwargs.pop("output_loading_info", False)
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    for k in OPTIONS:  # AutoConfig turns unknown keyword arguments into config attributes
        if k not in options and config is not None and getattr(config, "model_type", None) != "spikingbrain" \
                and hasattr(config, k):
            options[k] = getattr(config, k)
    adapter = kwargs.get("adapter_kwargs") or {}
    if kwargs.get("use_safetensors") is False or adapter.get("_adapter_model_path"):
        raise SpikingBrainError("from_pretrained reads safetensors model directories (no PEFT adapters, no .bin)")
    for k in _HUB_KWARGS:
        kwargs.pop(k, None)
    if kwargs:
        raise SpikingBrainError(f"from_pretrained: unsupported option(s) {sorted(kwargs)}")
    p = Path(path) / subfolder
    if not p.is_dir():
        raise SpikingBrainError(f"{p}: not a local model directory (models are read from disk; nothing is "
                                "downloaded)")
    model = load_pretrained(p, dtype=dtype, config=config, options=options)
    if device_map not in (None, "cpu"):
        dev = device_map.get("", None) if isinstance(device_map, dict) else device_map
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(dev)
    if info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model
