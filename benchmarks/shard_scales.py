"""Cost of per-shard scales: one scale vs P output-row shards vs P input-column shards, per layer shape.

    python benchmarks/shard_scales.py

Same method as `spectra bench gemm` (cold weights, CUDA graph of 200 calls, median of 5), TQ2, fp16, m = 1
and 16. Row shards (column-parallel q/k/v/gate/up) scale the accumulator; column shards (row-parallel o/down)
scale the activations. 3.9B: 18 row / 6 column shards as in the released model; 70B: 8 / 8.
"""

from __future__ import annotations

import torch

from spectra import bench
from spectra.kernels import ternary_matmul, timing


def main() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(3)
    print(torch.cuda.get_device_name())
    for sset, parts in (("3.9b", {0: 18, 1: 6}), ("70b", {0: 8, 1: 8})):
        for m in (1, 16):
            total: dict[str, float] = {}
            for k, n in bench.SHAPE_SETS[sset]:
                packs = timing.cold_copies(timing.random_packed(n, k, "tq2", dev, gen), timing.l2_size(dev))
                x = torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen)
                line = []
                for name, p, axis in (("s0", 1, 0), ("rows", parts[0], 0), ("cols", parts[1], 1)):
                    s = torch.rand(p, device=dev, generator=gen) + 0.5
                    def call(i: int, x=x, packs=packs, k=k, s=s, axis=axis) -> None:
                        ternary_matmul(x, packs[i], "tq2", k, s, axis)

                    t = timing.time_graph(call, len(packs)) * 1e6
                    total[name] = total.get(name, 0.0) + t
                    line.append(f"{name}={t:.1f}")
                print(f"{sset} tq2 m{m} {n}x{k}: " + " ".join(line), flush=True)
            print(f"TOTAL {sset} tq2 m{m}: " + " ".join(f"{a}={b:.1f}" for a, b in total.items()), flush=True)


if __name__ == "__main__":
    main()
