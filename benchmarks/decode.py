"""Decode speed versus context length, and batched decode throughput: SpikingBrain against
llama.cpp and its transformers teacher, every system measured the same way in one run.

Metric: milliseconds per generated token (batch 1, greedy), median over ``--tokens`` decode
steps after ``--warmup`` steps, at a decode state that has already seen ``L`` tokens. Each
system is timed ``--rounds`` times, the rounds interleaved (round 1 of every system at every
context, then round 2, ...), and keeps its fastest round: a shared machine's noise drifts over
minutes, and the same rule for everyone keeps single noisy rounds from deciding a ratio.

Every system runs at its fastest settings on this CPU, with ``--threads`` threads:
- teacher (transformers): every dtype in ``--teacher-dtypes`` is timed, the faster is reported;
  its ``DynamicCache`` holds ``L`` random keys/values per layer (attention costs what it costs).
- SpikingBrain: the model's own step (``sb_int8``: dynamic int8 linears, today's ``--int8``)
  and the lean step (``lean_int8``: int8 weights, bf16 window, ``torch.compile``d; more with
  ``--variants``). GLA states are random and the sliding windows full of random keys at
  positions ``L-w .. L-1``; the per-token cost does not depend on ``L`` by construction.
- llama.cpp (llama-cpp-python, ``pip install -e .[bench]``) on the teacher's GGUF (the default
  teacher's is Q4_1; the quantization is recorded): a real prefill of ``L`` random tokens, then
  decode; ``flash_attn`` on and off are both timed and the faster kept (both recorded).

``--batch-sizes 1,4,16`` adds decode throughput (tokens/s) of ``B`` sequences decoded together
at context ``--batch-context``: the lean step over ``B`` rows against llama.cpp's batched
decode (``B`` sequence ids in one ``llama_decode``), best of the same rounds.

``--quiet-check`` samples the CPU time of other processes around every timed segment
(``spikingbrain.evaluation.load``) and marks the run invalid (``"valid": false`` in the JSON,
exit code 3) when any segment saw more than ``--quiet-threshold`` cores used by others.

Usage (see BENCHMARKS.md for the recorded commands):
    PYTHONPATH=src python3 benchmarks/decode.py --contexts 1024,8192,32768 --rounds 3 --threads 2 \\
        --quiet-check --out benchmarks/results/decode_cpu.json
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

VARIANTS = {  # name: (lean weights or None for the model's own step, window dtype, model int8)
    "sb_fp32": (None, None, False),
    "sb_int8": (None, None, True),
    "lean_fp32": ("float", "fp32", False),
    "lean_int8": ("int8", "bf16", False),
    "lean_int8_kv8": ("int8", "int8", False),
    "lean_int4": ("int4", "bf16", False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SpikingBrain model dir (default: spikingbrain-demo/model, "
                   "else the teacher converted on the fly, untrained: speed does not depend on the weights)")
    p.add_argument("--teacher", default="default", help="teacher: 'default' (SmolLM2-135M GGUF), a dir or a .gguf")
    p.add_argument("--contexts", default="1024,8192,32768", help="comma-separated context lengths")
    p.add_argument("--tokens", type=int, default=8, help="timed decode steps per context and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each system keeps its fastest")
    p.add_argument("--variants", default="sb_fp32,sb_int8,lean_int8",
                   help=f"SpikingBrain variants: {','.join(VARIANTS)} (lean_*: CPU; skipped for models the lean step "
                        "does not support)")
    p.add_argument("--teacher-dtypes", default="fp32,bf16", help="teacher dtypes to time (the faster is reported); "
                   "empty: no teacher")
    p.add_argument("--teacher-max-context", type=int, default=32768)
    p.add_argument("--no-compile", action="store_true", help="run the lean step eagerly")
    p.add_argument("--gguf", default=None, help="GGUF for the llama.cpp baseline (default: the default teacher's)")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--llama-cpp-max-context", type=int, default=32768)
    p.add_argument("--flash-attn", default="on,off", help="llama.cpp flash_attn settings to time (the faster is kept)")
    p.add_argument("--batch-sizes", default="", help="e.g. 1,4,16: batched decode throughput (empty: skip)")
    p.add_argument("--batch-context", type=int, default=1024)
    p.add_argument("--batch-variants", default="lean_int8", help="lean variants timed in the batch part")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="device of the teacher and the model's own step (lean and "
                   "llama.cpp: CPU)")
    p.add_argument("--quiet-check", action="store_true", help="mark the run invalid if other processes used the CPU")
    p.add_argument("--quiet-threshold", type=float, default=0.25, help="cores other processes may use (--quiet-check)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


from spikingbrain.evaluation.load import LoadMeter  # noqa: E402
from spikingbrain.evaluation.speed import fill_spikingbrain_cache, fill_teacher_cache, time_decode  # noqa: E402


def _median_ms(step, tokens: int, warmup: int) -> float:
    times = []
    for i in range(warmup + tokens):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


# --------------------------------------------------------------------------- systems
def load_models(args):
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.serve.loading import DEFAULT_MODEL_DIR

    teachers = {}
    for d in [d for d in args.teacher_dtypes.split(",") if d]:
        teachers[d] = load_teacher(args.teacher, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[d])[0].eval()
    model_dir = args.model or (str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / "config.json").is_file() else None)
    if model_dir is not None:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
        name = model_dir
    else:
        from spikingbrain import convert_from_transformer

        source = teachers.get("fp32") or load_teacher(args.teacher, dtype=torch.float32)[0]
        student = convert_from_transformer(copy.deepcopy(source)).eval()
        name = "teacher converted (untrained)"
    return teachers, student, name


def build_variants(student, names, compile_, device):
    from spikingbrain.decode import LeanDecoder, Unsupported
    from spikingbrain.layers.projections import fuse_projections
    from spikingbrain.serve.quantize import quantize_int8

    fuse_projections(student)  # what `spikingbrain generate/serve` run: fused q/k/v and gate/up
    out = {}
    for n in names:
        weights, kv, int8 = VARIANTS[n]
        if weights is None:
            out[n] = (quantize_int8(copy.deepcopy(student))[0] if int8 else student.to(device), None)
            continue
        if device != "cpu":
            print(f"{n}: skipped (the lean step is timed on CPU)")
            continue
        try:
            dec = LeanDecoder(student, weights, kv)
        except Unsupported as e:
            print(f"{n}: skipped ({e})")
            continue
        if compile_:
            dec.compile()
        out[n] = (student, dec)  # prefill (the cache filling) runs the fp32 model
    return out


def time_variant(model, dec, L: int, tokens: int, warmup: int, rows: int = 1) -> float:
    """Median ms of one decode step of ``rows`` rows at context ``L``."""
    cache = fill_spikingbrain_cache(model, L)
    if dec is None:
        if rows != 1:
            raise ValueError("the model's own step is timed at batch 1 here")
        return time_decode(model, cache, tokens, warmup)
    from spikingbrain.decode import LeanState

    state = LeanState.from_cache(cache, dec)
    if rows > 1:
        state = LeanState.cat([state] + [state.select([0]) for _ in range(rows - 1)])
    tok = torch.ones(rows, dtype=torch.long)
    return _median_ms(lambda: dec.step(state, tok), tokens, warmup)


class LlamaCpp:
    """llama.cpp contexts kept across rounds (a long prefill is done once per context, flash
    setting and batch size; each round then decodes ``tokens`` more, a negligible shift)."""

    def __init__(self, gguf: str, threads: int) -> None:
        self.gguf, self.threads, self.runners, self.prefill = gguf, threads, {}, {}

    def time(self, L: int, fa: bool, tokens: int, warmup: int, seqs: int = 1) -> float:
        from llama_cpp_decode import Runner

        key = (L, fa, seqs)
        if key not in self.runners:
            self.runners[key] = Runner(self.gguf, seqs, L, self.threads, fa, extra=4 * (tokens + warmup) + 64)
            self.prefill[key] = self.runners[key].prefill_seconds
        r = self.runners[key]
        return _median_ms(r.step, tokens, warmup)

    def close(self) -> None:
        for r in self.runners.values():
            r.close()


# --------------------------------------------------------------------------- targets
def targets(rows: list[dict], rounds: int) -> list[dict]:
    """The issue's targets, judged from this run's rows (lean_int8 vs llama.cpp Q4_1)."""
    by = {r["context"]: r for r in rows}
    out = []
    for L, need, label in ((1024, 0.7, "1k: >= 0.7x llama.cpp's speed"),
                           (8192, 1.2, "8k: >= 1.2x, best of 3 for both"),
                           (32768, 3.0, "32k: >= 3x")):
        r = by.get(L)
        if r and "llama_cpp_ms" in r and "lean_int8_ms" in r:
            x = r["llama_cpp_ms"] / r["lean_int8_ms"]
            ok = x >= need and (L != 8192 or rounds >= 3)
            out.append({"target": label, "measured": round(x, 2), "met": ok})
    lean = {L: r["lean_int8_ms"] for L, r in by.items() if "lean_int8_ms" in r}
    if len(lean) >= 2 and min(lean) <= 1024 and max(lean) >= 262144:
        spread = max(lean.values()) / min(lean.values())
        out.append({"target": "1k -> 256k flat within 10% (max/min ms)", "measured": round(spread, 3),
                    "met": spread <= 1.10})
        full = {L: t for L, t in lean.items() if L >= 8192}
        if len(full) >= 2:
            s2 = max(full.values()) / min(full.values())
            out.append({"target": "8k -> 256k (full window) flat within 10% (max/min ms)", "measured": round(s2, 3),
                        "met": s2 <= 1.10})
    return out


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    import spikingbrain  # noqa: F401  (Auto registration)

    teachers, student, name = load_models(args)
    teachers = {d: t.to(args.device) for d, t in teachers.items()}
    variants = build_variants(student, names, not args.no_compile, args.device)
    gguf, llama = args.gguf, None
    fa_settings = [s == "on" for s in args.flash_attn.split(",") if s]
    if not args.no_llama_cpp:
        try:
            sys.path.insert(0, str(Path(__file__).parent))
            import llama_cpp_decode

            if gguf is None and args.teacher == "default":
                from spikingbrain.convert.teacher import default_teacher_path

                gguf = str(default_teacher_path())
            llama = LlamaCpp(gguf, args.threads) if gguf else None
        except ImportError:
            print("llama.cpp: not installed (pip install -e .[bench])")
    meter = LoadMeter()
    print(f"SpikingBrain: {name}; layers {student.config.layer_types[:4]}..., window {student.config.sliding_window}")
    print(f"threads {args.threads}; rounds {args.rounds}; variants {names}; teacher dtypes {list(teachers)}; "
          f"llama.cpp {'on ' + gguf if llama else 'off'}", flush=True)

    best: dict[tuple, float] = {}

    def record(key, ms):
        best[key] = min(ms, best.get(key, ms))
        return ms

    for r in range(args.rounds):
        for L in contexts:
            got = {}
            for d, t in teachers.items():
                if L <= args.teacher_max_context:
                    with meter.segment(f"r{r} L{L} teacher_{d}"):
                        got[f"teacher_{d}"] = record((L, f"teacher_{d}"), time_decode(t, fill_teacher_cache(t, L),
                                                                                     args.tokens, args.warmup))
            for v, (m, dec) in variants.items():
                with meter.segment(f"r{r} L{L} {v}"):
                    got[v] = record((L, v), time_variant(m, dec, L, args.tokens, args.warmup))
            if llama and L <= args.llama_cpp_max_context:
                for fa in fa_settings:
                    k = f"llama_cpp_fa_{'on' if fa else 'off'}"
                    with meter.segment(f"r{r} L{L} {k}"):
                        got[k] = record((L, k), llama.time(L, fa, args.tokens, args.warmup))
            print(f"  round {r + 1}/{args.rounds} context {L}: " + ", ".join(f"{c} {t:.1f}" for c, t in got.items()),
                  flush=True)
        for B in batch_sizes:
            got = {}
            for v, (m, dec) in variants.items():
                if dec is not None and v in args.batch_variants.split(","):
                    with meter.segment(f"r{r} B{B} {v}"):
                        got[v] = record(("batch", B, v), time_variant(m, dec, args.batch_context, args.tokens,
                                                                       args.warmup, rows=B))
            if llama:
                for fa in fa_settings:
                    k = f"llama_cpp_fa_{'on' if fa else 'off'}"
                    with meter.segment(f"r{r} B{B} {k}"):
                        got[k] = record(("batch", B, k), llama.time(args.batch_context, fa, args.tokens,
                                                                    args.warmup, seqs=B))
            print(f"  round {r + 1}/{args.rounds} batch {B} at {args.batch_context}: " +
                  ", ".join(f"{c} {t:.1f} ms/step" for c, t in got.items()), flush=True)

    rows = []
    for L in contexts:
        row = {"context": L}
        for k, ms in best.items():
            if k[0] == L:
                row[f"{k[1]}_ms"] = round(ms, 3)
        tms = {d: row[f"teacher_{d}_ms"] for d in teachers if f"teacher_{d}_ms" in row}
        if tms:
            d = min(tms, key=tms.get)
            row["teacher_ms"], row["teacher_dtype"] = tms[d], d
        fas = {k: row[f"{k}_ms"] for k in ("llama_cpp_fa_on", "llama_cpp_fa_off") if f"{k}_ms" in row}
        if fas:
            k = min(fas, key=fas.get)
            row["llama_cpp_ms"], row["llama_cpp_flash_attn"] = fas[k], k.endswith("on")
        for v in variants:
            if "llama_cpp_ms" in row:
                row[f"llama_cpp_over_{v}"] = round(row["llama_cpp_ms"] / row[f"{v}_ms"], 3)
            if "teacher_ms" in row:
                row[f"teacher_over_{v}"] = round(row["teacher_ms"] / row[f"{v}_ms"], 3)
        rows.append(row)
    batch_rows = []
    for B in batch_sizes:
        row = {"sequences": B, "context": args.batch_context}
        for k, ms in best.items():
            if k[0] == "batch" and k[1] == B:
                row[f"{k[2]}_tok_s"] = round(1000 * B / ms, 1)
        fas = {k: row[f"{k}_tok_s"] for k in ("llama_cpp_fa_on", "llama_cpp_fa_off") if f"{k}_tok_s" in row}
        if fas:
            k = max(fas, key=fas.get)
            row["llama_cpp_tok_s"], row["llama_cpp_flash_attn"] = fas[k], k.endswith("on")
            for v in variants:
                if f"{v}_tok_s" in row:
                    row[f"{v}_over_llama_cpp"] = round(row[f"{v}_tok_s"] / row["llama_cpp_tok_s"], 3)
        batch_rows.append(row)

    print("\nms/token, best of rounds (x: llama.cpp ms / SpikingBrain ms, > 1: SpikingBrain faster)")
    for row in rows:
        print("  " + json.dumps(row))
    for row in batch_rows:
        print("  " + json.dumps(row))
    goals = targets(rows, args.rounds)
    for g in goals:
        print(f"  target {g['target']}: {g['measured']} -> {'met' if g['met'] else 'missed'}")
    quiet = meter.summary(args.quiet_threshold) if args.quiet_check else None
    if quiet is not None:
        print(f"quiet check: {'valid' if quiet['valid'] else 'INVALID'} (worst other-process load "
              f"{quiet['worst_other_cores']} cores, threshold {args.quiet_threshold})")
    if args.out:
        from spikingbrain.evaluation.bench import run_info

        result = {**run_info("decode", "decode.py", argv, args.device, args.threads), "model": name,
                  "teacher": args.teacher, "teacher_dtypes": list(teachers), "tokens": args.tokens,
                  "warmup": args.warmup, "rounds": args.rounds, "compiled": not args.no_compile,
                  "variants": {v: dict(zip(("lean_weights", "window", "model_int8"), VARIANTS[v])) for v in variants},
                  "window": student.config.sliding_window, "layer_types": student.config.layer_types,
                  "rows": rows, "batch": batch_rows, "targets": goals, "quiet_check": quiet}
        if llama:
            from llama_cpp_decode import build_info, gguf_quantization

            result["llama_cpp"] = {**build_info(), "gguf": Path(gguf).name, "quantization": gguf_quantization(gguf),
                                   "flash_attn_timed": fa_settings,
                                   "prefill_seconds": {f"{k[0]}/fa={k[1]}/seqs={k[2]}": round(s, 2)
                                                       for k, s in llama.prefill.items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if llama:
        llama.close()
    return 3 if quiet is not None and not quiet["valid"] else 0


if __name__ == "__main__":
    sys.exit(main())
