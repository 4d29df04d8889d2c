"""The released SpikingBrain-7B on a plain CPU: load time and peak memory, decode speed at 1k and
32k context, decode-state memory at 32k and 128k against a Transformer of the same shape.

The checkpoint: the official ``gla_swa`` format with the released 7B config (28 layers, hidden
3584, FFN 18944, 28 heads / 4 KV heads, vocab 152064, window 4096) and random bf16 weights,
written once with ``--make`` (~15 GB; outside the repository). Speed and memory do not depend on
the weights' values.

Each load runs in a fresh child process (so its peak is its own): ``spikingbrain.serve.loading.
load_model`` as ``spikingbrain generate/chat/serve`` call it, with ``--int8`` (every linear
quantized as soon as it is read) and with ``--dtype bf16``. Measured: wall time, peak resident
memory (``VmHWM``), and the bytes of the loaded model's tensors.

Decode: a batch-1 decode step at context L, median over ``--tokens`` steps after ``--warmup``.
A real prefill of 32k tokens through a 7B on 2 cores would take hours, so the decode state is
built synthetically with exactly the shapes and bookkeeping a prefill of L tokens leaves
(``evaluation.speed.fill_spikingbrain_cache``: GLA states of random values, SWA ring buffers
holding the last w keys/values at positions L-w..L-1, stream and position counters at L); a decode
step's cost depends only on those shapes. State memory is that cache's bytes (measured); the
Transformer's (Qwen2.5-7B shape) is its KV cache, 2 x 28 layers x 4 KV heads x 128 x L values,
computed in bf16.

    python3 benchmarks/official_7b.py --make --checkpoint /work/scratch/sb7b --tokenizer-from DIR  # once, ~15 GB
    python3 benchmarks/official_7b.py --checkpoint /work/scratch/sb7b --out benchmarks/results/official_7b.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

OFFICIAL_7B = {  # the released config.json (BICLab/SpikingBrain-7B, W8ASpike/config.json), minus auto_map
    "architectures": ["GLAswaForCausalLM"], "attention_dropout": 0.0, "attn_layers": list(range(1, 28, 2)),
    "attn_mode": "chunk", "bos_token_id": 151643, "conv_size": 4, "elementwise_affine": True,
    "eos_token_id": 151643, "fuse_cross_entropy": True, "hidden_act": "swish", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
    "model_type": "gla_swa", "norm_eps": 1e-06, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": True, "use_short_conv": False,
    "vocab_size": 152064,
}
QWEN25_7B_KV = {"layers": 28, "kv_heads": 4, "head_dim": 128}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("/work/scratch/spikingbrain-7b-official"))
    p.add_argument("--make", action="store_true", help="write the random 7B checkpoint (official format) and exit")
    p.add_argument("--layers", type=int, default=28, help="with --make: fewer layers, for a smoke run")
    p.add_argument("--tokenizer-from", type=Path, default=None,
                   help="with --make: copy the tokenizer files from this folder (the release's Qwen2 tokenizer: "
                        "vocab.json, merges.txt, tokenizer_config.json, ... from the authors' W8ASpike folder)")
    p.add_argument("--contexts", default="1024,32768")
    p.add_argument("--state-contexts", default="32768,131072")
    p.add_argument("--tokens", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--modes", default="int8,bf16")
    p.add_argument("--out", default=None)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # child process: one load + decode
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the checkpoint
def make_checkpoint(path: Path, layers: int = 28) -> None:
    """Random bf16 weights under the official names and shapes, one shard per two layers."""
    import torch
    from safetensors.torch import save_file

    from spikingbrain.convert.official import native_config, official_name
    from spikingbrain.loader import _targets, build_skeleton

    path.mkdir(parents=True, exist_ok=True)
    config = {**OFFICIAL_7B, "num_hidden_layers": layers, "attn_layers": list(range(1, layers, 2))}
    skeleton = build_skeleton(native_config(config))
    targets = _targets(skeleton)
    groups: dict[str, list[str]] = {}
    for name in targets:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        key = f"layers{int(layer) // 2:02d}" if layer is not None else ("embed" if "embed" in name else "head")
        groups.setdefault(key, []).append(name)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, (key, names) in enumerate(sorted(groups.items())):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            shape = tuple(targets[n][2].shape)
            if n.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            elif n.endswith("bias"):
                t = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            tensors[official_name(n)] = t
            weight_map[official_name(n)] = fname
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        print(f"wrote {fname} ({sum(t.numel() for t in tensors.values()) / 1e9:.2f}B values)", flush=True)
        del tensors
    total = sum(os.path.getsize(path / f) for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------- one child process
def vm_hwm() -> int:
    """Peak resident set size of this process so far, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_nbytes(model) -> int:
    """Bytes of the model's tensors, int8 packed weights of dynamically quantized linears included."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        if hasattr(m, "_packed_params") and hasattr(m, "weight") and callable(m.weight):
            w = m.weight()
            total += w.numel() * w.element_size()
            b = m.bias() if callable(getattr(m, "bias", None)) else None
            if b is not None:
                total += b.numel() * b.element_size()
    return total


def run_phase(args) -> dict:
    import torch

    from spikingbrain.evaluation.speed import fill_spikingbrain_cache, time_decode
    from spikingbrain.serve.loading import load_model

    torch.set_num_threads(args.threads)
    mode = args.phase
    before = vm_hwm()
    t0 = time.perf_counter()
    model, _, _ = load_model(str(args.checkpoint), dtype="bf16" if mode == "bf16" else "fp32",
                             int8=mode == "int8", progress=False)
    load_s = time.perf_counter() - t0
    load_peak = vm_hwm()
    size = model_nbytes(model)
    row = {"mode": mode, "load_s": load_s, "load_peak_rss_bytes": load_peak, "rss_before_load_bytes": before,
           "model_bytes": size, "peak_over_model": load_peak / size}
    decode = {}
    for L in [int(x) for x in args.contexts.split(",")]:
        cache = fill_spikingbrain_cache(model, L)
        decode[L] = time_decode(model, cache, args.tokens, args.warmup)
        print(f"  {mode}: decode at {L}: {decode[L]:.0f} ms/token", file=sys.stderr, flush=True)
        del cache
    row["decode_ms"] = {str(k): v for k, v in decode.items()}
    states = {}
    for L in [int(x) for x in args.state_contexts.split(",")]:
        cache = fill_spikingbrain_cache(model, L)
        states[str(L)] = cache.nbytes()
        del cache
    row["state_bytes"] = states
    row["peak_rss_bytes"] = vm_hwm()
    return row


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make:
        make_checkpoint(args.checkpoint, args.layers)
        if args.tokenizer_from:
            import shutil

            from spikingbrain.convert.official import TOKENIZER_FILES

            for f in TOKENIZER_FILES:
                if (args.tokenizer_from / f).is_file():
                    shutil.copy2(args.tokenizer_from / f, args.checkpoint / f)
        return 0
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    if not (args.checkpoint / "config.json").is_file():
        print(f"no checkpoint at {args.checkpoint}: run with --make first", file=sys.stderr)
        return 2
    from spikingbrain.evaluation.bench import run_info
    from spikingbrain.weights import CheckpointFiles

    with CheckpointFiles(args.checkpoint) as files:
        ckpt_bytes = files.nbytes()
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--phase", mode, "--checkpoint", str(args.checkpoint), "--contexts",
               args.contexts, "--state-contexts", args.state_contexts, "--tokens", str(args.tokens), "--warmup",
               str(args.warmup), "--threads", str(args.threads)]
        print(f"{mode}: loading {args.checkpoint} in a child process", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            return 1
        sys.stderr.write(res.stderr[-2000:])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    kv = QWEN25_7B_KV
    per_token = 2 * kv["layers"] * kv["kv_heads"] * kv["head_dim"] * 2  # k and v, bf16
    states = []
    for r in rows:
        for L, b in r["state_bytes"].items():
            states.append({"context": int(L), "spikingbrain": r["mode"], "spikingbrain_state_bytes": b,
                           "qwen25_7b_kv_bytes_bf16": per_token * int(L),
                           "kv_over_state": per_token * int(L) / b})
    for r in rows:
        d = r["decode_ms"]
        ks = sorted(d, key=int)
        r["decode_last_over_first"] = d[ks[-1]] / d[ks[0]]
    result = {**run_info("official_7b", "official_7b.py", argv if argv is not None else sys.argv[1:], "cpu",
                         args.threads),
              "checkpoint": {"format": "gla_swa (released SpikingBrain-7B config, random bf16 weights)",
                             "bytes": ckpt_bytes},
              "decode_state": "synthetic: built with the shapes a prefill of L tokens leaves (see the script)",
              "rows": rows, "state_memory": states,
              "targets": {"int8_load_peak_rss_bytes_max": 10 * 10**9, "decode_32k_over_1k_max": 1.10}}
    int8 = next((r for r in rows if r["mode"] == "int8"), None)
    if int8 is not None:
        result["targets_met"] = {
            "int8_load_peak_rss": int8["load_peak_rss_bytes"] <= result["targets"]["int8_load_peak_rss_bytes_max"],
            "decode_32k_over_1k": all(r["decode_last_over_first"] <= 1.10 for r in rows)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
