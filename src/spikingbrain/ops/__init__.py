"""Functional kernels (no nn.Module state): gated linear attention and windowed attention."""
from spikingbrain.ops.gla import gla
from spikingbrain.ops.sliding_window import windowed_attention

__all__ = ["gla", "windowed_attention"]
