"""torchrun on 2 CPU processes (gloo): DDP and FSDP2 match 1 process with the same global
batch, and an FSDP checkpoint written by 2 processes resumes on 1."""
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spikingbrain.train.loop import train
from spikingbrain.train.recipe import parse_recipe
from train_helpers import SRC, llama_recipe, write_recipe

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5, msg=k)


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process(tiny_llama, text_files, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")

    def recipe(name, mode):
        return llama_recipe(tiny_llama, text_files, tmp_path / name, steps=6, distributed=mode, export=False,
                            checkpoint={"every": 2, "keep_last": 3}, eval={"every": 2, "max_tokens": 256},
                            optim={"lr": 3e-3, "batch_size": 8, "grad_accum": 2, "warmup_steps": 1})

    ddp = write_recipe(tmp_path / "ddp.yaml", recipe("ddp", "ddp"))
    fsdp = write_recipe(tmp_path / "fsdp.yaml", recipe("fsdp", "fsdp"))
    env = dict(os.environ, PYTHONPATH=f"{SRC}:{WORKER.parent}", OMP_NUM_THREADS="1")
    cmd = ["torchrun", "--nproc_per_node=2", f"--master_port={_free_port()}", str(WORKER), f"{ddp}:4", f"{fsdp}:4"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]

    ref = train(parse_recipe(recipe("ref", "none")), progress=False)
    ref_ck = tmp_path / "ref" / "checkpoints"
    # DDP: 2 processes x 2 rows per micro-batch == 1 process x 4 rows
    _close(tmp_path / "ddp" / "checkpoints" / "step-00000004", ref_ck / "step-00000004")
    fsdp_ck = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    assert (fsdp_ck / "dcp").is_dir() and not (fsdp_ck / "model.safetensors").exists()
    # FSDP checkpoint of world size 2 -> one process without FSDP, continued to the end
    one = parse_recipe(recipe("fsdp_to_1", "none"))
    res = train(one, resume=str(fsdp_ck), progress=False)
    assert res.step == 6
    _close(res.checkpoint, ref_ck / "step-00000006")
    ev = [e for e in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"eval"' in e]
    assert len(ev) == 2  # evaluated at steps 2 and 4 on 2 processes, logged once
