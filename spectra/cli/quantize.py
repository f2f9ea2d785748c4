"""`spectra quantize`: a FloatLM checkpoint to a QuantLM checkpoint with GPTQ or round-to-nearest."""

from __future__ import annotations

import argparse
import statistics

from ..convert import quantize_checkpoint
from ..quant import QuantConfig
from .common import (
    add_allow_nonfinite,
    add_force,
    add_threads_option,
    apply_threads,
    default_device,
    parse_dtype,
    seed_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="post-training quantization of a FloatLM (GPTQ or RTN) to 2/3/4/6/8 bits",
        description="Quantize the linear layers of a FloatLM checkpoint with GPTQ (Frantar et al. 2022) or "
                    "round-to-nearest and write a QuantLM checkpoint that generate, eval and info accept.")
    p.add_argument("checkpoint", help="FloatLM checkpoint directory (spectra or transformers LLaMA)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3, 4, 6 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale/zero; -1 = whole row")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--calib", default=None, help="calibration data: text file, folder of text, .jsonl, .npy "
                                                 "of token ids or prepared data shards (required for gptq)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per calibration sequence (default: 2048 or the model's max_seq_len if smaller)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (no zero points; default asymmetric)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block size (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the calibration window sampling")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float16",
                   help="dtype of embeddings, norms and lm head in the output (default float16)")
    add_force(p)
    add_allow_nonfinite(p)
    add_threads_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
                         damp=args.damp, block_size=args.block_size, method=args.method)
    report = quantize_checkpoint(args.checkpoint, args.out, config, calib=args.calib, samples=args.samples,
                                 seq_len=args.seq_len, seed=args.seed, device=args.device or default_device(),
                                 save_dtype=parse_dtype(args.dtype), batch_size=args.batch_size,
                                 force=args.force, allow_nonfinite=args.allow_nonfinite)
    if report.layers:
        for method in (config.method, "rtn") if config.method != "rtn" else ("rtn",):
            errors = [layer[method] for layer in report.layers.values()]
            print(f"{method.upper():>5}: mean relative layer output error ||WX-QX||/||WX|| = "
                  f"{statistics.fmean(errors):.4f} (max {max(errors):.4f}) over {len(errors)} layers")
    print(f"wrote {args.out} ({config.method}, {config.bits}-bit, group size {config.group_size}); "
          f"see `spectra info {args.out}` for its size")
    return 0
