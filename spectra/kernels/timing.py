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
