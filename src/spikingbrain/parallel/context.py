"""Context (sequence) parallelism: one long sequence split over the ranks of a process group.

The ``T`` tokens of a batch are cut into ``R`` contiguous shards, one per rank of ``group``
(``shard_bounds``: the first ``T % R`` ranks get one token more; ``T >= R``). Every rank runs the
whole model on its own shard; the mixers exchange only what crosses shard boundaries:

- **GLA** (and the linear branch of the hybrids). Rank ``r`` runs the chunked GLA on its shard
  from a zero state, which gives its local outputs ``o_loc``, its local final state
  ``S_r = sum_t (k_t * exp(G_end - G_t))^T v_t`` and its total decay ``D_r = exp(G_end)``
  (``G`` the cumulative log gate inside the shard; ``D_r = 0`` if a packed document starts in
  the shard). The exclusive prefix scan ``P_0 = 0``, ``P_{j+1} = D_j * P_j + S_j`` gives the
  state ``P_r`` entering shard ``r`` (and ``P_R``, the final state of the sequence). Two ways
  (``scan=``): ``"allgather"``, one all-gather of ``[S_r | D_r]`` (``[B, H, K, V + 1]`` fp32)
  after which every rank scans the ``R`` pairs, ``(R - 1)`` states sent per rank; ``"p2p"``, a
  Hillis-Steele scan of ``ceil(log2 R)`` point-to-point rounds plus one shift,
  ``ceil(log2 R) + 1`` states sent per rank (``"auto"``: all-gather up to 4 ranks, p2p
  beyond). The local outputs are then corrected: ``o_t += scale * (q_t * exp(G_t)) @ P_r`` for
  the tokens before the shard's first document start (every exponent ``<= 0``: stable).
  Communication per layer is independent of ``T``.
- **SWA** (window ``w``): the first queries of a shard need the keys/values before it that
  their window reaches (the *halo*): ``w - 1`` tokens, fewer after a document start, more
  when padding inside the sequence stretches the window (``_Run.halo_lengths``, computed
  from the global positions). When every shard holds the whole halo of the next one, rank
  ``r`` sends the tail of its post-RoPE keys/values to rank ``r + 1`` (one point-to-point
  exchange, ``halo="p2p"``). Otherwise (shards shorter than the window) every rank contributes
  its last ``min(halo, n_r)`` tokens to one all-gather and assembles its halo from as many
  earlier ranks as it takes (``halo="allgather"``). ``halo="auto"`` picks p2p when possible.
- **Full attention** (``full``, ``gla+full``): all-gather of every rank's keys/values (padded
  to the longest shard); rank ``r`` attends over ranks ``0..r``'s keys.
- **Sink tokens** are a separate short sequence every rank computes itself (their parameters
  are replicated); **MoE** and dense FFNs, norms, embeddings and the LM head are token-local.

Positions, padding (``attention_mask``) and packed-document boundaries (``position_ids`` that
restart) are computed once from the *global* ``[B, T]`` inputs, which every rank is given (token
ids are cheap; each rank embeds only its shard), exactly as ``SpikingBrainModel.forward`` does.

Gradients: every exchange is an autograd function with the adjoint collective as backward
(``comm.py``), so ``loss.backward()`` run on every rank gives on rank ``r`` the gradient of the
sum of all ranks' losses with respect to the parameters *as used by rank r's shard*; the full
gradient is the sum over ranks (``all_reduce`` over the group, or DDP's average over a
data x context mesh with the loss scaled by the world size, as ``train/loop.py`` does).

How the model is driven: for the duration of a call, the model's mixers get per-instance
replacements of the methods ``GatedLinearAttention.linear_attention``, ``SoftmaxAttention.attend``
and ``ParallelHybrid.branches`` (and ``MoE.route`` to collect the router scores for the exact
auxiliary loss); then the model's own ``forward`` runs on the shard. Nothing else in the model
changes, and the originals are restored on exit.

Entry points (call them on every rank of ``group``, with the same global inputs):

- ``context_parallel_prefill``: logits and the decode state (``SpikingBrainCache``) equal to a
  single-process prefill, on one rank or all, so generation continues on one rank;
- ``context_parallel_loss``: the training hook, cross-entropy (+ KL, + MoE aux) of a sharded
  batch;
- ``context_parallel_forward``: the common core.

Not supported: continuing from a non-empty cache (prefill starts from an empty state),
gradient checkpointing (its backward recomputation would run outside the replacement).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spikingbrain.cache import SpikingBrainCache, ring_entries
from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.attention import SoftmaxAttention
from spikingbrain.layers.context import document_starts
from spikingbrain.layers.gla import GatedLinearAttention
from spikingbrain.layers.hybrid import ParallelHybrid
from spikingbrain.layers.moe import MoE
from spikingbrain.layers.rope import apply_rope
from spikingbrain.ops.gla import gla
from spikingbrain.ops.sliding_window import windowed_attention
from spikingbrain.parallel.comm import Comm, CommStats

IGNORE = -100
HALO_MODES = ("auto", "p2p", "allgather")
SCAN_MODES = ("auto", "p2p", "allgather")


def shard_bounds(seq_len: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` of each rank; the first ``seq_len % world`` ranks get one
    token more than the others."""
    if world < 1:
        raise SpikingBrainError(f"context parallelism needs world size >= 1, got {world}")
    if seq_len < world:
        raise SpikingBrainError(
            f"context parallelism: sequence of {seq_len} tokens is shorter than the {world} ranks"
        )
    base, extra = divmod(seq_len, world)
    bounds, s = [], 0
    for r in range(world):
        n = base + (r < extra)
        bounds.append((s, s + n))
        s += n
    return bounds


@dataclass
class SequenceMeta:
    """Global per-token facts ``[B, T]`` (``None``: all valid / no document boundary)."""

    positions: torch.Tensor
    valid: torch.Tensor | None
    reset: torch.Tensor | None
    seg: torch.Tensor | None


def sequence_metadata(B: int, T: int, device, attention_mask=None, position_ids=None) -> SequenceMeta:
    """Positions, padding and packed-document boundaries, as ``SpikingBrainModel.forward``
    derives them from ``attention_mask`` / ``position_ids`` for a fresh (cache-less) forward."""
    valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise SpikingBrainError(
                f"attention_mask must be [batch, >= seq_len] = [{B}, >= {T}], got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask[:, -T:].to(device).bool()
        if bool(valid.all()):
            valid = None
    reset = seg = None
    if position_ids is not None:
        position_ids = position_ids.to(device)
        if position_ids.shape != (B, T):
            if position_ids.shape[-1] != T:
                raise SpikingBrainError(f"position_ids must be [batch, seq_len] = [{B}, {T}]")
            position_ids = position_ids.expand(B, T)
        position_ids = position_ids.long()
        reset = document_starts(position_ids, valid)
        if reset is not None:
            seg = reset.long().cumsum(1)
    elif valid is not None:
        position_ids = valid.long().cumsum(1) - valid.long()
    else:
        position_ids = torch.arange(T, device=device)[None].expand(B, T)
    return SequenceMeta(position_ids.long(), valid, reset, seg)


# --------------------------------------------------------------------------- one forward
class _Run:
    """The state of one context-parallel forward on this rank."""

    def __init__(self, comm: Comm, meta: SequenceMeta, bounds, halo: str, collect: bool, scan: str = "auto") -> None:
        self.comm = comm
        self.meta = meta
        self.bounds = bounds
        self.rank, self.world = comm.rank, comm.world
        self.start, self.end = bounds[self.rank]
        self.T = bounds[-1][1]
        self.lengths = [e - s for s, e in bounds]
        if halo not in HALO_MODES:
            raise SpikingBrainError(f"halo must be one of {HALO_MODES}, got {halo!r}")
        self.halo_mode = halo
        if scan not in SCAN_MODES:
            raise SpikingBrainError(f"scan must be one of {SCAN_MODES}, got {scan!r}")
        self.scan_mode = scan
        self.collect = collect
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self.sink_pass = False  # True while the model runs its sink tokens (not sharded)
        self.routes: dict[MoE, tuple] = {}
        self._halo_cache: dict[int, list[int]] = {}

    def loc(self, t):
        return None if t is None else t[:, self.start:self.end]

    def span(self, t, lo: int):
        return None if t is None else t[:, lo:self.end]

    def record(self, layer: int, **tensors) -> None:
        if self.collect:
            self.records.setdefault(layer, {}).update(tensors)

    # ------------------------------------------------------------------ exchanges
    def state_scan(self, s_loc: torch.Tensor, decay: torch.Tensor, layer: int):
        """``(state entering this shard, final state of the sequence or None)`` from every
        rank's local final state ``s_loc [B, H, K, V]`` and total decay ``decay [B, H, K, 1]``.

        The pairs compose as ``(D_a, S_a) then (D_b, S_b) = (D_a D_b, D_b S_a + S_b)``.
        ``allgather``: one all-gather of ``[S | D]``, then every rank scans all ``R`` pairs.
        ``p2p``: a Hillis-Steele scan, ``ceil(log2 R)`` shifts by 1, 2, 4, ... ranks (each rank
        sends one state per round) plus one shift by 1 to make the scan exclusive: fewer bytes
        than the all-gather's ``R - 1`` states once ``R > 4``. The final state (decode cache
        only) is the last rank's inclusive prefix, broadcast."""
        mode = self.scan_mode
        if mode == "auto":
            mode = "allgather" if self.world <= 4 else "p2p"
        if self.world == 1:
            return torch.zeros_like(s_loc), (s_loc if self.collect else None)
        pkt = torch.cat([s_loc, decay], -1)
        if mode == "allgather":
            got = self.comm.all_gather(pkt, "gla_state", layer)
            S, D = got[..., :-1], got[..., -1:]
            prefix = [torch.zeros_like(s_loc)]
            for j in range(self.world):
                prefix.append(D[j] * prefix[-1] + S[j])
            return prefix[self.rank], prefix[-1]
        S, D = s_loc, decay
        k = 1
        while k < self.world:
            got = self.comm.shift(torch.cat([S, D], -1), k, pkt.shape, "gla_state", layer)
            if self.rank >= k:  # (earlier prefix) then (my span so far)
                S = D * got[..., :-1] + S
                D = D * got[..., -1:]
            k *= 2
        s_prev = self.comm.shift(S, 1, S.shape, "gla_state", layer)  # rank 0: zeros
        final = None
        if self.collect:
            final = S.detach().clone()
            self.comm.broadcast_(final, self.world - 1, "cache")
        return s_prev, final

    def halo_lengths(self, window: int) -> list[int]:
        """Per rank, how many tokens before its shard its queries can see with a window of
        ``window`` *positions*: ``window - 1`` normally; fewer after a document start; more
        when padding inside the sequence (which takes no position) stretches the window over
        more tokens. Computed from the global metadata: the same on every rank. The shard's
        first real query reaches furthest back (positions only grow inside a document, and
        padding's position ids are ignored)."""
        if window not in self._halo_cache:
            meta, idx = self.meta, torch.arange(self.T, device=self.meta.positions.device)
            out = []
            for s, _ in self.bounds:
                if s == 0:
                    out.append(0)
                    continue
                q = torch.full_like(meta.positions[:, :1], s)  # [B, 1]: the first real query from s on
                if meta.valid is not None:
                    later = meta.valid & (idx[None] >= s)
                    q = torch.where(later.any(1), later.int().argmax(1), self.T)[:, None]
                has_q = q < self.T
                qc = q.clamp(max=self.T - 1)
                pos = meta.positions
                seen = has_q & (idx[None] < s) & (pos > pos.gather(1, qc) - window)
                if meta.seg is not None:
                    seen = seen & (meta.seg == meta.seg.gather(1, qc))
                if meta.valid is not None:
                    seen = seen & meta.valid
                first = torch.where(seen.any(1), seen.int().argmax(1), torch.full_like(idx[:1], s))
                out.append(int(s - first.min()))
            self._halo_cache[window] = out
        return self._halo_cache[window]

    def _halo_mode(self, lens: list[int]) -> str:
        p2p_ok = all(lens[r + 1] <= self.lengths[r] for r in range(self.world - 1))
        if self.halo_mode == "p2p" and not p2p_ok:
            raise SpikingBrainError(
                f"halo='p2p' needs every shard to hold the halo of the next one; halos {lens}, "
                f"shards {self.lengths}"
            )
        if self.halo_mode == "auto":
            return "p2p" if p2p_ok else "allgather"
        return self.halo_mode

    def halo(self, kv: torch.Tensor, window: int, layer: int) -> torch.Tensor:
        """The keys/values before this shard that its queries can see (``halo_lengths``):
        ``kv [B, Hkv, n, X]`` -> ``[B, Hkv, halo, X]``."""
        lens = self.halo_lengths(window)
        if self.world == 1 or max(lens) == 0:
            return kv[:, :, :0]
        n, need = self.lengths[self.rank], lens[self.rank]
        if self._halo_mode(lens) == "p2p":
            send = lens[self.rank + 1] if self.rank < self.world - 1 else 0
            return self.comm.shift_next(kv[:, :, n - send:], need, "swa_halo", layer)
        H = max(lens)
        M = min(H, max(self.lengths))
        m = min(H, n)
        tail = F.pad(kv[:, :, n - m:], (0, 0, M - m, 0))  # real tokens at the end
        got = self.comm.all_gather(tail, "swa_halo", layer)
        pieces = [got[j][:, :, M - min(H, self.lengths[j]):] for j in range(self.rank)]
        if not pieces or need == 0:
            return kv[:, :, :0]
        return torch.cat(pieces, 2)[:, :, -need:]

    def previous(self, kv: torch.Tensor, layer: int) -> torch.Tensor:
        """Every earlier rank's tokens (full attention): ``[B, Hkv, start, X]``."""
        if self.world == 1:
            return kv[:, :, :0]
        M = max(self.lengths)
        got = self.comm.all_gather(F.pad(kv, (0, 0, 0, M - kv.shape[2])), "full_kv", layer)
        pieces = [got[j][:, :, :self.lengths[j]] for j in range(self.rank)]
        return torch.cat(pieces, 2) if pieces else kv[:, :, :0]

    def last_tokens(self, kv: torch.Tensor, need: int, layer: int) -> torch.Tensor:
        """The last ``need`` tokens of the whole sequence, on every rank (no gradient)."""
        lo = self.T - need
        own = [max(0, e - max(s, lo)) for s, e in self.bounds]
        M = max(own)
        m = own[self.rank]
        mine = kv[:, :, kv.shape[2] - m:]
        got = self.comm.all_gather(F.pad(mine, (0, 0, 0, M - m)), "cache", layer)
        return torch.cat([got[j][:, :, :own[j]] for j in range(self.world)], 2)


# --------------------------------------------------------------------------- mixers
def _linear_attention(run: _Run, mod: GatedLinearAttention, original, x, zq, zk, v, ctx, cache=None):
    """``GatedLinearAttention.linear_attention`` on a shard: local GLA from a zero state, the
    state scan over ranks, and the correction of the local outputs (module docstring).

    The features (feature map, gate, padding masks, head repetition) repeat the layer's own
    computation step for step; ``tests/parallel/test_context_parallel_single.py`` runs this
    path on a group of one against the layer, so a change there that is not mirrored here
    fails a test."""
    if run.sink_pass or cache is not None:
        return original(x, zq, zk, v, ctx, cache)
    # --- features: as GatedLinearAttention.linear_attention computes them
    q, k = mod._phi(zq), mod._phi(zk)
    B, T = x.shape[:2]
    if mod.gate == "lowrank":
        g = F.logsigmoid(mod.gk_proj(x).float()).view(B, T, mod.num_kv_heads, mod.head_dim)
        g = g / mod.gate_normalizer
    else:
        g = F.logsigmoid(-zk.float())
    valid = run.loc(run.meta.valid)
    if valid is not None:  # padding leaves the state untouched: k = v = 0, no decay (g = 0)
        m = valid[:, :, None, None].to(k.dtype)
        k, v = k * m, v * m
        g = g * m.to(g.dtype)
    rep = mod.num_heads // mod.num_kv_heads
    if rep > 1:
        k, v, g = (t.repeat_interleave(rep, dim=2) for t in (k, v, g))
    reset = run.loc(run.meta.reset)
    scale = mod.head_dim**-0.5
    o, s_loc = gla(q, k, v, g, scale=scale, initial_state=None, output_final_state=True,
                   mode=ctx.gla_mode, reset=reset, chunk_size=mod.chunk_size)
    # --- state scan over the ranks
    dt = s_loc.dtype
    G = g.to(dt).cumsum(1)  # [B, T, H, K], inclusive
    decay = G[:, -1].exp()  # [B, H, K]
    if reset is not None:
        decay = decay * (~reset.any(1)).to(dt)[:, None, None]
    s_prev, final = run.state_scan(s_loc, decay[..., None], mod.layer_idx)
    run.record(mod.layer_idx, state=final)
    # --- correction of the local outputs by the incoming state
    q_in = q.to(dt) * G.exp() * scale
    if reset is not None:
        q_in = q_in * (reset.long().cumsum(1) == 0).to(dt)[:, :, None, None]
    o = (o.to(dt) + torch.einsum("bthk,bhkv->bthv", q_in, s_prev)).to(v.dtype)
    return mod.o_norm(o).to(x.dtype)


def _softmax_attend(run: _Run, layer: int, q, k, v, ctx, window, sink_kv, kv_quantizer, q_quantizer=None):
    """``layers.attention.softmax_attend`` on a shard (no cache): halo or all-gathered keys."""
    q = apply_rope(q, ctx.cos, ctx.sin)
    k = apply_rope(k, ctx.cos, ctx.sin)
    if kv_quantizer is not None:
        k, v = kv_quantizer(k, v)
    if q_quantizer is not None:
        q = q_quantizer(q)
    run.record(layer, k=k, v=v)
    D = k.shape[-1]
    kv = torch.cat([k, v.to(k.dtype)], -1)
    past = run.previous(kv, layer) if window is None else run.halo(kv, window, layer)
    lo = run.start - past.shape[2]
    if past.shape[2]:
        kv = torch.cat([past, kv], 2)
    k_all, v_all = kv[..., :D], kv[..., D:].to(v.dtype)
    meta = run.meta
    sink_k, sink_v = sink_kv if sink_kv is not None else (None, None)
    return windowed_attention(
        q, k_all, v_all, q_pos=run.loc(meta.positions), k_pos=run.span(meta.positions, lo), window=window,
        k_valid=run.span(meta.valid, lo), q_seg=run.loc(meta.seg), k_seg=run.span(meta.seg, lo),
        sink_k=sink_k, sink_v=sink_v,
    )


def _attend(run: _Run, mod: SoftmaxAttention, original, q, k, v, ctx, cache=None, sink_kv=None):
    if run.sink_pass or cache is not None:
        return original(q, k, v, ctx, cache, sink_kv)
    return _softmax_attend(run, mod.layer_idx, q, k, v, ctx, mod.window, sink_kv, mod.kv_quantizer, mod.q_quantizer)


def _branches(run: _Run, mod: ParallelHybrid, original, x, ctx, cache=None, sink_kv=None):
    """``ParallelHybrid.branches`` on a shard."""
    if run.sink_pass or cache is not None:
        return original(x, ctx, cache, sink_kv)
    zq, zk, v = mod.shaped_qkv(mod, x)
    lq, lk, lv = mod.linear_inputs(x, zq, zk, v)
    o_lin = mod.gla.linear_attention(x, lq, lk, lv, ctx, None)  # the replaced method
    o_soft = _softmax_attend(run, mod.layer_idx, zq.transpose(1, 2), zk.transpose(1, 2), v.transpose(1, 2),
                             ctx, mod.window, sink_kv, mod.kv_quantizer, mod.q_quantizer).transpose(1, 2)
    return o_lin, mod.attn_norm(o_soft)


def _route(run: _Run, mod: MoE, original, h):
    out = original(h)
    if not run.sink_pass:
        run.routes[mod] = out
    return out


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if type(model).__name__ == "DistributedDataParallel":
        model = model.module
    return model


@contextlib.contextmanager
def _installed(model, run: _Run):
    """Replace the mixers' methods (and MoE.route) on the instances for the duration."""
    lm = _unwrap(model)
    base = getattr(lm, "model", lm)
    if getattr(base, "gradient_checkpointing", False) and base.training and torch.is_grad_enabled():
        raise SpikingBrainError("context parallelism does not support gradient checkpointing "
                                "(the backward recomputation would run unsharded)")
    patched = []

    def patch(obj, name, fn):
        original = getattr(obj, name)
        patched.append((obj, name, obj.__dict__.get(name)))
        obj.__dict__[name] = lambda *a, **kw: fn(run, obj, original, *a, **kw)

    for m in lm.modules():
        if isinstance(m, GatedLinearAttention):
            patch(m, "linear_attention", _linear_attention)
        elif isinstance(m, SoftmaxAttention):
            patch(m, "attend", _attend)
        elif isinstance(m, ParallelHybrid):
            patch(m, "branches", _branches)
        elif isinstance(m, MoE):
            patch(m, "route", _route)
    sinks = getattr(base, "compute_sink_kv", None)
    if sinks is not None:
        def sink_kv():
            run.sink_pass = True
            try:
                return sinks()
            finally:
                run.sink_pass = False
        patched.append((base, "compute_sink_kv", base.__dict__.get("compute_sink_kv")))
        base.__dict__["compute_sink_kv"] = sink_kv
    try:
        yield
    finally:
        for obj, name, before in reversed(patched):
            if before is None:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = before


# --------------------------------------------------------------------------- entry points
@dataclass
class ContextParallelOutput:
    """What one rank gets back.

    logits: this rank's shard ``[B, end - start, V]`` (``logits="local"``), or None.
    last_logits: the logits of the sequence's last token ``[B, V]``, on every rank
        (``logits="last"``), or None.
    cache: the decode state of the whole sequence (prefill with ``cache_rank`` this rank or None).
    start, end: this rank's shard. stats: bytes this rank sent.
    comm, run: internal (``context_parallel_loss`` uses them).
    """

    logits: torch.Tensor | None
    last_logits: torch.Tensor | None
    cache: SpikingBrainCache | None
    start: int
    end: int
    stats: CommStats
    comm: Comm = field(repr=False, default=None)
    run: _Run = field(repr=False, default=None)

    def fold(self, loss: torch.Tensor) -> torch.Tensor:
        """For a loss built from ``logits`` by hand: ``loss + 0 * chain token``, which keeps every
        exchange of the forward in every rank's backward pass (see ``comm.py``). Backpropagate
        the returned tensor on every rank of the group."""
        return self.comm.fold(loss)


def context_parallel_forward(model, input_ids: torch.Tensor, *, attention_mask=None, position_ids=None,
                             group=None, logits: str = "local", collect_cache: bool = False,
                             cache_rank: int | None = None, halo: str = "auto", scan: str = "auto",
                             stats: CommStats | None = None) -> ContextParallelOutput:
    """Run ``model`` (a ``SpikingBrainForCausalLM``, possibly DDP-wrapped) on this rank's shard
    of the global ``input_ids [B, T]`` (module docstring). ``logits``: ``"local"`` (this
    shard's), ``"last"`` (the last token's, broadcast to every rank) or ``"none"``.
    ``collect_cache``: also assemble the decode state, on group rank ``cache_rank`` (None:
    every rank). Call on every rank of ``group`` with the same arguments. To train through a
    loss of your own, backpropagate ``out.fold(loss)`` (``context_parallel_loss`` does)."""
    if logits not in ("local", "last", "none"):
        raise SpikingBrainError(f"logits must be local | last | none, got {logits!r}")
    if input_ids.dim() != 2:
        raise SpikingBrainError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    lm = _unwrap(model)
    device = lm.lm_head.weight.device if hasattr(lm, "lm_head") else input_ids.device
    B, T = input_ids.shape
    comm = Comm(group, stats)
    bounds = shard_bounds(T, comm.world)
    meta = sequence_metadata(B, T, device, attention_mask, position_ids)
    run = _Run(comm, meta, bounds, halo, collect_cache, scan)
    s, e = run.start, run.end
    ids = input_ids[:, s:e].to(device)
    mask = None if attention_mask is None else attention_mask[:, -T:][:, s:e].to(device)
    keep = 0 if logits == "local" else 1
    # dynamic / longrope RoPE: the frequencies follow the whole sequence's length, not the shard's
    with _installed(model, run), lm.model.rotary_emb.sequence_length(int(meta.positions.max()) + 1):
        out = model(input_ids=ids, attention_mask=mask, position_ids=run.loc(meta.positions).contiguous(),
                    use_cache=False, logits_to_keep=keep)
    local = last = None
    if logits == "local":
        local = out.logits
    elif logits == "last":
        last = out.logits[:, -1].detach().clone()
        comm.broadcast_(last, comm.world - 1, "logits")
    cache = None
    if collect_cache:
        cache = _build_cache(lm, run)
        if cache_rank is not None and comm.rank != cache_rank:
            cache = None
    return ContextParallelOutput(local, last, cache, s, e, comm.stats, comm, run)


@torch.no_grad()
def _build_cache(lm, run: _Run) -> SpikingBrainCache:
    """The decode state a single-process prefill of the whole sequence leaves (every rank takes
    part in the collectives; layers in order)."""
    config = lm.config
    meta, T = run.meta, run.T
    B = meta.positions.shape[0]
    device = meta.positions.device
    cache = SpikingBrainCache(config)
    sinks = lm.model.compute_sink_kv() if getattr(lm.model, "sink_tokens", None) is not None else None
    valid = meta.valid if meta.valid is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    keep = valid if meta.seg is None else valid & (meta.seg == meta.seg[:, -1:])  # the last document's real tokens
    for i, lc in enumerate(cache.layers):
        rec = run.records.get(i, {})
        if lc.linear is not None:
            lc.linear.set_state(rec["state"])
        if lc.kv is not None:
            lo = 0
            if lc.kv.window is not None:  # gather from the first token the ring stores on
                stored = ring_entries(meta.positions, keep, lc.kv.window)
                first = torch.where(stored.any(1), stored.int().argmax(1), T)
                lo = min(int(first.min()), T - 1)
            k, v = rec["k"], rec["v"]
            D = k.shape[-1]
            kv = run.last_tokens(torch.cat([k, v.to(k.dtype)], -1), T - lo, i)
            lc.kv.append(kv[..., :D], kv[..., D:].to(v.dtype), meta.positions[:, lo:], keep[:, lo:])
        if sinks is not None:
            lc.sink_kv = sinks[i]
    if sinks is not None:
        cache._sinks_ready = True
    cache.stream_len = torch.zeros(B, dtype=torch.long, device=device)
    cache.next_pos = torch.zeros(B, dtype=torch.long, device=device)
    cache.advance(meta.positions, valid)
    return cache


@torch.no_grad()
def context_parallel_prefill(model, input_ids: torch.Tensor, *, attention_mask=None, position_ids=None,
                             group=None, cache_rank: int | None = 0, logits: str = "last", halo: str = "auto",
                             scan: str = "auto", stats: CommStats | None = None) -> ContextParallelOutput:
    """Prefill the prompt ``input_ids [B, T]`` (the same on every rank of ``group``) with the
    sequence split over the ranks. Returns (``ContextParallelOutput``) the last token's logits
    on every rank and the ``SpikingBrainCache`` of the whole prompt on group rank
    ``cache_rank`` (None: on every rank), equal to what ``model(input_ids, attention_mask=...,
    position_ids=..., use_cache=True)`` leaves on one process (any padding; packed documents
    through ``position_ids``); generation then continues on that rank with
    ``model(next_ids, cache=out.cache)`` or ``model.generate``.

    From ``torchrun`` (``dist.init_process_group`` done)::

        out = context_parallel_prefill(model, ids)
        if dist.get_rank() == 0:
            gen = model.generate(ids, cache=out.cache, max_new_tokens=64)
    """
    was = _unwrap(model).training
    _unwrap(model).eval()
    try:
        return context_parallel_forward(model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        group=group, logits=logits, collect_cache=True, cache_rank=cache_rank,
                                        halo=halo, scan=scan, stats=stats)
    finally:
        _unwrap(model).train(was)


@dataclass
class ContextParallelLoss:
    """This rank's share of a sharded batch's objective.

    ce_sum: cross-entropy summed over this shard's targets (fp32 scalar; carries the
        collectives' chain, so build the loss from it). kl_sum: the same for KL distillation
        (0 without teacher logits). n: this shard's targets. n_total: targets of the whole
        batch (every rank). aux: this rank's share of the MoE auxiliary loss: summed over the
        ranks it equals the auxiliary loss of the whole sequence, gradient included (None
        without MoE layers). logits: this shard's logits.

    The objective of the whole batch, ``sum_t CE / n_total + aux`` (what the unsharded model's
    ``loss`` is), is the sum over ranks of ``ce_sum / n_total + aux``: backpropagate that on
    every rank and sum (all-reduce) the parameter gradients over the group.
    """

    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    n: torch.Tensor
    n_total: int
    aux: torch.Tensor | None
    logits: torch.Tensor
    start: int
    end: int
    stats: CommStats

    @property
    def loss(self) -> torch.Tensor:
        """This rank's term of the batch objective (sum it over the ranks)."""
        out = self.ce_sum / max(self.n_total, 1)
        return out + self.aux if self.aux is not None else out


def shard_targets(labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The targets of positions ``start..end-1`` under the HF shift (position ``t`` predicts
    ``labels[t + 1]``): ``labels[:, start+1:end+1]``, -100 past the end."""
    tgt = labels[:, start + 1:end + 1]
    short = (end - start) - tgt.shape[1]
    if short:
        tgt = F.pad(tgt, (0, short), value=IGNORE)
    return tgt


def context_parallel_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, *, position_ids=None,
                          attention_mask=None, group=None, teacher_logits: torch.Tensor | None = None,
                          kl_temperature: float = 1.0, halo: str = "auto", scan: str = "auto",
                          stats: CommStats | None = None) -> ContextParallelLoss:
    """The training hook: this rank's share of the objective of the global batch
    ``input_ids / labels [B, T]`` (the same on every rank of ``group``; labels unshifted, HF
    convention, -100 ignored). ``teacher_logits``: the teacher's logits for *this rank's shard*
    ``[B, end - start, V']`` (KL distillation, as ``train/objective.py`` defines it).
    See ``ContextParallelLoss`` for how the ranks' shares add up."""
    out = context_parallel_forward(model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   group=group, logits="local", halo=halo, scan=scan, stats=stats)
    comm, run = out.comm, out.run
    tgt = shard_targets(labels.to(out.logits.device), out.start, out.end)
    mask = tgt != IGNORE
    z = out.logits[mask].float()
    y = tgt[mask]
    ce = F.cross_entropy(z, y, reduction="sum") if y.numel() else z.sum() * 0.0
    kl = z.new_zeros(())
    if teacher_logits is not None:
        from spikingbrain.train.objective import distill_kl  # lazy: train/ imports the trainer

        kl = distill_kl(z, teacher_logits[mask], kl_temperature)
    aux = _moe_aux(run)
    n_total = int((labels[:, 1:] != IGNORE).sum())
    return ContextParallelLoss(comm.fold(ce), kl, mask.sum(), n_total, aux, out.logits, out.start, out.end,
                               comm.stats)


def _moe_aux(run: _Run) -> torch.Tensor | None:
    """Each MoE layer's auxiliary loss over the *whole* sequence, as this rank's additive share.

    The load-balancing term ``c * N * sum_e f_e * P_e`` needs the global assignment shares
    ``f_e`` (counts: summed over the ranks, no gradient) while ``P_e`` is a mean over tokens,
    hence a sum of per-rank sums: with ``n`` local and ``n_g`` global tokens, this rank's share
    is ``MoE.aux_loss(local logits, local scores, load_g * n / n_g) * n / n_g`` (the z-loss, a
    mean over tokens, splits the same way)."""
    mods = [m for m in run.routes]
    if not mods:
        return None
    counts = torch.cat([torch.cat([m.last_load.double(), m.last_load.new_tensor([run.routes[m][0].shape[0]]).double()])
                        for m in mods])
    run.comm.all_reduce_(counts, "moe_load")
    total = None
    off = 0
    for m in mods:
        logits, scores, _, _ = run.routes[m]
        N = m.num_experts
        load_g, n_g = counts[off:off + N], counts[off + N]
        off += N + 1
        n = logits.shape[0]
        share = n / max(float(n_g), 1.0)
        a = m.aux_loss(logits, scores, (load_g * share).to(scores.dtype)) * share
        total = a if total is None else total + a
    return total
