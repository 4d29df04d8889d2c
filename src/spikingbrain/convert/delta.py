"""A trained conversion stored as what it changed: the delta file.

A converted student differs from its teacher in the GLA mixers and, when the recipe trained
them, in low-rank updates of the FFNs. The file (safetensors) holds, per GLA layer:

- ``{name}.lora_A`` ``[r, in]`` and ``{name}.lora_B`` ``[out, r]`` (fp16, scaling folded into
  ``B``) for a projection trained as a low-rank update: ``W = W_teacher + B A``; stored as int8
  with a per-row fp16 ``{...}.scale`` ``[rows, 1]`` when saved with ``factors="int8"`` (half the
  size; the update's error is ~0.3% of its own size, not of the weight's);
- ``{name}.delta`` (bf16) for a projection trained in full: ``W = W_teacher + delta``; or, when
  saved with ``rank``/``ffn_rank``, the same update compressed to ``lora_A``/``lora_B`` factors by a
  truncated SVD (a student that started from an earlier delta, ``ConversionRecipe.init_delta``,
  differs from the teacher by that delta plus what it learned since: the sum is what is stored);
- ``{name}`` (fp32) for parameters the teacher does not have (gate, output norm);

and, for any layer whose FFN trained (``FFN_TARGETS``), the same ``lora_A``/``lora_B`` pair for
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``.

Its metadata says what it belongs to and where it came from: ``format``,
``teacher_fingerprint`` (a hash of the teacher's weights it was trained against),
``layer_types`` (the layout), ``sliding_window``, ``command`` (the exact command that made it)
and free-form provenance. ``apply_delta`` refuses a file made for another teacher, layout or
format with a clear error, and merges everything into plain ``nn.Linear`` weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError

FORMAT = "spikingbrain-conversion-delta/2"  # /2 adds FFN updates and int8 factors
READABLE = ("spikingbrain-conversion-delta/1", FORMAT)
# the trained conversion of the default teacher that the package ships (the 7B layout with layers 22-23
# softmax: recipe.SHIPPED)
SHIPPED_DELTA = "smollm2-135m-instruct-7b.safetensors"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# the FFN projections a conversion may train as low-rank updates (every layer's)
FFN_TARGETS = r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"
FACTORS = ("fp16", "int8")


def shipped_delta_path() -> Path:
    """The package's trained delta for the default teacher (made by scripts/train_conversion.py)."""
    from importlib import resources

    path = Path(str(resources.files("spikingbrain") / "convert" / "weights" / SHIPPED_DELTA))
    if not path.is_file():
        raise SpikingBrainError(f"the shipped delta {path} is missing (a broken install?); reinstall spikingbrain "
                                "or run `spikingbrain demo --from-scratch`")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (a starting delta's identity, ``ConversionRecipe.init_delta``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def teacher_fingerprint(teacher) -> str:
    """A short hash of the teacher's shape, embedding and first and last attention weights."""
    h = hashlib.sha256()
    c = teacher.config
    h.update(json.dumps([c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size]).encode())
    layers = teacher.model.layers
    for t in (teacher.model.embed_tokens.weight, layers[0].self_attn.q_proj.weight, layers[-1].self_attn.o_proj.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gla_layers(model) -> list[int]:
    return [i for i, t in enumerate(model.config.layer_types) if "gla" in t]


def gla_params(model) -> dict[str, nn.Parameter]:
    """Parameters of the GLA mixers (what the conversion changes; SWA layers, FFNs, norms and
    embeddings stay the teacher's), LoRA factors included when the projections are wrapped."""
    out = {}
    for i in gla_layers(model):
        for n, p in model.model.layers[i].self_attn.named_parameters():
            out[f"model.layers.{i}.self_attn.{n}"] = p
    return out


def _teacher_param(teacher, name: str) -> torch.Tensor:
    """The teacher's parameter ``name`` (student and teacher share the HF Llama names)."""
    return teacher.get_parameter(name).detach().float().cpu()


def _quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``t ~= q * scale``, ``scale [rows, 1]`` fp16."""
    scale = (t.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12).half()
    q = torch.round(t / scale.float()).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _put_factor(tensors: dict, name: str, t: torch.Tensor, factors: str) -> None:
    if factors == "int8":
        tensors[name], tensors[name + ".scale"] = _quantize_rows(t)
    else:
        tensors[name] = t.half().contiguous()


def _put_factors(tensors: dict, name: str, A: torch.Tensor, B: torch.Tensor, factors: str) -> None:
    _put_factor(tensors, name + ".lora_A", A, factors)
    _put_factor(tensors, name + ".lora_B", B, factors)


def _put_lora(tensors: dict, name: str, mod, factors: str) -> None:
    _put_factors(tensors, name, mod.lora_A.detach().float().cpu(), mod.lora_B.detach().float().cpu() * mod.scaling,
                 factors)


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``diff [out, in]`` (truncated SVD, Eckart-Young):
    ``(A [r, in], B [out, r])`` with ``B @ A ~= diff``, the singular values split evenly between
    them so that both quantize alike."""
    U, S, Vh = torch.linalg.svd(diff.double(), full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    return (root[:, None] * Vh[:r]).float(), (U[:, :r] * root).float()


def _update(mod, teacher_w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(W_effective - W_teacher, whether that is exactly the module's LoRA factors)``."""
    from spikingbrain.train.trainable import LoRALinear

    if isinstance(mod, LoRALinear):
        base = mod.base.weight.detach().float().cpu()
        if torch.equal(base, teacher_w):
            return mod.delta().detach().float().cpu(), True
        return base - teacher_w + mod.delta().detach().float().cpu(), False
    return mod.weight.detach().float().cpu() - teacher_w, False


def delta_tensors(student, teacher, factors: str = "fp16", rank: int | None = None,
                  ffn_rank: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``save_delta`` stores (see the module docstring); ``factors``: ``FACTORS``.
    ``rank``: store full GLA projection updates as rank-``rank`` SVD factors (else bf16 in
    full); ``ffn_rank``: the same for FFN updates that are not LoRA factors on the teacher's own
    weights (required when there are any)."""
    from spikingbrain.train.trainable import LoRALinear

    if factors not in FACTORS:
        raise SpikingBrainError(f"delta factors {factors!r}: choose from {FACTORS}")
    if (rank is not None and rank < 1) or (ffn_rank is not None and ffn_rank < 1):
        raise SpikingBrainError(f"delta ranks must be >= 1, got rank={rank}, ffn_rank={ffn_rank}")

    tensors = {}
    for i in gla_layers(student):
        mixer = student.model.layers[i].self_attn
        prefix = f"model.layers.{i}.self_attn."
        for proj in PROJECTIONS:
            mod = getattr(mixer, proj)
            name = prefix + proj + ".weight"
            diff, exact = _update(mod, _teacher_param(teacher, name))
            if exact:
                _put_lora(tensors, name, mod, factors)
            elif rank is not None:
                _put_factors(tensors, name, *low_rank(diff, rank), factors)
            else:
                tensors[name + ".delta"] = diff.to(torch.bfloat16).contiguous()
            base = mod.base if isinstance(mod, LoRALinear) else mod
            if base.bias is not None:
                diff = base.bias.detach().float().cpu() - _teacher_param(teacher, prefix + proj + ".bias")
                tensors[prefix + proj + ".bias.delta"] = diff.to(torch.bfloat16).contiguous()
        for n, p in mixer.named_parameters():
            if n.split(".")[0] not in PROJECTIONS:
                tensors[prefix + n] = p.detach().float().cpu().contiguous()
    for n, mod in student.named_modules():
        if not re.fullmatch(FFN_TARGETS, n):
            continue
        diff, exact = _update(mod, _teacher_param(teacher, n + ".weight"))
        if exact:
            _put_lora(tensors, n + ".weight", mod, factors)
        elif bool(diff.abs().max() > 0):
            if ffn_rank is None:
                raise SpikingBrainError(f"{n} differs from the teacher's but is not a low-rank update of it: "
                                        "give the FFN updates a rank (ffn_rank) to store them")
            _put_factors(tensors, n + ".weight", *low_rank(diff, ffn_rank), factors)
    return tensors


def save_delta(student, teacher, path: str | os.PathLike, metadata: dict, factors: str = "fp16",
               rank: int | None = None, ffn_rank: int | None = None) -> int:
    """Write the delta atomically with ``metadata`` (values turned into strings; the format,
    fingerprint and layout are added); low-rank factors as ``factors`` (``FACTORS``), full
    updates compressed to ``rank``/``ffn_rank`` (``delta_tensors``). Returns the file size in bytes."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, teacher_fingerprint=teacher_fingerprint(teacher),
                layer_types=json.dumps(student.config.layer_types),
                sliding_window=str(student.config.sliding_window))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(delta_tensors(student, teacher, factors, rank, ffn_rank), str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; a delta is meant to be shared
    os.replace(tmp, path)
    return path.stat().st_size


def load_delta_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SpikingBrainError(f"delta file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SpikingBrainError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") not in READABLE:
        raise SpikingBrainError(f"{path} is not a SpikingBrain conversion delta this version reads (format "
                                f"{meta.get('format')!r}, expected one of {READABLE})")
    return meta


def _check_teacher(meta: dict, teacher, path) -> None:
    fp = teacher_fingerprint(teacher)
    if meta.get("teacher_fingerprint") != fp:
        raise SpikingBrainError(f"delta {path} was made for another teacher (fingerprint "
                                f"{meta.get('teacher_fingerprint')}, this teacher's is {fp})")


def convert_with_delta(teacher, path: str | os.PathLike, tokenizer=None, sliding_window: int | None = None,
                       seed: int = 0):
    """Convert ``teacher`` with the layout the delta at ``path`` was trained for (its
    ``layer_types``: a named layout or a custom list) and merge the delta in. ``sliding_window``
    (None: the delta's) overrides the SWA layers' window. Returns ``(student, metadata)``."""
    from spikingbrain.convert.mapping import LAYOUTS, _layer_types, convert_from_transformer

    meta = load_delta_metadata(path)
    _check_teacher(meta, teacher, path)
    try:
        types = json.loads(meta["layer_types"])
        window = sliding_window or int(meta["sliding_window"])
    except (KeyError, ValueError, TypeError):
        raise SpikingBrainError(f"delta {path} does not record its layout (layer_types, sliding_window)") from None
    n = teacher.config.num_hidden_layers
    # a named layout when one matches: the student's config then records its name (and 76b its MoE FFNs)
    layout = next((name for name in LAYOUTS if _layer_types(name, n)[0] == types), types)
    student = convert_from_transformer(teacher, layout=layout, sliding_window=window, tokenizer=tokenizer, seed=seed)
    return student, _merge(student, teacher, path, meta)  # the file's metadata and teacher are checked


@torch.no_grad()
def apply_delta(student, teacher, path: str | os.PathLike, restored: bool = False) -> dict:
    """Merge the delta at ``path`` into a freshly converted ``student`` (plain projections) of
    ``teacher``. Checks teacher fingerprint, layout and that every GLA parameter is covered
    (FFN updates are optional); returns the metadata. ``restored``: the student may keep softmax
    attention (the teacher's own) where the delta has a GLA layer; that layer's mixer update is
    left out, its FFN update is merged (a run that gives a layer back its attention goes on from
    the delta, ``ConversionRecipe.init_delta``)."""
    meta = load_delta_metadata(path)
    _check_teacher(meta, teacher, path)
    return _merge(student, teacher, path, meta, restored)


def restored_layers(delta_types: list[str], student_types: list[str]) -> list[int] | None:
    """The layers a delta trained as GLA that the student keeps as softmax attention (``[]``: the
    same layout), or None when the layouts differ in any other way."""
    if len(delta_types) != len(student_types):
        return None
    out = []
    for i, (d, s) in enumerate(zip(delta_types, student_types)):
        if d != s:
            if d != "gla" or s not in ("swa", "full"):
                return None
            out.append(i)
    return out


@torch.no_grad()
def _merge(student, teacher, path, meta: dict, restored: bool = False) -> dict:
    """``apply_delta`` after its file and teacher checks: the layout check and the merge."""
    from safetensors.torch import load_file

    try:
        types = json.loads(meta.get("layer_types", "null"))
    except ValueError:
        types = None
    skip = restored_layers(types, student.config.layer_types) if isinstance(types, list) else None
    if skip is None or (skip and not restored):
        raise SpikingBrainError(f"delta {path} was made for another layout ({meta.get('layer_types')}, this "
                                f"student's is {json.dumps(student.config.layer_types)})")
    skip_prefixes = tuple(f"model.layers.{i}.self_attn." for i in skip)
    params = gla_params(student)
    ffn = {n: p for n, p in student.named_parameters() if re.fullmatch(FFN_TARGETS + r"\.weight", n)}
    tensors = load_file(str(path))

    def factor(name: str) -> torch.Tensor:
        if name not in tensors or (tensors[name].dtype == torch.int8 and name + ".scale" not in tensors):
            raise SpikingBrainError(f"delta {path} is incomplete: {name!r} or its scale is missing")
        t = tensors[name]
        return t.float() * tensors[name + ".scale"].float() if t.dtype == torch.int8 else t.float()

    covered = set()
    for name, t in tensors.items():
        if name.endswith(".lora_B") or name.endswith(".scale") or name.startswith(skip_prefixes):
            continue
        if name.endswith(".lora_A"):
            pname = name[: -len(".lora_A")]
            upd = factor(pname + ".lora_B") @ factor(name)
        elif name.endswith(".delta"):
            pname = name[: -len(".delta")]
            upd = t.float()
        else:
            pname, upd = name, None
        p = params.get(pname, ffn.get(pname) if upd is not None else None)
        if p is None:
            raise SpikingBrainError(f"delta {path} has {name!r}, which this student does not have")
        if upd is not None:
            ref = _teacher_param(teacher, pname) + upd
        else:
            ref = t.float()
        if ref.shape != p.shape:
            raise SpikingBrainError(f"delta {path}: {pname} has shape {tuple(ref.shape)}, the student's is "
                                    f"{tuple(p.shape)}")
        p.copy_(ref.to(p.dtype))
        covered.add(pname)
    missing = sorted(set(params) - covered)  # every GLA parameter; FFN updates are optional
    if missing:
        raise SpikingBrainError(f"delta {path} lacks {len(missing)} GLA parameters, e.g. {missing[:3]}")
    return meta
