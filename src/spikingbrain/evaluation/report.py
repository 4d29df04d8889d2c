"""Result dicts -> Markdown tables (for the terminal, the CLI's side-by-side view, BENCHMARKS.md)."""
from __future__ import annotations

import math


def format_value(value, digits: int = 4) -> str:
    """Floats with ``digits`` significant digits (no scientific notation for ordinary sizes),
    booleans as yes/no, None as an em dash, everything else via ``str``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-4):
            return f"{value:.{digits - 1}e}"
        if abs(value) >= 1:
            return f"{value:.{max(digits - len(str(int(abs(value)))), 0)}f}"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 4) -> str:
    """A GitHub Markdown table, one line per dict. ``columns`` picks and orders the keys
    (default: every key, in order of first appearance); missing values print as an em dash."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def side_by_side(results: dict[str, dict], metrics: list[str] | None = None, digits: int = 4) -> str:
    """One row per metric, one column per model: ``results = {"model": {...}, "teacher": {...}}``
    with flat ``{metric: value}`` dicts."""
    names = list(results)
    if metrics is None:
        metrics = []
        for r in results.values():
            metrics += [k for k in r if k not in metrics]
    rows = [{"metric": m, **{n: results[n].get(m) for n in names}} for m in metrics]
    return markdown_table(rows, ["metric", *names], digits)


def flatten(result: dict, prefix: str = "") -> dict:
    """``{"ppl": {"ppl": 3.1}, "passkey": {"1024": 0.5}}`` -> ``{"ppl.ppl": 3.1, "passkey.1024": 0.5}``."""
    flat = {}
    for k, v in result.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        elif not isinstance(v, list):
            flat[key] = v
    return flat
