"""``spikingbrain train RECIPE.yaml [--resume [CKPT]] [--max-steps N] [--out DIR] [--set k=v ...]``.

Under ``torchrun --nproc_per_node=N -m spikingbrain.cli train ...`` the same recipe runs on N
processes (``distributed: ddp`` or ``fsdp`` in the recipe).
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="continual pre-training, distillation or SFT from a YAML recipe",
        description="Train a causal LM from a YAML recipe (see recipes/). Checkpoints go to "
        "{out}/checkpoints, metrics to {out}/metrics.jsonl, the final model to {out}/final.",
    )
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from the latest checkpoint of the run (or from CKPT)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop when the global step reaches N (the LR schedule keeps the recipe's length)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (overrides the recipe's `out`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from spikingbrain.errors import SpikingBrainError
    from spikingbrain.train.loop import train
    from spikingbrain.train.recipe import load_recipe

    if args.max_steps is not None and args.max_steps < 1:
        raise SpikingBrainError("--max-steps must be >= 1")
    recipe = load_recipe(args.recipe, args.overrides, out=args.out)
    res = train(recipe, resume=args.resume, max_steps=args.max_steps, device=args.device,
                progress=False if args.no_progress else None)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        msg = f"trained to step {res.step}"
        if res.last_loss is not None:
            msg += f", loss {res.last_loss:.4f}"
        if res.eval_loss is not None:
            msg += f", held-out loss {res.eval_loss:.4f}"
        if res.skipped:
            msg += f", {res.skipped} non-finite steps skipped"
        print(msg)
        if res.checkpoint:
            print(f"checkpoint: {res.checkpoint}")
        if res.final:
            print(f"model: {res.final}")
    return 0
