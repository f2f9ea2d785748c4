"""One device call for the GEMM regime (batch m = 64..256) of the packed ternary kernels.

    python benchmarks/large_m_sweep.py --out DIR [--ms 64,128,256] [--table-ms 1,16,32,64,128,256]

1. compile every kernel variant the run needs in parallel worker processes (Triton's disk cache is shared),
   and in the same workers check the stream-K variants on the GPU against an fp32 reference: fresh random
   inputs, NaN-poisoned outputs, odd shapes, fp16/bf16, per-shard scales on both axes, every case twice;
2. tune every candidate of ``configs.candidate_configs`` (plus the shipped choice) on the 70B and 3.9B
   layer shapes for each m, with cuBLAS fp16 of the same shape timed alongside;
3. the summed-layer GEMM table (``spectra.bench.bench_gemm``) with the new configs, then with the
   shipped configs ("before") for the same m.

Writes DIR/sweep.log, DIR/tune.jsonl (every timing) and DIR/tuned_configs.json (the shipped table merged
with the new winners). A correctness failure is printed as a FAIL line and its config is not tuned.

    python benchmarks/large_m_sweep.py --summarize DIR/tune.jsonl [--exclude fuse]

sums a tune.jsonl per layer (the four shapes) and m: cuBLAS fp16, the shipped config, and the fastest
candidate whose name contains none of the --exclude words (CPU only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path

_PROXY = {}  # per worker: fmt -> (packed, n, k) of a proxy shape with the real shapes' divisibility


def _worker(task):
    """Compile (by running once) one config on proxy shapes, then run its correctness cases."""
    import torch

    from spectra.formats import get_format
    from spectra.kernels import configs, dispatch
    from spectra.ternary import expand_scales

    fmt, cfg_d, warm_ms, checks = task
    cfg = configs.KernelConfig.from_dict(cfg_d)
    out = []
    t0 = time.time()
    gen = torch.Generator(device="cuda").manual_seed(hash((fmt, str(cfg_d))) & 0xFFFF)
    try:
        if fmt not in _PROXY:
            n, k = 512, 8192
            trits = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen)
            _PROXY[fmt] = (get_format(fmt).pack(trits), n, k)
        packed, n, k = _PROXY[fmt]
        s = torch.rand(1, device="cuda", generator=gen) + 0.5
        for m in warm_ms:
            x = torch.randn(m, k, dtype=torch.float16, device="cuda", generator=gen)
            dispatch.run_config(x, packed, fmt, k, s, 0, cfg)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported, the config is then skipped
        return fmt, cfg_d, [f"COMPILE-FAIL {fmt} {cfg} {type(e).__name__}: {str(e)[:300]}"], time.time() - t0, False
    ok = True
    for n, k, m, dt_name, p, axis in checks:
        dtype = getattr(torch, dt_name)
        trits = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen)
        packed = get_format(fmt).pack(trits)
        scales = torch.rand(p, device="cuda", generator=gen) + 0.5
        w = trits.float() * expand_scales(scales.float(), (n, k), axis)
        for rep in range(2):
            x = torch.randn(m, k, dtype=dtype, device="cuda", generator=gen)
            ref = x.float() @ w.t()
            y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            try:
                launch = dispatch.launch_sk if cfg.kind == "sk" else dispatch.launch_tc
                launch(x, packed, fmt, k, scales, axis, cfg, out=y)
                torch.cuda.synchronize()
                err = float((y.float() - ref).norm() / ref.norm())
            except Exception as e:  # noqa: BLE001
                out.append(f"FAIL {fmt} {cfg} n={n} k={k} m={m} {dt_name} P={p} axis={axis}: "
                           f"{type(e).__name__}: {str(e)[:200]}")
                ok = False
                break
            tol = 2e-3 if dtype == torch.float16 else 1.6e-2
            if not err < tol:
                out.append(f"FAIL {fmt} {cfg} n={n} k={k} m={m} {dt_name} P={p} axis={axis} rep={rep} rel={err:.3e}")
                ok = False
            elif rep == 0:
                out.append(f"ok {fmt} {cfg.kind}/bm{cfg.block_m}/bn{cfg.block_n}/bj{cfg.block_j}/st{cfg.num_stages}"
                           f" n={n} k={k} m={m} {dt_name} P={p} axis={axis} rel={err:.2e}")
    return fmt, cfg_d, out, time.time() - t0, ok


def plan(shipped: dict, sets: list[str], ms: list[int], table_ms: list[int], before_ms: list[int], gpu: str,
         sms: int):
    """The tuning jobs and the (format, config) compile/check tasks of one run (no GPU needed)."""
    import torch

    from spectra import bench
    from spectra.kernels import configs
    from spectra.kernels.configs import KernelConfig

    def shipped_cfg(fmt, n, k, m):
        e = shipped.get(configs.config_key(fmt, n, k, m, torch.float16, 0, gpu))
        return KernelConfig.from_dict(e) if e else configs.heuristic_config(n, k, m, fmt, sms)

    # --- what will run: tuning candidates, and the configs of the table rows ---------------------------
    tune_jobs = []
    groups: dict[tuple[str, KernelConfig], set[int]] = {}
    for m in sorted(ms, reverse=True):  # the largest m first: that is where the kernels lose to fp16
        for s in sets:
            for k, n in bench.SHAPE_SETS[s]:
                for fmt in ("tq2", "tq1"):
                    cands = configs.candidate_configs(n, k, m, fmt, sms)
                    old = shipped_cfg(fmt, n, k, m)
                    if old not in cands:
                        cands.append(old)
                    tune_jobs.append((s, fmt, n, k, m, cands, old))
                    for c in cands:
                        groups.setdefault((fmt, c), set()).add(64)
    for m in set(table_ms) | set(before_ms):
        for s in sets:
            for k, n in bench.SHAPE_SETS[s]:
                for fmt in ("tq2", "tq1"):
                    groups.setdefault((fmt, shipped_cfg(fmt, n, k, m)), set()).add(1 if m == 1 else 64)
    # correctness cases for the new variants (real-shape divisibility, odd shapes, dtypes, scale axes)
    checks = {}
    seen_extra = set()
    for (fmt, c) in groups:
        if c.kind != "sk":
            continue
        cases = [(1000, 3001, 100, "float16", 1, 0), (515, 8192, 256, "float16", 1, 0),
                 (3072, 3072, 256, "float16", 1, 0)]
        key = (fmt, c.kind, c.block_m)
        if key not in seen_extra:  # every scale mode and bf16 once per kind and tile height
            seen_extra.add(key)
            cases += [(1000, 3001, 100, "float16", 3, 0), (1000, 3001, 33, "float16", 2, 1),
                      (1000, 3001, 100, "bfloat16", 1, 0)]
        checks[(fmt, c)] = cases
    tasks = [(fmt, asdict(c), sorted(warm), checks.get((fmt, c), [])) for (fmt, c), warm in groups.items()]
    tasks.sort(key=lambda t: -len(t[3]))
    return tune_jobs, tasks


def cfg_name(c) -> str:
    if c.kind == "dequant":
        return "dequant"
    return (f"{c.kind}/bm{c.block_m}/bn{c.block_n}/bj{c.block_j}/s{c.split}/w{c.num_warps}/st{c.num_stages}"
            + (f"/p{c.programs}" if c.programs else ""))


def summarize(path: str, exclude: tuple[str, ...] = ()) -> str:
    """Per-layer sums of a tune.jsonl: fp16, the shipped config and the fastest allowed candidate."""
    sums: dict[tuple[str, int, str], list[float]] = {}
    for line in open(path):
        d = json.loads(line)
        ok = {c: t for c, t in d["times_us"].items() if not any(w in c for w in exclude)}
        row = sums.setdefault((d["set"], d["m"], d["fmt"]), [0.0, 0.0, 0.0])
        row[0] += d["fp16_us"]
        row[1] += d["times_us"].get(d["old"], float("nan"))
        row[2] += min(ok.values())
    lines = ["| shapes | m | format | fp16 us | shipped us | shipped x | best us | best x |",
             "|---|---|---|---|---|---|---|---|"]
    order = sorted(sums.items(), key=lambda kv: (kv[0][0] != "70b", kv[0][1], kv[0][2]))
    for (s, m, fmt), (f16, old, best) in order:
        lines.append(f"| {s} | {m} | {fmt.upper()} | {f16:.1f} | {old:.1f} | {f16 / old:.2f}x | {best:.1f} | "
                     f"{f16 / best:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", default="64,128,256")
    ap.add_argument("--table-ms", default="256,128,64,1,16,32")
    ap.add_argument("--before-ms", default="256,128,64")
    ap.add_argument("--sets", default="70b,3.9b")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--summarize", help="a tune.jsonl to sum per layer (no GPU needed)")
    ap.add_argument("--exclude", default="", help="comma-separated words: candidates named with any are skipped")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds; later stages are skipped past it")
    ap.add_argument("--tune-share", type=float, default=0.7, help="fraction of the budget tuning may take")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize, tuple(w for w in args.exclude.split(",") if w)))
        return 0
    import torch
    import triton

    from spectra import bench
    from spectra.formats import get_format
    from spectra.kernels import clear_config_memo, configs, dispatch, timing
    from spectra.kernels.configs import KernelConfig

    out = Path(args.out)
    t0 = time.time()
    log = timing.timestamped_log(out / "sweep.log")
    tunef = open(out / "tune.jsonl", "w")

    dev = torch.device("cuda")
    gpu = configs.gpu_name(dev)
    sms = configs.num_sms(dev)
    log(f"{gpu} torch {torch.__version__} triton {triton.__version__} SMs {sms} L2 {timing.l2_size(dev) >> 20} MiB")
    log(f"copy bandwidth {timing.copy_bandwidth(dev) / 1e9:.0f} GB/s (read + write)")
    shipped = json.loads(configs._SHIPPED.read_text())
    if not any(key.startswith(gpu + "|") for key in shipped):
        # No table for this GPU: compare against the H100-tuned choices (a user here would get the heuristic).
        src = "NVIDIA H100 80GB HBM3|"
        shipped.update({gpu + "|" + key[len(src):]: v for key, v in list(shipped.items()) if key.startswith(src)})
        log(f"no shipped table for {gpu}: using the H100 entries as the shipped choice")
    sets = args.sets.split(",")
    ms = [int(v) for v in args.ms.split(",") if v]
    table_ms = [int(v) for v in args.table_ms.split(",") if v]
    before_ms = [int(v) for v in args.before_ms.split(",") if v]

    tune_jobs, tasks = plan(shipped, sets, ms, table_ms, before_ms, gpu, sms)
    log(f"{len(tasks)} (format, config) variants to compile, {sum(len(t[3]) for t in tasks)} correctness cases, "
        f"{len(tune_jobs)} tuning jobs")

    # --- 1. parallel compile + correctness ----------------------------------------------------------------
    bad = set()
    fails = 0
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(args.workers, len(tasks))) as pool:
        for fmt, cfg_d, lines, secs, ok in pool.imap_unordered(_worker, tasks):
            c = KernelConfig.from_dict(cfg_d)
            for line in lines:
                if not line.startswith("ok"):
                    log(line)
            if not ok:
                bad.add((fmt, c))
                fails += 1
            oks = sum(1 for line in lines if line.startswith("ok"))
            worst = max([float(line.rsplit("rel=", 1)[1]) for line in lines if line.startswith("ok")] or [0])
            log(f"compiled {fmt} {cfg_name(c)} in {secs:.1f}s, {oks} checks ok (worst rel {worst:.1e})"
                + ("" if ok else " -- EXCLUDED"))
    log(f"compile + correctness done: {fails} variants failed")

    # --- 2. tuning ------------------------------------------------------------------------------------
    gen = torch.Generator(device=dev).manual_seed(1)
    l2 = timing.l2_size(dev)
    tuned: dict[str, KernelConfig] = {}
    fp16_us: dict[tuple[int, int, int], float] = {}
    for s, fmt, n, k, m, cands, old in tune_jobs:
        if time.time() - t0 > args.budget * args.tune_share:
            log("tuning budget spent; stopping")
            break
        x = torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen)
        if (n, k, m) not in fp16_us:
            nd = timing.copies_for(n * k * 2, l2)
            ws = [torch.randn(n, k, dtype=torch.float16, device=dev, generator=gen) for _ in range(nd)]
            yo = torch.empty(m, n, dtype=torch.float16, device=dev)
            fp16_us[(n, k, m)] = 1e6 * timing.time_graph(
                lambda i, x=x, ws=ws, yo=yo: torch.matmul(x, ws[i].t(), out=yo), nd, 50, 3)
            del ws
        packs = timing.cold_copies(timing.random_packed(n, k, fmt, dev, gen), l2)
        base, copies = packs[0], len(packs)
        scales = torch.rand(1, device=dev, generator=gen) + 0.5
        ref = torch.matmul(x.float(), (get_format(fmt).unpack(base, k).float() * scales).t())
        times = {}
        for c in cands:
            if (fmt, c) in bad:
                continue
            try:
                y = dispatch.run_config(x, base, fmt, k, scales, 0, c)
                err = float((y.float() - ref).norm() / ref.norm())
                if not err < 2e-3:
                    log(f"FAIL tune {fmt} {n}x{k} m={m} {cfg_name(c)} rel={err:.3e}")
                    fails += 1
                    continue
                times[c] = timing.time_graph(
                    lambda i, c=c, x=x, p=packs, f=fmt, k=k, s=scales: dispatch.run_config(x, p[i], f, k, s, 0, c),
                    copies, 50, 3)
            except Exception as e:  # noqa: BLE001
                torch.cuda.synchronize()
                log(f"skip {fmt} {n}x{k} m={m} {cfg_name(c)}: {type(e).__name__}: {str(e)[:160]}")
        del packs, base, ref
        if not times:
            log(f"FAIL no config ran for {fmt} {n}x{k} m={m}")
            fails += 1
            continue
        best = min(times, key=times.get)
        key = configs.config_key(fmt, n, k, m, torch.float16, 0, gpu)
        tuned[key] = best
        ranked = sorted(times.items(), key=lambda kv: kv[1])
        f16 = fp16_us[(n, k, m)]
        old_us = times.get(old, float("nan")) * 1e6
        log(f"tune {fmt} k={k} n={n} m={m}: fp16 {f16:.1f} | old {cfg_name(old)} {old_us:.1f} | best "
            f"{cfg_name(best)} {times[best] * 1e6:.1f} ({f16 / (times[best] * 1e6):.2f}x fp16) | "
            + "; ".join(f"{cfg_name(c)}={t * 1e6:.1f}" for c, t in ranked[1:6]))
        tunef.write(json.dumps({"set": s, "fmt": fmt, "n": n, "k": k, "m": m, "fp16_us": f16,
                                "old": cfg_name(old), "best": cfg_name(best),
                                "times_us": {cfg_name(c): t * 1e6 for c, t in ranked}}) + "\n")
        tunef.flush()
    merged = dict(shipped)
    merged.update({k: asdict(v) for k, v in tuned.items()})
    (out / "tuned_configs.json").write_text(json.dumps(merged, indent=1, sort_keys=True))
    log(f"wrote {len(tuned)} tuned entries")

    # --- 3. GEMM tables: new configs, then the shipped ones ("before") ---------------------------------
    def table(label, tbl, row_ms):
        configs._table = dict(tbl)
        clear_config_memo()
        for s in sets:
            if time.time() - t0 > args.budget:
                log(f"budget spent; skipping the {label} table for {s}")
                continue
            log(f"{label} table, {s}")
            log(bench.format_gemm_header(("tq2", "tq1")))
            bench.bench_gemm(s, tuple(row_ms), log=log)

    table("after", merged, table_ms)
    table("before", shipped, before_ms)
    log(f"done, {fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
