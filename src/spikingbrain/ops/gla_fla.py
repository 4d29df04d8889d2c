"""The flash-linear-attention path for GLA (CUDA only, imported lazily).

fla's layout history, read from its releases: up to 0.1.x the GLA kernels took head-first
tensors ``[B, H, T, K]`` by default (``head_first=True``); 0.2.0 and 0.2.1 switched the default to
the time-first ``[B, T, H, K]`` layout that ``spikingbrain.ops.gla`` uses but still accepted
``head_first`` (and warned on every call with T < H, i.e. every decode step); 0.2.2 removed
``head_first``; 0.5.1 added ``state_v_first`` (default False: states ``[N, H, K, V]``), inserted
*before* ``cu_seqlens`` in the positional order. A layout mismatch gives plausible garbage, not an
error, so the installed version is checked against ``FLA_VERSIONS`` (the ``gpu`` extra in
pyproject.toml says the same) and every argument is passed by keyword, ``state_v_first=False``
explicitly where it exists.

The contract used: ``chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)``
and ``fused_recurrent_gla(q, k, v, gk, scale, initial_state, output_final_state)``; q, k, v in one
dtype, gates and states in fp32 (fla >= 0.6 asserts an fp32 initial state); packed documents as
one batch-1 sequence with int32 ``cu_seqlens [N + 1]`` and ``N`` initial/final states.
``tests/ops/test_gla_fla_contract.py`` checks these calls on CPU with a stand-in module.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch

from spikingbrain.errors import SpikingBrainError

FLA_VERSIONS = ">=0.2.2,<0.7"


def on_cuda(x: torch.Tensor) -> bool:
    """Whether ``x`` is where fla's Triton kernels run (the CPU contract test replaces this)."""
    return x.is_cuda


def fla_version() -> str | None:
    """The installed fla's version string, or None when it cannot be imported."""
    try:
        import fla
    except Exception:
        return None
    version = getattr(fla, "__version__", None)
    if version is None:
        from importlib import metadata

        for dist in ("fla-core", "flash-linear-attention"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    return version


def check_fla_version(version: str | None) -> None:
    """Raise a clear error unless ``version`` is in ``FLA_VERSIONS``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = version is not None and Version(version) in SpecifierSet(FLA_VERSIONS)
    except InvalidVersion:
        ok = False
    if not ok:
        raise SpikingBrainError(
            f"flash-linear-attention {version} is not supported: spikingbrain passes the time-first "
            f"[B, T, H, K] layout and supports fla{FLA_VERSIONS} (releases before 0.2 read the same "
            "tensors as head-first [B, H, T, K] and return wrong values without an error; later "
            f"releases are untested). pip install 'flash-linear-attention{FLA_VERSIONS}'"
        )


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    """fla imports and its version is supported. An installed but unsupported version warns once
    and counts as absent (``mode='auto'`` then takes the chunk path; ``mode='fla'`` raises)."""
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla  # noqa: F401
    except Exception:
        return False
    try:
        check_fla_version(fla_version())
    except SpikingBrainError as e:
        warnings.warn(f"{e}; using the PyTorch GLA path instead", stacklevel=2)
        return False
    return True


def _kernels():
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
    except Exception as e:
        raise SpikingBrainError(
            f"gla mode='fla' needs flash-linear-attention ({type(e).__name__}: {e}): "
            "pip install 'spikingbrain[gpu]'"
        ) from e
    check_fla_version(fla_version())
    return chunk_gla, fused_recurrent_gla


def _layout_kwargs(fn) -> dict:
    """``state_v_first=False`` where the kernel has it: the state layout is never left to a default."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {"state_v_first": False} if "state_v_first" in params else {}


def gla_fla(q, k, v, g, *, scale, initial_state=None, output_final_state=False, reset=None):
    """Same contract as ``spikingbrain.ops.gla.gla``; resets become fla's varlen ``cu_seqlens``."""
    if not on_cuda(q):
        raise SpikingBrainError("gla mode='fla' needs CUDA tensors; use mode='chunk' on CPU")
    chunk_gla, fused_recurrent_gla = _kernels()
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k = q.to(dtype), k.to(dtype)
    g = g.float()
    s0 = None if initial_state is None else initial_state.float()
    if s0 is not None and reset is not None:
        s0 = s0 * (~reset[:, 0]).float()[:, None, None, None]  # a reset at t = 0 drops the state
    if reset is not None and bool(reset[:, 1:].any()):
        # Packed documents: one batch-1 sequence, one fla sequence per document; the initial
        # state goes to each row's first document, zeros to the others.
        starts = reset.clone()
        starts[:, 0] = True
        flat = torch.nonzero(starts.reshape(-1)).squeeze(-1)
        cu = torch.cat([flat, flat.new_tensor([B * T])]).to(torch.int32)
        row_starts = torch.arange(B, device=flat.device) * T
        h0 = None
        if s0 is not None:
            h0 = s0.new_zeros(flat.numel(), *s0.shape[1:])
            h0[torch.searchsorted(flat, row_starts)] = s0
        o, final = chunk_gla(
            q=q.reshape(1, B * T, H, K), k=k.reshape(1, B * T, H, K), v=v.reshape(1, B * T, H, -1),
            g=g.reshape(1, B * T, H, K), scale=scale, initial_state=h0,
            output_final_state=output_final_state, cu_seqlens=cu, **_layout_kwargs(chunk_gla),
        )
        if final is not None:  # each row's state is that of its last document
            final = final[torch.searchsorted(flat, row_starts + T) - 1]
        return o.reshape(B, T, H, -1).to(dtype), final
    if T <= 64:  # decoding / short chunks: the fused recurrence (its gate argument is `gk`)
        o, final = fused_recurrent_gla(q=q, k=k, v=v, gk=g, scale=scale, initial_state=s0,
                                       output_final_state=output_final_state,
                                       **_layout_kwargs(fused_recurrent_gla))
    else:
        o, final = chunk_gla(q=q, k=k, v=v, g=g, scale=scale, initial_state=s0,
                             output_final_state=output_final_state, **_layout_kwargs(chunk_gla))
    return o.to(dtype), final
