"""Collectives for context parallelism that autograd differentiates through, plus a byte counter.

Every collective of one context-parallel forward goes through a ``Comm`` object, which

- works on any ``torch.distributed`` process group (NCCL, gloo, ...) or, without one, as a
  group of one (every collective is then the identity);
- makes each collective an autograd ``Function`` whose backward is the adjoint collective:
  all-gather <-> reduce-scatter (sum), send-to-next <-> send-to-previous;
- threads a *chain token* (a zero scalar) through the collectives in call order. Collective
  ``n + 1`` takes the token collective ``n`` returned, so in the backward pass their adjoints
  run in exactly the reverse order on every rank (no mismatched collectives whatever order
  the autograd engine would otherwise pick), and every collective stays in every rank's
  backward graph even where a rank does not use its output (rank 0 uses no earlier rank's
  data): ``Comm.fold(loss)`` adds ``0 * token`` to the loss so the chain reaches it;
- counts the bytes this rank sends (``CommStats``), logically: an all-gather of ``b`` bytes
  per rank sends ``(R - 1) * b`` (ring algorithm), a point-to-point send its payload.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def group_rank_world(group=None) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group`` (``(0, 1)`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, r: int) -> int:
    if group is None or group is dist.group.WORLD:
        return r
    return dist.get_global_rank(group, r)


@dataclass
class CommRecord:
    kind: str  # gla_state | swa_halo | full_kv | cache | moe_load | logits
    layer: int | None
    nbytes: int  # sent by this rank
    direction: str = "fwd"  # fwd | bwd


@dataclass
class CommStats:
    """What this rank sent, collective by collective (see the module docstring for the rule)."""

    records: list[CommRecord] = field(default_factory=list)

    def add(self, kind: str, layer: int | None, nbytes: int, direction: str = "fwd") -> None:
        self.records.append(CommRecord(kind, layer, int(nbytes), direction))

    def by_kind(self, direction: str | None = "fwd") -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            if direction is None or r.direction == direction:
                out[r.kind] += r.nbytes
        return dict(out)

    def by_layer(self, direction: str | None = "fwd") -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in self.records:
            if r.layer is not None and (direction is None or r.direction == direction):
                out[r.layer][r.kind] += r.nbytes
        return {k: dict(v) for k, v in sorted(out.items())}

    def total(self, direction: str | None = "fwd") -> int:
        return sum(self.by_kind(direction).values())

    def clear(self) -> None:
        self.records.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- raw collectives
def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    _, world = group_rank_world(group)
    x = x.contiguous()
    if world == 1:
        return x[None].clone()
    flat = x.reshape(-1)
    out = flat.new_empty(world * flat.numel())  # the concatenation form: every backend takes it
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, flat, group=group)
    return out.view((world,) + tuple(x.shape))


_REDUCE_SCATTER_OK: dict = {}


def _reduce_scatter_sum(g: torch.Tensor, group) -> torch.Tensor:
    """``g [R, *shape]`` on every rank -> ``sum over ranks of g[rank]``."""
    rank, world = group_rank_world(group)
    if world == 1:
        return g[0].clone()
    g = g.contiguous()
    shape = g.shape[1:]
    g = g.reshape(-1)
    out = g.new_empty(g.numel() // world)
    backend = dist.get_backend(group)
    if _REDUCE_SCATTER_OK.get(backend, True):
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:
            fn(out, g, op=dist.ReduceOp.SUM, group=group)
            return out.view(shape)
        except (RuntimeError, NotImplementedError):  # old gloo: no reduce-scatter (fails before sending)
            _REDUCE_SCATTER_OK[backend] = False
    dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
    return g.view((world,) + tuple(shape))[rank].clone()


def _shift(x: torch.Tensor, recv: torch.Tensor | None, group, forward: bool, offset: int = 1) -> None:
    """``forward``: send ``x`` to rank+offset, receive ``recv`` from rank-offset; else the
    reverse. Ranks without a partner at that distance skip that half."""
    rank, world = group_rank_world(group)
    if world == 1:
        return
    dst, src = (rank + offset, rank - offset) if forward else (rank - offset, rank + offset)
    reqs = []  # zero-length messages are skipped on both ends (both know the lengths)
    if 0 <= dst < world and x.numel():
        reqs.append(dist.isend(x.contiguous(), _global(group, dst), group=group))
    if 0 <= src < world and recv is not None and recv.numel():
        reqs.append(dist.irecv(recv, _global(group, src), group=group))
    for r in reqs:
        r.wait()


# --------------------------------------------------------------------------- autograd functions
class _AllGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, comm):
        ctx.comm = comm
        return _all_gather(x, comm.group), token.clone()

    @staticmethod
    def backward(ctx, g, g_token):
        comm = ctx.comm
        comm.stats.add("grad", None, (comm.world - 1) * _nbytes(g[0]), "bwd")
        return _reduce_scatter_sum(g, comm.group), g_token, None


class _ShiftFn(torch.autograd.Function):
    """Forward: rank r sends ``x`` to r+k and returns what r-k sent (zeros of ``recv_shape``
    where there is no rank r-k). Backward: the reverse."""

    @staticmethod
    def forward(ctx, x, token, comm, recv_shape, k):
        ctx.comm, ctx.k = comm, k
        ctx.x_shape = x.shape
        y = x.new_zeros(recv_shape)
        _shift(x, y if comm.rank >= k else None, comm.group, forward=True, offset=k)
        return y, token.clone()

    @staticmethod
    def backward(ctx, gy, g_token):
        comm, k = ctx.comm, ctx.k
        gx = gy.new_zeros(ctx.x_shape)
        if comm.rank >= k and gy.numel():
            comm.stats.add("grad", None, _nbytes(gy), "bwd")
        _shift(gy, gx if comm.rank + k < comm.world else None, comm.group, forward=False, offset=k)
        return gx, g_token, None, None, None


class Comm:
    """The collectives of one context-parallel forward on ``group`` (see the module docstring)."""

    def __init__(self, group=None, stats: CommStats | None = None) -> None:
        self.group = group
        self.rank, self.world = group_rank_world(group)
        self.stats = stats if stats is not None else CommStats()
        self.token = torch.zeros((), requires_grad=torch.is_grad_enabled())

    def _tracked(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.token.requires_grad)

    def all_gather(self, x: torch.Tensor, kind: str, layer: int | None = None) -> torch.Tensor:
        """``x`` (same shape on every rank) -> ``[R, *x.shape]``; gradients are summed back."""
        self.stats.add(kind, layer, (self.world - 1) * _nbytes(x))
        if not self._tracked(x):
            return _all_gather(x, self.group)
        out, self.token = _AllGatherFn.apply(x, self.token, self)
        return out

    def shift(self, x: torch.Tensor, k: int, recv_shape, kind: str, layer: int | None = None) -> torch.Tensor:
        """Send ``x`` to rank + k; return what rank - k sent, shaped ``recv_shape`` (zeros on
        ranks < k). Empty tensors are not sent (both ends must know the shapes)."""
        if self.rank + k < self.world and x.numel():
            self.stats.add(kind, layer, _nbytes(x))
        if self.world == 1:
            return x.new_zeros(recv_shape)
        if not self._tracked(x):
            y = x.new_zeros(recv_shape)
            _shift(x, y if self.rank >= k else None, self.group, forward=True, offset=k)
            return y
        y, self.token = _ShiftFn.apply(x, self.token, self, tuple(recv_shape), k)
        return y

    def shift_next(self, x: torch.Tensor, recv_len: int, kind: str, layer: int | None = None) -> torch.Tensor:
        """Send ``x`` to the next rank; return the previous rank's ``x``, which has ``recv_len``
        entries along dim -2 (and ``x``'s other dims). Rank 0 gets a zero-length tensor; the
        last rank's ``x`` is not sent."""
        shape = list(x.shape)
        shape[-2] = recv_len if self.rank > 0 else 0
        return self.shift(x, 1, shape, kind, layer)

    def all_reduce_(self, x: torch.Tensor, kind: str, layer: int | None = None) -> torch.Tensor:
        """In-place sum over ranks, no gradient (counts, statistics)."""
        self.stats.add(kind, layer, 2 * (self.world - 1) * _nbytes(x) // max(self.world, 1))
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def broadcast_(self, x: torch.Tensor, src: int, kind: str) -> torch.Tensor:
        """In place: ``x`` from group rank ``src`` to every rank, no gradient."""
        if self.rank == src:
            self.stats.add(kind, None, (self.world - 1) * _nbytes(x))
        if self.world > 1:
            dist.broadcast(x, _global(self.group, src), group=self.group)
        return x

    def fold(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss + 0 * token``: puts every collective of this forward in the backward graph."""
        if self.token.requires_grad and torch.is_grad_enabled():
            return loss + self.token.to(loss.dtype) * 0
        return loss
