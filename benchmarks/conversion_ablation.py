"""Which conversion ideas pay on a CPU: short real runs of recipe variants, each measured the same way.

Each variant is the demo's from-scratch recipe (``convert/recipe.py`` ``DEMO``) with one thing
changed, run on the same time budget; then top-1 agreement and KL with the teacher on held-out
text at a 2k context and chat fidelity (teacher-forced top-1 on the teacher's answers to the
held-out instructions). Rows: method, tokens (attention transfer per layer, distillation), CPU
minutes (CPU time the training process used, all threads: on a shared machine a wall-clock budget
buys fewer of them), top-1, KL, chat fidelity.

Variants: ``prose-full`` (the old method: prose only, full-rank projections), ``chat-full``
(+ chat data; forwards in fp32, as every row but the last), ``chat-lowrank`` (rank-64 updates instead, as the shipped delta),
``chat-lowrank-transfer`` (attention transfer only, no end-to-end distillation),
``chat-full-distill-heavy`` / ``chat-full-transfer-heavy`` (the same budget split 40/60 or
85/15 between transfer and distillation instead of 70/30), ``chat-full-550`` (all 550 shipped
chat examples instead of the first 64), ``chat-full-bf16`` (the forwards under bf16 autocast),
``chat-full-bf16-gla`` (bf16 operands in the chunked GLA's matmuls too),
``chat-full-bf16-gla-cache96`` (and 96 cached transfer sequences instead of 48),
``chat-full-bf16-gla-lr2x`` (and twice the attention-transfer learning rate: the DEMO recipe now),
``chat-full-bf16-gla-lr4x`` (four times).

    python3 benchmarks/conversion_ablation.py [--variants prose-full,chat-lowrank] [--minutes 6]
        [--tokens 4096] [--out benchmarks/results/conversion_ablation.json]

``--tiny`` runs every variant on a 2-layer random stand-in teacher in seconds (the test).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

# The rows measured before the recipe had a precision ran in fp32, and before DEMO's transfer LR
# was raised at 1e-3, so a variant's precision is fp32 and its transfer LR 1e-3 unless it says
# otherwise: each still changes one thing against its row above. chat-full-bf16-gla-lr2x is DEMO.
VARIANTS = {
    "prose-full": {"lora_rank": 0, "cache_chat_fraction": 0.0, "chat_fraction": 0.0},
    "chat-full": {"lora_rank": 0},
    "chat-lowrank": {"lowrank": True},
    "chat-lowrank-transfer": {"lowrank": True, "no_distill": True},
    "chat-full-distill-heavy": {"lora_rank": 0, "transfer_share": 0.4},
    "chat-full-transfer-heavy": {"lora_rank": 0, "transfer_share": 0.85},
    "chat-full-550": {"lora_rank": 0, "chat_examples": 550},
    "chat-full-bf16": {"lora_rank": 0, "precision": "bf16"},
    "chat-full-bf16-gla": {"lora_rank": 0, "precision": "bf16-gla"},
    "chat-full-bf16-gla-cache96": {"lora_rank": 0, "precision": "bf16-gla", "cache_sequences": 96},
    "chat-full-bf16-gla-lr2x": {"lora_rank": 0, "precision": "bf16-gla", "transfer_lr": 2e-3},
    "chat-full-bf16-gla-lr4x": {"lora_rank": 0, "precision": "bf16-gla", "transfer_lr": 4e-3},
}


def variant_recipe(base, name: str, minutes: float | None):
    from spikingbrain.errors import SpikingBrainError

    if name not in VARIANTS:
        raise SpikingBrainError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    r = copy.deepcopy(base)
    v = VARIANTS[name]
    if "lora_rank" in v:
        r.lora_rank = v["lora_rank"]
    if v.get("lowrank"):
        r.lora_rank = r.lora_rank or 64  # the shipped delta's rank
    if "cache_chat_fraction" in v:
        r.cache_chat_fraction = v["cache_chat_fraction"]
    if "chat_examples" in v:
        r.chat_examples = v["chat_examples"]
    if "cache_sequences" in v:
        r.cache_sequences = v["cache_sequences"]
    stages = [s for s in r.stages if not (v.get("no_distill") and s.kind == "distill")]
    total = sum(s.minutes or 0 for s in stages)
    if "transfer_share" in v:  # the same total budget, split differently between the two kinds
        by_kind = {k: sum(s.minutes or 0 for s in stages if s.kind == k) for k in ("transfer", "distill")}
        share = {"transfer": v["transfer_share"], "distill": 1 - v["transfer_share"]}
        for s in stages:
            s.minutes = (s.minutes or 0) / by_kind[s.kind] * share[s.kind] * total
    for s in stages:
        s.precision = v.get("precision", "fp32")
        if s.kind == "transfer":
            s.lr = v.get("transfer_lr", 1e-3)
        if "chat_fraction" in v and s.kind == "distill":
            s.chat_fraction = v["chat_fraction"]
        if minutes is not None and total:
            s.minutes = (s.minutes or 0) * minutes / total
    r.stages = stages
    return r


def measure(student, teacher, tok, tokens: int, context: int, chat: int) -> dict:
    from spikingbrain.convert.chat_data import encode_example, load_chat
    from spikingbrain.evaluation.agreement import teacher_agreement
    from spikingbrain.evaluation.texts import shipped_texts

    with torch.no_grad():
        q = teacher_agreement(student, teacher, tok, shipped_texts("valid"), context_length=context, max_tokens=tokens)
        agree = total = 0
        for ex in load_chat("valid")[:chat]:  # teacher-forced fidelity (no generation: cheap)
            ids, mask = encode_example(tok, ex)
            x = torch.tensor(ids)[None]
            lm, lt = student(input_ids=x).logits[0], teacher(input_ids=x).logits[0]
            v = min(lm.shape[-1], lt.shape[-1])
            pos = torch.tensor([j - 1 for j, m in enumerate(mask) if m and j > 0])
            agree += int((lm[pos, :v].argmax(-1) == lt[pos, :v].argmax(-1)).sum())
            total += pos.numel()
    return {"top1": q["top1"], "kl": q["kl"], "ppl_ratio": q["model_ppl"] / q["teacher_ppl"], "tokens_scored": q["tokens"],
            "chat_fidelity": agree / max(1, total)}


def tiny_teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain.train.tokenizer import default_teacher_tokenizer

    tok = default_teacher_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--minutes", type=float, default=None, help="training budget per variant (default: DEMO's)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored at --context")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--chat", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a random 2-layer stand-in teacher (for the test)")
    p.add_argument("--out", default="benchmarks/results/conversion_ablation.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from spikingbrain.convert.recipe import DEMO, ConversionRecipe, Stage, run_conversion
    from spikingbrain.evaluation.bench import run_info

    info = run_info("conversion_ablation", "conversion_ablation.py", argv, threads=args.threads)
    if args.tiny:
        teacher, tok = tiny_teacher()
        base = ConversionRecipe(sliding_window=16, lora_rank=4, cache_sequences=4, cache_seq_len=32, stages=[
            Stage("transfer", steps=3, lr=1e-3, batch_size=2, minutes=1),
            Stage("distill", steps=2, lr=1e-4, batch_size=2, seq_len=32, chat_fraction=0.5, minutes=1)])
    else:
        from spikingbrain.convert.teacher import load_teacher

        teacher, tok = load_teacher()
        base = DEMO
    teacher.eval()
    rows = []
    for name in [v for v in args.variants.split(",") if v]:
        r = variant_recipe(base, name, args.minutes)
        t0, c0 = time.time(), time.process_time()
        student, rep = run_conversion(teacher, tok, r, None, progress=False, say=lambda m: None)
        train_s, cpu_s = time.time() - t0, time.process_time() - c0
        m = measure(student, teacher, tok, args.tokens, args.context, args.chat)
        tok_t = sum(h["tokens"] for h in rep["stages"] if h["kind"] == "transfer")
        tok_d = sum(h["tokens"] for h in rep["stages"] if h["kind"] == "distill")
        rows.append({"variant": name, "recipe": r.to_dict(), "stages": rep["stages"], "transfer_tokens": tok_t,
                     "distill_tokens": tok_d, "train_seconds": round(train_s, 1),
                     "cpu_minutes": round(cpu_s / 60, 1), **m})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("recipe", "stages")}), flush=True)
        # after every row: a long ablation cut short keeps the rows it measured
        res = {**info, "context": args.context, "rows": rows}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
