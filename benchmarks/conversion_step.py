"""Conversion step time, fp32 against bf16 autocast, side by side in one run.

The two steps the conversion recipe (``convert/recipe.py``) spends its CPU budget on, on the
default teacher converted as the shipped delta is trained (7B layout, rank-64 updates of the GLA
projections, rank-16 FFN updates):

- ``distill``: teacher forward + student forward and backward + AdamW on one window of
  ``--seq-len`` tokens (``train.distill.distill``);
- ``transfer``: one layer-wise attention-transfer step over every GLA layer on ``--batch``
  cached 512-token windows (``convert.attention_transfer``).

Each precision runs ``--rounds`` rounds, alternating (fp32, bf16, fp32, ...) so that drift of
the machine hits both alike; a round is ``--warmup`` untimed steps and ``--steps`` timed ones.
Reported: median step time per precision, tokens/s and the ratio fp32 / bf16; and, for the
distillation step, the KL of the same batch computed both ways (bf16 must not change the loss
it optimises beyond noise).

    python3 benchmarks/conversion_step.py [--seq-len 1024] [--rounds 3] [--steps 3]
        [--out benchmarks/results/conversion_step.json]

``--tiny``: a random 2-layer stand-in teacher (the test).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="windows per attention-transfer step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default="benchmarks/results/conversion_step.json")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.warmup) < 1:
        p.error("--rounds, --steps and --warmup must be >= 1")
    torch.set_num_threads(args.threads)

    from spikingbrain.convert import recipe as R
    from spikingbrain.convert.attention_transfer import attention_transfer, collect_teacher_io
    from spikingbrain.convert.delta import gla_layers
    from spikingbrain.demo import shipped_ids
    from spikingbrain.evaluation.bench import run_info
    from spikingbrain.train.distill import autocast, distill
    from spikingbrain.train.objective import distill_kl

    info = run_info("conversion_step", "conversion_step.py", argv, threads=args.threads)
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from conversion_ablation import tiny_teacher

        teacher, tok = tiny_teacher()
        recipe = R.ConversionRecipe(sliding_window=16, lora_rank=4, stages=[
            R.Stage("distill", steps=1, lr=1e-4, batch_size=1, ffn_lora_rank=2)])
        cache_len = 32
    else:
        from spikingbrain.convert.teacher import load_teacher

        teacher, tok = load_teacher()
        recipe = R.LOWRANK  # rank-64 LoRA steps from the bare conversion (needs no init_delta)
        cache_len = 512
    for q in teacher.parameters():
        q.requires_grad_(False)
    prose = shipped_ids(tok, "train", max_tokens=200_000)
    student, params = R.prepare_student(teacher, tok, recipe, prose)
    plist = list(params.values())
    T = args.seq_len
    batch = R.windows(prose, 1, T, torch.Generator().manual_seed(0))
    seqs = R.windows(prose, 2 * args.batch, cache_len, torch.Generator().manual_seed(1))
    io = collect_teacher_io(teacher, seqs.split(args.batch), gla_layers(student), progress=False)
    n = args.warmup + args.steps
    transfer = R.Stage("transfer", steps=n, lr=1e-6, batch_size=args.batch)  # what a transfer stage trains

    def step_times(log):  # the timed steps: each record's elapsed time minus the previous one's
        t = [r["elapsed_s"] for r in log]
        return [t[i] - t[i - 1] for i in range(args.warmup, n)]

    times = {(kind, prec): [] for kind in ("distill", "transfer") for prec in ("fp32", "bf16")}
    for _ in range(args.rounds):
        for prec in ("fp32", "bf16"):
            log = distill(student, teacher, lambda s: batch, plist, steps=n, lr=1e-6, progress=False, precision=prec)
            times["distill", prec] += step_times(log)
            log = attention_transfer(student, io, steps=n, batch_size=args.batch, lr=1e-6, progress=False,
                                     params=R.stage_params(params, transfer), precision=prec)
            times["transfer", prec] += step_times(log)
    kl = {}
    with torch.no_grad():
        for prec in ("fp32", "bf16"):
            with autocast(prec, "cpu"):
                t_logits = teacher(input_ids=batch).logits
                s_logits = student(input_ids=batch).logits
            kl[prec] = float(distill_kl(s_logits, t_logits) / batch.numel())
    rows = []
    for kind, tokens in (("distill", T), ("transfer", args.batch * cache_len)):
        med = {prec: statistics.median(times[kind, prec]) for prec in ("fp32", "bf16")}
        rows.append({"step": kind, "tokens_per_step": tokens,
                     "fp32_s": round(med["fp32"], 3), "bf16_s": round(med["bf16"], 3),
                     "fp32_tokens_per_s": round(tokens / med["fp32"], 1),
                     "bf16_tokens_per_s": round(tokens / med["bf16"], 1),
                     "speedup_bf16": round(med["fp32"] / med["bf16"], 2),
                     **({"kl_fp32": round(kl["fp32"], 4), "kl_bf16": round(kl["bf16"], 4)} if kind == "distill" else {})})
        print(json.dumps(rows[-1]), flush=True)
    res = {**info, "seq_len": T, "rounds": args.rounds, "steps": args.steps, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
