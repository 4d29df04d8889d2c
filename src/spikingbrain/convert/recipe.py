"""The conversion recipe: teacher -> trained SpikingBrain student, in stages, resumable.

1. convert (``mapping.convert_from_transformer``) and calibrate the GLA output norms;
   or, with ``init_delta``, start from a trained delta merged into that conversion;
2. optionally wrap the GLA projections as low-rank updates of the teacher's weights
   (``lora_rank``: the delta stays small, and the frozen base weights need no gradient);
3. run the stages in order:

   - ``transfer``: layer-wise attention transfer (``attention_transfer.py``) on the teacher's
     per-layer inputs/outputs. The teacher runs once: the activations are cached on disk in the
     work directory (``cache/``) and memory-mapped, so every later step and every resumed run
     reuses them;
   - ``distill``: end-to-end KL distillation (``train/distill.py``) on windows of
     ``seq_len`` tokens, a ``chat_fraction`` of them cut from the shipped chat data (the
     teacher's own answers in its chat template), a ``retrieval_fraction`` retrieval windows
     (facts hidden in the prose, asked at the end: ``retrieval_data.py``), the rest from the
     shipped prose. A distill stage with ``ffn_lora_rank`` also trains low-rank updates of
     every layer's FFN (zero at first; earlier stages leave them so), so the rest of the
     network can compensate what the GLA layers still get wrong.

Every stage may run its forwards under bf16 autocast (``precision="bf16"``): the same step in
~0.55x the time on a CPU with AVX512-BF16 (the GLA state math stays fp32; the loss and the
optimizer too). ``"bf16-gla"`` also gives the chunked GLA's matmuls bf16 operands
(``ops.gla.chunk_matmuls``; decays and the state scan stay fp32).

With a work directory, the state (trainable tensors, optimizer, stage, step) is checkpointed
atomically every ``checkpoint_seconds`` and at each stage's end; running the same recipe on the
same directory again continues where it stopped (every batch is a function of the step alone).
A recipe that differs from the one the directory was started with is refused, except by stages
appended at its end: a finished run then goes on with them (how the shipped delta was trained
longer without redoing its first stages).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from spikingbrain.config import _alternating
from spikingbrain.convert.delta import FFN_TARGETS, file_sha256
from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.distill import PRECISIONS


@dataclass
class Stage:
    kind: str  # "transfer" or "distill"
    steps: int
    lr: float
    batch_size: int
    seq_len: int = 512  # distill only (transfer uses the cache's)
    chat_fraction: float = 0.0  # distill only
    ce_weight: float = 0.0
    minutes: float | None = None  # the stage's time budget (all runs of it together), or None
    chat_examples: int | None = None  # distill only: the first N shipped chat examples (None: the recipe's)
    precision: str = "fp32"  # "bf16": forwards under bf16 autocast; "bf16-gla": and bf16 GLA matmuls
    # distill only: also train rank-r updates of every layer's FFN (delta.FFN_TARGETS), which lets
    # distillation compensate the GLA layers' approximation where training attention alone plateaus
    ffn_lora_rank: int = 0
    # distill only: a share of windows with facts hidden in the prose and asked at the end
    # (retrieval_data.py); the rows that predict the keys weigh ``1 + retrieval_weight`` in the KL
    # and add ``retrieval_weight`` times the cross-entropy of the true key
    retrieval_fraction: float = 0.0
    retrieval_weight: float = 4.0
    retrieval_plain: float = 0.0  # the share of retrieval questions asked without Question:/Answer: labels
    retrieval_numbers: float = 0.0  # the share of retrieval facts that are named numbers, asked bare


@dataclass
class ConversionRecipe:
    # a named layout (mapping.LAYOUTS) or one layer type per teacher layer ("gla", "swa", ...)
    layout: str | list[str] = "7b"
    sliding_window: int = 4096
    lora_rank: int = 64  # 0: train the projections in full
    seed: int = 0
    cache_sequences: int = 160
    cache_seq_len: int = 512
    cache_chat_fraction: float = 0.35
    chat_examples: int | None = None  # the first N shipped chat examples (None: all)
    checkpoint_seconds: float = 120.0
    # start from a trained delta (its GLA mixers and FFN updates merged into the converted student)
    # instead of the bare calibrated conversion: a finished run goes on with another kind of update
    # (e.g. lora_rank 0: full-rank projections, compressed back to low rank at export). The file's
    # sha256 is kept in the work directory, and a resume with another file is refused
    # The layout may keep softmax attention where the delta has a GLA layer: that layer goes back to
    # the teacher's attention (its FFN update stays), and training goes on from there
    init_delta: str | None = None
    # how the export stores full-rank projection updates (lora_rank 0, or a run from an init_delta):
    # as rank-R truncated-SVD factors (scripts/train_conversion.py; --rank overrides). Export only:
    # it changes no training, so a work directory's recipe may change it (``extends`` ignores it)
    export_rank: int | None = None
    stages: list[Stage] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "ConversionRecipe":
        d = dict(d)
        stages = [Stage(**s) for s in d.pop("stages", [])]
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SpikingBrainError(f"conversion recipe: unknown fields {sorted(unknown)}")
        return cls(**d, stages=stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def extends(self, started: "ConversionRecipe") -> bool:
        """Whether this recipe is ``started`` (the one a work directory began with), possibly with
        stages appended: then a finished run continues with the new stages."""
        a, b = self.to_dict(), started.to_dict()
        a_stages, b_stages = a.pop("stages"), b.pop("stages")
        a.pop("export_rank"), b.pop("export_rank")
        return a == b and a_stages[:len(b_stages)] == b_stages

    def validate(self) -> None:
        if not self.stages:
            raise SpikingBrainError("conversion recipe: no stages")
        if not (isinstance(self.layout, str) or (isinstance(self.layout, (list, tuple)) and self.layout
                                                 and all(isinstance(t, str) for t in self.layout))):
            raise SpikingBrainError(f"conversion recipe: layout must be a layout name or a list of layer types, "
                                    f"got {self.layout!r}")
        if self.export_rank is not None and self.export_rank < 1:
            raise SpikingBrainError(f"conversion recipe: export_rank must be >= 1 (or null), got {self.export_rank}")
        for i, s in enumerate(self.stages):
            if s.kind not in ("transfer", "distill"):
                raise SpikingBrainError(f"conversion recipe: stage {i} kind {s.kind!r} (transfer or distill)")
            if s.steps < 1 or s.batch_size < 1 or s.lr <= 0 or s.seq_len < 2:
                raise SpikingBrainError(f"conversion recipe: stage {i} needs steps, batch_size, seq_len >= 1 and lr > 0")
            if not 0.0 <= s.chat_fraction <= 1.0:
                raise SpikingBrainError(f"conversion recipe: stage {i} chat_fraction must be in [0, 1]")
            if not 0.0 <= s.retrieval_fraction <= 1.0 - s.chat_fraction + 1e-9 or s.retrieval_weight < 0:
                raise SpikingBrainError(f"conversion recipe: stage {i} retrieval_fraction must be in [0, 1 - "
                                        "chat_fraction] and retrieval_weight >= 0")
            if not 0.0 <= s.retrieval_plain <= 1.0 or (s.retrieval_plain and not s.retrieval_fraction):
                raise SpikingBrainError(f"conversion recipe: stage {i} retrieval_plain must be in [0, 1], and "
                                        "needs a retrieval_fraction")
            if not 0.0 <= s.retrieval_numbers <= 1.0 or (s.retrieval_numbers and not s.retrieval_fraction):
                raise SpikingBrainError(f"conversion recipe: stage {i} retrieval_numbers must be in [0, 1], and "
                                        "needs a retrieval_fraction")
            if s.retrieval_fraction and s.kind != "distill":
                raise SpikingBrainError(f"conversion recipe: stage {i}: retrieval windows are for distill stages")
            if s.chat_examples is not None and s.chat_examples < 1:
                raise SpikingBrainError(f"conversion recipe: stage {i} chat_examples must be >= 1 (or null)")
            if s.precision not in PRECISIONS:
                raise SpikingBrainError(f"conversion recipe: stage {i} precision {s.precision!r} (one of {PRECISIONS})")
            if s.ffn_lora_rank < 0 or (s.ffn_lora_rank and s.kind != "distill"):
                raise SpikingBrainError(f"conversion recipe: stage {i} ffn_lora_rank must be >= 0, and 0 for a "
                                        "transfer stage (it trains the attention mixers alone)")
        ranks = {s.ffn_lora_rank for s in self.stages if s.ffn_lora_rank}
        if len(ranks) > 1:
            raise SpikingBrainError(f"conversion recipe: the stages that train the FFNs must share one "
                                    f"ffn_lora_rank, got {sorted(ranks)}")

    @property
    def ffn_rank(self) -> int:
        """The rank of the FFN updates (0: the FFNs stay the teacher's)."""
        return max((s.ffn_lora_rank for s in self.stages), default=0)


# The recipe of the delta shipped until 2026-12-03 (= recipes/conversion-lowrank.json; SHIPPED below
# replaced it): rank-64 LoRA updates, 405 minutes on 2 cores (scripts/train_conversion.py). Each
# stage ends at its step count or its time budget, whichever comes first. Stages 3-4 were appended
# to a finished run of stages 0-2, then stage 5, then stages 6-7 (with 550 chat examples: the first
# 64 plus 486 made later by the same script), then stages 8-9 (bf16 forwards; rank-16 FFN updates in
# every layer, stored as int8 factors), then stages 10-11 (with retrieval windows,
# retrieval_data.py), then stage 12 (chat-heavy: 60% chat windows, lower LR).
LOWRANK = ConversionRecipe(cache_sequences=128, cache_seq_len=512, chat_examples=64, stages=[
    Stage("transfer", steps=4000, lr=1e-3, batch_size=4, minutes=13),
    Stage("distill", steps=2000, lr=2e-4, batch_size=2, seq_len=512, chat_fraction=0.5, minutes=6),
    Stage("distill", steps=500, lr=1e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=3),
    Stage("distill", steps=2000, lr=3e-4, batch_size=2, seq_len=512, chat_fraction=0.5, minutes=38),
    Stage("distill", steps=500, lr=1e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=12),
    Stage("distill", steps=1000, lr=2e-4, batch_size=1, seq_len=1024, chat_fraction=0.5, minutes=22),
    Stage("distill", steps=1000, lr=3e-4, batch_size=1, seq_len=1024, chat_fraction=0.5, minutes=50, chat_examples=550),
    Stage("distill", steps=500, lr=1.5e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=35, chat_examples=550),
    Stage("distill", steps=2000, lr=3e-4, batch_size=1, seq_len=1024, chat_fraction=0.5, minutes=48, chat_examples=550,
          precision="bf16", ffn_lora_rank=16),
    Stage("distill", steps=1000, lr=1.5e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=32, chat_examples=550,
          precision="bf16", ffn_lora_rank=16),
    Stage("distill", steps=2000, lr=2e-4, batch_size=1, seq_len=1024, chat_fraction=0.4, minutes=60, chat_examples=550,
          precision="bf16", ffn_lora_rank=16, retrieval_fraction=0.3, retrieval_weight=4.0),
    Stage("distill", steps=1000, lr=1e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=30, chat_examples=550,
          precision="bf16", ffn_lora_rank=16, retrieval_fraction=0.3, retrieval_weight=4.0),
    Stage("distill", steps=2000, lr=1e-4, batch_size=1, seq_len=1024, chat_fraction=0.6, minutes=55, chat_examples=550,
          precision="bf16", ffn_lora_rank=16, retrieval_fraction=0.15, retrieval_weight=4.0),
])

# LOWRANK's successor (= recipes/conversion-fullrank.json; scripts/train_conversion.py): the
# demo's from-scratch method (DEMO) given 125 minutes on 2 cores (stages 0-4; 5-7 appended, 240 in
# all). Full-rank projection updates, transfer LR 2e-3, bf16 forwards and GLA matmuls; exported as
# rank-150 truncated-SVD factors (int8: < 10 MB). It beats LOWRANK's 405 minutes on top-1 / KL /
# perplexity / chat fidelity, not yet on
# passkey (2/0/0 < the teacher's 4/1/0 after stages 5-6, 3/0/0 after 7; BENCHMARKS.md, conversion
# ablation), so it is not shipped yet: until stage 7 no retrieval question was asked bare.
# Each stage ends at its time budget (the step counts are out of reach), which also sets its LR schedule.
FULLRANK = ConversionRecipe(lora_rank=0, export_rank=150, cache_sequences=128, cache_seq_len=512, chat_examples=64,
                           stages=[
    Stage("transfer", steps=100000, lr=2e-3, batch_size=4, minutes=20, precision="bf16-gla"),
    Stage("distill", steps=100000, lr=2e-4, batch_size=2, seq_len=512, chat_fraction=0.5, minutes=20,
          precision="bf16-gla"),
    Stage("distill", steps=100000, lr=2e-4, batch_size=1, seq_len=1024, chat_fraction=0.5, minutes=45,
          chat_examples=550, retrieval_fraction=0.15, retrieval_weight=4.0, precision="bf16-gla"),
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=20,
          chat_examples=550, retrieval_fraction=0.15, retrieval_weight=4.0, precision="bf16-gla"),
    # appended to the finished stages 0-3: at 15% retrieval windows they had learnt little retrieval
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=1024, chat_fraction=0.4, minutes=20,
          chat_examples=550, retrieval_fraction=0.3, retrieval_weight=4.0, precision="bf16-gla"),
    # stages 0-4 reached passkey 2/0/0 (teacher 4/1/0): a longer retrieval-heavy stage
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=1024, chat_fraction=0.35, minutes=80,
          chat_examples=550, retrieval_fraction=0.4, retrieval_weight=4.0, precision="bf16-gla"),
    # stage 5 left passkey at 2/0/0 (key recall 0.69 -> 0.83): retrieval windows at 2k, as LOWRANK's stage 11
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=20,
          chat_examples=550, retrieval_fraction=0.3, retrieval_weight=4.0, precision="bf16-gla"),
    # passkey still 2/0/0: the student answers after "Answer:" only; half the questions asked bare
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=1024, chat_fraction=0.35, minutes=15,
          chat_examples=550, retrieval_fraction=0.4, retrieval_weight=4.0, retrieval_plain=0.5, precision="bf16-gla"),
])


# FULLRANK's method in one run of 105 minutes, with retrieval windows (half their questions bare) from
# the first 1,024-token stage on (= recipes/conversion-fullrank-bare.json): FULLRANK's appended
# retrieval stages (115 minutes, all questions after "Question:" until its stage 7) left passkey below
# the teacher's, and only bare questions moved it. Measured: 0.755 / 0.179, chat 0.831, passkey 2/0/0
# (BENCHMARKS.md, conversion ablation): bare questions from the start did not bring passkey either,
# so it is not shipped.
FULLRANK_BARE = dataclasses.replace(FULLRANK, stages=[
    dataclasses.replace(FULLRANK.stages[0]),  # the same transfer (a copy: stages are mutable)
    Stage("distill", steps=100000, lr=2e-4, batch_size=2, seq_len=512, chat_fraction=0.5, minutes=12,
          precision="bf16-gla"),
    Stage("distill", steps=100000, lr=2e-4, batch_size=1, seq_len=1024, chat_fraction=0.4, minutes=45,
          chat_examples=550, retrieval_fraction=0.35, retrieval_weight=4.0, retrieval_plain=0.5,
          precision="bf16-gla"),
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=15,
          chat_examples=550, retrieval_fraction=0.3, retrieval_weight=4.0, retrieval_plain=0.5,
          precision="bf16-gla"),
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=1024, chat_fraction=0.35, minutes=13,
          chat_examples=550, retrieval_fraction=0.4, retrieval_weight=4.0, retrieval_plain=0.5,
          precision="bf16-gla"),
])


# FULLRANK_BARE's finished run with stages appended that also train rank-8 FFN updates
# (= recipes/conversion-fullrank-ffn.json): of every run only the shipped delta, which had rank-16
# FFN updates in its retrieval stages, reached the teacher's passkey. Rank 8, not 16: the FFN
# factors (1.7 MB) and the projections' SVD factors (rank 120: 6.9 MB) must fit in 10 MB together.
# Measured (stages 5-7: 105 minutes, 889,856 tokens): 0.762 / 0.176, chat 0.828, passkey 1/0/0, key
# recall 0.77 (BENCHMARKS.md, conversion ablation): the FFN updates did not bring passkey; not shipped.
FULLRANK_FFN = dataclasses.replace(FULLRANK_BARE, export_rank=120, stages=[
    *(dataclasses.replace(s) for s in FULLRANK_BARE.stages),
    Stage("distill", steps=100000, lr=1.5e-4, batch_size=1, seq_len=1024, chat_fraction=0.35, minutes=55,
          chat_examples=550, retrieval_fraction=0.4, retrieval_weight=4.0, retrieval_plain=0.5,
          precision="bf16-gla", ffn_lora_rank=8),
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=2048, chat_fraction=0.3, minutes=25,
          chat_examples=550, retrieval_fraction=0.3, retrieval_weight=4.0, retrieval_plain=0.5,
          precision="bf16-gla", ffn_lora_rank=8),
    Stage("distill", steps=100000, lr=1e-4, batch_size=1, seq_len=1024, chat_fraction=0.5, minutes=25,
          chat_examples=550, retrieval_fraction=0.25, retrieval_weight=4.0, retrieval_plain=0.5,
          precision="bf16-gla", ffn_lora_rank=8),
])


def _numbers_stage(lr: float, seq_len: int, chat: float, retrieval: float, minutes: float,
                   ffn_rank: int = 0) -> Stage:
    """A late distillation stage as FULLRANK_NUMBERS's: one window per step, all 550 chat examples,
    retrieval windows (weight 4) with half their questions bare and half their facts named numbers,
    ``bf16-gla``; runs until its ``minutes``."""
    return Stage("distill", steps=100000, lr=lr, batch_size=1, seq_len=seq_len, chat_fraction=chat,
                 minutes=minutes, chat_examples=550, retrieval_fraction=retrieval, retrieval_weight=4.0,
                 retrieval_plain=0.5, retrieval_numbers=0.5, precision="bf16-gla", ffn_lora_rank=ffn_rank)


# FULLRANK_FFN's finished run with stages appended whose retrieval windows hold named numbers ("The
# lucky number is 58213." ... "What is the lucky number? The lucky number is"; half the facts,
# always asked bare; ``retrieval_data.NUMBER_TEMPLATES``) (= recipes/conversion-fullrank-numbers.json):
# read teacher-forced, the full-rank students lost the passkey at its first answer token (they went
# on with prose after "The pass key is") and at the key's third digit, and no retrieval window had
# asked a number by a bare "The X is". Measured (stages 8-9: 80 minutes, 629,760 tokens): 0.762 / 0.173,
# ppl 1.11x, chat 0.831, passkey 3/0/0 (BENCHMARKS.md, conversion ablation): the student now starts a
# number more often but miscopies the key's third digit; not shipped. Giving layer 22 alone back its
# softmax attention recalls every 1k key teacher-forced (passkey_scores.py --restore): the next run
# keeps layer 22 softmax.
FULLRANK_NUMBERS = dataclasses.replace(FULLRANK_FFN, stages=[
    *(dataclasses.replace(s) for s in FULLRANK_FFN.stages),
    _numbers_stage(1e-4, 1024, chat=0.35, retrieval=0.4, minutes=55, ffn_rank=8),
    _numbers_stage(1e-4, 2048, chat=0.3, retrieval=0.3, minutes=25, ffn_rank=8),
])


def _alternating_with(n: int, swa: tuple[int, ...] = (), gla: tuple[int, ...] = ()) -> list[str]:
    """The 7B layout for ``n`` layers with layers ``swa`` kept as softmax (SWA) attention and layers
    ``gla`` made GLA."""
    types = _alternating(n)
    for i in swa:
        types[i] = "swa"
    for i in gla:
        types[i] = "gla"
    return types


# FULLRANK_BARE's method in 90 minutes, with named-number retrieval windows (FULLRANK_NUMBERS's stages
# 8-9) from the first 1,024-token stage on, and layer 22 kept as the teacher's softmax attention
# (sliding-window, 4,096 tokens) while layer 23 becomes GLA: still 15 GLA layers of 30
# (= recipes/conversion-fullrank-l22.json). Restoring layer 22 alone in FULLRANK_NUMBERS's student
# recalled 9/9 passkeys at 1k and 5/9 at 2k teacher-forced (the teacher: 4 and 1; passkey_scores.py
# --restore); no other single layer got past 5 at 1k. Measured (595,968 distillation tokens):
# 0.728 / 0.236, ppl 1.18x, chat 0.808, passkey 0/0/0, key recall 0.03 (its first token 0.94): the
# student starts every 1k key but miscopies the digits; with layer 23 given back its softmax as well
# it recalls 6/9 at 1k and 2/9 at 2k teacher-forced. Layers 22-23 copy together; not shipped.
FULLRANK_L22 = dataclasses.replace(FULLRANK, layout=_alternating_with(30, swa=(22,), gla=(23,)), stages=[
    dataclasses.replace(FULLRANK.stages[0], minutes=18),
    Stage("distill", steps=100000, lr=2e-4, batch_size=2, seq_len=512, chat_fraction=0.5, minutes=10,
          precision="bf16-gla"),
    _numbers_stage(2e-4, 1024, chat=0.4, retrieval=0.35, minutes=40),
    _numbers_stage(1e-4, 2048, chat=0.3, retrieval=0.3, minutes=12),
    _numbers_stage(1e-4, 1024, chat=0.35, retrieval=0.4, minutes=10),
])


# FULLRANK_NUMBERS's finished delta (290 minutes; made by its recipe file, then kept as
# runs/conversion-fullrank-numbers.safetensors) with layer 22 given back the teacher's softmax
# attention: 14 GLA layers of 30, layers 22-23 both softmax, as FULLRANK_L22's run asked
# (= recipes/conversion-numbers-l22.json). Restoring layer 22 alone recalled 9/9 1k passkeys
# teacher-forced; the distillation stages re-fit the layers after it to the restored one.
# Measured (201 minutes, 1,549,312 distillation tokens; exported with --ffn-rank 12, 9.79 MB): 0.778 /
# 0.148, ppl 1.07x, chat 0.843, passkey 7/5/1, key recall 0.94 (BENCHMARKS.md): shipped.
NUMBERS_L22 = dataclasses.replace(FULLRANK, export_rank=120, layout=_alternating_with(30, swa=(22,)),
                                  init_delta="runs/conversion-fullrank-numbers.safetensors", stages=[
    _numbers_stage(1e-4, 1024, chat=0.35, retrieval=0.3, minutes=40, ffn_rank=8),
    _numbers_stage(1e-4, 2048, chat=0.3, retrieval=0.3, minutes=16, ffn_rank=8),
    _numbers_stage(5e-5, 1024, chat=0.5, retrieval=0.25, minutes=12, ffn_rank=8),
    # appended to the finished stages 0-2 (0.772 / 0.154, passkey 8/5/1): prose-heavier, for the KL
    _numbers_stage(5e-5, 1024, chat=0.3, retrieval=0.2, minutes=28, ffn_rank=8),
    # appended to the finished stage 3 (0.776 / 0.153, passkey 7/5/0): a long stage, more prose
    # (stage 4: 804 steps, 823,296 tokens; +0.002 top-1, -0.005 KL)
    _numbers_stage(7e-5, 1024, chat=0.25, retrieval=0.15, minutes=105, ffn_rank=8),
])

# The shipped delta's recipe (= recipes/conversion-shipped.json, the same as conversion-numbers-l22.json,
# the file its command names): `scripts/train_conversion.py --recipe shipped` after the FULLRANK_NUMBERS
# run that makes its init_delta (both commands: README).
SHIPPED = NUMBERS_L22

# `spikingbrain demo --from-scratch`: FULLRANK's method on a ~10-minute budget (2 CPU cores).
# Full-rank updates: on this budget they beat rank-64 ones; bf16 forwards (and bf16 operands in the
# chunked GLA's matmuls) fit more tokens and beat fp32; the transfer's LR is twice LOWRANK's
# (BENCHMARKS.md, conversion ablation). The demo ships no delta, so it keeps its updates in full.
DEMO = ConversionRecipe(lora_rank=0, cache_sequences=48, cache_seq_len=512, chat_examples=64, checkpoint_seconds=1e9, stages=[
    Stage("transfer", steps=400, lr=2e-3, batch_size=4, minutes=4.5, precision="bf16-gla"),
    Stage("distill", steps=60, lr=2e-4, batch_size=2, seq_len=512, chat_fraction=0.5, minutes=2.0, precision="bf16-gla"),
])


# --------------------------------------------------------------------------- data
def windows(stream: torch.Tensor, n: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``T`` tokens at random offsets of ``stream``."""
    if stream.numel() < T + 1:
        raise SpikingBrainError(f"need at least {T + 1} tokens of training text, got {stream.numel()}")
    starts = torch.randint(0, stream.numel() - T, (n,), generator=generator)
    return torch.stack([stream[s:s + T] for s in starts.tolist()])


def mixed_windows(prose: torch.Tensor, chat: torch.Tensor | None, n: int, T: int, chat_fraction: float,
                  seed: int) -> torch.Tensor:
    """``n`` windows, ``round(n * chat_fraction)`` of them from ``chat`` (the first ones), the
    rest from ``prose``; a function of ``seed`` alone. A batch too small to hold its share
    (``n * chat_fraction < 1``, e.g. one window) is one chat window with probability
    ``n * chat_fraction``: rounding alone gave such batches no chat at all."""
    g = torch.Generator().manual_seed(seed)
    share = n * chat_fraction if chat is not None else 0.0
    n_chat = int(round(share)) if share >= 1 else int(random.Random(seed).random() < share)
    parts = []
    if n_chat:
        parts.append(windows(chat, n_chat, T, g))
    if n - n_chat:
        parts.append(windows(prose, n - n_chat, T, g))
    return torch.cat(parts)


def retrieval_batch(tokenizer, prose: torch.Tensor, chat: torch.Tensor | None, n: int, T: int,
                    chat_fraction: float, retrieval_fraction: float, seed: int,
                    plain: float = 0.0, numbers: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows as ``mixed_windows`` makes them, except that a ``retrieval_fraction`` of them
    are retrieval windows (``retrieval_data.retrieval_window`` with ``plain`` and ``numbers``);
    returns ``(ids [n, T], answer rows [n, T])``. One-window batches draw their kind with those
    probabilities."""
    from spikingbrain.convert.retrieval_data import retrieval_window

    rng = random.Random(seed)
    if n == 1:
        u = rng.random()
        n_chat, n_ret = int(chat is not None and u < chat_fraction), int(chat_fraction <= u < chat_fraction + retrieval_fraction)
    else:
        n_chat = int(round(n * chat_fraction)) if chat is not None else 0
        n_ret = min(n - n_chat, int(round(n * retrieval_fraction)))
    g = torch.Generator().manual_seed(seed)
    ids, ans = [], []
    if n_chat:
        ids.append(windows(chat, n_chat, T, g))
    if n - n_chat - n_ret:
        ids.append(windows(prose, n - n_chat - n_ret, T, g))
    ans.append(torch.zeros(n - n_ret, T))
    for j in range(n_ret):
        w, a = retrieval_window(tokenizer, prose, T, seed * 31 + j, plain, numbers)
        ids.append(w[None])
        ans.append(a[None])
    return torch.cat(ids), torch.cat(ans)


# --------------------------------------------------------------------------- activation cache
def build_cache(teacher, seqs: torch.Tensor, layers: list[int], cache_dir: Path | None, batch: int = 4,
                progress: bool = True) -> dict:
    """Teacher inputs/outputs of the attention blocks of ``layers`` for ``seqs [N, T]``
    (``attention_transfer.collect_teacher_io``). With ``cache_dir``: written there once
    (atomically, one file per layer) and memory-mapped on every later call."""
    from spikingbrain.convert.attention_transfer import collect_teacher_io

    if cache_dir is not None and (cache_dir / "done.json").is_file():
        return _load_cache(cache_dir, layers)
    io = collect_teacher_io(teacher, seqs.split(batch), layers, progress=progress)
    if cache_dir is None:
        return io
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for i, (x, y) in io.items():
        torch.save({"x": x.contiguous(), "y": y.contiguous()}, tmp / f"layer{i:03d}.pt")
    (tmp / "done.json").write_text(json.dumps({"layers": layers, "shape": list(seqs.shape)}))
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    del io
    return _load_cache(cache_dir, layers)


def _load_cache(cache_dir: Path, layers: list[int]) -> dict:
    out = {}
    for i in layers:
        d = torch.load(cache_dir / f"layer{i:03d}.pt", mmap=True, weights_only=True)
        out[i] = (d["x"], d["y"])
    return out


# --------------------------------------------------------------------------- state
def prepare_student(teacher, tokenizer, recipe: ConversionRecipe, prose: torch.Tensor):
    """Convert, calibrate the output norms, wrap the projections (``lora_rank``) and, when a stage
    trains them, the FFNs (``ffn_lora_rank``). Returns ``(student, trainable parameters by name)``:
    the GLA mixers' parameters, then the FFN factors (names with ``.mlp.``)."""
    from spikingbrain.convert.delta import PROJECTIONS, gla_layers
    from spikingbrain.convert.mapping import calibrate_output_norms, convert_from_transformer
    from spikingbrain.train.recipe import LoRASpec
    from spikingbrain.train.trainable import apply_lora

    student = convert_from_transformer(teacher, layout=recipe.layout, sliding_window=recipe.sliding_window,
                                       tokenizer=tokenizer, seed=recipe.seed)
    device = next(teacher.parameters()).device
    calib = windows(prose, 4, 256, torch.Generator().manual_seed(recipe.seed + 1)).to(device)
    calibrate_output_norms(student, teacher, calib)
    if recipe.init_delta is not None:
        from spikingbrain.convert.delta import apply_delta

        apply_delta(student, teacher, recipe.init_delta, restored=True)
    if recipe.lora_rank > 0:
        torch.manual_seed(recipe.seed)
        layers = "|".join(str(i) for i in gla_layers(student))
        apply_lora(student, LoRASpec(rank=recipe.lora_rank, alpha=recipe.lora_rank,
                                     targets=[rf"model\.layers\.({layers})\.self_attn\.({'|'.join(PROJECTIONS)})"]))
    if recipe.ffn_rank:
        torch.manual_seed(recipe.seed + 3)
        r = recipe.ffn_rank
        apply_lora(student, LoRASpec(rank=r, alpha=r, targets=[FFN_TARGETS]))
    params = {}
    for i in gla_layers(student):
        for n, p in student.model.layers[i].self_attn.named_parameters():
            if ".base." not in n:
                params[f"model.layers.{i}.self_attn.{n}"] = p
    for n, p in student.named_parameters():
        if ".mlp." in n and ".lora_" in n:
            params[n] = p
    return student, params


def stage_params(params: dict, stage: Stage) -> list:
    """What ``stage`` trains: the GLA mixers, plus the FFN factors when it sets ``ffn_lora_rank``."""
    return [p for n, p in params.items() if ".mlp." not in n or stage.ffn_lora_rank]


def _save_state(workdir: Path, params: dict, opt, stage: int, step: int, extra: dict) -> None:
    from safetensors.torch import save_file

    name = f"ckpt-{stage:02d}-{step:07d}"
    tmp = workdir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "params.safetensors"))
    if opt is not None:
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"stage": stage, "step": step, **extra}))  # last: marks complete
    os.replace(tmp, workdir / name)
    for old in _checkpoints(workdir)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_init_delta(workdir: Path, path: Path) -> None:
    """The run started from ``path``; resuming it from another file would mix two trainings."""
    if not path.is_file():
        raise SpikingBrainError(f"conversion recipe: init_delta {path} not found (the recipe goes on from that "
                                "delta: make it first with the recipe that trains it, or give its path)")
    sha, record = file_sha256(path), workdir / "init_delta.json"
    if record.is_file():
        started = json.loads(record.read_text())["sha256"]
        if started != sha:
            raise SpikingBrainError(f"{workdir} was started from another init_delta (sha256 {started[:12]}..., "
                                    f"{path} has {sha[:12]}...); use the same file or a new directory")
    else:
        _atomic_write(record, json.dumps({"path": str(path), "sha256": sha}))


def _checkpoints(workdir: Path) -> list[Path]:
    found = [p for p in workdir.glob("ckpt-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_state(workdir: Path) -> Path | None:
    found = _checkpoints(workdir)
    return found[-1] if found else None


@torch.no_grad()
def _load_params(path: Path, params: dict) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path / "params.safetensors"))
    new_ffn = {n for n in set(params) - set(saved) if ".mlp." in n}
    if (set(saved) - set(params) or set(params) - set(saved) - new_ffn or (new_ffn and any(".mlp." in n for n in saved))
            or any(saved[n].shape != p.shape for n, p in params.items() if n in saved)):
        raise SpikingBrainError(f"checkpoint {path} does not match this recipe's trainable parameters")
    # a checkpoint from before the stages that add FFN updates: those keep their (seeded) start
    for n, p in params.items():
        if n in saved:
            p.copy_(saved[n])


# --------------------------------------------------------------------------- the run
def run_conversion(teacher, tokenizer, recipe: ConversionRecipe, workdir: str | os.PathLike | None = None,
                   progress: bool = True, say: Callable[[str], None] = print, stop_after_stage: int | None = None):
    """Run ``recipe`` (resuming from ``workdir`` when it holds a checkpoint). Returns
    ``(student, report)``; the student's GLA projections are low-rank wrapped when
    ``lora_rank > 0``, its FFNs when a stage sets ``ffn_lora_rank`` (``convert.delta.save_delta``
    stores them as such; ``train.trainable.merge_lora`` folds them in)."""
    from spikingbrain.convert.attention_transfer import attention_transfer
    from spikingbrain.convert.chat_data import chat_stream
    from spikingbrain.convert.delta import gla_layers
    from spikingbrain.demo import shipped_ids
    from spikingbrain.train.distill import distill, make_optimizer

    recipe.validate()
    wd = Path(workdir) if workdir is not None else None
    if wd is not None:
        wd.mkdir(parents=True, exist_ok=True)
        rpath = wd / "recipe.json"
        if rpath.is_file():
            started = ConversionRecipe.from_dict(json.loads(rpath.read_text()))
            if not recipe.extends(started):
                raise SpikingBrainError(f"{wd} was started with another recipe ({rpath}); use a new directory "
                                        "(a recipe may only be extended by appending stages)")
            if len(recipe.stages) > len(started.stages):
                say(f"[convert] {wd}: recipe extended by {len(recipe.stages) - len(started.stages)} stage(s)")
        _atomic_write(rpath, json.dumps(recipe.to_dict(), indent=1))
        if recipe.init_delta is not None:
            _check_init_delta(wd, Path(recipe.init_delta))
    for p in teacher.parameters():
        p.requires_grad_(False)
    prose = shipped_ids(tokenizer, "train")
    chats = {recipe.chat_examples: chat_stream(tokenizer, "train", recipe.chat_examples)}
    for s in recipe.stages:  # a stage may draw on more (later-made) chat examples than the recipe
        if s.chat_examples is not None and s.chat_examples not in chats:
            chats[s.chat_examples] = chat_stream(tokenizer, "train", s.chat_examples)
    chat = chats[recipe.chat_examples]
    student, params = prepare_student(teacher, tokenizer, recipe, prose)
    device = next(teacher.parameters()).device
    stage0, step0, opt_state, history, elapsed0 = 0, 0, None, [], 0.0
    ck = latest_state(wd) if wd is not None else None
    if ck is not None:
        st = json.loads((ck / "state.json").read_text())
        _load_params(ck, params)
        stage0, step0, history = st["stage"], st["step"], st.get("history", [])
        elapsed0 = float(st.get("stage_elapsed", 0.0))
        if (ck / "optimizer.pt").is_file():
            opt_state = torch.load(ck / "optimizer.pt", weights_only=True)
        say(f"[convert] resumed from {ck.name}: stage {stage0}, step {step0}")
    report = {"recipe": recipe.to_dict(), "stages": history}
    for si in range(stage0, len(recipe.stages)):
        s = recipe.stages[si]
        start = step0 if si == stage0 else 0
        before = elapsed0 if si == stage0 else 0.0  # a stage's time budget counts every run of it
        if start >= s.steps:
            continue
        plist = stage_params(params, s)
        opt = make_optimizer(plist, s.lr)
        if opt_state is not None and si == stage0:
            opt.load_state_dict(opt_state)
        last_save = [time.time()]
        t0 = time.time()

        def on_step(step, opt, rec, si=si):
            if wd is not None and (time.time() - last_save[0] > recipe.checkpoint_seconds):
                _save_state(wd, params, opt, si, step, {"history": history,
                                                        "stage_elapsed": before + time.time() - t0})
                last_save[0] = time.time()

        say(f"[convert] stage {si}: {s.kind}, steps {start}..{s.steps}")
        if s.kind == "transfer":
            seqs = mixed_windows(prose, chat, recipe.cache_sequences, recipe.cache_seq_len, recipe.cache_chat_fraction,
                                 recipe.seed + 2).to(device)
            io = build_cache(teacher, seqs, gla_layers(student), wd / "cache" if wd is not None else None,
                             progress=progress)
            t0 = time.time()  # the budget is for training: the cache is built once, outside it
            log = attention_transfer(student, io, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                     seed=recipe.seed + 100 * si, params=plist, start_step=start, optimizer=opt,
                                     on_step=on_step, progress=progress, elapsed_before=before,
                                     time_budget_s=60 * s.minutes if s.minutes else None, precision=s.precision)
            del io
            summary = {"nmse_first": log[0]["nmse"] if log else None, "nmse_last": log[-1]["nmse"] if log else None}
        else:
            stage_chat = chats[s.chat_examples] if s.chat_examples is not None else chat

            def batch_fn(step, s=s, si=si, stage_chat=stage_chat):
                seed = recipe.seed * 7919 + 1000 * si + step
                if s.retrieval_fraction:
                    ids, answer = retrieval_batch(tokenizer, prose, stage_chat, s.batch_size, s.seq_len,
                                                  s.chat_fraction, s.retrieval_fraction, seed, s.retrieval_plain,
                                                  s.retrieval_numbers)
                    return ids, answer * s.retrieval_weight
                return mixed_windows(prose, stage_chat, s.batch_size, s.seq_len, s.chat_fraction, seed)
            log = distill(student, teacher, batch_fn, plist, steps=s.steps, lr=s.lr, ce_weight=s.ce_weight,
                          minutes=s.minutes, elapsed_before=before, start_step=start, optimizer=opt, on_step=on_step,
                          progress=progress, precision=s.precision)
            summary = {"kl_first": log[0]["kl"] if log else None, "kl_last": log[-1]["kl"] if log else None}
        end_step = log[-1]["step"] if log else start
        T = recipe.cache_seq_len if s.kind == "transfer" else s.seq_len
        history.append({"stage": si, "kind": s.kind, "from_step": start, "to_step": end_step,
                        "tokens": end_step * s.batch_size * T, "seconds": round(before + time.time() - t0, 1),
                        **summary})
        say(f"[convert] stage {si} done: {json.dumps(history[-1])}")
        if wd is not None:  # the finished stage: the next run starts the next stage
            _save_state(wd, params, None, si + 1, 0, {"history": history})
        opt_state = None
        if stop_after_stage is not None and si >= stop_after_stage:
            break
    report["stages"] = history
    return student, report
