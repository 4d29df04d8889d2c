"""Training throughput and MFU: SpikingBrain (7B layout: GLA / SWA alternating) versus the
Llama-shaped Transformer of the same size (Hugging Face ``LlamaForCausalLM``, SDPA), measured
side by side in one run with the trainer's own step (forward, CE over every token, backward,
AdamW).

Definitions
- step time: mean wall time of ``--steps`` timed steps after ``--warmup`` untimed ones
  (CUDA synchronised).
- tokens/s = batch * seq_len / step time.
- model FLOPs per token (training = 3x forward): ``6 * N`` for the ``N`` weights of the matmuls
  (every Linear in the blocks + the LM head; embeddings are lookups) plus the mixers:
    * full causal softmax: forward ``4 * H * dh * c`` per layer with ``c = (T + 1) / 2`` keys
      on average (QK^T and PV, 2 FLOPs per MAC);
    * SWA with window ``w``: the same with ``c`` = mean over positions of ``min(i + 1, w)``;
    * GLA: forward ``4 * H * dh * dh`` per layer (state update ``k^T v`` and read-out ``q S``),
      the recurrent form's count; the chunked kernels do more work than this, which MFU then
      does not credit.
- MFU = model FLOPs per token * tokens/s / peak FLOP/s. Peak: ``--peak-tflops``, or for known
  GPUs the dense bf16 figure (H100/H200 SXM 989, A100 312); on CPU MFU is printed only when
  ``--peak-tflops`` is given.

Usage
    python benchmarks/train_throughput.py                      # CPU, small shapes
    python benchmarks/train_throughput.py --gpu-1b             # ~1B, 16k context, bf16, on CUDA
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def shapes(args) -> dict:
    if args.gpu_1b:
        return dict(hidden=2048, layers=20, heads=16, kv_heads=2, intermediate=5632, vocab=32000,
                    seq_len=16384, batch=1, window=4096)
    return dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                intermediate=args.intermediate, vocab=args.vocab, seq_len=args.seq_len, batch=args.batch,
                window=args.window)


def build(kind: str, s: dict, device, gla_mode: str | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                  max_position_embeddings=max(s["seq_len"], 4096), tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa"))
    else:
        cfg = SpikingBrainConfig(**common, sliding_window=s["window"],
                                 layer_types=["gla" if i % 2 == 0 else "swa" for i in range(s["layers"])])
        model = SpikingBrainForCausalLM(cfg)
        if gla_mode:
            model.set_gla_mode(gla_mode)
    model.config.use_cache = False
    return model.to(device).train()


def model_flops_per_token(model, kind: str, s: dict) -> float:
    """Training FLOPs per token (see the module docstring)."""
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear))
    T, w = s["seq_len"], s["window"]
    dh = s["hidden"] // s["heads"]
    H = s["heads"]
    full_c = (T + 1) / 2
    swa_c = (sum(min(i + 1, w) for i in range(T)) / T) if T <= 1_000_000 else w
    mixer = 0.0
    for i in range(s["layers"]):
        if kind == "llama":
            mixer += 4 * H * dh * full_c
        elif i % 2 == 0:
            mixer += 4 * H * dh * dh
        else:
            mixer += 4 * H * dh * swa_c
    return 6.0 * n + 3.0 * mixer


def time_training(model, s: dict, device, dtype, steps: int, warmup: int, grad_ckpt: bool) -> float:
    from spikingbrain.train.objective import token_losses

    if grad_ckpt:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    B, T = s["batch"], s["seq_len"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["vocab"], (B, T), generator=g).to(device)
    pos = torch.arange(T, device=device)[None].expand(B, T)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, position_ids=pos, use_cache=False)
            loss = token_losses(out.logits, ids)["ce_sum"] / (B * (T - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-1b", action="store_true", help="~1B 7B-layout shape at 16k context, bf16, CUDA")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--window", type=int, default=256, help="SWA window of the SpikingBrain model")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--gla-mode", default=None, help="force a GLA path (chunk / fla); default: auto")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--only", choices=["spikingbrain", "llama"], default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.gpu_1b and device.type != "cuda":
        p.error("--gpu-1b needs CUDA")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    s = shapes(args)
    grad_ckpt = args.grad_checkpointing or args.gpu_1b
    peak = args.peak_tflops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    print(f"device {name}, autocast {dtype}, shape {s}, grad checkpointing {grad_ckpt}")
    results = {}
    for kind in ("spikingbrain", "llama"):
        if args.only and kind != args.only:
            continue
        model = build(kind, s, device, args.gla_mode)
        params = sum(q.numel() for q in model.parameters())
        flops = model_flops_per_token(model, kind, s)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = time_training(model, s, device, dtype, args.steps, args.warmup, grad_ckpt)
        tps = s["batch"] * s["seq_len"] / step
        mfu = flops * tps / (peak * 1e12) if peak else None
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[kind] = {"params": params, "step_s": step, "tokens_per_s": tps, "flops_per_token": flops,
                         "mfu": mfu, "peak_mem_gib": mem}
        print(f"{kind:>12}: {params / 1e6:8.1f}M params  {step * 1e3:9.1f} ms/step  {tps:10.1f} tok/s  "
              f"{flops / 1e9:7.3f} GFLOP/token  MFU {'%.1f%%' % (100 * mfu) if mfu is not None else 'n/a'}"
              + (f"  peak mem {mem:.1f} GiB" if mem is not None else ""))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(results) == 2:
        r = results["spikingbrain"]["tokens_per_s"] / results["llama"]["tokens_per_s"]
        print(f"tokens/s ratio spikingbrain / llama: {r:.3f}")
        results["ratio_tokens_per_s"] = r
    if args.json:
        from spikingbrain.evaluation.bench import run_info

        info = run_info("train", "train_throughput.py", argv, str(device))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "device": name, "shape": s, "dtype": str(dtype),
                                               "grad_checkpointing": grad_ckpt, "peak_tflops": peak, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
