"""Timing on the GPU for kernel benchmarks and the tuner: CUDA-graph and eager medians, cold weight copies
(a working set several times the L2, as in a real forward pass), random packed weights, a run log.

Knows nothing of the model: the benchmark tables that build models live in :mod:`spectra.bench`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..formats import get_format


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


def time_eager(step: Callable[[int], None], copies: int, reps: int = 200, trials: int = 5) -> float:
    """Median seconds per call of step(i) launched eagerly from Python (no CUDA graph): host time that the
    GPU cannot hide shows up here, and (this - :func:`time_graph`) is the host overhead per call."""
    for i in range(min(copies, 3)):
        step(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for r in range(reps):
            step(r % copies)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def copies_for(nbytes: int, l2_bytes: int, factor: int = 4) -> int:
    """How many copies of an nbytes working set make `factor` times the L2 (at least 2)."""
    return max(2, -(-factor * l2_bytes // max(nbytes, 1)))


def cold_copies(base: torch.Tensor, l2_bytes: int) -> list[torch.Tensor]:
    """`base` and row-rotated copies of it, enough (:func:`copies_for`) that cycling through them keeps the
    working set several times the L2, so every timed call reads its weights from HBM."""
    return [base] + [base.roll(c, 0) for c in range(1, copies_for(base.numel(), l2_bytes))]


def l2_size(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))


def time_fp16_product(x: torch.Tensor, n: int, l2_bytes: int, generator: torch.Generator, reps: int = 200,
                      trials: int = 5) -> float:
    """Median seconds of cuBLAS x @ W^T for cold random fp16 weights W [n, k] (the baseline of the kernel tables)."""
    m, k = x.shape
    copies = copies_for(n * k * 2, l2_bytes)
    ws = [torch.randn(n, k, dtype=x.dtype, device=x.device, generator=generator) * 0.02 for _ in range(copies)]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    return time_graph(lambda i: torch.matmul(x, ws[i].t(), out=out), copies, reps, trials)


def layer_table_row(shape_set: str, m: int, fp16_seconds: float, seconds: list[float]) -> str:
    """One markdown row of a per-layer table: shape set, m, the fp16 time, then each time with its speedup."""
    return (f"| {shape_set} | {m} | {fp16_seconds * 1e6:.1f} | "
            + " | ".join(f"{t * 1e6:.1f} ({fp16_seconds / t:.2f}x)" for t in seconds) + " |")


def reference_error(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                    y: torch.Tensor) -> float:
    """Relative error of y against the fp32-accumulated product of x and the packed weights (one scale)."""
    w = get_format(fmt).unpack(packed, in_features).float() * scales.float()
    ref = x.float() @ w.t()
    return float((y.float() - ref).norm() / ref.norm())


def time_checked(launch: Callable[..., torch.Tensor], x: torch.Tensor, packs: list[torch.Tensor], fmt: str,
                 scales: torch.Tensor, generator: torch.Generator, log: Callable[[str], None], label: str,
                 reps: int = 200, trials: int = 5) -> float | None:
    """Seconds per call of launch(x, packed) on cold copies `packs`, after checking launch(fresh x, packs[0],
    out=poisoned) against the fp32 reference (relative error < 2e-3); None, with one log line, if it fails to
    run or is wrong (a probe goes on with the next variant)."""
    m, k = x.shape
    fresh = torch.randn(m, k, dtype=x.dtype, device=x.device, generator=generator)
    try:
        y = torch.full((m, packs[0].shape[0]), float("nan"), dtype=x.dtype, device=x.device)
        launch(fresh, packs[0], out=y)
        err = reference_error(fresh, packs[0], fmt, k, scales, y)
    except Exception as exc:  # noqa: BLE001 - report and go on
        log(f"  {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        return None
    if not err < 2e-3:
        log(f"  {label}: WRONG rel err {err:.3e}")
        return None
    return time_graph(lambda i: launch(x, packs[i]), len(packs), reps, trials)


def random_packed(n: int, k: int, fmt: str, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    trits = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=generator)
    return get_format(fmt).pack(trits)


def timestamped_log(path: str | Path) -> Callable[[str], None]:
    """A `log(msg)` for long device runs: prints "[  12.3s] msg" and appends it to `path` at once, so the file
    holds everything up to the moment a run is stopped by its time limit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    start = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - start:6.1f}s] {msg}"
        print(line, flush=True)
        with path.open("a") as f:
            f.write(line + "\n")

    return log
