"""`spectra export gguf`: write a checkpoint as a llama.cpp GGUF file (TQ1_0, TQ2_0 or F16)."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..gguf_export import GGUF_TYPES, GGUFFallbackWarning, export_gguf
from .common import add_allow_nonfinite, add_force, add_threads_option, apply_threads, human_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to another runtime's format",
                              description="Export a checkpoint for other runtimes.")
    formats = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="GGUF for llama.cpp (architecture llama, tokenizer included)",
                           description="Write a llama.cpp GGUF: ternary matrices as TQ1_0 or TQ2_0 (one fp16 scale "
                                       "per 256-weight block), everything else F16/F32. Matrices whose per-shard "
                                       "scales do not fall on block boundaries are written as F16, with a warning.")
    g.add_argument("checkpoint", help="checkpoint directory with tokenizer.json (dense, ternary or packed)")
    g.add_argument("--type", required=True, choices=list(GGUF_TYPES), help="tensor type of the linear weights")
    g.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    add_force(g)
    add_allow_nonfinite(g)
    add_threads_option(g)
    g.set_defaults(func=run_gguf)


def run_gguf(args: argparse.Namespace) -> int:
    apply_threads(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GGUFFallbackWarning)
        report = export_gguf(args.checkpoint, args.out, args.type, progress=True, force=args.force,
                             allow_nonfinite=args.allow_nonfinite)
    for w in caught:
        if issubclass(w.category, GGUFFallbackWarning):
            print(f"spectra: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    counts: dict[str, int] = {}
    for kind in report.tensor_types.values():
        counts[kind] = counts.get(kind, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    dequantized = " (QuantLM weights dequantized)" if report.weight_kind == "quant" else ""
    print(f"wrote {report.path} ({human_bytes(report.bytes)}): {len(report.tensor_types)} tensors ({kinds})"
          f"{dequantized}")
    return 0
