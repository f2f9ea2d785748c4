"""Hopper (sm_90) Gluon kernel for the packed ternary product at decode-sized m (1..16).

Same product and layout as ``tq_triton.tq_matmul_kernel`` (``acc[64 weight rows, BM rows of x] = W @ x^T``,
register-A ``wgmma`` on decoded planes, split-k with per-split fp32 slots), written in Gluon
(``triton.experimental.gluon``) so that the layouts are ours rather than the compiler's:

* **Weights go from global memory straight to the registers of the tensor-core A fragment**, as 32-bit words,
  16 or 32 bytes per thread and row per K step (BJ = 64 or 128 bytes per row), two steps ahead: no
  shared-memory round trip, no per-stage barrier, no 2-byte shared loads. This works because the reduction
  order of a matrix product is free: a thread's contiguous bytes are given the K positions that the thread
  holds in wgmma's A fragment (``_byte_of_k``), and the activations are laid out in shared memory in the same
  permuted order.
* **The activations of a program's whole K range are loaded once**, at the start, into shared memory (the
  B operand), so the loop streams only weights.
* Each K step issues its G planes' ``wgmma`` back to back (asynchronous, one accumulator), then waits once.
  (Waiting only just before the next step's, so that the next decode overlaps them, gave wrong results on an
  H100, 2026-12-07: the in-flight wgmma reads its A fragments from registers the next decode may reuse.)

The weight tile's register layout is given explicitly (``_word_layout``): every thread holds rows
16w + 8h + g (warp w, g = lane / 4, h = 0, 1), the rows wgmma's fragment gives it, and BJ / 4 consecutive bytes
at (BJ / 4) * (lane % 4). Each word is broadcast four times along a third axis, so that one ``pack=4`` inline-PTX
call (``ptx.word_decode_asm``) sees one word and writes the half2 registers of its four bytes for every plane;
a reshape/permute then renames K positions so that each plane's tensor *is* the A fragment, which
``convert_layout(..., assert_trivial=True)`` checks at compile time (no data movement).

Requires Triton with Gluon (>= 3.5; written against 3.6) and an sm_90 GPU. ``dispatch`` falls back to the
portable ``triton.language`` kernel where this cannot compile.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

BN = gl.constexpr(64)   # weight rows per program: one warpgroup's wgmma M
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after Triton 3.6


@gluon.constexpr_function
def _word_layout(BJ):
    # [BN rows, BJ / 4 words, 4 copies]: the weight tile as 32-bit words (4 packed bytes each), each word broadcast
    # 4 times along the last axis so that a pack=4 inline-asm call sees one word and writes its 4 bytes' values.
    # Registers: the 4 copies, then BJ / 16 consecutive words (16-byte loads), then row + 8; lanes: word groups
    # (lane bits 0-1) and rows 1, 2, 4 (lane bits 2-4); warps: rows 16, 32. Rows match wgmma's A fragment.
    w = BJ // 16  # words per thread and row
    word_regs = [[0, 1 << i, 0] for i in range(w.bit_length() - 1)]
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2]] + word_regs + [[8, 0, 0]],
        lane_bases=[[0, w, 0], [0, 2 * w, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, BJ // 4, 4])


@gluon.jit
def _byte_of_k(kap, BJ: gl.constexpr):
    """Byte column (within a K step of BJ bytes) whose digit sits at K position `kap` of a plane's A operand.

    wgmma's A fragment gives lane t = lane % 4 the K positions 16c + 8e1 + 2t + e0 (c < BJ / 16, e1, e0 < 2);
    the thread loaded bytes (BJ / 4) t + 4c + 2e1 + e0. Both sides of the product use this map."""
    return (BJ // 4) * ((kap >> 1) & 3) + 4 * (kap >> 4) + 2 * ((kap >> 3) & 1) + (kap & 1)


@gluon.jit
def _load_words(w_ptr, rows, words, row_ok, jw, jw_end, QW):
    """The [BN, 16] int32 words at word column jw (4 bytes each); rows past N and words past jw_end load 0."""
    mask = row_ok[:, None] & ((jw + words) < jw_end)[None, :]
    return gl.load(w_ptr + rows[:, None].to(gl.int64) * QW + (jw + words)[None, :], mask=mask, other=0)


@gluon.jit
def _plane_mma(p, xs, acc, A_LAYOUT: gl.constexpr, BJ: gl.constexpr):
    # [BN, word w, byte e] -> byte column 4w + e = (BJ / 4) t + 4c + 2e1 + e0 -> K position 16c + 8e1 + 2t + e0
    # (a renaming of each thread's registers: convert_layout checks that it moves nothing)
    a = gl.reshape(p, [BN, 4, BJ // 16, 2, 2])
    a = gl.permute(a, (0, 2, 3, 1, 4))
    a = gl.reshape(a, [BN, BJ])
    a = gl.convert_layout(a, A_LAYOUT, assert_trivial=True)
    return warpgroup_mma(a, xs.permute((1, 0)), acc, is_async=True)


@gluon.jit
def _decode(w, x_ptr, G: gl.constexpr, ASM: gl.constexpr, BJ: gl.constexpr):
    """One [BN, BJ / 4 words] tile -> G planes of [BN, BJ / 4, 4] values (-1/0/+1, x's dtype), word layout."""
    wb = gl.broadcast(gl.expand_dims(w, 2), gl.full([BN, BJ // 4, 4], 0, gl.int32, layout=_word_layout(BJ)))[0]
    return _decode_planes(wb, x_ptr, G, ASM)


@gluon.jit
def _decode_planes(wb, x_ptr, G: gl.constexpr, ASM: gl.constexpr):
    """Words broadcast 4 times along their last axis -> G planes of -1/0/+1 in x's dtype, same layout."""
    ET = x_ptr.dtype.element_ty
    if G == 4:
        planes = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [wb], dtype=(ET, ET, ET, ET),
                                           is_pure=True, pack=4)
    else:
        planes = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [wb],
                                           dtype=(ET, ET, ET, ET, ET), is_pure=True, pack=4)
    return planes


@gluon.jit
def _issue(planes, acc, x_smem, slot, G: gl.constexpr, A_LAYOUT: gl.constexpr, BJ: gl.constexpr):
    """The G planes' wgmma, asynchronous, back to back (one accumulator: the tensor cores chain them)."""
    acc = _plane_mma(planes[0], x_smem.index(slot), acc, A_LAYOUT, BJ)
    acc = _plane_mma(planes[1], x_smem.index(slot + 1), acc, A_LAYOUT, BJ)
    acc = _plane_mma(planes[2], x_smem.index(slot + 2), acc, A_LAYOUT, BJ)
    acc = _plane_mma(planes[3], x_smem.index(slot + 3), acc, A_LAYOUT, BJ)
    if G == 5:
        acc = _plane_mma(planes[4], x_smem.index(slot + 4), acc, A_LAYOUT, BJ)
    return acc


@gluon.jit
def _shard_of(idx, size, P):
    base = size // P
    extra = size - base * P
    big = base + 1
    head = extra * big
    return gl.where(idx < head, idx // big, extra + (idx - head) // gl.maximum(base, 1))


@gluon.jit
def _finish(acc, rn, rm, s_ptr, P, M, N, y_ptr, stride_ym, ws_ptr, cnt_ptr, pid_n, pid_k,
            SCALE_MODE: gl.constexpr, SPLIT_K: gl.constexpr, rows=None, xr_ptr=None, stride_xrm=0, K=0, eps=0.0,
            res_ptr=None, stride_rm=0, g_ptr=None, y2_ptr=None, stride_y2m=0, NORM: gl.constexpr = False,
            SWIGLU: gl.constexpr = False, RESIDUAL: gl.constexpr = False, GAIN: gl.constexpr = False,
            BK: gl.constexpr = 1024):
    """Scale the [rows, m] fp32 tile `acc` (program rows rn, activation rows rm, in acc's layout) and store it:
    directly, or as tq_triton does for split-k: each split stores its partial tile in its own fp32 slot; the last
    to arrive (counter) sums the slots in split order (bitwise reproducible), writes y and re-zeroes the counter.
    SCALE_MODE as in tq_triton (mode 2 was applied to x before the launch). The fused epilogue (NORM, SWIGLU,
    RESIDUAL, GAIN) is tq_triton.tq_gemv_kernel's; `rows`: the weight row of each program row (SWIGLU pairs
    them), rn where None."""
    if rows is None:
        rows = rn
    if SCALE_MODE == 0:
        acc = acc * gl.load(s_ptr).to(gl.float32)
    elif SCALE_MODE == 1:
        s_row = gl.load(s_ptr + _shard_of(rows, N, P), mask=rows < N, other=0.0).to(gl.float32)
        acc = acc * s_row[:, None]
    if not SPLIT_K:
        _store_out(acc, rn, rm, M, N, y_ptr, stride_ym, pid_n, xr_ptr, stride_xrm, K, eps, res_ptr, stride_rm,
                   g_ptr, y2_ptr, stride_y2m, NORM, SWIGLU, RESIDUAL, GAIN, BK)
    else:
        # one slot per program row (with SWIGLU the program rows pass N)
        S = gl.num_programs(1)
        NS = gl.num_programs(0) * acc.shape[0]
        slot_mask = rm[None, :] < M
        gl.store(ws_ptr + (pid_k * M + rm[None, :]).to(gl.int64) * NS + rn[:, None], acc, mask=slot_mask)
        _cta_barrier()
        if gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == S - 1:
            total = gl.zeros_like(acc)
            for sk in range(0, S):
                total += gl.load(ws_ptr + (sk * M + rm[None, :]).to(gl.int64) * NS + rn[:, None], mask=slot_mask,
                                 other=0.0, cache_modifier=".cg")
            _store_out(total, rn, rm, M, N, y_ptr, stride_ym, pid_n, xr_ptr, stride_xrm, K, eps, res_ptr, stride_rm,
                       g_ptr, y2_ptr, stride_y2m, NORM, SWIGLU, RESIDUAL, GAIN, BK)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)


@gluon.jit
def _row_rsqrt(xr_ptr, stride_xrm, M, K, eps, BM: gl.constexpr, BK: gl.constexpr, OUT_LAYOUT: gl.constexpr):
    """1 / sqrt(mean(xr[m]^2) + eps) of activation rows m < BM (0 past M), summed in fp32, in OUT_LAYOUT."""
    # [BM, BK] per step, 4 values per thread and row (few registers: the epilogue must not lower occupancy)
    RL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32],
                                        warps_per_cta=[1, gl.num_warps()], order=[1, 0])
    m = gl.arange(0, BM, layout=gl.SliceLayout(1, RL))
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, RL))
    ss = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, RL))
    for k0 in range(0, K, BK):
        v = gl.load(xr_ptr + m[:, None].to(gl.int64) * stride_xrm + (k0 + cols)[None, :],
                    mask=(m[:, None] < M) & ((k0 + cols) < K)[None, :], other=0.0).to(gl.float32)
        ss += gl.sum(v * v, axis=1)
    r = 1.0 / gl.sqrt(ss / K + eps)
    return gl.convert_layout(r, OUT_LAYOUT)


@gluon.jit
def _store_out(acc, rn, rm, M, N, y_ptr, stride_ym, pid_n, xr_ptr, stride_xrm, K, eps, res_ptr, stride_rm, g_ptr,
               y2_ptr, stride_y2m, NORM: gl.constexpr, SWIGLU: gl.constexpr, RESIDUAL: gl.constexpr,
               GAIN: gl.constexpr, BK: gl.constexpr):
    """Store the scaled [rows, m] sums after the fused epilogue (tq_triton._tile_finish's): the RMSNorm factor of
    each activation row, silu(gate) * up of the program's two row halves (through shared memory), the residual
    add, the gained sum."""
    DT: gl.constexpr = y_ptr.dtype.element_ty
    R: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    if NORM:
        acc = acc * _row_rsqrt(xr_ptr, stride_xrm, M, K, eps, BM, BK, rm.type.layout)[None, :]
    if SWIGLU:
        # program rows [0, R / 2) are gate rows, [R / 2, R) the up rows of the same outputs
        HL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32 // BM, BM],
                                            warps_per_cta=[gl.num_warps(), 1], order=[1, 0])
        smem = gl.allocate_shared_memory(gl.float32, [R, BM],
                                         gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
        smem.store(acc)
        _cta_barrier()
        gate = smem.slice(0, R // 2).load(HL).to(DT).to(gl.float32)
        up = smem.slice(R // 2, R // 2).load(HL).to(DT).to(gl.float32)
        y = ((gate / (1.0 + gl.exp(-gate))).to(DT).to(gl.float32) * up).to(DT)
        jj = pid_n * (R // 2) + gl.arange(0, R // 2, layout=gl.SliceLayout(1, HL))
        mm = gl.arange(0, BM, layout=gl.SliceLayout(0, HL))
        n_out = N // 2
    else:
        y = acc.to(DT)
        jj = rn
        mm = rm
        n_out = N
    out_mask = (jj[:, None] < n_out) & (mm[None, :] < M)
    if RESIDUAL:
        res = gl.load(res_ptr + mm[None, :].to(gl.int64) * stride_rm + jj[:, None], mask=out_mask, other=0.0)
        y = (y.to(gl.float32) + res.to(gl.float32)).to(DT)
    gl.store(y_ptr + mm[None, :].to(gl.int64) * stride_ym + jj[:, None], y, mask=out_mask)
    if GAIN:
        gain = gl.load(g_ptr + jj, mask=jj < n_out, other=0.0).to(gl.float32)
        gl.store(y2_ptr + mm[None, :].to(gl.int64) * stride_y2m + jj[:, None],
                 (y.to(gl.float32) * gain[:, None]).to(DT), mask=out_mask)


@gluon.jit
def tq_gemv_gluon_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                         M, N, K, Q, stride_xm, stride_ym, P, J_PER_SPLIT,
                         G: gl.constexpr, SCALE_MODE: gl.constexpr, BM: gl.constexpr, SLOTS: gl.constexpr,
                         SPLIT_K: gl.constexpr, ASM: gl.constexpr, BJ: gl.constexpr):
    """y[m, n] = sum_k x[m, k] * trit[n, k] * scale for m <= BM (8 or 16); program (pid_n, pid_k) does weight
    rows pid_n * 64.. over the byte columns pid_k * J_PER_SPLIT.. (at most SLOTS / G steps of BJ = 64 or 128
    bytes per row: 16 or 32 bytes per thread and row).
    SCALE_MODE as in tq_triton (mode 2 was applied to x before the launch)."""
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    WL: gl.constexpr = gl.SliceLayout(2, _word_layout(BJ))
    XL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 2], threads_per_warp=[1, 32], warps_per_cta=[4, 1],
                                        order=[1, 0])
    X_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    j_start = pid_k * J_PER_SPLIT
    j_end = gl.minimum(j_start + J_PER_SPLIT, Q)
    n_steps = gl.cdiv(j_end - j_start, BJ)

    # The activations of this K range, in the permuted K order of _byte_of_k, one [BM, BJ] slot per (step, plane).
    x_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [SLOTS, BM, BJ], X_SMEM)
    kap = gl.arange(0, BJ, layout=gl.SliceLayout(0, XL))
    xrow = gl.arange(0, BM, layout=gl.SliceLayout(1, XL))
    xcol = _byte_of_k(kap, BJ)
    xrow_ok = xrow < M
    x_rows = x_ptr + xrow[:, None].to(gl.int64) * stride_xm
    for s in range(n_steps):
        j = j_start + s * BJ + xcol
        j_ok = j < j_end
        for i in gl.static_range(G):
            col = i * Q + j
            v = gl.load(x_rows + col[None, :], mask=xrow_ok[:, None] & (j_ok & (col < K))[None, :], other=0.0)
            x_smem.index(s * G + i).store(v)
    fence_async_shared()
    _cta_barrier()

    # Weights: global -> registers as 32-bit words, two K steps ahead of the tensor cores.
    wp = w_ptr.to(gl.pointer_type(gl.int32))  # rows are 16-byte aligned (formats.ROW_ALIGN_BYTES)
    QW = Q // 4
    jw0 = j_start // 4
    jw_end = j_end // 4
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, WL))
    words = gl.arange(0, BJ // 4, layout=gl.SliceLayout(0, WL))
    row_ok = rows < N
    b0 = _load_words(wp, rows, words, row_ok, jw0, jw_end, QW)
    b1 = _load_words(wp, rows, words, row_ok, jw0 + BJ // 4, jw_end, QW)
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
    for s in range(n_steps):
        b2 = _load_words(wp, rows, words, row_ok, jw0 + (s + 2) * (BJ // 4), jw_end, QW)
        planes = _decode(b0, x_ptr, G, ASM, BJ)
        acc = _issue(planes, acc, x_smem, s * G, G, A_LAYOUT, BJ)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        b0 = b1
        b1 = b2

    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    rm = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    _finish(acc, rn, rm, s_ptr, P, M, N, y_ptr, stride_ym, ws_ptr, cnt_ptr, pid_n, pid_k, SCALE_MODE, SPLIT_K)


# --- the streaming kernel (mma.sync, no shared memory) ------------------------------------------------------

STREAM_BJ = gl.constexpr(64)  # packed bytes per row and K step (16 per thread and row); four steps in flight


@gluon.constexpr_function
def _stream_word_layout(W):
    # [16 W rows, 16 words, 4 copies]: the word layout above at BJ = 64 with W warps of 16 rows each (the rows of
    # an mma.sync A fragment: lane g = lane / 4 holds rows g and g + 8 of its warp's 16)
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [8, 0, 0]],
        lane_bases=[[0, 4, 0], [0, 8, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16 << i, 0, 0] for i in range(W.bit_length() - 1)], block_bases=[], shape=[16 * W, 16, 4])


@gluon.constexpr_function
def _stream_x_layout(W):
    # [64 byte columns, 8 rows of x]: lane (g, t) holds the 16 contiguous columns 16t.. of x row g, the K positions
    # its B fragment takes after _stream_step's renaming; every warp holds the same tile
    return gl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0], [4, 0], [8, 0]],
        lane_bases=[[16, 0], [32, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 0] for _ in range(W.bit_length() - 1)], block_bases=[], shape=[64, 8])


@gluon.jit
def _stream_step(w, x_rows, xrow_ok, cols, j, j_end, Q, K, acc, G: gl.constexpr, ASM: gl.constexpr,
                 W: gl.constexpr, A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr):
    """The G planes of one 64-byte step: decode into A fragments, B fragments from global memory, mma.sync."""
    wb = gl.broadcast(gl.expand_dims(w, 2), gl.full([16 * W, 16, 4], 0, gl.int32, layout=_stream_word_layout(W)))[0]
    planes = _decode_planes(wb, x_rows, G, ASM)
    # Masks per thread's 16 columns (a 16-column group is all in or all out: Q, j and K are multiples of 16), so
    # the two 16-byte loads stay vector loads: columns past this split's bytes belong to the next plane, columns
    # past K hold padding trits (0) whose activations must still not be read.
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
def tq_stream_gluon_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                           M, N, K, Q, stride_xm, stride_ym, P, J_PER_SPLIT,
                           G: gl.constexpr, SCALE_MODE: gl.constexpr, SPLIT_K: gl.constexpr, ASM: gl.constexpr,
                           W: gl.constexpr, PDL: gl.constexpr,
                           xr_ptr, res_ptr, g_ptr, y2_ptr, stride_xrm, stride_rm, stride_y2m, eps,
                           NORM: gl.constexpr, RESIDUAL: gl.constexpr, GAIN: gl.constexpr, SWIGLU: gl.constexpr,
                           BK: gl.constexpr):
    """y[m, n] = sum_k x[m, k] * trit[n, k] * scale for m <= 8 and K a multiple of 16; program (pid_n, pid_k) does
    weight rows pid_n * 16 W.. over the byte columns pid_k * J_PER_SPLIT.. (a multiple of 64 bytes).

    Streams like the CUDA-core GEMV (each warp 16 rows, four 64-byte steps per row in flight in registers, no
    shared memory, the first steps loaded before the PDL wait) and multiplies like the kernel above (weights
    decoded straight into A fragments, ``_byte_of_k``'s K order), on mma.sync m16n8k16; each thread loads its
    B fragment (16 contiguous activations per plane: two 16-byte loads, L1/L2 hits after the first program).

    NORM, SWIGLU, RESIDUAL, GAIN: tq_triton.tq_gemv_kernel's fused epilogue (with SWIGLU program pid_n takes gate
    rows pid_n * 8 W .. in its first 8 W rows and the up rows of the same outputs in the rest)."""
    if PDL:
        gdc_launch_dependents()
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    WL: gl.constexpr = gl.SliceLayout(2, _stream_word_layout(W))
    XL: gl.constexpr = _stream_x_layout(W)

    j_start = pid_k * J_PER_SPLIT
    j_end = gl.minimum(j_start + J_PER_SPLIT, Q)
    n_steps = gl.cdiv(j_end - j_start, STREAM_BJ)
    wp = w_ptr.to(gl.pointer_type(gl.int32))  # rows are 16-byte aligned (formats.ROW_ALIGN_BYTES)
    QW = Q // 4
    jw0 = j_start // 4
    jw_end = j_end // 4
    rows, row_ok = _stream_rows(pid_n, N, W, SWIGLU, gl.SliceLayout(1, WL))
    words = gl.arange(0, 16, layout=gl.SliceLayout(0, WL))
    b0 = _load_words(wp, rows, words, row_ok, jw0, jw_end, QW)
    b1 = _load_words(wp, rows, words, row_ok, jw0 + 16, jw_end, QW)
    b2 = _load_words(wp, rows, words, row_ok, jw0 + 32, jw_end, QW)
    b3 = _load_words(wp, rows, words, row_ok, jw0 + 48, jw_end, QW)
    if PDL:
        gdc_wait()  # the activations (and y, ws) belong to the kernels before this one

    cols = gl.arange(0, 64, layout=gl.SliceLayout(1, XL))
    xrow = gl.arange(0, 8, layout=gl.SliceLayout(0, XL))
    xrow_ok = xrow < M
    x_rows = x_ptr + xrow[None, :].to(gl.int64) * stride_xm
    acc = gl.zeros([16 * W, 8], gl.float32, layout=MMA)
    for s in range(n_steps):
        b4 = _load_words(wp, rows, words, row_ok, jw0 + (s + 4) * 16, jw_end, QW)
        acc = _stream_step(b0, x_rows, xrow_ok, cols, j_start + s * STREAM_BJ, j_end, Q, K, acc, G, ASM, W,
                           A_LAYOUT, B_LAYOUT)
        b0 = b1
        b1 = b2
        b2 = b3
        b3 = b4

    rn = pid_n * (16 * W) + gl.arange(0, 16 * W, layout=gl.SliceLayout(1, MMA))
    rm = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    true_rows, _ = _stream_rows(pid_n, N, W, SWIGLU, gl.SliceLayout(1, MMA))
    _finish(acc, rn, rm, s_ptr, P, M, N, y_ptr, stride_ym, ws_ptr, cnt_ptr, pid_n, pid_k, SCALE_MODE, SPLIT_K,
            true_rows, xr_ptr, stride_xrm, K, eps, res_ptr, stride_rm, g_ptr, y2_ptr, stride_y2m, NORM, SWIGLU,
            RESIDUAL, GAIN, BK)


@gluon.jit
def _stream_rows(pid_n, N, W: gl.constexpr, SWIGLU: gl.constexpr, LAYOUT: gl.constexpr):
    """(weight row, whether it is a real output's) of each of a program's 16 W rows, in LAYOUT: rows
    pid_n * 16 W + i, or with SWIGLU (rows [gate; up]) gate rows pid_n * 8 W + i then the up rows of those outputs
    (past the last output: the last real row, never stored)."""
    i = gl.arange(0, 16 * W, layout=LAYOUT)
    if SWIGLU:
        half = N // 2
        j = pid_n * (8 * W) + i % (8 * W)
        return (i // (8 * W)) * half + gl.minimum(j, half - 1), j < half
    rows = pid_n * (16 * W) + i
    return rows, rows < N
