"""Decode attention over the filled part of a preallocated KV cache (split-KV, "flash-decoding").

A decode step attends one new query per sequence to the cache positions 0..pos. The cache has a fixed
length (``max_len``) so that a step can be captured once in a CUDA graph; scaled_dot_product_attention with a
mask then reads and masks the whole cache every step, so a step's time grows with ``max_len``, not with the
position reached (measured on an H100: 346 -> 288 steps/s for a 3.9B TQ2 model between max_len 128 and 4096).

Here the number of positions to read comes from the device (``pos``), so one captured graph serves every
position. One kernel, ``_decode_attn_partial``: each (sequence, head, span) program reads a span of blocks of
CHUNK positions (:func:`blocks_per_span`: one block for a short cache, more for a long one, so that a full cache
gives a few programs per SM). Every cache row of a block keeps its own running max, sum and weighted value sum
through the loop (online softmax per row, the next block's loads in flight during this block's arithmetic), and
the span's rows are merged once after it: a block needs no reduction across warps. The earlier kernel reduced
each block across its warps three times (max, sum, weighted values; each a shared-memory round trip and a
barrier) and was bound by that chain, not by bytes: 46.7 -> 38.1 us at context 8192 with an fp16 cache, 36.4 ->
31.9 us with an int8 one (H100, 24 heads x 128, batch 1). Programs whose span starts
past pos exit at once, and the last span of a (sequence, head) to finish merges them (``_merge_chunks``; a
second launch for the merge cost about 1.9 us per layer). Softmax and sums in fp32. With one block per program,
a context of 8192 left 130 partials per head to merge; spans of 6 blocks made the kernel 12% faster there
(H100, 3.9B shapes, batch 1) and the decode step 7%.

The model's decode step (:func:`decode_step_attention`) also hands the kernel the step's raw query, key and
value: the kernel applies the rotary embedding to the query (and the new key), and the program whose span
holds ``pos`` writes the new key and value into the caches and takes them for row pos, which enters the merge
after the loop (its cache row is never read). That
replaces three pointwise launches per layer (rotary q, rotary k + cache write, v cache write): on an H100 they
took about 117 us of a 1.9 ms 3.9B decode step (30 layers x 3 launches).

An int8 cache (``QUANT``) holds int8 rows with an fp32 scale each (:func:`quantize_cache_rows`, the one
definition): the kernel quantizes the step's new rows as that function does and multiplies each row's score and
softmax weight by its scale, so the tiles are never dequantized.

A prompt's prefill into a fresh cache (:func:`prefill_rope_write`) takes one kernel too: the rotary embedding of
q and k, and k and v written into cache rows 0..T-1, where PyTorch launched six per layer (roll, two products and
a sum for the rotary embedding, two ``index_copy_``): on an H100 they took about 7 ms of a 36.8 ms 3.9B forward at
2048 tokens, and at 128 tokens, where the forward is bound by its ~460 launches, the kernel leaves 150 of them
out. It rounds where those ops round, so its rows are :func:`prefill_rope_write_reference`'s bit for bit; an int8
cache keeps the PyTorch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ternary import apply_rope, apply_rope_signed
from .configs import num_sms
from .launch_support import WORKSPACE, launch
from .pointwise import fused_pointwise_applies

try:
    import triton
    import triton.language as tl

    from .tq_triton import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - CPU-only installs use the reference
    triton = None

# Cache positions per block: a block is W x R rows (block_shape), every row with its own online-softmax state.
# Measured on an H100 (docs/performance.md, eleventh session; benchmarks/bench_decode_attention.py --chunks): an
# fp16 cache is fastest at 32 rows (16 x 2) and 4 warps, an int8 cache at 64 rows (16 x 4) and 4 warps.
CHUNK = 32
SPANS_PER_SM = 4  # a long cache is cut into about this many spans per SM (over all sequences and heads)
INT8_CHUNK, INT8_WARPS = 64, 4


def blocks_per_span(length: int, rows: int, sms: int, chunk: int = CHUNK) -> int:
    """Blocks of CHUNK positions one program reads (its span) for a cache of `length` positions and `rows` =
    sequences x heads: enough spans to give every SM SPANS_PER_SM programs when the cache is full, no more
    (each span adds a partial result to merge). Fixed per cache length, so a captured graph keeps it; a short
    context is read by the first span alone, whatever its size."""
    chunks = -(-length // chunk)
    spans = max(1, -(-SPANS_PER_SM * sms // rows))
    return max(1, -(-chunks // spans))


def block_shape(chunk: int, bd: int, element_size: int) -> tuple[int, int]:
    """(W, R): a block of `chunk` cache rows as W x R, R the rows one warp's lanes cover when each lane loads 16
    bytes of a row of `bd` values, so that the kernel's warps split W (see _decode_attn_partial)."""
    lanes_per_row = max(1, min(32, bd * element_size // 16))
    r = min(chunk, 32 // lanes_per_row)
    return max(1, chunk // r), r


QUANT_LEVELS = 127  # an int8 cache row holds round(x / scale) in -127..127, scale = max |x| * (1 / 127)


def quantize_cache_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [..., D], fp32 scales [...]) of rows x [..., D] for an int8 KV cache: one scale per row
    (sequence, head, position), max |x| times the fp32 reciprocal of 127, and each value rounded (half to even) to
    a multiple of it. A row of zeros keeps scale 0."""
    xf = x.float()
    # times the reciprocal, not divided by 127: PyTorch's CUDA division by a scalar multiplies by its reciprocal
    # and its CPU one divides, so only this form gives one scale on every device (and in the decode kernel)
    scale = xf.abs().amax(-1) * (1.0 / QUANT_LEVELS)
    values = torch.round(xf / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-QUANT_LEVELS, QUANT_LEVELS)
    return values.to(torch.int8), scale


def write_cache_rows(cache: torch.Tensor, scales: torch.Tensor | None, pos: torch.Tensor, rows: torch.Tensor) -> None:
    """Write `rows` [B, H, T, D] at positions `pos` of `cache` [B, H, L, D]: as they are, or for an int8 cache
    (with its [B, H, L] `scales`) quantized by :func:`quantize_cache_rows`."""
    if scales is None:
        cache.index_copy_(2, pos, rows.to(cache.dtype))
        return
    values, row_scales = quantize_cache_rows(rows)
    cache.index_copy_(2, pos, values)
    scales.index_copy_(2, pos, row_scales)


def dequantize_cache_rows(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of an int8 KV cache ([..., D] values, [...] scales) in `dtype`."""
    return (values.float() * scales[..., None]).to(dtype)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               pos: torch.Tensor, k_scale: torch.Tensor | None = None,
                               v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over cache positions 0..pos for q [B, H, 1, D], caches [B, H, L, D] (int8 ones
    with their [B, H, L] row scales)."""
    if k_scale is not None:
        k_cache, v_cache = (dequantize_cache_rows(c, s, q.dtype) for c, s in ((k_cache, k_scale), (v_cache, v_scale)))
    mask = pos.reshape(-1)[:1, None] >= torch.arange(k_cache.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)


def rope_rows_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's rotary embedding (apply_rope) of x [..., D] with cos/sin rows [D], evaluated in fp32 and cast
    back once (as torch.compile evaluates it): what the fused decode kernel computes."""

    return apply_rope(x.float(), cos.float(), sin.float()).to(x.dtype)


def decode_step_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    pos: torch.Tensor, k_scale: torch.Tensor | None = None,
                                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch :func:`decode_step_attention`: rotary q and k, write k and v at pos (quantized, for an int8
    cache with its row scales), attend (q [B, H, 1, D])."""
    write_cache_rows(k_cache, k_scale, pos.reshape(1), rope_rows_reference(k, cos, sin))
    write_cache_rows(v_cache, v_scale, pos.reshape(1), v)
    return decode_attention_reference(rope_rows_reference(q, cos, sin), k_cache, v_cache, pos, k_scale, v_scale)


if triton is not None:

    @triton.jit
    def _rope_row(x_ptr, cos_ptr, sin_ptr, rd, d_ok, D: tl.constexpr, ROPE: tl.constexpr):
        """Row x[0..D) in fp32, rotated (half-split layout) when ROPE: x * cos + rotate_half(x) * sin."""
        x = tl.load(x_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
        if ROPE:
            half: tl.constexpr = D // 2
            partner = tl.where(rd < half, rd + half, rd - half)
            other = tl.load(x_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)
            rotated = tl.where(rd < half, -other, other)
            cos = tl.load(cos_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
            x = x * cos + rotated * sin
        return x

    @triton.jit
    def _load_rows(k_ptr, v_ptr, base, rn, n_ok, rd, d_ok, D: tl.constexpr):
        """Cache rows rn [W, R] of K and V as [W, R, BD] tiles (in the cache's dtype; rows not n_ok read as 0)."""
        offs = base + rn[:, :, None].to(tl.int64) * D + rd[None, None, :]
        kv_mask = n_ok[:, :, None] & d_ok[None, None, :]
        return tl.load(k_ptr + offs, mask=kv_mask, other=0.0), tl.load(v_ptr + offs, mask=kv_mask, other=0.0)

    @triton.jit
    def _cache_f32(x, QUANT: tl.constexpr):
        """Cache values as fp32. int8 ones (QUANT) without the int-to-float conversion instruction (a quarter-rate
        one): x added to the bits of 1.5 * 2**23 lands in the low mantissa bits, and the float minus 1.5 * 2**23
        is x, exactly."""
        if QUANT:
            return (x.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        return x.to(tl.float32)

    @triton.jit
    def _load_scales(ks_ptr, vs_ptr, sbase, rn, n_ok, QUANT: tl.constexpr):
        """Row scales of an int8 cache for rows rn (0 where not n_ok); without QUANT, none (ones)."""
        if QUANT:
            return (tl.load(ks_ptr + sbase + rn, mask=n_ok, other=0.0),
                    tl.load(vs_ptr + sbase + rn, mask=n_ok, other=0.0))
        return tl.full(rn.shape, 1.0, tl.float32), tl.full(rn.shape, 1.0, tl.float32)

    @triton.jit
    def _quantize_row(x, ok):
        """(round(x / scale) as fp32 in -127..127, scale = max |x| * (1 / 127)) for a row x (quantize_cache_rows)."""
        scale = tl.max(tl.where(ok, tl.abs(x), 0.0), axis=0) * (1.0 / 127.0)
        y = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0))  # correctly rounded, as torch divides
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        # round half to even (as torch.round): adding and taking away 1.5 * 2**23 leaves fp32 no fraction bits
        return (y + 12582912.0) - 12582912.0, scale

    @triton.jit
    def _decode_attn_partial(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, L, S, sm_scale,
                             kn_ptr, vn_ptr, cos_ptr, sin_ptr, H, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, out_ptr, cnt_ptr,
                             ks_ptr, vs_ptr,
                             D: tl.constexpr, BD: tl.constexpr, W: tl.constexpr, R: tl.constexpr, SUB: tl.constexpr,
                             BS: tl.constexpr, ROPE: tl.constexpr, WRITE: tl.constexpr, PDL: tl.constexpr,
                             QUANT: tl.constexpr):
        if PDL:  # launched with PDL: the next launch (the o projection) may start and prefetch its weights
            gdc_launch_dependents()
        bh = tl.program_id(0)  # sequence * heads + head
        c = tl.program_id(1)   # span of SUB blocks of W x R cache positions
        b = bh // H
        h = bh - b * H
        p = tl.load(pos_ptr).to(tl.int32)
        n = tl.minimum(p + 1, L)  # positions 0..pos are filled (never past L)
        CHUNK_N: tl.constexpr = W * R
        SPAN: tl.constexpr = CHUNK_N * SUB
        start = c * SPAN
        if start < n:
            end = tl.minimum(start + SPAN, n)
            rd = tl.arange(0, BD)
            d_ok = rd < D
            base = bh.to(tl.int64) * L * D
            sbase = bh.to(tl.int64) * L  # row scales of an int8 cache (QUANT): [B, H, L]
            # A block is W x R rows: a warp's lanes hold R rows of it (W is a multiple of the warps), so that every
            # row keeps its own running max, sum and weighted value sum and a block needs no reduction across warps
            # (no shared memory, no barrier); the span's rows are merged once, after the loop.
            rr = tl.arange(0, W)[:, None] * R + tl.arange(0, R)[None, :]
            holds_p = (p < start + SPAN) & (p < L)  # the span holds pos (its last filled row)
            # Rows read from the cache: start..stop. When writing, row pos comes from the step's new key and value
            # instead, and enters the merge after the loop.
            stop = end
            if WRITE:
                stop = tl.where(holds_p, p, end)
            # The span's first block is loaded before anything else: it depends only on pos, so its loads are in
            # flight at once (a decode step is a chain of short launches: each dependent round trip to memory
            # costs about a microsecond).
            k, v = _load_rows(k_ptr, v_ptr, base, start + rr, start + rr < stop, rd, d_ok, D)
            ks, vs = _load_scales(ks_ptr, vs_ptr, sbase, start + rr, start + rr < stop, QUANT)
            if PDL:
                # Under PDL the cache rows and pos above are read before waiting for the kernels before this one
                # (the q/k/v product): no kernel of a step writes them before this one (pos and the rows before
                # it were written by earlier steps, or the prefill, which a step's first, non-PDL kernel waits
                # for; row pos, which this kernel writes, is not among the rows loaded). What that product wrote
                # is read only after the wait. Programs past pos exit without waiting; span 0's waits, so the
                # grid still ends after its predecessor.
                gdc_wait()
            q = _rope_row(q_ptr + b * sq_b + h * sq_h, cos_ptr, sin_ptr, rd, d_ok, D, ROPE)
            q = q.to(q_ptr.dtype.element_ty).to(tl.float32)  # the rotated query is rounded like the reference's
            q3 = q[None, None, :]
            m = tl.full((W, R), float("-inf"), tl.float32)
            l_rows = tl.zeros((W, R), tl.float32)
            acc = tl.zeros((W, R, BD), tl.float32)
            for s0 in range(start, stop, CHUNK_N):
                rn = s0 + rr
                n_ok = rn < stop
                # the next block's loads go out before this block's arithmetic (two blocks in flight)
                k_next, v_next = _load_rows(k_ptr, v_ptr, base, rn + CHUNK_N, rn + CHUNK_N < stop, rd, d_ok, D)
                ks_next, vs_next = _load_scales(ks_ptr, vs_ptr, sbase, rn + CHUNK_N, rn + CHUNK_N < stop, QUANT)
                # an int8 row's values times its scale: the score and the softmax weight take the scale, so the
                # tiles are never dequantized
                scores = tl.sum(_cache_f32(k, QUANT) * q3, axis=2) * ks * sm_scale
                scores = tl.where(n_ok, scores, float("-inf"))
                m_new = tl.maximum(m, scores)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing read yet stays empty
                alpha = tl.exp(m - m_use)
                e = tl.exp(scores - m_use)
                l_rows = l_rows * alpha + e
                acc = acc * alpha[:, :, None] + (e * vs)[:, :, None] * _cache_f32(v, QUANT)
                m = m_new
                k = k_next
                v = v_next
                ks = ks_next
                vs = vs_next
            # The span's rows merged (rows that read nothing have max -inf and weigh 0), with the new row.
            m_span = tl.max(tl.max(m, axis=1), axis=0)
            k_new = tl.zeros((BD,), tl.float32)
            v_new = tl.zeros((BD,), tl.float32)
            ks_new = tl.max(tl.full((R,), 1.0, tl.float32), axis=0)  # a floating-point cache's rows: scale 1
            vs_new = ks_new
            if WRITE:
                if holds_p:
                    # The program whose span holds pos stores the step's key (rotated) and value, and takes them
                    # for row pos.
                    k_row = _rope_row(kn_ptr + b * sk_b + h * sk_h, cos_ptr, sin_ptr, rd, d_ok, D, ROPE)
                    v_row = tl.load(vn_ptr + b * sv_b + h * sv_h + rd, mask=d_ok, other=0.0)
                    row = base + p.to(tl.int64) * D + rd
                    if QUANT:
                        # the rotated key rounded to the activation dtype first, as the reference's is
                        k_new, ks_new = _quantize_row(k_row.to(kn_ptr.dtype.element_ty).to(tl.float32), d_ok)
                        v_new, vs_new = _quantize_row(v_row.to(tl.float32), d_ok)
                        tl.store(k_ptr + row, k_new.to(tl.int8), mask=d_ok)
                        tl.store(v_ptr + row, v_new.to(tl.int8), mask=d_ok)
                        tl.store(ks_ptr + sbase + p, ks_new)
                        tl.store(vs_ptr + sbase + p, vs_new)
                    else:
                        k_row = k_row.to(k_ptr.dtype.element_ty)
                        v_row = v_row.to(v_ptr.dtype.element_ty)
                        tl.store(k_ptr + row, k_row, mask=d_ok)
                        tl.store(v_ptr + row, v_row, mask=d_ok)
                        k_new = k_row.to(tl.float32)
                        v_new = v_row.to(tl.float32)
            score_new = tl.sum(k_new * q, axis=0) * ks_new * sm_scale
            has_new = holds_p & WRITE
            m_all = tl.where(has_new, tl.maximum(m_span, score_new), m_span)  # finite: the span holds a filled row
            f = tl.exp(m - m_all)
            l_sum = tl.sum(tl.sum(l_rows * f, axis=1), axis=0)
            acc = tl.sum(tl.sum(acc * f[:, :, None], axis=1), axis=0)
            e_new = tl.where(has_new, tl.exp(score_new - m_all), 0.0)
            l_sum = l_sum + e_new
            acc = acc + (e_new * vs_new) * v_new
            m = m_all
            used = (n + SPAN - 1) // SPAN
            if used == 1:
                # One span holds every filled position: the result directly, without the partial slots,
                # the arrival counter and the merge (three dependent round trips to memory fewer).
                tl.store(out_ptr + bh * D + rd, (acc / l_sum).to(out_ptr.dtype.element_ty), mask=d_ok)
            else:
                slot = bh * S + c
                tl.store(m_ptr + slot, m)
                tl.store(l_ptr + slot, l_sum)
                tl.store(acc_ptr + slot.to(tl.int64) * D + rd, acc, mask=d_ok)
                # The last of the (sequence, head)'s spans to finish merges them (an arrival counter, as the
                # split-k matmul does): no second launch. The CTA barrier before the acq_rel atomic orders every
                # thread's stores (release is cumulative); the merging program reads the slots from L2.
                tl.debug_barrier()
                if tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel") == used - 1:
                    _merge_chunks(m_ptr, l_ptr, acc_ptr, out_ptr, bh, used, S, rd, d_ok, D, BS)
                    tl.atomic_xchg(cnt_ptr + bh, 0)

    @triton.jit
    def _merge_chunks(m_ptr, l_ptr, acc_ptr, out_ptr, bh, used, S, rd, d_ok, D: tl.constexpr, BS: tl.constexpr):
        """out[bh] from the running max, sum and weighted value sum of its `used` chunks (fp32)."""
        m_all = tl.full((BS,), float("-inf"), dtype=tl.float32)
        for s0 in range(0, used, BS):  # the largest chunk maximum first
            rs = s0 + tl.arange(0, BS)
            m_all = tl.maximum(m_all, tl.load(m_ptr + bh * S + rs, mask=rs < used, other=float("-inf"),
                                              cache_modifier=".cg"))
        m_max = tl.max(m_all, axis=0)
        num = tl.zeros_like(rd).to(tl.float32)
        den = tl.zeros((BS,), dtype=tl.float32)
        for s0 in range(0, used, BS):
            rs = s0 + tl.arange(0, BS)
            ok = rs < used
            w = tl.exp(tl.load(m_ptr + bh * S + rs, mask=ok, other=float("-inf"), cache_modifier=".cg") - m_max)
            den += w * tl.load(l_ptr + bh * S + rs, mask=ok, other=0.0, cache_modifier=".cg")
            part = tl.load(acc_ptr + (bh * S + rs[:, None]).to(tl.int64) * D + rd[None, :],
                           mask=ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
            num += tl.sum(w[:, None] * part, axis=0)
        out = num / tl.sum(den, axis=0)
        tl.store(out_ptr + bh * D + rd, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check_decode_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    b, h, t, d = q.shape
    if t != 1 or k_cache.shape != v_cache.shape or k_cache.shape[:2] != (b, h) or k_cache.shape[3] != d:
        raise ValueError(f"decode_attention needs q [B, H, 1, D] and caches [B, H, L, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if pos.numel() != 1:
        raise ValueError(f"decode_attention takes one position shared by the batch, got {pos.numel()}")
    int8 = k_cache.dtype == torch.int8
    if int8 != (v_cache.dtype == torch.int8) or int8 != (k_scale is not None) or int8 != (v_scale is not None):
        raise ValueError("an int8 KV cache (both caches int8) comes with its row scales, k_scale and v_scale; a "
                         "floating-point one without")
    if int8:
        for scale in (k_scale, v_scale):
            if scale.shape != k_cache.shape[:3] or scale.dtype != torch.float32 or not scale.is_contiguous():
                raise ValueError(f"an int8 cache's row scales are contiguous fp32 [B, H, L] = "
                                 f"{tuple(k_cache.shape[:3])}, got {scale.dtype} {tuple(scale.shape)}")


def _launch(q, k_cache, v_cache, pos, new_k, new_v, cos, sin, k_scale=None, v_scale=None, sub: int | None = None,
            warps: int | None = None, chunk: int | None = None) -> torch.Tensor:
    b, h, _, d = q.shape
    length = k_cache.shape[2]
    quant = k_scale is not None
    chunk = chunk or (INT8_CHUNK if quant else CHUNK)
    warps = warps or (INT8_WARPS if quant else 4)
    w, r = block_shape(chunk, triton.next_power_of_2(d), k_cache.element_size())
    if sub is None:
        sub = blocks_per_span(length, b * h, num_sms(q.device) if q.is_cuda else 1, chunk)  # CPU: the interpreter
    splits = triton.cdiv(length, chunk * sub)
    m = torch.empty(b * h * splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h * splits, d, dtype=torch.float32, device=q.device)
    out = torch.empty((b, h, 1, d), dtype=q.dtype, device=q.device)
    # arrival counters, one per (sequence, head): the matmuls' (left at zero by every kernel that uses them)
    _, counters = WORKSPACE.get(q.device, 1, b * h)
    write = new_k is not None
    rope = cos is not None
    kn, vn = (new_k, new_v) if write else (q, q)  # unused pointers when not writing
    cs, sn = (cos, sin) if rope else (q, q)
    ks, vs = (k_scale, v_scale) if quant else (m, m)  # unused pointers for a floating-point cache
    launch(_decode_attn_partial, (b * h, splits),
           dict(q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, pos_ptr=pos, m_ptr=m, l_ptr=l_sum, acc_ptr=acc, kn_ptr=kn,
                vn_ptr=vn, cos_ptr=cs, sin_ptr=sn, out_ptr=out, cnt_ptr=counters, ks_ptr=ks, vs_ptr=vs),
           dict(L=length, S=splits, sm_scale=d ** -0.5, H=h, sq_b=q.stride(0), sq_h=q.stride(1), sk_b=kn.stride(0),
                sk_h=kn.stride(1), sv_b=vn.stride(0), sv_h=vn.stride(1), D=d, BD=triton.next_power_of_2(d), W=w,
                R=r, SUB=sub, BS=min(32, triton.next_power_of_2(splits)), ROPE=rope, WRITE=write, QUANT=quant),
           dict(num_warps=warps), pdl=True)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per sequence, q [B, H, 1, D], to cache positions 0..pos of k/v [B, H, L, D]
    (an int8 cache with its fp32 row scales [B, H, L], see :func:`quantize_cache_rows`).

    ``pos`` is a 1-element integer tensor on the caches' device (the position just written); only chunks
    up to it are read. Same result as :func:`decode_attention_reference` up to fp32 rounding.
    """
    _check_decode_shapes(q, k_cache, v_cache, pos, k_scale, v_scale)
    q = q.contiguous()
    return _launch(q, k_cache.contiguous(), v_cache.contiguous(), pos, None, None, None, None, k_scale, v_scale)


def decode_step_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention from the raw projections, in one launch: rotary embedding of q and k
    (cos/sin: the [D] rows at pos), k and v written into the caches at ``pos``, then attention of q to
    positions 0..pos. q, k, v are [B, H, 1, D] (any strides, unit stride along D); the caches [B, H, L, D]
    are updated in place (an int8 cache and its row scales [B, H, L]: the new rows quantized, as
    :func:`quantize_cache_rows` does). Same result as :func:`decode_step_attention_reference` up to fp32
    rounding."""
    _check_decode_shapes(q, k_cache, v_cache, pos, k_scale, v_scale)
    d = q.shape[-1]
    if k.shape != q.shape or v.shape != q.shape or d % 2:
        raise ValueError(f"decode_step_attention needs q, k, v of one shape [B, H, 1, D] with D even, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cos.numel() != d or sin.numel() != d:
        raise ValueError(f"decode_step_attention takes the rotary rows of one position ({d} values), got "
                         f"{cos.numel()} and {sin.numel()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode_step_attention writes the caches in place: they must be contiguous")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _launch(q, k_cache, v_cache, pos, k, v, cos.reshape(d).contiguous(), sin.reshape(d).contiguous(),
                   k_scale, v_scale)


# Two ops, not one with optional scales: some PyTorch releases (2.11) cannot trace an op whose mutated
# arguments are None (its fake-tensor call fails inside torch.compile).
@torch.library.custom_op("spectra::decode_step_attention", mutates_args=("k_cache", "v_cache"))
def decode_step_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             pos: torch.Tensor) -> torch.Tensor:
    """:func:`decode_step_attention` as an opaque op for ``torch.compile`` (it updates the caches in place)."""
    return decode_step_attention(q, k, v, cos, sin, k_cache, v_cache, pos)


@torch.library.custom_op("spectra::decode_step_attention_int8",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def decode_step_attention_int8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  pos: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """:func:`decode_step_attention` on an int8 cache and its row scales, as an opaque op for ``torch.compile``."""
    return decode_step_attention(q, k, v, cos, sin, k_cache, v_cache, pos, k_scale, v_scale)


def _decode_step_attention_fake(q, *rows_and_caches):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


decode_step_attention_op.register_fake(_decode_step_attention_fake)
decode_step_attention_int8_op.register_fake(_decode_step_attention_fake)


def uses_decode_kernel(t: int, device: torch.device, pos: torch.Tensor | None) -> bool:
    """Whether a cached step takes the decode kernels (one new token per sequence on a GPU), which need no
    attention mask; prefill and CPU steps use SDPA with the position mask."""
    return t == 1 and device.type == "cuda" and triton is not None and pos is not None and pos.numel() == 1


def cached_step_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A GPU decode step (see :func:`uses_decode_kernel`) from raw q, k, v [B, H, 1, D]: rotary embedding,
    cache update and attention in one kernel."""
    if torch.compiler.is_compiling():
        if k_scale is None:
            return decode_step_attention_op(q, k, v, cos, sin, k_cache, v_cache, pos)
        return decode_step_attention_int8_op(q, k, v, cos, sin, k_cache, v_cache, pos, k_scale, v_scale)
    return decode_step_attention(q, k, v, cos, sin, k_cache, v_cache, pos, k_scale, v_scale)


# --- Prefill: the rotary embedding of q and k, and the cache write of k and v, in one launch ---

if triton is not None:

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        """fp32 x rounded to `dtype` (to nearest, ties to even), as fp32. bf16 by its bits: the same rounding
        as the GPU's conversion, which Triton's interpreter does not give (it truncates)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _rope_halves(lo, hi, c_lo, c_hi, s_lo, s_hi, dtype: tl.constexpr):
        """The two halves of rows x = [lo, hi] rotated as apply_rope_signed rounds them: x * cos and the rolled
        row (hi, lo) times the signed sines each rounded to `dtype`, then their sum."""
        lo, hi = lo.to(tl.float32), hi.to(tl.float32)
        out_lo = _round_to(_round_to(lo * c_lo, dtype) + _round_to(hi * s_lo, dtype), dtype)
        out_hi = _round_to(_round_to(hi * c_hi, dtype) + _round_to(lo * s_hi, dtype), dtype)
        return out_lo.to(dtype), out_hi.to(dtype)  # exact: the values are the dtype's

    @triton.jit
    def _prefill_rope_write(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, out_ptr, T, H, L,
                            sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                            D: tl.constexpr, BH: tl.constexpr, BD2: tl.constexpr, PDL: tl.constexpr):
        # One program per (sequence, position) and group of BH heads; each row [0, D) as its halves [0, D/2)
        # and [D/2, D), so that the rolled row is the other half's tile (no second load of a row).
        if PDL:  # as in pointwise._rms_norm_kernel: q, k, v come from the product before
            gdc_launch_dependents()
            gdc_wait()
        bt = tl.program_id(0)  # sequence * T + position
        b = bt // T
        t = bt - b * T
        HALF: tl.constexpr = D // 2
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        rh = tl.program_id(1) * BH + tl.arange(0, BH)
        rd = tl.arange(0, BD2)
        d_ok = rd < HALF
        ok = (rh[:, None] < H) & d_ok[None, :]
        c_lo = tl.load(cos_ptr + t * D + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        c_hi = tl.load(cos_ptr + t * D + HALF + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s_lo = tl.load(sin_ptr + t * D + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s_hi = tl.load(sin_ptr + t * D + HALF + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        b64 = b.to(tl.int64)
        t64 = t.to(tl.int64)
        heads = rh[:, None].to(tl.int64)
        cols = rd[None, :]
        q_row = q_ptr + b64 * sq_b + t64 * sq_t + heads * sq_h + cols
        k_row = k_ptr + b64 * sk_b + t64 * sk_t + heads * sk_h + cols
        v_row = v_ptr + b64 * sv_b + t64 * sv_t + heads * sv_h + cols
        out_row = out_ptr + (bt.to(tl.int64) * H + heads) * D + cols  # [B, T, H, D], contiguous
        cache_row = ((b64 * H + heads) * L + t64) * D + cols  # position t of the [B, H, L, D] caches
        q_lo, q_hi = _rope_halves(tl.load(q_row, mask=ok, other=0.0), tl.load(q_row + HALF, mask=ok, other=0.0),
                                  c_lo, c_hi, s_lo, s_hi, dtype)
        tl.store(out_row, q_lo, mask=ok)
        tl.store(out_row + HALF, q_hi, mask=ok)
        k_lo, k_hi = _rope_halves(tl.load(k_row, mask=ok, other=0.0), tl.load(k_row + HALF, mask=ok, other=0.0),
                                  c_lo, c_hi, s_lo, s_hi, dtype)
        tl.store(kc_ptr + cache_row, k_lo, mask=ok)
        tl.store(kc_ptr + cache_row + HALF, k_hi, mask=ok)
        tl.store(vc_ptr + cache_row, tl.load(v_row, mask=ok, other=0.0), mask=ok)
        tl.store(vc_ptr + cache_row + HALF, tl.load(v_row + HALF, mask=ok, other=0.0), mask=ok)


PREFILL_TILE = 4096  # values of a program's [BH, D] tile at most: all heads of a position, for 3.9B's 24 x 128


def prefill_rope_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                 sin_signed: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch :func:`prefill_rope_write`: apply_rope_signed of q and k, k and v written into the caches at
    positions 0..T-1; the rotated q, [B, T, H, D]."""
    pos = torch.arange(q.shape[1], device=q.device)
    write_cache_rows(k_cache, None, pos, apply_rope_signed(k.transpose(1, 2), cos, sin_signed))
    write_cache_rows(v_cache, None, pos, v.transpose(1, 2))
    return apply_rope_signed(q.transpose(1, 2), cos, sin_signed).transpose(1, 2).contiguous()


def prefill_rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """A prompt's rotary embedding and cache write into a fresh cache (positions 0..T-1), in one launch.

    q, k, v: [B, T, H, D] (any strides, unit stride along D: e.g. column slices of a fused q/k/v product);
    cos, sin_signed: [T, D], the rotary rows of positions 0..T-1 (the sines as
    :func:`~spectra.ternary.signed_sines` gives them), in q's dtype. Writes k, rotated, and v into rows 0..T-1
    of the contiguous caches [B, H, L, D] (q's floating-point dtype, L >= T) and returns q rotated, a new
    contiguous [B, T, H, D]. Bit for bit :func:`prefill_rope_write_reference`."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or q.shape[-1] % 2:
        raise ValueError(f"prefill_rope_write needs q, k, v of one shape [B, T, H, D] with D even, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, t, h, d = q.shape
    if cos.shape != (t, d) or sin_signed.shape != (t, d):
        raise ValueError(f"prefill_rope_write takes the rotary rows of positions 0..{t - 1}, [T, D] = {(t, d)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin_signed.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[:2] != (b, h) \
            or k_cache.shape[3] != d or k_cache.shape[2] < t:
        raise ValueError(f"prefill_rope_write needs caches [B, H, L >= T, D] = [{b}, {h}, >= {t}, {d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    dtypes = {x.dtype for x in (q, k, v, cos, sin_signed, k_cache, v_cache)}
    if len(dtypes) != 1 or not q.dtype.is_floating_point:
        raise ValueError(f"prefill_rope_write takes q, k, v, cos, sin and the caches in one floating-point dtype "
                         f"(no int8 cache), got {sorted(str(x) for x in dtypes)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("prefill_rope_write writes the caches in place: they must be contiguous")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    bd2 = triton.next_power_of_2(d // 2)
    bh = min(triton.next_power_of_2(h), max(1, PREFILL_TILE // (2 * bd2)))
    launch(_prefill_rope_write, (b * t, triton.cdiv(h, bh)),
           dict(q_ptr=q, k_ptr=k, v_ptr=v, cos_ptr=cos.contiguous(), sin_ptr=sin_signed.contiguous(), kc_ptr=k_cache,
                vc_ptr=v_cache, out_ptr=out),
           dict(T=t, H=h, L=k_cache.shape[2], sq_b=q.stride(0), sq_t=q.stride(1), sq_h=q.stride(2), sk_b=k.stride(0),
                sk_t=k.stride(1), sk_h=k.stride(2), sv_b=v.stride(0), sv_t=v.stride(1), sv_h=v.stride(2), D=d, BH=bh,
                BD2=bd2),
           # no fused multiply-add: in fp32 the roundings to the dtype vanish, and x * cos + partner * sin must
           # still round twice, as the reference's separate products and sum do
           dict(num_warps=4 if bh * bd2 <= 1024 else 8, enable_fp_fusion=False), pdl=True)
    return out


def prefill_kernel_applies(x: torch.Tensor, cache_k: torch.Tensor, cache_scale: torch.Tensor | None) -> bool:
    """Whether a fresh-cache prefill takes :func:`prefill_rope_write`: GPU inference, eager (under
    ``torch.compile`` inductor fuses the PyTorch ops itself), into a floating-point cache of x's dtype."""
    return (fused_pointwise_applies(x) and not torch.compiler.is_compiling() and cache_scale is None
            and cache_k.dtype == x.dtype)
