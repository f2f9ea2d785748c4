"""Evaluation and study tools: perplexity, lm-evaluation-harness adapter, weight analysis, scaling laws, plots.

The lm-eval adapter lives in :mod:`spectra.eval.harness` (importing it registers the "spectra" model);
it is imported lazily here so `import spectra` does not pay for lm-eval.
"""

from __future__ import annotations

from typing import Any

from .analysis import LayerStats, analyze_weights, entropy_of_counts, plot_weight_stats, shannon_entropy, stats_table
from .perplexity import PerplexityResult, llama_cpp_windows, load_eval_tokens, perplexity, sliding_windows
from .plots import collect_results, plot_comparison, plot_scaling_law
from .results import describe_model, load_results, model_family, write_json
from .scaling import LAW_PRESETS, FitResult, ScalingFitWarning, ScalingLaw, fit_scaling_law, get_law, read_points

_HARNESS = ("SpectraEvalLM", "PAPER_TASKS", "evaluate_tasks", "flatten_metrics", "task_availability")


def __getattr__(name: str) -> Any:
    if name in _HARNESS:
        from . import harness
        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LayerStats", "analyze_weights", "entropy_of_counts", "plot_weight_stats", "shannon_entropy", "stats_table",
    "PerplexityResult", "llama_cpp_windows", "load_eval_tokens", "perplexity", "sliding_windows",
    "collect_results", "plot_comparison", "plot_scaling_law",
    "describe_model", "load_results", "model_family", "write_json",
    "LAW_PRESETS", "FitResult", "ScalingFitWarning", "ScalingLaw", "fit_scaling_law", "get_law", "read_points",
    *_HARNESS,
]
