"""`spectra bench gemm|decode`: packed ternary kernels and CUDA-graph decoding against fp16, on a GPU."""

from __future__ import annotations

import argparse

import torch

from .. import bench, kernels
from ..block import model_linear_shapes
from ..checkpoint import read_config
from ..config import get_config
from ..errors import ConfigError, DeviceError
from ..formats import FORMATS
from ..kernels import configs, tuning
from ..kernels.timing import copy_bandwidth
from ..kinds import PACKED_KINDS
from .common import add_kv_cache_option, kv_cache_dtype, parse_int_list


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="GPU benchmarks of the packed ternary kernels",
                              description="Benchmarks of the TQ2/TQ1 kernels against cuBLAS fp16 (needs CUDA).")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    g = sub.add_parser("gemm", help="summed layer GEMM time vs torch.matmul fp16, cold weights")
    g.add_argument("--shapes", default="70b,3.9b",
                   help="comma-separated shape sets: 70b, 3.9b, or model size presets such as 1.5B")
    g.add_argument("--ms", default="1,2,4,8,16,32,64,128,256", help="batch sizes m")
    g.add_argument("--formats", default=",".join(PACKED_KINDS),
                   help="tq2, tq1: the dispatcher's kernel; tq2:tl, tq1:tl: the portable triton.language kernel "
                        "alone (side by side with the Hopper Gluon kernel)")
    g.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--reps", type=int, default=200, help="launches per timed CUDA graph")
    g.add_argument("--trials", type=int, default=5, help="timed replays; the median is reported")
    g.add_argument("--eager", action="store_true",
                   help="also time the same calls launched eagerly (no CUDA graph) and report the host time "
                        "per call (eager - graph)")
    g.set_defaults(func=run_gemm)
    d = sub.add_parser("decode", help="CUDA-graph decode steps/s, packed vs fp16, random weights")
    d.add_argument("--models", default="3.9b,70b-slice")
    d.add_argument("--batches", default="1,16")
    d.add_argument("--kinds", default=",".join(("float", *PACKED_KINDS)))
    d.add_argument("--slice-layers", default="2,4", help="layer counts of the 70B slice (per-layer speedup)")
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--context", type=int, default=8,
                   help="cached positions before the first timed step (long-context decoding: e.g. 4000)")
    d.add_argument("--compile", action="store_true",
                   help="compile each model's decode step with torch.compile before capturing it (all kinds)")
    d.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate products (default: fused, for every kind)")
    add_kv_cache_option(d)
    d.set_defaults(func=run_decode)
    t = sub.add_parser("tune", help="tune the kernels for a model's layer shapes on this GPU (user cache)",
                       description="Time every kernel configuration for each ternary layer shape of a model and "
                                   "batch bucket on this GPU, and keep the fastest in the user cache "
                                   "($SPECTRA_CACHE or ~/.cache/spectra/kernel_configs.json), which the packed "
                                   "layers then use. Shapes without an entry run a heuristic configuration.")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--size", help="a model size preset, e.g. 1.5B or 3.9B")
    src.add_argument("--checkpoint", help="a checkpoint directory (only its config.json is read)")
    src.add_argument("--shapes", help="a shape set of `bench gemm` (70b, 3.9b): one layer's fused decode shapes")
    t.add_argument("--formats", default=None,
                   help=f"{','.join(PACKED_KINDS)} (default: the checkpoint's packed format, else all)")
    t.add_argument("--ms", default="1,2,4,8,16", help="batch sizes m to tune (each stands for its bucket)")
    t.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    t.add_argument("--quick", action="store_true",
                   help="time only the configs tuned for the same shape on other GPUs (shipped table and user "
                        "cache) and the heuristic: minutes instead of the full search; shapes no GPU has an "
                        "entry for still get the full search")
    t.set_defaults(func=run_tune)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise DeviceError("spectra bench needs a CUDA GPU and none is available")


def run_gemm(args: argparse.Namespace) -> int:
    fmts = tuple(args.formats.split(","))
    for f in fmts:
        base, _, variant = f.partition(":")
        if base not in FORMATS or variant not in ("", "tl"):
            raise ConfigError(f"--formats: unknown entry {f!r}; use tq2, tq1, tq2:tl or tq1:tl")
    ms = parse_int_list(args.ms, "--ms", "batch sizes", minimum=1)
    for shapes in args.shapes.split(","):
        bench.layer_shapes(shapes)  # a bad name fails before any GPU work
    _need_cuda()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}; copy bandwidth {copy_bandwidth(dev) / 1e9:.0f} GB/s "
          f"(read + write); cold weights, CUDA graphs of {args.reps} launches, median of {args.trials}")
    for shapes in args.shapes.split(","):
        print(bench.format_gemm_header(fmts, args.eager))
        bench.bench_gemm(shapes, ms, fmts,
                         torch.float16 if args.dtype == "float16" else torch.bfloat16, reps=args.reps,
                         trials=args.trials, log=print, eager=args.eager)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    batches = parse_int_list(args.batches, "--batches", "batch sizes", minimum=1)
    slice_layers = parse_int_list(args.slice_layers, "--slice-layers", "layer counts", minimum=1)
    _need_cuda()
    kinds = tuple(args.kinds.split(","))
    print(f"{torch.cuda.get_device_name(0)}; fp16 activations, CUDA-graph decode steps as generate replays them "
          f"(greedy choice on the GPU)"
          f"{' of the torch.compile-d step' if args.compile else ''}, "
          f"{'separate' if args.no_fuse else 'fused'} q/k/v and gate/up, random weights, "
          f"steps from position {args.context}, {'an int8' if args.kv_cache == 'int8' else 'the model dtype'} KV cache"
          f"{', norms and SwiGLU inside the packed products (SPECTRA_FUSED_DECODE=1)' if kernels.FUSED_DECODE else ''}")
    print(bench.format_decode_header(kinds))
    rows = bench.bench_decode(tuple(args.models.split(",")), batches, kinds, slice_layers, steps=args.steps, log=print,
                              compile=args.compile, fuse=not args.no_fuse, context=args.context,
                              cache_dtype=kv_cache_dtype(args))
    for kind in kinds:
        if kind != "float":
            for (model, batch), ratio in bench.per_layer_speedup(rows, kind).items():
                print(f"per-layer speedup {kind} vs fp16, {model} batch {batch}: {ratio:.2f}x")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    if args.shapes:
        config = None
        shapes = [(n, k) for k, n in bench.layer_shapes(args.shapes)]
    else:
        config = read_config(args.checkpoint) if args.checkpoint else get_config(args.size)
        shapes = model_linear_shapes(config)
    if args.formats:
        fmts = tuple(f.strip().lower() for f in args.formats.split(","))
    elif config is not None and config.weight_kind in FORMATS:
        fmts = (config.weight_kind,)
    else:
        fmts = PACKED_KINDS
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown format {', '.join(unknown)}; use {' and/or '.join(PACKED_KINDS)}")
    ms = parse_int_list(args.ms, "--ms", "batch sizes", minimum=1)
    _need_cuda()
    print(f"{torch.cuda.get_device_name(0)}: tuning {len(shapes)} shapes x {len(fmts)} formats x {len(ms)} "
          f"batch sizes ({args.dtype}{', quick' if args.quick else ''})")
    tuning.tune_shapes(shapes, fmts, ms, torch.float16 if args.dtype == "float16" else torch.bfloat16,
                       quick=args.quick)
    print(f"saved to {configs.user_cache_path()}")
    return 0
