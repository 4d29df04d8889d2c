"""Gated linear attention in plain PyTorch: the plugin's own kernels (vLLM has no GLA for CPU).

Per head, with a per-key-channel forget gate given in log space (``g <= 0``)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        (state [K, V], always fp32)
    o_t = scale * q_t S_t                            (the current token included)

Shapes: one sequence ``q, k, g: [T, H, K]``, ``v: [T, H, V]``, state ``[H, K, V]``.

- ``gla_reference``: the quadratic form written from the equations (tests only).
- ``gla_chunked``: the chunked parallel form (prefill). Inside a chunk of ``C`` tokens the scores
  are ``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)`` with ``b`` the cumulative log decay from the chunk
  start. When a chunk decays by less than ``_FACTOR_LIMIT`` nats they are one matmul,
  ``(q e^b)(k e^-b)^T``; otherwise each pair's exponent is formed explicitly (all <= 0), so any
  gate strength is safe. Chunk states are then passed along sequentially.
- ``gla_decode_step``: one token for a batch of sequences (decode), in place on gathered states.
"""
from __future__ import annotations

import torch

_FACTOR_LIMIT = 60.0  # exp(60) ~ 1e26: k * e^-b stays far from fp32 overflow


def gla_reference(q, k, v, g, scale: float, initial_state=None):
    """``o_i = scale * (sum_{j<=i} (q_i * exp(G_i - G_j)) . k_j v_j + (q_i * exp(G_i)) S_0)``."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    T, H, K = q.shape
    G = g.cumsum(0)  # [T, H, K]
    diff = G[:, None] - G[None, :]  # [Ti, Tj, H, K]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[:, :, None, None]
    decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
    A = torch.einsum("ihk,jhk,ijhk->hij", q, k, decay)
    o = torch.einsum("hij,jhv->ihv", A, v)
    final = torch.einsum("jhk,jhv->hkv", k * (G[-1:] - G).exp(), v)
    if initial_state is not None:
        S0 = initial_state.double()
        o = o + torch.einsum("ihk,hkv->ihv", q * G.exp(), S0)
        final = final + S0 * G[-1].exp()[..., None]
    return (o * scale).float(), final.float()


def gla_chunked(q, k, v, g, scale: float, initial_state=None, chunk_size: int = 64):
    """Chunked GLA over one sequence. Returns ``(o [T, H, V] fp32, final_state [H, K, V] fp32)``."""
    T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    q, k, v, g = (x.float() for x in (q, k, v, g))
    if pad:  # zero gates and keys leave the state untouched; padded outputs are dropped
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    N = (T + pad) // C
    q, k, v, g = (x.view(N, C, H, -1).permute(2, 0, 1, 3) for x in (q, k, v, g))  # [H, N, C, *]
    b = g.cumsum(2)
    b_last = b[:, :, -1:]  # [H, N, 1, K]
    q_dec = q * b.exp() * scale  # query side, decay from the chunk start (<= 1)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if float(-b_last.min()) <= _FACTOR_LIMIT:
        A = q_dec @ (k * (-b).exp()).transpose(-1, -2)
    else:  # very strong gates: explicit pairwise exponents (all <= 0 where used), chunk by chunk
        A = q.new_empty(H, N, C, C)
        for n in range(N):
            e = (b[:, n, :, None] - b[:, n, None, :]).clamp(max=0).exp()  # [H, Ci, Cj, K]
            A[:, n] = torch.einsum("hik,hjk,hijk->hij", q[:, n] * scale, k[:, n], e)
    # drop j > i with `where`: those entries may overflow to inf, and inf * 0 would be NaN
    o = torch.where(mask, A, 0.0) @ v  # [H, N, C, V]
    # each chunk's contribution to the state at its end, and its total decay
    U = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # [H, N, K, V]
    decay = b_last.squeeze(2).exp()  # [H, N, K]
    S = (initial_state.float() if initial_state is not None
         else q.new_zeros(H, K, V))
    for n in range(N):
        o[:, n] += q_dec[:, n] @ S
        S = decay[:, n, :, None] * S + U[:, n]
    o = o.permute(1, 2, 0, 3).reshape(N * C, H, V)[:T]
    return o, S


def gla_decode_step(q, k, v, g, scale: float, state):
    """One token per sequence: ``q, k, g [B, H, K]``, ``v [B, H, V]``, ``state [B, H, K, V]`` fp32
    (updated in place). Returns ``o [B, H, V]`` fp32."""
    state.mul_(g.float().exp()[..., None]).add_(k.float()[..., :, None] * v.float()[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q.float() * scale, state)
