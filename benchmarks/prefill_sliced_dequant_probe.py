"""Probe (not the library's path): a packed layer at prefill-sized m, dequantized slice by slice beside cuBLAS.

    python3 benchmarks/prefill_sliced_dequant_probe.py [--shapes 3.9b] [--ms 512,2048] [--slices 1024,2048,4096]
    python3 benchmarks/prefill_sliced_dequant_probe.py --check     # CPU: the slicing against the whole product

Why: at m = 2048 a 3.9B layer's products take 684 us in cuBLAS fp16 and 769 us as the dispatcher runs them
(dequantize the whole weight into fp16 scratch, then cuBLAS; H100, eighth session). The 85 us are the
dequantize writing 245 MB of fp16 weights to HBM, in series with a GEMM that is bound by arithmetic, not by
memory. Two ways to hide it, timed here side by side:

- "sliced": dequantize rows n0..n1 of the weight into a scratch slot small enough to stay in the L2, then
  cuBLAS for those output columns (written in place into the [m, n] result), slice after slice: the fp16
  weight is written to and read from the L2, not HBM.
- "overlap": the same, with the dequantize of the next slice on a second stream while the GEMM of this one runs
  (memory-bound next to arithmetic-bound), two scratch slots taking turns.

Each variant is checked against the whole-weight path first, timed as a CUDA-graph replay (both streams
captured) of cold packed weights (distinct copies, several times the L2), median of trials. Per-tensor scales;
the scale mode does not change the bytes.
"""

from __future__ import annotations

import argparse

import torch

from spectra.bench import layer_shapes
from spectra.formats import get_format
from spectra.kernels.timing import copies_for, l2_size, time_fp16_product, time_graph


def dequantize_rows(packed: torch.Tensor, fmt: str, k: int, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense rows (trits * scale) of `packed`: the GPU kernel on a GPU, the format's unpacking on a CPU."""
    if packed.is_cuda:
        from spectra.kernels.dispatch import dequantize

        return dequantize(packed, fmt, k, scale, 0, dtype)
    return (get_format(fmt).unpack(packed, k).float() * scale.float()).to(dtype)


def sliced_product(x: torch.Tensor, packed: torch.Tensor, fmt: str, k: int, scale: torch.Tensor,
                   out: torch.Tensor, slice_rows: int, overlap: bool, side: torch.cuda.Stream | None = None,
                   slots: list[torch.Tensor] | None = None) -> torch.Tensor:
    """out [m, n] = x @ dequantized(packed).T, `slice_rows` output columns at a time. With `overlap`, the next
    slice's dequantize runs on the `side` stream while this slice's GEMM runs on the current one."""
    n = packed.shape[0]
    bounds = [(n0, min(n0 + slice_rows, n)) for n0 in range(0, n, slice_rows)]
    if not packed.is_cuda:  # the slicing alone, for --check
        for n0, n1 in bounds:
            torch.matmul(x, dequantize_rows(packed[n0:n1], fmt, k, scale, x.dtype).t(), out=out[:, n0:n1])
        return out
    if not overlap:  # one slot, reused: the weights stay in the L2
        for n0, n1 in bounds:
            slot = slots[0][: (n1 - n0) * k].view(n1 - n0, k)
            _dequantize_into(packed[n0:n1], fmt, k, scale, slot)
            torch.matmul(x, slot.t(), out=out[:, n0:n1])
        return out
    main = torch.cuda.current_stream()
    ready = [torch.cuda.Event() for _ in bounds]   # slice i's weights are in its slot
    free = [torch.cuda.Event() for _ in bounds]    # slice i's GEMM is done with its slot
    side.wait_stream(main)  # x, scale and the slots come from the main stream
    for i, (n0, n1) in enumerate(bounds):
        slot = slots[i % len(slots)][: (n1 - n0) * k].view(n1 - n0, k)
        with torch.cuda.stream(side):
            if i >= len(slots):
                side.wait_event(free[i - len(slots)])  # the slot's previous slice has been multiplied
            _dequantize_into(packed[n0:n1], fmt, k, scale, slot)
            ready[i].record(side)
        main.wait_event(ready[i])
        torch.matmul(x, slot.t(), out=out[:, n0:n1])
        free[i].record(main)
    return out


def _dequantize_into(packed: torch.Tensor, fmt: str, k: int, scale: torch.Tensor, dest: torch.Tensor) -> None:
    import triton

    from spectra.kernels.tq_triton import tq_dequant_kernel

    n, q = packed.shape
    tq_dequant_kernel[(triton.cdiv(n, 32), triton.cdiv(q, 128))](
        packed, scale, dest, n, k, q, 1, G=get_format(fmt).trits_per_byte, SCALE_MODE=0, BN=32, BJ=128,
        num_warps=4)


def random_layer(n: int, k: int, fmt: str, device, gen: torch.Generator) -> torch.Tensor:
    trits = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=gen)
    return get_format(fmt).pack(trits)


def check() -> list[str]:
    """Failures of the sliced product (CPU) against the whole-weight product, odd shapes and slice sizes."""
    gen = torch.Generator().manual_seed(0)
    failures = []
    for fmt in ("tq2", "tq1"):
        for m, n, k, rows in ((3, 37, 45, 8), (5, 64, 19, 64), (2, 50, 33, 7)):
            packed = random_layer(n, k, fmt, "cpu", gen)
            scale = torch.rand(1, generator=gen) + 0.5
            x = torch.randn(m, k, generator=gen)
            want = x @ dequantize_rows(packed, fmt, k, scale, x.dtype).t()
            got = sliced_product(x, packed, fmt, k, scale, torch.full((m, n), float("nan")), rows, overlap=False)
            if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                failures.append(f"{fmt} m{m} n{n} k{k} slices of {rows}: max err {(got - want).abs().max():.2e}")
    return failures


def time_product(m: int, n: int, k: int, fmt: str, slices: list[int], side: torch.cuda.Stream, l2: int,
                 reps: int, trials: int, gen: torch.Generator) -> list[float]:
    """Seconds of one [m, k] x [k, n] product: cuBLAS fp16, whole dequantize + cuBLAS, then per slice size the
    sliced and the overlapped path (nan where a path's result is wrong: never timed)."""
    dev = gen.device
    x = torch.randn(m, k, device=dev, dtype=torch.float16, generator=gen)
    times = [time_fp16_product(x, n, l2, gen, reps, trials)]
    copies = copies_for(n * k // 4, l2)
    packs = [random_layer(n, k, fmt, dev, gen) for _ in range(copies)]
    scale = torch.rand(1, device=dev, generator=gen) * 0.01 + 0.01
    out = torch.empty(m, n, device=dev, dtype=torch.float16)
    want = x @ dequantize_rows(packs[0], fmt, k, scale, x.dtype).t()

    def whole(i: int) -> None:
        torch.matmul(x, dequantize_rows(packs[i], fmt, k, scale, x.dtype).t(), out=out)

    times.append(time_graph(whole, copies, reps, trials))
    for rows in slices:
        slots = [torch.empty(rows * k, device=dev, dtype=torch.float16) for _ in range(2)]
        for overlap in (False, True):
            def call(i: int, rows: int = rows, overlap: bool = overlap, slots: list = slots) -> None:
                sliced_product(x, packs[i], fmt, k, scale, out, rows, overlap, side, slots)

            out.fill_(float("nan"))
            call(0)
            torch.cuda.synchronize()
            right = torch.allclose(out.float(), want.float(), atol=1e-2, rtol=1e-2)
            times.append(time_graph(call, copies, reps, trials) if right else float("nan"))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="3.9b")
    p.add_argument("--ms", default="512,2048")
    p.add_argument("--fmt", default="tq2")
    p.add_argument("--slices", default="1024,2048,4096", help="output columns (weight rows) per slice")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--check", action="store_true", help="correctness of the slicing only (CPU)")
    args = p.parse_args()
    if args.check:
        failures = check()
        print("\n".join(failures) or "the sliced product matches the whole-weight product")
        raise SystemExit(1 if failures else 0)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = l2_size(dev)
    side = torch.cuda.Stream(dev)
    slices = [int(s) for s in args.slices.split(",")]
    print(f"{torch.cuda.get_device_name(dev)}; {args.fmt}, fp16 activations, per-tensor scale, cold packed weights, "
          f"CUDA graphs of {args.reps} calls, median of {args.trials}; us summed over the layer's products")
    print("| shapes | m | cuBLAS fp16 | whole dequant + cuBLAS | " + " | ".join(
        f"sliced {s} | overlap {s}" for s in slices) + " |")
    print("|---|---|---|---|" + "---|---|" * len(slices))
    for shape_set in args.shapes.split(","):
        for m in (int(v) for v in args.ms.split(",")):
            totals = [0.0] * (2 + 2 * len(slices))
            for k, n in layer_shapes(shape_set):
                times = time_product(m, n, k, args.fmt, slices, side, l2, args.reps, args.trials, gen)
                totals = [a + b for a, b in zip(totals, times)]
            fp16 = totals[0]
            cells = [f"{t * 1e6:.0f} ({fp16 / t:.2f}x)" for t in totals[1:]]
            print(f"| {shape_set} | {m} | {fp16 * 1e6:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
