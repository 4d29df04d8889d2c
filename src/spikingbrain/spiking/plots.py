"""PNG plots of a sweep result (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

SHOWN_BINS = 33  # |s| = 0..32 drawn individually; the rest folded into one bar


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _folded(hist: list[int]) -> tuple[list[str], list[float]]:
    total = sum(hist) or 1
    head = hist[:SHOWN_BINS]
    labels = [str(i) for i in range(len(head))] + [f">{SHOWN_BINS - 1}"]
    return labels, [h / total for h in head] + [sum(hist[SHOWN_BINS:]) / total]


def plot_histograms(by_projection: dict, path, title: str = "") -> Path:
    """One panel per projection type: share of ``|s_int|`` values per count (log scale)."""
    plt = _plt()
    names = list(by_projection)
    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        m = by_projection[name]
        labels, shares = _folded(m["abs_count_histogram"])
        ax.bar(range(len(shares)), shares, color="tab:blue")
        ax.set_yscale("log")
        positive = [v for v in shares if v > 0] or [1.0]
        ax.set_ylim(min(positive) / 2, 1.5)  # empty bins would otherwise stretch the log axis
        ax.minorticks_off()
        ax.set_title(f"{name}  (sparsity {m['sparsity']:.3f})", fontsize=9)
        ticks = [0, 8, 16, 24, len(shares) - 1]
        ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=7)
        ax.set_xlabel("|s_int|", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title or "distribution of |s_int| per projection type")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_sweep(result: dict, path) -> Path:
    """Sparsity (ours and the 7B's) and perplexity change versus ``k``."""
    plt = _plt()
    ks = [r["k"] for r in result["sweep"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(ks, [r["sparsity"] for r in result["sweep"]], "o-", color="tab:blue", label="sparsity (this model)")
    ref = result["reference_7b"]["sparsity_by_k"]
    rk = sorted(ref)
    ax.plot(rk, [ref[k] for k in rk], "s--", color="tab:gray", label="sparsity (SpikingBrain-7B report)")
    ax.set_xlabel("k (V_th = mean|x| / k)")
    ax.set_ylabel("sparsity")
    ax2 = ax.twinx()
    ax2.plot(ks, [r["ppl_delta_pct"] for r in result["sweep"]], "^-", color="tab:red", label="perplexity change %")
    ax2.axhline(0, color="tab:red", lw=0.5)
    ax2.set_ylabel("perplexity vs unspiked (%)", color="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    ax.set_title("sparsity and quality versus k")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
