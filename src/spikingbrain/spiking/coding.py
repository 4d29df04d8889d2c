"""Spike coding: expand integer spike counts ``s_int`` into spike trains ``[T, *shape]``.

Schemes (``T`` is the minimum the scheme needs for the whole tensor; an all-zero tensor needs 0):

- ``"binary"``: unary {0, 1}, ``T = max s``; step ``t`` fires iff ``t < s``. Non-negative only.
- ``"ternary"``: {-1, 0, 1}, ``T = max |s|``; each step emits the sign of what remains.
- ``"bitwise"``: {0, 1}, the bits of ``s`` MSB first, ``T = bit_length(max s)``; decode
  ``sum_t 2^(T-1-t) s_t``. Non-negative only.
- ``"bitwise-bidirectional"``: the bits of ``|s|``, each spike carrying the sign of ``s``
  ({-1, 0, 1}), ``T = bit_length(max |s|)`` (7 steps cover -127..127); same decode.
- ``"twos-complement"``: ``T``-bit two's complement, MSB first, ``T`` the smallest width with
  ``-2^(T-1) <= s <= 2^(T-1) - 1``. The sign bit is emitted as a ``-1`` spike (its weight is
  ``-2^(T-1)``), so the same decode ``sum_t 2^(T-1-t) s_t`` applies to all bitwise schemes and an
  event-driven accumulator needs only the step weights, never a separate sign rule.

Trains are ``torch.int8``; ``decode`` returns ``torch.int64``. ``spike_events`` counts the non-zero
spikes per element without materialising the train (used by the monitor).
"""
from __future__ import annotations

import torch

from spikingbrain.errors import SpikingBrainError

SCHEMES = ("binary", "ternary", "bitwise", "bitwise-bidirectional", "twos-complement")
UNSIGNED = ("binary", "bitwise")
BITWISE = ("bitwise", "bitwise-bidirectional", "twos-complement")
MAX_TRAIN_ELEMENTS = 1 << 28  # refuse to materialise trains above ~256 MiB of int8


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise SpikingBrainError(f"unknown spike coding scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def as_counts(s_int: torch.Tensor, scheme: str) -> torch.Tensor:
    """Validate integer spike counts for ``scheme`` and return them as int64."""
    _check_scheme(scheme)
    if not isinstance(s_int, torch.Tensor):
        s_int = torch.as_tensor(s_int)
    if s_int.is_floating_point():
        if not bool(torch.isfinite(s_int).all()) or not torch.equal(s_int, s_int.round()):
            raise SpikingBrainError("spike counts must be integers (got non-integer values)")
    elif s_int.dtype == torch.bool or s_int.is_complex():
        raise SpikingBrainError(f"spike counts must be an integer or float tensor, got {s_int.dtype}")
    s = s_int.to(torch.int64)
    if scheme in UNSIGNED and s.numel() and int(s.min()) < 0:
        raise SpikingBrainError(
            f"scheme {scheme!r} codes non-negative counts only (min is {int(s.min())}); "
            "use 'ternary', 'bitwise-bidirectional' or 'twos-complement' for signed counts"
        )
    return s


def _bit_length(n: int) -> int:
    return int(n).bit_length()


def _twos_width(lo: int, hi: int) -> int:
    if lo == 0 and hi == 0:
        return 0
    t = 1
    while not (-(1 << (t - 1)) <= lo and hi <= (1 << (t - 1)) - 1):
        t += 1
    return t


def time_steps(s_int: torch.Tensor, scheme: str) -> int:
    """Minimum number of time steps ``scheme`` needs to code every count in ``s_int``."""
    s = as_counts(s_int, scheme)
    if s.numel() == 0:
        return 0
    lo, hi = int(s.min()), int(s.max())
    mag = max(abs(lo), abs(hi))
    if scheme in ("binary", "ternary"):
        return mag
    if scheme in ("bitwise", "bitwise-bidirectional"):
        return _bit_length(mag)
    return _twos_width(lo, hi)


def step_weights(scheme: str, T: int) -> list[int]:
    """What one spike at step ``t`` is worth: 1 for unary schemes, ``2^(T-1-t)`` for bitwise."""
    _check_scheme(scheme)
    if scheme in BITWISE:
        return [1 << (T - 1 - t) for t in range(T)]
    return [1] * T


def encode(s_int: torch.Tensor, scheme: str, T: int | None = None) -> torch.Tensor:
    """``s_int [*shape]`` (integers) -> spike train ``[T, *shape]`` (int8, values in {-1, 0, 1}).

    ``T=None`` uses ``time_steps``; a larger ``T`` pads (trailing silent steps for unary schemes,
    leading zero / sign-extension bits for bitwise ones); a smaller one is an error.
    """
    s = as_counts(s_int, scheme)
    need = time_steps(s, scheme)
    if T is None:
        T = need
    elif T < need:
        raise SpikingBrainError(f"scheme {scheme!r} needs at least {need} time steps for these counts, got T={T}")
    if T * max(s.numel(), 1) > MAX_TRAIN_ELEMENTS:
        raise SpikingBrainError(
            f"a {scheme!r} train would have {T} x {s.numel()} slots; use a bitwise scheme or smaller counts"
        )
    train = torch.zeros((T, *s.shape), dtype=torch.int8, device=s.device)
    if scheme in ("binary", "ternary"):
        mag, sign = s.abs(), torch.sign(s)
        for t in range(T):
            train[t] = (sign * (mag > t)).to(torch.int8)
    elif scheme in ("bitwise", "bitwise-bidirectional"):
        mag, sign = s.abs(), torch.sign(s)
        for t in range(T):
            train[t] = (sign * ((mag >> (T - 1 - t)) & 1)).to(torch.int8)
    else:  # two's complement: the T low bits of s (Python-style arithmetic shift on int64)
        for t in range(T):
            train[t] = ((s >> (T - 1 - t)) & 1).to(torch.int8)
        if T:
            train[0] = -train[0]  # the sign bit weighs -2^(T-1)
    return train


def decode(train: torch.Tensor, scheme: str) -> torch.Tensor:
    """Spike train ``[T, *shape]`` -> counts ``[*shape]`` (int64): ``sum_t w_t s_t`` with
    ``w_t`` from ``step_weights``."""
    _check_scheme(scheme)
    if train.dim() < 1:
        raise SpikingBrainError("a spike train needs a leading time dimension [T, ...]")
    T = train.shape[0]
    tr = train.to(torch.int64)
    w = torch.tensor(step_weights(scheme, T), dtype=torch.int64, device=train.device)
    return (tr * w.view(T, *([1] * (tr.dim() - 1)))).sum(0)


def row_time_steps(s_int: torch.Tensor, scheme: str) -> torch.Tensor:
    """``time_steps`` of each row (last dim) separately: ``[..., C]`` -> ``[...]`` int64, for coding
    each token's counts with its own minimal ``T``."""
    s = as_counts(s_int, scheme)
    if s.shape[-1] == 0:
        return torch.zeros(s.shape[:-1], dtype=torch.int64, device=s.device)
    hi, lo = s.amax(-1), s.amin(-1)
    mag = torch.maximum(hi.abs(), lo.abs())
    if scheme in ("binary", "ternary"):
        return mag
    if scheme in ("bitwise", "bitwise-bidirectional"):
        return bit_length(mag)
    pos = torch.where(hi > 0, bit_length(hi) + 1, torch.zeros_like(hi))
    neg = torch.where(lo < 0, bit_length(-lo - 1) + 1, torch.zeros_like(lo))
    return torch.maximum(pos, neg)


def bit_length(a: torch.Tensor) -> torch.Tensor:
    """Bit length of non-negative int64 ``a`` (< 2^53), elementwise (0 for 0): the binary
    exponent from ``frexp``, exact for integers in float64."""
    return torch.frexp(a.to(torch.float64)).exponent.to(torch.int64)


_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _popcount(a: torch.Tensor) -> torch.Tensor:
    """Number of set bits of non-negative int64 ``a``, elementwise (a byte table per 8 bits)."""
    table = _BYTE_POPCOUNT.to(a.device)
    c = table[a & 255]
    a = a >> 8
    while bool((a > 0).any()):
        c += table[a & 255]
        a = a >> 8
    return c


def spike_events(s_int: torch.Tensor, scheme: str, T=None) -> torch.Tensor:
    """Non-zero spikes per element (int64, ``[*shape]``) of ``encode(s_int, scheme, T)``, computed
    without building the train. Only ``"twos-complement"`` depends on ``T`` (sign extension);
    there ``T`` may also be an int64 tensor broadcastable to the shape (per-row widths)."""
    s = as_counts(s_int, scheme)
    if scheme in ("binary", "ternary"):
        return s.abs()
    if scheme in ("bitwise", "bitwise-bidirectional"):
        return _popcount(s.abs())
    if T is None:
        T = time_steps(s, scheme)
    if isinstance(T, torch.Tensor):
        mask = torch.bitwise_left_shift(torch.ones_like(T), T) - 1
    else:
        mask = (1 << T) - 1
    return _popcount(s & mask)
