"""Rotary position embedding over the full head dimension (Llama/Qwen2 convention).

``config.rope_parameters`` follows transformers 5 (``{"rope_type", "rope_theta", ...}``). Every
``rope_type`` transformers defines is handled explicitly:

- ``default``: ``theta^(-2i/d)``.
- ``linear``, ``yarn``, ``llama3``, ``proportional``: fixed frequencies (and, for yarn, a cos/sin
  scale) from transformers' own ``ROPE_INIT_FUNCTIONS``, computed once.
- ``dynamic`` (NTK) and ``longrope``: the frequencies depend on the sequence length, which
  transformers takes as ``max(position_ids) + 1`` of each forward call: dynamic rescales the base
  once that exceeds ``max_position_embeddings``, longrope switches from its short to its long
  factors above ``original_max_position_embeddings``. We do the same per call, so a one-shot
  forward and a token-by-token decode match transformers'. (transformers also keeps the largest
  length it has seen in module state between calls; we do not, so an unrelated shorter sequence
  after a long one is not affected by it.)

Anything else (a new transformers type, per-layer-type parameters, a rotary dimension smaller
than the head) is refused by ``check_rope_parameters`` with a clear error, at conversion and at construction.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError

STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
ROPE_TYPES = STATIC_ROPE_TYPES + LENGTH_DEPENDENT_ROPE_TYPES


def rope_type_of(config) -> str:
    params = config.rope_parameters or {}
    return params.get("rope_type", params.get("type", "default"))


def check_rope_parameters(config) -> None:
    """Raise a ``SpikingBrainError`` unless ``config``'s RoPE is one this module reproduces."""
    params = config.rope_parameters
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise SpikingBrainError(f"rope_parameters must be a dict with 'rope_theta', got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise SpikingBrainError(
            "per-layer-type RoPE parameters (a different RoPE for sliding and full layers) are not supported"
        )
    rope_type = rope_type_of(config)
    if rope_type not in ROPE_TYPES:
        raise SpikingBrainError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    try:
        inv_freq, _ = RotaryEmbedding.compute_inv_freq(config)
    except (KeyError, TypeError, ValueError) as e:
        raise SpikingBrainError(f"rope_parameters {params} are incomplete for rope_type {rope_type!r}: {e}") from e
    if 2 * inv_freq.numel() != config.head_dim:  # partial_rotary_factor < 1 (Llama's own code fails too)
        raise SpikingBrainError(
            f"rope_type {rope_type!r} with these parameters rotates {2 * inv_freq.numel()} of the head's "
            f"{config.head_dim} dimensions; SpikingBrain rotates the full head (partial_rotary_factor=1)"
        )


class RotaryEmbedding(nn.Module):
    """Returns ``(cos, sin)`` of shape ``[B, T, head_dim]`` for integer ``position_ids [B, T]``."""

    def __init__(self, config) -> None:
        super().__init__()
        check_rope_parameters(config)
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.config = config
        self.rope_type = rope_type_of(config)
        self._seq_len: int | None = None

    @contextlib.contextmanager
    def sequence_length(self, seq_len: int):
        """Inside this block the length-dependent types use ``seq_len`` instead of the call's own
        ``max(position_ids) + 1``: a context-parallel shard sees only its part of the positions,
        while the frequencies belong to the whole sequence."""
        previous, self._seq_len = self._seq_len, int(seq_len)
        try:
            yield
        finally:
            self._seq_len = previous

    @staticmethod
    def compute_inv_freq(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """Frequencies and cos/sin scale; ``seq_len`` matters for the length-dependent types only
        (None: the frequencies used up to the original length)."""
        params = config.rope_parameters
        rope_type = rope_type_of(config)
        if rope_type == "default":
            dim = config.head_dim
            base = float(params["rope_theta"])
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            return inv_freq, 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)

    def _frequencies(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.rope_type not in LENGTH_DEPENDENT_ROPE_TYPES or position_ids.numel() == 0:
            return self.inv_freq, self.attention_scaling
        seq_len = self._seq_len if self._seq_len is not None else int(position_ids.max()) + 1
        if self.rope_type == "dynamic":
            if seq_len <= self.config.max_position_embeddings:
                return self.inv_freq, self.attention_scaling
            return self.compute_inv_freq(self.config, seq_len)
        # longrope: long factors above the original length; the cos/sin scale stays the one
        # computed at init (transformers does not update it either)
        if seq_len <= self.config.rope_parameters["original_max_position_embeddings"]:
            return self.inv_freq, self.attention_scaling
        long_freq, _ = self.compute_inv_freq(self.config, seq_len)
        return long_freq, self.attention_scaling

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self._frequencies(position_ids)
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * scaling
        sin = emb.sin() * scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]``, ``cos/sin [B, T, D]``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
