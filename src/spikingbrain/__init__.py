"""SpikingBrain: brain-inspired hybrid linear/sliding-window spiking LLMs, converted from
pretrained Transformers.

Importing the package registers ``SpikingBrainConfig`` / ``SpikingBrainForCausalLM`` with
transformers' Auto classes (no ``trust_remote_code`` needed), for this package's checkpoints and
for the released SpikingBrain-7B ones (``model_type: "gla_swa"``, ``convert/official.py``).
"""
from spikingbrain.cache import SpikingBrainCache
from spikingbrain.config import PRESETS, SpikingBrainConfig
from spikingbrain.errors import SpikingBrainError
from spikingbrain.modeling import SpikingBrainForCausalLM, SpikingBrainModel, count_parameters
from spikingbrain.convert import official as _official  # noqa: E402,F401  (the released gla_swa format)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SpikingBrainCache",
    "SpikingBrainConfig",
    "SpikingBrainError",
    "SpikingBrainForCausalLM",
    "SpikingBrainModel",
    "convert_from_transformer",
    "count_parameters",
    "load_teacher",
    "upcycle_moe",
]


def __getattr__(name):  # the conversion pipeline is imported lazily (it pulls in gguf etc.)
    if name in ("convert_from_transformer", "load_teacher"):
        from spikingbrain import convert

        return getattr(convert, name)
    if name == "upcycle_moe":
        from spikingbrain.convert.upcycle import upcycle_moe

        return upcycle_moe
    raise AttributeError(f"module 'spikingbrain' has no attribute {name!r}")
