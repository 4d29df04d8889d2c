"""``spikingbrain eval``: perplexity, teacher agreement, pass key retrieval and lm-eval tasks for a
model (and its teacher, side by side)."""
from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

from spikingbrain.errors import SpikingBrainError

SUITES = ("ppl", "agreement", "passkey", "cloze")


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"300"`` -> 300 (k and m are powers of two)."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise SpikingBrainError(f"bad length {text!r} (use e.g. 512, 1k, 4k, 128k)") from None
    if value < 1:
        raise SpikingBrainError(f"length must be positive, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    try:
        values = [float(x.rstrip("%")) / (100 if x.endswith("%") else 1) for x in text.split(",") if x]
    except ValueError:
        raise SpikingBrainError(f"bad depth list {text!r} (use e.g. 0,0.5,1 or 0%,50%,100%)") from None
    return values


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, teacher agreement, passkey, lm-eval cloze",
                       description=__doc__)
    p.add_argument("model", help="model directory, .gguf file, or 'default' (the embedded teacher)")
    p.add_argument("--teacher", help="teacher to compare with (same forms as MODEL); adds the agreement suite")
    p.add_argument("--suite", default=None,
                   help=f"comma-separated suites from {','.join(SUITES)} (default: ppl,passkey,cloze, plus agreement with --teacher)")
    p.add_argument("--data", nargs="+", help="held-out text: .jsonl ({'text': ...} per line) or plain text files "
                   "(default: the shipped valid.jsonl)")
    p.add_argument("--context-length", type=parse_length, default=2048, help="window (or stream chunk) length, tokens")
    p.add_argument("--ppl-mode", choices=["auto", "window", "sliding", "stream"], default="auto",
                   help="perplexity context: disjoint windows, sliding windows (stride = half a window), or "
                   "stream the whole text through the cache; auto = stream for SpikingBrain, sliding otherwise")
    p.add_argument("--max-tokens", type=int, default=16384, help="cap on scored tokens for ppl/agreement (0: all)")
    p.add_argument("--lengths", default="1k,4k", help="passkey prompt lengths, e.g. 1k,4k,16k")
    p.add_argument("--depths", default="0,0.5,1", help="passkey needle depths in [0, 1]")
    p.add_argument("--seeds", type=int, default=1, help="passkey trials per (length, depth)")
    p.add_argument("--num-keys", type=int, default=1, help="needles per passkey prompt (>1: multi-key variant)")
    p.add_argument("--tasks", default="spikingbrain_cloze", help="lm-eval tasks for the cloze suite")
    p.add_argument("--limit", type=float, default=None, help="lm-eval items per task (int) or fraction (<1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write all results as JSON here")
    p.set_defaults(func=run)

    from spikingbrain.evaluation.bench import register as register_bench

    register_bench(sub)  # `spikingbrain bench`: the speed/memory benchmarks


def _suites(args) -> list[str]:
    chosen = args.suite.split(",") if args.suite else ["ppl", "passkey", "cloze"] + (["agreement"] if args.teacher else [])
    bad = [s for s in chosen if s not in SUITES]
    if bad:
        raise SpikingBrainError(f"unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITES)}")
    if "agreement" in chosen and not args.teacher:
        raise SpikingBrainError("the agreement suite needs --teacher")
    return chosen


def _ppl_kwargs(args, model) -> dict:
    from spikingbrain.evaluation.loading import is_spikingbrain

    mode = args.ppl_mode
    if mode == "auto":
        mode = "stream" if is_spikingbrain(model) else "sliding"
    if mode == "stream":
        return {"true_long_context": True}
    if mode == "sliding":
        return {"stride": max(args.context_length // 2, 1)}
    return {}


def evaluate_one(model, tokenizer, args, suites: list[str], texts) -> dict:
    """Run the per-model suites; returns ``{suite: result}``."""
    from spikingbrain.evaluation.passkey import passkey_sweep
    from spikingbrain.evaluation.perplexity import perplexity

    out = {}
    if "ppl" in suites:
        out["ppl"] = perplexity(model, tokenizer, texts, context_length=args.context_length,
                                max_tokens=args.max_tokens or None, progress=True, **_ppl_kwargs(args, model))
    if "passkey" in suites:
        lengths = [parse_length(x) for x in args.lengths.split(",") if x]
        rows = passkey_sweep(model, tokenizer, lengths, _floats(args.depths), seeds=range(args.seeds),
                             num_keys=args.num_keys, progress=True)
        acc = {str(n): sum(r["correct"] for r in rows if r["length"] == n) / sum(r["length"] == n for r in rows)
               for n in lengths}
        out["passkey"] = {"accuracy": acc, "rows": rows}
    if "cloze" in suites:
        from spikingbrain.evaluation.harness import run_lm_eval

        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        out["cloze"] = run_lm_eval(model, tasks=args.tasks, limit=limit, tokenizer=tokenizer,
                                   device=args.device)
    return out


def summary_row(result: dict) -> dict:
    """Flat ``{metric: value}`` for the side-by-side table."""
    row = {}
    if "ppl" in result:
        row["perplexity"] = result["ppl"]["ppl"]
        row["bits per byte"] = result["ppl"]["bits_per_byte"]
    for n, acc in result.get("passkey", {}).get("accuracy", {}).items():
        row[f"passkey @ {n}"] = acc
    for task, metrics in result.get("cloze", {}).items():
        for name, value in metrics.items():
            if name != "samples":
                row[f"{task} {name}"] = value
    return row


def run(args) -> int:
    from spikingbrain.evaluation.loading import load_model
    from spikingbrain.evaluation.report import markdown_table, side_by_side
    from spikingbrain.evaluation.texts import read_texts, shipped_texts

    suites = _suites(args)
    texts = read_texts(args.data) if args.data else shipped_texts("valid")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    results = {"model": evaluate_one(model, tokenizer, args, suites, texts)}
    if args.teacher:
        teacher, teacher_tok = load_model(args.teacher, args.dtype, args.device)
        results["teacher"] = evaluate_one(teacher, teacher_tok, args, suites, texts)
        if "agreement" in suites:
            from spikingbrain.evaluation.agreement import teacher_agreement

            if teacher_tok.get_vocab() != tokenizer.get_vocab():
                raise SpikingBrainError("model and teacher tokenizers differ: agreement needs a shared vocabulary")
            results["agreement"] = teacher_agreement(model, teacher, tokenizer, texts, args.context_length,
                                                     max_tokens=args.max_tokens or None, progress=True)
    if args.teacher:
        print(side_by_side({"model": summary_row(results["model"]), "teacher": summary_row(results["teacher"])}))
    else:
        print(side_by_side({"model": summary_row(results["model"])}))
    if "agreement" in results:
        a = results["agreement"]
        print()
        print(markdown_table([{"top-1 agreement": a["top1"], "KL(teacher||model) nats/token": a["kl"], "tokens": a["tokens"]}]))
    if args.out:
        record = {
            "model": args.model, "teacher": args.teacher, "suites": suites,
            "command": "spikingbrain " + " ".join(sys.argv[1:]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "versions": _versions(), "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0


def _versions() -> dict:
    import importlib.metadata as md

    import spikingbrain

    out = {"python": platform.python_version(), "spikingbrain": spikingbrain.__version__}
    for pkg in ("torch", "transformers", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
