"""`spectra scaling fit | predict | plot`: L(N, D) = E + A/N^alpha + B/D^beta laws."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError, OutputError
from ..eval.plots import plot_scaling_law
from ..eval.results import write_json
from ..eval.scaling import fit_scaling_law, get_law, parse_count, read_points
from ..io import check_figure_output, check_output, json_recognizer
from .common import add_force, seed_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scaling", help="fit, query and plot scaling laws L(N, D)",
                              description="Scaling laws L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3). "
                                          "Laws are presets (spectra-1.1) or JSON files written by `fit --out`.")
    sub = p.add_subparsers(dest="scaling_command", metavar="WHAT", required=True)

    fit = sub.add_parser("fit", help="fit a law to (N, D, loss) points from a CSV",
                         description="Fit by L-BFGS on the Huber loss of log-loss residuals from a grid of "
                                     "initialisations; report R^2 and bootstrap 95% intervals. The CSV needs "
                                     "columns for parameters (N/params), tokens (D/tokens) and loss (L/loss); "
                                     "counts may use suffixes (300M, 1.5B, 1.2T).")
    fit.add_argument("points", help="CSV of points")
    fit.add_argument("--delta", type=float, default=1e-3, help="Huber delta (default 1e-3)")
    fit.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples (default 100; 0 for none)")
    fit.add_argument("--grid", choices=("chinchilla", "coarse"), default="chinchilla", help="initialisation grid")
    fit.add_argument("--starts", type=int, default=64,
                     help="L-BFGS runs from the best N grid points (default 64; 0 = every point)")
    fit.add_argument("--n-unit", default="1M", help="unit of N in the law (default 1M, as the spectra-1.1 preset)")
    fit.add_argument("--d-unit", default="1B", help="unit of D in the law (default 1B)")
    fit.add_argument("--seed", type=seed_int, default=0)
    fit.add_argument("--out", help="write the fitted law (JSON) here")
    fit.add_argument("--plot", help="also draw the law with the points to this PNG")
    add_force(fit)
    fit.set_defaults(func=run_fit)

    pred = sub.add_parser("predict", help="loss for N and D; compute-optimal N, D for a FLOP budget",
                          description="Evaluate a law at --params and --tokens, and/or give the compute-optimal "
                                      "split of --flops (C = 6 N D).")
    pred.add_argument("--law", default="spectra-1.1", help="preset name or law JSON (default spectra-1.1)")
    pred.add_argument("--params", help="parameters N, e.g. 1.5B")
    pred.add_argument("--tokens", help="training tokens D, e.g. 1.2T")
    pred.add_argument("--flops", help="compute budget C in FLOPs, e.g. 1e22")
    pred.add_argument("--json", action="store_true", help="print JSON")
    pred.set_defaults(func=run_predict)

    plot = sub.add_parser("plot", help="iso-loss contours and fitted curves (with data) as PNG")
    plot.add_argument("--law", default="spectra-1.1", help="preset name or law JSON (default spectra-1.1)")
    plot.add_argument("--points", help="CSV of points to overlay")
    plot.add_argument("--out", default="scaling.png", help="PNG to write (default scaling.png)")
    add_force(plot)
    plot.set_defaults(func=run_plot)


def run_fit(args: argparse.Namespace) -> int:
    LAW_FILE = json_recognizer(lambda d: "law" in d)

    sources = [args.points]
    if args.out and args.plot and Path(args.out).resolve() == Path(args.plot).resolve():
        raise OutputError(f"--out and --plot both name {args.out}; give the law JSON and the plot different paths")
    if args.out:  # refused before the fit, not after it
        check_output(args.out, "scaling fit", force=args.force, kind="file", recognize=LAW_FILE, sources=sources)
    if args.plot:
        check_figure_output(args.plot, force=args.force, sources=sources, flag="--plot")
    n, d, loss = read_points(args.points)
    result = fit_scaling_law(n, d, loss, delta=args.delta, bootstrap=args.bootstrap, seed=args.seed,
                             n_unit=parse_count(args.n_unit), d_unit=parse_count(args.d_unit), grid=args.grid,
                             starts=args.starts or None, progress=True)
    law = result.law
    print(law.formula())
    print(f"R^2 = {result.r2:.5f} over {result.points} points (Huber delta {result.delta:g}, objective "
          f"{result.huber:.4g}, {'converged' if result.converged else 'NOT converged'})")
    for name in ("E", "A", "alpha", "B", "beta"):
        ci = result.ci.get(name)
        bounds = f"  95% CI [{ci[0]:.4g}, {ci[1]:.4g}] ({result.bootstrap} bootstrap fits)" if ci else ""
        print(f"  {name:<6}{getattr(law, name):>10.4g}{bounds}")
    if args.out:
        write_json(result.to_dict(), args.out, force=args.force, recognize=lambda d: "law" in d, sources=sources)
        print(f"law written to {args.out}")
    if args.plot:
        plot_scaling_law(law, args.plot, points=(n, d, loss), force=args.force, sources=sources)
        print(f"plot written to {args.plot}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    law = get_law(args.law)
    if not args.flops and not (args.params and args.tokens):
        raise ConfigError("give --params and --tokens (a loss prediction) and/or --flops (compute-optimal N, D)")
    report: dict = {"law": law.to_dict()}
    if args.params and args.tokens:
        n, d = parse_count(args.params), parse_count(args.tokens)
        report["prediction"] = {"params": n, "tokens": d, "loss": float(law.loss(n, d))}
    if args.flops:
        c = parse_count(args.flops)
        n_opt, d_opt = law.compute_optimal(c)
        report["compute_optimal"] = {"flops": c, "params": float(n_opt), "tokens": float(d_opt),
                                     "tokens_per_param": float(d_opt / n_opt), "loss": float(law.loss(n_opt, d_opt))}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(law.formula())
    if "prediction" in report:
        p = report["prediction"]
        print(f"L(N={p['params']:.4g}, D={p['tokens']:.4g}) = {p['loss']:.4f}")
    if "compute_optimal" in report:
        o = report["compute_optimal"]
        print(f"compute-optimal for C = {o['flops']:.3g} FLOPs: N = {o['params']:.4g}, D = {o['tokens']:.4g} "
              f"({o['tokens_per_param']:.1f} tokens/parameter), L = {o['loss']:.4f}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    sources = [s for s in (args.points, args.law) if s and Path(s).exists()]
    check_figure_output(args.out, force=args.force, sources=sources)
    law = get_law(args.law)
    points = read_points(args.points) if args.points else None
    print(f"plot written to {plot_scaling_law(law, args.out, points=points, force=args.force, sources=sources)}")
    return 0
