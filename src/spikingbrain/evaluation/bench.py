"""``spikingbrain bench``: run the benchmark scripts of the repository's ``benchmarks/`` folder
(and the decode-state memory benchmark, computed here) with one command, write one JSON file per
benchmark and the plots.

Benchmarks (``--only``, comma-separated, or ``all``):

- ``prefill``: ``benchmarks/prefill.py``, prefill time vs prompt length, SpikingBrain vs the
  Transformer of the same shape (and pure GLA);
- ``decode``: ``benchmarks/decode.py``, ms/token vs context, SpikingBrain vs its teacher;
- ``train``: ``benchmarks/train_throughput.py``, training tokens/s and MFU vs Llama;
- ``moe``: ``benchmarks/moe.py``, MoE FFN vs the dense FFN of the same active size;
- ``memory``: decode-state bytes vs context, SpikingBrain cache vs a transformers KV cache
  (measured on real cache objects; cheap, needs no repository);
- ``spiking``: ``benchmarks/spiking_sweep.py``, perplexity / sparsity / energy vs k;
- ``context_parallel``: ``benchmarks/context_parallel.py``, sharded prefill and bytes sent.

Default: ``prefill,decode,train,moe,memory``. Presets: ``--quick`` (a smoke run, about a minute
per benchmark on 2 CPU cores; written to ``<out>/quick/`` so it never overwrites real results),
the default (the sizes the scripts use) and ``--preset large`` (GPU sizes). The scripts run as
subprocesses of the same Python; their JSON carries the hardware, date, torch version and command.
``scripts/make_benchmarks_md.py`` turns the results into ``BENCHMARKS.md``.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spikingbrain.errors import SpikingBrainError

PACKAGE_SRC = Path(__file__).resolve().parents[2]  # .../src
REPO_ROOT = PACKAGE_SRC.parent


@dataclass(frozen=True)
class Spec:
    """How to run one benchmark script."""

    name: str
    script: str | None  # file in benchmarks/, None: computed in-process
    out_flag: str | None = None  # the script's "write JSON here" option
    device_flag: str | None = None  # None: CPU only
    threads_flag: bool = False
    per_device: bool = True  # file name carries the device
    file: str | None = None  # output file name when not per device (default: <name>.json)
    presets: dict[str, list[str]] = field(default_factory=dict)
    help: str = ""


BENCHMARKS: dict[str, Spec] = {s.name: s for s in [
    Spec("prefill", "prefill.py", "--out", "--device", True, presets={
        "quick": ["--lengths", "256,1024", "--repeats", "1"],
        "large": ["--lengths", "1024,4096,16384,65536,131072", "--repeats", "3"],
    }, help="prefill time vs length: SpikingBrain vs Transformer vs pure GLA"),
    Spec("decode", "decode.py", "--out", "--device", True, presets={
        "quick": ["--contexts", "256,1024", "--tokens", "3", "--warmup", "1", "--rounds", "1", "--no-compile",
                  "--teacher-dtypes", "fp32", "--no-llama-cpp"],
        "large": ["--contexts", "4096,16384,65536,131072", "--tokens", "16", "--teacher-max-context", "65536",
                  "--llama-cpp-max-context", "16384"],
    }, help="decode ms/token vs context: SpikingBrain (own and lean step) vs llama.cpp and its teacher"),
    Spec("train", "train_throughput.py", "--json", "--device", False, presets={
        "quick": ["--hidden", "128", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate", "256",
                  "--vocab", "1024", "--seq-len", "256", "--window", "64", "--batch", "1", "--steps", "2"],
        "large": ["--gpu-1b"],
    }, help="training tokens/s and MFU: SpikingBrain vs Llama"),
    Spec("moe", "moe.py", "--json", "--devices", True, presets={
        "quick": ["--hidden", "256", "--intermediate", "512", "--experts", "8", "--tokens", "16,512",
                  "--repeats", "2", "--warmup", "1"],
        "large": ["--hidden", "2048", "--intermediate", "1408", "--experts", "64", "--top-k", "6", "--shared", "2",
                  "--tokens", "16,4096,16384"],
    }, help="MoE FFN vs dense FFN of the same active size"),
    Spec("memory", None, per_device=False, presets={}, help="decode-state bytes vs context (computed here)"),
    Spec("spiking", "spiking_sweep.py", "--json", None, True, per_device=False, file="spiking_sweep.json", presets={
        "quick": ["--ks", "3", "--max-tokens", "256", "--seq-len", "128"],
        "large": ["--max-tokens", "16384"],
    }, help="spiking sweep: perplexity, sparsity, energy vs k (CPU)"),
    Spec("context_parallel", "context_parallel.py", "--out", None, False, per_device=False, presets={
        "quick": ["--procs", "1,2", "--lengths", "512,1024", "--repeats", "1"],
        "large": ["--procs", "1,2,4", "--lengths", "2048,4096,8192,16384"],
    }, help="context-parallel prefill and bytes sent (CPU processes)"),
]}
ALIASES = {"train_throughput": "train", "spiking_sweep": "spiking", "cp": "context_parallel",
           "context_parallel_prefill": "context_parallel"}
DEFAULT_ONLY = ("prefill", "decode", "train", "moe", "memory")
PRESETS = ("quick", "default", "large")

MEMORY_CONTEXTS = {"quick": [1024, 4096, 16384, 65536],
                   "default": [1 << p for p in range(10, 21)],  # 1k .. 1M
                   "large": [1 << p for p in range(10, 23)]}  # 1k .. 4M


# --------------------------------------------------------------------------- metadata
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str = "cpu", threads: int | None = None) -> str:
    """One line naming the machine: the GPU for CUDA, else the CPU model, cores and threads."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda}); host {cpu_name()}"
    threads = threads or torch.get_num_threads()
    return f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {threads} thread{'s' if threads != 1 else ''}"


def run_info(benchmark: str, script: str | None = None, argv=None, device: str = "cpu",
             threads: int | None = None) -> dict:
    """The fields every benchmark JSON carries: benchmark, date, hardware, torch, python, command.

    ``command``: ``python3 benchmarks/<script> <args>`` (``argv``: the script's arguments, default
    ``sys.argv[1:]``) or, without ``script``, the ``spikingbrain`` command line."""
    import torch

    args = list(sys.argv[1:] if argv is None else argv)
    if script:
        command = f"python3 benchmarks/{script}" + (" " + shlex.join(args) if args else "")
    else:
        command = "spikingbrain " + shlex.join(args)
    return {"benchmark": benchmark, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "hardware": hardware(device, threads), "device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "command": command}


# --------------------------------------------------------------------------- memory benchmark
def _spikingbrain_layer_bytes(preset: str, dtype, L: int) -> tuple[dict[str, int], list[str], dict]:
    """Decode-state bytes per layer type of a preset at context ``L``, measured on a real
    ``SpikingBrainCache`` filled by ``fill_spikingbrain_cache``. The state of a layer depends only
    on its attention shapes, so the model has one layer of each type, a tiny vocabulary and FFN,
    and uninitialised weights (built on the meta device)."""
    import torch

    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
    from spikingbrain.evaluation.speed import fill_spikingbrain_cache

    base = SpikingBrainConfig.from_preset(preset)
    if any("full" in t for t in base.layer_types):
        raise SpikingBrainError("the memory benchmark measures constant-state layouts only (no full attention)")
    types = list(dict.fromkeys(base.layer_types))
    cfg = SpikingBrainConfig.from_preset(preset, num_hidden_layers=len(types), layer_types=types,
                                         mlp_layer_types=["dense"] * len(types), vocab_size=256,
                                         intermediate_size=32, bos_token_id=None, eos_token_id=None,
                                         pad_token_id=None)
    with torch.device("meta"):
        model = SpikingBrainForCausalLM(cfg).to(dtype)
    model = model.to_empty(device="cpu").eval()
    cache = fill_spikingbrain_cache(model, L)
    per_type = {t: cache.layers[i].nbytes() for i, t in enumerate(types)}
    shapes = {f"{t}.{name}": list(tensor.shape) for i, t in enumerate(types)
              for part in cache.layers[i]._parts() for name, tensor in part.tensors.items()}
    return per_type, base.layer_types, shapes


def _transformer_cache_bytes(teacher_cfg: dict, dtype, L: int) -> int:
    """Bytes of a transformers ``DynamicCache`` holding ``L`` tokens (a meta-device model and
    cache: the tensors are real objects with shapes and dtypes, without memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain.evaluation.speed import cache_bytes, fill_teacher_cache

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**teacher_cfg)).to(dtype)
    return cache_bytes(fill_teacher_cache(model, L))


MEMORY_MODELS = {
    # name: (SpikingBrain preset, Transformer shape (LlamaConfig kwargs), dtype)
    "SmolLM2-135M shape (default teacher), fp32": ("smollm2-135m-7b", dict(
        vocab_size=256, hidden_size=576, intermediate_size=32, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=1 << 23), "float32"),
    "7B shape (Qwen2.5-7B teacher), bf16": ("spikingbrain-7b", dict(
        vocab_size=256, hidden_size=3584, intermediate_size=32, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=1 << 23), "bfloat16"),
}


def memory_benchmark(contexts: list[int]) -> dict:
    """Decode-state memory (batch 1) vs context for SpikingBrain and a Transformer KV cache."""
    import torch

    rows, details = [], {}
    for name, (preset, tcfg, dtype_name) in MEMORY_MODELS.items():
        dtype = getattr(torch, dtype_name)
        for L in contexts:
            per_type, layer_types, shapes = _spikingbrain_layer_bytes(preset, dtype, L)
            sb = sum(per_type[t] for t in layer_types)
            tf = _transformer_cache_bytes(tcfg, dtype, L)
            rows.append({"model": name, "dtype": dtype_name, "context": L, "transformer_bytes": tf,
                         "spikingbrain_bytes": sb, "transformer_over_spikingbrain": tf / sb})
        details[name] = {"spikingbrain_preset": preset, "transformer_shape": tcfg, "dtype": dtype_name,
                         "spikingbrain_bytes_per_layer_type": per_type,
                         "layer_counts": {t: layer_types.count(t) for t in per_type},
                         "spikingbrain_state_shapes": shapes}
    for name in MEMORY_MODELS:
        sb = [r["spikingbrain_bytes"] for r in rows if r["model"] == name]
        details[name]["spikingbrain_constant"] = max(sb) == min(sb)
    return {"rows": rows, "models": details,
            "method": "Transformer: bytes of a transformers DynamicCache holding L random keys/values per layer "
                      "(evaluation.speed.fill_teacher_cache); SpikingBrain: bytes of a SpikingBrainCache as if L "
                      "tokens had been read (fill_spikingbrain_cache: GLA states + full SWA ring buffers incl. "
                      "positions/validity); batch 1."}


# --------------------------------------------------------------------------- runner
def benchmarks_dir(override: str | os.PathLike | None = None) -> Path:
    d = Path(override) if override else REPO_ROOT / "benchmarks"
    if not (d / "prefill.py").is_file() and not any(d.glob("*.py")):
        raise SpikingBrainError(
            f"benchmark scripts not found at {d}: they live in the repository's benchmarks/ folder and are not "
            "installed with the package. Run `spikingbrain bench` from an (editable) install of a clone of the "
            "repository, or pass --benchmarks-dir DIR. (`--only memory` needs no scripts.)")
    return d


def default_out_dir() -> Path:
    """``benchmarks/results`` of the repository when working inside it, else ``./bench-results``."""
    cwd = Path.cwd().resolve()
    if (REPO_ROOT / "benchmarks").is_dir() and (cwd == REPO_ROOT or REPO_ROOT in cwd.parents):
        return REPO_ROOT / "benchmarks" / "results"
    return cwd / "bench-results"


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(DEFAULT_ONLY)
    names = [ALIASES.get(x.strip(), x.strip()) for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return list(BENCHMARKS)
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        raise SpikingBrainError(f"unknown benchmark(s) {', '.join(bad)}; choose from {', '.join(BENCHMARKS)} or all")
    return list(dict.fromkeys(names))


def parse_extra(items: list[str] | None) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, rest = item.partition("=")
        name = ALIASES.get(name.strip(), name.strip())
        if not sep or name not in BENCHMARKS:
            raise SpikingBrainError(f"bad --args {item!r}: use NAME='--flag value ...' with NAME in {', '.join(BENCHMARKS)}")
        extra.setdefault(name, []).extend(shlex.split(rest))
    return extra


def out_file(spec: Spec, out_dir: Path, device: str) -> Path:
    if spec.per_device:
        return out_dir / f"{spec.name}_{device.split(':')[0]}.json"
    return out_dir / (spec.file or f"{spec.name}.json")


def _short(path: Path) -> str:
    """``path`` relative to the working directory when inside it (what the JSON records)."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd().resolve())
    return rel if not rel.startswith("..") else str(path)


def script_command(spec: Spec, bdir: Path, out: Path, preset: str, device: str, threads: int | None,
                   model: str | None, extra: list[str]) -> list[str]:
    """The subprocess command line of one script benchmark."""
    cmd = [sys.executable, str(bdir / spec.script)]
    cmd += spec.presets.get(preset, [])
    if preset == "large" and spec.name == "train" and not device.startswith("cuda"):
        cmd = cmd[:2]  # --gpu-1b needs CUDA: the default shapes on CPU
    if spec.device_flag:
        cmd += [spec.device_flag, device]
    if threads and spec.threads_flag:
        cmd += ["--threads", str(threads)]
    if spec.name == "decode" and model:
        cmd += ["--model", model]
    if spec.name == "spiking":
        from spikingbrain.serve.loading import DEFAULT_MODEL_DIR

        cmd += ["--model", model or (str(DEFAULT_MODEL_DIR) if DEFAULT_MODEL_DIR.is_dir() else "teacher")]
    cmd += extra
    cmd += [spec.out_flag, _short(out)]
    return cmd


def _display(cmd: list[str]) -> str:
    shown = ["python3" if c == sys.executable else c for c in cmd]
    return shlex.join(shown)


def run_one(spec: Spec, cmd: list[str] | None, out: Path, args, bench_command: str) -> dict:
    """Run one benchmark; returns ``{"name", "ok", "seconds", "json", "error"}``."""
    t0 = time.perf_counter()
    status = {"name": spec.name, "json": str(out), "ok": False, "error": None}
    try:
        if cmd is None:  # in-process
            ctx = args.memory_contexts or MEMORY_CONTEXTS[args.preset]
            result = {**run_info("memory", device="cpu"), **memory_benchmark(ctx),
                      "command": bench_command, "bench_command": bench_command, "bench_preset": args.preset}
            out.write_text(json.dumps(result, indent=1) + "\n")
        else:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            if args.threads:
                env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
            if out.exists():
                out.unlink()
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"exit status {proc.returncode}")
            if not out.is_file():
                raise RuntimeError(f"the script wrote no JSON at {out}")
            data = json.loads(out.read_text())
            data.setdefault("benchmark", spec.name)
            data.setdefault("command", _display(cmd))
            data.setdefault("date", dt.datetime.now().astimezone().isoformat(timespec="seconds"))
            data.setdefault("hardware", hardware(args.device if spec.device_flag else "cpu", args.threads))
            data.setdefault("torch", _torch_version())
            data["bench_command"] = bench_command
            data["bench_preset"] = args.preset
            out.write_text(json.dumps(data, indent=1) + "\n")
        status["ok"] = True
    except (RuntimeError, OSError, ValueError, SpikingBrainError) as e:
        status["error"] = str(e)
    status["seconds"] = time.perf_counter() - t0
    return status


def _torch_version() -> str:
    import torch

    return torch.__version__


def run(args) -> int:
    names = parse_only(args.only)
    extra = parse_extra(args.args)
    if args.quick:
        args.preset = "quick"
    args.memory_contexts = getattr(args, "memory_contexts", None)
    args.argv = getattr(args, "argv", None) or command_line(args)
    needs_scripts = [n for n in names if BENCHMARKS[n].script]
    bdir = benchmarks_dir(args.benchmarks_dir) if needs_scripts else None
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir()
    if args.preset == "quick" and not args.out_dir:
        out_dir = out_dir / "quick"  # a smoke run never overwrites real results
    if args.device.startswith("cuda") and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SpikingBrainError("--device cuda: CUDA is not available")
    bench_command = "spikingbrain bench " + shlex.join(args.argv or [])
    plan = []
    for n in names:
        spec = BENCHMARKS[n]
        out = out_file(spec, out_dir, args.device if spec.device_flag else "cpu")
        cmd = None if spec.script is None else script_command(
            spec, bdir, out, args.preset, args.device, args.threads, args.model, extra.get(n, []))
        plan.append((spec, cmd, out))
    for spec, cmd, out in plan:
        note = "" if spec.device_flag or not args.device.startswith("cuda") or spec.script is None else "  (CPU only)"
        print(f"[{spec.name}] " + (_display(cmd) if cmd else "in-process") + f"  -> {out}{note}")
    if args.dry_run:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    statuses = []
    for spec, cmd, out in plan:
        print(f"\n=== {spec.name} ===", flush=True)
        st = run_one(spec, cmd, out, args, bench_command)
        statuses.append(st)
        print(f"[{spec.name}] {'ok' if st['ok'] else 'FAILED: ' + st['error']} ({st['seconds']:.0f} s)", flush=True)
    plots = []
    if not args.no_plots:
        from spikingbrain.evaluation.bench_report import make_plots

        plots = make_plots(out_dir, only=[Path(s["json"]) for s in statuses if s["ok"]])
    print("\nbenchmark          status     seconds  output")
    for st in statuses:
        print(f"{st['name']:<18} {'ok' if st['ok'] else 'FAILED':<10} {st['seconds']:>7.0f}  {st['json']}")
    for p in plots:
        print(f"plot: {p}")
    if args.markdown:
        from spikingbrain.evaluation.bench_report import write_markdown

        path = write_markdown(out_dir, Path(args.markdown))
        print(f"wrote {path}")
    failed = [s["name"] for s in statuses if not s["ok"]]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the speed/memory benchmarks and plot them",
                       description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None,
                   help=f"comma-separated benchmarks from {','.join(BENCHMARKS)}, or all (default: {','.join(DEFAULT_ONLY)})")
    p.add_argument("--quick", action="store_true", help="minute-scale smoke sizes (same as --preset quick)")
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="sizes: quick (smoke run), default (the scripts' own), large (GPU sizes)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (prefill, decode, train, moe; the others run on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the scripts (default: theirs)")
    p.add_argument("--out-dir", default=None,
                   help="where the JSON and PNG files go (default: benchmarks/results/ inside the repository, "
                        "else ./bench-results; --quick adds /quick)")
    p.add_argument("--model", default=None, help="SpikingBrain model dir for decode and spiking (default: theirs)")
    p.add_argument("--args", action="append", metavar="NAME=ARGS",
                   help="extra arguments for one script, e.g. --args prefill='--lengths 1024,2048' (repeatable)")
    p.add_argument("--benchmarks-dir", default=None, help="the benchmark scripts' folder (default: the repository's)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write a BENCHMARKS.md-style report of the output folder here")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=_run_from_cli, memory_contexts=None)


_OPTIONS = (("only", "--only"), ("preset", "--preset"), ("device", "--device"), ("threads", "--threads"),
            ("out_dir", "--out-dir"), ("model", "--model"), ("benchmarks_dir", "--benchmarks-dir"),
            ("markdown", "--markdown"))
_DEFAULTS = {"preset": "default", "device": "cpu"}


def command_line(args) -> list[str]:
    """The ``spikingbrain bench`` arguments that differ from the defaults (what the JSON records)."""
    out = []
    if getattr(args, "quick", False):
        out.append("--quick")
    for attr, flag in _OPTIONS:
        value = getattr(args, attr, None)
        if value is None or (attr == "preset" and args.quick) or _DEFAULTS.get(attr) == value:
            continue
        out += [flag, str(value)]
    for item in getattr(args, "args", None) or []:
        out += ["--args", item]
    out += [flag for attr, flag in (("no_plots", "--no-plots"), ("dry_run", "--dry-run")) if getattr(args, attr, False)]
    return out


def _run_from_cli(args) -> int:
    args.argv = command_line(args)
    return run(args)
