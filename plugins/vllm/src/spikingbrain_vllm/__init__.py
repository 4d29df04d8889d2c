"""vLLM plugin for SpikingBrain models (entry point ``vllm.general_plugins: spikingbrain``).

``register()`` runs in every vLLM process before a model is loaded. It teaches transformers the
two config formats and vLLM the two architectures, and switches prefix caching off for them:
vLLM's prefix caching would restore a GLA state saved at a block boundary ("align" mode), which
nothing here has verified, so it is refused rather than trusted.
"""
from __future__ import annotations

ARCHITECTURES = {
    "SpikingBrainForCausalLM": "spikingbrain_vllm.modeling:SpikingBrainForCausalLM",
    "GLAswaForCausalLM": "spikingbrain_vllm.modeling:SpikingBrainForCausalLM",
}


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from spikingbrain_vllm.config import GLASWAVllmConfig, SpikingBrainVllmConfig
    from spikingbrain_vllm.engine_config import NoPrefixCaching

    AutoConfig.register("spikingbrain", SpikingBrainVllmConfig, exist_ok=True)
    AutoConfig.register("gla_swa", GLASWAVllmConfig, exist_ok=True)
    for arch, path in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, path)
        MODELS_CONFIG_MAP[arch] = NoPrefixCaching
