"""The plugin's GLA kernels against the recurrence written out step by step, here."""
import math

import pytest
import torch

from spikingbrain_vllm.gla import gla_chunked, gla_decode_step, gla_reference


def recurrence(q, k, v, g, scale, S0=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ; o_t = scale q_t S_t, one token and head at a time."""
    T, H, K = q.shape
    S = torch.zeros(H, K, v.shape[-1], dtype=torch.float64) if S0 is None else S0.double().clone()
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            S[h] = torch.diag(g[t, h].double().exp()) @ S[h] + torch.outer(k[t, h].double(), v[t, h].double())
            out[t, h] = scale * q[t, h].double() @ S[h]
    return out, S


def inputs(T, H=2, K=8, V=8, gate_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.relu(torch.randn(T, H, K, generator=gen))
    k = torch.relu(torch.randn(T, H, K, generator=gen))
    v = torch.randn(T, H, V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(T, H, K, generator=gen) * 3) * gate_scale
    return q, k, v, g


@pytest.mark.parametrize("T", [1, 7, 16, 37])
def test_reference_is_the_recurrence(T):
    q, k, v, g = inputs(T)
    S0 = torch.randn(2, 8, 8)
    o, S = gla_reference(q, k, v, g, 0.5, initial_state=S0)
    o_r, S_r = recurrence(q, k, v, g, 0.5, S0)
    torch.testing.assert_close(o.double(), o_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S.double(), S_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,chunk", [(1, 16), (15, 16), (16, 16), (50, 16), (130, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrence(T, chunk, with_state):
    q, k, v, g = inputs(T, seed=T)
    S0 = torch.randn(2, 8, 8) if with_state else None
    o, S = gla_chunked(q, k, v, g, 8**-0.5, initial_state=S0, chunk_size=chunk)
    o_r, S_r = recurrence(q, k, v, g, 8**-0.5, S0)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S.double(), S_r, rtol=1e-4, atol=1e-4)


def test_chunked_strong_gates_stay_finite():
    """Gates of ~-40 nats per token: a 16-token chunk decays by ~640 nats, beyond what the
    factored (q e^b)(k e^-b) form can represent; the pairwise branch must take over."""
    q, k, v, g = inputs(40, gate_scale=1.0)
    g = g * 0 - 40.0
    g[::5] = -0.01  # some tokens keep the state, so the result is not trivially the last token
    o, S = gla_chunked(q, k, v, g, 1.0, chunk_size=16)
    o_r, S_r = recurrence(q, k, v, g, 1.0)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o.double(), o_r, rtol=1e-4, atol=1e-4)


def test_chunk_boundaries_carry_state():
    """Prefilling in two pieces (chunked prefill) gives what one piece gives."""
    q, k, v, g = inputs(45, seed=3)
    o_all, S_all = gla_chunked(q, k, v, g, 0.3, chunk_size=16)
    o1, S1 = gla_chunked(q[:20], k[:20], v[:20], g[:20], 0.3, chunk_size=16)
    o2, S2 = gla_chunked(q[20:], k[20:], v[20:], g[20:], 0.3, initial_state=S1, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2]), o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S2, S_all, rtol=1e-5, atol=1e-5)


def test_decode_step_batch_matches_recurrence():
    """A batch of 3 sequences with their own states, 5 steps; the state is updated in place."""
    B, H, K = 3, 2, 8
    seqs = [inputs(5, seed=10 + b) for b in range(B)]
    S0 = torch.randn(B, H, K, K)
    state = S0.clone()
    for t in range(5):
        q, k, v, g = (torch.stack([s[i][t] for s in seqs]) for i in range(4))
        o = gla_decode_step(q, k, v, g, 0.25, state)
        for b in range(B):
            o_r, _ = recurrence(*(x[: t + 1] for x in seqs[b]), 0.25, S0[b])
            torch.testing.assert_close(o[b].double(), o_r[t], rtol=1e-4, atol=1e-4)
    for b in range(B):
        _, S_r = recurrence(*seqs[b], 0.25, S0[b])
        torch.testing.assert_close(state[b].double(), S_r, rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(state.sum()))


def test_chunked_large_keys_near_the_factor_limit_stay_finite():
    """59 nats of decay per 64-token chunk (just under the fast path's limit) and |q| = |k| = 1e7
    over 128 channels: the upper-triangle scores overflow to inf; masking them by multiplication
    gave inf * 0 = NaN outputs. The result must equal the recurrence."""
    T, H, K, V = 70, 1, 128, 4
    gen = torch.Generator().manual_seed(3)
    q = 1e7 * (0.9 + 0.1 * torch.rand(T, H, K, generator=gen))
    k = 1e7 * (0.9 + 0.1 * torch.rand(T, H, K, generator=gen))
    v = torch.randn(T, H, V, generator=gen)
    g = torch.full((T, H, K), -59.0 / 64)
    o, S = gla_chunked(q, k, v, g, K ** -0.5)
    ref_o, ref_S = recurrence(q, k, v, g, K ** -0.5)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4 * ref_o.abs().max().item())
    torch.testing.assert_close(S.double(), ref_S, rtol=1e-4, atol=1e-4 * ref_S.abs().max().item())
