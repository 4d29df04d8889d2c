"""What every mixer needs to know about the current chunk besides its input."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixerContext:
    """Per-forward facts shared by all layers (the rules: ``spikingbrain/cache.py``).

    positions: ``[B, T]`` position ids of the chunk's tokens.
    cos, sin: RoPE tables ``[B, T, head_dim]``.
    valid: ``[B, T]`` bool, False at padding (None: all valid).
    reset: ``[B, T]`` bool, True at the real tokens that start a new packed document, the first
        token of a chunk included when its position does not follow the cache's (None: none).
    seg: ``[B, T]`` document index inside the chunk (cumulative resets; None without resets);
        0 is the document the cache holds.
    gla_mode: ``spikingbrain.ops.gla`` mode.
    """

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    valid: torch.Tensor | None = None
    reset: torch.Tensor | None = None
    seg: torch.Tensor | None = None
    gla_mode: str = "auto"


def document_starts(positions: torch.Tensor, valid: torch.Tensor | None = None,
                    last_pos: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[B, T]`` bool: the real tokens whose position is not greater than the previous real
    token's of their row, i.e. that start a new packed document (None if there is none).

    Padding (``valid`` False) is skipped: it neither starts a document nor serves as the previous
    token, whatever position id it carries. ``last_pos [B]``: the position of each row's last real
    token before this chunk (a cache's; ``-1``: none), so that a document starting exactly at a
    chunk boundary is seen too."""
    B, T = positions.shape
    if T == 0 or (T == 1 and last_pos is None):
        return None
    idx = torch.arange(T, device=positions.device).expand(B, T)
    real = idx if valid is None else torch.where(valid, idx, -1)
    prev = torch.nn.functional.pad(real[:, :-1], (1, 0), value=-1).cummax(1).values  # previous real index
    prev_pos = positions.gather(1, prev.clamp_min(0))
    has_prev = prev >= 0
    if last_pos is not None:
        prev_pos = torch.where(has_prev, prev_pos, last_pos[:, None])
        has_prev = has_prev | (last_pos >= 0)[:, None]
    reset = has_prev & (positions <= prev_pos)
    if valid is not None:
        reset = reset & valid
    return reset if bool(reset.any()) else None
