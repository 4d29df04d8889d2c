"""Learning-rate schedules as a pure function of the optimizer step (nothing to save or drift).

``lr_at(step)`` for 0-indexed optimizer step ``step`` of ``total``:

- warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``;
- ``cosine``: from ``lr`` down to ``lr * min_lr_ratio`` over the remaining steps;
- ``wsd`` (warm-up, stable, decay): ``lr`` until the last ``decay_fraction`` of the steps, then
  linear down to ``lr * min_lr_ratio``;
- ``constant``: ``lr``.
"""
from __future__ import annotations

import math

from spikingbrain.train.recipe import OptimSection


def lr_at(step: int, total: int, cfg: OptimSection) -> float:
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, math.ceil(cfg.decay_fraction * total))
    start = total - decay_steps
    if step < start:
        return peak
    progress = min(1.0, (step - start + 1) / decay_steps)
    return peak + (floor - peak) * progress
