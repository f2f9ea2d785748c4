"""CUDA-core GEMV kernel (``tq_gemv_kernel``) vs the shipped kernel and cuBLAS fp16, per layer shape, one process.

    python3 benchmarks/gemv_probe.py --out OUT [--shapes 3.9b,70b] [--ms 1,2,4] [--formats tq2,tq1]

For each shape set, m and format: cuBLAS fp16, the shipped path (tuned table through the portable kernel),
and GEMV configs (configs.gemv_candidates: rows per program, bytes per row and step, stages, split-k), the
fastest also with programmatic dependent launch off (SPECTRA_PDL=0); every variant is first checked
against an fp32-accumulated reference on fresh inputs, and the fastest correct one per shape is summed into
the layer total. m > 1 tries only the splits of the m = 1 winner's tile. Method as ``spectra bench gemm``
(cold weights, CUDA graphs, median of trials).
"""

from __future__ import annotations

import argparse
import os

import torch

from spectra import bench
from spectra.kernels import configs, dispatch, timing, tuning


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gemv_probe_out")
    p.add_argument("--ms", default="1,2,4")
    p.add_argument("--formats", default="tq2,tq1")
    p.add_argument("--shapes", default="3.9b,70b")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--save", action="store_true",
                   help="write each shape's faster kernel (GEMV or shipped) into the user kernel cache")
    args = p.parse_args()
    log = timing.timestamped_log(f"{args.out}/gemv_probe.log")
    dev = torch.device("cuda")
    sms = configs.num_sms(dev)
    log(f"{torch.cuda.get_device_name(dev)}; copy bandwidth {timing.copy_bandwidth(dev) / 1e9:.0f} GB/s")
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = timing.l2_size(dev)
    fmts = args.formats.split(",")
    summary = []
    winners: dict[tuple, configs.KernelConfig] = {}
    for shape_set in args.shapes.split(","):
        for m in (int(v) for v in args.ms.split(",")):
            tot = {"fp16": 0.0, **{f"{f} tl": 0.0 for f in fmts}, **{f"{f} gemv": 0.0 for f in fmts}}
            for k, n in bench.layer_shapes(shape_set):
                x = torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen)
                t16 = timing.time_fp16_product(x, n, l2, gen, args.reps, args.trials)
                tot["fp16"] += t16
                for fmt in fmts:
                    packs = timing.cold_copies(timing.random_packed(n, k, fmt, dev, gen), l2)
                    s = torch.rand(1, device=dev, generator=gen) * 0.05 + 0.01
                    shipped = configs.lookup_config(fmt, n, k, m, torch.float16, 0, dev, gluon=False)
                    t_tl = timing.time_graph(
                        lambda i, x=x, p=packs, f=fmt, k=k, s=s: bench.portable_matmul(x, p[i], f, k, s, 0),
                        len(packs), args.reps, args.trials)
                    prior = winners.get((shape_set, fmt, n, k))
                    tiles = [(prior.block_n, prior.block_j, prior.num_stages)] if prior is not None else None
                    best = (float("inf"), None)
                    for cfg in configs.gemv_candidates(n, k, m, fmt, sms, tiles or configs.GEMV_TILES):
                        t = timing.time_checked(
                            lambda xx, p, out=None, f=fmt, k=k, s=s, c=cfg: dispatch.launch_gemv(xx, p, f, k, s, 0, c,
                                                                                                out=out),
                            x, packs, fmt, s, gen, log, f"{fmt} {n}x{k} m={m} {tuning.describe(cfg)}", args.reps,
                            args.trials)
                        if t is None:
                            continue
                        if t < best[0]:
                            best = (t, cfg)
                    log(f"{shape_set} {fmt} {n}x{k} m={m}: fp16 {t16 * 1e6:.1f} | tl {t_tl * 1e6:.1f} "
                        f"({tuning.describe(shipped)}) | gemv {best[0] * 1e6:.1f} "
                        f"({tuning.describe(best[1]) if best[1] else '-'})")
                    if best[1] is not None:
                        # the winner with programmatic dependent launch off, same run (back-to-back launches)
                        os.environ["SPECTRA_PDL"] = "0"
                        t_off = timing.time_graph(lambda i, x=x, p=packs, f=fmt, k=k, s=s, c=best[1]:
                                                  dispatch.launch_gemv(x, p[i], f, k, s, 0, c),
                                                  len(packs), args.reps, args.trials)
                        del os.environ["SPECTRA_PDL"]
                        log(f"  {fmt} {n}x{k} m={m}: winner without PDL {t_off * 1e6:.1f} us")
                    if args.save and best[1] is not None:
                        key = configs.config_key(fmt, n, k, m, torch.float16, 0, configs.gpu_name(dev))
                        configs.save_configs({key: best[1] if best[0] < t_tl else shipped})
                    if best[1] is not None and prior is None:
                        winners[(shape_set, fmt, n, k)] = best[1]
                    tot[f"{fmt} tl"] += t_tl
                    tot[f"{fmt} gemv"] += best[0]
            summary.append(timing.layer_table_row(shape_set, m, tot["fp16"],
                                                  [tot[f"{f} {kind}"] for f in fmts for kind in ("tl", "gemv")]))
            log(summary[-1])
    log("| shapes | m | fp16 us | " + " | ".join(f"{f} shipped us (x) | {f} gemv us (x)" for f in fmts) + " |")
    log("\n".join(summary))


if __name__ == "__main__":
    main()
