"""flash-linear-attention's kernels against our chunk reference (CUDA + fla only; skipped otherwise;
the call contract itself is checked on CPU by ``test_gla_fla_contract.py``).

fla changed its default layout from head-first to time-first; a mismatch gives plausible-looking
garbage, so outputs, final states and gradients are all compared, for the fla version installed
(run this file under each fla release you support)."""
import pytest
import torch

from spikingbrain.ops.gla import gla
from spikingbrain.ops.gla_fla import fla_available
from testutils import assert_close_rel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()),
                                 reason="needs CUDA and flash-linear-attention (pip install 'spikingbrain[gpu]')")]


def _inputs(B, T, H, K, V, dtype, seed=0, strong=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, device="cuda", generator=g) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=g)
    logit = torch.randn(B, T, H, K, device="cuda", generator=g) * (3 if strong else 1)
    gate = torch.nn.functional.logsigmoid(logit) / (1 if strong else 16)
    h0 = torch.randn(B, H, K, V, device="cuda", generator=g) * 0.1
    return [x.to(dtype) for x in (q, k, v)] + [gate.float(), h0.float()]


@pytest.mark.parametrize("T", [1, 37, 64, 65, 300, 1024])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_fla_matches_chunk_reference(T, dtype, tol, with_state):
    q, k, v, g, h0 = _inputs(2, T, 4, 64, 64, dtype)
    s0 = h0 if with_state else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g)]
    ref_leaves = [t.detach().float().clone().requires_grad_() for t in (q, k, v, g)]
    o, s = gla(*leaves, initial_state=s0, output_final_state=True, mode="fla")
    o_ref, s_ref = gla(*ref_leaves, initial_state=s0, output_final_state=True, mode="chunk")
    assert_close_rel(o.float(), o_ref, tol, "o")
    assert_close_rel(s.float(), s_ref, tol, "final state")
    do = torch.randn_like(o_ref)
    (o.float() * do).sum().backward()
    (o_ref * do).sum().backward()
    for name, a, b in zip("qkvg", leaves, ref_leaves):
        assert_close_rel(a.grad.float(), b.grad, 5 * tol, f"d{name}")


def test_fla_packed_documents_match_reference():
    q, k, v, g, _ = _inputs(2, 200, 4, 64, 64, torch.float32, seed=1)
    reset = torch.zeros(2, 200, dtype=torch.bool, device="cuda")
    reset[0, 50] = reset[1, 120] = reset[1, 121] = True
    o, s = gla(q, k, v, g, reset=reset, output_final_state=True, mode="fla")
    o_ref, s_ref = gla(q, k, v, g, reset=reset, output_final_state=True, mode="chunk")
    assert_close_rel(o, o_ref, 2e-3, "o")
    assert_close_rel(s, s_ref, 2e-3, "final state")


def test_auto_mode_uses_fla_on_cuda():
    q, k, v, g, _ = _inputs(1, 128, 2, 32, 32, torch.float32, seed=2)
    o_auto, _ = gla(q, k, v, g, mode="auto")
    o_fla, _ = gla(q, k, v, g, mode="fla")
    assert torch.equal(o_auto, o_fla)
