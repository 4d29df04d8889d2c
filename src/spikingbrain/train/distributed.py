"""Processes and devices: torchrun, DDP and FSDP2.

One recipe runs on 1 or N processes: launched by ``torchrun`` (``WORLD_SIZE`` set) the trainer
joins the process group (``nccl`` on CUDA, ``gloo`` on CPU); otherwise it is rank 0 of 1.
``distributed: fsdp`` on a single process still shards (over one rank, through a local
process group) so that checkpoints keep one format. The global batch is fixed by the recipe;
each rank gets ``batch_size / grad_accum / world_size`` rows per micro-batch.

- DDP: ``DistributedDataParallel``; gradients averaged over ranks (``no_sync`` on all but the
  last micro-batch).
- FSDP2: ``torch.distributed.fsdp.fully_shard`` on every decoder layer (the model's
  ``_no_split_modules`` classes) and then on the root; parameters become ``DTensor`` shards.
- Context parallelism (``context_parallel: N``, ``spikingbrain.parallel``): the ranks form a
  ``[world / N, N]`` data x context mesh; data are split over the ``world / N`` data-parallel
  ranks (``dp_rank`` / ``dp_size``), each sequence over the ``N`` ranks of ``cp_group``.
  DDP / FSDP still average gradients over the whole world.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from spikingbrain.errors import SpikingBrainError


@dataclass
class DistInfo:
    mode: str  # none | ddp | fsdp
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module created the process group (and destroys it)
    cp_size: int = 1  # context parallelism: ranks that split each sequence
    cp_group: object = None  # this rank's context-parallel process group

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(mode: str, device: str | None = None, context_parallel: int = 1) -> DistInfo:
    info = _init_distributed(mode, device)
    if context_parallel > 1:
        from spikingbrain.parallel.mesh import init_mesh

        mesh = init_mesh(context_parallel)
        info.cp_size, info.cp_group = mesh.cp_size, mesh.cp_group
    return info


def _init_distributed(mode: str, device: str | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and mode == "none":
        raise SpikingBrainError(
            f"recipe field distributed: 'none', but the job was launched on {world} processes; set ddp or fsdp"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if mode != "none" and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:  # a plain `python` run: a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    if dist.is_available() and dist.is_initialized() and mode != "none":
        return DistInfo(mode, dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)
    return DistInfo(mode, 0, 1, 0, dev, owns)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active and info.mode != "none":
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active and info.mode != "none" and info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # a model that does not declare them: shard whatever sits in a `layers` list
        for m in model.modules():
            if isinstance(getattr(m, "layers", None), nn.ModuleList):
                return list(m.layers)
    return layers


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Return the module the trainer calls (DDP wrapper, or the same module sharded in place)."""
    if info.mode == "ddp" and info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under torch.compile / DDP wrappers (FSDP2 shards in place)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def no_grad_sync(model: nn.Module, info: DistInfo, sync: bool):
    """Context for one micro-batch: skip the gradient all-reduce unless ``sync``."""
    inner = getattr(model, "_orig_mod", model)
    if info.mode == "ddp" and hasattr(inner, "no_sync") and not sync:
        return inner.no_sync()
    if info.mode == "fsdp" and hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
