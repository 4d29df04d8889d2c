"""Event-driven matmul: only non-zero spikes trigger work, and the work is additions.

For a spike train ``train [T, N, in]`` (values in {-1, 0, 1}, any scheme of ``coding``) and
integer weights ``W_q [out, in]`` with per-row-per-group scales ``[out, G]``:

- every non-zero spike ``(t, n, i)`` adds (or subtracts) weight column ``W_q[:, i]``, shifted
  left by ``log2 w_t`` for bitwise schemes (``w_t = 2^(T-1-t)``; a shift, not a multiply), into
  the integer accumulator of token ``n`` and input group ``i // group_size``;
- only at the end are the ``G`` group accumulators scaled and summed (``G`` multiplies per
  output, independent of the spike count, the same as the dense INT8 kernel).

The result equals the dense ``(W_q * scale) @ decode(train)``; ``accumulates`` counts the scalar
additions actually performed, ``nnz * out``. Vectorised with ``index_add_`` in chunks (a
simulation of the event semantics, not a fast kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking.coding import decode, step_weights
from spikingbrain.spiking.quant import dequantize_weight


@dataclass
class EventResult:
    output: torch.Tensor  # [N, out] fp32 (int64 when scales is None)
    accumulates: int  # scalar additions performed: spikes * out
    spikes: int  # non-zero spikes (weight columns accumulated)


def event_matmul(
    train: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor | None = None,
    scheme: str = "ternary",
    group_size: int = 128,
    chunk: int = 1 << 20,
) -> EventResult:
    """``train [T, N, in]``, ``qweight [out, in]`` (integer), ``scales [out, G]`` or None."""
    if train.dim() != 3 or qweight.dim() != 2 or train.shape[2] != qweight.shape[1]:
        raise SpikingBrainError(
            f"need train [T, N, in] and weights [out, in]; got {tuple(train.shape)} and {tuple(qweight.shape)}"
        )
    if train.numel() and int(train.abs().max()) > 1:
        raise SpikingBrainError("spike trains hold values in {-1, 0, 1}")
    T, N, n_in = train.shape
    out = qweight.shape[0]
    G = 1 if scales is None else scales.shape[1]
    gs = n_in if scales is None else group_size
    shift = torch.tensor(step_weights(scheme, T), dtype=torch.int64, device=train.device)
    w_cols = qweight.to(torch.int64).t().contiguous()  # [in, out]: one column per input channel
    acc = torch.zeros(N * G, out, dtype=torch.int64, device=train.device)
    t_idx, n_idx, i_idx = train.nonzero(as_tuple=True)
    signs = train[t_idx, n_idx, i_idx].to(torch.int64)
    step = max(1, chunk // max(out, 1))
    for a in range(0, t_idx.numel(), step):
        t, n, i, sg = t_idx[a : a + step], n_idx[a : a + step], i_idx[a : a + step], signs[a : a + step]
        cols = w_cols.index_select(0, i) * (sg * shift[t]).unsqueeze(1)
        acc.index_add_(0, n * G + i // gs, cols)
    acc = acc.view(N, G, out)
    if scales is None:
        y = acc.sum(1)
    else:
        y = (acc.to(torch.float64) * scales.t().to(torch.float64).unsqueeze(0)).sum(1).to(torch.float32)
    nnz = int(t_idx.numel())
    return EventResult(y, nnz * out, nnz)


def dense_matmul(
    train: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor | None = None,
    scheme: str = "ternary", group_size: int = 128,
) -> torch.Tensor:
    """The dense reference: ``decode(train) @ W^T`` with dequantized weights (fp64 -> fp32)."""
    s = decode(train, scheme).to(torch.float64)
    if scales is None:
        return (s @ qweight.to(torch.float64).t()).round().to(torch.int64)
    w = dequantize_weight(qweight, scales, group_size, torch.float64)
    return (s @ w.t()).to(torch.float32)
