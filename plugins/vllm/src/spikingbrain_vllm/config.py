"""The two checkpoint configs this plugin serves, read into one set of attributes.

- ``model_type: "spikingbrain"``: this project's own checkpoints (``spikingbrain convert``).
  ``sliding_window`` counts the keys a query sees, itself included.
- ``model_type: "gla_swa"``: the released SpikingBrain-7B (``GLAswaForCausalLM``). Its
  ``sliding_window`` (4096) is flash-attn's left window: the model was trained with
  ``window_size=(4096, 0)``, i.e. the current token and 4096 before it = 4097 keys.

Both classes expose ``window_keys`` (keys per query, current token included: what vLLM's CPU
attention backend calls its sliding window) and deliberately no ``sliding_window`` attribute: vLLM
would otherwise apply a model-level window to the full-attention layers too. Pass
``hf_overrides={"window_keys": N}`` to serve with another window.

This module must not import the main ``spikingbrain`` package: the two live in different
environments (their transformers ranges do not overlap).
"""
from __future__ import annotations

from transformers import PretrainedConfig

SUPPORTED_LAYER_TYPES = ("gla", "swa", "full")
ALL_LAYER_TYPES = ("gla", "swa", "full", "gla+swa", "gla+full")


class SpikingBrainConfigError(ValueError):
    """A checkpoint this plugin cannot serve (with the reason and what to do)."""


def _validate(cfg) -> None:
    n = cfg.num_hidden_layers
    if len(cfg.layer_types) != n:
        raise SpikingBrainConfigError(f"layer_types has {len(cfg.layer_types)} entries, num_hidden_layers={n}")
    unknown = sorted(set(cfg.layer_types) - set(ALL_LAYER_TYPES))
    if unknown:
        raise SpikingBrainConfigError(f"layer_types: unknown {unknown}; known {ALL_LAYER_TYPES}")
    hybrids = sorted({t for t in cfg.layer_types if "+" in t})
    if hybrids:
        # A parallel hybrid needs a linear state and a paged KV cache in one layer plus per-layer
        # merge weights; the 76B layout also needs sink tokens, which vLLM's CPU attention kernel
        # cannot attend to (it takes no extra key/value prefix). Not served yet.
        raise SpikingBrainConfigError(
            f"the 76B layout (intra-layer parallel hybrids {hybrids}) is not supported by the vLLM "
            "plugin yet; serve it with `spikingbrain serve`")
    if getattr(cfg, "num_sink_tokens", 0):
        raise SpikingBrainConfigError(
            "sink tokens (num_sink_tokens > 0) are not supported by the vLLM plugin: vLLM's CPU "
            "attention cannot attend to a learned key/value prefix; serve it with `spikingbrain serve`")
    if getattr(cfg, "spiking", None):
        # saved by `spikingbrain spikes --save` / spikify: activations are spike-coded at run time,
        # which this plugin's layers do not do; serving it as a float model would be silently wrong
        raise SpikingBrainConfigError(
            "this checkpoint is saved in its spiking inference form (config.spiking is set); the vLLM "
            "plugin serves float models only: serve it with `spikingbrain serve`, or serve the float "
            "model it was made from")
    if any(t != "dense" for t in cfg.mlp_layer_types):
        raise SpikingBrainConfigError(
            "mixture-of-experts FFNs (mlp_layer_types 'moe') are not supported by the vLLM plugin "
            "yet; serve the model with `spikingbrain serve`")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise SpikingBrainConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.gla_feature_map not in ("relu", "sigmoid", "identity"):
        raise SpikingBrainConfigError(f"gla_feature_map must be relu|sigmoid|identity, got {cfg.gla_feature_map!r}")
    if cfg.gla_gate not in ("lowrank", "key"):
        raise SpikingBrainConfigError(f"gla_gate must be lowrank|key, got {cfg.gla_gate!r}")
    if "swa" in cfg.layer_types and (cfg.window_keys is None or cfg.window_keys < 1):
        raise SpikingBrainConfigError(f"sliding-window layers need window_keys >= 1, got {cfg.window_keys}")


class SpikingBrainVllmConfig(PretrainedConfig):
    """This project's checkpoint format (``src/spikingbrain/config.py`` in the main package)."""

    model_type = "spikingbrain"

    def __init__(self, vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                 max_position_embeddings=131072, rms_norm_eps=1e-6, rope_parameters=None,
                 attention_bias=False, attention_out_bias=False, tie_word_embeddings=False,
                 layer_types=None, sliding_window=4096, window_keys=None, gla_feature_map="relu",
                 gla_gate="lowrank", gla_gate_low_rank_dim=16, gla_gate_logit_normalizer=16.0,
                 num_sink_tokens=0, mlp_layer_types=None, spiking=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        # keys per query including the current token: the native convention is already that
        self.window_keys = window_keys if window_keys is not None else sliding_window
        self.gla_feature_map = gla_feature_map
        self.gla_gate = gla_gate
        self.gla_gate_low_rank_dim = gla_gate_low_rank_dim
        self.gla_gate_logit_normalizer = float(gla_gate_logit_normalizer)
        self.num_sink_tokens = num_sink_tokens
        self.spiking = spiking
        for unused in ("gla_chunk_size", "hybrid_separate_proj"):  # training-side knobs
            kwargs.pop(unused, None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # after PretrainedConfig, which validates layer_types against its own names
        self.layer_types = list(layer_types) if layer_types is not None else [
            "gla" if i % 2 == 0 else "swa" for i in range(num_hidden_layers)]
        self.mlp_layer_types = list(mlp_layer_types or ["dense"] * num_hidden_layers)
        _validate(self)

    def validate(self) -> None:  # transformers' layer-type check knows only its own names
        _validate(self)


class GLASWAVllmConfig(SpikingBrainVllmConfig):
    """The released SpikingBrain-7B format (``model_type: "gla_swa"``, SPEC.md section 7):
    Qwen2.5-7B shapes, ``attn_layers`` = indices of the window-attention layers, biases on
    q/k/v, ReLU GLA with the 16-rank gate, top-level ``rope_theta``."""

    model_type = "gla_swa"

    def __init__(self, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, attn_layers=None, sliding_window=4096,
                 window_keys=None, norm_eps=1e-6, rope_theta=1e6, hidden_act="swish",
                 max_position_embeddings=131072, tie_word_embeddings=False, **kwargs):
        for unused in ("attn_mode", "conv_size", "use_short_conv", "fuse_cross_entropy", "elementwise_affine"):
            kwargs.pop(unused, None)
        # fields this format fixes or derives (present again when a config is re-read from to_dict)
        for derived in ("layer_types", "mlp_layer_types", "rms_norm_eps", "rope_parameters", "head_dim",
                        "attention_bias", "attention_out_bias"):
            kwargs.pop(derived, None)
        attn = set(attn_layers if attn_layers is not None else range(1, num_hidden_layers, 2))
        if hidden_act in ("swish", "silu"):
            hidden_act = "silu"
        super().__init__(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, hidden_act=hidden_act,
            max_position_embeddings=max_position_embeddings, rms_norm_eps=norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
            attention_bias=True, attention_out_bias=False, tie_word_embeddings=tie_word_embeddings,
            layer_types=["swa" if i in attn else "gla" for i in range(num_hidden_layers)],
            # flash-attn window_size=(w, 0): the current token and w before it
            window_keys=window_keys if window_keys is not None else sliding_window + 1,
            **kwargs)
        self.attn_layers = sorted(attn)
