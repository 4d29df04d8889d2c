"""Engine settings the plugin imposes on SpikingBrain models."""
from __future__ import annotations

import logging

from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = logging.getLogger("spikingbrain_vllm")


class NoPrefixCaching(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching:
            logger.warning("spikingbrain-vllm: prefix caching is switched off for SpikingBrain models "
                           "(restoring a GLA state from the prefix cache is not verified)")
            cache.enable_prefix_caching = False
