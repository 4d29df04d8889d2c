"""Helpers shared by the training tests: recipes as plain dicts, written to YAML."""
from __future__ import annotations

from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[2] / "src"


def llama_recipe(tiny_llama, text_files, out, **over) -> dict:
    """A small CPU recipe (plain dict) on the tiny Llama; keyword args replace sections."""
    r = {
        "model": {"path": str(tiny_llama)},
        "data": {"train": [str(text_files["train"])], "valid": [str(text_files["valid"])], "seq_len": 64},
        "steps": 10,
        "out": str(out),
        "optim": {"lr": 3e-3, "batch_size": 4, "warmup_steps": 1, "weight_decay": 0.0},
        "eval": {"every": 0, "max_tokens": 512},
        "log": {"progress": False},
        "seed": 0,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(r.get(k), dict) and k != "model":
            r[k] = {**r[k], **v}
        else:
            r[k] = v
    return r


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path
