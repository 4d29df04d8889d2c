"""Gated linear attention (GLA): three pure-PyTorch computations and a dispatcher.

Per head, with a key-channel forget gate ``g_t`` given in log space (``g_t <= 0``)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          S: [K, V], fp32
    o_t = scale * q_t S_t                              (the current token included)

Shapes follow flash-linear-attention's current layout: ``q, k, g: [B, T, H, K]``,
``v: [B, T, H, V]``, state ``[B, H, K, V]``, output ``[B, T, H, V]``.

``reset`` (optional ``[B, T]`` bool) zeroes the state before a token's update: packed documents
do not leak into each other.

- ``naive``: the quadratic reference, ``o_i = sum_{j<=i} (q_i * exp(G_i - G_j)) . k_j v_j``.
- ``chunk``: the chunked parallel form, the CPU path. Decays are applied relative to reference
  points inside each chunk so no factor overflows: stable for any gate strength.
- ``recurrent``: one token at a time (decoding).
- ``fla``: flash-linear-attention's Triton kernels (CUDA only, see ``gla_fla.py``).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial

import torch

from spikingbrain.errors import SpikingBrainError

MODES = ("auto", "naive", "chunk", "recurrent", "fla")

_CHUNK_MATMUL_DTYPE: ContextVar[torch.dtype | None] = ContextVar("gla_chunk_matmul_dtype", default=None)


@contextmanager
def chunk_matmuls(dtype: torch.dtype | None):
    """Within the block, ``gla`` in ``chunk`` mode runs its four big matmuls (intra-chunk scores,
    scores x values, chunk states, queries x entering states) with ``dtype`` operands (e.g.
    ``torch.bfloat16``: 4-8x faster on CPUs with AVX512-BF16 for these 64x64 blocks); decays, the
    state scan and the output stay fp32. Safe because every factor is bounded (``e^40`` at most)
    and, with non-negative feature maps (relu, sigmoid), the scores sum non-negative terms: no
    cancellation, so a bf16 rounding stays a relative 2^-8 as in any bf16 attention."""
    token = _CHUNK_MATMUL_DTYPE.set(dtype)
    try:
        yield
    finally:
        _CHUNK_MATMUL_DTYPE.reset(token)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "auto",
    reset: torch.Tensor | None = None,
    chunk_size: int = 64,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention. Returns ``(o [B, T, H, V], final_state [B, H, K, V] | None)``.
    ``matmul_dtype``: the chunked form's matmul operands (default: ``chunk_matmuls``'s, else fp32)."""
    _check(q, k, v, g, initial_state, reset)
    if reset is not None:
        reset = reset.bool()  # an integer mask would break `~reset` (bitwise not) in the recurrence
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if mode == "auto":
        mode = _auto_mode(q)
    if mode == "fla":
        from spikingbrain.ops.gla_fla import gla_fla

        return gla_fla(q, k, v, g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, reset=reset)
    forms = {"naive": gla_naive, "recurrent": gla_recurrent,
             "chunk": partial(gla_chunk, chunk_size=chunk_size, matmul_dtype=matmul_dtype or _CHUNK_MATMUL_DTYPE.get())}
    if mode not in forms:
        raise SpikingBrainError(f"gla: unknown mode {mode!r}; choose from {MODES}")
    # the reference forms do their state math in fp32 on purpose: autocast alone must not turn the
    # exp(cumulative gate) products into bf16 (``chunk_matmuls`` opts in, for non-negative features)
    dev = q.device.type
    with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else nullcontext():
        return forms[mode](q, k, v, g, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, reset=reset)


def _auto_mode(q: torch.Tensor) -> str:
    from spikingbrain.ops import gla_fla  # cheap: fla itself is imported only on CUDA

    if gla_fla.on_cuda(q) and gla_fla.fla_available():
        return "fla"
    # A handful of tokens (decoding): the recurrence is cheaper than padding a chunk.
    return "recurrent" if q.shape[1] <= 4 else "chunk"


def _check(q, k, v, g, initial_state, reset) -> None:
    if q.dim() != 4:
        raise SpikingBrainError(f"gla: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape or g.shape != q.shape:
        raise SpikingBrainError(
            f"gla: q, k, g must share [B, T, H, K]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(g.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise SpikingBrainError(f"gla: v must be [B, T, H, V] matching q's [B, T, H]; got {tuple(v.shape)}")
    B, _, H, K = q.shape
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, v.shape[-1]):
        raise SpikingBrainError(
            f"gla: initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, got {tuple(initial_state.shape)}"
        )
    if reset is not None and tuple(reset.shape) != tuple(q.shape[:2]):
        raise SpikingBrainError(f"gla: reset must be [B, T] = {tuple(q.shape[:2])}, got {tuple(reset.shape)}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- naive
def gla_naive(q, k, v, g, *, scale, initial_state=None, output_final_state=False, reset=None):
    """Quadratic reference (memory O(T^2 K) per head: tests only)."""
    dt = _compute_dtype(q)
    out_dtype = v.dtype  # v is reassigned below: returning `.to(v.dtype)` gave fp32 for bf16 input
    q, k, v, g = (x.transpose(1, 2).to(dt) for x in (q, k, v, g))  # [B, H, T, *]
    B, H, T, K = q.shape
    G = g.cumsum(2)
    diff = G[:, :, :, None, :] - G[:, :, None, :, :]  # [B, H, Ti, Tj, K]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal[None, None]
    if reset is not None:
        seg = reset.long().cumsum(1)  # [B, T]
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    decay = torch.where(mask[..., None], diff, torch.full_like(diff, float("-inf"))).exp()
    A = torch.einsum("bhik,bhjk,bhijk->bhij", q, k, decay)
    o = A @ v
    S0 = initial_state.to(dt) if initial_state is not None else None
    if S0 is not None:
        carry = torch.ones(B, 1, T, 1, dtype=dt, device=q.device)
        if reset is not None:
            carry = (reset.long().cumsum(1) == 0).to(dt)[:, None, :, None]
        o = o + ((q * G.exp()) @ S0) * carry
    o = o * scale
    final = None
    if output_final_state:
        last = G[:, :, -1:, :] - G  # [B, H, T, K], decay from each j to the end
        w = torch.ones(B, 1, T, 1, dtype=dt, device=q.device)
        if reset is not None:
            seg = reset.long().cumsum(1)
            w = (seg == seg[:, -1:]).to(dt)[:, None, :, None]
        final = (k * last.exp() * w).transpose(-1, -2) @ v
        if S0 is not None:
            keep = 1.0 if reset is None else (~reset.any(1)).to(dt)[:, None, None, None]
            final = final + S0 * G[:, :, -1, :, None].exp() * keep
    return o.transpose(1, 2).to(out_dtype), final


# --------------------------------------------------------------------------- recurrent
def gla_recurrent(q, k, v, g, *, scale, initial_state=None, output_final_state=False, reset=None):
    """Token-by-token recurrence (decoding; also a second reference)."""
    dt = _compute_dtype(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = (initial_state.to(dt) if initial_state is not None
         else torch.zeros(B, H, K, V, dtype=dt, device=q.device))
    out = []
    for t in range(T):
        if reset is not None:
            S = S * (~reset[:, t]).to(dt)[:, None, None, None]
        qt, kt, vt, gt = (x[:, t].to(dt) for x in (q, k, v, g))  # [B, H, *]
        S = S * gt.exp()[..., None] + kt[..., :, None] * vt[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", qt * scale, S))
    o = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(v.dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------- chunk
def gla_chunk(q, k, v, g, *, scale, initial_state=None, output_final_state=False, reset=None,
              chunk_size=64, sub_chunk=16, matmul_dtype=None):
    """Chunked parallel form.

    Within a chunk of C tokens, ``b`` is the cumulative log decay from the chunk start and the
    scores are ``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)``. Usually one matmul computes them
    exactly as ``(q e^(b-m))(k e^(m-b))^T`` (``m``: 0, or half the chunk's decay when that is
    large); if a chunk's total decay is too strong for that to be
    representable, ``_intra_chunk_stable`` (sub-chunks of ``sub_chunk`` tokens, exponents always
    <= 0) takes over, so the result is stable for any gate strength. Chunk states are then
    scanned sequentially. ``matmul_dtype`` (e.g. bf16): the operands of the four big matmuls
    (see ``chunk_matmuls``); everything else stays in the compute dtype.
    """
    dt = _compute_dtype(q)
    md = matmul_dtype if matmul_dtype is not None and matmul_dtype != dt else None

    def mm(a, b):
        return a @ b if md is None else (a.to(md) @ b.to(md)).to(dt)

    out_dtype = v.dtype  # v is reassigned below (same fix as in gla_naive)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = max(sub_chunk, (chunk_size // sub_chunk) * sub_chunk)
    c = sub_chunk
    pad = (-T) % C
    if pad:
        q, k, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, g))
        v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
        if reset is not None:
            reset = torch.nn.functional.pad(reset, (0, pad), value=False)
    N = (T + pad) // C
    # [B, H, N, C, *]
    q, k, g = (x.to(dt).transpose(1, 2).reshape(B, H, N, C, K) for x in (q, k, g))
    v = v.to(dt).transpose(1, 2).reshape(B, H, N, C, V)
    b = g.cumsum(3)
    q = q * scale

    seg = None
    if reset is not None:
        seg = reset.view(B, N, C).long().cumsum(2)[:, None]  # [B, 1, N, C]: resets seen so far in the chunk

    # ---- intra-chunk scores A[i, j], j <= i
    # Fast path: when no chunk decays by more than `limit` nats, A = (q e^(b-m))(k e^(m-b))^T is
    # one exact matmul. The reference m is the chunk start (m = 0) while a channel decays by at
    # most limit/2 over the chunk, else half its decay: either way no factor exceeds e^(limit/2)
    # times |q| or |k| (forward, and dq/dg in backward; m = 0 up to `limit` put e^limit on the key
    # side, and |k| = 80 overflowed). Upper-triangle entries (j > i) may still overflow to inf:
    # they are dropped with `where`, never multiplied by a 0/1 mask (inf * 0 = NaN). Stronger
    # gates fall back to the sub-chunk form, which never exponentiates a positive number.
    limit = 80.0 if dt == torch.float32 else 600.0
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if seg is not None:
        causal = causal & (seg[..., :, None] == seg[..., None, :])
    if float(-b[:, :, :, -1].detach().min()) <= limit:
        b_end = b[:, :, :, -1:].detach()  # m is a constant shift: the scores do not depend on it
        m = torch.where(b_end < -limit / 2, b_end / 2, torch.zeros_like(b_end))
        A = mm(q * (b - m).exp(), (k * (m - b).exp()).transpose(-1, -2))
    else:
        A = _intra_chunk_stable(q, k, b, c)
    A = torch.where(causal, A, 0.0)
    o = mm(A, v)  # [B,H,N,C,V]

    # ---- chunk states and the sequential scan
    b_last = b[:, :, :, -1]  # [B,H,N,K]
    k_end = k * (b_last[:, :, :, None] - b).exp()
    if seg is not None:
        k_end = k_end * (seg == seg[..., -1:])[..., None]
    U = mm(k_end.transpose(-1, -2), v)  # [B,H,N,K,V]
    decay = b_last.exp()
    if seg is not None:
        decay = decay * (seg[..., -1] == 0)[..., None]  # a reset inside the chunk drops the carry
    S = (initial_state.to(dt) if initial_state is not None
         else torch.zeros(B, H, K, V, dtype=dt, device=q.device))
    starts = []
    for n in range(N):
        starts.append(S)
        S = decay[:, :, n, :, None] * S + U[:, :, n]
    S_prev = torch.stack(starts, 2)  # [B,H,N,K,V]: state entering each chunk
    q_in = q * b.exp()  # exponent <= 0
    if seg is not None:
        q_in = q_in * (seg == 0)[..., None]
    o = o + mm(q_in, S_prev)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(out_dtype), (S if output_final_state else None)


def _intra_chunk_stable(q, k, b, c):
    """Intra-chunk scores ``A [B, H, N, C, C]`` without exponentiating anything positive: pairs
    in the same sub-chunk of ``c`` tokens use ``exp(b_i - b_j)`` directly; pairs across
    sub-chunks are factored through the end of the sub-chunk before ``i``'s."""
    B, H, N, C, K = q.shape
    S_sub = C // c
    qs, ks, bs = (x.reshape(B, H, N, S_sub, c, K) for x in (q, k, b))
    # (a) across sub-chunks: reference r = last position of the sub-chunk before i's.
    b_ref = torch.cat([torch.zeros_like(bs[:, :, :, :1, -1]), bs[:, :, :, :-1, -1]], 3)  # [B,H,N,S,K]
    q_t = qs * (bs - b_ref[:, :, :, :, None]).exp()  # [B,H,N,S,c,K]
    kb = b_ref[:, :, :, :, None, :] - b[:, :, :, None, :, :]  # [B,H,N,S(i),C(j),K]
    j_sub = torch.arange(C, device=q.device) // c
    before = j_sub[None, :] < torch.arange(S_sub, device=q.device)[:, None]  # [S, C]: j in an earlier sub-chunk
    kb = torch.where(before[..., None], kb, torch.full_like(kb, float("-inf")))
    k_t = k[:, :, :, None] * kb.exp()  # [B,H,N,S,C,K]
    A = q_t @ k_t.transpose(-1, -2)  # [B,H,N,S,c,C]
    # (b) within a sub-chunk: direct pairwise decay, one key column at a time.
    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diag = []
    for j in range(c):
        e = (bs - bs[..., j : j + 1, :]).clamp(max=0)  # rows i < j are masked below
        diag.append((qs * ks[..., j : j + 1, :] * e.exp()).sum(-1))  # [B,H,N,S,c]
    A_diag = torch.where(tri, torch.stack(diag, -1), 0.0)  # [B,H,N,S,c,c]
    A = A.reshape(B, H, N, S_sub, c, S_sub, c)
    eye = torch.eye(S_sub, dtype=torch.bool, device=q.device)[None, None, None, :, None, :, None]
    A = torch.where(eye, A_diag[:, :, :, :, :, None, :].expand_as(A), A).reshape(B, H, N, C, C)
    return A
