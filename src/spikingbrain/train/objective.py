"""Training losses: LM cross-entropy, KL distillation to a teacher, and MoE auxiliary losses.

All token losses are *sums* over the target positions of a micro-batch; the trainer divides
by the number of targets in the whole global batch (``Batch.n_targets``), so the objective is
the mean over every target token of the step, the same on 1 or N processes and for any
gradient-accumulation split (a mean of per-micro-batch means would weight short batches up).

Targets follow the HF shift: logits at position ``t`` predict ``labels[t + 1]``; positions
whose label is -100 (padding, document starts, non-assistant SFT tokens) do not count.

- CE: ``sum_t -log softmax(z_t)[y_t]`` (fp32).
- KL: ``T^2 * sum_t KL(softmax(z^teacher_t / T) || softmax(z_t / T))`` over the same targets,
  the forward KL of Hinton et al. (the ``T^2`` keeps gradient scale independent of ``T``).
  Teacher and student logits are compared over their common vocabulary prefix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spikingbrain.train.encode import IGNORE


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * sum KL(softmax(teacher / T) || softmax(student / T))`` over every row of
    ``[..., V]`` logits (fp32), on the common vocabulary prefix: the project's one distillation
    loss (the trainer, the context-parallel hook, the demo and the conversion recipe use it).
    ``weights [...]``: each row's KL multiplied by its weight before the sum."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    zs = student_logits[..., :v].float() / temperature
    zt = teacher_logits[..., :v].float() / temperature
    if zs.numel() == 0:
        return zs.sum() * 0.0
    log_pt = F.log_softmax(zt, dim=-1)
    rows = log_pt.exp() * (log_pt - F.log_softmax(zs, dim=-1))
    if weights is not None:
        rows = rows * weights.to(rows.dtype).unsqueeze(-1)
    return rows.sum() * temperature**2


def answer_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Extra loss on the rows that predict an answer (``answer [B, T]``: each row's weight, 0 on
    the rest; the last row predicts nothing): the weighted KL to the teacher plus the weighted
    cross-entropy of the true next token. Summed, like ``distill_kl``."""
    w = answer[:, :-1]
    sel = w > 0
    z = s_logits[:, :-1][sel]
    kl = distill_kl(z, t_logits[:, :-1][sel], weights=w[sel])
    ce = (F.cross_entropy(z.float(), ids[:, 1:][sel], reduction="none") * w[sel].float()).sum()
    return kl + ce


def token_losses(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """``logits [b, L, V]``, ``labels [b, L]``. Returns fp32 scalars ``ce_sum``, ``kl_sum``
    (0 without a teacher) and ``n`` (targets counted)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    z = logits[:, :-1][mask].float()  # [n, V]
    y = target[mask]
    ce = F.cross_entropy(z, y, reduction="sum") if y.numel() else z.sum() * 0.0
    kl = z.new_zeros(())
    if teacher_logits is not None:
        kl = distill_kl(z, teacher_logits[:, :-1][mask], temperature)
    return {"ce_sum": ce, "kl_sum": kl, "n": mask.sum()}


def aux_loss(model, outputs) -> torch.Tensor | None:
    """MoE auxiliary loss of the last forward, coefficients applied, or None.

    SpikingBrain exposes ``model.aux_loss()``; HF MoE models (Mixtral, Qwen2-MoE) return the raw
    ``outputs.aux_loss`` and scale it by ``config.router_aux_loss_coef``."""
    fn = getattr(model, "aux_loss", None)
    if callable(fn):
        return fn()
    raw = getattr(outputs, "aux_loss", None)
    if raw is not None:
        return raw * float(getattr(model.config, "router_aux_loss_coef", 1.0))
    return None
