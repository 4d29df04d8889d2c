"""``spikingbrain spikes MODEL_DIR --text FILE``: spike statistics, energy and quality versus k."""
from __future__ import annotations

import json
from pathlib import Path

from spikingbrain.errors import SpikingBrainError


def _ks(text: str) -> list[float]:
    try:
        ks = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpikingBrainError(f"--ks expects comma-separated numbers, got {text!r}") from None
    if not ks or any(k <= 0 for k in ks):
        raise SpikingBrainError(f"--ks needs positive values, got {text!r}")
    return ks


def register(sub) -> None:
    p = sub.add_parser(
        "spikes",
        help="spike-code a model: sparsity, spikes per channel, energy and perplexity versus k",
        description="Spikify MODEL_DIR (INT8 weights per row per group, INT8 KV, adaptive-threshold "
        "spike-coded activations), measure held-out perplexity unspiked vs spiked for each k, print "
        "the tables and write report.json plus PNG plots to --out.",
    )
    p.add_argument("model_dir", help="a saved model directory (SpikingBrain or any HF causal LM)")
    p.add_argument("--text", required=True, help="held-out text: .jsonl with a 'text' field, or plain text")
    p.add_argument("--k", type=float, default=3.0, help="the k whose per-projection table is printed (default 3)")
    p.add_argument("--ks", default="2,2.5,3,3.5,4", help="k values to sweep (default 2,2.5,3,3.5,4)")
    p.add_argument("--out", default=None, help="report directory (report.json, *.png)")
    p.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    p.add_argument("--seq-len", type=int, default=256, help="window length for perplexity (default 256)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="calibrate weight clipping on the first N tokens of --text (default 0: off)")
    p.add_argument("--keep-down-proj", action="store_true", help="leave down_proj unspiked (the released code's setting)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run)


def run(args) -> int:
    from spikingbrain.spiking.plots import plot_histograms, plot_sweep
    from spikingbrain.spiking.quality import load_causal_lm, load_texts, token_stream
    from spikingbrain.spiking.sweep import format_sweep, run_sweep

    ks = _ks(args.ks)
    if args.k not in ks:
        ks = sorted(ks + [args.k])
    if args.max_tokens < 2 or args.seq_len < 2:
        raise SpikingBrainError("--max-tokens and --seq-len must be >= 2")
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise SpikingBrainError(f"model directory not found: {model_dir}")
    texts = load_texts(args.text)
    model, tok = load_causal_lm(model_dir, args.dtype)
    calib = None
    if args.calibrate:
        calib_ids = token_stream(tok, texts, args.calibrate)
        ids = token_stream(tok, texts, args.calibrate + args.max_tokens)[args.calibrate :]
        calib = [w for w in calib_ids.split(args.seq_len)]
        if ids.numel() < 2:
            raise SpikingBrainError("--calibrate uses up the whole text; lower it or give more text")
    else:
        ids = token_stream(tok, texts, args.max_tokens)
    exclude = ("down_proj",) if args.keep_down_proj else ()
    result = run_sweep(model, ids, ks, seq_len=args.seq_len, calibration=calib, exclude=exclude)
    result.update(model_dir=str(model_dir), text=str(args.text))
    main = next(r for r in result["sweep"] if r["k"] == args.k)
    print(f"per projection at k={args.k:g}:")
    print(main["table"])
    print()
    print(format_sweep(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(result, indent=1))
        plot_histograms(main["by_projection"], out / f"histograms_k{args.k:g}.png", f"|s_int| at k={args.k:g}")
        plot_sweep(result, out / "sweep.png")
        print(f"wrote {out / 'report.json'} and plots to {out}")
    return 0
