"""MoE FFN throughput against the dense SwiGLU FFN of the same active size, in one run.

Compared modules, all with hidden size ``d``:
- ``dense``: one SwiGLU of width ``(top_k + shared) * I`` — the same multiply-adds per token as
  the MoE's active experts (the router's ``d * N`` extra are ignored);
- ``moe-loop``: ``MoE(d, I, N, top_k, shared, dispatch="loop")`` (per-expert ``nn.Linear`` calls);
- ``moe-grouped``: the same with ``dispatch="grouped"`` (``torch.nn.functional.grouped_mm``;
  CUDA bf16 is its real target, on CPU it is torch's fallback).

Metric: tokens per second, ``tokens / median wall time`` over ``--repeats`` runs after
``--warmup`` runs, for the forward pass (``torch.no_grad``) and for forward + backward
(``(y * g).sum().backward()`` with a fixed random ``g``); the modules take turns in every
round. The router is randomly initialised
(near-balanced load; the max/mean routed-expert load of the batch is printed). Printed ratio:
``moe tokens/s / dense tokens/s`` (1.0 = MoE as fast as a dense FFN of its active size; it is
the efficiency of the sparse dispatch, not a quality statement).

Usage (defaults take about a minute on 2 CPU cores):
    PYTHONPATH=src python3 benchmarks/moe.py [--hidden 512] [--intermediate 1024] [--experts 16]
        [--top-k 1] [--shared 1] [--tokens 16,4096] [--devices cpu,cuda] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spikingbrain.layers.mlp import SwiGLU
from spikingbrain.layers.moe import MoE


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024, help="width of each expert")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--shared", type=int, default=1)
    p.add_argument("--tokens", default="16,4096", help="comma-separated tokens per batch (16: decode-like)")
    p.add_argument("--devices", default="cpu,cuda", help="cuda is skipped when unavailable")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", default="benchmarks/results/moe.json")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(module, x, grad, backward: bool) -> float:
    """Seconds of one forward (or forward + backward) of ``module`` on ``x``."""
    _sync(x.device)
    t0 = time.perf_counter()
    if backward:
        xi = x.detach().requires_grad_()
        (module(xi) * grad).sum().backward()
    else:
        with torch.no_grad():
            module(x)
    _sync(x.device)
    sec = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    return sec


def time_modules(modules, x, grad, backward: bool, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per module; the modules take turns in every round so that a change in
    machine load hits them all alike."""
    times = {name: [] for name in modules}
    for i in range(warmup + repeats):
        for name, m in list(modules.items()):
            if name not in times:
                continue
            try:
                sec = run_once(m, x, grad, backward)
            except RuntimeError as err:  # e.g. a grouped_mm backend missing on this device
                print(f"  {x.device.type} {name}: skipped ({str(err).splitlines()[0]})")
                del times[name]
                continue
            if i >= warmup:
                times[name].append(sec)
    return {name: statistics.median(t) for name, t in times.items()}


def build(args, device, dtype):
    torch.manual_seed(0)
    active = (args.top_k + args.shared) * args.intermediate
    modules = {"dense": SwiGLU(args.hidden, active)}
    for dispatch in ("loop", "grouped"):
        if dispatch == "grouped" and not hasattr(F, "grouped_mm"):
            continue
        modules[f"moe-{dispatch}"] = MoE(args.hidden, args.intermediate, args.experts, args.top_k,
                                         args.shared, dispatch=dispatch)
    moe = modules["moe-loop"]
    for name, m in modules.items():
        if name.startswith("moe-") and m is not moe:
            m.load_state_dict(moe.state_dict())  # same experts and router: same routing
    return {k: m.to(device=device, dtype=dtype) for k, m in modules.items()}


def run_device(args, device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modules = build(args, device, dtype)
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, args.hidden, device=device, dtype=dtype)
        grad = torch.randn_like(x)
        with torch.no_grad():
            modules["moe-loop"](x)
        load = modules["moe-loop"].last_load.float()
        imbalance = (load.max() / load.mean()).item()
        for mode in ("forward", "forward+backward"):
            secs = time_modules(modules, x, grad, mode != "forward", args.repeats, args.warmup)
            for name, sec in secs.items():
                rows.append(dict(device=device.type, dtype=str(dtype).replace("torch.", ""), tokens=n,
                                 mode=mode, module=name, seconds=sec, tokens_per_s=n / sec,
                                 ratio_vs_dense=secs["dense"] / sec, load_max_over_mean=imbalance))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(f"MoE d={args.hidden} I={args.intermediate} N={args.experts} top_k={args.top_k} "
          f"shared={args.shared} vs dense SwiGLU width {(args.top_k + args.shared) * args.intermediate}; "
          f"threads={torch.get_num_threads()}")
    rows = []
    for d in devices:
        rows += run_device(args, torch.device(d))
    print(f"{'device':6} {'dtype':8} {'tokens':>6} {'mode':16} {'module':12} {'tokens/s':>12} "
          f"{'vs dense':>9} {'load max/mean':>14}")
    for r in rows:
        print(f"{r['device']:6} {r['dtype']:8} {r['tokens']:6d} {r['mode']:16} {r['module']:12} "
              f"{r['tokens_per_s']:12.0f} {r['ratio_vs_dense']:9.2f} "
              f"{r['load_max_over_mean']:14.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(vars(args), torch=torch.__version__, platform=platform.platform(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    from spikingbrain.evaluation.bench import run_info

    info = run_info("moe", "moe.py", argv, "cuda" if "cuda" in devices else "cpu", torch.get_num_threads())
    out.write_text(json.dumps({**info, "config": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
