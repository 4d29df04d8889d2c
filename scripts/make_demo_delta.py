"""Produce a trained delta for `spikingbrain demo --delta FILE`.

Runs the demo's own conversion with larger budgets: output-norm calibration, attention transfer
on the teacher's hidden states, then end-to-end distillation of the GLA layers, all on the
shipped training text; then stores only what the conversion changed (see demo.save_delta) with
its provenance (command, date, hardware, tokens, measured quality) in the file's metadata.

    python3 scripts/make_demo_delta.py [--out FILE] [--transfer-minutes 25] [--distill-minutes 15] [--device cuda]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transfer-minutes", type=float, default=25.0)
    p.add_argument("--transfer-steps", type=int, default=600)
    p.add_argument("--sequences", type=int, default=256, help="teacher sequences for attention transfer")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--distill-minutes", type=float, default=15.0)
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_delta.safetensors")
    args = p.parse_args(argv)

    from spikingbrain.convert.mapping import convert_from_transformer
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.demo import (DemoSettings, distill, full_conversion, measure_quality, sample_sequences,
                                   save_delta, shipped_ids, teacher_fingerprint)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = DemoSettings(seq_len=args.seq_len, train_sequences=args.sequences, transfer_steps=args.transfer_steps,
                     transfer_minutes=args.transfer_minutes, seed=args.seed)
    t0 = time.time()
    teacher, tok = load_teacher()
    teacher.to(device)
    for q in teacher.parameters():
        q.requires_grad_(False)
    stream = shipped_ids(tok, "train")
    student = convert_from_transformer(teacher, layout=s.layout, sliding_window=s.sliding_window, tokenizer=tok,
                                       seed=s.seed)
    info = full_conversion(student, teacher, stream, s, scale=1.0)
    print("attention transfer:", json.dumps(info), flush=True)
    batches = sample_sequences(stream, 512, s.seq_len, s.seed + 3)
    dlog = distill(student, teacher, batches, steps=args.distill_steps, minutes=args.distill_minutes,
                   batch_size=4, seed=s.seed)
    print(f"distillation: {len(dlog)} steps, KL {dlog[0]['kl']:.3f} -> {dlog[-1]['kl']:.3f}", flush=True)
    q = measure_quality(student, teacher, tok, s)
    print("held-out:", json.dumps(q), flush=True)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    meta = {
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "layer_types": json.dumps(student.config.layer_types),
        "sliding_window": student.config.sliding_window,
        "provenance": f"{dt.date.today().isoformat()}, {hw}, attention transfer {info['tokens']:,} tokens/layer "
                      f"+ distillation {dlog[-1]['tokens']:,} tokens on the shipped train split",
        "command": "python3 " + " ".join([sys.argv[0].split('/')[-2] + "/" + sys.argv[0].split('/')[-1]] + sys.argv[1:]),
        "attention_transfer": json.dumps(info),
        "distill_steps": len(dlog),
        "distill_tokens": dlog[-1]["tokens"],
        "heldout": json.dumps(q),
        "seconds": round(time.time() - t0),
        "torch": torch.__version__,
    }
    size = save_delta(student, teacher, args.out, meta)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
