"""Cost of a base's weight fingerprint (spectra.fingerprint), what loading a LoRA adapter adds.

    python benchmarks/fingerprint_cost.py --models 99M 560M --kinds tq2 tq1 ternary_frozen float --threads 1 2

Builds each suite shape in memory with random trits (float: random weights), so nothing is read from disk,
and times `weight_fingerprint(model, (dtype,))` (the check `load_adapter` makes: one digest) and
`weight_fingerprint(model)` (what `save_adapter` records: float32, bfloat16 and float16 digests); best of
`--repeat`. The hashed bytes are the canonical ones: int8 trits + fp32 scales for a ternary layer (packed
layers are unpacked), the float tensors in the digest's dtype, so the work grows with the parameter count.
"""

from __future__ import annotations

import argparse
import time

import torch

import spectra
from spectra.fingerprint import weight_fingerprint
from spectra.packed import PackedTernaryLinear


def build(size: str, kind: str) -> spectra.SpectraLM:
    torch.manual_seed(0)
    model = spectra.SpectraLM(spectra.get_config(size, weight_kind=kind))
    with torch.no_grad():
        for layer in model.linear_layers().values():
            if kind == "float":
                continue  # initialised at random already
            trits = torch.randint(-1, 2, (layer.out_features, layer.in_features), dtype=torch.int8)
            if isinstance(layer, PackedTernaryLinear):
                layer.qweight = PackedTernaryLinear.from_trits(trits, layer.scales, layer.shard_axis, kind).qweight
            else:
                layer.trits.copy_(trits)
            layer.scales.uniform_(0.01, 0.1)
    return model


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["99M", "560M"])
    parser.add_argument("--kinds", nargs="+", default=["tq2", "tq1", "ternary_frozen", "float"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    print("| model | kind | linear weights | threads | load check (1 digest) | save (3 digests) |")
    print("|---|---|---|---|---|---|")
    for size in args.models:
        for kind in args.kinds:
            model = build(size, kind)
            count = sum(m.in_features * m.out_features for m in model.linear_layers().values())
            for threads in args.threads:
                torch.set_num_threads(threads)
                check = best(lambda model=model: weight_fingerprint(model, ("float32",)), args.repeat)
                save = best(lambda model=model: weight_fingerprint(model), args.repeat)
                print(f"| {size} | {kind} | {count / 1e6:,.0f}M | {threads} | {check:.3f} s | {save:.3f} s |",
                      flush=True)
            del model


if __name__ == "__main__":
    main()
