"""Config reading: window conventions, the released format's fields, clear refusals."""
import json

import pytest

from spikingbrain_vllm.config import GLASWAVllmConfig, SpikingBrainConfigError, SpikingBrainVllmConfig

from conftest import TINY


def test_native_window_is_keys_including_current():
    cfg = SpikingBrainVllmConfig(**json.loads((TINY / "config.json").read_text()))
    assert cfg.window_keys == 8
    assert cfg.layer_types == ["gla", "swa", "gla", "swa"]
    # no model-level window: vLLM would apply it to full-attention layers as well
    assert getattr(cfg, "sliding_window", None) is None


def test_released_format_window_is_flash_attn_left_window():
    cfg = GLASWAVllmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=100, attn_layers=[1, 3], sliding_window=4096,
                           rope_theta=1e6, norm_eps=1e-6, hidden_act="swish", use_short_conv=False, conv_size=4,
                           attn_mode="chunk", fuse_cross_entropy=True, elementwise_affine=True)
    assert cfg.window_keys == 4097  # window_size=(4096, 0): the current token + 4096 before it
    assert cfg.layer_types == ["gla", "swa", "gla", "swa"]
    assert cfg.head_dim == 32 and cfg.attention_bias and not cfg.attention_out_bias
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.hidden_act == "silu"
    assert GLASWAVllmConfig(num_hidden_layers=2, window_keys=4096).window_keys == 4096  # hf_overrides


def test_released_format_round_trips():
    cfg = GLASWAVllmConfig(num_hidden_layers=4, attn_layers=[1, 3], sliding_window=16)
    again = GLASWAVllmConfig(**cfg.to_dict())
    assert again.window_keys == 17 and again.layer_types == cfg.layer_types


@pytest.mark.parametrize("change,message", [
    (dict(layer_types=["gla+swa", "gla+full"]), "76B layout"),
    (dict(num_sink_tokens=4), "sink tokens"),
    (dict(mlp_layer_types=["dense", "moe"], num_experts=4), "mixture-of-experts"),
    (dict(layer_types=["gla", "mamba"]), "unknown"),
    (dict(gla_feature_map="elu"), "gla_feature_map"),
    (dict(spiking={"scheme": "ternary", "threshold_k": 3.0}), "spiking inference form"),
])
def test_unservable_configs_are_refused_clearly(change, message):
    kw = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2)
    kw.update(change)
    with pytest.raises(SpikingBrainConfigError, match=message):
        SpikingBrainVllmConfig(**kw)


def test_engine_refuses_the_76b_layout_with_the_reason(tmp_path):
    """Through vLLM's own config loading (before any engine starts): the message reaches the user."""
    from vllm import LLM

    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(layer_types=["gla+swa", "gla+full", "gla+swa", "gla+full"], num_sink_tokens=4)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="76B layout"):
        LLM(str(tmp_path), dtype="float32", enforce_eager=True)
