"""Where transformers' API moved between the versions we support (see pyproject.toml).

transformers 5.24 renamed the decode state from ``past_key_values`` to ``cache`` (in model
outputs, in ``generate()``'s model kwargs and in the forward arguments it passes); 5.23 only
knows ``past_key_values``. Our own model accepts both names; these helpers pick the installed
version's name when we call other models (teachers) or build outputs.
"""
from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

#: the keyword transformers' models and ``generate()`` use for the decode state
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out):
    """The decode state a model output carries (``None`` when it has none)."""
    return getattr(out, CACHE_KWARG, None)


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for calling any transformers model with a decode state."""
    return {CACHE_KWARG: cache}
