"""Pictures for the model card: spans per (layer, kv head) and KV density vs length.

matplotlib is the optional extra ``plots``; it is imported lazily with the Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from .plan_summary import PlanSummary

SPANS_PNG = "images/moa_spans.png"
DENSITY_PNG = "images/moa_density.png"


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError('Plots need matplotlib: pip install "moa-hub[plots]"') from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_spans(summary: PlanSummary, path: Path) -> Path:
    """Heatmap: span S(N) / N per layer (rows) and kv head (columns) at the longest planned length."""
    plt = _pyplot()
    n = summary.lengths[-1]
    grid = summary.span_grid(n)  # [L][H] tokens
    frac = [[s / n for s in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(grid[0]), 1.0 + 0.22 * len(grid)), dpi=110)
    image = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_title(f"span / length at N={n}")
    fig.colorbar(image, ax=ax, label="S(N) / N")
    return _save(fig, path, plt)


def plot_density(summary: PlanSummary, path: Path) -> Path:
    """KV density (mean over heads of S(n)/n) against length n, log-x, with the planned budgets marked."""
    plt = _pyplot()
    lengths = summary.curve_lengths()
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=110)
    ax.plot(lengths, [summary.density_at(n) for n in lengths], label="plan")
    budgets = summary.density_budgets()
    if budgets:
        ax.scatter(list(budgets), list(budgets.values()), marker="x", color="black", zorder=3, label="budget")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("sequence length n (tokens)")
    ax.set_ylabel("KV density")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
