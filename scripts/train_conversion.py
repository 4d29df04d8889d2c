"""Train the conversion of the default teacher and export it as a delta (the file the package ships).

Resumable: kill it at any moment and run the same command again, it continues from the last
checkpoint in ``--workdir`` (see ``spikingbrain.convert.recipe``). At the end (or with
``--export-only``, from the latest checkpoint) it writes the delta: low-rank int8 factors and
fp32 gates/norms in safetensors, with the teacher's fingerprint, the layout, the recipe, the
stages run and this exact command in its metadata.

    python3 scripts/train_conversion.py --workdir runs/shipped \\
        --out src/spikingbrain/convert/weights/smollm2-135m-instruct-7b.safetensors
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="checkpoints and the teacher activation cache")
    p.add_argument("--out", required=True, help="the delta file to write")
    p.add_argument("--recipe", default="shipped", help="shipped, demo, or a JSON file (ConversionRecipe fields)")
    p.add_argument("--export-only", action="store_true", help="write the delta from the latest checkpoint, no training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where teacher and student run: cpu, cuda, cuda:1, ...")
    p.add_argument("--factors", choices=["fp16", "int8"], default="int8",
                   help="how the delta stores low-rank factors (int8, the default: half the size of fp16, "
                        "per-row scales; the shipped delta's)")
    p.add_argument("--rank", type=int, default=None,
                   help="store full-rank GLA projection updates (lora_rank 0, or any run from an init_delta) "
                        "as rank-R truncated-SVD factors (default: the recipe's export_rank)")
    p.add_argument("--ffn-rank", type=int, default=None,
                   help="the same for FFN updates (default: the recipe's ffn rank, else the init_delta's)")
    p.add_argument("--max-mb", type=float, default=10.0, help="refuse to write a larger delta")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from spikingbrain.convert import recipe as R
    from spikingbrain.convert.delta import save_delta
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.demo import shipped_ids
    from spikingbrain.errors import SpikingBrainError

    if args.recipe in ("shipped", "demo"):
        recipe = R.SHIPPED if args.recipe == "shipped" else R.DEMO
    else:
        recipe = R.ConversionRecipe.from_dict(json.loads(Path(args.recipe).read_text()))
    t0 = time.time()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SpikingBrainError(f"--device {args.device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpikingBrainError(f"--device {args.device}: this torch has no CUDA device (use --device cpu)")
    teacher, tok = load_teacher()
    teacher.to(device)
    wd = Path(args.workdir)
    if args.export_only:
        ck = R.latest_state(wd)
        if ck is None:
            raise SpikingBrainError(f"no checkpoint in {wd}")
        student, params = R.prepare_student(teacher, tok, recipe, shipped_ids(tok, "train"))
        R._load_params(ck, params)
        state = json.loads((ck / "state.json").read_text())
        report = {"stages": state.get("history", []), "checkpoint": ck.name}
    else:
        student, report = R.run_conversion(teacher, tok, recipe, wd)
    stages = report["stages"]
    init = None
    if recipe.init_delta is not None:  # the stages that made the starting delta count too
        from spikingbrain.convert.delta import file_sha256, load_delta_metadata

        im = load_delta_metadata(recipe.init_delta)
        init = {"sha256": file_sha256(recipe.init_delta), "command": im.get("command"),
                "recipe": json.loads(im.get("recipe", "null")), "stages": json.loads(im.get("stages", "[]"))}
        stages = init["stages"] + stages
    tokens = {k: sum(h["tokens"] for h in stages if h["kind"] == k) for k in ("transfer", "distill")}
    where = f"CPU {platform.machine()}, {args.threads} threads" if device.type == "cpu" else str(device)
    ffn_rank = args.ffn_rank or recipe.ffn_rank or (init_ffn_rank(recipe.init_delta) if init else None)
    rank = args.rank or recipe.export_rank or recipe.lora_rank or None
    updates = (f"rank-{rank} GLA projection updates" if rank else "full-rank GLA projection updates") + (
        f", rank-{ffn_rank} FFN updates" if ffn_rank else "") + f", {args.factors} factors"
    if init:
        updates += f"; started from the delta {init['sha256'][:12]}... ({len(init['stages'])} stages)"
    retrieval = any(st.retrieval_fraction for st in recipe.stages) or bool(
        init and any(st.get("retrieval_fraction") for st in (init["recipe"] or {}).get("stages", [])))
    data = "shipped prose + chat data" + (" + retrieval windows" if retrieval else "")
    meta = {
        "command": "python3 scripts/train_conversion.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "recipe": json.dumps(recipe.to_dict()),
        "stages": json.dumps(report["stages"]),
        "provenance": f"{dt.date.today().isoformat()}, {where}; attention transfer {tokens['transfer']:,} tokens "
                      f"per layer + distillation {tokens['distill']:,} tokens ({data}); {updates}",
        "torch": torch.__version__,
    }
    if init:
        meta["init_delta"] = json.dumps(init)
    size = save_delta(student, teacher, args.out, meta, factors=args.factors, rank=rank, ffn_rank=ffn_rank)
    if size > args.max_mb * 1e6:
        Path(args.out).unlink()
        raise SpikingBrainError(f"the delta is {size / 1e6:.1f} MB, over --max-mb {args.max_mb}; the training is "
                                f"kept in {wd}: rerun with --export-only and a lower --rank (or --factors int8)")
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) after {time.time() - t0:.0f} s")
    return 0


def init_ffn_rank(path) -> int | None:
    """The rank of the FFN updates in the delta at ``path`` (None: it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if ".mlp." in k and k.endswith(".lora_A")}
    return max(ranks) if ranks else None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001
        from spikingbrain.errors import SpikingBrainError

        if isinstance(e, SpikingBrainError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
