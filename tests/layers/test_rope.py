"""RoPE: every rope_type transformers defines, against transformers' own rotary classes and
through the identity conversion (layout="full") of Llama / Qwen2 / Mistral teachers, at
positions beyond the original and the maximum length, where "dynamic" and "longrope" change
their frequencies; unsupported parameters are refused at conversion time."""
import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from spikingbrain.convert import config_from_teacher, convert_from_transformer
from spikingbrain.errors import SpikingBrainError
from spikingbrain.hf_compat import CACHE_KWARG
from spikingbrain.layers.rope import ROPE_TYPES, RotaryEmbedding
from testutils import assert_close_rel

HEAD_DIM, MAX_POS, ORIG_POS = 16, 64, 16
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=MAX_POS, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaRotaryEmbedding),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2RotaryEmbedding),
    "mistral": (MistralConfig, MistralForCausalLM, MistralRotaryEmbedding),
}
_ramp = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIG_POS},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * (HEAD_DIM // 2),
                 "long_factor": _ramp, "original_max_position_embeddings": ORIG_POS},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG_POS},
    "proportional": {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0},
}


def teacher_config(family, rope_type):
    cfg_cls = FAMILIES[family][0]
    return cfg_cls(**SHAPE, rope_parameters=dict(ROPE[rope_type]))


def positions(*spans):
    return torch.cat([torch.arange(a, b) for a, b in spans])[None]


def test_every_transformers_rope_type_is_handled_explicitly():
    """A rope_type added to transformers fails here until it is implemented or refused."""
    assert set(ROPE_TYPES) == set(ROPE_INIT_FUNCTIONS) | {"default"} == set(ROPE)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rope_type", sorted(ROPE))
@pytest.mark.parametrize("length", [12, 40, 200], ids=["below-original", "below-max", "beyond-max"])
def test_cos_sin_equal_transformers(family, rope_type, length):
    """One call with positions 0..length-1 (a fresh transformers module per call, as a fresh model
    would be): the same cos/sin, including length-dependent frequencies and yarn's scale."""
    tc = teacher_config(family, rope_type)
    ours = RotaryEmbedding(config_from_teacher(tc, layout="full"))
    theirs = FAMILIES[family][2](tc)
    pos = positions((0, length))
    x = torch.zeros(1, dtype=torch.float32)
    for a, b, name in zip(ours(x, pos), theirs(x, pos), ("cos", "sin")):
        assert_close_rel(a, b, 1e-6, f"{name} at length {length}")


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_types_follow_a_growing_decode(rope_type):
    """A prefill of 60 positions, then one position per call up to 70 (crossing max_position_embeddings
    for dynamic): each call's cos/sin equal transformers' module driven the same way; and they
    differ from the static frequencies once past the threshold (the drift the issue found)."""
    tc = teacher_config("llama", rope_type)
    ours = RotaryEmbedding(config_from_teacher(tc, layout="full"))
    theirs = LlamaRotaryEmbedding(tc)
    x = torch.zeros(1)
    calls = [positions((0, 60))] + [positions((t, t + 1)) for t in range(60, 70)]
    for pos in calls:
        a, b = ours(x, pos), theirs(x, pos)
        assert_close_rel(a[0], b[0], 1e-6, f"cos at {pos.max().item()}")
        assert_close_rel(a[1], b[1], 1e-6, f"sin at {pos.max().item()}")
    static = torch.outer(torch.tensor([69.0]), ours.inv_freq)  # the init frequencies at position 69
    assert (a[0][0, -1, : HEAD_DIM // 2] - static.cos()[0] * ours.attention_scaling).abs().max() > 1e-3


def test_sequence_length_override_is_used_inside_the_block_only():
    """Context parallelism: a shard with positions 40..59 of a 100-token sequence gets the
    frequencies of length 100, i.e. the same values as the unsharded call at those positions."""
    tc = teacher_config("llama", "dynamic")
    rope = RotaryEmbedding(config_from_teacher(tc, layout="full"))
    x = torch.zeros(1)
    whole = rope(x, positions((0, 100)))
    shard = positions((40, 60))
    with rope.sequence_length(100):
        inside = rope(x, shard)
    alone = rope(x, shard)
    assert torch.equal(inside[0], whole[0][:, 40:60]) and torch.equal(inside[1], whole[1][:, 40:60])
    assert not torch.allclose(alone[0], inside[0])  # length 60 < max: the original frequencies


def make_teacher(family, rope_type, seed=0):
    cfg_cls, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(teacher_config(family, rope_type)).eval()


@pytest.mark.parametrize("family,rope_type", [("llama", t) for t in sorted(ROPE)]
                         + [("qwen2", "dynamic"), ("mistral", "longrope"), ("qwen2", "yarn")])
def test_identity_conversion_matches_the_teacher_at_long_context(family, rope_type):
    """layout="full" reproduces the teacher: one forward of 100 tokens (beyond max_position_embeddings
    = 64), and a cached decode of 6 more tokens, step by step, against the teacher's own cache."""
    teacher = make_teacher(family, rope_type)
    student = convert_from_transformer(teacher, layout="full")
    ids = torch.randint(3, 256, (2, 106), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = teacher(ids[:, :100]).logits
        out = student(ids[:, :100]).logits
        assert_close_rel(out, ref, 1e-5, "prefill of 100 tokens")
        t_cache, s_cache = DynamicCache(config=teacher.config), student.new_cache()
        teacher(ids[:, :100], use_cache=True, **{CACHE_KWARG: t_cache})
        student(ids[:, :100], past_key_values=s_cache)
        for t in range(100, 106):
            a = student(ids[:, t:t + 1], past_key_values=s_cache).logits
            b = teacher(ids[:, t:t + 1], use_cache=True, **{CACHE_KWARG: t_cache}).logits
            assert_close_rel(a, b, 1e-5, f"decode step at position {t}")


def test_unknown_rope_type_is_refused_at_conversion():
    tc = teacher_config("llama", "default")
    tc.rope_parameters = {"rope_type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}
    with pytest.raises(SpikingBrainError, match=r"cannot convert this teacher's RoPE: rope_type 'mrope' is not supported"):
        config_from_teacher(tc, layout="7b")


def test_partial_rotary_dimension_is_refused_at_conversion():
    tc = teacher_config("llama", "linear")
    tc.rope_parameters = dict(ROPE["linear"], partial_rotary_factor=0.5)
    with pytest.raises(SpikingBrainError, match="rotates 8 of the head's 16 dimensions"):
        config_from_teacher(tc, layout="7b")


def test_per_layer_type_rope_is_refused_at_conversion():
    tc = teacher_config("llama", "default")
    tc.rope_parameters = {"full_attention": dict(ROPE["default"]), "sliding_attention": dict(ROPE["linear"])}
    with pytest.raises(SpikingBrainError, match="per-layer-type RoPE"):
        config_from_teacher(tc, layout="7b")
