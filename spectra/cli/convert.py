"""`spectra convert`: turn a float checkpoint into a TriLM by continued training with phased-in ternarization."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..finetune import finetune
from .finetune import add_training_flags, report, task_from_args, train_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a float checkpoint to ternary (quantization-aware training)",
                              description="Continue training a FloatLM (or any float LLaMA checkpoint) as a TriLM: "
                                          "the effective weight moves from W to its ternarization Q(W) as "
                                          "W + λ(Q(W) − W), λ rising from 0 to 1 over --ternary-warmup steps, "
                                          "optionally distilled from the original float model (--teacher). "
                                          "The result is frozen to exact trits and per-shard scales.")
    p.add_argument("checkpoint", nargs="?", help="float checkpoint directory (not needed with --resume)")
    p.add_argument("--to", choices=("ternary",), default="ternary", help="target weight kind (ternary)")
    add_training_flags(p)
    g = p.add_argument_group("conversion")
    g.add_argument("--ternary-warmup", type=int, default=0, help="steps over which λ goes 0 -> 1 (default 0: at once)")
    g.add_argument("--teacher", action="store_true", help="distil from the original float model (KL on logits)")
    g.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    g.add_argument("--distill-weight", type=float, default=0.5, help="α in (1-α)·CE + α·T²·KL (default 0.5)")
    g.add_argument("--model-parallel-size", type=int, default=None,
                   help="one ternary scale per shard of this many (default: the checkpoint's, usually 1)")
    g.add_argument("--pack", choices=("tq2", "tq1"), default=None, help="also pack the converted TriLM")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model_parallel_size is not None and args.model_parallel_size < 1:
        raise ConfigError(f"--model-parallel-size must be at least 1, got {args.model_parallel_size}")
    task = task_from_args(args, "convert", ternary_warmup=args.ternary_warmup, teacher=args.teacher,
                          temperature=args.temperature, distill_weight=args.distill_weight,
                          model_parallel_size=args.model_parallel_size, pack=args.pack)
    result = finetune(task, resume=args.resume, **train_options(args))
    report(result)
    return 0
