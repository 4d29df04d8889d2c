"""`spikingbrain convert` and `spikingbrain demo`."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Llama/Qwen2/Mistral checkpoint into a SpikingBrain model",
                       description="Convert a teacher (HF directory, .gguf file, or 'default' = the embedded "
                       "SmolLM2-135M-Instruct) into a SpikingBrain model directory.")
    p.add_argument("--teacher", default="default", help="HF model directory, .gguf file, or 'default'")
    p.add_argument("--layout", default="7b",
                   help="7b (alternating GLA/SWA), 76b, full, gla, swa, or a comma-separated list of layer types")
    p.add_argument("--sliding-window", type=int, default=None, help="window of the SWA layers (default 4096)")
    p.add_argument("--calibrate", type=int, default=4, metavar="N",
                   help="calibrate GLA output norms on N sequences of the shipped text (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    o = p.add_argument_group("released SpikingBrain-7B checkpoints (gla_swa)")
    o.add_argument("--from-official", metavar="DIR", default=None,
                   help="write this released checkpoint (base, SFT or W8ASpike) as a native SpikingBrain "
                        "directory instead of converting a teacher (streamed: memory ~ one 2 GiB shard)")
    o.add_argument("--window-convention", choices=["flash-attn", "sdpa"], default="flash-attn",
                   help="flash-attn: W + 1 keys, what the model was trained with (default); sdpa: W keys")
    o.add_argument("--down-proj", choices=["float", "spiking"], default="float",
                   help="W8ASpike: down_proj in float as their forward runs it (default), or spiked too")
    o.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights' dtype in the output (auto: the checkpoint's)")
    p.set_defaults(func=_convert)

    d = sub.add_parser("demo", help="the main job: convert the default teacher, compare with it, save for chat",
                       description="Convert the embedded default teacher with the 7B layout, starting from the "
                       "trained delta the package ships (a few minutes), or running the whole conversion here "
                       "with --from-scratch (~10 minutes on 2 CPU cores); then print a side-by-side report of "
                       "teacher and student (held-out text at a 2k context, chat fidelity, decode speed) and save "
                       "the student for `spikingbrain chat`.")
    d.add_argument("--out", default="spikingbrain-demo", help="output directory (model in OUT/model)")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--from-scratch", action="store_true",
                     help="run the whole conversion (calibration, attention transfer, distillation) in this run")
    src.add_argument("--delta", default=None, metavar="FILE",
                     help="start from this delta (scripts/train_conversion.py) instead of the shipped one")
    d.add_argument("--minutes", type=float, default=None,
                   help="with --from-scratch: scale the training budgets to about this many minutes in total")
    d.add_argument("--decode-context", type=int, default=32768, help="context length for the decode comparison")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)


def _layout(value: str):
    return value.split(",") if "," in value else value


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spikingbrain.modeling import count_parameters
    from spikingbrain.convert.mapping import convert_from_transformer
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.demo import sample_sequences, save_model, shipped_ids
    from spikingbrain.errors import SpikingBrainError

    if args.from_official:
        return _convert_official(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise SpikingBrainError(f"{out} exists and is not a model directory; choose an empty or new --out")
    teacher, tok = load_teacher(args.teacher)
    calib = None
    if args.calibrate > 0:
        calib = sample_sequences(shipped_ids(tok, "train", max_tokens=200_000), args.calibrate, 256, args.seed)
    student = convert_from_transformer(teacher, layout=_layout(args.layout), sliding_window=args.sliding_window,
                                       tokenizer=tok, calibration_ids=calib, seed=args.seed)
    save_model(student, tok, out)
    _conversion_card(out, student, teacher, args)
    c = count_parameters(student.config)
    types = student.config.layer_types
    summary = ", ".join(f"{t} x{types.count(t)}" for t in dict.fromkeys(types))
    print(f"wrote {out}: {c['total']:,} parameters ({c['active']:,} active); layers: {summary}")
    return 0


def _convert_official(args: argparse.Namespace) -> int:
    from spikingbrain.convert.official import convert_official

    out = convert_official(args.from_official, args.out, dtype=args.dtype,
                           window_convention=args.window_convention, down_proj=args.down_proj)
    cfg = __import__("json").loads((out / "config.json").read_text())
    kind = "W8ASpike (spiking INT8)" if cfg.get("spiking") else "float"
    print(f"wrote {out}: {kind}, {cfg['num_hidden_layers']} layers, sliding window {cfg['sliding_window']} keys "
          f"({cfg['window_convention']} convention)")
    return 0


def _conversion_card(out, student, teacher, args) -> None:
    import datetime as dt

    from spikingbrain.modeling import count_parameters

    c = count_parameters(student.config)
    types = student.config.layer_types
    summary = ", ".join(f"{t}: {types.count(t)}" for t in dict.fromkeys(types))
    name = getattr(teacher, "name_or_path", args.teacher)
    (out / "README.md").write_text(f"""---
library_name: spikingbrain
tags: [spikingbrain, linear-attention, sliding-window-attention, converted]
---
# SpikingBrain conversion of {name}

- Layout: `{args.layout}` ({summary}); sliding window {student.config.sliding_window}
- Teacher: {name}
- Parameters: {c['total']:,} total, {c['active']:,} active
- Conversion: weights mapped layer by layer; GLA output norms calibrated on {args.calibrate} sequences
  of the shipped text; not trained yet (train with `spikingbrain train RECIPE.yaml`)
- Made: {dt.date.today().isoformat()} with `spikingbrain convert --teacher {args.teacher} --layout {args.layout}`

Load with `transformers.AutoModelForCausalLM.from_pretrained(dir)` after `import spikingbrain`.
""", encoding="utf-8")


def _demo(args: argparse.Namespace) -> int:
    from spikingbrain.demo import DemoSettings, run_demo
    from spikingbrain.errors import SpikingBrainError

    if args.minutes is not None and not args.from_scratch:
        raise SpikingBrainError("--minutes sets the training budget of --from-scratch; the shipped delta trains nothing")
    if args.minutes is not None and args.minutes <= 0:
        raise SpikingBrainError("--minutes must be > 0")
    s = DemoSettings(out=args.out, from_scratch=args.from_scratch, delta_path=args.delta, minutes=args.minutes,
                     decode_context=args.decode_context, device=args.device, seed=args.seed,
                     progress=not args.no_progress)
    run_demo(s)
    return 0
