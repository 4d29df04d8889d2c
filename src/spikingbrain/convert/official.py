"""The released SpikingBrain-7B checkpoints (``model_type: "gla_swa"``) as SpikingBrain models.

The authors' repository (BICLab/SpikingBrain-7B) holds the remote code of their Hugging Face
checkpoints: folder ``hf_7B_model`` (base and SFT models) and ``W8ASpike`` (the pseudo-spiking
INT8 one). This adapter maps their config fields and weight names onto ``SpikingBrainConfig`` /
``SpikingBrainForCausalLM`` (checked against their code, see SPEC.md section 7); nothing in the
files is dropped without a stated reason, and every field this package does not use is listed
below with why.

Config: ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads`` (head dim = hidden / heads, as their code computes it), ``vocab_size``,
``norm_eps`` (every RMSNorm, the GLA output norm included), top-level ``rope_theta``,
``hidden_act`` (``swish`` = SiLU), ``tie_word_embeddings``, ``max_position_embeddings``,
``attn_layers`` (the window-attention layers; absent: the odd ones, as their config class does),
``sliding_window`` ``W`` (see the window conventions below). q/k/v carry biases, o_proj none;
GLA: ReLU feature map, gate ``logsigmoid(.) / 16`` with a rank-16 pair (the W8ASpike checkpoint: one
full-rank ``gk_proj``), output RMSNorm over the head dim.

Weights: ``model.embeddings`` -> ``model.embed_tokens``, ``layers.N.attn_norm`` ->
``input_layernorm``, ``layers.N.mlp_norm`` -> ``post_attention_layernorm``, ``layers.N.attn.*`` ->
``self_attn.*`` with ``attn.g_norm`` -> ``self_attn.o_norm``; ``mlp.*``, ``model.norm`` and
``lm_head`` keep their names.

Window conventions (``window_convention``, recorded in the config, see ``SpikingBrainConfig``):
``"flash-attn"`` (default) reproduces what the model was trained with, flash-attn
``window_size=(W, 0)``, i.e. ``W + 1`` keys; ``"sdpa"`` reproduces their SDPA file and decode
cache, ``W`` keys.

W8ASpike (detected by the ``<linear>.weight_quantizer.scales`` tensors): loaded into this
package's spiking inference path with their arithmetic (``spiking/w8aspike.py``): the integer
codes ``round(W / s)`` from the stored scales, spike-coded linear inputs, the window-attention
query spike-coded after RoPE, INT8 keys/values. ``down_proj``: ``"float"`` (default) as their
forward runs it, float and unspiked (their ``swiglu_linear`` bypasses its quantizer, so its
stored scales go unused); ``"spiking"`` spikes it like every other projection with its stored
scales (this package's own scheme).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from spikingbrain.config import SpikingBrainConfig
from spikingbrain.errors import SpikingBrainError
from spikingbrain.loader import Plan, Source, dtype_from_config, register_format, require_fields
from spikingbrain.weights import CheckpointFiles

MODEL_TYPE = "gla_swa"
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "sliding_window", "norm_eps", "rope_theta")
USED = REQUIRED + ("num_key_value_heads", "hidden_act", "tie_word_embeddings", "max_position_embeddings",
                   "attn_layers", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
                   "torch_dtype", "dtype", "head_dim")
UNUSED = {  # fields of their config that change nothing in what their code computes here
    "attn_mode": "which of their GLA kernels runs (chunk / fused_chunk / fused_recurrent): all compute the same",
    "conv_size": "only with use_short_conv, which the released checkpoints leave off",
    "use_short_conv": "refused when true (no short convolutions here); false in the released checkpoints",
    "fuse_cross_entropy": "which loss kernel their training used",
    "elementwise_affine": "passed to their GLA layer, which never reads it",
    "attention_dropout": "dropout during their training only",
    "quant_weight_group_size": "W8ASpike: their QuantLinear uses group 128 whatever this says",
    "auto_map": "their remote code, replaced by this package",
    "rope_scaling": "refused unless null: their rotary embedding has no scaling",
}
LOWRANK = 16  # their GatedLinearAttention's gate_low_rank_dim (a constant, not a config field)
GATE_NORMALIZER = 16.0  # their gate_logit_normalizer
GROUP = 128  # their QuantLinear's w_group_size
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gk_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS = {"window_convention": "flash-attn", "down_proj": "float"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


class GlaSwaConfig(PretrainedConfig):
    """The authors' ``gla_swa`` config as Hugging Face reads it, so ``AutoConfig`` and
    ``AutoModelForCausalLM`` recognise the released checkpoints after ``import spikingbrain``
    (without ``trust_remote_code``). It only carries the fields; ``native_config`` turns them into
    a ``SpikingBrainConfig``."""

    model_type = MODEL_TYPE


class GlaSwaLoader:
    """What ``AutoModelForCausalLM`` finds for a ``gla_swa`` config: the checkpoint is loaded as a
    ``SpikingBrainForCausalLM`` (see the module doc)."""

    config_class = GlaSwaConfig

    @classmethod
    def from_pretrained(cls, path, *model_args, **kwargs):
        from spikingbrain.modeling import SpikingBrainForCausalLM

        return SpikingBrainForCausalLM.from_pretrained(path, *model_args, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        from spikingbrain.modeling import SpikingBrainForCausalLM

        return SpikingBrainForCausalLM(native_config(config.to_dict()))

    _from_config = from_config


# --------------------------------------------------------------------------- config
def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise SpikingBrainError(f"unknown option(s) {unknown} for a gla_swa checkpoint; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if out["window_convention"] not in ("flash-attn", "sdpa"):
        raise SpikingBrainError(f"window_convention must be 'flash-attn' or 'sdpa', got {out['window_convention']!r}")
    if out["down_proj"] not in ("float", "spiking"):
        raise SpikingBrainError(f"down_proj must be 'float' (their forward) or 'spiking', got {out['down_proj']!r}")
    return out


def native_config(raw: dict, window_convention: str = "flash-attn", w8aspike: bool = False,
                  down_proj: str = "float", gate: str = "lowrank", where: str = "config.json") -> SpikingBrainConfig:
    """A ``SpikingBrainConfig`` from the fields of a ``gla_swa`` config.json (see the module doc)."""
    if raw.get("model_type") != MODEL_TYPE:
        raise SpikingBrainError(f"{where}: model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
    require_fields(raw, REQUIRED, where)
    generic = set(PretrainedConfig().to_dict())
    unknown = sorted(k for k in raw if k not in USED and k not in UNUSED and k not in generic)
    if unknown:
        raise SpikingBrainError(f"{where}: field(s) {', '.join(unknown)} are not part of the gla_swa format this "
                                "package knows; refusing to guess what they change")
    if raw.get("use_short_conv"):
        raise SpikingBrainError(f"{where}: use_short_conv is true; short convolutions are not supported")
    if raw.get("rope_scaling") is not None:
        raise SpikingBrainError(f"{where}: rope_scaling is set, but the gla_swa rotary embedding has no scaling")
    n, d, heads = int(raw["num_hidden_layers"]), int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if d % heads:
        raise SpikingBrainError(f"{where}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
    head_dim = d // heads
    if raw.get("head_dim") not in (None, head_dim):
        raise SpikingBrainError(f"{where}: head_dim {raw['head_dim']} but their code uses hidden_size / heads = {head_dim}")
    attn = raw.get("attn_layers")
    attn = list(range(1, n, 2)) if attn is None else [int(i) for i in attn]
    bad = [i for i in attn if not 0 <= i < n]
    if bad:
        raise SpikingBrainError(f"{where}: attn_layers {bad} outside 0..{n - 1}")
    act = raw.get("hidden_act", "swish")
    act = "silu" if act == "swish" else act
    if w8aspike and act != "silu":
        raise SpikingBrainError(f"{where}: hidden_act {act!r}; the W8ASpike MLP always computes SiLU")
    w = raw["sliding_window"]
    if not isinstance(w, int) or w < 1:
        raise SpikingBrainError(f"{where}: sliding_window must be a positive integer, got {w!r}")
    spiking = None
    if w8aspike:
        spiking = {"k": 3.0, "weight_bits": 8, "group_size": GROUP, "clip": None, "kv_bits": 8,
                   "exclude": ["down_proj"] if down_proj == "float" else [], "neuron": "w8aspike",
                   "spike_query": True, "spike_inputs": True}
    try:
        return SpikingBrainConfig(
            vocab_size=int(raw["vocab_size"]), hidden_size=d, intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim, hidden_act=act,
            max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
            initializer_range=float(raw.get("initializer_range", 0.02)), rms_norm_eps=float(raw["norm_eps"]),
            rope_parameters={"rope_type": "default", "rope_theta": float(raw["rope_theta"])},
            attention_bias=True, attention_out_bias=False,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            layer_types=["swa" if i in attn else "gla" for i in range(n)],
            sliding_window=w + 1 if window_convention == "flash-attn" else w, window_convention=window_convention,
            gla_feature_map="relu", gla_gate=gate, gla_gate_low_rank_dim=LOWRANK,
            gla_gate_logit_normalizer=GATE_NORMALIZER, spiking=spiking,
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"), use_cache=bool(raw.get("use_cache", True)),
        )
    except (TypeError, ValueError) as e:
        raise SpikingBrainError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- names
_RENAMES = [  # native -> official
    (re.compile(r"^model\.embed_tokens\."), "model.embeddings."),
    (re.compile(r"^(model\.layers\.\d+)\.input_layernorm\."), r"\1.attn_norm."),
    (re.compile(r"^(model\.layers\.\d+)\.post_attention_layernorm\."), r"\1.mlp_norm."),
    (re.compile(r"^(model\.layers\.\d+)\.self_attn\.o_norm\."), r"\1.attn.g_norm."),
    (re.compile(r"^(model\.layers\.\d+)\.self_attn\."), r"\1.attn."),
]


def official_name(name: str) -> str:
    """The released checkpoint's name of a native state-dict entry (plain tensors)."""
    for pattern, repl in _RENAMES:
        new, hits = pattern.subn(repl, name)
        if hits:
            return new
    return name


def _codes(tensors, dtype):
    from spikingbrain.spiking.w8aspike import weight_codes

    return weight_codes(tensors[0], tensors[1], GROUP, dtype)[0]


def _scales(tensors, dtype):
    return tensors[0].to(dtype).float().squeeze(-1)


def official_plan(raw: dict, files: CheckpointFiles, options: dict) -> Plan:
    opts = _options(options)
    where = str(files.directory / "config.json")
    w8aspike = any(n.endswith(".weight_quantizer.scales") for n in files.keys())
    gate = "full" if any(re.match(r"model\.layers\.\d+\.attn\.gk_proj\.weight$", n) for n in files.keys()) else "lowrank"
    config = native_config(raw, opts["window_convention"], w8aspike, opts["down_proj"], gate, where)
    excluded = set((config.spiking or {}).get("exclude", ()))
    ignored = {}
    for n in files.keys():
        if n.endswith(".rotary_emb.inv_freq"):
            ignored[n] = "RoPE frequencies: computed from rope_theta, as their code does"
        if w8aspike and n.endswith(".down_proj.weight_quantizer.scales") and "down_proj" in excluded:
            ignored[n] = ("their forward runs down_proj in float and never applies these scales "
                          "(load with down_proj='spiking' to use them)")

    def sources(name: str, shape):
        owner, _, attr = name.rpartition(".")
        proj = owner.rsplit(".", 1)[-1]
        spiked = w8aspike and proj in QUANTIZED and proj not in excluded
        if spiked and attr == "qweight":
            off = official_name(owner)
            out, n_in = shape
            return Source((f"{off}.weight", f"{off}.weight_quantizer.scales"),
                          ((out, n_in), (out, n_in // GROUP, 1)), _codes)
        if spiked and attr == "scales":
            off = official_name(owner)
            return Source((f"{off}.weight_quantizer.scales",), ((shape[0], shape[1], 1),), _scales)
        return Source((official_name(name),), (tuple(shape),))

    return Plan(config, sources, ignored, dtype_from_config(raw), TOKENIZER_FILES)


register_format(MODEL_TYPE, official_plan)
AutoConfig.register(MODEL_TYPE, GlaSwaConfig, exist_ok=True)
AutoModelForCausalLM.register(GlaSwaConfig, GlaSwaLoader, exist_ok=True)


# --------------------------------------------------------------------------- conversion
SHARD_BYTES = 2 << 30


def convert_official(src, out, dtype=None, window_convention: str | None = None, down_proj: str | None = None,
                     progress: bool = True) -> Path:
    """Write the checkpoint at ``src`` (released ``gla_swa`` format) as a native SpikingBrain
    directory ``out`` (config, safetensors shards of <= 2 GiB with an index, tokenizer files).
    Streamed: tensors are read, converted and written shard by shard, so memory stays at about
    one shard. ``dtype``: ``None``/``"auto"`` keeps the checkpoint's (bf16 for the release).
    The directory appears complete or not at all (written beside it, then renamed)."""
    from safetensors.torch import save_file

    from spikingbrain.loader import _module_order, _target_dtype, _targets, build_skeleton, check_plan, produce
    from spikingbrain.loader import plan_for, read_config, resolve_dtype

    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpikingBrainError(f"{out} exists and is not empty; choose a new --out")
    if not src.is_dir():
        raise SpikingBrainError(f"{src}: not a model directory")
    options = {"window_convention": window_convention, "down_proj": down_proj}
    model_type = read_config(src).get("model_type")
    if model_type != MODEL_TYPE:
        raise SpikingBrainError(f"{src}: model_type {model_type!r}; --from-official expects a released "
                                f"{MODEL_TYPE!r} checkpoint")
    with CheckpointFiles(src) as files:
        plan = plan_for(src, files, options)
        model_dtype = resolve_dtype(dtype, plan, files)
        skeleton = build_skeleton(plan.config)
        chosen = check_plan(skeleton, plan, files, str(src))
        targets = _targets(skeleton)
        names = [n for owner in _module_order(skeleton, chosen) for n in chosen if
                 (n.rsplit(".", 1)[0] if "." in n else "") == owner]
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent if out.parent.exists() else None))
        try:
            shards, current, size = [], {}, 0
            nbytes = {n: targets[n][2].numel() * _bytes(targets[n], model_dtype) for n in names}
            for n in names:  # plan the shards first: their file names carry the count
                if current and size + nbytes[n] > SHARD_BYTES:
                    shards.append(current)
                    current, size = {}, 0
                current[n] = None
                size += nbytes[n]
            shards.append(current)
            weight_map, total = {}, 0
            bar = _bar(len(names), progress, f"converting {src.name}")
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                tensors = {}
                for n in shard:
                    module, attr, meta = targets[n]
                    tensors[n] = produce(files, chosen[n], _target_dtype(module, attr, meta, model_dtype),
                                         model_dtype).contiguous()
                    weight_map[n] = fname
                    total += tensors[n].numel() * tensors[n].element_size()
                    bar.update(1)
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                del tensors
            bar.close()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
            plan.config.dtype = model_dtype
            plan.config.architectures = ["SpikingBrainForCausalLM"]
            plan.config.to_json_file(str(tmp / "config.json"), use_diff=False)
            for f in plan.extra_files:
                if (src / f).is_file():
                    shutil.copy2(src / f, tmp / f)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _bytes(target, dtype) -> int:
    module, attr, meta = target
    from spikingbrain.loader import _target_dtype

    want = _target_dtype(module, attr, meta, dtype)
    return torch.empty((), dtype=want or meta.dtype).element_size()


def _bar(total, enabled, desc):
    from spikingbrain.loader import _progress

    return _progress(total, enabled, desc)
