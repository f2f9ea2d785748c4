"""One device call: check every kernel path on fresh random inputs, tune configs, print the gemm table.

    python benchmarks/kernel_sweep.py --out DIR [--ms 1,16,64,256] [--sets 70b,3.9b] [--budget 480]

Writes DIR/tuned_configs.json (the autotune table for this GPU) and DIR/sweep.log. Correctness failures
are printed as FAIL lines and make the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from spectra import bench
from spectra.formats import get_format
from spectra.kernels import configs, dispatch, ternary_matmul, timing, tuning
from spectra.kernels.configs import KernelConfig
from spectra.ternary import expand_scales


def fp32_reference(x: torch.Tensor, packed: torch.Tensor, fmt: str, k: int, scales: torch.Tensor, axis: int):
    trits = get_format(fmt).unpack(packed, k).float()
    w = trits * expand_scales(scales.float(), tuple(trits.shape), axis)
    return x.float() @ w.t()


def check_all(log, quick: bool = False) -> int:
    gen = torch.Generator(device="cuda").manual_seed(123)
    fails = 0
    shapes = [(37, 77), (130, 999), (1000, 3001), (3072, 3072), (515, 8192)]
    if quick:
        shapes = [(130, 999), (1000, 3001)]
    # Every compiled variant costs seconds of device time: all configs with one scale, the split-k one
    # (the most intricate) with every scale mode.
    configs = [KernelConfig("tc", 16, 64, 64, 3, 4, 4), KernelConfig("tc", 64, 64, 64, 1, 4, 3),
               KernelConfig("tc", 128, 64, 32, 2, 4, 3), KernelConfig("dequant")]
    if quick:
        configs = configs[2:]
    scale_cases = [(1, 0), (3, 0), (2, 1), (3, 1)]
    count = 0
    for fmt in ("tq2", "tq1"):
        for n, k in shapes:
            trits = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen)
            packed = get_format(fmt).pack(trits)
            for dtype in (torch.float16, torch.bfloat16):
                for m in ((3, 100) if quick else (1, 3, 16, 33, 100)):
                    x = torch.randn(m, k, dtype=dtype, device="cuda", generator=gen)
                    for p, axis in scale_cases:
                        scales = torch.rand(p, device="cuda", generator=gen) + 0.5
                        ref = fp32_reference(x, packed, fmt, k, scales, axis)
                        for cfg in (configs if p == 1 else configs[:1]):
                            for use_asm in ((True, False) if cfg.kind == "tc" and m == 3 else (True,)):
                                y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                                if cfg.kind == "tc":
                                    dispatch.launch_tc(x, packed, fmt, k, scales, axis, cfg, out=y, use_asm=use_asm)
                                else:
                                    y.copy_(dispatch.run_config(x, packed, fmt, k, scales, axis, cfg))
                                err = float((y.float() - ref).norm() / ref.norm())
                                tol = 2e-3 if dtype == torch.float16 else 1.6e-2
                                count += 1
                                if not err < tol:
                                    fails += 1
                                    log(f"FAIL {fmt} n={n} k={k} m={m} {dtype} P={p} axis={axis} {cfg} "
                                        f"asm={use_asm} rel={err:.3e}")
            # the public entry point: 3-D, non-contiguous activations, fp32 activations too
            x = torch.randn(4, 2, 2 * k, dtype=torch.float16, device="cuda", generator=gen)[..., ::2]
            scales = torch.rand(2, device="cuda", generator=gen) + 0.5
            for xx in (x, x.float()):
                y = ternary_matmul(xx, packed, fmt, k, scales, 1)
                ref = fp32_reference(xx.reshape(-1, k), packed, fmt, k, scales, 1).reshape(4, 2, n)
                err = float((y.float() - ref).norm() / ref.norm())
                count += 1
                if not err < 2e-3:
                    fails += 1
                    log(f"FAIL entry point {fmt} {n}x{k} {xx.dtype} rel={err:.3e}")
    log(f"correctness: {count - fails}/{count} passed")
    return fails


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--tune-ms", default="1,16,64,256")
    ap.add_argument("--sets", default="70b,3.9b")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; later stages are skipped past it")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--quick-check", action="store_true", help="only the dequant and tall-tile paths")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    log = timing.timestamped_log(out / "sweep.log")

    import triton
    dev = torch.device("cuda")
    log(f"{torch.cuda.get_device_name(dev)} torch {torch.__version__} triton {triton.__version__} "
        f"SMs {configs.num_sms(dev)} L2 {timing.l2_size(dev) >> 20} MiB")
    log(f"copy bandwidth {timing.copy_bandwidth(dev) / 1e9:.0f} GB/s (read + write)")
    fails = 0 if args.skip_check else check_all(log, args.quick_check)

    sets = args.sets.split(",")
    tuned: dict[str, KernelConfig] = {}
    for m in [int(v) for v in args.tune_ms.split(",") if v]:
        for s in sets:
            for k, n in bench.SHAPE_SETS[s]:
                for fmt in ("tq2", "tq1"):
                    if time.time() - t0 > args.budget * 0.6:
                        log("tuning budget spent; stopping")
                        break
                    best, times = tuning.tune(fmt, n, k, m, save=False)
                    key = configs.config_key(fmt, n, k, m, torch.float16, 0, configs.gpu_name(dev))
                    tuned[key] = best
                    ranked = sorted(times.items(), key=lambda kv: kv[1])
                    log(f"tune {fmt} k={k} n={n} m={m}: " + "; ".join(
                        f"{c.kind}/bm{c.block_m}/bn{c.block_n}/bj{c.block_j}/s{c.split}/w{c.num_warps}"
                        f"/st{c.num_stages}={t * 1e6:.1f}" for c, t in ranked[:6]))
    (out / "tuned_configs.json").write_text(json.dumps({k: v.__dict__ for k, v in tuned.items()}, indent=1,
                                                       sort_keys=True))
    configs.save_configs(tuned)
    from spectra.kernels import clear_config_memo
    clear_config_memo()

    ms = tuple(int(v) for v in args.ms.split(","))
    for s in sets:
        if time.time() - t0 > args.budget:
            log("budget spent; skipping the gemm table for " + s)
            continue
        log(bench.format_gemm_header(("tq2", "tq1")))
        bench.bench_gemm(s, ms, log=log)
    log(f"done, {fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
