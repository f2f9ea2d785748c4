"""Probe (not the library's kernel): decode attention in which every cache row keeps its own softmax state.

    python3 benchmarks/decode_attention_rows_probe.py [--contexts 2048,8192] [--cache fp16,int8] [--warps 4,8]
        [--reps-per-warp 1,2,4]
    TRITON_INTERPRET=1 python3 benchmarks/decode_attention_rows_probe.py --check   # CPU: correctness only

Why: the library's `_decode_attn_partial` keeps one running max, sum and weighted value sum per program. Each
block of 64 cache rows therefore ends in three reductions across the program's warps (the block's max, its
sum, its weighted values), each a shared-memory round trip and a barrier, in the loop's dependent chain. On an
H100 (tenth session) the int8 cache, which halves the bytes, came out *slower* than fp16 at context 8192
(47.1 vs 41.4 us per launch, 3.9B shapes, batch 1): the kernel is bound by that chain per block, not by bytes.

Here a block is a [W, R, D] tile: R rows per warp's lanes (R is what 32 lanes loading 16 bytes each cover of a
row of D values: 2 for fp16, 4 for int8 at D = 128) and W >= warps, so the warps split W. Each of the W x R
rows keeps its own running max, sum and weighted values (an online softmax per row), so a block needs no
reduction across rows at all, only the dot products' reduction across the lanes of a row (shuffles). The
span's rows are merged once, after the loop. The price is registers: the [W, R, D] fp32 accumulator.

What it times, side by side in one run: the library's `decode_attention` (no cache write: the read-only kernel
of the same loop) and this kernel, on the same cold caches (distinct copies, several times the L2), CUDA-graph
replay, median of trials; both checked against `decode_attention_reference` first. Partials are merged here
by PyTorch (not timed): the probe measures the loop. To adopt it, the library kernel's new row (the step's
key and value at pos) can enter the merge after the loop as one more row, instead of replacing a loaded row.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from spectra.kernels import attention
from spectra.kernels.attention import _cache_f32  # int8 values as the library kernel converts them
from spectra.kernels.timing import l2_size, time_graph


@triton.jit
def _load_block(k_ptr, v_ptr, ks_ptr, vs_ptr, base, sbase, rn, end, rd, D: tl.constexpr, QUANT: tl.constexpr):
    """K and V tiles [W, R, D] of cache rows rn [W, R] (rows from `end` on read as 0) and their int8 scales (1
    for an fp16 cache)."""
    ok = rn < end
    offs = base + rn[:, :, None].to(tl.int64) * D + rd[None, None, :]
    k = tl.load(k_ptr + offs, mask=ok[:, :, None], other=0)
    v = tl.load(v_ptr + offs, mask=ok[:, :, None], other=0)
    ks = tl.load(ks_ptr + sbase + rn, mask=ok & QUANT, other=1.0)
    vs = tl.load(vs_ptr + sbase + rn, mask=ok & QUANT, other=1.0)
    return k, v, ks, vs


@triton.jit
def _rows_attention_partial(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, L, S, sm_scale,
                            D: tl.constexpr, W: tl.constexpr, R: tl.constexpr, SUB: tl.constexpr,
                            QUANT: tl.constexpr):
    """Partial (max, sum, weighted value sum) of program (sequence * heads + head, span) over cache rows
    0..pos of its span; a span past pos writes an empty partial (max -inf)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    n = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, L)
    ROWS: tl.constexpr = W * R
    SPAN: tl.constexpr = ROWS * SUB
    start = c * SPAN
    slot = bh * S + c
    rd = tl.arange(0, D)
    if start >= n:
        tl.store(m_ptr + slot, float("-inf"))
        tl.store(l_ptr + slot, 0.0)
        tl.store(acc_ptr + slot.to(tl.int64) * D + rd, tl.zeros((D,), tl.float32))
        return
    end = tl.minimum(start + SPAN, n)
    base = bh.to(tl.int64) * L * D
    sbase = bh.to(tl.int64) * L
    rr = tl.arange(0, W)[:, None] * R + tl.arange(0, R)[None, :]  # [W, R] row offsets of a block
    q = tl.load(q_ptr + bh * D + rd).to(tl.float32)[None, None, :]
    m = tl.full((W, R), float("-inf"), tl.float32)
    l_rows = tl.zeros((W, R), tl.float32)
    acc = tl.zeros((W, R, D), tl.float32)
    k, v, ks, vs = _load_block(k_ptr, v_ptr, ks_ptr, vs_ptr, base, sbase, start + rr, end, rd, D, QUANT)
    for s0 in range(start, end, ROWS):
        rn = s0 + rr
        ok = rn < end
        # the next block's loads go out before this block's arithmetic
        k_n, v_n, ks_n, vs_n = _load_block(k_ptr, v_ptr, ks_ptr, vs_ptr, base, sbase, rn + ROWS, end, rd, D, QUANT)
        scores = tl.where(ok, tl.sum(_cache_f32(k, QUANT) * q, axis=2) * ks * sm_scale, float("-inf"))
        m_new = tl.maximum(m, scores)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has read nothing stays empty
        alpha = tl.exp(m - m_use)
        e = tl.exp(scores - m_use)
        l_rows = l_rows * alpha + e
        acc = acc * alpha[:, :, None] + (e * vs)[:, :, None] * _cache_f32(v, QUANT)
        m = m_new
        k, v, ks, vs = k_n, v_n, ks_n, vs_n
    m_span = tl.max(tl.max(m, axis=1), axis=0)  # finite: the span holds a filled row
    f = tl.exp(m - m_span)
    tl.store(m_ptr + slot, m_span)
    tl.store(l_ptr + slot, tl.sum(tl.sum(l_rows * f, axis=1), axis=0))
    tl.store(acc_ptr + slot.to(tl.int64) * D + rd, tl.sum(tl.sum(acc * f[:, :, None], axis=1), axis=0))


def block_shape(d: int, element_size: int, warps: int, reps: int) -> tuple[int, int]:
    """(W, R): R rows per warp's lanes when each lane loads 16 bytes of a row of d values; W = warps x reps."""
    lanes_per_row = max(1, min(32, d * element_size // 16))
    return warps * reps, 32 // lanes_per_row


def rows_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                   k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, warps: int, reps: int,
                   sms: int) -> tuple[torch.Tensor, ...]:
    """The partials (max, sum, weighted value sum) of every (sequence, head, span), and the span count."""
    b, h, _, d = q.shape
    length = k_cache.shape[2]
    w, r = block_shape(d, k_cache.element_size(), warps, reps)
    sub = attention.blocks_per_span(length, b * h, sms, w * r)
    spans = triton.cdiv(length, w * r * sub)
    m = torch.empty(b * h * spans, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h * spans, d, device=q.device)
    quant = k_scale is not None
    _rows_attention_partial[(b * h, spans)](q, k_cache, v_cache, k_scale if quant else m, v_scale if quant else m,
                                            pos, m, l_sum, acc, length, spans, d ** -0.5, D=d, W=w, R=r, SUB=sub,
                                            QUANT=quant, num_warps=warps)
    return m, l_sum, acc, spans


def merge(m: torch.Tensor, l_sum: torch.Tensor, acc: torch.Tensor, spans: int, q: torch.Tensor) -> torch.Tensor:
    """The attention output [B, H, 1, D] from the spans' partials (PyTorch, fp32)."""
    b, h, _, d = q.shape
    m, l_sum, acc = m.view(b * h, spans), l_sum.view(b * h, spans), acc.view(b * h, spans, d)
    f = torch.exp(m - m.amax(1, keepdim=True))
    return ((acc * f[..., None]).sum(1) / (l_sum * f).sum(1, keepdim=True)).view(b, h, 1, d).to(q.dtype)


def random_caches(int8: bool, b: int, h: int, length: int, d: int, device, gen) -> tuple:
    """(k, v, k scale, v scale) of random rows; the scales are None for an fp16 cache."""
    k = torch.randn(b, h, length, d, device=device, generator=gen) * 2
    v = torch.randn(b, h, length, d, device=device, generator=gen)
    if not int8:
        return k.half(), v.half(), None, None
    (kc, ks), (vc, vs) = attention.quantize_cache_rows(k), attention.quantize_cache_rows(v)
    return kc, vc, ks, vs


def check(contexts: list[int], warps: list[int], reps: list[int]) -> list[str]:
    """Failures of the probe against decode_attention_reference (fp16 and int8 caches, odd shapes)."""
    gen = torch.Generator().manual_seed(0)
    failures = []
    for b, h, d in ((1, 3, 128), (2, 2, 64)):
        for ctx in contexts:
            for int8 in (False, True):
                caches = random_caches(int8, b, h, ctx + 37, d, "cpu", gen)
                q = torch.randn(b, h, 1, d, generator=gen).half()
                pos = torch.tensor([ctx])
                want = attention.decode_attention_reference(q, *caches[:2], pos, *caches[2:]).float()
                for wp in warps:
                    for rp in reps:
                        m, l_sum, acc, spans = rows_attention(q, *caches[:2], pos, *caches[2:], wp, rp, sms=2)
                        err = float((merge(m, l_sum, acc, spans, q).float() - want).abs().max())
                        if not err < 2e-3:
                            failures.append(f"b{b} h{h} d{d} ctx {ctx} int8={int8} warps {wp} x {rp}: {err:.2e}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--cache", default="fp16,int8")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--reps-per-warp", default="1,2,4", help="W = warps x this (rows of a block: W x R)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--check", action="store_true", help="correctness only (runs on a CPU under TRITON_INTERPRET=1)")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    warps = [int(w) for w in args.warps.split(",")]
    reps = [int(r) for r in args.reps_per_warp.split(",")]
    if args.check:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--check without a GPU needs TRITON_INTERPRET=1")
        failures = check(contexts, warps, reps)
        print("\n".join(failures) or "all variants match the reference")
        raise SystemExit(1 if failures else 0)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    b, h, d = args.batch, args.heads, args.head_dim
    print(f"{torch.cuda.get_device_name(dev)}; batch {b}, {h} heads x {d}, fp16 queries, cold caches, CUDA graphs "
          f"of {args.reps} launches, median of {args.trials}")
    print("| cache | context | kernel | block (W x R) | warps | us per launch | cache GB/s read | vs library |")
    print("|---|---|---|---|---|---|---|---|")
    for cache in args.cache.split(","):
        for ctx in contexts:
            for row in time_context(cache == "int8", ctx, b, h, d, warps, reps, sms, args.reps, args.trials, gen):
                print(row, flush=True)
            torch.cuda.empty_cache()


def time_context(int8: bool, ctx: int, b: int, h: int, d: int, warps: list[int], reps: list[int], sms: int,
                 graph_reps: int, trials: int, gen: torch.Generator) -> list[str]:
    """Table rows for one cache dtype and context: the library kernel, then each probe variant."""
    dev = gen.device
    cache = "int8" if int8 else "fp16"
    length = ctx + 68
    row_bytes = d + 4 if int8 else 2 * d  # an int8 row carries its fp32 scale
    copies = max(2, min(30, -(-4 * l2_size(dev) // (2 * b * h * length * row_bytes))))
    caches = [random_caches(int8, b, h, length, d, dev, gen) for _ in range(copies)]
    q = torch.randn(b, h, 1, d, device=dev, dtype=torch.float16, generator=gen)
    pos = torch.tensor([ctx], device=dev)
    want = attention.decode_attention_reference(q, *caches[0][:2], pos, *caches[0][2:]).float()
    tol = 2e-3 * max(1.0, float(want.abs().max()))
    read = 2 * b * h * (ctx + 1) * row_bytes

    def library(i: int) -> torch.Tensor:
        return attention.decode_attention(q, *caches[i][:2], pos, *caches[i][2:])

    err = float((library(0).float() - want).abs().max())
    t_lib = time_graph(library, copies, graph_reps, trials)
    chunk = attention.INT8_CHUNK if int8 else attention.CHUNK
    warps_lib = attention.INT8_WARPS if int8 else 4
    rows = [f"| {cache} | {ctx} | library | {chunk} rows | {warps_lib} | {t_lib * 1e6:.1f} | "
            f"{read / t_lib / 1e9:.0f} | 1.00x (err {err:.1e}) |"]
    for wp in warps:
        for rp in reps:
            w, r = block_shape(d, caches[0][0].element_size(), wp, rp)

            def probe(i: int, wp: int = wp, rp: int = rp) -> tuple:
                return rows_attention(q, *caches[i][:2], pos, *caches[i][2:], wp, rp, sms)

            err = float((merge(*probe(0), q).float() - want).abs().max())
            if not err < tol:
                rows.append(f"| {cache} | {ctx} | rows | {w} x {r} | {wp} | WRONG: max err {err:.2e} | | |")
                continue
            t = time_graph(probe, copies, graph_reps, trials)
            rows.append(f"| {cache} | {ctx} | rows | {w} x {r} | {wp} | {t * 1e6:.1f} | {read / t / 1e9:.0f} | "
                        f"{t_lib / t:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
