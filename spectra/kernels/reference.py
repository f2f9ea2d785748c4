"""Plain PyTorch reference for y = x @ W^T with W = trits * per-shard scales, W held packed.

Every fast kernel in this package is tested against this function. It builds the dense weight exactly as
FrozenTernaryLinear does, so the packed and unpacked models give bit-identical logits on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import get_format
from ..ternary import expand_scales, ternary_dense_weight


def ternary_matmul_reference(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int,
                             scales: torch.Tensor, shard_axis: int) -> torch.Tensor:
    trits = get_format(fmt).unpack(packed, in_features)
    return F.linear(x, ternary_dense_weight(trits, scales, shard_axis, x.dtype))


def scale_columns_reference(x: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., k] times the scale of each column's shard (P tensor_split shards of k), in fp32, cast back to x's
    dtype: what launch_support.scale_columns computes in one kernel before a launch with column-shard scales."""
    parts = scales.numel()
    if parts > 1 and in_features % parts == 0:
        # Equal shards (every released model): a broadcast over [.., P, k / P], which torch.compile fuses into
        # x's producer with no per-column index arithmetic. Same products as the general form below.
        xs = x.float().unflatten(-1, (parts, in_features // parts)) * scales.float()[:, None]
        return xs.flatten(-2).to(x.dtype)
    return (x.float() * expand_scales(scales.float(), (1, in_features), 1)).to(x.dtype)


def ternary_matmul_fused_reference(x: torch.Tensor, packed: torch.Tensor, fmt: str, in_features: int,
                                   scales: torch.Tensor, shard_axis: int, *, norm_of: torch.Tensor | None = None,
                                   eps: float = 0.0, swiglu: bool = False, residual: torch.Tensor | None = None,
                                   gain: torch.Tensor | None = None,
                                   matmul=ternary_matmul_reference) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What ``kernels.ternary_matmul_fused`` computes, as separate operations on the product `matmul` gives: the
    RMSNorm factor of `norm_of`'s rows applied to the fp32 product, SwiGLU over [gate; up] halves, the residual
    add and the gained sum, each rounded to x's dtype where the fused kernel rounds."""
    if norm_of is None:
        y = matmul(x, packed, fmt, in_features, scales, shard_axis)
    else:
        xf = norm_of.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (matmul(x.float(), packed, fmt, in_features, scales, shard_axis) * r).to(x.dtype)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = (F.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
    if residual is None:
        return y
    y = (y.float() + residual.float()).to(x.dtype)
    if gain is None:
        return y
    return y, (y.float() * gain.float()).to(x.dtype)
