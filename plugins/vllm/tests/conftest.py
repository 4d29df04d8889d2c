"""Shared fixtures of the plugin's tests (run in the plugin's own environment: plugins/vllm/ci.sh).

One vLLM engine per test module: starting one costs tens of seconds on 2 cores.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
TINY = FIXTURES / "tiny"

# small, fixed memory: the default reserves most of the machine's RAM for the KV cache
ENGINE_KW = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                 kv_cache_memory_bytes=2**20, seed=0)


@pytest.fixture(scope="session")
def reference():
    from safetensors.torch import load_file

    ref = load_file(str(FIXTURES / "reference.safetensors"))
    n = len([k for k in ref if k.startswith("prompt_")])
    return ref, n


def start_llm(model, **kw):
    from vllm import LLM

    return LLM(str(model), **{**ENGINE_KW, **kw})


def stop_llm(engine) -> None:
    """Shut the engine down before the next module starts its own (one at a time in memory)."""
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def llm():
    """The tiny native checkpoint. Prefix caching is asked for and must be switched off by the
    plugin; at most 32 tokens per step, so the 70-token prompt is prefilled in three chunks
    (the GLA state carried between them) while other requests decode."""
    engine = start_llm(TINY, enable_prefix_caching=True, max_num_batched_tokens=32)
    yield engine
    stop_llm(engine)
