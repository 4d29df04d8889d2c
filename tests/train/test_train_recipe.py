"""Bad recipes fail before any work with a message naming the field; good ones parse."""
from pathlib import Path

import pytest
import yaml

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.recipe import check_world, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]


def base(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "hello"}\n')
    return {"model": {"preset": "tiny", "tokenizer": "bytes"}, "data": {"train": [str(f)], "seq_len": 32},
            "steps": 4}


@pytest.mark.parametrize("patch, field", [
    ({"optim": {"lrr": 1}}, "optim.lrr"),
    ({"bogus": 1}, "bogus"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"batch_size": 2.5}}, "optim.batch_size"),
    ({"optim": {"batch_size": 6, "grad_accum": 4}}, "optim.batch_size"),
    ({"optim": {"schedule": "linear"}}, "optim.schedule"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"data": {"train": ["/nonexistent/x.jsonl"]}}, "data.train[0]"),
    ({"data": {"seq_len": 0}}, "data.seq_len"),
    ({"data": {"stages": [{"seq_len": 32}]}}, "data.stages[0]"),
    ({"data": {"stages": [{"seq_len": "long", "steps": 2}]}}, "data.stages[0].seq_len"),
    ({"model": {"preset": "tiny", "path": "/x"}}, "model"),
    ({"model": {"convert": {"layout": "zigzag"}}}, "model.convert.layout"),
    ({"objective": {"kl_weight": 1.0}}, "objective.teacher"),
    ({"objective": {"type": "rlhf"}}, "objective.type"),
    ({"trainable": {"params": ["("]}}, "trainable.params[0]"),
    ({"trainable": {"params": "none"}}, "trainable.params"),
    ({"distributed": "deepspeed"}, "distributed"),
    ({"precision": "fp8"}, "precision"),
    ({"grad_checkpointing": "yes"}, "grad_checkpointing"),
    ({"steps": None}, "steps"),
])
def test_bad_fields_are_named(tmp_path, patch, field):
    raw = base(tmp_path)
    for k, v in patch.items():
        if isinstance(v, dict) and k in raw and k != "model":
            raw[k] = {**raw[k], **v}
        elif v is None:
            raw.pop(k)
        else:
            raw[k] = v
    with pytest.raises(SpikingBrainError) as e:
        parse_recipe(raw)
    assert f"recipe field {field}" in str(e.value)


def test_world_size_divisibility_is_checked_before_work(tmp_path):
    r = parse_recipe({**base(tmp_path), "optim": {"batch_size": 4, "grad_accum": 2}})
    check_world(r, 2)
    with pytest.raises(SpikingBrainError, match="optim.batch_size"):
        check_world(r, 3)


def test_numbers_as_strings_overrides_and_stages(tmp_path):
    raw = base(tmp_path)
    raw.pop("steps")
    raw["data"]["stages"] = [{"seq_len": 32, "steps": 3}, {"seq_len": 64, "tokens": "1e3"}]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    r = load_recipe(p, ["optim.lr=1e-4", "optim.batch_size=2", "log.tensorboard=true"], out=str(tmp_path / "o"))
    assert r.optim.lr == 1e-4 and r.optim.batch_size == 2 and r.log.tensorboard is True
    assert r.out == str(tmp_path / "o")
    assert r.stage_plan() == [(32, 3), (64, 8)]  # ceil(1000 / (2 * 64))
    assert [r.seq_len_at(s) for s in (0, 2, 3, 10)] == [32, 32, 64, 64]


def test_shipped_recipes_parse():
    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert {"tiny-cpu", "spike-aware-cpu", "spike-aware-demo", "cpt-gpu", "distill-gpu", "sft-gpu"} <= set(shipped)
    for name in shipped:
        r = load_recipe(REPO / "recipes" / f"{name}.yaml", check_files=False)
        assert r.total_steps > 0, name
    tiny = load_recipe(REPO / "recipes" / "tiny-cpu.yaml")  # its data ships with the package
    assert tiny.model.convert is not None and tiny.objective.kl_weight > 0
    spiking = load_recipe(REPO / "recipes" / "spike-aware-cpu.yaml")
    assert spiking.spiking is not None and spiking.spiking.weight_bits == 8 and spiking.spiking.exclude == []
