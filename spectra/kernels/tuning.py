"""Tuning the packed kernels on this GPU: every candidate config of a shape timed on cold random weights, the
fastest correct one kept and merged into the user cache that :func:`spectra.kernels.configs.lookup_config`
reads before the shipped table (``spectra bench tune``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import DeviceError
from ..formats import get_format
from ..progress import progress_bar
from . import clear_config_memo, configs, dispatch, gluon_launch
from .configs import GLUON_KEY_SUFFIX, KernelConfig
from .timing import cold_copies, l2_size, random_packed, time_graph


def tune_shapes(shapes: list[tuple[int, int]], fmts: tuple[str, ...], ms: tuple[int, ...],
                dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                log: Callable[[str], None] = print, quick: bool = False) -> dict[str, KernelConfig]:
    """Tune every (format, shape, m bucket) on this GPU, each bucket once at its largest m, and merge the
    winners into the user cache, which :func:`~spectra.kernels.configs.lookup_config` prefers to the shipped
    table; returns the entries written. ``quick`` times only :func:`quick_candidates` (minutes instead of an
    hour for a model's shapes)."""
    device = torch.device(device)
    buckets = dict.fromkeys(configs.m_bucket(m) for m in ms)  # m = 3 and 4 share one entry: tune it once
    jobs = [(fmt, n, k, m) for fmt in fmts for n, k in shapes for m in buckets]
    entries: dict[str, KernelConfig] = {}
    for fmt, n, k, m in progress_bar(jobs, desc="tuning", unit="shape"):
        candidates = quick_candidates(fmt, n, k, m, dtype, device) if quick else None
        best, times = tune(fmt, n, k, m, dtype, device, candidates=candidates, save=False)
        found = tuned_entries(fmt, n, k, m, dtype, configs.gpu_name(device), times)
        configs.save_configs(found)  # after every shape: an interrupted tune keeps what it measured
        entries.update(found)
        log(f"{fmt} {n}x{k} m={m}: {describe(best)} {times[best] * 1e6:.1f} us "
            f"({len(times)} configs ran)")
    clear_config_memo()
    return entries



def quick_candidates(fmt: str, n: int, k: int, m: int, dtype: torch.dtype,
                     device: torch.device) -> list[KernelConfig] | None:
    """What a quick tune times: the configs tuned for this shape and bucket on any GPU (Gluon ones where the
    Gluon kernel can run here) and the heuristic; None (the full search) where no GPU has an entry."""
    found = [c for c in configs.table_configs(fmt, n, k, m, dtype)
             if c.kind not in gluon_launch.KINDS
             or (gluon_launch.tuning_enabled() and gluon_launch.runs(c.kind, device, m, k, dtype))]
    if not found:
        return None
    return list(dict.fromkeys([*found, configs.heuristic_config(n, k, m, fmt, configs.num_sms(device))]))


def tune(fmt: str, n: int, k: int, m: int, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
         candidates: list[KernelConfig] | None = None, reps: int = 50, trials: int = 3,
         save: bool = True) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """Time every candidate on cold random weights of this shape; cache and return the fastest.

    Candidates that fail to compile or run (e.g. out of shared memory) are skipped, not fatal; so are
    candidates whose result is off by more than the dtype's rounding (2e-3 relative for fp16, 1.6e-2 for
    bf16): a larger error is a bug, and the fastest wrong kernel must never be cached.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise DeviceError("kernel tuning needs a CUDA GPU; none is available")
    gen = torch.Generator(device=device).manual_seed(1)
    if candidates is None:
        candidates = configs.candidate_configs(n, k, m, fmt, configs.num_sms(device))
        if gluon_launch.tuning_enabled() and gluon_launch.usable(device, m, dtype):
            candidates += configs.gluon_candidates(m, k)
    x = torch.randn(m, k, dtype=dtype, device=device, generator=gen)
    packs = cold_copies(random_packed(n, k, fmt, device, gen), l2_size(device))
    base, copies = packs[0], len(packs)
    scales = torch.rand(1, device=device, generator=gen) + 0.5
    ref = torch.matmul(x.float(), (get_format(fmt).unpack(base, k).float() * scales).t())
    times: dict[KernelConfig, float] = {}
    for cfg in candidates:
        try:
            y = dispatch.run_config(x, base, fmt, k, scales, 0, cfg)
            err = float((y.float() - ref).norm() / ref.norm())
            if not err < (2e-3 if dtype == torch.float16 else 1.6e-2):  # also catches NaN
                continue
            times[cfg] = time_graph(lambda i, cfg=cfg: dispatch.run_config(x, packs[i], fmt, k, scales, 0, cfg),
                                    copies, reps, trials)
        except Exception:  # noqa: BLE001 - a config the compiler or the GPU rejects is just not a candidate
            torch.cuda.synchronize()
            continue
    if not times:
        raise DeviceError(f"no kernel config ran for {fmt} {n}x{k} m={m}")
    best = min(times, key=times.get)
    if save:
        configs.save_configs(tuned_entries(fmt, n, k, m, dtype, configs.gpu_name(device), times))
    return best, times



def tuned_entries(fmt: str, n: int, k: int, m: int, dtype: torch.dtype, gpu: str,
                  times: dict[KernelConfig, float]) -> dict[str, KernelConfig]:
    """The table entries of one tuning: the fastest portable config under the shape's key and, where the
    Gluon kernel beat it, the fastest Gluon config under the key + GLUON_KEY_SUFFIX."""
    key = configs.config_key(fmt, n, k, m, dtype, 0, gpu)
    portable = {c: t for c, t in times.items() if c.kind not in gluon_launch.KINDS}
    gluon = {c: t for c, t in times.items() if c.kind in gluon_launch.KINDS}
    out = {}
    if portable:
        out[key] = min(portable, key=portable.get)
    if gluon and (not portable or min(gluon.values()) < min(portable.values())):
        out[key + GLUON_KEY_SUFFIX] = min(gluon, key=gluon.get)
    return out



def describe(cfg: KernelConfig) -> str:
    if cfg.kind == "dequant":
        return "dequantize + cuBLAS"
    if cfg.kind == "gluon":
        return f"gluon BM {cfg.block_m} BJ {cfg.block_j} split {cfg.split}"
    if cfg.kind == "stream":
        return f"gluon stream warps {cfg.num_warps} split {cfg.split}"
    if cfg.kind == "gemv":
        return (f"gemv BN {cfg.block_n} BJ {cfg.block_j} split {cfg.split} warps {cfg.num_warps} "
                f"stages {cfg.num_stages}")
    return (f"{cfg.kind} BM {cfg.block_m} BN {cfg.block_n} BJ {cfg.block_j} split {cfg.split} "
            f"warps {cfg.num_warps} stages {cfg.num_stages}")
