"""Spike-aware fine-tuning (recipe ``spiking``): the student trains through its spiking forward
with straight-through gradients; checkpoints and exports stay plain float models."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import SpikingLinear, spikify, spiking_layers
from spikingbrain.train import distributed as D
from spikingbrain.train.loop import Trainer, train
from spikingbrain.train.metrics import read_metrics
from spikingbrain.train.recipe import parse_recipe
from train_helpers import llama_recipe

SPIKING = {"k": 2.5, "weight_bits": 6, "group_size": 16}  # coarse, so that spiking costs quality


def trainer(raw) -> Trainer:
    return Trainer(parse_recipe(raw), D.init_distributed("none"), progress=False)


def spiked_inference(model_dir, sp: dict):
    """The exported float model, spikified for inference with the recipe's settings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert not any(isinstance(m, SpikingLinear) for m in model.modules())  # a plain model
    return spikify(model, k=sp.get("k", 3.0), weight_bits=sp.get("weight_bits", 8),
                   group_size=sp.get("group_size", 128), kv_bits=sp.get("kv_bits", 8),
                   exclude=sp.get("exclude", ()))


def ids(n=2, t=40):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(3))


def test_training_forward_is_the_spiking_forward_and_gradients_reach_float_weights(tiny_llama, text_files, tmp_path):
    tr = trainer(llama_recipe(tiny_llama, text_files, tmp_path, steps=2, spiking=SPIKING))
    tr.setup(resume=False)
    model = tr.module
    layers = spiking_layers(model)
    assert len(layers) == 2 * 7 and all(m.ste for m in layers.values())  # q k v o gate up down, 2 blocks
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert tr.counts["spiking_layers"] == 14
    x = ids()
    model.train()
    out = model(input_ids=x, labels=x)  # the training forward, straight-through graph recorded
    ref = spiked_inference(tiny_llama, SPIKING)
    with torch.no_grad():
        want = ref(input_ids=x).logits
        float_logits = type(ref).from_pretrained(tiny_llama).eval()(input_ids=x).logits
    assert torch.equal(out.logits.detach(), want)  # value for value the integer inference form
    assert not torch.allclose(want, float_logits, atol=1e-3)  # and spiking does change the output
    out.loss.backward()
    for name, m in layers.items():  # every projection's float master weight gets a gradient
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # through every spiking layer


def test_spike_aware_run_lowers_the_spiked_loss_and_exports_a_plain_model(tiny_llama, text_files, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = llama_recipe(tiny_llama, text_files, tmp_path, steps=6, spiking=SPIKING,
                       checkpoint={"every": 3, "keep_last": 2}, optim={"lr": 1e-2})
    tr = trainer(raw)
    tr.setup(resume=False)
    before = tr.evaluate(64)["loss"]  # held-out loss of the spiking forward before training
    res = tr.run()
    assert res.skipped == 0 and res.step == 6
    assert res.eval_loss < before - 0.3, (before, res.eval_loss)
    start = read_metrics(tmp_path / "metrics.jsonl", "start")[0]
    assert start["spiking_layers"] == 14
    # checkpoints hold the plain model's float weights, under the plain model's names
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ck = load_file(str(res.checkpoint / "model.safetensors"))
    assert ck.keys() == plain.state_dict().keys() and all(v.dtype == torch.float32 for v in ck.values())
    plain.load_state_dict(ck, strict=True)
    moved = [k for k, v in AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict().items()
             if "layers" in k and not torch.equal(v, ck[k])]
    assert any("down_proj" in k for k in moved) and any("q_proj" in k for k in moved)
    # the export is a plain model; spikified, it is the model that was trained (and evaluated)
    exported = AutoModelForCausalLM.from_pretrained(res.final).eval()
    assert type(exported.model.layers[0].mlp.down_proj) is nn.Linear
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ck[k]), k
    again = trainer(raw)  # resuming from the checkpoint rebuilds the training form around it
    again.setup(resume=res.checkpoint)
    again.module.eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(again.module(input_ids=x).logits,
                                   spiked_inference(res.final, SPIKING)(input_ids=x).logits, rtol=0, atol=0)


def test_spikingbrain_student(text_files, tmp_path):
    """A hybrid GLA + SWA student: the GLA gate pair and FFN spike, SWA keys/values go INT8."""
    from spikingbrain.spiking import Int8KVQuantizer

    raw = llama_recipe(None, text_files, tmp_path, model={"preset": "tiny", "tokenizer": "bytes"}, steps=3,
                       spiking=SPIKING)
    res = train(parse_recipe(raw), progress=False)
    assert res.skipped == 0 and res.history[-1]["ce"] < res.history[0]["ce"]
    again = trainer(raw)
    again.setup(resume=res.checkpoint)
    m = again.module.eval()
    names = list(spiking_layers(m))
    assert any(n.endswith("self_attn.gk_proj.0") for n in names) and any(n.endswith("mlp.down_proj") for n in names)
    assert any(isinstance(getattr(x, "kv_quantizer", None), Int8KVQuantizer) for x in m.modules())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, spiked_inference(res.final, SPIKING)(input_ids=x).logits,
                                   rtol=0, atol=0)


def test_resume_equals_uninterrupted(tiny_llama, text_files, tmp_path):
    def recipe(out):
        return llama_recipe(tiny_llama, text_files, out, steps=4, export=False, spiking=SPIKING,
                            checkpoint={"every": 2, "keep_last": 2})

    whole = train(parse_recipe(recipe(tmp_path / "a")), progress=False)
    train(parse_recipe(recipe(tmp_path / "b")), max_steps=2, progress=False)
    resumed = train(parse_recipe(recipe(tmp_path / "b")), resume=True, progress=False)
    assert resumed.step == 4
    wa, wb = (load_file(str(r.checkpoint / "model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_and_trainable_selection_compose_with_spiking(tiny_llama, text_files, tmp_path):
    from transformers import AutoModelForCausalLM

    sp = {**SPIKING, "exclude": ["down_proj"]}
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "up_proj"]}
    raw = llama_recipe(tiny_llama, text_files, tmp_path, steps=3, spiking=sp, optim={"lr": 1e-2},
                       trainable={"params": ["self_attn\\.o_proj"], "lora": lora})
    res = train(parse_recipe(raw), progress=False)
    assert res.history[-1]["ce"] < res.history[0]["ce"]
    again = trainer(raw)
    again.setup(resume=res.checkpoint)
    m = again.module
    assert isinstance(m.model.layers[0].self_attn.q_proj.base, SpikingLinear)  # the adapter wraps the spiking layer
    assert type(m.model.layers[0].mlp.down_proj) is nn.Linear  # excluded: float
    before = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(res.final)
    after = exported.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.{p}.weight" for i in range(2)
                       for p in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")}
    # merged and spikified, the export computes what the adapter-wrapped spiking model computed
    m.eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, spiked_inference(res.final, sp)(input_ids=x).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("spiking, field", [
    ({"k": 0}, "spiking.k"),
    ({"k": "sharp"}, "spiking.k"),
    ({"weight_bits": 9}, "spiking.weight_bits"),
    ({"weight_bits": 7.5}, "spiking.weight_bits"),
    ({"kv_bits": 1}, "spiking.kv_bits"),
    ({"group_size": 0}, "spiking.group_size"),
    ({"clip": 0}, "spiking.clip"),
    ({"exclude": "down_proj"}, "spiking.exclude"),
    ({"exclude": [""]}, "spiking.exclude[0]"),
    ({"quantize": True}, "spiking.quantize"),
    ("yes", "spiking"),
])
def test_bad_spiking_sections_are_named(tiny_llama, text_files, tmp_path, spiking, field):
    with pytest.raises(SpikingBrainError) as e:
        parse_recipe(llama_recipe(tiny_llama, text_files, tmp_path, spiking=spiking))
    assert f"recipe field {field}" in str(e.value)


def test_incompatible_settings_fail_before_training(tiny_llama, text_files, tmp_path):
    with pytest.raises(SpikingBrainError, match="recipe field spiking: .*fsdp"):
        parse_recipe(llama_recipe(tiny_llama, text_files, tmp_path, spiking={}, distributed="fsdp"))
    with pytest.raises(SpikingBrainError, match="recipe field trainable.lora.dropout"):
        parse_recipe(llama_recipe(tiny_llama, text_files, tmp_path, spiking={},
                                  trainable={"lora": {"dropout": 0.1}}))
    raw = llama_recipe(tiny_llama, text_files, tmp_path / "run", spiking={"exclude": ["down_prj"]})
    with pytest.raises(SpikingBrainError, match=r"recipe field spiking.exclude\[0\].*down_proj"):
        train(parse_recipe(raw), progress=False)  # checked on the model, before the first step
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_ddp_matches_one_process(tiny_llama, text_files, tmp_path):
    import os
    import shutil
    import socket
    import subprocess
    from pathlib import Path

    from train_helpers import SRC, write_recipe

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")

    def recipe(name, mode):
        return llama_recipe(tiny_llama, text_files, tmp_path / name, steps=2, distributed=mode, export=False,
                            spiking=SPIKING, optim={"batch_size": 4, "grad_accum": 1})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("dist_worker.py")
    ddp = write_recipe(tmp_path / "ddp.yaml", recipe("ddp", "ddp"))
    env = dict(os.environ, PYTHONPATH=f"{SRC}:{worker.parent}", OMP_NUM_THREADS="1")
    out = subprocess.run(["torchrun", "--nproc_per_node=2", f"--master_port={port}", str(worker), str(ddp)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    ref = train(parse_recipe(recipe("ref", "none")), progress=False)
    wa = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000002" / "model.safetensors"))
    wb = load_file(str(ref.checkpoint / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # 2 processes x 2 rows == 1 process x 4 rows (spiking is per token)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5, msg=k)
