"""Triton kernels for y = x @ W^T with W = trits * per-shard scales held in the canonical TQ2/TQ1 layout.

One tensor-core kernel covers every batch size m. It computes the transposed product
``acc[BN rows of W, BM rows of x] = W_tile @ x_tile^T`` so that the weight rows fill the 64-row side of
Hopper's wgmma and a decode batch of m = 1..16 only pads the narrow side (16); the weight tile is decoded
in registers and fed to the tensor cores as the A operand, so decoded weights never touch shared memory.

Per K step the kernel loads a [BN, BJ] byte tile (coalesced, 16-byte aligned rows) and, for each plane
i < G, pairs decoded plane i with the activation slice x[:, i*Q + j0 : i*Q + j0 + BJ]: the planar layout of
spectra/formats.py was chosen for exactly this. Split-k (grid axis 2) splits the byte columns; each split
stores its partial tile in its own fp32 workspace slot, and the last split of each output tile to arrive
(an arrival counter) sums the slots in a fixed order, writes the result and re-zeroes its counter, so one
launch does everything, the result is bitwise reproducible, and the launch is safe to capture in a CUDA
graph. (Float atomics into one shared workspace, the first design, gave wrong tiles on H100 and H200:
measured 2026-11-23, e.g. rel. error 0.59 at m = 16 with split 8; see docs/performance.md.)

Scales: one scale, or P shards (torch.tensor_split boundaries) of the output rows (applied to the fp32
accumulator) or of the input columns. Column shards are applied to x before the launch, by
tq_scale_columns_kernel (x in fp32 times its column's scale, cast back to the operand dtype): the matmul
kernel then runs with no scale at all. (Applying them to each activation tile inside the K loop, the first
design, made the row-parallel o/down projections of a sharded model 3.5-6.6x slower at m = 1 on an H100,
measured 2026-11-23: the per-column shard index is an integer division in the latency-bound loop.)

USE_ASM selects the inline-PTX decode (spectra/kernels/ptx.py); the plain-Triton decode computes the same
values and is what runs under TRITON_INTERPRET=1 on the CPU.

tq_gemv_kernel is the small-m product on the CUDA cores (one activation row per program, three instructions
per weight, fp32 sums; see its docstring): at m = 1 it beats the tensor-core kernel on most layer shapes.

tq_matmul_sk_kernel runs the same K steps as a persistent stream-K launch (one program per SM, each taking
an equal share of all tiles' K steps), for the GEMM regime where a one-program-per-tile grid leaves a partial
last wave.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # programmatic dependent launch (Triton >= 3.4); the GEMV kernel uses it only where PDL is set
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: PDL stays off (dispatch.PDL_AVAILABLE)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _shard_of(idx, size, P):
    """Shard index of positions `idx` in a dimension of `size` split into P torch.tensor_split parts."""
    base = size // P
    extra = size - base * P
    big = base + 1
    head = extra * big
    return tl.where(idx < head, idx // big, extra + (idx - head) // tl.maximum(base, 1))


@triton.jit
def _output_scale(acc, s_ptr, rn, N, P, SCALE_MODE: tl.constexpr):
    """Apply the scale to a [BN, BM] accumulator: one per tensor (mode 0) or per output-row shard (mode 1).
    Mode 2 (shards of the input columns) was applied to the activations before the launch."""
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    elif SCALE_MODE == 1:
        s_row = tl.load(s_ptr + _shard_of(rn, N, P), mask=rn < N, other=0.0).to(tl.float32)
        acc = acc * s_row[:, None]
    return acc


@triton.jit
def _gpu_fence(token, FENCE: tl.constexpr):
    """Every thread waits until its own global writes are visible GPU-wide, for FENCE 1 (``fence.sc.gpu``) or
    2 (``fence.acq_rel.gpu``); nothing for 0 (TRITON_INTERPRET) and 3 (the CTA barrier before the counter's
    acq_rel atomic orders the writes: PTX release is cumulative, the pattern CUTLASS's semaphores use).

    Split-k and stream-K programs store their partial tiles from every thread and then bump an arrival
    counter from one thread; the last arrival reads all partial tiles.
    """
    if FENCE == 1:
        tl.inline_asm_elementwise("fence.sc.gpu;\nmov.b32 $0, $1;", "=r,r", [token], dtype=tl.int32,
                                  is_pure=False, pack=1)
    elif FENCE == 2:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\nmov.b32 $0, $1;", "=r,r", [token], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _publish_partial(slot_ptrs, acc, mask, cnt_ptr, tile, count, token, FENCE: tl.constexpr):
    """Store this program's partial tile in its own fp32 slot and add `count` to the tile's arrival counter;
    returns the counter before the add. Whoever brings the counter to its total sums every contributor's slot
    (after a _gpu_fence of its own) and then calls _finish_tile. Plain stores, a fence (see _gpu_fence), a CTA
    barrier, then one acq_rel atomic: float atomics into a shared workspace lost partial sums on the GPU."""
    tl.store(slot_ptrs, acc, mask=mask)
    _gpu_fence(token, FENCE)
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr + tile, count, sem="acq_rel")


@triton.jit
def _finish_tile(y_ptrs, total, mask, cnt_ptr, tile):
    """Write a tile summed from its slots and re-zero its arrival counter for the next launch."""
    tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
    tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _tq2_plane(b, i: tl.constexpr, DT: tl.constexpr):
    return (((b >> (2 * i)) & 3).to(tl.int32) - 1).to(DT)


@triton.jit
def _tq1_plane(b, i: tl.constexpr, DT: tl.constexpr):
    q = b.to(tl.int32)
    p: tl.constexpr = 3 ** i
    return ((((q * p) & 255) * 3 >> 8) - 1).to(DT)


@triton.jit
def _x_tile(x_ptr, rm, cols, col_ok, M, stride_xm, MASK_COLS: tl.constexpr):
    """x[rm, cols]^T as a [BJ, BM] operand; out-of-range columns load 0 (never garbage times a trit).
    MASK_COLS=False: the host guarantees every column is in range, so only the (loop-invariant) row mask
    remains, and the loads carry no per-step predicate arithmetic."""
    if MASK_COLS:
        mask = col_ok[:, None] & (rm[None, :] < M)
    else:
        mask = rm[None, :] < M
    return tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_xm + cols[:, None], mask=mask, other=0.0)


@triton.jit
def _dot(w_plane, xt, acc, DT: tl.constexpr, FIRST: tl.constexpr):
    # FIRST: no incoming accumulator, so its registers are first written by a wgmma. A zero-initialised
    # accumulator is written by plain moves on the path that skips the loop, and then ptxas serialises
    # every wgmma of the kernel (warning C7515), which cost more than a third of the GEMV speed.
    if FIRST:
        out = tl.dot(w_plane, xt, out_dtype=tl.float32, input_precision="ieee" if DT == tl.float32 else None)
    else:
        out = tl.dot(w_plane, xt, acc, input_precision="ieee" if DT == tl.float32 else None)
    return out


@triton.jit
def _load_bytes(w_rows, row_ok, jb, rj, j_lo, j_end, MASK_J: tl.constexpr):
    """The [BN, BJ] packed byte tile at byte column jb. Rows past N and columns outside j_lo..j_end - 1 load
    zeros (rows past N decode as -1: their outputs are never stored). MASK_J=False: the step lies inside."""
    j = jb + rj
    if MASK_J:
        mask = row_ok & ((j >= j_lo) & (j < j_end))[None, :]
    else:
        mask = row_ok
    return tl.load(w_rows + j[None, :], mask=mask, other=0)


@triton.jit
def _k_step(acc, b, jb, j_lo, x_ptr, rm, rj, M, K, Q, stride_xm,
            G: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr,
            ASM: tl.constexpr, FIRST: tl.constexpr, PLANE_MASK: tl.constexpr, MASK_J: tl.constexpr):
    """One K step: decode the [BN, BJ] byte tile `b` (byte columns jb..) into G planes and multiply each with
    its activation slice.

    One dot per plane on purpose: Triton waits for each plane's wgmmas before the next step decodes into
    registers. (Joining the planes into one [BN, 4 * BJ] operand gives a single dot that Triton 3.6 keeps in
    flight across the next step's decode, which overwrites the A registers of wgmmas still running: measured
    wrong results on an H200, 2026-11-23; see docs/performance.md.)
    """
    ET = x_ptr.dtype.element_ty  # DT as a real dtype (a constexpr inside a tuple is not unwrapped)
    j = jb + rj
    if MASK_J:
        j_ok = (j >= j_lo) & (j < Q)  # bytes outside the step's range were loaded as 0 (a -1 trit)
    else:
        j_ok = j < Q  # true by construction; only the planes of PLANE_MASK use it
    if G == 4:
        if USE_ASM:
            p0, p1, p2, p3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b], dtype=(ET,) * 4,
                                                       is_pure=True, pack=2)
        else:
            p0 = _tq2_plane(b, 0, DT)
            p1 = _tq2_plane(b, 1, DT)
            p2 = _tq2_plane(b, 2, DT)
            p3 = _tq2_plane(b, 3, DT)
    else:
        if USE_ASM:
            p0, p1, p2, p3, p4 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,r", [b], dtype=(ET,) * 5,
                                                           is_pure=True, pack=2)
        else:
            p0 = _tq1_plane(b, 0, DT)
            p1 = _tq1_plane(b, 1, DT)
            p2 = _tq1_plane(b, 2, DT)
            p3 = _tq1_plane(b, 3, DT)
            p4 = _tq1_plane(b, 4, DT)
    # All activation tiles first, then the dots back to back (fewer waits between wgmmas).
    # Bit i of PLANE_MASK: plane i's columns need a bounds mask (see dispatch._column_masks).
    x0 = _x_tile(x_ptr, rm, j, j_ok & (j < K), M, stride_xm, (PLANE_MASK & 1) != 0)
    x1 = _x_tile(x_ptr, rm, Q + j, j_ok & (Q + j < K), M, stride_xm, (PLANE_MASK & 2) != 0)
    x2 = _x_tile(x_ptr, rm, 2 * Q + j, j_ok & (2 * Q + j < K), M, stride_xm, (PLANE_MASK & 4) != 0)
    x3 = _x_tile(x_ptr, rm, 3 * Q + j, j_ok & (3 * Q + j < K), M, stride_xm, (PLANE_MASK & 8) != 0)
    if G == 5:
        x4 = _x_tile(x_ptr, rm, 4 * Q + j, j_ok & (4 * Q + j < K), M, stride_xm, (PLANE_MASK & 16) != 0)
    acc = _dot(p0, x0, acc, DT, FIRST)
    acc = _dot(p1, x1, acc, DT, False)
    acc = _dot(p2, x2, acc, DT, False)
    acc = _dot(p3, x3, acc, DT, False)
    if G == 5:
        acc = _dot(p4, x4, acc, DT, False)
    return acc


@triton.jit
def _k_range(j_start, j_stop, j_end, x_ptr, w_rows, row_ok, rm, rj, M, K, Q, stride_xm,
             G: tl.constexpr, DT: tl.constexpr, BJ: tl.constexpr, USE_ASM: tl.constexpr,
             ASM: tl.constexpr, NUM_STAGES: tl.constexpr, MASK_J: tl.constexpr, PLANE_MASK: tl.constexpr,
             LOOP_PLANE_MASK: tl.constexpr):
    """The fp32 accumulator of the byte columns j_start .. min(j_stop, j_end) - 1 in K steps of BJ (at least
    one). The first step is peeled out of the loop (see _dot).

    MASK_J (Q % BJ != 0): a range whose length is not a multiple of BJ starts its first step early, at
    j_start - (BJ - length % BJ), with the columns before j_start masked; every later step is whole. The loop
    then carries no byte mask, and only the activation masks of LOOP_PLANE_MASK (planes whose columns can pass
    K). (Masking every step cost TQ1, whose rows are rarely a multiple of BJ, per-step predicate work; a
    masked last step peeled after the loop instead raised TQ1's registers from 105 to 140, sm_90a.)"""
    if MASK_J:
        j_hi = tl.minimum(j_stop, j_end)
        # Rows are 16-byte aligned and so are the split and step boundaries: say so, or the loop's loads
        # lose their 16-byte vectors and cp.async pipeline (measured at compile time: 1-byte loads, no stages).
        j_first = tl.multiple_of(j_start - (BJ - (j_hi - j_start) % BJ) % BJ, 16)
    else:
        j_hi = j_stop
        j_first = j_start
    b = _load_bytes(w_rows, row_ok, j_first, rj, j_start, j_end, MASK_J)
    acc = _k_step(0.0, b, j_first, j_start, x_ptr, rm, rj, M, K, Q, stride_xm, G, DT, USE_ASM, ASM, True,
                  PLANE_MASK, MASK_J)
    for jb in tl.range(j_first + BJ, j_hi, BJ, num_stages=NUM_STAGES):
        b = _load_bytes(w_rows, row_ok, jb, rj, j_start, j_end, False)
        acc = _k_step(acc, b, jb, j_start, x_ptr, rm, rj, M, K, Q, stride_xm, G, DT, USE_ASM, ASM, False,
                      LOOP_PLANE_MASK, False)
    return acc


@triton.jit
def _rows_rsqrt(xr_ptr, stride_xrm, rm, M, K, eps, BK: tl.constexpr):
    """1 / sqrt(mean(xr[m]^2) + eps) for the activation rows rm (fp32 sums, as the RMSNorm kernel)."""
    ss = tl.zeros((rm.shape[0],), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        v = tl.load(xr_ptr + rm[:, None].to(tl.int64) * stride_xrm + cols[None, :],
                    mask=(rm[:, None] < M) & (cols < K)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _tile_finish(acc, rn, rm, pid_n, M, N, K, y_ptr, stride_ym, xr_ptr, stride_xrm, eps, res_ptr, stride_rm, g_ptr,
                 y2_ptr, stride_y2m, NORM: tl.constexpr, RESIDUAL: tl.constexpr, GAIN: tl.constexpr,
                 SWIGLU: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Store a scaled [BN weight rows, BM activation rows] tile after the fused epilogue (tq_gemv_kernel's: the
    RMSNorm factor of each activation row; SwiGLU of row pairs 2i (gate), 2i + 1 (up); the residual add; the
    gained sum). Rows rn (program rows: pid_n * BN ..), activation rows rm."""
    DT: tl.constexpr = y_ptr.dtype.element_ty
    if NORM:
        acc = acc * _rows_rsqrt(xr_ptr, stride_xrm, rm, M, K, eps, BK)[None, :]
    if SWIGLU:
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BN // 2, 2, acc.shape[1])), (0, 2, 1)))
        y = _silu_times(gate.to(DT).to(tl.float32), up.to(DT).to(tl.float32), DT)
        jj = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        n_out = N // 2
    else:
        y = acc.to(DT)
        jj = rn
        n_out = N
    out_mask = (jj[:, None] < n_out) & (rm[None, :] < M)
    if RESIDUAL:
        res = tl.load(res_ptr + rm[None, :].to(tl.int64) * stride_rm + jj[:, None], mask=out_mask, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(DT)
    tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + jj[:, None], y, mask=out_mask)
    if GAIN:
        gain = tl.load(g_ptr + jj, mask=jj < n_out, other=0.0).to(tl.float32)
        tl.store(y2_ptr + rm[None, :].to(tl.int64) * stride_y2m + jj[:, None],
                 (y.to(tl.float32) * gain[:, None]).to(DT), mask=out_mask)


@triton.jit
def tq_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                     M, N, K, Q, stride_xm, stride_ym, P, J_PER_SPLIT,
                     G: tl.constexpr, SCALE_MODE: tl.constexpr, DT: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, SPLIT_K: tl.constexpr,
                     USE_ASM: tl.constexpr, ASM: tl.constexpr, NUM_STAGES: tl.constexpr,
                     FENCE: tl.constexpr, MASK_J: tl.constexpr, PLANE_MASK: tl.constexpr,
                     LOOP_PLANE_MASK: tl.constexpr,
                     xr_ptr=None, res_ptr=None, g_ptr=None, y2_ptr=None, stride_xrm=0, stride_rm=0, stride_y2m=0,
                     eps=0.0, NORM: tl.constexpr = False, RESIDUAL: tl.constexpr = False,
                     GAIN: tl.constexpr = False, SWIGLU: tl.constexpr = False, BK: tl.constexpr = 1024):
    # SCALE_MODE: 0 = one scale, 1 = P shards of the output rows, 2 = P shards of the input columns (already
    # applied to x by tq_scale_columns_kernel).
    # MASK_J: Q % BJ != 0, so a range's first step is partial (see _k_range); PLANE_MASK: bit i set if plane
    # i's activation columns need a bounds mask in that first step, LOOP_PLANE_MASK in the loop's whole steps.
    # Real layer shapes need few or none: no per-step predicates.
    # NORM, SWIGLU, RESIDUAL, GAIN: the fused epilogue of a decode product (see tq_gemv_kernel and _tile_finish;
    # with SWIGLU program pid_n takes gate and up rows pid_n * BN / 2 .. in pairs).
    pid_m = tl.program_id(0)  # fastest-varying: m tiles sharing a weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rj = tl.arange(0, BJ)
    rows, rows_ok = _program_rows(pid_n, N, BN, SWIGLU)
    row_ok = rows_ok[:, None]
    w_rows = w_ptr + rows[:, None].to(tl.int64) * Q
    # The host makes every split non-empty: _k_range peels the first K step.
    j_start = pid_k * J_PER_SPLIT
    j_end = tl.minimum(j_start + J_PER_SPLIT, Q)
    # (Prefetching the next step's bytes into registers by hand was measured 1.3-1.9x slower on an H100,
    # 2026-11-23: it replaces the cp.async pipeline Triton builds for this loop with a register round trip.)
    acc = _k_range(j_start, j_end, j_end, x_ptr, w_rows, row_ok, rm, rj, M, K, Q, stride_xm,
                   G, DT, BJ, USE_ASM, ASM, NUM_STAGES, MASK_J, PLANE_MASK, LOOP_PLANE_MASK)

    acc = _output_scale(acc, s_ptr, rows, N, P, SCALE_MODE)
    if not SPLIT_K:
        _tile_finish(acc, rn, rm, pid_n, M, N, K, y_ptr, stride_ym, xr_ptr, stride_xrm, eps, res_ptr, stride_rm,
                     g_ptr, y2_ptr, stride_y2m, NORM, RESIDUAL, GAIN, SWIGLU, BN, BK)
    else:
        # Each split stores its partial tile in its own fp32 slot (plain stores, no float atomics); the last
        # split to arrive sums the slots in a fixed order, so the result is also bitwise reproducible. A slot
        # per program row (programs x BN per activation row: with SWIGLU, or N not a multiple of BN, past N).
        S = tl.num_programs(2)
        NS = tl.num_programs(1) * BN
        tile = pid_m * tl.num_programs(1) + pid_n
        slot_mask = rm[None, :] < M
        slot = ws_ptr + (pid_k * M + rm[None, :]).to(tl.int64) * NS + rn[:, None]
        if _publish_partial(slot, acc, slot_mask, cnt_ptr, tile, 1, pid_k, FENCE) == S - 1:
            _gpu_fence(pid_k, FENCE)
            total = tl.zeros((BN, BM), dtype=tl.float32)
            for s in range(0, S):
                total += tl.load(ws_ptr + (s * M + rm[None, :]).to(tl.int64) * NS + rn[:, None], mask=slot_mask,
                                 other=0.0, cache_modifier=".cg")
            _tile_finish(total, rn, rm, pid_n, M, N, K, y_ptr, stride_ym, xr_ptr, stride_xrm, eps, res_ptr,
                         stride_rm, g_ptr, y2_ptr, stride_y2m, NORM, RESIDUAL, GAIN, SWIGLU, BN, BK)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit(do_not_specialize=["TILES_M", "STEPS", "TOTAL"])
def tq_matmul_sk_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                        M, N, K, Q, stride_xm, stride_ym, P, TILES_M, STEPS, TOTAL,
                        G: tl.constexpr, SCALE_MODE: tl.constexpr, DT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr,
                        USE_ASM: tl.constexpr, ASM: tl.constexpr, NUM_STAGES: tl.constexpr,
                        FENCE: tl.constexpr, MASK_J: tl.constexpr, PLANE_MASK: tl.constexpr,
                        LOOP_PLANE_MASK: tl.constexpr):
    """Persistent stream-K launch of the same product, for the GEMM regime (large m).

    The grid is a fixed number of programs (about one per SM). The work is TOTAL = tiles * STEPS K steps,
    tile-major (the K steps of one output tile are consecutive, and the m tiles of one weight tile are
    neighbours); program p takes the contiguous range [p * TOTAL / grid, (p + 1) * TOTAL / grid). Every program
    therefore gets the same number of K steps whatever the tile count, which removes the partial last wave
    of a one-program-per-tile grid (e.g. 144 tiles on 132 SMs). A tile covered by one program is stored
    directly; each program's share of a tile split between programs goes to that program's workspace slot,
    and the program whose K steps complete the tile's STEPS (an arrival counter of steps) sums the slots,
    writes the tile and re-zeroes the counter, as in the split-k path of tq_matmul_kernel. No program ever
    waits for another.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    start = ((pid.to(tl.int64) * TOTAL) // nprog).to(tl.int32)
    end = (((pid + 1).to(tl.int64) * TOTAL) // nprog).to(tl.int32)
    rj = tl.arange(0, BJ)
    it = start
    while it < end:
        tile = it // STEPS
        ks = it - tile * STEPS
        ke = tl.minimum(STEPS, end - tile * STEPS)
        pid_m = tile % TILES_M
        pid_n = tile // TILES_M
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        w_rows = w_ptr + rn[:, None].to(tl.int64) * Q
        row_ok = rn[:, None] < N
        acc = _k_range(ks * BJ, ke * BJ, Q, x_ptr, w_rows, row_ok, rm, rj, M, K, Q, stride_xm,
                       G, DT, BJ, USE_ASM, ASM, NUM_STAGES, MASK_J, PLANE_MASK, LOOP_PLANE_MASK)
        acc = _output_scale(acc, s_ptr, rn, N, P, SCALE_MODE)
        out_mask = (rn[:, None] < N) & (rm[None, :] < M)
        y_ptrs = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
        if (ks == 0) & (ke == STEPS):
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            # A tile shared between programs: each contributor stores its partial tile in its own slot (two per
            # program: its first tile and its last one, the only ones it can share), and the program that
            # completes the tile's K steps sums the contributors' slots in program order (bitwise reproducible).
            loc = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
            which = (tile != start // STEPS).to(tl.int64)
            slot = ws_ptr + (pid.to(tl.int64) * 2 + which) * (BM * BN) + loc
            if _publish_partial(slot, acc, None, cnt_ptr, tile, ke - ks, pid, FENCE) + (ke - ks) == STEPS:
                _gpu_fence(pid, FENCE)
                # contributors: the programs whose step ranges hold the tile's first and last K step
                first = ((tile.to(tl.int64) * STEPS + 1) * nprog + TOTAL - 1) // TOTAL - 1
                last = (((tile.to(tl.int64) + 1) * STEPS) * nprog + TOTAL - 1) // TOTAL - 1
                total = tl.zeros((BN, BM), dtype=tl.float32)
                for q in range(first, last + 1):
                    q_which = (tile != ((q * TOTAL) // nprog) // STEPS).to(tl.int64)
                    total += tl.load(ws_ptr + (q * 2 + q_which) * (BM * BN) + loc, cache_modifier=".cg")
                _finish_tile(y_ptrs, total, out_mask, cnt_ptr, tile)
        it = tile * STEPS + ke


@triton.jit
def tq_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, Q, P,
                      G: tl.constexpr, SCALE_MODE: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
    """out[n, i*Q + j] = (digit_i(w[n, j]) - 1) * scale, cast like the reference (fp32 product, then cast)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    row_ok = rn < N
    b = tl.load(w_ptr + rn[:, None].to(tl.int64) * Q + j[None, :], mask=row_ok[:, None] & (j < Q)[None, :])
    if SCALE_MODE == 0:
        s_row = tl.load(s_ptr).to(tl.float32) + tl.zeros((BN,), dtype=tl.float32)
    elif SCALE_MODE == 1:
        s_row = tl.load(s_ptr + _shard_of(rn, N, P), mask=row_ok, other=0.0).to(tl.float32)
    else:
        s_row = tl.full((BN,), 1.0, dtype=tl.float32)
    out_rows = out_ptr + rn[:, None].to(tl.int64) * K
    for i in tl.static_range(G):
        if G == 4:
            t = _tq2_plane(b, i, tl.float32)
        else:
            t = _tq1_plane(b, i, tl.float32)
        cols = i * Q + j
        # j < Q too: the tail of the last tile would otherwise overwrite the next plane's columns
        ok = row_ok[:, None] & ((j < Q) & (cols < K))[None, :]
        w = t * s_row[:, None]
        if SCALE_MODE == 2:
            s_col = tl.load(s_ptr + _shard_of(cols, K, P), mask=cols < K, other=0.0).to(tl.float32)
            w = w * s_col[None, :]
        tl.store(out_rows + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def tq_scale_columns_kernel(x_ptr, s_ptr, out_ptr, M, K, P, stride_xm, BK: tl.constexpr):
    """out[m, c] = x[m, c] * scale of c's shard (P torch.tensor_split shards of the K columns), computed in fp32
    and cast to out's dtype: column-shard scales applied once per call instead of inside every K step."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = c < K
    x = tl.load(x_ptr + row * stride_xm + c, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + _shard_of(c, K, P), mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * K + c, (x * s).to(out_ptr.dtype.element_ty), mask=ok)


# The GEMV kernel (small m, CUDA cores): see tq_gemv_kernel.
# Constants written out below: 0x4B000000 is the fp32 bits of 2^23 (OR-ing an integer below 2^23 into its
# mantissa gives 2^23 + that integer); -8388608 is 0xFF800000 as int32, the sign and exponent bits of an fp32.


@triton.jit
def _gemv_trits(lo, hi, word, e: tl.constexpr, i: tl.constexpr, G: tl.constexpr):
    """Trit of byte e, plane i of each int32 word, times 2^p, in fp32 and exact.

    TQ2 (one AND per weight): lo holds the word's bits 0..21 under the exponent bits of 2^23 (_gemv_words), and
    hi its bits 16..31 the same way, so masking one 2-bit digit at bit p together with the exponent gives the
    float 2^23 + digit * 2^p; subtracting 2^23 + 2^p leaves trit * 2^p. p = 8e + 2i, or 8e + 2i - 16 taken from
    hi past bit 21 (where digit * 2^p would leave the mantissa). TQ1 digits come out of the base-3 decode at
    p = 8 and get the exponent bits by an OR. The activation it meets was multiplied by 2^-p (_gemv_x)."""
    if G == 4:
        if 8 * e + 2 * i > 21:
            f = (hi & ((3 << (8 * e + 2 * i - 16)) | -8388608)).to(tl.float32, bitcast=True)
            f = f - (8388608.0 + 2 ** (8 * e + 2 * i - 16))
        else:
            f = (lo & ((3 << (8 * e + 2 * i)) | -8388608)).to(tl.float32, bitcast=True)
            f = f - (8388608.0 + 2 ** (8 * e + 2 * i))
    else:
        q = (word >> (8 * e)) & 255
        bits = (((q * (3 ** i)) & 255) * 3) & 0x300  # digit = ((q * 3^i) mod 256) * 3 >> 8, kept at bit 8
        f = (bits | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 256.0)
    return f


@triton.jit
def _gemv_x(xv, e: tl.constexpr, i: tl.constexpr, G: tl.constexpr):
    """Activations in fp32 times the 2^-p that _gemv_trits leaves on byte e, plane i's trits (exact)."""
    if G == 4:
        if 8 * e + 2 * i > 21:
            out = xv.to(tl.float32) * (1.0 / 2 ** (8 * e + 2 * i - 16))
        else:
            out = xv.to(tl.float32) * (1.0 / 2 ** (8 * e + 2 * i))
    else:
        out = xv.to(tl.float32) * (1.0 / 256.0)
    return out


@triton.jit
def _gemv_x4(xq, DT: tl.constexpr, USE_ASM: tl.constexpr, X_ASM: tl.constexpr):
    """The four 16-bit activations (little endian) of each int64 in xq, as four fp32 tensors (by the inline
    asm X_ASM on the GPU; by shifts, which the interpreter runs)."""
    if USE_ASM:
        x0, x1, x2, x3 = tl.inline_asm_elementwise(X_ASM, "=r,=r,=r,=r,l", [xq], dtype=(tl.float32,) * 4,
                                                   is_pure=True, pack=1)
    else:
        x0 = (xq & 0xFFFF).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        x1 = ((xq >> 16) & 0xFFFF).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        x2 = ((xq >> 32) & 0xFFFF).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        x3 = ((xq >> 48) & 0xFFFF).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def _gemv_load(words, c, c_end, MASK_C: tl.constexpr):
    """The [BN, BC] int32 word tile at word columns c (words past c_end load as 0 when MASK_C)."""
    if MASK_C:
        wv = tl.load(words + c[None, :], mask=(c < c_end)[None, :], other=0)
    else:
        wv = tl.load(words + c[None, :])
    return wv


@triton.jit
def _gemv_step(acc, wv, c, c_end, x_row, K, Q, G: tl.constexpr, MASK_C: tl.constexpr, PLANE_MASK: tl.constexpr,
               X_VEC: tl.constexpr, USE_ASM: tl.constexpr, X_ASM: tl.constexpr):
    """acc[BN, BC] += trits of the word tile wv times their activations (every plane and byte of each word)."""
    if G == 4:  # the word's bits 0..21 and 16..31 under the exponent of 2^23 (see _gemv_trits)
        if USE_ASM:  # opaque to the compiler, which otherwise folds the OR back into every weight's mask
            lo, hi = tl.inline_asm_elementwise(
                "lop3.b32 $0, $2, 0x3FFFFF, 0x4B000000, 0xEA;\n"
                "{ .reg .b32 t; shr.u32 t, $2, 16; or.b32 $1, t, 0x4B000000; }",
                "=r,=r,r", [wv], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            lo = (wv & 0x3FFFFF) | 0x4B000000
            hi = ((wv >> 16) & 0xFFFF) | 0x4B000000
    else:
        lo = wv
        hi = wv
    c_ok = c < c_end
    for i in tl.static_range(G):
        # X_VEC: plane i's activations of word c are 4 consecutive values, one int64 (8-byte aligned rows);
        # planes whose columns pass k, and masked steps, load value by value
        if X_VEC and not MASK_C and ((PLANE_MASK >> i) & 1) == 0:
            xq = tl.load(x_row.to(tl.pointer_type(tl.int64)) + (i * (Q // 4) + c))
            x0, x1, x2, x3 = _gemv_x4(xq, x_row.dtype.element_ty, USE_ASM, X_ASM)
            acc += _gemv_trits(lo, hi, wv, 0, i, G) * _gemv_x(x0, 0, i, G)[None, :]
            acc += _gemv_trits(lo, hi, wv, 1, i, G) * _gemv_x(x1, 1, i, G)[None, :]
            acc += _gemv_trits(lo, hi, wv, 2, i, G) * _gemv_x(x2, 2, i, G)[None, :]
            acc += _gemv_trits(lo, hi, wv, 3, i, G) * _gemv_x(x3, 3, i, G)[None, :]
        else:
            for e in tl.static_range(4):
                col = i * Q + 4 * c + e
                if MASK_C:
                    xv = tl.load(x_row + col, mask=c_ok & (col < K), other=0.0)
                elif (PLANE_MASK >> i) & 1:  # padding columns of the last planes lie past k
                    xv = tl.load(x_row + col, mask=col < K, other=0.0)
                else:
                    xv = tl.load(x_row + col)
                acc += _gemv_trits(lo, hi, wv, e, i, G) * _gemv_x(xv, e, i, G)[None, :]
    return acc


@triton.jit
def _program_rows(pid_n, N, BN: tl.constexpr, SWIGLU: tl.constexpr):
    """The weight rows of program pid_n's BN rows and whether each feeds a stored output: pid_n * BN + i, or with
    SWIGLU (rows [gate; up], N = 2 I) rows 2i (gate) and 2i + 1 (up) of output pid_n * BN / 2 + i (past the
    last output: the last real row of the half)."""
    i = tl.arange(0, BN)
    if SWIGLU:
        half = N // 2
        j = pid_n * (BN // 2) + i // 2
        return (i % 2) * half + tl.minimum(j, half - 1), j < half
    rows = pid_n * BN + i
    return rows, rows < N


@triton.jit
def _silu_times(g, u, DT: tl.constexpr):
    """silu(g) * u of two fp32 tensors holding DT values, rounded where pointwise._swiglu_kernel rounds."""
    act = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
    return (act * u).to(DT)


@triton.jit
def tq_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, Q, stride_xm, stride_ym, P, C_PER_SPLIT,
                   G: tl.constexpr, SCALE_MODE: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                   SPLIT_K: tl.constexpr, MASK_C: tl.constexpr, PLANE_MASK: tl.constexpr, FENCE: tl.constexpr,
                   NUM_STAGES: tl.constexpr, X_VEC: tl.constexpr, USE_ASM: tl.constexpr, X_ASM: tl.constexpr,
                   PDL: tl.constexpr,
                   xr_ptr=None, res_ptr=None, g_ptr=None, y2_ptr=None, stride_xrm=0, stride_rm=0, stride_y2m=0,
                   eps=0.0, NORM: tl.constexpr = False, RESIDUAL: tl.constexpr = False,
                   GAIN: tl.constexpr = False, SWIGLU: tl.constexpr = False, BK: tl.constexpr = 1024):
    """y[m, rows] for one activation row m (grid axis 0) and BN weight rows, on the CUDA cores.

    At m = 1 or 2 a decode step is a matrix-vector product, and the tensor-core kernel pads the activation side
    to 16 and waits on each wgmma plane; this kernel instead streams the packed rows as int32 words (16-byte
    loads, BC words per row and step) and spends three instructions per weight: one and that keeps the digit
    and the exponent bits of 2^23 (the float is then 2^23 + digit * 2^p), one fadd that subtracts 2^23 + 2^p
    (giving trit * 2^p, exact), and one fma with the activation times 2^-p (exact, done once per activation
    value and shared by the rows a thread holds). Products are exact and summed in fp32, as on the tensor
    cores. Byte e of word c holds plane i's trit for column i * Q + 4c + e.

    PDL (programmatic dependent launch, on the GPU): the kernel lets the next launch start at once, and loads
    its first weight tile before waiting for the previous launch to finish: weights never depend on an earlier
    kernel, so their first trip to memory overlaps the previous kernel's tail. Everything that reads
    activations or writes memory comes after the wait.

    Split-k (grid axis 2) and the arrival counter work as in tq_matmul_kernel; SCALE_MODE as there (mode 2's
    column scales were applied to x before the launch).

    The fused epilogue (decode steps; ``plans.Fusion``) takes the small kernels around the product into it:
    - NORM: x holds a row already multiplied by an RMSNorm gain, and xr_ptr the row before it; the sums are
      multiplied by 1 / sqrt(mean(xr^2) + eps), computed by each program (K values from the L2), so the
      product is that of the normalised row;
    - SWIGLU: the weight rows are [gate; up] halves (N = 2 I); program pid_n takes gate and up rows
      pid_n * BN / 2 .. in pairs and stores silu(gate) * up, I outputs per activation row;
    - RESIDUAL: stores the product plus res (rounded like the two separate ops); GAIN also stores that sum
      times the gain g (the next RMSNorm's, the x of the next NORM product) in y2."""
    if PDL:
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    QW = Q // 4
    rn = pid_n * BN + tl.arange(0, BN)
    rc = tl.arange(0, BC)
    row_of, _ = _program_rows(pid_n, N, BN, SWIGLU)
    # rows past N read row N - 1 (unmasked 16-byte loads); their sums are never stored
    rows = tl.minimum(row_of, N - 1)
    words = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None].to(tl.int64) * QW
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    c_start = pid_k * C_PER_SPLIT
    c_end = tl.minimum(c_start + C_PER_SPLIT, QW)
    # the first step is peeled: its weights load before the PDL wait
    c = tl.max_contiguous(tl.multiple_of(c_start + rc, BC), BC)
    wv = _gemv_load(words, c, c_end, MASK_C)
    if PDL:
        gdc_wait()
    acc = _gemv_step(tl.zeros((BN, BC), dtype=tl.float32), wv, c, c_end, x_row, K, Q, G, MASK_C, PLANE_MASK,
                     X_VEC, USE_ASM, X_ASM)
    for c0 in tl.range(c_start + BC, c_end, BC, num_stages=NUM_STAGES):
        c = tl.max_contiguous(tl.multiple_of(c0 + rc, BC), BC)
        wv = _gemv_load(words, c, c_end, MASK_C)
        acc = _gemv_step(acc, wv, c, c_end, x_row, K, Q, G, MASK_C, PLANE_MASK, X_VEC, USE_ASM, X_ASM)
    out = tl.sum(acc, axis=1)
    if SCALE_MODE == 0:
        out = out * tl.load(s_ptr).to(tl.float32)
    elif SCALE_MODE == 1:
        out = out * tl.load(s_ptr + _shard_of(rows, N, P)).to(tl.float32)
    rm = pid_m + tl.arange(0, 1)  # the epilogue's [BN, 1] tile: this program's activation row
    if not SPLIT_K:
        _tile_finish(out[:, None], rn, rm, pid_n, M, N, K, y_ptr, stride_ym, xr_ptr, stride_xrm, eps, res_ptr,
                     stride_rm, g_ptr, y2_ptr, stride_y2m, NORM, RESIDUAL, GAIN, SWIGLU, BN, BK)
    else:
        # partial sums in slots of the program's BN local rows (BN * programs per activation row: with SWIGLU
        # that can pass N)
        S = tl.num_programs(2)
        NS = tl.num_programs(1) * BN
        tile = pid_m * tl.num_programs(1) + pid_n
        slot = ws_ptr + (pid_k * M + pid_m).to(tl.int64) * NS + rn
        if _publish_partial(slot, out, None, cnt_ptr, tile, 1, pid_k, FENCE) == S - 1:
            _gpu_fence(pid_k, FENCE)
            total = tl.zeros((BN,), dtype=tl.float32)
            for s in range(0, S):
                total += tl.load(ws_ptr + (s * M + pid_m).to(tl.int64) * NS + rn, cache_modifier=".cg")
            if NORM or SWIGLU or RESIDUAL:
                _tile_finish(total[:, None], rn, rm, pid_n, M, N, K, y_ptr, stride_ym, xr_ptr, stride_xrm, eps,
                             res_ptr, stride_rm, g_ptr, y2_ptr, stride_y2m, NORM, RESIDUAL, GAIN, SWIGLU, BN, BK)
                tl.atomic_xchg(cnt_ptr + tile, 0)
            else:  # the plain product: a 1-D store (the [BN, 1] tile costs this path 5 registers, sm_90a)
                _finish_tile(y_ptr + pid_m.to(tl.int64) * stride_ym + rn, total, rn < N, cnt_ptr, tile)
