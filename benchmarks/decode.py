"""Decode speed versus context length: a SpikingBrain model against its teacher, in one run.

Metric: milliseconds per generated token (batch 1, greedy), median over ``--tokens`` decode
steps after ``--warmup`` steps, at a decode state that has already seen ``L`` tokens.

How each model reaches context ``L`` without a quadratic (or merely slow) prefill:
- teacher (transformers): its ``DynamicCache`` is filled with ``L`` random keys/values per
  layer; attention then costs what it costs at length ``L`` (values do not change the work).
- SpikingBrain: the GLA states get random values and the SWA ring buffers are filled with
  ``w`` random keys/values at positions ``L-w .. L-1``; its per-token cost does not depend on
  ``L`` by construction, which is what the numbers should show.
- llama.cpp (optional, if ``llama_cpp`` is importable and ``--gguf`` or the default teacher's
  GGUF is found): a real prefill of ``L`` random tokens, so only contexts up to
  ``--llama-cpp-max-context`` are run.

Printed: one row per context with ms/token for each model and the speed ratios
(teacher ms / SpikingBrain ms; > 1 means SpikingBrain is faster). Paths: SpikingBrain in fp32
and, with ``--int8``, int8 dynamic quantization; ``--bf16`` adds a bf16 row.

Usage (defaults run in a few minutes on 2 cores):
    PYTHONPATH=src python3 benchmarks/decode.py [--model DIR] [--teacher default|DIR|FILE.gguf]
        [--contexts 1024,4096,16384] [--tokens 8] [--int8] [--bf16] [--device cpu|cuda] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SpikingBrain model dir (default: spikingbrain-demo/model, "
                   "else the teacher converted on the fly, untrained: speed does not depend on the weights)")
    p.add_argument("--teacher", default="default", help="teacher: 'default' (SmolLM2-135M GGUF), a dir or a .gguf")
    p.add_argument("--contexts", default="1024,4096,16384", help="comma-separated context lengths")
    p.add_argument("--tokens", type=int, default=8, help="timed decode steps per context")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="time the transformers teacher and SpikingBrain this many times over all contexts, in "
                        "turn, and keep each one's fastest round (a shared machine's noise drifts over minutes; "
                        "llama.cpp, whose prefill is the slow part, runs once)")
    p.add_argument("--teacher-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--int8", action="store_true", help="also time SpikingBrain with int8 linears")
    p.add_argument("--bf16", action="store_true", help="also time SpikingBrain in bf16")
    p.add_argument("--gguf", default=None, help="GGUF for the llama.cpp baseline (default: the default teacher's)")
    p.add_argument("--llama-cpp-max-context", type=int, default=8192)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="device of the teacher and SpikingBrain models (llama.cpp: CPU)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


from spikingbrain.evaluation.speed import fill_spikingbrain_cache, fill_teacher_cache, time_decode  # noqa: E402


def time_llama_cpp(gguf: str, L: int, tokens: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=L + tokens + 16, n_threads=threads, n_batch=512, verbose=False)
    g = torch.Generator().manual_seed(0)
    llm.eval(torch.randint(10, 1000, (L,), generator=g).tolist())
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        llm.eval([42])
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


# --------------------------------------------------------------------------- main
def load_models(args):
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.serve.loading import DEFAULT_MODEL_DIR

    tdtype = torch.bfloat16 if args.teacher_dtype == "bf16" else torch.float32
    teacher, _ = load_teacher(args.teacher, dtype=tdtype)
    teacher.eval()
    model_dir = args.model or (str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / "config.json").is_file() else None)
    if model_dir is not None:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
        name = model_dir
    else:
        from spikingbrain import convert_from_transformer

        source = teacher if tdtype == torch.float32 else load_teacher(args.teacher, dtype=torch.float32)[0]
        student = convert_from_transformer(copy.deepcopy(source)).eval()
        name = "teacher converted (untrained)"
    return teacher, student, name


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    import spikingbrain  # noqa: F401  (Auto registration)
    from spikingbrain.layers.projections import fuse_projections
    from spikingbrain.serve.quantize import quantize_int8

    teacher, student, name = load_models(args)
    teacher, student = teacher.to(args.device), student.to(args.device)
    fuse_projections(student)  # what `spikingbrain generate/serve` run: fused q/k/v and gate/up
    variants = {"sb_fp32": student}
    if args.bf16:
        variants["sb_bf16"] = copy.deepcopy(student).to(torch.bfloat16)
    if args.int8:
        variants["sb_int8"], method = quantize_int8(copy.deepcopy(student))
        print(f"int8 method: {method}")
    gguf = args.gguf
    try:
        import llama_cpp  # noqa: F401

        if gguf is None and args.teacher == "default":
            from spikingbrain.convert.teacher import default_teacher_path

            gguf = str(default_teacher_path())
    except ImportError:
        gguf = None
    print(f"SpikingBrain: {name}; layers {student.config.layer_types[:4]}..., window {student.config.sliding_window}")
    print(f"teacher: {args.teacher} ({args.teacher_dtype}); threads {args.threads}; llama.cpp: "
          f"{'yes' if gguf else 'not installed (pip install llama-cpp-python)'}")
    cols = ["teacher"] + list(variants) + (["llama_cpp"] if gguf else [])
    rows = []
    print("\nms/token (median)")
    print("context  " + "  ".join(f"{c:>10}" for c in cols) + "  " +
          "  ".join(f"{'teacher/' + v:>16}" for v in variants) + ("  " + f"{'llama_cpp/sb_fp32':>18}" if gguf else ""))
    best: dict[int, dict[str, float]] = {L: {} for L in contexts}
    for r in range(args.rounds):
        for L in contexts:
            got = {"teacher": time_decode(teacher, fill_teacher_cache(teacher, L), args.tokens, args.warmup)}
            for v, m in variants.items():
                got[v] = time_decode(m, fill_spikingbrain_cache(m, L), args.tokens, args.warmup)
            if r == 0 and gguf and L <= args.llama_cpp_max_context:
                got["llama_cpp"] = time_llama_cpp(gguf, L, args.tokens, args.threads)
            for c, t in got.items():
                best[L][c] = min(t, best[L].get(c, t))
            if args.rounds > 1:
                print(f"  round {r + 1}/{args.rounds} context {L}: " +
                      ", ".join(f"{c} {t:.1f}" for c, t in got.items()), flush=True)
    for L in contexts:
        row = best[L]
        cells = "  ".join(f"{row[c]:>10.2f}" if c in row else f"{'-':>10}" for c in cols)
        ratios = "  ".join(f"{row['teacher'] / row[v]:>15.2f}x" for v in variants)
        lc = (f"  {row['llama_cpp'] / row['sb_fp32']:>17.2f}x" if "llama_cpp" in row else
              (f"  {'-':>18}" if gguf else ""))
        print(f"{L:>7}  {cells}  {ratios}{lc}", flush=True)
        rows.append({"context": L, **{f"{c}_ms": row[c] for c in cols if c in row},
                     **{f"teacher_over_{v}": row["teacher"] / row[v] for v in variants}})
    if args.out:
        from spikingbrain.evaluation.bench import run_info

        result = {**run_info("decode", "decode.py", argv, args.device, args.threads), "model": name,
                  "teacher": args.teacher, "teacher_dtype": args.teacher_dtype, "tokens": args.tokens,
                  "warmup": args.warmup, "rounds": args.rounds, "window": student.config.sliding_window,
                  "layer_types": student.config.layer_types, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
