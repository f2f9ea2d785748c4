"""`spectra analyze weights`: per-layer weight statistics and Shannon entropy, as a table and a plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import load_model
from ..errors import OutputError
from ..eval.analysis import (
    HISTOGRAM_BINS,
    HISTOGRAM_RANGE,
    analyze_weights,
    mean_entropy,
    plot_weight_stats,
    stats_table,
)
from ..eval.results import write_json
from ..io import check_figure_output, check_output, json_recognizer
from .common import add_allow_nonfinite, add_force, add_threads_option, apply_threads, parse_dtype, parse_int_list


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="study a checkpoint's weights",
                              description="Study checkpoints: `weights` reports per-layer statistics.")
    sub = p.add_subparsers(dest="analyze_command", metavar="WHAT", required=True)
    w = sub.add_parser("weights", help="per-layer std, zero fraction, entropy; table and PNG",
                       description="Per linear layer: mean, std, fraction of zeros among the ternarized weights "
                                   "and Shannon entropy of the weight histogram at several bin counts. Several "
                                   "checkpoints (e.g. sizes of one family) share the plot.")
    w.add_argument("checkpoints", nargs="+", help="checkpoint directories (or preset names, randomly initialised)")
    w.add_argument("--bins", default="4,16,64,256,1024", help="entropy bin counts (default 4,16,64,256,1024)")
    w.add_argument("--plot", default="weights.png", help="PNG to write (default weights.png)")
    w.add_argument("--json", dest="json_out", help="write the statistics as JSON here")
    w.add_argument("--dtype", default=None, help="load dtype (default float32)")
    add_force(w)
    add_allow_nonfinite(w)
    add_threads_option(w)
    w.set_defaults(func=run_weights)


def _is_stats(data: dict) -> bool:
    """A statistics JSON an earlier `analyze weights --json` wrote."""
    return all(isinstance(v, dict) and "layers" in v for v in data.values())


def run_weights(args: argparse.Namespace) -> int:
    import numpy as np


    apply_threads(args)
    bins = parse_int_list(args.bins, "--bins", minimum=1)
    # Both outputs are checked before the (long) analysis, never inside a checkpoint being read.
    sources = [c for c in args.checkpoints if Path(c).exists()]
    if args.json_out and Path(args.json_out).resolve() == Path(args.plot).resolve():
        raise OutputError(f"--json and --plot both name {args.plot}; give them different paths")
    check_figure_output(args.plot, force=args.force, sources=sources, flag="--plot")
    if args.json_out:
        check_output(args.json_out, "analyze weights", force=args.force, kind="file", sources=sources,
                     flag="--json", recognize=json_recognizer(_is_stats))
    per_model = {}
    for source in args.checkpoints:
        model = load_model(source, dtype=parse_dtype(args.dtype), allow_nonfinite=args.allow_nonfinite)
        stats = analyze_weights(model, bins, progress=True)
        label = Path(source).name or source
        per_model[label] = stats
        print(f"\n{source}  (weight kind {model.config.weight_kind})")
        print(stats_table(stats))
        ent = mean_entropy(stats)
        print("size-weighted mean entropy: " + ", ".join(f"{b} bins {h:.3f} bits" for b, h in ent.items()))
    plot = plot_weight_stats(per_model, args.plot, force=args.force, sources=sources, flag="--plot")
    print(f"\nplot written to {plot}")
    if args.json_out:
        edges = np.linspace(*HISTOGRAM_RANGE, HISTOGRAM_BINS + 1).tolist()
        write_json({label: {"layers": [s.to_dict(with_histogram=True) for s in stats],
                            "histogram_edges_over_abs_mean": edges,
                            "mean_entropy": {str(b): h for b, h in mean_entropy(stats).items()}}
                    for label, stats in per_model.items()}, args.json_out, force=args.force,
                   recognize=_is_stats, sources=sources, flag="--json")
        print(f"statistics written to {args.json_out}")
    return 0

