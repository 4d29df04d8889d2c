"""Mixture-of-experts SwiGLU FFN (the 76B's sparse FFN): routed top-k experts plus shared experts.

Routing, for one token ``x`` (``[d]``) and ``N`` routed experts:

- logits ``z = W_r x`` (``[N]``, ``W_r`` = ``self.router``, an ``nn.Linear`` without bias);
- scores ``p = softmax(z)`` (``router="softmax"``, the 76B) or ``p = sigmoid(z)``
  (``router="sigmoid"``, each expert scored independently);
- the ``k`` experts with the largest scores are chosen; their weights are those scores,
  ``w_i = p_i``, renormalised ``w_i = p_i / sum_{j in top-k} p_j`` only if ``norm_topk_prob``;
- ``y = sum_{s < S} shared_s(x) + sum_{i in top-k} w_i * expert_i(x)``.

Auxiliary loss (``self.last_aux_loss``, coefficients already applied), over the ``n`` tokens of
the last forward:

- Switch-style load balancing ``aux_loss_coef * N * sum_e f_e * P_e`` where
  ``f_e = (#assignments to e) / (n * k)`` (the share of routed slots expert ``e`` received; a
  count, so no gradient flows through it) and ``P_e = mean over tokens of the normalised score``
  (``p_e`` for softmax; ``p_e / sum_j p_j`` for sigmoid, so that ``P`` is a distribution too).
  It equals ``aux_loss_coef`` (its value at perfect balance, ``f = P = 1/N``) for uniform
  routing and ``aux_loss_coef * N`` when every token goes to one expert with probability 1.
- optional router z-loss ``router_z_loss_coef * mean over tokens of logsumexp(z)^2`` (ST-MoE),
  which keeps the router logits small.

Dispatch is capacity-free (no token is dropped): the ``n * k`` (token, expert) assignments are
sorted by expert, the tokens gathered into one contiguous block per expert, each expert run on
its block, and the results scattered back with ``index_add`` weighted by ``w``. Two backends:

- ``"loop"``: a Python loop over the experts that received tokens; each runs its own
  ``nn.Linear`` modules, so spiking/LoRA replacements of the expert projections are honoured.
  Touches only active experts' weights: the right choice for decoding and on CPU.
- ``"grouped"``: three ``torch.nn.functional.grouped_mm`` calls over the stacked expert weights
  (one kernel per projection for all experts; blocks padded to 16 rows, a static upper bound,
  so no host synchronisation). Needs every expert projection to be a bias-free plain
  ``nn.Linear``.
- ``"auto"`` (default): ``grouped`` on CUDA for bf16 when the shapes are 16-byte aligned, the
  projections are plain ``nn.Linear`` and there are at least 16 assignments per expert on
  average; ``loop`` otherwise.

``self.last_load`` (``[N]`` int64, detached) counts the assignments each routed expert received in
the last forward (sums to ``n * k``); ``moe_load(model)`` collects it per layer for logging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.mlp import SwiGLU

ROUTERS = ("softmax", "sigmoid")
DISPATCH = ("auto", "loop", "grouped")
_GROUP_ALIGN = 16  # rows per expert block are padded to this for grouped GEMM kernels
_GROUPED_MIN_ROWS_PER_EXPERT = 16


class SwiGLUExpert(SwiGLU):
    """One expert: the dense SwiGLU ``down(silu(gate(x)) * up(x))`` (same parameter names)."""

    fusable = ()  # the MoE reads the experts' weights directly


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus always-on shared experts (see the module docstring).

    Args:
        hidden_size: ``d``. intermediate_size: width of every expert (routed and shared).
        num_experts: ``N`` routed experts. top_k: ``k`` experts per token.
        num_shared_experts: ``S`` experts every token goes through (weight 1).
        router: ``"softmax"`` or ``"sigmoid"``.
        aux_loss_coef / router_z_loss_coef: coefficients of the two auxiliary losses.
        norm_topk_prob: renormalise the top-k weights to sum to 1.
        dispatch: ``"auto"``, ``"loop"`` or ``"grouped"``.

    Forward: ``x`` ``[..., d]`` -> ``[..., d]``; sets ``last_aux_loss`` (scalar float32 tensor) and
    ``last_load`` (``[N]`` int64).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int = 1,
        num_shared_experts: int = 0,
        router: str = "softmax",
        aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        norm_topk_prob: bool = False,
        hidden_act: str = "silu",
        dispatch: str = "auto",
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise SpikingBrainError(f"MoE needs num_experts >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise SpikingBrainError(f"MoE top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if num_shared_experts < 0:
            raise SpikingBrainError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
        if router not in ROUTERS:
            raise SpikingBrainError(f"router must be one of {ROUTERS}, got {router!r}")
        if dispatch not in DISPATCH:
            raise SpikingBrainError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_type = router
        self.aux_loss_coef = aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.norm_topk_prob = norm_topk_prob
        self.dispatch = dispatch
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLUExpert(hidden_size, intermediate_size, hidden_act) for _ in range(num_experts)
        )
        self.shared_experts = nn.ModuleList(
            SwiGLUExpert(hidden_size, intermediate_size, hidden_act) for _ in range(num_shared_experts)
        )
        self.last_aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None

    # ------------------------------------------------------------------ routing
    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h`` ``[n, d]`` -> (logits ``[n, N]`` fp32, scores ``[n, N]`` fp32,
        top-k weights ``[n, k]`` fp32, top-k expert ids ``[n, k]`` int64)."""
        logits = self.router(h).float()  # routing decisions in fp32: bf16 ties flip experts
        scores = logits.softmax(-1) if self.router_type == "softmax" else logits.sigmoid()
        weights, ids = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return logits, scores, weights, ids

    def aux_loss(self, logits: torch.Tensor, scores: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """Load-balancing (+ z) loss with coefficients applied; see the module docstring."""
        n = logits.shape[0]
        if n == 0:
            return logits.new_zeros(())
        probs = scores if self.router_type == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        f = load.to(probs.dtype) / (n * self.top_k)
        loss = self.aux_loss_coef * self.num_experts * (f * probs.mean(0)).sum()
        if self.router_z_loss_coef:
            loss = loss + self.router_z_loss_coef * torch.logsumexp(logits, -1).square().mean()
        return loss

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits, scores, weights, ids = self.route(h)
        flat_ids = ids.reshape(-1)  # assignment j belongs to token j // k
        load = torch.bincount(flat_ids, minlength=self.num_experts)
        order = flat_ids.argsort(stable=True)
        tokens = order // self.top_k
        xs = h.index_select(0, tokens)  # [n*k, d], grouped by expert
        if self._use_grouped(xs):
            ys = self._experts_grouped(xs, flat_ids.index_select(0, order), load)
        else:
            ys = self._experts_loop(xs, load)
        ys = ys * weights.reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(-1)
        y = torch.zeros_like(h).index_add(0, tokens, ys)
        for shared in self.shared_experts:
            y = y + shared(h)
        self.last_load = load.detach()
        self.last_aux_loss = self.aux_loss(logits, scores, load)
        return y.reshape(shape)

    def _experts_loop(self, xs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        outs = [self.experts[e](block) for e, block in enumerate(xs.split(load.tolist())) if block.shape[0]]
        return torch.cat(outs) if outs else xs.new_zeros(0, self.hidden_size)

    def _plain_experts(self) -> bool:
        return all(
            type(lin) is nn.Linear and lin.bias is None
            for e in self.experts for lin in (e.gate_proj, e.up_proj, e.down_proj)
        )

    def _use_grouped(self, xs: torch.Tensor) -> bool:
        if self.dispatch == "loop":
            return False
        if self.dispatch == "grouped":
            if not hasattr(F, "grouped_mm"):
                raise SpikingBrainError("dispatch='grouped' needs torch.nn.functional.grouped_mm (torch >= 2.9)")
            if not self._plain_experts():
                raise SpikingBrainError("dispatch='grouped' needs every expert projection to be a bias-free nn.Linear")
            return True
        return (
            hasattr(F, "grouped_mm")
            and xs.is_cuda
            and xs.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(xs.device) >= (8, 0)
            and self.hidden_size % 8 == 0
            and self.intermediate_size % 8 == 0
            and xs.shape[0] >= _GROUPED_MIN_ROWS_PER_EXPERT * self.num_experts
            and self._plain_experts()
        )

    def _experts_grouped(self, xs: torch.Tensor, sorted_ids: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """All experts in three grouped GEMMs. ``xs`` ``[m, d]`` sorted by expert, ``sorted_ids``
        ``[m]`` its expert ids, ``load`` ``[N]`` rows per expert -> ``[m, d]``."""
        m, num = xs.shape[0], self.num_experts
        padded = (load + _GROUP_ALIGN - 1) // _GROUP_ALIGN * _GROUP_ALIGN
        end = padded.cumsum(0)
        start = end - padded
        first = load.cumsum(0) - load  # position of each expert's first row in xs
        dest = start.index_select(0, sorted_ids) + torch.arange(m, device=xs.device) - first.index_select(0, sorted_ids)
        # A static upper bound on the padded length (no device->host sync); the slack rows are
        # zeros appended to the last expert's block, so every row the kernel touches is defined.
        total = -(-(m + num * (_GROUP_ALIGN - 1)) // _GROUP_ALIGN) * _GROUP_ALIGN
        offs = end.to(torch.int32)
        offs[-1] = total
        xp = xs.new_zeros(total, self.hidden_size).index_copy(0, dest, xs)
        w_gate = torch.stack([e.gate_proj.weight for e in self.experts]).transpose(1, 2)  # [N, d, I]
        w_up = torch.stack([e.up_proj.weight for e in self.experts]).transpose(1, 2)
        w_down = torch.stack([e.down_proj.weight for e in self.experts]).transpose(1, 2)  # [N, I, d]
        act = self.experts[0].act_fn
        hid = act(F.grouped_mm(xp, w_gate, offs=offs)) * F.grouped_mm(xp, w_up, offs=offs)
        return F.grouped_mm(hid, w_down, offs=offs).index_select(0, dest)


def moe_modules(model: nn.Module) -> dict[str, MoE]:
    """Every ``MoE`` inside ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of ``last_aux_loss`` over the model's MoE layers (coefficients applied), or ``None``
    if no MoE layer has run a forward."""
    losses = [m.last_aux_loss for m in moe_modules(model).values() if m.last_aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_load(model: nn.Module) -> dict[str, list[int]]:
    """Per MoE layer, the assignments each routed expert received in the last forward."""
    return {name: m.last_load.tolist() for name, m in moe_modules(model).items() if m.last_load is not None}
