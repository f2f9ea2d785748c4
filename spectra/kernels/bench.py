"""GPU benchmarks of the packed ternary kernels against cuBLAS fp16 (``spectra bench gemm``).

Method (the anchors' method): per layer shape (k in, n out) and batch m, time ``reps`` back-to-back
products with CUDA events and take the median of ``trials``; the weights are rotated over enough copies
that the working set is several times the L2 ("cold", as in a real forward pass), and a layer's time is
the sum over its four linear shapes. Both sides are captured in a CUDA graph, so the timings are of the
kernels, not of Python launch overhead (small kernels would otherwise be launch-bound for either side).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats import get_format

# (k = in_features, n = out_features) of the four linear shapes of one layer: q/k/v fused, o, gate/up fused, down
SHAPE_SETS: dict[str, list[tuple[int, int]]] = {
    "70b": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)],
    "3.9b": [(3072, 9216), (3072, 3072), (3072, 18432), (9216, 3072)],
}
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, trials: int = 5) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def time_graph(step: Callable[[int], None], copies: int, reps: int = 200, trials: int = 5) -> float:
    """Median seconds per call of step(i) (i cycles over `copies`), timed as a CUDA-graph replay."""
    for i in range(min(copies, 3)):  # compile, tune caches, allocate workspaces outside the capture
        step(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            step(r % copies)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


def copies_for(nbytes: int, l2_bytes: int, factor: int = 4) -> int:
    """How many copies of an nbytes working set make `factor` times the L2 (at least 2)."""
    return max(2, -(-factor * l2_bytes // max(nbytes, 1)))


def l2_size(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))


def random_packed(n: int, k: int, fmt: str, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    trits = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=generator)
    return get_format(fmt).pack(trits)


@dataclass
class GemmRow:
    shapes: str
    m: int
    fp16_us: float
    ours_us: dict[str, float]          # format -> summed microseconds
    ours_bytes: dict[str, int]         # format -> bytes moved (weights + scales + x + y), summed
    fp16_bytes: int

    def speedup(self, fmt: str) -> float:
        return self.fp16_us / self.ours_us[fmt]


def packed_bytes(n: int, k: int, m: int, fmt: str, act_bytes: int = 2) -> int:
    return n * get_format(fmt).row_bytes(k) + 4 + m * k * act_bytes + m * n * act_bytes


def bench_gemm(shape_set: str = "70b", ms: tuple[int, ...] = DEFAULT_MS, fmts: tuple[str, ...] = ("tq2", "tq1"),
               dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
               reps: int = 200, trials: int = 5, matmul: Callable | None = None,
               log: Callable[[str], None] | None = None) -> list[GemmRow]:
    """Summed layer time per m for cuBLAS fp16 and for `matmul` (default: spectra.kernels.ternary_matmul)."""
    from . import ternary_matmul

    matmul = matmul or ternary_matmul
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    l2 = l2_size(device)
    shapes = SHAPE_SETS[shape_set]
    rows = []
    for m in ms:
        fp16_total, ours_total = 0.0, {f: 0.0 for f in fmts}
        bytes_total = {f: 0 for f in fmts}
        fp16_bytes = 0
        for k, n in shapes:
            x = torch.randn(m, k, dtype=dtype, device=device, generator=gen)
            dense_bytes = n * k * 2
            nd = copies_for(dense_bytes, l2)
            ws = [torch.randn(n, k, dtype=dtype, device=device, generator=gen) * 0.02 for _ in range(nd)]
            out = torch.empty(m, n, dtype=dtype, device=device)
            fp16_total += time_graph(lambda i, x=x, ws=ws, out=out: torch.matmul(x, ws[i].t(), out=out), nd, reps,
                                     trials)
            fp16_bytes += dense_bytes + 2 * (m * k + m * n)
            ws = None  # free before the packed copies
            for fmt in fmts:
                nbytes = n * get_format(fmt).row_bytes(k)
                npk = copies_for(nbytes, l2)
                base = random_packed(n, k, fmt, device, gen)
                packs = [base] + [base.roll(c, 0) for c in range(1, npk)]
                scales = torch.rand(1, device=device, generator=gen) * 0.05 + 0.01
                ours_total[fmt] += time_graph(
                    lambda i, x=x, p=packs, f=fmt, k=k, s=scales: matmul(x, p[i], f, k, s, 0), npk, reps, trials)
                bytes_total[fmt] += packed_bytes(n, k, m, fmt)
        row = GemmRow(shape_set, m, fp16_total * 1e6, {f: t * 1e6 for f, t in ours_total.items()}, bytes_total,
                      fp16_bytes)
        rows.append(row)
        if log:
            log(format_gemm_row(row, fmts))
    return rows


def format_gemm_header(fmts: tuple[str, ...]) -> str:
    cols = " | ".join(f"{f} us | {f} x | {f} GB/s" for f in fmts)
    return f"| shapes | m | fp16 us | fp16 GB/s | {cols} |\n|---|---|---|---|" + "---|" * (3 * len(fmts))


def format_gemm_row(row: GemmRow, fmts: tuple[str, ...]) -> str:
    cols = " | ".join(f"{row.ours_us[f]:.1f} | {row.speedup(f):.2f}x | {row.ours_bytes[f] / row.ours_us[f] / 1e3:.0f}"
                      for f in fmts)
    return (f"| {row.shapes} | {row.m} | {row.fp16_us:.1f} | {row.fp16_bytes / row.fp16_us / 1e3:.0f} | "
            f"{cols} |")
