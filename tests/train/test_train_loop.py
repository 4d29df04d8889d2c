"""The trainer on tiny models: loss goes down, the options do what they say."""
import pytest
import torch
from safetensors.torch import load_file

from spikingbrain.train import distributed as D
from spikingbrain.train.loop import Trainer, train
from spikingbrain.train.metrics import read_metrics
from spikingbrain.train.recipe import parse_recipe
from train_helpers import llama_recipe


def run(raw, **kw):
    return train(parse_recipe(raw), progress=False, **kw)


def test_ten_steps_reduce_the_loss(tiny_llama, text_files, tmp_path):
    res = run(llama_recipe(tiny_llama, text_files, tmp_path, eval={"every": 5}, checkpoint={"every": 5}))
    ce = [h["ce"] for h in res.history]
    assert len(ce) == 10 and res.step == 10 and res.skipped == 0
    assert sum(ce[-2:]) / 2 < sum(ce[:2]) / 2 - 0.5, ce
    evals = read_metrics(tmp_path / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [5, 10] and evals[1]["loss"] < evals[0]["loss"]
    assert res.final is not None and (res.final / "tokenizer.json").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]


def test_gradient_accumulation_matches_one_big_batch(tiny_llama, text_files, tmp_path):
    a = run(llama_recipe(tiny_llama, text_files, tmp_path / "a", steps=3, export=False))
    b = run(llama_recipe(tiny_llama, text_files, tmp_path / "b", steps=3, export=False,
                         optim={"lr": 3e-3, "batch_size": 4, "grad_accum": 4, "warmup_steps": 1, "weight_decay": 0.0}))
    wa, wb = load_file(str(a.checkpoint / "model.safetensors")), load_file(str(b.checkpoint / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_spikingbrain_tiny_preset_trains_and_exports(text_files, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = llama_recipe(None, text_files, tmp_path, model={"preset": "tiny", "tokenizer": "bytes"}, steps=6)
    raw["data"]["stages"] = [{"seq_len": 32, "steps": 3}, {"seq_len": 64, "steps": 3}]
    raw.pop("steps")
    r = parse_recipe(raw)
    tr = Trainer(r, D.init_distributed("none"), progress=False)
    res = tr.run()
    assert [h["seq_len"] for h in res.history] == [32, 32, 32, 64, 64, 64]
    assert res.history[-1]["ce"] < res.history[0]["ce"]
    exported = AutoModelForCausalLM.from_pretrained(res.final).eval()
    tr.module.eval()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, tr.module(ids).logits)


def test_attention_only_and_lora(tiny_llama, text_files, tmp_path):
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    res = run(llama_recipe(tiny_llama, text_files, tmp_path / "attn", steps=2, trainable={"params": "attention"}))
    after = load_file(str(res.checkpoint / "model.safetensors"))
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])

    raw = llama_recipe(tiny_llama, text_files, tmp_path / "lora", steps=3,
                       trainable={"params": "none", "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}})
    tr = Trainer(parse_recipe(raw), D.init_distributed("none"), progress=False)
    res = tr.run()
    ck = load_file(str(res.checkpoint / "model.safetensors"))
    assert torch.equal(ck["model.layers.0.self_attn.q_proj.base.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert ck["model.layers.0.self_attn.q_proj.lora_B"].abs().sum() > 0
    merged = AutoModelForCausalLM.from_pretrained(res.final).eval()
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    ids = torch.randint(0, 256, (2, 24))
    tr.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tr.module(ids).logits, rtol=1e-4, atol=1e-5)


def test_non_finite_steps_are_skipped_and_counted(tiny_llama, text_files, tmp_path):
    tr = Trainer(parse_recipe(llama_recipe(tiny_llama, text_files, tmp_path)), D.init_distributed("none"), progress=False)
    tr.setup(resume=False)
    w0 = {k: v.clone() for k, v in tr.module.state_dict().items()}
    poison = {"on": True}

    def hook(mod, inp, out):
        return out * float("nan") if poison["on"] else out

    h = tr.module.model.layers[0].mlp.register_forward_hook(hook)
    m = tr.train_step(64, 1e-3)
    assert not m["applied"] and tr.skipped == 1
    assert all(torch.equal(v, tr.module.state_dict()[k]) for k, v in w0.items())
    poison["on"] = False
    m = tr.train_step(64, 1e-3)
    h.remove()
    assert m["applied"] and tr.skipped == 1
    assert not torch.equal(w0["model.layers.0.mlp.up_proj.weight"], tr.module.model.layers[0].mlp.up_proj.weight)


@pytest.fixture(scope="module")
def trained_llama(tiny_llama, text_files, tmp_path_factory):
    """The tiny Llama after 15 steps: a teacher whose predictions are far from uniform."""
    out = tmp_path_factory.mktemp("teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped `one_thread`
    try:
        return run(llama_recipe(tiny_llama, text_files, out, steps=15, eval={"every": 0, "max_tokens": 64})).final
    finally:
        torch.set_num_threads(threads)


def test_distillation(trained_llama, text_files, tmp_path):
    teacher = str(trained_llama)
    kd = {"ce_weight": 0.0, "kl_weight": 1.0, "kl_temperature": 2.0, "teacher": teacher}
    # a random SpikingBrain student (vocab 512) learns the teacher's (vocab 260) distribution
    raw = llama_recipe(teacher, text_files, tmp_path / "kd", steps=8, objective=kd,
                       model={"preset": "tiny", "tokenizer": "bytes"})
    res = run(raw)
    kl = [h["kl"] for h in res.history]
    assert kl[0] > 0.1 and sum(kl[-2:]) < 0.7 * sum(kl[:2]), kl
    assert all(h["loss"] == pytest.approx(h["kl"]) for h in res.history)
    # a student converted from the teacher starts close to it (the layout changes the mixers)
    raw = llama_recipe(teacher, text_files, tmp_path / "conv", steps=2, objective=kd,
                       model={"convert": {"teacher": teacher, "layout": "7b", "sliding_window": 16}})
    res2 = run(raw)
    assert res2.history[0]["kl"] < 0.1 * kl[0]


def test_sft_run_on_chats(tiny_llama, chat_file, tmp_path):
    raw = llama_recipe(tiny_llama, {"train": chat_file, "valid": chat_file}, tmp_path, steps=4,
                       objective={"type": "sft"})
    res = run(raw)
    assert res.step == 4 and res.eval_loss is not None
    assert res.history[-1]["ce"] < res.history[0]["ce"]


def test_single_process_fsdp_checkpoints_and_exports(tiny_llama, text_files, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = run(llama_recipe(tiny_llama, text_files, tmp_path / "plain", steps=3))
    sharded = run(llama_recipe(tiny_llama, text_files, tmp_path / "fsdp", steps=3, distributed="fsdp"))
    assert (sharded.checkpoint / "dcp").is_dir()
    a = AutoModelForCausalLM.from_pretrained(plain.final).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sharded.final).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_checkpointing_bf16_and_streaming_options(text_files, tmp_path):
    sb = {"preset": "tiny", "tokenizer": "bytes"}
    plain = run(llama_recipe(None, text_files, tmp_path / "a", model=sb, steps=2, export=False))
    ckpt = run(llama_recipe(None, text_files, tmp_path / "b", model=sb, steps=2, export=False, grad_checkpointing=True))
    wa, wb = (load_file(str(r.checkpoint / "model.safetensors")) for r in (plain, ckpt))
    for k in wa:  # recomputation changes nothing but memory
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    bf16 = run(llama_recipe(None, text_files, tmp_path / "c", model=sb, steps=2, export=False, precision="bf16"))
    assert bf16.skipped == 0 and abs(bf16.history[0]["ce"] - plain.history[0]["ce"]) < 0.05
    raw = llama_recipe(None, text_files, tmp_path / "d", model=sb, steps=3, export=False)
    raw["data"] = {"train": [str(text_files["train"])], "valid_fraction": 0.2, "streaming": True,
                   "shuffle_buffer": 8, "seq_len": 64}
    streamed = run(raw)
    assert streamed.step == 3 and streamed.eval_loss is not None
