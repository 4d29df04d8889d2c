"""SpikingBrainConfig: the architecture, layer by layer, plus presets (parameter counting is in
``modeling.count_parameters``, beside the model it builds).

Field names follow Hugging Face's Llama/Qwen2 configs so converted checkpoints read naturally.
What is new describes the per-layer mixer (`layer_types`), the GLA details, the hybrids' sink
tokens, and the mixture-of-experts FFNs (`mlp_layer_types`).
"""
from __future__ import annotations

import copy

from transformers import PretrainedConfig

from spikingbrain.errors import SpikingBrainError

LAYER_TYPES = ("gla", "swa", "full", "gla+swa", "gla+full")
MLP_LAYER_TYPES = ("dense", "moe")
WINDOW_CONVENTIONS = ("keys", "flash-attn", "sdpa")


class SpikingBrainConfig(PretrainedConfig):
    """Configuration of a SpikingBrain causal LM.

    Args (beyond the Llama/Qwen2 fields):
        layer_types: one entry per layer: ``"gla"`` (gated linear attention), ``"swa"``
            (sliding-window softmax attention), ``"full"`` (causal softmax attention) or the
            intra-layer parallel hybrids ``"gla+swa"`` / ``"gla+full"``.
        sliding_window: keys seen by each query in SWA layers, itself included: query ``i`` sees
            keys ``i - sliding_window + 1 .. i``. Always this meaning, whatever the checkpoint the
            model came from (prefill, decode ring buffers and every consumer use it as is).
        window_convention: how ``sliding_window`` was derived, recorded for readers and tools
            (it does not change the meaning above). ``"keys"``: set directly (native models).
            Models loaded from the released ``gla_swa`` checkpoints, whose config holds a window
            ``W`` (4096): ``"flash-attn"`` (the default) reproduces their training and prefill
            path, flash-attn ``window_size=(W, 0)``: the current token and ``W`` before it, so
            ``sliding_window = W + 1`` (4097); ``"sdpa"`` reproduces their SDPA file and their
            decode cache, ``W`` keys in all, so ``sliding_window = W``. (Their HF decode mixes
            the two: 4097 keys in prefill, 4096 per decode step past the window; neither
            convention alone reproduces that mix beyond ``W`` tokens.)
        gla_feature_map: ``"relu"`` (7B), ``"sigmoid"`` (76B linear branch) or ``"identity"``.
        gla_gate: ``"lowrank"`` (7B: ``logsigmoid(W2 W1 x + b) / normalizer``), ``"full"``
            (a full-rank ``logsigmoid(W x + b) / normalizer``, the released W8ASpike checkpoint's
            gate) or ``"key"`` (76B: ``g_t = 1 - k_t``, no gate parameters; needs a feature map
            in [0, 1]).
        gla_gate_low_rank_dim / gla_gate_logit_normalizer: the 16 and 16 of SPEC.md.
        gla_chunk_size: chunk length of the chunked parallel form on CPU.
        hybrid_separate_proj: hybrids give the linear branch its own q/k/v projections.
        num_sink_tokens: learnable meta tokens every softmax branch attends to (76B: 128).
        attention_bias: biases on q/k/v (Qwen2: True). attention_out_bias: bias on o (Llama's
            ``attention_bias`` also biases o; the converter sets both).
        mlp_layer_types: ``"dense"`` or ``"moe"`` per layer (None: all dense).
        num_experts / num_experts_per_tok / num_shared_experts / router_type /
        router_aux_loss_coef / router_z_loss_coef / moe_intermediate_size / norm_topk_prob:
            the MoE FFN (see ``layers/moe.py``).
        spiking: None for a float model; for a model saved in its spiking inference form
            (``spiking.spikify``), the scheme that built it (``spiking.spikify.SpikingScheme``
            as a dict): the loader rebuilds that structure so the saved integer weights and
            scales load into it.
    """

    model_type = "spikingbrain"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        tie_word_embeddings: bool = False,
        layer_types: list[str] | None = None,
        sliding_window: int = 4096,
        window_convention: str = "keys",
        gla_feature_map: str = "relu",
        gla_gate: str = "lowrank",
        gla_gate_low_rank_dim: int = 16,
        gla_gate_logit_normalizer: float = 16.0,
        gla_chunk_size: int = 64,
        hybrid_separate_proj: bool = False,
        num_sink_tokens: int = 0,
        mlp_layer_types: list[str] | None = None,
        num_experts: int = 0,
        num_experts_per_tok: int = 1,
        num_shared_experts: int = 0,
        router_type: str = "softmax",
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        moe_intermediate_size: int | None = None,
        norm_topk_prob: bool = False,
        spiking: dict | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.sliding_window = sliding_window
        self.window_convention = window_convention
        self.gla_feature_map = gla_feature_map
        self.gla_gate = gla_gate
        self.gla_gate_low_rank_dim = gla_gate_low_rank_dim
        self.gla_gate_logit_normalizer = gla_gate_logit_normalizer
        self.gla_chunk_size = gla_chunk_size
        self.hybrid_separate_proj = hybrid_separate_proj
        self.num_sink_tokens = num_sink_tokens
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.router_type = router_type
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.spiking = dict(spiking) if spiking else None
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set after transformers' own validation, which only knows its own layer-type names.
        self.layer_types = list(layer_types) if layer_types is not None else _alternating(num_hidden_layers)
        self.mlp_layer_types = (
            list(mlp_layer_types) if mlp_layer_types is not None else ["dense"] * num_hidden_layers
        )
        self.validate_architecture()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """transformers' validators, except its layer-type check (it knows only its own names),
        then ours."""
        for check in PretrainedConfig.__class_validators__:
            if check.__name__ != "validate_layer_type":
                check(self)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Raise a SpikingBrainError naming the field if the architecture is inconsistent."""
        n = self.num_hidden_layers
        if len(self.layer_types) != n:
            raise SpikingBrainError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={n}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise SpikingBrainError(f"layer_types: unknown {bad}; choose from {LAYER_TYPES}")
        if len(self.mlp_layer_types) != n:
            raise SpikingBrainError(f"mlp_layer_types has {len(self.mlp_layer_types)} entries but num_hidden_layers={n}")
        bad = [t for t in self.mlp_layer_types if t not in MLP_LAYER_TYPES]
        if bad:
            raise SpikingBrainError(f"mlp_layer_types: unknown {bad}; choose from {MLP_LAYER_TYPES}")
        if "moe" in self.mlp_layer_types and self.num_experts < 1:
            raise SpikingBrainError("mlp_layer_types has 'moe' layers but num_experts < 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SpikingBrainError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is None or self.sliding_window < 1:
            raise SpikingBrainError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.window_convention not in WINDOW_CONVENTIONS:
            raise SpikingBrainError(
                f"window_convention must be one of {WINDOW_CONVENTIONS}, got {self.window_convention!r}"
            )
        if self.gla_feature_map not in ("relu", "sigmoid", "identity"):
            raise SpikingBrainError(f"gla_feature_map must be relu|sigmoid|identity, got {self.gla_feature_map!r}")
        if self.gla_gate not in ("lowrank", "full", "key"):
            raise SpikingBrainError(f"gla_gate must be lowrank|full|key, got {self.gla_gate!r}")
        if self.gla_gate == "key" and self.gla_feature_map != "sigmoid":
            raise SpikingBrainError("gla_gate='key' (g = 1 - k) needs gla_feature_map='sigmoid' so that k is in (0, 1)")
        if self.router_type not in ("softmax", "sigmoid"):
            raise SpikingBrainError(f"router_type must be softmax|sigmoid, got {self.router_type!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SpikingBrainConfig":
        """Build a config from a named preset (see ``PRESETS``); keyword overrides win."""
        if name not in PRESETS:
            raise SpikingBrainError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def constant_state_layers(self) -> list[int]:
        """Layers whose decode state does not grow with context (no full attention)."""
        return [i for i, t in enumerate(self.layer_types) if "full" not in t]


def _alternating(n: int) -> list[str]:
    """The 7B pattern: 0-indexed even layers GLA, odd layers SWA."""
    return ["gla" if i % 2 == 0 else "swa" for i in range(n)]


def layout_76b(n: int, full_every: int = 7) -> tuple[list[str], list[str]]:
    """The 76B pattern for ``n`` layers: parallel hybrids, ``gla+full`` at 1-indexed layers
    7, 14, 21, 28 (every ``full_every``), ``gla+swa`` elsewhere; dense FFN at 1-indexed layers
    1, 2, 3, 5, 7, 9, 11, MoE elsewhere."""
    layer_types = ["gla+full" if (i + 1) % full_every == 0 else "gla+swa" for i in range(n)]
    dense = {1, 2, 3, 5, 7, 9, 11}
    mlp_types = ["dense" if (i + 1) in dense else "moe" for i in range(n)]
    return layer_types, mlp_types


_QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    attention_bias=True,
    attention_out_bias=False,
    tie_word_embeddings=False,
    sliding_window=4096,
    bos_token_id=151643,
    eos_token_id=151643,
)
_LT76, _MLP76 = layout_76b(28)

PRESETS: dict[str, dict] = {
    "spikingbrain-7b": dict(_QWEN25_7B, layer_types=_alternating(28)),
    "spikingbrain-76b": dict(
        _QWEN25_7B,
        layer_types=_LT76,
        mlp_layer_types=_MLP76,
        gla_feature_map="sigmoid",
        gla_gate="key",
        num_sink_tokens=128,
        num_experts=16,
        num_experts_per_tok=1,
        num_shared_experts=1,
    ),
    # The SmolLM2-135M shape (the default teacher) in the 7B layout: demos and benchmarks.
    "smollm2-135m-7b": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        sliding_window=4096,
        layer_types=_alternating(30),
    ),
    # Tiny shapes for tests and quick experiments.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=16,
        gla_chunk_size=16,
        layer_types=_alternating(4),
    ),
    "tiny-76b": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=16,
        gla_chunk_size=16,
        layer_types=["gla+swa", "gla+full", "gla+swa", "gla+full"],
        mlp_layer_types=["dense", "moe", "dense", "moe"],
        gla_feature_map="sigmoid",
        gla_gate="key",
        num_sink_tokens=4,
        num_experts=4,
        num_experts_per_tok=1,
        num_shared_experts=1,
    ),
}
