"""Weight mapping: a Llama/Qwen2/Mistral teacher -> a SpikingBrain model, layer i to layer i.

q/k/v/o (with biases), norms, FFN, embeddings and LM head are copied. New parameters:

- GLA gate ``gk_proj``: ``W_g1 ~ N(0, 0.02)``, ``W_g2 = 0`` and a bias spread over the key
  channels so that the per-token decay ``sigmoid(b)^(1/16)`` ranges from ~0.90 (a few tokens of
  memory) to ~0.999 (about a thousand): at init the gate is input-independent and multi-scale;
  training makes it selective.
- GLA output norm ``o_norm``: weight 1 by default. ``calibrate_output_norms`` then sets, per
  channel, the ratio of the teacher attention output's RMS to the normalised GLA output's RMS on
  a few calibration sequences, so every converted layer starts at its teacher layer's output
  power. Measured on the default teacher (SmolLM2-135M) in the 7B layout, perplexity on 4x512
  tokens of data/valid.jsonl: 104,868 uncalibrated, 452 after calibrating on 256 tokens of
  data/train.jsonl (446 with 4x512); the teacher: 38.0.
- Hybrid merge weights 0.5 each, sink tokens N(0, 0.02); the softmax-branch norm is calibrated
  like ``o_norm``.
"""
from __future__ import annotations

import torch
from torch import nn

from spikingbrain.config import SpikingBrainConfig, _alternating, layout_76b
from spikingbrain.convert.teacher import check_family
from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.rope import check_rope_parameters

LAYOUTS = ("7b", "76b", "full", "gla", "swa")


def _layer_types(layout, n: int) -> tuple[list[str], list[str] | None]:
    if isinstance(layout, (list, tuple)):
        if len(layout) != n:
            raise SpikingBrainError(f"layout lists {len(layout)} layer types but the teacher has {n} layers")
        return list(layout), None
    if layout == "7b":
        return _alternating(n), None
    if layout == "76b":
        return layout_76b(n)
    if layout in ("full", "gla", "swa"):
        return [layout] * n, None
    raise SpikingBrainError(f"unknown layout {layout!r}: use one of {LAYOUTS} or a list of layer types")


def teacher_sliding_layers(teacher_config) -> tuple[list[bool], int | None]:
    """Which teacher layers attend through a sliding window, and that window: Mistral slides in
    every layer when ``sliding_window`` is set; Qwen2 (``use_sliding_window``) and newer configs
    list ``"sliding_attention"`` in ``layer_types``. ``([False] * n, None)`` when none does."""
    tc = teacher_config
    n = tc.num_hidden_layers
    window = getattr(tc, "sliding_window", None)
    if not window:
        return [False] * n, None
    types = getattr(tc, "layer_types", None)
    if types is not None:
        sliding = [t == "sliding_attention" for t in types]
    elif getattr(tc, "model_type", "") == "mistral" or getattr(tc, "use_sliding_window", False):
        sliding = [True] * n
    else:
        sliding = [False] * n
    return sliding, (int(window) if any(sliding) else None)


def config_from_teacher(teacher_config, layout="7b", sliding_window: int | None = None, **overrides) -> SpikingBrainConfig:
    """The SpikingBrain config whose shapes match ``teacher_config``.

    ``layout="full"`` is the identity conversion: a teacher layer that itself attends through a
    sliding window (Mistral, Qwen2 with ``use_sliding_window``) becomes ``"swa"`` with the
    teacher's window, every other layer ``"full"``.
    """
    tc = teacher_config
    n = tc.num_hidden_layers
    layer_types, mlp_types = _layer_types(layout, n)
    if isinstance(layout, str) and layout == "full":
        sliding, t_window = teacher_sliding_layers(tc)
        if t_window is not None:
            if sliding_window is not None and int(sliding_window) != t_window:
                raise SpikingBrainError(
                    f"layout='full' reproduces the teacher, whose layers slide over {t_window} tokens; "
                    f"drop sliding_window={sliding_window} or use layout='swa'"
                )
            layer_types = ["swa" if s else "full" for s in sliding]
            sliding_window = t_window
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", float(getattr(tc, "rope_theta", None) or 10000.0))
    kw = dict(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_act=getattr(tc, "hidden_act", "silu"),
        max_position_embeddings=tc.max_position_embeddings,
        rms_norm_eps=tc.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        layer_types=layer_types,
        sliding_window=int(sliding_window or 4096),
        bos_token_id=tc.bos_token_id,
        eos_token_id=tc.eos_token_id,
        pad_token_id=getattr(tc, "pad_token_id", None),
    )
    if mlp_types is not None:  # the 76B pattern
        kw.update(
            mlp_layer_types=["dense"] * n,  # upcycle_moe turns the MoE layers on afterwards
            gla_feature_map="sigmoid", gla_gate="key", num_sink_tokens=128,
        )
    kw.update(overrides)
    config = SpikingBrainConfig(**kw)
    try:
        check_rope_parameters(config)
    except SpikingBrainError as e:
        raise SpikingBrainError(f"cannot convert this teacher's RoPE: {e}") from e
    return config


def _copy(dst: nn.Linear | nn.Module, src: nn.Module) -> None:
    dst.weight.data.copy_(src.weight.data)
    sb = getattr(src, "bias", None)
    db = getattr(dst, "bias", None)
    if sb is not None:
        if db is None:
            raise SpikingBrainError("teacher projection has a bias the student lacks (config mismatch)")
        db.data.copy_(sb.data)
    elif db is not None:
        db.data.zero_()


def init_gla_gate(gk_proj: nn.Sequential, std: float = 0.02, generator=None) -> None:
    """Input-independent, multi-scale decays at init (see module docstring)."""
    w1, w2 = gk_proj[0], gk_proj[1]
    with torch.no_grad():
        w1.weight.normal_(0.0, std, generator=generator)
        w2.weight.zero_()
        # per-token decay sigmoid(b)^(1/16) from 0.90 to 0.999: b = logit(decay^16)
        decay = torch.linspace(0.90, 0.999, w2.bias.numel())
        p = decay.pow(16).clamp(1e-6, 1 - 1e-6)
        w2.bias.copy_(torch.log(p / (1 - p)))


@torch.no_grad()
def convert_from_transformer(
    teacher=None,
    layout="7b",
    sliding_window: int | None = None,
    tokenizer=None,
    calibration_ids: torch.Tensor | None = None,
    seed: int = 0,
    **config_overrides,
):
    """Convert a Llama/Qwen2/Mistral causal LM into a ``SpikingBrainForCausalLM``.

    ``teacher``: a model, a path/"default" (loaded with ``load_teacher``), or None (the default).
    ``layout``: ``"7b"`` (even layers GLA, odd SWA), ``"76b"`` (parallel hybrids + MoE, via
    ``upcycle_moe``), ``"full"`` (all softmax: the identity conversion), ``"gla"``, ``"swa"``, or
    an explicit list of layer types. ``calibration_ids [B, T]``: token ids used to calibrate the
    new output norms (skipped when None). Returns the student in eval mode, fp32, on the
    teacher's device; ``student.tokenizer`` holds the tokenizer when one was given or loaded.
    """
    from spikingbrain.modeling import SpikingBrainForCausalLM

    if teacher is None or isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__"):
        from spikingbrain.convert.teacher import load_teacher

        teacher, tok = load_teacher(teacher)
        tokenizer = tokenizer or tok
    check_family(teacher)
    tc = teacher.config
    config = config_from_teacher(tc, layout, sliding_window, **config_overrides)
    t_attn = teacher.model.layers[0].self_attn
    config.attention_bias = t_attn.q_proj.bias is not None
    config.attention_out_bias = t_attn.o_proj.bias is not None
    chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None

    torch.manual_seed(seed)
    student = SpikingBrainForCausalLM(config).to(device=next(teacher.parameters()).device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    sm, tm = student.model, teacher.model
    sm.embed_tokens.weight.copy_(tm.embed_tokens.weight)
    sm.norm.weight.copy_(tm.norm.weight)
    if not config.tie_word_embeddings:
        student.lm_head.weight.copy_(teacher.lm_head.weight)
    for i, (s, t) in enumerate(zip(sm.layers, tm.layers)):
        s.input_layernorm.weight.copy_(t.input_layernorm.weight)
        s.post_attention_layernorm.weight.copy_(t.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy(getattr(s.mlp, name), getattr(t.mlp, name))
        mixer = s.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _copy(getattr(mixer, name), getattr(t.self_attn, name))
        gla = mixer if hasattr(mixer, "gk_proj") else getattr(mixer, "gla", None)
        if gla is not None:
            if getattr(gla, "gk_proj", None) is not None:
                g = torch.Generator().manual_seed(seed * 1000 + i)
                init_gla_gate(gla.gk_proj, generator=g)
            if hasattr(gla, "q_proj") and gla is not mixer:  # hybrid with separate projections
                for name in ("q_proj", "k_proj", "v_proj"):
                    _copy(getattr(gla, name), getattr(t.self_attn, name))
    del gen
    if layout == "76b":
        from spikingbrain.convert.upcycle import upcycle_moe

        _, mlp_types = layout_76b(config.num_hidden_layers)
        moe_layers = [i for i, t in enumerate(mlp_types) if t == "moe"]
        upcycle_moe(student, num_experts=16, top_k=1, num_shared_experts=1, layers=moe_layers, seed=seed)
    student.eval()
    if calibration_ids is not None:
        calibrate_output_norms(student, teacher, calibration_ids)
    if tokenizer is not None:
        student.tokenizer = tokenizer
        if chat_template:
            student.config.chat_template_source = "teacher"
    student.config.converted_from = str(getattr(teacher, "name_or_path", "") or getattr(tc, "_name_or_path", ""))
    student.config.conversion_layout = layout if isinstance(layout, str) else "custom"
    return student


@torch.no_grad()
def teacher_attention_io(teacher, ids: torch.Tensor, layers: list[int]):
    """Run the teacher and capture, for ``layers``, the normed input of each attention block and
    its output before ``o_proj`` (``[B, T, H*D]``). Returns ``{i: (x_in, attn_out)}``."""
    captured: dict[int, list] = {i: [None, None] for i in layers}
    hooks = []
    for i in layers:
        attn = teacher.model.layers[i].self_attn

        def pre(mod, args, kwargs, i=i):
            captured[i][0] = kwargs.get("hidden_states", args[0] if args else None)

        def o_in(mod, args, i=i):
            captured[i][1] = args[0]

        hooks.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(attn.o_proj.register_forward_pre_hook(o_in))
    try:
        teacher(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {i: (captured[i][0], captured[i][1]) for i in layers}


@torch.no_grad()
def calibrate_output_norms(student, teacher, ids: torch.Tensor) -> dict[int, float]:
    """Set each GLA ``o_norm`` (and hybrid ``attn_norm``) weight so that, per channel, the
    converted layer's output power matches the teacher layer's on ``ids``. Returns, per layer,
    the mean scale applied.

    ``ids [B, T]``: unpadded token ids of ordinary text (a few hundred tokens are enough). Each
    layer is calibrated on the teacher's own normed input to that layer; a teacher in another
    dtype (bf16) is fine, its activations are cast to the student's. In hybrids with sink tokens
    the softmax branch attends to the sinks as in the real forward; the sinks' keys/values are
    recomputed after each calibrated layer, whose norms feed the sinks' later layers.
    """
    from spikingbrain.layers.context import MixerContext

    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise SpikingBrainError(f"calibration ids must be an integer tensor [batch, seq_len], got {got}")
    if len(student.model.layers) != len(teacher.model.layers):
        raise SpikingBrainError(
            f"student has {len(student.model.layers)} layers, teacher {len(teacher.model.layers)}: "
            "calibrate a student against the teacher it was converted from"
        )
    layers = [i for i, t in enumerate(student.config.layer_types) if "gla" in t]
    if not layers:
        return {}
    io = teacher_attention_io(teacher, ids, layers)
    param = student.model.embed_tokens.weight
    out = {}
    B, T = ids.shape
    pos = torch.arange(T, device=param.device)[None].expand(B, T)
    cos, sin = student.model.rotary_emb(param, pos)
    ctx = MixerContext(positions=pos, cos=cos, sin=sin, gla_mode=student.model.gla_mode)
    has_sinks = getattr(student.model, "sink_tokens", None) is not None
    sink_kv = student.model.compute_sink_kv() if has_sinks else [None] * len(student.model.layers)
    for i in layers:
        x, target = io[i]
        x = x.to(device=param.device, dtype=param.dtype)
        mixer = student.model.layers[i].self_attn
        H, D = mixer.num_heads, mixer.head_dim
        tgt = target.reshape(B, T, H, D).float().to(param.device)
        tgt_rms = tgt.pow(2).mean(dim=(0, 1, 2)).sqrt()  # [D]
        gla = mixer if hasattr(mixer, "o_norm") else mixer.gla
        gla.o_norm.weight.fill_(1.0)
        if gla is mixer:
            zq = mixer.q_proj(x).view(B, T, H, D)
            zk = mixer.k_proj(x).view(B, T, mixer.num_kv_heads, D)
            v = mixer.v_proj(x).view(B, T, mixer.num_kv_heads, D)
            o = mixer.linear_attention(x, zq, zk, v, ctx)
            scale = tgt_rms / o.float().pow(2).mean(dim=(0, 1, 2)).sqrt().clamp_min(1e-8)
            gla.o_norm.weight.copy_(scale)
        else:  # parallel hybrid: each branch to the teacher's power; the 0.5/0.5 merge averages
            mixer.attn_norm.weight.fill_(1.0)
            o_lin, o_soft = mixer.branches(x, ctx, sink_kv=sink_kv[i])
            s_lin = tgt_rms / o_lin.float().pow(2).mean(dim=(0, 1, 2)).sqrt().clamp_min(1e-8)
            s_soft = tgt_rms / o_soft.float().pow(2).mean(dim=(0, 1, 2)).sqrt().clamp_min(1e-8)
            gla.o_norm.weight.copy_(s_lin)
            mixer.attn_norm.weight.copy_(s_soft)
            scale = (s_lin + s_soft) / 2
            if has_sinks:
                sink_kv = student.model.compute_sink_kv()
        out[i] = float(scale.mean())
    return out
