"""Choosing the next token from logits: temperature, top-k, top-p, repetition penalty, seed.

Order of operations (the same as transformers' default processors): repetition penalty on the
raw logits, then temperature, then top-k, then top-p, then a draw from the softmax. A
temperature of 0 means greedy (argmax of the penalised logits); ties go to the lowest id.

Numerically safe for every value ``SamplingParams`` accepts: everything runs in fp32, the
penalised logits are clamped to finite values, the best logit is subtracted before dividing by
the temperature (the best token is exactly 0, the others <= 0), and a temperature below
``MIN_TEMPERATURE`` (which fp32 rounds to 0, giving 0/0) is greedy. Logits that are NaN (a broken model) raise
``SamplingError`` for that sequence only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from spikingbrain.errors import SpikingBrainError

# what torch.Generator.manual_seed accepts
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
_FMAX = torch.finfo(torch.float32).max
MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5  # below: greedy (the draw would be greedy up to logit gaps of ~1e-5 anyway)


class SamplingError(SpikingBrainError):
    """The logits of one sequence cannot be sampled from (NaN): fails that sequence only."""


@dataclass
class SamplingParams:
    """How one sequence is decoded.

    temperature: 0 = greedy; otherwise logits are divided by it before the softmax.
    top_p: keep the smallest set of most likely tokens whose probabilities sum to >= top_p.
    top_k: keep the k most likely tokens (0 = all).
    repetition_penalty: >1 discourages any token already in the prompt or the output: its
        logit is divided by the penalty when positive, multiplied when negative (CTRL's rule).
    seed: seeds this sequence's own generator (None: nondeterministic).
    max_new_tokens: stop after this many generated tokens (finish reason ``length``).
    stop: strings that end the output; the matched string and anything after it are removed.
    ignore_eos: keep going past the end-of-sequence token (benchmarks).
    logprobs: record each sampled token's log-probability (of the model's distribution, before
        any sampling transform) and the ``logprobs`` most likely alternatives (None: off).
    prompt_logprobs: the same for every prompt token after the first (None: off).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.validate()

    def validate(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise SpikingBrainError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise SpikingBrainError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SpikingBrainError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SpikingBrainError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpikingBrainError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise SpikingBrainError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise SpikingBrainError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise SpikingBrainError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """This sequence's generator on ``device`` (where its logits live: a CPU generator cannot
        drive ``multinomial`` on CUDA tensors); None without a seed."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(int(self.seed))
        return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits [V]`` float, ``seen [N]`` ids already in the context -> penalised copy."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    ids = torch.unique(seen)
    picked = logits[ids]
    logits = logits.clone()
    # a tiny or huge penalty overflows to +-inf; clamped, the order is kept and nothing is NaN later
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty).clamp(-_FMAX, _FMAX)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits [V]`` -> copy with the excluded tokens at ``-inf``; the top token always stays."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[0] = False  # a top_p that fp32 rounds to 0 must still keep the best token
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generator: torch.Generator | None = None) -> int:
    """Pick the next token id from ``logits [V]`` (any float dtype; computed in fp32)."""
    logits = logits.float()
    if torch.isnan(logits).any():
        raise SamplingError("the model produced NaN logits")
    logits = apply_repetition_penalty(logits, seen.to(logits.device), params.repetition_penalty)
    best = logits.max()
    if params.temperature < MIN_TEMPERATURE or not torch.isfinite(best):
        return int(torch.argmax(logits))
    # shift first: the best token is exactly 0 at any temperature, the others <= 0 (or -inf)
    shifted = (logits - best) / params.temperature
    shifted = filter_top_k_top_p(shifted, params.top_k, params.top_p)
    probs = shifted.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
