"""End-to-end distillation of a student's chosen parameters to a frozen teacher: the one loop
used by ``spikingbrain demo`` and the conversion recipe (``convert/recipe.py``).

Loss per step: ``KL(teacher || student)`` per token (``objective.distill_kl``) plus
``ce_weight`` times the LM cross-entropy, plus, for batches that mark answer rows (retrieval
windows), ``objective.answer_loss`` on those rows. AdamW, linear warm-up then cosine decay to 10% of
``lr``, gradients clipped at 1. Resumable: the batch of step ``s`` is ``batch_fn(s)`` (a pure
function of the step), the learning rate a function of the step, and the caller passes back
the optimizer it checkpointed with ``start_step``.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.objective import answer_loss, distill_kl


WARMUP_FRACTION = 0.1  # the warm-up never takes more than this share of a run's progress


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.1, done: float | None = None) -> float:
    """LR factor at 0-based ``step``: linear warm-up, then cosine to ``floor`` over the run's
    progress: ``step / steps``, or ``done`` (a fraction) when given. The warm-up ends after
    ``warmup`` steps or at ``WARMUP_FRACTION`` of the progress, whichever comes first: a run cut
    short by a time budget (a few dozen of its nominal steps) must not spend it warming up."""
    frac = min(1.0, step / max(1, steps) if done is None else done)
    w = min(1.0, max((step + 1) / max(1, warmup), frac / WARMUP_FRACTION))
    return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def progress_fraction(step: int, steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far a run with a step count and an optional time budget is: the larger of the two
    fractions, so that a run cut short by its budget still ends its LR schedule."""
    frac = step / max(1, steps)
    if budget_s:
        frac = max(frac, elapsed_s / budget_s)
    return min(1.0, frac)


def schedule_step(opt, lr: float, step: int, steps: int, warmup: int, elapsed_s: float,
                  budget_s: float | None) -> bool:
    """Set the LR of ``opt`` for ``step`` (``warmup_cosine`` over ``progress_fraction``); False
    when the time budget is spent (the run stops before this step)."""
    if budget_s is not None and elapsed_s > budget_s:
        return False
    for g in opt.param_groups:
        g["lr"] = lr * warmup_cosine(step, steps, warmup, done=progress_fraction(step, steps, elapsed_s, budget_s))
    return True


PRECISIONS = ("fp32", "bf16", "bf16-gla")


def autocast(precision: str, device: torch.device):
    """The forward's autocast context for ``precision`` (``PRECISIONS``). ``bf16`` roughly halves a
    CPU step on cores with AVX512-BF16/AMX (BENCHMARKS.md); the GLA's chunked form stays fp32
    (``ops.gla``). ``bf16-gla``: bf16 autocast and bf16 operands in the chunked GLA's matmuls too
    (``ops.gla.chunk_matmuls``; decays and the state scan stay fp32)."""
    if precision not in PRECISIONS:
        raise SpikingBrainError(f"precision {precision!r}: choose from {PRECISIONS}")
    return _autocast(torch.device(device).type, precision)


@contextmanager
def _autocast(device_type: str, precision: str):
    from spikingbrain.ops.gla import chunk_matmuls

    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision != "fp32"), \
            chunk_matmuls(torch.bfloat16 if precision == "bf16-gla" else None):
        yield


def make_optimizer(params, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def trainable_only(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Freeze every parameter of ``model`` except ``params``."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def distill(student, teacher, batch_fn: Callable[[int], torch.Tensor], params: list[torch.nn.Parameter],
            steps: int, lr: float = 3e-4, *, ce_weight: float = 0.1, warmup: int | None = None,
            minutes: float | None = None, elapsed_before: float = 0.0, start_step: int = 0, optimizer=None,
            on_step: Callable[[int, torch.optim.Optimizer, dict], None] | None = None,
            progress: bool = True, precision: str = "fp32") -> list[dict]:
    """Train ``params`` of ``student`` for steps ``start_step .. steps - 1`` (or until
    ``minutes`` have passed). ``batch_fn(step)``: token ids ``[B, T]``, or ``(ids, answer)``
    with per-row answer weights ``[B, T]`` (``answer_loss``; retrieval windows). ``on_step(step + 1,
    optimizer, record)`` runs after each step (checkpointing). ``minutes`` is a budget for the whole
    run, of which ``elapsed_before`` seconds were spent before a resume; the LR schedule follows
    whichever of steps and budget is further along. ``precision="bf16"``: both forwards under
    bf16 autocast (``autocast``), the loss and the optimizer in fp32. Returns the per-step log."""
    if not params:
        raise SpikingBrainError("distill: no parameter to train")
    trainable_only(student, params)
    opt = optimizer or make_optimizer(params, lr)
    warmup = max(1, steps // 10) if warmup is None else warmup
    device = next(student.parameters()).device
    student.train()
    log, start = [], time.time()
    bar = tqdm(total=steps, initial=start_step, desc="distillation", disable=not progress)
    try:
        budget = 60 * minutes if minutes else None
        for step in range(start_step, steps):
            if not schedule_step(opt, lr, step, steps, warmup, elapsed_before + time.time() - start, budget):
                break
            batch = batch_fn(step)
            ids, answer = batch if isinstance(batch, tuple) else (batch, None)
            ids = ids.to(device)
            with torch.no_grad(), autocast(precision, device):
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            with autocast(precision, device):
                s_logits = student(input_ids=ids, use_cache=False).logits
            n = ids.shape[0] * ids.shape[1]
            kl = distill_kl(s_logits, t_logits) / n
            loss = kl
            ce = torch.zeros(())
            if ce_weight:
                ce = F.cross_entropy(s_logits[:, :-1].float().reshape(-1, s_logits.shape[-1]), ids[:, 1:].reshape(-1))
                loss = kl + ce_weight * ce
            ans = torch.zeros(())
            if answer is not None and bool((answer[:, :-1] > 0).any()):
                ans = answer_loss(s_logits, t_logits, ids, answer.to(device)) / n
                loss = loss + ans
            if not torch.isfinite(loss):
                raise SpikingBrainError(f"distillation diverged at step {step + 1} (loss {float(loss)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            rec = {"step": step + 1, "kl": float(kl.detach()), "ce": float(ce.detach()), "answer": float(ans.detach()),
                   "tokens": (step + 1 - start_step) * n, "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": elapsed_before + time.time() - start}
            log.append(rec)
            bar.update(1)
            bar.set_postfix(kl=f"{rec['kl']:.3f}")
            if on_step is not None:
                on_step(step + 1, opt, rec)
    finally:
        bar.close()
        for p in student.parameters():
            p.requires_grad_(True)
        student.eval()
    return log
