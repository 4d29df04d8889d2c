"""A trained conversion stored as what it changed: the delta file.

A converted student differs from its teacher only in the GLA mixers. The file (safetensors)
holds, per GLA layer:

- ``{name}.lora_A`` ``[r, in]`` and ``{name}.lora_B`` ``[out, r]`` (fp16, scaling folded into
  ``B``) for a projection trained as a low-rank update: ``W = W_teacher + B A``;
- ``{name}.delta`` (bf16) for a projection trained in full: ``W = W_teacher + delta``;
- ``{name}`` (fp32) for parameters the teacher does not have (gate, output norm).

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
from pathlib import Path

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError

FORMAT = "spikingbrain-conversion-delta/1"
# the trained conversion of the default teacher (7B layout) that the package ships
SHIPPED_DELTA = "smollm2-135m-instruct-7b.safetensors"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def shipped_delta_path() -> Path:
    """The package's trained delta for the default teacher (made by scripts/train_conversion.py)."""
    from importlib import resources

    path = Path(str(resources.files("spikingbrain") / "convert" / "weights" / SHIPPED_DELTA))
    if not path.is_file():
        raise SpikingBrainError(f"the shipped delta {path} is missing (a broken install?); reinstall spikingbrain "
                                "or run `spikingbrain demo --from-scratch`")
    return path


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


def _teacher_param(teacher, i: int, proj: str, kind: str) -> torch.Tensor:
    return getattr(getattr(teacher.model.layers[i].self_attn, proj), kind).detach().float().cpu()


def delta_tensors(student, teacher) -> dict[str, torch.Tensor]:
    """The tensors ``save_delta`` stores (see the module docstring)."""
    from spikingbrain.train.trainable import LoRALinear

    tensors = {}
    for i in gla_layers(student):
        mixer = student.model.layers[i].self_attn
        prefix = f"model.layers.{i}.self_attn."
        for proj in PROJECTIONS:
            mod = getattr(mixer, proj)
            if isinstance(mod, LoRALinear):
                tensors[prefix + proj + ".weight.lora_A"] = mod.lora_A.detach().float().cpu().half().contiguous()
                tensors[prefix + proj + ".weight.lora_B"] = (mod.lora_B.detach().float().cpu()
                                                             * mod.scaling).half().contiguous()
                base = mod.base
            else:
                base = mod
                diff = base.weight.detach().float().cpu() - _teacher_param(teacher, i, proj, "weight")
                tensors[prefix + proj + ".weight.delta"] = diff.to(torch.bfloat16).contiguous()
            if base.bias is not None:
                diff = base.bias.detach().float().cpu() - _teacher_param(teacher, i, proj, "bias")
                tensors[prefix + proj + ".bias.delta"] = diff.to(torch.bfloat16).contiguous()
        for n, p in mixer.named_parameters():
            if n.split(".")[0] not in PROJECTIONS:
                tensors[prefix + n] = p.detach().float().cpu().contiguous()
    return tensors


def save_delta(student, teacher, path: str | os.PathLike, metadata: dict) -> int:
    """Write the delta atomically with ``metadata`` (values turned into strings; the format,
    fingerprint and layout are added). Returns the file size in bytes."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, teacher_fingerprint=teacher_fingerprint(teacher),
                layer_types=json.dumps(student.config.layer_types),
                sliding_window=str(student.config.sliding_window))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(delta_tensors(student, teacher), str(tmp), metadata=meta)
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
    if meta.get("format") != FORMAT:
        raise SpikingBrainError(f"{path} is not a SpikingBrain conversion delta (format {meta.get('format')!r}, "
                                f"expected {FORMAT!r})")
    return meta


@torch.no_grad()
def apply_delta(student, teacher, path: str | os.PathLike) -> dict:
    """Merge the delta at ``path`` into a freshly converted ``student`` (plain projections) of
    ``teacher``. Checks teacher fingerprint, layout and that every GLA parameter is covered;
    returns the metadata."""
    from safetensors.torch import load_file

    meta = load_delta_metadata(path)
    fp = teacher_fingerprint(teacher)
    if meta.get("teacher_fingerprint") != fp:
        raise SpikingBrainError(f"delta {path} was made for another teacher (fingerprint "
                                f"{meta.get('teacher_fingerprint')}, this teacher's is {fp})")
    if meta.get("layer_types") != json.dumps(student.config.layer_types):
        raise SpikingBrainError(f"delta {path} was made for another layout ({meta.get('layer_types')}, this "
                                f"student's is {json.dumps(student.config.layer_types)})")
    params = gla_params(student)
    tensors = load_file(str(path))
    covered = set()
    for name, t in tensors.items():
        if name.endswith(".lora_B"):
            continue
        if name.endswith(".lora_A"):
            pname = name[: -len(".lora_A")]
            upd = tensors[pname + ".lora_B"].float() @ t.float()
        elif name.endswith(".delta"):
            pname = name[: -len(".delta")]
            upd = t.float()
        else:
            pname, upd = name, None
        if pname not in params:
            raise SpikingBrainError(f"delta {path} has {name!r}, which this student does not have")
        p = params[pname]
        if upd is not None:
            i, proj, kind = int(pname.split(".")[2]), pname.split(".")[-2], pname.split(".")[-1]
            ref = _teacher_param(teacher, i, proj, kind) + upd
        else:
            ref = t.float()
        if ref.shape != p.shape:
            raise SpikingBrainError(f"delta {path}: {pname} has shape {tuple(ref.shape)}, the student's is "
                                    f"{tuple(p.shape)}")
        p.copy_(ref.to(p.dtype))
        covered.add(pname)
    missing = sorted(set(params) - covered)
    if missing:
        raise SpikingBrainError(f"delta {path} lacks {len(missing)} GLA parameters, e.g. {missing[:3]}")
    return meta
