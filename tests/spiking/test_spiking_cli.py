import json
from importlib import resources

import pytest

from conftest import make_spikingbrain
from spikingbrain.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-sb")
    make_spikingbrain().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_spikes_command_writes_report_and_plots(model_dir, tmp_path, capsys):
    valid = resources.files("spikingbrain").joinpath("data/valid.jsonl")
    out = tmp_path / "report"
    rc = main(["spikes", str(model_dir), "--text", str(valid), "--ks", "2,4", "--k", "3",
               "--max-tokens", "200", "--seq-len", "50", "--calibrate", "60", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TOTAL" in printed and "baseline ppl" in printed
    rep = json.loads((out / "report.json").read_text())
    assert [r["k"] for r in rep["sweep"]] == [2.0, 3.0, 4.0]  # --k is added to the sweep
    assert rep["calibrated"] and rep["baseline"]["tokens"] == 4 * 49
    sp = [r["sparsity"] for r in rep["sweep"]]
    assert sp[0] > sp[1] > sp[2]  # a lower threshold (larger k) means more spikes
    assert all(r["ppl"] > 1 for r in rep["sweep"])
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "histograms_k3.png").stat().st_size > 1000


def test_spikes_command_user_errors(model_dir, tmp_path, capsys):
    assert main(["spikes", str(tmp_path / "missing"), "--text", "x.jsonl"]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no_text": 1}\n')
    assert main(["spikes", str(model_dir), "--text", str(bad)]) == 2
    assert "'text' field" in capsys.readouterr().err
    assert main(["spikes", str(model_dir), "--text", str(bad), "--ks", "2,x"]) == 2
