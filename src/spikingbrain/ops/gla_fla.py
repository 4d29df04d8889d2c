"""The flash-linear-attention path for GLA (CUDA only, imported lazily).

fla >= 0.2 uses the ``[B, T, H, K]`` layout that ``spikingbrain.ops.gla`` uses; older releases
were head-first (``[B, H, T, K]``), and models written for one silently produced gibberish with
the other. We pass tensors by keyword in the time-first layout and refuse fla versions that lack
it, and the GPU tests compare this path against the chunk reference.

fla's Triton kernels want q, k, v in one dtype; g and the state stay fp32.
"""
from __future__ import annotations

import functools

import torch

from spikingbrain.errors import SpikingBrainError


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla  # noqa: F401
    except Exception:
        return False
    return True


def gla_fla(q, k, v, g, *, scale, initial_state=None, output_final_state=False, reset=None):
    """Same contract as ``spikingbrain.ops.gla.gla``; resets become fla's varlen ``cu_seqlens``."""
    if not q.is_cuda:
        raise SpikingBrainError("gla mode='fla' needs CUDA tensors; use mode='chunk' on CPU")
    if not fla_available():
        raise SpikingBrainError(
            "gla mode='fla' needs flash-linear-attention: pip install 'spikingbrain[gpu]'"
        )
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    B, T, H, K = q.shape
    dtype = v.dtype
    q, k = q.to(dtype), k.to(dtype)
    g = g.float()
    if reset is not None and bool(reset[:, 1:].any()):
        if initial_state is not None:
            # Only the first segment of each row would use it: express that by zero-padding is
            # not possible in varlen form, so fall back to the reference for this rare case.
            from spikingbrain.ops.gla import gla_chunk

            return gla_chunk(q, k, v, g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, reset=reset)
        starts = reset.clone()
        starts[:, 0] = True
        flat = torch.nonzero(starts.reshape(-1)).squeeze(-1)
        cu = torch.cat([flat, flat.new_tensor([B * T])]).to(torch.int32)
        o, final = chunk_gla(
            q=q.reshape(1, B * T, H, K), k=k.reshape(1, B * T, H, K), v=v.reshape(1, B * T, H, -1),
            g=g.reshape(1, B * T, H, K), scale=scale, output_final_state=output_final_state,
            cu_seqlens=cu,
        )
        if final is not None:
            # the state of each row is the state of its last segment
            row_last = torch.searchsorted(cu[:-1].long(), torch.arange(1, B + 1, device=q.device) * T) - 1
            final = final[row_last]
        return o.reshape(B, T, H, -1).to(dtype), final
    s0 = None if initial_state is None else initial_state.float()
    if s0 is not None and reset is not None:
        # a reset at t = 0 drops the initial state (the contract of ops.gla); the branch above
        # only handles resets after the first token
        s0 = s0 * (~reset[:, 0].bool()).float()[:, None, None, None]
    if T <= 64:  # decoding / short chunks: the fused recurrence (its gate argument is `gk`)
        o, final = fused_recurrent_gla(q=q, k=k, v=v, gk=g, scale=scale, initial_state=s0,
                                       output_final_state=output_final_state)
    else:
        o, final = chunk_gla(q=q, k=k, v=v, g=g, scale=scale, initial_state=s0,
                             output_final_state=output_final_state)
    return o.to(dtype), final
