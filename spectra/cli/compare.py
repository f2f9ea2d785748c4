"""`spectra compare RESULTS...`: metric vs parameters and vs size in bits, one line per family, as PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.plots import collect_results, comparable_metrics, metric_filename, plot_comparison


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="plot metrics vs parameters and size in bits per model family",
                              description="Draw the Spectra papers' comparison from result JSONs written by "
                                          "`spectra eval ppl/tasks --out`: each metric against parameters and "
                                          "against size in bits, one line per family (TriLM, FloatLM, "
                                          "QuantLM k-bit). Files of one model are merged.")
    p.add_argument("results", nargs="+", help="result JSON files")
    p.add_argument("--metric", action="append",
                   help="metric to plot (repeatable; default: every metric reported for two or more models)")
    p.add_argument("--out-dir", default="compare", help="folder for the PNGs (default ./compare)")
    p.add_argument("--force", action="store_true", help="replace existing files that are not PNGs spectra drew")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    entries = collect_results(args.results)
    metrics = args.metric or comparable_metrics(entries)
    print(f"{len(entries)} models: " + ", ".join(f"{e['model']['name']} ({e['model']['family']}, "
                                                   f"{e['model']['parameters'] / 1e6:.2f}M params, "
                                                   f"{e['model']['size_bits'] / 8e6:.2f} MB)" for e in entries))
    for metric in metrics:
        path = plot_comparison(entries, metric, Path(args.out_dir) / metric_filename(metric),
                               force=args.force)
        print(f"{metric}: {path}")
    return 0
