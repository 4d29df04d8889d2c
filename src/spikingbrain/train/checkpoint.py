"""Checkpoints: written atomically, resumed exactly, never unpickled.

A checkpoint is a directory ``{root}/step-00000040/``:

- single process / DDP: ``model.safetensors`` (the training model's full state, tied weights
  stored once) and ``optimizer.pt`` (``get_optimizer_state_dict``: keyed by parameter name,
  tensors and numbers only);
- FSDP: ``dcp/``, a ``torch.distributed.checkpoint`` of ``{"model", "optim"}`` written by every
  rank in parallel; it can be loaded on any number of processes (1 included, without FSDP);
- ``rng/rank{r}.pt``: each rank's torch RNG states;
- ``trainer.json``: step, token/skip counters and the data position; written last.

Everything is written into ``.tmp-step-...`` and renamed into place (``os.replace``) once
complete, so a run killed at any moment (SIGKILL included) leaves either the whole checkpoint
or none. Loading uses ``safetensors``, ``torch.load(weights_only=True)`` and JSON only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.distributed import DistInfo, barrier, unwrap

STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "trainer.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _state_dict_api():
    from torch.distributed.checkpoint import state_dict as sdapi

    return sdapi


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer, trainer_state: dict,
                    info: DistInfo, keep_last: int) -> Path:
    """Write ``{root}/step-{step:08d}`` (all ranks call this) and prune to ``keep_last``."""
    sdapi = _state_dict_api()
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier(info)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng" / f"rank{info.rank}.pt")
    if info.mode == "fsdp":
        import torch.distributed.checkpoint as dcp

        state = {"model": sdapi.get_model_state_dict(model), "optim": sdapi.get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    else:
        optim_sd = sdapi.get_optimizer_state_dict(model, optimizer)
        if info.is_main:
            from safetensors.torch import save_model

            save_model(unwrap(model), str(tmp / "model.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
    barrier(info)
    if info.is_main:
        with open(tmp / "trainer.json", "w") as f:
            json.dump(trainer_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (a resumed run): replace it whole
            old = root / f".old-step-{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, info: DistInfo) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns ``trainer.json``.

    Works across world sizes: a DCP checkpoint reshards to the current processes (or loads
    into an unsharded model); a safetensors checkpoint loads on any world size."""
    sdapi = _state_dict_api()
    path = Path(path)
    meta = path / "trainer.json"
    if not meta.is_file():
        raise SpikingBrainError(f"{path} is not a complete checkpoint (no trainer.json)")
    state = json.loads(meta.read_text())
    full = sdapi.StateDictOptions(full_state_dict=True) if info.mode == "fsdp" else None
    try:
        if (path / "dcp").is_dir():
            import torch.distributed.checkpoint as dcp

            target = {"model": sdapi.get_model_state_dict(model),
                      "optim": sdapi.get_optimizer_state_dict(model, optimizer)}
            with warnings.catch_warnings():  # loading a sharded checkpoint into 1 process is intended
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(target, checkpoint_id=str(path / "dcp"))
            sdapi.set_model_state_dict(model, target["model"])
            sdapi.set_optimizer_state_dict(model, optimizer, target["optim"])
        else:
            from safetensors.torch import load_file, load_model

            if info.mode == "fsdp":
                msd = load_file(str(path / "model.safetensors"))
                _fill_tied(unwrap(model), msd)
                sdapi.set_model_state_dict(model, msd, options=full)
            else:
                missing, unexpected = load_model(unwrap(model), str(path / "model.safetensors"), strict=False)
                if missing or unexpected:
                    raise SpikingBrainError(
                        f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]} (same recipe? same trainable/lora settings?)"
                    )
            osd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            sdapi.set_optimizer_state_dict(model, optimizer, osd, options=full)
    except (RuntimeError, KeyError, ValueError) as e:
        if isinstance(e, SpikingBrainError):
            raise
        raise SpikingBrainError(f"could not resume from {path}: {type(e).__name__}: {e}") from None
    rng_file = path / "rng" / f"rank{info.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def _fill_tied(model: nn.Module, sd: dict) -> None:
    """safetensors stores tied tensors once; give every alias its tensor back."""
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen and name not in sd and seen[key] in sd:
            sd[name] = sd[seen[key]]
        seen.setdefault(key, name)


def export_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, info: DistInfo) -> Path | None:
    """``save_pretrained`` the trained model (LoRA merged) and its tokenizer into ``out_dir``.

    All ranks call this (FSDP gathers the full weights); rank 0 writes."""
    from spikingbrain.train.trainable import LoRALinear, merge_lora_state_dict

    sdapi = _state_dict_api()
    inner = unwrap(model)
    scalings = {n: m.scaling for n, m in inner.named_modules() if isinstance(m, LoRALinear)}
    opts = sdapi.StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = sdapi.get_model_state_dict(model, options=opts) if info.mode == "fsdp" else None
    out = Path(out_dir)
    if info.is_main:
        if sd is None:
            sd = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
        sd = merge_lora_state_dict(sd, scalings)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        inner.save_pretrained(tmp, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier(info)
    return out if info.is_main else None
