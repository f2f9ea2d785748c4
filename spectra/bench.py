"""GPU benchmarks: the packed ternary kernels against cuBLAS fp16 (``spectra bench gemm``) and decode steps
of whole models (``spectra bench decode``).

Method (the anchors' method): per layer shape (k in, n out) and batch m, time ``reps`` back-to-back
products with CUDA events and take the median of ``trials``; the weights are rotated over enough copies
that the working set is several times the L2 ("cold", as in a real forward pass), and a layer's time is
the sum over its four linear shapes. Both sides are captured in a CUDA graph, so the timings are of the
kernels, not of Python launch overhead (small kernels would otherwise be launch-bound for either side).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .block import fused_shapes
from .config import get_config
from .decode_graph import GraphSamplingStep, greedy, time_replays
from .errors import ConfigError
from .formats import get_format
from .kernels import configs, dispatch, launch_support, ternary_matmul
from .kernels.timing import cold_copies, copies_for, l2_size, random_packed, time_eager, time_graph
from .kinds import PACKED_KINDS
from .model import SpectraLM

# (k = in_features, n = out_features) of the four linear shapes of one layer: q/k/v fused, o, gate/up fused, down
SHAPE_SETS: dict[str, list[tuple[int, int]]] = {
    "70b": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)],
    "3.9b": [(3072, 9216), (3072, 3072), (3072, 18432), (9216, 3072)],
}
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def layer_shapes(name: str) -> list[tuple[int, int]]:
    """(k, n) of one layer's four decode products: a named set of SHAPE_SETS, or a model size preset (its fused
    q/k/v, o, fused gate/up and down shapes)."""
    if name.lower() in SHAPE_SETS:
        return SHAPE_SETS[name.lower()]
    try:
        cfg = get_config(name)
    except ConfigError:
        raise ConfigError(f"unknown shape set {name!r}; use {', '.join(SHAPE_SETS)} or a model size "
                          "preset such as 1.5B") from None
    return [(k, n) for n, k in fused_shapes(cfg)]


@dataclass
class GemmRow:
    shapes: str
    m: int
    fp16_us: float
    ours_us: dict[str, float]          # format -> summed microseconds
    ours_bytes: dict[str, int]         # format -> bytes moved (weights + scales + x + y), summed
    fp16_bytes: int
    eager_us: dict[str, float] | None = None  # "fp16" and each format -> summed us, eager launches

    def speedup(self, fmt: str) -> float:
        return self.fp16_us / self.ours_us[fmt]


def packed_bytes(n: int, k: int, m: int, fmt: str, act_bytes: int = 2) -> int:
    return n * get_format(fmt).row_bytes(k) + 4 + m * k * act_bytes + m * n * act_bytes


def portable_matmul(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                    shard_axis: int) -> torch.Tensor:
    """ternary_matmul restricted to the portable triton.language kernels (the "tq2:tl" columns of bench gemm):
    the config the dispatcher would take without the Gluon kernel, launched through the JIT path."""

    x2 = x.reshape(-1, in_features)
    cfg = configs.lookup_config(fmt, packed.shape[0], in_features, x2.shape[0], x.dtype,
                                 launch_support.scale_mode(scales, shard_axis), x.device, gluon=False)
    return dispatch.run_config(x2, packed, fmt, in_features, scales, shard_axis, cfg).reshape(*x.shape[:-1], -1)


def bench_gemm(shape_set: str = "70b", ms: tuple[int, ...] = DEFAULT_MS, fmts: tuple[str, ...] = PACKED_KINDS,
               dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
               reps: int = 200, trials: int = 5, matmul: Callable | None = None,
               log: Callable[[str], None] | None = None, eager: bool = False) -> list[GemmRow]:
    """Summed layer time per m for cuBLAS fp16 and for `matmul` (default: spectra.kernels.ternary_matmul);
    with `eager`, also of the same calls launched eagerly (no CUDA graph). A format "tq2:tl" times the
    portable triton.language kernel alone (:func:`portable_matmul`), beside "tq2" (the dispatcher's choice,
    the Gluon kernel where it is tuned to win)."""

    matmul = matmul or ternary_matmul
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    l2 = l2_size(device)
    shapes = layer_shapes(shape_set)
    rows = []
    for m in ms:
        fp16_total, ours_total = 0.0, {f: 0.0 for f in fmts}
        bytes_total = {f: 0 for f in fmts}
        fp16_bytes = 0
        eager_total = {f: 0.0 for f in ("fp16", *fmts)} if eager else None
        for k, n in shapes:
            x = torch.randn(m, k, dtype=dtype, device=device, generator=gen)
            dense_bytes = n * k * 2
            nd = copies_for(dense_bytes, l2)
            ws = [torch.randn(n, k, dtype=dtype, device=device, generator=gen) * 0.02 for _ in range(nd)]
            out = torch.empty(m, n, dtype=dtype, device=device)
            dense_step = lambda i, x=x, ws=ws, out=out: torch.matmul(x, ws[i].t(), out=out)  # noqa: E731
            fp16_total += time_graph(dense_step, nd, reps, trials)
            if eager:
                eager_total["fp16"] += time_eager(dense_step, nd, reps, trials)
            fp16_bytes += dense_bytes + 2 * (m * k + m * n)
            ws = None  # free before the packed copies
            for fmt in fmts:
                base_fmt, _, variant = fmt.partition(":")
                packs = cold_copies(random_packed(n, k, base_fmt, device, gen), l2)
                npk = len(packs)
                scales = torch.rand(1, device=device, generator=gen) * 0.05 + 0.01
                mm = portable_matmul if variant == "tl" else matmul
                step = lambda i, x=x, p=packs, f=base_fmt, k=k, s=scales, mm=mm: mm(x, p[i], f, k, s, 0)  # noqa: E731
                ours_total[fmt] += time_graph(step, npk, reps, trials)
                if eager:
                    eager_total[fmt] += time_eager(step, npk, reps, trials)
                bytes_total[fmt] += packed_bytes(n, k, m, base_fmt)
        row = GemmRow(shape_set, m, fp16_total * 1e6, {f: t * 1e6 for f, t in ours_total.items()}, bytes_total,
                      fp16_bytes, {f: t * 1e6 for f, t in eager_total.items()} if eager else None)
        rows.append(row)
        if log:
            log(format_gemm_row(row, fmts, len(shapes)))
    return rows


def format_gemm_header(fmts: tuple[str, ...], eager: bool = False) -> str:
    cols = " | ".join(f"{f} us | {f} x | {f} GB/s" for f in fmts)
    head = f"| shapes | m | fp16 us | fp16 GB/s | {cols} |"
    ncols = 3 * len(fmts)
    if eager:
        # eager: the same calls without a CUDA graph; "host us/call": (eager - graph) per product, the launch
        # cost the GPU does not hide
        head += " fp16 eager us | " + " | ".join(f"{f} eager us | {f} eager x | {f} host us/call" for f in fmts) + " |"
        ncols += 1 + 3 * len(fmts)
    return head + "\n|---|---|---|---|" + "---|" * ncols


def format_gemm_row(row: GemmRow, fmts: tuple[str, ...], products: int = 4) -> str:
    cols = " | ".join(f"{row.ours_us[f]:.1f} | {row.speedup(f):.2f}x | {row.ours_bytes[f] / row.ours_us[f] / 1e3:.0f}"
                      for f in fmts)
    line = (f"| {row.shapes} | {row.m} | {row.fp16_us:.1f} | {row.fp16_bytes / row.fp16_us / 1e3:.0f} | "
            f"{cols} |")
    if row.eager_us:
        e = row.eager_us
        line += f" {e['fp16']:.1f} | " + " | ".join(
            f"{e[f]:.1f} | {e['fp16'] / e[f]:.2f}x | {(e[f] - row.ours_us[f]) / products:.1f}" for f in fmts) + " |"
    return line


# --- end-to-end decoding ------------------------------------------------------------------------------

DECODE_MODELS = {
    # name: (preset, overrides); "70b-slice" is LLaMA-70B-shaped (no GQA in this model family) cut to a few layers
    "3.9b": ("3.9B", {}),
    "70b-slice": ("3.9B", {"hidden_size": 8192, "intermediate_size": 28672, "num_heads": 64,
                           "model_parallel_size": 8}),
}


def build_random_model(name: str, kind: str, dtype: torch.dtype, device: torch.device, num_layers: int | None = None,
                       max_seq_len: int = 256, seed: int = 0):
    """A model of the named shape with random weights: fp16 `float` weights, or random trits packed as `kind`."""

    preset, overrides = DECODE_MODELS[name]
    overrides = dict(overrides, weight_kind=kind, max_seq_len=max_seq_len)
    if num_layers is not None:
        overrides["num_layers"] = num_layers
    cfg = get_config(preset, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = SpectraLM(cfg)
    model = model.to(dtype).eval()
    if kind in PACKED_KINDS:
        gen = torch.Generator(device=device).manual_seed(seed)
        for module in model.linear_layers().values():
            n, k = module.out_features, module.in_features
            trits = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=gen)
            module.qweight.copy_(get_format(kind).pack(trits))
            module.scales = torch.rand(module.parts, device=device, generator=gen) * 0.01 + 0.01
    return model


@dataclass
class DecodeRow:
    model: str
    layers: int
    batch: int
    step_s: dict[str, float]   # kind -> seconds per decode step


def bench_decode(models: tuple[str, ...] = ("3.9b", "70b-slice"), batches: tuple[int, ...] = (1, 16),
                 kinds: tuple[str, ...] = ("float", *PACKED_KINDS), slice_layers: tuple[int, ...] = (2, 4),
                 dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda", steps: int = 50,
                 log: Callable[[str], None] | None = None, compile: bool = False,
                 fuse: bool = True, context: int = 8, cache_dtype: torch.dtype | None = None) -> list[DecodeRow]:
    """Seconds per CUDA-graph decode step for each model shape, batch and weight kind.

    What is timed is the step :func:`spectra.generate.generate` replays: a greedy choice on the GPU, the token
    fed back inside the graph, no host work between replays (so the figure is the rate a user gets). Every
    kind's step is compiled with ``torch.compile`` first when `compile` is set; q/k/v and gate/up are fused
    into one product each, for every kind, unless `fuse` is False. The timed steps attend to `context` cached
    positions and more (attention reads only the filled part of the cache), in a KV cache of `cache_dtype`
    (default: the model's; torch.int8: 8-bit rows)."""

    device = torch.device(device)
    if context < 0:
        raise ValueError(f"context must be >= 0 cached positions, got {context}")
    max_len = max(128, context + steps + 2)  # the cache: the context, the timed steps and the warm-up step
    rows = []
    for name in models:
        for layers in ((None,) if name == "3.9b" else slice_layers):
            by_batch = {b: DecodeRow(name, layers or 30, b, {}) for b in batches}
            for kind in kinds:  # build each model once, time every batch on it
                model = build_random_model(name, kind, dtype, device, layers, max_seq_len=max_len)
                if fuse:
                    model.fuse_projections()
                for batch in batches:
                    step = GraphSamplingStep(model, batch, max_len, greedy, compile=compile, cache_dtype=cache_dtype)
                    try:
                        by_batch[batch].step_s[kind] = time_replays(step, steps, start=context)
                    finally:
                        step.close()
                del model
                torch._dynamo.reset()  # drop compiled code that holds the model
                torch.cuda.empty_cache()
            for row in by_batch.values():
                rows.append(row)
                if log:
                    log(format_decode_row(row, kinds))
    return rows


def format_decode_header(kinds: tuple[str, ...]) -> str:
    cols = " | ".join(f"{k} steps/s | {k} tokens/s" for k in kinds)
    ratios = " | ".join(f"{k} vs float" for k in kinds if k != "float")
    return (f"| model | layers | batch | {cols} | {ratios} |\n|---|---|---|"
            + "---|" * (2 * len(kinds) + len(kinds) - 1))


def format_decode_row(row: DecodeRow, kinds: tuple[str, ...]) -> str:
    cols = " | ".join(f"{1 / row.step_s[k]:.0f} | {row.batch / row.step_s[k]:.0f}" for k in kinds)
    ratios = " | ".join(f"{row.step_s['float'] / row.step_s[k]:.2f}x" for k in kinds if k != "float")
    return f"| {row.model} | {row.layers} | {row.batch} | {cols} | {ratios} |"


def per_layer_speedup(rows: list[DecodeRow], kind: str) -> dict[tuple[str, int], float]:
    """(model, batch) -> per-layer speedup from two layer counts: (t(L2) - t(L1)) cancels embedding and head."""
    out = {}
    by = {(r.model, r.batch, r.layers): r for r in rows}
    for (model, batch, layers), r in by.items():
        bigger = [b for (m, bb, b) in by if m == model and bb == batch and b > layers]
        if bigger:
            r2 = by[(model, batch, min(bigger))]
            dl = r2.layers - r.layers
            t_float = (r2.step_s["float"] - r.step_s["float"]) / dl
            t_kind = (r2.step_s[kind] - r.step_s[kind]) / dl
            out[(model, batch)] = t_float / t_kind
    return out
