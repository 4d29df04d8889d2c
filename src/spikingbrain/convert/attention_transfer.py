"""Attention transfer: train each converted GLA layer to reproduce its teacher layer's output.

The teacher runs once over the training text; for every GLA layer we keep the normed input of
its attention block ``x`` and the teacher's attention output ``y = o_proj(attn(x))``. Each GLA
mixer is then trained on ``(x, y)`` alone with ``loss = mean((mixer(x) - y)^2) / mean(y^2)``
(scale-free, so every layer counts the same). Layers are independent, so this costs a few
projections per token instead of a whole model's forward and backward: it is what makes
conversion affordable on a CPU. Published linearisation work (LoLCATs, the SpikingBrain
prototype notes in issue 3) found it the step that recovers most of the teacher's quality.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from spikingbrain.layers.context import MixerContext


@torch.no_grad()
def collect_teacher_io(teacher, batches, layers: list[int], dtype=torch.bfloat16, progress=True):
    """Teacher inputs/outputs of the attention blocks of ``layers`` over ``batches`` (each
    ``[B, T]`` ids). Returns ``{i: (X [N, T, d], Y [N, T, d])}`` stored in ``dtype``."""
    store = {i: ([], []) for i in layers}
    hooks = []
    for i in layers:
        attn = teacher.model.layers[i].self_attn

        def hook(mod, args, kwargs, output, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = output[0] if isinstance(output, tuple) else output
            store[i][0].append(x.to(dtype))
            store[i][1].append(y.to(dtype))

        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        for ids in tqdm(batches, desc="teacher pass", disable=not progress, leave=False):
            teacher.model(input_ids=ids)  # the decoder stack only: the LM head (a fifth of the work) is not needed
    finally:
        for h in hooks:
            h.remove()
    return {i: (torch.cat(xs), torch.cat(ys)) for i, (xs, ys) in store.items()}


def attention_transfer(
    student,
    io: dict,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup: int = 10,
    seed: int = 0,
    time_budget_s: float | None = None,
    progress: bool = True,
    train: str = "all",
    params: list | None = None,
    elapsed_before: float = 0.0,
    start_step: int = 0,
    optimizer=None,
    on_step=None,
    precision: str = "fp32",
) -> list[dict]:
    """Train the GLA mixers of ``student`` on the teacher's ``io`` (see ``collect_teacher_io``;
    the tensors may be memory-mapped from the activation cache on disk).

    ``train``: ``"all"`` (q/k/v/o, gate, output norm) or ``"new"`` (only gate and output norm);
    ``params``: an explicit list instead (e.g. LoRA factors + gates + norms). Steps
    ``start_step .. steps - 1`` run, or until ``time_budget_s`` (for the whole run, of which
    ``elapsed_before`` was spent before a resume; the LR schedule follows whichever of steps and
    budget is further along). Step ``s`` draws its batch from
    a generator seeded by ``(seed, s)`` and its learning rate from ``s`` alone, so a run resumed
    with the checkpointed ``optimizer`` continues exactly. ``on_step(step + 1, optimizer, rec)``
    runs after each step. ``precision="bf16"``: the mixers' forwards under bf16 autocast, the
    loss in fp32. Returns the log: one dict per step with the mean normalised MSE over
    layers.
    """
    from spikingbrain.train.distill import autocast, make_optimizer, schedule_step, trainable_only

    layers = sorted(io)
    mixers = {i: student.model.layers[i].self_attn for i in layers}
    if params is None:
        params = [p for m in mixers.values() for n, p in m.named_parameters()
                  if train == "all" or "gk_proj" in n or "o_norm" in n]
    trainable_only(student, params)
    opt = optimizer or make_optimizer(params, lr)
    N, T = io[layers[0]][0].shape[:2]
    device = next(student.parameters()).device
    pos = torch.arange(T, device=device)[None].expand(batch_size, T)
    cos, sin = student.model.rotary_emb(torch.zeros(1, device=device), pos)
    ctx = MixerContext(positions=pos, cos=cos, sin=sin, gla_mode=student.model.gla_mode)
    student.train()
    log = []
    start = time.time()
    bar = tqdm(total=steps, initial=start_step, desc="attention transfer", disable=not progress)
    for step in range(start_step, steps):
        if not schedule_step(opt, lr, step, steps, warmup, elapsed_before + time.time() - start, time_budget_s):
            break
        idx = torch.randint(0, N, (batch_size,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for i in layers:
            x = io[i][0][idx].to(device=device, dtype=torch.float32)
            y = io[i][1][idx].to(device=device, dtype=torch.float32)
            with autocast(precision, device):
                out = mixers[i](x, ctx).float()
            loss = (out - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-8)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step + 1, "nmse": total / len(layers), "lr": opt.param_groups[0]["lr"],
               "tokens": (step + 1 - start_step) * batch_size * T, "elapsed_s": elapsed_before + time.time() - start}
        log.append(rec)
        bar.update(1)
        bar.set_postfix(nmse=f"{rec['nmse']:.4f}")
        if on_step is not None:
            on_step(step + 1, opt, rec)
    bar.close()
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    return log
