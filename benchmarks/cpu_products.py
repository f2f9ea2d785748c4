"""CPU decode-step products of one layer: the compiled loop (spectra.kernels.cpu_gemv) vs the reference.

    python benchmarks/cpu_products.py                     # 99M layer shapes, TQ2 and TQ1, m = 1, 2 threads
    python benchmarks/cpu_products.py --size 560M --m 4

For each of a layer's four products (fused q/k/v, o, fused gate/up, down; 6 shard scales per matrix, as the
released models have) the median microseconds per call of ``cpu_gemv.ternary_matmul_cpu`` and of the reference
(unpack, dense product), timed interleaved in one process, and their sum per layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectra.block import fused_shapes
from spectra.config import get_config
from spectra.formats import get_format
from spectra.kernels import cpu_gemv, ternary_matmul_reference


def _median_us(fn, calls: int, trials: int) -> float:
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="99M")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--formats", default="tq2,tq1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = get_config(args.size)
    print(f"{args.size} layer, m = {args.m}, {args.threads} threads, fp32 activations, 6 shard scales")
    print("| format | product (n x k) | compiled us | reference us | speedup |")
    print("|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        total = [0.0, 0.0]
        for n, k in fused_shapes(config):
            packed = get_format(fmt).pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
            scales, x = torch.rand(6) + 0.5, torch.randn(args.m, k)
            call = (x, packed, fmt, k, scales, 0)
            compiled = lambda call=call: cpu_gemv.ternary_matmul_cpu(*call)  # noqa: E731
            reference = lambda call=call: ternary_matmul_reference(*call)  # noqa: E731
            for _ in range(3):  # compile and warm up
                compiled(), reference()
            t = (_median_us(compiled, args.calls, args.trials), _median_us(reference, args.calls, args.trials))
            total = [total[0] + t[0], total[1] + t[1]]
            print(f"| {fmt} | {n} x {k} | {t[0]:.1f} | {t[1]:.1f} | {t[1] / t[0]:.1f}x |")
        print(f"| {fmt} | layer | {total[0]:.1f} | {total[1]:.1f} | {total[1] / total[0]:.1f}x |")


if __name__ == "__main__":
    main()
