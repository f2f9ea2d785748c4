"""How fast can a kernel merely *read* a packed weight matrix? The memory side of the decode kernels, alone.

    python3 benchmarks/read_bandwidth.py [--shapes 57344x2048,9216x768] [--out OUT]

Each packed kernel at m = 1 streams an [n rows, q bytes] matrix once. This script times kernels that do
nothing but read such a matrix (one XOR per 32-bit word, one int32 per row written), in the tilings the
product kernels use, so that their bandwidth can be told apart from their arithmetic:

* ``flat``: programs read contiguous chunks of the whole buffer (the ceiling for one pass over the bytes);
* ``rows``: programs read BN rows x BC words per step, split-k over the row length, software-pipelined
  ``stages`` deep (the GEMV kernel's access pattern; the tensor-core kernels read rows the same way).

Shapes are rows x bytes per row (70B gate/up TQ2: 57344x2048; 3.9B q/k/v: 9216x768). Method as ``spectra
bench gemm``: cold copies (working set several times the L2), CUDA-graph replay, median of trials; every
variant's XOR is first checked against one computed by torch.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from spectra.kernels import timing


@triton.jit
def read_flat_kernel(w_ptr, out_ptr, WORDS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    start = pid * CHUNK
    for i in tl.range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < WORDS, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


@triton.jit
def read_rows_kernel(w_ptr, out_ptr, N, QW, C_PER_SPLIT, BN: tl.constexpr, BC: tl.constexpr,
                     STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(rn, N - 1)
    base = w_ptr + rows[:, None].to(tl.int64) * QW
    acc = tl.zeros((BN, BC), dtype=tl.int32)
    c_start = pid_k * C_PER_SPLIT
    for c0 in tl.range(c_start, tl.minimum(c_start + C_PER_SPLIT, QW), BC, num_stages=STAGES):
        c = tl.max_contiguous(tl.multiple_of(c0 + tl.arange(0, BC), BC), BC)
        acc ^= tl.load(base + c[None, :])
    tl.store(out_ptr + pid_k * N + rn, tl.xor_sum(acc, axis=1), mask=rn < N)


def xor_fold(t: torch.Tensor, dim: int) -> torch.Tensor:
    """XOR of `t` along `dim` (torch has no XOR reduction): halve the axis until one slice is left."""
    t = t.movedim(dim, 0)
    while t.shape[0] > 1:
        half = t.shape[0] // 2
        rest = t[2 * half:]
        t = t[:half] ^ t[half:2 * half]
        if rest.shape[0]:
            t = torch.cat([t[:1] ^ rest, t[1:]])
    return t[0]


def sweep(n: int, q: int, dev: torch.device, gen: torch.Generator, log, reps: int, trials: int) -> None:
    """Every variant on one [n, q bytes] matrix; logs each and the six fastest."""
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    qw = q // 4
    base = torch.randint(-2**31, 2**31 - 1, (n, qw), dtype=torch.int32, device=dev, generator=gen)
    copies = timing.cold_copies(base, timing.l2_size(dev))
    expect = xor_fold(base, 1)  # each row's XOR: the check of every row variant
    expect_all = xor_fold(expect, 0)  # the whole buffer's: the check of every flat variant
    nbytes = n * q
    results = []

    def record(name: str, t: float) -> None:
        results.append((t, name))
        log(f"  {n}x{q} {name}: {t * 1e6:.1f} us, {nbytes / t / 1e12:.2f} TB/s")

    def flat(i: int, out: torch.Tensor, chunk: int, block: int) -> None:
        read_flat_kernel[(out.numel(),)](copies[i], out, n * qw, CHUNK=chunk, BLOCK=block, num_warps=4)

    def rows(i: int, out: torch.Tensor, bn: int, bc: int, warps: int, stages: int, c_per: int) -> None:
        read_rows_kernel[(triton.cdiv(n, bn), out.numel() // n)](copies[i], out, n, qw, c_per, BN=bn, BC=bc,
                                                                  STAGES=stages, num_warps=warps)

    for block, per_prog in itertools.product((1024, 4096), (1, 4, 16)):
        out = torch.empty(triton.cdiv(n * qw, block * per_prog), dtype=torch.int32, device=dev)
        flat(0, out, block * per_prog, block)
        if not torch.equal(xor_fold(out, 0), expect_all):
            log(f"  {n}x{q} flat BLOCK {block * 4} B x {per_prog}: WRONG")
            continue
        t = timing.time_graph(lambda i, o=out, c=block * per_prog, b=block: flat(i, o, c, b), len(copies), reps,
                              trials)
        record(f"flat BLOCK {block * 4} B x {per_prog}", t)
    for bn, bc, warps, stages, split in itertools.product((8, 16, 32, 64), (32, 64, 128), (4, 8), (1, 3),
                                                          (1, 4)):
        if bn * bc > 64 * 128 or bc > qw or (n // bn) * split > 64 * sms:
            continue
        c_per = triton.cdiv(triton.cdiv(qw, split), bc) * bc
        split_eff = triton.cdiv(qw, c_per)
        out = torch.empty(split_eff * n, dtype=torch.int32, device=dev)
        rows(0, out, bn, bc, warps, stages, c_per)
        if not torch.equal(xor_fold(out.view(split_eff, n), 0), expect):
            log(f"  {n}x{q} rows BN {bn} BC {bc}: WRONG")
            continue
        t = timing.time_graph(lambda i, o=out, a=(bn, bc, warps, stages, c_per): rows(i, o, *a), len(copies), reps,
                              trials)
        record(f"rows BN {bn} BC {bc * 4} B W {warps} stages {stages} split {split_eff}", t)
    results.sort()
    log(f"{n}x{q}: best " + "; ".join(f"{name} {nbytes / t / 1e12:.2f} TB/s" for t, name in results[:6]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="57344x2048,9216x768")
    p.add_argument("--out", default="read_bandwidth_out")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    log = timing.timestamped_log(f"{args.out}/read_bandwidth.log")
    dev = torch.device("cuda")
    log(f"{torch.cuda.get_device_name(dev)}; copy bandwidth {timing.copy_bandwidth(dev) / 1e9:.0f} GB/s")
    gen = torch.Generator(device=dev).manual_seed(0)
    for shape in args.shapes.split(","):
        n, q = (int(v) for v in shape.split("x"))
        sweep(n, q, dev, gen, log, args.reps, args.trials)


if __name__ == "__main__":
    main()
