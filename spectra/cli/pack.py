"""`spectra pack`: convert a TriLM checkpoint to a packed TQ2 (2-bit) or TQ1 (1.6-bit) checkpoint."""

from __future__ import annotations

import argparse
import json

from ..convert import PackReport, pack_checkpoint
from ..kinds import PACKED_KINDS
from .common import add_allow_nonfinite, add_force, add_threads_option, apply_threads, human_bytes, parse_dtype


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pack", help="pack a TriLM checkpoint into TQ2 or TQ1",
                              description="Losslessly pack the ternary linear weights of a checkpoint (spectra or a "
                                          "SpectraSuite-style unpacked one) into TQ2 (2 bits/weight) or TQ1 "
                                          "(1.6 bits/weight). The packed checkpoint loads with load_checkpoint and "
                                          "gives the same logits as the unpacked one.")
    p.add_argument("checkpoint", help="TriLM checkpoint directory")
    p.add_argument("--format", required=True, choices=list(PACKED_KINDS), help="packed format")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--dtype", default=None,
                   help="dtype for embeddings, norms and lm head (default: as stored in the source)")
    p.add_argument("--json", action="store_true", help="print the size report as JSON")
    add_force(p)
    add_allow_nonfinite(p)
    add_threads_option(p)
    p.set_defaults(func=run)


def format_report(report: PackReport) -> str:
    return (f"{report.format}: {report.linear_weights / 1e6:.2f}M linear weights\n"
            f"  linear weights  fp16 {human_bytes(report.fp16_linear_bytes):>10}   packed "
            f"{human_bytes(report.packed_linear_bytes):>10}   {report.bits_per_weight:.4f} bits/weight "
            f"(padding and scales included)\n"
            f"  whole model     fp16 {human_bytes(report.fp16_total_bytes):>10}   stored "
            f"{human_bytes(report.stored_total_bytes):>10}")


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    report = pack_checkpoint(args.checkpoint, args.out, args.format, dtype=parse_dtype(args.dtype),
                             progress=not args.json, force=args.force, allow_nonfinite=args.allow_nonfinite)
    print(json.dumps(report.to_dict(), indent=2) if args.json else f"wrote {args.out}\n{format_report(report)}")
    return 0
