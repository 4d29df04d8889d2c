"""A full-attention layer (``layer_types`` entry ``"full"``) next to sliding-window ones.

The tiny fixture's weights with its last layer switched from ``swa`` to ``full``: vLLM must give
that layer no window (the checkpoint's ``sliding_window`` must not become a model-level window),
matching the main package's outputs for the same layout (``logprobs_full_<i>``)."""
import json

import pytest

from conftest import TINY, start_llm, stop_llm

TOL = 1e-4


@pytest.fixture(scope="module")
def llm_full(tmp_path_factory):
    model = tmp_path_factory.mktemp("full")
    cfg = json.loads((TINY / "config.json").read_text())
    cfg["layer_types"] = ["gla", "swa", "gla", "full"]
    (model / "config.json").write_text(json.dumps(cfg))
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (model / f).symlink_to(TINY / f)
    engine = start_llm(model)
    yield engine
    stop_llm(engine)


def test_full_attention_layer_sees_the_whole_prompt(llm_full, reference):
    from vllm import SamplingParams

    ref, n = reference
    outs = llm_full.generate([{"prompt_token_ids": ref[f"prompt_{i}"].tolist()} for i in range(n)],
                             SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    for i, out in enumerate(outs):
        ids = ref[f"prompt_{i}"].tolist()
        got = [out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
        full = [float(ref[f"logprobs_full_{i}"][t - 1, ids[t]]) for t in range(1, len(ids))]
        windowed = [float(ref[f"logprobs_{i}"][t - 1, ids[t]]) for t in range(1, len(ids))]
        assert max((abs(a - b) for a, b in zip(got, full)), default=0.0) < TOL, f"prompt {i}"
        if len(ids) > 9:  # past the window the two layouts differ, and vLLM follows the full one
            assert max(abs(a - b) for a, b in zip(got, windowed)) > 100 * TOL, f"prompt {i}"
