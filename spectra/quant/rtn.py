"""Round-to-nearest (RTN) quantization: the baseline GPTQ is measured against, on the same grid."""

from __future__ import annotations

import torch

from .grid import effective_group_size, grid_params, num_groups, to_codes
from .linear import QuantizedWeight


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False) -> QuantizedWeight:
    """Each group of `group_size` columns of `weight` [out, in] rounded to its own min/max grid."""
    w = weight.detach().float()
    out, n = w.shape
    size = effective_group_size(group_size, n)
    groups = num_groups(group_size, n)
    scales = torch.empty(out, groups, device=w.device)
    zeros = torch.empty(out, groups, device=w.device)
    codes = torch.empty(out, n, dtype=torch.int64, device=w.device)
    for g in range(groups):
        cols = slice(g * size, min((g + 1) * size, n))
        scale, zero = grid_params(w[:, cols], bits, sym)
        scales[:, g], zeros[:, g] = scale, zero
        codes[:, cols] = to_codes(w[:, cols], scale, zero, 2**bits - 1)
    return QuantizedWeight(codes, scales, zeros, None, bits, group_size)
