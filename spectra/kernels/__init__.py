"""Matrix multiplication with packed ternary weights: a dispatcher over fast kernels and the reference.

``ternary_matmul`` is the single entry point the packed linear layer calls. CUDA tensors go to the Triton
kernels of :mod:`spectra.kernels.tq_triton` (a tensor-core kernel on the packed weights with split-k for
small batches, or dequantize-then-cuBLAS where the tuned table says that is faster); everything else
(CPU tensors, no Triton) runs the plain PyTorch reference.
"""

from __future__ import annotations

import torch

from .reference import scale_columns_reference, ternary_dense_weight, ternary_matmul_reference

__all__ = ["KERNEL_DTYPES", "ternary_matmul", "ternary_matmul_op", "ternary_matmul_reference", "ternary_dense_weight",
           "scale_columns_reference", "triton_available"]

# activation dtypes the packed Triton kernels take directly (fp32 decodes the weight, then a cuBLAS product)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_config_memo: dict[tuple, object] = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int,
                   scales: torch.Tensor, shard_axis: int) -> torch.Tensor:
    """y = x @ (trits * scales)^T for x [..., in_features] and packed trits [out_features, row_bytes]."""
    if not (x.is_cuda and triton_available()):
        return ternary_matmul_reference(x, packed, fmt, in_features, scales, shard_axis)
    from . import dispatch

    dispatch.check_inputs(x, packed, fmt, in_features, scales, shard_axis)
    n = packed.shape[0]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    if x.dtype not in KERNEL_DTYPES:
        # fp32 activations: decode on the GPU, then an fp32 cuBLAS product (exact weights, no tensor-core
        # rounding of x); the packed kernels are for the fp16/bf16 inference path.
        w = dispatch.dequantize(packed, fmt, in_features, scales.contiguous(), shard_axis, x.dtype)
        return torch.matmul(x2, w.t()).reshape(*x.shape[:-1], n)
    mode = dispatch.scale_mode(scales, shard_axis)
    key = (fmt, n, in_features, dispatch.m_bucket(m), x.dtype, mode, x.device)
    cfg = _config_memo.get(key)
    if cfg is None:
        cfg = dispatch.lookup_config(fmt, n, in_features, m, x.dtype, mode, x.device)
        _config_memo[key] = cfg
    y = dispatch.run_config(x2, packed, fmt, in_features, scales.contiguous(), shard_axis, cfg)
    return y.reshape(*x.shape[:-1], n)


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
    """Forget the per-shape config choices (after tuning)."""
    _config_memo.clear()
