"""Decode attention over the filled part of a preallocated KV cache (split-KV, "flash-decoding").

A decode step attends one new query per sequence to the cache positions 0..pos. The cache has a fixed
length (``max_len``) so that a step can be captured once in a CUDA graph; scaled_dot_product_attention with a
mask then reads and masks the whole cache every step, so a step's time grows with ``max_len``, not with the
position reached (measured on an H100: 346 -> 288 steps/s for a 3.9B TQ2 model between max_len 128 and 4096).

Here the number of positions to read comes from the device (``pos``), so one captured graph serves every
position. Two kernels: ``_decode_attn_partial`` gives each (sequence, head, chunk of CHUNK positions) program
the running max, sum and weighted value sum of its chunk (programs whose chunk starts past pos exit at once);
``_decode_attn_combine`` merges the chunks of each (sequence, head). Softmax and sums in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs use the reference
    triton = None

CHUNK = 64  # cache positions per partial program


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               pos: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over cache positions 0..pos for q [B, H, 1, D], caches [B, H, L, D]."""
    mask = pos.reshape(-1)[:1, None] >= torch.arange(k_cache.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)


if triton is not None:

    @triton.jit
    def _decode_attn_partial(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, L, S, sm_scale,
                             D: tl.constexpr, BD: tl.constexpr, CHUNK_N: tl.constexpr):
        bh = tl.program_id(0)  # sequence * heads + head
        c = tl.program_id(1)   # chunk of cache positions
        n = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, L)  # positions 0..pos are filled (never past L)
        start = c * CHUNK_N
        if start < n:
            rd = tl.arange(0, BD)
            d_ok = rd < D
            rn = start + tl.arange(0, CHUNK_N)
            n_ok = rn < n
            q = tl.load(q_ptr + bh * D + rd, mask=d_ok, other=0.0).to(tl.float32)
            base = bh.to(tl.int64) * L * D
            offs = base + rn[:, None].to(tl.int64) * D + rd[None, :]
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1) * sm_scale
            scores = tl.where(n_ok, scores, float("-inf"))
            m = tl.max(scores, axis=0)
            p = tl.exp(scores - m)
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            acc = tl.sum(p[:, None] * v, axis=0)
            slot = bh * S + c
            tl.store(m_ptr + slot, m)
            tl.store(l_ptr + slot, tl.sum(p, axis=0))
            tl.store(acc_ptr + slot.to(tl.int64) * D + rd, acc, mask=d_ok)

    @triton.jit
    def _decode_attn_combine(m_ptr, l_ptr, acc_ptr, pos_ptr, out_ptr, L, S,
                             D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, CHUNK_N: tl.constexpr):
        bh = tl.program_id(0)
        n = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, L)
        used = (n + CHUNK_N - 1) // CHUNK_N  # chunks that ran (the others left their slots untouched)
        rd = tl.arange(0, BD)
        d_ok = rd < D
        m_all = tl.full((BS,), float("-inf"), dtype=tl.float32)
        for s0 in range(0, used, BS):  # the largest chunk maximum first
            rs = s0 + tl.arange(0, BS)
            m_all = tl.maximum(m_all, tl.load(m_ptr + bh * S + rs, mask=rs < used, other=float("-inf")))
        m_max = tl.max(m_all, axis=0)
        num = tl.zeros((BD,), dtype=tl.float32)
        den = tl.zeros((BS,), dtype=tl.float32)
        for s0 in range(0, used, BS):
            rs = s0 + tl.arange(0, BS)
            ok = rs < used
            w = tl.exp(tl.load(m_ptr + bh * S + rs, mask=ok, other=float("-inf")) - m_max)
            den += w * tl.load(l_ptr + bh * S + rs, mask=ok, other=0.0)
            part = tl.load(acc_ptr + (bh * S + rs[:, None]).to(tl.int64) * D + rd[None, :],
                           mask=ok[:, None] & d_ok[None, :], other=0.0)
            num += tl.sum(w[:, None] * part, axis=0)
        out = num / tl.sum(den, axis=0)
        tl.store(out_ptr + bh * D + rd, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence, q [B, H, 1, D], to cache positions 0..pos of k/v [B, H, L, D].

    ``pos`` is a 1-element integer tensor on the caches' device (the position just written); only chunks
    up to it are read. Same result as :func:`decode_attention_reference` up to fp32 rounding.
    """
    b, h, t, d = q.shape
    if t != 1 or k_cache.shape != v_cache.shape or k_cache.shape[:2] != (b, h) or k_cache.shape[3] != d:
        raise ValueError(f"decode_attention needs q [B, H, 1, D] and caches [B, H, L, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if pos.numel() != 1:
        raise ValueError(f"decode_attention takes one position shared by the batch, got {pos.numel()}")
    length = k_cache.shape[2]
    splits = triton.cdiv(length, CHUNK)
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    m = torch.empty(b * h * splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h * splits, d, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    bd = triton.next_power_of_2(d)
    _decode_attn_partial[(b * h, splits)](q, k_cache, v_cache, pos, m, l_sum, acc, length, splits, d ** -0.5,
                                          D=d, BD=bd, CHUNK_N=CHUNK, num_warps=4)
    _decode_attn_combine[(b * h,)](m, l_sum, acc, pos, out, length, splits, D=d, BD=bd,
                                   BS=min(32, triton.next_power_of_2(splits)), CHUNK_N=CHUNK, num_warps=4)
    return out


@torch.library.custom_op("spectra::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        pos: torch.Tensor) -> torch.Tensor:
    """:func:`decode_attention` as an opaque op for ``torch.compile``."""
    return decode_attention(q, k_cache, v_cache, pos)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, pos):
    return torch.empty_like(q)


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """What the model's attention calls once a KV cache is set up: one-token decode steps on a GPU read only
    the filled positions (:func:`decode_attention`); prefill and CPU use SDPA with the position mask."""
    if q.shape[2] == 1 and q.is_cuda and triton is not None and pos.numel() == 1:
        if torch.compiler.is_compiling():
            return decode_attention_op(q, k_cache, v_cache, pos)
        return decode_attention(q, k_cache, v_cache, pos)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
