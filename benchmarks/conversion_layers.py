"""Where a converted model's error lives: put the teacher's softmax attention back into one GLA
layer at a time and measure top-1 agreement / KL with the teacher at a 2k context.

The 7B layout's SWA layers (4096-token window) are exact at a 2k context, so every bit of the
student's KL comes from its GLA layers. A layer whose restoration closes much of the gap is
where training (or a different layer type) should go; a gap spread evenly over the layers
needs every GLA layer closer, i.e. more tokens. The other layers keep the delta's weights (FFN
updates included); the restored layer gets the teacher's attention weights.

    python3 benchmarks/conversion_layers.py [--delta FILE] [--tokens 4096]
        [--out benchmarks/results/conversion_layers.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def restored(student, teacher, tok, layer: int):
    """``student`` with GLA layer ``layer`` turned back into the teacher's softmax attention."""
    from spikingbrain.convert.mapping import convert_from_transformer

    types = list(student.config.layer_types)
    types[layer] = next(t for t in types if "gla" not in t)
    m = convert_from_transformer(teacher, layout=types, sliding_window=student.config.sliding_window, tokenizer=tok)
    own = m.state_dict()
    keep = {k: v for k, v in student.state_dict().items()
            if not k.startswith(f"model.layers.{layer}.self_attn.") and k in own and own[k].shape == v.shape}
    missing, _ = m.load_state_dict(keep, strict=False)
    assert all(k.startswith(f"model.layers.{layer}.") for k in missing), missing[:3]
    return m.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delta", default=None, help="the delta to diagnose (default: the shipped one)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored per variant")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/conversion_layers.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from spikingbrain.convert.delta import convert_with_delta, gla_layers, shipped_delta_path
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.evaluation.agreement import teacher_agreement
    from spikingbrain.evaluation.bench import run_info
    from spikingbrain.evaluation.texts import shipped_texts

    info = run_info("conversion_layers", "conversion_layers.py", argv, threads=args.threads)
    t0 = time.time()
    teacher, tok = load_teacher()
    teacher.eval()
    delta = args.delta or str(shipped_delta_path())
    student, _ = convert_with_delta(teacher, delta, tok)
    texts = shipped_texts("valid")

    def measure(m) -> dict:
        with torch.inference_mode():
            q = teacher_agreement(m, teacher, tok, texts, context_length=args.context, max_tokens=args.tokens)
        return {"top1": q["top1"], "kl": q["kl"], "ppl_ratio": q["model_ppl"] / q["teacher_ppl"]}

    res = {**info, "delta": delta, "tokens": args.tokens, "context": args.context, "student": measure(student)}
    print("student:", json.dumps(res["student"]), flush=True)
    res["restored"] = {}
    for i in gla_layers(student):
        r = measure(restored(student, teacher, tok, i))
        r["kl_closed"] = res["student"]["kl"] - r["kl"]
        res["restored"][str(i)] = r
        print(f"layer {i:2d} restored: top-1 {r['top1']:.4f}  KL {r['kl']:.4f}  (closes {r['kl_closed']:+.4f})", flush=True)
    res["kl_closed_sum"] = sum(r["kl_closed"] for r in res["restored"].values())
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} ({res['seconds']:.0f} s); the single-layer KL reductions sum to {res['kl_closed_sum']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
