"""MoE FFN: routing, capacity-free dispatch against a per-token reference, aux loss, load stats."""
import math

import pytest
import torch
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.moe import MoE, moe_aux_loss, moe_load

D, WIDTH = 32, 48


def make_moe(num_experts=6, top_k=2, shared=1, seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoE(D, WIDTH, num_experts, top_k, shared, **kw)
    with torch.no_grad():  # a router strong enough that routing is far from uniform
        moe.router.weight.normal_(0, 0.5)
    return moe


def naive_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: shared experts plus the top-k experts weighted by their scores."""
    h = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(h.shape[0]):
        xt = h[t : t + 1]
        z = (xt @ moe.router.weight.T).float()[0]
        p = z.softmax(-1) if moe.router_type == "softmax" else z.sigmoid()
        w, ids = p.topk(moe.top_k)
        if moe.norm_topk_prob:
            w = w / w.sum()
        y = sum(s(xt) for s in moe.shared_experts) if len(moe.shared_experts) else torch.zeros_like(xt)
        for wi, e in zip(w, ids.tolist()):
            y = y + wi * moe.experts[e](xt)
        rows.append(y)
    return torch.cat(rows).reshape(x.shape)


def forced_input(n_tokens=20, seed=1):
    """Tokens whose feature 0 is 1, so a router row with a large weight on it always wins."""
    torch.manual_seed(seed)
    x = torch.randn(2, n_tokens // 2, D)
    x[..., 0] = 1.0
    return x


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_forced_single_expert_equals_that_expert_plus_shared(router, dispatch):
    moe = make_moe(num_experts=5, top_k=1, shared=1, router=router, dispatch=dispatch)
    winner = 3
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[winner, 0] = 60.0  # softmax / sigmoid score rounds to exactly 1.0 in fp32
    x = forced_input()
    y = moe(x)
    expected = moe.experts[winner](x) + moe.shared_experts[0](x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    assert moe.last_load.tolist() == [0, 0, 0, x.shape[0] * x.shape[1], 0]


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
@pytest.mark.parametrize(
    "router,top_k,norm,shared",
    [
        ("softmax", 1, False, 1),
        ("softmax", 2, False, 0),
        ("softmax", 3, True, 2),
        ("sigmoid", 2, False, 1),
        ("sigmoid", 2, True, 0),
    ],
)
def test_dispatch_matches_per_token_reference_values_and_grads(dispatch, router, top_k, norm, shared):
    moe = make_moe(num_experts=6, top_k=top_k, shared=shared, router=router, norm_topk_prob=norm, dispatch=dispatch)
    torch.manual_seed(2)
    x = torch.randn(2, 6, D, requires_grad=True)
    grad_out = torch.randn(2, 6, D)

    y = moe(x)
    (y * grad_out).sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    got_x = x.grad.clone()
    moe.zero_grad()
    x.grad = None

    ref = naive_reference(moe, x)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-5)
    for name, p in moe.named_parameters():
        if p.grad is None:  # experts no token chose get no gradient in either computation
            assert name not in got or got[name].abs().max() == 0
            continue
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert moe.router.weight.grad.abs().max() > 0  # the router learns through the top-k weights


def test_grouped_equals_loop_with_empty_and_uneven_experts():
    moe = make_moe(num_experts=8, top_k=1, shared=0, dispatch="loop")
    x = forced_input(n_tokens=40)
    with torch.no_grad():  # only experts 1 and 6 receive tokens: 6 empty groups
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = 5.0
        moe.router.weight[6, 1] = 5.0
    y_loop = moe(x)
    load_loop = moe.last_load.clone()
    moe.dispatch = "grouped"
    y_grouped = moe(x)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-6, atol=1e-6)
    assert torch.equal(moe.last_load, load_loop)
    assert (load_loop == 0).sum() == 6 and load_loop.sum() == x.shape[0] * x.shape[1]


def test_load_counts_assignments_per_expert():
    moe = make_moe(num_experts=6, top_k=2, shared=1)
    torch.manual_seed(3)
    x = torch.randn(4, 9, D)
    moe(x)
    ids = (x.reshape(-1, D) @ moe.router.weight.T).softmax(-1).topk(2, -1).indices
    expected = torch.bincount(ids.reshape(-1), minlength=6)
    assert moe.last_load.dtype == torch.int64 and not moe.last_load.requires_grad
    assert torch.equal(moe.last_load, expected)
    assert int(moe.last_load.sum()) == 4 * 9 * 2


def _balanced_input(num_experts, reps, eps=1e-2):
    """Token t is eps * e_{t mod N}: with an identity router every expert wins equally often
    and the scores are (by symmetry) uniform on average."""
    x = torch.zeros(num_experts * reps, D)
    x[torch.arange(num_experts * reps), torch.arange(num_experts * reps) % num_experts] = eps
    return x


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_loss_minimal_for_uniform_routing_and_larger_when_collapsed(router):
    n_exp, coef = 4, 0.05
    moe = make_moe(num_experts=n_exp, top_k=1, shared=0, router=router, aux_loss_coef=coef)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :n_exp] = torch.eye(n_exp)
    moe(_balanced_input(n_exp, reps=5))
    assert moe.last_load.tolist() == [5] * n_exp
    uniform = moe.last_aux_loss.item()
    assert uniform == pytest.approx(coef, rel=1e-4)  # the Switch loss's minimum, N * N * (1/N)^2

    torch.manual_seed(4)
    with torch.no_grad():  # a random router on random tokens: unbalanced, in between
        moe.router.weight.normal_(0, 1.0)
    moe(torch.randn(40, D))
    random_routing = moe.last_aux_loss.item()
    moe.last_aux_loss.backward()
    assert moe.router.weight.grad.abs().max() > 0  # the loss trains the router (through P_e)

    with torch.no_grad():  # collapse: every token to expert 0 with score ~1, the others ~0
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = -60.0
        moe.router.weight[0, 0] = 60.0
    moe(forced_input())
    collapsed = moe.last_aux_loss.item()
    assert collapsed == pytest.approx(coef * n_exp, rel=1e-4)
    assert uniform < random_routing < collapsed


def test_router_z_loss():
    moe = make_moe(num_experts=4, top_k=1, shared=0, aux_loss_coef=0.0, router_z_loss_coef=0.1)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(10, D))
    assert moe.last_aux_loss.item() == pytest.approx(0.1 * math.log(4) ** 2, rel=1e-5)


def test_model_helpers_sum_losses_and_collect_loads():
    model = nn.Sequential(make_moe(seed=0), make_moe(seed=1))
    assert moe_aux_loss(model) is None and moe_load(model) == {}
    model(torch.randn(2, 5, D))
    total = moe_aux_loss(model)
    torch.testing.assert_close(total, model[0].last_aux_loss + model[1].last_aux_loss)
    loads = moe_load(model)
    assert set(loads) == {"0", "1"} and all(sum(v) == 2 * 5 * 2 for v in loads.values())


def test_auto_uses_loop_on_cpu_and_honours_replaced_projections():
    moe = make_moe(dispatch="auto")
    x = torch.randn(64, D)
    assert not moe._use_grouped(x)

    class Scaled(nn.Module):  # stands in for a spiking / LoRA replacement of a projection
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, t):
            return 2.0 * self.lin(t)

    ref = naive_reference(moe, x)
    for e in moe.experts:
        e.down_proj = Scaled(e.down_proj)
    shared = moe.shared_experts[0](x)
    torch.testing.assert_close(moe(x), 2.0 * (ref - shared) + shared, rtol=1e-5, atol=1e-5)
    moe.dispatch = "grouped"
    with pytest.raises(SpikingBrainError, match="nn.Linear"):
        moe(x)


def test_shapes_empty_input_and_bf16():
    moe = make_moe()
    assert moe(torch.randn(5, D)).shape == (5, D)
    empty = moe(torch.randn(0, 3, D))
    assert empty.shape == (0, 3, D) and moe.last_aux_loss.item() == 0.0
    moe_bf16 = make_moe().to(torch.bfloat16)
    y = moe_bf16(torch.randn(2, 4, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(top_k=5), "top_k"),
        (dict(router="relu"), "router"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(dispatch="magic"), "dispatch"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(hidden_size=D, intermediate_size=WIDTH, num_experts=4, top_k=1)
    args.update(kwargs)
    with pytest.raises(SpikingBrainError, match=match):
        MoE(**args)
