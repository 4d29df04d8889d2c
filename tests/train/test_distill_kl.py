"""The one distillation loss (``objective.distill_kl``) and the LR schedule of the distillation loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from spikingbrain.train.distill import progress_fraction, warmup_cosine
from spikingbrain.train.objective import IGNORE, distill_kl, token_losses


def test_distill_kl_is_the_forward_kl_on_the_shared_vocabulary():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g), torch.randn(5, 9, generator=g)  # teacher has 2 extra logits
    want = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt[:, :7], -1), log_target=True, reduction="sum")
    torch.testing.assert_close(distill_kl(zs, zt), want)
    T = 2.0
    want_t = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt[:, :7] / T, -1), log_target=True, reduction="sum") * T**2
    torch.testing.assert_close(distill_kl(zs, zt, T), want_t)
    assert float(distill_kl(zt[:, :7], zt)) < 1e-6  # a student equal to its teacher
    empty = torch.zeros(0, 7, requires_grad=True)
    out = distill_kl(empty, torch.zeros(0, 7))
    assert float(out.detach()) == 0.0 and out.requires_grad


def test_token_losses_uses_it_on_the_counted_targets():
    g = torch.Generator().manual_seed(1)
    logits, teacher = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    labels = torch.tensor([[1, 2, IGNORE, 3], [1, IGNORE, 4, 5]])
    out = token_losses(logits, labels, teacher)
    mask = labels[:, 1:] != IGNORE
    torch.testing.assert_close(out["kl_sum"], distill_kl(logits[:, :-1][mask], teacher[:, :-1][mask]))
    assert int(out["n"]) == 4


def test_lr_schedule_follows_steps_or_time_budget():
    assert warmup_cosine(0, 100, 10) == 0.1  # warm-up
    assert math.isclose(warmup_cosine(99, 100, 10, done=1.0), 0.1)  # decayed to the floor
    # a run cut short by its time budget still reaches the end of its schedule
    assert progress_fraction(10, 1000, elapsed_s=60, budget_s=60) == 1.0
    assert progress_fraction(500, 1000, elapsed_s=1, budget_s=60) == 0.5
    assert progress_fraction(500, 1000, elapsed_s=1, budget_s=None) == 0.5


def test_warmup_of_a_time_budgeted_run_ends_with_its_progress():
    # 2000 nominal steps (warm-up 200) cut by a budget after ~50: at 10% of the budget the LR is
    # at its peak (it used to be 6/200 of it, and the whole run stayed in warm-up)
    assert warmup_cosine(5, 2000, 200, done=0.1) > 0.9
    assert warmup_cosine(5, 2000, 200, done=0.05) < 0.6  # still warming up at 5%
    # without a budget, the step count decides as before
    assert math.isclose(warmup_cosine(4, 100, 10), 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.04))))


def test_answer_loss_is_the_weighted_kl_plus_cross_entropy_of_the_answer_rows():
    from spikingbrain.train.objective import answer_loss

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    answer = torch.zeros(2, 5)
    answer[0, 2], answer[1, 1], answer[1, 4] = 3.0, 0.5, 9.0  # the last row predicts nothing: ignored

    def kl(a, b):
        pb = F.softmax(b, -1)
        return float((pb * (F.log_softmax(b, -1) - F.log_softmax(a, -1))).sum())

    want = 3.0 * (kl(s[0, 2], t[0, 2]) - float(F.log_softmax(s[0, 2], -1)[ids[0, 3]]))
    want += 0.5 * (kl(s[1, 1], t[1, 1]) - float(F.log_softmax(s[1, 1], -1)[ids[1, 2]]))
    assert math.isclose(float(answer_loss(s, t, ids, answer)), want, rel_tol=1e-5)
    w = torch.arange(5.0)
    torch.testing.assert_close(distill_kl(s[0], t[0], weights=w),
                               sum(w[i] * distill_kl(s[0, i:i + 1], t[0, i:i + 1]) for i in range(5)))


def test_precisions_set_autocast_and_the_gla_matmul_dtype():
    """``bf16`` autocasts and leaves the chunked GLA fp32; ``bf16-gla`` also gives it bf16 matmul
    operands; ``fp32`` does neither; an unknown precision is a clear error."""
    from spikingbrain.errors import SpikingBrainError
    from spikingbrain.ops.gla import _CHUNK_MATMUL_DTYPE
    from spikingbrain.train.distill import autocast

    seen = {}
    for p in ("fp32", "bf16", "bf16-gla"):
        with autocast(p, "cpu"):
            seen[p] = (torch.is_autocast_enabled("cpu"), _CHUNK_MATMUL_DTYPE.get())
    assert seen == {"fp32": (False, None), "bf16": (True, None), "bf16-gla": (True, torch.bfloat16)}
    assert _CHUNK_MATMUL_DTYPE.get() is None and not torch.is_autocast_enabled("cpu")
    with pytest.raises(SpikingBrainError, match="precision 'fp8'"):
        autocast("fp8", "cpu")
