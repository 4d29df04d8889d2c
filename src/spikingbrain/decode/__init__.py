"""Lean decode: a one-token step over preallocated state that ``torch.compile`` can fuse
(``step.py``), its state (``state.py``), packed int8/int4 weights (``weights.py``) and the
adapter the generation paths use (``adapter.py``)."""
from spikingbrain.decode.state import KV_DTYPES, LeanState
from spikingbrain.decode.step import LeanDecoder, Unsupported
from spikingbrain.decode.weights import WEIGHT_FORMATS

__all__ = ["KV_DTYPES", "LeanDecoder", "LeanState", "Unsupported", "WEIGHT_FORMATS"]
