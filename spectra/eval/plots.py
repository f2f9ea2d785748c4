"""Plots of the papers' comparisons: metric vs parameters and vs size in bits per family; scaling-law figures.

All figures are written atomically as small PNGs (matplotlib's Agg backend, no display needed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..io import save_figure
from .results import load_results

# Families keep one colour and marker across every figure.
FAMILY_STYLE = {"TriLM": ("tab:blue", "o"), "FloatLM": ("tab:orange", "s")}
QUANT_COLOURS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
LOWER_IS_BETTER = ("perplexity", "loss", "bits_per_token", "word_perplexity", "byte_perplexity", "bits_per_byte")


# --- spectra compare ------------------------------------------------------------------------------

def collect_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """One entry per model: its model block and the union of the metrics of all its result files."""
    if not paths:
        raise DataError("no result files given; pass the JSON files written by `spectra eval ... --out`")
    models: dict[str, dict[str, Any]] = {}
    for path in paths:
        record = load_results(path)
        key = record["model"].get("path") or record["model"]["name"]
        entry = models.setdefault(key, {"model": record["model"], "metrics": {}})
        entry["metrics"].update(record["metrics"])
    return list(models.values())


def comparable_metrics(entries: list[dict[str, Any]]) -> list[str]:
    """Metrics present for at least two models (a line needs two points somewhere), in first-seen order."""
    counts: dict[str, int] = defaultdict(int)
    for e in entries:
        for m in e["metrics"]:
            counts[m] += 1
    return [m for m in counts if counts[m] >= 2] or list(counts)


def _style(family: str, quant_index: dict[str, int]) -> tuple[str, str]:
    if family in FAMILY_STYLE:
        return FAMILY_STYLE[family]
    i = quant_index.setdefault(family, len(quant_index))
    return QUANT_COLOURS[i % len(QUANT_COLOURS)], "^"


def plot_comparison(entries: list[dict[str, Any]], metric: str, path: str | Path, force: bool = False) -> Path:
    """Two panels, metric vs parameters and metric vs size in bits, one line per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    families: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for e in entries:
        if metric in e["metrics"]:
            m = e["model"]
            families[m["family"]].append((m["parameters"], m["size_bits"], e["metrics"][metric]))
    if not families:
        raise DataError(f"no result file reports the metric {metric!r}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    quant_index: dict[str, int] = {}
    for family in sorted(families, key=lambda f: (f not in FAMILY_STYLE, f)):
        colour, marker = _style(family, quant_index)
        for ax, x_of in zip(axes, (0, 1)):
            pts = sorted(families[family], key=lambda p: p[x_of])
            ax.plot([p[x_of] for p in pts], [p[2] for p in pts], marker=marker, color=colour, label=family)
    lower = metric.rsplit("/", 1)[-1].split("[")[0] in LOWER_IS_BETTER
    for ax, xlabel in zip(axes, ("parameters", "size in bits")):
        ax.set_xscale("log")
        if lower and metric.split("/")[-1].startswith(("perplexity", "word_perplexity", "byte_perplexity")):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set(xlabel=xlabel, ylabel=metric + (" (lower is better)" if lower else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_title(f"{metric} vs parameters")
    axes[1].set_title(f"{metric} vs size in bits")
    fig.tight_layout()
    return save_figure(fig, path, force=force)


def metric_filename(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in metric) + ".png"


# --- scaling laws ---------------------------------------------------------------------------------

def plot_scaling_law(law: Any, path: str | Path, points: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                     n_range: tuple[float, float] | None = None, d_range: tuple[float, float] | None = None,
                     force: bool = False, sources: Sequence[str | Path] = ()) -> Path:
    """Iso-loss contours over (D, N) with the compute-optimal frontier, and L vs D curves per model size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if points is not None:
        n_pts, d_pts, l_pts = (np.asarray(p, dtype=np.float64) for p in points)
        n_range = n_range or (n_pts.min() / 2, n_pts.max() * 2)
        d_range = d_range or (d_pts.min() / 2, d_pts.max() * 2)
    n_range = n_range or (law.n_unit * 50, law.n_unit * 1e4)
    d_range = d_range or (law.d_unit * 1, law.d_unit * 2e3)
    ns = np.geomspace(*n_range, 200)
    ds = np.geomspace(*d_range, 200)
    grid_d, grid_n = np.meshgrid(ds, ns)
    losses = law.loss(grid_n, grid_d)

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5))
    # Log-spaced levels: losses span a wide range at small D and bunch up near E, where detail matters.
    levels = np.unique(np.round(np.geomspace(*np.quantile(losses, [0.02, 0.9]), 10), 3))
    cs = ax0.contour(grid_d, grid_n, losses, levels=levels, cmap="viridis")
    ax0.clabel(cs, fontsize=8, fmt="%.3g")
    budgets = np.geomspace(6 * n_range[0] * d_range[0], 6 * n_range[1] * d_range[1], 100)
    n_opt, d_opt = law.compute_optimal(budgets)
    inside = (n_opt >= n_range[0]) & (n_opt <= n_range[1]) & (d_opt >= d_range[0]) & (d_opt <= d_range[1])
    if inside.any():
        ax0.plot(d_opt[inside], n_opt[inside], "r--", label="compute-optimal (C = 6ND)")
    if points is not None:
        sc = ax0.scatter(d_pts, n_pts, c=l_pts, cmap="viridis", edgecolors="k", zorder=3, label="data")
        fig.colorbar(sc, ax=ax0, label="loss")
    ax0.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="parameters N",
            title=f"iso-loss contours: {law.name}")
    if ax0.get_legend_handles_labels()[0]:
        ax0.legend(fontsize=8, loc="lower right")

    sizes = np.unique(n_pts) if points is not None else np.geomspace(*n_range, 5)
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(sizes)))
    for size, colour in zip(sizes, colours):
        ax1.plot(ds, law.loss(size, ds), color=colour, label=f"N = {_short(size)}")
        if points is not None:
            mask = n_pts == size
            ax1.scatter(d_pts[mask], l_pts[mask], color=colour, edgecolors="k", zorder=3, s=20)
    ax1.axhline(law.E, color="gray", ls=":", label=f"E = {law.E:.3g}")
    ax1.set(xscale="log", xlabel="training tokens D", ylabel="loss", title="fitted L(N, D) and data")
    ax1.legend(fontsize=7, ncol=2)
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path, force=force, sources=sources)


def _short(count: float) -> str:
    for unit, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= unit:
            return f"{count / unit:.3g}{name}"
    return f"{count:.3g}"
