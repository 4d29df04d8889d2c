"""Parallelism across processes: context (sequence) parallelism for SpikingBrain models.

See ``context.py`` for the design (GLA state scan, SWA halo exchange, full-attention K/V
all-gather), ``comm.py`` for the differentiable collectives and the byte counter, and
``launch.py`` for running a function on N local processes.
"""
from spikingbrain.parallel.comm import CommStats, group_rank_world
from spikingbrain.parallel.context import (
    ContextParallelLoss,
    ContextParallelOutput,
    context_parallel_forward,
    context_parallel_loss,
    context_parallel_prefill,
    sequence_metadata,
    shard_bounds,
    shard_targets,
)
from spikingbrain.parallel.mesh import ParallelMesh, init_mesh

__all__ = [
    "CommStats",
    "ContextParallelLoss",
    "ContextParallelOutput",
    "ParallelMesh",
    "context_parallel_forward",
    "context_parallel_loss",
    "context_parallel_prefill",
    "group_rank_world",
    "init_mesh",
    "sequence_metadata",
    "shard_bounds",
    "shard_targets",
]
