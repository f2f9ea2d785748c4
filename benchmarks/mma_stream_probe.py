"""Experiment: a decode-sized TQ2 product that streams weights like the GEMV and multiplies on mma.sync.

    python3 benchmarks/mma_stream_probe.py --out OUT [--shapes 3.9b,70b] [--formats tq2,tq1] [--ms 1,8]

Why (docs/performance.md, "H100, 2026-12-07 (fifth session)"): a bare read of the 70B gate/up weights in the
GEMV's tiling takes 40.5 us on an H100, the best product 64.4 us. The CUDA-core GEMV spends 3.8 instructions
per weight; the Gluon kernel on ``mma.sync`` spent 1.7 but filled shared memory with the activations of its
whole K range first (at m = 1 as many bytes as its weights) and kept only two 16-32 byte steps per row in
flight. This kernel keeps the Gluon kernel's decode (``ptx.word_decode_asm``, weights straight into the A
fragment, ``tq_gluon._byte_of_k``'s K permutation) and changes the rest:

* no shared memory: each thread loads its B fragment (16 contiguous activations per plane and step, two 16-byte
  loads) from global memory (L1/L2: every program reads the same x) in a layout that a register renaming
  turns into the mma.sync B operand (checked at compile time by ``convert_layout(..., assert_trivial=True)``);
* four 64-byte steps per row in flight (registers), the first ones loaded before the PDL wait;
* 4 or 8 warps of 16 weight rows each, split-k with per-split fp32 slots and an arrival counter.

TQ2 or TQ1 (G = 4 or 5 planes), fp16 or bf16 activations, m <= 8, one scale per matrix (2026-12-07, later: TQ1 and
rows of any length added, masked by the split's end and by K):
an experiment, not a dispatched kernel. Each variant is checked against the fp32 reference before it is timed
(``timing.time_checked``), next to cuBLAS fp16 and the shipped portable path (``bench.portable_matmul``: the
tuned GEMV / tensor-core kernels, without Gluon entries). Written 2026-12-07 and compiled for sm_90a
with Triton 3.9 on the development machine; not yet run on a GPU.
"""

from __future__ import annotations

import argparse

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from spectra import bench
from spectra.formats import get_format
from spectra.kernels import launch_support, ternary_matmul, timing
from spectra.kernels.ptx import word_decode_asm
from spectra.kernels.tq_gluon import _load_words

BJ = 64            # packed bytes per row and K step (16 per thread and row); four steps are in flight (b0..b3)
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after Triton 3.6


@gluon.constexpr_function
def _word_layout(W):
    # [16 W rows, 16 words, 4 copies]: as tq_gluon's word layout at BJ = 64 (rows of the mma.sync A fragment)
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [8, 0, 0]],
        lane_bases=[[0, 4, 0], [0, 8, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16 << i, 0, 0] for i in range(W.bit_length() - 1)], block_bases=[], shape=[16 * W, 16, 4])


@gluon.constexpr_function
def _x_layout(W):
    # [64 byte columns, 8 rows of x]: lane (g, t) holds the 16 contiguous columns 16t.. of x row g, the K
    # positions its B fragment takes after the renaming below; every warp holds the same tile
    return gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0], [4, 0], [8, 0]],
        lane_bases=[[16, 0], [32, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 0] for _ in range(W.bit_length() - 1)], block_bases=[], shape=[64, 8])


@gluon.jit
def _step(w, x_rows, xrow_ok, cols, j, j_end, Q, K, acc, G: gl.constexpr, ASM: gl.constexpr, W: gl.constexpr,
          A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr):
    """The G planes of one 64-byte step: decode, B fragments from global memory, mma.sync."""
    ET = x_rows.dtype.element_ty
    wb = gl.broadcast(gl.expand_dims(w, 2), gl.full([16 * W, 16, 4], 0, gl.int32, layout=_word_layout(W)))[0]
    if G == 4:
        planes = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [wb], dtype=(ET, ET, ET, ET),
                                           is_pure=True, pack=4)
    else:
        planes = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [wb],
                                           dtype=(ET, ET, ET, ET, ET), is_pure=True, pack=4)
    # Masks per thread's 16 columns (a 16-column group is all in or all out: Q, j and K are multiples of 16), so
    # that the two 16-byte loads stay vector loads: columns past this split's bytes belong to the next plane,
    # columns past K hold padding trits 0 whose activations must still not be read.
    g16 = j + (cols // 16) * 16
    for i in gl.static_range(G):
        ok = (g16 < j_end) & (i * Q + g16 < K)
        xv = gl.load(x_rows + (i * Q + j + cols)[:, None], mask=ok[:, None] & xrow_ok[None, :], other=0.0)
        # byte column 16t + 4c + 2e1 + e0 -> K position 16c + 8e1 + 2t + e0, on both operands (a renaming)
        b = gl.permute(gl.reshape(xv, [4, 4, 2, 2, 8]), (1, 2, 0, 3, 4))
        b = gl.convert_layout(gl.reshape(b, [64, 8]), B_LAYOUT, assert_trivial=True)
        a = gl.permute(gl.reshape(planes[i], [16 * W, 4, 4, 2, 2]), (0, 2, 3, 1, 4))
        a = gl.convert_layout(gl.reshape(a, [16 * W, 64]), A_LAYOUT, assert_trivial=True)
        acc = mma_v2(a, b, acc)
    return acc


@gluon.jit
def tq_mma_stream_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Q, stride_xm, stride_ym, J_PER_SPLIT,
                         G: gl.constexpr, ASM: gl.constexpr, W: gl.constexpr, SPLIT_K: gl.constexpr,
                         PDL: gl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    BN: gl.constexpr = 16 * W
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    WL: gl.constexpr = gl.SliceLayout(2, _word_layout(W))
    XL: gl.constexpr = _x_layout(W)

    j_start = pid_k * J_PER_SPLIT
    j_end = gl.minimum(j_start + J_PER_SPLIT, Q)
    n_steps = gl.cdiv(j_end - j_start, 64)
    wp = w_ptr.to(gl.pointer_type(gl.int32))
    QW = Q // 4
    jw0 = j_start // 4
    jw_end = j_end // 4
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, WL))
    words = gl.arange(0, 16, layout=gl.SliceLayout(0, WL))
    row_ok = rows < N
    b0 = _load_words(wp, rows, words, row_ok, jw0, jw_end, QW)
    b1 = _load_words(wp, rows, words, row_ok, jw0 + 16, jw_end, QW)
    b2 = _load_words(wp, rows, words, row_ok, jw0 + 32, jw_end, QW)
    b3 = _load_words(wp, rows, words, row_ok, jw0 + 48, jw_end, QW)
    if PDL:
        gdc_wait()  # activations (and the outputs below) come from / go to the previous kernels' memory

    cols = gl.arange(0, 64, layout=gl.SliceLayout(1, XL))
    xrow = gl.arange(0, 8, layout=gl.SliceLayout(0, XL))
    xrow_ok = xrow < M
    x_rows = x_ptr + xrow[None, :].to(gl.int64) * stride_xm
    acc = gl.zeros([BN, 8], gl.float32, layout=MMA)
    for s in range(n_steps):
        b4 = _load_words(wp, rows, words, row_ok, jw0 + (s + 4) * 16, jw_end, QW)
        acc = _step(b0, x_rows, xrow_ok, cols, j_start + s * 64, j_end, Q, K, acc, G, ASM, W, A_LAYOUT, B_LAYOUT)
        b0 = b1
        b1 = b2
        b2 = b3
        b3 = b4

    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    rm = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    acc = acc * gl.load(s_ptr).to(gl.float32)
    out_mask = (rn[:, None] < N) & (rm[None, :] < M)
    y_ptrs = y_ptr + rm[None, :].to(gl.int64) * stride_ym + rn[:, None]
    if not SPLIT_K:
        gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        # each split stores its partial tile in its own fp32 slot; the last to arrive sums them in split order
        S = gl.num_programs(1)
        gl.store(ws_ptr + (pid_k * M + rm[None, :]).to(gl.int64) * N + rn[:, None], acc, mask=out_mask)
        _cta_barrier()
        if gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == S - 1:
            total = gl.zeros([BN, 8], gl.float32, layout=MMA)
            for sk in range(0, S):
                total += gl.load(ws_ptr + (sk * M + rm[None, :]).to(gl.int64) * N + rn[:, None], mask=out_mask,
                                 other=0.0, cache_modifier=".cg")
            gl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)


def launch(x: torch.Tensor, packed: torch.Tensor, fmt: str, scale: torch.Tensor, warps: int, split: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y [m, n] = x [m, k] @ (trits * scale)^T for m <= 8 (TQ2 or TQ1, one scale)."""
    m, k = x.shape
    n, q = packed.shape
    if m > 8 or k % 16:
        raise ValueError(f"the probe kernel takes m <= 8 and k a multiple of 16, got m = {m}, k = {k}")
    blocks = -(-q // BJ)
    steps = -(-blocks // split)
    split = -(-blocks // steps)
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (-(-n // (16 * warps)), split, 1)
    ws, cnt = launch_support.WORKSPACE.get(x.device, split * m * n if split > 1 else 1, grid[0])
    pdl = launch_support.pdl_enabled(x.device)
    tq_mma_stream_kernel[grid](x, packed, scale, y, ws, cnt, m, n, k, q, x.stride(0), y.stride(0), steps * BJ,
                               G=get_format(fmt).trits_per_byte,
                               ASM=word_decode_asm(fmt, "fp16" if x.dtype == torch.float16 else "bf16"),
                               W=warps, SPLIT_K=split > 1, PDL=pdl, num_warps=warps,
                               **(dict(launch_pdl=True) if pdl else {}))
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="mma_stream_probe_out")
    p.add_argument("--shapes", default="3.9b,70b")
    p.add_argument("--formats", default="tq2,tq1")
    p.add_argument("--ms", default="1,8")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--splits", default="1,2,4,8")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    log = timing.timestamped_log(f"{args.out}/mma_stream_probe.log")
    dev = torch.device("cuda")
    log(f"{torch.cuda.get_device_name(dev)}; copy bandwidth {timing.copy_bandwidth(dev) / 1e9:.0f} GB/s")
    gen = torch.Generator(device=dev).manual_seed(0)
    l2 = timing.l2_size(dev)
    summary = []
    for fmt in args.formats.split(","):
        for shape_set in args.shapes.split(","):
            for m in (int(v) for v in args.ms.split(",")):
                tot = [0.0, 0.0, 0.0, 0.0]
                for k, n in bench.layer_shapes(shape_set):
                    x = torch.randn(m, k, dtype=torch.float16, device=dev, generator=gen)
                    t16 = timing.time_fp16_product(x, n, l2, gen, args.reps, args.trials)
                    packs = timing.cold_copies(timing.random_packed(n, k, fmt, dev, gen), l2)
                    s = torch.rand(1, device=dev, generator=gen) * 0.05 + 0.01
                    t_tl, t_sh = (timing.time_graph(lambda i, f=f, x=x, p=packs, k=k, s=s, fm=fmt:
                                                    f(x, p[i], fm, k, s, 0), len(packs), args.reps, args.trials)
                                  for f in (bench.portable_matmul, ternary_matmul))
                    best = (float("inf"), None)
                    for w in (int(v) for v in args.warps.split(",")):
                        for split in (int(v) for v in args.splits.split(",")):
                            label = f"stream {fmt} {n}x{k} m={m} W {w} split {split}"
                            t = timing.time_checked(lambda xx, pk, out=None, s=s, w=w, sp=split, fm=fmt:
                                                    launch(xx, pk, fm, s, w, sp, out=out),
                                                    x, packs, fmt, s, gen, log, label, args.reps, args.trials)
                            if t is not None:
                                log(f"  {label}: {t * 1e6:.1f} us")
                                best = min(best, (t, (w, split)), key=lambda v: v[0])
                    log(f"{shape_set} {fmt} {n}x{k} m={m}: fp16 {t16 * 1e6:.1f} | portable {t_tl * 1e6:.1f} | "
                        f"shipped {t_sh * 1e6:.1f} | stream {best[0] * 1e6:.1f} (W, split {best[1]})")
                    tot = [tot[0] + t16, tot[1] + t_tl, tot[2] + t_sh, tot[3] + best[0]]
                summary.append(f"| {fmt} " + timing.layer_table_row(shape_set, m, tot[0], tot[1:]))
                log(summary[-1])
    log("| format | shapes | m | fp16 us | portable us (x) | shipped us (x) | stream us (x) |")
    log("\n".join(summary))


if __name__ == "__main__":
    main()
