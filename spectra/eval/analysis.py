"""Per-layer weight statistics: histogram, std, zero fraction of the ternarized weights, Shannon entropy.

The entropy of a matrix's weight histogram at several bin counts measures how many bits its values
need; the Spectra paper (arXiv 2407.12327, Sec. 2.2) finds it falls with model size, which is why larger
models tolerate ternary weights. Ternary layers are analysed as the exact values they multiply by; float
layers are also ternarized (per-shard absmean, as a TriLM would be) to report their zero fraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..io import save_figure
from ..progress import progress_bar
from ..ternary import ternarize

DEFAULT_ENTROPY_BINS = (4, 16, 64, 256, 1024)
# Bins beyond this cost memory per layer and tell nothing new: a matrix of n weights has at most log2(n) bits.
MAX_ENTROPY_BINS = 1 << 24
HISTOGRAM_BINS = 81
# Histograms are of w / mean|w| over this range, so that layers of any scale share one axis and pool exactly.
HISTOGRAM_RANGE = (-8.0, 8.0)


def histogram(values: torch.Tensor, bins: int, value_range: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of `bins` equal-width bins over `value_range` (default [min, max] of the values)."""
    if bins < 1:
        raise ConfigError(f"bin count must be positive, got {bins}")
    v = values.detach().float().reshape(-1).cpu()
    lo, hi = value_range if value_range is not None else (float(v.min()), float(v.max()))
    if hi <= lo:  # a constant matrix: one occupied bin
        hi = lo + 1.0
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    return counts.double().numpy(), np.linspace(lo, hi, bins + 1)


def entropy_of_counts(counts: np.ndarray) -> float:
    """Shannon entropy in bits of the distribution given by histogram counts (empty bins contribute 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ConfigError("cannot take the entropy of an empty histogram")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def shannon_entropy(values: torch.Tensor, bins: int) -> float:
    """Entropy in bits of the values' histogram with `bins` equal-width bins over their range."""
    return entropy_of_counts(histogram(values, bins)[0])


@dataclass
class LayerStats:
    name: str
    shape: tuple[int, int]
    mean: float
    std: float
    abs_mean: float
    zero_fraction: float                      # fraction of zeros among the ternarized weights
    entropy: dict[int, float]                 # bins -> bits
    hist_counts: list[float] = field(repr=False)   # of w / abs_mean over HISTOGRAM_RANGE

    def to_dict(self, with_histogram: bool = False) -> dict:
        d = asdict(self)
        d["entropy"] = {str(k): v for k, v in self.entropy.items()}
        if not with_histogram:
            d.pop("hist_counts")
        return d


def layer_stats(name: str, module: torch.nn.Module, entropy_bins: tuple[int, ...] = DEFAULT_ENTROPY_BINS
                ) -> LayerStats:
    weight = module.dense_weight().detach().float().cpu()
    trits = getattr(module, "trits", None)
    if callable(trits):  # packed layers decode their trits on request
        trits = trits()
    if trits is None:
        trits, _ = ternarize(weight, getattr(module, "parts", 1), getattr(module, "shard_axis", 0))
    abs_mean = float(weight.abs().mean())
    counts, _ = histogram(weight / max(abs_mean, 1e-12), HISTOGRAM_BINS, HISTOGRAM_RANGE)
    return LayerStats(name=name, shape=tuple(weight.shape), mean=float(weight.mean()), std=float(weight.std()),
                      abs_mean=abs_mean, zero_fraction=float((trits == 0).float().mean()),
                      entropy={b: shannon_entropy(weight, b) for b in entropy_bins}, hist_counts=counts.tolist())


def analyze_weights(model: torch.nn.Module, entropy_bins: tuple[int, ...] = DEFAULT_ENTROPY_BINS,
                    progress: bool = False) -> list[LayerStats]:
    """Statistics of every linear layer of `model`, in model order (fused projections as separate layers)."""
    bad = [b for b in entropy_bins if not 1 <= b <= MAX_ENTROPY_BINS]
    if bad:  # a histogram of 1e11 bins would allocate 400 GB
        raise ConfigError(f"entropy bin counts must lie in [1, {MAX_ENTROPY_BINS:,}], got {bad[0]:,}")

    layers = model.separate_linear_layers()
    return [layer_stats(name, module, tuple(entropy_bins))
            for name, module in progress_bar(layers.items(), desc="layers", disable=not progress)]


def stats_table(stats: list[LayerStats]) -> str:
    """A fixed-width text table, one row per layer."""
    bins = list(stats[0].entropy) if stats else []
    head = f"{'layer':<34}{'shape':>13}{'std':>10}{'zeros':>8}" + "".join(f"{'H@' + str(b):>8}" for b in bins)
    rows = [head, "-" * len(head)]
    for s in stats:
        shape = f"{s.shape[0]}x{s.shape[1]}"
        rows.append(f"{s.name.replace('model.layers.', 'L'):<34}{shape:>13}{s.std:>10.4g}{s.zero_fraction:>8.3f}"
                    + "".join(f"{s.entropy[b]:>8.3f}" for b in bins))
    return "\n".join(rows)


def mean_entropy(stats: list[LayerStats]) -> dict[int, float]:
    """Entropy per bin count averaged over layers, weighted by layer size."""
    sizes = np.array([s.shape[0] * s.shape[1] for s in stats], dtype=np.float64)
    return {b: float(np.average([s.entropy[b] for s in stats], weights=sizes)) for b in stats[0].entropy}


def plot_weight_stats(models: dict[str, list[LayerStats]], path: str | Path, force: bool = False,
                      sources: Sequence[str | Path] = (), flag: str = "--out") -> Path:
    """Four panels: pooled weight histograms, std and zero fraction per layer, entropy vs bin count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    edges = np.linspace(*HISTOGRAM_RANGE, HISTOGRAM_BINS + 1)
    for label, stats in models.items():
        pooled = np.sum([s.hist_counts for s in stats], axis=0)
        axes[0, 0].stairs(pooled / max(pooled.sum(), 1), edges, label=label)
        axes[0, 1].plot([s.std for s in stats], marker=".", label=label)
        axes[1, 0].plot([s.zero_fraction for s in stats], marker=".", label=label)
        ent = mean_entropy(stats)
        axes[1, 1].plot(list(ent), list(ent.values()), marker="o", label=label)
    bins = sorted({b for stats in models.values() for b in stats[0].entropy})
    axes[1, 1].plot(bins, [math.log2(b) for b in bins], "k:", label="log2(bins) (uniform)")
    axes[0, 0].set(title="weights / layer abs-mean (all layers)", yscale="log", xlabel="w / mean|w|")
    axes[0, 1].set(title="std per layer", xlabel="linear layer (model order)", ylabel="std")
    axes[1, 0].set(title="zero fraction of ternarized weights", xlabel="linear layer (model order)",
                   ylim=(0, 1))
    axes[1, 1].set(title="Shannon entropy of weights", xlabel="histogram bins", ylabel="bits", xscale="log")
    axes[1, 1].set_xscale("log", base=2)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, force=force, sources=sources, flag=flag)

