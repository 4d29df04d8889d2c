#!/usr/bin/env python3
"""Regenerate BENCHMARKS.md from benchmarks/results/*.json (and the PNG plots next to them).

One section per benchmark: the hand-written notes (benchmarks/notes/<name>.md, or the notes block
already in BENCHMARKS.md when there is no such file, so analysis survives regeneration), the
plots, and per JSON file its hardware, date, torch version and exact command, a table with a row
per result row, and the computed ratios. benchmarks/notes/intro.md goes at the top. A result
that records no command is refused (exit 2): every figure must come with its command.

    python3 scripts/make_benchmarks_md.py [--results benchmarks/results] [--notes benchmarks/notes]
        [--out BENCHMARKS.md] [--no-plots] [--check]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    from spikingbrain.errors import SpikingBrainError
    from spikingbrain.evaluation.bench_report import make_plots, render_markdown
except ModuleNotFoundError:  # not installed: use the checkout's sources
    sys.path.insert(0, str(ROOT / "src"))
    from spikingbrain.errors import SpikingBrainError
    from spikingbrain.evaluation.bench_report import make_plots, render_markdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--notes", type=Path, default=ROOT / "benchmarks" / "notes")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-plots", action="store_true", help="do not (re)draw the PNG plots")
    p.add_argument("--check", action="store_true", help="only check that --out is up to date (exit 1 if not)")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"no results folder {args.results}", file=sys.stderr)
        return 2
    if not args.no_plots and not args.check:
        for png in make_plots(args.results):
            print(f"plot: {png}")
    previous = args.out.read_text() if args.out.is_file() else None
    try:
        text = render_markdown(args.results, args.notes if args.notes.is_dir() else None, previous,
                               link_base=args.out.resolve().parent, plots=not args.no_plots)
    except SpikingBrainError as e:  # e.g. a result that does not record its command
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if text != previous:
            print(f"{args.out} is out of date: run python3 scripts/make_benchmarks_md.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
