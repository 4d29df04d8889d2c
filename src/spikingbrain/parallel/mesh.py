"""A 2-D (data x context) layout of the ranks of the default process group.

``W = dp * cp`` ranks form a ``[dp, cp]`` grid, row-major: rank ``i * cp + j`` is data-parallel
replica ``i``, sequence shard ``j``. The ``cp`` ranks of a row share every batch row and split
its sequence (``context.py``); the ``dp`` rows see different rows of the global batch.
Gradients are then averaged over *all* ``W`` ranks (DDP on the default group) with each rank's
loss scaled by ``W`` over the global target count, which sums every shard's and replica's
contribution exactly once.

The context-parallel group of each row is always a group of its own (``dist.new_group``),
never the default group, even when ``dp == 1``: the sharded forward's collectives then never
interleave with DDP's gradient all-reduces, which are issued on the default group from the
same backward pass in an order that may differ between ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from spikingbrain.errors import SpikingBrainError


@dataclass
class ParallelMesh:
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    cp_group: object  # ProcessGroup of this rank's row (None when cp_size == 1 and no group)
    dp_group: object  # ProcessGroup of this rank's column (None when not initialised)

    @property
    def shape(self) -> tuple[int, int]:
        return self.dp_size, self.cp_size


def init_mesh(context_parallel: int) -> ParallelMesh:
    """Lay the default group's ranks out as ``[world / context_parallel, context_parallel]``.
    Every rank must call it (it creates the row and column groups)."""
    cp = int(context_parallel)
    if cp < 1:
        raise SpikingBrainError(f"context_parallel must be >= 1, got {cp}")
    if not (dist.is_available() and dist.is_initialized()):
        if cp != 1:
            raise SpikingBrainError(f"context_parallel={cp} needs a process group of at least {cp} processes "
                                    "(launch with torchrun)")
        return ParallelMesh(0, 1, 0, 1, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % cp:
        raise SpikingBrainError(f"context_parallel={cp} does not divide the {world} processes")
    dp = world // cp
    cp_group = dp_group = None
    for i in range(dp):  # every rank creates every group, in the same order
        g = dist.new_group([i * cp + j for j in range(cp)])
        if rank // cp == i:
            cp_group = g
    for j in range(cp):
        g = dist.new_group([i * cp + j for i in range(dp)])
        if rank % cp == j:
            dp_group = g
    return ParallelMesh(rank // cp, dp, rank % cp, cp, cp_group, dp_group)
