"""The trainer: one recipe, one loop, on 1 or N processes.

Per optimizer step ``s`` (0-indexed): the stage's sequence length, one global batch from
``TrainData``, the LR ``lr_at(s)``; then for each micro-batch a forward under autocast (bf16 if
``precision: bf16``), the loss of ``objective.py`` scaled so that gradients equal those of the
mean over every target token of the global batch, and a backward; then the gradient norm
(clipped to ``optim.grad_clip`` when > 0) and an AdamW step (decoupled weight decay on
matrices only; ``fused`` on CUDA). A step whose gradient norm is NaN/Inf is *not* applied:
gradients are dropped, the step still advances (data and schedule move on) and
``skipped`` counts it.

Metrics (``metrics.py``), periodic held-out evaluation, checkpoints every
``checkpoint.every`` steps and at the end (``checkpoint.py``), and a final ``save_pretrained``
export to ``{out}/final`` when the run reaches the recipe's last step.

With a recipe ``spiking`` section the student is spikified in its training form
(``models.apply_spiking``, before the trainable selection / LoRA) and every forward, training
and evaluation, is the spiking one; the export is unspikified first (plain float weights).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train import distributed as D
from spikingbrain.train.checkpoint import export_model, latest_checkpoint, load_checkpoint, save_checkpoint
from spikingbrain.train.data import TrainData
from spikingbrain.train.distill import autocast
from spikingbrain.train.encode import IGNORE, DocumentEncoder
from spikingbrain.train.metrics import MetricsLogger
from spikingbrain.train.models import (apply_spiking, build_student, distillation_teacher, load_teachers,
                                       resolve_tokenizer)
from spikingbrain.train.objective import aux_loss, token_losses
from spikingbrain.train.recipe import Recipe, check_world
from spikingbrain.train.schedule import lr_at
from spikingbrain.train.trainable import select_trainable


@dataclass
class TrainResult:
    step: int
    skipped: int
    tokens: int
    last_loss: float | None
    eval_loss: float | None
    checkpoint: Path | None
    final: Path | None
    history: list[dict] = field(default_factory=list)  # this process's train records


def train(recipe: Recipe, *, resume: bool | str = False, max_steps: int | None = None,
          device: str | None = None, progress: bool | None = None) -> TrainResult:
    """Run ``recipe``. ``resume``: True (latest checkpoint under the run, if any) or a
    checkpoint directory. ``max_steps``: stop when the global step reaches it (the LR schedule
    still spans the recipe's steps)."""
    info = D.init_distributed(recipe.distributed, device, recipe.context_parallel)
    try:
        return Trainer(recipe, info, progress=progress).run(resume=resume, max_steps=max_steps)
    finally:
        D.shutdown(info)


def _autocast(recipe: Recipe, device: torch.device):
    return autocast(recipe.precision, device)


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on parameters with >= 2 dims (not norms, biases, gate scalars)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    o = recipe.optim
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=True if device.type == "cuda" else None)


class Trainer:
    def __init__(self, recipe: Recipe, info: D.DistInfo, progress: bool | None = None):
        self.r, self.info = recipe, info
        self.show = recipe.log.progress if progress is None else progress
        self.out = Path(recipe.out)
        self.ckpt_root = Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else self.out / "checkpoints"

    # ------------------------------------------------------------------ setup
    def setup(self, resume) -> None:
        r, info = self.r, self.info
        check_world(r, info.world_size)
        self.resume_from = None
        if resume:
            self.resume_from = Path(resume) if isinstance(resume, (str, Path)) else latest_checkpoint(self.ckpt_root)
            if isinstance(resume, (str, Path)) and not (self.resume_from / "trainer.json").is_file():
                raise SpikingBrainError(f"--resume {resume}: not a complete checkpoint directory")
            if self.resume_from is None and info.is_main:
                print(f"--resume: no checkpoint under {self.ckpt_root} yet; starting from step 0")
        torch.manual_seed(r.seed)
        teachers = load_teachers(r)
        self.tokenizer = resolve_tokenizer(r, teachers)
        encoder = DocumentEncoder(self.tokenizer, r.objective.type, r.data.text_field, r.data.messages_field)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else encoder.eos_id
        self.data = TrainData(r.data, encoder, int(pad), seed=r.seed, batch_size=r.optim.batch_size,
                              grad_accum=r.optim.grad_accum, rank=info.dp_rank, world_size=info.dp_size,
                              show_progress=self.show and info.is_main)
        calib = None
        if r.model.convert is not None and self.resume_from is None:
            calib = torch.from_numpy(self.data.peek(min(r.seq_len_at(0), 256), 4)["input_ids"])
        model = build_student(r, self.tokenizer, teachers, calib)
        if info.cp_size > 1 and not hasattr(getattr(model, "model", None), "compute_sink_kv"):
            raise SpikingBrainError("recipe field context_parallel: needs a SpikingBrain student model")
        n_spiking = apply_spiking(model, r)  # before LoRA: a spike-aware adapter wraps the SpikingLinear
        torch.manual_seed(r.seed + 1)  # LoRA init, independent of how the model was built
        self.counts = select_trainable(model, r.trainable.params, r.trainable.lora)
        if r.spiking is not None:
            self.counts["spiking_layers"] = n_spiking
        model.to(info.device)
        if r.grad_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.module = model
        self.model = D.wrap_model(model, info)
        self.optimizer = make_optimizer(self.model, r, info.device)
        # checkpoints and gradient sync address self.model; forwards go through the compiled one
        self.fwd = torch.compile(self.model) if r.compile else self.model
        self.teacher = distillation_teacher(r, teachers, info.device)
        del teachers
        self.step, self.skipped, self.tokens = 0, 0, 0
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from, self.model, self.optimizer, info)
            self.step, self.skipped, self.tokens = state["step"], state["skipped"], state["tokens"]
            self.data.load_state_dict(state["data"])
            if state.get("batch_size") != r.optim.batch_size and info.is_main:
                print(f"warning: resuming with optim.batch_size={r.optim.batch_size} (checkpoint: "
                      f"{state.get('batch_size')}); the run will not match an uninterrupted one")
        self.log = MetricsLogger(r.log.jsonl or self.out / "metrics.jsonl",
                                 self.out / "tensorboard" if r.log.tensorboard else None, enabled=info.is_main)

    # ------------------------------------------------------------------ one step
    def _forward(self, model, mb: dict[str, torch.Tensor]):
        kw = {"use_cache": False}  # no cache: HF models then mask packed documents apart
        if getattr(self.module.config, "output_router_logits", None) is not None:
            kw["output_router_logits"] = True
        return model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], **kw)

    def _context_parallel_losses(self, mb: dict[str, torch.Tensor]):
        """``(token losses, aux)`` of this rank's shard of the micro-batch's sequences
        (``spikingbrain.parallel.context_parallel_loss``). The MoE aux share is scaled by the
        context size so that DDP's average over the world weighs it as without sharding."""
        from spikingbrain.parallel import context_parallel_loss, shard_bounds

        info, o = self.info, self.r.objective
        t_logits = None
        if self.teacher is not None:  # the teacher runs unsharded; its logits for this shard
            s, e = shard_bounds(mb["input_ids"].shape[1], info.cp_size)[info.rank % info.cp_size]
            with torch.no_grad():
                t_logits = self._forward(self.teacher, mb).logits[:, s:e]
        res = context_parallel_loss(self.fwd, mb["input_ids"], mb["labels"], position_ids=mb["position_ids"],
                                    group=info.cp_group, teacher_logits=t_logits, kl_temperature=o.kl_temperature)
        aux = res.aux * info.cp_size if res.aux is not None else None
        return {"ce_sum": res.ce_sum, "kl_sum": res.kl_sum, "n": res.n}, aux

    def train_step(self, seq_len: int, lr: float) -> dict:
        r, info = self.r, self.info
        batch = self.data.next_batch(seq_len)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        o = r.objective
        norm = info.world_size / max(1, batch.n_targets)
        sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # ce, kl, targets, aux
        last = len(batch.micro) - 1
        for i, mb in enumerate(batch.micro):
            mb = {k: v.to(info.device, non_blocking=True) for k, v in mb.items()}
            with D.no_grad_sync(self.model, info, sync=i == last), _autocast(r, info.device):
                if info.cp_size > 1:
                    tl, aux = self._context_parallel_losses(mb)
                else:
                    out = self._forward(self.fwd, mb)
                    t_logits = None
                    if self.teacher is not None:
                        with torch.no_grad():
                            t_logits = self._forward(self.teacher, mb).logits
                    tl = token_losses(out.logits, mb["labels"], t_logits, o.kl_temperature)
                    aux = aux_loss(self.module, out)
                loss = (o.ce_weight * tl["ce_sum"] + o.kl_weight * tl["kl_sum"]) * norm
                if aux is not None:
                    loss = loss + aux.float() / len(batch.micro)
                loss.backward()
            sums += torch.stack([tl["ce_sum"].detach(), tl["kl_sum"].detach(), tl["n"].to(sums),
                                 (aux.detach().float() / len(batch.micro)) if aux is not None else sums.new_zeros(())]).to(sums)
        D.no_grad_sync(self.model, info, sync=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = r.optim.grad_clip if r.optim.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        gnorm = float(gnorm)
        applied = math.isfinite(gnorm)
        if applied:
            self.optimizer.step()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        D.all_reduce_sum(sums, info)
        ce_sum, kl_sum, n, aux_sum = sums.tolist()
        n = max(n, 1.0)
        ce, kl, aux_mean = ce_sum / n, kl_sum / n, aux_sum / info.world_size
        return {"loss": o.ce_weight * ce + o.kl_weight * kl + aux_mean, "ce": ce, "kl": kl, "aux": aux_mean,
                "grad_norm": gnorm, "applied": applied, "n_tokens": batch.n_tokens, "seq_len": seq_len}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, seq_len: int) -> dict | None:
        """Mean CE per target token over the held-out rows (``eval.max_tokens``); every rank
        runs the same number of forwards (FSDP needs it), padding with rows that count 0."""
        rows = self.data.valid_rows(seq_len, self.r.eval.max_tokens)
        if rows is None:
            return None
        info = self.info
        total = rows["input_ids"].shape[0]
        per = -(-total // info.world_size)
        lo = info.rank * per
        mine = {k: torch.from_numpy(v[lo:lo + per]) for k, v in rows.items()}
        short = per - mine["input_ids"].shape[0]
        if short:
            filler = {k: torch.from_numpy(v[:1]).expand(short, -1) for k, v in rows.items()}
            filler["labels"] = torch.full_like(filler["labels"], IGNORE)
            mine = {k: torch.cat([mine[k], filler[k]]) for k in mine}
        b = max(1, self.r.optim.batch_size // self.r.optim.grad_accum // info.world_size)
        sums = torch.zeros(2, dtype=torch.float64, device=info.device)
        self.model.eval()
        try:
            for i in range(0, per, b):
                mb = {k: v[i:i + b].to(info.device) for k, v in mine.items()}
                with _autocast(self.r, info.device):
                    out = self._forward(self.fwd, mb)
                tl = token_losses(out.logits, mb["labels"])
                sums += torch.stack([tl["ce_sum"].double(), tl["n"].double()])
        finally:
            self.model.train()
        D.all_reduce_sum(sums, info)
        loss = float(sums[0] / sums[1].clamp_min(1))
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(sums[1])}

    # ------------------------------------------------------------------ run
    def _trainer_state(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "tokens": self.tokens, "data": self.data.state_dict(),
                "world_size": self.info.world_size, "distributed": self.r.distributed,
                "batch_size": self.r.optim.batch_size, "total_steps": self.r.total_steps}

    def _save(self) -> Path:
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self._trainer_state(),
                               self.info, self.r.checkpoint.keep_last)

    def run(self, resume=False, max_steps: int | None = None) -> TrainResult:
        self.setup(resume)
        r, info = self.r, self.info
        total = r.total_steps
        stop = total if max_steps is None else min(total, max_steps)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(r.to_dict(), indent=1))
        self.log.log("resume" if self.resume_from else "start", self.step, total_steps=total,
                     world_size=info.world_size, **self.counts,
                     checkpoint=str(self.resume_from) if self.resume_from else None)
        bar = tqdm(total=stop, initial=self.step, unit="step", disable=not (self.show and info.is_main),
                   dynamic_ncols=True, desc="train")
        history, last_loss, eval_res, ckpt = [], None, None, None
        window_t, window_tok = time.perf_counter(), 0
        saved_at = evaluated_at = None
        while self.step < stop:
            lr = lr_at(self.step, total, r.optim)
            m = self.train_step(r.seq_len_at(self.step), lr)
            self.step += 1
            self.tokens += m["n_tokens"]
            window_tok += m["n_tokens"]
            last_loss = m["loss"]
            if self.step % r.log.every == 0 or self.step == stop:
                now = time.perf_counter()
                tps = window_tok / max(now - window_t, 1e-9)
                window_t, window_tok = now, 0
                rec = {"loss": m["loss"], "ce": m["ce"], "kl": m["kl"], "aux": m["aux"], "lr": lr,
                       "grad_norm": m["grad_norm"], "tokens": self.tokens, "tokens_per_s": tps,
                       "seq_len": m["seq_len"], "skipped": self.skipped}
                history.append({"step": self.step, **rec})
                self.log.log("train", self.step, **rec)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            if r.eval.every and self.step % r.eval.every == 0:
                eval_res = self._eval_and_log()
                evaluated_at = self.step
            if r.checkpoint.every and self.step % r.checkpoint.every == 0:
                ckpt, saved_at = self._save(), self.step
        bar.close()
        if evaluated_at != self.step:
            eval_res = self._eval_and_log() or eval_res
        if saved_at != self.step:
            ckpt = self._save()
        final = None
        if r.export and self.step == total:
            if r.spiking is not None:  # export plain nn.Linear float weights (spikify them to run spiking)
                from spikingbrain.spiking.spikify import unspikify

                unspikify(self.module)
            final = export_model(self.model, self.tokenizer, self.out / "final", info)
        self.log.log("end", self.step, skipped=self.skipped, tokens=self.tokens,
                     eval_loss=eval_res["loss"] if eval_res else None)
        self.log.close()
        return TrainResult(step=self.step, skipped=self.skipped, tokens=self.tokens, last_loss=last_loss,
                           eval_loss=eval_res["loss"] if eval_res else None, checkpoint=ckpt, final=final,
                           history=history)

    def _eval_and_log(self) -> dict | None:
        res = self.evaluate(self.r.seq_len_at(max(0, self.step - 1)))
        if res is not None:
            self.log.log("eval", self.step, **res)
            if self.show and self.info.is_main:
                tqdm.write(f"step {self.step}: held-out loss {res['loss']:.4f} (ppl {res['ppl']:.2f})")
        return res
