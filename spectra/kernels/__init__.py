"""Matrix multiplication with packed ternary weights: a dispatcher over fast kernels and the reference.

``ternary_matmul`` is the single entry point the packed linear layer calls. Fast paths are used where
they apply; everywhere else (CPU, unsupported dtypes) the plain PyTorch reference runs.
"""

from __future__ import annotations

import torch

from .reference import ternary_dense_weight, ternary_matmul_reference

__all__ = ["ternary_matmul", "ternary_matmul_reference", "ternary_dense_weight"]


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int,
                   scales: torch.Tensor, shard_axis: int) -> torch.Tensor:
    """y = x @ (trits * scales)^T for x [..., in_features] and packed trits [out_features, row_bytes]."""
    return ternary_matmul_reference(x, packed, fmt, in_features, scales, shard_axis)
