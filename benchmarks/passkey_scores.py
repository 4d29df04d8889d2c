"""How far converted models are from answering the passkey: teacher-forced scores of the key.

The passkey trial is exact match on 9 greedy continuations per length: a model either answers or
not, which hides how close a failing one is. This scores the same prompts (the same lengths,
depths and seeds as ``conversion_quality.py``) teacher-forced (``evaluation.passkey.key_score``):
the key's summed log-probability and each of its tokens' rank at its position (all 0: the key is
recalled teacher-forced), for the teacher and for each delta given, side by side.

``--restore`` also scores the first delta with each GLA layer in turn given back the teacher's
softmax attention (``conversion_layers.restored``): where a key token the student misses is lost.

    python3 benchmarks/passkey_scores.py [--delta FILE ...] [--lengths 1024,2048,4096] [--restore [LAYERS]]
        [--out benchmarks/results/extra/passkey_scores.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def summary(rows: list[dict]) -> dict:
    """Per length: the mean key log-probability, in how many trials every key token is the greedy
    choice (``recalled``), the share of key tokens that are (``token_top1``), and per key position
    (the answer's first token, then the digits) in how many trials it is (``position_top1``)."""
    out = {}
    for n in sorted({r["length"] for r in rows}):
        rs = [r for r in rows if r["length"] == n]
        out[str(n)] = {"logprob": round(statistics.fmean(r["logprob"] for r in rs), 3),
                       "recalled": sum(not any(r["ranks"]) for r in rs),
                       "token_top1": round(statistics.fmean(k == 0 for r in rs for k in r["ranks"]), 3),
                       "position_top1": [sum(r["ranks"][i] == 0 for r in rs if i < len(r["ranks"]))
                                         for i in range(max(len(r["ranks"]) for r in rs))],
                       "trials": len(rs)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delta", action="append", default=[], help="a delta to score (repeatable; default: the shipped one)")
    p.add_argument("--sliding-window", type=int, default=4096)
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--restore", nargs="?", const="all", default=None, metavar="LAYERS",
                   help="also score the first delta with each GLA layer (or each of LAYERS, e.g. 20,22) "
                        "restored to softmax attention")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/extra/passkey_scores.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from spikingbrain.convert.delta import convert_with_delta, gla_layers, shipped_delta_path
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.evaluation.bench import run_info
    from spikingbrain.evaluation.passkey import key_score, make_passkey_prompt

    info = run_info("passkey_scores", "passkey_scores.py", argv, threads=args.threads)
    t0 = time.time()
    teacher, tok = load_teacher()
    teacher.eval()
    grid = [(int(n), float(d), int(s)) for n in args.lengths.split(",") if n
            for d in args.depths.split(",") for s in args.seeds.split(",")]
    prompts = [make_passkey_prompt(tok, n, d, s) for n, d, s in grid]

    def score(model) -> list[dict]:
        return [{"length": n, "depth": d, "seed": s, "answer": pr.answer, **key_score(model, tok, pr)}
                for (n, d, s), pr in zip(grid, prompts)]

    models = {"teacher": score(teacher)}
    print("teacher:", json.dumps(summary(models["teacher"])), flush=True)
    for k, path in enumerate(args.delta or [str(shipped_delta_path())]):
        student, _ = convert_with_delta(teacher, path, tok, sliding_window=args.sliding_window)
        models[path] = score(student.eval())
        print(f"{path}:", json.dumps(summary(models[path])), flush=True)
        if args.restore and k == 0:
            from conversion_layers import restored  # the sibling benchmark (this script's directory)

            layers = gla_layers(student) if args.restore == "all" else [int(i) for i in args.restore.split(",")]
            for i in layers:
                name = f"{path} layer {i} restored"
                models[name] = score(restored(student, teacher, tok, i))
                print(f"{name}:", json.dumps(summary(models[name])), flush=True)
        del student
    res = {**info, "seconds": round(time.time() - t0, 1),
           "summary": {k: summary(v) for k, v in models.items()}, "rows": models}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
