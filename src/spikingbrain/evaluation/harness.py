"""lm-evaluation-harness (``lm_eval``, optional dependency ``spikingbrain[eval]``) with the
package's local tasks.

``run_lm_eval`` evaluates a model directory (``--model hf``) or an already loaded model on any
lm-eval task: the standard ones (where the user has the datasets) or the tasks shipped in
``spikingbrain/evaluation/tasks`` (offline data, e.g. ``spikingbrain_cloze``). Importing
``spikingbrain`` first registers the SpikingBrain architecture with transformers' Auto classes,
so a SpikingBrain model directory loads through lm-eval's plain ``hf`` model.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from spikingbrain.errors import SpikingBrainError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def offline_env(enabled: bool = True):
    """Set ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` for the duration (previous values restored)."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    if enabled:
        os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SpikingBrainError(
            "lm-evaluation-harness is not installed: pip install 'spikingbrain[eval]' (or 'lm-eval>=0.4.5')"
        ) from e
    return lm_eval, TaskManager


def summarize(results: dict) -> dict:
    """lm-eval's ``results["results"]`` -> ``{task: {metric: value}}`` with the filter suffix
    (``",none"``) dropped, non-numeric entries (``alias``, "N/A" stderrs) removed, and ``samples``
    (items scored) added per task."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            row[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
        n = results.get("n-samples", {}).get(task, {})
        if n:
            row["samples"] = n.get("effective", n.get("original"))
        out[task] = row
    return out


def run_lm_eval(
    model,
    tasks=("spikingbrain_cloze",),
    limit: int | float | None = None,
    tokenizer=None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | list | None = None,
    model_args: dict | None = None,
    offline: bool = True,
    raw: bool = False,
) -> dict:
    """Run lm-eval ``tasks`` on ``model`` and return ``{task: {metric: value}}`` (see :func:`summarize`).

    ``model``: a local model directory (loaded by lm-eval's ``hf`` model), or a loaded
    ``PreTrainedModel`` (then pass ``tokenizer``). ``include_path``: extra task folders, searched
    together with the shipped ``tasks/``. ``limit``: items per task (an int) or a fraction.
    With ``offline=True`` the run sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``, so tasks
    whose data is not on disk fail instead of downloading. ``raw=True`` returns lm-eval's whole
    result dict instead.
    """
    import spikingbrain  # noqa: F401  (registers the architecture with the Auto classes)

    lm_eval, TaskManager = _import_lm_eval()
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    paths = [str(TASKS_DIR)]
    if include_path is not None:
        paths += [str(p) for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path])]
    with offline_env(offline):
        # Indexing lm-eval's thousands of built-in task files takes ~30 s: skip it when every
        # requested task is a local one.
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise SpikingBrainError(f"unknown lm-eval task(s): {', '.join(unknown)} (local tasks: {', '.join(local_tasks())})")
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not (path / "config.json").exists():
                raise SpikingBrainError(f"{path} is not a Hugging Face model directory (no config.json)")
            args = {"pretrained": str(path), "dtype": dtype, **(model_args or {})}
            lm, lm_args = "hf", args
        else:
            if tokenizer is None:
                raise SpikingBrainError("pass the tokenizer together with a loaded model")
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                      **(model_args or {}))
            lm_args = None
        results = lm_eval.simple_evaluate(
            model=lm, model_args=lm_args, tasks=list(tasks), limit=limit, batch_size=batch_size,
            device=device, num_fewshot=num_fewshot, task_manager=manager, log_samples=False,
            bootstrap_iters=0,
        )
    if results is None:
        raise SpikingBrainError("lm-eval returned no results")
    return results if raw else summarize(results)


def local_tasks() -> list[str]:
    """Names of the tasks shipped with the package (one folder each under ``tasks/``)."""
    return sorted(p.name for p in TASKS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
