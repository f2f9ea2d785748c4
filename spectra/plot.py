"""Loss curves of training runs (their metrics.jsonl) drawn to a PNG with matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import DataError
from .io import check_figure_output, save_figure
from .train.rundir import read_metrics


def loss_curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, losses) of the "train" and "val" records of one run (skipped steps left out)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("split") in ("train", "val") and r.get("loss") is not None:
            try:
                step, loss = int(r["step"]), float(r["loss"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"a {r['split']} record without a numeric step and loss ({str(r)[:80]}); is it a "
                                f"metrics.jsonl written by `spectra train`?") from None
            steps, losses = curves.setdefault(r["split"], ([], []))
            steps.append(step)
            losses.append(loss)
    return curves


def plot_runs(runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
              title: str = "Training loss", x_axis: str = "step", baseline: float | None = None,
              force: bool = False) -> Path:
    """Draw train (solid) and validation (markers) loss of each run to the PNG `out`; returns its path.

    `runs` are run directories (or metrics.jsonl files); `x_axis` is "step" or "tokens"; `baseline`
    draws a horizontal reference line (e.g. the unigram loss of the data).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt


    if not runs:
        raise DataError("no runs to plot; pass one or more run directories written by `spectra train`")
    check_figure_output(out, force=force, sources=runs)  # before reading the runs
    if x_axis not in ("step", "tokens"):
        raise DataError(f"x axis must be 'step' or 'tokens', got {x_axis!r}")
    labels = list(labels) if labels is not None else [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise DataError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for run, label, color in zip(runs, labels, _colors(len(runs))):
        records = read_metrics(run)
        tokens_per_step = _tokens_per_step(records)
        try:
            curves = loss_curves(records)
        except DataError as err:
            raise DataError(f"{run}: {err}") from None
        for split, (steps, losses) in sorted(curves.items(), reverse=True):
            xs = [s * tokens_per_step for s in steps] if x_axis == "tokens" else steps
            style = {"linestyle": "-", "alpha": 0.8} if split == "train" else {"linestyle": "--", "marker": "o"}
            ax.plot(xs, losses, color=color, label=f"{label} {split}", **style)
            drawn += 1
    if not drawn:
        raise DataError(f"the runs {', '.join(map(str, runs))} have no loss records yet")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle=":", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("training tokens" if x_axis == "tokens" else "optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out, dpi=120, force=force, sources=runs)


def _tokens_per_step(records: list[dict]) -> int:
    for r in records:
        if r.get("split") == "train" and r.get("tokens") and r.get("step"):
            return int(r["tokens"]) // int(r["step"])
    return 1


def _colors(n: int) -> list[str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    return [palette[i % len(palette)] for i in range(n)]
