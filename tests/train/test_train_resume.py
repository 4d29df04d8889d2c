"""Checkpoints: atomic, pruned, and a SIGKILLed run resumes to bitwise the same weights."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spikingbrain.train.checkpoint import latest_checkpoint, list_checkpoints
from spikingbrain.train.loop import train
from spikingbrain.train.recipe import parse_recipe
from train_helpers import SRC, llama_recipe, write_recipe


def _same(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    (tmp_path / "step-00000004").mkdir()  # no trainer.json: a crash mid-write
    (tmp_path / ".tmp-step-00000006").mkdir()
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / "trainer.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_llama, text_files, tmp_path):
    def recipe(out):
        return llama_recipe(tiny_llama, text_files, out, steps=40, export=False,
                            checkpoint={"every": 3, "keep_last": 2}, eval={"every": 10, "max_tokens": 128},
                            optim={"lr": 3e-3, "batch_size": 4, "grad_accum": 2, "warmup_steps": 3})

    killed = tmp_path / "killed"
    path = write_recipe(tmp_path / "killed.yaml", recipe(killed))
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "spikingbrain.cli", "train", str(path), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            ck = latest_checkpoint(killed / "checkpoints")
            if ck is not None and int(ck.name.split("-")[1]) >= 9:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        rc = proc.wait()
    assert rc == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    last = latest_checkpoint(killed / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) < 40
    # keep_last=2; pruning follows the rename, so a kill in between may leave one extra
    assert len(list_checkpoints(killed / "checkpoints")) <= 3

    resumed = train(parse_recipe(recipe(killed)), resume=True, progress=False)
    reference = train(parse_recipe(recipe(tmp_path / "ref")), progress=False)
    assert resumed.step == reference.step == 40
    assert _same(resumed.checkpoint, reference.checkpoint)
    oa = torch.load(resumed.checkpoint / "optimizer.pt", weights_only=True)
    ob = torch.load(reference.checkpoint / "optimizer.pt", weights_only=True)
    for name, st in ob["state"].items():
        assert torch.equal(st["exp_avg_sq"], oa["state"][name]["exp_avg_sq"]), name
