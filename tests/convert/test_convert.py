"""Weight mapping (convert/mapping.py) on tiny randomly initialised Llama / Qwen2 / Mistral teachers.

Measured on these teachers (fp32, 2 CPU threads), for the record:
- layout="full" logits vs the teacher: max |diff| 0 without padding, <= 4e-6 with left/right
  padding (the mask path uses a different attention kernel); we assert < 1e-4.
- layout="7b" with sliding_window >= prompt length: every SWA layer's output is bit-for-bit
  the teacher layer's given the same input hidden states (torch.equal).
- calibrate_output_norms: GLA output RMS goes from ~1.0 (unit RMSNorm) to within ~20% of the
  teacher's attention output RMS (0.26-0.58) on held-out text; the loss on text sampled from the
  teacher drops by 0.07-0.15 nats (seeds 0-2).
"""
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from spikingbrain.convert import calibrate_output_norms, config_from_teacher, convert_from_transformer
from spikingbrain.convert.mapping import teacher_attention_io, teacher_sliding_layers
from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.attention import SoftmaxAttention
from spikingbrain.layers.context import MixerContext
from spikingbrain.layers.gla import GatedLinearAttention
from spikingbrain.layers.hybrid import ParallelHybrid
from spikingbrain.modeling import SpikingBrainForCausalLM

V = 256
SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             initializer_range=0.1, bos_token_id=251, eos_token_id=252)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_teacher(family="llama", tie=False, kv_heads=2, seed=0, **kw):
    """A tiny random teacher; biases (Qwen2's q/k/v, Llama's with attention_bias) are made
    non-zero, since transformers initialises them to zero and a zero bias proves nothing."""
    cfg_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**SHAPE, num_key_value_heads=kv_heads, tie_word_embeddings=tie, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def prompts(B=3, T=40, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def padded_mask(B, T, side):
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in enumerate([0, 7, 13][:B]):
        if n:
            if side == "left":
                mask[row, :n] = 0
            else:
                mask[row, T - n:] = 0
    return mask


def layer_io(model, ids, replace_inputs=None):
    """Run ``model`` on ``ids`` and capture each decoder layer's input and output hidden states.
    ``replace_inputs {i: tensor}`` feeds layer ``i`` that tensor instead of its own input."""
    inputs, outputs, hooks = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if replace_inputs is not None and i in replace_inputs:
                inputs[i] = replace_inputs[i]
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": replace_inputs[i]}
                return (replace_inputs[i],) + tuple(args[1:]), kwargs

        def post(mod, args, kwargs, out, i=i):
            outputs[i] = out[0] if isinstance(out, tuple) else out

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


TEACHERS = [
    pytest.param(dict(family="llama", tie=True, kv_heads=2), id="llama-gqa-tied"),
    pytest.param(dict(family="llama", tie=False, kv_heads=4), id="llama-mha-untied"),
    pytest.param(dict(family="llama", tie=False, kv_heads=2, attention_bias=True), id="llama-bias"),
    pytest.param(dict(family="qwen2", tie=False, kv_heads=2), id="qwen2-gqa-untied"),
    pytest.param(dict(family="qwen2", tie=True, kv_heads=1), id="qwen2-mqa-tied"),
]


# ---------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("spec", TEACHERS)
def test_full_layout_reproduces_teacher_logits(spec):
    teacher = make_teacher(**spec)
    student = convert_from_transformer(teacher, layout="full")
    assert isinstance(student, SpikingBrainForCausalLM) and not student.training
    assert student.config.layer_types == ["full"] * 4
    ids = prompts()
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("spec", [TEACHERS[0], TEACHERS[3]])
def test_full_layout_reproduces_teacher_logits_with_padding(spec, side):
    teacher = make_teacher(**spec)
    student = convert_from_transformer(teacher, layout="full")
    ids = prompts()
    mask = padded_mask(*ids.shape, side)
    # the position ids generate() gives a padded teacher: count real tokens only
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = student(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.isfinite(out).all()
    diff = (out - ref)[valid].abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("family,kw,expected", [
    ("mistral", dict(sliding_window=8), ["swa"] * 4),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), ["full", "full", "swa", "swa"]),
])
def test_full_layout_keeps_the_teachers_own_sliding_window(family, kw, expected):
    """Mistral / Qwen2 teachers that slide: the identity conversion slides the same way
    (a prompt 5x the window length would expose a missing window)."""
    teacher = make_teacher(family, **kw)
    assert teacher_sliding_layers(teacher.config) == ([t == "swa" for t in expected], 8)
    student = convert_from_transformer(teacher, layout="full")
    assert student.config.layer_types == expected and student.config.sliding_window == 8
    ids = prompts(2, 40)
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    with pytest.raises(SpikingBrainError, match="slide over 8 tokens"):
        convert_from_transformer(teacher, layout="full", sliding_window=16)


# ------------------------------------------------------------------------------------- 7B layout
@pytest.mark.parametrize("spec", [TEACHERS[0], TEACHERS[3]])
def test_7b_layout_swa_layers_are_bit_exact_teacher_layers(spec):
    teacher = make_teacher(**spec)
    ids = prompts(2, 40)
    student = convert_from_transformer(teacher, layout="7b", sliding_window=ids.shape[1])
    assert student.config.layer_types == ["gla", "swa", "gla", "swa"]
    layers = student.model.layers
    assert isinstance(layers[0].self_attn, GatedLinearAttention)
    assert isinstance(layers[1].self_attn, SoftmaxAttention) and layers[1].self_attn.window == ids.shape[1]
    t_in, t_out = layer_io(teacher, ids)
    s_in, s_out = layer_io(student, ids, replace_inputs=t_in)
    for i in (1, 3):
        assert torch.equal(s_in[i], t_in[i])
        assert torch.equal(s_out[i], t_out[i]), f"SWA layer {i} differs from its teacher layer"
    for i in (0, 2):  # GLA layers are new computations: close in shape, not in value
        assert s_out[i].shape == t_out[i].shape and torch.isfinite(s_out[i]).all()
        assert not torch.allclose(s_out[i], t_out[i])


def test_7b_layout_copies_projections_and_new_params_are_small():
    teacher = make_teacher("qwen2", tie=False, kv_heads=2)
    student = convert_from_transformer(teacher, layout="7b")
    assert student.config.attention_bias and not student.config.attention_out_bias
    for s, t in zip(student.model.layers, teacher.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sp, tp = getattr(s.self_attn, name), getattr(t.self_attn, name)
            assert torch.equal(sp.weight, tp.weight)
            assert (sp.bias is None) == (tp.bias is None)
            if tp.bias is not None:
                assert torch.equal(sp.bias, tp.bias)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(s.mlp, name).weight, getattr(t.mlp, name).weight)
        assert torch.equal(s.input_layernorm.weight, t.input_layernorm.weight)
        assert torch.equal(s.post_attention_layernorm.weight, t.post_attention_layernorm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    # per GLA layer: W_g1 (64*16) + W_g2 (16*32 + 32) + o_norm (16)
    assert n_s - n_t == 2 * (64 * 16 + 16 * 32 + 32 + 16)


def test_gla_gate_init_is_input_independent_and_multiscale():
    """mapping.py's documented init: W_g1 ~ N(0, 0.02), W_g2 = 0, bias spreading the per-token
    decay sigmoid(b)^(1/16) over [0.90, 0.999]; o_norm starts at 1."""
    teacher = make_teacher()
    student = convert_from_transformer(teacher, layout="7b")
    for i in (0, 2):
        gla = student.model.layers[i].self_attn
        w1, w2 = gla.gk_proj[0], gla.gk_proj[1]
        assert w1.bias is None and 0.01 < w1.weight.std().item() < 0.03
        assert torch.count_nonzero(w2.weight) == 0
        decay = torch.sigmoid(w2.bias) ** (1 / student.config.gla_gate_logit_normalizer)
        assert decay.min().item() == pytest.approx(0.90, abs=1e-4)
        assert decay.max().item() == pytest.approx(0.999, abs=1e-4)
        assert torch.all(decay[1:] >= decay[:-1])
        x = torch.randn(2, 5, 64)
        g = torch.nn.functional.logsigmoid(gla.gk_proj(x))
        assert torch.allclose(g, g[:1, :1].expand_as(g))  # the same decay for every token
        assert torch.equal(gla.o_norm.weight, torch.ones_like(gla.o_norm.weight))
    again = convert_from_transformer(teacher, layout="7b")
    other = convert_from_transformer(teacher, layout="7b", seed=1)
    w = lambda m: m.model.layers[2].self_attn.gk_proj[0].weight  # noqa: E731
    assert torch.equal(w(student), w(again)) and not torch.equal(w(student), w(other))
    assert not torch.equal(w(student), student.model.layers[0].self_attn.gk_proj[0].weight)


def test_explicit_layer_types_list():
    teacher = make_teacher("qwen2")
    types = ["gla", "full", "swa", "gla+swa"]
    ids = prompts(2, 24)
    student = convert_from_transformer(teacher, layout=types, sliding_window=32)
    assert student.config.layer_types == types
    assert student.config.conversion_layout == "custom"
    kinds = [type(layer.self_attn) for layer in student.model.layers]
    assert kinds == [GatedLinearAttention, SoftmaxAttention, SoftmaxAttention, ParallelHybrid]
    assert student.model.layers[1].self_attn.window is None
    t_in, t_out = layer_io(teacher, ids)
    _, s_out = layer_io(student, ids, replace_inputs=t_in)
    for i in (1, 2):  # the softmax layers are still their teacher layers
        assert torch.equal(s_out[i], t_out[i])
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()
    # a tuple works too, and config_from_teacher agrees with the converted model
    assert config_from_teacher(teacher.config, tuple(types)).layer_types == types


# ------------------------------------------------------------------------------------------ errors
def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("make,kwargs,match", [
    pytest.param(make_teacher, dict(layout=["gla", "swa", "gla"]), r"3 layer types but the teacher has 4 layers",
                 id="list-too-short"),
    pytest.param(make_teacher, dict(layout=["gla"] * 5), r"5 layer types but the teacher has 4 layers", id="list-too-long"),
    pytest.param(make_teacher, dict(layout=["gla", "swa", "mamba", "full"]), r"unknown \['mamba'\]", id="bad-type"),
    pytest.param(make_teacher, dict(layout="8b"), r"unknown layout '8b'.*'7b'.*'76b'", id="unknown-layout"),
    pytest.param(_gpt2, dict(layout="full"), r"cannot convert a 'gpt2' model: supported teacher families are llama, qwen2",
                 id="gpt2"),
    pytest.param(lambda: make_teacher(hidden_act="gelu"), dict(layout="full"), r"activation 'gelu' is not SwiGLU",
                 id="gelu-llama"),
    pytest.param(lambda: make_teacher(mlp_bias=True), dict(layout="full"), r"FFN has biases \(mlp_bias=True\)",
                 id="mlp-bias-llama"),
    pytest.param(lambda: LlamaModel(LlamaConfig(**SHAPE)), dict(layout="full"), r"bare LlamaModel.*LlamaForCausalLM",
                 id="headless-llama"),
    pytest.param(lambda: torch.nn.Linear(2, 2), dict(layout="full"), r"cannot convert a Linear: pass a Hugging Face",
                 id="not-a-model"),
])
def test_conversion_errors_are_clear(make, kwargs, match):
    with pytest.raises(SpikingBrainError, match=match):
        convert_from_transformer(make(), **kwargs)


# ---------------------------------------------------------------------------- what is carried over
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(250)}
    vocab.update({"<unk>": 250, "<s>": 251, "</s>": 252})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    return tok


@pytest.mark.parametrize("family,tie,theta,eps", [("llama", True, 5000.0, 1e-5), ("qwen2", False, 1e6, 1e-6)])
def test_config_fields_are_carried_over(family, tie, theta, eps):
    teacher = make_teacher(family, tie=tie, rope_parameters={"rope_type": "default", "rope_theta": theta},
                           rms_norm_eps=eps, max_position_embeddings=512)
    student = convert_from_transformer(teacher, layout="7b")
    c = student.config
    assert c.rope_parameters["rope_theta"] == theta
    assert torch.equal(student.model.rotary_emb.inv_freq, teacher.model.rotary_emb.inv_freq)
    assert c.rms_norm_eps == eps and student.model.norm.variance_epsilon == eps
    assert all(layer.input_layernorm.variance_epsilon == eps for layer in student.model.layers)
    assert c.tie_word_embeddings is tie
    assert (student.lm_head.weight is student.model.embed_tokens.weight) is tie
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (V, 64, 128, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert c.max_position_embeddings == 512
    assert (c.bos_token_id, c.eos_token_id) == (251, 252)


def test_tokenizer_and_chat_template_survive_save_and_load(tmp_path):
    teacher = make_teacher(tie=True)
    tok = tiny_tokenizer()
    student = convert_from_transformer(teacher, layout="7b", tokenizer=tok)
    assert student.tokenizer is tok and student.config.chat_template_source == "teacher"
    student.save_pretrained(tmp_path)
    student.tokenizer.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SpikingBrainForCausalLM)
    assert loaded.config.layer_types == student.config.layer_types
    assert loaded.config.conversion_layout == "7b" and loaded.config.tie_word_embeddings
    msgs = [{"role": "user", "content": "w5 w6"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok2.chat_template == tok.chat_template
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    ids = torch.tensor([tok2(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


# ----------------------------------------------------------------------------------- calibration
def sampled_text(teacher, n, T, seed):
    """Token sequences sampled from the teacher: text on which the teacher is the reference."""
    start = torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        return teacher.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=T - 1,
                                do_sample=True, pad_token_id=0)


def gla_output_on_teacher_inputs(student, i, x):
    """Layer ``i``'s GLA output before ``o_proj`` (``[B, T, H, D]``), given the teacher's normed input."""
    mixer = student.model.layers[i].self_attn
    B, T, _ = x.shape
    pos = torch.arange(T)[None].expand(B, T)
    cos, sin = student.model.rotary_emb(x, pos)
    ctx = MixerContext(positions=pos, cos=cos, sin=sin)
    H, D = mixer.num_heads, mixer.head_dim
    with torch.no_grad():
        zq = mixer.q_proj(x).view(B, T, H, D)
        zk = mixer.k_proj(x).view(B, T, -1, D)
        v = mixer.v_proj(x).view(B, T, -1, D)
        return mixer.linear_attention(x, zq, zk, v, ctx)


def pre_o_proj_rms(model, ids, layers):
    out, hooks = {}, []
    for i in layers:
        def grab(mod, args, i=i):
            out[i] = args[0].pow(2).mean().sqrt().item()
        hooks.append(model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(grab))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_matches_teacher_output_power_and_lowers_loss(seed):
    teacher = make_teacher(seed=seed)
    text = sampled_text(teacher, 6, 64, seed)
    calib, held_out = text[:3], text[3:]
    raw = convert_from_transformer(teacher, layout="7b", sliding_window=64)
    cal = convert_from_transformer(teacher, layout="7b", sliding_window=64)
    scales = calibrate_output_norms(cal, teacher, calib)
    assert sorted(scales) == [0, 2] and all(0 < s < 1 for s in scales.values())
    # the calibration_ids argument does the same thing
    via_arg = convert_from_transformer(teacher, layout="7b", sliding_window=64, calibration_ids=calib)
    for (name, a), b in zip(cal.state_dict().items(), via_arg.state_dict().values()):
        assert torch.equal(a, b), name

    # 1. on the calibration text, given the teacher's inputs, each channel's power is the teacher's
    io = teacher_attention_io(teacher, calib, [0, 2])
    for i in (0, 2):
        x, target = io[i]
        tgt = target.view(*target.shape[:2], 4, 16).pow(2).mean(dim=(0, 1, 2)).sqrt()
        got = gla_output_on_teacher_inputs(cal, i, x).pow(2).mean(dim=(0, 1, 2)).sqrt()
        torch.testing.assert_close(got, tgt, rtol=1e-3, atol=1e-6)
        before = gla_output_on_teacher_inputs(raw, i, x).pow(2).mean(dim=(0, 1, 2)).sqrt()
        # unit RMSNorm output: overall well above the teacher's power
        assert before.pow(2).mean().sqrt() > 1.4 * tgt.pow(2).mean().sqrt()

    # 2. in the student's own forward on held-out text, within 1.5x of the teacher's power
    t_rms = pre_o_proj_rms(teacher, held_out, [0, 2])
    c_rms = pre_o_proj_rms(cal, held_out, [0, 2])
    r_rms = pre_o_proj_rms(raw, held_out, [0, 2])
    for i in (0, 2):
        assert 1 / 1.5 < c_rms[i] / t_rms[i] < 1.5, (i, c_rms[i], t_rms[i])
        assert abs(math.log(c_rms[i] / t_rms[i])) < abs(math.log(r_rms[i] / t_rms[i]))

    # 3. lower loss on held-out teacher text
    with torch.no_grad():
        loss = {name: m(held_out, labels=held_out).loss.item()
                for name, m in (("teacher", teacher), ("raw", raw), ("cal", cal))}
    assert loss["teacher"] < loss["cal"] < loss["raw"] - 0.03, loss


def test_calibration_of_hybrid_layers_sets_both_branch_norms():
    teacher = make_teacher()
    text = sampled_text(teacher, 2, 32, 0)
    student = convert_from_transformer(teacher, layout=["gla+swa", "full", "gla+full", "gla"], sliding_window=8)
    scales = calibrate_output_norms(student, teacher, text)
    assert sorted(scales) == [0, 2, 3]
    for i in (0, 2):
        mixer = student.model.layers[i].self_attn
        assert not torch.equal(mixer.gla.o_norm.weight, torch.ones(16))
        assert not torch.equal(mixer.attn_norm.weight, torch.ones(16))
        assert torch.equal(mixer.merge.data, torch.tensor([0.5, 0.5]))
    with torch.no_grad():
        assert torch.isfinite(student(text).logits).all()
    assert calibrate_output_norms(convert_from_transformer(teacher, layout="full"), teacher, text) == {}


def test_bf16_teacher_converts_and_calibrates():
    """A bf16 teacher (e.g. ``load_teacher(dtype=torch.bfloat16)``): the student is fp32 and
    calibration casts the teacher's activations (this raised a dtype error before)."""
    import copy

    teacher = make_teacher("qwen2")
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(p.bfloat16().float())  # weights exactly representable in bf16
    text = sampled_text(teacher, 2, 24, 0)
    half = copy.deepcopy(teacher).to(torch.bfloat16)
    ref = convert_from_transformer(teacher, layout="full")
    student = convert_from_transformer(half, layout="full")
    assert next(student.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(student(text).logits, ref(text).logits)
    for layout in ("7b", ["gla+swa", "swa", "gla+full", "gla"]):
        student = convert_from_transformer(half, layout=layout, calibration_ids=text)
        with torch.no_grad():
            assert torch.isfinite(student(text).logits).all()


@pytest.mark.parametrize("ids,match", [
    (torch.zeros(8, dtype=torch.long), r"integer tensor \[batch, seq_len\], got \(8,\)"),
    (torch.zeros(1, 8), r"integer tensor \[batch, seq_len\], got \(1, 8\) torch.float32"),
    ([[1, 2, 3]], r"integer tensor \[batch, seq_len\], got list"),
])
def test_calibration_rejects_bad_ids(ids, match):
    teacher = make_teacher()
    student = convert_from_transformer(teacher, layout="7b")
    with pytest.raises(SpikingBrainError, match=match):
        calibrate_output_norms(student, teacher, ids)


def test_calibration_needs_the_matching_teacher():
    teacher = make_teacher()
    student = convert_from_transformer(teacher, layout="7b")
    torch.manual_seed(0)
    shallow = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": 2})).eval()
    with pytest.raises(SpikingBrainError, match="student has 4 layers, teacher 2"):
        calibrate_output_norms(student, shallow, prompts(1, 8))
