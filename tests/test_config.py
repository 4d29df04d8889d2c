"""SpikingBrainConfig: HF field names, validation with clear errors, presets, Auto* registration
and parameter counts of the reference configurations (SPEC.md section 2)."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from spikingbrain import PRESETS, SpikingBrainConfig, SpikingBrainError, SpikingBrainForCausalLM, count_parameters
from spikingbrain.config import LAYER_TYPES, layout_76b

QWEN25_7B_PARAMS = 7_615_616_512  # Qwen2.5-7B, the teacher


def test_field_names_follow_llama_qwen2():
    cfg = SpikingBrainConfig.from_preset("spikingbrain-7b")
    expected = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-6, attention_bias=True,
        tie_word_embeddings=False, sliding_window=4096, gla_gate_low_rank_dim=16,
        gla_gate_logit_normalizer=16.0, gla_feature_map="relu", gla_gate="lowrank",
        num_sink_tokens=0,
    )
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    assert cfg.rope_parameters["rope_theta"] == 1e6
    assert cfg.model_type == "spikingbrain"
    # the 7B layout: 0-indexed even layers GLA, odd layers SWA, no full attention
    assert cfg.layer_types == ["gla" if i % 2 == 0 else "swa" for i in range(28)]
    assert cfg.mlp_layer_types == ["dense"] * 28
    assert cfg.constant_state_layers == list(range(28))


def test_76b_layout():
    cfg = SpikingBrainConfig.from_preset("spikingbrain-76b")
    full = [i + 1 for i, t in enumerate(cfg.layer_types) if t == "gla+full"]
    assert full == [7, 14, 21, 28]
    assert set(cfg.layer_types) == {"gla+swa", "gla+full"}
    dense = [i + 1 for i, t in enumerate(cfg.mlp_layer_types) if t == "dense"]
    assert dense == [1, 2, 3, 5, 7, 9, 11]
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_shared_experts) == (16, 1, 1)
    assert cfg.num_sink_tokens == 128 and cfg.gla_feature_map == "sigmoid" and cfg.gla_gate == "key"
    assert layout_76b(28) == (cfg.layer_types, cfg.mlp_layer_types)


def test_default_config_and_dict_round_trip(tmp_path):
    cfg = SpikingBrainConfig.from_preset("tiny", sliding_window=8, layer_types=["gla", "full", "gla+swa", "swa"])
    assert cfg.sliding_window == 8  # overrides win over the preset
    again = SpikingBrainConfig.from_dict(cfg.to_dict())
    assert again.layer_types == cfg.layer_types and again.sliding_window == 8
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code
    assert isinstance(loaded, SpikingBrainConfig)
    ignore = ("_name_or_path", "transformers_version")
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignore} == {
        k: v for k, v in cfg.to_dict().items() if k not in ignore
    }
    plain = SpikingBrainConfig(num_hidden_layers=6)
    assert plain.layer_types == ["gla", "swa"] * 3
    assert plain.num_key_value_heads == plain.num_attention_heads
    assert plain.head_dim == plain.hidden_size // plain.num_attention_heads


def test_invalid_layer_type_is_a_clear_error():
    with pytest.raises(SpikingBrainError, match=r"layer_types: unknown \['mamba'\]; choose from") as e:
        SpikingBrainConfig.from_preset("tiny", layer_types=["gla", "mamba", "gla", "swa"])
    for name in LAYER_TYPES:
        assert name in str(e.value)
    with pytest.raises(SpikingBrainError, match="layer_types has 3 entries but num_hidden_layers=4"):
        SpikingBrainConfig.from_preset("tiny", layer_types=["gla", "swa", "gla"])
    with pytest.raises(SpikingBrainError, match="mlp_layer_types"):
        SpikingBrainConfig.from_preset("tiny", mlp_layer_types=["dense", "sparse", "dense", "dense"])
    with pytest.raises(SpikingBrainError, match="num_experts"):
        SpikingBrainConfig.from_preset("tiny", mlp_layer_types=["moe"] * 4)
    with pytest.raises(SpikingBrainError, match="num_key_value_heads"):
        SpikingBrainConfig.from_preset("tiny", num_key_value_heads=3)
    with pytest.raises(SpikingBrainError, match="sliding_window"):
        SpikingBrainConfig.from_preset("tiny", sliding_window=0)
    with pytest.raises(SpikingBrainError, match="gla_feature_map"):
        SpikingBrainConfig.from_preset("tiny", gla_feature_map="elu")
    with pytest.raises(SpikingBrainError, match="gla_gate='key'"):
        SpikingBrainConfig.from_preset("tiny", gla_gate="key")  # relu keys are not in (0, 1)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(SpikingBrainError, match="unknown preset 'spikingbrain-13b'") as e:
        SpikingBrainConfig.from_preset("spikingbrain-13b")
    for name in PRESETS:
        assert name in str(e.value)


def test_auto_classes_without_trust_remote_code():
    cfg = AutoConfig.for_model("spikingbrain", **PRESETS["tiny"])
    assert isinstance(cfg, SpikingBrainConfig)
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, SpikingBrainForCausalLM)
    out = model(torch.randint(0, cfg.vocab_size, (1, 5)))
    assert out.logits.shape == (1, 5, cfg.vocab_size)


def test_7b_parameter_count_is_teacher_plus_gla_gate_and_norm():
    cfg = SpikingBrainConfig.from_preset("spikingbrain-7b")
    counts = count_parameters(cfg)
    n_gla = cfg.layer_types.count("gla")
    d, r, kv = cfg.hidden_size, cfg.gla_gate_low_rank_dim, cfg.num_key_value_heads * cfg.head_dim
    gk_proj = d * r + (r * kv + kv)  # W_g1 (no bias) + W_g2 with bias
    o_norm = cfg.head_dim  # one RMSNorm weight over dh, shared by all heads
    extra = n_gla * (gk_proj + o_norm)
    assert (n_gla, gk_proj, o_norm) == (14, 66048, 128)
    assert extra == 926_464  # SPEC.md: "Qwen2.5-7B's 7,615,616,512 + 926,464 gate params"
    assert counts["total"] == QWEN25_7B_PARAMS + extra == 7_616_542_976
    assert counts["active"] == counts["total"]  # dense FFNs


def test_7b_without_gla_is_exactly_the_teacher():
    counts = count_parameters(SpikingBrainConfig.from_preset("spikingbrain-7b", layer_types=["full"] * 28))
    assert counts["total"] == QWEN25_7B_PARAMS


def test_76b_parameter_count():
    counts = count_parameters("spikingbrain-76b")
    assert 74e9 <= counts["total"] <= 78e9, counts
    assert 10e9 <= counts["active"] <= 14e9, counts


def test_count_parameters_matches_a_real_model():
    for name in ("tiny", "tiny-76b"):
        cfg = SpikingBrainConfig.from_preset(name)
        model = SpikingBrainForCausalLM(cfg)
        assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())
