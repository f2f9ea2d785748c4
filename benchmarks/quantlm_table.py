"""QuantLM table: perplexity and size of a FloatLM, its RTN and GPTQ quantizations, and the TriLM of the
same shape (docs/quantlm.md).

    spectra demo --out runs/demo                       # trains runs/demo/floatlm and runs/demo/trilm
    python benchmarks/quantlm_table.py --float runs/demo/floatlm --trilm runs/demo/trilm --data runs/demo/data

Calibration windows come from the training split of the prepared data, perplexity from its validation split
(sliding windows of the model's max_seq_len, half-window stride). Sizes are counted from the layers each
model holds (spectra.size storage-bits protocol: codes, float16 scales, zero points, permutations; embeddings,
lm head and norms at 16 bits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from spectra.checkpoint import load_checkpoint
from spectra.convert import quantize_checkpoint
from spectra.eval import load_eval_tokens, perplexity
from spectra.quant import QuantConfig
from spectra.size import model_size_breakdown


def measure(path: Path, tokens: torch.Tensor) -> dict:
    model = load_checkpoint(path)
    size = model_size_breakdown(model)
    linear_weights = sum(m.in_features * m.out_features for m in model.linear_layers().values())
    return {"perplexity": perplexity(model, tokens, progress=False).perplexity,
            "linear_bits_per_weight": size["linear_bits"] / linear_weights, "size_bits": size["total_bits"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float", required=True, help="FloatLM checkpoint")
    parser.add_argument("--trilm", help="TriLM checkpoint of the same shape (optional)")
    parser.add_argument("--data", required=True, help="prepared data (train split calibrates, val split scores)")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4, 6, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N validation tokens")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokens = load_eval_tokens(args.data, max_tokens=args.max_tokens)  # the validation split of prepared shards
    rows = [("FloatLM (fp16 linear)", measure(Path(args.float), tokens), None)]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            for method in ("rtn", "gptq"):
                config = QuantConfig(bits=bits, group_size=args.group_size, method=method,
                                     act_order=args.act_order and method == "gptq")
                out = Path(tmp) / f"{method}{bits}"
                report = quantize_checkpoint(args.float, out, config, calib=args.data, samples=args.samples,
                                             seq_len=args.seq_len, progress=False)
                error = statistics.fmean(layer[method] for layer in report.layers.values())
                rows.append((f"QuantLM {bits}-bit {method.upper()}", measure(out, tokens), error))
    if args.trilm:
        rows.append(("TriLM (ternary)", measure(Path(args.trilm), tokens), None))

    base = rows[0][1]["perplexity"]
    print(f"validation tokens: {tokens.numel():,}; group size {args.group_size}, asymmetric, "
          f"act_order {args.act_order}, {args.samples} calibration windows\n")
    print("| model | bits / linear weight | size (Mbit) | val perplexity | vs FloatLM | mean layer error |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row, error in rows:
        print(f"| {name} | {row['linear_bits_per_weight']:.3f} | {row['size_bits'] / 1e6:.3f} | "
              f"{row['perplexity']:.3f} | {100 * (row['perplexity'] / base - 1):+.2f}% | "
              f"{'' if error is None else f'{error:.4f}'} |")
    print("\nmean layer error: ||WX - QX|| / ||WX|| averaged over the 7 x layers linear layers, on the "
          "calibration inputs each layer saw during quantization")
    if args.json:
        Path(args.json).write_text(json.dumps([{"model": n, **r, "layer_error": e} for n, r, e in rows], indent=2))


if __name__ == "__main__":
    main()
