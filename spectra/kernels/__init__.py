"""Matrix multiplication with packed ternary weights: a dispatcher over fast kernels and the reference.

``ternary_matmul`` is the single entry point the packed linear layer calls. CUDA tensors go to the Triton
kernels of :mod:`spectra.kernels.tq_triton` (a tensor-core kernel on the packed weights with split-k for
small batches, or dequantize-then-cuBLAS where the tuned table says that is faster); CPU decode steps (m <= 8,
no gradient) a compiled loop over the packed bytes (:mod:`spectra.kernels.cpu_gemv`); everything else the
plain PyTorch reference.
"""

from __future__ import annotations

import functools
import os

import torch

from . import configs, cpu_gemv, dispatch, launch_support
from .configs import FUSED_MAX_M
from .plans import Fusion, clear_plans, get_plan
from .reference import (
    scale_columns_reference,
    ternary_dense_weight,
    ternary_matmul_fused_reference,
    ternary_matmul_reference,
)

__all__ = ["KERNEL_DTYPES", "ternary_matmul", "ternary_matmul_op", "ternary_matmul_reference", "ternary_dense_weight",
           "scale_columns_reference", "triton_available", "ternary_matmul_fused", "ternary_matmul_fused_reference",
           "fused_matmul_applies"]

# activation dtypes the packed Triton kernels take directly (fp32 decodes the weight, then a cuBLAS product)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Decode products with the norm, SwiGLU and residual add in their kernel (ternary_matmul_fused). On by default
# only once their GPU tests passed and a decode step measured faster with them on a GPU (docs/performance.md);
# SPECTRA_FUSED_DECODE=1 / 0 forces them on / off (benchmarks compare the two).
FUSED_DECODE_VERIFIED_ON_GPU = False
FUSED_DECODE = os.environ.get("SPECTRA_FUSED_DECODE", "1" if FUSED_DECODE_VERIFIED_ON_GPU else "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int,
                   scales: torch.Tensor, shard_axis: int) -> torch.Tensor:
    """y = x @ (trits * scales)^T for x [..., in_features] and packed trits [out_features, row_bytes].

    On CUDA the call runs a cached launch plan (:mod:`spectra.kernels.plans`): inputs are validated and the
    kernel config chosen once per call signature, so an eager call costs little more than the launch."""
    if not (x.is_cuda and triton_available()):
        if cpu_gemv.usable(x):  # a decode step on the CPU: one compiled loop over the packed bytes
            dispatch.check_inputs(x, packed, fmt, in_features, scales, shard_axis)
            y = cpu_gemv.ternary_matmul_cpu(x, packed, fmt, in_features, scales, shard_axis)
            if y is not None:
                return y
        return ternary_matmul_reference(x, packed, fmt, in_features, scales, shard_axis)
    if not scales.is_contiguous():
        scales = scales.contiguous()
    if x.numel() == 0:
        dispatch.check_inputs(x, packed, fmt, in_features, scales, shard_axis)
        return x.new_empty(*x.shape[:-1], packed.shape[0])
    return get_plan(x, packed, fmt, in_features, scales, shard_axis)(x, packed, scales)


@torch.library.custom_op("spectra::ternary_matmul", mutates_args=())
def ternary_matmul_op(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                      shard_axis: int) -> torch.Tensor:
    """:func:`ternary_matmul` as an opaque PyTorch op, so ``torch.compile`` keeps our kernels and fuses the
    rest of the model (norms, rotary embedding, SwiGLU) around them."""
    return ternary_matmul(x, packed, fmt, in_features, scales, shard_axis)


@ternary_matmul_op.register_fake
def _ternary_matmul_fake(x, packed, fmt, in_features, scales, shard_axis):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def clear_config_memo() -> None:
    """Forget the per-shape config choices and launch plans (after tuning)."""
    clear_plans()
    configs.clear_fused_memo()


def fused_matmul_applies(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                         shard_axis: int) -> bool:
    """Whether :func:`ternary_matmul_fused` runs one kernel for activations `x` and these packed weights: a
    decode-sized product (at most FUSED_MAX_M rows) of 16-bit activations on a GPU, and a kernel with the fused
    epilogue for its shape (``configs.fused_config``). Elsewhere it computes the same result with separate
    operations."""
    if not (FUSED_DECODE and x.is_cuda and triton_available() and x.dtype in KERNEL_DTYPES
            and 0 < x.numel() // x.shape[-1] <= FUSED_MAX_M and dispatch.gemv_usable(packed)):
        return False
    return configs.fused_config(fmt, packed.shape[0], in_features, x.numel() // in_features, x.dtype,
                                launch_support.scale_mode(scales, shard_axis), x.device) is not None


def ternary_matmul_fused(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int, scales: torch.Tensor,
                         shard_axis: int, *, norm_of: torch.Tensor | None = None, eps: float = 0.0,
                         swiglu: bool = False, residual: torch.Tensor | None = None,
                         gain: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`ternary_matmul` with the small operations of a decode step around it taken into the product:

    - `norm_of` (shaped like x): x is an RMSNorm's gain times these rows; the product is that of their
      normalised rows (each output row times 1 / sqrt(mean(norm_of row^2) + eps));
    - `swiglu`: the weight's rows are [gate; up] halves; the result is silu(gate) * up (half the columns);
    - `residual`: the result plus `residual` (shaped like the result), and with `gain` also that sum times
      `gain` (the next RMSNorm's): returns (sum, sum * gain).

    One kernel where :func:`fused_matmul_applies`, else :func:`ternary_matmul_fused_reference` on
    :func:`ternary_matmul` (same results up to rounding)."""
    n_out = packed.shape[0] // 2 if swiglu else packed.shape[0]
    _check_fused(x, packed, in_features, n_out, norm_of, swiglu, residual, gain)
    if not fused_matmul_applies(x, packed, fmt, in_features, scales, shard_axis):
        return ternary_matmul_fused_reference(x, packed, fmt, in_features, scales, shard_axis, norm_of=norm_of,
                                              eps=eps, swiglu=swiglu, residual=residual, gain=gain,
                                              matmul=ternary_matmul)
    if not scales.is_contiguous():
        scales = scales.contiguous()
    fusion = Fusion(norm_of is not None, swiglu, residual is not None, gain is not None,
                    float(eps) if norm_of is not None else 0.0)
    return get_plan(x, packed, fmt, in_features, scales, shard_axis, fusion=fusion).fused(
        x, packed, scales, norm_of, residual, gain)


def _check_fused(x: torch.Tensor, packed: torch.Tensor, in_features: int, n_out: int, norm_of: torch.Tensor | None,
                 swiglu: bool, residual: torch.Tensor | None, gain: torch.Tensor | None) -> None:
    if swiglu and packed.shape[0] % 2:
        raise ValueError(f"swiglu needs [gate; up] weight rows (an even count), got {packed.shape[0]}")
    if norm_of is not None and (norm_of.shape != x.shape or norm_of.dtype != x.dtype or not norm_of.is_contiguous()):
        raise ValueError(f"norm_of must be a contiguous tensor shaped like x {tuple(x.shape)} ({x.dtype}), got "
                         f"{tuple(norm_of.shape)} ({norm_of.dtype})")
    out_shape = (*x.shape[:-1], n_out)
    if residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError(f"residual must be a contiguous {x.dtype} tensor of the result's shape {out_shape}, got "
                         f"{tuple(residual.shape)} ({residual.dtype})")
    if gain is not None and (residual is None or tuple(gain.shape) != (n_out,) or gain.dtype != x.dtype
                             or not gain.is_contiguous()):
        raise ValueError(f"gain must come with a residual and be a contiguous {x.dtype} vector of {n_out} values, "
                         f"got {tuple(gain.shape)} ({gain.dtype})")
