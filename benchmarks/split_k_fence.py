"""How split-k / stream-K programs order their partial tiles before the arrival counter: correctness and cost.

    python benchmarks/split_k_fence.py

Orderings (``spectra.kernels.dispatch.FENCE_MODE``): 1 = ``fence.sc.gpu`` in every thread, 2 =
``fence.acq_rel.gpu`` in every thread, 3 = the CTA barrier alone (shipped). First a stress check per ordering:
odd shapes with split 4-16 and stream-K tiles, 40 launches each on fresh inputs without synchronising in between,
every result against fp32. Then, per layer shape set, format and m = 1 / 16, the summed layer time (same method as
``spectra bench gemm``) of the tuned configuration and of the best split factor, per ordering.
"""

from __future__ import annotations

import torch

from spectra import bench
from spectra.formats import get_format
from spectra.kernels import dispatch
from spectra.kernels import timing as kernel_timing
from spectra.kernels.configs import KernelConfig, lookup_config

ORDERINGS = (1, 2, 3)
STRESS = ((130, 999, 3, KernelConfig("tc", 16, 64, 32, 4, 4, 3)),
          (1000, 3001, 16, KernelConfig("tc", 16, 64, 64, 8, 4, 3)),
          (3072, 9216, 1, KernelConfig("tc", 16, 64, 64, 16, 4, 3)),
          (8192, 3072, 16, KernelConfig("tc", 16, 64, 64, 8, 4, 3)),
          (3001, 515, 100, KernelConfig("sk", 64, 128, 32, 1, 8, 3)),
          (3072, 3072, 256, KernelConfig("sk", 128, 128, 32, 1, 8, 3)))


def stress(dev: torch.device, gen: torch.Generator) -> int:
    failures = 0
    for mode in ORDERINGS:
        dispatch.FENCE_MODE = mode
        worst = 0.0
        for fmt in ("tq2", "tq1"):
            for n, k, m, cfg in STRESS:
                packed = kernel_timing.random_packed(n, k, fmt, dev, gen)
                xs = [torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen) for _ in range(4)]
                s = torch.rand(1, device=dev, generator=gen) + 0.5
                w = get_format(fmt).unpack(packed, k).float() * s
                refs = [x.float() @ w.t() for x in xs]
                ys = [dispatch.run_config(xs[r % 4], packed, fmt, k, s, 0, cfg) for r in range(40)]
                torch.cuda.synchronize()
                err = max(float((y.float() - refs[r % 4]).norm() / refs[r % 4].norm()) for r, y in enumerate(ys))
                if not err < 2e-3:  # also catches NaN
                    failures += 1
                    print(f"FAIL ordering {mode} {fmt} {n}x{k} m={m} {cfg}: rel err {err}")
                worst = max(worst, err if err == err else 1.0)
        print(f"ordering {mode}: worst rel err {worst:.2e}")
    return failures


def timing(dev: torch.device, gen: torch.Generator) -> None:
    print("| shapes | fmt | m | " + " | ".join(f"tuned, ordering {o} (us)" for o in ORDERINGS) + " | "
          + " | ".join(f"best split, ordering {o} (us)" for o in ORDERINGS) + " |")
    print("|---|---|---|" + "---|" * (2 * len(ORDERINGS)))
    for sset in ("3.9b", "70b"):
        for fmt in ("tq2", "tq1"):
            for m in (1, 16):
                tuned_sum = dict.fromkeys(ORDERINGS, 0.0)
                best_sum = dict.fromkeys(ORDERINGS, 0.0)
                for k, n in bench.SHAPE_SETS[sset]:
                    base = kernel_timing.random_packed(n, k, fmt, dev, gen)
                    packs = kernel_timing.cold_copies(base, kernel_timing.l2_size(dev))
                    x = torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen)
                    s = torch.rand(1, device=dev, generator=gen) + 0.5
                    tuned = lookup_config(fmt, n, k, m, torch.float16, 0, dev)
                    configs = {tuned}
                    if tuned.kind == "tc":
                        configs |= {KernelConfig("tc", tuned.block_m, tuned.block_n, tuned.block_j, split,
                                                 tuned.num_warps, tuned.num_stages) for split in (1, 2, 4, 8, 16)}
                    for mode in ORDERINGS:
                        dispatch.FENCE_MODE = mode
                        times = {}
                        for cfg in configs:
                            def call(i: int, x=x, packs=packs, fmt=fmt, k=k, s=s, cfg=cfg) -> None:
                                dispatch.run_config(x, packs[i], fmt, k, s, 0, cfg)
                            times[cfg] = kernel_timing.time_graph(call, len(packs)) * 1e6
                        tuned_sum[mode] += times[tuned]
                        best_sum[mode] += min(times.values())
                print(f"| {sset} | {fmt} | {m} | " + " | ".join(f"{tuned_sum[o]:.1f}" for o in ORDERINGS) + " | "
                      + " | ".join(f"{best_sum[o]:.1f}" for o in ORDERINGS) + " |", flush=True)


def main() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(11)
    print(torch.cuda.get_device_name())
    shipped = dispatch.FENCE_MODE
    try:
        failures = stress(dev, gen)
        print(f"stress failures: {failures}")
        timing(dev, gen)
    finally:
        dispatch.FENCE_MODE = shipped


if __name__ == "__main__":
    main()
