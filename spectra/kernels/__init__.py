"""Matrix multiplication with packed ternary weights: a dispatcher over fast kernels and the reference.

``ternary_matmul`` is the single entry point the packed linear layer calls. CUDA tensors go to the Triton
kernels of :mod:`spectra.kernels.tq_triton` (a tensor-core kernel on the packed weights with split-k for
small batches, or dequantize-then-cuBLAS where the tuned table says that is faster); CPU decode steps (m <= 8,
no gradient) a compiled loop over the packed bytes (:mod:`spectra.kernels.cpu_gemv`); everything else the
plain PyTorch reference.
"""

from __future__ import annotations

import functools

import torch

from . import cpu_gemv, dispatch
from .plans import clear_plans, get_plan
from .reference import scale_columns_reference, ternary_dense_weight, ternary_matmul_reference

__all__ = ["KERNEL_DTYPES", "ternary_matmul", "ternary_matmul_op", "ternary_matmul_reference", "ternary_dense_weight",
           "scale_columns_reference", "triton_available"]

# activation dtypes the packed Triton kernels take directly (fp32 decodes the weight, then a cuBLAS product)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


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
