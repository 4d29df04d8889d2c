"""Tables, ratios, plots and the markdown report of the benchmark JSON files
(``benchmarks/results/*.json``), for ``spikingbrain bench`` and ``scripts/make_benchmarks_md.py``.

Each benchmark script writes its own JSON shape; ``view(path)`` reads any of them into a
``View``: the benchmark's name, its metadata (hardware, date, torch, command), tables (one row per
result row of the JSON) and summary lines with the computed ratios. Plots are PNG files named like
the JSON (``prefill_cpu.json`` -> ``prefill_cpu.png``).
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from spikingbrain.errors import SpikingBrainError

ORDER = ["conversion_quality", "conversion_ablation", "conversion_layers", "conversion_step", "prefill", "decode", "memory", "train", "moe", "context_parallel", "spiking", "serve_throughput", "serve_load", "official_7b"]
TITLES = {
    "conversion_quality": "Conversion quality of the shipped delta vs the teacher (2k context)",
    "conversion_ablation": "Conversion recipe ablation (CPU)",
    "conversion_layers": "Where the converted model's error lives: one GLA layer restored at a time",
    "conversion_step": "Conversion step time: fp32 vs bf16 autocast (CPU)",
    "eval_demo": "Evaluation of the earlier demo model (2026-11-23)",
    "prefill": "Prefill time vs prompt length",
    "decode": "Decode speed vs context",
    "memory": "Decode-state memory vs context",
    "train": "Training throughput and MFU",
    "moe": "MoE FFN vs dense FFN",
    "context_parallel": "Context-parallel prefill",
    "spiking": "Spiking sweep: perplexity, sparsity, energy vs k",
    "serve_throughput": "Serving throughput: spikingbrain serve vs vLLM",
    "serve_load": "The server under load: time to first token, abandoned and hostile requests",
    "official_7b": "The released SpikingBrain-7B on a CPU: load, decode, state memory",
}
SCRIPTS = {"conversion_quality": "benchmarks/conversion_quality.py",
           "conversion_ablation": "benchmarks/conversion_ablation.py",
           "conversion_layers": "benchmarks/conversion_layers.py",
           "conversion_step": "benchmarks/conversion_step.py", "prefill": "benchmarks/prefill.py", "decode": "benchmarks/decode.py", "train": "benchmarks/train_throughput.py",
           "moe": "benchmarks/moe.py", "context_parallel": "benchmarks/context_parallel.py",
           "spiking": "benchmarks/spiking_sweep.py", "serve_throughput": "benchmarks/serve_throughput.py",
           "serve_load": "benchmarks/serve_load.py",
           "official_7b": "benchmarks/official_7b.py"}
NAME_ALIASES = {"context_parallel_prefill": "context_parallel", "train_throughput": "train", "spiking_sweep": "spiking"}


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class View:
    name: str
    path: Path
    data: dict
    meta: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- formatting
def fmt(x, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits (integers as they are), ``-`` for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 10 ** digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.2e}"
    return str(x)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def ratio(x) -> str:
    return "-" if x is None else f"{x:.3g}x"


def slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) on log(x): the scaling exponent (1 = linear, 2 = quadratic)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return None if den == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / den


def markdown_table(t: Table) -> str:
    out = []
    if t.caption:
        out += [t.caption, ""]
    out.append("| " + " | ".join(t.columns) + " |")
    out.append("|" + "|".join("---:" if i else "---" for i in range(len(t.columns))) + "|")
    for r in t.rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- reading
def benchmark_name(path: Path, data: dict) -> str:
    name = data.get("benchmark")
    if not name:
        if "sweep" in data and "baseline" in data:
            name = "spiking"
        elif "ratio_tokens_per_s" in data or "shape" in data:
            name = "train"
        else:
            stem = path.stem
            name = next((n for n in ORDER + list(NAME_ALIASES) if stem == n or stem.startswith(n + "_")), stem)
    return NAME_ALIASES.get(name, name)


def metadata(path: Path, data: dict) -> dict:
    """hardware, date, torch, command, bench_command from any of the scripts' JSON shapes."""
    cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    hw = data.get("hardware")
    if not hw:
        if cfg.get("cuda"):
            hw = f"{cfg['cuda']}; {cfg.get('platform', '')}".strip("; ")
        elif machine:
            hw = f"{machine.get('cpus', '?')} CPU cores; {machine.get('platform', '')}"
        elif data.get("device"):
            hw = str(data["device"])
        elif cfg.get("platform"):
            hw = cfg["platform"]
    date = data.get("date")
    if not date:
        date = dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds") + " (file time)"
    return {"hardware": hw or "not recorded", "date": date,
            "torch": data.get("torch") or cfg.get("torch") or machine.get("torch") or "not recorded",
            "command": data.get("command") or "not recorded", "bench_command": data.get("bench_command")}


def view(path: Path) -> View:
    path = Path(path)
    data = json.loads(path.read_text())
    name = benchmark_name(path, data)
    v = View(name=name, path=path, data=data, meta=metadata(path, data))
    builder = BUILDERS.get(name, _generic)
    builder(v, data)
    return v


def load_views(results_dir: Path) -> list[View]:
    views = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            views.append(view(p))
        except (ValueError, KeyError, TypeError) as e:  # a malformed or foreign JSON: say so, go on
            print(f"skipping {p}: {type(e).__name__}: {e}")
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(views, key=lambda v: (rank.get(v.name, len(ORDER)), v.path.name))


# --------------------------------------------------------------------------- per-benchmark views
def _prefill(v: View, d: dict) -> None:
    rows = d["rows"]
    v.tables.append(Table(
        ["length", "Transformer s", "SpikingBrain s", "pure GLA s", "Transformer / SpikingBrain", "SpikingBrain / pure GLA"],
        [[str(r["length"]), fmt(r.get("transformer_s")), fmt(r.get("spikingbrain_s")), fmt(r.get("pure_gla_s")),
          ratio(r.get("speedup_vs_transformer")), ratio(r.get("sb_over_pure_gla"))] for r in rows]))
    both = [r for r in rows if r.get("speedup_vs_transformer") is not None]
    if both:
        last = both[-1]
        v.summary.append(f"At {last['length']} tokens SpikingBrain prefills {last['speedup_vs_transformer']:.3g}x "
                         f"{'faster' if last['speedup_vs_transformer'] >= 1 else 'slower'} than the Transformer "
                         f"(Transformer / SpikingBrain time = {ratio(last['speedup_vs_transformer'])}).")
    exps = []
    for key, label in (("transformer_s", "Transformer"), ("spikingbrain_s", "SpikingBrain"), ("pure_gla_s", "pure GLA")):
        pts = [(r["length"], r[key]) for r in rows if r.get(key)]
        s = slope([p[0] for p in pts], [p[1] for p in pts])
        if s is not None:
            exps.append(f"{label} {s:.2f}")
    if exps:
        v.summary.append("Scaling exponent of time vs length (log-log slope; 1 = linear, 2 = quadratic): "
                         + ", ".join(exps) + ".")
    extra = [f"dtype {d['dtype']}" if d.get("dtype") else "", f"SWA window {d['window']}" if d.get("window") else ""]
    if any(extra):
        v.summary.append("Settings: " + ", ".join(e for e in extra if e) + ".")


def _per_setting(name: str) -> bool:
    """decode.py's columns of one setting (``teacher_bf16``, ``llama_cpp_fa_on``): the JSON keeps
    them, the views show each system's best (``teacher``, ``llama_cpp``)."""
    return name.startswith(("teacher_fp", "teacher_bf", "llama_cpp_fa_"))


def _decode(v: View, d: dict) -> None:
    rows = d["rows"]
    # per-setting columns (teacher_fp32, llama_cpp_fa_on, ...) stay in the JSON; the table shows the best
    models = [k[:-3] for k in rows[0] if k.endswith("_ms") and not _per_setting(k[:-3])] if rows else []
    sb = [m for m in models if m != "teacher" and m != "llama_cpp"]
    # (numerator, denominator) pairs: > 1 means the denominator is faster
    pairs = [(b, m) for b in ("teacher", "llama_cpp") if b in models for m in sb]
    if "sb_bf16" in sb and "sb_int8" in sb:
        pairs.append(("sb_bf16", "sb_int8"))
    cols = ["context"] + [f"{m} ms/token" for m in models] + [f"{a} / {b}" for a, b in pairs] + \
        [f"{m} tok/s" for m in sb[:1]]
    table = []
    for r in rows:
        cells = [str(r["context"])] + [fmt(r.get(f"{m}_ms")) for m in models]
        cells += [ratio(r[f"{a}_ms"] / r[f"{b}_ms"]) if r.get(f"{a}_ms") and r.get(f"{b}_ms") else "-" for a, b in pairs]
        cells += [fmt(1000 / r[f"{m}_ms"]) if r.get(f"{m}_ms") else "-" for m in sb[:1]]
        table.append(cells)
    v.tables.append(Table(cols, table))
    trows = [r for r in rows if r.get("teacher_ms") and sb and r.get(f"{sb[0]}_ms")]  # teachers stop earlier
    if trows:
        first, last = trows[0], trows[-1]
        m = sb[0]
        v.summary.append(f"At context {last['context']}: teacher {fmt(last['teacher_ms'])} ms/token, SpikingBrain "
                         f"({m}) {fmt(last[f'{m}_ms'])} ms/token: {ratio(last['teacher_ms'] / last[f'{m}_ms'])} "
                         "(teacher / SpikingBrain; > 1: SpikingBrain faster).")
        if len(trows) > 1:
            g_t = last["teacher_ms"] / first["teacher_ms"]
            g_s = last[f"{m}_ms"] / first[f"{m}_ms"]
            v.summary.append(f"From context {first['context']} to {last['context']} the teacher's ms/token changes "
                             f"{ratio(g_t)}, SpikingBrain's {ratio(g_s)}.")
    for b in d.get("batch", []):
        tok = ", ".join(f"{k[:-6]} {fmt(x)}" for k, x in b.items() if k.endswith("_tok_s") and "_fa_" not in k)
        v.summary.append(f"{b['sequences']} sequences decoded together at context {b['context']}: tokens/s {tok}.")
    for t in d.get("targets", []):
        v.summary.append(f"Target {t['target']}: {t['measured']} ({'met' if t['met'] else 'missed'}).")
    if d.get("quiet_check"):
        q = d["quiet_check"]
        v.summary.append(f"Quiet check: {'valid' if q['valid'] else 'INVALID'} (other processes used at most "
                         f"{q['worst_other_cores']} cores during a timed segment).")
    if d.get("model"):
        v.summary.append(f"SpikingBrain model: {d['model']}; teacher: {d.get('teacher', '?')}.")


def _memory(v: View, d: dict) -> None:
    rows = d["rows"]
    v.tables.append(Table(
        ["model", "context", "Transformer KV cache", "SpikingBrain state", "Transformer / SpikingBrain"],
        [[r["model"], str(r["context"]), fmt_bytes(r["transformer_bytes"]), fmt_bytes(r["spikingbrain_bytes"]),
          ratio(r["transformer_over_spikingbrain"])] for r in rows]))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        sb = {r["spikingbrain_bytes"] for r in mine}
        last = mine[-1]
        v.summary.append(f"{name}: SpikingBrain state {'constant at ' + fmt_bytes(min(sb)) if len(sb) == 1 else 'varies: ' + ', '.join(fmt_bytes(x) for x in sorted(sb))}"
                         f" from {mine[0]['context']} to {last['context']} tokens; at {last['context']} the Transformer "
                         f"KV cache is {fmt_bytes(last['transformer_bytes'])}, {ratio(last['transformer_over_spikingbrain'])} larger.")
    if d.get("method"):
        v.summary.append("Method: " + d["method"])


def _train(v: View, d: dict) -> None:
    kinds = [k for k in ("spikingbrain", "llama") if isinstance(d.get(k), dict)]
    v.tables.append(Table(
        ["model", "params (M)", "ms/step", "tokens/s", "GFLOP/token", "MFU", "peak mem GiB"],
        [[k, fmt(d[k]["params"] / 1e6), fmt(d[k]["step_s"] * 1e3), fmt(d[k]["tokens_per_s"]),
          fmt(d[k]["flops_per_token"] / 1e9), f"{100 * d[k]['mfu']:.1f}%" if d[k].get("mfu") is not None else "-",
          fmt(d[k].get("peak_mem_gib"))] for k in kinds]))
    if d.get("ratio_tokens_per_s") is not None:
        v.summary.append(f"tokens/s SpikingBrain / Llama: {ratio(d['ratio_tokens_per_s'])}.")
    if d.get("shape"):
        v.summary.append("Shape: " + ", ".join(f"{k} {val}" for k, val in d["shape"].items())
                         + (f"; autocast {d['dtype']}" if d.get("dtype") else "") + ".")


def _moe(v: View, d: dict) -> None:
    rows = d["results"]
    v.tables.append(Table(
        ["device", "dtype", "tokens", "mode", "module", "tokens/s", "vs dense", "load max/mean"],
        [[r["device"], r["dtype"], str(r["tokens"]), r["mode"], r["module"], fmt(r["tokens_per_s"]),
          ratio(r["ratio_vs_dense"]), fmt(r["load_max_over_mean"])] for r in rows]))
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["module"].startswith("moe"):
            key = (r["device"], r["tokens"], r["mode"])
            if key not in best or r["ratio_vs_dense"] > best[key]["ratio_vs_dense"]:
                best[key] = r
    for (dev, n, mode), r in best.items():
        v.summary.append(f"{dev}, {n} tokens, {mode}: best MoE dispatch {r['module']} at {ratio(r['ratio_vs_dense'])} "
                         "the dense FFN's tokens/s.")
    c = d.get("config", {})
    if c:
        v.summary.append(f"Shape: d={c.get('hidden')} I={c.get('intermediate')} experts={c.get('experts')} "
                         f"top_k={c.get('top_k')} shared={c.get('shared')}.")


def _context_parallel(v: View, d: dict) -> None:
    mib = lambda n: "-" if n is None else fmt(n / 2**20)  # noqa: E731
    table = []
    for r in d["rows"]:
        k = r.get("max_bytes_per_layer_by_kind", {})
        sent = max(k.values()) if k else 0  # the busiest layer
        # the baseline is the plain single-process forward at its fastest thread count
        speed = r["single_process_seconds"] / r["seconds"] if r.get("single_process_seconds") else None
        table.append([str(r["length"]), str(r["procs"]), fmt(r["seconds"]), fmt(r["tokens_per_s"]),
                      fmt(r.get("single_process_seconds")), ratio(speed), fmt(r.get("independent_shards_seconds")),
                      mib(k.get("gla_state")), mib(k.get("swa_halo")), mib(k.get("full_kv")),
                      mib(r["softmax_kv_allgather_bytes_per_layer"]),
                      ratio(r["softmax_kv_allgather_bytes_per_layer"] / sent) if sent else "-"])
    v.tables.append(Table(["T", "P", "prefill s", "tok/s", "1-process s", "speed-up", "no-comm s", "GLA state MiB",
                           "SWA halo MiB", "full K/V MiB", "softmax K/V MiB", "softmax / ours (busiest layer)"], table,
                          "Measured; bytes one rank sends per layer (max over ranks and layers)."))
    if d.get("analytic_7b"):
        v.tables.append(Table(
            ["context", "P", "GLA all-gather MiB", "GLA p2p scan MiB", "SWA halo MiB", "softmax K/V MiB"],
            [[str(r["context"]), str(r["procs"]), mib(r["gla_layer_bytes"]), mib(r.get("gla_layer_bytes_p2p_scan")),
              mib(r["swa_layer_bytes"]), mib(r["softmax_layer_bytes"])] for r in d["analytic_7b"]],
            "Same formulas at SpikingBrain-7B shapes (bytes one rank sends per layer)."))
    c = d.get("config", {})
    if c:
        v.summary.append(f"Layout {c.get('layout')}, scan {c.get('scan')}, {c.get('dtype')}, batch {c.get('batch')}, "
                         f"median of {c.get('repeats')} runs.")
    threads = sorted({r.get("single_process_threads") for r in d["rows"]} - {None})
    if threads:
        v.summary.append("1-process s: the plain single-process forward (no context-parallel code) at its fastest "
                         f"of {c.get('baseline_threads', '?')} threads (fastest here: {', '.join(map(str, threads))}); "
                         "speed-up = 1-process s / prefill s.")


def _spiking(v: View, d: dict) -> None:
    ref = {float(k): val for k, val in d.get("reference_7b", {}).get("sparsity_by_k", {}).items()}
    rows = []
    for r in d["sweep"]:
        e = r.get("energy", {})
        rows.append([fmt(r["k"]), fmt(r["ppl"]), f"{r['ppl_delta_pct']:+.2f}%", fmt(r["sparsity"]),
                     fmt(ref.get(float(r["k"]))), fmt(r.get("spikes_per_channel")),
                     f"{100 * r['silent_channel_share']:.1f}%" if r.get("silent_channel_share") is not None else "-",
                     f"{e['saving_vs_fp16_pct']:.1f}%" if "saving_vs_fp16_pct" in e else "-",
                     f"{e['saving_vs_int8_pct']:.1f}%" if "saving_vs_int8_pct" in e else "-"])
    v.tables.append(Table(["k", "ppl", "d_ppl", "sparsity", "7B report sparsity", "spikes/channel", "silent channels",
                           "energy saving vs FP16", "vs INT8"], rows))
    b, w8 = d.get("baseline", {}), d.get("w8_only", {})
    if b:
        v.summary.append(f"Float baseline perplexity {fmt(b.get('ppl'))} on {b.get('tokens')} tokens; INT8 weights + "
                         f"KV only: {fmt(w8.get('ppl'))} ({w8.get('ppl_delta_pct', 0):+.2f}%). Model: {d.get('model', '?')}.")


def _generic(v: View, d: dict) -> None:
    rows = d.get("rows") or d.get("results")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        cols = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
        v.tables.append(Table(cols, [[fmt(r.get(c)) for c in cols] for r in rows]))


def _serve_throughput(v: View, d: dict) -> None:
    _generic(v, d)
    for r in d.get("ratios", []):
        v.summary.append(f"{r['concurrency']} concurrent: {r['ratio']} = {ratio(r['value'])}")


def _official_7b(v: View, d: dict) -> None:
    rows = d["rows"]
    ctx = sorted({int(k) for r in rows for k in r["decode_ms"]})
    v.tables.append(Table(
        ["load", "load s", "peak RSS (load)", "model tensors", "peak / model"]
        + [f"decode ms/token @ {c}" for c in ctx] + [f"{ctx[-1]} / {ctx[0]}"],
        [[("--int8" if r["mode"] == "int8" else "--dtype bf16"), fmt(r["load_s"]), fmt_bytes(r["load_peak_rss_bytes"]),
          fmt_bytes(r["model_bytes"]), ratio(r["peak_over_model"])]
         + [fmt(r["decode_ms"].get(str(c))) for c in ctx] + [ratio(r["decode_last_over_first"])] for r in rows]))
    st = d.get("state_memory", [])
    v.tables.append(Table(
        ["context", "SpikingBrain path", "SpikingBrain decode state", "Qwen2.5-7B KV cache (bf16)", "KV / state"],
        [[str(r["context"]), r["spikingbrain"], fmt_bytes(r["spikingbrain_state_bytes"]),
          fmt_bytes(r["qwen25_7b_kv_bytes_bf16"]), ratio(r["kv_over_state"])] for r in st]))
    t, met = d.get("targets", {}), d.get("targets_met", {})
    if t:
        v.summary.append(f"Targets: int8 load peak RSS <= {t['int8_load_peak_rss_bytes_max'] / 1e9:g} GB "
                         f"({'met' if met.get('int8_load_peak_rss') else 'NOT met'}), decode at {ctx[-1]} within "
                         f"{(t['decode_32k_over_1k_max'] - 1) * 100:.0f}% of {ctx[0]} "
                         f"({'met' if met.get('decode_32k_over_1k') else 'NOT met'}).")
    v.summary.append(f"Checkpoint: {d['checkpoint']['format']}, {fmt_bytes(d['checkpoint']['bytes'])}. "
                     f"Decode state: {d.get('decode_state', '?')}.")


def _conversion_quality(v: View, d: dict) -> None:
    h, c, req = d["heldout"], d["chat"], d.get("targets", {}).get("required", {})
    pk = d.get("passkey", {})
    rows = [["top-1 agreement with the teacher", "1", fmt(h["top1"]), f">= {req.get('top1', '-')}"],
            ["KL(teacher || model), nats/token", "0", fmt(h["kl"]), f"<= {req.get('kl', '-')}"],
            ["perplexity", fmt(h["teacher_ppl"]), f"{fmt(h['model_ppl'])} ({fmt(h['ppl_ratio'])}x)",
             f"<= {req.get('ppl_ratio', '-')}x"],
            ["chat fidelity (teacher-forced top-1 on its answers)", "1", fmt(c["fidelity"]),
             f">= {req.get('chat_fidelity', '-')}"],
            [f"empty answers (of {c['prompts']})", "0", str(c["empty"]), str(req.get("empty", "-"))]]
    for n in sorted(pk.get("model", {}), key=int):
        t, m = pk["teacher"][n], pk["model"][n]
        rows.append([f"passkey @ {n} tokens", f"{t['correct']}/{t['trials']}", f"{m['correct']}/{m['trials']}",
                     ">= the teacher"])
    r = d.get("retrieval")
    if r:
        rows.append([f"key recall, retrieval windows ({r['windows']} x {r['tokens']} tokens, {r['model']['keys']} keys)",
                     fmt(r["teacher"]["all"]), fmt(r["model"]["all"]), "-"])
    v.tables.append(Table(["metric", "teacher", "SpikingBrain (shipped delta)", "required"], rows))
    v.summary.append(f"{h['tokens']} held-out tokens at a {h['context_length']}-token context; delta: "
                     f"{d['model'].get('provenance', '?')}; made by `{d['model'].get('command', '?')}`.")


def _conversion_layers(v: View, d: dict) -> None:
    st = d["student"]
    rows = [["none (the student)", fmt(st["top1"]), fmt(st["kl"]), "-"]]
    rows += [[f"layer {i}", fmt(r["top1"]), fmt(r["kl"]), f"{r['kl_closed']:+.4f}"] for i, r in d["restored"].items()]
    v.tables.append(Table(["GLA layer given back its softmax attention", "top-1", "KL", "KL closed"], rows))
    v.summary.append(f"{d['tokens']} held-out tokens at a {d['context']}-token context; the single-layer "
                     f"reductions sum to {d['kl_closed_sum']:.4f} of the student's KL {st['kl']:.4f}.")


BUILDERS = {"conversion_quality": _conversion_quality, "conversion_layers": _conversion_layers, "prefill": _prefill, "decode": _decode, "memory": _memory, "train": _train, "moe": _moe,
            "context_parallel": _context_parallel, "spiking": _spiking, "serve_throughput": _serve_throughput,
            "official_7b": _official_7b}


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_prefill(d: dict, png: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, label, style in (("transformer_s", "Transformer (SDPA)", "o-"), ("spikingbrain_s", "SpikingBrain (GLA/SWA)", "s-"),
                              ("pure_gla_s", "pure GLA", "^--")):
        pts = [(r["length"], r[key]) for r in d["rows"] if r.get(key)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("prefill time / TTFT (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _plot_decode(d: dict, png: Path, title: str) -> None:
    plt = _plt()
    rows = d["rows"]
    models = list(dict.fromkeys(k[:-3] for r in rows for k in r
                                if k.endswith("_ms") and not _per_setting(k[:-3])))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    labels = {"teacher": "teacher (Transformer)", "sb_fp32": "SpikingBrain fp32", "sb_bf16": "SpikingBrain bf16",
              "sb_int8": "SpikingBrain int8", "llama_cpp": "llama.cpp (teacher GGUF)",
              "lean_int8": "SpikingBrain lean step, int8", "lean_fp32": "SpikingBrain lean step, fp32"}
    for m in models:
        pts = [(r["context"], r[f"{m}_ms"]) for r in rows if r.get(f"{m}_ms")]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if m == "teacher" else "s-", label=labels.get(m, m))
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens already in the decode state)")
    ax.set_ylabel("ms / generated token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _plot_memory(d: dict, png: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, name in enumerate(dict.fromkeys(r["model"] for r in d["rows"])):
        mine = [r for r in d["rows"] if r["model"] == name]
        x = [r["context"] for r in mine]
        color = f"C{i}"
        ax.plot(x, [r["transformer_bytes"] / 2**20 for r in mine], "o-", color=color, label=f"Transformer KV: {name}")
        ax.plot(x, [r["spikingbrain_bytes"] / 2**20 for r in mine], "s--", color=color, label=f"SpikingBrain: {name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode-state memory, batch 1 (MiB)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


PLOTTERS = {"prefill": _plot_prefill, "decode": _plot_decode, "memory": _plot_memory}


def plot(v: View, png: Path | None = None) -> Path | None:
    """Write the view's plot (if its benchmark has one) next to its JSON; returns the path."""
    fn = PLOTTERS.get(v.name)
    if fn is None:
        return None
    png = png or v.path.with_suffix(".png")
    hw = v.meta.get("hardware", "")
    title = TITLES[v.name] + (f"\n{hw[:70]}" if hw and hw != "not recorded" and v.name != "memory" else "")
    fn(v.data, png, title)
    return png


def make_plots(results_dir: Path, only: list[Path] | None = None) -> list[Path]:
    """Plots for the JSON files of ``results_dir`` (or just ``only``)."""
    paths = [Path(p) for p in only] if only is not None else sorted(Path(results_dir).glob("*.json"))
    out = []
    for p in paths:
        try:
            v = view(p)
        except (ValueError, KeyError, TypeError):
            continue
        png = plot(v)
        if png:
            out.append(png)
    return out


# --------------------------------------------------------------------------- markdown
NOTES_BEGIN = "<!-- notes:{name} (hand-written; kept when regenerated) -->"
NOTES_END = "<!-- /notes:{name} -->"


def existing_notes(markdown: str) -> dict[str, str]:
    """The hand-written notes blocks of a previously generated report."""
    out = {}
    for m in re.finditer(r"<!-- notes:(\S+) \(hand-written; kept when regenerated\) -->\n(.*?)<!-- /notes:\1 -->",
                         markdown, flags=re.S):
        out[m.group(1)] = m.group(2).strip("\n")
    return out


def render_markdown(results_dir: Path, notes_dir: Path | None = None, previous: str | None = None,
                    link_base: Path | None = None, plots: bool = True) -> str:
    """The report: an intro, then per benchmark its description, notes, plots, and per JSON file
    its metadata, tables and ratios.

    Notes of benchmark ``name`` come from ``notes_dir/<name>.md`` when that file exists, else
    from the notes block of ``previous`` (the report being replaced), so hand-written analysis
    survives regeneration either way. ``notes_dir/intro.md`` goes at the top. PNG links are
    relative to ``link_base`` (the folder of the markdown file)."""
    results_dir = Path(results_dir)
    views = load_views(results_dir)
    unrecorded = [v.path.name for v in views if v.meta["command"] == "not recorded"]
    if unrecorded:
        raise SpikingBrainError(
            f"{', '.join(unrecorded)} in {results_dir} record no command: every figure in BENCHMARKS.md must come "
            "with the command that produced it. Re-run the benchmark (its scripts record the command) or remove the file."
        )
    old = existing_notes(previous or "")

    def notes(name: str) -> str:
        f = notes_dir / f"{name}.md" if notes_dir else None
        if f is not None and f.is_file():
            return f.read_text().strip("\n")
        return old.get(name, "")

    def link(p: Path) -> str:
        base = link_base or Path.cwd()
        try:
            return Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()
        except ValueError:
            return p.as_posix()

    lines = ["# Benchmarks", "",
             "Generated by `python3 scripts/make_benchmarks_md.py` from the JSON files in "
             f"`{link(results_dir)}/` (written by `spikingbrain bench` or the scripts in `benchmarks/`). "
             "Every table comes from one JSON file; its hardware, date, torch version and exact command are "
             "recorded with it. Notes are hand-written: edit `benchmarks/notes/<name>.md` (or the notes block "
             "below each heading); regeneration keeps them.", ""]
    intro = notes("intro")
    lines += [NOTES_BEGIN.format(name="intro"), intro, NOTES_END.format(name="intro"), ""]
    if not views:
        lines += ["No results yet: run `spikingbrain bench`.", ""]
    lines += ["Contents: " + ", ".join(f"[{TITLES.get(n, n)}](#{_anchor(TITLES.get(n, n))})"
                                      for n in dict.fromkeys(v.name for v in views)), ""] if views else []
    for name in dict.fromkeys(v.name for v in views):
        mine = [v for v in views if v.name == name]
        lines += [f"## {TITLES.get(name, name)}", ""]
        if name in SCRIPTS:
            lines += [f"Script: `{SCRIPTS[name]}`.", ""]
        elif name == "memory":
            lines += ["Computed by `spikingbrain bench --only memory` (`src/spikingbrain/evaluation/bench.py`).", ""]
        lines += [NOTES_BEGIN.format(name=name), notes(name), NOTES_END.format(name=name), ""]
        for v in mine:
            png = v.path.with_suffix(".png")
            if plots and png.is_file():
                lines += [f"![{TITLES.get(name, name)} ({v.path.stem})]({link(png)})", ""]
        for v in mine:
            m = v.meta
            lines += [f"### `{v.path.name}`", "",
                      f"- hardware: {m['hardware']}", f"- date: {m['date']}", f"- torch: {m['torch']}",
                      f"- command: `{m['command']}`"]
            if m.get("bench_command") and m["bench_command"] != m["command"]:
                lines.append(f"- via: `{m['bench_command']}`")
            lines.append("")
            for t in v.tables:
                lines += [markdown_table(t), ""]
            if v.summary:
                lines += [f"- {s}" for s in v.summary] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def write_markdown(results_dir: Path, out: Path, notes_dir: Path | None = None, plots: bool = True) -> Path:
    """(Re)write ``out`` from ``results_dir``, regenerating the plots first when ``plots``."""
    out = Path(out)
    if plots:
        make_plots(results_dir)
    if notes_dir is None:
        candidate = Path(results_dir).resolve().parent / "notes"
        notes_dir = candidate if candidate.is_dir() else None
    previous = out.read_text() if out.is_file() else None
    text = render_markdown(results_dir, notes_dir, previous, link_base=out.resolve().parent, plots=plots)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
