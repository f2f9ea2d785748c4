"""`spectra plot`: loss curves of training runs to a PNG."""

from __future__ import annotations

import argparse

from ..plot import plot_runs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="draw loss curves of training runs",
                              description="Read the metrics.jsonl of each run and draw train/val loss to a PNG.")
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", "-o", default="loss.png", help="PNG file to write (default loss.png)")
    p.add_argument("--labels", nargs="+", default=None, help="one label per run (default: directory names)")
    p.add_argument("--title", default="Training loss")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis")
    p.add_argument("--force", action="store_true", help="replace an existing file that is not a PNG spectra drew")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = plot_runs(args.runs, args.out, labels=args.labels, title=args.title, x_axis=args.x, force=args.force)
    print(f"wrote {path}")
    return 0
