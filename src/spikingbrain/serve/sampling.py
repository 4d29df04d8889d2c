"""Choosing the next token from logits: temperature, top-k, top-p, repetition penalty, seed.

Order of operations (the same as transformers' default processors): repetition penalty on the
raw logits, then temperature, then top-k, then top-p, then a draw from the softmax. A
temperature of 0 means greedy (argmax of the penalised logits); ties go to the lowest id.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spikingbrain.errors import SpikingBrainError


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
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.validate()

    def validate(self) -> None:
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

    def make_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(int(self.seed))
        return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits [V]`` float, ``seen [N]`` ids already in the context -> penalised copy."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    ids = torch.unique(seen)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
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
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generator: torch.Generator | None = None) -> int:
    """Pick the next token id from ``logits [V]`` (any float dtype; computed in fp32)."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
