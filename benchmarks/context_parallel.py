"""Context-parallel prefill: time versus sequence length and number of processes, and the bytes
each rank sends per layer compared with what softmax attention would need.

For each process count ``P`` (``--procs``) the script spawns ``P`` local CPU processes (gloo,
one thread each) and times ``spikingbrain.parallel.context_parallel_prefill`` of one random
sequence per length (``--lengths``): the median over ``--repeats`` runs after one warm-up of the
slowest rank's wall time (barrier before and after). The baseline is the plain single-process
prefill ``model(ids, use_cache=True)`` (no context-parallel code) with the same warm-up and
repeats, timed at each of ``--baseline-threads`` (default: 1 and every core) and taken at its
fastest: P processes use P cores, so one process gets all of them too. "no-comm s" times the
same ``P`` processes each running the plain forward of its own shard only (no exchange, no
correction): what the machine allows for ``P``-way parallel work, a lower bound for the
sharded prefill (on a shared or small CPU this, not the algorithm, limits the speed-up).

Communication is what the ranks' ``CommStats`` counted (the logical bytes a rank sends: an
all-gather of ``b`` bytes per rank sends ``(P - 1) b``, a point-to-point send its payload),
per layer and kind, for the prefill's forward pass (the final decode-state gather to rank 0
is listed apart as ``cache``). It is compared with the all-gather of keys/values that softmax
attention over the whole sequence needs per layer: ``(P - 1) * (T / P) * B * Hkv * D * 2 *
bytes``. The same formulas are then evaluated for the SpikingBrain-7B shapes (bf16 K/V, fp32
states, w = 4096) at long contexts, where measuring is out of reach on a CPU.

Usage (defaults: ~4-7 minutes on 2 busy cores):
    PYTHONPATH=src python3 benchmarks/context_parallel.py [--procs 1,2,4]
        [--lengths 1024,2048,4096,8192] [--layout 7b,76b] [--repeats 3] [--scan auto|allgather|p2p]
Writes benchmarks/results/context_parallel.json and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "context_parallel.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2,4", help="comma-separated process counts")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated sequence lengths")
    p.add_argument("--layout", default="7b,76b",
                   help="comma-separated: 7b (alternating gla/swa), 76b (gla+swa / gla+full hybrids, sinks, MoE)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scan", choices=["auto", "allgather", "p2p"], default="auto", help="GLA state scan")
    p.add_argument("--baseline-threads", default=f"1,{os.cpu_count()}",
                   help="thread counts for the single-process baseline; its fastest is the baseline")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def model_config(layout: str, hidden: int, layers: int, window: int) -> dict:
    """A small model (heads of 64, GQA 2:1) in the chosen layout: preset name + overrides."""
    from spikingbrain.config import layout_76b

    heads = max(2, hidden // 64)
    over = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
                sliding_window=window, gla_chunk_size=64, max_position_embeddings=1 << 20)
    if layout == "7b":
        over["layer_types"] = ["gla" if i % 2 == 0 else "swa" for i in range(layers)]
        return {"preset": "tiny", "overrides": over}
    lt, mt = layout_76b(layers, full_every=2)  # a gla+full layer every 2nd: both kinds at 4 layers
    over.update(layer_types=lt, mlp_layer_types=mt)
    return {"preset": "tiny-76b", "overrides": over}


# --------------------------------------------------------------------------- worker side
def _build(cfg: dict):
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    return SpikingBrainForCausalLM(SpikingBrainConfig.from_preset(cfg["preset"], **cfg["overrides"])).eval()


def worker(cfg: dict, lengths: list[int], repeats: int, scan: str = "auto") -> dict:
    """On every rank: time the context-parallel prefill of each length."""
    import torch.distributed as dist

    from spikingbrain.parallel import CommStats, context_parallel_prefill, shard_bounds

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _build(cfg)
    out = {}
    for T in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        times, stats = [], None
        for i in range(repeats + 1):
            st = CommStats()
            dist.barrier()
            t0 = time.perf_counter()
            context_parallel_prefill(model, ids, cache_rank=0, stats=st, scan=scan)
            dist.barrier()
            dt = time.perf_counter() - t0
            if i:  # the first run is a warm-up
                times.append(dt)
            stats = st
        # the same processes, each running only its shard with no exchange at all: the time
        # this machine allows for P-way parallel work (a lower bound for the sharded prefill)
        s, e = shard_bounds(T, world)[rank]
        it = []
        with torch.no_grad():
            for i in range(repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                model(ids[:, s:e], use_cache=False, logits_to_keep=1)
                dist.barrier()
                if i:
                    it.append(time.perf_counter() - t0)
        fwd = [r for r in stats.records if r.kind != "cache"]
        per_layer: dict[int, dict[str, int]] = {}
        for r in fwd:
            if r.layer is not None:
                per_layer.setdefault(r.layer, {}).setdefault(r.kind, 0)
                per_layer[r.layer][r.kind] += r.nbytes
        out[T] = {"seconds": statistics.median(times),
                  "independent_shards_seconds": statistics.median(it),
                  "bytes_by_kind": stats.by_kind(), "bytes_per_layer": per_layer}
    return {"rank": rank, "results": out}


def single_process_baseline(cfg: dict, lengths: list[int], repeats: int, threads: list[int]) -> dict:
    """The plain forward in this process: ``{T: {threads: median seconds}}`` (same warm-up and
    repeats as the sharded runs, same random ids)."""
    model = _build(cfg)
    before = torch.get_num_threads()
    out: dict[int, dict[int, float]] = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            for T in lengths:
                ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
                times = []
                with torch.no_grad():
                    for i in range(repeats + 1):
                        t0 = time.perf_counter()
                        model(ids, use_cache=True, logits_to_keep=1)
                        if i:
                            times.append(time.perf_counter() - t0)
                out.setdefault(T, {})[n] = statistics.median(times)
    finally:
        torch.set_num_threads(before)
    return out


# --------------------------------------------------------------------------- analysis
def softmax_kv_bytes(T: int, P: int, B: int, hkv: int, d: int, nbytes: int) -> int:
    """Bytes one rank sends to all-gather the keys and values of its T/P tokens."""
    return (P - 1) * (-(-T // P)) * B * hkv * d * 2 * nbytes


def gla_state_bytes(P: int, B: int, h: int, dk: int, dv: int) -> int:
    """Bytes one rank sends to all-gather its fp32 state and decay ``[B, H, K, V + 1]``."""
    return (P - 1) * B * h * dk * (dv + 1) * 4


def gla_state_bytes_p2p(P: int, B: int, h: int, dk: int, dv: int) -> int:
    """At most what one rank sends in the logarithmic point-to-point scan: ``ceil(log2 P)``
    states with decay, then one state."""
    rounds = (P - 1).bit_length()
    return 0 if P == 1 else rounds * B * h * dk * (dv + 1) * 4 + B * h * dk * dv * 4


def swa_halo_bytes(P: int, B: int, hkv: int, d: int, w: int, nbytes: int) -> int:
    """Bytes one rank sends to pass its last w - 1 keys and values to the next (p2p halo)."""
    return 0 if P == 1 else (w - 1) * B * hkv * d * 2 * nbytes


def analytic_7b(contexts=(131072, 262144, 1048576, 4194304), procs=(8, 32, 128)) -> list[dict]:
    """SpikingBrain-7B shapes (28 heads, 4 KV heads, head dim 128, w = 4096, bf16 K/V)."""
    rows = []
    for T in contexts:
        for P in procs:
            if T // P < 4096:
                continue
            rows.append({
                "context": T, "procs": P,
                "gla_layer_bytes": gla_state_bytes(P, 1, 28, 128, 128),
                "gla_layer_bytes_p2p_scan": gla_state_bytes_p2p(P, 1, 28, 128, 128),
                "swa_layer_bytes": swa_halo_bytes(P, 1, 4, 128, 4096, 2),
                "softmax_layer_bytes": softmax_kv_bytes(T, P, 1, 4, 128, 2),
            })
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:9.3f}" if n < 2**30 else f"{n / 2**30:8.2f}G"


def run_layout(layout: str, args, procs: list[int], lengths: list[int]) -> tuple[dict, list[dict]]:
    from spikingbrain.parallel.launch import spawn

    cfg = model_config(layout, args.hidden, args.layers, args.window)
    o = cfg["overrides"]
    results: dict[int, dict] = {}
    for P in procs:
        t0 = time.perf_counter()
        ranks = spawn("context_parallel:worker", P, cfg, lengths, args.repeats, args.scan, sys_path=[str(HERE)],
                      timeout=3600)
        results[P] = {r["rank"]: r["results"] for r in ranks}
        print(f"[{layout}, {P} process(es): {time.perf_counter() - t0:.0f} s]", file=sys.stderr)

    threads = [int(x) for x in args.baseline_threads.split(",")]
    baseline = single_process_baseline(cfg, lengths, args.repeats, threads)
    hkv, d, w = o["num_key_value_heads"], o["head_dim"], o["sliding_window"]
    rows = []
    for T in lengths:
        by_threads = baseline[T]
        best = min(by_threads, key=by_threads.get)
        base = by_threads[best]
        for P in procs:
            per_rank = results[P]
            r0 = per_rank[P - 1][T]  # the last rank's view (all ranks time the same barrier-to-barrier span)
            kinds = {}
            for rk in per_rank.values():
                for layer, by in rk[T]["bytes_per_layer"].items():
                    for kind, n in by.items():
                        kinds.setdefault(kind, []).append(n)
            rows.append({"layout": layout, "length": T, "procs": P, "seconds": r0["seconds"],
                         "independent_shards_seconds": r0["independent_shards_seconds"],
                         "tokens_per_s": T / r0["seconds"], "single_process_seconds": base,
                         "single_process_threads": best, "single_process_seconds_by_threads": by_threads,
                         "speedup_vs_single_process": base / r0["seconds"],
                         "max_bytes_per_layer_by_kind": {k: max(v) for k, v in kinds.items()},
                         "softmax_kv_allgather_bytes_per_layer": softmax_kv_bytes(T, P, 1, hkv, d, 4),
                         "bytes_per_layer_by_rank": {rk: per_rank[rk][T]["bytes_per_layer"] for rk in per_rank}})

    print(f"\nContext-parallel prefill (scan={args.scan}), layout {layout}: {o['num_hidden_layers']} layers "
          f"{o['layer_types']}, d={o['hidden_size']}, heads {o['num_attention_heads']}/{hkv}x{d}, "
          f"w={w}; batch 1, fp32, CPU, 1 thread per process, {os.cpu_count()} cores; "
          f"1-proc = plain forward, fastest of {threads} threads")
    print(f"{'T':>7} {'P':>3} {'prefill s':>10} {'tok/s':>9} {'1-proc s':>9} {'speed-up':>9} {'no-comm s':>9} | bytes sent per layer by one rank (MiB, max over ranks)")
    print(f"{'':>7} {'':>3} {'':>10} {'':>9} {'':>9} {'':>9} {'':>9} | {'GLA state':>10} {'SWA halo':>10} {'full K/V':>10} {'softmax K/V':>12}")
    for r in rows:
        k = r["max_bytes_per_layer_by_kind"]
        base = f"{r['single_process_seconds']:9.3f} {r['speedup_vs_single_process']:8.2f}x"
        print(f"{r['length']:>7} {r['procs']:>3} {r['seconds']:>10.3f} {r['tokens_per_s']:>9.0f} {base} "
              f"{r['independent_shards_seconds']:>9.3f} | "
              f"{_mib(k.get('gla_state', 0)):>10} {_mib(k.get('swa_halo', 0)):>10} {_mib(k.get('full_kv', 0)):>10} "
              f"{_mib(r['softmax_kv_allgather_bytes_per_layer']):>12}")
    return cfg, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    procs = [int(x) for x in args.procs.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    configs, rows = {}, []
    for layout in args.layout.split(","):
        configs[layout], r = run_layout(layout, args, procs, lengths)
        rows += r

    a7 = analytic_7b()
    print("\nSame formulas at SpikingBrain-7B shapes (28 heads, 4 KV heads x 128, w=4096; bf16 K/V, fp32 states), "
          "bytes one rank sends per layer:")
    print(f"{'context':>9} {'P':>4} {'GLA all-gather':>15} {'GLA p2p scan':>13} {'SWA halo':>11} {'softmax K/V':>12}")
    for r in a7:
        print(f"{r['context']:>9} {r['procs']:>4} {_mib(r['gla_layer_bytes']):>15} {_mib(r['gla_layer_bytes_p2p_scan']):>13} "
              f"{_mib(r['swa_layer_bytes']):>11} {_mib(r['softmax_layer_bytes']):>12}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from spikingbrain.evaluation.bench import run_info

    out.write_text(json.dumps({
        **run_info("context_parallel_prefill", "context_parallel.py", argv, "cpu", 1),
        "config": {"layout": args.layout, "models": configs, "repeats": args.repeats, "batch": 1, "dtype": "float32",
                   "scan": args.scan, "halo": "auto", "lengths": lengths, "procs": procs,
                   "baseline_threads": args.baseline_threads},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads_per_process": 1, "backend": "gloo",
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "rows": rows, "analytic_7b": a7,
    }, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
