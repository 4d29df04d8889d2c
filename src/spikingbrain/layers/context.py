"""What every mixer needs to know about the current chunk besides its input."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixerContext:
    """Per-forward facts shared by all layers.

    positions: ``[B, T]`` position ids of the chunk's tokens.
    cos, sin: RoPE tables ``[B, T, head_dim]``.
    valid: ``[B, T]`` bool, False at padding (None: all valid).
    reset: ``[B, T]`` bool, True where a new packed document starts (None: no boundary).
    seg: ``[B, T]`` document index inside the chunk (cumulative resets; None without resets).
    stream_index: ``[B]`` tokens each row fed before this chunk (for ring-buffer slots).
    gla_mode: ``spikingbrain.ops.gla`` mode.
    sink_kv: per-layer sink keys/values when the model has sink tokens (list or None).
    """

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    valid: torch.Tensor | None = None
    reset: torch.Tensor | None = None
    seg: torch.Tensor | None = None
    stream_index: torch.Tensor | None = None
    gla_mode: str = "auto"
