"""Fused STE ternarization for training on GPU.

The eager form of ``scale * round(clamp(W / scale, -1, 1))`` (:func:`spectra.linear.ternarize` followed by
:func:`spectra.linear.ternary_dense_weight`) makes about eight passes over the latent weights per forward
(abs, mean, divide, clamp, round, int8 cast, float cast, multiply, dtype cast). Here the per-shard scales
take one reduction pass (``torch.linalg.vector_norm`` with ord 1 reads W once) and one Triton kernel reads W
and writes the ternary weight straight in the compute dtype, so a TriLM training step costs little more
than a FloatLM step. Values are bit-identical to the eager form (same scales, IEEE division, the same
round-half-to-even at +-0.5), which the interpreter test checks on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tq_triton import _shard_of

BLOCK_ROWS = 32
BLOCK_COLS = 128


@triton.jit
def _ternary_weight_kernel(w_ptr, scale_ptr, out_ptr, rows, cols, stride_w, stride_out, parts,
                           SCALE_PER_ROW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    w = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=mask, other=0.0).to(tl.float32)
    # Shard of each feature along the scale axis, for torch.tensor_split sizes (the packed kernels' helper).
    f = r if SCALE_PER_ROW else c
    size = rows if SCALE_PER_ROW else cols
    s = tl.load(scale_ptr + _shard_of(f, size, parts), mask=f < size, other=1.0)
    s = s[:, None] if SCALE_PER_ROW else s[None, :]
    # Correctly rounded division, as torch does, so values at the +-0.5 boundary round the same way.
    q = tl.math.div_rn(w, s)
    # round(clamp(q, -1, 1)) with round-half-to-even: |q| > 0.5 gives +-1, |q| <= 0.5 gives 0.
    t = tl.where(q > 0.5, 1.0, tl.where(q < -0.5, -1.0, 0.0))
    tl.store(out_ptr + r[:, None] * stride_out + c[None, :], (t * s).to(out_ptr.dtype.element_ty), mask=mask)


def ternary_weight_fused(weight: torch.Tensor, scales: torch.Tensor, axis: int,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """trit(W / s) * s for a 2-D weight with per-shard `scales` (length P) splitting `axis` (0 rows, 1 columns).

    No host-device traffic: the shard of each row or column is computed in the kernel, so a training step
    never waits on the GPU here.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows, cols = weight.shape
    parts = scales.numel()
    if (rows, cols)[axis] < parts:
        raise ValueError(f"{parts} shards do not fit {(rows, cols)[axis]} features")
    out = torch.empty((rows, cols), dtype=out_dtype, device=weight.device)
    scale = scales.reshape(-1).to(torch.float32).contiguous()
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    _ternary_weight_kernel[grid](weight, scale, out, rows, cols, weight.stride(0), out.stride(0), parts,
                                 SCALE_PER_ROW=axis == 0, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS)
    return out
