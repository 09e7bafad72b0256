"""PNG plots of evaluation results (matplotlib, Agg backend; imported only when plotting)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pass_at_k(curves: Mapping[str, Mapping[int, float]], path: str, title: str = "pass@k") -> None:
    """pass@k against k on a log axis, one line per named curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _stacked_histogram(ax, greedy: Mapping[str, Any]) -> list[float]:
    """Problems per greedy-confidence bin, correct (green) under incorrect (red); returns the bin centers."""
    edges: Sequence[float] = greedy["bin_edges"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = (edges[1] - edges[0]) * 0.9
    ax.bar(centers, greedy["count_correct"], width=width, label="correct", color="tab:green")
    ax.bar(centers, greedy["count_incorrect"], width=width, bottom=greedy["count_correct"], label="incorrect",
           color="tab:red")
    return centers


def plot_confidence(summary: Mapping[str, Any], path: str, title: str = "greedy confidence") -> None:
    """Histogram of greedy confidence split by correctness, and the calibration per bin."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    centers = _stacked_histogram(left, summary)
    left.set_xlabel("confidence of the greedy answer")
    left.set_ylabel("problems")
    left.legend()
    left.set_title(title)
    points = [(c, f) for c, f in zip(centers, summary["fraction_correct"]) if f is not None]
    right.plot([0, 1], [0, 1], ls="--", color="grey", label="calibrated")
    right.plot([c for c, _ in points], [f for _, f in points], marker="o", label="model")
    right.set_xlabel("confidence")
    right.set_ylabel("fraction correct")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    right.legend()
    right.set_title("calibration")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_frontier(curves: Mapping[str, Mapping[int, float]], frontier: Sequence[Mapping[str, Any]], path: str,
                  title: str = "pass@N per trial and the frontier") -> None:
    """pass@N against N (log axis) for every trial, with the frontier (best trial per N) over them
    and each frontier point labelled with its training budget N' (the paper's Figure 2a)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker=".", lw=1, alpha=0.6, label=name)
    ns = [f["N"] for f in frontier]
    ax.plot(ns, [f["pass_at_N"] for f in frontier], color="black", lw=2.2, marker="o", label="frontier")
    for f in frontier:
        ax.annotate(f"N'={f['train_budget']:g}", (f["N"], f["pass_at_N"]), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test budget N (samples)")
    ax.set_ylabel("pass@N")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confidence_by_epoch(summaries: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
    """Greedy-confidence histograms (correct / incorrect stacked), one panel per epoch (Figure 1)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(summaries), figsize=(3.2 * len(summaries), 3.2), dpi=120, squeeze=False)
    for ax, s in zip(axes[0], summaries):
        _stacked_histogram(ax, s["greedy"])
        ax.set_title(f"epoch {s['epoch']}", fontsize=9)
        ax.set_xlabel("greedy confidence")
    axes[0][0].set_ylabel("problems")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def text_frontier(curves: Mapping[str, Mapping[int, float]], frontier: Sequence[Mapping[str, Any]],
                  rows: int = 16, column: int = 7) -> str:
    """The frontier plot as text (for terminals and READMEs): pass@N per trial, one letter each,
    '*' where a trial is the best for that N; test budgets N on a log axis."""
    ns = sorted({n for curve in curves.values() for n in curve})
    letters = {name: chr(ord("a") + i) for i, name in enumerate(curves)}
    best = {(f["trial"], f["N"]) for f in frontier}
    grid = [[" "] * (len(ns) * column) for _ in range(rows + 1)]
    for name, curve in curves.items():
        for j, n in enumerate(ns):
            if n in curve:
                r = rows - round(curve[n] * rows)
                x = j * column + column // 2
                mark = "*" if (name, n) in best else letters[name]
                if grid[r][x] != "*":
                    grid[r][x] = mark
    lines = [f"{(rows - r) / rows:4.2f} |" + "".join(row).rstrip() for r, row in enumerate(grid)]
    lines.append("     +" + "-" * (len(ns) * column))
    lines.append("      " + "".join(f"{n:^{column}}" for n in ns) + "  test budget N")
    lines += [f"      {letters[name]} = {name}" for name in curves] + ["      * = the best trial for that N (frontier)"]
    return "\n".join(lines)
