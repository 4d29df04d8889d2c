"""Prefill time versus prompt length: SpikingBrain against the Llama-shaped Transformer of the same
size (HF ``LlamaForCausalLM``, SDPA attention), and against the pure-GLA model, in one run.

Shapes: the default teacher's (SmolLM2-135M: 30 layers, d=576, 9 heads, 3 KV heads) unless
``--preset`` names a SpikingBrain preset. Weights are random (prefill cost does not depend on
them). Each model computes the logits of the last position only (``logits_to_keep=1``), as a
server's prefill does; time is the median of ``--repeats`` runs after one warm-up.

Printed: seconds per prefill for each model and the speed-up ``transformer / spikingbrain``
(> 1: SpikingBrain is faster) and ``spikingbrain / pure-GLA``.

    python3 benchmarks/prefill.py [--lengths 1024,4096,16384,32768] [--window 4096] [--threads 2]
        [--device cpu|cuda] [--out benchmarks/results/prefill_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--window", type=int, default=4096, help="SWA window of the SpikingBrain model")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--skip-transformer-above", type=int, default=None,
                   help="do not run the Transformer beyond this length (its cost is quadratic)")
    p.add_argument("--out", default=None, help="JSON results file")
    return p.parse_args(argv)


def teacher_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1 << 21,
                       tie_word_embeddings=True, rope_theta=100000.0)


def build_models(window: int, device, dtype):
    from transformers import LlamaForCausalLM

    from spikingbrain.convert.mapping import config_from_teacher
    from spikingbrain.modeling import SpikingBrainForCausalLM

    tc = teacher_config()
    torch.manual_seed(0)
    transformer = LlamaForCausalLM._from_config(tc, attn_implementation="sdpa")
    hybrid = SpikingBrainForCausalLM(config_from_teacher(tc, "7b", sliding_window=window))
    gla = SpikingBrainForCausalLM(config_from_teacher(tc, "gla"))
    return {name: m.to(device=device, dtype=dtype).eval()
            for name, m in (("transformer", transformer), ("spikingbrain", hybrid), ("pure_gla", gla))}


@torch.inference_mode()
def time_prefill(model, L: int, device, repeats: int) -> float:
    ids = torch.randint(0, 49152, (1, L), device=device, generator=None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    models = build_models(args.window, device, dtype)
    for m in models.values():  # warm-up
        time_prefill(m, 256, device, 1)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {args.threads} threads"
    print(f"prefill, SmolLM2-135M shape, {dtype}, {hw}; SpikingBrain 7B layout (GLA/SWA, w={args.window})")
    print(f"{'length':>8} {'transformer s':>14} {'spikingbrain s':>15} {'pure_gla s':>11} "
          f"{'transformer/sb':>15} {'sb/pure_gla':>12}")
    rows = []
    for L in lengths:
        row = {"length": L}
        for name, m in models.items():
            if name == "transformer" and args.skip_transformer_above and L > args.skip_transformer_above:
                continue
            row[name + "_s"] = time_prefill(m, L, device, args.repeats)
        if "transformer_s" in row:
            row["speedup_vs_transformer"] = row["transformer_s"] / row["spikingbrain_s"]
        row["sb_over_pure_gla"] = row["spikingbrain_s"] / row["pure_gla_s"]
        rows.append(row)
        t = f"{row['transformer_s']:>14.2f}" if "transformer_s" in row else f"{'-':>14}"
        r = f"{row['speedup_vs_transformer']:>14.2f}x" if "speedup_vs_transformer" in row else f"{'-':>15}"
        print(f"{L:>8} {t} {row['spikingbrain_s']:>15.2f} {row['pure_gla_s']:>11.2f} {r} {row['sb_over_pure_gla']:>11.2f}x",
              flush=True)
    result = {"benchmark": "prefill", "date": dt.datetime.now().isoformat(timespec="seconds"), "hardware": hw,
              "dtype": str(dtype), "window": args.window, "torch": torch.__version__,
              "command": "python3 benchmarks/prefill.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
