"""The `spikingbrain` command. Thin: parses arguments and calls the pipeline modules.

Each area contributes its sub-commands through a `register(subparsers)` function in
`spikingbrain/<area>/cli.py`; the area modules are imported lazily so that `spikingbrain --help`
stays fast and an optional dependency missing for one area does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

AREAS = ["convert", "train", "spiking", "evaluation", "serve", "parallel"]


from spikingbrain.errors import SpikingBrainError as CLIError  # user-facing: no traceback, exit 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikingbrain",
        description="Convert Transformers into SpikingBrain hybrid linear/sliding-window spiking "
        "models; train, run and measure them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in AREAS:
        try:
            mod = importlib.import_module(f"spikingbrain.{area}.cli")
        except ModuleNotFoundError as e:  # an area not built yet, or its optional deps missing
            if e.name and e.name.startswith("spikingbrain"):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"spikingbrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
