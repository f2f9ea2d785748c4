"""Sweep of the streaming Gluon kernel (``tq_gluon.tq_stream_gluon_kernel``, config kind ``stream``) against
cuBLAS fp16, the portable kernels and the shipped dispatcher, per layer shape, warps and split-k.

    python3 benchmarks/mma_stream_probe.py --out OUT [--shapes 3.9b,70b] [--formats tq2,tq1] [--ms 1,8]

Why (docs/performance.md, "H100, 2026-12-07 (fifth session)"): a bare read of the 70B gate/up weights in the
GEMV's tiling takes 40.5 us on an H100, the best product 64.4 us. The CUDA-core GEMV spends 3.8-4.4
instructions per weight; the wgmma Gluon kernel fills shared memory with the activations of its whole K range
first and keeps two steps in flight. The streaming kernel keeps the Gluon decode (weights straight into the A
fragment) but streams like the GEMV (four 64-byte steps per row in flight, no shared memory, B fragments loaded
from global memory), on mma.sync: 2.2 (TQ2) and 3.0 (TQ1) SASS instructions per weight, sm_90a.

Each variant is checked against the fp32 reference before it is timed (``timing.time_checked``); "portable" is
``bench.portable_matmul`` (the tuned GEMV / tensor-core kernels, without Gluon entries), "shipped" is
``ternary_matmul`` with the shipped table (Gluon entries included).
"""

from __future__ import annotations

import argparse

import torch

from spectra import bench
from spectra.kernels import gluon_launch, ternary_matmul, timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="mma_stream_probe_out")
    p.add_argument("--shapes", default="3.9b,70b")
    p.add_argument("--formats", default="tq2,tq1")
    p.add_argument("--ms", default="1,8")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--splits", default="1,2,4,8")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    log = timing.timestamped_log(f"{args.out}/mma_stream_probe.log")
    dev = torch.device("cuda")
    log(f"{torch.cuda.get_device_name(dev)}; copy bandwidth {timing.copy_bandwidth(dev) / 1e9:.0f} GB/s")
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = timing.l2_size(dev)
    summary = []
    for fmt in args.formats.split(","):
        for shape_set in args.shapes.split(","):
            for m in (int(v) for v in args.ms.split(",")):
                tot = [0.0, 0.0, 0.0, 0.0]
                for k, n in bench.layer_shapes(shape_set):
                    x = torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen)
                    t16 = timing.time_fp16_product(x, n, l2, gen, args.reps, args.trials)
                    packs = timing.cold_copies(timing.random_packed(n, k, fmt, dev, gen), l2)
                    s = torch.rand(1, device=dev, generator=gen) * 0.05 + 0.01
                    t_tl, t_sh = (timing.time_graph(lambda i, f=f, x=x, p=packs, k=k, s=s, fm=fmt:
                                                    f(x, p[i], fm, k, s, 0), len(packs), args.reps, args.trials)
                                  for f in (bench.portable_matmul, ternary_matmul))
                    best = (float("inf"), None)
                    for w in (int(v) for v in args.warps.split(",")):
                        for split in (int(v) for v in args.splits.split(",")):
                            label = f"stream {fmt} {n}x{k} m={m} W {w} split {split}"
                            t = timing.time_checked(lambda xx, pk, out=None, s=s, w=w, sp=split, fm=fmt, k=k:
                                                    gluon_launch.launch_stream(xx, pk, fm, k, s, 0, w, sp, out=out),
                                                    x, packs, fmt, s, gen, log, label, args.reps, args.trials)
                            if t is not None:
                                log(f"  {label}: {t * 1e6:.1f} us")
                                best = min(best, (t, (w, split)), key=lambda v: v[0])
                    log(f"{shape_set} {fmt} {n}x{k} m={m}: fp16 {t16 * 1e6:.1f} | portable {t_tl * 1e6:.1f} | "
                        f"shipped {t_sh * 1e6:.1f} | stream {best[0] * 1e6:.1f} (W, split {best[1]})")
                    tot = [tot[0] + t16, tot[1] + t_tl, tot[2] + t_sh, tot[3] + best[0]]
                summary.append(f"| {fmt} " + timing.layer_table_row(shape_set, m, tot[0], tot[1:]))
                log(summary[-1])
    log("| format | shapes | m | fp16 us | portable us (x) | shipped us (x) | stream us (x) |")
    log("\n".join(summary))


if __name__ == "__main__":
    main()
