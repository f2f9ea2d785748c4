"""Gluon kernel vs the shipped triton.language kernel, per layer shape, in one process (H100/H200).

    python3 benchmarks/gluon_probe.py --out OUT [--ms 1,16] [--formats tq2,tq1] [--splits 1,2,4,8]

For each shape set (70b, 3.9b), m and format: cuBLAS fp16, the shipped kernel through ``ternary_matmul``
(tuned table, cached plan), and the Gluon kernel at each split-k factor (the best one per shape is summed
into the layer total); every Gluon variant is first checked against an fp32-accumulated reference on fresh
inputs. Then the host cost of an eager call: the same calls launched eagerly vs in a CUDA graph, for the
cached-plan entry point and for the old per-call path (validation, memoised config lookup, JIT launch).
Method as ``spectra bench gemm`` (cold weights, CUDA graphs, median of trials).
"""

from __future__ import annotations

import argparse

import torch

from spectra import bench
from spectra.formats import get_format
from spectra.kernels import configs, dispatch, gluon_launch, launch_support, ternary_matmul, timing, tuning


def old_path(x, packed, fmt, k, scales, axis, memo={}):  # noqa: B006 - the old per-call memo, reproduced
    """What ternary_matmul did per call before launch plans (for the eager comparison)."""
    dispatch.check_inputs(x, packed, fmt, k, scales, axis)
    x2 = x.reshape(-1, k)
    mode = launch_support.scale_mode(scales, axis)
    key = (fmt, packed.shape[0], k, configs.m_bucket(x2.shape[0]), x.dtype, mode, x.device)
    cfg = memo.get(key)
    if cfg is None:
        cfg = memo[key] = configs.lookup_config(fmt, packed.shape[0], k, x2.shape[0], x.dtype, mode, x.device)
    return dispatch.run_config(x2, packed, fmt, k, scales.contiguous(), axis, cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gluon_probe_out")
    p.add_argument("--ms", default="1,16")
    p.add_argument("--formats", default="tq2,tq1")
    p.add_argument("--shapes", default="70b,3.9b")
    p.add_argument("--splits", default="1,2,3,4,6,8,12")
    p.add_argument("--bj", default="64,128", help="bytes per row per K step of the Gluon kernel (64, 128)")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="also the eager-vs-graph host cost table (3.9b, m = 1)")
    args = p.parse_args()
    log = timing.timestamped_log(f"{args.out}/gluon_probe.log")
    dev = torch.device("cuda")
    log(f"{torch.cuda.get_device_name(dev)}; copy bandwidth {timing.copy_bandwidth(dev) / 1e9:.0f} GB/s; "
        f"gluon available: {gluon_launch.usable(dev, 1, torch.float16)}")
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = timing.l2_size(dev)
    if args.eager:  # first: cheap, and the host-overhead answer even if a time limit stops the sweep
        eager_table(log, dev, gen, l2, args.reps, args.trials)
    ms = [int(v) for v in args.ms.split(",")]
    fmts = args.formats.split(",")
    splits = [int(v) for v in args.splits.split(",")]
    bjs = [int(v) for v in args.bj.split(",")]
    summary = []
    for shape_set in args.shapes.split(","):
        for m in ms:
            tot = {"fp16": 0.0, **{f"{f} tl": 0.0 for f in fmts}, **{f"{f} gluon": 0.0 for f in fmts}}
            for k, n in bench.layer_shapes(shape_set):
                x = torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen)
                t16 = timing.time_fp16_product(x, n, l2, gen, args.reps, args.trials)
                tot["fp16"] += t16
                pinned = None  # the first format's best BJ on this shape: later formats try only that
                for fmt in fmts:
                    packs = timing.cold_copies(timing.random_packed(n, k, fmt, dev, gen), l2)
                    s = torch.rand(1, device=dev, generator=gen) * 0.05 + 0.01
                    cfg = configs.lookup_config(fmt, n, k, m, torch.float16, 0, dev, gluon=False)
                    t_tl = timing.time_graph(
                        lambda i, x=x, p=packs, f=fmt, k=k, s=s: bench.portable_matmul(x, p[i], f, k, s, 0),
                        len(packs), args.reps, args.trials)
                    best = (float("inf"), None)
                    bm = 8 if m <= 8 else 16
                    variants = [(bj, sp) for bj in bjs for sp in splits]
                    if pinned is not None:
                        variants = [(pinned, sp) for sp in splits]
                    for bj, split in variants:
                        t = timing.time_checked(
                            lambda xx, p, out=None, f=fmt, k=k, s=s, sp=split, bm=bm, bj=bj:
                            gluon_launch.launch(xx, p, f, k, s, 0, bm, sp, out=out, block_j=bj),
                            x, packs, fmt, s, gen, log, f"gluon {fmt} {n}x{k} m={m} BJ {bj} split {split}",
                            args.reps, args.trials)
                        if t is None:
                            continue
                        steps, eff = gluon_launch.steps_and_split(packs[0].shape[1], split, bm,
                                                                  get_format(fmt).trits_per_byte, bj)
                        log(f"  gluon {fmt} {n}x{k} m={m} BJ {bj} split {split} (eff {eff}, "
                            f"{steps} steps): {t * 1e6:.1f} us")
                        if t < best[0]:
                            best = (t, (bj, split))
                    log(f"{shape_set} {fmt} {n}x{k} m={m}: fp16 {t16 * 1e6:.1f} | tl {t_tl * 1e6:.1f} "
                        f"({tuning.describe(cfg)}) | gluon {best[0] * 1e6:.1f} (BJ, split {best[1]})")
                    if best[1] is not None and pinned is None:
                        pinned = best[1][0]
                    tot[f"{fmt} tl"] += t_tl
                    tot[f"{fmt} gluon"] += best[0]
            summary.append(timing.layer_table_row(shape_set, m, tot["fp16"],
                                                  [tot[f"{f} {kind}"] for f in fmts for kind in ("tl", "gluon")]))
            log(summary[-1])
    log("| shapes | m | fp16 us | " + " | ".join(f"{f} tl us (x) | {f} gluon us (x)" for f in fmts) + " |")
    log("\n".join(summary))


def eager_table(log, dev, gen, l2, reps, trials) -> None:
    """Host time per eager call: (eager - graph) per product, 3.9B layer at m = 1, TQ2."""
    rows = {"fp16": [0.0, 0.0], "plan": [0.0, 0.0], "old": [0.0, 0.0]}
    for k, n in bench.layer_shapes("3.9b"):
        x = torch.randn(1, k, dtype=torch.float16, device=dev, generator=gen)
        nd = timing.copies_for(n * k * 2, l2)
        ws = [torch.randn(n, k, dtype=torch.float16, device=dev, generator=gen) for _ in range(nd)]
        f16 = lambda i, x=x, ws=ws: torch.matmul(x, ws[i].t())  # noqa: E731
        rows["fp16"][0] += timing.time_graph(f16, nd, reps, trials)
        rows["fp16"][1] += timing.time_eager(f16, nd, reps, trials)
        del ws
        packs = timing.cold_copies(timing.random_packed(n, k, "tq2", dev, gen), l2)
        s = torch.rand(1, device=dev, generator=gen) + 0.5
        for name, fn in (("plan", ternary_matmul), ("old", old_path)):
            step = lambda i, x=x, p=packs, k=k, s=s, fn=fn: fn(x, p[i], "tq2", k, s, 0)  # noqa: E731
            rows[name][0] += timing.time_graph(step, len(packs), reps, trials)
            rows[name][1] += timing.time_eager(step, len(packs), reps, trials)
    log("| 3.9b TQ2 m = 1, summed over 4 products | graph us | eager us | host us per call (eager - graph) / 4 |")
    for name, (g, e) in rows.items():
        log(f"| {name} | {g * 1e6:.1f} | {e * 1e6:.1f} | {(e - g) * 1e6 / 4:.1f} |")


if __name__ == "__main__":
    main()
